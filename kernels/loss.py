"""The direct `ce` training loss and its gradient: one pass over each sample each way.

Per sample, ``L(u) = sum_i w_i [logsumexp_{k in L_i} u_k - sum_{l in L_i} p_il u_l]`` and
``dL/du_l = sum_{i covers l} w_i (softmax_{L_i}(u)_l - p_il)``.

- forward: a teacher pass over the packed columns (``(BLOCK_N, BLOCK_T)`` tiles: the packed row
  read in order, the student's logits gathered by class) keeps a running (max, sum-exp) per
  teacher and saves the per-teacher logsumexp ``(B, N)``;
- backward: a pass over the class table (each class's covering teachers) writes each gradient
  once, in the logits' dtype.

``DT`` (float32, or float64 when the logits or the values are float64) is the accumulation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    P_C_CHUNKS,
    P_K,
    P_N,
    P_TMAX_COL,
    S_C_BASE,
    S_C_COL,
    S_C_TCH,
    S_C_WIDTH,
    S_CLASS_INDEX,
    S_OFFSETS,
    as_i64,
    block_teachers,
    device_guard,
    hdr,
    num_programs,
    rmax,
    rsum,
    sec,
    teacher_vector,
    tl_dtype,
)

PROGRAMS_PER_SM = 8
NUM_WARPS = 4
MAX_TEACHERS = 256  # the forward's (BLOCK_N, BLOCK_T) teacher tile


def teacher_block(block_n: int) -> int:
    """``BLOCK_T`` of the forward: about two elements of the teacher tile per thread."""
    return max(1, 2 * 32 * NUM_WARPS // block_n)


@triton.jit(do_not_specialize=["batch", "nnz"])
def _loss_forward_kernel(
    logits_ptr,  # (B, K) student logits, contiguous
    values_ptr,  # (B, nnz) packed teacher probabilities, contiguous
    weights_ptr,  # (N,)
    tables,  # int32 plan buffer (plan.py)
    loss_ptr,  # (B,) per-sample loss, DT
    lse_ptr,  # (B, N) per-teacher logsumexp of the student's logits over L_i, DT
    batch,
    nnz,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    N = hdr(tables, P_N)
    K = hdr(tables, P_K)
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    w = tl.load(weights_ptr + offs, mask=real, other=0.0).to(DT)
    start, size = teacher_vector(tables, S_OFFSETS, N, BLOCK_N)
    class_ptr = sec(tables, S_CLASS_INDEX)
    tmax = hdr(tables, P_TMAX_COL)
    cols = tl.arange(0, BLOCK_T)
    for b in range(pid, batch, programs):
        row = values_ptr + as_i64(b) * nnz
        u_row = logits_ptr + as_i64(b) * K
        top = tl.full((BLOCK_N,), float("-inf"), DT)
        sum_exp = tl.zeros((BLOCK_N,), DT)
        linear = tl.zeros((BLOCK_N, BLOCK_T), DT)
        for j0 in range(0, tmax, BLOCK_T):
            j = j0 + cols[None, :]
            live = j < size[:, None]
            col = start[:, None] + j
            p = tl.load(row + col, mask=live, other=0.0).to(DT)
            u = tl.load(u_row + tl.load(class_ptr + col, mask=live, other=0), mask=live, other=0.0).to(DT)
            masked = tl.where(live, u, float("-inf"))
            new_top = tl.maximum(top, rmax(masked, 1))
            # teachers with nothing seen yet keep top = -inf: shift by 0 there, not by NaN
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            rescale = tl.where(top == float("-inf"), 0.0, tl.exp(top - shift))
            sum_exp = sum_exp * rescale + rsum(tl.where(live, tl.exp(masked - shift[:, None]), 0.0), 1)
            top = new_top
            linear += w[:, None] * p * u
        lse = tl.where(real, tl.log(tl.where(real, sum_exp, 1.0)) + top, 0.0)
        tl.store(lse_ptr + as_i64(b) * N + offs, lse, mask=real)
        tl.store(loss_ptr + b, rsum(w * lse, 0) - rsum(rsum(linear, 1), 0))


@triton.jit(do_not_specialize=["batch", "nnz"])
def _loss_backward_kernel(
    grad_out_ptr,  # (B,) upstream gradient of the per-sample loss
    logits_ptr,  # (B, K) student logits
    values_ptr,  # (B, nnz)
    weights_ptr,  # (N,)
    tables,  # int32 plan buffer
    lse_ptr,  # (B, N) saved by the forward
    grad_ptr,  # (B, K) gradient w.r.t. the logits, in the logits' dtype
    batch,
    nnz,
    DT: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    N = hdr(tables, P_N)
    K = hdr(tables, P_K)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    lanes = tl.arange(0, BLOCK_R)
    for b in range(pid, batch, programs):
        row = values_ptr + as_i64(b) * nnz
        u_row = logits_ptr + as_i64(b) * K
        lse_row = lse_ptr + as_i64(b) * N
        g = tl.load(grad_out_ptr + b).to(DT)
        for c in range(hdr(tables, P_C_CHUNKS)):
            width = tl.load(width_ptr + c)
            base = tl.load(base_ptr + c)
            rows = c * BLOCK_R + lanes
            live = rows < K
            u = tl.load(u_row + rows, mask=live, other=0.0).to(DT)
            acc = tl.zeros((BLOCK_R,), DT)
            for j in range(width):
                at = base + j * BLOCK_R + lanes
                t = tl.load(tch_ptr + at)
                ok = t >= 0
                w = tl.load(weights_ptr + t, mask=ok, other=0.0).to(DT)
                lse = tl.load(lse_row + t, mask=ok, other=0.0).to(DT)
                p = tl.load(row + tl.load(col_ptr + at), mask=ok, other=0.0).to(DT)
                acc += tl.where(ok, w * (tl.exp(u - lse) - p), 0.0)
            tl.store(grad_ptr + as_i64(b) * K + rows, (g * acc).to(grad_ptr.dtype.element_ty), mask=live)


def loss_forward(
    logits: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, programs=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss ``(B,)`` and per-teacher logsumexp ``(B, N)`` in the accumulation dtype.

    ``logits`` ``(B, K)``; ``values`` ``(B, nnz)`` packed probabilities; ``weights`` ``(N,)``;
    ``tables`` the plan buffer (:mod:`.plan`) of the values' layout.
    """
    batch = logits.shape[0]
    num_teachers = weights.shape[0]
    acc = torch.float64 if torch.float64 in (logits.dtype, values.dtype) else torch.float32
    loss = torch.empty(batch, dtype=acc, device=logits.device)
    lse = torch.empty(batch, num_teachers, dtype=acc, device=logits.device)
    if batch == 0:
        return loss, lse
    bn = block_teachers(num_teachers)
    count = programs or num_programs(batch, logits.device, PROGRAMS_PER_SM)
    with device_guard(logits.device):
        _loss_forward_kernel[(count,)](
            logits.contiguous(),
            values.contiguous(),
            weights.contiguous(),
            tables,
            loss,
            lse,
            batch,
            values.shape[1],
            DT=tl_dtype(acc),
            BLOCK_N=bn,
            BLOCK_T=teacher_block(bn),
            num_warps=NUM_WARPS,
        )
    return loss, lse


def loss_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    tables: torch.Tensor,
    lse: torch.Tensor,
    block_rows: int,
    programs=None,
) -> torch.Tensor:
    """Gradient of ``sum_b grad_out[b] * loss[b]`` w.r.t. ``logits``, ``(B, K)`` in ``logits.dtype``
    (``block_rows``: the SELL chunk height ``tables`` were built for)."""
    batch = logits.shape[0]
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if batch == 0:
        return grad
    count = programs or num_programs(batch, logits.device, PROGRAMS_PER_SM)
    with device_guard(logits.device):
        _loss_backward_kernel[(count,)](
            grad_out.contiguous(),
            logits.contiguous(),
            values.contiguous(),
            weights.contiguous(),
            tables,
            lse.contiguous(),
            grad,
            batch,
            values.shape[1],
            DT=tl_dtype(lse.dtype),
            BLOCK_R=block_rows,
            num_warps=NUM_WARPS,
        )
    return grad
