"""The contrastive losses against written-out references, in one process and across two.

Each loss is checked against a plain loop over clips, MIL-NCE with one-item bags against
NCE (the identity documented in losses.py), and the two-process gather against one process
holding the whole global batch: the gradient each rank gets for its own rows must be the
full-batch gradient (times world, which DDP's gradient averaging divides back out).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import losses
import training

D, SCALE = 6, 7.0


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


# -----------------------------------------------------------------------------
# One process


def test_nce_equals_a_double_loop():
    g = torch.Generator().manual_seed(0)
    a, b = unit(5, D, generator=g), unit(5, D, generator=g)
    n = len(a)

    def one_direction(x, y):  # -log softmax of the matching pair, averaged over rows
        total = 0.0
        for i in range(n):
            scores = [SCALE * float(x[i] @ y[j]) for j in range(n)]
            total += -scores[i] + math.log(sum(math.exp(s) for s in scores))
        return total / n

    expected = 0.5 * (one_direction(a, b) + one_direction(b, a))
    assert losses.nce_loss(a, b, SCALE).item() == pytest.approx(expected, rel=1e-5)


def test_mil_nce_with_one_item_bags_is_the_anchor_to_bag_cross_entropy():
    g = torch.Generator().manual_seed(1)
    a, b = unit(5, D, generator=g), unit(5, D, generator=g)
    a_to_b = F.cross_entropy(SCALE * a @ b.t(), torch.arange(5))
    assert torch.allclose(losses.mil_nce_loss(a, b[:, None], None, SCALE), a_to_b)


def test_mil_nce_both_ways_with_one_item_bags_is_nce():
    g = torch.Generator().manual_seed(2)
    a, b = unit(5, D, generator=g), unit(5, D, generator=g)
    both_ways = 0.5 * (losses.mil_nce_loss(a, b[:, None], None, SCALE)
                       + losses.mil_nce_loss(b, a[:, None], None, SCALE))
    assert torch.allclose(both_ways, losses.nce_loss(a, b, SCALE))


def padded_bags(sizes, K, generator):
    """Bags of the given sizes padded to K members with random (not zero) junk."""
    bags = unit(len(sizes), K, D, generator=generator)
    mask = torch.arange(K)[None, :] < torch.tensor(sizes)[:, None]  # (B, K)
    return bags, mask


def test_mil_nce_on_padded_bags_equals_a_loop_over_unpadded_bags():
    g = torch.Generator().manual_seed(3)
    sizes = [1, 3, 2, 4, 3]
    anchors = unit(len(sizes), D, generator=g)
    bags, mask = padded_bags(sizes, 4, g)
    unpadded = [bags[i, :k] for i, k in enumerate(sizes)]
    everything = torch.cat(unpadded)  # every real member of every bag
    expected = sum(torch.logsumexp(SCALE * everything @ anchors[i], 0)  # positives + negatives
                   - torch.logsumexp(SCALE * unpadded[i] @ anchors[i], 0)  # its own bag
                   for i in range(len(sizes))) / len(sizes)
    assert torch.allclose(losses.mil_nce_loss(anchors, bags, mask, SCALE), expected)


def test_logit_scale_starts_at_one_over_007_and_is_capped_at_100():
    t = losses.LogitScale()
    assert t.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert t().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    assert t().item() == pytest.approx(100.0, rel=1e-6)


# -----------------------------------------------------------------------------
# Two processes (gloo on 127.0.0.1) against one process with the whole global batch

WORLD, B_LOCAL, K = 2, 3, 4


def global_batch():
    """The same global batch on every rank and in the reference: features, padded bags."""
    g = torch.Generator().manual_seed(4)
    n = WORLD * B_LOCAL
    a, b = unit(n, D, generator=g), unit(n, D, generator=g)
    bags, mask = padded_bags([1, 4, 2, 3, 4, 1], K, g)
    return a, b, bags, mask


def losses_and_grads(a, b, bags, mask):
    """NCE(a, b) and MIL-NCE(a, bags) on leaf copies, with the gradients of their inputs."""
    a, b, bags = (x.clone().requires_grad_() for x in (a, b, bags))
    nce = losses.nce_loss(a, b, SCALE)
    nce.backward()
    out = {"nce": nce.detach(), "nce_grad_a": a.grad, "nce_grad_b": b.grad}
    a.grad = None
    mil = losses.mil_nce_loss(a, bags, mask, SCALE)
    mil.backward()
    out.update(mil=mil.detach(), mil_grad_anchors=a.grad, mil_grad_bags=bags.grad)
    return out


def rank_worker():
    ddp, rank, _, world = training.setup_distributed("cpu")
    assert ddp and world == WORLD
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)  # this rank's share of the global batch
    return losses_and_grads(*(x[rows] for x in global_batch()))


@pytest.fixture(scope="module")
def two_ranks():
    return training.launch_local(rank_worker, world_size=WORLD)


@pytest.fixture(scope="module")
def one_process():
    return losses_and_grads(*global_batch())


def test_gathered_nce_loss_averages_to_the_full_batch_loss(two_ranks, one_process):
    mean = sum(r["nce"] for r in two_ranks) / WORLD
    assert torch.allclose(mean, one_process["nce"], atol=1e-6)


@pytest.mark.parametrize("name", ["nce_grad_a", "nce_grad_b", "mil_grad_anchors", "mil_grad_bags"])
def test_local_slice_gets_the_full_batch_gradient(two_ranks, one_process, name):
    for rank, r in enumerate(two_ranks):
        expected = WORLD * one_process[name][rank * B_LOCAL:(rank + 1) * B_LOCAL]
        assert r[name] is not None and r[name].abs().sum() > 0
        assert torch.allclose(r[name], expected, atol=1e-5), (rank, name)


def test_gathered_mil_nce_on_padded_bags_averages_to_the_full_batch_loss(two_ranks, one_process):
    mean = sum(r["mil"] for r in two_ranks) / WORLD
    assert torch.allclose(mean, one_process["mil"], atol=1e-6)
