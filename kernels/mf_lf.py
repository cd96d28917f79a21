"""`mf-lf`: least squares in logit space with one shift per teacher, in closed form.

As ``uhc_fast/reference/mf_lf.py`` and ``csrc/core/mf_lf.h``, in float64: per class the weighted
mean logit ``zbar_l = sum_{i covers l} w_i z_il / W_l``; per teacher ``b_i = sum_{l in L_i} (z_il -
zbar_l)``; the shifts ``c = S b`` with the layout's ``(N, N)`` system (heaviest teacher grounded); then
``u_l = zbar_l - sum_{i covers l} w_i c_i / W_l`` and ``q = softmax(u)`` over covered classes.

Memory-bound: the logits are read from HBM once into the program's value row; two passes over the
class table (``nnz`` gathers each), one teacher pass over the packed columns (``(BLOCK_N,
BLOCK_T)`` tiles), ``N^2`` for ``S b`` in row blocks, two passes over the classes for the softmax.
"""

from __future__ import annotations

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
    S_CLASS_DEGREE,
    S_CLASS_INDEX,
    S_OFFSETS,
    as_i64,
    device_function,
    hdr,
    rmax,
    rsum,
    sec,
    teacher_vector,
)
from .inputs import read_sample


def workspace(sizes: dict) -> tuple[int, int]:
    """``(value row, float64 workspace)`` elements per program: zbar then u (K each), c (N)."""
    return sizes["nnz"], 2 * sizes["K"] + sizes["N"]


@device_function
def class_mean(tables, vals, weights_ptr, shift, zbar, u_out, WITH_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per class ``sum_{i covers l} w_i (z_il or c_i) / W_l``: the weighted mean logit into ``zbar``
    (``WITH_SHIFT`` False), or ``u_l = zbar_l - sum w_i c_i / W_l`` into ``u_out`` (True), returning
    the largest ``u`` over covered classes."""
    K = hdr(tables, P_K)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    lanes = tl.arange(0, BLOCK_R)
    top = tl.full((BLOCK_R,), float("-inf"), tl.float64)
    for c in range(hdr(tables, P_C_CHUNKS)):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        live = rows < K
        acc = tl.zeros((BLOCK_R,), tl.float64)
        total = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            t = tl.load(tch_ptr + at)
            ok = t >= 0
            w = tl.load(weights_ptr + t, mask=ok, other=0.0)
            if WITH_SHIFT:
                x = tl.load(shift + t, mask=ok, other=0.0)
            else:
                x = tl.load(vals + tl.load(col_ptr + at), mask=ok, other=0.0).to(tl.float64)
            acc += w * x
            total += w
        covered = total > 0
        mean = acc / tl.where(covered, total, 1.0)
        if WITH_SHIFT:
            u = tl.load(zbar + rows, mask=live, other=0.0) - mean
            tl.store(u_out + rows, u, mask=live)
            top = tl.maximum(top, tl.where(live & covered, u, float("-inf")))
        else:
            tl.store(zbar + rows, mean, mask=live)
    tl.debug_barrier()
    return rmax(top, 0)


@device_function
def masked_softmax(tables, u, top, out_row, BLOCK_R: tl.constexpr):
    """``softmax(u)`` over covered classes (0 elsewhere) from the workspace's ``u``, written out."""
    K = hdr(tables, P_K)
    degree_ptr = sec(tables, S_CLASS_DEGREE)
    lanes = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), tl.float64)
    for k0 in range(0, K, BLOCK_R):
        rows = k0 + lanes
        live = rows < K
        covered = tl.load(degree_ptr + rows, mask=live, other=0) > 0
        e = tl.exp(tl.where(covered, tl.load(u + rows, mask=live, other=0.0) - top, float("-inf")))
        acc += e
        tl.store(u + rows, e, mask=live)
    tl.debug_barrier()
    total = rsum(acc, 0)
    for k0 in range(0, K, BLOCK_R):
        k = k0 + lanes
        e = tl.load(u + k, mask=k < K, other=0.0)
        tl.store(out_row + k, (e / total).to(out_row.dtype.element_ty), mask=k < K)
    tl.debug_barrier()


@device_function
def mf_lf_fit(
    tables, vals, ws, weights_ptr, system_ptr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr
):
    """The fixed-scale fit of the logits in ``vals``: ``u`` into the workspace; returns max u."""
    K = hdr(tables, P_K)
    N = hdr(tables, P_N)
    zbar = ws
    u = ws + K
    shift = u + K
    class_mean(tables, vals, weights_ptr, shift, zbar, u, False, BLOCK_R)
    # b_i = sum_{l in L_i} (z_il - zbar_l)
    start, size = teacher_vector(tables, S_OFFSETS, N, BLOCK_N)
    class_ptr = sec(tables, S_CLASS_INDEX)
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    for j0 in range(0, hdr(tables, P_TMAX_COL), BLOCK_T):
        j = j0 + cols[None, :]
        live = j < size[:, None]
        col = start[:, None] + j
        z = tl.load(vals + col, mask=live, other=0.0).to(tl.float64)
        zb = tl.load(zbar + tl.load(class_ptr + col, mask=live, other=0), mask=live, other=0.0)
        acc += tl.where(live, z - zb, 0.0)
    b = rsum(acc, 1)
    # c = S b, BLOCK_T rows of S at a time
    offs = tl.arange(0, BLOCK_N)
    for i0 in range(0, N, BLOCK_T):
        i = i0 + cols
        tile = tl.load(
            system_ptr + i[:, None] * N + offs[None, :], mask=(i[:, None] < N) & (offs[None, :] < N), other=0.0
        )
        tl.store(shift + i, rsum(tile * b[None, :], 1), mask=i < N)
    tl.debug_barrier()
    return class_mean(tables, vals, weights_ptr, shift, zbar, u, True, BLOCK_R)


@triton.jit(do_not_specialize=["batch", "vals_stride", "ws_stride"])
def _mf_lf_kernel(
    teachers_ptr,  # (N, 4) int64 teacher table (inputs.py)
    tables,  # int32 plan buffer (plan.py)
    weights_ptr,  # (N,) float64
    params_ptr,  # float64 launch parameters
    vals_ptr,  # (programs, vals_stride) VDT value rows (logits at T)
    ws_ptr,  # (programs, ws_stride) float64 workspaces: zbar (K), u (K), c (N)
    system_ptr,  # (N, N) float64 mf-lf system (Layout.mf_lf_system)
    out_ptr,  # (B, K) soft labels
    errors_ptr,  # (N, 4) int64
    batch,
    vals_stride,
    ws_stride,
    IN_DT: tl.constexpr,
    VDT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # power of two >= N
    BLOCK_R: tl.constexpr,  # SELL chunk height
    BLOCK_T: tl.constexpr,  # columns per teacher per step of a teacher pass (and rows of S per step)
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    vals = vals_ptr + pid.to(tl.int64) * vals_stride
    ws = ws_ptr + pid.to(tl.int64) * ws_stride
    K = hdr(tables, P_K)
    for b in range(pid, batch, programs):
        read_sample(b, teachers_ptr, tables, vals, errors_ptr, params_ptr, IN_DT, VDT, True, BLOCK_R)
        top = mf_lf_fit(tables, vals, ws, weights_ptr, system_ptr, BLOCK_N, BLOCK_R, BLOCK_T)
        masked_softmax(tables, ws + K, top, out_ptr + as_i64(b) * K, BLOCK_R)
