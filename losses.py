"""The training losses, each written out (DESIGN.md sections 3 and 6).

  caption_loss: next-token cross-entropy over caption tokens, label smoothing, padding ignored.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def caption_loss(logits, targets, label_smoothing=0.1, ignore_index=IGNORE_INDEX):
    """logits (B, T, V) predict targets (B, T); positions equal to ignore_index (padding,
    and the last text position, which has nothing to predict) do not count."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
