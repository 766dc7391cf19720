"""Stage 1: align the video and audio encoders in one space (the paper's NCE and MIL-NCE).

The authors never released this stage; this is the project's design. Per clip:
  f_1..f_T  the video's frame embeddings (post-LN class token of each frame, projected),
  v = mean_t f_t, the pooled video embedding,
  a         the audio embedding (the class token of the spectrogram image, projected),
  c_1..c_T  the audio's chunk embeddings: its patch tokens averaged over T equal spans of
            time (one per video frame), post-LN and projected,
all L2-normalised, with a learnable temperature. Loss:
  NCE(v, a)                                    clip level, symmetric
  + lambda * 0.5 * (MIL-NCE(a, bag{f_t}) + MIL-NCE(v, bag{c_s}))
where an audio's positive is the bag of its own video's frames and a video's positive the
bag of its own audio's chunks (Miech et al., 2020): a match with any member counts, so the
finer-grained side need not agree with the clip as a whole. --mil-weight 0 is NCE alone.

--mil-bags time puts the bags in time instead, at the paper's granularity (8 frames, 3 audio
chunks): the audio is pooled into 3 chunks k_1..k_3 (thirds of its time columns), and
  + lambda * 0.5 * (MIL-NCE(k_s, bag{f_t : t in third s}) + MIL-NCE(f_t, bag{k_s(t)}))
where a chunk's positives are its clip's frames in its third, a frame's positive the chunk
holding it, and the negatives every other frame or chunk of the batch, the same clip's other
thirds included (losses.time_mil_nce_loss). This needs an audio window that holds the whole
clip, so that a third of its columns is a third of the clip: the tiny preset on the embedded
data (208 fbank frames for the 2 s clip's 203). At the full preset the three chunks are
stacked as channels of one window and its columns are not the clip's time.

Measured on the validation split every --eval-every steps (the same figures, logged to
metrics.jsonl for the training curves; the training's random generators are put back after
each, so a run trains the same with --no-validate) and on the test split before and after
training: instance retrieval R@1/5/10 both ways
(is a clip's own soundtrack the nearest?), the share of top matches with the same shared
attributes (the embedded set's shape and motion, together and each), and alignment in time
within each clip, whatever the loss: is a frame's nearest of T chunks of its own audio the one
at the same time (chance 1/T)? With 3 chunks, is a frame's nearest chunk the one holding it
(frame->chunk, chance 1/3), and does a chunk's nearest frame lie in it (chunk->frame, chance
the mean share of frames a chunk holds)?

    python train_align.py                      # tiny, from scratch, embedded data, ~minutes on CPU
    python train_align.py --preset full --video-init LanguageBind_Video_FT/pytorch_model.bin \\
        --audio-init LanguageBind_Audio_FT/pytorch_model.bin --train last-k --last-k 2 ...

Outputs in --out-dir (default out/align): video.pth and audio.pth (the authors' encoder
format, read by train_caption.py and sample.py), ckpt.pt (resumable), metrics.jsonl (log: a
row per step, a "val" row per validation), metrics.json (final metrics: retrieval on the test
split before and after), metrics.png (the curves: plot.py).
"""

import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import cache
import data
import losses
import metrics
import model as M
import pretrained as P
import training as T


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(M.PRESETS), help="encoder sizes")
    p.add_argument("--train", default=None, choices=["heads", "last-k", "all"],
                   help="what learns: projection heads only, the last k blocks (+heads), or everything "
                        "(default: all for tiny, last-k for full)")
    p.add_argument("--last-k", type=int, default=2, help="blocks trained with --train last-k")
    p.add_argument("--mil-weight", type=float, default=1.0, help="lambda, the MIL-NCE weight")
    p.add_argument("--mil-bags", default="clip", choices=["clip", "time"],
                   help="MIL-NCE's bags: clip (an audio against its clip's frames, a video against its audio's "
                        "chunks) or time (each of 3 audio chunks against its clip's frames in its third, each "
                        "frame against its chunk, the clip's other thirds among the negatives; needs an audio "
                        "window holding the whole clip, as the tiny preset's on the embedded data)")
    p.add_argument("--patch-dropout", action="store_true", help="video patch dropout while training")
    p.add_argument("--video-init", default=None, help="LanguageBind HF file or the authors' video.pth")
    p.add_argument("--audio-init", default=None, help="LanguageBind HF file or the authors' audio.pth")
    p.add_argument("--eval-max", type=int, default=0, help="held-out clips for retrieval (0: all)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between validations on the val split (0: a quarter of --max-steps, as stage 2)")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                   help="validate every --eval-every steps (--no-validate: the test split before and after only)")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--cache-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode and preprocess each clip once into fp16 files under --cache-dir and train from "
                        "them (cache.py): the flip is applied to the cached pixels, the random choice of audio "
                        "chunks is given up (default: on for tiny, off for full)")
    p.add_argument("--cache-dir", default="out/cache", help="where --cache-inputs keeps the decoded clips")
    p.add_argument("--out-dir", default="out/align", help="encoders, checkpoints and metrics")
    T.add_data_args(p)
    # batch 128: clips that share a flash pattern are what asks the towers to tell the shapes
    # and motions apart, and a batch of 32 holds few such pairs (on dataset version 2 the shape
    # stalled lower at batch 32); 1,000 steps: at 800 the top match's shape and motion were
    # still rising (docs/results.md, Stage 1)
    T.add_common_args(p, batch_size=128, lr=2e-3, min_lr=2e-4, warmup_lr=1e-5, warmup_steps=30,
                      max_steps=1000, weight_decay=0.05)
    return p.parse_args(argv)


TIME_CHUNKS = 3  # the paper's audio granularity: 3 chunks against 8 frames


def frame_chunks(num_frames, num_chunks):
    """Which of `num_chunks` equal spans of the audio holds each of `num_frames` frames,
    (num_frames,) long: frame t is sampled at the start of the t-th of num_frames equal spans
    of the clip (data.slot_of_frame; an embedded clip's crackle sounds at its slot's start),
    at the fraction t / num_frames of a window that holds the clip, so it lies in span
    t * num_chunks // num_frames. 8 frames in 3 chunks: 0 0 0 1 1 1 2 2 (the tiny window is
    26 columns of 80 ms: frame 5's burst, 1.25-1.45 s, lies in the middle chunk's 0.64-1.44 s)."""
    return torch.arange(num_frames) * num_chunks // num_frames


class Aligner(nn.Module):
    """The two encoders and the temperature: everything stage 1 trains."""

    def __init__(self, cfg: M.UniQ4CapConfig, patch_dropout=False):
        super().__init__()
        self.video_encoder = M.VisionTransformer(cfg.video)
        self.audio_encoder = M.VisionTransformer(cfg.audio)
        self.temperature = losses.LogitScale()  # the towers initialise themselves
        self.patch_dropout = patch_dropout
        self.train()

    def train(self, mode=True):
        """The video tower drops patches in training (its mode is the switch) only with
        --patch-dropout."""
        super().train(mode)
        self.video_encoder.train(mode and self.patch_dropout)
        return self

    def embed(self, video, audio):
        """-> frames (B, T, E), v (B, E), a (B, E), all unit length, and the audio tower's
        hidden states (B, 1 + mel*time patches, D), which audio_chunks pools into chunks."""
        _, frames = self.video_encoder(video)  # (B, T, D) post-LN class tokens
        hidden, audio_cls = self.audio_encoder(audio)  # (B, 1 + mel*time patches, D), (B, 1, D)
        frames = F.normalize(self.video_encoder.visual_projection(frames), dim=-1)
        v = F.normalize(frames.mean(dim=1), dim=-1)
        a = F.normalize(self.audio_encoder.visual_projection(audio_cls[:, 0]), dim=-1)
        return frames, v, a, hidden

    def audio_chunks(self, hidden, num_chunks):
        """The audio's patch tokens (B, 1 + gm*gt, D), a grid of gm mel rows by gt time
        columns after the class token, -> (B, num_chunks, E): averaged over the mel rows, then
        over num_chunks equal spans of time (spans overlap by a column where gt is not a
        multiple), post-LN and projected like the class token, unit length."""
        enc = self.audio_encoder
        gm, gt = (s // enc.cfg.patch_size for s in enc.cfg.image_size)
        patches = hidden[:, 1:].unflatten(1, (gm, gt))  # (B, gm*gt, D) -> (B, gm, gt, D)
        columns = patches.mean(dim=1).transpose(1, 2)  # (B, D, gt)
        spans = F.adaptive_avg_pool1d(columns, num_chunks).transpose(1, 2)  # (B, num_chunks, D)
        return F.normalize(enc.visual_projection(enc.post_layernorm(spans)), dim=-1)

    def forward(self, video, audio, mil_weight=1.0, mil_bags="clip"):
        """-> (loss, {"nce", "mil_nce", "scale": the temperature used}, as floats for the log).
        mil_bags: "clip" or "time" (the module docstring)."""
        frames, v, a, hidden = self.embed(video, audio)
        # the chunks before anything else, where the clip bags have always made them: the
        # autograd graph, and so the order its gradients are summed in, stays bit for bit
        chunks = self.audio_chunks(hidden, frames.size(1) if mil_bags == "clip" else TIME_CHUNKS)
        scale = self.temperature()
        nce = losses.nce_loss(v, a, scale)
        if mil_weight == 0:  # NCE alone: the bags play no part
            return nce, {"nce": nce.item(), "scale": scale.item()}
        if mil_bags == "clip":
            # every frame and every chunk is a real bag member (None: no padding)
            mil = 0.5 * (losses.mil_nce_loss(a, frames, None, scale) + losses.mil_nce_loss(v, chunks, None, scale))
        else:
            holds = frame_chunks(frames.size(1), TIME_CHUNKS)  # (T,): each frame's chunk
            in_chunk = holds[None, :] == torch.arange(TIME_CHUNKS)[:, None]  # (3, T): the frames each chunk holds
            mil = 0.5 * (losses.time_mil_nce_loss(chunks, frames, in_chunk, scale)
                         + losses.time_mil_nce_loss(frames, chunks, in_chunk.t(), scale))
        return nce + mil_weight * mil, {"nce": nce.item(), "mil_nce": mil.item(), "scale": scale.item()}


def set_trainable(aligner, mode, last_k):
    """heads: visual_projection (+temperature); last-k: also the last k blocks and
    post_layernorm; all: everything."""
    for p in aligner.parameters():
        p.requires_grad_(mode == "all")
    if mode == "all":
        return
    for enc in (aligner.video_encoder, aligner.audio_encoder):
        trainable = [enc.visual_projection]
        if mode == "last-k":
            trainable += [enc.post_layernorm, *enc.encoder.layers[-last_k:]]
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
    aligner.temperature.log_scale.requires_grad_(True)


@torch.no_grad()
def evaluate(aligner, dataset, device, ctx, batch_size, limit=0):
    """Video<->audio retrieval on held-out clips: R@1/5/10 both ways; alignment in time within
    each clip: the share of frames whose most similar of T audio chunks is the one at the same
    time (chance 1/T), and with 3 chunks (TIME_CHUNKS), the share of frames whose most similar
    chunk is the one holding them (frame_chunks; chance 1/3) and the share of chunks whose most
    similar frame they hold (chance: the mean share of the frames a chunk holds); and, on the
    embedded set, the share of queries whose top match shares their cross-modal attributes."""
    was_training = aligner.training
    aligner.eval()
    n = len(dataset) if not limit else min(limit, len(dataset))
    loader = data.loader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    vs, as_, same_time, frame_hits, chunk_hits, records = [], [], [], [], [], []
    for batch in loader:
        keep = batch["audio_mask"]  # retrieval needs both modalities
        with ctx:
            frames, v, a, hidden = aligner.embed(batch["video"][keep].float().to(device),
                                                 batch["audio"][keep].float().to(device))
            spans = aligner.audio_chunks(hidden, frames.size(1)).float()  # (B, T, E): a chunk per frame
            thirds = aligner.audio_chunks(hidden, TIME_CHUNKS).float()  # (B, 3, E)
        vs.append(v.float().cpu())
        as_.append(a.float().cpu())
        frames = frames.float()
        nearest = (frames @ spans.transpose(1, 2)).argmax(-1)  # (B, T): each frame's nearest span
        same_time.append((nearest == torch.arange(nearest.size(1), device=device)).float().cpu())
        holds = frame_chunks(frames.size(1), TIME_CHUNKS).to(device)  # (T,): the chunk holding each frame
        sim = frames @ thirds.transpose(1, 2)  # (B, T, 3)
        frame_hits.append((sim.argmax(2) == holds).float().cpu())  # (B, T): nearest chunk is its own
        chunk_hits.append((holds[sim.argmax(1)] == torch.arange(TIME_CHUNKS, device=device)).float().cpu())  # (B, 3)
        records += [r for r, k in zip(batch["records"], keep.tolist()) if k]
    v, a = torch.cat(vs), torch.cat(as_)
    sim = v @ a.t()
    out = {f"video->audio {k}": x for k, x in metrics.retrieval_recall(sim).items()}
    out.update({f"audio->video {k}": x for k, x in metrics.retrieval_recall(sim.t()).items()})
    same_time = torch.cat(same_time)  # (clips, T)
    out["frame->chunk same-time acc"] = same_time.mean().item()
    out["frame->chunk chance"] = 1 / same_time.size(1)
    out["frame->chunk acc (3 chunks)"] = torch.cat(frame_hits).mean().item()
    out["frame->chunk chance (3 chunks)"] = 1 / TIME_CHUNKS
    out["chunk->frame acc (3 chunks)"] = torch.cat(chunk_hits).mean().item()
    shares = torch.bincount(frame_chunks(same_time.size(1), TIME_CHUNKS), minlength=TIME_CHUNKS) / same_time.size(1)
    out["chunk->frame chance (3 chunks)"] = shares.mean().item()
    if records and "attributes" in records[0]:
        labels = [tuple(r["attributes"][n] for n in data.CROSS_MODAL_ATTRIBUTES) for r in records]
        classes = {l: i for i, l in enumerate(sorted(set(labels)))}
        ids = [classes[l] for l in labels]
        out["video->audio shared-attribute acc"] = metrics.top1_shares(sim, ids)
        out["audio->video shared-attribute acc"] = metrics.top1_shares(sim.t(), ids)
        out["shared-attribute chance"] = 1 / len(classes)
        for k, name in enumerate(data.CROSS_MODAL_ATTRIBUTES):  # and each on its own
            values = sorted({l[k] for l in labels})
            one = [values.index(l[k]) for l in labels]
            out[f"video->audio shares {name}"] = metrics.top1_shares(sim, one)
            out[f"audio->video shares {name}"] = metrics.top1_shares(sim.t(), one)
    out["clips"] = len(records)
    aligner.train(was_training)
    return out


def save_encoders(aligner, out_dir):
    """The authors' `video.pth` / `audio.pth` layout: each tower's state dict, no prefix."""
    for name, enc in (("video", aligner.video_encoder), ("audio", aligner.audio_encoder)):
        T.save_checkpoint(os.path.join(out_dir, f"{name}.pth"), enc.state_dict())


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world, device, dtype, ctx = T.setup_run(args)
    cfg = M.PRESETS[args.preset]()
    mode = args.train or ("all" if args.preset == "tiny" else "last-k")
    # the data first: a bad path or annotation file stops the run before the encoders load
    data_dir, anns = T.resolve_data_paths(args)
    args.caption_field, _ = data.caption_field_for(anns["train"], args.caption_field)
    media = data.MediaConfig.from_model(cfg)
    # one item per clip: the captions play no part in alignment, and a clip twice in a batch
    # would be its own negative
    cache_inputs = args.preset == "tiny" if args.cache_inputs is None else args.cache_inputs
    train_set = data.AVCaptionDataset(anns["train"], data_dir, media, args.caption_field, train=not cache_inputs,
                                      seed=args.seed, by_clip=True)
    held_out = {split: data.AVCaptionDataset(anns[split], data_dir, media, args.caption_field, train=False,
                                             by_clip=True) for split in (["val", "test"] if args.validate else ["test"])}
    if cache_inputs:
        # from here on the datasets yield the fp16 inputs each clip's first decoding gave
        T.print0("input cache: on: each clip is decoded once; training flips the cached frames as it would "
                 "the decoded ones and gives up the random choice of audio chunks (--no-cache-inputs keeps it)")
        train_set = cache.FeatureCache(args.cache_dir, train_set, cfg, "inputs", inputs=True, flip=True)
        held_out = {split: cache.FeatureCache(args.cache_dir, ds, cfg, "inputs", inputs=True)
                    for split, ds in held_out.items()}
        for split, ds in (("train", train_set), *held_out.items()):
            ds.build(None, device, contextlib.nullcontext(), args.batch_size, T.loader_workers(args, False, device),
                     rank, world, f"decode {split}")
    test_set = held_out["test"]
    args.num_workers = T.loader_workers(args, cache_inputs, device)  # for the training stream

    aligner = Aligner(cfg, args.patch_dropout)
    # the one loading entry point: it fills the towers of any model with video_encoder and
    # audio_encoder, and tells LanguageBind's files from the authors' video.pth / audio.pth
    P.load_pretrained(aligner, video=args.video_init, audio=args.audio_init)
    set_trainable(aligner, mode, args.last_k)
    aligner.to(device)
    model = T.training_handle(aligner, args.compile, ddp, device)
    optimizer = T.make_optimizer(aligner, args.lr, args.weight_decay, device_type=device.type)
    resumed = T.load_checkpoint(args.resume) if args.resume else None
    step, position, extras = T.resume_training(resumed, args.resume, aligner.load_state_dict, optimizer)
    before = extras.get("before")
    n_train = sum(p.numel() for p in aligner.parameters() if p.requires_grad)
    T.print0(f"stage 1 ({args.preset}, training {mode}: {n_train / 1e6:.2f}M parameters) on {device}, "
             f"{len(train_set)} training clips")
    if before is None:
        before = evaluate(aligner, test_set, device, ctx, args.batch_size, args.eval_max)
    T.print0("retrieval before: " + fmt(before))

    stream = T.training_batches(train_set, args, rank, world, position)
    # contrastive pairs need both modalities: a batch with fewer than two such clips teaches
    # nothing (clips without audio are still counted by the skip report)
    stream = (b for b in stream if b["audio"] is not None and b["video"] is not None
              and int((b["audio_mask"] & b["video_mask"]).sum()) >= 2)

    def loss_fn(batch):
        keep = batch["audio_mask"] & batch["video_mask"]  # pairs need both modalities
        video, audio = batch["video"][keep].float(), batch["audio"][keep].float()  # fp16 from a cache
        with ctx:
            return model(video.to(device), audio.to(device), args.mil_weight, args.mil_bags)

    def validate_and_checkpoint(step, bar):
        if args.validate and (step % eval_every == 0 or step == args.max_steps) and T.is_master():
            # evaluation draws from the global generators (its loader's seed): it runs on a
            # copy of them, so the training draws what it would have drawn without it
            rng, start = T.capture_rng_state(), time.perf_counter()
            scores = evaluate(aligner, held_out["val"], device, ctx, args.batch_size, args.eval_max)
            seconds = time.perf_counter() - start
            T.restore_rng_state(rng)
            log.log(step=step, val=scores, seconds=round(seconds, 3))
            bar.write(f"step {step} val: " + fmt(scores) + f" in {seconds:.1f} s")
        if step % args.save_every == 0 or step == T.steps_this_run(args):
            T.save_training_state(os.path.join(args.out_dir, "ckpt.pt"), optimizer, step, position,
                                  model=aligner.state_dict(), before=before, config=vars(args))

    eval_every = args.eval_every or max(1, args.max_steps // 4)
    log = T.MetricsLogger(os.path.join(args.out_dir, "metrics.jsonl"))
    # the loop calls back at every step either needs, and the callback sorts them out
    every = math.gcd(args.save_every, eval_every) if args.validate else args.save_every
    loop = T.Loop(stream, loss_fn, every=every, on_every=validate_and_checkpoint, log=log, desc="stage 1")
    step, losses_seen = T.run_training(model, optimizer, loop, args, step)
    if step < args.max_steps:
        T.print0(f"stopped at step {step} (--stop-at); resume with --resume {args.out_dir}/ckpt.pt")
        T.cleanup_distributed(ddp)
        return losses_seen

    after = evaluate(aligner, test_set, device, ctx, args.batch_size, args.eval_max)
    T.print0("retrieval after:  " + fmt(after))
    if T.is_master():
        save_encoders(aligner, args.out_dir)
        T.write_json(os.path.join(args.out_dir, "metrics.json"),
                     {"before": before, "after": after, "steps": step, "preset": args.preset, "train": mode,
                      "mil_weight": args.mil_weight, "mil_bags": args.mil_bags, "seed": args.seed,
                      # what train_caption.py checks before it reads video.pth / audio.pth
                      "encoders": {"video": asdict(cfg.video), "audio": asdict(cfg.audio)}})
        T.print0(f"wrote {args.out_dir}/video.pth, audio.pth, metrics.json")
        T.draw_curves(log.path)
    T.cleanup_distributed(ddp)
    return losses_seen


def fmt(m):
    keys = ["video->audio R@1", "video->audio R@5", "audio->video R@1", "audio->video R@5",
            "video->audio shared-attribute acc", "audio->video shared-attribute acc", "frame->chunk same-time acc",
            "frame->chunk acc (3 chunks)", "chunk->frame acc (3 chunks)"]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m) + f" ({m['clips']} clips)"


if __name__ == "__main__":
    T.run_script(main)
