"""``torch.library`` custom ops around the compiled kernels, so ``torch.compile`` sees one op.

``torch.ops.uhc_fast.solve(values, offsets, class_index, cls_ptr, cls_col, cls_teacher, grp_cls_ptr,
grp_cls, grp_ptr, grp_teacher, weights, gplus, method, tol, max_iter, ce_max_iter) -> (soft, iterations,
residual)`` runs the CPU kernels
on CPU tensors and the CUDA kernels on CUDA tensors (see :func:`uhc_fast.native.solve_values` for
the arguments). Its fake implementation gives the output shapes from the input shapes alone:
``soft`` ``(B, K)`` with ``K = cls_ptr.numel() - 1``, ``iterations`` ``(B,)`` int32, ``residual``
``(B,)``, in float64 for float64 values and float32 otherwise. The op has no autograd formula:
soft labels are targets, not something to differentiate through.
"""

from __future__ import annotations

import torch

from . import native


@torch.library.custom_op("uhc_fast::solve", mutates_args=(), device_types="cpu")
def solve(
    values: torch.Tensor,
    offsets: torch.Tensor,
    class_index: torch.Tensor,
    cls_ptr: torch.Tensor,
    cls_col: torch.Tensor,
    cls_teacher: torch.Tensor,
    grp_cls_ptr: torch.Tensor,
    grp_cls: torch.Tensor,
    grp_ptr: torch.Tensor,
    grp_teacher: torch.Tensor,
    weights: torch.Tensor,
    gplus: torch.Tensor,
    method: str,
    tol: float,
    max_iter: int,
    ce_max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft labels for packed ``values`` (B, nnz) with the compiled CPU kernels."""
    structure = (offsets, class_index, cls_ptr, cls_col, cls_teacher, grp_cls_ptr, grp_cls, grp_ptr, grp_teacher)
    return native.launch_cpu(values, structure, weights, gplus, method, tol, max_iter, ce_max_iter)


@solve.register_kernel("cuda")
def _solve_cuda(
    values,
    offsets,
    class_index,
    cls_ptr,
    cls_col,
    cls_teacher,
    grp_cls_ptr,
    grp_cls,
    grp_ptr,
    grp_teacher,
    weights,
    gplus,
    method,
    tol,
    max_iter,
    ce_max_iter,
):
    structure = (offsets, class_index, cls_ptr, cls_col, cls_teacher, grp_cls_ptr, grp_cls, grp_ptr, grp_teacher)
    return native.launch_cuda(values, structure, weights, gplus, method, tol, max_iter, ce_max_iter)


@solve.register_fake
def _solve_fake(
    values,
    offsets,
    class_index,
    cls_ptr,
    cls_col,
    cls_teacher,
    grp_cls_ptr,
    grp_cls,
    grp_ptr,
    grp_teacher,
    weights,
    gplus,
    method,
    tol,
    max_iter,
    ce_max_iter,
):
    acc = native.accumulation_dtype(values.dtype)
    batch, classes = values.shape[0], cls_ptr.shape[0] - 1
    return (
        values.new_empty(batch, classes, dtype=acc),
        values.new_empty(batch, dtype=torch.int32),
        values.new_empty(batch, dtype=acc),
    )
