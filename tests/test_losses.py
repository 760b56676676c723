"""rebalance.losses against hand-derived values on tiny batches, and against independent implementations."""

import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rebalance import losses as L

E = math.e


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------ balanced CLIP loss


def test_balanced_clip_zero_iterations_by_hand():
    logits = t([[1.0, 0.0], [0.0, 2.0]])
    lse = math.log(E + 1 + 1 + E**2)
    expected = -((1 - lse) + (2 - lse)) / 2
    assert L.balanced_clip_loss(logits, 0).item() == pytest.approx(expected, rel=1e-12)


def test_balanced_clip_one_iteration_is_open_clip_loss():
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    txt = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    scale = torch.tensor(10.0)
    expected = ClipLoss()(img, txt, scale)
    logits = scale * img @ txt.T
    assert L.balanced_clip_loss(logits, 1).item() == pytest.approx(expected.item(), rel=1e-6)
    # and the hand-written mean of the two cross-entropies
    labels = torch.arange(6)
    manual = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert L.balanced_clip_loss(logits, 1).item() == pytest.approx(manual.item(), rel=1e-6)


def test_balanced_clip_two_iterations_by_hand():
    # L = [[1, 0], [0, 2]]: a = normalise rows then columns of exp(L), b = columns then rows.
    p = [[E / (E + 1), 1 / (E + 1)], [1 / (1 + E**2), E**2 / (1 + E**2)]]  # rows normalised
    a00 = math.log(p[0][0] / (p[0][0] + p[1][0]))
    a11 = math.log(p[1][1] / (p[0][1] + p[1][1]))
    q = [[E / (E + 1), 1 / (1 + E**2)], [1 / (E + 1), E**2 / (1 + E**2)]]  # columns normalised
    b00 = math.log(q[0][0] / (q[0][0] + q[0][1]))
    b11 = math.log(q[1][1] / (q[1][0] + q[1][1]))
    expected = -(a00 + a11 + b00 + b11) / 4
    got = L.balanced_clip_loss(t([[1.0, 0.0], [0.0, 2.0]]), 2).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_balanced_clip_many_iterations_is_doubly_stochastic_plan():
    """Iterated to convergence both orders reach the Sinkhorn plan of exp(L) with unit row and column sums
    (computed independently with POT)."""
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    m = 5
    plan = ot.sinkhorn(
        np.full(m, 1 / m), np.full(m, 1 / m), -logits.numpy(), reg=1.0, numItermax=10_000, stopThr=1e-14
    )
    expected = -np.mean(np.log(np.diag(plan) * m))
    assert L.balanced_clip_loss(logits, 400).item() == pytest.approx(expected, rel=1e-8)


@settings(deadline=None, derandomize=True, max_examples=40)
@given(
    st.integers(2, 7),
    st.integers(0, 5),
    st.integers(0, 2**31 - 1),
)
def test_balanced_clip_pair_permutation_invariant_and_nonnegative(m, n_iter, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(m, m, generator=gen, dtype=torch.float64)
    perm = torch.randperm(m, generator=gen)
    loss = L.balanced_clip_loss(logits, n_iter)
    assert loss.item() >= 0
    assert L.balanced_clip_loss(logits[perm][:, perm], n_iter).item() == pytest.approx(loss.item(), rel=1e-10)
    # adding a constant to every logit changes nothing
    assert L.balanced_clip_loss(logits + 7.0, n_iter).item() == pytest.approx(loss.item(), rel=1e-10)


def test_balanced_clip_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        L.balanced_clip_loss(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="n_iter"):
        L.balanced_clip_loss(torch.zeros(2, 2), -1)


def test_balanced_clip_gradient_flows():
    logits = torch.randn(4, 4, requires_grad=True)
    L.balanced_clip_loss(logits, 2).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ InfoNCE and GH


def test_info_nce_by_hand():
    z = torch.eye(2, dtype=torch.float64)  # two orthogonal samples, both views identical
    # each of the 4 views: positive similarity 1/0.2 = 5, two negatives at 0 (itself masked)
    expected = math.log(1 + 2 * math.exp(-5))
    assert L.info_nce_loss(z, z.clone(), 0.2).item() == pytest.approx(expected, rel=1e-12)
    # one sample: the only candidate is the positive, loss 0
    assert L.info_nce_loss(t([[1.0, 2.0]]), t([[3.0, -1.0]])).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k,d", [(2, 2), (5, 8), (10, 10), (100, 128)])
def test_simplex_etf_geometry(k, d):
    m = L.simplex_etf(k, d, seed=3).double()
    gram = m @ m.T
    expected = torch.full((k, k), -1 / (k - 1), dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    assert torch.allclose(gram, expected, atol=1e-5)
    assert torch.allclose(m.sum(dim=0), torch.zeros(d, dtype=torch.float64), atol=1e-5)


def test_simplex_etf_rejects_too_many_classes():
    with pytest.raises(ValueError, match="num_classes"):
        L.simplex_etf(9, 8)


def _numpy_sinkhorn(scores, pi, lam, iters):
    """Plain Sinkhorn-Knopp written here from the definition: Q = exp(t/lambda), rows -> 1/N, cols -> pi."""
    q = np.exp(scores / lam)
    n = q.shape[0]
    for _ in range(iters):
        q = q / q.sum(axis=0, keepdims=True) * pi[None, :]
        q = q / q.sum(axis=1, keepdims=True) / n
    return q / q.sum(axis=1, keepdims=True)


def test_gh_surrogate_labels_meet_marginals():
    gen = torch.Generator().manual_seed(0)
    etf = L.simplex_etf(4, 8)
    t_ = L.gh_predictions(torch.randn(32, 8, generator=gen), etf)
    pi = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = L.gh_surrogate_labels(t_, pi, temperature=0.05, iterations=300)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(q.sum(dim=0) / 32, pi, atol=1e-3)
    assert (q >= 0).all()
    expected = _numpy_sinkhorn(t_.double().numpy(), pi.double().numpy(), 0.05, 300)
    assert np.allclose(q.numpy(), expected, atol=1e-3)


def test_gh_loss_is_swapped_prediction():
    gen = torch.Generator().manual_seed(1)
    etf = L.simplex_etf(3, 6)
    z1, z2 = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    pi = torch.tensor([0.5, 0.3, 0.2])
    t1 = F.normalize(z1 @ etf.T, dim=1).double().numpy()
    t2 = F.normalize(z2 @ etf.T, dim=1).double().numpy()
    q1, q2 = (_numpy_sinkhorn(x, pi.double().numpy(), 0.05, 300) for x in (t1, t2))

    def log_softmax(x):
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    expected = -np.mean((q1 * log_softmax(t2 / 0.1)).sum(1) + (q2 * log_softmax(t1 / 0.1)).sum(1))
    assert L.gh_loss(z1, z2, etf, pi).item() == pytest.approx(expected, rel=1e-3)

    module = L.GeometricHarmonizationLoss(3, 6, class_marginal=pi)
    module.etf.copy_(etf)
    module.weight = 0.5
    total = module(z1, z2).item()
    assert total == pytest.approx(L.info_nce_loss(z1, z2, 0.2).item() + 0.5 * expected, rel=1e-3)


def test_gh_ramp():
    ramp = L.GeometricHarmonizationLoss.ramp
    assert [ramp(e, warmup_epochs=2, ramp_epochs=4) for e in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]


# ------------------------------------------------------------------------------ long-tail losses

LOGITS = t([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2], [-1.0, 0.0, 1.5], [0.7, 0.7, 0.7]])
TARGET = torch.tensor([0, 1, 2, 1])
COUNTS = [50.0, 10.0, 2.0]


def test_logit_adjustment_tau_zero_is_ce():
    ce = F.cross_entropy(LOGITS, TARGET)
    assert L.logit_adjusted_loss(LOGITS, TARGET, COUNTS, tau=0.0).item() == pytest.approx(
        ce.item(), rel=1e-12
    )


def test_logit_adjustment_by_hand():
    # f = (0, 0), counts (3, 1): adjusted logits (log .75, log .25), so CE for class 0 is -log .75
    got = L.logit_adjusted_loss(t([[0.0, 0.0]]), torch.tensor([0]), [3, 1], tau=1.0)
    assert got.item() == pytest.approx(-math.log(0.75), rel=1e-12)
    got = L.logit_adjusted_loss(t([[0.0, 0.0]]), torch.tensor([1]), [3, 1], tau=2.0)
    # tau = 2: logits (2 log .75, 2 log .25) -> p1 = .0625 / (.5625 + .0625)
    assert got.item() == pytest.approx(-math.log(0.0625 / 0.625), rel=1e-12)


def test_posthoc_adjustment_by_hand():
    adjusted = L.logit_adjust_posthoc(t([[1.0, 0.5]]), [9, 1], tau=1.0)
    assert adjusted.tolist()[0] == pytest.approx([1 - math.log(0.9), 0.5 - math.log(0.1)], rel=1e-12)
    assert adjusted.argmax(1).item() == 1  # the rare class wins once its prior is divided out


def test_balanced_softmax_is_ce_on_logits_plus_log_counts():
    expected = F.cross_entropy(LOGITS + torch.log(t(COUNTS)), TARGET)
    got = L.balanced_softmax_loss(LOGITS, TARGET, COUNTS)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert got.item() == pytest.approx(L.logit_adjusted_loss(LOGITS, TARGET, COUNTS, 1.0).item(), rel=1e-12)


def test_class_balanced_weights_by_hand():
    # counts (1, 2), beta = .5: raw (0.5/0.5, 0.5/0.75) = (1, 2/3), scaled to sum 2: (1.2, 0.8)
    assert L.class_balanced_weights([1, 2], beta=0.5).tolist() == pytest.approx([1.2, 0.8], rel=1e-6)
    assert L.class_balanced_weights(COUNTS, beta=0.0).tolist() == pytest.approx([1, 1, 1])
    # beta -> 1: inverse frequency (1/50, 1/10, 1/2) scaled to sum 3
    inv = np.array([1 / 50, 1 / 10, 1 / 2])
    assert L.class_balanced_weights(COUNTS, beta=0.999999).tolist() == pytest.approx(
        3 * inv / inv.sum(), rel=1e-3
    )
    with pytest.raises(ValueError, match="beta"):
        L.class_balanced_weights(COUNTS, beta=1.0)


def test_ldam_margins_and_loss_by_hand():
    # n^-1/4 of (16, 1) = (0.5, 1); scaled to a largest margin of 0.5: (0.25, 0.5)
    assert L.ldam_margins([16, 1], max_margin=0.5).tolist() == pytest.approx([0.25, 0.5])
    loss = L.LDAMLoss([16, 1], max_margin=0.5, s=30.0)
    # z = (0.5, 0.2), y = 0: s * (0.5 - 0.25, 0.2) = (7.5, 6) -> CE = log(1 + e^-1.5)
    assert loss(t([[0.5, 0.2]]), torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-1.5)), rel=1e-6
    )
    # y = 1: s * (0.5, 0.2 - 0.5) = (15, -9) -> CE = log(1 + e^24) - ... = -log(e^-9 / (e^15 + e^-9))
    assert loss(t([[0.5, 0.2]]), torch.tensor([1])).item() == pytest.approx(
        24 + math.log1p(math.exp(-24)), rel=1e-6
    )


def test_drw_schedule():
    assert L.drw_weights(159, COUNTS, start_epoch=160) is None
    w = L.drw_weights(160, COUNTS, start_epoch=160)
    assert w.tolist() == pytest.approx(L.class_balanced_weights(COUNTS, 0.9999).tolist())
    loss = L.LDAMLoss(COUNTS)
    loss.weight = w
    assert torch.isfinite(loss(LOGITS.float(), TARGET))


def test_vs_gamma_zero_is_logit_adjustment():
    for tau in (0.0, 0.5, 1.0):
        got = L.vs_loss(LOGITS, TARGET, COUNTS, gamma=0.0, tau=tau)
        assert got.item() == pytest.approx(
            L.logit_adjusted_loss(LOGITS, TARGET, COUNTS, tau).item(), rel=1e-12
        )


def test_vs_by_hand():
    # counts (4, 1), gamma .5: Delta = (1, .5), iota = (log .8, log .2); f = (2, 2), y = 1
    z0, z1 = 2 + math.log(0.8), 1 + math.log(0.2)
    expected = -(z1 - math.log(math.exp(z0) + math.exp(z1)))
    got = L.vs_loss(t([[2.0, 2.0]]), torch.tensor([1]), [4, 1], gamma=0.5, tau=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_focal_by_hand():
    assert L.focal_loss(LOGITS, TARGET, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(LOGITS, TARGET).item(), rel=1e-12
    )
    # p_t = .5: (1 - .5)^2 * log 2
    assert L.focal_loss(t([[0.0, 0.0]]), torch.tensor([0]), gamma=2.0).item() == pytest.approx(
        0.25 * math.log(2), rel=1e-12
    )


def test_make_longtail_loss_names():
    for name in L.LONGTAIL_LOSSES:
        value = L.make_longtail_loss(name, COUNTS)(LOGITS.float(), TARGET)
        assert torch.isfinite(value) and value.item() > 0
    cb = L.make_longtail_loss("cb", COUNTS, beta=0.5)(LOGITS, TARGET)
    w = L.class_balanced_weights(COUNTS, 0.5).double()
    assert cb.item() == pytest.approx(F.cross_entropy(LOGITS, TARGET, weight=w).item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        L.make_longtail_loss("nope", COUNTS)
    with pytest.raises(ValueError, match="class_counts"):
        L.make_longtail_loss("ce", [3, 0])


def test_make_longtail_loss_passes_options_and_takes_drw_weights():
    """The job builds every loss through make_longtail_loss: its LDAM options reach the loss, and the
    losses of DRW_LOSSES take per-class weights set between epochs."""
    w = L.class_balanced_weights(COUNTS, 0.5)
    vs = L.make_longtail_loss("vs", COUNTS, gamma=0.2, tau=0.5)
    unweighted = L.vs_loss(LOGITS, TARGET, COUNTS, 0.2, 0.5)
    assert vs.weight is None and vs(LOGITS, TARGET).item() == pytest.approx(unweighted.item(), rel=1e-12)
    vs.weight = w
    weighted = L.vs_loss(LOGITS, TARGET, COUNTS, 0.2, 0.5, weight=w)
    assert vs(LOGITS, TARGET).item() == pytest.approx(weighted.item(), rel=1e-12)
    assert weighted.item() != pytest.approx(unweighted.item(), rel=1e-6)
    ldam = L.make_longtail_loss("ldam", COUNTS, max_margin=0.3, s=10.0)
    cos = torch.tanh(LOGITS)
    direct = L.LDAMLoss(COUNTS, max_margin=0.3, s=10.0)
    for loss in (ldam, direct):
        loss.weight = w
    assert ldam(cos, TARGET).item() == pytest.approx(direct(cos, TARGET).item(), rel=1e-12)
    assert set(L.DRW_LOSSES) | set(L.COSINE_LOSSES) <= set(L.LONGTAIL_LOSSES)
