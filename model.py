"""UniQ4Cap: the whole model in one file (DESIGN.md sections 2, 3 and 5), in this order:
  1. Configs and presets: a dataclass per component; `full` = the paper, `tiny` = a 2-core CPU.
  2. Attention: one function, PyTorch's fused kernels or the plain softmax(QK^T)V reference.
  3. The CLIP ViT encoders: the video tower with per-layer temporal attention, and the audio
     tower on a 3-channel log-mel image.
  4. The Q-Former: post-LN BERT with cross-attention, learned queries and its LM head.
  5. The captioner, `UniQ4Cap`: `forward` reads as its three steps, encode (the encoders, or
     their cached tokens) -> memory = [video tokens ; audio tokens] -> the Q-Former's queries
     read the memory and the caption reads the queries; then the caption loss. `generate`
     prepares the same memory and hands it to section 6.
  6. Generation: `TextStepper` (next-token logits, with the KV cache), `greedy_or_sample`,
     `filter_top_k_top_p` and `beam_search`.
  7. The tokenizer.
  8. Loading every official checkpoint by an explicit name mapping.

Module names follow the official checkpoints' keys wherever that costs nothing, so most
of the loading code is an identity map plus a handful of reshapes.
"""

import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tokenizers import AddedToken, BertWordPieceTokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from losses import IGNORE_INDEX, caption_loss

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
    patch_dropout: float = 0.0  # fraction of patch tokens dropped in training, where switched on
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
    """The paper's setting (DESIGN.md sections 2-3, 7), frozen video patch dropout included."""
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
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, Tq, Tk)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


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
# 3. The CLIP ViT encoders (DESIGN.md section 2)


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.attn_impl = "auto"

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, impl=self.attn_impl)))


class CLIPMLP(nn.Module):
    def __init__(self, width, mlp_dim):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU ("gelu", not quick-gelu)


class CLIPLayer(nn.Module):
    """Pre-LN block. The video variant first mixes each spatial position across frames."""

    def __init__(self, cfg: VisionConfig):
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

    def forward(self, x, num_frames):
        if self.temporal:
            N = x.size(1)
            # attention runs over the frames of each position: (B*T, N, D) -> (B*N, T, D)
            x = rearrange(x, "(b t) n d -> (b n) t d", t=num_frames)
            # the temporal embedding is added to the residual stream itself, as in LanguageBind
            x = x + self.temporal_embedding[:, :num_frames]
            x = x + self.temporal_attn(self.temporal_layer_norm1(x))
            x = rearrange(x, "(b n) t d -> (b t) n d", n=N)  # (B*N, T, D) -> (B*T, N, D)
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.layers)])


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
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        # stage 1's projection into the shared space (LanguageBind's `visual_projection`)
        self.visual_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        # Patch dropout's one switch: training drops cfg.patch_dropout of the patches only where
        # the tower's owner turns this on, once (UniQ4Cap's constructor, train_align.py)
        self.drop_patches_in_training = False
        self.reset_parameters()

    def reset_parameters(self):
        """A tower's own initialisation, for training from scratch (the tiny preset; the
        pretrained loaders overwrite all of it). Every linear and patch-embedding weight has
        std fan_in^-0.5, so each layer's output keeps its input's scale, biases zero; the class,
        position and temporal embeddings have std width^-0.5, CLIP's scale, so tokens from
        different positions and frames start apart. BERT's 0.02, which the towers had before,
        is fan_in^-0.5 only at a width of 2,500: in the width-64 tiny towers stage 1 then
        learned several times slower (README, stage 1)."""
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
        if self.training and self.drop_patches_in_training:
            x = self.drop_patches(x, B, T)
        x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x, T)
        frame_embeds = self.post_layernorm(x[:, 0]).view(B, T, -1)  # (B*T, D) -> (B, T, D)
        hidden = x.reshape(B, -1, x.size(-1))  # (B*T, N', D) -> (B, T*N', D)
        return hidden, frame_embeds

    def drop_patches(self, x, B, T):
        """Keep a random subset of patch tokens (the class token always stays), with the same
        kept positions in every frame of a video so temporal attention still lines up."""
        BT, N1, D = x.shape
        N = N1 - 1
        keep = max(1, int(N * (1.0 - self.cfg.patch_dropout)))
        if keep == N:  # a rate of 0 drops nothing
            return x
        idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep] + 1  # (B, keep)
        idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)  # class token at 0
        idx = idx.repeat_interleave(T, dim=0)[:, :, None].expand(-1, -1, D)  # (B*T, 1+keep, D)
        return x.gather(1, idx)


# -----------------------------------------------------------------------------
# 4. The Q-Former (BLIP-2 style, post-LN BERT; DESIGN.md section 3)


class BertAttentionHeads(nn.Module):
    """Projections of one BERT attention; `key`/`value` read `kv_width` inputs (the memory
    width for cross-attention)."""

    def __init__(self, cfg: QFormerConfig, kv_width):
        super().__init__()
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)


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
        self.self = BertAttentionHeads(cfg, kv_width)  # named `self` after the checkpoints
        self.output = BertAddNorm(cfg.hidden, cfg.hidden, cfg)
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.attn_impl = "auto"

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


class BertEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, i % cfg.cross_attention_freq == 0)
                                    for i in range(cfg.layers)])


class BertModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


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


class LMHead(nn.Module):
    def __init__(self, cfg, word_embeddings):
        super().__init__()
        self.predictions = LMPredictions(cfg, word_embeddings)


class QFormer(nn.Module):
    """The transformer with two entry points:
      read_memory: learned queries read the memory; every layer's self-attention keys and
        values of the queries are returned so the text never has to recompute them (the
        queries' own outputs are not: nothing reads them);
      decode_text: text tokens attend to all cached queries and to earlier text, and the LM
        head predicts the next word."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)
        self.cls = LMHead(cfg, self.bert.embeddings.word_embeddings)

    def read_memory(self, queries, memory, memory_mask=None):
        """queries (1, Q, C), the same for every clip; memory (B, M, W); memory_mask (B, M)
        bool, True = present. Returns what the text reads: per layer, the queries'
        self-attention (k, v), each (B, H, Q, d).

        The text at layer l reads keys and values computed from layer l's *input*, so the
        last layer's query outputs reach nothing: of that layer only the key and value
        projections of the queries run. Its query-side self-attention output, cross-attention
        and query FFN are never computed (and UniQ4Cap does not train them)."""
        x = self.bert.embeddings(queries=queries.expand(memory.size(0), -1, -1))  # (B, Q, C)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, M)
        *body, last = self.bert.encoder.layer
        cache = []
        for layer in body:
            x, kv = layer.forward_queries(x, memory, mask)
            cache.append(kv)
        cache.append(last.attention.keys_values(x))
        return cache

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


# -----------------------------------------------------------------------------
# 5. The captioner: encode -> memory -> Q-Former


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (the encoders may run in bf16):
    each modality's tokens pass one on their way into the memory."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class UniQ4Cap(nn.Module):
    """Video and audio encoders -> per-modality LayerNorm + projection -> one memory ->
    Q-Former queries -> caption. Module names match the authors' stage-2 checkpoint."""

    def __init__(self, cfg: UniQ4CapConfig, freeze_encoders=True, encoders=True):
        super().__init__()
        self.cfg = cfg
        self.freeze_encoders = freeze_encoders
        q = cfg.qformer
        # The towers initialise from a generator of their own, seeded by one draw from the
        # global one, so the rest of the model initialises the same whether they are built
        # here, later (build_encoders) or never (a run that reads a complete feature cache).
        # The slots keep their place, and so the state dict's order, until they are filled.
        self.encoder_seed = int(torch.randint(2 ** 62, (), device="cpu"))  # (cpu: also under a meta device)
        self.register_module("video_encoder", None)
        self.register_module("audio_encoder", None)
        self.ln_video = LayerNormFp32(cfg.video.width)
        self.ln_audio = LayerNormFp32(cfg.audio.width)
        self.video_project = nn.Linear(cfg.video.width, q.encoder_width)
        self.audio_project = nn.Linear(cfg.audio.width, q.encoder_width)
        self.Qformer = QFormer(q)
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_query_tokens, q.hidden))
        # BLIP-2's optional retrieval / matching heads: present so checkpoints load, not used
        # by the captioning loss (as in the authors' final code)
        self.vision_proj = nn.Linear(q.hidden, q.proj_dim)
        self.text_proj = nn.Linear(q.hidden, q.proj_dim)
        self.itm_head = nn.Linear(q.hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for child in self.children():  # (no towers yet: they initialise themselves)
            child.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        for proj in (self.video_project, self.audio_project):
            # new layers reading LayerNorm'd tokens: std fan_in^-0.5 keeps the memory at unit
            # scale. BERT's 0.02 is that value for ~2,500 inputs; at the tiny preset's 64 it
            # left the memory so faint that a video-only model often never learned to read it
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        # What the caption loss cannot reach stays in the model and its state dict (the
        # authors' and BLIP-2's files carry it) but is never trained: nothing would give it a
        # gradient, and under DDP a trained parameter without one stops the run
        for p in self.unreachable_parameters():
            p.requires_grad_(False)
        if encoders:
            self.build_encoders()
        self.train()

    @staticmethod
    def _init_weights(m):
        # BERT's initialisation for all but the towers (VisionTransformer.reset_parameters);
        # the pretrained loaders overwrite what they cover
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encoder_parameters(self):
        return [p for enc in (self.video_encoder, self.audio_encoder) if enc is not None for p in enc.parameters()]

    def build_encoders(self):
        """Build the two towers, freshly initialised from `encoder_seed` (the same weights
        whenever they are built), on the CPU: the caller loads their weights and moves them."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.encoder_seed)
            self.video_encoder = VisionTransformer(self.cfg.video)
            self.audio_encoder = VisionTransformer(self.cfg.audio)
        if self.freeze_encoders:
            for p in self.encoder_parameters():
                p.requires_grad_(False)
        # patch dropout's one decision: trained encoders drop patches in training; frozen ones
        # only when the config says so (the authors' stage 2, see UniQ4CapConfig)
        self.video_encoder.drop_patches_in_training = self.cfg.frozen_patch_dropout or not self.freeze_encoders
        return self.train(self.training)

    def drop_encoders(self):
        """Let go of the frozen towers once a feature cache holds their outputs: a model that
        trains and evaluates from cached tokens never calls them, and at the full preset they
        are 0.6B of its 0.8B parameters. Pixels given afterwards are an error (encode)."""
        if not self.freeze_encoders:
            raise ValueError("trained encoders cannot be dropped: they are part of what is trained")
        self.video_encoder = self.audio_encoder = None

    def unreachable_parameters(self):
        """Parameters no caption depends on: BLIP-2's retrieval and matching heads (`temp`,
        `vision_proj`, `text_proj`, `itm_head`), and the last Q-Former layer's query path
        (its cross-attention and query FFN), whose outputs no text reads (QFormer.read_memory
        explains why). The last layer's self-attention stays: the text runs through it."""
        last = self.Qformer.bert.encoder.layer[-1]
        parts = [self.vision_proj, self.text_proj, self.itm_head, last.intermediate_query, last.output_query]
        if last.has_cross:
            parts.append(last.crossattention)
        return [self.temp] + [p for m in parts for p in m.parameters()]

    def train(self, mode=True):
        """Frozen encoders stay in eval mode: the Q-Former trains, the encoders only read. The
        one exception is the video tower of a `cfg.frozen_patch_dropout` model, which drops
        patches in training as the authors' did (they left the encoders in training mode)."""
        super().train(mode)
        if self.freeze_encoders and self.video_encoder is not None:  # (None: not built, or dropped)
            self.audio_encoder.eval()
            self.video_encoder.train(mode and self.video_encoder.drop_patches_in_training)
        return self

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- the three steps: encode, memory, Q-Former ------------------------------------------

    def encode(self, video=None, audio=None, video_tokens=None, audio_tokens=None):
        """Step 1, the encoders, and the one place that takes either pixels or cached tokens.
        Each modality comes as pixels (video (B, 3, T, H, W), audio (B, 3, mel, time)), as the
        tokens this step returns (from a feature cache), or as None (absent from the batch).
        Returns (video_tokens (B, Nv, cfg.video.width) or None, audio_tokens (B, Na,
        cfg.audio.width) or None): what a feature cache stores."""
        for name, pixels, tokens in (("video", video, video_tokens), ("audio", audio, audio_tokens)):
            if pixels is not None and tokens is not None:
                raise ValueError(f"{name} given twice: as pixels and as {name}_tokens")
            if pixels is not None and getattr(self, f"{name}_encoder") is None:
                raise ValueError(f"{name} given as pixels, but this model has no encoders (not built, or dropped): "
                                 f"give {name}_tokens")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            if video is not None:
                video_tokens = self.video_encoder(video)[0]
            if audio is not None:
                audio_tokens = self.audio_encoder(audio)[0]
        return video_tokens, audio_tokens

    def memory(self, video_tokens=None, audio_tokens=None, video_mask=None, audio_mask=None):
        """Step 2: each modality's tokens through its LayerNorm and projection, then
        concatenated along the token axis. A clip whose video (or audio) is missing has those
        tokens masked out of cross-attention.
        Returns memory (B, Nv+Na, W) and memory_mask (B, Nv+Na) or None when nothing is masked.
        Step 3 is the Q-Former's: `self.Qformer.read_memory(self.query_tokens, memory, mask)`.

        A modality that is None (absent from the whole batch, or not read at all) still runs
        its LayerNorm and projection, on zero tokens: its parameters then get a zero gradient
        instead of none, so under DDP every rank all-reduces every trained parameter whatever
        its micro-batch holds. (A masked modality needs nothing: masked attention already
        gives its projection a zero gradient.)"""
        given = video_tokens if video_tokens is not None else audio_tokens
        if given is None:
            raise ValueError("a clip needs video or audio: both are None")
        parts, masks = [], []
        for tokens, present, ln, proj in ((video_tokens, video_mask, self.ln_video, self.video_project),
                                          (audio_tokens, audio_mask, self.ln_audio, self.audio_project)):
            if tokens is None:
                tokens = given.new_zeros(given.size(0), 0, proj.in_features)  # (B, 0, D)
            parts.append(proj(ln(tokens)))
            B, N = tokens.shape[:2]
            if present is None:
                present = torch.ones(B, dtype=torch.bool, device=tokens.device)
            masks.append(present[:, None].expand(B, N))  # (B,) -> (B, N)
        memory_mask = torch.cat(masks, dim=1)
        if not memory_mask.any(dim=1).all():
            raise ValueError("a clip in the batch has neither video nor audio")
        return torch.cat(parts, dim=1), None if memory_mask.all() else memory_mask

    # -- training and generation ------------------------------------------------------------

    def forward(self, video=None, audio=None, captions=None, caption_mask=None,
                video_mask=None, audio_mask=None, video_tokens=None, audio_tokens=None):
        """Pixels or cached tokens as in `encode`, masks as in `memory`. captions (B, T):
        [DEC] w1 ... wn [SEP] [PAD]...; caption_mask (B, T) marks real tokens. Returns
        (logits (B, T, V), loss): position t predicts token t+1; padding and the last position
        are ignored; label smoothing as in the paper."""
        video_tokens, audio_tokens = self.encode(video, audio, video_tokens, audio_tokens)
        memory, memory_mask = self.memory(video_tokens, audio_tokens, video_mask, audio_mask)
        query_kv = self.Qformer.read_memory(self.query_tokens, memory, memory_mask)
        logits, _ = self.Qformer.decode_text(captions, query_kv, caption_mask)
        targets = captions[:, 1:].clone()  # (B, T-1)
        if caption_mask is not None:
            targets[~caption_mask[:, 1:].bool()] = IGNORE_INDEX
        loss = caption_loss(logits[:, :-1], targets, self.cfg.label_smoothing)
        return logits, loss

    @torch.no_grad()
    def generate(self, video=None, audio=None, video_mask=None, audio_mask=None, *,
                 video_tokens=None, audio_tokens=None, method="greedy", num_beams=5,
                 length_penalty=1.0, top_k=0, top_p=0.9, temperature=1.0, min_length=1,
                 max_length=30, repetition_penalty=1.0, num_captions=1, use_cache=True):
        """Caption each clip (inputs as for `forward`). method: "greedy", "beam" (num_beams,
        length_penalty) or "sample" (top_k and/or nucleus top_p, temperature). Lengths count
        the caption's tokens as HF's generate does, the [DEC] start token included: at most
        max_length - 1 tokens are generated ([SEP] among them), and [SEP] is blocked until the
        caption holds min_length tokens (so the original's max_length=30, min_length=10 mean
        the same here). One meaning everywhere: sample.py's and train_caption.py's
        --max-length / --min-length pass straight through. repetition_penalty > 1 makes tokens
        already generated less likely (CTRL's rule). Returns token ids
        (B * num_captions, L) without the leading [DEC], padded after [SEP], the
        captions of clip b in rows b*num_captions ... (b+1)*num_captions - 1.

        The encoders run once. With use_cache the queries also run once per clip and the
        text's keys and values are cached, so each step costs one token. use_cache=False
        recomputes the query pass and the whole text at every step, as a decoder without a
        KV cache does (the reference the cached path is tested against). The decoding
        itself is section 6 (Generation)."""
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


# -----------------------------------------------------------------------------
# 7. Tokenizer


class Tokenizer:
    """BERT WordPiece through the `tokenizers` package, plus the BOS token [DEC].

    Either bert-base-cased's own `vocab.txt` (28,996 entries; [DEC] becomes id 28,996) or,
    without BERT files, a WordPiece vocabulary trained on the training captions. A caption
    encodes as [DEC] w1 ... wn [SEP] (BERT's [CLS] replaced by [DEC], as the authors did)."""

    SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    def __init__(self, tok):
        self.tok = tok
        self.tok.add_special_tokens([AddedToken("[DEC]", special=True)])
        self.pad_id = tok.token_to_id("[PAD]")
        self.sep_id = tok.token_to_id("[SEP]")
        self.cls_id = tok.token_to_id("[CLS]")
        self.bos_id = tok.token_to_id("[DEC]")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_bert(cls, name):
        """BERT's vocab.txt from a folder (or the folder of a weights file), or from a Hugging
        Face repo id such as `google-bert/bert-base-cased` (see `bert_folder`). Casing follows
        the folder's tokenizer_config.json (`do_lower_case`, `strip_accents`), as HF's own
        tokenizer does: an uncased vocabulary read without lower-casing would turn every
        capitalised word into [UNK]. Without that setting, a vocabulary with no upper-case
        entry is taken as uncased, and stderr says which was chosen."""
        folder = bert_folder(name)
        path = os.path.join(folder, "vocab.txt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no BERT vocabulary at {path}")
        settings = {}
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(config):
            with open(config) as f:
                settings = json.load(f)
        lower = settings.get("do_lower_case")
        if lower is None:
            with open(path, encoding="utf-8") as f:
                lower = not any(w != w.lower() for w in f.read().split() if not w.startswith("["))
            print(f"{folder}: no do_lower_case in tokenizer_config.json; the vocabulary is "
                  f"{'uncased: captions are lower-cased' if lower else 'cased: captions keep their case'}",
                  file=sys.stderr)
        # strip_accents None follows lowercase, as in HF's BertTokenizer
        return cls(BertWordPieceTokenizer(path, lowercase=bool(lower), strip_accents=settings.get("strip_accents")))

    @classmethod
    def train(cls, captions, vocab_size=1000):
        """A WordPiece vocabulary from `captions` (for training without BERT files): the special
        tokens, every character seen (alone and as a `##` continuation, so any word of the
        captions can be spelled), then whole words by falling count, ties alphabetical, up to
        `vocab_size`. Built by rule rather than by the tokenizers library's trainer, whose
        pieces and ids change from one call to the next (ties broken by hash order), so the
        same captions always give the same ids and a run with the same seed trains the same."""
        split = BertPreTokenizer().pre_tokenize_str  # BERT's word and punctuation split
        counts = Counter(w for c in captions for w, _ in split(c))
        chars = sorted({ch for w in counts for ch in w})
        vocab = cls.SPECIALS + ["[DEC]"] + chars + ["##" + ch for ch in chars]
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[:max(0, vocab_size - len(vocab))]
        return cls(BertWordPieceTokenizer({w: i for i, w in enumerate(vocab)}, lowercase=False,
                                          strip_accents=False))

    @classmethod
    def load(cls, path):
        """A tokenizer saved by `save` (a tokenizers JSON file)."""
        return cls(HFTokenizer.from_file(path))

    @classmethod
    def from_string(cls, text):
        """A tokenizer stored inside a checkpoint (`Tokenizer.tok.to_str()`)."""
        return cls(HFTokenizer.from_str(text))

    def save(self, path):
        self.tok.save(path)

    def configure(self, cfg: UniQ4CapConfig):
        """Set the model config's vocabulary size and special ids from this tokenizer."""
        q = cfg.qformer
        q.vocab_size, q.pad_token_id, q.sep_token_id, q.bos_token_id = (
            self.vocab_size, self.pad_id, self.sep_id, self.bos_id)
        return cfg

    def encode(self, captions, max_len=32):
        """list of str -> ids (B, T) and mask (B, T) bool, padded to the longest, at most
        max_len tokens including [DEC] and [SEP]."""
        rows = []
        for enc in self.tok.encode_batch(list(captions), add_special_tokens=False):
            rows.append([self.bos_id] + enc.ids[:max_len - 2] + [self.sep_id])
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, ids != self.pad_id

    def decode(self, ids):
        """Token ids (without [DEC]) -> caption, stopping at the first [SEP]."""
        ids = [int(i) for i in ids]
        if self.sep_id in ids:
            ids = ids[:ids.index(self.sep_id)]
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])


# -----------------------------------------------------------------------------
# 8. Loading the official checkpoints by name mapping (DESIGN.md section 5)
#
# Each loader reads one file into a plain state dict (`read_state_dict`), then a `map_*`
# function renames and reshapes it into this model's names and hands it to `assign`, which
# refuses to leave anything to chance: a source key that maps nowhere and is not known to be
# ignorable, a target the file does not cover, or a shape that differs is an error naming the
# key. Only buffers the model recomputes (`position_ids`) are dropped; every parameter is
# checked. The `map_*` functions take the state dict itself, so tests can run them on the
# `meta` device with the full preset's shapes. The `load_*` functions take any name a user
# would give (a file, a folder, a URL, a Hugging Face repo id; `weights_file` at the end of
# this section), and `load_pretrained` is the one entry point the scripts use.


class CheckpointError(KeyError, ValueError):
    """A checkpoint that cannot be loaded: unreadable, or keys and shapes that do not fit this
    model. The message is one line naming the file. (A KeyError for the key-level problems and
    a ValueError for the rest, with a plain message: KeyError's own str() would quote it.)"""

    __str__ = Exception.__str__


# HF's BERT and CLIP save their position index tables (an arange) as persistent buffers;
# this model computes positions on the fly, so such a key carries nothing to load.
RECOMPUTED_BUFFERS = ("position_ids",)


def read_state_dict(path):
    """A .safetensors file or a torch pickle, loaded with weights_only=True. A missing file
    is a FileNotFoundError; a truncated or corrupt one a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 120:  # torch's messages go on about weights_only; the first sentence says it
            reason = reason.split(". ")[0]
        raise CheckpointError(f"{path}: cannot read this checkpoint (truncated, corrupt or not a "
                              f"PyTorch/safetensors file: {reason})") from e


def _left_parts(left, fresh):
    """Parameter names a file does not cover -> one phrase per reason, naming the modules
    up to the matching `fresh` pattern with layer numbers folded:
    'bert.encoder.layer.{0,2}.crossattention (new: ...)'."""
    parts = {}  # reason -> {module path with '*' for the layer number: layer numbers}
    for k in left:
        f = next(f for f in fresh if f in k)
        path = k[:k.index(f) + len(f)].strip(".")
        m = re.search(r"\.(\d+)\.", path)
        key = path if m is None else path[:m.start()] + ".*." + path[m.end():]
        parts.setdefault(fresh[f], {}).setdefault(key, set()).update([int(m.group(1))] if m else [])
    phrases = []
    for reason, paths in parts.items():
        names = [p.replace("*", str(*n) if len(n) == 1 else "{" + ",".join(map(str, sorted(n))) + "}")
                 for p, n in paths.items()]
        phrases.append(f"{', '.join(names)} ({reason})")
    return "; ".join(phrases)


def assign(module, tensors, source, fresh=None):
    """Copy `tensors` (our names -> tensors) into `module`'s parameters. Every parameter must
    be covered except those whose name contains one of the `fresh` patterns: the parts this
    source does not provide by design, a dict pattern -> where they come from instead (or
    why they stay as they are), which stderr reports. Keys of RECOMPUTED_BUFFERS are dropped.
    Returns the names assigned."""
    fresh = fresh or {}
    tensors = {k: t for k, t in tensors.items() if k.rsplit(".", 1)[-1] not in RECOMPUTED_BUFFERS}
    own = dict(module.named_parameters())  # tied weights appear once
    for k, t in tensors.items():
        if k not in own:
            raise CheckpointError(f"{source}: '{k}' has no place in {type(module).__name__}")
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: shape mismatch for '{k}': expected "
                                  f"{tuple(own[k].shape)}, found {tuple(t.shape)}")
    missing = [k for k in own if k not in tensors and not any(f in k for f in fresh)]
    if missing:
        raise CheckpointError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    left = [k for k in own if k not in tensors]
    if left:  # said aloud, never silent: which parts this file leaves to another source
        print(f"{source}: {len(tensors)} tensors loaded into {type(module).__name__}; not from this "
              f"file: {_left_parts(left, fresh)}", file=sys.stderr)
    return sorted(tensors)


def _fit_positions(pos, grid, name):
    """Position embedding (1+h*w, D) of a square grid -> (1 + grid[0]*grid[1], D), bicubic with
    antialias on the patch positions, class position kept (image CLIP -> audio grid)."""
    n = pos.size(0) - 1
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"{name}: cannot interpolate {n} positions, not a square grid")
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", antialias=True,
                            align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # -> (gh*gw, D)
    return torch.cat([pos[:1], patches.to(pos.dtype)], dim=0)


ENCODER_OPTIONAL = {"visual_projection.weight": "unused by the captioner: stays as initialised"}


def map_encoder(encoder: VisionTransformer, sd, source):
    """One CLIP vision tower from a state dict with the authors' names (no prefix). Handles
    the differences between the official files by shape: a Conv2d patch weight meets our
    Conv3d (unsqueeze the time axis: tube size 1 is the same function), one class vector meets
    one per frame (repeat it), an image checkpoint's 257 positions meet the audio grid
    (interpolate), and a temporal embedding for another frame count (interpolate in time).
    A file already in the Conv3d / per-frame form (the authors' video.pth, and LanguageBind
    files saved after expanding to 3-D) loads as it is. `visual_projection.weight` is
    optional: stage 2 never reads it."""
    cfg = encoder.cfg
    out = {}
    for k, t in sd.items():
        if k == "embeddings.patch_embedding.weight" and t.dim() == 4 and cfg.temporal:
            t = t.unsqueeze(2)  # (D, 3, p, p) -> (D, 3, 1, p, p)
        elif k == "embeddings.class_embedding" and cfg.temporal and t.dim() == 1:
            t = t[None].repeat(cfg.num_frames, 1)  # (D,) -> (T, D)
        elif k == "embeddings.position_embedding.weight" and t.size(0) != cfg.tokens_per_frame:
            t = _fit_positions(t, cfg.grid, f"{source}: '{k}'")
        elif k.endswith("temporal_embedding") and t.size(1) != cfg.num_frames:
            t = F.interpolate(t.float().transpose(1, 2), size=cfg.num_frames, mode="linear",
                              align_corners=False).transpose(1, 2).to(t.dtype)  # (1, T', D) -> (1, T, D)
        out[k] = t
    return assign(encoder, out, source, fresh=ENCODER_OPTIONAL)


def map_languagebind(encoder: VisionTransformer, sd, source="pytorch_model.bin"):
    """LanguageBind's HF checkpoint, `pytorch_model.bin` of `LanguageBind_Video_FT` or
    `LanguageBind_Audio_FT`: `vision_model.*` and `visual_projection.weight` are read; the text
    tower (`text_model.*`, `text_projection.weight`, `logit_scale`) is not needed."""
    vision = {}
    for k, t in sd.items():
        if k.startswith("vision_model."):
            vision[k[len("vision_model."):]] = t
        elif k == "visual_projection.weight":
            vision[k] = t
        elif not (k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale")):
            raise CheckpointError(f"{source}: unexpected key '{k}'")
    return map_encoder(encoder, vision, source)


def load_languagebind(encoder: VisionTransformer, name):
    """`LanguageBind_Video_FT` or `LanguageBind_Audio_FT`: the file, its folder, or the repo
    id (`LanguageBind/LanguageBind_Video_FT`; see `weights_file`)."""
    path = weights_file(name)
    return map_languagebind(encoder, read_state_dict(path), path)


def load_encoder(encoder: VisionTransformer, name):
    """The authors' pre-aligned encoders, `video.pth` / `audio.pth`: a plain state dict with
    LanguageBind's vision names without the `vision_model.` prefix (video in the Conv3d /
    per-frame class variant). `train_align.py` writes its encoders in the same format."""
    path = weights_file(name)
    return map_encoder(encoder, read_state_dict(path), path)


def load_any_encoder(encoder: VisionTransformer, name):
    """Either encoder format, told apart by LanguageBind's `vision_model.` prefix; the file is
    read once. `name` as for `weights_file`."""
    path = weights_file(name)
    sd = read_state_dict(path)
    if isinstance(sd.get("model"), dict):  # a whole state dict nested in a checkpoint
        raise CheckpointError(f"{path}: a training or stage-2 checkpoint (its weights under 'model'), not an "
                              f"encoder's weights: give the encoder file (LanguageBind's, or train_align.py's "
                              f"video.pth / audio.pth)")
    if any(k.startswith("vision_model.") for k in sd):
        return map_languagebind(encoder, sd, path)
    return map_encoder(encoder, sd, path)


def _bert_name(k):
    """bert-base-cased name -> ours (inside `Qformer`), or None for keys we do not use."""
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if (k.startswith(("bert.pooler.", "cls.seq_relationship."))
            or k in ("bert.embeddings.token_type_embeddings.weight",
                     "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")):
        # unused by a captioner; the decoder weight is tied to the word embeddings and
        # decoder.bias is an alias of predictions.bias
        return None
    if k.startswith(("bert.embeddings.", "bert.encoder.", "cls.predictions.")):
        return k
    raise CheckpointError(f"unexpected key '{k}'")


BERT_FRESH = {".crossattention.": "new in BERT: from BLIP-2's checkpoint, else trained from scratch"}


def map_bert(model: "UniQ4Cap", sd, source="bert-base-cased"):
    """BERT into the Q-Former: embeddings, self-attention, text FFN and LM head. Reads
    bert-base-cased's files (BertForPreTraining: `bert.*` and `cls.*`), and also a bare
    BertModel without the `bert.` prefix (`BertModel.save_pretrained`, sentence-transformers)
    and a file without the MLM head: then the head's transform and output bias start from
    BERT's initialisation (the decoder stays tied to the loaded word embeddings), said on
    stderr. The vocabulary grows by one row for [DEC], initialised like BERT's (normal,
    std 0.02; output bias 0). The query FFN starts as a copy of the text FFN. The
    cross-attention is not BERT's: BLIP-2's checkpoint or training provides it."""
    q = model.cfg.qformer
    if not any(k.startswith(("bert.", "cls.")) for k in sd):
        sd = {"bert." + k: t for k, t in sd.items()}  # a bare BertModel: embeddings.*, encoder.*, pooler.*
    out = {}
    for k, t in sd.items():
        try:
            ours = _bert_name(k)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if ours is None:
            continue
        if ours in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias") and t.size(0) == q.vocab_size - 1:
            extra = torch.zeros_like(t[:1])  # the [DEC] row
            if t.dim() == 2:
                extra.normal_(std=0.02)
            t = torch.cat([t, extra], dim=0)
        out[ours] = t
        if re.match(r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.", ours):
            # layer.N.intermediate.* -> layer.N.intermediate_query.*, same for output
            out[re.sub(r"\.(intermediate|output)\.", r".\1_query.", ours, count=1)] = t
    fresh = dict(BERT_FRESH)
    no_head = not any(k.startswith("cls.predictions.") for k in out)
    if no_head:
        fresh["cls.predictions."] = "no MLM head in this file: BERT's initialisation, decoder tied to the word embeddings"
    names = assign(model.Qformer, out, source, fresh=fresh)
    if no_head:  # whatever an earlier load left there, the head starts as BERT's would
        head = model.Qformer.cls.predictions
        head.transform.apply(UniQ4Cap._init_weights)
        with torch.no_grad():
            head.bias.zero_()
    return names


def load_bert(model: "UniQ4Cap", name):
    """BERT's `model.safetensors` or `pytorch_model.bin` (old `gamma`/`beta` or new
    `weight`/`bias` LayerNorm names): the file, its folder, or a repo id such as
    `google-bert/bert-base-cased` (see `weights_file`)."""
    path = weights_file(name)
    return map_bert(model, read_state_dict(path), path)


def map_blip2(model: "UniQ4Cap", sd, source="blip2_pretrained.pth", query_noise=0.0):
    """BLIP-2's pretrained Q-Former into ours, as the authors initialised stage 2: every key
    containing `embedding` or `predictions` is skipped (word/position embeddings, the
    position_ids buffer and the LM head come from bert-base-cased, whose cased vocabulary
    differs from BLIP-2's uncased one), and the 32 query tokens are tiled to our count.
    `query_noise` adds Gaussian noise of that std to the tiled queries so twins do not start
    identical. BLIP-2's `ln_vision` (1408 wide, for its EVA ViT) has no counterpart here.
    Provides: the Q-Former's encoder layers (cross-attention included), query_tokens and the
    optional heads."""
    Q = model.cfg.qformer.num_query_tokens
    out = {}
    for k, t in sd.items():
        if "embedding" in k or "predictions" in k or k.startswith(("ln_vision.", "visual_encoder.")):
            continue
        if k == "query_tokens":
            if Q % t.size(1):
                raise CheckpointError(f"{source}: cannot tile {t.size(1)} query tokens to {Q}")
            t = t.repeat(1, Q // t.size(1), 1)  # (1, 32, C) -> (1, 64, C): [q0..q31, q0..q31]
            if query_noise > 0:
                t = t + query_noise * torch.randn_like(t)
        out[k] = t
    encoders, new = "the encoder files", "new in UniQ4Cap: trained in stage 2"
    bert = "from bert-base-cased: BLIP-2's vocabulary is uncased"
    return assign(model, out, source, fresh={
        "video_encoder.": encoders, "audio_encoder.": encoders, "ln_video.": new, "ln_audio.": new,
        "video_project.": new, "audio_project.": new, "Qformer.bert.embeddings.": bert, "Qformer.cls.": bert})


def load_blip2(model: "UniQ4Cap", name, query_noise=0.0):
    """BLIP-2's `blip2_pretrained.pth`, {"model": state_dict} (186M parameters): the file,
    its URL, or the short name `blip2` for that URL (see `weights_file`)."""
    path = weights_file(name)
    ckpt = read_state_dict(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry: not BLIP-2's blip2_pretrained.pth")
    return map_blip2(model, ckpt["model"], path, query_noise)


def stage2_state_dict(model: "UniQ4Cap"):
    """What a stage-2 checkpoint holds: everything but the frozen encoders (the authors'
    `checkpoint_N.pth` layout; `train_caption.py` writes the same)."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("video_encoder.", "audio_encoder."))}


def map_stage2(model: "UniQ4Cap", sd, source="checkpoint.pth"):
    """A stage-2 state dict: Q-Former, query tokens, ln_video/ln_audio, the projections and
    the optional heads, all required; the encoders are loaded separately. The authors' file
    also holds the frozen parts' position_ids buffers (their trainer drops only frozen
    *parameters*): dropped, see RECOMPUTED_BUFFERS."""
    aliases = ("Qformer.cls.predictions.decoder.weight",  # tied to the word embeddings
               "Qformer.cls.predictions.decoder.bias")  # alias of predictions.bias
    out = {k: t for k, t in sd.items() if k not in aliases}
    return assign(model, out, source, fresh={"video_encoder.": "the encoder files",
                                             "audio_encoder.": "the encoder files"})


def load_stage2(model: "UniQ4Cap", path):
    """The authors' stage-2 `checkpoint_N.pth` ({"model", "optimizer", "config", "scaler",
    "epoch"}, "config" being their run configuration), or one written by train_caption.py
    (the same "model", plus our config and tokenizer)."""
    ckpt = read_state_dict(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry: not a stage-2 checkpoint")
    return map_stage2(model, ckpt["model"], path)


# Where a name that is not a local path is looked up. The Hugging Face repos resolve through
# huggingface_hub (its standard cache, HF_HOME / HF_HUB_CACHE, and HF_HUB_OFFLINE honoured);
# BLIP-2's file is a plain URL, fetched once into torch.hub's cache (TORCH_HOME).
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in this order of preference
URLS = {"blip2": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained.pth"}


def _is_repo_id(name):
    """`org/name`, or a bare legacy name such as `bert-base-cased` (the Hub still resolves
    those). Asked only of names that are no local path; a mistyped one like
    `out/align/video.pth`, `/data/bert` or `video.pth` (a path separator beyond org/name, or
    a file name's ending) is reported as missing, not looked up on the Hub."""
    return (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
            and not name.lower().endswith((".pth", ".pt", ".bin", ".safetensors", ".json", ".txt")))


def _hf_file(repo, filenames):
    """The first of `filenames` that repo `repo` has, as a path in the HF cache (downloaded
    once unless HF_HUB_OFFLINE is set). None when the repo has none of them."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError)
    for f in filenames:
        try:
            return hf_hub_download(repo, f)
        except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: caught first)
            if constants.HF_HUB_OFFLINE:  # not in the cache: the next may be
                continue
            error = e  # online, but the Hub could not be reached and the cache lacks it
        except EntryNotFoundError:  # the repo has no such file: try the next
            continue
        except (HfHubHTTPError, HFValidationError, OSError) as e:
            error = e
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FileNotFoundError(f"{repo}: no such file or folder here, and the Hugging Face Hub "
                                f"could not provide {f}: {reason}")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{repo}: no such file or folder here, and HF_HUB_OFFLINE is set while "
                                f"the Hugging Face cache ({constants.HF_HUB_CACHE}) has no "
                                f"{' or '.join(filenames)} of it")
    return None


def _url_file(url):
    """A URL's file in torch.hub's cache, `<torch.hub.get_dir()>/checkpoints/<file name>` (where
    torch.hub.load_state_dict_from_url keeps it too), downloaded the first time."""
    from urllib.parse import urlparse
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading {url} to {path}", file=sys.stderr)
        try:
            torch.hub.download_url_to_file(url, path)
        except OSError as e:  # URLError and HTTPError are OSErrors
            raise FileNotFoundError(f"{url}: cannot download it: {e}") from None
    return path


def _not_found(name):
    return FileNotFoundError(f"{name}: no such file or folder, and not a URL or a Hugging Face repo id")


def weights_file(name):
    """Any way of naming a checkpoint -> a local weights file:
      - an existing file: itself;
      - a folder: its model.safetensors, else its pytorch_model.bin (an HF model folder);
      - a URL (http, https, file) or a name in URLS (`blip2`): torch.hub's cached copy;
      - a Hugging Face repo id (`LanguageBind/LanguageBind_Video_FT`,
        `google-bert/bert-base-cased`, or a legacy bare name such as `bert-base-cased`)
        that is no local path and no file name: model.safetensors, else pytorch_model.bin, through
        huggingface_hub's cache (only that file is fetched).
    huggingface_hub is imported only for a repo id. Anything else is a FileNotFoundError
    with one line saying what `name` is not."""
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        for f in HF_WEIGHTS:
            if os.path.isfile(os.path.join(name, f)):
                return os.path.join(name, f)
        raise FileNotFoundError(f"{name}: a folder without {' or '.join(HF_WEIGHTS)}")
    url = URLS.get(name, name)
    if url.startswith(("http://", "https://", "file://")):
        return _url_file(url)
    if _is_repo_id(name):
        path = _hf_file(name, HF_WEIGHTS)
        if path is None:
            raise FileNotFoundError(f"{name}: the Hugging Face repo has no {' or '.join(HF_WEIGHTS)}")
        return path
    raise _not_found(name)


def bert_folder(name):
    """A folder holding BERT's vocab.txt (and tokenizer_config.json when there is one): the
    folder itself, the folder of a weights file, or a Hugging Face repo id's snapshot in the
    HF cache (the tokenizer files only are fetched)."""
    if os.path.isdir(name):
        return name
    if os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name))
    if not _is_repo_id(name):
        raise _not_found(name)
    vocab = _hf_file(name, ["vocab.txt"])
    if vocab is None:
        raise FileNotFoundError(f"{name}: the Hugging Face repo has no vocab.txt")
    try:  # optional; fetched into the same snapshot folder as vocab.txt
        _hf_file(name, ["tokenizer_config.json"])
    except FileNotFoundError:  # neither cached nor reachable: from_bert says what it assumes
        pass
    return os.path.dirname(vocab)


def load_pretrained(model: "UniQ4Cap", video=None, audio=None, bert=None, blip2=None,
                    stage2=None, query_noise=0.0):
    """The one entry point for the official files: load whichever are given, in the order
    the authors built stage 2: encoders (LanguageBind's HF file or the authors' video.pth /
    audio.pth, told apart by the `vision_model.` prefix), then BERT, then BLIP-2's Q-Former,
    then a stage-2 checkpoint (which replaces everything but the encoders). Each may be a
    file, a folder, a URL, a short name or a Hugging Face repo id (see `weights_file`):

        load_pretrained(model, video="LanguageBind/LanguageBind_Video_FT",
                        audio="LanguageBind/LanguageBind_Audio_FT",
                        bert="google-bert/bert-base-cased", blip2="blip2")"""
    for name, encoder in ((video, model.video_encoder), (audio, model.audio_encoder)):
        if name is not None:
            load_any_encoder(encoder, name)
    if bert is not None:
        load_bert(model, bert)
    if blip2 is not None:
        load_blip2(model, blip2, query_noise)
    if stage2 is not None:
        load_stage2(model, stage2)
    return model
