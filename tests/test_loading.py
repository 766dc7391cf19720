"""Every official checkpoint loads by name mapping: values land where they should at tiny
sizes, the full preset's whole key set and shapes match on the meta device, and a bad file
fails with a message naming the key. Each real file layout has a test (buffers, the Conv3d
LanguageBind variant, bare and head-less BERT files, the authors' five-key stage-2 file);
public names resolve offline through a pre-populated Hugging Face cache and a file:// URL
in torch.hub's cache; a truncated file is one error line naming it."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import model as M
import pretrained as P
import train_caption
import training as T
from tests import official_checkpoints as official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    P.load_pretrained(model, video=str(tmp_path / "pytorch_model.bin"))
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
    P.map_encoder(model.audio_encoder, sd, "image-clip")
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
    P.load_pretrained(b, video=str(tmp_path / "video.pth"), audio=str(tmp_path / "audio.pth"))
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
    P.load_bert(model, str(path))
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
    P.load_blip2(model, str(tmp_path / "blip2_pretrained.pth"))
    half = cfg.qformer.num_query_tokens // 2
    q = model.query_tokens
    assert torch.equal(q[:, :half], sd["query_tokens"]) and torch.equal(q[:, half:], sd["query_tokens"])
    cross = model.Qformer.bert.encoder.layer[0].crossattention.self.key.weight
    assert torch.equal(cross, sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(model.Qformer.bert.embeddings.word_embeddings.weight, words_before)
    assert torch.equal(model.itm_head.weight, sd["itm_head.weight"])
    noisy = fresh(cfg)
    P.load_blip2(noisy, str(tmp_path / "blip2_pretrained.pth"), query_noise=0.01)
    assert not torch.equal(noisy.query_tokens[:, :half], noisy.query_tokens[:, half:])


def test_stage2_checkpoint_reproduces_the_model(cfg, tmp_path):
    a, b = fresh(cfg), M.UniQ4Cap(cfg).eval()
    torch.save({"model": P.stage2_state_dict(a), "optimizer": {}, "epoch": 3}, tmp_path / "checkpoint_3.pth")
    P.load_stage2(b, str(tmp_path / "checkpoint_3.pth"))
    b.video_encoder.load_state_dict(a.video_encoder.state_dict())
    b.audio_encoder.load_state_dict(a.audio_encoder.state_dict())
    video = torch.randn(2, 3, cfg.video.num_frames, *cfg.video.image_size)
    audio = torch.randn(2, 3, *cfg.audio.image_size)
    ids = torch.tensor([[cfg.qformer.bos_token_id, 9, 10, cfg.qformer.sep_token_id]] * 2)
    torch.testing.assert_close(a(video, audio, ids)[0], b(video, audio, ids)[0])
    # our names are the official ones; decoder.bias is an alias of predictions.bias in HF's BERT,
    # and the authors' file also carries buffers this model recomputes
    assert set(P.stage2_state_dict(a)) == (set(official.stage2(cfg)) - {"Qformer.cls.predictions.decoder.bias"}
                                           - set(official.STAGE2_BUFFERS))


def test_full_preset_key_sets_and_shapes_on_meta(capsys):
    """Every loader against the paper's shapes, on the meta device (no memory spent)."""
    cfg = M.full_config()
    with torch.device("meta"):
        model = M.UniQ4Cap(cfg)
    assert cfg.audio.tokens_per_frame == 593 and cfg.video.tokens_per_frame == 257
    P.map_encoder(model.video_encoder, official.make(official.authors_encoder(cfg.video), "meta"), "video.pth")
    P.map_encoder(model.audio_encoder, official.make(official.authors_encoder(cfg.audio), "meta"), "audio.pth")
    for conv3d in (False, True):
        P.map_languagebind(model.video_encoder, official.make(official.languagebind(cfg.video, conv3d), "meta"))
    P.map_languagebind(model.audio_encoder, official.make(official.languagebind(cfg.audio), "meta"))
    image_clip = official.authors_encoder(cfg.audio)
    image_clip["embeddings.position_embedding.weight"] = (257, 1024)  # a plain image ViT-L/14
    P.map_encoder(model.audio_encoder, official.make(image_clip, "meta"), "CLIP ViT-L/14")
    bert = official.bert(cfg.qformer)
    assert bert["bert.embeddings.word_embeddings.weight"] == (28996, 768)
    P.map_bert(model, official.make(bert, "meta"))
    assert "bert.encoder.layer.{0,2,4,6,8,10}.crossattention (new in BERT" in capsys.readouterr().err
    P.map_bert(model, official.make(official.bert(cfg.qformer, prefix=""), "meta"))
    blip2 = official.blip2(cfg.qformer)
    assert blip2["query_tokens"] == (1, 32, 768)
    assert blip2["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (768, 1408)
    P.map_blip2(model, official.make(blip2, "meta"))
    P.map_stage2(model, official.authors_stage2_file(cfg, "meta")["model"])


def test_missing_key_is_named(cfg):
    sd = official.make(official.authors_encoder(cfg.audio))
    del sd["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match="encoder.layers.1.mlp.fc2.bias"):
        P.map_encoder(fresh(cfg).audio_encoder, sd, "audio.pth")


def test_wrong_shape_is_named_with_both_shapes(cfg):
    sd = official.make(official.stage2(cfg))
    sd["video_project.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"video_project.weight.*expected \(96, 64\), found \(3, 3\)"):
        P.map_stage2(fresh(cfg), sd)


def test_unexpected_key_is_named(cfg):
    sd = official.make(official.bert(cfg.qformer))
    sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="rotary"):
        P.map_bert(fresh(cfg), sd)


def test_unexpected_languagebind_key_is_named(cfg, tmp_path):
    sd = official.make(official.languagebind(cfg.video))
    sd["audio_model.stray.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match="audio_model.stray.weight"):
        P.load_pretrained(fresh(cfg), video=str(tmp_path / "pytorch_model.bin"))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        P.read_state_dict(str(tmp_path / "nothing.pth"))


# -----------------------------------------------------------------------------
# Every real layout: buffers, variants, the authors' whole stage-2 file


def test_authors_stage2_file_loads_with_its_buffers(cfg, tmp_path):
    """Their checkpoint_N.pth: five top-level keys ("config" is their run configuration) and
    the frozen parts' position_ids buffers, which this model recomputes."""
    ckpt = official.authors_stage2_file(cfg)
    assert set(ckpt) == {"model", "optimizer", "config", "scaler", "epoch"}
    assert set(official.STAGE2_BUFFERS) <= set(ckpt["model"])
    torch.save(ckpt, tmp_path / "checkpoint_9.pth")
    model = fresh(cfg)
    P.load_stage2(model, str(tmp_path / "checkpoint_9.pth"))
    sd = ckpt["model"]
    assert torch.equal(model.query_tokens, sd["query_tokens"])
    assert torch.equal(model.audio_project.weight, sd["audio_project.weight"])
    assert torch.equal(model.Qformer.bert.encoder.layer[1].output_query.dense.weight,
                       sd["Qformer.bert.encoder.layer.1.output_query.dense.weight"])


def test_stage2_stays_strict_about_parameters(cfg):
    """Only buffers are forgiven: a parameter with no place here is still an error naming it."""
    sd = official.authors_stage2_file(cfg)["model"]
    sd["Qformer.bert.embeddings.token_type_embeddings.weight"] = torch.zeros(2, cfg.qformer.hidden)
    with pytest.raises(KeyError, match="token_type_embeddings"):
        P.map_stage2(fresh(cfg), sd)


def test_languagebind_file_already_in_conv3d_form(cfg, tmp_path):
    """LanguageBind expands the patch embedding to 3-D before training, so a file may hold the
    Conv3d weight and a class vector per frame already: they load as they are."""
    sd = official.make(official.languagebind(cfg.video, conv3d=True))
    assert sd["vision_model.embeddings.patch_embedding.weight"].dim() == 5
    assert "vision_model.embeddings.position_ids" in sd and "text_model.embeddings.position_ids" in sd
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = fresh(cfg)
    P.load_pretrained(model, video=str(tmp_path / "pytorch_model.bin"))
    emb = model.video_encoder.embeddings
    assert torch.equal(emb.patch_embedding.weight, sd["vision_model.embeddings.patch_embedding.weight"])
    assert torch.equal(emb.class_embedding, sd["vision_model.embeddings.class_embedding"])


def test_bare_bert_model_without_the_bert_prefix_loads(cfg, tmp_path, capsys):
    """BertModel.save_pretrained / sentence-transformers: `embeddings.*`, `encoder.*`,
    `pooler.*` and no heads at all."""
    from safetensors.torch import save_file
    sd = official.make(official.bert(cfg.qformer, old_names=False, prefix=""))
    assert not any(k.startswith(("bert.", "cls.")) for k in sd) and "embeddings.position_ids" in sd
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = fresh(cfg)
    P.load_bert(model, str(tmp_path))  # the folder
    q = model.Qformer
    assert torch.equal(q.bert.encoder.layer[1].attention.self.key.weight, sd["encoder.layer.1.attention.self.key.weight"])
    assert torch.equal(q.bert.embeddings.word_embeddings.weight[:-1], sd["embeddings.word_embeddings.weight"])
    assert "no MLM head" in capsys.readouterr().err


def test_bert_without_mlm_head_initialises_ties_and_says_so(cfg, tmp_path, capsys):
    sd = official.make(official.bert(cfg.qformer, mlm_head=False))
    assert "cls.seq_relationship.weight" in sd and not any(k.startswith("cls.predictions.") for k in sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = fresh(cfg)
    head = model.Qformer.cls.predictions
    with torch.no_grad():  # whatever was there before, the loader sets BERT's initialisation
        head.transform.LayerNorm.weight.fill_(3.0)
        head.bias.fill_(1.0)
    P.load_bert(model, str(tmp_path / "pytorch_model.bin"))
    assert head.decoder.weight is model.Qformer.bert.embeddings.word_embeddings.weight  # tied
    assert torch.equal(head.decoder.weight[:-1], sd["bert.embeddings.word_embeddings.weight"])
    assert torch.all(head.transform.LayerNorm.weight == 1) and torch.all(head.bias == 0)
    assert 0.01 < head.transform.dense.weight.std() < 0.03
    err = capsys.readouterr().err
    assert "no MLM head" in err and "cls.predictions" in err


def test_load_reports_name_what_each_file_leaves_to_other_sources(cfg, tmp_path, capsys):
    """bert-base-cased leaves the cross-attention of the layers that have one; BLIP-2 leaves
    the encoders, the new projections and what bert-base-cased provides."""
    torch.save(official.make(official.bert(cfg.qformer)), tmp_path / "pytorch_model.bin")
    model = fresh(cfg)
    P.load_bert(model, str(tmp_path / "pytorch_model.bin"))
    err = capsys.readouterr().err
    q = cfg.qformer
    assert q.layers == 2 and q.cross_attention_freq == 2  # tiny: cross-attention in layer 0 only
    assert "bert.encoder.layer.0.crossattention (new in BERT" in err
    assert "by design: bert" not in err
    torch.save({"model": official.make(official.blip2(cfg.qformer))}, tmp_path / "blip2_pretrained.pth")
    P.load_blip2(model, str(tmp_path / "blip2_pretrained.pth"))
    err = capsys.readouterr().err
    assert "video_encoder, audio_encoder (the encoder files)" in err
    assert "ln_video, ln_audio, video_project, audio_project (new in UniQ4Cap" in err
    assert "Qformer.bert.embeddings, Qformer.cls (from bert-base-cased" in err


# -----------------------------------------------------------------------------
# BERT's tokenizer settings


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_vocab(folder, words, config=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIALS + words) + "\n")
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(folder)


@pytest.mark.parametrize("config", [{"do_lower_case": True}, None], ids=["tokenizer_config", "inferred"])
def test_uncased_vocabulary_lower_cases_captions(tmp_path, config, capsys):
    """An uncased vocabulary (bert-base-uncased's kind) must not turn 'Dog' into [UNK]."""
    tok = data.Tokenizer.from_bert(bert_vocab(tmp_path / "uncased", ["a", "dog", "barks"], config))
    ids, _ = tok.encode(["A Dog barks"])
    assert tok.tok.token_to_id("[UNK]") not in ids[0].tolist()
    assert tok.decode(ids[0, 1:]) == "a dog barks"
    assert ("uncased: captions are lower-cased" in capsys.readouterr().err) == (config is None)


def test_cased_setting_keeps_case(tmp_path):
    tok = data.Tokenizer.from_bert(bert_vocab(tmp_path / "cased", ["a", "Dog", "dog"], {"do_lower_case": False}))
    ids, _ = tok.encode(["a Dog"])
    assert ids[0, 2] == tok.tok.token_to_id("Dog")


# -----------------------------------------------------------------------------
# Public names: the Hugging Face cache and torch.hub's cache, offline


def to_bytes(sd, fmt="bin"):
    if fmt == "safetensors":
        from safetensors.torch import save
        return save(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline HF cache with LanguageBind's two repos (pytorch_model.bin only, as
    published) and google-bert/bert-base-cased (model.safetensors, vocab.txt,
    tokenizer_config.json), for the tiny config. HF_HUB_CACHE / HF_HUB_OFFLINE are set for
    subprocesses and patched into huggingface_hub for this one (it reads them at import)."""
    from huggingface_hub import constants
    cache = str(tmp_path / "hf-cache")
    words = ["a", "dog", "barks", "red", "circle", "##s"]
    tok_folder = bert_vocab(tmp_path / "vocab", words, {"do_lower_case": False})
    cfg = data.Tokenizer.from_bert(tok_folder).configure(M.tiny_config())
    files = {"bert": official.make(official.bert(cfg.qformer, old_names=False), seed=1),
             "video": official.make(official.languagebind(cfg.video), seed=2),
             "audio": official.make(official.languagebind(cfg.audio), seed=3)}
    official.hf_cache(cache, "google-bert/bert-base-cased", {
        "model.safetensors": to_bytes(files["bert"], "safetensors"),
        "vocab.txt": open(os.path.join(tok_folder, "vocab.txt"), "rb").read(),
        "tokenizer_config.json": b'{"do_lower_case": false}'})
    official.hf_cache(cache, "LanguageBind/LanguageBind_Video_FT", {"pytorch_model.bin": to_bytes(files["video"])})
    official.hf_cache(cache, "LanguageBind/LanguageBind_Audio_FT", {"pytorch_model.bin": to_bytes(files["audio"])})
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {"cfg": cfg, "files": files, "cache": cache}


def test_hugging_face_names_resolve_from_the_cache(hub):
    model = M.UniQ4Cap(hub["cfg"])
    P.load_pretrained(model, video="LanguageBind/LanguageBind_Video_FT", audio="LanguageBind/LanguageBind_Audio_FT",
                      bert="google-bert/bert-base-cased")
    f = hub["files"]
    assert torch.equal(model.video_encoder.encoder.layers[0].temporal_attn.q_proj.weight,
                       f["video"]["vision_model.encoder.layers.0.temporal_attn.q_proj.weight"])
    assert torch.equal(model.audio_encoder.embeddings.position_embedding.weight,
                       f["audio"]["vision_model.embeddings.position_embedding.weight"])
    assert torch.equal(model.Qformer.bert.encoder.layer[0].output.dense.weight,
                       f["bert"]["bert.encoder.layer.0.output.dense.weight"])
    tok = data.Tokenizer.from_bert("google-bert/bert-base-cased")
    assert tok.vocab_size == hub["cfg"].qformer.vocab_size
    # the tokenizer folder is the snapshot the weights came from
    assert os.path.dirname(P.weights_file("google-bert/bert-base-cased")) == P.bert_folder("google-bert/bert-base-cased")


def test_unresolvable_name_is_one_clear_line(hub):
    with pytest.raises(FileNotFoundError, match=r"nobody/nothing: .*HF_HUB_OFFLINE is set") as e:
        P.weights_file("nobody/nothing")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"out/align/vidoe.pth: no such file or folder") as e:
        P.weights_file("out/align/vidoe.pth")  # a mistyped path is not looked up on the Hub
    with pytest.raises(FileNotFoundError, match="has no vocab.txt|HF_HUB_OFFLINE"):
        data.Tokenizer.from_bert("LanguageBind/LanguageBind_Video_FT")


def test_a_bare_legacy_name_resolves_but_a_file_name_is_not_looked_up(hub):
    """`--bert bert-base-cased`, the unqualified name the Hub still resolves, loads like
    google-bert/bert-base-cased; a name that looks like a file or a path is reported missing."""
    snapshot = P.bert_folder("google-bert/bert-base-cased")
    official.hf_cache(hub["cache"], "bert-base-cased", {
        f: open(os.path.join(snapshot, f), "rb").read() for f in ("model.safetensors", "vocab.txt", "tokenizer_config.json")})
    model = M.UniQ4Cap(hub["cfg"])
    P.load_pretrained(model, bert="bert-base-cased")
    assert torch.equal(model.Qformer.bert.encoder.layer[0].output.dense.weight,
                       hub["files"]["bert"]["bert.encoder.layer.0.output.dense.weight"])
    assert data.Tokenizer.from_bert("bert-base-cased").vocab_size == hub["cfg"].qformer.vocab_size
    with pytest.raises(FileNotFoundError, match=r"bert-base-uncased: .*HF_HUB_OFFLINE is set"):
        P.weights_file("bert-base-uncased")  # looked up, and not in the cache
    for name in ("video.pth", "vocab.txt", "bert-base-cased.bin", "out/caption/bert"):
        for resolve in (P.weights_file, P.bert_folder):
            with pytest.raises(FileNotFoundError) as e:
                resolve(name)
            assert str(e.value) == f"{name}: no such file or folder, and not a URL or a Hugging Face repo id"


def test_sample_names_every_flag_an_authors_checkpoint_needs(hub, tmp_path):
    """The authors' checkpoint_N.pth carries no tokenizer and no encoder names: the errors
    name the flags that fill them in, both encoders at once."""
    import sample
    torch.save(official.authors_stage2_file(hub["cfg"]), tmp_path / "checkpoint_9.pth")
    argv = ["--video", "clip.mp4", "--ckpt", str(tmp_path / "checkpoint_9.pth")]
    with pytest.raises(P.CheckpointError, match=r"carries no tokenizer, as the authors' checkpoint_N.pth: give "
                                                r"--preset and --bert \(and their encoders: --video-encoder"):
        T.load_captioner(sample.get_args(argv))
    argv += ["--preset", "tiny", "--bert", "google-bert/bert-base-cased"]
    with pytest.raises(P.CheckpointError) as e:
        T.load_captioner(sample.get_args(argv))
    assert str(e.value) == "no weights for the video and audio encoders: give --video-encoder and --audio-encoder"


def test_a_checkpoint_given_as_an_encoder_is_named_as_such(cfg, tmp_path):
    """`--video-encoder out/caption/best.pth`: a {"model": ...} file, not an encoder's state dict."""
    torch.save({"model": P.stage2_state_dict(fresh(cfg)), "config": {}}, tmp_path / "best.pth")
    with pytest.raises(P.CheckpointError, match=r"best.pth: a training or stage-2 checkpoint \(its weights under "
                                                r"'model'\), not an encoder's weights"):
        P.load_pretrained(fresh(cfg), video=str(tmp_path / "best.pth"))


def test_blip2_url_goes_through_torch_hubs_cache(cfg, tmp_path, monkeypatch):
    """A file:// URL is downloaded once into <TORCH_HOME>/hub/checkpoints; the short name
    `blip2` then finds BLIP-2's file there without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    sd = official.make(official.blip2(cfg.qformer))
    source = tmp_path / "published" / "blip2_pretrained.pth"
    source.parent.mkdir()
    torch.save({"model": sd}, source)
    model = fresh(cfg)
    P.load_pretrained(model, blip2=source.as_uri())
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "blip2_pretrained.pth"
    assert cached.exists() and torch.equal(model.itm_head.weight, sd["itm_head.weight"])

    def no_download(*a, **k):
        raise AssertionError("downloaded although the file is in torch.hub's cache")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    again = fresh(cfg)
    P.load_pretrained(again, blip2="blip2")
    assert torch.equal(again.itm_head.weight, sd["itm_head.weight"])


def test_sample_captions_with_the_authors_checkpoint_and_public_names(hub, tmp_path):
    """A new user's command: the authors' checkpoint_N.pth, encoders and BERT by name."""
    ckpt = official.authors_stage2_file(hub["cfg"])
    torch.save(ckpt, tmp_path / "checkpoint_9.pth")
    clip = str(tmp_path / "clip.mp4")
    data.write_clip(clip, np.zeros((8, 32, 32, 3), dtype=np.uint8), None)
    r = run(["sample.py", "--video", clip, "--ckpt", str(tmp_path / "checkpoint_9.pth"), "--preset", "tiny",
             "--bert", "google-bert/bert-base-cased", "--video-encoder", "LanguageBind/LanguageBind_Video_FT",
             "--audio-encoder", "LanguageBind/LanguageBind_Audio_FT", "--max-length", "4"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


# -----------------------------------------------------------------------------
# Truncated and corrupt files


def run(args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture
def truncated(cfg, tmp_path):
    model = fresh(cfg)
    torch.save({"model": P.stage2_state_dict(model)}, tmp_path / "best.pth")
    whole = (tmp_path / "best.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[:len(whole) // 2])
    return str(tmp_path / "truncated.pth")


def test_truncated_checkpoint_is_an_error_naming_the_file(truncated, tmp_path):
    with pytest.raises(P.CheckpointError, match=r"truncated.pth: cannot read this checkpoint") as e:
        P.read_state_dict(truncated)
    assert "\n" not in str(e.value)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(100)}, str(tmp_path / "model.safetensors"))
    whole = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(whole[:len(whole) - 10])
    with pytest.raises(P.CheckpointError, match="model.safetensors: cannot read"):
        P.read_state_dict(str(tmp_path / "model.safetensors"))


def test_sample_on_a_truncated_checkpoint_prints_one_line(truncated, tmp_path):
    clip = str(tmp_path / "clip.mp4")
    data.write_clip(clip, np.zeros((8, 32, 32, 3), dtype=np.uint8), None)
    r = run(["sample.py", "--video", clip, "--ckpt", truncated])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated.pth" in lines[0], r.stderr


@pytest.fixture
def two_clips(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps([{"id": "a", "caption": "a red circle"},
                                                        {"id": "b", "caption": "a blue square"}]))
    for clip in ("a", "b"):
        data.write_clip(str(root / f"{clip}.mp4"), np.zeros((8, 32, 32, 3), dtype=np.uint8), None)
    return str(root)


@pytest.mark.parametrize("flag", ["--resume", "--video-encoder"])
def test_train_caption_on_a_truncated_file_exits_2_with_one_line(two_clips, truncated, tmp_path, flag, capsys):
    args = ["--data-dir", two_clips, "--out-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "--no-cache-features", "--no-align",
            flag, truncated]
    with pytest.raises(SystemExit) as e:
        T.run_script(train_caption.main, args)  # what `python train_caption.py` runs
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "truncated.pth: cannot read this checkpoint" in errors[0]


def test_train_align_on_a_missing_encoder_exits_2_with_one_line(two_clips, tmp_path, capsys):
    import train_align
    with pytest.raises(SystemExit) as e:
        T.run_script(train_align.main, ["--data-dir", two_clips, "--out-dir", str(tmp_path / "out"),
                                        "--max-steps", "1", "--num-workers", "0", "--device", "cpu",
                                        "--video-init", str(tmp_path / "video.pth")])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "video.pth: no such file or folder" in errors[0]
