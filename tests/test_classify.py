"""Classification from the unified queries (classify.py): the linear probe separates what is
separable and picks its L2 weight on validation, mAP and top-k are the usual ones, and the
command runs on real files for single labels, zero-shot and probe."""

import json
import types

import pytest
import torch

import classify
import data
import model as M
import pretrained as P
import train_caption


def test_scores_are_top_k_for_one_label_and_map_for_several():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.7]])
    one = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    assert classify.scores(logits, one, multi_label=False) == pytest.approx({"top-1": 1 / 3, "top-5": 1.0})
    several = torch.tensor([[1.0, 0, 1.0], [0, 0, 1.0], [0, 1.0, 1.0]])
    # class 0: AP 1; class 1: AP 1; class 2 ranked 1, 2, 0 -> all three relevant: AP 1
    assert classify.scores(logits, several, multi_label=True)["mAP"] == pytest.approx(1.0)
    several[1, 2], several[1, 0] = 0.0, 1.0  # class 2's relevant clips now rank 1 and 3: AP (1 + 2/3) / 2
    assert classify.scores(logits, several, multi_label=True)["mAP"] == pytest.approx((1 + 1 + (1 + 2 / 3) / 2) / 3)


def test_linear_probe_separates_separable_features_and_picks_l2_on_validation():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=g)

    def split(n):
        y = torch.arange(n) % 4
        return centres[y] + torch.randn(n, 16, generator=g), torch.nn.functional.one_hot(y, 4).float()

    out = classify.linear_probe(split(80), split(40), split(40))
    assert out["top-1"] == 1.0 and out["l2"] in classify.L2_GRID


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    clips = root / "clips"
    data.make_embedded_dataset(str(clips), {"train": 12, "val": 6, "test": 6}, workers=1, progress=False)
    with open(clips / "train.json") as f:
        captions = [r["caption"] for r in json.load(f)]
    torch.manual_seed(0)
    tok = data.Tokenizer.train(captions, 200)
    net = M.UniQ4Cap(tok.configure(M.tiny_config())).eval()
    encoders = {name: str(root / f"{name}.pth") for name in ("video", "audio")}
    torch.save(net.video_encoder.state_dict(), encoders["video"])
    torch.save(net.audio_encoder.state_dict(), encoders["audio"])
    torch.save(train_caption.model_state(net, tok, encoders, str(root)), root / "best.pth")
    return root


@pytest.mark.parametrize("modalities", ["video+audio", "audio"])
def test_the_command_classifies_real_files_zero_shot_by_probe_and_fine_tuned(setup, modalities):
    out_path = setup / f"classify-{modalities}.json"
    assert classify.main(["--ckpt", str(setup / "best.pth"), "--data-dir", str(setup / "clips"), "--label",
                          "attributes.colour", "--zero-shot", "--probe", "--finetune", "--finetune-epochs", "2",
                          "--modalities", modalities,
                          "--num-workers", "0", "--device", "cpu", "--out", str(out_path)]) == 0
    with open(out_path) as f:
        out = json.load(f)
    colour = out["attributes.colour"]
    assert out["modalities"] == modalities and 1 <= colour["classes"] <= 4
    for method in ("zero-shot", "probe", "fine-tune"):
        assert 0.0 <= colour[method]["top-1"] <= colour[method]["top-5"] <= 1.0
    assert colour["probe"]["l2"] in classify.L2_GRID and colour["fine-tune"]["epoch"] in (1, 2)


def test_a_missing_label_field_is_a_clear_error(setup):
    with pytest.raises(data.DataError, match="no label field 'attributes.size'"):
        classify.main(["--ckpt", str(setup / "best.pth"), "--data-dir", str(setup / "clips"), "--label",
                       "attributes.size", "--zero-shot", "--num-workers", "0", "--device", "cpu"])


def test_the_floor_keeps_the_checkpoints_encoders_under_an_untrained_q_former():
    """--random-qformer: the same frozen towers, every stage-2 weight as a fresh model has it."""
    tok = data.Tokenizer.train(["a red circle", "a blue cross"], 200)
    cfg = tok.configure(M.tiny_config())
    trained = M.UniQ4Cap(cfg).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # stands for training
    floor = classify.untrained_reader(trained)
    assert floor.video_encoder is trained.video_encoder and floor.audio_encoder is trained.audio_encoder
    torch.manual_seed(0)
    fresh = M.UniQ4Cap(cfg, encoders=False)
    fresh_sd, floor_sd = P.stage2_state_dict(fresh), P.stage2_state_dict(floor)
    assert fresh_sd.keys() == floor_sd.keys() and all(torch.equal(fresh_sd[k], floor_sd[k]) for k in fresh_sd)


def test_fine_tuning_trains_a_copy_and_leaves_the_checkpoints_model_as_it_was():
    tok = data.Tokenizer.train(["a red circle", "a blue cross"], 200)
    cfg = tok.configure(M.tiny_config())
    torch.manual_seed(0)
    net = M.UniQ4Cap(cfg).eval()
    before = {k: t.clone() for k, t in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    N = 8
    towers = {"video_tokens": torch.randn(N, cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width,
                                          generator=g).half(),
              "audio_tokens": torch.randn(N, cfg.audio.tokens_per_frame, cfg.audio.width, generator=g).half(),
              "video_mask": None, "audio_mask": None}
    targets = torch.eye(2)[torch.arange(N) % 2]
    args = types.SimpleNamespace(seed=0, finetune_lr=1e-3, finetune_epochs=2, batch_size=4, device=torch.device("cpu"))
    out = classify.finetune(net, dict.fromkeys(("train", "val", "test"), towers), dict.fromkeys(("train", "val", "test"),
                                                                                                targets), args)
    assert out["epoch"] in (1, 2) and 0.0 <= out["top-1"] <= 1.0
    assert net.video_encoder is not None and net.audio_encoder is not None
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
