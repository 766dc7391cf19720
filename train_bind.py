"""Stage 0 of the tiny world: bind each tower to language, as LanguageBind did for the real ones.

The paper's stage 1 aligns towers that were already pre-trained: LanguageBind's, each of which
learnt, against a text tower, what its own captions name (the LanguageBind paper, ICLR 2024,
and its `training/` code). The video and audio towers were never paired with each other
there; language was the centre each was bound to. The full preset loads those towers from
LanguageBind's files. The tiny preset has none, so this script makes them the same way on the
embedded data, where each clip carries a caption of what is seen (`caption_video`: "a red
circle moves up") and one of what is heard (`caption_audio`: "a low tone sounds with rain in
the background"):

  v = mean_t f_t (the video tower's projected frame class tokens), a (the audio tower's
  projected class token), t(x) the text tower's projected end-of-text state, all unit length;
  loss = CLIP(v, t(caption_video)) + CLIP(a, t(caption_audio)),

each term the symmetric contrastive loss (losses.itc_loss with one query), where clips whose
captions are the same text are positives of each other, not negatives (on the embedded data
48 video and 48 audio captions are shared by 2,400 clips). LanguageBind kept OpenCLIP's text
tower frozen; the tiny world has no pre-trained text tower, so the text tower learns here with
the other two, from the captions of both modalities.

Measured at the end on the test split, zero-shot as LanguageBind classifies: each video against
every distinct video caption, each audio against every distinct audio caption, and the
attributes read back from the best match (chance: 1/3 for the shape, 1/4 for the others).

    python train_bind.py                     # -> out/bind/video.pth, audio.pth, text.pth, tokenizer.json

video.pth and audio.pth are in the authors' encoder format: `train_align.py --video-init
out/bind/video.pth --audio-init out/bind/audio.pth` aligns them.
"""

import argparse
import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import cache
import data
import losses
import model as M
import training as T


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default="out/cache", help="the decoded clips (shared with stage 1's input cache)")
    p.add_argument("--out-dir", default="out/bind", help="the bound towers, the text tower and metrics")
    T.add_data_args(p)
    T.add_common_args(p, batch_size=128, lr=2e-3, min_lr=2e-4, warmup_lr=1e-5, warmup_steps=30,
                      max_steps=500, weight_decay=0.05)
    args = p.parse_args(argv)
    if args.resume or args.stop_at:  # the towers are written only at the end, with no training state
        p.error("train_bind.py keeps no resumable state: run it to the end (no --resume, no --stop-at)")
    return args


def text_config(tokenizer, cfg):
    """The tiny text tower: the towers' width and depth, the captions' vocabulary, pooled at [SEP]."""
    return M.TextConfig(vocab_size=tokenizer.vocab_size, max_positions=cfg.max_text_len, width=cfg.video.width,
                        layers=cfg.video.layers, heads=cfg.video.heads, mlp_dim=cfg.video.mlp_dim,
                        embed_dim=cfg.video.embed_dim, eos_token_id=tokenizer.sep_id)


class Binder(nn.Module):
    """The video, audio and text towers and the temperature: everything this stage trains."""

    def __init__(self, cfg: M.UniQ4CapConfig, text_cfg: M.TextConfig):
        super().__init__()
        self.video_encoder = M.VisionTransformer(cfg.video)
        self.audio_encoder = M.VisionTransformer(cfg.audio)
        self.text_encoder = M.TextTransformer(text_cfg)
        self.temperature = losses.LogitScale()
        self.video_encoder.train(False)  # no patch dropout: its mode is the switch
        self.max_len = text_cfg.max_positions

    def embed_video(self, video):
        _, frames = self.video_encoder(video)  # (B, T, D) post-LN class tokens
        frames = F.normalize(self.video_encoder.visual_projection(frames), dim=-1)
        return F.normalize(frames.mean(dim=1), dim=-1)  # (B, E)

    def embed_audio(self, audio):
        _, cls = self.audio_encoder(audio)  # (B, 1, D)
        return F.normalize(self.audio_encoder.visual_projection(cls[:, 0]), dim=-1)  # (B, E)

    def embed_text(self, ids):
        return F.normalize(self.text_encoder(ids)[1], dim=-1)  # (B, E)

    def forward(self, video, audio, video_ids, audio_ids, keys_video, keys_audio):
        """keys_*: (B, 2) int64, (clip, caption text) ids: pairs sharing either are positives."""
        temp = 1.0 / self.temperature()
        lv = losses.itc_loss(self.embed_video(video)[:, None], self.embed_text(video_ids), temp, keys_video, 0.0)[0]
        la = losses.itc_loss(self.embed_audio(audio)[:, None], self.embed_text(audio_ids), temp, keys_audio, 0.0)[0]
        return lv + la, {"video-text": lv.item(), "audio-text": la.item(), "scale": 1.0 / temp.item()}


@torch.no_grad()
def zero_shot(binder, dataset, records, tokenizer, device, batch_size):
    """Each clip's video against every distinct video caption of `records` (the split's), its
    audio against every distinct audio caption; the attributes read back from the best match
    -> {"video colour": accuracy, ...}."""
    binder.eval()
    texts = {m: sorted({r[f"caption_{m}"] for r in records}) for m in ("video", "audio")}
    feats = {m: binder.embed_text(tokenizer.encode(t, binder.max_len)[0].to(device)) for m, t in texts.items()}
    hits = {}
    for batch in data.loader(dataset, batch_size=batch_size):
        keep = batch["audio_mask"]
        emb = {"video": binder.embed_video(batch["video"][keep].float().to(device)),
               "audio": binder.embed_audio(batch["audio"][keep].float().to(device))}
        truth = [r["attributes"] for r, k in zip(batch["records"], keep.tolist()) if k]
        for m in ("video", "audio"):
            for attributes, best in zip(truth, (emb[m] @ feats[m].t()).argmax(dim=1).tolist()):
                for name, value in data.parse_attributes(texts[m][best]).items():
                    if value is not None:  # what this modality's captions name
                        hits.setdefault(f"{m} {name}", []).append(value == attributes[name])
    binder.train()
    binder.video_encoder.train(False)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world, device, dtype, ctx = T.setup_run(args)
    cfg = M.PRESETS["tiny"]()
    data_dir, anns = T.resolve_data_paths(args)
    train_records = data.load_annotations(anns["train"], "caption")
    if "caption_video" not in train_records[0]:
        raise data.DataError(f"{anns['train']}: binding needs each clip's caption_video and caption_audio "
                             f"(the embedded dataset's)")
    tokenizer = data.Tokenizer.train([r[f] for r in train_records for f in ("caption_video", "caption_audio")])
    media = data.MediaConfig.from_model(cfg)
    sets = {split: data.AVCaptionDataset(anns[split], data_dir, media, "caption", train=False, by_clip=True)
            for split in ("train", "test")}
    sets = {split: cache.FeatureCache(args.cache_dir, ds, cfg, "inputs", inputs=True, flip=split == "train")
            for split, ds in sets.items()}
    for split, ds in sets.items():
        ds.build(None, device, contextlib.nullcontext(), args.batch_size, T.loader_workers(args, False, device),
                 rank, world, f"decode {split}")
    numbers = {}  # a clip id or a caption text -> an int, for the positives' keys

    def keys(batch, field):
        return torch.tensor([[numbers.setdefault(("clip", i), len(numbers)), numbers.setdefault(r[field], len(numbers))]
                             for i, r in zip(batch["ids"], batch["records"])], dtype=torch.long)

    binder = Binder(cfg, text_config(tokenizer, cfg)).to(device)
    model = T.training_handle(binder, args.compile, ddp, device)
    optimizer = T.make_optimizer(binder, args.lr, args.weight_decay, device_type=device.type)
    step, position, _ = T.resume_training(None, None, binder.load_state_dict, optimizer)
    T.print0(f"stage 0, binding the tiny towers to language: {sum(p.numel() for p in binder.parameters()) / 1e6:.2f}M "
             f"parameters, {len(sets['train'])} training clips, vocabulary {tokenizer.vocab_size}")
    args.num_workers = T.loader_workers(args, True, device)  # it reads the input cache
    stream = T.training_batches(sets["train"], args, rank, world, position)
    stream = (b for b in stream if b["audio"] is not None and int(b["audio_mask"].sum()) >= 2)

    def loss_fn(batch):
        keep = batch["audio_mask"]
        recs = [r for r, k in zip(batch["records"], keep.tolist()) if k]
        ids = [i for i, k in zip(batch["ids"], keep.tolist()) if k]
        one = {"ids": ids, "records": recs}
        video_ids = tokenizer.encode([r["caption_video"] for r in recs], cfg.max_text_len)[0]
        audio_ids = tokenizer.encode([r["caption_audio"] for r in recs], cfg.max_text_len)[0]
        with ctx:
            return model(batch["video"][keep].float().to(device), batch["audio"][keep].float().to(device),
                         video_ids.to(device), audio_ids.to(device), keys(one, "caption_video").to(device),
                         keys(one, "caption_audio").to(device))

    log = T.MetricsLogger(os.path.join(args.out_dir, "metrics.jsonl"))
    loop = T.Loop(stream, loss_fn, every=args.max_steps, on_every=lambda step, bar: None, log=log, desc="stage 0")
    step, losses_seen = T.run_training(model, optimizer, loop, args, step)
    scores = zero_shot(binder, sets["test"], data.load_annotations(anns["test"], "caption"), tokenizer, device,
                       args.batch_size)
    T.print0("zero-shot on the test split: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if T.is_master():
        for name in ("video", "audio", "text"):
            T.save_checkpoint(os.path.join(args.out_dir, f"{name}.pth"), getattr(binder, f"{name}_encoder").state_dict())
        tokenizer.save(os.path.join(args.out_dir, "tokenizer.json"))
        T.write_json(os.path.join(args.out_dir, "metrics.json"), {"zero-shot": scores, "steps": step, "seed": args.seed})
        T.print0(f"wrote {args.out_dir}/video.pth, audio.pth, text.pth, tokenizer.json, metrics.json")
    T.cleanup_distributed(ddp)
    return losses_seen


if __name__ == "__main__":
    T.run_script(main)
