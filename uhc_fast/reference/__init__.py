"""Plain-PyTorch implementations of every method: the definition of correct, on any device.

Each solver takes a :class:`~uhc_fast.inputs.PackedProblem` and returns a :class:`Solution`.
They are batched over samples (no Python loop per sample) and compute in the problem's dtype.
"""

from __future__ import annotations

from .ce import solve_ce
from .common import Solution
from .mf import mf_lf_system, solve_mf_lf, solve_mf_lu, solve_mf_p
from .sd import solve_sd

SOLVERS = {
    "sd": solve_sd,
    "ce": solve_ce,
    "mf-p": solve_mf_p,
    "mf-lf": solve_mf_lf,
    "mf-lu": solve_mf_lu,
}

__all__ = ["SOLVERS", "Solution", "mf_lf_system", "solve_ce", "solve_mf_lf", "solve_mf_lu", "solve_mf_p", "solve_sd"]
