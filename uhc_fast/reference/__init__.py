"""Plain-PyTorch implementations of every method: the definition of correct, on any device.

Each solver takes a :class:`~uhc_fast.inputs.PackedProblem`, the tolerance and the iteration cap,
and returns a :class:`~uhc_fast.inputs.Solution`. They are batched over samples (no Python loop
per sample) and compute in the problem's dtype. :func:`direct_ce_loss` is the training loss.
"""

from __future__ import annotations

from .ce import solve_ce
from .loss import direct_ce_loss
from .mf_lf import solve_mf_lf
from .mf_lu import solve_mf_lu
from .mf_p import solve_mf_p
from .sd import solve_sd

SOLVERS = {
    "sd": solve_sd,
    "ce": solve_ce,
    "mf-p": solve_mf_p,
    "mf-lf": solve_mf_lf,
    "mf-lu": solve_mf_lu,
}

__all__ = ["SOLVERS", "direct_ce_loss", "solve_ce", "solve_mf_lf", "solve_mf_lu", "solve_mf_p", "solve_sd"]
