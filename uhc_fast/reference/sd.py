"""`sd`: the naive extension of standard distillation (zero-pad, weighted average)."""

from __future__ import annotations

from ..inputs import PackedProblem, Solution
from .common import evidence, normalise


def solve_sd(problem: PackedProblem, tol: float, max_iter: int) -> Solution:
    """``q_l`` proportional to ``sum_{i: l in L_i} w_i p_il``. ``tol``/``max_iter`` are unused."""
    return Solution(normalise(evidence(problem)).to(problem.dtype))
