"""Training curves: a PNG of a run's metrics.jsonl.

    python plot.py out/caption/metrics.jsonl              # writes out/caption/metrics.png
    python plot.py out/align/metrics.jsonl --out a.png

train_align.py and train_caption.py draw it beside metrics.jsonl at the end of a run. The
top panel is the training loss (each step, and its running mean over 50 steps) with the
learning rate on a second axis. The bottom panel holds the validation rows the log has, every
--eval-every steps: stage 2's CIDEr and, on the embedded data, each attribute's accuracy;
stage 1's R@1 and shared-attribute accuracy, both ways. For stage 1 it also marks the test
split's figures before and after training (from metrics.json beside the log) as open circles
in the same colours; a stage-1 log without validation rows (--no-validate, or older code) has
only those. A resumed run appends to the log; the last row logged for a step is the one drawn.
"""

import argparse
import json
import os
import sys

RUNNING_MEAN = 50  # steps in the loss's running mean


def read_log(path):
    """-> (training rows, validation rows), each sorted by step, one per step (the last logged)."""
    train, val = {}, {}
    with open(path, "rb") as f:  # bytes: a binary file is reported as not JSON, by its name
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{path}, line {n}: not JSON: not a metrics.jsonl of this project") from None
            if "val" in row:
                val[row["step"]] = row["val"]
            elif "loss" in row:
                train[row["step"]] = row
    return [train[s] for s in sorted(train)], [(s, val[s]) for s in sorted(val)]


def validation_series(val):
    """{name: ([steps], [values])} of the numbers each validation row holds that are worth a
    line: stage 2's CIDEr (on its own axis) and attribute accuracies, stage 1's R@1 and
    shared-attribute accuracies."""
    series = {}

    def add(name, step, value):
        steps, values = series.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)

    for step, v in val:
        if "CIDEr" in v:
            add("CIDEr", step, v["CIDEr"])
        for name, acc in (v.get("attributes") or {}).items():
            add(name, step, acc)
        for name, value in v.items():
            if name.endswith("R@1") or name.endswith("shared-attribute acc"):
                add(name, step, value)
    return series


def stage1_test_points(jsonl, last_step):
    """[(0, before), (steps, after)]: stage 1's test-split figures from the metrics.json
    beside `jsonl`, or [] (stage 2's metrics.json holds no "before")."""
    final = os.path.join(os.path.dirname(os.path.abspath(jsonl)), "metrics.json")
    if not os.path.isfile(final):
        return []
    with open(final) as f:
        done = json.load(f)
    if "before" not in done or "after" not in done:
        return []
    return [(0, done["before"]), (done.get("steps", last_step), done["after"])]


def pyplot():
    """matplotlib's pyplot, drawing into files only (no display needed), imported on first
    use: the project's pictures (these curves, explain.py's) are the only place it is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metrics(jsonl, png):
    """Draw `jsonl`'s curves into `png` (see the module docstring). Returns png."""
    plt = pyplot()
    train, val = read_log(jsonl)
    if not train:
        raise ValueError(f"{jsonl}: no training rows (a run logs one per step)")
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    mean = [sum(loss[max(0, i - RUNNING_MEAN + 1):i + 1]) / (i + 1 - max(0, i - RUNNING_MEAN + 1))
            for i in range(len(loss))]
    series = validation_series(val)
    tests = validation_series(stage1_test_points(jsonl, steps[-1]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(steps, loss, color="0.75", lw=0.6, label="loss")
    top.plot(steps, mean, color="C0", lw=1.5, label=f"loss, mean of {RUNNING_MEAN} steps")
    top.set_yscale("log")  # the first steps fall by a factor of several, the rest by a few percent
    top.set_ylabel("training loss (log scale)")
    lr = top.twinx()
    lr.plot(steps, [r["lr"] for r in train], color="C3", lw=1, ls="--", label="learning rate")
    lr.set_ylabel("learning rate", color="C3")
    lines = top.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    top.legend(lines, [l.get_label() for l in lines], loc="upper right", fontsize=8)
    top.set_title(os.path.basename(os.path.dirname(os.path.abspath(jsonl))) + ": " + os.path.basename(jsonl))
    if series or tests:
        validated = bool(series)
        cider = series.pop("CIDEr", None)
        colour = {name: f"C{i}" for i, name in enumerate(dict.fromkeys([*series, *tests]))}
        for name, (s, v) in series.items():
            bottom.plot(s, v, color=colour[name], marker="o", ms=3, label=name)
        for name, (s, v) in tests.items():  # open circles; labelled by name only where no line is
            bottom.plot(s, v, color=colour[name], marker="o", ms=7, mfc="none", ls="none",
                        label=None if name in series else name)
        if series and tests:
            bottom.plot([], [], color="0.4", marker="o", ms=7, mfc="none", ls="none",
                        label="open: test split, before and after")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("validation accuracy" if validated else "test split, before and after training")
        if cider:
            right = bottom.twinx()
            right.plot(*cider, color="k", marker="s", ms=3, lw=1.5, label="CIDEr")
            right.set_ylabel("CIDEr")
            right.legend(loc="lower center", fontsize=8)
        if series or tests:  # a log of CIDEr alone (no attributes) has nothing more to name
            bottom.legend(loc="lower right", fontsize=8)
    else:
        bottom.text(0.5, 0.5, "no validation rows in this log", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="a metrics.jsonl written by train_align.py or train_caption.py")
    p.add_argument("--out", default=None, help="the PNG (default: beside the log, metrics.png)")
    args = p.parse_args(argv)
    png = args.out or os.path.splitext(args.log)[0] + ".png"
    try:
        plot_metrics(args.log, png)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {getattr(e, 'strerror', None) and f'{e.filename}: {e.strerror}' or e}", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
