"""Fused Triton kernels (installed as ``uhc_fast.kernels``); they import nothing from the package.

- :func:`solve` (:mod:`.launch`): one launch per call for `sd`, `ce`, `mf-p`, `mf-lf`, `mf-lu`, from
  the teachers' arrays as they are (:mod:`.inputs` reads and validates them in the kernel) and the
  layout's sparse tables (:mod:`.plan`); one sample per program of a persistent grid;
- :mod:`.loss`: the direct `ce` training loss, forward and backward;
- :mod:`.ops`: ``torch.library`` custom ops around both, for ``torch.compile``;
- :mod:`.aot`: ahead-of-time compilation for sm_90 with ptxas statistics (no GPU needed);
- :mod:`.topk`: per-sample class sets (teachers' top-k outputs).
"""

from . import (
    inputs,
    launch,
    loss,
    ops,
    plan,
    topk,  # per-sample class sets (uhc_fast.estimate_topk)
)
from ._common import interpreting
from .launch import MAX_TEACHERS, OUTPUTS, Settings, solve

# the teacher limits under their earlier names: the Newton kernels (ce, mf-p) and the tile kernels
MAX_NEWTON_TEACHERS = MAX_TEACHERS["ce"]
MAX_TILE_TEACHERS = MAX_TEACHERS["mf-lf"]

__all__ = [
    "MAX_NEWTON_TEACHERS",
    "MAX_TEACHERS",
    "MAX_TILE_TEACHERS",
    "OUTPUTS",
    "Settings",
    "inputs",
    "interpreting",
    "launch",
    "loss",
    "ops",
    "plan",
    "solve",
    "topk",
]
