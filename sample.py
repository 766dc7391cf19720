"""Caption video files with a trained model.

    python sample.py --video clip.mp4                       # prints the caption
    python sample.py --video a.mp4 b.mp4 --decode beam      # several files: JSON Lines
    python sample.py --video folder/ --num-captions 3 --decode sample
    python sample.py --video folder/ --out captions.jsonl   # a collection: batched, resumable
    python sample.py --video x.mp4 --ckpt checkpoint_N.pth --preset full \\
        --bert google-bert/bert-base-cased --video-encoder LanguageBind/LanguageBind_Video_FT \\
        --audio-encoder LanguageBind/LanguageBind_Audio_FT    # the authors' stage-2 file
    python sample.py --video x.mp4 --decode sample --top-p 0.9 --top-k 50 \\
        --min-length 10 --max-length 30                     # the original's evaluation decoding
    python sample.py --video x.mp4 --explain pictures/      # and where each word came from:
                                                            # pictures/x.mp4.png (explain.py)

--ckpt defaults to train_caption.py's output (out/caption/best.pth), which carries its config,
tokenizer and encoder files. The authors' stage-2 checkpoint works too, given their encoders
and bert-base-cased's vocabulary. A folder's captions cover every file PyAV can
open with a video stream, whatever its extension, except still pictures (a `<stem>.wav`
beside a video is that video's soundtrack, not a file to caption); the others are listed on
stderr as not readable as videos. A video without a soundtrack is captioned from its frames
alone (the audio tokens are masked out), and stderr says so (stdout holds only captions). A
named file that cannot be read gives a one-line error naming it and a non-zero exit code.
Lengths count tokens as HF's generate does, [DEC] included.

Several files are decoded in --num-workers loader processes and captioned --batch-size at a
time; each result is written as a JSON line as soon as its batch is done (to --out, or to
stdout), with a progress bar on stderr. Rerunning with the same --out skips the files already
in it and appends the rest (--no-resume starts it afresh), so a stopped run loses at most one
batch. With --decode sample the draws depend on the batch a clip lands in: --seed makes a
run repeatable with the same files and --batch-size, not clip by clip.

Under torchrun (one process per GPU, on one machine or several that share a filesystem) each
rank captions every N-th file still to do and writes its lines to `<out>.rank<R>` as it goes;
at the end rank 0 moves them into --out in the order of the file list, each file once. A
rerun, with any number of ranks, first moves the lines a stopped run left in those files into
--out, then captions the rest:

    torchrun --nproc_per_node 8 sample.py --video folder/ --out captions.jsonl
"""

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import explain
import training as T


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", nargs="+", required=True, help="video files or folders")
    T.add_checkpoint_args(p)
    T.add_decoding_args(p)
    p.add_argument("--num-captions", type=int, default=1,
                   help="captions per video (with --decode beam at most --num-beams; greedy gives one)")
    p.add_argument("--seed", type=int, default=0, help="seed for --decode sample")
    p.add_argument("--out", default=None, help="JSON Lines file for the captions (default: stdout); "
                        "files already in it are skipped unless --no-resume")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the files --out already holds and append (--no-resume: start it afresh)")
    p.add_argument("--batch-size", type=int, default=16, help="clips captioned together")
    p.add_argument("--num-workers", type=int, default=2, help="decoding processes (0: decode in this one)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="also draw, for each clip this run captions, where each word of its (first) caption came "
                        "from in the frames and the sound: DIR/<file name>.png (explain.py says how)")
    args = p.parse_args(argv)
    T.check_decoding_args(p, args)
    if args.batch_size < 1 or args.num_workers < 0:
        p.error("--batch-size must be at least 1 and --num-workers at least 0")
    return args


def caption_batches(net, tokenizer, files, args, pictures=None):
    """Yield (path, captions, has_audio, None) for each readable file, a batch at a time, and
    (path, None, None, reason) for each unreadable one: decoding runs in --num-workers
    processes while the model captions the batch before. With `pictures` ({path: PNG path},
    --explain), each clip's first caption is also drawn with explain.py, and a picture that
    cannot be written makes the fourth item its reason (the captions still come)."""
    workers = args.num_workers if len(files) > 1 else 0
    loader = data.loader(data.VideoFiles(files, data.MediaConfig.from_model(net.cfg), args.seed),
                         batch_size=args.batch_size, num_workers=workers, pin_memory=args.device.type == "cuda")
    # On a CPU the decoding workers and the model's threads share the cores: the model gets
    # the threads the workers leave, else each slows the other (2 cores, 2 workers, 256
    # embedded clips at the tiny preset: 10.8 ms a clip with 2 model threads, 6.1 with 1)
    threads = torch.get_num_threads()
    if args.device.type == "cpu" and workers:
        torch.set_num_threads(max(1, threads - workers))
    try:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for batch in loader:
                for path, reason in batch["skipped"]:
                    yield path, None, None, reason
                if not batch["ids"]:
                    continue
                inputs = T.model_inputs(batch, args.device)
                # the towers once: --explain reads the same tokens the captions came from
                towers = net.encode(inputs.pop("video"), inputs.pop("audio"))
                tokens = dict(zip(("video_tokens", "audio_tokens"), towers))
                ids = net.generate(**tokens, **inputs, num_captions=args.num_captions, **T.decoding_kwargs(args)).cpu()
                k = args.num_captions  # rows b*k ... (b+1)*k - 1 are clip b's captions
                for b, path in enumerate(batch["paths"]):
                    captions = [tokenizer.decode(row) for row in ids[b * k:(b + 1) * k]]
                    problem = None
                    if pictures is not None:
                        problem = draw_explanation(net, tokenizer, ids[b * k], batch, b, tokens, inputs, pictures[path])
                    yield path, captions, bool(batch["audio_mask"][b]), problem
    finally:
        torch.set_num_threads(threads)


def draw_explanation(net, tokenizer, ids, batch, b, tokens, inputs, png):
    """Clip b's caption `ids` attributed to its frames and sound and drawn to `png`
    (explain.py); None, or why the picture could not be written."""
    one = {k: None if v is None else v[b:b + 1] for k, v in {**tokens, **inputs}.items()}  # this clip alone
    explained, num_video = explain.explain_clip(net, tokenizer, ids, **one)
    has_audio = batch["audio"] is not None and bool(batch["audio_mask"][b])
    try:
        explain.draw(png, net.cfg, explained, num_video, video=batch["video"][b],
                     audio=batch["audio"][b] if has_audio else None,
                     title=f"{os.path.basename(batch['paths'][b])}: \"{tokenizer.decode(ids)}\"")
    except OSError as e:
        return f"cannot write its picture {png}: {e.strerror or e}"
    return None


def already_captioned(path):
    """The files a JSON Lines output of this script already holds. A last line cut off by a
    stopped run (no newline, not JSON) is removed from the file and its clip captioned again;
    any other line that is not one of our records means `path` is some other file, and it is
    left alone: ValueError."""
    done, good_bytes = set(), 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        try:
            done.add(json.loads(line)["video"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines) and not line.endswith(b"\n"):
                break  # cut off mid-line: rewritten from here
            raise ValueError(f"line {n} is not a caption record of sample.py: not resuming into another "
                             f"kind of file (give another --out, or --no-resume to overwrite it)") from None
        good_bytes += len(line)
    if good_bytes < os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def rank_parts(out):
    """The per-rank files of a run under torchrun that writes `out` (`<out>.rank<R>`), by rank."""
    folder, name = os.path.split(os.path.abspath(out))
    prefix = name + ".rank"
    ranks = [f[len(prefix):] for f in os.listdir(folder) if f.startswith(prefix)]
    return [os.path.join(folder, prefix + r) for r in sorted((r for r in ranks if r.isdigit()), key=int)]


def gather_parts(out, files):
    """Move the lines of every `<out>.rank<R>` into `out`, in the order of `files` and each
    file once (lines `out` holds already are kept, not repeated), then delete the parts. A
    part's last line cut off by a stopped rank is dropped: its clip is captioned again."""
    done = already_captioned(out) if os.path.exists(out) else set()
    parts = rank_parts(out)
    found = {}
    for part in parts:
        already_captioned(part)  # drops a cut-off last line (a part holds nothing else)
        with open(part) as f:
            for line in f:
                found.setdefault(json.loads(line)["video"], line)
    position = {f: i for i, f in enumerate(files)}
    new = sorted((v for v in found if v not in done), key=lambda v: position.get(v, len(position)))
    with open(out, "a") as f:
        f.writelines(found[v] for v in new)
    for part in parts:
        os.remove(part)
    return len(new)


def out_error(out, e):
    """The one line a bad --out gets (an OSError by its reason alone, without errno)."""
    return f"error: --out {out}: {getattr(e, 'strerror', None) or e}"


def sum_over_ranks(n):
    """n summed over the ranks (NCCL reduces GPU tensors only, gloo CPU ones)."""
    t = torch.tensor([n], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


def all_ranks_ok(ok, ddp):
    """Whether every rank's `ok` is true (each rank's own answer when not under torchrun)."""
    return ok if not ddp else sum_over_ranks(0 if ok else 1) == 0


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world = T.setup_distributed(args.device)
    try:
        return caption_files(args, ddp, rank, local_rank, world)
    finally:
        T.cleanup_distributed(ddp)


def caption_files(args, ddp, rank, local_rank, world):
    args.device = T.setup_device(args.device, local_rank)
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if rank == 0 else (lambda *a, **k: None)
    if ddp and args.out is None:
        say("error: under torchrun, give --out: the ranks write one JSON Lines file together")
        return 2
    files, not_videos = data.list_videos(args.video)  # every rank lists the same files, sorted
    for path, why in not_videos:
        say(f"skipped, not readable as a video: {path}: {why}")
    if not files:
        say("error: no video files found in " + " ".join(args.video))
        return 2
    pictures = None
    if args.explain is not None:
        try:
            explain.check_folder(args.explain)
            error = None
        except OSError as e:
            error = f"error: --explain {args.explain}: {e.strerror or e}"
        if not all_ranks_ok(error is None, ddp):
            say(error or "error: another rank cannot write into --explain")
            return 2
        pictures = explain.picture_names(files, args.explain)  # over every file: the same names on a rerun
    try:
        net, tokenizer = T.load_captioner(args)
        error = None
    except (FileNotFoundError, KeyError, ValueError) as e:  # pretrained.CheckpointError is both; one line, no traceback
        error = f"error: cannot load the model: {e}"
    if not all_ranks_ok(error is None, ddp):
        say(error or "error: another rank could not load the model")
        return 2
    as_jsonl = len(files) > 1 or os.path.isdir(args.video[0]) or args.out is not None
    sink = contextlib.nullcontext(sys.stdout)
    if args.out is not None:
        error = None
        if rank == 0:  # before any rank reads --out: a stopped run's ranks' lines go into it
            try:
                if not args.resume:
                    for part in rank_parts(args.out):
                        os.remove(part)
                elif rank_parts(args.out):
                    moved = gather_parts(args.out, files)
                    say(f"{args.out}: {moved} captions a stopped run's ranks had written moved into it")
            except (OSError, ValueError) as e:
                error = out_error(args.out, e)
        if ddp:
            dist.barrier()
        if error is None:
            try:
                done = already_captioned(args.out) if args.resume and os.path.exists(args.out) else set()
                if ddp:  # each rank its own file, gathered into --out at the end
                    sink = open(f"{args.out}.rank{rank}", "w")
                else:
                    sink = open(args.out, "a" if done else "w")
            except (OSError, ValueError) as e:
                error = out_error(args.out, e)
        if not all_ranks_ok(error is None, ddp):
            say(error or "error: another rank could not open its output")
            return 2
        if done:
            todo = [f for f in files if f not in done]
            say(f"{args.out}: {len(files) - len(todo)} of {len(files)} files already captioned, "
                f"{len(todo)} to go (--no-resume starts afresh)")
            files = todo
    all_files = files
    files = files[rank::world]  # a rank's share: every world-th file still to do
    failed = 0
    bar = tqdm(total=len(files), unit="clip", disable=not as_jsonl or rank != 0, dynamic_ncols=True,
               file=sys.stderr, desc=f"rank 0 of {world}" if ddp else None)
    with bar, sink as out:
        for path, captions, has_audio, error in caption_batches(net, tokenizer, files, args, pictures):
            bar.update(1)
            if error is not None:
                bar.write(f"error: {path}: {error}", file=sys.stderr)
                failed += 1
            if captions is None:
                continue
            if as_jsonl:
                out.write(json.dumps({"video": path, "captions": captions, "audio": has_audio}) + "\n")
                out.flush()  # a result is on disk as soon as its batch is done
            else:
                if not has_audio:  # on stderr: stdout holds captions only
                    print(f"(no audio track in {path}: captioned from the video alone)", file=sys.stderr)
                print("\n".join(captions))
    if pictures is not None:
        say("where each word came from: " + (pictures[all_files[0]] if len(all_files) == 1
                                               else f"{args.explain}/<file name>.png"))
    if ddp:
        dist.barrier()  # every rank's file is complete
        if rank == 0:
            gather_parts(args.out, all_files)
        failed = sum_over_ranks(failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
