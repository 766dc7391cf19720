"""UniQ4Cap: the whole model in one file.

Owns (DESIGN.md sections 2, 3 and 5):
  1. configs and the named presets (`full` = the paper, `tiny` = a 2-core CPU),
  2. the CLIP ViT-L/14 encoders: the video tower with per-layer temporal attention and the
     audio tower on a 3-channel log-mel image,
  3. the Q-Former (post-LN BERT with cross-attention and learned queries) and its LM head,
  4. the captioner that joins them: memory = [video tokens ; audio tokens], caption loss,
     generation with a KV cache,
  5. the tokenizer,
  6. loading every official checkpoint by an explicit name mapping.

Module names follow the official checkpoints' keys wherever that costs nothing, so most
of the loading code is an identity map plus a handful of reshapes.
"""

import math
import os
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    patch_dropout: float = 0.0  # fraction of patch tokens dropped; used only when asked for
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
    type_vocab_size: int = 2  # only for loading BERT; token types are not used
    encoder_width: int = 1408  # memory width the cross-attention reads
    cross_attention_freq: int = 2
    num_query_tokens: int = 64
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    proj_dim: int = 256  # vision_proj / text_proj of BLIP-2's optional heads


@dataclass
class UniQ4CapConfig:
    video: VisionConfig = field(default_factory=VisionConfig)
    audio: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    max_text_len: int = 32  # caption tokens including [DEC] and [SEP]
    label_smoothing: float = 0.1
    # The authors froze the encoders but left them in training mode, so video patch dropout
    # silently stayed on. Here it is a deliberate switch, off by default.
    frozen_patch_dropout: bool = False


def full_config(vocab_size=28997):
    """The paper's setting (DESIGN.md sections 2-3)."""
    return UniQ4CapConfig(
        video=VisionConfig(image_size=(224, 224), num_frames=8, temporal=True, patch_dropout=0.5),
        audio=VisionConfig(image_size=(112, 1036), num_frames=1, temporal=False),
        qformer=QFormerConfig(vocab_size=vocab_size),
    )


def tiny_config(vocab_size=1000):
    """Same code at sizes where a batch-8 training step takes well under a second on a
    2-core CPU. The vocabulary is normally set from the tokenizer trained on the captions."""
    return UniQ4CapConfig(
        video=VisionConfig(image_size=(32, 32), patch_size=8, width=64, layers=2, heads=4,
                           mlp_dim=256, num_frames=4, temporal=True, patch_dropout=0.5,
                           embed_dim=64),
        audio=VisionConfig(image_size=(32, 128), patch_size=8, width=64, layers=2, heads=4,
                           mlp_dim=256, num_frames=1, temporal=False, embed_dim=64),
        qformer=QFormerConfig(vocab_size=vocab_size, hidden=64, layers=2, heads=4,
                              intermediate=256, max_positions=64, encoder_width=96,
                              num_query_tokens=8, proj_dim=32),
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
