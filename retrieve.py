"""Retrieval with the unified queries: text -> clip and clip -> text, scored as LAVIS scores
BLIP-2 (`lavis/tasks/retrieval.py` and `Blip2Qformer.compute_sim_matrix`):

  1. every clip's query features (UniQ4Cap.clip_features) and every text's feature
     (UniQ4Cap.text_features) once; the contrastive (ITC) similarity of a text and a clip is
     the best query's cosine, one matrix product over the whole gallery;
  2. for each query, its top k candidates by ITC are re-ranked by the matching head: score =
     ITM logit of "matches" + ITC cosine; candidates outside the top k keep -100.

    python retrieve.py --ckpt out/retrieval/best.pth --video some/folder --text "a red circle moves up"
    python retrieve.py --ckpt out/retrieval/best.pth --video x.mp4 --captions candidates.txt
    python retrieve.py --ckpt out/retrieval/best.pth --ann data/embedded/test.json   # evaluate a split

A folder's clip features are stored (--features, keyed by each file's size and modification
time and by the checkpoint), so a second query over it decodes nothing for ITC; re-ranking
decodes each query's top k clips again (--rerank-k 0: ITC alone, no decoding). Results are JSON
Lines: one line per query with its ranked candidates and their scores.

Recall is counted against every reference: a clip's texts are all its captions, and a text's
clips are every clip that has it among its captions (on the embedded data many clips share one
caption, and any of them is a hit). R@1/5/10 are fractions of the queries, in [0, 1]; ranks
are 1-based, of the best-ranked relevant candidate.
"""

import argparse
import contextlib
import itertools
import json
import os
import sys

import torch

import cache
import data
import metrics
import training as T

EVAL_TEXT_LEN = 35  # LAVIS cuts retrieval text to 35 tokens in evaluation (32 in training)


def text_ids(tokenizer, texts, max_len=EVAL_TEXT_LEN):
    """BLIP-2's retrieval text: [CLS] w1 ... wn [SEP], ids and mask (B, T)."""
    ids, mask = tokenizer.encode(texts, max_len)
    ids[:, 0] = tokenizer.cls_id  # where the caption has [DEC]
    return ids, mask


@torch.no_grad()
def gallery(net, dataset, device, ctx, batch_size, cached, num_workers=0, desc=None):
    """Every readable item of `dataset` (one per clip, in data.collate's format) through encode
    -> memory -> the query pass. Returns (clip features (N, Q, E), pooled query outputs (N, C),
    both float32 on the CPU; the dataset index of each; the collated "records" of each; the
    unreadable ones' (path, reason)). desc: a progress bar's label (None: no bar)."""
    loader = data.loader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_saying_which)
    feats, pooled, items, records, skipped = [], [], [], [], []
    for b, (batch, readable) in enumerate(T.progress(loader, desc) if desc else loader):
        start = b * batch_size
        skipped += batch["skipped"]
        if not batch["ids"]:
            continue
        with ctx:
            memory, memory_mask = batch_memory(net, batch, device, cached)
            _, queries = net.Qformer.read_memory(net.query_tokens, memory, memory_mask, outputs=True)
            feats.append(net.clip_features(queries).float().cpu())
            pooled.append(queries.mean(dim=1).float().cpu())
        items += [start + j for j, ok in enumerate(readable) if ok]
        records += batch["records"]
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)
    return cat(feats), cat(pooled), items, records, skipped


def memory_reader(net, dataset, device, ctx, cached):
    """memory_of(indices) -> (memory, memory_mask) of those dataset items, read again: what
    re-ranking needs, and what a gallery does not keep (at the paper's size a clip's memory
    is 1,000 times its features)."""
    @torch.no_grad()
    def memory_of(indices):
        with ctx:
            memory, memory_mask = batch_memory(net, data.collate([dataset[i] for i in indices]), device, cached)
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        return memory, memory_mask
    return memory_of


def _collate_saying_which(items):
    return data.collate(items), ["error" not in x for x in items]  # (the batch, which items were readable)


def batch_memory(net, batch, device, cached):
    """A collated batch -> the memory its queries read, (memory, memory_mask)."""
    inputs = T.model_inputs(batch, device, cached)
    masks = inputs.pop("video_mask"), inputs.pop("audio_mask")
    return net.memory(*net.encode(**inputs), *masks)


@torch.no_grad()
def text_features(net, tokenizer, texts, device, ctx, batch_size=256):
    """(N, E) float32 on the CPU."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = text_ids(tokenizer, texts[i:i + batch_size])
        with ctx:
            out.append(net.text_features(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def itc_similarity(text_feats, clip_feats):
    """(T, E) and (N, Q, E) -> (T, N): each text against each clip's best query (cosines)."""
    return torch.einsum("te,nqe->tnq", text_feats, clip_feats).amax(dim=-1)


@torch.no_grad()
def rerank(net, sim, texts, memory_of, tokenizer, device, ctx, k, batch_size=64):
    """LAVIS's re-ranking of a (T, N) ITC matrix in both directions: each text's top k clips
    and each clip's top k texts get ITM logit + ITC cosine, everything else -100. Returns
    (t2c (T, N), c2t (N, T))."""
    k_clips, k_texts = min(k, sim.size(1)), min(k, sim.size(0))
    t2c = torch.full_like(sim, -100.0)
    c2t = torch.full_like(sim.t(), -100.0)
    pairs = [(t, int(c)) for t in range(sim.size(0)) for c in sim[t].topk(k_clips).indices]
    pairs += [(int(t), c) for c in range(sim.size(1)) for t in sim[:, c].topk(k_texts).indices]
    scores = {}
    for i in range(0, len(pairs), batch_size):
        chunk = [p for p in pairs[i:i + batch_size] if p not in scores]
        if not chunk:
            continue
        memory, memory_mask = memory_of([c for _, c in chunk])
        ids, mask = text_ids(tokenizer, [texts[t] for t, _ in chunk])
        with ctx:
            logits = net.match_logits(memory, memory_mask, ids.to(device), mask.to(device))
        scores.update(zip(chunk, logits[:, 1].float().cpu().tolist()))
    for t in range(sim.size(0)):
        for c in sim[t].topk(k_clips).indices.tolist():
            t2c[t, c] = scores[(t, c)] + sim[t, c]
    for c in range(sim.size(1)):
        for t in sim[:, c].topk(k_texts).indices.tolist():
            c2t[c, t] = scores[(t, c)] + sim[t, c]
    return t2c, c2t


@torch.no_grad()
def evaluate(net, dataset, references, tokenizer, device, ctx, batch_size, cached, k=16, num_workers=0):
    """Text <-> clip retrieval over `dataset` (one item per clip) with every caption of
    `references` ({clip id: [str, ...]}) as a text: ITC alone and re-ranked by ITM (top k).
    Returns {"text->clip ITC R@1": ..., ..., "clip->text ITM R@1": ..., "median rank", "mean
    rank" likewise, "texts", "clips", "skipped" (unreadable clips, left out), "k"}. After
    re-ranking, candidates past the top k tie at -100, so their ranks count as k + 1 (k at most the
    candidates there are)."""
    was_training = net.training
    net.eval()
    clip_feats, _, items, records, skipped = gallery(net, dataset, device, ctx, batch_size, cached, num_workers)
    read = memory_reader(net, dataset, device, ctx, cached)
    memory_of = lambda rows: read([items[r] for r in rows])  # gallery rows -> dataset items
    texts = sorted({c for r in records for c in references[r["id"]]})
    if not records or not texts:
        raise data.UnreadableClips(f"retrieval: no readable clip with a caption to rank ({len(skipped)} of "
                                   f"{len(dataset)} unreadable)")
    relevant = torch.tensor([[t in references[r["id"]] for r in records] for t in texts])  # (T, N)
    sim = itc_similarity(text_features(net, tokenizer, texts, device, ctx), clip_feats)
    t2c, c2t = rerank(net, sim, texts, memory_of, tokenizer, device, ctx, k)
    out = {}
    for name, (text_scores, clip_scores) in {"ITC": (sim, sim.t()), "ITM": (t2c, c2t)}.items():
        for direction, scores, rel in (("text->clip", text_scores, relevant), ("clip->text", clip_scores, relevant.t())):
            summary = metrics.recall_summary(metrics.retrieval_ranks(scores, rel))
            out.update({f"{direction} {name} {key}": value for key, value in summary.items()})
    out.update(texts=len(texts), clips=len(records), skipped=len(skipped), k=k)
    if "attributes" in records[0]:
        out["zero-shot attributes"] = zero_shot_attributes(net, tokenizer, clip_feats, records, device, ctx)
    net.train(was_training)
    return out


@torch.no_grad()
def zero_shot_attributes(net, tokenizer, clip_feats, records, device, ctx, field="caption"):
    """Zero-shot classification through ITC, as LanguageBind classifies: every caption the
    embedded data can have (each combination of its attributes, written as its `field` is)
    is a class; each clip takes the one with the highest ITC similarity, and its attributes
    are read back from it. Returns {attribute: accuracy} over `records` (which carry them)."""
    combos = [dict(zip(data.ATTRIBUTES, values)) for values in itertools.product(*data.ATTRIBUTES.values())]
    texts = [data.captions_for(a)[field] for a in combos]
    best = itc_similarity(text_features(net, tokenizer, texts, device, ctx), clip_feats).argmax(dim=0)  # (N,)
    return {name: sum(combos[int(b)][name] == r["attributes"][name] for b, r in zip(best, records)) / len(records)
            for name in data.ATTRIBUTES}


# -----------------------------------------------------------------------------
# The command: rank a folder for texts, or captions for each video; or evaluate a split


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", nargs="+", default=None, help="video files or folders: the gallery")
    p.add_argument("--text", action="append", default=None, help="a text query (repeat for several)")
    p.add_argument("--captions", default=None, help="a file of candidate captions, one a line: each video's best")
    p.add_argument("--ann", default=None, help="an annotation file to evaluate text<->clip retrieval on")
    p.add_argument("--data-dir", default=None, help="media folder of --ann (default: the annotation file's)")
    p.add_argument("--caption-field", default=None, help="annotation field of the captions (default as training)")
    p.add_argument("--top", type=int, default=10, help="candidates written per query")
    p.add_argument("--rerank-k", type=int, default=16, help="each query's top k by ITC are re-ranked by ITM (0: none)")
    p.add_argument("--features", default=None, help="where the gallery's clip features are kept "
                                                     "(default: gallery-features.pt beside the checkpoint)")
    p.add_argument("--out", default=None, help="JSON Lines (default: stdout); with --ann, the metrics as JSON")
    p.add_argument("--batch-size", type=int, default=16, help="clips encoded together")
    p.add_argument("--num-workers", type=int, default=2, help="decoding processes")
    T.add_checkpoint_args(p)  # --ckpt: one trained with --itc-weight / --itm-weight, or the authors'
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.text, args.captions, args.ann)) != 1:
        p.error("give one of --text (rank the videos), --captions (rank captions for each video) or --ann (evaluate)")
    if args.ann is None and not args.video:
        p.error("--text and --captions rank the videos of --video")
    if args.top < 1 or args.rerank_k < 0 or args.batch_size < 1 or args.num_workers < 0:
        p.error("--top and --batch-size must be at least 1, --rerank-k and --num-workers at least 0")
    return args


def stored_features(net, files, args, ctx):
    """The clip features of `files`, computing only those the store at --features lacks or
    holds for an older version of the file, or for another checkpoint (said on stderr).
    Returns (features (N, Q, E) of the readable files, their indices in `files`, how many
    files could not be read)."""
    path = args.features or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "gallery-features.pt")
    model = list(cache.file_identity(args.ckpt))
    store = torch.load(path, weights_only=True) if os.path.exists(path) else {"model": model, "clips": {}}
    if store["model"] != model:
        print(f"{path}: features of another checkpoint: computing them again", file=sys.stderr)
        store = {"model": model, "clips": {}}
    key = {f: os.path.abspath(f) for f in files}
    todo = [f for f in files if store["clips"].get(key[f], {}).get("file") != list(cache.clip_identity(f))]
    skipped = []
    if todo:
        dataset = data.VideoFiles(todo, data.MediaConfig.from_model(net.cfg))
        feats, _, items, _, skipped = gallery(net, dataset, args.device, ctx, args.batch_size, False,
                                           args.num_workers if len(todo) > 1 else 0, desc="clip features")
        for name, reason in skipped:
            print(f"error: {name}: {reason}", file=sys.stderr)
        for i, f in zip(items, feats):
            store["clips"][key[todo[i]]] = {"file": list(cache.clip_identity(todo[i])), "features": f.half()}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        T.save_checkpoint(path, store)
    print(f"{path}: {len(files) - len(todo)} of {len(files)} files' features were stored, "
          f"{len(todo) - len(skipped)} computed now" + (f", {len(skipped)} unreadable" if skipped else ""),
          file=sys.stderr)
    rows = [i for i, f in enumerate(files) if key[f] in store["clips"]]
    feats = torch.stack([store["clips"][key[files[i]]]["features"].float() for i in rows]) if rows else torch.empty(0)
    return feats, rows, len(skipped)


def rank_lines(scores, itc, names, kind, top):
    """One query's candidates, best first: by score (ITM + ITC for the re-ranked top k, or ITC
    alone), then by ITC for those past the top k, whose score is null."""
    order = itc.argsort(descending=True, stable=True)
    order = order[scores[order].argsort(descending=True, stable=True)][:top].tolist()
    return [{kind: names[j], "score": round(float(scores[j]), 4) if scores[j] > -100 else None,
             "itc": round(float(itc[j]), 4)} for j in order]


def main(argv=None):
    args = get_args(argv)
    args.device = T.setup_device(args.device)
    ctx = torch.autocast(args.device.type, enabled=False)
    texts = args.text
    if args.captions is not None:  # read before any model or video: a bad file stops the run at once
        with open(args.captions) as f:
            texts = [line.strip() for line in f if line.strip()]
        if not texts:
            raise data.DataError(f"{args.captions}: no captions in it")
    net, tokenizer = T.load_captioner(args)
    if args.ann is not None:
        data_dir = args.data_dir or os.path.dirname(os.path.abspath(args.ann))
        field, _ = data.caption_field_for(args.ann, args.caption_field)
        dataset = data.AVCaptionDataset(args.ann, data_dir, data.MediaConfig.from_model(net.cfg), field, by_clip=True)
        out = evaluate(net, dataset, dataset.references, tokenizer, args.device, ctx, args.batch_size, False,
                       args.rerank_k, args.num_workers)
        print(json.dumps(out, indent=2) if args.out is None else f"wrote {args.out}")
        if args.out is not None:
            T.write_json(args.out, out)
        return 0
    files, not_videos = data.list_videos(args.video)
    for path, why in not_videos:
        print(f"skipped, not readable as a video: {path}: {why}", file=sys.stderr)
    feats, rows, failed = stored_features(net, files, args, ctx)
    if not rows:
        raise data.UnreadableClips("no readable video to rank among " + " ".join(args.video))
    videos = [files[i] for i in rows]
    sim = itc_similarity(text_features(net, tokenizer, texts, args.device, ctx), feats)  # (T, N)
    t2c, c2t = sim, sim.t()
    if args.rerank_k > 0:
        read = memory_reader(net, data.VideoFiles(videos, data.MediaConfig.from_model(net.cfg)), args.device, ctx,
                             False)
        t2c, c2t = rerank(net, sim, texts, read, tokenizer, args.device, ctx, args.rerank_k)
    with (open(args.out, "w") if args.out else contextlib.nullcontext(sys.stdout)) as out:
        if args.text is not None:
            for t, text in enumerate(texts):
                out.write(json.dumps({"text": text, "videos": rank_lines(t2c[t], sim[t], videos, "video", args.top)})
                          + "\n")
        else:
            for c, video in enumerate(videos):
                out.write(json.dumps({"video": video, "captions": rank_lines(c2t[c], sim[:, c], texts, "caption",
                                                                             args.top)}) + "\n")
    return 1 if failed else 0  # as sample.py: a file that could not be read is an error, and said so


if __name__ == "__main__":
    T.run_script(main)
