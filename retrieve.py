"""Retrieval with the unified queries: text -> clip and clip -> text, scored as LAVIS scores
BLIP-2 (`lavis/tasks/retrieval.py` and `Blip2Qformer.compute_sim_matrix`):

  1. every clip's query features (UniQ4Cap.clip_features) and every text's feature
     (UniQ4Cap.text_features) once; the contrastive (ITC) similarity of a text and a clip is
     the best query's cosine, one matrix product over the whole gallery;
  2. for each query, its top k candidates by ITC are re-ranked by the matching head: score =
     ITM logit of "matches" + ITC cosine; candidates outside the top k keep -100.

Recall is counted against every reference: a clip's texts are all its captions, and a text's
clips are every clip that has it among its captions (on the embedded data many clips share one
caption, and any of them is a hit). R@1/5/10 are fractions of the queries, in [0, 1]; ranks
are 1-based, of the best-ranked relevant candidate.
"""

import itertools

import torch

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
def gallery(net, dataset, device, ctx, batch_size, cached, num_workers=0):
    """Every readable clip of `dataset` (one item per clip) through encode -> memory -> the
    query pass. Returns (clip features (N, Q, E) float32 on the CPU, the readable clips'
    records, the unreadable ones' (path, reason), and memory_of(indices) -> (memory,
    memory_mask) for re-ranking, which reads those clips again: a gallery holds features, not
    memories, which at the paper's size are 1,000 times larger)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate_saying_which)
    feats, records, items, skipped = [], [], [], []  # items: the dataset index of each readable clip
    for start, (batch, readable) in zip(range(0, len(dataset), batch_size), loader):
        skipped += batch["skipped"]
        if not batch["ids"]:
            continue
        with ctx:
            memory, memory_mask = batch_memory(net, batch, device, cached)
            _, queries = net.Qformer.read_memory(net.query_tokens, memory, memory_mask, outputs=True)
            feats.append(net.clip_features(queries).float().cpu())
        items += [start + j for j, ok in enumerate(readable) if ok]
        records += batch["records"]

    def memory_of(indices):
        with ctx:
            memory, memory_mask = batch_memory(net, data.collate([dataset[items[i]] for i in indices]), device, cached)
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        return memory, memory_mask

    return (torch.cat(feats) if feats else torch.empty(0)), records, skipped, memory_of


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
    k = min(k, sim.size(0), sim.size(1))
    t2c = torch.full_like(sim, -100.0)
    c2t = torch.full_like(sim.t(), -100.0)
    pairs = [(t, int(c)) for t in range(sim.size(0)) for c in sim[t].topk(k).indices]
    pairs += [(int(t), c) for c in range(sim.size(1)) for t in sim[:, c].topk(k).indices]
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
        for c in sim[t].topk(k).indices.tolist():
            t2c[t, c] = scores[(t, c)] + sim[t, c]
    for c in range(sim.size(1)):
        for t in sim[:, c].topk(k).indices.tolist():
            c2t[c, t] = scores[(t, c)] + sim[t, c]
    return t2c, c2t


@torch.no_grad()
def evaluate(net, dataset, references, tokenizer, device, ctx, batch_size, cached, k=16, num_workers=0):
    """Text <-> clip retrieval over `dataset` (one item per clip) with every caption of
    `references` ({clip id: [str, ...]}) as a text: ITC alone and re-ranked by ITM (top k).
    Returns {"text->clip ITC R@1": ..., ..., "clip->text ITM R@1": ..., "median rank", "mean
    rank" likewise, "texts", "clips", "skipped" (unreadable clips, left out), "k"}. After
    re-ranking, candidates past the top k tie at -100, so their ranks count as k + 1."""
    was_training = net.training
    net.eval()
    clip_feats, records, skipped, memory_of = gallery(net, dataset, device, ctx, batch_size, cached, num_workers)
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
    out.update(texts=len(texts), clips=len(records), skipped=len(skipped), k=min(k, len(texts), len(records)))
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
