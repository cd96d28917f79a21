"""Helpers the reference solvers share."""

from __future__ import annotations

import contextlib

import torch

from ..constants import ARMIJO, MAX_HALVINGS
from ..inputs import PackedProblem, scatter_classes


def evidence(problem: PackedProblem) -> torch.Tensor:
    """``n_l = sum_{i: l in L_i} w_i p_il``, shape ``(B, K)``."""
    layout = problem.layout
    return scatter_classes(problem.values * problem.weights[layout.teacher_index], layout)


def masked_softmax(u: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Softmax over covered classes; uncovered classes get exactly zero."""
    return torch.softmax(u.masked_fill(~covered, float("-inf")), dim=1).nan_to_num(0.0)


def normalise(q: torch.Tensor) -> torch.Tensor:
    return q / q.sum(dim=1, keepdim=True)


def teacher_pairs(mask: torch.Tensor) -> torch.Tensor | None:
    """The ``(K, N*N)`` table of class-shared teacher pairs :func:`masked_gram` multiplies by, or
    None where it would be large (over 2^22 elements). It depends on the mask only: build it once."""
    teachers, classes = mask.shape
    if classes * teachers * teachers > 1 << 22:
        return None
    return (mask.T.unsqueeze(2) * mask.T.unsqueeze(1)).reshape(classes, teachers * teachers)


def masked_gram(x: torch.Tensor, mask: torch.Tensor, pairs: torch.Tensor | None) -> torch.Tensor:
    """``(B, K) -> (B, N, N)``: ``sum_l x_l M_il M_jl``, the x-weighted overlap of teachers i and j.

    One GEMM against ``pairs`` (:func:`teacher_pairs`) where there is that table, else a batched
    product (whose ``(B, N, K)`` temporary the callers bound by chunking rows). The products are
    computed in full precision whatever ``torch.backends`` allows (TF32 would round the small
    eigenvalues of the Newton systems away).
    """
    with full_precision():
        if pairs is not None:
            return (x @ pairs).view(-1, mask.shape[0], mask.shape[0])
        return (mask * x.unsqueeze(1)) @ mask.T


@contextlib.contextmanager
def full_precision():
    """Float32 matrix products in IEEE precision inside the block: the reference's answers must not
    depend on ``torch.set_float32_matmul_precision`` or ``torch.backends.cuda.matmul.allow_tf32``."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]


def backtrack(candidate, objective, f0, slope, current: tuple, full_only=None, frozen=None):
    """Batched Armijo backtracking: per sample, the first ``t`` in ``1, 1/2, 1/4, ...`` with
    ``objective(*candidate(t)) <= f0 + ARMIJO t slope``, up to a rounding slack (near an optimum
    the objective is flat to rounding, and a full step must still be taken there).

    ``candidate(t)`` maps step lengths ``(b,)`` to a tuple of ``(b, ...)`` tensors. Rows in
    ``full_only`` try only the full step; rows in ``frozen`` take none. Returns the accepted tuple
    (rows that accept no step keep ``current``) and which rows accepted a step.
    """
    slack = 16 * torch.finfo(f0.dtype).eps * f0.abs()
    t = torch.ones_like(f0)
    accepted = torch.zeros_like(f0, dtype=torch.bool)
    stop = torch.zeros_like(accepted) if frozen is None else frozen.clone()
    new = tuple(x.clone() for x in current)
    for _ in range(MAX_HALVINGS):
        cand = candidate(t)
        value = objective(*cand)
        ok = ~accepted & ~stop & (value <= f0 + ARMIJO * t * slope.clamp_max(0) + slack) & torch.isfinite(value)
        for target, x in zip(new, cand):
            target[ok] = x[ok]
        accepted |= ok
        if full_only is not None:
            stop |= full_only
        if bool((accepted | stop).all()):
            break
        t = torch.where(accepted | stop, t, t / 2)
    return new, accepted


def row_chunks(batch: int, per_row_elements: int, budget: int = 1 << 24):
    """Split ``range(batch)`` so one chunk's largest temporary stays near ``budget`` elements."""
    step = max(1, budget // max(1, per_row_elements))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))
