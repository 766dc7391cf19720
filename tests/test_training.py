"""The shared training plumbing: DDP equals one process, resume is exact, checkpoints survive
a kill, and the schedule and optimizer groups are the paper's.

The toy model is stage 1 in miniature (two encoders trained with nce_loss), so the DDP and
resume tests here are the pattern to repeat on train_align.py itself.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import losses
import training as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN, DIM = 5, 4


class ToyAligner(nn.Module):
    """Two small encoders and a temperature, trained with NCE."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.video = nn.Sequential(nn.Linear(IN, 8), nn.GELU(), nn.Dropout(dropout), nn.Linear(8, DIM))
        self.audio = nn.Sequential(nn.Linear(IN, 8), nn.GELU(), nn.Dropout(dropout), nn.Linear(8, DIM))
        self.logit_scale = losses.LogitScale()

    def forward(self, video, audio):
        v = F.normalize(self.video(video), dim=-1)
        a = F.normalize(self.audio(audio), dim=-1)
        return losses.nce_loss(v, a, self.logit_scale())


# -----------------------------------------------------------------------------
# DDP over two gloo processes == one process on the same global batch

WORLD, B_LOCAL, ACCUM, STEPS, SEED = 2, 4, 2, 3, 42


def global_micro_batch(step, micro):
    """The same (video, audio) global micro-batch for every rank and for the reference."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(WORLD * B_LOCAL, IN, generator=g), torch.randn(WORLD * B_LOCAL, IN, generator=g)


def train_and_record(raw, model, rows, ddp_model):
    """STEPS steps of ACCUM micro-batches (this process's rows of each); returns the losses,
    the gradients the optimizer saw at each step and the final weights."""
    optimizer = T.make_optimizer(raw, lr=1e-2, weight_decay=0.05)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = []
    optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in params]))
    step_losses = []
    for step in range(STEPS):
        micro = [tuple(x[rows] for x in global_micro_batch(step, m)) for m in range(ACCUM)]
        loss, _ = T.train_step(optimizer, micro, lambda batch: model(*batch), clip=1.0, ddp_model=ddp_model)
        step_losses.append(loss)
    return {"losses": torch.tensor(step_losses), "grads": grads, "weights": raw.state_dict()}


def ddp_worker():
    ddp, rank, _, world = T.setup_distributed("cpu")
    assert ddp and world == WORLD
    T.seed_everything(SEED, rank)  # ranks start from different weights; DDP broadcasts rank 0's
    raw = ToyAligner()
    model = DistributedDataParallel(raw)
    return train_and_record(raw, model, slice(rank * B_LOCAL, (rank + 1) * B_LOCAL), model)


@pytest.fixture(scope="module")
def ddp_and_single():
    ranks = T.launch_local(ddp_worker, world_size=WORLD)
    T.seed_everything(SEED, 0)
    raw = ToyAligner()
    single = train_and_record(raw, raw, slice(None), None)
    return ranks, single


def test_ddp_loss_averaged_over_ranks_equals_one_process(ddp_and_single):
    ranks, single = ddp_and_single
    mean = sum(r["losses"] for r in ranks) / WORLD
    assert torch.allclose(mean, single["losses"], atol=1e-6), (mean, single["losses"])


def test_ddp_gradients_equal_one_process(ddp_and_single):
    ranks, single = ddp_and_single
    for r in ranks:
        for step, (got, want) in enumerate(zip(r["grads"], single["grads"])):
            for g, w in zip(got, want):
                assert torch.allclose(g, w, atol=1e-6, rtol=1e-5), step


def test_ddp_weights_after_training_equal_one_process(ddp_and_single):
    ranks, single = ddp_and_single
    for r in ranks:
        for name, w in single["weights"].items():
            assert torch.allclose(r["weights"][name], w, atol=1e-6), name


# -----------------------------------------------------------------------------
# Resume

LR = dict(warmup_steps=2, max_steps=4, max_lr=1e-2, min_lr=1e-3, warmup_lr=1e-4)


def random_batch(n=6):
    """Draws from the numpy, python and torch generators, so all three must be restored."""
    video = torch.from_numpy(np.random.randn(n, IN)).float()
    audio = torch.randn(n, IN)
    order = random.sample(range(n), n)
    return video[order], audio[order]


def fresh_run(seed):
    T.seed_everything(seed)
    model = ToyAligner(dropout=0.3)  # dropout: the torch generator matters in the step too
    return model, T.make_optimizer(model, LR["max_lr"], weight_decay=0.05)


def train(model, optimizer, start, stop, position):
    out = []
    for step in range(start, stop):
        T.set_lr(optimizer, T.lr_at(step, **LR))
        micro = [random_batch() for _ in range(2)]
        loss, _ = T.train_step(optimizer, micro, lambda batch: model(*batch), clip=1.0)
        position["index"] += sum(len(v) for v, _ in micro)
        out.append(loss)
    return out


def resume(path, seed, restore_rng=True):
    """What a restarted process does: new objects (seeded differently, as a new process would
    be), then everything from the checkpoint."""
    model, optimizer = fresh_run(seed)
    ckpt = T.load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if restore_rng:
        T.restore_rng_state(ckpt["rng"])
    return model, optimizer, ckpt["step"], dict(ckpt["data"])


def test_resume_is_exact(tmp_path):
    model, optimizer = fresh_run(0)
    straight = train(model, optimizer, 0, 4, {"epoch": 0, "index": 0})

    model, optimizer = fresh_run(0)
    position = {"epoch": 0, "index": 0}
    first = train(model, optimizer, 0, 2, position)
    path = str(tmp_path / "ckpt.pt")
    T.save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 2,
                             "rng": T.all_rng_states(), "data": position, "config": {"lr": LR}})
    del model, optimizer

    model, optimizer, step, position = resume(path, seed=123)
    then = train(model, optimizer, step, 4, position)
    assert position["index"] == 4 * 2 * 6
    assert first + then == pytest.approx(straight, abs=1e-6)

    # and the test can tell: without the RNG states the resumed losses differ
    model, optimizer, step, position = resume(path, seed=123, restore_rng=False)
    assert train(model, optimizer, step, 4, position) != pytest.approx(straight[2:], abs=1e-6)


# -----------------------------------------------------------------------------
# Checkpoint files

KILLED_SAVE = """
import io, os, signal, sys
import torch
sys.path.insert(0, {root!r})
import training

real_save = torch.save

def save_then_die(obj, f):  # the new checkpoint gets half written, then the process is killed
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
training.save_checkpoint({path!r}, {{"step": 2, "weights": torch.ones(1 << 20)}})
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    T.save_checkpoint(path, {"step": 1, "weights": torch.zeros(1 << 20)})
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE.format(root=ROOT, path=path)])
    assert proc.returncode == -signal.SIGKILL
    strays = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(strays) == 1  # the half-written new checkpoint, never renamed into place
    ckpt = T.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["weights"], torch.zeros(1 << 20))
    T.save_checkpoint(path, {"step": 3})  # the next save clears the stray
    assert T.load_checkpoint(path)["step"] == 3
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    T.save_checkpoint(path, {"step": 1})

    def fail_halfway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert T.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_resume_from_a_missing_path_is_an_error_naming_it(tmp_path):
    path = str(tmp_path / "no" / "such.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        T.load_checkpoint(path)


def test_metrics_log_appends_rows_and_final_json_is_written(tmp_path):
    log = T.MetricsLogger(str(tmp_path / "m" / "metrics.jsonl"))
    log.log(step=1, loss=2.5)
    log.log(step=2, loss=2.0)
    rows = [json.loads(line) for line in open(tmp_path / "m" / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    T.write_json(str(tmp_path / "m" / "metrics.json"), {"R@1": 0.5})
    assert json.load(open(tmp_path / "m" / "metrics.json")) == {"R@1": 0.5}


# -----------------------------------------------------------------------------
# Schedule and optimizer groups

PAPER = dict(warmup_steps=5000, max_steps=50000, max_lr=2e-4, min_lr=2e-5, warmup_lr=2e-6)


def test_lr_schedule_is_the_papers():
    assert T.lr_at(0, **PAPER) == pytest.approx(2e-6)
    assert T.lr_at(2500, **PAPER) == pytest.approx((2e-6 + 2e-4) / 2)  # linear warm-up
    assert T.lr_at(5000, **PAPER) == pytest.approx(2e-4)
    assert T.lr_at(27500, **PAPER) == pytest.approx((2e-4 + 2e-5) / 2)  # cosine half-way
    assert T.lr_at(50000, **PAPER) == pytest.approx(2e-5)
    assert T.lr_at(60000, **PAPER) == pytest.approx(2e-5)


def test_optimizer_decays_only_trainable_matrices():
    model = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4), "emb": nn.Embedding(10, 4),
                           "scale": losses.LogitScale(), "frozen": nn.Linear(4, 4)})
    model.frozen.requires_grad_(False)
    decay, no_decay = T.make_optimizer(model, lr=1e-3, weight_decay=0.05).param_groups
    ids = lambda params: {id(p) for p in params}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([model.proj.weight, model.emb.weight])
    assert ids(no_decay["params"]) == ids([model.proj.bias, model.norm.weight, model.norm.bias,
                                           model.scale.log_scale])
