"""`sd`: the naive extension of standard distillation (zero-pad, weighted average)."""

from __future__ import annotations

from ..inputs import PackedProblem
from .common import Solution, evidence, normalise


def solve_sd(problem: PackedProblem, tol: float | None = None, max_iter: int | None = None) -> Solution:
    """``q_l`` proportional to ``sum_{i: l in L_i} w_i p_il``. ``tol``/``max_iter`` are unused."""
    return Solution(normalise(evidence(problem)))
