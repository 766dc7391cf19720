"""Evaluation measures, in one place for both stages.

  caption_metrics: BLEU-4, METEOR, ROUGE-L and CIDEr through pycocoevalcap, as papers report
    them, against every reference of a clip (its PTB tokenizer and METEOR run on Java; without
    Java a plain tokenizer is used, METEOR is left out, and the result says so);
  check_caption_metrics: the start-up check that pycocoevalcap is there, and whether Java is.
  retrieval_recall: R@k for cross-modal retrieval from a similarity matrix (stage 1).
  attribute_accuracy: exact per-attribute accuracy of generated captions on the embedded set.
"""

import re
import shutil

import torch


def _plain_tokenize(captions):
    """Java-free stand-in for the PTB tokenizer: lower case, punctuation dropped."""
    return {k: [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in v] for k, v in captions.items()}


def check_caption_metrics():
    """What a training script calls at start-up, so that a missing dependency stops the run
    before training rather than at the first evaluation: raises ModuleNotFoundError when
    pycocoevalcap is not installed; returns a line saying how captions will be scored (Java
    runs METEOR and the PTB tokenizer; without it they are left out)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("pycocoevalcap is not installed, and the caption metrics need it: "
                                  "pip install pycocoevalcap", name="pycocoevalcap") from None
    if shutil.which("java") is None:
        return ("metrics: java not found: METEOR is left out and a plain tokenizer replaces PTB's, "
                "so scores are not comparable to papers (install a Java runtime to fix)")
    return "metrics: BLEU-4, METEOR, ROUGE-L, CIDEr with the PTB tokenizer (pycocoevalcap, java)"


def caption_metrics(references, predictions, use_java=None, meteor=True):
    """references: {id: [str, ...]}, every reference caption of a clip (papers score against
    all of them: MSR-VTT has 20 per video); predictions: {id: str}. Returns a dict with
    BLEU-4, METEOR (when Java is there and `meteor`), ROUGE-L, CIDEr and `tokenizer` naming
    the tokenizer used."""
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
        gts = _plain_tokenize({k: [d["caption"] for d in v] for k, v in gts.items()})
        res = _plain_tokenize({k: [d["caption"] for d in v] for k, v in res.items()})
    out = {"tokenizer": "ptb" if use_java else "plain"}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["BLEU-4"] = bleu[3]
    if use_java and meteor:
        from pycocoevalcap.meteor.meteor import Meteor
        out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return {k: float(v) if not isinstance(v, str) else v for k, v in out.items()}


def retrieval_ranks(scores, relevant):
    """scores (N, M) of N queries against M candidates; relevant (N, M) bool, at least one
    True per row. Returns (N,) the 1-based rank of each query's best-scored relevant
    candidate (ties count in its favour)."""
    best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1)  # (N,)
    return (scores > best[:, None]).sum(dim=1) + 1  # 1 + how many candidates beat it


def recall_summary(ranks, ks=(1, 5, 10)):
    """{"R@k": fraction of queries ranked k or better, "median rank", "mean rank"}."""
    out = {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
    out["median rank"] = ranks.float().quantile(0.5).item()
    out["mean rank"] = ranks.float().mean().item()
    return out


def retrieval_recall(sim, ks=(1, 5, 10)):
    """sim (N, N): row i's true match is column i. Returns {"R@k": fraction} for rows as queries."""
    ranks = retrieval_ranks(sim, torch.eye(sim.size(0), dtype=torch.bool, device=sim.device))
    return {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}


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
