"""Retrieval from the unified queries (retrieve.py, metrics.retrieval_ranks): a query's rank is
that of its best-ranked relevant candidate, re-ranking by the matching head touches only each
query's top k, and a gallery of real files handles a clip with several captions, a clip without
sound, an unreadable file, and a gallery with nothing readable."""

import contextlib
import json

import pytest
import torch

import data
import metrics
import model as M
import retrieve
import train_caption


def test_rank_is_that_of_the_best_ranked_relevant_candidate():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    relevant = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert metrics.retrieval_ranks(scores, relevant).tolist() == [2, 4]
    summary = metrics.recall_summary(torch.tensor([1, 2, 4, 20]))
    assert (summary["R@1"], summary["R@5"], summary["R@10"]) == (0.25, 0.75, 0.75)
    assert summary["median rank"] == 3.0 and summary["mean rank"] == 6.75


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Six embedded clips; the first has a second caption, one clip has no soundtrack, one
    file is not a video."""
    root = tmp_path_factory.mktemp("gallery")
    data.make_embedded_dataset(str(root), {"test": 6}, workers=1, progress=False)
    with open(root / "test.json") as f:
        records = json.load(f)
    records.append(dict(records[0], caption="a second caption of the first clip"))
    data.write_test_clip(str(root / "silent.mp4"), seconds=2, width=64, height=64, audio=False)
    records.append(dict(records[1], id="silent", caption="a clip without sound"))
    (root / "broken.mp4").write_bytes(b"not a video")
    records.append(dict(records[2], id="broken", caption="an unreadable file"))
    with open(root / "ann.json", "w") as f:
        json.dump(records, f)
    return root


def tiny_model(captions):
    torch.manual_seed(0)
    tok = data.Tokenizer.train(captions, 200)
    return M.UniQ4Cap(tok.configure(M.tiny_config())).eval(), tok


def test_a_gallery_of_real_files_is_ranked_against_every_reference(gallery):
    ds = data.AVCaptionDataset(str(gallery / "ann.json"), str(gallery), data.MediaConfig.from_model(M.tiny_config()),
                               by_clip=True)
    net, tok = tiny_model([c for refs in ds.references.values() for c in refs])
    out = retrieve.evaluate(net, ds, ds.references, tok, torch.device("cpu"), contextlib.nullcontext(),
                            batch_size=3, cached=False, k=3)
    assert out["clips"] == 7 and out["skipped"] == 1  # the silent clip is ranked, the broken file left out
    readable = [r for r in ds.records if r["id"] != "broken"]
    assert out["texts"] == len({c for r in readable for c in ds.references[r["id"]]})
    for key, value in out.items():
        if "R@" in key:
            assert 0.0 <= value <= 1.0, key
        elif "rank" in key and "ITM" in key:
            assert 1.0 <= value <= min(out["k"], out["texts"], out["clips"]) + 1, key  # past the top k, a tie at -100


def test_a_gallery_with_nothing_readable_says_so(gallery, tmp_path):
    with open(tmp_path / "ann.json", "w") as f:
        json.dump([{"id": "broken", "caption": "an unreadable file"}], f)
    ds = data.AVCaptionDataset(str(tmp_path / "ann.json"), str(gallery), data.MediaConfig.from_model(M.tiny_config()),
                               by_clip=True)
    net, tok = tiny_model(["an unreadable file"])
    with pytest.raises(data.UnreadableClips, match=r"no readable clip .*\(1 of 1 unreadable\)"):
        retrieve.evaluate(net, ds, ds.references, tok, torch.device("cpu"), contextlib.nullcontext(), 2, cached=False)


def test_reranking_reorders_only_each_querys_top_k_by_itm_plus_itc():
    net, tok = tiny_model(["a red circle", "a blue cross", "a green triangle"])
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(5, 7, net.cfg.qformer.encoder_width, generator=g)
    texts = ["a red circle", "a blue cross", "a green triangle"]
    sim = torch.rand(3, 5, generator=g)

    def memory_of(indices):
        return memory[indices], torch.ones(len(indices), 7, dtype=torch.bool)

    t2c, c2t = retrieve.rerank(net, sim, texts, memory_of, tok, torch.device("cpu"), contextlib.nullcontext(), k=2)
    ids, mask = retrieve.text_ids(tok, texts)
    itm = torch.stack([net.match_logits(memory, torch.ones(5, 7, dtype=torch.bool), ids[t].expand(5, -1),
                                        mask[t].expand(5, -1))[:, 1] for t in range(3)]).detach()  # (3, 5)
    for t in range(3):
        top = set(sim[t].topk(2).indices.tolist())
        for c in range(5):
            expected = itm[t, c] + sim[t, c] if c in top else torch.tensor(-100.0)
            torch.testing.assert_close(t2c[t, c], expected, atol=1e-5, rtol=0)
    for c in range(5):
        top = set(sim[:, c].topk(2).indices.tolist())
        assert {t for t in range(3) if c2t[c, t] > -100} == top


def test_zero_shot_reads_the_attributes_of_the_best_matching_caption():
    """Clip features equal to their own caption's text feature are classified right on every
    attribute: the classes are all 192 captions, and the answer is read back from the best."""
    records = [{"attributes": {"shape": s, "colour": c, "motion": m, "background": b}}
               for s, c, m, b in [("circle", "red", "up", "rain"), ("cross", "blue", "away", "silence"),
                                  ("triangle", "yellow", "closer", "birds")]]
    captions = [data.captions_for(r["attributes"])["caption"] for r in records]
    net, tok = tiny_model(captions)
    own = retrieve.text_features(net, tok, captions, torch.device("cpu"), contextlib.nullcontext())  # (3, E)
    acc = retrieve.zero_shot_attributes(net, tok, own[:, None, :], records, torch.device("cpu"),
                                        contextlib.nullcontext())
    assert acc == {"shape": 1.0, "colour": 1.0, "motion": 1.0, "background": 1.0}


def test_the_command_ranks_a_folder_and_a_second_query_decodes_nothing(gallery, tmp_path, capsys):
    """retrieve.py --video DIR --text ...: JSON Lines with each text's ranked videos, what is
    not a video named on stderr; the clip features are stored, so a second query computes
    none; a named file that cannot be read is an error line and exit code 1, the rest still
    ranked."""
    ds = data.AVCaptionDataset(str(gallery / "ann.json"), str(gallery), data.MediaConfig.from_model(M.tiny_config()),
                               by_clip=True)
    net, tok = tiny_model([c for refs in ds.references.values() for c in refs])
    encoders = {name: str(tmp_path / f"{name}.pth") for name in ("video", "audio")}
    torch.save(net.video_encoder.state_dict(), encoders["video"])
    torch.save(net.audio_encoder.state_dict(), encoders["audio"])
    torch.save(train_caption.model_state(net, tok, encoders, str(tmp_path)), tmp_path / "best.pth")
    argv = ["--ckpt", str(tmp_path / "best.pth"), "--num-workers", "0", "--device", "cpu", "--top", "3",
            "--rerank-k", "2", "--out", str(tmp_path / "ranks.jsonl")]
    assert retrieve.main(argv + ["--video", str(gallery), "--text", "a red circle", "--text", "rain"]) == 0
    err = capsys.readouterr().err
    assert "skipped, not readable as a video: " + str(gallery / "broken.mp4") in err
    assert "0 of 7 files' features were stored, 7 computed now" in err
    with open(tmp_path / "ranks.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["text"] for line in lines] == ["a red circle", "rain"]
    assert all(len(line["videos"]) == 3 for line in lines)
    assert all(v["score"] is not None for line in lines for v in line["videos"][:2])  # the top 2, re-ranked
    assert retrieve.main(argv + ["--video", str(gallery), str(gallery / "broken.mp4"), "--text", "a blue cross"]) == 1
    err = capsys.readouterr().err
    assert "7 of 8 files' features were stored, 0 computed now, 1 unreadable" in err and "error: " in err


def test_the_retrieval_objectives_train_every_head_and_leave_nothing_without_a_gradient():
    """caption + ITC + ITM: BLIP-2's heads, the temperature and the last layer's query path (which
    captioning never reaches) get gradients; under DDP a trained parameter without one would stop
    the run."""
    net, tok = tiny_model(["a red circle", "a blue cross", "a green triangle", "rain"])
    cfg = net.cfg
    objective = train_caption.CaptionAndRetrieval(net.train(), 1.0, 1.0, tok.cls_id, seed=0)
    ids, mask = tok.encode(["a red circle", "a blue cross", "a green triangle", "rain"], cfg.max_text_len)
    g = torch.Generator().manual_seed(0)
    tokens = {"video_tokens": torch.randn(4, cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width,
                                          generator=g),
              "audio_tokens": torch.randn(4, cfg.audio.tokens_per_frame, cfg.audio.width, generator=g)}
    loss, _ = objective(ids, mask, torch.tensor([[i, 10 + i] for i in range(4)]), **tokens)
    loss.backward()
    trained = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    assert {"temp", "vision_proj.weight", "text_proj.weight", "itm_head.weight"} <= {name for name, _ in trained}
    missing = [name for name, p in trained if p.grad is None]
    assert not missing, missing
