"""Backend selection: compiled CUDA -> Triton -> compiled CPU -> torch reference.

A backend is a module exposing ``backend() -> Backend`` (raising ImportError or RuntimeError with
the reason when it cannot be used here). ``backend="auto"`` takes the first usable backend for
the tensors' device and the method; a forced backend that cannot run raises. ``UHC_FAST_BACKEND``
sets the default for ``backend="auto"``. :func:`info` reports every backend and why it is or is
not usable.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference

BACKEND_NAMES = ("auto", "torch", "cpu", "cuda", "triton")
# Where each non-reference backend lives (module, factory); absent modules report "not built".
_LOCATIONS = {
    "cuda": ("uhc_fast.native", "cuda_backend"),
    "triton": ("uhc_fast.triton_backend", "backend"),
    "cpu": ("uhc_fast.native", "cpu_backend"),
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@dataclass(frozen=True)
class Backend:
    """One way of solving packed problems.

    Attributes:
        name: the public ``backend=`` string.
        device_types: torch device types it runs on (``"cpu"``, ``"cuda"``).
        solvers: method name -> ``solve(problem, tol, max_iter) -> Solution``.
        loss: optional ``loss(student_logits, problem) -> (B,)`` direct-CE loss with autograd.
    """

    name: str
    device_types: tuple[str, ...]
    solvers: dict[str, Callable]
    loss: Callable | None = None
    details: dict = field(default_factory=dict)


def _torch_backend() -> Backend:
    return Backend("torch", ("cpu", "cuda"), dict(reference.SOLVERS), None, {"kind": "plain PyTorch reference"})


_cache: dict[str, Backend | str] = {}


def load(name: str) -> Backend | str:
    """The backend called ``name``, or the reason it is unavailable (cached)."""
    if name not in _cache:
        if name == "torch":
            _cache[name] = _torch_backend()
        else:
            module_name, factory = _LOCATIONS[name]
            try:
                _cache[name] = getattr(importlib.import_module(module_name), factory)()
            except (ImportError, RuntimeError, OSError, AttributeError) as err:
                _cache[name] = f"{type(err).__name__}: {err}"
    return _cache[name]


def check_backend_name(backend: str) -> str:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r}: expected one of {BACKEND_NAMES}")
    if backend == "auto":
        forced = os.environ.get("UHC_FAST_BACKEND", "auto")
        if forced not in BACKEND_NAMES:
            raise ValueError(f"UHC_FAST_BACKEND={forced!r}: expected one of {BACKEND_NAMES}")
        return forced
    return backend


def select(backend: str, device: torch.device, method: str | None = None, *, need_loss: bool = False) -> Backend:
    """The backend that will run ``method`` (or the loss) on ``device``.

    Raises RuntimeError when a forced backend cannot run here, saying why.
    """
    backend = check_backend_name(backend)

    def usable(candidate: Backend | str) -> str | None:
        if isinstance(candidate, str):
            return candidate
        if device.type not in candidate.device_types:
            return f"runs on {candidate.device_types} tensors, these are on {device.type}"
        if method is not None and method not in candidate.solvers:
            return f"does not implement method {method!r}"
        if need_loss and candidate.loss is None and candidate.name != "torch":
            return "does not implement the loss"
        return None

    if backend != "auto":
        candidate = load(backend)
        reason = usable(candidate)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available: {reason}")
        return candidate
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        candidate = load(name)
        if usable(candidate) is None:
            return candidate
    return load("torch")


def _built(name: str) -> bool | None:
    """Whether a compiled backend's extension exists (None for backends with nothing to build)."""
    try:
        return importlib.import_module(_LOCATIONS[name][0]).built(name)
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


def info() -> dict:
    """Each backend with ``available`` (usable in this process) and, when not, ``reason``."""
    report = {}
    for name in BACKEND_NAMES[1:]:
        candidate = load(name)
        if isinstance(candidate, str):
            report[name] = {"available": False, "built": _built(name), "reason": candidate}
        else:
            entry = {"available": True, "devices": list(candidate.device_types), "methods": sorted(candidate.solvers)}
            entry.update(candidate.details)
            report[name] = entry
    report["auto"] = {
        device: next(n for n in order if not isinstance(load(n), str)) for device, order in _AUTO_ORDER.items()
    }
    report["torch_version"] = torch.__version__
    report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return report
