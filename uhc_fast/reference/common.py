"""What every solver returns, and the small helpers the reference solvers share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import PackedProblem, scatter_classes


@dataclass
class Solution:
    """A solver's answer for a batch.

    Attributes:
        soft: ``(B, K)`` soft labels, rows sum to 1, zero on uncovered classes.
        iterations: ``(B,)`` int32 iterations used per sample (iterative methods), else None.
        residual: ``(B,)`` the convergence measure reached per sample (iterative methods), else None.
    """

    soft: torch.Tensor
    iterations: torch.Tensor | None = None
    residual: torch.Tensor | None = None


def evidence(problem: PackedProblem) -> torch.Tensor:
    """``n_l = sum_{i: l in L_i} w_i p_il``, shape ``(B, K)``."""
    layout = problem.layout
    return scatter_classes(problem.values * problem.weights[layout.teacher_index], layout)


def masked_softmax(u: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Softmax over covered classes; uncovered classes get exactly zero."""
    return torch.softmax(u.masked_fill(~covered, float("-inf")), dim=1).nan_to_num(0.0)


def normalise(q: torch.Tensor) -> torch.Tensor:
    return q / q.sum(dim=1, keepdim=True)


# Steps (Newton or Gauss-Newton) every iterative solver takes at most when the caller gives no max_iter.
DEFAULT_MAX_ITER = 100


def default_tol(dtype: torch.dtype) -> float:
    """Residual the iterative solvers stop at when the caller gives no ``tol``."""
    return 1e-9 if dtype == torch.float64 else 1e-5


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
    product (whose ``(B, N, K)`` temporary the callers bound by chunking rows).
    """
    if pairs is not None:
        return (x @ pairs).view(-1, mask.shape[0], mask.shape[0])
    return (mask * x.unsqueeze(1)) @ mask.T


def backtrack(candidate, objective, f0: torch.Tensor, slope: torch.Tensor, current: tuple, max_halvings: int = 40):
    """Batched Armijo backtracking: per sample, the first ``t`` in ``1, 1/2, 1/4, ...`` with
    ``objective(*candidate(t)) <= f0 + 1e-4 t slope``, up to a rounding slack (near an optimum the
    objective is flat to rounding, and a full step must still be taken there).

    ``candidate(t)`` maps step lengths ``(b,)`` to a tuple of ``(b, ...)`` tensors; samples that
    accept no step keep ``current``. Returns the accepted tuple.
    """
    slack = 16 * torch.finfo(f0.dtype).eps * f0.abs()
    t = torch.ones_like(f0)
    accepted = torch.zeros_like(f0, dtype=torch.bool)
    new = tuple(x.clone() for x in current)
    for _ in range(max_halvings):
        cand = candidate(t)
        ok = ~accepted & (objective(*cand) <= f0 + 1e-4 * t * slope.clamp_max(0) + slack)
        for target, value in zip(new, cand):
            target[ok] = value[ok]
        accepted |= ok
        if bool(accepted.all()):
            break
        t = torch.where(accepted, t, t / 2)
    return new


def row_chunks(batch: int, per_row_elements: int, budget: int = 1 << 24):
    """Split ``range(batch)`` so one chunk's largest temporary stays near ``budget`` elements."""
    step = max(1, budget // max(1, per_row_elements))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))
