"""Training plumbing shared by train_align.py and train_caption.py (imported, never copied).

Owns: device and precision, torchrun DDP set-up (gloo on CPU, NCCL on GPU), seeds, AdamW
parameter groups, the warm-up + cosine learning rate, one optimisation step with gradient
accumulation and clipping, atomic checkpoints that resume exactly (model, optimizer, step,
RNG states, data position), the JSONL metrics log and rank-0 progress bars.
"""

import json
import math
import os
import random
import tempfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Command line


def add_common_args(p, **defaults):
    """Flags both training scripts take. `defaults` overrides a flag's default by dest name."""
    d = dict(device="auto", dtype="auto", seed=42, batch_size=8, grad_accum=1, clip=1.0, lr=1e-4,
             min_lr=1e-5, warmup_lr=1e-6, warmup_steps=50, max_steps=1000, weight_decay=0.05)
    d.update(defaults)
    p.add_argument("--device", default=d["device"], help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--dtype", default=d["dtype"], choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (each rank adds its rank)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="clips per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimizer step")
    p.add_argument("--clip", type=float, default=d["clip"], help="gradient norm clip (0: off)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=d["min_lr"], help="learning rate at the end of the cosine")
    p.add_argument("--warmup-lr", type=float, default=d["warmup_lr"], help="learning rate at step 0")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="linear warm-up steps")
    p.add_argument("--max-steps", type=int, default=d["max_steps"], help="optimizer steps in all")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW decay on >=2-D weights")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (an error if it does not exist)")
    return p


# -----------------------------------------------------------------------------
# Device, precision, processes


def setup_device(name="auto", local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast_context(device, dtype):
    """bf16 autocast where asked; fp32 runs without any context."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_distributed(device_name="auto"):
    """Returns (ddp, rank, local_rank, world_size). Under torchrun (RANK set) the process group
    starts with NCCL for CUDA and gloo otherwise; a plain `python script.py` is one process."""
    if "RANK" not in os.environ:
        return False, 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True, rank, local_rank, world


def cleanup_distributed(ddp):
    if ddp:
        dist.destroy_process_group()


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed, rank=0):
    """The paper's habit: seed + rank, so ranks draw different augmentations."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def maybe_compile(model, flag):
    """Returns the model to call; keep using the uncompiled one for saving and evaluation, so
    checkpoints never carry `_orig_mod.` prefixes."""
    return torch.compile(model) if flag else model


# -----------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), device_type="cpu"):
    """AdamW; weight decay only on trainable tensors with >= 2 dimensions (matrices,
    embeddings, the query tokens), never on biases, LayerNorm weights or scalars."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def lr_at(step, warmup_steps, max_steps, max_lr, min_lr, warmup_lr):
    """Linear warm-up from warmup_lr to max_lr over warmup_steps, then cosine to min_lr at
    max_steps (the paper: 2e-6 -> 2e-4 over 5,000 steps, cosine to 2e-5)."""
    if step < warmup_steps:
        return warmup_lr + (max_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(optimizer, micro_batches, loss_fn, clip, ddp_model=None):
    """One optimizer step as nanoGPT writes it: each micro-batch's loss is divided by their
    number before backward; under DDP gradients are synchronised only on the last micro-step;
    then clip, step and zero the gradients (set to None). loss_fn(batch) runs the forward pass
    and returns the loss. Returns (mean loss, gradient norm before clipping)."""
    n = len(micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        with nullcontext() if ddp_model is None or last else ddp_model.no_sync():
            loss = loss_fn(batch)
            (loss / n).backward()
        total += loss.item() / n
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm.item()


# -----------------------------------------------------------------------------
# Checkpoints


def capture_rng_state():
    """Every generator a training step draws from, as tensors and plain lists so the
    checkpoint loads with weights_only=True."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then
    os.replace onto `path` (and the folder fsynced). A crash at any moment leaves either the
    previous checkpoint or the new one, never a torn file. Expected keys for a resumable
    checkpoint: model, optimizer, step, rng, data (position), config."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """Our own resumable checkpoints. A missing path is an error, never a silent fresh start."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------
# Logging


class MetricsLogger:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path):
        self.path = path
        if is_master():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, **row):
        if is_master():
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def write_json(path, obj):
    """Final metrics, written atomically like the checkpoints."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def progress(total, desc):
    """A tqdm bar on rank 0; a silent one elsewhere."""
    return tqdm(total=total, desc=desc, disable=not is_master(), dynamic_ncols=True)


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)
