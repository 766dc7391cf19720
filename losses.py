"""The training losses, each written out: BLIP-2's caption loss (stage 2) and the two contrastive
losses of the paper's stage-1 alignment.

  caption_loss      next-token cross-entropy over caption tokens, label smoothing, padding
                    ignored (stage 2).
  nce_loss          symmetric InfoNCE between two modalities' clip embeddings over the global
                    batch (stage 1, clip level).
  mil_nce_loss      MIL-NCE (Miech et al., 2020): an anchor's positive is a bag of embeddings
                    (a video's frames, an audio's chunks) (stage 1, granularity).
  LogitScale        the learnable log-temperature both contrastive losses share.
  gather_with_grad  the global batch across ranks, differentiable.

Multi-process convention. Each rank scores its own B rows against all world*B gathered
columns and returns the mean over its rows. DDP then averages parameter gradients over ranks,
which is the gradient of the mean over all world*B rows -- the loss one process computes on
the whole global batch -- provided the gather sends back to each rank the gradient that
*every* rank's loss puts on its features (see gather_with_grad). tests/test_losses.py and
tests/test_training.py check this numerically against one process.

Every rank must pass the same B (drop the last incomplete batch), and the embeddings must
already be L2-normalised.
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


# -----------------------------------------------------------------------------
# The global batch across ranks


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_offset(batch):
    """Index of this rank's first row in the gathered (rank-major) batch; 0 in one process."""
    return dist.get_rank() * batch if _distributed() else 0


def gather(x):
    """x (B, ...) on every rank -> (world*B, ...), rank-major, without gradient (for masks)."""
    if not _distributed():
        return x
    was_bool = x.dtype == torch.bool
    x = x.to(torch.uint8) if was_bool else x.contiguous()  # not every backend gathers bools
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    out = torch.cat(parts, dim=0)
    return out.bool() if was_bool else out


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather. Backward: sum the incoming gradient over ranks, keep our slice."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # world * (B, ...) -> (world*B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd may share grad
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        batch = grad.size(0) // dist.get_world_size()
        start = dist.get_rank() * batch
        return grad[start:start + batch]


def gather_with_grad(x):
    """x (B, ...) on every rank -> (world*B, ...), rank-major, and differentiable for this
    rank's slice. Identity in one process.

    Why not just all_gather and put the local tensor back in its own slot? That keeps the
    gradient of *this* rank's loss with respect to its own features, but our features are
    also the negatives in every other rank's rows, and that part of their gradient lives on
    the other ranks. So the backward pass sums the gathered tensor's gradient over all ranks
    (one all_reduce) and each rank keeps its own slice: rank r then holds
    d(sum over ranks of the loss)/d(features of rank r), exactly what one process would
    compute for those rows of the global batch (times world, which DDP's averaging of
    parameter gradients divides back out). An all_reduce rather than a reduce_scatter
    because gloo, our CPU backend, has no reduce_scatter."""
    return _GatherWithGrad.apply(x) if _distributed() else x


# -----------------------------------------------------------------------------
# Contrastive losses


class LogitScale(nn.Module):
    """The learnable temperature of the contrastive losses, stored as its log, log_scale,
    starting at log(1/0.07). Calling the module gives the multiplier exp(log_scale) that the
    losses take as `scale`, capped at 100 so the logits cannot blow up (the cap is a clamp:
    above it the parameter gets no gradient and simply stays capped)."""

    def __init__(self, temperature=0.07, max_scale=100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self):
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def nce_loss(a, b, scale):
    """Symmetric InfoNCE. a, b (B, D): L2-normalised embeddings of this rank's B clips in two
    modalities (row i of a and row i of b are the same clip). scale: the multiplier from
    LogitScale. Every other clip of the global batch is a negative:

        loss = 1/2 * mean_i [ CE(scale * a_i . b_all, i) + CE(scale * b_i . a_all, i) ]

    over this rank's rows i, where i is the row's index in the gathered batch."""
    # Scores at full precision: under bf16 autocast, cosines times a scale of up to 100 would
    # be off by about half a logit.
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        all_a, all_b = gather_with_grad(a), gather_with_grad(b)  # (world*B, D)
        labels = torch.arange(a.size(0), device=a.device) + rank_offset(a.size(0))
        logits_ab = scale * a @ all_b.t()  # (B, world*B): a_i against every b
        logits_ba = scale * b @ all_a.t()  # (B, world*B): b_i against every a
        return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def mil_nce_loss(anchors, bags, bag_mask, scale):
    """MIL-NCE (Miech et al., 2020), one direction. anchors (B, D) and bags (B, K, D) are
    L2-normalised, bag i belonging to the same clip as anchor i; bag_mask (B, K) is True for
    real members, so bags may differ in size (None: all real; every bag needs at least one
    real member). With s(x, y) = scale * x . y, for anchor i:

        loss_i = logsumexp_{y in any bag of the global batch} s(a_i, y)
                 - logsumexp_{y in bag i} s(a_i, y)

    i.e. the positive is its whole bag, the negatives every real member of every other
    clip's bag; the loss is the mean over this rank's anchors. Stage 1 calls it both ways:
    mil_nce_loss(audio, frames, frame_mask, s) and mil_nce_loss(video, chunks, chunk_mask, s).

    With bags of size 1 it is one direction of nce_loss: mil_nce_loss(a, b[:, None], None, s)
    is the a->b cross-entropy, so
        nce_loss(a, b, s) == 0.5 * (mil_nce_loss(a, b[:, None], None, s)
                                    + mil_nce_loss(b, a[:, None], None, s))."""
    B, K, D = bags.shape
    if bag_mask is None:
        bag_mask = torch.ones(B, K, dtype=torch.bool, device=bags.device)
    with torch.autocast(anchors.device.type, enabled=False):  # full precision, as in nce_loss
        anchors, bags = anchors.float(), bags.float()
        all_bags = gather_with_grad(bags).reshape(-1, D)  # (world*B, K, D) -> (world*B*K, D)
        real = gather(bag_mask).reshape(-1)  # (world*B*K,)
        scores = scale * anchors @ all_bags.t()  # (B, world*B*K)
        scores = scores.masked_fill(~real, float("-inf"))  # padding: neither positive nor negative
        owner = torch.arange(real.numel(), device=bags.device) // K  # clip each column belongs to
        clip = torch.arange(B, device=bags.device) + rank_offset(B)  # clip of each anchor
        own_bag = owner[None, :] == clip[:, None]  # (B, world*B*K)
        positive = torch.logsumexp(scores.masked_fill(~own_bag, float("-inf")), dim=1)  # (B,)
        everything = torch.logsumexp(scores, dim=1)  # (B,)
        return (everything - positive).mean()
