"""Evaluation measures, in one place for both stages.

  caption_metrics: BLEU-4, METEOR, ROUGE-L and CIDEr through pycocoevalcap, as papers report
    them (its PTB tokenizer and METEOR run on Java; without Java a plain tokenizer is used,
    METEOR is left out, and the result says so).
  retrieval_recall: R@k for cross-modal retrieval from a similarity matrix (stage 1).
  attribute_accuracy: exact per-attribute accuracy of generated captions on the embedded set.
"""

import re
import shutil
import sys

import torch


def _plain_tokenize(captions):
    """Java-free stand-in for the PTB tokenizer: lower case, punctuation dropped."""
    return {k: [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in v] for k, v in captions.items()}


def caption_metrics(references, predictions, use_java=None):
    """references: {id: [str, ...]}, predictions: {id: str}. Returns a dict with BLEU-4,
    METEOR (when Java is there), ROUGE-L, CIDEr and `tokenizer` naming the tokenizer used."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if use_java is None:
        use_java = shutil.which("java") is not None
    gts = {k: [{"caption": c} for c in v] for k, v in references.items()}
    res = {k: [{"caption": predictions[k]}] for k in references}
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
    else:
        print("metrics: java not found, using a plain tokenizer and leaving METEOR out", file=sys.stderr)
        gts = _plain_tokenize({k: [d["caption"] for d in v] for k, v in gts.items()})
        res = _plain_tokenize({k: [d["caption"] for d in v] for k, v in res.items()})
    out = {"tokenizer": "ptb" if use_java else "plain"}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["BLEU-4"] = bleu[3]
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor
        out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return {k: float(v) if not isinstance(v, str) else v for k, v in out.items()}


def retrieval_recall(sim, ks=(1, 5, 10)):
    """sim (N, N): row i's true match is column i. Returns {"R@k": fraction} for rows as queries."""
    ranks = (sim > sim.diag()[:, None]).sum(dim=1)  # how many candidates beat the true one
    return {f"R@{k}": (ranks < k).float().mean().item() for k in ks}


def top1_shares(sim, labels):
    """Fraction of queries (rows) whose top match has the same label as the query."""
    labels = torch.as_tensor(labels)
    return (labels[sim.argmax(dim=1)] == labels).float().mean().item()


def attribute_accuracy(records, predictions, parse):
    """records: dataset records with an `attributes` dict; predictions: captions in the same
    order; parse: caption -> {name: value or None}. Returns {name: accuracy}."""
    names = sorted(records[0]["attributes"])
    hits = {n: 0 for n in names}
    for rec, pred in zip(records, predictions):
        got = parse(pred)
        for n in names:
            hits[n] += got.get(n) == rec["attributes"][n]
    return {n: hits[n] / max(1, len(records)) for n in names}
