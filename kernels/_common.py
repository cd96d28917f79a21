"""Pieces every kernel shares: the dense column map, tile sizes, launch geometry, on-chip solves.

Every kernel reads one sample's packed teacher outputs through a dense ``(N, K)`` *column map*:
``colmap[i, l]`` is the packed column holding teacher ``i``'s output for class ``l``, or ``-1``
where teacher ``i`` does not cover ``l``. A ``(BLOCK_N, BLOCK_K)`` tile of it turns the packed row
into a dense teacher-by-class tile with one gather (the row is a few kilobytes, so the gather
hits cache), which makes every per-class sum over teachers a reduction over axis 0 and every
per-teacher sum over classes a reduction over axis 1: no scatter, no atomics.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..problem import Layout

# Above this many teachers the N x N (or 2N x 2N) on-chip solves of `ce`, `mf-p` and `mf-lu` no
# longer fit in registers; those methods then fall back to the torch reference (see the backend).
MAX_NEWTON_TEACHERS = 64
# The elementwise kernels (`sd`, `mf-lf`, the loss) keep a (BLOCK_N, BLOCK_K) tile; past this N
# the tile would be all teachers and no classes.
MAX_TILE_TEACHERS = 1024

# Elements in one (BLOCK_N, BLOCK_K) tile: BLOCK_K follows from it (tests shrink it to get many tiles).
TILE_BUDGET = 4096

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
_COLMAPS: dict[int, tuple[Layout, torch.Tensor]] = {}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compute_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else float32."""
    torch_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch_dtype, _TL_DTYPES[torch_dtype]


def colmap(layout: Layout) -> torch.Tensor:
    """The ``(N, K)`` int32 column map of ``layout`` (cached per layout object in eager mode;
    rebuilt inside a ``torch.compile`` graph, where it is a handful of tiny ops)."""
    if torch.compiler.is_compiling():
        return _build_colmap(layout)
    key = id(layout)
    hit = _COLMAPS.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1]
    dense = _build_colmap(layout)
    if len(_COLMAPS) > 64:  # layouts are cached per TeacherSet; this only bounds pathological use
        _COLMAPS.clear()
    _COLMAPS[key] = (layout, dense)
    return dense


def _build_colmap(layout: Layout) -> torch.Tensor:
    n, k = layout.num_teachers, layout.num_classes
    dense = torch.full((n * k,), -1, dtype=torch.int32, device=layout.class_index.device)
    columns = torch.arange(layout.nnz, dtype=torch.int32, device=dense.device)
    dense[layout.teacher_index * k + layout.class_index] = columns
    return dense.view(n, k)


def block_n(num_teachers: int) -> int:
    """Teacher-axis tile: a power of two >= N, and >= 16 so that ``tl.dot`` accepts it."""
    return max(16, triton.next_power_of_2(num_teachers))


def block_k(num_classes: int, bn: int) -> int:
    """Class-axis tile: keeps a (BLOCK_N, BLOCK_K) tile near ``TILE_BUDGET`` elements."""
    return max(16, min(triton.next_power_of_2(num_classes), TILE_BUDGET // bn))


def grid_rows(batch: int, rows_per_program: int | None, device: torch.device) -> tuple[int, int]:
    """``(programs, rows_per_program)``: each program solves a contiguous tile of rows.

    On a GPU the default aims at a few waves of programs per SM; in the interpreter one program
    runs the whole batch (programs run one after another there anyway).
    """
    if rows_per_program is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            rows_per_program = max(1, triton.cdiv(batch, sms * 8))
        else:
            rows_per_program = max(1, batch)
    rows_per_program = max(1, int(rows_per_program))
    return max(1, triton.cdiv(batch, rows_per_program)), rows_per_program


def solution_buffers(batch: int, num_classes: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """What an iterative kernel writes: soft labels ``(B, K)``, iterations ``(B,)`` int32, residual ``(B,)``."""
    return (
        torch.empty(batch, num_classes, dtype=dtype, device=device),
        torch.zeros(batch, dtype=torch.int32, device=device),
        torch.zeros(batch, dtype=dtype, device=device),
    )


def device_function(fn):
    """``triton.jit`` for device functions, except under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a jitted function (about a
    millisecond each), which dominates the per-chunk helpers; called from an interpreted kernel,
    the plain Python function runs with the kernel's patches in place and computes the same.
    """
    return fn if interpreting() else triton.jit(fn)


def launch_count(grid: int) -> int:
    if grid >= 2**31:
        raise ValueError(f"{grid} programs exceed the launch grid; pass a larger rows_per_program")
    return grid


def launch_geometry(batch: int, num_teachers: int, num_classes: int, rows_per_program, device):
    """``(programs, rows_per_program, BLOCK_N, BLOCK_K)`` of one launch over ``batch`` rows."""
    bn = block_n(num_teachers)
    grid, rows = grid_rows(batch, rows_per_program, device)
    return launch_count(grid), rows, bn, block_k(num_classes, bn)


# ---------------------------------------------------------------------- device functions
if interpreting():
    # tl.sum / tl.max are themselves jitted, so each call pays the interpreter's re-patching;
    # tl.reduce with their combine functions takes the interpreter's numpy fast path instead.
    def rsum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def rmax(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

else:

    @triton.jit
    def rsum(x, axis: tl.constexpr):
        """``tl.sum`` (a float tile in, its dtype out)."""
        return tl.sum(x, axis=axis)

    @triton.jit
    def rmax(x, axis: tl.constexpr):
        """``tl.max``."""
        return tl.max(x, axis=axis)


@device_function
def map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of the column map at classes ``k0:k0+BLOCK_K``.

    Returns ``(col, present, offs_k)``: packed columns (int32, -1 where absent or out of range),
    the coverage mask as a bool tile, and the class offsets of the tile.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    inside = (offs_n[:, None] < num_teachers) & (offs_k[None, :] < num_classes)
    col = tl.load(colmap_ptr + offs_n[:, None] * num_classes + offs_k[None, :], mask=inside, other=-1)
    return col, col >= 0, offs_k


@device_function
def gather(row_ptr, col, present, DT: tl.constexpr):
    """The packed row's values at ``col`` as a dense tile in ``DT`` (zero where absent)."""
    return tl.load(row_ptr + col, mask=present, other=0.0).to(DT)


@device_function
def teacher_scales(row_ptr, colmap_ptr, num_teachers, num_classes, DT, BLOCK_N, BLOCK_K):
    """``1 / sum_{l in L_i} p_il`` per teacher (0 for padding): probabilities are renormalised in
    the accumulation dtype, so half-precision rows that no longer sum to one exactly (which would
    leave `ce` without an optimum) cost nothing but this pass."""
    sums = tl.zeros((BLOCK_N,), dtype=DT)
    for k0 in range(0, num_classes, BLOCK_K):
        col, present, _offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
        sums += rsum(gather(row_ptr, col, present, DT), axis=1)
    return tl.where(sums > 0, 1.0 / tl.where(sums > 0, sums, 1.0), 0.0)


@device_function
def spd_solve(a, b, n, BLOCK_N: tl.constexpr):
    """Solve ``a x = b`` by Gauss-Jordan elimination without pivoting, on chip.

    ``a`` is ``(BLOCK_N, BLOCK_N)`` symmetric, identity outside its leading ``n x n`` block; ``b``
    is ``(BLOCK_N,)``. Returns ``(x, ok)``: ``ok`` is False when a pivot is not > 0, which is
    exactly when ``a`` is not positive definite (the pivots are those of its LDL^T factor).
    """
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    cols = idx[None, :]
    ok = n >= 0
    for k in range(0, n):
        row_k = rsum(tl.where(rows == k, a, 0.0), axis=0)
        col_k = rsum(tl.where(cols == k, a, 0.0), axis=1)
        pivot = rsum(tl.where(idx == k, row_k, 0.0), axis=0)
        b_k = rsum(tl.where(idx == k, b, 0.0), axis=0)
        good = pivot > 0  # False for NaN too
        ok = ok & good
        safe = tl.where(good, pivot, 1.0)
        factor = tl.where(idx == k, 0.0, col_k / safe)
        a = a - factor[:, None] * row_k[None, :]
        b = b - factor * b_k
        a = tl.where(rows == k, a / safe, a)
        b = tl.where(idx == k, b / safe, b)
    return b, ok


@device_function
def spd_solve_many(a, m, b, n, BLOCK_N: tl.constexpr):
    """As :func:`spd_solve`, for a matrix right-hand side ``m`` and a vector ``b`` at once.

    Returns ``(a^-1 m, a^-1 b, ok)``.
    """
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    cols = idx[None, :]
    ok = n >= 0
    for k in range(0, n):
        row_k = rsum(tl.where(rows == k, a, 0.0), axis=0)
        col_k = rsum(tl.where(cols == k, a, 0.0), axis=1)
        m_k = rsum(tl.where(rows == k, m, 0.0), axis=0)
        pivot = rsum(tl.where(idx == k, row_k, 0.0), axis=0)
        b_k = rsum(tl.where(idx == k, b, 0.0), axis=0)
        good = pivot > 0
        ok = ok & good
        safe = tl.where(good, pivot, 1.0)
        factor = tl.where(idx == k, 0.0, col_k / safe)
        a = a - factor[:, None] * row_k[None, :]
        m = m - factor[:, None] * m_k[None, :]
        b = b - factor * b_k
        a = tl.where(rows == k, a / safe, a)
        m = tl.where(rows == k, m / safe, m)
        b = tl.where(idx == k, b / safe, b)
    return m, b, ok
