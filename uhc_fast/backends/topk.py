"""The backends of `estimate_topk`: which one runs (:func:`select`) and how each is launched
(:func:`solve`). ``cpu`` is the compiled core (csrc/core/topk.h), ``triton`` the kernel of
kernels/topk.py (``cuda`` means it: there is no compiled CUDA top-k solver), ``torch`` the
reference (uhc_fast/reference/topk.py), which also serves shapes beyond the kernel's limits.
"""

from __future__ import annotations

import importlib.util

import torch

from ..constants import SUM_TOLERANCE
from ..options import check_backend_name
from ..topk_inputs import (
    DTYPE_CODES,
    KIND_CODES,
    METHOD_CODES,
    TopkBatch,
    TopkSolution,
    empty_solution,
    raise_first_failure,
    teacher_table,
)


def _cpu_module():
    from .native_launch import load_module

    module = load_module("cpu")
    if not hasattr(module, "topk_solve"):
        raise ImportError(f"{module.__file__} was built without the top-k solver; rebuild the extension")
    return module


def _triton_kernels():
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed; pip install 'uhc_fast[triton]'")
    from ..kernels import topk as kernel

    return kernel


def available(name: str, device: torch.device) -> str | None:
    """None when top-k backend ``name`` can run on ``device`` here, else the reason."""
    try:
        if name == "cpu":
            _cpu_module()
            if device.type != "cpu":
                return f"runs on CPU tensors, these are on {device.type}"
        elif name == "triton":
            kernel = _triton_kernels()
            if device.type == "cpu" and not kernel.interpreting():
                return "needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
            if device.type == "cuda" and kernel.interpreting():
                return "TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only"
    except (ImportError, RuntimeError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def select(backend: str, device: torch.device) -> str:
    """The top-k backend that runs on ``device``: ``auto`` picks ``cpu`` for CPU tensors and
    ``triton`` for CUDA tensors, else ``torch``; a forced backend that cannot run raises, saying why."""
    name = check_backend_name(backend)
    if name == "cuda":
        name = "triton"  # the CUDA implementation of top-k is the Triton kernel
    if name == "auto":
        for candidate in ("cpu",) if device.type == "cpu" else ("triton",):
            if available(candidate, device) is None:
                return candidate
        return "torch"
    reason = None if name == "torch" else available(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available for estimate_topk: {reason}")
    return name


def solve(batch: TopkBatch, width: int) -> TopkSolution:
    """Solve ``batch`` into ``(B, width)`` outputs on the backend its options choose, and raise
    the first bad row's error."""
    name = select(batch.options.backend, batch.device)
    options = batch.options
    dtype = batch.compute_dtype
    tol, max_iter = options.tol_for(dtype), options.iteration_cap()
    if name == "cpu":
        solution = _launch_cpu(batch, width, tol, max_iter)
    elif name == "triton" and _fits_the_kernel(batch):
        solution = _launch_triton(batch, width, tol, max_iter)
    else:  # (the kernel's teacher limit: the reference runs, and info["backend"] says so)
        name = "torch"
        from ..reference.topk import solve_topk

        solution = solve_topk(batch, width, tol, max_iter)
    if not torch.compiler.is_compiling():
        raise_first_failure(batch, solution.errors)
    solution.backend = name
    return solution


def _launch_cpu(batch: TopkBatch, width: int, tol: float, max_iter: int) -> TopkSolution:
    module = _cpu_module()
    method = batch.options.method
    out = empty_solution(batch, width, method, fill=False)  # (the core writes every element)
    if batch.batch_size == 0:
        return out
    table = teacher_table(batch)
    tolerance = torch.tensor([SUM_TOLERANCE[d] for d in DTYPE_CODES], dtype=torch.float64)
    weights = batch.weights.contiguous()
    ce = method == "ce"
    scratch = torch.zeros(batch.batch_size, dtype=out.soft.dtype) if not ce else None
    zero_i = torch.zeros(batch.batch_size, dtype=torch.int32) if not ce else None
    zero_b = torch.zeros(batch.batch_size, dtype=torch.bool) if not ce else None
    module.topk_solve(
        method=METHOD_CODES[method],
        out_dtype=DTYPE_CODES[out.soft.dtype],
        batch=batch.batch_size,
        N=batch.num_teachers,
        teachers=table.data_ptr(),
        weights=weights.data_ptr(),
        alpha=batch.prior_weight,
        alpha_given=batch.alpha is not None,
        vocab_size=-1 if batch.vocab_size is None else batch.vocab_size,
        tol=float(tol),
        max_iter=int(max_iter),
        sum_tolerance=tolerance.data_ptr(),
        width=width,
        ids=out.ids.data_ptr(),
        soft=out.soft.data_ptr(),
        union_size=out.union_size.data_ptr(),
        disconnected=out.disconnected.data_ptr(),
        kept=out.kept.data_ptr(),
        iterations=(out.iterations if ce else zero_i).data_ptr(),
        converged=(out.converged if ce else zero_b).data_ptr(),
        residual=(out.residual if ce else scratch).data_ptr(),
        step=(out.extra["step"] if ce else scratch).data_ptr(),
        abs_residual=(out.extra["abs_residual"] if ce else scratch).data_ptr(),
        errors=out.errors.data_ptr(),
        threads=torch.get_num_threads(),
    )
    del table, tolerance, weights
    return out


def _fits_the_kernel(batch: TopkBatch) -> bool:
    """Within the Triton kernel's limits: teachers, and slots per sample (in registers)."""
    kernel = _triton_kernels()
    return batch.num_teachers <= kernel.MAX_TEACHERS and kernel.block_slots(batch.total_slots) <= kernel.MAX_SLOTS


def _launch_triton(batch: TopkBatch, width: int, tol: float, max_iter: int) -> TopkSolution:
    kernel = _triton_kernels()
    method = batch.options.method
    out = kernel.topk(
        batch.ids,
        batch.values,
        [KIND_CODES[k] for k in batch.kinds],
        batch.maps,
        batch.weights,
        [SUM_TOLERANCE[v.dtype] for v in batch.values],
        method=METHOD_CODES[method],
        width=width,
        alpha=batch.prior_weight,
        alpha_given=batch.alpha is not None,
        vocab_size=batch.vocab_size,
        tol=tol,
        max_iter=max_iter,
    )
    solution = TopkSolution(out["ids"], out["soft"], out["union"], out["disconnected"], out["kept"], out["errors"])
    if method == "ce":
        solution.iterations, solution.converged, solution.residual = (
            out["iterations"],
            out["converged"],
            out["residual"],
        )
        solution.extra = {"step": out["step"], "abs_residual": out["abs_residual"]}
    return solution
