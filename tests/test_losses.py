"""engine.train.losses: sparse top-k KD against plain full-vocabulary references, chunking, masks,
sum/count composition (the world-size invariance the trainer relies on), bf16 logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.train import losses as L

KINDS = L.KINDS


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: intra-op threads only spin against each other (10x the CPU time on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def peaked(n: int, v: int, seed: int, dominant: int = 3) -> torch.Tensor:
    """LM-like teacher logits: a noisy bulk plus a few dominant tokens; ~half the rows have a
    top-1 probability above 0.9."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    for i in range(n):
        dom = torch.randperm(v, generator=g)[:dominant]
        boost = torch.sort(torch.rand(dominant, generator=g, dtype=torch.float64) * 6 + 8, descending=True).values
        if i % 2 == 0:
            boost[0] += 6.0
        t[i, dom] = t[i].max() + boost
    return t


def student_like(t: torch.Tensor, seed: int, noise: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return t + noise * torch.randn(t.shape, generator=g, dtype=t.dtype)


def completed_teacher(s: torch.Tensor, ids, lp, tail) -> torch.Tensor:
    """Full-vocabulary teacher log-probs the sparse loss is defined against: top-k as cached, the
    tail mass spread like the student's own tail (T = 1)."""
    q = torch.log_softmax(s.detach(), -1)
    rest = q.scatter(1, ids, -math.inf)
    out = rest - rest.logsumexp(-1, keepdim=True) + tail[:, None]
    return out.scatter(1, ids, lp)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------------------------
# exactness

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_k_equals_v_matches_full_reference(kind, temperature):
    t = torch.randn(9, 40, dtype=torch.float64) * 3
    s = torch.randn(9, 40, dtype=torch.float64, requires_grad=True)
    ids, lp, tail = L.topk_targets(t, 40)
    assert torch.isneginf(tail).all()
    for t2 in (False, True):
        a = L.sparse_kd_loss(s, ids, lp, tail, kind=kind, temperature=temperature, t2_scale=t2, chunk=4)
        b = L.FULL_REFERENCES[kind](s, t, temperature=temperature, t2_scale=t2)
        torch.testing.assert_close(a.total, b.total, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_of(a.total, s), grad_of(b.total, s), rtol=1e-9, atol=1e-12)
        assert int(a.count) == int(b.count) == 9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_sparse_loss_is_full_loss_against_completed_teacher(kind, temperature):
    """The documented definition, for any k and T: the teacher's tail takes the student's shape."""
    t = torch.randn(8, 60, dtype=torch.float64) * 3
    s = torch.randn(8, 60, dtype=torch.float64, requires_grad=True)
    ids, lp, tail = L.topk_targets(t, 7)
    phat = completed_teacher(s, ids, lp, tail)
    a = L.sparse_kd_loss(s, ids, lp, tail, kind=kind, temperature=temperature, chunk=3)
    b = L.FULL_REFERENCES[kind](s, phat, temperature=temperature)
    torch.testing.assert_close(a.total, b.total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(a.total, s), grad_of(b.total, s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_student_equal_to_teacher_has_zero_loss_and_gradient_at_any_temperature(kind):
    t = peaked(6, 300, seed=1)
    s = t.clone().requires_grad_(True)
    ids, lp, tail = L.topk_targets(t, 5)
    for temperature in (1.0, 2.0, 0.5):
        out = L.sparse_kd_loss(s, ids, lp, tail, kind=kind, temperature=temperature)
        assert abs(out.total.item()) < 1e-10
        assert grad_of(out.total, s).abs().max() < 1e-10


def _tail_stats(t, s, ids):
    """Teacher/student tail masses (T = 1) and Delta = oscillation of (t - s) over the tail."""
    rest = torch.ones_like(t, dtype=torch.bool).scatter(1, ids, False)
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    P = torch.where(rest, lt.exp(), 0).sum(-1)
    Q = torch.where(rest, ls.exp(), 0).sum(-1)
    d = t - s
    delta = torch.where(rest, d, -math.inf).amax(-1) - torch.where(rest, d, math.inf).amin(-1)
    return P, Q, delta


@pytest.mark.parametrize("k", [4, 16, 64])
def test_error_bounds_at_temperature_one_on_peaked_distributions(k):
    t = peaked(40, 1500, seed=2)
    s = student_like(t, seed=3)
    ids, lp, tail = L.topk_targets(t, k)
    P, Q, delta = _tail_stats(t, s, ids)
    beta = 0.5
    M = beta * P + (1 - beta) * Q
    w = beta * P / M
    h = -(w * w.log() + (1 - w) * (1 - w).log())
    bounds = {"forward_kl": P * delta, "reverse_kl": Q * delta, "jsd": M * h}
    for kind in KINDS:
        # per-row values (the public functions return sums; their equality to these is checked below)
        sp = L._sparse_kd_rows(s, ids, lp, tail, kind=kind, temperature=1.0, beta=beta)
        full = L._divergence(kind, torch.log_softmax(t, -1), torch.log_softmax(s, -1), beta)
        torch.testing.assert_close(sp.sum(), L.sparse_kd_loss(s, ids, lp, tail, kind=kind).total)
        torch.testing.assert_close(full.sum(), L.FULL_REFERENCES[kind](s, t).total)
        gap = full - sp
        assert (gap >= -1e-12).all() and (gap <= bounds[kind] + 1e-12).all(), (kind, gap, bounds[kind])
    # on these peaked rows the whole-batch error is small against the loss itself
    for kind in KINDS:
        sp = L.sparse_kd_loss(s, ids, lp, tail, kind=kind).total
        full = L.FULL_REFERENCES[kind](s, t).total
        assert float(full - sp) <= 0.05 * float(full)


def test_forward_kl_error_decomposition_under_temperature():
    """full - sparse = A KL(a~||b~) + (A^ - A) KL(pi||beta_K) + kl(A||B) - kl(A^||B), and the
    tempered tail-mass estimate is within Delta / T in logit space."""
    t = peaked(30, 800, seed=4)
    s = student_like(t, seed=5, noise=1.0)
    k = 8
    ids, lp, tail = L.topk_targets(t, k)
    _, _, delta = _tail_stats(t, s, ids)
    phat = completed_teacher(s, ids, lp, tail)
    rest = torch.ones_like(t, dtype=torch.bool).scatter(1, ids, False)

    def split(logits, T):
        p = torch.softmax(logits / T, -1)
        A = torch.where(rest, p, 0).sum(-1)
        top = p.gather(1, ids) / (1 - A)[:, None]
        cond = torch.where(rest, p, 0) / A[:, None]
        return A, top, cond

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), 0).sum(-1)

    def bkl(x, y):
        return x * (x / y).log() + (1 - x) * ((1 - x) / (1 - y)).log()

    for T in (1.0, 1.5, 3.0):
        A, pi, at = split(t, T)
        Ah, _, _ = split(phat, T)
        B, bk, bt = split(s, T)
        full = L.forward_kl_full(s, t, temperature=T).total
        sp = L.forward_kl(s, ids, lp, tail, temperature=T).total
        pred = (A * kl(at, bt) + (Ah - A) * kl(pi, bk) + bkl(A, B) - bkl(Ah, B)).sum()
        torch.testing.assert_close(full - sp, pred, rtol=1e-8, atol=1e-10)
        logit = lambda x: (x / (1 - x)).log()   # noqa: E731
        assert ((logit(A) - logit(Ah)).abs() <= delta / T + 1e-9).all()


# ----------------------------------------------------------------------------------------------
# chunking, masks, normalisation, dtypes

@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_gradients(kind):
    t = peaked(13, 97, seed=6)
    ids, lp, tail = L.topk_targets(t, 6)
    s = student_like(t, seed=7).float().requires_grad_(True)
    mask = torch.rand(13, generator=torch.Generator().manual_seed(0)) > 0.3
    ref = L.sparse_kd_loss(s, ids, lp.float(), tail.float(), kind=kind, mask=mask, temperature=1.5, chunk=10**6)
    g_ref = grad_of(ref.total, s)
    for chunk in (1, 2, 5, 13):
        out = L.sparse_kd_loss(s, ids, lp.float(), tail.float(), kind=kind, mask=mask, temperature=1.5, chunk=chunk)
        torch.testing.assert_close(out.total, ref.total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_of(out.total, s), g_ref, rtol=1e-6, atol=1e-7)


def test_chunks_never_exceed_chunk_rows(monkeypatch):
    seen = []
    orig = L._sparse_kd_rows

    def spy(x, *a, **kw):
        seen.append(x.shape[0])
        return orig(x, *a, **kw)

    monkeypatch.setattr(L, "_sparse_kd_rows", spy)
    t = peaked(23, 50, seed=8)
    ids, lp, tail = L.topk_targets(t, 4)
    s = t.clone().requires_grad_(True)
    L.forward_kl(s, ids, lp, tail, chunk=5).total.backward()
    assert seen and max(seen) <= 5 and sum(seen) == 23


def test_plain_autograd_agrees_with_in_forward_gradient():
    """The chunked Function's stored gradient equals autograd through a plain implementation."""
    t = peaked(7, 64, seed=9)
    ids, lp, tail = L.topk_targets(t, 5)
    s = student_like(t, seed=10).requires_grad_(True)
    for kind in KINDS:
        got = grad_of(L.sparse_kd_loss(s, ids, lp, tail, kind=kind, temperature=1.3).total, s)
        plain = L._sparse_kd_rows(s, ids, lp, tail, kind=kind, temperature=1.3, beta=0.5).sum()
        torch.testing.assert_close(got, grad_of(plain, s), rtol=1e-10, atol=1e-12)


def test_masked_positions_are_excluded():
    t = peaked(10, 80, seed=11)
    ids, lp, tail = L.topk_targets(t, 6)
    s = student_like(t, seed=12).requires_grad_(True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    out = L.reverse_kl(s, ids, lp, tail, mask=mask)
    assert int(out.count) == 6
    g = grad_of(out.total, s)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()
    # the same as computing on the kept rows only; packed targets (one per counted position) too
    kept = L.reverse_kl(s[mask], ids[mask], lp[mask], tail[mask])
    packed = L.reverse_kl(s, ids[mask], lp[mask], tail[mask], mask=mask)
    torch.testing.assert_close(out.total, kept.total)
    torch.testing.assert_close(out.total, packed.total)
    # garbage in masked rows changes nothing
    s2 = s.detach().clone()
    s2[~mask] = 1e4
    lp2 = lp.clone()
    lp2[~mask] = 0.0
    torch.testing.assert_close(L.reverse_kl(s2, ids, lp2, tail, mask=mask).total, out.total)


def test_empty_mask_gives_zero_and_backward_works():
    s = torch.randn(4, 30, requires_grad=True)
    ids, lp, tail = L.topk_targets(torch.randn(4, 30), 3)
    out = L.jsd(s, ids, lp, tail, mask=torch.zeros(4, dtype=torch.bool))
    assert int(out.count) == 0 and out.total.item() == 0.0 and out.mean().item() == 0.0
    out.total.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_sum_count_composes_across_shards(kind):
    """Two halves (two ranks, or two accumulation steps) summed and divided by the global count give
    the whole-batch mean and the whole-batch gradient."""
    t = peaked(12, 70, seed=13)
    ids, lp, tail = L.topk_targets(t, 5)
    s = student_like(t, seed=14).reshape(3, 4, 70).requires_grad_(True)   # [B, L, V]
    labels_mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) > 0.25
    ids3, lp3, tail3 = ids.reshape(3, 4, 5), lp.reshape(3, 4, 5), tail.reshape(3, 4)
    whole = L.sparse_kd_loss(s, ids3, lp3, tail3, kind=kind, mask=labels_mask, temperature=2.0)
    g_whole = grad_of(whole.mean(), s)
    parts = [L.sparse_kd_loss(s[sl], ids3[sl], lp3[sl], tail3[sl], kind=kind, mask=labels_mask[sl], temperature=2.0)
             for sl in (slice(0, 1), slice(1, 3))]
    count = sum(int(p.count) for p in parts)
    assert count == int(whole.count) == int(labels_mask.sum())
    total = sum(p.total for p in parts) / count
    torch.testing.assert_close(total, whole.mean())
    torch.testing.assert_close(grad_of(total, s), g_whole)
    torch.testing.assert_close((parts[0] + parts[1]).mean(), whole.mean())


def test_bf16_logits_are_accepted_and_computed_in_fp32():
    t = peaked(8, 120, seed=15)
    ids, lp, tail = L.topk_targets(t, 10)
    s16 = student_like(t, seed=16).to(torch.bfloat16).requires_grad_(True)
    s32 = s16.detach().float().requires_grad_(True)
    for kind in KINDS:
        a = L.sparse_kd_loss(s16, ids, lp, tail, kind=kind, temperature=1.5, chunk=3)
        b = L.sparse_kd_loss(s32, ids, lp.float(), tail.float(), kind=kind, temperature=1.5, chunk=3)
        assert a.total.dtype == torch.float32
        torch.testing.assert_close(a.total, b.total, rtol=1e-6, atol=1e-6)
        ga = grad_of(a.total, s16)
        assert ga.dtype == torch.bfloat16
        torch.testing.assert_close(ga.float(), grad_of(b.total, s32), rtol=1e-2, atol=1e-3)
    ce = L.ce_loss(s16, torch.randint(0, 120, (8,)))
    assert ce.total.dtype == torch.float32 and torch.isfinite(ce.total)


def test_t2_scale_multiplies_by_t_squared():
    t = peaked(5, 60, seed=17)
    ids, lp, tail = L.topk_targets(t, 4)
    s = student_like(t, seed=18)
    a = L.forward_kl(s, ids, lp, tail, temperature=3.0).total
    b = L.forward_kl(s, ids, lp, tail, temperature=3.0, t2_scale=True).total
    torch.testing.assert_close(b, 9.0 * a)


# ----------------------------------------------------------------------------------------------
# CE and the one-pass CE + KD

def test_ce_matches_torch_cross_entropy():
    s = torch.randn(2, 9, 33, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 33, (2, 9))
    labels[0, :3] = -100
    labels[1, -1] = -100
    out = L.ce_loss(s, labels, chunk=4)
    ref = F.cross_entropy(s.reshape(-1, 33), labels.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out.total, ref)
    assert int(out.count) == 14
    torch.testing.assert_close(grad_of(out.total, s), grad_of(ref, s))
    torch.testing.assert_close(out.mean(), F.cross_entropy(s.reshape(-1, 33), labels.reshape(-1)))


@pytest.mark.parametrize("kind", KINDS)
def test_distill_loss_is_weighted_sum_of_ce_and_kd(kind):
    t = peaked(10, 90, seed=19)
    ids, lp, tail = L.topk_targets(t, 8)
    s = student_like(t, seed=20).requires_grad_(True)
    labels = t.argmax(-1)
    labels[[2, 7]] = -100
    out = L.distill_loss(s, labels, ids, lp, tail, kind=kind, kd_weight=0.7, ce_weight=0.3,
                         temperature=2.0, t2_scale=True, chunk=4)
    mask = labels != -100
    kd = L.sparse_kd_loss(s, ids, lp, tail, kind=kind, mask=mask, temperature=2.0, t2_scale=True)
    ce = L.ce_loss(s, labels)
    torch.testing.assert_close(out.kd, kd.total.detach())
    torch.testing.assert_close(out.ce, ce.total.detach())
    torch.testing.assert_close(out.total, 0.7 * kd.total + 0.3 * ce.total)
    assert int(out.count) == 8
    torch.testing.assert_close(grad_of(out.total, s), grad_of(0.7 * kd.total + 0.3 * ce.total, s))
    assert not out.kd.requires_grad and not out.ce.requires_grad


def test_module_wrapper():
    t = peaked(4, 50, seed=21)
    ids, lp, tail = L.topk_targets(t, 4)
    s = student_like(t, seed=22)
    mod = L.SparseKDLoss(kind="jsd", temperature=1.5, beta=0.3)
    torch.testing.assert_close(mod(s, ids, lp, tail).total,
                               L.jsd(s, ids, lp, tail, temperature=1.5, beta=0.3).total)
    assert "jsd" in repr(mod)


# ----------------------------------------------------------------------------------------------
# refusals

def test_bad_inputs_are_refused():
    s = torch.randn(3, 20)
    ids, lp, tail = L.topk_targets(torch.randn(3, 20), 4)
    with pytest.raises(ValueError, match="duplicate"):
        bad = ids.clone()
        bad[1, 2] = bad[1, 0]
        L.forward_kl(s, bad, lp, tail)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        bad = ids.clone()
        bad[0, 0] = 20
        L.forward_kl(s, bad, lp, tail)
    with pytest.raises(ValueError, match="k = 21"):
        L.forward_kl(s, torch.zeros(3, 21, dtype=torch.long), torch.zeros(3, 21), tail)
    with pytest.raises(ValueError, match="rows"):
        L.forward_kl(s, ids[:2], lp[:2], tail[:2])
    with pytest.raises(ValueError, match="kind"):
        L.sparse_kd_loss(s, ids, lp, tail, kind="mse")
    with pytest.raises(ValueError, match="temperature"):
        L.forward_kl(s, ids, lp, tail, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        L.jsd(s, ids, lp, tail, beta=1.0)
    with pytest.raises(ValueError, match="chunk"):
        L.forward_kl(s, ids, lp, tail, chunk=0)


def test_shifted_non_contiguous_logits_view():
    """logits[:, :-1] (the usual shift) is used as a view; gradients reach the full tensor."""
    t = peaked(2 * 6, 40, seed=23).reshape(2, 6, 40)
    base = student_like(t, seed=24).requires_grad_(True)
    view = base[:, :-1]
    assert not view.is_contiguous()
    ids, lp, tail = L.topk_targets(t[:, 1:], 4)
    labels = t[:, 1:].argmax(-1)
    labels[0, 0] = -100
    a = L.distill_loss(view, labels, ids, lp, tail, temperature=1.5, chunk=3)
    b = L.distill_loss(view.detach().contiguous().requires_grad_(True), labels, ids, lp, tail, temperature=1.5)
    torch.testing.assert_close(a.total, b.total)
    g = grad_of(a.total, base)
    assert (g[:, -1] == 0).all() and (g[0, 0] == 0).all() and (g[0, 1] != 0).any() and (g[1, 0] != 0).any()


def test_distill_kd_mask_limits_kd_to_covered_positions():
    t = peaked(9, 60, seed=25)
    ids, lp, tail = L.topk_targets(t, 5)
    s = student_like(t, seed=26).requires_grad_(True)
    labels = t.argmax(-1)
    labels[0] = -100
    cover = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    junk_ids, junk_lp = ids.clone(), lp.clone()
    junk_ids[~cover] = 0                                    # duplicates: would be refused if used
    junk_lp[~cover] = float("nan")
    out = L.distill_loss(s, labels, junk_ids, junk_lp, tail, kd_mask=cover, chunk=4)
    lab_mask = labels != -100
    kd = L.sparse_kd_loss(s, ids, lp, tail, mask=lab_mask & cover)
    ce = L.ce_loss(s, labels)
    assert int(out.count) == 8 and int(out.kd_count) == 6
    torch.testing.assert_close(out.kd, kd.total.detach())
    torch.testing.assert_close(out.total, kd.total + ce.total)
    torch.testing.assert_close(grad_of(out.total, s), grad_of(kd.total + ce.total, s))
