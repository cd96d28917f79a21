"""``backend="torch"``: the plain PyTorch reference, on any device."""

from __future__ import annotations

import torch

from .. import reference
from ..inputs import Batch, Solution, pack
from ..methods import Method
from .base import Backend


def solve(batch: Batch, method: Method) -> Solution:
    """Validate and pack ``batch`` in float64, then run the reference solver of ``method``."""
    problem = pack(batch, method.value_kind, torch.float64)
    options = batch.options
    solution = reference.SOLVERS[method.name](problem, options.tol_for(problem.dtype), options.iteration_cap())
    solution.backend = "torch"
    return solution


def backend() -> Backend:
    return Backend(
        "torch",
        ("cpu", "cuda"),
        frozenset(reference.SOLVERS),
        solve,
        reference.direct_ce_loss,
        lambda: {"kind": "plain PyTorch reference"},
    )
