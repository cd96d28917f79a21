"""``backend="cpu"`` (OpenMP over SIMD tiles) and ``backend="cuda"``: the compiled C++ core of ``csrc/``.

Nothing is packed or converted torch-side: the core reads each teacher's array in its stored dtype
and strides (numpy memory included), validates it with the rules of
:func:`uhc_fast.inputs.check_values` and converts it in its one pass over the data.
"""

from __future__ import annotations

import torch

from ..constants import compute_dtype
from ..inputs import Batch, Solution, raise_first_failure
from ..methods import METHODS, Method
from ..reference import direct_ce_loss
from . import native_op
from .base import Backend
from .native_launch import DTYPE_CODES, KIND_CODES, MODULES, built, launch_cpu, launch_cuda, load_module

__all__ = ["MODULES", "built", "cpu_backend", "cuda_backend", "solve_batch"]


def solve_batch(batch: Batch, method: Method, name: str) -> Solution:
    """Solve ``batch`` with the compiled kernels of its device."""
    options, device = batch.options, batch.device
    teachers = batch.solved_teachers
    layout = teachers.layout(device)
    out_dtype = compute_dtype(batch.compute_dtype)
    weights = batch.solved_weights(torch.float64, device).contiguous()
    if method.needs_system:
        system = layout.mf_lf_system(batch.solved_weight_values, torch.float64)
    else:
        system = weights.new_zeros(0, 0)
    kinds = [KIND_CODES[k] for k in batch.kinds] + [KIND_CODES["probs"]] * (teachers.num_teachers - len(batch.kinds))
    args = (layout.structure, weights, system, method.name)
    settings = (options.temperature, options.eps, options.tol_for(out_dtype), options.iteration_cap())
    if torch.compiler.is_compiling():
        outs = native_op.solve(batch.tensors, kinds, *args, layout.num_classes, DTYPE_CODES[out_dtype], *settings)
    else:
        launch = launch_cuda if device.type == "cuda" else launch_cpu
        outs = launch(batch.tensors, kinds, *args, out_dtype, *settings)
    soft, iterations, converged, residual, step, abs_residual, errors = outs
    if not torch.compiler.is_compiling():  # (data-dependent: a compiled graph skips the checks, as check_values does)
        raise_first_failure(batch.tensors, errors.cpu())
    solution = (
        Solution(soft) if not method.iterative else Solution(soft, iterations, residual, converged, {"step": step})
    )
    if method.name == "ce":
        solution.extra["abs_residual"] = abs_residual
    solution.backend = name
    return solution


def cpu_backend() -> Backend:
    """The OpenMP backend (ImportError when ``uhc_fast._native_cpu`` was not built)."""
    load_module("cpu")
    return Backend(
        "cpu",
        ("cpu",),
        frozenset(METHODS),
        lambda batch, method: solve_batch(batch, method, "cpu"),
        direct_ce_loss,
        _cpu_details,
    )


def _cpu_details() -> dict:
    module = load_module("cpu")
    isa = module.default_isa()
    return {
        "kind": "compiled C++ (pybind11), SIMD tiles of samples, OpenMP over tiles",
        "built": True,
        "module": module.__file__,
        "openmp": bool(module.openmp),
        "threads": torch.get_num_threads(),
        "isa": isa,
        "lanes": module.isas()[isa]["lanes"],
        "isas_built": sorted(module.isas()),
        "loss": "the torch reference",
    }


def cuda_backend() -> Backend:
    """The CUDA backend: ImportError when not built, RuntimeError when built but unusable here."""
    module = load_module("cuda")
    version = f"{module.runtime_version // 1000}.{module.runtime_version % 1000 // 10}"
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA device"
        raise RuntimeError(f"{MODULES['cuda']} is built (CUDA runtime {version}) but not usable: {why}")
    count, message = module.device_count()
    if count == 0:
        raise RuntimeError(
            f"{MODULES['cuda']} is built (CUDA runtime {version}) but its runtime sees no device: "
            f"{message or 'no devices'} (the driver may be older than CUDA {version})"
        )
    details = {
        "kind": "compiled CUDA (pybind11): sd and mf-lf a warp per sample, ce a block, mf-p and mf-lu a thread",
        "built": True,
        "module": module.__file__,
        "cuda_runtime": version,
        "loss": "the torch reference",
    }
    return Backend(
        "cuda",
        ("cuda",),
        frozenset(METHODS),
        lambda batch, method: solve_batch(batch, method, "cuda"),
        direct_ce_loss,
        lambda: details,
    )
