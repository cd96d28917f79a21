"""The Triton backend: fused kernels for every method and for the training loss.

``backend()`` returns a :class:`~uhc_fast.dispatch.Backend` running the kernels in
``uhc_fast.kernels`` through their ``torch.library`` custom ops. It raises ImportError when
triton is missing and RuntimeError when no CUDA device is usable and ``TRITON_INTERPRET`` is not
set; under ``TRITON_INTERPRET=1`` it runs on CPU tensors (slowly: that mode is for tests).

Limits: `ce`, `mf-p` and `mf-lu` solve an ``N x N`` system per sample on chip and take at most
``MAX_NEWTON_TEACHERS`` teachers; `sd`, `mf-lf` and the loss take at most ``MAX_TILE_TEACHERS``.
Beyond those the backend runs the torch reference for that call (``details["fallback"]`` says so).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from . import reference
from .dispatch import Backend
from .inputs import PackedProblem
from .reference.common import DEFAULT_MAX_ITER, Solution, default_tol
from .reference.mf import mf_lf_system

# Loaded once; after that the solvers and the loss touch no import machinery (which torch.compile
# cannot trace).
_loaded: dict[str, object] = {}


def load_kernels():
    """``uhc_fast.kernels``: the installed package, or ``kernels/`` of a source checkout."""
    if "kernels" not in _loaded:
        _loaded["kernels"] = _import_kernels()
    return _loaded["kernels"]


def _import_kernels():
    try:
        return importlib.import_module("uhc_fast.kernels")
    except ModuleNotFoundError as err:
        if err.name != "uhc_fast.kernels":
            raise
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not source.is_file():
        raise ImportError("uhc_fast.kernels is not installed and no kernels/ source directory is next to uhc_fast/")
    spec = importlib.util.spec_from_file_location(
        "uhc_fast.kernels", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["uhc_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["uhc_fast.kernels"]
        raise
    return module


def _ops():
    if "ops" not in _loaded:
        load_kernels()
        _loaded["ops"] = importlib.import_module("uhc_fast.kernels.ops")
    return _loaded["ops"]


def _reference_if_too_wide(method: str, problem: PackedProblem, limit: int):
    return reference.SOLVERS[method] if problem.layout.num_teachers > limit else None


def _check_device(values: torch.Tensor) -> None:
    kernels = load_kernels()
    if values.device.type == "cpu" and not kernels.interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")


def _sd(problem: PackedProblem, tol=None, max_iter=None) -> Solution:
    kernels = load_kernels()
    fallback = _reference_if_too_wide("sd", problem, kernels.MAX_TILE_TEACHERS)
    if fallback is not None:
        return fallback(problem, tol, max_iter)
    _check_device(problem.values)
    cmap = kernels.colmap(problem.layout)
    return Solution(_ops().triton_sd(problem.values, problem.weights, cmap))


def _iterative(method: str, op_name: str, needs_system: bool):
    def solve(problem: PackedProblem, tol: float | None = None, max_iter: int | None = None) -> Solution:
        kernels = load_kernels()
        fallback = _reference_if_too_wide(method, problem, kernels.MAX_NEWTON_TEACHERS)
        if fallback is not None:
            return fallback(problem, tol, max_iter)
        _check_device(problem.values)
        tol = default_tol(problem.values.dtype) if tol is None else float(tol)
        max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
        cmap = kernels.colmap(problem.layout)
        op = getattr(_ops(), op_name)
        if needs_system:
            soft, iterations, residual = op(problem.values, problem.weights, cmap, mf_lf_system(problem), tol, max_iter)
        else:
            soft, iterations, residual = op(problem.values, problem.weights, cmap, tol, max_iter)
        return Solution(soft, iterations, residual)

    solve.__name__ = f"solve_{method.replace('-', '_')}"
    solve.__doc__ = f"`{method}` through the fused Triton kernel; same contract as the reference solver."
    return solve


def _mf_lf(problem: PackedProblem, tol=None, max_iter=None) -> Solution:
    kernels = load_kernels()
    fallback = _reference_if_too_wide("mf-lf", problem, kernels.MAX_TILE_TEACHERS)
    if fallback is not None:
        return fallback(problem, tol, max_iter)
    _check_device(problem.values)
    cmap = kernels.colmap(problem.layout)
    return Solution(_ops().triton_mf_lf(problem.values, problem.weights, cmap, mf_lf_system(problem)))


def direct_ce_loss(student_logits: torch.Tensor, problem: PackedProblem) -> torch.Tensor:
    """Per-sample direct `ce` loss ``(B,)`` by the fused kernels (forward and backward)."""
    kernels = load_kernels()
    if problem.layout.num_teachers > kernels.MAX_TILE_TEACHERS:
        from .loss import direct_ce_loss as reference_loss

        return reference_loss(student_logits, problem)
    _check_device(student_logits)
    cmap = kernels.colmap(problem.layout)
    return _ops().loss(student_logits, problem.values, problem.weights, cmap)


SOLVERS = {
    "sd": _sd,
    "ce": _iterative("ce", "triton_ce", needs_system=False),
    "mf-p": _iterative("mf-p", "triton_mf_p", needs_system=False),
    "mf-lf": _mf_lf,
    "mf-lu": _iterative("mf-lu", "triton_mf_lu", needs_system=True),
}


def backend() -> Backend:
    """The Triton backend, or ImportError/RuntimeError saying why it cannot run here."""
    try:
        import triton
    except ImportError as err:
        raise ImportError(f"triton is not installed ({err}); pip install 'uhc_fast[triton]'") from err
    kernels = load_kernels()
    _ops()  # registers the custom ops
    if kernels.interpreting():
        devices: tuple[str, ...] = ("cpu",)
        mode = "interpreter (TRITON_INTERPRET=1): CPU tensors, for testing"
    elif torch.cuda.is_available():
        devices = ("cuda",)
        mode = f"compiled for {torch.cuda.get_device_name()}"
    else:
        raise RuntimeError("no CUDA device, and TRITON_INTERPRET is not set")
    details = {
        "kind": "fused Triton kernels",
        "triton_version": triton.__version__,
        "mode": mode,
        "loss": "fused forward and backward (torch.library custom op)",
        "fallback": (
            f"torch reference beyond {kernels.MAX_NEWTON_TEACHERS} teachers (ce, mf-p, mf-lu) "
            f"or {kernels.MAX_TILE_TEACHERS} (sd, mf-lf, loss)"
        ),
    }
    return Backend("triton", devices, dict(SOLVERS), direct_ce_loss, details)
