"""Distillation and cross-entropy losses on sparse (cached top-k) teacher targets, chunked.

Plain functions on tensors: no rank, world size or trainer state. Every loss returns a
:class:`LossSum`, the SUM over the counted label positions and their COUNT, because the trainer
normalises by the label tokens of the global batch (all ranks, all accumulation steps): the trainer
all-reduces the counts, divides the sums, and a run is then the same whatever the world size.
``LossSum.mean()`` is the per-batch convenience.

Shapes. ``student_logits`` [..., V] (any float dtype; bf16 is upcast chunk by chunk, math in fp32,
fp64 kept when given) are already aligned with their targets: ``student_logits[i]`` predicts
``labels[i]`` (the caller shifts). Leading dims count as N positions; a non-contiguous view such as
``logits[:, :-1]`` is read row by row, never copied whole. Teacher targets are
``topk_ids`` [*, k] int, ``topk_logprobs`` [*, k] float (log-probs at temperature 1, as cached) and
``tail_logmass`` [*] float (log of the teacher mass outside the k ids; compute it as the logsumexp
of the complement, not ``log1p(-sum)``, which underflows to -inf for peaked rows). ``*`` is either
N (aligned with the logits) or M = the number of counted positions (packed, as the cache stores
only label positions); both mean the same when every position counts.

The sparse teacher, with and without temperature
------------------------------------------------
The cache knows the teacher's top-k probabilities ``p_i`` and its tail mass ``P``, not how ``P``
is spread over the other ``V - k`` ids. At temperature 1 nothing else is needed: the divergence is
taken over k + 1 outcomes (the k ids and one tail bucket) and the student's bucket is its exact
mass outside the teacher's ids (``logsumexp`` of its log-softmax over the complement). At
temperature ``T`` the tempered teacher ``p^(1/T) / Z_T`` needs ``S_T = sum_tail p_j^(1/T)``, which
depends on the unknown spread. We complete the teacher's tail with the STUDENT's tail shape: the
teacher is taken to be ``p_hat = (p_1..p_k on the ids, P * q_j / Q on the rest)`` where ``q`` is
the student's distribution and ``Q`` its tail mass (both at T = 1, detached). Then

* every sparse loss here equals the plain full-vocabulary loss against ``p_hat`` at temperature T
  (over V outcomes; since teacher and student tails then have the same shape, the k + 1 bucket
  form loses nothing), which the tests check for every T;
* it is exact when k = V (no tail) and, for any k and T, when the teacher's tail has the student's
  shape; a student equal to the teacher has zero loss and zero gradient at every T;
* at T = 1 it is the k + 1 bucket divergence above (the completion does not change P).

The two obvious alternatives are worse under temperature: treating the tail as one token with mass
``P`` (``S_T = P^(1/T)``) or spreading it uniformly (``S_T = (V - k)^(1 - 1/T) P^(1/T)``) are also
exact at k = V, but at T != 1 they give a student EQUAL to the teacher a non-zero loss and gradient,
pulling its tail away from the teacher's (towards one token, or towards uniform over 150k ids).

Error against the full-vocabulary loss (k < V). Let ``t``, ``s`` be teacher and student logits and
``Delta = max_tail(t - s) - min_tail(t - s)`` the oscillation of their difference over the tail ids
(it bounds every log-ratio of the two conditional tail distributions). At T = 1 the sparse loss is
a coarsening of the full one, so by the data-processing inequality it is a LOWER bound, and::

    forward KL:  0 <= full - sparse = P * KL(p~ || q~) <= P * Delta
    reverse KL:  0 <= full - sparse = Q * KL(q~ || p~) <= Q * Delta
    JSD_beta:    0 <= full - sparse = M * JSD_w(p~, q~) <= M * h(w) <= M * log 2,
                 M = beta*P + (1-beta)*Q,  w = beta*P / M,  h = binary entropy in nats

with ``p~``, ``q~`` the teacher's and student's distributions conditioned on the tail. On peaked
teachers P is small (median tail mass ~1e-4 at k=64 on our synthetic LM-like logits), so the error
is too.
At T != 1 a second term appears because the tempered tail mass of ``p_hat`` differs from the
teacher's: with ``A`` the true and ``A_hat`` the estimated tempered teacher tail mass,
``|logit(A) - logit(A_hat)| <= Delta / T``, and for forward KL (``pi``/``beta_K`` the tempered
teacher/student within the top k, ``B`` the student's tempered tail mass, ``kl`` binary KL)::

    full - sparse = A * KL(p~_T || q~_T) + (A_hat - A) * KL(pi || beta_K) + kl(A || B) - kl(A_hat || B)

(tested as an identity). It vanishes when P -> 0 and grows with T: with V = 152k a tempered teacher
at T = 2 can put most of its mass in the tail, which a top-k cache cannot describe. Use T = 1 (or
close) with cached targets; this is a property of top-k caching, not of this estimate.

Divergences (teacher p, student q, both at temperature T)::

    forward KL  KL(p || q) = sum p (log p - log q)        mass-covering, the classic KD loss
    reverse KL  KL(q || p) = sum q (log q - log p)        mode-seeking
    JSD_beta    beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q  (beta = 0.5:
                the usual Jensen-Shannon divergence; bounded by h(beta) <= log 2)

``t2_scale=True`` multiplies the KD term by T**2 (Hinton et al. 2015): the gradient of a tempered
soft loss scales like 1/T**2, so the factor keeps its weight relative to the label CE comparable
when T changes. Off by default; it has no effect at T = 1.

Memory and gradients. Positions are processed ``chunk`` at a time: at most ``chunk x V`` floats of
student log-probs (and a few same-sized temporaries) exist at once, never N x V in fp32. The
gradient with respect to the logits is computed inside the forward pass, chunk by chunk, and kept
in the logits' dtype; backward returns it scaled by the incoming gradient (e.g. 1 / global token
count). Peak extra memory is ~2 logits-sized tensors in the logits' dtype plus a few chunk x V fp32
temporaries (measured on CPU, N=2048, V=151,680, bf16: +1.7 GB vs +4.9 GB for a plain fp32
log-softmax loss). Teacher targets get no gradient. Double backward is not supported.

API: :func:`sparse_kd_loss` (and :func:`forward_kl`, :func:`reverse_kl`, :func:`jsd`),
:func:`ce_loss`, :func:`distill_loss` (CE + KD in one pass), :class:`SparseKDLoss` (module form);
references :func:`forward_kl_full`, :func:`reverse_kl_full`, :func:`jsd_full`; :func:`topk_targets`
turns full teacher logits into cache-style targets.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


class LossSum(NamedTuple):
    """``total``: scalar sum over counted positions (differentiable; fp32, fp64 for fp64 logits);
    ``count``: scalar int64."""
    total: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        """Per-batch mean (0 when nothing is counted). Across ranks, reduce ``total``/``count``."""
        return self.total / self.count.clamp(min=1).to(self.total.dtype)

    def __add__(self, other: "LossSum") -> "LossSum":   # type: ignore[override]
        """Element-wise sum (two shards or micro-batches), not tuple concatenation."""
        return LossSum(self.total + other.total, self.count + other.count)


class DistillLossSum(NamedTuple):
    """One pass of CE + KD. ``total = ce_weight * ce + kd_weight * kd`` (differentiable); ``kd`` and
    ``ce`` are the detached sums for logging (``kd`` includes the T**2 factor when enabled);
    ``count`` the label positions (the normaliser), ``kd_count`` those that also had KD targets."""
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    count: torch.Tensor
    kd_count: torch.Tensor

    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1).to(self.total.dtype)


# ----------------------------------------------------------------------------------------------
# chunked evaluation with the gradient computed in the forward pass

class _Chunked(torch.autograd.Function):
    """Sum of ``fn`` over selected rows of ``logits``, chunk by chunk.

    ``fn(x [m, V] float, *targets_chunk) -> (objective [m], logged [m, c])``. Returns the summed
    objective (differentiable w.r.t. ``logits``) and the summed logged columns (not differentiable).
    ``pos`` [M] are the (distinct) flat positions of ``logits`` [..., V] to use; each target is [M, ...].
    """

    @staticmethod
    def forward(ctx, logits, pos, chunk, fn, n_logged, *targets):
        ctx.n_targets = len(targets)
        want_grad = ctx.needs_input_grad[0]
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device) if want_grad else None
        total = torch.zeros((), dtype=cdt, device=logits.device)
        logged = torch.zeros(n_logged, dtype=cdt, device=logits.device)
        lead = logits.shape[:-1]
        for start in range(0, pos.numel(), chunk):
            idx = pos[start:start + chunk]
            # rows by multi-index, so a non-contiguous view ([B, L-1, V] after a shift) is never copied whole
            where = (idx,) if len(lead) == 1 else torch.unravel_index(idx, lead)
            x = logits[where].to(cdt)
            tg = [t[start:start + chunk] for t in targets]
            if want_grad:
                with torch.enable_grad():
                    x.requires_grad_(True)
                    obj, lg = fn(x, *tg)
                    s = obj.sum()
                    (g,) = torch.autograd.grad(s, x)
                grad[where] = g.to(grad.dtype)
                total += s.detach()
            else:
                obj, lg = fn(x, *tg)
                total += obj.sum()
            logged += lg.detach().sum(0)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(logged)
        return total, logged

    @staticmethod
    def backward(ctx, g_total, g_logged):
        (grad,) = ctx.saved_tensors
        rest = (None,) * (4 + ctx.n_targets)
        if grad is None:
            return (None,) + rest
        return (grad * g_total.to(grad.dtype),) + rest


def _run_chunked(logits2d, pos, chunk, fn, n_logged, targets):
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _Chunked.apply(logits2d, pos, int(chunk), fn, n_logged, *targets)


# ----------------------------------------------------------------------------------------------
# per-chunk math

def _xlogr(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """``p * (log_p - log_r)`` with 0 where p == 0 (also when both logs are -inf)."""
    d = torch.where(p > 0, log_p - log_r, torch.zeros_like(p))
    return p * d


def _divergence(kind: str, lt: torch.Tensor, ls: torch.Tensor, beta: float) -> torch.Tensor:
    """Divergence per row between teacher log-probs ``lt`` and student log-probs ``ls`` [m, n]."""
    if kind == "forward_kl":
        return _xlogr(lt.exp(), lt, ls).sum(-1)
    if kind == "reverse_kl":
        return _xlogr(ls.exp(), ls, lt).sum(-1)
    if kind == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * _xlogr(lt.exp(), lt, lm).sum(-1) + (1 - beta) * _xlogr(ls.exp(), ls, lm).sum(-1)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _sparse_kd_rows(x: torch.Tensor, ids: torch.Tensor, tlp: torch.Tensor, tail: torch.Tensor, *,
                    kind: str, temperature: float, beta: float, labels: torch.Tensor | None = None):
    """KD per row on k + 1 outcomes. x [m, V] student logits; ids [m, k]; tlp [m, k]; tail [m].

    With ``labels`` [m], returns (kd [m], ce [m]), the CE at T = 1 sharing the log-softmax."""
    m, v = x.shape
    k = ids.shape[1]
    T = float(temperature)
    tlp = tlp.to(x.dtype)
    tail = tail.to(x.dtype)
    ls1 = torch.log_softmax(x, dim=-1) if (T == 1.0 or labels is not None) else None
    ls_T = ls1 if T == 1.0 else torch.log_softmax(x / T, dim=-1)
    s_top = ls_T.gather(1, ids)
    if k == v:   # no tail outcome at all (ids are a permutation of the vocabulary)
        s_tail = torch.full((m,), -math.inf, dtype=x.dtype, device=x.device)
        t_tail = s_tail
    else:
        s_tail = ls_T.scatter(1, ids, -math.inf).logsumexp(-1)
        if T == 1.0:
            t_tail = tail
        else:
            # the teacher's tail spread like the student's (T = 1, detached): see the module docstring
            with torch.no_grad():
                rest1 = (ls1.detach() if ls1 is not None else torch.log_softmax(x, dim=-1)).scatter(1, ids, -math.inf)
                log_q1 = rest1.logsumexp(-1)
                shape = (rest1 / T).logsumexp(-1)               # log sum_tail q_j^(1/T)
                t_tail = (tail - log_q1) / T + shape
                t_tail = torch.where(torch.isneginf(tail), torch.full_like(t_tail, -math.inf), t_tail)
    t = torch.cat([tlp / T, t_tail[:, None]], dim=1)
    lt = t - t.logsumexp(-1, keepdim=True)                           # renormalise over k + 1
    ls = torch.cat([s_top, s_tail[:, None]], dim=1)
    kd = _divergence(kind, lt, ls, beta)
    if labels is None:
        return kd
    return kd, -ls1.gather(1, labels[:, None])[:, 0]


def _ce_rows(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return x.logsumexp(-1) - x.gather(1, labels[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------
# argument handling

def _dims(student_logits: torch.Tensor) -> tuple[int, int]:
    """(N positions, V) of logits [..., V]; the tensor itself is not reshaped (no copy of a view)."""
    if student_logits.ndim < 2:
        raise ValueError(f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    return student_logits[..., 0].numel(), student_logits.shape[-1]


def _positions(n: int, mask: torch.Tensor | None, device) -> torch.Tensor:
    if mask is None:
        return torch.arange(n, device=device)
    mask = mask.reshape(-1)
    if mask.numel() != n:
        raise ValueError(f"mask has {mask.numel()} positions, logits have {n}")
    return mask.to(device=device, dtype=torch.bool).nonzero().flatten()


def _select(t: torch.Tensor, name: str, n: int, pos: torch.Tensor, tail_dims: int) -> torch.Tensor:
    """Targets given aligned ([N, ...]) or packed ([M, ...]) -> packed [M, ...]."""
    t = t.reshape((-1,) + tuple(t.shape[t.ndim - tail_dims:])) if tail_dims else t.reshape(-1)
    m = pos.numel()
    if t.shape[0] == m:
        return t.to(pos.device)
    if t.shape[0] == n:
        return t.to(pos.device).index_select(0, pos)
    raise ValueError(f"{name} has {t.shape[0]} rows: expected {n} (aligned with the logits) or {m} "
                     f"(one per counted position)")


def _check_topk(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, vocab: int) -> torch.Tensor:
    if ids.ndim != 2 or lp.shape != ids.shape or tail.shape != ids.shape[:1]:
        raise ValueError(f"expected topk_ids [M,k], topk_logprobs [M,k], tail_logmass [M]; got "
                         f"{tuple(ids.shape)}, {tuple(lp.shape)}, {tuple(tail.shape)}")
    k = ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} must be in [1, V = {vocab}]")
    ids = ids.long()
    if ids.numel():
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"teacher ids outside [0, {vocab}): range [{int(ids.min())}, "
                             f"{int(ids.max())}] (teacher/student vocabulary mismatch?)")
        if k > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("duplicate teacher ids within a position")
    return ids


def _check_kd_args(kind: str, temperature: float, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")


def _count(pos: torch.Tensor) -> torch.Tensor:
    return torch.tensor(pos.numel(), dtype=torch.int64, device=pos.device)


# ----------------------------------------------------------------------------------------------
# public losses on sparse targets

def sparse_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   tail_logmass: torch.Tensor, *, kind: Kind = "forward_kl", mask: torch.Tensor | None = None,
                   temperature: float = 1.0, beta: float = 0.5, t2_scale: bool = False,
                   chunk: int = DEFAULT_CHUNK) -> LossSum:
    """KD from cached top-k teacher targets, summed over counted positions.

    student_logits [..., V]; mask [...] bool (True = counted; default all); topk_ids [*, k],
    topk_logprobs [*, k] (temperature 1), tail_logmass [*] with * = N or M (module docstring).
    Returns LossSum(total [] fp32, count [] int64).
    """
    _check_kd_args(kind, temperature, beta)
    x = student_logits
    n, vocab = _dims(x)
    pos = _positions(n, mask, x.device)
    ids = _select(topk_ids, "topk_ids", n, pos, 1)
    lp = _select(topk_logprobs, "topk_logprobs", n, pos, 1)
    tail = _select(tail_logmass, "tail_logmass", n, pos, 0)
    ids = _check_topk(ids, lp, tail, vocab)
    scale = temperature ** 2 if t2_scale else 1.0

    def fn(xc, idc, lpc, tlc):
        kd = _sparse_kd_rows(xc, idc, lpc, tlc, kind=kind, temperature=temperature, beta=beta) * scale
        return kd, kd.detach()[:, None]

    total, _ = _run_chunked(x, pos, chunk, fn, 1, (ids, lp, tail))
    return LossSum(total, _count(pos))


def forward_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, **kw) -> LossSum:
    """KL(teacher || student) on sparse targets; see :func:`sparse_kd_loss`."""
    return sparse_kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, kind="forward_kl", **kw)


def reverse_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, **kw) -> LossSum:
    """KL(student || teacher) on sparse targets; see :func:`sparse_kd_loss`."""
    return sparse_kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, kind="reverse_kl", **kw)


def jsd(student_logits, topk_ids, topk_logprobs, tail_logmass, **kw) -> LossSum:
    """Generalised Jensen-Shannon divergence (``beta``, default 0.5); see :func:`sparse_kd_loss`."""
    return sparse_kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, kind="jsd", **kw)


def _label_positions(labels: torch.Tensor, n: int, vocab: int, ignore_index: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the counted positions and their labels; labels [...] aligned with n rows."""
    labels = labels.reshape(-1).to(device)
    if labels.numel() != n:
        raise ValueError(f"labels have {labels.numel()} positions, logits have {n}")
    pos = _positions(n, labels != ignore_index, device)
    lab = labels.index_select(0, pos).long()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab):
        raise ValueError(f"labels outside [0, {vocab}) other than {ignore_index}")
    return pos, lab


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
            chunk: int = DEFAULT_CHUNK) -> LossSum:
    """Cross-entropy on labels, summed over positions whose label is not ``ignore_index``.

    student_logits [..., V]; labels [...] int (already aligned: logits[i] predicts labels[i]).
    """
    x = student_logits
    n, vocab = _dims(x)
    pos, lab = _label_positions(labels, n, vocab, ignore_index, x.device)

    def fn(xc, lc):
        ce = _ce_rows(xc, lc)
        return ce, ce.detach()[:, None]

    total, _ = _run_chunked(x, pos, chunk, fn, 1, (lab,))
    return LossSum(total, _count(pos))


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, *, kind: Kind = "forward_kl",
                 kd_mask: torch.Tensor | None = None, kd_weight: float = 1.0, ce_weight: float = 1.0,
                 temperature: float = 1.0, beta: float = 0.5, t2_scale: bool = False,
                 ignore_index: int = IGNORE_INDEX, chunk: int = DEFAULT_CHUNK) -> DistillLossSum:
    """``ce_weight * CE + kd_weight * KD`` in one pass over the logits (one softmax per chunk at
    T = 1, one stored gradient), on the positions whose label is not ``ignore_index``.

    Shapes as in :func:`sparse_kd_loss` with the mask taken from ``labels`` [...]. ``kd_mask``
    ([...] aligned, or [M] over the label positions; default all) limits KD to the label positions
    that have teacher targets; target rows elsewhere are ignored and may hold anything. The CE is on
    the student at temperature 1 whatever ``temperature`` is. Passing the shifted view
    ``logits[:, :-1]`` with ``labels[:, 1:]`` avoids copying the label rows out of the logits.
    """
    _check_kd_args(kind, temperature, beta)
    x = student_logits
    n, vocab = _dims(x)
    pos, lab = _label_positions(labels, n, vocab, ignore_index, x.device)
    ids = _select(topk_ids, "topk_ids", n, pos, 1)
    lp = _select(topk_logprobs, "topk_logprobs", n, pos, 1)
    tail = _select(tail_logmass, "tail_logmass", n, pos, 0)
    if kd_mask is None:
        use = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
    else:
        use = _select(kd_mask.to(torch.bool), "kd_mask", n, pos, 0)
        if not bool(use.all()):
            # harmless stand-in targets on rows without KD (they get weight 0), so validation and the
            # math never see whatever the caller left there
            k = ids.shape[-1]
            if not 1 <= k <= vocab:
                raise ValueError(f"k = {k} must be in [1, V = {vocab}]")
            off = ~use
            ids, lp, tail = ids.clone(), lp.clone(), tail.clone()
            ids[off] = torch.arange(k, device=ids.device, dtype=ids.dtype)
            lp[off] = -math.log(k + 1)
            tail[off] = -math.log(k + 1)
    ids = _check_topk(ids, lp, tail, vocab)
    scale = temperature ** 2 if t2_scale else 1.0

    def fn(xc, lc, idc, lpc, tlc, uc):
        kd, ce = _sparse_kd_rows(xc, idc, lpc, tlc, kind=kind, temperature=temperature, beta=beta, labels=lc)
        kd = torch.where(uc, kd * scale, torch.zeros_like(kd))
        return ce_weight * ce + kd_weight * kd, torch.stack([kd.detach(), ce.detach()], 1)

    total, logged = _run_chunked(x, pos, chunk, fn, 2, (lab, ids, lp, tail, use))
    kd_count = use.sum().to(torch.int64)
    return DistillLossSum(total, logged[0], logged[1], _count(pos), kd_count)


class SparseKDLoss(torch.nn.Module):
    """Module form of :func:`sparse_kd_loss` (settings fixed at construction, e.g. from the config)."""

    def __init__(self, kind: Kind = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 t2_scale: bool = False, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        _check_kd_args(kind, temperature, beta)
        self.kind, self.temperature, self.beta, self.t2_scale, self.chunk = kind, temperature, beta, t2_scale, chunk

    def forward(self, student_logits, topk_ids, topk_logprobs, tail_logmass, mask=None) -> LossSum:
        return sparse_kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, kind=self.kind,
                              mask=mask, temperature=self.temperature, beta=self.beta,
                              t2_scale=self.t2_scale, chunk=self.chunk)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, temperature={self.temperature}, beta={self.beta}, t2_scale={self.t2_scale}"


# ----------------------------------------------------------------------------------------------
# plain full-vocabulary references (tests; small inputs): no chunking, autograd end to end

def _full(kind: str, student_logits, teacher_logits, mask, temperature, beta, t2_scale) -> LossSum:
    _check_kd_args(kind, temperature, beta)
    _dims(student_logits)
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} logits differ in shape")
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    pos = _positions(s.shape[0], mask, s.device)
    s = s.index_select(0, pos).to(cdt) / temperature
    t = t.to(s.device).index_select(0, pos).to(cdt) / temperature
    d = _divergence(kind, torch.log_softmax(t, -1), torch.log_softmax(s, -1), beta)
    return LossSum(d.sum() * (temperature ** 2 if t2_scale else 1.0), _count(pos))


def forward_kl_full(student_logits, teacher_logits, *, mask=None, temperature=1.0, t2_scale=False) -> LossSum:
    """KL(teacher || student) over the full vocabulary. Logits [..., V]; mask [...] bool."""
    return _full("forward_kl", student_logits, teacher_logits, mask, temperature, 0.5, t2_scale)


def reverse_kl_full(student_logits, teacher_logits, *, mask=None, temperature=1.0, t2_scale=False) -> LossSum:
    """KL(student || teacher) over the full vocabulary. Logits [..., V]; mask [...] bool."""
    return _full("reverse_kl", student_logits, teacher_logits, mask, temperature, 0.5, t2_scale)


def jsd_full(student_logits, teacher_logits, *, mask=None, temperature=1.0, beta=0.5, t2_scale=False) -> LossSum:
    """Generalised JSD over the full vocabulary. Logits [..., V]; mask [...] bool."""
    return _full("jsd", student_logits, teacher_logits, mask, temperature, beta, t2_scale)


FULL_REFERENCES: dict[str, Callable[..., LossSum]] = {
    "forward_kl": forward_kl_full, "reverse_kl": reverse_kl_full, "jsd": jsd_full}


def topk_targets(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse targets from full teacher logits [..., V] at temperature 1, as the cache stores them:
    (ids [..., k] int64, log-probs [..., k] descending, tail log-mass [...]; -inf when k = V).

    The tail is the logsumexp of the log-probs outside the top k, never ``log1p(-sum)``."""
    lp = torch.log_softmax(teacher_logits.float() if teacher_logits.dtype in (torch.bfloat16, torch.float16)
                           else teacher_logits, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    if k == lp.shape[-1]:
        tail = torch.full(lp.shape[:-1], -math.inf, dtype=lp.dtype, device=lp.device)
    else:
        tail = lp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, vals, tail
