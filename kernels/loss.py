"""The direct `ce` training loss and its gradient, one pass over each row each way.

Per sample, ``L(u) = sum_i w_i [logsumexp_{k in L_i} u_k - sum_{l in L_i} p_il u_l]`` and
``dL/du_l = sum_{i: l in L_i} w_i (softmax_{L_i}(u)_l - p_il)``. The forward keeps a running
(max, sum-exp) per teacher across class tiles and saves the per-teacher logsumexp, ``(B, N)``, so
the backward is a single pass too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, gather, launch_geometry, map_tile, rmax, rsum


@triton.jit
def _loss_forward_kernel(
    logits_ptr,  # (B, K) student logits, any float dtype, contiguous
    values_ptr,  # (B, nnz) packed teacher probabilities
    weights_ptr,  # (N,)
    colmap_ptr,  # (N, K) int32
    loss_ptr,  # (B,) per-sample loss, DT
    lse_ptr,  # (B, N) per-teacher logsumexp of the student's logits over L_i, DT
    batch,
    nnz,
    num_teachers,
    num_classes,
    rows_per_program,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_n < num_teachers
    w = tl.load(weights_ptr + offs_n, mask=real, other=0.0).to(DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        row_ptr = values_ptr + row * nnz
        u_row = logits_ptr + row * num_classes
        top = tl.full((BLOCK_N,), float("-inf"), DT)
        sum_exp = tl.zeros((BLOCK_N,), dtype=DT)
        linear = tl.zeros((), dtype=DT)
        for k0 in range(0, num_classes, BLOCK_K):
            col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            u = tl.load(u_row + offs_k, mask=offs_k < num_classes, other=0.0).to(DT)
            p = gather(row_ptr, col, present, DT)
            masked = tl.where(present, u[None, :], float("-inf"))
            new_top = tl.maximum(top, rmax(masked, axis=1))
            # teachers with nothing seen yet keep top = -inf: shift by 0 there, not by NaN
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            rescale = tl.where(top == float("-inf"), 0.0, tl.exp(top - shift))
            sum_exp = sum_exp * rescale + rsum(tl.where(present, tl.exp(masked - shift[:, None]), 0.0), axis=1)
            top = new_top
            linear += rsum(rsum(w[:, None] * p * u[None, :], axis=1), axis=0)
        lse = tl.where(real, tl.log(tl.where(real, sum_exp, 1.0)) + top, 0.0)
        tl.store(lse_ptr + row * num_teachers + offs_n, lse, mask=real)
        tl.store(loss_ptr + row, rsum(w * lse, axis=0) - linear)


@triton.jit
def _loss_backward_kernel(
    grad_out_ptr,  # (B,) upstream gradient of the per-sample loss
    logits_ptr,  # (B, K) student logits
    values_ptr,  # (B, nnz)
    weights_ptr,  # (N,)
    colmap_ptr,  # (N, K) int32
    lse_ptr,  # (B, N) saved by the forward
    grad_ptr,  # (B, K) gradient w.r.t. the logits, in the logits' dtype
    batch,
    nnz,
    num_teachers,
    num_classes,
    rows_per_program,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_n < num_teachers
    w = tl.load(weights_ptr + offs_n, mask=real, other=0.0).to(DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        row_ptr = values_ptr + row * nnz
        u_row = logits_ptr + row * num_classes
        g = tl.load(grad_out_ptr + row).to(DT)
        lse = tl.load(lse_ptr + row * num_teachers + offs_n, mask=real, other=0.0).to(DT)
        for k0 in range(0, num_classes, BLOCK_K):
            col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            inside = offs_k < num_classes
            u = tl.load(u_row + offs_k, mask=inside, other=0.0).to(DT)
            p = gather(row_ptr, col, present, DT)
            soft = tl.where(present, tl.exp(u[None, :] - lse[:, None]), 0.0)
            grad = g * rsum(w[:, None] * (soft - p), axis=0)
            tl.store(grad_ptr + row * num_classes + offs_k, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def loss_forward(
    logits: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, colmap_: torch.Tensor, rows_per_program=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss ``(B,)`` and per-teacher logsumexp ``(B, N)``, in the accumulation dtype.

    ``logits`` ``(B, K)``; ``values`` ``(B, nnz)`` packed probabilities; ``colmap_`` ``(N, K)`` int32
    from :func:`uhc_fast.kernels._common.colmap`.
    """
    batch, num_classes = logits.shape
    num_teachers = colmap_.shape[0]
    torch_dt, tl_dt = compute_dtype(torch.promote_types(logits.dtype, values.dtype))
    loss = torch.empty(batch, dtype=torch_dt, device=logits.device)
    lse = torch.empty(batch, num_teachers, dtype=torch_dt, device=logits.device)
    if batch == 0:
        return loss, lse
    grid, rows, bn, bk = launch_geometry(batch, num_teachers, num_classes, rows_per_program, logits.device)
    _loss_forward_kernel[(grid,)](
        logits.contiguous(),
        values.contiguous(),
        weights,
        colmap_,
        loss,
        lse,
        batch,
        values.shape[1],
        num_teachers,
        num_classes,
        rows,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return loss, lse


def loss_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    colmap_: torch.Tensor,
    lse: torch.Tensor,
    rows_per_program=None,
) -> torch.Tensor:
    """Gradient of ``sum_b grad_out[b] * loss[b]`` w.r.t. ``logits``, ``(B, K)`` in ``logits.dtype``."""
    batch, num_classes = logits.shape
    num_teachers = colmap_.shape[0]
    _, tl_dt = compute_dtype(lse.dtype)
    grad = torch.empty(batch, num_classes, dtype=logits.dtype, device=logits.device)
    if batch == 0:
        return grad
    grid, rows, bn, bk = launch_geometry(batch, num_teachers, num_classes, rows_per_program, logits.device)
    _loss_backward_kernel[(grid,)](
        grad_out.contiguous(),
        logits.contiguous(),
        values.contiguous(),
        weights,
        colmap_,
        lse.contiguous(),
        grad,
        batch,
        values.shape[1],
        num_teachers,
        num_classes,
        rows,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return grad


__all__ = ["loss_backward", "loss_forward"]
