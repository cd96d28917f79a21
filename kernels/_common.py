"""What every kernel shares: the plan header's positions, reductions, accurate ``expm1``/``log1p``,
the sparse passes over the plan's tables, the launch grid and the device guard.

Layout of the work (all kernels): a *persistent* grid of programs, each solving samples
``pid, pid + programs, ...`` one at a time with all of its warps. Within a sample the lanes run
over the rows of the plan's SELL tables (classes, groups, entries, teacher pairs) or over a
``(BLOCK_N, BLOCK_T)`` tile of teachers by their columns; N-sized solver state and ``N x N``
systems live in registers; row-sized state (per class, per group, per entry) lives in a small
per-program workspace in global memory that stays in L1/L2 (Triton exposes no shared memory),
written and re-read by the same program. Inputs are read from HBM once and soft labels written
once.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import plan as _plan


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_function(fn):
    """``triton.jit`` for device functions, except under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a jitted function (about a
    millisecond each); called from an interpreted kernel, the plain Python function runs with the
    kernel's patches in place and computes the same.
    """
    return fn if interpreting() else triton.jit(fn)


# ---------------------------------------------------------------------- plan header positions
def _positions() -> dict[str, int]:
    out = {name: i for i, name in enumerate(_plan.SCALARS)}
    out.update({name: len(_plan.SCALARS) + i for i, name in enumerate(_plan.SECTIONS)})
    return out


_POS = _positions()
# scalar fields
P_N = tl.constexpr(_POS["N"])
P_K = tl.constexpr(_POS["K"])
P_NNZ = tl.constexpr(_POS["nnz"])
P_G = tl.constexpr(_POS["G"])
P_E = tl.constexpr(_POS["E"])
P_TMAX_COL = tl.constexpr(_POS["tmax_col"])
P_TMAX_ENT = tl.constexpr(_POS["tmax_ent"])
P_G_CHUNKS = tl.constexpr(_POS["g_chunks"])
P_C_CHUNKS = tl.constexpr(_POS["c_chunks"])
P_E_CHUNKS = tl.constexpr(_POS["e_chunks"])
P_GC_CHUNKS = tl.constexpr(_POS["gc_chunks"])
P_PG_CHUNKS = tl.constexpr(_POS["pg_chunks"])
P_PC_CHUNKS = tl.constexpr(_POS["pc_chunks"])
P_PAIRS_G = tl.constexpr(_POS["pairs_g"])
P_PAIRS_C = tl.constexpr(_POS["pairs_c"])
P_PRIOR = tl.constexpr(_POS["prior"])
# sections
S_OFFSETS = tl.constexpr(_POS["offsets"])
S_CLASS_INDEX = tl.constexpr(_POS["class_index"])
S_TCH_PTR = tl.constexpr(_POS["tch_ptr"])
S_ENT_GROUP = tl.constexpr(_POS["ent_group"])
S_ENT_TEACHER = tl.constexpr(_POS["ent_teacher"])
S_CLASS_GROUP = tl.constexpr(_POS["class_group"])
S_CLASS_DEGREE = tl.constexpr(_POS["class_degree"])
S_ANCHOR = tl.constexpr(_POS["anchor"])
S_G_WIDTH = tl.constexpr(_POS["g_width"])
S_G_BASE = tl.constexpr(_POS["g_base"])
S_G_TCH = tl.constexpr(_POS["g_tch"])
S_G_POS = tl.constexpr(_POS["g_pos"])
S_C_WIDTH = tl.constexpr(_POS["c_width"])
S_C_BASE = tl.constexpr(_POS["c_base"])
S_C_TCH = tl.constexpr(_POS["c_tch"])
S_C_COL = tl.constexpr(_POS["c_col"])
S_E_WIDTH = tl.constexpr(_POS["e_width"])
S_E_BASE = tl.constexpr(_POS["e_base"])
S_E_COL = tl.constexpr(_POS["e_col"])
S_GC_WIDTH = tl.constexpr(_POS["gc_width"])
S_GC_BASE = tl.constexpr(_POS["gc_base"])
S_GC_CLS = tl.constexpr(_POS["gc_cls"])
S_PG_WIDTH = tl.constexpr(_POS["pg_width"])
S_PG_BASE = tl.constexpr(_POS["pg_base"])
S_PG_GRP = tl.constexpr(_POS["pg_grp"])
S_PG_I = tl.constexpr(_POS["pg_i"])
S_PG_J = tl.constexpr(_POS["pg_j"])
S_PG_INDEX = tl.constexpr(_POS["pg_index"])
S_PC_WIDTH = tl.constexpr(_POS["pc_width"])
S_PC_BASE = tl.constexpr(_POS["pc_base"])
S_PC_CLS = tl.constexpr(_POS["pc_cls"])
S_PC_COLI = tl.constexpr(_POS["pc_coli"])
S_PC_COLJ = tl.constexpr(_POS["pc_colj"])
S_PC_I = tl.constexpr(_POS["pc_i"])
S_PC_J = tl.constexpr(_POS["pc_j"])
S_PC_INDEX = tl.constexpr(_POS["pc_index"])

# codes of the teacher table's kind column
KIND_PROBS = tl.constexpr(0)
KIND_LOGITS = tl.constexpr(1)
KIND_PRIOR = tl.constexpr(2)  # the alpha prior teacher: no data, uniform probabilities / zero logits

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype of a torch float dtype."""
    return _TL[dtype]


# ---------------------------------------------------------------------- device helpers
@device_function
def as_i64(x):
    """``x`` as an int64 scalar (loop indices are Python ints under the interpreter)."""
    return tl.zeros((), tl.int64) + x


@device_function
def hdr(tables, position):
    """A scalar field of the plan header."""
    return tl.load(tables + position)


@device_function
def sec(tables, position):
    """A section of the plan (an int32 pointer)."""
    return tables + tl.load(tables + position)


if interpreting():
    # tl.sum / tl.max are jitted, so each call pays the interpreter's re-patching; tl.reduce with
    # their combine functions takes its numpy fast path instead.
    def rsum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def rmax(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    def rmin(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_min)

else:

    @triton.jit
    def rsum(x, axis: tl.constexpr):
        """``tl.sum``."""
        return tl.sum(x, axis=axis)

    @triton.jit
    def rmax(x, axis: tl.constexpr):
        """``tl.max``."""
        return tl.max(x, axis=axis)

    @triton.jit
    def rmin(x, axis: tl.constexpr):
        """``tl.min``."""
        return tl.min(x, axis=axis)


@device_function
def expm1(x):
    """``exp(x) - 1`` to full relative precision near 0 (Kahan's formulation on exp and log;
    libdevice's expm1 is not available to the interpreter)."""
    u = tl.exp(x)
    um1 = u - 1.0
    small = (um1 == 0.0) | (um1 == -1.0) | (u == float("inf"))
    safe_log = tl.where(small, 1.0, tl.log(tl.where(small, 2.0, u)))
    value = um1 * x / safe_log
    return tl.where(um1 == 0.0, x, tl.where(small, um1, value))


@device_function
def log1p(x):
    """``log(1 + x)`` to full relative precision near 0 (Kahan's formulation)."""
    u = 1.0 + x
    exact = u == 1.0
    den = tl.where(exact, 1.0, u - 1.0)
    return tl.where(exact, x, tl.log(u) * (x / den))


@device_function
def pick(vec, offs, k):
    """``vec[k]`` of a register vector as a scalar (k may be a runtime value)."""
    return rsum(tl.where(offs == k, vec, 0.0), 0)


@device_function
def teacher_vector(tables, position, N, BLOCK_N: tl.constexpr):
    """``(start, size)`` per teacher of a CSR pointer section (``offsets`` or ``tch_ptr``) as
    ``(BLOCK_N,)`` int32 vectors (size 0 beyond N)."""
    offs = tl.arange(0, BLOCK_N)
    ptr = sec(tables, position)
    real = offs < N
    lo = tl.load(ptr + offs, mask=real, other=0)
    hi = tl.load(ptr + offs + 1, mask=real, other=0)
    return lo, hi - lo


# ---------------------------------------------------------------------- launch
def num_programs(batch: int, device: torch.device, per_sm: int) -> int:
    """Programs of a persistent launch: a few per SM on a GPU, one in the interpreter (its programs
    run one after another anyway)."""
    if batch <= 0:
        return 0
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(batch, sms * per_sm))
    return 1


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors (Triton launches on the current device),
    nothing otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def block_teachers(num_teachers: int, least: int = 2) -> int:
    """The teacher-axis tile: a power of two >= N."""
    return max(least, triton.next_power_of_2(num_teachers))
