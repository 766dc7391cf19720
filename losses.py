"""The training losses, each written out (DESIGN.md sections 3 and 6).

  caption_loss:  next-token cross-entropy over caption tokens, label smoothing, padding ignored.
  nce_loss:      symmetric InfoNCE between two modalities' clip embeddings (stage 1).
  mil_nce_loss:  MIL-NCE: each anchor's positive is a bag (a video's frames, an audio's chunks).
  gather_with_grad: the global batch across ranks, keeping the gradient of the local part.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def caption_loss(logits, targets, label_smoothing=0.1, ignore_index=IGNORE_INDEX):
    """logits (B, T, V) predict targets (B, T); positions equal to ignore_index (padding,
    and the last text position, which has nothing to predict) do not count."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def gather_with_grad(x):
    """x (B, ...) on every rank -> (world*B, ...), rank-major. all_gather returns tensors with
    no gradient; putting the local tensor back in its own slot keeps this rank's gradient
    path (the other ranks' parts are constants here, and get their gradients on their own
    rank). Identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def rank_offset(batch):
    """Index of this rank's first row in the gathered batch."""
    return dist.get_rank() * batch if dist.is_available() and dist.is_initialized() else 0


class LogitScale(nn.Module):
    """Learnable log-temperature: logits = exp(s) * cosine, s starts at log(1/0.07) and is
    clamped at log(100) so the logits cannot blow up."""

    def __init__(self, init=1 / 0.07, max_scale=100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_log = math.log(max_scale)

    def forward(self):
        return self.log_scale.clamp(max=self.max_log).exp()


def nce_loss(a, b, scale):
    """a, b (B, D) L2-normalised embeddings of the same B clips in two modalities; row i of a
    and row i of b are a positive pair, every other clip of the global batch a negative.
    Symmetric: mean of a->b and b->a cross-entropies over this rank's rows."""
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(a.size(0), device=a.device) + rank_offset(a.size(0))
    logits_ab = scale * a @ all_b.t()  # (B, world*B)
    logits_ba = scale * b @ all_a.t()
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def mil_nce_loss(anchors, bags, bag_mask, scale):
    """Miech et al. (2020). anchors (B, D); bags (B, K, D) with bag_mask (B, K) True for real
    members (bags may differ in size). For anchor i:
        loss_i = -log( sum_{k in bag i} e^{s_ik} / sum_{j, k in bag j} e^{s_jk} )
    i.e. the positives are its own bag, the negatives every member of every other clip's bag
    in the global batch. With bags of size 1 this is the anchor->bag direction of nce_loss."""
    B, K, D = bags.shape
    all_bags = gather_with_grad(bags).reshape(-1, D)  # (world*B*K, D)
    all_mask = gather_with_grad(bag_mask.to(torch.uint8)).reshape(-1).bool()  # (world*B*K,)
    scores = scale * anchors @ all_bags.t()  # (B, world*B*K)
    scores = scores.masked_fill(~all_mask, float("-inf"))
    owner = torch.arange(all_mask.numel(), device=anchors.device) // K  # clip of each member
    mine = owner[None, :] == (torch.arange(B, device=anchors.device) + rank_offset(B))[:, None]
    positive = torch.logsumexp(scores.masked_fill(~mine, float("-inf")), dim=1)
    return (torch.logsumexp(scores, dim=1) - positive).mean()
