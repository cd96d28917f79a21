"""Host side of the solvers: one launch per call, arguments checked, outputs allocated.

:func:`solve` takes what the compiled C++ backends take (the teachers' arrays as they are, their
kinds, float64 weights and mf-lf system), with the layout's sparse tables (:mod:`.plan`) in place of
its structure buffer, and returns the same tensors (:data:`OUTPUTS`). Launches run on the teachers'
CUDA device (the device is made current for the launch), or on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import ce as _ce
from . import mf_lf as _mf_lf
from . import mf_lu as _mf_lu
from . import mf_p as _mf_p
from . import sd as _sd
from ._common import block_teachers, device_guard, interpreting, num_programs, tl_dtype
from .inputs import NO_ERROR, PARAMS, teacher_table
from .plan import Plan

# What a launch returns, in order (the same as the compiled backends'): soft labels (B, K) and, per
# sample, iterations (int32), converged (bool), the method's residual, the Newton correction of its
# last point and (ce) the absolute KKT residual, in the answers' dtype; and the (N, 4) int64 first
# failing row of each value check per teacher (-1: none).
OUTPUTS = ("soft", "iterations", "converged", "residual", "step", "abs_residual", "errors")
METHODS = ("sd", "ce", "mf-p", "mf-lf", "mf-lu")
VALUE_KINDS = {"sd": "probs", "ce": "probs", "mf-p": "probs", "mf-lf": "logits", "mf-lu": "logits"}
# The most teachers each kernel serves: its (BLOCK_N, BLOCK_N) register tiles (ce, mf-p: one
# system; mf-lu: the blocks of its Schur complement) or (BLOCK_N, BLOCK_T) teacher tiles (mf-lf)
# stay in registers up to these sizes (benchmarks/gpu.py --aot checks the register counts).
# Callers route larger problems elsewhere (the backend: to the torch reference, and says so).
MAX_TEACHERS = {"sd": 1 << 20, "ce": 64, "mf-p": 64, "mf-lf": 256, "mf-lu": 32}
# SELL chunk height (rows of the plan's tables a program handles per step) and programs per SM
BLOCK_ROWS = 128
PROGRAMS_PER_SM = 8


@dataclass(frozen=True)
class Settings:
    """The per-call numbers a launch needs besides the tensors."""

    temperature: float = 1.0
    eps: float = 1e-12
    tol: float = 1e-5
    max_iter: int = 100
    sum_tolerances: tuple[float, ...] = ()  # per real teacher (default 1e-4 each)
    armijo: float = 1e-4
    max_log_step: float = 2.0
    converged_log_step: float = 0.25
    min_scale: float = 1e-3
    max_halvings: int = 40
    change_rounding: float = 8 * 2.0**-53
    ce_max_iter: int = 100  # the step cap of mf-p's `ce` start

    def params(self, device) -> torch.Tensor:
        values = [
            self.temperature,
            self.eps,
            self.converged_log_step,
            self.tol,
            self.armijo,
            self.max_log_step,
            self.min_scale,
            float(self.max_halvings),
            self.change_rounding,
        ]
        assert len(values) == PARAMS
        return torch.tensor(values, dtype=torch.float64).to(device)


# Launch options per method and teacher tile (BLOCK_N): warps per program and the register cap
# passed to ptxas (``maxnreg``; without one ptxas caps itself near 64 registers and spills). Chosen
# with ``python -m benchmarks.gpu --aot`` so that no variant spills at N <= 64 (mf-lu: N <= 32; mf-p
# spills 112 B at 33-64). ce's float64 Newton tiles need 144 registers at N = 17-32 (128 spilled 8 B).
_OPTIONS = {
    "sd": lambda bn: (4, 128),
    "mf-lf": lambda bn: (4, 128),
    "ce": lambda bn: (4, 128) if bn <= 16 else (8, 144) if bn <= 32 else (8, 255),
    "mf-p": lambda bn: (4, 200) if bn <= 16 else (8, 200) if bn <= 32 else (8, 255),
    "mf-lu": lambda bn: (4, 255) if bn <= 16 else (8, 255),
}
# The warps a teacher tile is sized for (BLOCK_T = 32 x warps / BLOCK_N), where not the launch's.
_TILE_WARPS = {}
# Triton before 3.7 (3.6 is what the GPU machines have) allocates more registers (checked the same
# way, with triton 3.6 installed): under the caps above ptxas spills 224 B (ce) and 120 B (mf-p) at
# N=20, and mf-lu spills at 8 and 16 teachers (184 B, 88 B; 276 B with 8 warps on a tile sized for
# them). The settings below spill nothing up to 32 teachers (2026-12-08, with the float64 Newton
# tiles: at the former caps 184 and 232, ce spilled 16 B and mf-p 48 B at N=20): mf-lu runs 8 warps
# over a 4-warp tile there. At 33-64, ce and mf-p spill whatever the cap (120 B, 2.6 KB): there they serve 32 teachers
# at most, and larger problems go to the reference like any other.
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7):
    _OPTIONS["ce"] = lambda bn: (4, 184) if bn <= 16 else (8, 200) if bn <= 32 else (8, 255)
    _OPTIONS["mf-p"] = lambda bn: (4, 232) if bn <= 16 else (8, 248) if bn <= 32 else (8, 255)
    _OPTIONS["mf-lu"] = lambda bn: (4, 255) if bn <= 4 else (8, 255)
    _TILE_WARPS["mf-lu"] = lambda bn: 4 if bn <= 16 else 8
    MAX_TEACHERS.update({"ce": 32, "mf-p": 32})


def options(method: str, num_teachers: int) -> dict:
    """``num_warps`` and ``maxnreg`` of ``method``'s launch for ``num_teachers``."""
    warps, maxnreg = _OPTIONS[method](block_teachers(num_teachers))
    return {"num_warps": warps} if maxnreg is None else {"num_warps": warps, "maxnreg": maxnreg}


def geometry(method: str, num_teachers: int, block_rows: int = BLOCK_ROWS) -> dict:
    """The constexpr tile sizes of ``method``'s kernel for ``num_teachers`` (no dependence on K).

    The teacher tile ``(BLOCK_N, BLOCK_T)`` holds about one element per thread (its gathers are
    what costs registers); the SELL chunk height is the plan's ``block_rows``."""
    if method == "sd":
        return {"BLOCK_R": block_rows}
    bn = block_teachers(num_teachers)
    warps = _TILE_WARPS[method](bn) if method in _TILE_WARPS else options(method, num_teachers)["num_warps"]
    elements = 32 * warps
    if method == "mf-p" and bn >= 64:  # its 64 x 64 Hessian and factor take the registers
        elements //= 2
    return {"BLOCK_N": bn, "BLOCK_R": block_rows, "BLOCK_T": max(1, elements // bn)}


def check(method: str, tensors, kinds, plan, weights, system, out_dtype) -> None:
    """The launch's argument checks (errors name the argument)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if not tensors:
        raise ValueError("no teacher tensors")
    device = tensors[0].device
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    if plan.tables.device != device:
        raise ValueError(f"the plan's tables are on {plan.tables.device}, the teachers on {device}")
    if len(kinds) != len(tensors) or len(tensors) > plan.num_teachers:
        raise ValueError(f"{len(tensors)} tensors and {len(kinds)} kinds for a plan of {plan.num_teachers} teachers")
    if weights.dtype != torch.float64 or weights.device != device:
        raise ValueError(f"weights must be float64 on {device}")
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be float32 or float64, got {out_dtype}")
    if method in ("mf-lf", "mf-lu") and (system is None or system.dtype != torch.float64):
        raise ValueError(f"{method} needs the float64 (N, N) mf-lf system")
    batch = tensors[0].shape[0]
    for i, x in enumerate(tensors):
        if x.dim() != 2 or x.device != device or x.shape[0] != batch or not x.is_floating_point():
            raise ValueError(f"teacher {i}: expected a 2-D float tensor of {batch} rows on {device}")


def solve(
    method: str,
    tensors: list[torch.Tensor],
    kinds: list[str],
    plan: Plan,
    weights: torch.Tensor,
    system: torch.Tensor | None,
    out_dtype: torch.dtype,
    settings: Settings,
    *,
    programs: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Solve one batch with ``method``'s kernel; returns the tensors of :data:`OUTPUTS`.

    Args:
        tensors: the N real teachers' ``(B, |L_i|)`` arrays (any float dtype and strides; the
            alpha prior, when the structure has one, has none).
        kinds: ``"probs"`` or ``"logits"`` per real teacher.
        plan: the layout's tables (:func:`uhc_fast.kernels.plan.plan_for`) on the tensors' device,
            built for SELL chunks of :data:`BLOCK_ROWS` rows.
        weights: ``(N,)`` float64 (the prior's weight last); ``system``: mf-lf's ``(N, N)`` float64.
        programs: override the persistent grid's size (tests: to check it changes nothing).
    """
    check(method, tensors, kinds, plan, weights, system, out_dtype)
    device = tensors[0].device
    sizes = plan.sizes
    n, k = sizes["N"], sizes["K"]
    if n > MAX_TEACHERS[method]:
        raise ValueError(f"{method}: {n} teachers exceed the kernel's {MAX_TEACHERS[method]}")
    batch = int(tensors[0].shape[0])
    in_dtype = tensors[0].dtype
    for x in tensors[1:]:
        in_dtype = torch.promote_types(in_dtype, x.dtype)
    tensors = [x if x.dtype == in_dtype else x.to(in_dtype) for x in tensors]
    soft = torch.empty(batch, k, dtype=out_dtype, device=device)
    iterations = torch.zeros(batch, dtype=torch.int32, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    residual, step, abs_residual = (torch.zeros(batch, dtype=out_dtype, device=device) for _ in range(3))
    errors = torch.full((n, 4), NO_ERROR, dtype=torch.int64, device=device)
    outs = (soft, iterations, converged, residual, step, abs_residual, errors)
    if batch == 0:
        errors.fill_(-1)
        return outs
    tolerances = list(settings.sum_tolerances) or [1e-4] * len(tensors)
    table = teacher_table(tensors, kinds, n, tolerances, device)
    params = settings.params(device)
    weights = weights.contiguous()
    count = programs or num_programs(batch, device, PROGRAMS_PER_SM)
    count = max(1, min(int(count), batch))
    module = {"sd": _sd, "ce": _ce, "mf-p": _mf_p, "mf-lf": _mf_lf, "mf-lu": _mf_lu}[method]
    vals_size, ws_size = module.workspace(sizes)
    vals = torch.empty(count, max(1, vals_size), dtype=out_dtype, device=device)
    ws = torch.empty(count, max(1, ws_size), dtype=torch.float64, device=device)
    geo = geometry(method, n, plan.block_rows)
    launch_options = options(method, n)
    consts = dict(IN_DT=tl_dtype(in_dtype), VDT=tl_dtype(out_dtype), **geo)
    common = (table, plan.tables, weights, params, vals, ws)
    with device_guard(device):
        if method == "sd":
            _sd._sd_kernel[(count,)](
                *common, soft, errors, batch, vals.stride(0), ws.stride(0), **launch_options, **consts
            )
        elif method == "mf-lf":
            _mf_lf._mf_lf_kernel[(count,)](
                *common,
                system.contiguous(),
                soft,
                errors,
                batch,
                vals.stride(0),
                ws.stride(0),
                **launch_options,
                **consts,
            )
        else:
            kernel = {"ce": _ce._ce_kernel, "mf-p": _mf_p._mf_p_kernel, "mf-lu": _mf_lu._mf_lu_kernel}[method]
            before = (system.contiguous(),) if method == "mf-lu" else ()
            after = (int(settings.ce_max_iter),) if method == "mf-p" else ()
            kernel[(count,)](
                *common,
                *before,
                soft,
                iterations,
                converged,
                residual,
                step,
                abs_residual,
                errors,
                batch,
                vals.stride(0),
                ws.stride(0),
                int(settings.max_iter),
                *after,
                **launch_options,
                **consts,
            )
        for t in (table, params, vals, ws):
            if device.type == "cuda":
                t.record_stream(torch.cuda.current_stream(device))
    errors.masked_fill_(errors == NO_ERROR, -1)
    return outs


__all__ = ["BLOCK_ROWS", "MAX_TEACHERS", "METHODS", "OUTPUTS", "Settings", "geometry", "options", "solve"]
