"""UniQ4Cap: the model and its generation, in reading order:
  1. Configs and presets: a dataclass per component; `full` = the paper, `tiny` = a 2-core CPU.
  2. Attention: one function, PyTorch's fused kernels or the plain softmax(QK^T)V reference.
  3. The CLIP ViT-L/14 towers in LanguageBind's flavour: the video tower with per-layer
     temporal attention, and the audio tower on a 3-channel log-mel image; and CLIP's text
     tower, the one LanguageBind bound them to.
  4. The Q-Former: BLIP-2's post-LN BERT with cross-attention, learned queries and its LM head.
  5. The captioner, `UniQ4Cap`: encode (the towers, or their cached tokens) -> memory =
     [video tokens ; audio tokens] -> the queries read the memory and the caption reads the
     queries; then the caption loss, or `generate`.
  6. Generation: `TextStepper` (next-token logits, with the KV cache), `greedy_or_sample`,
     `filter_top_k_top_p` and `beam_search`.

Where the shapes and constants come from: the paper (UniQ4Cap: 8 frames, 64 queries, two
towers, one memory), LanguageBind's tower configs (CLIP ViT-L/14, `add_time_attn`,
`force_patch_dropout`), BERT-base's config and LAVIS's `blip2_qformer.py` / `Qformer.py`
(cross-attention every second layer, separate query FFNs). Module names follow the official
checkpoints' keys, so loading them (pretrained.py) is mostly an identity map.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from losses import next_token_loss

# -----------------------------------------------------------------------------
# 1. Configs and presets


@dataclass
class VisionConfig:
    """One CLIP ViT tower. The video tower sees `num_frames` frames of `image_size`;
    the audio tower sees one 3-channel spectrogram image of (mel bins, time frames)."""
    image_size: tuple = (224, 224)  # (H, W); audio: (num_mel_bins, target_length)
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    num_frames: int = 1  # video: frames per clip; audio: 1
    temporal: bool = False  # per-layer temporal attention (video tower only)
    patch_dropout: float = 0.0  # fraction of patch tokens dropped while the tower is in training mode
    layer_norm_eps: float = 1e-5
    embed_dim: int = 768  # visual_projection output (stage-1 alignment space)

    @property
    def grid(self):
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self):
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_frame(self):
        return self.num_patches + 1  # + class token


@dataclass
class TextConfig:
    """CLIP's text transformer: LanguageBind's text tower (OpenCLIP ViT-L/14's, kept frozen
    while each modality's tower was trained against it). Causal, pre-LN; a caption's embedding
    is the final hidden state at its end-of-text token, projected."""
    vocab_size: int = 49408  # CLIP's byte-level BPE
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-5
    embed_dim: int = 768  # text_projection output: the space the towers were bound in
    eos_token_id: int = 49407  # <|endoftext|>, the pooled position
    temporal: bool = False  # CLIPLayer's switch: text has no frames


@dataclass
class QFormerConfig:
    """BERT-base with cross-attention every `cross_attention_freq` layers (BLIP-2)."""
    vocab_size: int = 28997  # bert-base-cased 28,996 + [DEC]
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    encoder_width: int = 1408  # memory width the cross-attention reads
    cross_attention_freq: int = 2
    num_query_tokens: int = 64
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    proj_dim: int = 256  # vision_proj / text_proj of BLIP-2's optional heads
    # special tokens; bert-base-cased's ids by default, set from the tokenizer otherwise
    pad_token_id: int = 0
    sep_token_id: int = 102
    bos_token_id: int = 28996  # [DEC], appended after BERT's 28,996 rows


@dataclass
class UniQ4CapConfig:
    video: VisionConfig = field(default_factory=VisionConfig)
    audio: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    max_text_len: int = 32  # caption tokens kept in training, [DEC] and [SEP] included (the original's 32)
    label_smoothing: float = 0.1
    # The authors froze the encoders but left them in training mode, so the frozen video
    # tower dropped half its patches in stage-2 training (and none in evaluation). Here that
    # is a named switch: on in the full preset (the paper's training), off in the tiny one.
    frozen_patch_dropout: bool = False


def full_config(vocab_size=28997):
    """The paper's setting: LanguageBind's ViT-L/14 towers (8 frames of 224², 112 mel bins by
    1,036 frames), bert-base-cased's Q-Former with 64 queries, and the authors' frozen video
    patch dropout in training."""
    return UniQ4CapConfig(
        video=VisionConfig(image_size=(224, 224), num_frames=8, temporal=True, patch_dropout=0.5),
        audio=VisionConfig(image_size=(112, 1036), num_frames=1, temporal=False),
        qformer=QFormerConfig(vocab_size=vocab_size),
        frozen_patch_dropout=True,
    )


def tiny_config(vocab_size=1000):
    """Same code at sizes where a batch-8 training step takes well under a second on a
    2-core CPU. The vocabulary and special ids are normally set from the tokenizer trained on
    the captions (`Tokenizer.configure`); the defaults are that tokenizer's special ids."""
    return UniQ4CapConfig(
        # 8 frames, one in each of the embedded clips' event slots; 208 spectrogram frames
        # hold a whole 2 s embedded clip (203 frames as decoded: AAC pads the sound to whole
        # 1,024-sample frames), so the three-chunk rule never cuts or shifts it
        video=VisionConfig(image_size=(32, 32), patch_size=8, width=64, layers=2, heads=4,
                           mlp_dim=256, num_frames=8, temporal=True, patch_dropout=0.5,
                           embed_dim=64),
        audio=VisionConfig(image_size=(32, 208), patch_size=8, width=64, layers=2, heads=4,
                           mlp_dim=256, num_frames=1, temporal=False, embed_dim=64),
        # BLIP-2's layout in miniature: cross-attention in every second layer, none in the
        # last. The text reads each layer's query keys and values, computed from that layer's
        # input, so the queries read the memory once, in layer 0, and the text sees the result
        # in layer 1. (A cross-attention in the last layer would reach no caption.)
        qformer=QFormerConfig(vocab_size=vocab_size, hidden=128, layers=2, heads=8,
                              intermediate=512, max_positions=64, encoder_width=96,
                              cross_attention_freq=2, num_query_tokens=16, proj_dim=32,
                              pad_token_id=0, sep_token_id=3, bos_token_id=5),
    )


PRESETS = {"full": full_config, "tiny": tiny_config}


def config_from_dict(d):
    """Inverse of dataclasses.asdict, for configs stored in checkpoints."""
    d = dict(d)
    video = dict(d.pop("video"))
    audio = dict(d.pop("audio"))
    video["image_size"] = tuple(video["image_size"])
    audio["image_size"] = tuple(audio["image_size"])
    return UniQ4CapConfig(video=VisionConfig(**video), audio=VisionConfig(**audio),
                          qformer=QFormerConfig(**d.pop("qformer")), **d)

# -----------------------------------------------------------------------------
# 2. Attention: one function, two implementations


def attention(q, k, v, mask=None, dropout_p=0.0, impl="auto"):
    """q (B, H, Tq, d), k and v (B, H, Tk, d); mask: bool, broadcastable to (B, H, Tq, Tk),
    True where a query may attend to a key. Returns (B, H, Tq, d).

    "sdpa" hands the work to PyTorch's fused kernels. "plain" is the same computation
    written out, kept as the readable reference and as the test oracle. "auto" takes the
    faster one as measured by bench.py: plain for bf16 on the CPU (SDPA 0.66x there on 2
    cores), SDPA everywhere else (CUDA: fused kernels; CPU fp32: a tie)."""
    if impl == "auto":
        impl = faster_attention(q.device, q.dtype)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    att = attention_map(q, k, mask)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


def attention_map(q, k, mask=None):
    """softmax(QK^T / sqrt(d)) with the mask applied: (B, H, Tq, Tk), each row summing to 1."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, Tq, Tk)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att, dim=-1)


def faster_attention(device, dtype):
    """The implementation "auto" picks on this device and dtype."""
    return "plain" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"


def split_heads(x, heads):
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)  # (B, T, C) -> (B, H, T, C/H)


def merge_heads(x):
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)  # (B, H, T, d) -> (B, T, H*d)


def set_attention_impl(model, impl):
    """Switch every attention module in `model` to "auto", "sdpa" or "plain"."""
    assert impl in ("auto", "sdpa", "plain"), impl
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = impl


# -----------------------------------------------------------------------------
# 3. The CLIP ViT encoders (LanguageBind's `modeling_languagebind` and HF CLIP's layer names)


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.attn_impl = "auto"

    def forward(self, x, mask=None):
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, mask, impl=self.attn_impl)))


class CLIPMLP(nn.Module):
    def __init__(self, width, mlp_dim):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU ("gelu", not quick-gelu)


class CLIPLayer(nn.Module):
    """Pre-LN block. The video variant first mixes each spatial position across frames; the
    text tower's passes a causal mask."""

    def __init__(self, cfg: VisionConfig | TextConfig):
        super().__init__()
        if cfg.temporal:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, cfg.width))
            self.temporal_layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
            self.temporal_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim)
        self.temporal = cfg.temporal

    def forward(self, x, num_frames=1, mask=None):
        if self.temporal:
            N = x.size(1)
            # attention runs over the frames of each position: (B*T, N, D) -> (B*N, T, D)
            x = rearrange(x, "(b t) n d -> (b n) t d", t=num_frames)
            # the temporal embedding is added to the residual stream itself, as in LanguageBind
            x = x + self.temporal_embedding[:, :num_frames]
            x = x + self.temporal_attn(self.temporal_layer_norm1(x))
            x = rearrange(x, "(b n) t d -> (b t) n d", n=N)  # (B*N, T, D) -> (B*T, N, D)
        x = x + self.self_attn(self.layer_norm1(x), mask)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEmbeddings(nn.Module):
    """Pixels -> one token sequence per frame: its class token, then its patches, positions
    added."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.temporal = cfg.temporal
        p = cfg.patch_size
        if cfg.temporal:
            # the authors' "vl_new" video variant: a Conv3d with tube size 1 and one class
            # vector per frame (LanguageBind's HF files hold the Conv2d form; see the loader)
            self.patch_embedding = nn.Conv3d(cfg.num_channels, cfg.width, (1, p, p), (1, p, p), bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(cfg.num_frames, cfg.width))
        else:
            self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.width, p, p, bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.position_embedding = nn.Embedding(cfg.tokens_per_frame, cfg.width)

    def forward(self, pixels):
        """Video (B, 3, T, H, W) or audio (B, 3, mel, time) -> (B*T, 1+N, D), T = 1 for audio."""
        x = self.patch_embedding(pixels)
        if self.temporal:
            x = rearrange(x, "b d t h w -> (b t) (h w) d")  # (B, D, T, gh, gw) -> (B*T, N, D)
            cls = self.class_embedding.repeat(pixels.size(0), 1)[:, None]  # (B*T, 1, D): frame t gets its own
        else:
            x = rearrange(x, "b d h w -> b (h w) d")  # (B, D, gh, gw) -> (B, N, D)
            cls = self.class_embedding.expand(x.size(0), 1, -1)  # (B, 1, D)
        return torch.cat([cls.to(x.dtype), x], dim=1) + self.position_embedding.weight  # (B*T, 1+N, D)


class VisionTransformer(nn.Module):
    """CLIP ViT-L/14 in LanguageBind's flavour. Video input (B, 3, T, H, W); audio input, the
    3-chunk spectrogram image, (B, 3, mel, time). Returns
      hidden: (B, T*N, D) the last hidden state before post_layernorm (what the captioner reads),
      frame_embeds: (B, T, D) post_layernorm class token of each frame (T = 1 for audio).
    The pooled clip embedding that stage 1 aligns is frame_embeds.mean(1)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic, official name
        # a container only, for the checkpoints' key path encoder.layers.N
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.layers)])})
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        # stage 1's projection into the shared space (LanguageBind's `visual_projection`)
        self.visual_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """A tower's own initialisation, for training from scratch (the pretrained loaders
        overwrite all of it): linear and patch-embedding weights at std fan_in^-0.5, so each
        layer keeps its input's scale, biases zero; the class, position and temporal
        embeddings at std width^-0.5, CLIP's scale, so positions and frames start apart."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)  # weight[0]: one output's inputs
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        std = self.cfg.width ** -0.5
        nn.init.normal_(self.embeddings.class_embedding, std=std)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=std)
        for layer in self.encoder.layers:
            if layer.temporal:
                nn.init.normal_(layer.temporal_embedding, std=std)

    def forward(self, pixels):
        B = pixels.size(0)
        x = self.embeddings(pixels)  # (B*T, 1+N, D)
        T = x.size(0) // B  # frames per clip; 1 for audio
        if self.training:  # patch dropout's one switch: the tower's mode (UniQ4Cap.train sets a frozen one's)
            x = self.drop_patches(x, B, T)
        x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x, T)
        frame_embeds = self.post_layernorm(x[:, 0]).view(B, T, -1)  # (B*T, D) -> (B, T, D)
        hidden = x.reshape(B, -1, x.size(-1))  # (B*T, N', D) -> (B, T*N', D)
        return hidden, frame_embeds

    def drop_patches(self, x, B, T):
        """Keep a random (1 - cfg.patch_dropout) of the patch tokens (the class token always
        stays), the same positions in every frame of a video so temporal attention still lines
        up: LanguageBind's `force_patch_dropout` (0.5 in its video tower's config)."""
        BT, N1, D = x.shape
        N = N1 - 1
        keep = max(1, int(N * (1.0 - self.cfg.patch_dropout)))
        if keep == N:  # a rate of 0 drops nothing
            return x
        idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep] + 1  # (B, keep)
        idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)  # class token at 0
        idx = idx.repeat_interleave(T, dim=0)[:, :, None].expand(-1, -1, D)  # (B*T, 1+keep, D)
        return x.gather(1, idx)


class TextTransformer(nn.Module):
    """CLIP's text tower (transformers' `CLIPTextModelWithProjection`, as LanguageBind's files
    hold it under `text_model.*` and `text_projection`). Token ids (B, L), each row
    [start] tokens [end] [pad]..., -> (hidden (B, L, D), text_embeds (B, E)): the final
    LayerNorm'd state at each row's first end-of-text token, through text_projection. Causal
    attention lets no token see the padding after it, so no padding mask is needed."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict({"token_embedding": nn.Embedding(cfg.vocab_size, cfg.width),
                                         "position_embedding": nn.Embedding(cfg.max_positions, cfg.width)})
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.layers)])})
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """CLIP's text initialisation (OpenCLIP, transformers): embeddings at std 0.02, the rest
        as VisionTransformer's (each linear at fan_in^-0.5), so a tiny tower can train from here."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids):
        B, L = ids.shape
        x = self.embeddings["token_embedding"](ids) + self.embeddings["position_embedding"].weight[:L]  # (B, L, D)
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()  # query i sees keys <= i
        for layer in self.encoder.layers:
            x = layer(x, mask=causal)
        x = self.final_layer_norm(x)
        eos = (ids == self.cfg.eos_token_id).int().argmax(dim=1)  # (B,): the first end-of-text token
        return x, self.text_projection(x[torch.arange(B, device=ids.device), eos])


# -----------------------------------------------------------------------------
# 4. The Q-Former (post-LN BERT as LAVIS's `Qformer.py` extends it for BLIP-2)


class BertAddNorm(nn.Module):
    """Post-LN: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, d_in, d_out, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width):
        super().__init__()
        # named `self` after the checkpoints; key and value read kv_width (the memory's, for cross-attention)
        self.self = nn.ModuleDict({"query": nn.Linear(cfg.hidden, cfg.hidden), "key": nn.Linear(kv_width, cfg.hidden),
                                   "value": nn.Linear(kv_width, cfg.hidden)})
        self.output = BertAddNorm(cfg.hidden, cfg.hidden, cfg)
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.attn_impl = "auto"
        # explain.py's switch: keep the attention map (B, H, Tq, Tk) of the last forward in
        # self.map, in the autograd graph, for attention x gradient
        self.keep_map, self.map = False, None

    def keys_values(self, kv_input):
        """kv_input (B, T, W) -> keys and values, each (B, H, T, d)."""
        h = self.self
        return split_heads(h.key(kv_input), self.heads), split_heads(h.value(kv_input), self.heads)

    def forward(self, x, kv_input=None, mask=None, past_kv=None):
        """x (B, T, C) attends to kv_input (default x itself), after `past_kv` keys/values
        (B, H, P, d) that were computed earlier (the cached queries, then earlier text).
        Returns the block's output and the keys/values including the past, for caching."""
        q = split_heads(self.self.query(x), self.heads)
        k, v = self.keys_values(x if kv_input is None else kv_input)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, H, P+T, d)
            v = torch.cat([past_kv[1], v], dim=2)
        if self.keep_map:
            self.map = attention_map(q, k, mask)
            y = self.map @ v
        else:
            y = attention(q, k, v, mask, self.dropout if self.training else 0.0, self.attn_impl)
        return self.output(merge_heads(y), x), (k, v)


class BertIntermediate(nn.Module):
    """The FFN's first Linear, wrapped so its keys read `intermediate.dense.*` as in BERT."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention shared by queries and text; cross-attention to the memory for the
    queries only; separate FFNs for queries (`*_query`) and text."""

    def __init__(self, cfg: QFormerConfig, has_cross):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden)
        if has_cross:
            self.crossattention = BertAttention(cfg, cfg.encoder_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAddNorm(cfg.intermediate, cfg.hidden, cfg)
        self.intermediate_query = BertIntermediate(cfg)
        self.output_query = BertAddNorm(cfg.intermediate, cfg.hidden, cfg)
        self.has_cross = has_cross

    def forward_queries(self, x, memory, memory_mask):
        x, kv = self.attention(x)  # queries see every query and no text
        if self.has_cross:
            x, _ = self.crossattention(x, memory, memory_mask)
        x = self.output_query(self.intermediate_query(x), x)
        return x, kv

    def forward_text(self, x, past_kv, mask):
        x, kv = self.attention(x, mask=mask, past_kv=past_kv)
        x = self.output(self.intermediate(x), x)
        return x, kv

    def forward_joint(self, x, Q, memory, memory_mask, mask):
        """x (B, Q+T, C): queries, then text, in one self-attention; then each its own way."""
        x, _ = self.attention(x, mask=mask)
        queries, text = x[:, :Q], x[:, Q:]
        if self.has_cross:
            queries, _ = self.crossattention(queries, memory, memory_mask)
        queries = self.output_query(self.intermediate_query(queries), queries)
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class BertEmbeddings(nn.Module):
    """Word + position embeddings for text; queries skip both but share the LayerNorm.
    (BLIP-2's Q-Former has no token-type embeddings.)"""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids=None, queries=None, start=0):
        if queries is not None:
            x = queries
        else:
            pos = torch.arange(start, start + input_ids.size(1), device=input_ids.device)
            x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class LMTransform(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictions(nn.Module):
    """BERT's LM head: transform, then a decoder whose weight is the word-embedding table,
    plus its own output bias."""

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = LMTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class QFormer(nn.Module):
    """The transformer with two entry points, BLIP-2's captioning pass (LAVIS,
    `lavis/models/blip2_models/blip2_qformer.py`, `Blip2Qformer.forward`): `read_memory` is
    its query pass, `self.Qformer.bert(query_embeds=..., encoder_hidden_states=...,
    use_cache=True)`, kept only for the `past_key_values` it returns, and `decode_text` its
    text pass, `self.Qformer(decoder_input_ids, past_key_values=...)`, whose tokens attend to
    all queries and to earlier text before the LM head predicts the next word."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        # containers only, for the checkpoints' key paths bert.encoder.layer.N and cls.predictions
        self.bert = nn.ModuleDict({
            "embeddings": BertEmbeddings(cfg),
            "encoder": nn.ModuleDict({"layer": nn.ModuleList(
                [BertLayer(cfg, i % cfg.cross_attention_freq == 0) for i in range(cfg.layers)])})})
        self.cls = nn.ModuleDict({"predictions": LMPredictions(cfg, self.bert.embeddings.word_embeddings)})

    def read_memory(self, queries, memory, memory_mask=None, outputs=False):
        """queries (1, Q, C), the same for every clip; memory (B, M, W); memory_mask (B, M)
        bool, True = present. Returns what the text reads: per layer, the queries'
        self-attention (k, v), each (B, H, Q, d). The text at layer l reads keys and values
        computed from layer l's *input*, so the last layer's query outputs reach nothing: of
        that layer only the queries' key and value projections run (LAVIS computes the rest
        and discards it). outputs=True runs the last layer whole and returns (cache, the
        queries' final outputs (B, Q, C)): what retrieval reads (LAVIS's
        `query_output.last_hidden_state`)."""
        x = self.bert.embeddings(queries=queries.expand(memory.size(0), -1, -1))  # (B, Q, C)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, M)
        *body, last = self.bert.encoder.layer
        cache = []
        for layer in body:
            x, kv = layer.forward_queries(x, memory, mask)
            cache.append(kv)
        if not outputs:
            cache.append(last.attention.keys_values(x))
            return cache
        x, kv = last.forward_queries(x, memory, mask)
        return cache + [kv], x

    def decode_text(self, input_ids, cache, text_mask=None):
        """input_ids (B, T) are the text tokens after those already in `cache`. `cache` holds,
        per layer, (k, v) of the Q queries followed by P earlier text tokens. text_mask (B, P+T)
        marks real (non-padding) text tokens. Returns logits (B, T, V) and the grown cache."""
        B, T = input_ids.shape
        Q = self.cfg.num_query_tokens
        P = cache[0][0].size(2) - Q  # earlier text tokens already cached
        x = self.bert.embeddings(input_ids, start=P)
        mask = None
        if T > 1 or text_mask is not None:
            # text sees all queries, itself and earlier text, never later text or padding
            causal = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
            mask = causal[None, None]  # (1, 1, T, P+T)
            if text_mask is not None:
                mask = mask & text_mask[:, None, None, :].bool()  # (B, 1, T, P+T)
            queries_visible = torch.ones(*mask.shape[:3], Q, dtype=torch.bool, device=x.device)
            mask = torch.cat([queries_visible, mask], dim=-1)  # (B|1, 1, T, Q+P+T)
        new_cache = []
        for layer, past in zip(self.bert.encoder.layer, cache):
            x, kv = layer.forward_text(x, past, mask)
            new_cache.append(kv)
        return self.cls.predictions(x), new_cache

    def encode_text(self, input_ids, text_mask):
        """BLIP-2's text-only pass (ITC's text side, `self.Qformer.bert(text_ids)` in LAVIS):
        the text alone, each token seeing every real one; input_ids (B, T) start with [CLS].
        Returns (B, T, C)."""
        x = self.bert.embeddings(input_ids)
        mask = text_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        for layer in self.bert.encoder.layer:
            x, _ = layer.forward_text(x, None, mask)
        return x

    def read_jointly(self, queries, memory, memory_mask, input_ids, text_mask):
        """BLIP-2's matching pass (ITM, `self.Qformer.bert(text_ids, query_embeds=...,
        encoder_hidden_states=...)` in LAVIS): queries and text in one self-attention where
        each sees every query and every real text token; the queries also read the memory.
        input_ids (B, T) start with [CLS]. Returns the queries' outputs (B, Q, C)."""
        B, Q = input_ids.size(0), queries.size(1)
        x = torch.cat([self.bert.embeddings(queries=queries.expand(B, -1, -1)), self.bert.embeddings(input_ids)],
                      dim=1)  # (B, Q+T, C)
        visible = torch.cat([text_mask.new_ones(B, Q), text_mask], dim=1).bool()[:, None, None, :]  # (B, 1, 1, Q+T)
        memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, M)
        for layer in self.bert.encoder.layer:
            x = layer.forward_joint(x, Q, memory, memory_mask, visible)
        return x[:, :Q]


# -----------------------------------------------------------------------------
# 5. The captioner: encode -> memory -> Q-Former


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (the encoders may run in bf16):
    each modality's tokens pass one on their way into the memory."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class UniQ4Cap(nn.Module):
    """The captioner: video and audio towers -> each modality's LayerNorm and projection ->
    one memory -> the Q-Former's learned queries read it -> the caption reads the queries.
    Module names match the authors' stage-2 checkpoint (`checkpoint_N.pth`)."""

    def __init__(self, cfg: UniQ4CapConfig, freeze_encoders=True, encoders=True):
        super().__init__()
        self.cfg, self.freeze_encoders = cfg, freeze_encoders
        q = cfg.qformer
        self.encoder_seed = int(torch.randint(2 ** 62, (), device="cpu"))  # the towers' own seed: build_encoders
        self.register_module("video_encoder", None)  # VisionTransformer(cfg.video), by build_encoders
        self.register_module("audio_encoder", None)  # VisionTransformer(cfg.audio)
        self.ln_video, self.ln_audio = LayerNormFp32(cfg.video.width), LayerNormFp32(cfg.audio.width)
        self.video_project = nn.Linear(cfg.video.width, q.encoder_width)  # each tower's width -> the memory's
        self.audio_project = nn.Linear(cfg.audio.width, q.encoder_width)
        self.Qformer = QFormer(q)
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_query_tokens, q.hidden))
        # BLIP-2's retrieval and matching heads: loaded and saved, not used by the caption loss
        self.vision_proj = nn.Linear(q.hidden, q.proj_dim)
        self.text_proj = nn.Linear(q.hidden, q.proj_dim)
        self.itm_head = nn.Linear(q.hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.init_weights()
        if encoders:
            self.build_encoders()
        self.train()

    def encode(self, video=None, audio=None, video_tokens=None, audio_tokens=None):
        """Step 1, the towers: video (B, 3, T, H, W) -> (B, T*(1+N), D) and the 3-chunk
        spectrogram (B, 3, mel, time) -> (B, 1+N, D), each tower's last hidden state. Either
        may come as those tokens instead (a feature cache stores them), or be None."""
        self.check_inputs(video, audio, video_tokens, audio_tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            if video is not None:
                video_tokens = self.video_encoder(video)[0]
            if audio is not None:
                audio_tokens = self.audio_encoder(audio)[0]
        return video_tokens, audio_tokens

    def memory(self, video_tokens=None, audio_tokens=None, video_mask=None, audio_mask=None):
        """Step 2: memory = [video_project(ln_video(video)) ; audio_project(ln_audio(audio))]
        along the tokens, (B, Nv+Na, W), and its mask (B, Nv+Na), True where present (None when
        all are). video_mask / audio_mask (B,) hide a clip's missing modality."""
        given = video_tokens if video_tokens is not None else audio_tokens
        if given is None:
            raise ValueError("a clip needs video or audio: both are None")
        parts, masks = [], []
        for tokens, present, ln, proj in ((video_tokens, video_mask, self.ln_video, self.video_project),
                                          (audio_tokens, audio_mask, self.ln_audio, self.audio_project)):
            if tokens is None:  # zero tokens: the projection still gets a (zero) gradient, as DDP needs
                tokens = given.new_zeros(given.size(0), 0, proj.in_features)  # (B, 0, D)
            parts.append(proj(ln(tokens)))
            B, N = tokens.shape[:2]
            present = torch.ones(B, dtype=torch.bool, device=tokens.device) if present is None else present
            masks.append(present[:, None].expand(B, N))  # (B,) -> (B, N)
        memory_mask = torch.cat(masks, dim=1)
        if not memory_mask.any(dim=1).all():
            raise ValueError("a clip in the batch has neither video nor audio")
        return torch.cat(parts, dim=1), None if memory_mask.all() else memory_mask

    def forward(self, video=None, audio=None, captions=None, caption_mask=None,
                video_mask=None, audio_mask=None, video_tokens=None, audio_tokens=None):
        """Step 3 and the loss: the queries read the memory, the caption reads the queries
        (QFormer). captions (B, T): [DEC] w1 ... wn [SEP] [PAD]...; caption_mask (B, T) marks
        real tokens. Returns (logits (B, T, V), loss): position t predicts token t+1, with
        label smoothing; padding and the last position are ignored."""
        video_tokens, audio_tokens = self.encode(video, audio, video_tokens, audio_tokens)
        memory, memory_mask = self.memory(video_tokens, audio_tokens, video_mask, audio_mask)
        query_kv = self.Qformer.read_memory(self.query_tokens, memory, memory_mask)
        logits, _ = self.Qformer.decode_text(captions, query_kv, caption_mask)
        return logits, next_token_loss(logits, captions, caption_mask, self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, video=None, audio=None, video_mask=None, audio_mask=None, *,
                 video_tokens=None, audio_tokens=None, method="greedy", num_beams=5,
                 length_penalty=1.0, top_k=0, top_p=0.9, temperature=1.0, min_length=1,
                 max_length=30, repetition_penalty=1.0, num_captions=1, use_cache=True):
        """Caption each clip (inputs as for `forward`) by "greedy", "beam" (num_beams,
        length_penalty) or "sample" (top_k, nucleus top_p, temperature) decoding, section 6.
        Lengths count the [DEC] start token, as HF's generate does: the original's
        max_length=30, min_length=10 mean the same here. repetition_penalty > 1 makes tokens
        already generated less likely (CTRL's rule). use_cache=False recomputes the query
        pass and the whole text at every step (the reference the KV cache is tested against).
        Returns token ids (B * num_captions, L) without [DEC], padded after [SEP]; clip b's
        captions are rows b*num_captions ... (b+1)*num_captions - 1."""
        if method not in ("greedy", "sample", "beam"):
            raise ValueError(f"unknown decoding method {method!r}")
        if method == "beam" and num_captions > num_beams:
            raise ValueError(f"num_captions ({num_captions}) > num_beams ({num_beams})")
        video_tokens, audio_tokens = self.encode(video, audio, video_tokens, audio_tokens)
        memory, memory_mask = self.memory(video_tokens, audio_tokens, video_mask, audio_mask)
        rows = num_beams if method == "beam" else num_captions  # captions decoded per clip
        step = TextStepper(self, memory, memory_mask, rows, use_cache, min_length, repetition_penalty)
        if method == "beam":
            return beam_search(step, num_beams, max_length, length_penalty, num_captions)
        return greedy_or_sample(step, max_length, method == "sample", top_k, top_p, temperature)

    # -- retrieval: BLIP-2's contrastive (ITC) and matching (ITM) heads on the same memory --

    def clip_features(self, query_outputs):
        """ITC's clip side: every query's final output (B, Q, C), from
        `Qformer.read_memory(..., outputs=True)`, through vision_proj, unit length: (B, Q,
        proj_dim). A clip scores a text by its best query."""
        return F.normalize(self.vision_proj(query_outputs), dim=-1)

    def text_features(self, cls_ids, text_mask):
        """ITC's text side: the text-only pass's [CLS] output through text_proj, unit length:
        (B, proj_dim). cls_ids: the caption's ids with [CLS] in place of [DEC], as BLIP-2."""
        return F.normalize(self.text_proj(self.Qformer.encode_text(cls_ids, text_mask)[:, 0]), dim=-1)

    def match_logits(self, memory, memory_mask, cls_ids, text_mask):
        """ITM: itm_head on every query of the joint pass, averaged over the queries: (B, 2),
        class 1 = the text belongs to the clip."""
        queries = self.Qformer.read_jointly(self.query_tokens, memory, memory_mask, cls_ids, text_mask)
        return self.itm_head(queries).mean(dim=1)

    # -- plumbing: the frozen towers (feature cache, DDP), patch dropout, initialisation ----

    def build_encoders(self):
        """Build the two towers on the CPU, initialised from `encoder_seed`: the same weights
        whenever they are built, and the rest of the model initialises the same whether they
        are built in the constructor, later, or never (a run that reads a complete feature
        cache). The caller loads their weights and moves them."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.encoder_seed)
            self.video_encoder = VisionTransformer(self.cfg.video)
            self.audio_encoder = VisionTransformer(self.cfg.audio)
        for p in self.encoder_parameters():
            p.requires_grad_(not self.freeze_encoders)
        return self.train(self.training)

    def drop_encoders(self):
        """Let go of the frozen towers once a feature cache holds their outputs (at the full
        preset they are 0.6B of the 0.8B parameters); pixels given afterwards are an error."""
        if not self.freeze_encoders:
            raise ValueError("trained encoders cannot be dropped: they are part of what is trained")
        self.video_encoder = self.audio_encoder = None

    def encoder_parameters(self):
        return [p for enc in (self.video_encoder, self.audio_encoder) if enc is not None for p in enc.parameters()]

    def check_inputs(self, video, audio, video_tokens, audio_tokens):
        for name, pixels, tokens in (("video", video, video_tokens), ("audio", audio, audio_tokens)):
            if pixels is not None and tokens is not None:
                raise ValueError(f"{name} given twice: as pixels and as {name}_tokens")
            if pixels is not None and getattr(self, f"{name}_encoder") is None:
                raise ValueError(f"{name} given as pixels, but this model has no encoders (not built, or dropped): "
                                 f"give {name}_tokens")

    def train(self, mode=True):
        """Frozen towers only read, in eval mode, except where `cfg.frozen_patch_dropout` keeps
        the video tower's mode, and so its patch dropout, as the authors left it. Trained
        towers follow the model's mode."""
        super().train(mode)
        if self.freeze_encoders and self.video_encoder is not None:  # (None: not built, or dropped)
            self.audio_encoder.eval()
            self.video_encoder.train(mode and self.cfg.frozen_patch_dropout)
        return self

    def unreachable_parameters(self):
        """Parameters no caption depends on: BLIP-2's retrieval and matching heads, and the
        last Q-Former layer's query path (QFormer.read_memory), which only retrieval reads.
        The last layer's self-attention stays: the text runs through it."""
        last = self.Qformer.bert.encoder.layer[-1]
        parts = [self.vision_proj, self.text_proj, self.itm_head, last.intermediate_query, last.output_query]
        if last.has_cross:
            parts.append(last.crossattention)
        return [self.temp] + [p for m in parts for p in m.parameters()]

    def init_weights(self):
        """BERT's initialisation for everything but the towers (VisionTransformer initialises
        itself); the pretrained loaders overwrite what they cover. What the caption loss cannot
        reach is frozen: under DDP a trained parameter without a gradient stops the run."""
        for child in self.children():
            child.apply(init_bert_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        for proj in (self.video_project, self.audio_project):
            # they read LayerNorm'd tokens: std fan_in^-0.5 keeps the memory at unit scale (0.02
            # left the tiny preset's memory so faint that a video-only model often never read it)
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        for p in self.unreachable_parameters():
            p.requires_grad_(False)

    def train_retrieval_heads(self, matching=True):
        """Retrieval training reaches what captioning cannot: unfreeze it (itm_head only when
        the matching loss trains it)."""
        for p in self.unreachable_parameters():
            p.requires_grad_(True)
        self.itm_head.requires_grad_(matching)
        return self

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def init_bert_weights(m):
    """BERT's initialisation (normal, std 0.02; LayerNorms at 1 and 0)."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# 6. Generation: the decoding behind UniQ4Cap.generate


class TextStepper:
    """The model's side of decoding: next-token logits for a batch of growing captions, each
    clip's memory repeated `repeats` times (captions per clip, or beams), with generate's
    length and repetition rules applied.

    With use_cache the queries read the memory once, here in the constructor, and every
    layer's keys/values of the queries and of the text so far are kept, so each step runs
    only the newest token. Without, each step recomputes everything after the encoders:
    the query pass and the whole text."""

    def __init__(self, model, memory, memory_mask, repeats, use_cache, min_length=1,
                 repetition_penalty=1.0):
        self.qformer, self.query_tokens, self.use_cache = model.Qformer, model.query_tokens, use_cache
        self.ids = model.cfg.qformer  # the special token ids
        self.min_length, self.repetition_penalty = min_length, repetition_penalty
        self.rows, self.device = memory.size(0) * repeats, memory.device
        if use_cache:
            query_kv = self.qformer.read_memory(self.query_tokens, memory, memory_mask)
            self.cache = [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0))
                          for k, v in query_kv]
        else:
            self.memory = memory.repeat_interleave(repeats, 0)
            self.memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(repeats, 0)

    def start(self):
        """Every row's caption so far: just [DEC], (rows, 1)."""
        return torch.full((self.rows, 1), self.ids.bos_token_id, dtype=torch.long, device=self.device)

    def __call__(self, seq):
        """seq (rows, 1+t), [DEC] and t tokens -> float32 logits (rows, V) for token t+1."""
        if self.use_cache:
            logits, self.cache = self.qformer.decode_text(seq[:, -1:], self.cache)
        else:
            query_kv = self.qformer.read_memory(self.query_tokens, self.memory, self.memory_mask)
            logits, _ = self.qformer.decode_text(seq, query_kv)
        logits = logits[:, -1].float()
        if self.repetition_penalty != 1.0 and seq.size(1) > 1:
            prev = seq[:, 1:]
            picked = logits.gather(1, prev)
            picked = torch.where(picked > 0, picked / self.repetition_penalty, picked * self.repetition_penalty)
            logits = logits.scatter(1, prev, picked)
        if seq.size(1) < self.min_length:  # the caption so far, [DEC] included, is too short to end
            logits[:, self.ids.sep_token_id] = float("-inf")
        return logits

    def reorder(self, rows):
        """Beam search moved beams: row i now continues old row rows[i]."""
        if self.use_cache:
            self.cache = [(k[rows], v[rows]) for k, v in self.cache]
        else:
            self.memory = self.memory[rows]
            self.memory_mask = None if self.memory_mask is None else self.memory_mask[rows]


def filter_top_k_top_p(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top_k and outside the smallest set of tokens whose
    probability reaches top_p (the most likely token always stays)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
        drop[:, 0] = False  # the most likely token has no mass before it: with top_p 0 it would go too
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def greedy_or_sample(step, max_length, sample=False, top_k=0, top_p=1.0, temperature=1.0):
    """One caption per row of `step`: each step takes the most likely token (greedy) or draws
    one from the temperature-scaled probabilities left by `filter_top_k_top_p` (sample). A
    caption that has emitted [SEP] only pads; decoding stops when all have, or at max_length
    tokens, [DEC] included. Returns (rows, L) token ids without the [DEC]."""
    ids = step.ids
    seq = step.start()
    finished = torch.zeros(seq.size(0), dtype=torch.bool, device=seq.device)
    for _ in range(max_length - 1):  # the [DEC] already in `seq` counts
        logits = step(seq)
        if sample:
            probs = F.softmax(filter_top_k_top_p(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1)[:, 0]
        else:
            nxt = logits.argmax(dim=-1)
        nxt = nxt.masked_fill(finished, ids.pad_token_id)  # finished captions only pad
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        finished |= nxt == ids.sep_token_id
        if finished.all():
            break
    return seq[:, 1:]


def beam_search(step, K, max_length, length_penalty, num_captions):
    """Keep the K best partial captions per clip (`step` holds K rows per clip) by summed
    log-probability; a caption that emits [SEP] is set aside scored by
    sum / length**length_penalty. A clip is done once it has K finished captions (or at
    max_length, [DEC] included, when its open beams are finished too). Returns the
    num_captions best of each clip, (B * num_captions, L), as `greedy_or_sample` does."""
    ids, device = step.ids, step.device
    B = step.rows // K
    seq = step.start()  # (B*K, 1)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: let only the first one expand
    done = [[] for _ in range(B)]  # per clip: (score, tokens)
    for _ in range(max_length - 1):  # the [DEC] already in `seq` counts
        logp = F.log_softmax(step(seq), dim=-1)  # (B*K, V)
        V = logp.size(-1)
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # enough to refill K after [SEP]s
        new_beam = torch.zeros(B, K, dtype=torch.long, device=device)
        new_tok = torch.full((B, K), ids.pad_token_id, dtype=torch.long, device=device)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        for b in range(B):
            n = 0
            for s, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, tok = divmod(idx, V)
                if s == float("-inf"):
                    break
                if tok == ids.sep_token_id:
                    if len(done[b]) < K:
                        tokens = seq[b * K + beam, 1:].tolist() + [tok]
                        done[b].append((s / len(tokens) ** length_penalty, tokens))
                    continue
                new_beam[b, n], new_tok[b, n], new_scores[b, n] = beam, tok, s
                n += 1
                if n == K:
                    break
            if len(done[b]) >= K:
                new_scores[b] = float("-inf")  # this clip is finished
        rows = (new_beam + torch.arange(B, device=device)[:, None] * K).view(-1)
        seq = torch.cat([seq[rows], new_tok.view(-1, 1)], dim=1)
        step.reorder(rows)
        scores = new_scores
        if all(len(d) >= K for d in done):
            break
    for b in range(B):  # clips that ran out of length: their open beams count as finished
        for k in range(K):
            s = scores[b, k].item()
            if s > float("-inf") and len(done[b]) < K:
                tokens = seq[b * K + k, 1:].tolist()
                done[b].append((s / len(tokens) ** length_penalty, tokens))
    best = [sorted(d, key=lambda x: -x[0])[:num_captions] for d in done]
    L = max(len(tokens) for d in best for _, tokens in d)
    out = torch.full((B * num_captions, L), ids.pad_token_id, dtype=torch.long, device=device)
    for b, d in enumerate(best):
        for i, (_, tokens) in enumerate(d):
            out[b * num_captions + i, :len(tokens)] = torch.tensor(tokens, device=device)
    return out
