"""losses.py against references written out by hand, in one process and across two.

One process: InfoNCE against a double loop in plain Python, MIL-NCE against NCE and against a
loop over unpadded bags, MIL-NCE with bags in time against a loop and against MIL-NCE, stage
1's objective (train_align.Aligner) against these losses put together by hand, its frame<->chunk
metrics on planted embeddings, the caption
loss against the label-smoothed cross-entropy formula, and the temperature's start and cap.

Two processes (a gloo group on 127.0.0.1, spawned here): each rank holds half of a fixed
global batch, and what it computes is compared with one process holding all of it. The
identity being checked, with N = world * B rows in the global batch:

    full-batch loss   L   = 1/N * sum over all rows i of l_i
    rank r's loss     L_r = 1/B * sum over its own rows of l_i,  so  mean_r L_r = L

Every l_i depends on every feature of the global batch (the others are its negatives), so a
rank's features also get gradient from the *other* ranks' losses. gather_with_grad sums the
gathered tensor's gradient over ranks, so rank r's features receive
d(sum_s L_s)/dx_r = world * dL/dx_r. Chained into parameters that every rank holds a copy of,
and averaged over ranks as DDP does, that is (1/world) * d(sum_s L_s)/dtheta = dL/dtheta:
the averaged gradient *equals* the full-batch gradient (no extra factor). The temperature is
used only locally, and mean_r dL_r/ds = dL/ds as well.
"""

import contextlib
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import losses
import model as M
import train_align

D = 5
SCALE = 1 / 0.07  # the initial temperature's multiplier


def unit(*shape, generator):
    """Random L2-normalised vectors along the last dimension."""
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def bag_mask(sizes, K):
    """(B, K) True for the first sizes[i] members of bag i."""
    return torch.arange(K)[None, :] < torch.tensor(sizes)[:, None]


def dot(x, y):
    return sum(p * q for p, q in zip(x, y))


def log_sum_exp(values):
    return math.log(sum(math.exp(v) for v in values))


# -----------------------------------------------------------------------------
# One process


def info_nce_one_way(x, y, scale):
    """mean_i -log( exp(s x_i.y_i) / sum_j exp(s x_i.y_j) ), in plain Python."""
    x, y = x.tolist(), y.tolist()
    total = 0.0
    for i in range(len(x)):
        scores = [scale * dot(x[i], y[j]) for j in range(len(y))]
        total += log_sum_exp(scores) - scores[i]
    return total / len(x)


def test_nce_equals_a_double_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    a, b = unit(7, D, generator=g), unit(7, D, generator=g)
    expected = 0.5 * (info_nce_one_way(a, b, SCALE) + info_nce_one_way(b, a, SCALE))
    assert losses.nce_loss(a, b, SCALE).item() == pytest.approx(expected, rel=1e-5)


def test_mil_nce_with_bags_of_one_is_the_anchor_to_bag_direction_of_nce():
    g = torch.Generator().manual_seed(1)
    a, b = unit(7, D, generator=g), unit(7, D, generator=g)
    got = losses.mil_nce_loss(a, b[:, None], None, SCALE)  # (B, D) -> (B, 1, D)
    assert got.item() == pytest.approx(info_nce_one_way(a, b, SCALE), rel=1e-5)


def test_mil_nce_both_ways_with_bags_of_one_equals_nce():
    g = torch.Generator().manual_seed(2)
    a, b = unit(7, D, generator=g), unit(7, D, generator=g)
    both_ways = 0.5 * (losses.mil_nce_loss(a, b[:, None], None, SCALE)
                       + losses.mil_nce_loss(b, a[:, None], None, SCALE))
    assert both_ways.item() == pytest.approx(losses.nce_loss(a, b, SCALE).item(), rel=1e-6)


def test_mil_nce_on_padded_bags_equals_a_loop_over_unpadded_bags():
    g = torch.Generator().manual_seed(3)
    sizes, K = [2, 1, 4, 3], 4
    anchors = unit(len(sizes), D, generator=g)
    bags = unit(len(sizes), K, D, generator=g)
    mask = bag_mask(sizes, K)
    bags[~mask] = anchors[0]  # padding that would dominate anchor 0's scores if it counted
    unpadded = [bags[i, :k].tolist() for i, k in enumerate(sizes)]

    total = 0.0
    for i, anchor in enumerate(anchors.tolist()):
        own = [SCALE * dot(anchor, y) for y in unpadded[i]]
        every = [SCALE * dot(anchor, y) for bag in unpadded for y in bag]
        total += log_sum_exp(every) - log_sum_exp(own)
    expected = total / len(sizes)

    got = losses.mil_nce_loss(anchors, bags, mask, SCALE).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert losses.mil_nce_loss(anchors, bags, None, SCALE).item() != pytest.approx(expected, rel=1e-3)


def test_time_mil_nce_equals_a_loop_over_anchors_and_members():
    """Each anchor's positives are its own clip's members at its time; every other member of
    the batch, its own clip's at other times included, is a negative."""
    g = torch.Generator().manual_seed(6)
    B, N, M = 3, 2, 3
    anchors, members = unit(B, N, D, generator=g), unit(B, M, D, generator=g)
    positive = torch.tensor([[True, True, False], [False, False, True]])  # (N, M)

    total = 0.0
    for i in range(B):
        for n in range(N):
            score = lambda y: SCALE * dot(anchors[i, n].tolist(), y.tolist())
            own = [score(members[i, m]) for m in range(M) if positive[n, m]]
            every = [score(members[j, m]) for j in range(B) for m in range(M)]
            total += log_sum_exp(every) - log_sum_exp(own)
    expected = total / (B * N)

    got = losses.time_mil_nce_loss(anchors, members, positive, SCALE).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_time_mil_nce_with_one_anchor_per_clip_and_every_member_positive_is_mil_nce():
    g = torch.Generator().manual_seed(7)
    anchors, bags = unit(5, D, generator=g), unit(5, 3, D, generator=g)
    got = losses.time_mil_nce_loss(anchors[:, None], bags, torch.ones(1, 3, dtype=torch.bool), SCALE)  # (B, 1, D)
    assert got.item() == pytest.approx(losses.mil_nce_loss(anchors, bags, None, SCALE).item(), rel=1e-6)


def frames_and_chunks_at_their_times(shift):
    """Hand-built embeddings of 4 clips, 6 frames and 3 chunks each (2 frames a chunk): frame
    pair s of clip i and chunk (s + shift) % 3 are one direction, with a little noise: shift
    0 puts each chunk on the frames of its own third, shift 1 on the next third's. Every clip
    holds the same chunks either way, only their order in time differs."""
    g = torch.Generator().manual_seed(8)
    directions = unit(4, 3, D, generator=g)  # (clip, third, D)
    frames = F.normalize(directions.repeat_interleave(2, dim=1) + 0.1 * torch.randn(4, 6, D, generator=g), dim=-1)
    chunks = F.normalize(directions + 0.1 * torch.randn(4, 3, D, generator=g), dim=-1).roll(-shift, dims=1)
    in_chunk = torch.arange(6)[None, :] // 2 == torch.arange(3)[:, None]  # (3, 6): the frames each chunk holds
    return frames, chunks, in_chunk


def test_time_mil_nce_is_lower_when_each_chunk_matches_its_own_thirds_frames():
    """...and the clip bags cannot tell: each clip's bag holds the same chunks in any order."""
    def both_losses(shift):
        frames, chunks, in_chunk = frames_and_chunks_at_their_times(shift)
        time = 0.5 * (losses.time_mil_nce_loss(chunks, frames, in_chunk, SCALE)
                      + losses.time_mil_nce_loss(frames, chunks, in_chunk.t(), SCALE))
        v = F.normalize(frames.mean(dim=1), dim=-1)
        clip = losses.mil_nce_loss(v, chunks, None, SCALE)
        return time.item(), clip.item()

    (time_right, clip_right), (time_shifted, clip_shifted) = both_losses(0), both_losses(1)
    assert time_right < 1.0 < 5.0 < time_shifted
    assert clip_right == pytest.approx(clip_shifted, rel=1e-6)


def test_frames_lie_in_the_thirds_of_the_clip_at_their_start():
    assert train_align.frame_chunks(8, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert train_align.frame_chunks(8, 8).tolist() == list(range(8))  # a chunk per frame: its own


@pytest.fixture(scope="module")
def aligner_inputs():
    """A tiny stage-1 model and a batch of 4 random clips."""
    torch.manual_seed(0)
    cfg = M.tiny_config()
    g = torch.Generator().manual_seed(9)
    video = torch.randn(4, 3, cfg.video.num_frames, *cfg.video.image_size, generator=g)
    audio = torch.randn(4, 3, *cfg.audio.image_size, generator=g)
    return train_align.Aligner(cfg), video, audio


def test_stage1_default_objective_is_nce_plus_clip_bag_mil_nce(aligner_inputs):
    """--mil-bags clip (the default): NCE + lambda/2 (MIL-NCE(a, frames) + MIL-NCE(v, T chunks))."""
    aligner, video, audio = aligner_inputs
    frames, v, a, hidden = aligner.embed(video, audio)
    chunks, s = aligner.audio_chunks(hidden, frames.size(1)), aligner.temperature()
    expected = losses.nce_loss(v, a, s) + 0.7 * 0.5 * (losses.mil_nce_loss(a, frames, None, s)
                                                       + losses.mil_nce_loss(v, chunks, None, s))
    assert torch.equal(aligner(video, audio, 0.7)[0], expected)


def test_stage1_time_bags_put_three_chunks_against_the_frames_in_their_thirds(aligner_inputs):
    aligner, video, audio = aligner_inputs
    frames, v, a, hidden = aligner.embed(video, audio)
    chunks, s = aligner.audio_chunks(hidden, 3), aligner.temperature()
    in_chunk = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]]).bool()
    expected = losses.nce_loss(v, a, s) + 0.7 * 0.5 * (losses.time_mil_nce_loss(chunks, frames, in_chunk, s)
                                                       + losses.time_mil_nce_loss(frames, chunks, in_chunk.t(), s))
    assert torch.equal(aligner(video, audio, 0.7, "time")[0], expected)


class PlantedTowers(nn.Module):
    """What train_align.evaluate reads of a stage-1 model, planted: frame t of every clip lies
    along direction frame_chunks(8, 3)[t] (its third), and chunk s of the three along direction
    (s + shift) % 3, so shift 0 puts each chunk on its own third's frames, shift 1 on the next's."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def embed(self, video, audio):
        B = video.size(0)
        frames = torch.eye(3)[train_align.frame_chunks(8, 3)].expand(B, 8, 3)  # (B, 8, 3)
        v = a = F.normalize(torch.ones(B, 3), dim=-1)
        return frames, v, a, torch.zeros(B)  # the "hidden states": only their batch size is read

    def audio_chunks(self, hidden, num_chunks):
        return torch.eye(3)[(torch.arange(num_chunks) + self.shift) % 3].expand(hidden.size(0), num_chunks, 3)


@pytest.mark.parametrize("shift, accuracy", [(0, 1.0), (1, 0.0)])
def test_stage1_frame_chunk_metrics_ask_for_the_chunk_at_the_frames_time(shift, accuracy):
    clips = [{"id": str(i), "caption": "", "record": {"id": str(i)}, "path": "", "video": torch.zeros(3, 8, 2, 2),
              "audio": torch.zeros(3, 2, 2)} for i in range(4)]
    out = train_align.evaluate(PlantedTowers(shift), clips, torch.device("cpu"), contextlib.nullcontext(), 4)
    assert out["frame->chunk acc (3 chunks)"] == accuracy and out["chunk->frame acc (3 chunks)"] == accuracy
    assert out["frame->chunk chance (3 chunks)"] == pytest.approx(1 / 3)
    assert out["chunk->frame chance (3 chunks)"] == pytest.approx((3 / 8 + 3 / 8 + 2 / 8) / 3)


def caption_batch():
    """Logits (2, 4, 6) and targets with two padded positions per row."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 6, generator=g)
    targets = torch.tensor([[3, 0, losses.IGNORE_INDEX, losses.IGNORE_INDEX],
                            [5, 5, 1, losses.IGNORE_INDEX]])
    return logits, targets


def test_caption_loss_does_not_see_ignore_index_positions():
    logits, targets = caption_batch()
    kept = targets != losses.IGNORE_INDEX
    noisy = logits.clone()
    noisy[~kept] = 1e4 * torch.randn(int((~kept).sum()), logits.size(-1))  # garbage where ignored
    only_kept = losses.caption_loss(logits[kept][None], targets[kept][None])  # (1, n_kept, V)
    assert losses.caption_loss(noisy, targets).item() == pytest.approx(only_kept.item(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_caption_loss_is_label_smoothed_cross_entropy_averaged_over_kept_positions(eps):
    """Per kept position: (1 - eps) * -log p(target) + eps * mean over the vocabulary of -log p."""
    logits, targets = caption_batch()
    total, count = 0.0, 0
    for row, labels in zip(logits.tolist(), targets.tolist()):
        for scores, y in zip(row, labels):
            if y == losses.IGNORE_INDEX:
                continue
            log_z = log_sum_exp(scores)
            nll = log_z - scores[y]
            uniform = sum(log_z - s for s in scores) / len(scores)
            total += (1 - eps) * nll + eps * uniform
            count += 1
    got = losses.caption_loss(logits, targets, label_smoothing=eps).item()
    assert got == pytest.approx(total / count, rel=1e-5)


def retrieval_batch(B=6, Q=3, E=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return unit(B, Q, E, generator=g), unit(B, E, generator=g)


def test_itc_with_distinct_pairs_is_lavis_label_smoothed_cross_entropy_both_ways():
    """Without duplicates, BLIP-2's ITC: a clip scores a text by its best query, /temp, then
    cross_entropy(..., label_smoothing=0.1) against the diagonal, averaged over both ways."""
    clips, texts = retrieval_batch()
    temp = torch.tensor(0.07)
    keys = torch.arange(6)[:, None].repeat(1, 2)  # every pair its own clip and caption
    loss, sim_c2t, sim_t2c, positives = losses.itc_loss(clips, texts, temp, keys)
    best = torch.tensor([[max(dot(q, t) for q in clip.tolist()) for t in texts.tolist()] for clip in clips])
    torch.testing.assert_close(sim_c2t, best / temp)
    torch.testing.assert_close(sim_t2c, best.t() / temp)
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(best / temp, labels, label_smoothing=0.1)
                      + F.cross_entropy(best.t() / temp, labels, label_smoothing=0.1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(positives, torch.eye(6, dtype=torch.bool))


def test_itc_counts_pairs_of_one_clip_or_one_caption_as_positives():
    """Pairs 0 and 1 are one clip; pairs 2 and 3 share a caption: neither pushes the other away."""
    clips, texts = retrieval_batch()
    keys = torch.tensor([[0, 10], [0, 11], [2, 12], [3, 12], [4, 14], [5, 15]])
    loss, sim_c2t, sim_t2c, positives = losses.itc_loss(clips, texts, torch.tensor(0.1), keys)
    expected_pos = torch.eye(6, dtype=torch.bool)
    expected_pos[0, 1] = expected_pos[1, 0] = expected_pos[2, 3] = expected_pos[3, 2] = True
    assert torch.equal(positives, expected_pos)
    targets = expected_pos.float() / expected_pos.float().sum(1, keepdim=True)
    targets = 0.9 * targets + 0.1 / 6
    expected = 0.5 * (-(F.log_softmax(sim_c2t, 1) * targets).sum(1).mean()
                      - (F.log_softmax(sim_t2c, 1) * targets).sum(1).mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hard_negatives_are_never_positives_when_a_negative_exists():
    clips, texts = retrieval_batch(B=8)
    keys = torch.tensor([[0, 0], [0, 1], [2, 2], [3, 2], [4, 4], [5, 5], [6, 6], [7, 7]])
    _, sim_c2t, sim_t2c, positives = losses.itc_loss(clips, texts, torch.tensor(0.07), keys)
    for seed in range(20):
        neg_text, neg_clip, text_is_pos, clip_is_pos = losses.hard_negatives(
            sim_c2t, sim_t2c, positives, keys, torch.Generator().manual_seed(seed))
        assert not positives[torch.arange(8), neg_text].any() and not positives[neg_clip, torch.arange(8)].any()
        assert not text_is_pos.any() and not clip_is_pos.any()


def test_hard_negatives_do_not_depend_on_the_order_of_the_batch():
    """Two ranks gather the global batch in another order than one process holds it (the
    sampler interleaves the ranks' shares): each pair must still draw the same negatives."""
    clips, texts = retrieval_batch(B=8)
    keys = torch.tensor([[i, 100 + i % 5] for i in range(8)])
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])

    def draws(c, t, k):
        _, sim_c2t, sim_t2c, positives = losses.itc_loss(c, t, torch.tensor(0.07), k)
        neg_text, neg_clip, _, _ = losses.hard_negatives(sim_c2t, sim_t2c, positives, k, torch.Generator().manual_seed(3))
        return k[neg_text, 0], k[neg_clip, 0]  # the drawn pairs, by their clip key

    text_keys, clip_keys = draws(clips, texts, keys)
    text_keys_p, clip_keys_p = draws(clips[perm], texts[perm], keys[perm])
    assert torch.equal(text_keys[perm], text_keys_p) and torch.equal(clip_keys[perm], clip_keys_p)


def test_a_batch_of_one_caption_has_no_negative_and_says_so():
    """Every pair shares the caption: the draw can only land on a positive, and is labelled one."""
    clips, texts = retrieval_batch(B=4)
    keys = torch.tensor([[0, 9], [1, 9], [2, 9], [3, 9]])
    _, sim_c2t, sim_t2c, positives = losses.itc_loss(clips, texts, torch.tensor(0.07), keys)
    _, _, text_is_pos, clip_is_pos = losses.hard_negatives(sim_c2t, sim_t2c, positives, keys, torch.Generator())
    assert text_is_pos.all() and clip_is_pos.all()


def test_logit_scale_starts_at_one_over_0_07():
    t = losses.LogitScale()
    assert t.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert t().item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_logit_scale_is_clamped_at_100_and_gets_no_gradient_above_it():
    t = losses.LogitScale()
    with torch.no_grad():
        t.log_scale.fill_(math.log(300.0))
    value = t()
    value.backward()
    assert value.item() == pytest.approx(100.0, rel=1e-6)
    assert t.log_scale.grad.item() == 0.0


# -----------------------------------------------------------------------------
# Two processes against one process on the same global batch

WORLD, B, K, IN = 2, 3, 4, 6  # B rows per rank


def global_batch():
    """The same fixed global batch in every process: features, padded bags, tower inputs."""
    g = torch.Generator().manual_seed(5)
    n = WORLD * B
    return {"a": unit(n, D, generator=g), "b": unit(n, D, generator=g),
            "bags": unit(n, K, D, generator=g), "mask": bag_mask([1, 4, 2, 3, 4, 2], K),
            "video": torch.randn(n, IN, generator=g), "audio": torch.randn(n, IN, generator=g),
            "chunks": torch.randn(n, K, IN, generator=g), "anchors": unit(n, 2, D, generator=g)}


IN_TIME = torch.tensor([[True, True, False, False], [False, False, True, True]])  # (2 anchors, K members)


def towers():
    """Stage 1 in miniature; the fixed seed gives every process the same weights."""
    torch.manual_seed(0)
    return nn.ModuleDict({"video": nn.Linear(IN, D), "audio": nn.Linear(IN, D),
                          "temperature": losses.LogitScale()})


def measure(batch):
    """Losses and gradients on this process's share of the global batch (all of it in one
    process): NCE and MIL-NCE with leaf features, and the towers' parameter gradients."""
    out = {}
    a, b, bags = (batch[k].clone().requires_grad_() for k in ("a", "b", "bags"))
    nce = losses.nce_loss(a, b, SCALE)
    nce.backward()
    out.update(nce=nce.detach(), nce_grad_a=a.grad, nce_grad_b=b.grad)

    a.grad = None
    mil = losses.mil_nce_loss(a, bags, batch["mask"], SCALE)
    mil.backward()
    out.update(mil=mil.detach(), mil_grad_anchors=a.grad, mil_grad_bags=bags.grad)

    anchors, bags.grad = batch["anchors"].clone().requires_grad_(), None
    time = losses.time_mil_nce_loss(anchors, bags, IN_TIME, SCALE)
    time.backward()
    out.update(time=time.detach(), time_grad_anchors=anchors.grad, time_grad_members=bags.grad)

    model = towers()
    v = F.normalize(model["video"](batch["video"]), dim=-1)
    au = F.normalize(model["audio"](batch["audio"]), dim=-1)
    chunks = F.normalize(model["audio"](batch["chunks"]), dim=-1)  # (B, K, IN) -> (B, K, D)
    s = model["temperature"]()
    (losses.nce_loss(v, au, s) + losses.mil_nce_loss(v, chunks, batch["mask"], s)).backward()
    out["tower_grads"] = {name: p.grad for name, p in model.named_parameters()}
    return out


def ddp_average(grads):
    """What DistributedDataParallel does to parameter gradients: the mean over ranks."""
    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


def gather_keeping_only_local_gradient(x):
    """The tempting wrong gather: all_gather, then put the local tensor back in its slot, so
    the gradient the other ranks' losses put on our features is dropped."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        rows = slice(rank * B, (rank + 1) * B)  # this rank's share of the global batch
        local = {k: v[rows] for k, v in global_batch().items()}
        out = measure(local)
        out["tower_grads"] = ddp_average(out["tower_grads"])
        right_gather = losses.gather_with_grad
        losses.gather_with_grad = gather_keeping_only_local_gradient
        try:
            out["tower_grads_local_only"] = ddp_average(measure(local)["tower_grads"])
        finally:
            losses.gather_with_grad = right_gather
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(rank_main, args=(free_port(), str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    return measure(global_batch())


@pytest.mark.parametrize("name", ["nce", "mil", "time"])
def test_rank_losses_average_to_the_full_batch_loss(two_ranks, one_process, name):
    mean = sum(r[name] for r in two_ranks) / WORLD
    assert mean.item() == pytest.approx(one_process[name].item(), abs=1e-6)


@pytest.mark.parametrize("name", ["nce_grad_a", "nce_grad_b", "mil_grad_anchors", "mil_grad_bags",
                                  "time_grad_anchors", "time_grad_members"])
def test_each_rank_gets_world_times_the_full_batch_gradient_of_its_own_features(two_ranks, one_process, name):
    for rank, r in enumerate(two_ranks):
        expected = WORLD * one_process[name][rank * B:(rank + 1) * B]
        assert expected.abs().max() > 1e-3  # the comparison is not between zeros
        torch.testing.assert_close(r[name], expected, atol=1e-5, rtol=1e-4)


def test_ddp_averaged_parameter_gradients_equal_the_full_batch_gradient(two_ranks, one_process):
    for r in two_ranks:
        for name, expected in one_process["tower_grads"].items():
            torch.testing.assert_close(r["tower_grads"][name], expected, atol=1e-5, rtol=1e-4)


def test_a_gather_keeping_only_the_local_gradient_would_not_match(two_ranks, one_process):
    """The check above can tell: without the other ranks' share the gradients differ."""
    got = two_ranks[0]["tower_grads_local_only"]
    assert any(not torch.allclose(got[name], expected, atol=1e-4, rtol=1e-3)
               for name, expected in one_process["tower_grads"].items())
