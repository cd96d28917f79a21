"""`sd` (zero-pad and average): ``q_l`` proportional to ``sum_{i covers l} w_i p_il``.

Memory-bound: per sample, the teachers' rows are read once (``read_sample``: validated and
renormalised into the program's value row), one pass over the class table forms each class's
evidence in float64 (its covering teachers in ascending order, as the reference adds them), and
the soft labels are written once. Work: ``nnz`` gathers and ``K`` stores; no per-teacher tile, so
any number of teachers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import P_C_CHUNKS, P_K, S_C_BASE, S_C_COL, S_C_TCH, S_C_WIDTH, as_i64, device_function, hdr, rsum, sec
from .inputs import read_sample


@device_function
def class_evidence(tables, vals, weights_ptr, n_out, BLOCK_R: tl.constexpr):
    """``n_l = sum_{i covers l} w_i p_il`` (float64) for every class into ``n_out``; returns its sum."""
    K = hdr(tables, P_K)
    chunks = hdr(tables, P_C_CHUNKS)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    lanes = tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(chunks):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        n = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            t = tl.load(tch_ptr + at)
            ok = t >= 0
            w = tl.load(weights_ptr + t, mask=ok, other=0.0)
            p = tl.load(vals + tl.load(col_ptr + at), mask=ok, other=0.0).to(tl.float64)
            n += w * p
        tl.store(n_out + rows, n, mask=rows < K)
        total += n
    tl.debug_barrier()
    return rsum(total, 0)


@triton.jit(do_not_specialize=["batch", "vals_stride", "ws_stride"])
def _sd_kernel(
    teachers_ptr,  # (N, 4) int64 teacher table (inputs.py)
    tables,  # int32 plan buffer (plan.py)
    weights_ptr,  # (N,) float64 teacher weights
    params_ptr,  # (4,) float64: temperature, eps, sum tolerance, tol
    vals_ptr,  # (programs, vals_stride) VDT: each program's value row
    ws_ptr,  # (programs, ws_stride) float64 workspace: class evidence (K)
    out_ptr,  # (B, K) soft labels, in the answers' dtype
    errors_ptr,  # (N, 4) int64 first failing row per teacher and check
    batch,
    vals_stride,
    ws_stride,
    IN_DT: tl.constexpr,  # the teachers' stored dtype
    VDT: tl.constexpr,  # the value row's dtype (the answers')
    BLOCK_R: tl.constexpr,  # SELL chunk height (the plan's block_rows)
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    vals = vals_ptr + pid.to(tl.int64) * vals_stride
    n_row = ws_ptr + pid.to(tl.int64) * ws_stride
    K = hdr(tables, P_K)
    lanes = tl.arange(0, BLOCK_R)
    for b in range(pid, batch, programs):
        read_sample(b, teachers_ptr, tables, vals, errors_ptr, params_ptr, IN_DT, VDT, False, BLOCK_R)
        total = class_evidence(tables, vals, weights_ptr, n_row, BLOCK_R)
        out_row = out_ptr + as_i64(b) * K
        for k0 in range(0, K, BLOCK_R):
            k = k0 + lanes
            n = tl.load(n_row + k, mask=k < K, other=0.0)
            tl.store(out_row + k, (n / total).to(out_ptr.dtype.element_ty), mask=k < K)
        tl.debug_barrier()


def workspace(sizes: dict) -> tuple[int, int]:
    """``(value row, float64 workspace)`` elements per program: the class evidence (K)."""
    return sizes["nnz"], sizes["K"]
