"""``backend="triton"``: fused Triton kernels for every method and for the training loss.

Nothing is packed or converted torch-side for the solvers: the kernels (``uhc_fast.kernels``) read
each teacher's array in its stored dtype and strides, validate it with the rules of
:func:`uhc_fast.inputs.check_values` in the same pass (errors per teacher and row, raised here by
:func:`uhc_fast.inputs.raise_first_failure`), and walk the layout's sparse structure
(:mod:`uhc_fast.kernels.plan`, built once per layout). The loss runs on the packed problem
:class:`~uhc_fast.loss.UHCLoss` builds.

:func:`backend` raises ImportError when triton is missing and RuntimeError when no CUDA device is
usable and ``TRITON_INTERPRET`` is not set; under ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors (slowly: that mode is for tests).

Limits: each kernel keeps its per-teacher state in registers up to a number of teachers
(``uhc_fast.kernels.MAX_TEACHERS``: `ce` and `mf-p` 64, `mf-lu` 32, `mf-lf` and the loss 256,
`sd` unlimited; ``benchmarks/gpu.py --aot`` checks that no variant within them spills). Beyond
it a call runs the torch reference, and its result says so (``info["backend"] == "torch"``, with
the reason in ``Solution.extra["fallback"]``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import reference
from ..constants import (
    ARMIJO,
    CHANGE_ROUNDING,
    CONVERGED_LOG_STEP,
    DEFAULT_MAX_ITER,
    MAX_HALVINGS,
    MAX_LOG_STEP,
    MIN_SCALE,
    SUM_TOLERANCE,
    compute_dtype,
)
from ..inputs import Batch, PackedProblem, Solution, pack, raise_first_failure
from ..methods import METHODS, Method
from .base import Backend

_kernels = None


def kernels():
    """``uhc_fast.kernels`` (imported on first use: it imports triton)."""
    global _kernels
    if _kernels is None:
        from .. import kernels as module

        _kernels = module
    return _kernels


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not kernels().interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")


def plan(layout):
    """The kernels' sparse tables for ``layout``, cached on the layout (in its per-layout cache,
    so that a ``torch.compile`` graph sees a constant once an eager call has built them)."""
    k = kernels()
    key = ("triton-plan", k.launch.BLOCK_ROWS)
    cached = layout._systems.get(key)
    if cached is None:
        anchor = torch.where(layout.prior_mask, 2, layout.scale_anchor.to(torch.int64))
        host = k.plan.build(layout.offsets, layout.class_index, layout.num_classes, anchor, k.launch.BLOCK_ROWS)
        cached = k.plan.Plan(
            host.tables.to(layout.class_index.device),
            host.sizes,
            host.block_rows,
            host.num_teachers,
            host.num_classes,
            host.counts,
        )
        layout._systems[key] = cached
    return cached


def settings(batch: Batch, out_dtype: torch.dtype):
    """The kernels' per-call settings from ``batch``'s options."""
    options = batch.options
    return kernels().Settings(
        temperature=options.temperature,
        eps=options.eps,
        tol=options.tol_for(out_dtype),
        max_iter=options.iteration_cap(),
        sum_tolerances=tuple(SUM_TOLERANCE[x.dtype] for x in batch.tensors),
        armijo=ARMIJO,
        max_log_step=MAX_LOG_STEP,
        converged_log_step=CONVERGED_LOG_STEP,
        min_scale=MIN_SCALE,
        max_halvings=MAX_HALVINGS,
        change_rounding=CHANGE_ROUNDING,
        ce_max_iter=DEFAULT_MAX_ITER,
    )


def _fallback(batch: Batch, method: Method, why: str) -> Solution:
    problem = pack(batch, method.value_kind, torch.float64)
    options = batch.options
    solution = reference.SOLVERS[method.name](problem, options.tol_for(problem.dtype), options.iteration_cap())
    solution.backend = "torch"
    solution.extra = {**(solution.extra or {}), "fallback": why}
    return solution


def solve(batch: Batch, method: Method) -> Solution:
    """Solve ``batch`` with ``method``'s kernel (or, beyond its teacher limit, the torch reference)."""
    k = kernels()
    device = batch.device
    layout = batch.solved_teachers.layout(device)
    limit = k.MAX_TEACHERS[method.name]
    if layout.num_teachers > limit:
        return _fallback(
            batch, method, f"triton {method.name} serves at most {limit} teachers, got {layout.num_teachers}"
        )
    _check_device(device)
    out_dtype = compute_dtype(batch.compute_dtype)
    weights = batch.solved_weights(torch.float64, device).contiguous()
    system = layout.mf_lf_system(weights, torch.float64).contiguous() if method.needs_system else None
    if torch.compiler.is_compiling():
        outs = k.ops.solve(
            list(batch.tensors),
            [k.inputs.KIND_CODES[kind] for kind in batch.kinds],
            plan(layout).tables,
            weights,
            system,
            method.name,
            layout.num_classes,
            out_dtype == torch.float64,
            *_numbers(batch, out_dtype),
        )
    else:
        outs = k.solve(
            method.name,
            batch.tensors,
            list(batch.kinds),
            plan(layout),
            weights,
            system,
            out_dtype,
            settings(batch, out_dtype),
        )
    soft, iterations, converged, residual, step, abs_residual, errors = outs
    if not torch.compiler.is_compiling():  # data-dependent: a compiled graph skips the checks, as check_values does
        raise_first_failure(batch.tensors, errors.cpu())
    if method.iterative:
        solution = Solution(soft, iterations, residual, converged, {"step": step})
        if method.name == "ce":
            solution.extra["abs_residual"] = abs_residual
    else:
        solution = Solution(soft)
    solution.backend = "triton"
    return solution


def _numbers(batch: Batch, out_dtype: torch.dtype) -> list:
    s = settings(batch, out_dtype)
    return [s.temperature, s.eps, s.tol, s.max_iter, list(s.sum_tolerances)]


def direct_ce_loss(student_logits: torch.Tensor, problem: PackedProblem) -> torch.Tensor:
    """Per-sample direct `ce` loss ``(B,)`` by the fused kernels (forward and backward)."""
    layout = problem.layout
    if layout.num_teachers > kernels().loss.MAX_TEACHERS:
        return reference.direct_ce_loss(student_logits, problem)
    _check_device(student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, problem.values.dtype)
    tables = plan(layout)
    return kernels().ops.loss(
        student_logits.to(dtype), problem.values, problem.weights, tables.tables, tables.block_rows
    )


def backend() -> Backend:
    """The Triton backend, or ImportError/RuntimeError saying why it cannot run here."""
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed; pip install 'uhc_fast[triton]'")
    import triton

    k = kernels()
    if k.interpreting():
        devices: tuple[str, ...] = ("cpu",)
        mode = "interpreter (TRITON_INTERPRET=1): CPU tensors, for testing"
    elif torch.cuda.is_available():
        devices = ("cuda",)
        mode = f"compiled for {torch.cuda.get_device_name()}"
    else:
        raise RuntimeError("no CUDA device, and TRITON_INTERPRET is not set")
    limits = ", ".join(f"{name} {n}" for name, n in k.MAX_TEACHERS.items() if n < 1 << 20)
    details = {
        "kind": "fused Triton kernels: one sample per program, persistent grid, sparse structure tables",
        "triton_version": triton.__version__,
        "mode": mode,
        "interpret": os.environ.get("TRITON_INTERPRET", ""),
        "inputs": "each teacher's array read in its stored dtype and strides, validated in the kernel",
        "loss": "fused forward and backward (torch.library custom op)",
        "fallback": f"torch reference beyond {limits}, loss {k.loss.MAX_TEACHERS} teachers",
    }
    return Backend("triton", devices, frozenset(METHODS), solve, direct_ce_loss, lambda: details)
