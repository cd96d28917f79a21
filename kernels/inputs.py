"""Reading the teachers' arrays as they are: one pass over HBM per sample, validated and converted.

Teacher ``i``'s outputs are a ``(B, |L_i|)`` array anywhere in memory with its own strides; the
launch passes an ``(N, 5)`` int64 *teacher table* of ``(address, row stride, column stride, kind,
tolerance)``
(kind: 0 probabilities, 1 logits, 2 the alpha prior, which has no data) and the bits of the
float64 tolerance of its rows' sums. All teachers of one launch
share a stored dtype (``IN_DT``); the host upcasts the odd one out of a mixed call (exactly).

Per sample the kernel reads each teacher's row once, checks it with the rules of
``uhc_fast.inputs.check_values`` (finite; probabilities also non-negative, not all zero and summing
to 1 within the dtype's tolerance: the first failing check of a row is recorded per teacher with an
atomic minimum over rows, as ``csrc/core/input.h`` does) and writes what the method reads into the
program's value row ``vals`` (``nnz`` values, packed teacher by teacher): probabilities
renormalised over the row, or logits, at the temperature. A failing row is replaced by a uniform
one so that the solver finishes quickly; the host raises on the recorded failure.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._common import KIND_LOGITS, KIND_PRIOR, KIND_PROBS, P_N, S_OFFSETS, device_function, hdr, rmax, rsum, sec

# the fp64 launch parameters (one small tensor, so that they reach the kernel unrounded)
PARAM_TEMPERATURE = tl.constexpr(0)
PARAM_EPS = tl.constexpr(1)
PARAM_CONVERGED_LOG_STEP = tl.constexpr(2)  # ce's longest Newton step (log-scale) at convergence
PARAM_TOL = tl.constexpr(3)
PARAM_ARMIJO = tl.constexpr(4)  # sufficient decrease of the line searches
PARAM_MAX_LOG_STEP = tl.constexpr(5)  # the longest Newton step in a log variable
PARAM_MIN_SCALE = tl.constexpr(6)  # mf-lu's smallest scale
PARAM_MAX_HALVINGS = tl.constexpr(7)  # how often a line search may halve its step
PARAM_CHANGE_ROUNDING = tl.constexpr(8)  # the rounding ce's line search allows F's change
PARAMS = 9  # (host) the parameter vector's length
# (N, 4) int64 error slots start at this value (no failure); the host maps it back to -1
NO_ERROR = 2**62
TABLE_COLUMNS = tl.constexpr(5)  # of the teacher table
KIND_CODES = {"probs": KIND_PROBS.value, "logits": KIND_LOGITS.value}


def teacher_table(
    tensors: list[torch.Tensor], kinds: list[str], num_teachers: int, sum_tolerances: list[float], device
) -> torch.Tensor:
    """The ``(N, 5)`` int64 teacher table for ``tensors``: address, row and column strides, kind
    code and the float64 bits of the row-sum tolerance (teachers beyond ``tensors``: the prior)."""
    rows = []
    for i in range(num_teachers):
        if i < len(tensors):
            x = tensors[i]
            bits = torch.tensor([float(sum_tolerances[i])], dtype=torch.float64).view(torch.int64).item()
            rows.append([x.data_ptr(), x.stride(0), x.stride(1), KIND_CODES[kinds[i]], bits])
        else:
            rows.append([0, 0, 0, KIND_PRIOR.value, 0])
    return torch.tensor(rows, dtype=torch.int64).to(device)


@device_function
def uniform(n, VDT: tl.constexpr, VALUE_LOGITS: tl.constexpr):
    """The value of a uniform row of ``n`` entries: probability ``1 / n`` (in float64), or logit 0."""
    if VALUE_LOGITS:
        value = tl.zeros((), VDT)
    else:
        value = (1.0 / n.to(tl.float64)).to(VDT)
    return value


@device_function
def read_sample(
    b,
    teachers_ptr,
    tables,
    vals,
    errors_ptr,
    params_ptr,
    IN_DT: tl.constexpr,
    VDT: tl.constexpr,
    VALUE_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Sample ``b``'s rows of every teacher into ``vals`` as the method reads them (see the module
    docstring). Returns 1 when every row passed its checks, else 0."""
    N = hdr(tables, P_N)
    offsets = sec(tables, S_OFFSETS)
    temperature = tl.load(params_ptr + PARAM_TEMPERATURE)
    eps = tl.load(params_ptr + PARAM_EPS)
    lanes = tl.arange(0, BLOCK_R)
    valid = 1
    for i in range(N):
        lo = tl.load(offsets + i)
        n = tl.load(offsets + i + 1) - lo
        kind = tl.load(teachers_ptr + i * TABLE_COLUMNS + 3)
        row_vals = vals + lo
        failed = -1
        if kind == KIND_PRIOR:
            fill = uniform(n, VDT, VALUE_LOGITS)
            for j0 in range(0, n, BLOCK_R):
                j = j0 + lanes
                tl.store(row_vals + j, tl.zeros((BLOCK_R,), VDT) + fill, mask=j < n)
        else:
            address = tl.load(teachers_ptr + i * TABLE_COLUMNS)
            row_stride = tl.load(teachers_ptr + i * TABLE_COLUMNS + 1)
            col_stride = tl.load(teachers_ptr + i * TABLE_COLUMNS + 2)
            sum_tol = tl.load(teachers_ptr + i * TABLE_COLUMNS + 4).to(tl.float64, bitcast=True)
            row = address.to(tl.pointer_type(IN_DT)) + b * row_stride
            probs_in = kind == KIND_PROBS
            renormalise = probs_in & (not VALUE_LOGITS) & (temperature == 1.0)
            total = tl.zeros((BLOCK_R,), tl.float64)
            nonfinite = tl.zeros((BLOCK_R,), tl.int32)
            negative = tl.zeros((BLOCK_R,), tl.int32)
            top = tl.full((BLOCK_R,), float("-inf"), VDT)
            # one pass over HBM: checks, the row sum, and the raw values (or logits at T) kept
            for j0 in range(0, n, BLOCK_R):
                j = j0 + lanes
                inside = j < n
                x = tl.load(row + j * col_stride, mask=inside, other=0.0).to(tl.float64)
                nonfinite += (inside & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32)
                negative += (inside & (x < 0.0)).to(tl.int32)
                total += tl.where(inside, x, 0.0)
                if renormalise:
                    tl.store(row_vals + j, x.to(VDT), mask=inside)
                else:
                    xv = x.to(VDT)
                    z = tl.where(probs_in, tl.log(tl.maximum(xv, eps.to(VDT))), xv) / temperature.to(VDT)
                    top = tl.maximum(top, tl.where(inside, z, float("-inf")))
                    tl.store(row_vals + j, z, mask=inside)
            s = rsum(total, 0)
            off = tl.abs(s - 1.0)
            if rsum(nonfinite, 0) > 0:
                failed = 0
            elif probs_in & (rsum(negative, 0) > 0):
                failed = 1
            elif probs_in & (s == 0.0):
                failed = 2
            elif probs_in & (off > sum_tol):
                failed = 3
            tl.debug_barrier()
            if failed >= 0:
                tl.atomic_min(errors_ptr + i * 4 + failed, tl.zeros((), tl.int64) + b)
                fill = uniform(n, VDT, VALUE_LOGITS)
                for j0 in range(0, n, BLOCK_R):
                    j = j0 + lanes
                    tl.store(row_vals + j, tl.zeros((BLOCK_R,), VDT) + fill, mask=j < n)
            elif renormalise:
                for j0 in range(0, n, BLOCK_R):
                    j = j0 + lanes
                    inside = j < n
                    x = tl.load(row_vals + j, mask=inside, other=0.0).to(tl.float64)
                    tl.store(row_vals + j, (x / s).to(VDT), mask=inside)
            elif not VALUE_LOGITS:  # softmax of the logits at T
                zmax = rmax(top, 0)
                acc = tl.zeros((BLOCK_R,), VDT)
                for j0 in range(0, n, BLOCK_R):
                    j = j0 + lanes
                    inside = j < n
                    z = tl.load(row_vals + j, mask=inside, other=0.0)
                    e = tl.where(inside, tl.exp(z - zmax), 0.0)
                    acc += e
                    tl.store(row_vals + j, e, mask=inside)
                tl.debug_barrier()
                inv_total = rsum(acc, 0)
                for j0 in range(0, n, BLOCK_R):
                    j = j0 + lanes
                    inside = j < n
                    e = tl.load(row_vals + j, mask=inside, other=0.0)
                    tl.store(row_vals + j, e / inv_total, mask=inside)
        if failed >= 0:
            valid = 0
    tl.debug_barrier()
    return valid
