"""Stage 2: train the captioner.

The encoders are frozen; the Q-Former, the per-modality LayerNorms and projections and the
query tokens learn to caption with the LM loss. The encoders come from --video-encoder /
--audio-encoder, else from stage 1's output in --align-dir; with the tiny preset and neither,
stage 1 is trained first (train_align.main, same seed and data), so one command runs the whole
method. --no-align keeps the encoders as this run's seed initialises them. Every --eval-every steps captions are generated
on the validation split and scored with BLEU-4, METEOR, ROUGE-L and CIDEr (and, on the embedded
set, exact attribute accuracy); the best checkpoint by CIDEr is kept and finally scored on the
test split.

Evaluation captions each clip once and scores it against every reference of that clip (a
caption field holding a list, or records repeating an `id`); training sees every (clip,
caption) pair.

--preset full defaults to the paper's recipe (the paper and the authors' released LAVIS run
configuration): frozen video patch dropout
0.5 in training, no modality dropout, AdamW at 2e-4 after a 5,000-step warm-up from 2e-6,
cosine to 2e-5, weight decay 0.05, no gradient clipping, batch 16. --preset tiny keeps its own
values; --help lists both, and a run prints its values and why they differ from full's.

With the tiny preset the frozen encoders run once per clip and training reads their cached
outputs (cache.py; --no-cache-features turns this off, --cache-features turns it on for the full
preset): four times as many steps in the same time, at the price of the random flip and random
audio chunk, which a cache cannot keep, and of frozen patch dropout (a cache holds one view).

The original's evaluation decoding: --decode sample --top-p 0.9 --top-k 50 --min-length 10
--max-length 30 (lengths count the [DEC] start token, as HF's generate does).

    python train_caption.py                                  # tiny: stage 1 first, then stage 2
    python train_caption.py --no-align                       # frozen random encoders (ablation)
    python train_caption.py --modalities video               # a video-only model
    python train_caption.py --preset full --data-dir D --train-ann D/train.json ... \\
        --video-encoder LanguageBind/LanguageBind_Video_FT \\
        --audio-encoder LanguageBind/LanguageBind_Audio_FT \\
        --bert google-bert/bert-base-cased --blip2 blip2     # the paper's recipe

Outputs in --out-dir (default out/caption): best.pth (stage-2 checkpoint: model, config,
tokenizer), last.pth (resumable), metrics.jsonl (log), metrics.json (final test metrics).
"""

import argparse
import filecmp
import hashlib
import json
import os
from dataclasses import asdict

import torch
import torch.nn as nn

import cache
import data
import losses
import metrics
import model as M
import pretrained as P
import retrieve
import train_align
import training as T

MODALITIES = {"video+audio": (True, True), "video": (True, False), "audio": (False, True)}


# Flag defaults that depend on --preset. full: the paper's recipe (the paper and the authors'
# LAVIS run configuration; neither gives a step count: 60,000 is this project's choice). tiny: a few minutes on a 2-core CPU.
RECIPE = {
    "batch_size": {"full": 16, "tiny": 32},
    "lr": {"full": 2e-4, "tiny": 1e-3},
    "warmup_lr": {"full": 2e-6, "tiny": 1e-5},
    "warmup_steps": {"full": 5000, "tiny": 50},
    "min_lr": {"full": 2e-5, "tiny": 1e-4},
    "weight_decay": {"full": 0.05, "tiny": 0.05},
    "clip": {"full": 0.0, "tiny": 1.0},
    "max_steps": {"full": 60000, "tiny": 3000},
    "modality_dropout": {"full": 0.0, "tiny": 0.15},
    "cache_features": {"full": False, "tiny": True},
    "frozen_patch_dropout": {"full": True, "tiny": False},
}
# why the tiny preset's defaults differ from the paper's (printed at start)
TINY_SCHEDULE = "the tiny recipe: a few thousand steps, measured in docs/results.md"
TINY_REASONS = {
    "batch_size": "the tiny recipe, per process; the paper: 16 per GPU on 8 GPUs",
    "lr": TINY_SCHEDULE,
    "warmup_lr": TINY_SCHEDULE,
    "warmup_steps": TINY_SCHEDULE,
    "min_lr": TINY_SCHEDULE,
    "clip": "the tiny recipe, measured in docs/results.md",
    "max_steps": "minutes on a CPU",
    "modality_dropout": "each modality in turn the only source, so one model also captions a clip that lacks one; "
                        "at 0.3 the sound's own attribute was learnt late (docs/results.md)",
    "cache_features": "the frozen encoders run once per clip: about four times the steps in the same time",
    "frozen_patch_dropout": "the tiny recipe, measured without it in docs/results.md",
}
GIVES_WAY = {"frozen_patch_dropout": "a feature cache holds one view of each clip, so no random patches",
             "cache_features": "--frozen-patch-dropout needs the encoders on every batch"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(M.PRESETS),
                   help="model size and recipe (full: the paper's)")
    p.add_argument("--modalities", default="video+audio", choices=sorted(MODALITIES),
                   help="what the model reads, in training and evaluation")
    p.add_argument("--modality-dropout", type=float, default=None,
                   help="probability of hiding a clip's audio in training, and the same probability of hiding "
                        "its video instead (never both; at most 0.5); the paper has none (default: "
                        + T.per_preset(RECIPE["modality_dropout"]) + ")")
    p.add_argument("--frozen-patch-dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="the frozen video tower keeps a random half of each video's patches in training (the "
                        "same in every frame, the class token always), none at evaluation, as the original "
                        "trained; a feature cache cannot keep it (default: "
                        + T.per_preset(RECIPE["frozen_patch_dropout"]) + ")")
    p.add_argument("--align-dir", default="out/align",
                   help="where train_align.py leaves video.pth / audio.pth; the tiny preset runs stage 1 there "
                        "first when they are missing")
    p.add_argument("--no-align", action="store_true",
                   help="no stage 1: frozen encoders as initialised by this run's seed (the ablation of the "
                        "paper's pre-alignment), unless --video-encoder / --audio-encoder name others")
    p.add_argument("--video-encoder", default=None,
                   help="video encoder: LanguageBind's HF file, its folder or repo id (LanguageBind/LanguageBind_Video_FT), "
                        "or a video.pth")
    p.add_argument("--audio-encoder", default=None,
                   help="audio encoder: LanguageBind's HF file, its folder or repo id (LanguageBind/LanguageBind_Audio_FT), "
                        "or an audio.pth")
    p.add_argument("--bert", default=None,
                   help="BERT: a folder with vocab.txt and weights, or a repo id (google-bert/bert-base-cased)")
    p.add_argument("--blip2", default=None,
                   help="BLIP-2's blip2_pretrained.pth: the file, its URL, or 'blip2' (its public URL, via torch.hub's cache)")
    p.add_argument("--query-noise", type=float, default=0.0, help="noise std added to tiled BLIP-2 queries")
    p.add_argument("--vocab-size", type=int, default=1000, help="WordPiece vocabulary trained when no --bert")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: preset default)")
    p.add_argument("--eval-max", type=int, default=0, help="clips per validation (0: all)")
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the frozen encoders once per clip (evaluation preprocessing: no flip, middle "
                        "audio chunks, no patch dropout) and train and evaluate from their fp16 outputs on disk "
                        "(cache.py) (default: " + T.per_preset(RECIPE["cache_features"]) + ")")
    p.add_argument("--cache-dir", default="out/cache", help="where --cache-features keeps the encoder outputs")
    p.add_argument("--itc-weight", type=float, default=0.0,
                   help="weight of BLIP-2's clip-text contrastive loss (ITC) beside the caption loss; with it or "
                        "--itm-weight above 0 the retrieval heads and the last layer's query path train too "
                        "(default 0: captioning only, as the paper)")
    p.add_argument("--itm-weight", type=float, default=0.0,
                   help="weight of BLIP-2's clip-text matching loss (ITM), on hard negatives drawn from the ITC "
                        "similarities of the global batch (default 0)")
    p.add_argument("--init-from", default=None,
                   help="a stage-2 checkpoint (best.pth, or the authors' checkpoint_N.pth with --bert) whose weights "
                        "and vocabulary start this run instead of BERT's / BLIP-2's: how retrieval is trained on top "
                        "of a captioner (docs/retrieval.md)")
    p.add_argument("--rerank-k", type=int, default=16,
                   help="with retrieval trained, evaluation re-ranks each query's top k candidates by ITM")
    p.add_argument("--out-dir", default="out/caption", help="checkpoints and metrics")
    T.add_data_args(p)
    T.add_decoding_args(p)
    T.add_common_args(p, **{k: v for k, v in RECIPE.items() if k not in ("modality_dropout", "cache_features",
                                                                        "frozen_patch_dropout")})
    args = p.parse_args(argv)
    T.check_decoding_args(p, args)
    if args.modality_dropout is not None and not 0 <= args.modality_dropout <= 0.5:
        p.error(f"--modality-dropout {args.modality_dropout}: the audio and the video are each hidden with this "
                "probability and never both, so it lies in [0, 0.5]")
    if args.init_from and not os.path.isfile(args.init_from):  # before stage 1 or any data, not after
        p.error(f"--init-from: no checkpoint file at {args.init_from}")
    args.recipe_given = [d for d in RECIPE if getattr(args, d) is not None]
    args.recipe_reasons = dict(TINY_REASONS) if args.preset == "tiny" else {}
    T.fill_preset_defaults(args, RECIPE)
    # a feature cache holds one view of each clip, which patch dropout would change at every
    # step: a flag given on the command line wins, a defaulted one gives way, both is an error
    if args.cache_features and args.frozen_patch_dropout:
        if "cache_features" in args.recipe_given and "frozen_patch_dropout" in args.recipe_given:
            p.error("--frozen-patch-dropout needs the frozen encoders to run on every batch, and "
                    "--cache-features holds one view of each clip: choose one")
        off = "cache_features" if "frozen_patch_dropout" in args.recipe_given else "frozen_patch_dropout"
        setattr(args, off, False)
        args.recipe_reasons[off] = GIVES_WAY[off]
    elif args.cache_features and "frozen_patch_dropout" not in args.recipe_given:
        args.recipe_reasons["frozen_patch_dropout"] = GIVES_WAY["frozen_patch_dropout"]  # off, and a cache could not keep it
    return args


def build_tokenizer(args, train_records, out_dir, resumed=None, start=None):
    """The vocabulary of the checkpoint being resumed, if any (a WordPiece vocabulary trained
    again could number its pieces differently); else bert-base-cased's when --bert names it;
    else a WordPiece vocabulary trained on the training captions, saved beside the checkpoint."""
    if resumed is not None:
        return data.Tokenizer.from_string(resumed["tokenizer"])
    if start is not None and "tokenizer" in start:  # --init-from's checkpoint: its weights number the pieces so
        return data.Tokenizer.from_string(start["tokenizer"])
    if args.bert:
        return data.Tokenizer.from_bert(args.bert)
    path = os.path.join(out_dir, "tokenizer.json")
    if T.is_master():
        tok = data.Tokenizer.train([r[args.caption_field] for r in train_records], args.vocab_size)
        os.makedirs(out_dir, exist_ok=True)
        tok.save(path)
    if torch.distributed.is_initialized():
        # the WordPiece trainer numbers its pieces differently in each process (the
        # tokenizers library's hash maps), so every rank takes rank 0's vocabulary
        torch.distributed.barrier()
        if not T.is_master():
            tok = data.Tokenizer.load(path)
    return tok


def encoder_files(args, cfg):
    """Which encoder weights to load: explicit flags, else train_align.py's output (unless
    --no-align), checked to be for this model's encoders."""
    files = {}
    for name in ("video", "audio"):
        given = getattr(args, f"{name}_encoder")
        default = os.path.join(args.align_dir, f"{name}.pth")
        files[name] = given or (default if os.path.exists(default) and not args.no_align else None)
        if files[name] == default:
            check_stage1_output(args.align_dir, name, getattr(cfg, name))
    return files


def check_stage1_output(folder, name, tower_cfg):
    """Stage 1's encoders in `folder` must be for this configuration: the loader would
    otherwise stretch a tower trained for other shapes (4 frames, say) to fit."""
    path, made = os.path.join(folder, "metrics.json"), None
    if os.path.exists(path):
        with open(path) as f:
            made = json.load(f).get("encoders", {}).get(name)
    if made != json.loads(json.dumps(asdict(tower_cfg))):  # as JSON stores it: tuples become lists
        raise data.DataError(f"{folder}/{name}.pth was not written by this version of train_align.py for this "
                             f"preset's {name} encoder ({path} says {'nothing' if made is None else made}): "
                             f"delete {folder} to train stage 1 again, or pass --no-align")


def needs_stage1(args):
    """The tiny preset trains stage 1 first when nothing names the encoders and stage 1 has
    left none in --align-dir. (The full preset's stage 1 starts from LanguageBind's files
    and runs for hours: it is never started on the side.)"""
    return (args.preset == "tiny" and not args.no_align and not args.video_encoder and not args.audio_encoder
            and not all(os.path.exists(os.path.join(args.align_dir, f"{m}.pth")) for m in ("video", "audio")))


def stage1_argv(args):
    """train_align.py's command line for this run: same seed, data, device and caches."""
    argv = ["--out-dir", args.align_dir, "--seed", str(args.seed), "--device", args.device,
            "--cache-dir", args.cache_dir]
    for flag in ("data_dir", "train_ann", "val_ann", "test_ann", "caption_field", "num_workers"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv


def hide_modalities(batch, p, seed):
    """Modality dropout: hide a clip's audio with probability p, or else its video with
    probability p, never both: a clip is seen whole with probability 1 - 2p. One model then
    also captions clips that lack a modality, and neither modality can carry the captions
    alone: hidden equally often, each is the only source of the caption for a share p of the
    clips, so the queries learn to read both.

    The caption stays whole, so it costs something: a clip whose audio is hidden still asks
    for its background, which only the sound carries, and its gradient teaches the model to
    guess the background from the frames, against reading it from the sound (the colour,
    likewise, when the video is hidden). The more clips lose their audio, the later the
    background is learnt: docs/results.md measures 0.3 against 0.15 (the tiny default),
    and the video hidden half as often as the audio, where one seed never learnt it.

    Each clip's draw is a hash of (seed, epoch, clip id, caption), not a draw from a
    generator: it does not depend on which rank or micro-batch the clip lands in, so two
    ranks hide what one process on the same global batch hides, and a resumed run hides
    what the uninterrupted one did."""
    vm, am = batch["video_mask"], batch["audio_mask"]
    if p <= 0 or vm is None or am is None:
        return batch
    r = torch.tensor([uniform_hash(seed, batch["epoch"], i, c) for i, c in zip(batch["ids"], batch["captions"])])
    drop_audio = (r < p) & vm
    drop_video = (r >= p) & (r < 2 * p) & am
    batch["audio_mask"], batch["video_mask"] = am & ~drop_audio, vm & ~drop_video
    return batch


def hash64(*key):
    """A 64-bit integer, uniformly spread, that is a pure function of `key`."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")


def uniform_hash(*key):
    """A number in [0, 1), uniformly spread, that is a pure function of `key`."""
    return hash64(*key) / 2 ** 64


def pair_keys(batch):
    """(B, 2) int64 for ITC: a key for each pair's clip and one for its caption text, so pairs
    that share either count as positives of each other."""
    return torch.tensor([[hash64("clip", i) >> 1, hash64("caption", c) >> 1]
                         for i, c in zip(batch["ids"], batch["captions"])])


class CaptionAndRetrieval(nn.Module):
    """Stage 2 with BLIP-2's retrieval objectives on the joint memory, combined as LAVIS's
    `Blip2Qformer.forward` does (lavis/models/blip2_models/blip2_qformer.py): the caption loss
    + itc_weight * ITC + itm_weight * ITM. One query pass serves all three: its keys and values
    feed the caption, its outputs the contrastive features. This is the module DDP wraps, so
    every pass runs inside its forward. cls_id: the tokenizer's [CLS], which starts BLIP-2's
    retrieval text where the caption has [DEC]; seed: the negatives' draws start from it."""

    def __init__(self, net, itc_weight, itm_weight, cls_id, seed):
        super().__init__()
        self.net = net.train_retrieval_heads(matching=itm_weight > 0)
        self.itc_weight, self.itm_weight, self.cls_id, self.seed = itc_weight, itm_weight, cls_id, seed

    def forward(self, captions, caption_mask, pair_keys, video=None, audio=None, video_mask=None, audio_mask=None,
                video_tokens=None, audio_tokens=None):
        net = self.net
        memory, memory_mask = net.memory(*net.encode(video, audio, video_tokens, audio_tokens), video_mask, audio_mask)
        query_kv, queries = net.Qformer.read_memory(net.query_tokens, memory, memory_mask, outputs=True)
        logits, _ = net.Qformer.decode_text(captions, query_kv, caption_mask)
        lm = losses.next_token_loss(logits, captions, caption_mask, net.cfg.label_smoothing)
        with torch.no_grad():
            net.temp.clamp_(0.001, 0.5)  # as LAVIS
        # the retrieval text: [CLS] where the caption has [DEC], padded to the global batch's longest so
        # ranks can exchange it
        B, pad = captions.size(0), losses.global_max(captions.size(1), captions.device) - captions.size(1)
        cls_ids = torch.cat([captions, captions.new_full((B, pad), net.cfg.qformer.pad_token_id)], dim=1)
        cls_ids[:, 0] = self.cls_id
        text_mask = torch.cat([caption_mask.bool(), caption_mask.new_zeros(B, pad, dtype=torch.bool)], dim=1)
        itc, sim_c2t, sim_t2c, positives = losses.itc_loss(
            net.clip_features(queries), net.text_features(cls_ids, text_mask), net.temp, pair_keys)
        loss, logged = lm + self.itc_weight * itc, {"lm": lm.item(), "itc": itc.item()}
        if self.itm_weight:
            # the same draws on every rank: seeded by the global batch's keys, not by a rank's generator
            generator = torch.Generator().manual_seed((self.seed + int(losses.gather(pair_keys).sum())) % 2 ** 63)
            neg_text, neg_clip, text_is_pos, clip_is_pos = losses.hard_negatives(sim_c2t, sim_t2c, positives,
                                                                                     pair_keys, generator)
            if memory_mask is None:
                memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
            all_memory, all_memory_mask = losses.gather_with_grad(memory), losses.gather(memory_mask)
            all_ids, all_text_mask = losses.gather(cls_ids), losses.gather(text_mask)
            # 3B pairs, as LAVIS: (clip, its text), (a negative clip, the text), (the clip, a negative text)
            logits = net.match_logits(torch.cat([memory, all_memory[neg_clip], memory]),
                                      torch.cat([memory_mask, all_memory_mask[neg_clip], memory_mask]),
                                      torch.cat([cls_ids, cls_ids, all_ids[neg_text]]),
                                      torch.cat([text_mask, text_mask, all_text_mask[neg_text]]))
            labels = torch.cat([torch.ones_like(clip_is_pos), clip_is_pos, text_is_pos])
            itm = losses.itm_loss(logits, labels)
            loss, logged["itm"] = loss + self.itm_weight * itm, itm.item()
        return loss, logged


@torch.no_grad()
def evaluate(net, dataset, references, tokenizer, device, ctx, args, limit=0, meteor=True):
    """Caption each clip of `dataset` (one item per clip) once, with the decoding flags, and
    score it against every caption `references` ({id: [str, ...]}) gives that clip: BLEU-4,
    METEOR (unless `meteor` is False), ROUGE-L, CIDEr, and exact attribute accuracy when the
    records carry attributes (the embedded set). Unreadable clips are left out and counted."""
    was_training = net.training
    net.eval()
    n = len(dataset) if not limit else min(limit, len(dataset))
    loader = data.loader(torch.utils.data.Subset(dataset, range(n)), batch_size=args.batch_size,
                         num_workers=args.num_workers)
    preds, records, skipped = {}, [], 0
    # sampling and the loader's worker seeds draw from the global generators: evaluate on a
    # fork of them, seeded, so an evaluation neither moves training's random stream nor
    # changes from one evaluation to the next
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        for batch in loader:
            skipped += len(batch["skipped"])
            if not batch["ids"]:
                continue
            with ctx:
                ids = net.generate(**T.model_inputs(batch, device, args.cache_features), **T.decoding_kwargs(args))
            for rec, row in zip(batch["records"], ids.cpu()):
                preds[rec["id"]] = tokenizer.decode(row)
                records.append(rec)
    if not preds:
        raise data.UnreadableClips(f"no evaluation clip could be read ({skipped} of {n} skipped)")
    out = metrics.caption_metrics({k: references[k] for k in preds}, preds, meteor=meteor)
    if "attributes" in records[0]:
        out["attributes"] = metrics.attribute_accuracy(records, [preds[r["id"]] for r in records],
                                                       data.parse_attributes)
    out["clips"], out["skipped"] = len(records), skipped
    out["references"] = sum(len(references[k]) for k in preds)
    if args.itc_weight > 0 or args.itm_weight > 0:
        out["retrieval"] = retrieve.evaluate(net, torch.utils.data.Subset(dataset, range(n)), references, tokenizer,
                                             device, ctx, args.batch_size, args.cache_features, args.rerank_k,
                                             args.num_workers)
    out["examples"] = {k: preds[k] for k in list(preds)[:3]}
    net.train(was_training)
    return out


def model_state(net, tokenizer, encoders, folder):
    """What sample.py needs to rebuild the captioner, in the authors' layout ("model":
    everything but the frozen encoders) plus our config, tokenizer and encoder files. An
    encoder file inside the checkpoint's own `folder` is stored by its name alone and found
    beside the checkpoint (training.encoder_path), so an output folder can be moved or read from
    anywhere; other local files are stored as absolute paths, public names as they are."""
    def portable(name):
        if not os.path.exists(name):
            return name  # a Hugging Face repo id or a URL
        path = os.path.abspath(name)
        return os.path.basename(path) if os.path.dirname(path) == os.path.abspath(folder) else path
    return {"model": P.stage2_state_dict(net), "config": asdict(net.cfg), "tokenizer": tokenizer.tok.to_str(),
            "encoders": {k: portable(v) for k, v in encoders.items()}}


def run_identity(args, sources):
    """What a resumed run must share with the run it continues. The frozen encoders are named
    by where their weights came from (None: this run's own initialisation, which the seed and
    the config decide). The retrieval weights decide what trains, so they are part of it too
    (named only when retrieval trains: a caption-only run's identity is as before they existed)."""
    identity = {"preset": args.preset, "modalities": args.modalities, "seed": args.seed,
                "encoders": {k: v if v is None or not os.path.exists(v) else os.path.abspath(v)
                             for k, v in sources.items()}}
    if args.itc_weight > 0 or args.itm_weight > 0:
        identity["retrieval"] = {"itc_weight": args.itc_weight, "itm_weight": args.itm_weight}
    if args.init_from:
        identity["init_from"] = os.path.abspath(args.init_from)
    return identity


def check_init_encoders(path, ckpt, sources):
    """A checkpoint for --init-from (`ckpt`, read from `path`) learnt to read the outputs of
    particular frozen encoders: refuse to go on from it with others (same bytes, wherever they
    lie, are the same)."""
    for name, theirs in (ckpt.get("encoders") or {}).items():
        theirs, ours = T.encoder_path(theirs, path), sources.get(name)
        same = ours == theirs or (ours and os.path.isfile(ours) and os.path.isfile(theirs)
                                  and filecmp.cmp(ours, theirs, shallow=False))
        if not same:
            raise data.DataError(f"--init-from {path} was trained on the {name} encoder {theirs}, and this run "
                                 f"reads {ours}: give the encoders it was trained on (--{name}-encoder, --align-dir)")


def check_resume(path, resumed, args):
    """Refuse to resume from something that is not this script's training state, or past its
    end."""
    if "optimizer" not in resumed or "run" not in resumed:
        raise data.DataError(f"--resume {path}: not a training state written by train_caption.py "
                             f"(best.pth holds the model only): resume from its last.pth")
    if resumed["step"] >= args.max_steps:
        raise data.DataError(f"--resume {path}: the checkpoint is at step {resumed['step']} and --max-steps "
                             f"is {args.max_steps}: nothing left to train (raise --max-steps)")


def check_same_run(path, resumed, args, cfg, sources):
    """Refuse to resume into a run that differs from the one that wrote the checkpoint (other
    modalities, seed, encoders or model): it would silently train something else."""
    ours, theirs = run_identity(args, sources), resumed["run"]
    differ = [f"{k} {ours.get(k)} (checkpoint: {theirs.get(k)})" for k in [*ours, *(k for k in theirs if k not in ours)]
              if ours.get(k) != theirs.get(k)]
    differ += [f"model config '{k}'" for k, v in asdict(cfg).items() if resumed["config"].get(k) != v]
    if differ:
        raise data.DataError(f"--resume {path}: this run differs from the one that wrote it: {'; '.join(differ)}")


def add_towers(net, args, encoders, device, dtype, ddp):
    """The frozen towers, for a run that calls them: built, loaded (or, with no file to load,
    this run's own initialisation saved for sample.py, and `encoders` pointed at it) and moved
    to the device."""
    given = dict(encoders)
    net.build_encoders()
    for name, enc in (("video", net.video_encoder), ("audio", net.audio_encoder)):
        if not encoders[name]:
            why = "--no-align" if args.no_align else f"nothing at {args.align_dir}/{name}.pth"
            T.print0(f"no {name} encoder weights (no --{name}-encoder, {why}): "
                     f"using this run's own initialisation of the {name} encoder")
            encoders[name] = os.path.join(args.out_dir, f"{name}.pth")
            if T.is_master():
                T.save_checkpoint(encoders[name], enc.state_dict())
    P.load_pretrained(net, video=given["video"], audio=given["audio"])
    for enc in (net.video_encoder, net.audio_encoder):
        enc.to(device)
        if dtype == torch.bfloat16:  # the frozen towers only read: bf16 halves their memory, no casts per step
            enc.to(dtype)
    if ddp:
        # a run's own initialisation drew each rank's towers with seed + rank: every rank takes
        # rank 0's before the cache's fingerprint is taken (the DDP wrapper comes after the cache)
        T.broadcast_from_rank0(net.encoder_parameters())


def towers_or_cache(net, sets, args, encoders, given, device, dtype, ctx, ddp, rank, world):
    """The cache-or-towers decision. Without --cache-features the towers run on every batch
    and the datasets `sets` ({split: AVCaptionDataset}) are returned as they are. With it,
    each clip's encoder outputs are computed once into a FeatureCache (cache.py), which is
    returned in their place; the towers are built only where an entry is missing (or to
    fingerprint this run's own initialisation), and let go of once every entry is there."""
    T.print0("feature cache: " + ("on: training without flips, random audio chunks or patch dropout "
                                  "(--no-cache-features to keep them)"
                                  if args.cache_features else "off: the encoders run on every batch"))
    if not args.cache_features or not all(given.values()):
        add_towers(net, args, encoders, device, dtype, ddp)
    if not args.cache_features:
        return sets
    towers = {name: (P.weights_file(given[name]), getattr(net.cfg, name)) if given[name]
              else net.get_submodule(f"{name}_encoder") for name in ("video", "audio")}
    fingerprint = cache.encoder_fingerprint(towers, args.modalities, dtype)
    cached = {split: cache.FeatureCache(args.cache_dir, ds, net.cfg, fingerprint) for split, ds in sets.items()}
    if net.video_encoder is None and not all(fc.complete() for fc in cached.values()):
        add_towers(net, args, encoders, device, dtype, ddp)
    for split, fc in cached.items():
        fc.build(net, device, ctx, args.batch_size, T.loader_workers(args, False, device), rank, world,
                 f"cache {split}")
    if net.video_encoder is None:
        T.print0("feature cache complete: the frozen encoders are not built")
    else:
        net.drop_encoders()  # their outputs are in the cache: training holds only what it trains
    return cached


def datasets(anns, data_dir, cfg, args):
    """{"train": (clip, caption) pairs, augmented unless read from the feature cache; "val",
    "test": each clip once with all its references}, decoded as the model's config says."""
    media = data.MediaConfig.from_model(cfg)
    sets = {"train": data.AVCaptionDataset(anns["train"], data_dir, media, args.caption_field, seed=args.seed,
                                           train=not args.cache_features, modalities=args.modalities)}
    sets.update({split: data.AVCaptionDataset(anns[split], data_dir, media, args.caption_field,
                                              modalities=args.modalities, by_clip=True) for split in ("val", "test")})
    return sets


def main(argv=None):
    args = get_args(argv)
    metrics_note = metrics.check_caption_metrics()  # a missing dependency stops the run now, not at evaluation
    if needs_stage1(args):
        argv = stage1_argv(args)
        T.print0(f"no stage-1 encoders in {args.align_dir}: training stage 1 first, as "
                 f"`python train_align.py {' '.join(argv)}` would (--no-align skips it)")
        train_align.main(argv)
    ddp, rank, local_rank, world, device, dtype, ctx = T.setup_run(args)
    # data: every annotation file is checked before the (possibly large) model is built
    data_dir, anns = T.resolve_data_paths(args)
    args.caption_field, why = data.caption_field_for(anns["train"], args.caption_field)
    records = {split: data.load_annotations(path, args.caption_field) for split, path in anns.items()}
    train_records = data.caption_pairs(records["train"], args.caption_field)
    resumed = T.load_checkpoint(args.resume) if args.resume else None
    if resumed is not None:
        check_resume(args.resume, resumed, args)
    start = P.read_state_dict(args.init_from) if args.init_from and resumed is None else None  # read once
    tokenizer = build_tokenizer(args, train_records, args.out_dir, resumed, start)
    cfg = tokenizer.configure(M.PRESETS[args.preset]())
    cfg.frozen_patch_dropout = args.frozen_patch_dropout
    T.print0(f"recipe (--preset {args.preset}; full is the paper's):\n"
             + "\n".join(T.describe_recipe(args, RECIPE, args.recipe_given, args.recipe_reasons)))
    T.print0(f"caption field: '{args.caption_field}' ({why})\n{metrics_note}")
    sets = datasets(anns, data_dir, cfg, args)
    references = {split: sets[split].references for split in ("val", "test")}
    # model: the Q-Former side from BERT / BLIP-2, then the frozen towers or their cached outputs
    encoders = encoder_files(args, cfg)
    given = dict(encoders)  # what load_pretrained reads: files, folders or Hugging Face names
    if resumed is not None:
        check_same_run(args.resume, resumed, args, cfg, given)
    net = M.UniQ4Cap(cfg, encoders=False)  # the towers are built only if this run calls them
    P.load_pretrained(net, bert=args.bert, blip2=args.blip2, query_noise=args.query_noise)
    if start is not None:
        check_init_encoders(args.init_from, start, given)
        P.map_stage2(net, P.stage2_model(start, args.init_from), args.init_from)
    net.to(device)
    sets = towers_or_cache(net, sets, args, encoders, given, device, dtype, ctx, ddp, rank, world)
    args.num_workers = T.loader_workers(args, args.cache_features, device)  # training's and evaluation's loaders
    # optimiser: no find_unused_parameters under DDP, since every trained parameter gets a
    # gradient on every rank (UniQ4Cap.unreachable_parameters, UniQ4Cap.memory)
    retrieval = args.itc_weight > 0 or args.itm_weight > 0
    objective = CaptionAndRetrieval(net, args.itc_weight, args.itm_weight, tokenizer.cls_id, args.seed) if retrieval else net
    model = T.training_handle(objective, args.compile, ddp, device)
    optimizer = T.make_optimizer(net, args.lr, args.weight_decay, device_type=device.type)
    step, position, extras = T.resume_training(resumed, args.resume, lambda sd: P.map_stage2(net, sd, args.resume),
                                               optimizer)
    best = extras.get("best")
    T.print0(f"stage 2 ({args.preset}, {args.modalities}): {net.num_params(True) / 1e6:.2f}M trainable "
             f"parameters on {device}, {len(sets['train'])} training (clip, caption) pairs of "
             f"{len({r['id'] for r in records['train']})} clips, vocabulary {cfg.qformer.vocab_size}")

    # loop: the caption loss on each batch; validation, best.pth and last.pth every eval_every steps
    def loss_fn(batch):
        batch = hide_modalities(batch, args.modality_dropout, args.seed)
        ids, mask = tokenizer.encode(batch["captions"], cfg.max_text_len)
        inputs = dict(captions=ids.to(device), caption_mask=mask.to(device), **T.model_inputs(batch, device, args.cache_features))
        with ctx:
            return model(pair_keys=pair_keys(batch).to(device), **inputs) if retrieval else (model(**inputs)[1], {})

    def validate_and_save(step, bar):
        nonlocal best
        if T.is_master() and (step % eval_every == 0 or step == args.max_steps):
            # validation picks best.pth by CIDEr and leaves METEOR, the slowest metric, to the test;
            # last.pth below saves the random generators after it, where a resumed run goes on
            scores = evaluate(net, sets["val"], references["val"], tokenizer, device, ctx, args, args.eval_max,
                              meteor=False)
            log.log(step=step, val=scores)
            bar.write(f"step {step} val: " + fmt(scores))
            if best is None or scores["CIDEr"] > best["CIDEr"]:
                best = {"CIDEr": scores["CIDEr"], "step": step}
                T.save_checkpoint(os.path.join(args.out_dir, "best.pth"),
                                  {**model_state(net, tokenizer, encoders, args.out_dir), "step": step,
                                   "metrics": scores})
        T.save_training_state(os.path.join(args.out_dir, "last.pth"), optimizer, step, position,
                              **model_state(net, tokenizer, encoders, args.out_dir), best=best,
                              run=run_identity(args, given))
        if ddp:
            torch.distributed.barrier()

    eval_every = args.eval_every or max(1, args.max_steps // 4)
    log = T.MetricsLogger(os.path.join(args.out_dir, "metrics.jsonl"))
    stream = T.training_batches(sets["train"], args, rank, world, position)
    loop = T.Loop(stream, loss_fn, every=eval_every, on_every=validate_and_save, log=log, desc="stage 2")
    step, losses_seen = T.run_training(model, optimizer, loop, args, step)
    if step < args.max_steps:
        T.print0(f"stopped at step {step} (--stop-at); resume with --resume {args.out_dir}/last.pth")
    elif T.is_master():  # test: the best checkpoint by validation CIDEr, on the test split
        P.load_pretrained(net, stage2=os.path.join(args.out_dir, "best.pth"))
        test = evaluate(net, sets["test"], references["test"], tokenizer, device, ctx, args)
        T.print0(f"test (best by val CIDEr, step {best['step']}): " + fmt(test))
        T.write_json(os.path.join(args.out_dir, "metrics.json"),
                     {"test": test, "best_step": best["step"], "modalities": args.modalities,
                      "preset": args.preset, "steps": step, "encoders": encoders,
                      "decoding": T.decoding_kwargs(args)})
        T.print0(f"wrote {args.out_dir}/best.pth and metrics.json")
        T.draw_curves(log.path)
    T.cleanup_distributed(ddp)
    return losses_seen


def fmt(s):
    text = ", ".join(f"{k} {s[k]:.3f}" for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in s)
    if "attributes" in s:
        text += " | " + ", ".join(f"{k} {v:.2f}" for k, v in s["attributes"].items())
    if "retrieval" in s:
        text += " | R@1 " + ", ".join(f"{d} {s['retrieval'][f'{d} {m} R@1']:.3f} ({m})"
                                      for d in ("text->clip", "clip->text") for m in ("ITC", "ITM"))
    return text


if __name__ == "__main__":
    T.run_script(main)
