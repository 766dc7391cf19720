"""Synthetic state dicts with the official checkpoints' key names and shapes (the files listed in
pretrained.py's docstring), written out independently of model.py so the loaders are tested against the
files' names, not against our own. `make(shapes, device)` fills them: random values on the
CPU for tiny sizes, empty tensors on `meta` for the full preset; `position_ids` buffers are
int64 aranges, as HF saves them. `hf_cache` lays files out as huggingface_hub's cache does."""

import hashlib
import os

import torch


def make(shapes, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith("position_ids"):
            out[k] = torch.arange(s[-1], device=device).expand(s).clone()
        elif device == "meta":
            out[k] = torch.empty(s, device="meta")
        else:
            out[k] = torch.randn(s, generator=g) * 0.02
    return out


def clip_vision(cfg, prefix, video_hf=True):
    """LanguageBind / CLIP vision tower names. video_hf: the HF file's Conv2d patch weight and
    single class vector; otherwise the authors' Conv3d / per-frame variant."""
    D, p, C = cfg.width, cfg.patch_size, cfg.num_channels
    s = {}
    if cfg.temporal and not video_hf:
        s["embeddings.patch_embedding.weight"] = (D, C, 1, p, p)
        s["embeddings.class_embedding"] = (cfg.num_frames, D)
    else:
        s["embeddings.patch_embedding.weight"] = (D, C, p, p)
        s["embeddings.class_embedding"] = (D,)
    s["embeddings.position_embedding.weight"] = (cfg.tokens_per_frame, D)
    s["pre_layrnorm.weight"] = s["pre_layrnorm.bias"] = (D,)
    for i in range(cfg.layers):
        L = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[L + f"self_attn.{proj}.weight"] = (D, D)
            s[L + f"self_attn.{proj}.bias"] = (D,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[L + f"{ln}.weight"] = s[L + f"{ln}.bias"] = (D,)
        s[L + "mlp.fc1.weight"], s[L + "mlp.fc1.bias"] = (cfg.mlp_dim, D), (cfg.mlp_dim,)
        s[L + "mlp.fc2.weight"], s[L + "mlp.fc2.bias"] = (D, cfg.mlp_dim), (D,)
        if cfg.temporal:
            s[L + "temporal_embedding"] = (1, cfg.num_frames, D)
            s[L + "temporal_layer_norm1.weight"] = s[L + "temporal_layer_norm1.bias"] = (D,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                s[L + f"temporal_attn.{proj}.weight"] = (D, D)
                s[L + f"temporal_attn.{proj}.bias"] = (D,)
    s["post_layernorm.weight"] = s["post_layernorm.bias"] = (D,)
    return {prefix + k: v for k, v in s.items()}


def clip_text(text):
    """The text tower's names in LanguageBind's files (transformers' `CLIPTextModelWithProjection`),
    for a text config with width, layers, mlp_dim, vocab_size, max_positions and embed_dim."""
    D = text.width
    s = {"text_model.embeddings.token_embedding.weight": (text.vocab_size, D),
         "text_model.embeddings.position_embedding.weight": (text.max_positions, D),
         "text_model.embeddings.position_ids": (1, text.max_positions)}
    for i in range(text.layers):
        L = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[L + f"self_attn.{proj}.weight"], s[L + f"self_attn.{proj}.bias"] = (D, D), (D,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[L + f"{ln}.weight"] = s[L + f"{ln}.bias"] = (D,)
        s[L + "mlp.fc1.weight"], s[L + "mlp.fc1.bias"] = (text.mlp_dim, D), (text.mlp_dim,)
        s[L + "mlp.fc2.weight"], s[L + "mlp.fc2.bias"] = (D, text.mlp_dim), (D,)
    s["text_model.final_layer_norm.weight"] = s["text_model.final_layer_norm.bias"] = (D,)
    s["text_projection.weight"] = (text.embed_dim, D)
    return s


def languagebind(cfg, conv3d=False, text=None):
    """`pytorch_model.bin` of LanguageBind_Video_FT / LanguageBind_Audio_FT, with HF CLIP's
    position_ids buffers. text: the whole text tower at that config's shapes; without one, a
    few text-tower keys stand for it. conv3d: the video weights as saved after LanguageBind's
    expansion to 3-D (Conv3d patch weight and a class vector per frame)."""
    s = clip_vision(cfg, "vision_model.", video_hf=not conv3d)
    s["vision_model.embeddings.position_ids"] = (1, cfg.tokens_per_frame)
    s["visual_projection.weight"] = (cfg.embed_dim, cfg.width)
    if text is not None:
        s.update(clip_text(text))
    else:
        s["text_model.embeddings.position_ids"] = (1, 77)
        s["text_model.embeddings.token_embedding.weight"] = (49408, 8)
        s["text_model.final_layer_norm.weight"] = (8,)
        s["text_projection.weight"] = (cfg.embed_dim, 8)
    s["logit_scale"] = ()
    return s


def authors_encoder(cfg):
    """The authors' `video.pth` / `audio.pth`."""
    s = clip_vision(cfg, "", video_hf=False)
    s["visual_projection.weight"] = (cfg.embed_dim, cfg.width)
    return s


def bert(q, old_names=True, prefix="bert.", mlm_head=True):
    """bert-base-cased `pytorch_model.bin` (old files: LayerNorm gamma/beta), with the
    position_ids buffer and the pooler. prefix="": a bare BertModel (`BertModel.save_pretrained`,
    sentence-transformers), which also has no `cls.*` heads; mlm_head=False drops
    `cls.predictions.*` only."""
    H, I, V = q.hidden, q.intermediate, q.vocab_size - 1  # BERT has no [DEC] row
    g, b = ("gamma", "beta") if old_names else ("weight", "bias")
    s = {"bert.embeddings.position_ids": (1, q.max_positions),
         "bert.embeddings.word_embeddings.weight": (V, H),
         "bert.embeddings.position_embeddings.weight": (q.max_positions, H),
         "bert.embeddings.token_type_embeddings.weight": (2, H),
         f"bert.embeddings.LayerNorm.{g}": (H,), f"bert.embeddings.LayerNorm.{b}": (H,)}
    for i in range(q.layers):
        L = f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s[L + f"attention.self.{n}.weight"], s[L + f"attention.self.{n}.bias"] = (H, H), (H,)
        s[L + "attention.output.dense.weight"], s[L + "attention.output.dense.bias"] = (H, H), (H,)
        s[L + f"attention.output.LayerNorm.{g}"] = s[L + f"attention.output.LayerNorm.{b}"] = (H,)
        s[L + "intermediate.dense.weight"], s[L + "intermediate.dense.bias"] = (I, H), (I,)
        s[L + "output.dense.weight"], s[L + "output.dense.bias"] = (H, I), (H,)
        s[L + f"output.LayerNorm.{g}"] = s[L + f"output.LayerNorm.{b}"] = (H,)
    s["bert.pooler.dense.weight"], s["bert.pooler.dense.bias"] = (H, H), (H,)
    s["cls.predictions.bias"] = (V,)
    s["cls.predictions.transform.dense.weight"] = (H, H)
    s["cls.predictions.transform.dense.bias"] = (H,)
    s[f"cls.predictions.transform.LayerNorm.{g}"] = s[f"cls.predictions.transform.LayerNorm.{b}"] = (H,)
    s["cls.predictions.decoder.weight"] = (V, H)
    s["cls.seq_relationship.weight"], s["cls.seq_relationship.bias"] = (2, H), (2,)
    if not mlm_head or prefix != "bert.":
        s = {k: v for k, v in s.items() if not k.startswith("cls.predictions." if prefix == "bert." else "cls.")}
    return {prefix + k[len("bert."):] if k.startswith("bert.") else k: v for k, v in s.items()}


def qformer_layers(q, prefix="Qformer.bert.encoder.layer."):
    H, I, W = q.hidden, q.intermediate, q.encoder_width
    s = {}
    for i in range(q.layers):
        L = f"{prefix}{i}."
        blocks = ["attention"] + (["crossattention"] if i % q.cross_attention_freq == 0 else [])
        for blk in blocks:
            kv = W if blk == "crossattention" else H
            s[L + f"{blk}.self.query.weight"], s[L + f"{blk}.self.query.bias"] = (H, H), (H,)
            for n in ("key", "value"):
                s[L + f"{blk}.self.{n}.weight"], s[L + f"{blk}.self.{n}.bias"] = (H, kv), (H,)
            s[L + f"{blk}.output.dense.weight"], s[L + f"{blk}.output.dense.bias"] = (H, H), (H,)
            s[L + f"{blk}.output.LayerNorm.weight"] = s[L + f"{blk}.output.LayerNorm.bias"] = (H,)
        for ffn in ("", "_query"):
            s[L + f"intermediate{ffn}.dense.weight"] = (I, H)
            s[L + f"intermediate{ffn}.dense.bias"] = (I,)
            s[L + f"output{ffn}.dense.weight"], s[L + f"output{ffn}.dense.bias"] = (H, I), (H,)
            s[L + f"output{ffn}.LayerNorm.weight"] = s[L + f"output{ffn}.LayerNorm.bias"] = (H,)
    return s


def lm_and_embeddings(q, vocab):
    H = q.hidden
    return {"Qformer.bert.embeddings.word_embeddings.weight": (vocab, H),
            "Qformer.bert.embeddings.position_embeddings.weight": (q.max_positions, H),
            "Qformer.bert.embeddings.LayerNorm.weight": (H,),
            "Qformer.bert.embeddings.LayerNorm.bias": (H,),
            "Qformer.cls.predictions.bias": (vocab,),
            "Qformer.cls.predictions.transform.dense.weight": (H, H),
            "Qformer.cls.predictions.transform.dense.bias": (H,),
            "Qformer.cls.predictions.transform.LayerNorm.weight": (H,),
            "Qformer.cls.predictions.transform.LayerNorm.bias": (H,),
            "Qformer.cls.predictions.decoder.weight": (vocab, H),
            "Qformer.cls.predictions.decoder.bias": (vocab,)}


def heads(q):
    H = q.hidden
    return {"vision_proj.weight": (q.proj_dim, H), "vision_proj.bias": (q.proj_dim,),
            "text_proj.weight": (q.proj_dim, H), "text_proj.bias": (q.proj_dim,),
            "itm_head.weight": (2, H), "itm_head.bias": (2,), "temp": ()}


def blip2(q, blip_vocab=30523):
    """`blip2_pretrained.pth`'s "model" dict: BLIP-2's uncased vocabulary, 32 queries (half
    of ours in the tests' configs), `ln_vision` for its EVA ViT, a position_ids buffer."""
    s = qformer_layers(q)
    s.update(lm_and_embeddings(q, blip_vocab))
    s["Qformer.bert.embeddings.position_ids"] = (1, q.max_positions)
    s["query_tokens"] = (1, q.num_query_tokens // 2, q.hidden)
    s["ln_vision.weight"] = s["ln_vision.bias"] = (q.encoder_width,)
    s.update(heads(q))
    return s


# their trainer drops the frozen encoders' *parameters* only, so these buffers stay
STAGE2_BUFFERS = ("video_encoder.embeddings.position_ids", "audio_encoder.embeddings.position_ids",
                  "Qformer.bert.embeddings.position_ids")


def stage2(cfg):
    """The authors' `checkpoint_N.pth`'s "model" dict (encoder parameters are not saved, their
    buffers are)."""
    q = cfg.qformer
    s = {STAGE2_BUFFERS[0]: (1, cfg.video.tokens_per_frame), STAGE2_BUFFERS[1]: (1, cfg.audio.tokens_per_frame),
         STAGE2_BUFFERS[2]: (1, q.max_positions)}
    s.update(qformer_layers(q))
    s.update(lm_and_embeddings(q, q.vocab_size))
    s["query_tokens"] = (1, q.num_query_tokens, q.hidden)
    for m, enc in (("video", cfg.video), ("audio", cfg.audio)):
        s[f"ln_{m}.weight"] = s[f"ln_{m}.bias"] = (enc.width,)
        s[f"{m}_project.weight"], s[f"{m}_project.bias"] = (q.encoder_width, enc.width), (q.encoder_width,)
    s.update(heads(q))
    return s


def authors_stage2_file(cfg, device="cpu"):
    """The whole `checkpoint_N.pth` as their trainer saves it: the five top-level keys, with
    "config" their run configuration (a plain dict, nothing like ours)."""
    return {"model": make(stage2(cfg), device),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
            "config": {"model": {"arch": "uniq4cap", "num_query_token": cfg.qformer.num_query_tokens,
                                 "freeze_vit": True},
                       "run": {"init_lr": 1e-4, "max_epoch": 10, "batch_size_train": 16},
                       "datasets": {"valor": {"vis_processor": {"train": {"name": "video_train"}}}}},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 2000, "_growth_tracker": 0},
            "epoch": 9}


def hf_cache(cache, repo, files, revision="0123456789abcdef0123456789abcdef01234567"):
    """Put `files` ({name: bytes}) into `cache` the way huggingface_hub stores a download:
    models--org--name/blobs/<sha256>, snapshots/<revision>/<name> linking to the blob, and
    refs/main holding the revision. Returns the snapshot folder."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", revision)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    for name, content in files.items():
        blob = hashlib.sha256(content).hexdigest()
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(content)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    return snapshot
