"""The metric wrapper reports pycocoevalcap's own numbers (several references per clip included),
names a missing pycocoevalcap at start-up; retrieval recall counts ranks."""

import shutil

import pytest
import torch

from metrics import caption_metrics, retrieval_recall, top1_shares

REFS = {"a": ["a red circle moves left with a high tone over rain"],
        "b": ["a blue square moves up with a low tone"],
        "c": ["a green triangle moves down in silence"]}
PREDS = {"a": "a red circle moves right with a high tone", "b": "a blue square moves up with a low tone",
         "c": "a green circle moves down"}


def test_plain_tokenizer_path_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    got = caption_metrics(REFS, PREDS, use_java=False)
    res = {k: [v] for k, v in PREDS.items()}
    assert got["BLEU-4"] == pytest.approx(Bleu(4).compute_score(REFS, res, verbose=0)[0][3])
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(REFS, res)[0])
    assert got["ROUGE-L"] == pytest.approx(Rouge().compute_score(REFS, res)[0])
    assert "METEOR" not in got and got["tokenizer"] == "plain"


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_java_path_gives_fixed_reference_values():
    """Values computed once by pycocoevalcap itself on these captions."""
    got = caption_metrics(REFS, PREDS, use_java=True)
    assert got["tokenizer"] == "ptb"
    assert got["BLEU-4"] == pytest.approx(0.6058182, abs=1e-6)
    assert got["METEOR"] == pytest.approx(0.4474864, abs=1e-4)
    assert got["ROUGE-L"] == pytest.approx(0.8110147, abs=1e-6)
    assert got["CIDEr"] == pytest.approx(5.6868150, abs=1e-5)


def test_retrieval_recall_counts_ranks():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # true match first
                        [0.8, 0.5, 0.1],   # true match second
                        [0.7, 0.6, 0.2]])  # true match third
    r = retrieval_recall(sim, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    assert top1_shares(sim, [0, 0, 1]) == pytest.approx(2 / 3)


# several references per clip, as MSR-VTT (20) and VATEX (10) give; already lower case and
# without punctuation, so the plain tokenizer leaves them as they are
MULTI_REFS = {"a": ["a red circle moves up with rain", "a red ball rises while it rains",
                    "something red goes up in the rain"],
              "b": ["a blue square moves up with a low tone", "a low tone and a blue square going up"],
              "c": ["a green triangle moves down in silence", "a silent green triangle falls",
                    "a green shape moves down", "a triangle drops without a sound"]}
MULTI_PREDS = {"a": "a red circle rises in the rain", "b": "a blue square moves up",
               "c": "a green triangle falls in silence"}


def test_cider_with_several_references_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    expected = Cider().compute_score(MULTI_REFS, {k: [v] for k, v in MULTI_PREDS.items()})[0]
    got = caption_metrics(MULTI_REFS, MULTI_PREDS, use_java=False)
    assert got["CIDEr"] == pytest.approx(expected)
    # every reference counts: scoring against the last one only gives another number
    last_only = caption_metrics({k: v[-1:] for k, v in MULTI_REFS.items()}, MULTI_PREDS, use_java=False)
    assert last_only["CIDEr"] != pytest.approx(expected)


def test_missing_pycocoevalcap_is_named_at_start_up(monkeypatch):
    import sys

    from metrics import check_caption_metrics
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # what an absent package looks like to import
    with pytest.raises(ModuleNotFoundError, match="pip install pycocoevalcap"):
        check_caption_metrics()
