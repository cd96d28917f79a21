"""The backends and the choice between them: compiled CUDA -> Triton -> compiled CPU -> torch.

A backend solves a :class:`~uhc_fast.inputs.Batch` for a method. ``backend="auto"`` takes the
first usable backend for the tensors' device and the method; a forced backend that cannot run
raises, saying why. ``UHC_FAST_BACKEND`` sets the default for ``backend="auto"``. :func:`info`
reports every backend and why it is or is not usable.

Each concrete backend lives in its own module with a factory that returns a :class:`Backend` or
raises ImportError/RuntimeError with the reason it cannot run here: :mod:`.reference` (torch),
:mod:`.native` (``cpu`` and ``cuda``), :mod:`.triton`. Backends import only downwards (inputs,
problem, reference, the compiled modules, the kernels), never the API.
"""

from __future__ import annotations

import torch

from ..options import BACKEND_NAMES, check_backend_name
from . import native, reference, triton
from .base import Backend

_FACTORIES = {
    "torch": reference.backend,
    "cpu": native.cpu_backend,
    "cuda": native.cuda_backend,
    "triton": triton.backend,
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


_cache: dict[str, Backend | str] = {}


def load(name: str) -> Backend | str:
    """The backend called ``name``, or the reason it is unavailable (cached)."""
    if name not in _cache:
        try:
            _cache[name] = _FACTORIES[name]()
        except Exception as err:  # whatever stops a backend from loading makes it unavailable, with the reason
            _cache[name] = f"{type(err).__name__}: {err}"
    return _cache[name]


def select(backend: str, device: torch.device, method: str | None = None) -> Backend:
    """The backend that will run ``method`` (or, with no method, the loss) on ``device``.

    Raises RuntimeError when a forced backend cannot run here, saying why.
    """
    backend = check_backend_name(backend)

    def unusable(candidate: Backend | str) -> str | None:
        if isinstance(candidate, str):
            return candidate
        if device.type not in candidate.device_types:
            return f"runs on {candidate.device_types} tensors, these are on {device.type}"
        if method is not None and method not in candidate.methods:
            return f"does not implement method {method!r}"
        return None

    if backend != "auto":
        candidate = load(backend)
        reason = unusable(candidate)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available: {reason}")
        return candidate
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        candidate = load(name)
        if unusable(candidate) is None:
            return candidate
    return load("torch")


def info() -> dict:
    """Each backend with ``available`` (usable in this process), ``built`` for the compiled ones,
    and, when not available, ``reason``; ``auto`` gives the choice per device type."""
    report = {}
    for name in BACKEND_NAMES[1:]:
        candidate = load(name)
        if isinstance(candidate, str):
            built = native.built(name) if name in native.MODULES else None
            report[name] = {"available": False, "built": built, "reason": candidate}
        else:
            entry = {"available": True, "devices": list(candidate.device_types), "methods": sorted(candidate.methods)}
            entry.update(candidate.details())
            report[name] = entry
    report["auto"] = {
        device: next(n for n in order if not isinstance(load(n), str) and device in load(n).device_types)
        for device, order in _AUTO_ORDER.items()
    }
    report["torch_version"] = torch.__version__
    report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return report


__all__ = ["BACKEND_NAMES", "Backend", "check_backend_name", "info", "load", "select"]
