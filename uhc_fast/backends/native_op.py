"""``torch.ops.uhc_fast.solve``: the compiled kernels as one ``torch.library`` custom op, so that
``torch.compile`` sees one opaque op.

``solve(tensors, kinds, structure, weights, system, method, num_classes, out_dtype, temperature,
eps, tol, max_iter)`` runs the CPU kernels on CPU tensors and the CUDA kernels on CUDA tensors
(see :mod:`.native_launch` for the arguments and the outputs; ``kinds`` are the teachers' kind
codes, ``num_classes`` is K, which the structure holds as data, and ``out_dtype`` is 2 (float32) or
3 (float64)). Its fake implementation gives the output shapes from the inputs' shapes and those
integers alone. Eager calls go to the launchers directly: a custom op's first call imports the
compiler stack (``torch._dynamo``, seconds), which eager users should not pay for.
"""

from __future__ import annotations

import torch

from . import native_launch

_OUT_DTYPES = {native_launch.DTYPE_CODES[d]: d for d in (torch.float32, torch.float64)}


@torch.library.custom_op("uhc_fast::solve", mutates_args=(), device_types="cpu")
def solve(
    tensors: list[torch.Tensor],
    kinds: list[int],
    structure: torch.Tensor,
    weights: torch.Tensor,
    system: torch.Tensor,
    method: str,
    num_classes: int,
    out_dtype: int,
    temperature: float,
    eps: float,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft labels and diagnostics from the teachers' arrays with the compiled CPU kernels."""
    return native_launch.launch_cpu(
        tensors, kinds, structure, weights, system, method, _OUT_DTYPES[out_dtype], temperature, eps, tol, max_iter
    )


@solve.register_kernel("cuda")
def _solve_cuda(
    tensors, kinds, structure, weights, system, method, num_classes, out_dtype, temperature, eps, tol, max_iter
):
    return native_launch.launch_cuda(
        tensors, kinds, structure, weights, system, method, _OUT_DTYPES[out_dtype], temperature, eps, tol, max_iter
    )


@solve.register_fake
def _solve_fake(
    tensors, kinds, structure, weights, system, method, num_classes, out_dtype, temperature, eps, tol, max_iter
):
    dtype, like = _OUT_DTYPES[out_dtype], tensors[0]
    batch = like.shape[0]
    return (
        like.new_empty(batch, num_classes, dtype=dtype),
        like.new_empty(batch, dtype=torch.int32),
        like.new_empty(batch, dtype=torch.bool),
        *(like.new_empty(batch, dtype=dtype) for _ in range(3)),
        like.new_empty(len(kinds), 4, dtype=torch.int64),
    )
