"""`sd` (zero-pad and average) as one memory-bound kernel: two passes over each row in cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, gather, launch_geometry, map_tile, rsum, teacher_scales


@triton.jit
def _sd_kernel(
    values_ptr,  # (B, nnz) packed teacher probabilities, any float dtype
    weights_ptr,  # (N,) teacher weights
    colmap_ptr,  # (N, K) int32 packed column of (teacher, class), -1 where absent
    out_ptr,  # (B, K) soft labels, DT
    batch,  # B
    nnz,  # packed columns per row
    num_teachers,  # N
    num_classes,  # K
    rows_per_program,  # rows of the tile this program solves
    DT: tl.constexpr,  # accumulation dtype (float32 or float64)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    w = tl.load(weights_ptr + offs_n, mask=offs_n < num_teachers, other=0.0).to(DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        row_ptr = values_ptr + row * nnz
        out_row = out_ptr + row * num_classes
        scaled = w * teacher_scales(row_ptr, colmap_ptr, num_teachers, num_classes, DT, BLOCK_N, BLOCK_K)
        total = rsum(tl.where(scaled > 0, w, 0.0), axis=0)
        for k0 in range(0, num_classes, BLOCK_K):
            col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            evidence = rsum(scaled[:, None] * gather(row_ptr, col, present, DT), axis=0)
            tl.store(out_row + offs_k, evidence / total, mask=offs_k < num_classes)


def sd(
    values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor, rows_per_program: int | None = None
) -> torch.Tensor:
    """``(B, nnz)`` packed probabilities -> ``(B, K)`` soft labels ``q_l ∝ sum_i w_i p_il``.

    Each teacher's probabilities are renormalised to sum 1 in the accumulation dtype first.

    Accumulates in float32 (float64 for float64 values); the output has the accumulation dtype.
    """
    batch, nnz = values.shape
    torch_dt, tl_dt = compute_dtype(values.dtype)
    out = torch.empty(batch, cmap.shape[1], dtype=torch_dt, device=values.device)
    if batch == 0:
        return out
    grid, rows, bn, bk = launch_geometry(batch, cmap.shape[0], cmap.shape[1], rows_per_program, values.device)
    _sd_kernel[(grid,)](
        values,
        weights,
        cmap,
        out,
        batch,
        nnz,
        cmap.shape[0],
        cmap.shape[1],
        rows,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out
