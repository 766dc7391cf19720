"""The scripts users run, end to end on a few generated clips: stage 1 resumes exactly,
stage 2 trains and saves, sample.py captions a real mp4 (with and without a soundtrack, or a
folder of files whatever their extensions) and fails cleanly on a broken one; the full
preset's defaults are the paper's recipe; input errors end with one `error:` line and exit
code 2; evaluation scores each clip once against all of its references."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import explain
import metrics
import model as M
import plot
import pretrained as P
import sample
import train_align
import train_bind
import train_caption
import training as T
from tests.distributed import launch_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    data.make_embedded_dataset(str(root), {"train": 24, "val": 4, "test": 6}, workers=1, progress=False)
    return str(root)


def common(clips, out, steps):
    return ["--data-dir", clips, "--out-dir", out, "--max-steps", str(steps), "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "--warmup-steps", "2"]


def stored(cache_dir):
    """How many stores a cache folder holds, and how many clips have an entry in them: the
    splits of a run share one store (cache.py), an entry per clip."""
    stores = os.listdir(cache_dir)
    paths = set()
    for store in stores:
        for shard in os.listdir(os.path.join(cache_dir, store)):
            with open(os.path.join(cache_dir, store, shard, "rows.jsonl")) as f:
                paths.update(json.loads(line)["path"] for line in f)
    return {"stores": len(stores), "clips": len(paths)}


def clip_count(clips, *splits):
    return sum(len({r["id"] for r in json.load(open(os.path.join(clips, f"{s}.json")))}) for s in splits)


def log_rows(path):
    """A metrics.jsonl's rows, without the seconds a validation took."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]


def test_bound_towers_are_what_stage1_aligns_with_its_first_blocks_frozen(clips, tmp_path):
    """train_bind.py writes the video, audio and text towers and their zero-shot accuracy;
    train_align.py starts from the bound towers and, with --train last-k, trains only the last
    block of each (and the projections): the first block leaves it as binding left it."""
    bind = str(tmp_path / "bind")
    train_bind.main(common(clips, bind, 2) + ["--cache-dir", str(tmp_path / "cache")])
    scores = json.load(open(os.path.join(bind, "metrics.json")))["zero-shot"]
    assert set(scores) == {"video colour", "video shape", "video motion", "audio shape", "audio background"}
    align = str(tmp_path / "align")
    train_align.main(common(clips, align, 2) + ["--eval-max", "4", "--cache-dir", str(tmp_path / "cache"),
                                                "--video-init", os.path.join(bind, "video.pth"),
                                                "--audio-init", os.path.join(bind, "audio.pth"),
                                                "--train", "last-k", "--last-k", "1"])
    for tower in ("video", "audio"):
        bound, aligned = (torch.load(os.path.join(d, f"{tower}.pth")) for d in (bind, align))
        assert all(torch.equal(bound[k], aligned[k]) for k in bound if k.startswith(("embeddings.", "encoder.layers.0.")))
        assert not torch.equal(bound["encoder.layers.1.mlp.fc2.weight"], aligned["encoder.layers.1.mlp.fc2.weight"])


def test_stage1_resume_is_exact(clips, tmp_path):
    """4 steps straight give the same losses as 2 steps, a checkpoint, and 2 resumed steps,
    and the resumed run's log goes on where the first stopped: the same rows, validations
    included (one a step: a quarter of --max-steps)."""
    straight = train_align.main(common(clips, str(tmp_path / "a"), 4) + ["--eval-max", "4"])
    first = train_align.main(common(clips, str(tmp_path / "b"), 4) + ["--eval-max", "4", "--stop-at", "2"])
    assert not os.path.exists(tmp_path / "b" / "video.pth")  # a stopped run is not finished
    rest = train_align.main(common(clips, str(tmp_path / "b"), 4)
                            + ["--eval-max", "4", "--resume", str(tmp_path / "b" / "ckpt.pt")])
    assert len(straight) == 4 and len(first) == 2 and len(rest) == 2
    np.testing.assert_allclose(first + rest, straight, rtol=0, atol=1e-6)
    assert os.path.exists(tmp_path / "b" / "video.pth") and os.path.exists(tmp_path / "b" / "metrics.json")
    resumed = log_rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "val" in r] == [1, 2, 3, 4]
    assert resumed == log_rows(tmp_path / "a" / "metrics.jsonl")


def test_stage1_validation_leaves_the_training_untouched(clips, tmp_path):
    """Validating on the val split at every step trains the same encoders, bit for bit, as
    --no-validate, and logs R@1 and the shared-attribute accuracy both ways at each step. The
    video tower's patch dropout draws from the global generator that evaluation's loader
    draws its seed from, so a validation that moved it would show here."""
    argv = lambda out: common(clips, str(tmp_path / out), 4) + ["--eval-max", "4", "--patch-dropout",
                                                                 "--cache-dir", str(tmp_path / "cache")]
    validated = train_align.main(argv("validated") + ["--eval-every", "1"])
    plain = train_align.main(argv("plain") + ["--no-validate"])
    assert validated == plain
    for name in ("video.pth", "audio.pth"):
        a, b = (T.load_checkpoint(str(tmp_path / out / name)) for out in ("validated", "plain"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    val = [r for r in log_rows(tmp_path / "validated" / "metrics.jsonl") if "val" in r]
    assert [r["step"] for r in val] == [1, 2, 3, 4]
    for way in ("video->audio", "audio->video"):
        assert all(f"{way} R@1" in r["val"] and f"{way} shared-attribute acc" in r["val"] for r in val)
    assert not [r for r in log_rows(tmp_path / "plain" / "metrics.jsonl") if "val" in r]
    assert stored(tmp_path / "cache") == {"stores": 1, "clips": clip_count(clips, "train", "val", "test")}


def test_stage1_trains_the_same_from_its_input_cache_as_from_the_files(clips, tmp_path):
    """--cache-inputs (the tiny default) decodes each clip once; training from those inputs,
    with the same random flips, follows the losses of decoding every batch (fp16 storage
    aside; the embedded clips fit one audio window, so no chunk choice is lost)."""
    argv = common(clips, str(tmp_path / "a"), 3) + ["--eval-max", "4", "--cache-dir", str(tmp_path / "cache")]
    cached = train_align.main(argv)
    decoded = train_align.main(common(clips, str(tmp_path / "b"), 3) + ["--eval-max", "4", "--no-cache-inputs"])
    np.testing.assert_allclose(cached, decoded, rtol=0, atol=2e-2)
    assert stored(tmp_path / "cache") == {"stores": 1, "clips": clip_count(clips, "train", "val", "test")}


def test_the_tiny_main_job_trains_stage1_first_and_reads_its_encoders(clips, tmp_path, monkeypatch, capsys):
    """`python train_caption.py` with no stage-1 encoders runs train_align.py's training
    (same seed and data) into --align-dir, then captions from those frozen encoders. The
    chained stage 1 and `python train_align.py --seed S` are one path, not two: they end
    with the same weights, bit for bit."""
    calls, chained_losses = [], []
    real = train_align.main
    short = ["--max-steps", "3", "--batch-size", "4", "--eval-max", "4", "--warmup-steps", "1"]
    monkeypatch.setattr(train_align, "main", lambda argv: calls.append(argv) or chained_losses.extend(
        real(argv + short)))
    align = str(tmp_path / "align")
    train_caption.main(common(clips, str(tmp_path / "caption"), 2)
                       + ["--eval-max", "2", "--align-dir", align, "--cache-dir", str(tmp_path / "cache"), "--seed", "3"])
    assert len(calls) == 1 and calls[0][calls[0].index("--seed") + 1] == "3"
    alone = str(tmp_path / "alone")  # the stand-alone command a user would type, at the same seed
    alone_losses = real(["--seed", "3", "--data-dir", clips, "--out-dir", alone,
                         "--cache-dir", str(tmp_path / "cache-alone"), "--num-workers", "0"] + short)
    assert len(chained_losses) == 3 and chained_losses == alone_losses
    for name in ("video.pth", "audio.pth"):
        a, b = T.load_checkpoint(os.path.join(align, name)), T.load_checkpoint(os.path.join(alone, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    out = capsys.readouterr().out
    assert f"no stage-1 encoders in {align}: training stage 1 first" in out
    assert json.load(open(tmp_path / "caption" / "metrics.json"))["encoders"] == {
        "video": os.path.join(align, "video.pth"), "audio": os.path.join(align, "audio.pth")}
    # a second run finds them and trains no stage 1; --no-align ignores them
    train_caption.main(common(clips, str(tmp_path / "again"), 1) + ["--eval-max", "2", "--align-dir", align,
                                                                      "--cache-dir", str(tmp_path / "cache")])
    train_caption.main(common(clips, str(tmp_path / "ablation"), 1) + ["--eval-max", "2", "--align-dir", align,
                                                                         "--cache-dir", str(tmp_path / "cache"),
                                                                         "--no-align"])
    assert len(calls) == 1
    assert json.load(open(tmp_path / "ablation" / "metrics.json"))["encoders"]["video"] == str(
        tmp_path / "ablation" / "video.pth")


def test_stage1_encoders_for_another_configuration_are_refused(clips, tmp_path, capsys):
    """An --align-dir left by older code (4 frames, say) would be stretched to fit by the
    loader: the run stops and says what to do instead."""
    align = tmp_path / "align"
    align.mkdir()
    cfg = M.tiny_config()
    for name in ("video", "audio"):
        torch.save(M.VisionTransformer(getattr(cfg, name)).state_dict(), align / f"{name}.pth")
    write_json(align / "metrics.json", {"steps": 400})  # no record of the encoders' shapes
    code, err = run_script(train_caption.main, common(clips, str(tmp_path / "out"), 1) + ["--align-dir", str(align)],
                           capsys)
    assert code == 2 and "was not written by this version of train_align.py" in err and "--no-align" in err


def test_resume_from_a_missing_checkpoint_is_an_error(clips, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        train_align.main(common(clips, str(tmp_path), 2) + ["--resume", str(tmp_path / "nothing.pt")])


def test_stage2_resume_is_exact_and_keeps_the_checkpoints_vocabulary(clips, tmp_path):
    """4 steps straight equal 2 steps, last.pth, and 2 resumed steps. The resumed run is given
    another --vocab-size: it must keep the vocabulary its weights were trained with (a WordPiece
    vocabulary trained again may number its pieces differently)."""
    def run(out, *extra):
        return train_caption.main(common(clips, str(tmp_path / out), 4)
                                  + ["--eval-every", "2", "--eval-max", "2", "--cache-dir", str(tmp_path / "cache"),
                                     "--no-align", *extra])
    straight = run("a")
    first = run("b", "--stop-at", "2")
    rest = run("b", "--resume", str(tmp_path / "b" / "last.pth"), "--vocab-size", "60")
    assert len(first) == 2 and len(rest) == 2
    np.testing.assert_allclose(first + rest, straight, rtol=0, atol=1e-6)


def test_stage2_trains_from_the_feature_cache(clips, tmp_path):
    args = common(clips, str(tmp_path / "caption"), 2) + ["--eval-every", "2", "--eval-max", "2", "--cache-features",
                                                          "--cache-dir", str(tmp_path / "cache"),
                                                          "--no-align"]
    losses = train_caption.main(args)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert stored(tmp_path / "cache") == {"stores": 1, "clips": clip_count(clips, "train", "val", "test")}
    assert os.path.exists(tmp_path / "caption" / "metrics.json")


def test_a_run_whose_feature_cache_is_complete_never_builds_the_towers(clips, tmp_path, monkeypatch):
    """Encoders given as files are fingerprinted by their bytes: the first run builds the
    towers to fill the cache, a second run on the same files finds it complete, never builds
    them, and trains exactly as the first."""
    own = str(tmp_path / "own")  # a run's own initialisation, saved as files to give the others
    train_caption.main(common(clips, own, 1) + ["--eval-max", "2", "--no-cache-features", "--no-align"])
    args = ["--eval-every", "2", "--eval-max", "2", "--cache-features", "--cache-dir", str(tmp_path / "cache"),
            "--video-encoder", os.path.join(own, "video.pth"), "--audio-encoder", os.path.join(own, "audio.pth")]
    first = train_caption.main(common(clips, str(tmp_path / "first"), 2) + args)

    def refuse(net):
        raise AssertionError("the towers were built")
    monkeypatch.setattr(M.UniQ4Cap, "build_encoders", refuse)
    again = train_caption.main(common(clips, str(tmp_path / "again"), 2) + args)
    assert again == first


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory):
    """A stage-2 checkpoint after 3 steps from pixels: -> (out dir, best.pth)."""
    tmp = tmp_path_factory.mktemp("trained")
    out = str(tmp / "caption")
    train_caption.main(common(clips, out, 3) + ["--eval-every", "3", "--eval-max", "2", "--no-cache-features",
                                                "--no-align"])
    return out, os.path.join(out, "best.pth")


def test_a_run_draws_its_training_curves_and_plot_redraws_them_from_any_log(trained, tmp_path, capsys):
    out, _ = trained
    png_magic = b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "metrics.png"), "rb") as f:  # drawn at the end of the run
        assert f.read(8) == png_magic
    again = tmp_path / "curves.png"
    assert plot.main([os.path.join(out, "metrics.jsonl"), "--out", str(again)]) == 0
    assert again.read_bytes()[:8] == png_magic
    not_a_log = tmp_path / "notes.jsonl"
    not_a_log.write_text("some notes\n")
    capsys.readouterr()
    assert plot.main([str(not_a_log)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not JSON" in err[0]


def test_a_moved_output_folder_still_captions_from_anywhere(clips, trained, tmp_path):
    """best.pth names the encoder files it wrote beside itself by their names alone, so the
    folder can be moved and sample.py run from another directory."""
    out, _ = trained
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    stored = torch.load(moved / "best.pth", weights_only=True)["encoders"]
    assert stored == {"video": "video.pth", "audio": "audio.pth"}

    def caption():
        return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--video",
                               os.path.join(clips, "test_00028.mp4"), "--ckpt", str(moved / "best.pth"),
                               "--max-length", "8"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    r = caption()
    assert r.returncode == 0, r.stderr
    (moved / "audio.pth").write_bytes(b"damaged")  # proof that the moved copy is the one read
    r = caption()
    assert r.returncode == 2 and str(moved / "audio.pth") in r.stderr


@pytest.mark.parametrize("name, extra, says", [
    ("best.pth", [], "resume from its last.pth"),
    ("last.pth", ["--max-steps", "3"], "nothing left to train"),
    ("last.pth", ["--seed", "7"], "seed 7 (checkpoint: 42)"),
    ("last.pth", ["--modalities", "video"], "modalities video (checkpoint: video+audio)"),
])
def test_resume_refuses_what_would_train_something_else(clips, trained, tmp_path, capsys, name, extra, says):
    out, _ = trained  # 3 steps, --max-steps 3, seed 42, video+audio, its own encoder initialisation
    argv = common(clips, str(tmp_path / "again"), 5) + ["--no-cache-features", "--no-align",
                                                        "--resume", os.path.join(out, name), *extra]
    code, err = run_script(train_caption.main, argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert says in err.strip().splitlines()[-1]


def test_retrieval_trains_on_top_of_a_captioner_from_its_weights_and_encoders(clips, trained, tmp_path, monkeypatch,
                                                                            capsys):
    """--init-from starts a run (here caption + ITC + ITM) from a stage-2 checkpoint's weights
    and vocabulary, and refuses to go on with frozen encoders other than the ones it read."""
    out, best = trained
    start = {}
    real = T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", lambda net, *a, **k: start.update(
        {k: t.clone() for k, t in P.stage2_state_dict(net).items()}) or real(net, *a, **k))
    encoders = ["--video-encoder", os.path.join(out, "video.pth"), "--audio-encoder", os.path.join(out, "audio.pth")]
    argv = common(clips, str(tmp_path / "retrieval"), 1) + ["--eval-max", "2", "--no-cache-features", "--init-from",
                                                            best, "--itc-weight", "1", "--itm-weight", "1"]
    train_caption.main(argv + encoders)
    ckpt = torch.load(best, weights_only=True)
    assert start.keys() == ckpt["model"].keys()
    assert all(torch.equal(start[k], ckpt["model"][k]) for k in start)
    assert torch.load(tmp_path / "retrieval" / "best.pth", weights_only=True)["tokenizer"] == ckpt["tokenizer"]
    code, err = run_script(train_caption.main, argv + ["--no-align"], capsys)  # this run's own random encoders
    assert code == 2 and "was trained on the video encoder" in err.strip().splitlines()[-1]


def test_train_save_and_caption_a_video(clips, trained, tmp_path):
    out, ckpt = trained
    assert os.path.exists(ckpt) and os.path.exists(os.path.join(out, "metrics.json"))

    video = os.path.join(clips, "test_00028.mp4")
    r = run_sample("--video", video, "--ckpt", ckpt, "--max-length", "8")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and r.stdout.strip()  # one caption, printed

    # a clip without a soundtrack: captioned from the frames, and the output says so
    silent = str(tmp_path / "silent.mp4")
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    data.write_clip(silent, frames, None)
    r = run_sample("--video", silent, "--ckpt", ckpt, "--max-length", "8")
    assert r.returncode == 0, r.stderr
    assert "no audio track in " + silent in r.stderr  # the note on stderr: stdout holds only the caption
    assert len(r.stdout.strip().splitlines()) == 1 and "no audio track" not in r.stdout

    # an unreadable file: one line naming it, non-zero exit, no traceback
    broken = str(tmp_path / "broken.mp4")
    with open(broken, "wb") as f:
        f.write(os.urandom(2000))
    r = run_sample("--video", broken, video, "--ckpt", ckpt, "--max-length", "8")
    assert r.returncode != 0
    assert "broken.mp4" in r.stderr and "Traceback" not in r.stderr
    assert '"captions"' in r.stdout  # the readable file still gets its JSON line


def test_explain_draws_each_clip_with_and_without_sound_and_refuses_what_it_cannot_do(clips, trained, tmp_path):
    _, ckpt = trained
    clip, silent = os.path.join(clips, "test_00028.mp4"), str(tmp_path / "silent.mp4")
    data.write_clip(silent, np.zeros((8, 32, 32, 3), dtype=np.uint8), None)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(os.urandom(2000))
    pictures = tmp_path / "pictures"
    r = run_sample("--video", clip, silent, str(broken), "--ckpt", ckpt, "--max-length", "8", "--explain",
                   str(pictures))
    assert r.returncode == 1 and "Traceback" not in r.stderr  # the broken file: one line, the others drawn
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {broken}: cannot open (InvalidDataError)"]
    png_magic = b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(pictures)) == ["silent.mp4.png", "test_00028.mp4.png"]
    assert all((pictures / f).read_bytes()[:8] == png_magic for f in os.listdir(pictures))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    r = run_sample("--video", clip, "--ckpt", ckpt, "--explain", str(a_file / "pictures"))
    said = r.stderr.strip().splitlines()
    assert r.returncode == 2 and said == [f"error: --explain {a_file / 'pictures'}: Not a directory"]
    assert not r.stdout  # refused before any captioning


def test_explain_measures_the_video_share_of_each_attribute_word_over_a_split(clips, trained, tmp_path, capsys):
    _, ckpt = trained
    out = tmp_path / "shares.json"
    assert explain.main(["--ckpt", ckpt, "--data-dir", clips, "--split", "test", "--out", str(out)]) == 0
    shares = json.loads(out.read_text())["shares"]
    assert sorted(shares) == sorted(data.ATTRIBUTES)
    assert all(0 <= s["video_share_mean"] <= 1 and s["clips"] == clip_count(clips, "test") for s in shares.values())


def test_sample_captions_every_video_in_a_folder_whatever_its_extension(clips, trained, tmp_path, capsys):
    _, ckpt = trained
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mpg", "b.ts", "c.flv", "d.3gp"):  # no extension list decides: PyAV opens each
        shutil.copy(os.path.join(clips, "test_00028.mp4"), folder / name)
    (folder / "notes.txt").write_text("not a video")
    data.write_clip(str(folder / "e.wmv"), np.zeros((8, 32, 32, 3), dtype=np.uint8), None)
    data.write_test_clip(str(folder / "e.wav"), 0.5, 32, 32)  # e.wmv's soundtrack, not a file to caption
    # --device left out: auto, as the training scripts
    assert sample.main(["--video", str(folder), "--ckpt", ckpt, "--max-length", "8"]) == 0
    out, err = capsys.readouterr()
    captioned = [os.path.basename(json.loads(line)["video"]) for line in out.strip().splitlines()]
    assert captioned == ["a.mpg", "b.ts", "c.flv", "d.3gp", "e.wmv"]
    assert "skipped, not readable as a video: " + str(folder / "notes.txt") in err and "e.wav" not in err


def five_videos(clips, tmp_path):
    """A folder of five test clips: -> (folder, their names in order)."""
    folder = tmp_path / "videos"
    folder.mkdir()
    names = [f"test_{i:05d}.mp4" for i in range(28, 33)]
    for name in names:
        shutil.copy(os.path.join(clips, name), folder / name)
    return folder, names


def test_sample_writes_a_collection_as_it_goes_and_a_rerun_does_only_the_rest(clips, trained, tmp_path, capsys):
    """A folder through the batched path (loader workers, batches of 2) gives each file the
    caption it gets alone; a run stopped mid-file (a cut-off last line) is finished by a rerun
    that skips what --out already holds and rewrites the cut line."""
    _, ckpt = trained
    folder, names = five_videos(clips, tmp_path)
    flags = ["--ckpt", ckpt, "--max-length", "8", "--device", "cpu"]
    alone = {}
    for name in names:
        assert sample.main(["--video", str(folder / name), *flags]) == 0
        alone[name] = capsys.readouterr().out.strip()
    out = tmp_path / "captions.jsonl"
    batched = ["--video", str(folder), "--out", str(out), "--batch-size", "2", "--num-workers", "1", *flags]
    assert sample.main(batched) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {os.path.basename(r["video"]): r["captions"] for r in lines} == {n: [c] for n, c in alone.items()}
    assert [os.path.basename(r["video"]) for r in lines] == names  # in order, each once

    kept = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + '{"video": "' + str(folder / names[2])[:10])  # stopped mid-line
    capsys.readouterr()
    assert sample.main(batched) == 0
    assert "2 of 5 files already captioned, 3 to go" in capsys.readouterr().err
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again == lines

    other = tmp_path / "notes.txt"  # --out naming some other file: refused, left as it was
    other.write_text("not captions\nat all\n")
    assert sample.main([*batched[:2], "--out", str(other), *batched[4:]]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: --out {other}: line 1 is not a caption record")
    assert other.read_text() == "not captions\nat all\n"


def caption_folder(argv):
    """sample.main on one rank of a torchrun-like launch (module level: launch_local runs it)."""
    return sample.main(argv)


@pytest.mark.parametrize("decode", [["--decode", "greedy"], ["--decode", "beam", "--num-beams", "2"]],
                         ids=["greedy", "beam"])
def test_two_ranks_caption_a_folder_into_one_file_as_one_process_does_and_resume(clips, trained, tmp_path, decode):
    """`torchrun --nproc_per_node 2 sample.py --video DIR --out F`: each rank captions every
    second file, and F ends with each file once, in order, with the captions one process
    writes. A rerun after a stop moves what the ranks had written into F and does the rest."""
    _, ckpt = trained
    folder, names = five_videos(clips, tmp_path)
    flags = ["--video", str(folder), "--ckpt", ckpt, "--max-length", "8", "--device", "cpu", "--batch-size", "2",
             "--num-workers", "0", *decode]
    one = tmp_path / "one.jsonl"
    assert sample.main([*flags, "--out", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    assert launch_local(caption_folder, [*flags, "--out", str(two)]) == [0, 0]
    assert two.read_text() == one.read_text() and not sample.rank_parts(str(two))
    lines = one.read_text().splitlines(keepends=True)
    # stopped: --out holds the first file; rank 1 had written one line and was cut off in the next
    two.write_text(lines[0])
    (tmp_path / "two.jsonl.rank1").write_text(lines[3] + lines[2][:12])
    assert launch_local(caption_folder, [*flags, "--out", str(two)]) == [0, 0]
    assert sorted(two.read_text().splitlines()) == sorted(one.read_text().splitlines())
    assert not sample.rank_parts(str(two))


def write_still(path, codec, pix_fmt):
    """A 32x32 picture through FFmpeg's image2 muxer (png, mjpeg: a .png, a .jpg)."""
    import av
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
        for packet in [*stream.encode(frame.reformat(format=pix_fmt)), *stream.encode()]:
            out.mux(packet)


def test_sample_skips_still_pictures_and_damaged_files_in_a_folder(clips, trained, tmp_path, capsys):
    """PyAV opens a picture as a one-frame video: it is reported, not captioned; a damaged
    video gets the same report, worded for both."""
    _, ckpt = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(os.path.join(clips, "test_00028.mp4"), folder / "a.mp4")
    write_still(folder / "still.png", "png", "rgb24")
    write_still(folder / "photo.jpg", "mjpeg", "yuvj420p")
    (folder / "broken.mp4").write_bytes(os.urandom(2000))
    assert sample.main(["--video", str(folder), "--ckpt", ckpt, "--max-length", "8", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert [os.path.basename(json.loads(line)["video"]) for line in out.strip().splitlines()] == ["a.mp4"]
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped"))
    assert len(skipped) == 3 and skipped[0].startswith(f"skipped, not readable as a video: {folder / 'broken.mp4'}: ")
    assert skipped[1:] == [f"skipped, not readable as a video: {folder / 'photo.jpg'}: a still image",
                           f"skipped, not readable as a video: {folder / 'still.png'}: a still image"]


def test_max_length_counts_the_dec_token_as_the_original():
    """The original's max_length 30 / min_length 10 (HF's generate) allow 29 generated tokens,
    and [SEP] once the caption holds 10 tokens with its [DEC]; the same numbers mean the same."""
    torch.manual_seed(0)
    net = M.UniQ4Cap(M.tiny_config()).eval()
    video = torch.randn(1, 3, net.cfg.video.num_frames, 32, 32)
    sep = net.cfg.qformer.sep_token_id
    with torch.no_grad():
        net.Qformer.cls.predictions.bias[sep] = -100.0  # never ends by itself
    for method in ("greedy", "beam", "sample"):
        assert net.generate(video, method=method, max_length=30, num_beams=2).shape[1] == 29
    with torch.no_grad():
        net.Qformer.cls.predictions.bias[sep] = 100.0  # ends as soon as it may
    out = net.generate(video, min_length=10, max_length=30)
    assert out.shape[1] == 10 and out[0, 9] == sep and not (out[0, :9] == sep).any()


BAD_DECODING = {  # case: (flags, the error, also train_caption's)
    "--num-beams 0": (["--num-beams", "0"], "--num-beams must be at least 1", True),
    "--top-p 0": (["--decode", "sample", "--top-p", "0"], "--top-p must be in (0, 1]", True),
    "--top-p 1.5": (["--top-p", "1.5"], "--top-p must be in (0, 1]", True),
    "--top-k -1": (["--top-k", "-1"], "--top-k must be 0 (off) or more", True),
    "--max-length 0": (["--max-length", "0"], "--max-length must be at least 2", True),
    "--min-length above --max-length": (["--min-length", "40", "--max-length", "30"],
                                        "--min-length must be between 1 and --max-length", True),
    "no captions": (["--num-captions", "0", "--decode", "sample"], "--num-captions must be at least 1", False),
    "more captions than beams": (["--num-captions", "3", "--decode", "beam", "--num-beams", "2"],
                                 "--num-captions 3 needs at least as many beams", False),
    "several greedy captions": (["--num-captions", "3"], "identical captions: use --decode beam or --decode sample",
                                False),
}


@pytest.mark.parametrize("script,case", [(s, c) for c, (_, _, both) in BAD_DECODING.items()
                                         for s in ([sample, train_caption] if both else [sample])],
                         ids=lambda x: getattr(x, "__name__", x))
def test_bad_decoding_flags_end_with_one_error_line_and_exit_code_2(script, case, capsys):
    """Checked in one place, training.check_decoding_args, for both scripts, before any file is read."""
    argv, message, _ = BAD_DECODING[case]
    with pytest.raises(SystemExit) as e:
        script.get_args((["--video", "clip.mp4"] if script is sample else []) + argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_good_decoding_flags_pass_the_check():
    args = sample.get_args(["--video", "clip.mp4", "--decode", "beam", "--num-beams", "3", "--num-captions", "3",
                            "--top-p", "1", "--top-k", "0", "--min-length", "2", "--max-length", "2"])
    assert args.num_captions == 3 and args.max_length == 2
    assert sample.get_args(["--video", "clip.mp4", "--decode", "sample", "--num-captions", "5"]).num_captions == 5


def test_full_preset_defaults_to_the_papers_recipe_and_tiny_keeps_its_own(capsys):
    full = train_caption.get_args(["--preset", "full"])
    assert (full.lr, full.warmup_lr, full.warmup_steps, full.min_lr, full.weight_decay) == (2e-4, 2e-6, 5000, 2e-5, 0.05)
    assert full.clip == 0 and full.modality_dropout == 0 and full.batch_size == 16  # the original clips nothing
    assert full.frozen_patch_dropout and not full.cache_features
    assert M.full_config().frozen_patch_dropout and not M.tiny_config().frozen_patch_dropout
    tiny = train_caption.get_args([])
    assert (tiny.lr, tiny.warmup_lr, tiny.warmup_steps, tiny.min_lr, tiny.clip) == (1e-3, 1e-5, 50, 1e-4, 1.0)
    assert tiny.modality_dropout == 0.15 and tiny.cache_features and not tiny.frozen_patch_dropout
    lines = T.describe_recipe(tiny, train_caption.RECIPE, tiny.recipe_given, tiny.recipe_reasons)
    assert any("--modality-dropout 0.15" in l and "lacks one" in l for l in lines)  # printed with its reason
    assert any("--frozen-patch-dropout off" in l and "one view" in l for l in lines)
    # true whatever the number of processes (torchrun included): the size is per process
    assert any(l.startswith("  --batch-size 32  (full: 16;") and "per process" in l and "one process" not in l
               for l in lines)
    with pytest.raises(SystemExit):
        train_caption.get_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: full 0.0002, tiny 0.001)" in help_text and "(default: full 0, tiny 0.15)" in help_text


def test_modality_dropout_hides_the_audio_and_the_video_equally_often_and_never_both(capsys):
    """Each modality is the only one a clip shows for a share p of the clips, so neither can
    carry the captions alone; a clip that already lacks its audio keeps its video."""
    n, p = 6000, 0.3
    audio = torch.ones(n, dtype=torch.bool)
    audio[:1000] = False  # clips without sound
    batch = {"ids": [f"clip{i}" for i in range(n)], "captions": ["a caption"] * n, "epoch": 0,
             "video_mask": torch.ones(n, dtype=torch.bool), "audio_mask": audio.clone()}
    hidden = train_caption.hide_modalities(batch, p, seed=42)
    video, audio_now = hidden["video_mask"], hidden["audio_mask"]
    assert (video | audio_now).all() and video[:1000].all()  # never both; the soundless keep their frames
    with_sound = slice(1000, n)
    assert abs((~audio_now[with_sound]).float().mean() - p) < 0.03
    assert abs((~video[with_sound]).float().mean() - p) < 0.03
    with pytest.raises(SystemExit) as e:  # 2p would pass 1: refused, not silently capped
        train_caption.get_args(["--modality-dropout", "0.6"])
    assert e.value.code == 2 and "[0, 0.5]" in capsys.readouterr().err


def test_feature_cache_and_frozen_patch_dropout_exclude_each_other_visibly(capsys):
    # full + a cache: patch dropout gives way, and the run says why
    args = train_caption.get_args(["--preset", "full", "--cache-features"])
    assert args.cache_features and not args.frozen_patch_dropout
    assert "one view" in args.recipe_reasons["frozen_patch_dropout"]
    # tiny + patch dropout: the cache gives way
    args = train_caption.get_args(["--frozen-patch-dropout"])
    assert args.frozen_patch_dropout and not args.cache_features
    # both asked for: an error
    with pytest.raises(SystemExit) as e:
        train_caption.get_args(["--preset", "full", "--cache-features", "--frozen-patch-dropout"])
    assert e.value.code == 2 and "choose one" in capsys.readouterr().err


def test_frozen_patch_dropout_halves_the_video_memory_in_training_only():
    cfg = M.tiny_config()
    cfg.frozen_patch_dropout = True
    net = M.UniQ4Cap(cfg)
    frames = cfg.video.num_frames
    video = torch.randn(2, 3, frames, 32, 32)
    keep = int(cfg.video.num_patches * 0.5)
    assert net.train().encode(video)[0].shape[1] == frames * (1 + keep)  # class token kept in each frame
    assert net.eval().encode(video)[0].shape[1] == frames * (1 + cfg.video.num_patches)


def run_script(main, argv, capsys):
    """-> (exit code, stderr) of a script run as from the command line."""
    with pytest.raises(SystemExit) as e:
        T.run_script(main, argv)
    return e.value.code, capsys.readouterr().err


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


BAD_INPUTS = {
    "bad annotation JSON": ('[{"id": "a", "caption": "x"},', None, "not JSON"),
    "missing field": ([{"id": "a", "title": "x"}], "caption", "record 0 lacks 'caption'; its fields: id, title"),
    "one object": ({"a": [{"id": "a", "caption": "x"}]}, None, "one JSON object (fields: a), but the file must hold "
                                                              "a list of records"),
    "missing data folder": ([{"id": "a", "caption": "x"}], None, "data folder not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("script", [train_caption, train_align], ids=["train_caption", "train_align"])
def test_bad_input_ends_with_one_error_line_and_exit_code_2(script, case, tmp_path, capsys):
    content, field, message = BAD_INPUTS[case]
    ann = tmp_path / "ann.json"
    ann.write_text(content if isinstance(content, str) else json.dumps(content))
    folder = tmp_path / ("absent" if case == "missing data folder" else "media")
    if case != "missing data folder":
        folder.mkdir()
    argv = common(str(folder), str(tmp_path / "out"), 2)
    for split in ("train", "val", "test"):
        argv += [f"--{split}-ann", str(ann)]
    argv += ["--caption-field", field] if field else []
    code, err = run_script(script.main, argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_authors_annotations_use_sound_mplug_and_say_so(tmp_path):
    ann = write_json(tmp_path / "ann.json", [{"id": "a", "instance_id": 3, "caption": "x", "sound_mplug": "y"}])
    field, why = data.caption_field_for(ann)
    assert field == "sound_mplug" and "sound_mplug" in why
    assert data.caption_field_for(ann, "caption")[0] == "caption"  # a named field wins
    plain = write_json(tmp_path / "plain.json", [{"id": "a", "caption": "x"}])
    assert data.caption_field_for(plain)[0] == "caption"


def test_a_run_whose_clips_are_all_unreadable_stops_with_the_skip_report(tmp_path, capsys):
    ann = write_json(tmp_path / "ann.json", [{"id": f"gone{i}", "caption": f"clip {i}"} for i in range(6)])
    (tmp_path / "media").mkdir()
    argv = common(str(tmp_path / "media"), str(tmp_path / "out"), 2) + ["--cache-dir", str(tmp_path / "cache"),
                                                                        "--no-align"]
    for split in ("train", "val", "test"):
        argv += [f"--{split}-ann", ann]
    code, err = run_script(train_caption.main, argv, capsys)
    assert code == 2 and "no training clip could be read: 6 clips, 6 skipped (missing file: 6)" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    # the files are named as they are skipped: one line per batch of 4, no warnings' source lines
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and "gone0.mp4 (missing file)" in skipped[0] and "and 1 more" in skipped[0]
    assert "Warning" not in err and "warn(" not in err


def test_missing_pycocoevalcap_stops_before_training(clips, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # what an absent package looks like to import
    code, err = run_script(train_caption.main, common(clips, str(tmp_path / "out"), 2), capsys)
    assert code == 2 and "pycocoevalcap" in err and not os.path.exists(tmp_path / "out")


def test_evaluation_captions_each_clip_once_against_all_its_references(clips, tmp_path, monkeypatch):
    ann = write_json(tmp_path / "ann.json", [
        {"id": "val_00024", "caption": ["a red circle moves up", "a circle rises"]},  # a list: two references
        {"id": "val_00025", "caption": "a blue square moves down"},
        {"id": "val_00024", "caption": "something red goes up"}])  # a repeated id adds one
    media = data.MediaConfig.from_model(M.tiny_config())
    train_set = data.AVCaptionDataset(ann, clips, media)
    assert sorted(r["caption"] for r in train_set.records) == [  # training: every (clip, caption) pair
        "a blue square moves down", "a circle rises", "a red circle moves up", "something red goes up"]
    val_set = data.AVCaptionDataset(ann, clips, media, by_clip=True)
    assert [r["id"] for r in val_set.records] == ["val_00024", "val_00025"]

    tokenizer = data.Tokenizer.train([r["caption"] for r in train_set.records], 100)
    net = M.UniQ4Cap(tokenizer.configure(M.tiny_config()))
    generated, scored = [], {}
    generate = net.generate
    monkeypatch.setattr(net, "generate", lambda **kw: generated.append(kw["video"].shape[0]) or generate(**kw))
    monkeypatch.setattr(metrics, "caption_metrics", lambda refs, preds, **kw: scored.update(refs) or {"CIDEr": 0.0})
    args = train_caption.get_args(["--num-workers", "0", "--no-cache-features", "--batch-size", "8"])
    out = train_caption.evaluate(net, val_set, val_set.references, tokenizer, torch.device("cpu"),
                                 T.autocast_context(torch.device("cpu"), torch.float32), args)
    assert sum(generated) == 2 and out["clips"] == 2 and out["references"] == 4
    assert scored == {"val_00024": ["a red circle moves up", "a circle rises", "something red goes up"],
                      "val_00025": ["a blue square moves down"]}


def test_msrvtt_and_vatex_annotations_convert_to_the_project_format(tmp_path):
    info = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video7", "split": "test"}],
            "sentences": [{"video_id": "video0", "caption": "a man sings", "sen_id": 0},
                          {"video_id": "video7", "caption": "a cat jumps", "sen_id": 1},
                          {"video_id": "video0", "caption": "someone is singing", "sen_id": 2}]}
    assert data.from_msrvtt(info, "train") == [{"id": "video0", "caption": ["a man sings", "someone is singing"]}]
    assert len(data.from_msrvtt(info)) == 2
    vatex = [{"videoID": "abc_000010_000020", "enCap": ["a dog runs", "a dog is running"], "chCap": ["..."]}]
    records = data.from_vatex(vatex)
    assert records == [{"id": "abc_000010_000020", "caption": ["a dog runs", "a dog is running"]}]
    ann = write_json(tmp_path / "vatex.json", records)  # what the scripts then read
    assert data.references_by_clip(data.load_annotations(ann), "caption") == {
        "abc_000010_000020": ["a dog runs", "a dog is running"]}
