"""Every official checkpoint loads by name mapping: values land where they should at tiny
sizes, the full preset's whole key set and shapes match on the meta device, and a bad file
fails with a message naming the key."""

import pytest
import torch

import model as M
from tests import official_checkpoints as official


@pytest.fixture
def cfg():
    return M.tiny_config()


def fresh(cfg):
    torch.manual_seed(1)
    return M.UniQ4Cap(cfg).eval()


def test_languagebind_video_conv2d_becomes_conv3d(cfg, tmp_path):
    sd = official.make(official.languagebind(cfg.video))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = fresh(cfg)
    M.load_languagebind(model.video_encoder, str(tmp_path / "pytorch_model.bin"))
    emb = model.video_encoder.embeddings
    assert torch.equal(emb.patch_embedding.weight[:, :, 0], sd["vision_model.embeddings.patch_embedding.weight"])
    assert torch.equal(emb.class_embedding, sd["vision_model.embeddings.class_embedding"].expand(cfg.video.num_frames, -1))
    layer = model.video_encoder.encoder.layers[1]
    assert torch.equal(layer.temporal_attn.k_proj.weight, sd["vision_model.encoder.layers.1.temporal_attn.k_proj.weight"])
    assert torch.equal(model.video_encoder.visual_projection.weight, sd["visual_projection.weight"])


def test_conv3d_with_tube_size_one_is_the_conv2d():
    """Why the HF Conv2d weight can be unsqueezed into the authors' Conv3d."""
    conv2d = torch.nn.Conv2d(3, 8, 4, 4, bias=False)
    conv3d = torch.nn.Conv3d(3, 8, (1, 4, 4), (1, 4, 4), bias=False)
    conv3d.weight.data = conv2d.weight.data.unsqueeze(2)
    video = torch.randn(2, 3, 5, 16, 16)
    frames = conv2d(video.transpose(1, 2).reshape(10, 3, 16, 16)).view(2, 5, 8, 4, 4).transpose(1, 2)
    torch.testing.assert_close(conv3d(video), frames)


def test_image_positions_are_interpolated_to_the_audio_grid(cfg):
    """An image CLIP (square grid) meets the audio tower's (mel, time) grid: the class position
    is kept and a constant field stays constant under bicubic interpolation."""
    shapes = official.authors_encoder(cfg.audio)
    shapes["embeddings.position_embedding.weight"] = (1 + 4 * 4, cfg.audio.width)
    sd = official.make(shapes)
    pos = torch.full((17, cfg.audio.width), 0.5)
    pos[0] = 7.0
    sd["embeddings.position_embedding.weight"] = pos
    model = fresh(cfg)
    M.map_encoder(model.audio_encoder, sd, "image-clip")
    got = model.audio_encoder.embeddings.position_embedding.weight
    assert got.shape == (cfg.audio.tokens_per_frame, cfg.audio.width)
    assert torch.all(got[0] == 7.0)
    torch.testing.assert_close(got[1:], torch.full_like(got[1:], 0.5))


def test_authors_encoders_round_trip_the_function(cfg, tmp_path):
    """video.pth / audio.pth written from one model and read into another give the same
    outputs (this is also how train_align.py hands its encoders to stage 2)."""
    a, b = fresh(cfg), M.UniQ4Cap(cfg).eval()
    torch.save(a.video_encoder.state_dict(), tmp_path / "video.pth")
    torch.save(a.audio_encoder.state_dict(), tmp_path / "audio.pth")
    M.load_encoder(b.video_encoder, str(tmp_path / "video.pth"))
    M.load_encoder(b.audio_encoder, str(tmp_path / "audio.pth"))
    video = torch.randn(2, 3, cfg.video.num_frames, *cfg.video.image_size)
    audio = torch.randn(2, 3, *cfg.audio.image_size)
    torch.testing.assert_close(a.video_encoder(video)[0], b.video_encoder(video)[0])
    torch.testing.assert_close(a.audio_encoder(audio)[1], b.audio_encoder(audio)[1])
    # and the official names are exactly ours
    assert set(a.video_encoder.state_dict()) == set(official.authors_encoder(cfg.video))


@pytest.mark.parametrize("fmt", ["bin-gamma-beta", "safetensors-weight-bias"])
def test_bert_base_cased(cfg, tmp_path, fmt):
    sd = official.make(official.bert(cfg.qformer, old_names=fmt.startswith("bin")))
    if fmt.startswith("bin"):
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    model = fresh(cfg)
    M.load_bert(model, str(path))
    q = model.Qformer
    g = "gamma" if fmt.startswith("bin") else "weight"
    words = sd["bert.embeddings.word_embeddings.weight"]
    table = q.bert.embeddings.word_embeddings.weight
    assert table.size(0) == words.size(0) + 1  # the [DEC] row
    assert torch.equal(table[:-1], words) and 0.005 < table[-1].std() < 0.05
    assert q.cls.predictions.decoder.weight is table  # tied
    assert q.cls.predictions.bias[-1] == 0
    assert torch.equal(q.bert.embeddings.LayerNorm.weight, sd[f"bert.embeddings.LayerNorm.{g}"])
    layer = q.bert.encoder.layer[1]
    assert torch.equal(layer.attention.self.value.weight, sd["bert.encoder.layer.1.attention.self.value.weight"])
    # the query FFN starts as a copy of the text FFN
    assert torch.equal(layer.intermediate_query.dense.weight, sd["bert.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(layer.output_query.LayerNorm.bias, sd[f"bert.encoder.layer.1.output.LayerNorm.{'beta' if g == 'gamma' else 'bias'}"])


def test_blip2_qformer_tiles_queries_and_skips_embeddings(cfg, tmp_path):
    sd = official.make(official.blip2(cfg.qformer))
    torch.save({"model": sd}, tmp_path / "blip2_pretrained.pth")
    model = fresh(cfg)
    words_before = model.Qformer.bert.embeddings.word_embeddings.weight.clone()
    M.load_blip2(model, str(tmp_path / "blip2_pretrained.pth"))
    half = cfg.qformer.num_query_tokens // 2
    q = model.query_tokens
    assert torch.equal(q[:, :half], sd["query_tokens"]) and torch.equal(q[:, half:], sd["query_tokens"])
    cross = model.Qformer.bert.encoder.layer[0].crossattention.self.key.weight
    assert torch.equal(cross, sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(model.Qformer.bert.embeddings.word_embeddings.weight, words_before)
    assert torch.equal(model.itm_head.weight, sd["itm_head.weight"])
    noisy = fresh(cfg)
    M.load_blip2(noisy, str(tmp_path / "blip2_pretrained.pth"), query_noise=0.01)
    assert not torch.equal(noisy.query_tokens[:, :half], noisy.query_tokens[:, half:])


def test_stage2_checkpoint_reproduces_the_model(cfg, tmp_path):
    a, b = fresh(cfg), M.UniQ4Cap(cfg).eval()
    torch.save({"model": M.stage2_state_dict(a), "optimizer": {}, "epoch": 3}, tmp_path / "checkpoint_3.pth")
    M.load_stage2(b, str(tmp_path / "checkpoint_3.pth"))
    b.video_encoder.load_state_dict(a.video_encoder.state_dict())
    b.audio_encoder.load_state_dict(a.audio_encoder.state_dict())
    video = torch.randn(2, 3, cfg.video.num_frames, *cfg.video.image_size)
    audio = torch.randn(2, 3, *cfg.audio.image_size)
    ids = torch.tensor([[cfg.qformer.bos_token_id, 9, 10, cfg.qformer.sep_token_id]] * 2)
    torch.testing.assert_close(a(video, audio, ids)[0], b(video, audio, ids)[0])
    # our names are the official ones; decoder.bias is an alias of predictions.bias in HF's BERT
    assert set(M.stage2_state_dict(a)) == set(official.stage2(cfg)) - {"Qformer.cls.predictions.decoder.bias"}


def test_full_preset_key_sets_and_shapes_on_meta():
    """Every loader against the paper's shapes, on the meta device (no memory spent)."""
    cfg = M.full_config()
    with torch.device("meta"):
        model = M.UniQ4Cap(cfg)
    assert cfg.audio.tokens_per_frame == 593 and cfg.video.tokens_per_frame == 257
    M.map_encoder(model.video_encoder, official.make(official.authors_encoder(cfg.video), "meta"), "video.pth")
    M.map_encoder(model.audio_encoder, official.make(official.authors_encoder(cfg.audio), "meta"), "audio.pth")
    lb = {k[len("vision_model."):]: v for k, v in official.make(official.languagebind(cfg.video), "meta").items()
          if k.startswith("vision_model.")}
    M.map_encoder(model.video_encoder, lb, "LanguageBind_Video_FT")
    image_clip = official.authors_encoder(cfg.audio)
    image_clip["embeddings.position_embedding.weight"] = (257, 1024)  # a plain image ViT-L/14
    M.map_encoder(model.audio_encoder, official.make(image_clip, "meta"), "CLIP ViT-L/14")
    bert = official.bert(cfg.qformer)
    assert bert["bert.embeddings.word_embeddings.weight"] == (28996, 768)
    M.map_bert(model, official.make(bert, "meta"))
    blip2 = official.blip2(cfg.qformer)
    assert blip2["query_tokens"] == (1, 32, 768)
    assert blip2["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (768, 1408)
    M.map_blip2(model, official.make(blip2, "meta"))
    M.map_stage2(model, official.make(official.stage2(cfg), "meta"))


def test_missing_key_is_named(cfg):
    sd = official.make(official.authors_encoder(cfg.audio))
    del sd["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match="encoder.layers.1.mlp.fc2.bias"):
        M.map_encoder(fresh(cfg).audio_encoder, sd, "audio.pth")


def test_wrong_shape_is_named_with_both_shapes(cfg):
    sd = official.make(official.stage2(cfg))
    sd["video_project.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"video_project.weight.*expected \(96, 64\), found \(3, 3\)"):
        M.map_stage2(fresh(cfg), sd)


def test_unexpected_key_is_named(cfg):
    sd = official.make(official.bert(cfg.qformer))
    sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="rotary"):
        M.map_bert(fresh(cfg), sd)


def test_unexpected_languagebind_key_is_named(cfg, tmp_path):
    sd = official.make(official.languagebind(cfg.video))
    sd["audio_model.stray.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match="audio_model.stray.weight"):
        M.load_languagebind(fresh(cfg).video_encoder, str(tmp_path / "pytorch_model.bin"))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        M.read_state_dict(str(tmp_path / "nothing.pth"))
