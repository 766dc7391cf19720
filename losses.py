"""The training losses, each written out: BLIP-2's caption loss (stage 2), the two contrastive
losses of the paper's stage-1 alignment, and BLIP-2's retrieval objectives (stage 2, optional).

  caption_loss      next-token cross-entropy over caption tokens, label smoothing, padding
                    ignored (stage 2).
  nce_loss          symmetric InfoNCE between two modalities' clip embeddings over the global
                    batch (stage 1, clip level).
  mil_nce_loss      MIL-NCE (Miech et al., 2020): an anchor's positive is a bag of embeddings
                    (a video's frames, an audio's chunks) (stage 1, granularity).
  time_mil_nce_loss MIL-NCE with bags local in time: an audio chunk's positive is its own
                    clip's frames at its time, the clip's other times among the negatives.
  LogitScale        the learnable log-temperature both stage-1 losses share.
  itc_loss          BLIP-2's clip-text contrastive loss: best query against the text, soft
                    targets over duplicate pairs.
  hard_negatives    ITM's negatives, drawn from the contrastive similarities of the global batch.
  itm_loss          the matching head's 2-class cross-entropy.
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


def next_token_loss(logits, captions, caption_mask, label_smoothing=0.1):
    """caption_loss of logits (B, T, V) over captions (B, T) themselves: position t predicts
    token t+1; padding (caption_mask False) and the last position are ignored."""
    targets = captions[:, 1:].clone()  # (B, T-1)
    if caption_mask is not None:
        targets[~caption_mask[:, 1:].bool()] = IGNORE_INDEX
    return caption_loss(logits[:, :-1], targets, label_smoothing)


# -----------------------------------------------------------------------------
# The global batch across ranks


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size():
    return dist.get_world_size() if _distributed() else 1


def rank_offset(batch):
    """Index of this rank's first row in the gathered (rank-major) batch; 0 in one process."""
    return dist.get_rank() * batch if _distributed() else 0


def global_max(n, device):
    """The largest of every rank's integer n (n itself in one process)."""
    if not _distributed():
        return n
    t = torch.tensor(n, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


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
        return _bag_nce(scores, own_bag)


def time_mil_nce_loss(anchors, members, positive, scale):
    """MIL-NCE whose bags are local in time, one direction. anchors (B, N, D) and members
    (B, M, D) are L2-normalised, row i of each from the same clip: N embeddings of one side
    and M of the other, each at its own time in the clip. positive (N, M) bools say which of
    a clip's members lie at anchor n's time (every anchor needs at least one). With
    s(x, y) = scale * x . y, for anchor n of clip i:

        loss_in = logsumexp_{y in every member of every clip of the global batch} s(a_in, y)
                  - logsumexp_{m : positive[n, m]} s(a_in, members_im)

    so the positives are the clip's own members at the anchor's time, and the negatives every
    other member of the global batch, *the same clip's members at other times among them*:
    Miech et al.'s MIL-NCE, whose positives are the narrations near a clip in time. The loss
    is the mean over this rank's B * N anchors. Stage 1 with --mil-bags time calls it both
    ways: time_mil_nce_loss(chunks, frames, in_chunk, s) and
    time_mil_nce_loss(frames, chunks, in_chunk.t(), s), in_chunk (3, T) saying which frames
    each third of the audio holds.

    mil_nce_loss cannot say this: its bag mask marks members that are neither positive nor
    negative (padding), so a clip's members outside the bag would leave the negatives.
    With one anchor per clip and every member positive the two agree:
    time_mil_nce_loss(a[:, None], bags, ones(1, K), s) == mil_nce_loss(a, bags, None, s)."""
    B, N, D = anchors.shape
    M = members.size(1)
    with torch.autocast(anchors.device.type, enabled=False):  # full precision, as in nce_loss
        anchors, members = anchors.float(), members.float()
        all_members = gather_with_grad(members).reshape(-1, D)  # (world*B, M, D) -> (world*B*M, D)
        scores = scale * anchors.reshape(-1, D) @ all_members.t()  # (B*N, world*B*M)
        column = torch.arange(all_members.size(0), device=members.device)
        owner, member = column // M, column % M  # each column's clip, and which of its members
        clip = (torch.arange(B, device=anchors.device) + rank_offset(B)).repeat_interleave(N)  # (B*N,)
        anchor = torch.arange(N, device=anchors.device).repeat(B)  # (B*N,): which of its clip's anchors
        in_bag = (owner[None, :] == clip[:, None]) & positive.to(anchors.device)[anchor][:, member]  # (B*N, world*B*M)
        return _bag_nce(scores, in_bag)


def _bag_nce(scores, in_bag):
    """The MIL-NCE step both bag losses end with. scores (A, C): each anchor against every
    candidate (-inf: not a candidate); in_bag (A, C): its positives. -> the mean over the
    anchors of logsumexp(all scores) - logsumexp(the positives' scores)."""
    positive = torch.logsumexp(scores.masked_fill(~in_bag, float("-inf")), dim=1)  # (A,)
    everything = torch.logsumexp(scores, dim=1)  # (A,)
    return (everything - positive).mean()


# -----------------------------------------------------------------------------
# Retrieval losses: BLIP-2's image-text contrastive (ITC) and matching (ITM) objectives, as
# LAVIS's `Blip2Qformer.forward` computes them (lavis/models/blip2_models/blip2_qformer.py),
# with clips in place of images


def itc_loss(clip_feats, text_feats, temp, pair_keys, label_smoothing=0.1):
    """clip_feats (B, Q, E): every query's feature; text_feats (B, E); both L2-normalised,
    row i of each from pair i of this rank. A clip scores a text by its best query, divided
    by temp. pair_keys (B, K) int64: pairs that share any key (the same clip, the same caption
    text) are positives of each other, so a duplicate is never pushed away as a negative.
    Targets: uniform over a row's positives in the global batch, smoothed as LAVIS does with
    clip ids (0.9 of it plus 0.1 spread over every column). Loss: the mean of the two
    directions' cross-entropies over this rank's rows. Returns (loss, sim_c2t (B, G),
    sim_t2c (B, G), positives (B, G)), G the global batch, for hard_negatives."""
    with torch.autocast(clip_feats.device.type, enabled=False):  # full precision, as in nce_loss
        clip_feats, text_feats, temp = clip_feats.float(), text_feats.float(), temp.float()
        all_clips, all_texts = gather_with_grad(clip_feats), gather_with_grad(text_feats)  # (G, Q, E), (G, E)
        positives = (pair_keys[:, None, :] == gather(pair_keys)[None, :, :]).any(dim=-1)  # (B, G)
        sim_c2t = torch.einsum("bqe,ge->bgq", clip_feats, all_texts).amax(dim=-1) / temp  # (B, G)
        sim_t2c = torch.einsum("be,gqe->bgq", text_feats, all_clips).amax(dim=-1) / temp  # (B, G)
        targets = positives.float() / positives.sum(dim=1, keepdim=True)
        targets = (1 - label_smoothing) * targets + label_smoothing / targets.size(1)
        loss = -0.5 * ((F.log_softmax(sim_c2t, dim=1) * targets).sum(dim=1).mean()
                       + (F.log_softmax(sim_t2c, dim=1) * targets).sum(dim=1).mean())
    return loss, sim_c2t, sim_t2c, positives


@torch.no_grad()
def hard_negatives(sim_c2t, sim_t2c, positives, pair_keys, generator):
    """ITM's negatives, drawn from the whole global batch: for every pair, a text for its clip
    and a clip for its text, with probability softmax(sim) over the non-positives (positives
    set to -10000, as LAVIS). sim_*, positives: (B, G) from itc_loss; pair_keys (B, K) as
    there. Every rank draws for all G pairs, from `generator` seeded alike on every rank and
    with the pairs in one order fixed by their keys, and keeps its own rows: two ranks draw
    what one process does on the same global batch, however the sampler spread it over the
    ranks. Returns, for this rank's pairs, the global indices (neg_text, neg_clip), each (B,),
    and whether each drawn pair is in truth a positive (a row with no negative can only draw
    one): (B,) bools each."""
    sim_c2t, sim_t2c, positives, keys = gather(sim_c2t), gather(sim_t2c), gather(positives), gather(pair_keys)
    order = torch.arange(keys.size(0), device=keys.device)
    for k in reversed(range(keys.size(1))):  # sorted by the first key, then the next: one order on every rank
        order = order[keys[order, k].argsort(stable=True)]
    drawn = []
    for sim in (sim_c2t, sim_t2c):
        weights = F.softmax(sim.float().masked_fill(positives, -10000), dim=1)[order][:, order].cpu()  # (G, G)
        pick = torch.multinomial(weights, 1, generator=generator)[:, 0].to(order.device)  # in `order`'s terms
        drawn.append(order[pick][order.argsort()])  # back to the gathered batch's rows and columns
    neg_text, neg_clip = drawn
    rows = torch.arange(keys.size(0), device=keys.device)
    mine = slice(rank_offset(pair_keys.size(0)), rank_offset(pair_keys.size(0)) + pair_keys.size(0))
    return neg_text[mine], neg_clip[mine], positives[rows, neg_text][mine], positives[neg_clip, rows][mine]


def itm_loss(logits, pair_is_positive):
    """logits (N, 2) of the matching head; pair_is_positive (N,) bools. 2-class cross-entropy."""
    return F.cross_entropy(logits.float(), pair_is_positive.long())
