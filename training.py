"""Training plumbing shared by train_align.py and train_caption.py (imported, never copied).

Owns: the flags the scripts share (training flags with per-preset defaults, the decoding
flags of sample.py and of stage 2's evaluation) and run_script, which turns input errors into
one `error:` line and exit code 2; device and precision, torchrun DDP set-up (gloo on CPU,
NCCL on GPU), seeds, the handle a script trains through (compiled, DDP-wrapped), AdamW
parameter groups and the paper's warm-up + cosine learning rate (LAVIS's
`linear_warmup_cosine_lr`), one optimisation step with gradient accumulation and clipping, the training loop, atomic
checkpoints and the resumable training state (model, optimizer, step, data position, every
rank's RNG states) that resumes exactly, the captioner a stage-2 checkpoint describes
(load_captioner and its flags, which every command that reads one shares), the training stream (unreadable clips counted and
skipped), the JSONL metrics log and rank-0 progress bars.

How both training scripts string them together (the order matters: a resumed run sets the
random generators back only after everything that draws from them before training):

    ddp, rank, local_rank, world, device, dtype, ctx = setup_run(args)  # processes, device, seeds
    raw = Model(...).to(device)                    # save and evaluate this one
    model = training_handle(raw, args.compile, ddp, device)  # compiled, then DDP-wrapped
    optimizer = make_optimizer(raw, args.lr, args.weight_decay, device_type=device.type)
    ckpt = load_checkpoint(args.resume) if args.resume else None  # None: a fresh start
    step, position, extras = resume_training(ckpt, args.resume, raw.load_state_dict, optimizer)
    stream = training_batches(train_set, args, rank, world, position)

    def loss_fn(batch):                            # the forward pass of one micro-batch
        with ctx:
            return model(...)                      # -> (loss, {log field: float})

    def save(step, bar):                           # every `every` steps and at the last one
        save_training_state(path, optimizer, step, position, model=raw.state_dict(), ...)

    loop = Loop(stream, loss_fn, every, save, MetricsLogger(path), "stage 1")
    step, losses = run_training(model, optimizer, loop, args, step)

run_training sets the learning rate of each step (lr_at) and runs train_step over
--grad-accum micro-batches; save_training_state and resume_training are the two halves of
the checkpoint contract (train_caption.py puts the weights back with pretrained.map_stage2, and
its last.pth also carries what sample.py reads).
"""

import glob
import json
import math
import os
import random
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import model as M
import pretrained

# -----------------------------------------------------------------------------
# Command line


def add_common_args(p, **defaults):
    """Flags both training scripts take. `defaults` overrides a flag's default by dest name;
    a dict {preset: value} makes the default depend on --preset: the flag's default is then
    None, --help lists the values, and fill_preset_defaults sets it after parsing."""
    d = dict(device="auto", dtype="auto", seed=42, batch_size=8, grad_accum=1, clip=1.0, lr=1e-4,
             min_lr=1e-5, warmup_lr=1e-6, warmup_steps=50, max_steps=1000, weight_decay=0.05)
    d.update(defaults)

    def add(flag, help, **kw):
        dest = flag[2:].replace("-", "_")
        if isinstance(d.get(dest), dict):
            p.add_argument(flag, default=None, help=f"{help} (default: {per_preset(d[dest])})", **kw)
        else:
            p.add_argument(flag, default=d.get(dest), help=help, **kw)

    add("--device", "auto (cuda, then mps, then cpu), cuda, mps or cpu")
    add("--dtype", "autocast dtype; auto: bfloat16 on CUDA, float32 elsewhere",
        choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add("--seed", "random seed (each rank adds its rank)", type=int)
    add("--batch-size", "clips per micro-batch per process", type=int)
    add("--grad-accum", "micro-batches per optimizer step", type=int)
    add("--clip", "gradient norm clip (0: off)", type=float)
    add("--lr", "peak learning rate", type=float)
    add("--min-lr", "learning rate at the end of the cosine", type=float)
    add("--warmup-lr", "learning rate at step 0", type=float)
    add("--warmup-steps", "linear warm-up steps", type=int)
    add("--max-steps", "optimizer steps in all", type=int)
    add("--weight-decay", "AdamW decay on >=2-D weights", type=float)
    p.add_argument("--resume", default=None, help="checkpoint to resume from (an error if it does not exist)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="end this run after this step, checkpoint saved, to --resume later (e.g. to fit a "
                        "job's time limit); 0: run to --max-steps")
    return p


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def per_preset(values):
    """{preset: value} as --help shows it: 'full 0.0002, tiny 0.001'."""
    return ", ".join(f"{k} {_show(v)}" for k, v in sorted(values.items()))


def fill_preset_defaults(args, recipe):
    """Set every flag of `recipe` ({dest: {preset: value}}) that the command line left None
    to its value for args.preset."""
    for dest, values in recipe.items():
        if getattr(args, dest) is None:
            setattr(args, dest, values[args.preset])


def describe_recipe(args, recipe, given, reasons, reference="full"):
    """Lines saying what this run uses for each flag of `recipe` and, where that differs from
    the `reference` preset's value, why: "given" for a flag from the command line (`given`),
    else reasons[dest]."""
    lines = []
    for dest, values in recipe.items():
        value = getattr(args, dest)
        line = f"  --{dest.replace('_', '-')} {_show(value)}"
        if value != values[reference]:
            why = "given" if dest in given else reasons.get(dest, f"the {args.preset} preset's default")
            line += f"  ({reference}: {_show(values[reference])}; {why})"
        lines.append(line)
    return lines


def add_decoding_args(p):
    """The decoding flags of sample.py and of train_caption.py's evaluation, passed as they are
    to model.UniQ4Cap.generate (lengths count the [DEC] start token, as there). The original's
    evaluation decoding is --decode sample --top-p 0.9 --top-k 50 --min-length 10 --max-length 30.
    check_decoding_args validates them once parsed."""
    p.add_argument("--decode", default="greedy", choices=["greedy", "beam", "sample"], help="decoding method")
    p.add_argument("--num-beams", type=int, default=5, help="beams for --decode beam")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --decode sample")
    p.add_argument("--top-k", type=int, default=50, help="top-k for --decode sample (0: off; 50 as HF and the original)")
    p.add_argument("--min-length", type=int, default=1,
                   help="[SEP] is allowed once the caption holds this many tokens, [DEC] included "
                        "(so at least min-length - 1 tokens before [SEP]; the original: 10)")
    p.add_argument("--max-length", type=int, default=30,
                   help="longest caption in tokens, [DEC] included: at most max-length - 1 generated "
                        "tokens, [SEP] among them (the original: 30)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats")
    return p


def check_decoding_args(p, args):
    """End with parser `p`'s one-line error (exit code 2) on decoding flags that model.generate
    would reject with a traceback or follow into nonsense. Also checks sample.py's
    --num-captions when `args` has it: beam search returns its best num_beams captions at most,
    and greedy decoding gives the same caption every time."""
    problems = [("--num-beams must be at least 1", args.num_beams < 1),
                ("--top-p must be in (0, 1]", not 0 < args.top_p <= 1),
                ("--top-k must be 0 (off) or more", args.top_k < 0),
                ("--max-length must be at least 2 (it counts the [DEC] token)", args.max_length < 2),
                ("--min-length must be between 1 and --max-length", not 1 <= args.min_length <= args.max_length),
                ("--repetition-penalty must be above 0", args.repetition_penalty <= 0)]
    n = getattr(args, "num_captions", 1)
    problems += [("--num-captions must be at least 1", n < 1),
                 (f"--num-captions {n} needs at least as many beams (--num-beams {args.num_beams})",
                  args.decode == "beam" and n > args.num_beams),
                 (f"--num-captions {n} with greedy decoding gives {n} identical captions: "
                  f"use --decode beam or --decode sample", args.decode == "greedy" and n > 1)]
    for message, bad in problems:
        if bad:
            p.error(message)


def decoding_kwargs(args):
    """The decoding flags as model.generate's keyword arguments."""
    return dict(method=args.decode, num_beams=args.num_beams, top_p=args.top_p, top_k=args.top_k,
                min_length=args.min_length, max_length=args.max_length,
                repetition_penalty=args.repetition_penalty)


def run_script(main, argv=None):
    """Run a script's main(argv). Problems with what the user gave (a missing file or folder,
    an annotation file or a data set that cannot be used, a checkpoint that cannot be read or
    does not fit, a missing optional dependency) end
    with one `error: ...` line on stderr and exit code 2 instead of a traceback."""
    try:
        return main(argv)
    except (FileNotFoundError, ModuleNotFoundError, data.DataError, pretrained.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def steps_this_run(args):
    """The step this run ends at: --max-steps, or earlier with --stop-at."""
    return min(args.max_steps, args.stop_at) if args.stop_at else args.max_steps


# -----------------------------------------------------------------------------
# Device, precision, processes


def setup_device(name="auto", local_rank=0):
    """auto: cuda, else mps, else cpu. Under DDP each process takes GPU `local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name, device):
    """auto: bfloat16 on CUDA GPUs that support it, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast_context(device, dtype):
    """bf16 autocast where asked (CUDA, or CPU on request); fp32 runs without any context.
    Only the forward pass belongs inside it; backward runs outside."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_distributed(device_name="auto"):
    """Returns (ddp, rank, local_rank, world_size). Under torchrun (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) the default process group starts with NCCL
    when the run is on CUDA and gloo otherwise; a plain `python script.py` is one process
    and never touches torch.distributed (the original crashed there)."""
    if "RANK" not in os.environ:
        return False, 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True, rank, local_rank, world


def setup_run(args):
    """What every training script does first: processes, device, precision, seeds.
    Returns (ddp, rank, local_rank, world, device, dtype, autocast context)."""
    ddp, rank, local_rank, world = setup_distributed(args.device)
    device = setup_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    seed_everything(args.seed, rank)
    return ddp, rank, local_rank, world, device, dtype, autocast_context(device, dtype)


def cleanup_distributed(ddp=True):
    if ddp and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    """Rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def seed_everything(seed, rank=0):
    """The paper's habit: seed + rank, so ranks draw different augmentations."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def broadcast_from_rank0(tensors):
    """Every rank takes rank 0's values of `tensors`, in place (DDP does this for the module it
    wraps when it wraps it)."""
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


def training_handle(model, compile, ddp, device):
    """The handle to train through: `model` torch.compile'd when `compile`, then, under
    torchrun, wrapped in DistributedDataParallel (compile first, then wrap, as nanoGPT).
    Keep the `model` you passed in for saving and evaluation, so checkpoints never carry
    `_orig_mod.` or `module.` prefixes. No find_unused_parameters: each script sees to it that
    every trained parameter gets a gradient on every rank at every step."""
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# -----------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), device_type="cpu", verbose=False):
    """AdamW over the parameters that require grad (frozen parts are left out). Weight decay
    only on tensors with >= 2 dimensions (matrices, embeddings, the query tokens); biases,
    LayerNorm weights and scalars such as the log-temperature are not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    if verbose:
        count = lambda ps: sum(p.numel() for p in ps)
        print0(f"AdamW: {len(decay)} tensors ({count(decay):,} values) with weight decay {weight_decay}, "
               f"{len(no_decay)} tensors ({count(no_decay):,} values) without")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def lr_at(step, warmup_steps, max_steps, max_lr, min_lr, warmup_lr):
    """The learning rate for optimizer step `step` (0-based): linear from warmup_lr at step 0
    to max_lr at step warmup_steps, then a half cosine down to min_lr at max_steps (and
    min_lr after). The paper: 2e-6 -> 2e-4 over 5,000 steps, cosine to 2e-5. A pure function
    of the step, so a resumed run needs only the saved step to continue the schedule."""
    if step < warmup_steps:
        return warmup_lr + (max_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set every group's learning rate (nanoGPT style: no scheduler object to save)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(optimizer, micro_batches, loss_fn, clip, ddp_model=None):
    """One optimizer step as nanoGPT writes it. loss_fn(batch) runs the forward pass (inside
    the autocast context; through the DDP-wrapped model when there is one) and returns
    (the mean loss of that micro-batch, {name: float} to log). Each loss is divided by the
    number of micro-batches before backward, so the accumulated gradient is that of their
    mean; under DDP (ddp_model given) gradients are all-reduced only on the last micro-batch
    (no_sync before), then clipped (clip <= 0: no clipping), stepped and set to None. bf16
    needs no GradScaler. Returns (mean loss of this rank's micro-batches, gradient norm before
    clipping, the logged values averaged over the micro-batches as the loss is)."""
    n = len(micro_batches)
    total, logged = 0.0, {}
    for i, batch in enumerate(micro_batches):
        sync = ddp_model is None or i == n - 1
        with nullcontext() if sync else ddp_model.no_sync():
            loss, values = loss_fn(batch)
            (loss / n).backward()
        total += loss.detach().float() / n
        for name, value in values.items():
            logged[name] = logged.get(name, 0.0) + value / n
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item(), norm.item(), logged


@dataclass
class Loop:
    """What run_training runs, from the script that calls it."""
    batches: Iterator  # training batches, without end (training_batches)
    loss_fn: Callable  # batch -> (loss, {log field: float}): the forward pass, as train_step takes it
    every: int  # steps between calls of on_every (which also runs at the run's last step)
    on_every: Callable  # (step, progress bar) -> None: validate and/or save_training_state
    log: "MetricsLogger"  # one row per step: step, loss, lr, grad_norm and loss_fn's fields
    desc: str  # the progress bar's label


def run_training(model, optimizer, loop, args, step):
    """The loop both stages run, from `step` to the step this run ends at (--max-steps, or
    --stop-at): the learning rate of each step (lr_at with the schedule flags), one
    train_step over --grad-accum micro-batches of loop.batches (gradients clipped at --clip),
    a log row, the progress bar, and loop.on_every. `model` is the training handle
    (training_handle): under DDP its gradients are synchronised on the last micro-batch only.
    Returns (step, this run's losses)."""
    ddp_model = model if isinstance(model, DistributedDataParallel) else None
    losses = []
    bar = progress(args.max_steps, loop.desc)
    bar.update(step)
    model.train()
    end = steps_this_run(args)
    while step < end:
        lr = lr_at(step, args.warmup_steps, args.max_steps, args.lr, args.min_lr, args.warmup_lr)
        set_lr(optimizer, lr)
        micro = [next(loop.batches) for _ in range(args.grad_accum)]
        loss, norm, logged = train_step(optimizer, micro, loop.loss_fn, args.clip, ddp_model)
        step += 1
        losses.append(loss)
        loop.log.log(step=step, loss=loss, lr=lr, grad_norm=norm, **logged)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        bar.update(1)
        if step % loop.every == 0 or step == end:
            loop.on_every(step, bar)
    bar.close()
    return step, losses


# -----------------------------------------------------------------------------
# Checkpoints


def capture_rng_state():
    """Every generator a training step may draw from (python, numpy, torch CPU, and every
    CUDA device when present), as tensors, numbers and lists, so a checkpoint holding it still
    loads with torch.load(weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states():
    """capture_rng_state() of every rank, as a list by rank (a collective: call it on every
    rank, then let rank 0 save it). One process: a list of one."""
    state = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(state):
    """Undo capture_rng_state. `state` is one rank's dict, or all_rng_states()'s list, from
    which this rank takes its own entry (each rank drew its own random numbers)."""
    if isinstance(state, list):
        state = state[dist.get_rank() if dist.is_available() and dist.is_initialized() else 0]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path, write):
    """write(file) into a temporary file in the destination folder, flush and fsync it, then
    os.replace it onto `path` and fsync the folder so the rename itself is durable. A crash
    at any moment leaves either the old file or the new one under `path`, never a torn one;
    at worst a stray `<name>.*.tmp` next to it, which the next write of `path` removes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.basename(path) + "."
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        os.remove(stale)  # left by a writer that was killed (only rank 0 writes)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.name == "posix":  # a folder cannot be opened for fsync on Windows
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(path, state):
    """torch.save(state) to `path` atomically (see _atomic_write); call it on rank 0 only.
    save_training_state writes the state a run resumes from through it. Everything must be
    tensors and plain Python values so that load_checkpoint's weights_only=True load accepts
    it."""
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """Read one of our checkpoints onto the CPU (load_state_dict moves tensors to the model's
    and optimizer's device). A missing path is an error, never a silent fresh start. Loaded
    with weights_only=True: our checkpoints hold only tensors and plain values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: no checkpoint file at {path!r}")
    return pretrained.read_state_dict(path)


TRAINING_STATE = ("model", "optimizer", "step", "data", "rng")  # what resume_training restores


def save_training_state(path, optimizer, step, position, **state):
    """Write the state a run resumes from to `path` (save_checkpoint):
        model      the uncompiled, unwrapped model's weights, given in `state`
        optimizer  optimizer.state_dict()
        step       optimizer steps done (the learning rate is lr_at(step, ...))
        data       the data position `position`: batches_forever's {"epoch", "index"}
        rng        every rank's random generators (all_rng_states)
    and the rest of `state`: whatever else the script wants back (its config, its best score
    so far, what sample.py reads). A collective: call it on every rank (each hands over its
    generators); rank 0 writes."""
    rng = all_rng_states()
    if is_master():
        save_checkpoint(path, {**state, "optimizer": optimizer.state_dict(), "step": step,
                               "data": dict(position), "rng": rng})


def resume_training(ckpt, source, load_weights, optimizer):
    """Undo save_training_state. `ckpt` is what load_checkpoint read from `source`, or None
    for a fresh start. load_weights(ckpt["model"]) puts the weights back (the model's
    load_state_dict, or a mapping such as pretrained.map_stage2); then the optimizer, and this
    rank's random generators, so call it after everything that draws random numbers before
    training (initialisation, a feature cache). Returns (step, data position, the script's
    extras: every other entry of `ckpt`)."""
    if ckpt is None:
        return 0, {"epoch": 0, "index": 0}, {}
    load_weights(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"])
    print0(f"resumed from {source} at step {ckpt['step']}")
    extras = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    return ckpt["step"], dict(ckpt["data"]), extras


# -----------------------------------------------------------------------------
# The captioner a stage-2 checkpoint describes (what sample.py and the other commands load)


def add_checkpoint_args(p):
    """The flags load_captioner reads (sample.py, retrieve.py, classify.py and explain.py take them)."""
    p.add_argument("--ckpt", default="out/caption/best.pth", help="stage-2 checkpoint")
    p.add_argument("--preset", default=None, choices=sorted(M.PRESETS),
                   help="model size, for checkpoints that carry no config (the authors')")
    p.add_argument("--video-encoder", default=None, help="video encoder file (overrides the checkpoint's)")
    p.add_argument("--audio-encoder", default=None, help="audio encoder file (overrides the checkpoint's)")
    p.add_argument("--bert", default=None, help="bert-base-cased's vocabulary, for the authors' checkpoints: a folder with vocab.txt "
                        "or a repo id (google-bert/bert-base-cased, or the legacy bert-base-cased)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")


def encoder_path(name, ckpt):
    """An encoder file as a checkpoint names it: a bare file name is one that lay beside the
    checkpoint when it was written (train_caption.model_state), so it is looked up beside the
    checkpoint wherever that is now; anything else (a path, a public name) is used as it is."""
    beside = os.path.join(os.path.dirname(os.path.abspath(ckpt)), name)
    return beside if os.path.basename(name) == name and os.path.isfile(beside) else name


def load_captioner(args):
    """Rebuild the model a checkpoint describes. Ours (train_caption.py's best.pth) carry
    config, tokenizer and encoder names; the authors' checkpoint_N.pth has a "config" too,
    but that is their run configuration, so the tokenizer, which only ours hold, tells the
    two apart. The authors' need --preset, --bert and the encoder flags."""
    ckpt = pretrained.read_state_dict(args.ckpt)
    model_sd = pretrained.stage2_model(ckpt, args.ckpt)
    if "tokenizer" in ckpt:
        cfg = M.config_from_dict(ckpt["config"])
        tokenizer = data.Tokenizer.from_string(ckpt["tokenizer"])
        encoders = {k: encoder_path(v, args.ckpt) for k, v in (ckpt.get("encoders") or {}).items()}
    else:
        if not (args.preset and args.bert):
            raise pretrained.CheckpointError(f"{args.ckpt} carries no tokenizer, as the authors' checkpoint_N.pth: "
                                             f"give --preset and --bert (and their encoders: --video-encoder, --audio-encoder)")
        tokenizer = data.Tokenizer.from_bert(args.bert)
        cfg = tokenizer.configure(M.PRESETS[args.preset]())
        encoders = {}
    encoders["video"] = args.video_encoder or encoders.get("video")
    encoders["audio"] = args.audio_encoder or encoders.get("audio")
    missing = [k for k, v in encoders.items() if not v]
    if missing:
        raise pretrained.CheckpointError(f"no weights for the {' and '.join(missing)} encoder"
                                         f"{'s' * (len(missing) > 1)}: give {' and '.join(f'--{k}-encoder' for k in missing)}")
    net = M.UniQ4Cap(cfg)
    pretrained.load_pretrained(net, video=encoders["video"], audio=encoders["audio"])
    pretrained.map_stage2(net, model_sd, args.ckpt)  # the file is already read: map it directly
    return net.eval().to(args.device), tokenizer


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


def draw_curves(log_path):
    """The run's training curves, as plot.py draws them, beside its metrics.jsonl. A picture
    that cannot be drawn costs one line, never the run's results (already written)."""
    import plot  # matplotlib is imported only there, and only now
    png = os.path.splitext(log_path)[0] + ".png"
    try:
        plot.plot_metrics(log_path, png)
    except (ImportError, OSError, ValueError) as e:
        print(f"training curves not drawn ({png}): {e}", file=sys.stderr)
        return None
    print0(f"wrote {png} (training curves; python plot.py {log_path} redraws them)")
    return png


def write_json(path, obj):
    """Final metrics, written atomically like the checkpoints."""
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def progress(items, desc=None):
    """A tqdm bar on rank 0 and a silent one elsewhere. items: an iterable to wrap, or the
    total (an int) for a bar advanced by hand with .update()."""
    if isinstance(items, int):
        return tqdm(total=items, desc=desc, disable=not is_master(), dynamic_ncols=True)
    return tqdm(items, desc=desc, disable=not is_master(), dynamic_ncols=True)


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# Data plumbing both scripts share


def add_data_args(p):
    p.add_argument("--data-dir", default=None, help="media folder (default: the embedded dataset, made on first use)")
    p.add_argument("--train-ann", default=None, help="training annotations (JSON list or JSONL; default: embedded)")
    p.add_argument("--val-ann", default=None, help="validation annotations (default: embedded)")
    p.add_argument("--test-ann", default=None, help="test annotations (default: embedded)")
    p.add_argument("--caption-field", default=None,
                   help="annotation field holding the caption (or a list of captions); default: "
                        "'sound_mplug' when the records have it (the authors' annotations), else 'caption'")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader worker processes (default: 2 decoding media, none reading a cache on a CPU)")
    p.add_argument("--max-skip-fraction", type=float, default=0.05,
                   help="stop when more than this fraction of clips is unreadable")
    return p


def resolve_data_paths(args):
    """Fill in the embedded dataset for whatever the user did not name, creating it on
    first use. Returns (data_dir, {split: annotation path}) and says which data it uses."""
    if args.data_dir is None:
        if is_master():
            data.ensure_embedded_dataset()
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0 to finish generating
        args.data_dir = data.DEFAULT_EMBEDDED_ROOT
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"data folder not found: {args.data_dir}")
    anns = {}
    for split in ("train", "val", "test"):
        given = getattr(args, f"{split}_ann")
        anns[split] = given or os.path.join(args.data_dir, f"{split}.json")
        if not os.path.isfile(anns[split]):
            raise FileNotFoundError(f"{split} annotation file not found: {anns[split]}")
    return args.data_dir, anns


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a permutation drawn from (seed, epoch), starting `start` items
    in: a resumed run continues exactly where the saved one stopped, without loading the
    batches it skips. The shares interleave (rank r takes items r, r+world, ...), so the
    ranks' k-th micro-batches together hold the clips one process with world times the
    batch size would take in its k-th: DDP trains on the same global batches."""

    def __init__(self, n, seed, rank=0, world=1, shuffle=True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0

    def set_position(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world  # equal shares keep the ranks in step
        return order[:per_rank * self.world][self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return len(self.indices()) - self.start


def model_inputs(batch, device, cached=False):
    """The batch as keyword arguments of the model. From a feature cache, batch["video"] and
    batch["audio"] hold fp16 encoder outputs, which the model takes as *_tokens."""
    out = {k: (batch[k].to(device, non_blocking=True) if batch[k] is not None else None)
           for k in ("video", "audio", "video_mask", "audio_mask")}
    if cached:
        for k in ("video", "audio"):
            t = out.pop(k)
            out[f"{k}_tokens"] = None if t is None else t.float()
    return out


def loader_workers(args, reads_cache, device):
    """--num-workers, or by default 2 loader processes for decoding media and none for reading
    a cache on a CPU: a cached item is a copy out of a memory map, and worker processes, which
    start again every epoch (so that each sees the epoch's flips), would take the training
    step's cores: stage 1 at the tiny preset runs 30% faster without them. On a GPU they
    read ahead while the step runs."""
    if args.num_workers is not None:
        return args.num_workers
    return 0 if reads_cache and device.type == "cpu" else 2


def _worker_init(_):
    torch.set_num_threads(1)  # the workers share the cores with the training step


def make_loader(dataset, batch_size, sampler, num_workers, collate_fn):
    """A DataLoader with a generator of its own: starting an iterator draws its workers' base
    seed from it, never from the global generator that dropout uses, so a run resumed mid-epoch
    (a new iterator where the straight run kept its old one) draws the same dropout masks.
    The datasets' own randomness comes from per-item generators, not from the workers' seeds."""
    return data.loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                       collate_fn=collate_fn, worker_init_fn=_worker_init if num_workers else None,
                       generator=torch.Generator().manual_seed(0), drop_last=False, persistent_workers=False)


def batches_forever(dataset, loader_fn, sampler, state, tracker=None):
    """Yield training batches epoch after epoch. `state` ({"epoch", "index"}) is the data
    position saved in checkpoints: `index` counts items consumed in the current epoch.
    Per-epoch skip reports go through `tracker` (data.SkipTracker). A batch in which no clip
    could be read is counted and skipped; an epoch in which none could be read stops the run
    with data.UnreadableClips and the skip report, instead of training on nothing forever.
    Each batch also carries its "epoch", for draws that must depend on it
    (train_caption.hide_modalities)."""
    first = True
    while True:
        dataset.set_epoch(state["epoch"])
        sampler.set_position(state["epoch"], state["index"])
        whole_epoch, seen, readable = state["index"] == 0, 0, 0  # (a resumed run starts mid-epoch)
        for batch in loader_fn():
            state["index"] += len(batch["ids"]) + len(batch["skipped"])
            batch["epoch"] = state["epoch"]
            if tracker is not None:
                tracker.update(batch)
            seen += len(batch["ids"]) + len(batch["skipped"])
            readable += len(batch["ids"])
            if batch["ids"]:
                yield batch
        if whole_epoch and seen and not readable:
            raise data.UnreadableClips("no training clip could be read: "
                                       + (tracker.report() if tracker is not None else f"{seen} clips"))
        if tracker is not None:
            # this run's first epoch, then only epochs that lost clips: the same line after
            # every epoch would bury the progress bar (stage 1 runs sixty)
            if first or sum(tracker.reasons.values()):
                print0(f"epoch {state['epoch']}: {tracker.report()}")
            tracker.reset()
        state["epoch"], state["index"], first = state["epoch"] + 1, 0, False


def training_batches(dataset, args, rank, world, position):
    """The training stream of both scripts: this rank's share of each epoch (EpochSampler,
    shuffled with --seed) in batches of --batch-size from --num-workers loader processes,
    epoch after epoch (batches_forever) from `position` on, which it keeps up to date for
    save_training_state; unreadable clips are counted against --max-skip-fraction."""
    sampler = EpochSampler(len(dataset), args.seed, rank, world)
    loader_fn = lambda: make_loader(dataset, args.batch_size, sampler, args.num_workers, data.collate)
    return batches_forever(dataset, loader_fn, sampler, position, data.SkipTracker(args.max_skip_fraction))
