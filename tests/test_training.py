"""training.py, the plumbing both training scripts share: DDP over two processes trains like
one process, a checkpoint resumes exactly and survives a kill mid-save, and the schedule and
the optimizer groups are what the docstrings promise.

The toy model is stage 1 in miniature (two linear towers, a learnable temperature, nce_loss).
"""

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import losses
import training as T
from tests.distributed import launch_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN, D = 6, 4


class TwoTowers(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.video = nn.Sequential(nn.Dropout(dropout), nn.Linear(IN, D))
        self.audio = nn.Sequential(nn.Dropout(dropout), nn.Linear(IN, D))
        self.temperature = losses.LogitScale()

    def forward(self, video, audio):
        v = F.normalize(self.video(video), dim=-1)
        a = F.normalize(self.audio(audio), dim=-1)
        return losses.nce_loss(v, a, self.temperature())


# -----------------------------------------------------------------------------
# DDP over two gloo processes against one process on the same global batch
#
# Each rank's micro-batch loss is the mean over its B rows, scored against all world*B
# columns; DDP averages the parameter gradients over ranks, which (losses.py explains why) is
# the gradient of the mean over all world*B rows, i.e. of the loss one process computes on
# the global micro-batch. train_step divides every micro-batch loss by their number in both
# cases. So: the ranks' losses average to the one-process loss, the gradient norm (taken
# after DDP's all-reduce, before clipping) is the same, and after a clipped SGD step with
# lr = 1 (new weights = old weights - clipped gradient) the weights are the same.

WORLD, B, SEED, CLIP = 2, 4, 7, 0.5
MICRO_BATCHES = 2


def global_micro_batches():
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(WORLD * B, IN, generator=g), torch.randn(WORLD * B, IN, generator=g))
            for _ in range(MICRO_BATCHES)]


def one_sgd_step(raw, model, rows, ddp_model):
    optimizer = torch.optim.SGD(raw.parameters(), lr=1.0)
    micro = [(video[rows], audio[rows]) for video, audio in global_micro_batches()]
    loss, norm, _ = T.train_step(optimizer, micro, lambda batch: (model(*batch), {}), CLIP, ddp_model)
    return {"loss": loss, "norm": norm, "weights": {k: v.clone() for k, v in raw.state_dict().items()}}


def ddp_rank():
    ddp, rank, _, world = T.setup_distributed("cpu")
    assert ddp and world == WORLD
    T.seed_everything(SEED, rank)  # as a training script: the ranks' initial weights differ...
    raw = TwoTowers()
    model = DistributedDataParallel(raw)  # ...until DDP broadcasts rank 0's
    return one_sgd_step(raw, model, slice(rank * B, (rank + 1) * B), model)


@pytest.fixture(scope="module")
def ddp_ranks():
    return launch_local(ddp_rank, world_size=WORLD)


@pytest.fixture(scope="module")
def one_process():
    T.seed_everything(SEED, 0)  # rank 0's weights
    raw = TwoTowers()
    return one_sgd_step(raw, raw, slice(None), None)


def test_ddp_rank_losses_average_to_the_one_process_loss(ddp_ranks, one_process):
    mean = sum(r["loss"] for r in ddp_ranks) / WORLD
    assert mean == pytest.approx(one_process["loss"], abs=1e-6)


def test_ddp_gradient_norm_before_clipping_equals_one_process(ddp_ranks, one_process):
    assert one_process["norm"] > CLIP  # so the step below is a clipped one
    for r in ddp_ranks:
        assert r["norm"] == pytest.approx(one_process["norm"], rel=1e-5)


def test_ddp_weights_after_a_clipped_sgd_step_equal_one_process(ddp_ranks, one_process):
    for r in ddp_ranks:
        for name, expected in one_process["weights"].items():
            torch.testing.assert_close(r["weights"][name], expected, atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# Resume

LR = dict(warmup_steps=2, max_steps=4, max_lr=3e-2, min_lr=3e-3, warmup_lr=3e-4)


def new_run(seed):
    T.seed_everything(seed)
    model = TwoTowers(dropout=0.3)  # dropout masks come from the torch generator too
    return model, T.make_optimizer(model, LR["max_lr"], weight_decay=0.1)


def train(model, optimizer, steps):
    """Optimizer steps of two micro-batches whose data is drawn inside the step, from the
    torch, numpy and python generators, so the RNG state decides what a step sees."""
    def loss_fn(n):
        video = torch.randn(n, IN)
        audio = torch.from_numpy(np.random.randn(n, IN)).float() * random.uniform(0.5, 2.0)
        return model(video, audio), {}

    out = []
    for step in steps:
        T.set_lr(optimizer, T.lr_at(step, **LR))
        loss, _, _ = T.train_step(optimizer, [6, 6], loss_fn, clip=1.0)
        out.append(loss)
    return out


def two_steps_then_save(path):
    model, optimizer = new_run(0)
    losses_so_far = train(model, optimizer, range(2))
    T.save_training_state(path, optimizer, 2, {"epoch": 0, "index": 0}, model=model.state_dict())
    return losses_so_far


def reload(path, restore_rng):
    """What a restarted process does: new objects from another seed, then the checkpoint."""
    model, optimizer = new_run(seed=123)
    ckpt = T.load_checkpoint(path)
    if restore_rng:
        step, _, _ = T.resume_training(ckpt, path, model.load_state_dict, optimizer)
    else:  # the weights and the optimizer only
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    return model, optimizer, step


def test_two_steps_saved_and_resumed_for_two_more_equal_four_straight(tmp_path):
    model, optimizer = new_run(0)
    straight = train(model, optimizer, range(4))
    straight_weights = model.state_dict()

    path = str(tmp_path / "ckpt.pt")
    first = two_steps_then_save(path)
    model, optimizer, step = reload(path, restore_rng=True)
    then = train(model, optimizer, range(step, 4))

    assert first + then == pytest.approx(straight, abs=1e-6)
    for name, w in straight_weights.items():
        torch.testing.assert_close(model.state_dict()[name], w, atol=1e-6, rtol=0)


def test_resume_without_the_rng_state_is_not_exact(tmp_path):
    """The test above can tell: the weights and optimizer alone do not reproduce the run."""
    model, optimizer = new_run(0)
    straight = train(model, optimizer, range(4))
    path = str(tmp_path / "ckpt.pt")
    two_steps_then_save(path)
    model, optimizer, step = reload(path, restore_rng=False)
    assert train(model, optimizer, range(step, 4)) != pytest.approx(straight[2:], abs=1e-6)


def test_a_training_state_gives_back_its_step_data_position_and_the_scripts_extras(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    model, optimizer = new_run(0)
    T.save_training_state(path, optimizer, 5, {"epoch": 1, "index": 8}, model=model.state_dict(), best={"CIDEr": 0.5})
    step, position, extras = T.resume_training(T.load_checkpoint(path), path, model.load_state_dict, optimizer)
    assert (step, position, extras) == (5, {"epoch": 1, "index": 8}, {"best": {"CIDEr": 0.5}})
    assert T.resume_training(None, None, model.load_state_dict, optimizer) == (0, {"epoch": 0, "index": 0}, {})


# -----------------------------------------------------------------------------
# Checkpoint files

SAVE_THEN_SAVE_BIG = """
import sys, torch, training
training.save_checkpoint(sys.argv[1], {"step": 1, "weights": torch.arange(5.0)})
big = torch.ones(50_000_000)  # 200 MB of float32, made before the second save starts
print("first saved", flush=True)
training.save_checkpoint(sys.argv[1], {"step": 2, "weights": big})
"""


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    child = subprocess.Popen([sys.executable, "-c", SAVE_THEN_SAVE_BIG, path], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "first saved"
        deadline = time.monotonic() + 60
        while not glob.glob(str(tmp_path / "*.tmp")):  # the second save has begun
            assert child.poll() is None, "the big save finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert glob.glob(str(tmp_path / "*.tmp"))  # killed mid-save: the new file never got its name
    ckpt = T.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["weights"], torch.arange(5.0))


def test_next_save_removes_a_temp_file_left_by_a_killed_writer(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    (tmp_path / "ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    T.save_checkpoint(path, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert T.load_checkpoint(path)["step"] == 3


def test_save_that_raises_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    T.save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        T.save_checkpoint(path, {"step": 2, "unpicklable": lambda: None})  # fails mid-write
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert T.load_checkpoint(path)["step"] == 1


def test_load_checkpoint_on_a_missing_path_raises_file_not_found_naming_it(tmp_path):
    path = str(tmp_path / "runs" / "missing.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        T.load_checkpoint(path)


# -----------------------------------------------------------------------------
# Logs


def test_metrics_logger_appends_one_json_object_per_line(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    T.MetricsLogger(str(path)).log(step=1, loss=2.5)
    resumed = T.MetricsLogger(str(path))  # a resumed run keeps the earlier rows
    resumed.log(step=2, loss=2.0, lr=1e-4)
    resumed.log(step=3, loss=1.5, lr=1e-4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "lr": 1e-4},
                    {"step": 3, "loss": 1.5, "lr": 1e-4}]


def test_write_json_writes_readable_json(tmp_path):
    path = tmp_path / "out" / "test_metrics.json"
    metrics = {"CIDEr": 0.42, "BLEU-4": 0.1, "per_clip": {"a": [1, 2]}}
    T.write_json(str(path), metrics)
    assert json.loads(path.read_text()) == metrics
    assert os.listdir(path.parent) == ["test_metrics.json"]


# -----------------------------------------------------------------------------
# Learning rate schedule and optimizer groups

SCHEDULE = dict(warmup_steps=10, max_steps=110, max_lr=2e-4, min_lr=2e-5, warmup_lr=2e-6)


def test_lr_starts_at_warmup_lr():
    assert T.lr_at(0, **SCHEDULE) == pytest.approx(2e-6)


def test_lr_warms_up_linearly_to_max_lr_at_the_end_of_warmup():
    assert T.lr_at(5, **SCHEDULE) == pytest.approx((2e-6 + 2e-4) / 2)
    assert T.lr_at(10, **SCHEDULE) == pytest.approx(2e-4)


def test_lr_is_min_lr_at_max_steps_and_after():
    assert T.lr_at(110, **SCHEDULE) == pytest.approx(2e-5)
    assert T.lr_at(500, **SCHEDULE) == pytest.approx(2e-5)


def test_lr_decreases_monotonically_along_the_cosine():
    lrs = [T.lr_at(step, **SCHEDULE) for step in range(10, 111)]
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:]))
    assert lrs[50] == pytest.approx((2e-4 + 2e-5) / 2)  # half-way down at half-way through


def decay_of_each_parameter(model, weight_decay=0.05):
    optimizer = T.make_optimizer(model, lr=1e-3, weight_decay=weight_decay)
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_only_weights_with_two_or_more_dims_are_decayed():
    model = nn.ModuleDict({"proj": nn.Linear(4, 3), "norm": nn.LayerNorm(3), "embed": nn.Embedding(9, 3),
                           "conv": nn.Conv1d(3, 3, 2), "temperature": losses.LogitScale()})
    decay = decay_of_each_parameter(model)
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.05 if p.dim() >= 2 else 0.0), name
    assert decay[id(model.proj.weight)] == 0.05 and decay[id(model.conv.weight)] == 0.05
    assert decay[id(model.proj.bias)] == decay[id(model.norm.weight)] == 0.0
    assert decay[id(model.temperature.log_scale)] == 0.0


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = nn.ModuleDict({"frozen": nn.Linear(4, 4), "trained": nn.Linear(4, 4)})
    model.frozen.requires_grad_(False)
    decay = decay_of_each_parameter(model)
    assert set(decay) == {id(model.trained.weight), id(model.trained.bias)}


# -----------------------------------------------------------------------------
# Unreadable clips in the training stream, per-preset flag defaults


def collated(readable, unreadable=()):
    """A collated batch of `readable` clip ids and `unreadable` ones (missing files)."""
    import data
    items = [{"id": i, "caption": "c", "record": {}, "path": f"{i}.mp4", "video": torch.zeros(1)} for i in readable]
    items += [{"id": i, "error": (f"{i}.mp4", "missing file")} for i in unreadable]
    return data.collate(items)


class NoAugmentation:
    def set_epoch(self, epoch):
        pass


def stream_of(batches, tracker, state):
    return T.batches_forever(NoAugmentation(), lambda: iter(batches), T.EpochSampler(6, 0), state, tracker)


def test_a_batch_with_no_readable_clip_is_skipped_and_counted(capsys):
    import data
    tracker, state = data.SkipTracker(max_skip_fraction=1.0), {"epoch": 0, "index": 0}
    stream = stream_of([collated("ab"), collated("", "cd"), collated("e", "f")], tracker, state)
    got = [next(stream)["ids"] for _ in range(2)]
    assert got == [["a", "b"], ["e"]]  # the training step never sees the empty batch
    assert tracker.reasons == {"missing file": 3} and state["index"] == 6
    assert capsys.readouterr().err.splitlines() == ["skipped c.mp4 (missing file), d.mp4 (missing file)",
                                                    "skipped f.mp4 (missing file)"]  # one line per batch


def test_an_epoch_in_which_no_clip_can_be_read_stops_with_the_skip_report():
    import data
    stream = stream_of([collated("", "ab"), collated("", "c")], data.SkipTracker(), {"epoch": 0, "index": 0})
    with pytest.raises(data.UnreadableClips,
                       match=r"no training clip could be read: 3 clips, 3 skipped \(missing file: 3\)"):
        next(stream)


def test_per_preset_defaults_fill_only_what_the_command_line_left_out():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    T.add_common_args(p, lr={"full": 2e-4, "tiny": 1e-3}, clip={"full": 0.0, "tiny": 1.0})
    assert "(default: full 0.0002, tiny 0.001)" in " ".join(p.format_help().split())
    recipe = {"lr": {"full": 2e-4, "tiny": 1e-3}, "clip": {"full": 0.0, "tiny": 1.0}}
    for argv, lr, clip in ((["--preset", "full"], 2e-4, 0.0), ([], 1e-3, 1.0), (["--preset", "full", "--clip", "2"], 2e-4, 2.0)):
        args = p.parse_args(argv)
        T.fill_preset_defaults(args, recipe)
        assert (args.lr, args.clip) == (lr, clip)
