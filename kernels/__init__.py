"""Fused Triton kernels (installed as ``uhc_fast.kernels``).

One launch per method solves a tile of samples per program and keeps each sample's solver state
on chip for all of its iterations. Host launchers take packed ``(B, nnz)`` values (float16,
bfloat16, float32 or float64) and a :class:`~uhc_fast.problem.Layout`, and accumulate in float32
(float64 for float64 values):

- :func:`sd`, :func:`ce`, :func:`mf_p`, :func:`mf_lf`, :func:`mf_lu`: the soft-label solvers;
- :func:`loss_forward`, :func:`loss_backward`: the direct `ce` training loss and its gradient.

:mod:`.ops` wraps them as ``torch.library`` custom ops for ``torch.compile``.
"""

from ._common import MAX_NEWTON_TEACHERS, MAX_TILE_TEACHERS, colmap, interpreting
from .ce import ce
from .loss import loss_backward, loss_forward
from .mf import mf_lf, mf_lu, mf_p
from .sd import sd

__all__ = [
    "MAX_NEWTON_TEACHERS",
    "MAX_TILE_TEACHERS",
    "ce",
    "colmap",
    "interpreting",
    "loss_backward",
    "loss_forward",
    "mf_lf",
    "mf_lu",
    "mf_p",
    "sd",
]
