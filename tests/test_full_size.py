"""The paper's setting end to end on the CPU, at full size (model.full_config, train_caption.py's full recipe).

Official-layout files with random weights at the real shapes (LanguageBind's video and audio
`pytorch_model.bin`, a bert-base-cased folder, BLIP-2's `blip2_pretrained.pth`), three real mp4
clips with annotations in the authors' format (`id`, `sound_mplug`), then what a user runs:
`train_caption.py --preset full` for two steps at batch 2 (evaluation and saving included),
`sample.py` with the checkpoint it wrote (and its `--explain` picture), and `sample.py` with a
stage-2 checkpoint built like the authors' `checkpoint_N.pth`. Nothing is shrunk: every tower
has its 24 or 12 layers.

It is the slowest test of the suite (minutes, several GB of files under the pytest tmp folder).
"""

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import data
import model as M
import pretrained as P
import retrieve
import train_caption
from tests import official_checkpoints as official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["A person plays a guitar on a stage while the crowd cheers loudly.",
            "A dog barks at a passing car in the street.",
            "Rain falls on a tin roof and thunder rolls in the distance."]


def write_vocab(path, captions):
    """A vocab.txt with bert-base-cased's size and special ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103) that spells the captions' words; the rest are filler entries."""
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = set()
    for c in captions:
        pieces.update(c.replace(".", " . ").replace(",", " , ").split())
    chars = [chr(c) for c in range(33, 127)]
    words += sorted(pieces - set(words)) + [c for c in chars if c not in pieces] + ["##" + c for c in chars]
    words += [f"filler{i}" for i in range(28996 - len(words))]
    assert len(words) == 28996
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """Official-layout checkpoints at full size and an authors'-format dataset of 3 clips."""
    root = tmp_path_factory.mktemp("paper")
    cfg = M.full_config()
    files = {}
    for name, tower in (("video", cfg.video), ("audio", cfg.audio)):
        folder = root / f"LanguageBind_{name.title()}_FT"
        folder.mkdir()
        files[name] = str(folder / "pytorch_model.bin")
        torch.save(official.make(official.languagebind(tower)), files[name])
    bert = root / "bert-base-cased"
    bert.mkdir()
    torch.save(official.make(official.bert(cfg.qformer)), bert / "pytorch_model.bin")
    write_vocab(bert / "vocab.txt", CAPTIONS)
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    files["bert"] = str(bert)
    files["blip2"] = str(root / "blip2_pretrained.pth")
    torch.save({"model": official.make(official.blip2(cfg.qformer))}, files["blip2"])

    media = root / "videos"
    media.mkdir()
    # a landscape clip, a portrait one and a short square one: the resize and crop rules see
    # both orientations
    for i, (w, h, seconds) in enumerate([(640, 360, 3), (360, 480, 2), (256, 256, 1)]):
        data.write_test_clip(str(media / f"yt{i}.mp4"), seconds, w, h, seed=i)
    records = [{"id": f"yt{i}", "instance_id": i, "sound_mplug": c} for i, c in enumerate(CAPTIONS)]
    for split, recs in (("train", records), ("val", records[:1]), ("test", records[1:2])):
        with open(root / f"{split}.json", "w") as f:
            json.dump(recs, f)
    files["root"], files["media"] = str(root), str(media)
    yield files
    shutil.rmtree(root)  # about 4 GB of weights: not left for pytest's kept temp folders


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args, "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_paper_setting_trains_saves_and_captions(paper_files, tmp_path, capsys):
    """Two training steps at batch 2 with the paper's recipe (frozen video patch dropout, no
    modality dropout, the caption from `sound_mplug`), validation, best.pth, the test split;
    then sample.py with our checkpoint and with the authors'."""
    f = paper_files
    out = str(tmp_path / "caption")
    losses = train_caption.main([
        "--preset", "full", "--data-dir", f["media"], "--train-ann", os.path.join(f["root"], "train.json"),
        "--val-ann", os.path.join(f["root"], "val.json"), "--test-ann", os.path.join(f["root"], "test.json"),
        "--video-encoder", f["video"], "--audio-encoder", f["audio"], "--bert", f["bert"], "--blip2", f["blip2"],
        "--batch-size", "2", "--max-steps", "2", "--eval-every", "2", "--num-workers", "0",
        "--device", "cpu", "--out-dir", out])
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    said = capsys.readouterr().out
    assert "caption field: 'sound_mplug'" in said  # the authors' caption, chosen and announced
    assert "--frozen-patch-dropout on\n" in said and "--modality-dropout 0\n" in said  # the paper's recipe
    assert os.path.exists(os.path.join(out, "best.pth"))
    with open(os.path.join(out, "metrics.json")) as fh:
        assert json.load(fh)["test"]["clips"] == 1

    clip = os.path.join(f["media"], "yt0.mp4")
    pictures = tmp_path / "pictures"  # and where each word came from, at the paper's sizes
    r = run_sample("--video", clip, "--ckpt", os.path.join(out, "best.pth"), "--max-length", "6",
                   "--explain", str(pictures))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    assert (pictures / "yt0.mp4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the authors' checkpoint_N.pth: their trainer's five keys, their run config, and the frozen
    # encoders' persistent buffers beside the trained weights
    authors = str(tmp_path / "checkpoint_9.pth")
    torch.save(official.authors_stage2_file(M.full_config()), authors)
    r = run_sample("--video", clip, "--ckpt", authors, "--preset", "full", "--bert", f["bert"],
                   "--video-encoder", f["video"], "--audio-encoder", f["audio"], "--max-length", "6")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1


def test_retrieval_objectives_and_evaluation_at_full_size(paper_files):
    """BLIP-2's retrieval heads at the paper's shapes, from its official-layout file: loaded, not
    re-initialised; the caption + ITC + ITM loss from encoder tokens of the full shapes (the
    towers are test_paper_setting's part; test_retrieval.py checks the gradients, at the tiny
    size); then the evaluation's ITC ranking and ITM re-ranking of the same two clips."""
    f = paper_files
    cfg = M.full_config()
    torch.manual_seed(0)
    net = M.UniQ4Cap(cfg, encoders=False)
    P.load_pretrained(net, blip2=f["blip2"])  # (BERT's part is test_paper_setting's)
    blip2 = torch.load(f["blip2"], weights_only=True)["model"]
    for name in ("vision_proj.weight", "text_proj.weight", "itm_head.weight", "temp"):
        assert torch.equal(net.state_dict()[name], blip2[name]), name
    tokenizer = data.Tokenizer.from_bert(f["bert"])
    ids, mask = tokenizer.encode(CAPTIONS[:2], cfg.max_text_len)
    tokens = {"video_tokens": torch.randn(2, cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width),
              "audio_tokens": torch.randn(2, cfg.audio.tokens_per_frame, cfg.audio.width)}
    objective = train_caption.CaptionAndRetrieval(net, 1.0, 1.0, tokenizer.cls_id, seed=0)
    with torch.no_grad():
        loss, logged = objective(ids, mask, torch.tensor([[0, 10], [1, 11]]), **tokens)
        assert torch.isfinite(loss) and set(logged) == {"lm", "itc", "itm"}
        memory, memory_mask = net.eval().memory(**tokens)
        _, queries = net.Qformer.read_memory(net.query_tokens, memory, memory_mask, outputs=True)
        sim = retrieve.itc_similarity(retrieve.text_features(net, tokenizer, CAPTIONS[:2], "cpu", nullcontext()),
                                      net.clip_features(queries))  # (2 texts, 2 clips)
        memory_of = lambda rows: (memory[rows], torch.ones(len(rows), memory.size(1), dtype=torch.bool))
        t2c, c2t = retrieve.rerank(net, sim, CAPTIONS[:2], memory_of, tokenizer, "cpu", nullcontext(), k=1)
    assert ((t2c > -100).sum(dim=1) == 1).all() and ((c2t > -100).sum(dim=1) == 1).all()
