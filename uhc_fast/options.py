"""The options of one estimation, validated once and shared by `estimate`, streaming, the CLI and
the demo."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from . import methods
from .constants import DEFAULT_EPS, DEFAULT_MAX_ITER, default_tol
from .errors import InputError

INPUT_KINDS = ("probs", "logits")
# estimate_topk's teachers may also give log-probabilities of their listed ids, and it runs these methods
TOPK_INPUT_KINDS = ("probs", "logprobs", "logits")
TOPK_METHODS = ("sd", "ce")
BACKEND_NAMES = ("auto", "torch", "cpu", "cuda", "triton")


def check_backend_name(backend: str) -> str:
    """``backend`` itself, or for ``"auto"`` the ``UHC_FAST_BACKEND`` override (default ``"auto"``)."""
    if backend not in BACKEND_NAMES:
        raise InputError(f"expected one of {BACKEND_NAMES}", argument="backend", value=repr(backend))
    if backend == "auto":
        forced = os.environ.get("UHC_FAST_BACKEND", "auto")
        if forced not in BACKEND_NAMES:
            raise InputError(f"expected one of {BACKEND_NAMES}", argument="UHC_FAST_BACKEND", value=repr(forced))
        return forced
    return backend


@dataclass(frozen=True)
class Options:
    """How to estimate (see :func:`uhc_fast.estimate` for each field's meaning).

    Construction validates every field and raises :class:`~uhc_fast.errors.InputError` naming the
    argument; ``weights`` is checked against the number of teachers later, when it is known.
    """

    method: str = "ce"
    inputs: str | tuple[str, ...] = "probs"
    weights: tuple[float, ...] | None = None  # (any array-like is accepted and stored as a tuple)
    temperature: float = 1.0
    alpha: float | None = None
    tol: float | None = None
    max_iter: int | None = None
    eps: float = DEFAULT_EPS
    backend: str = "auto"
    topk: bool = False  # the options of estimate_topk (per-sample class sets): TOPK_INPUT_KINDS, TOPK_METHODS

    def __post_init__(self) -> None:
        methods.get(self.method)
        if self.topk and self.method not in TOPK_METHODS:
            raise InputError(f"estimate_topk runs {TOPK_METHODS}", argument="method", value=repr(self.method))
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("inputs", _inputs(self.inputs, TOPK_INPUT_KINDS if self.topk else INPUT_KINDS))
        set_("weights", _weights(self.weights))
        set_("temperature", _positive("temperature", self.temperature))
        set_("eps", _real("eps", self.eps, lambda x: 0 < x < 1, "in (0, 1)"))  # a floor of 1 or more flattens every row
        if self.alpha is not None:
            set_("alpha", _real("alpha", self.alpha, lambda x: x >= 0, "finite and >= 0"))
        if self.tol is not None:
            set_("tol", _positive("tol", self.tol))
        if self.max_iter is not None:
            if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 0:
                raise InputError("must be an int >= 0", argument="max_iter", value=repr(self.max_iter))
            set_("max_iter", int(self.max_iter))
        check_backend_name(self.backend)

    @property
    def spec(self) -> methods.Method:
        return methods.METHODS[self.method]

    def kinds(self, num_teachers: int) -> tuple[str, ...]:
        """The input kind of each teacher."""
        if isinstance(self.inputs, str):
            return (self.inputs,) * num_teachers
        if len(self.inputs) != num_teachers:
            raise InputError(f"lists {len(self.inputs)} kinds for {num_teachers} teachers", argument="inputs")
        return self.inputs

    def tol_for(self, dtype: torch.dtype) -> float:
        """The tolerance for computation in ``dtype``: as given, else the dtype's default."""
        return default_tol(dtype) if self.tol is None else self.tol

    def iteration_cap(self) -> int:
        return DEFAULT_MAX_ITER if self.max_iter is None else self.max_iter

    def as_dict(self) -> dict:
        """Plain JSON-able values (a job's fingerprint, a sidecar); ``topk`` only when set."""
        found = asdict(self)
        if not self.topk:
            del found["topk"]
        return found


def _real(name: str, value, ok, requirement: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError("must be a real number", argument=name, value=repr(value))
    number = float(value)
    if not (math.isfinite(number) and ok(number)):
        raise InputError(f"must be {requirement}", argument=name, value=str(number))
    return number


def _positive(name: str, value) -> float:
    return _real(name, value, lambda x: x > 0, "finite and > 0")


def _inputs(inputs, allowed: tuple[str, ...] = INPUT_KINDS) -> str | tuple[str, ...]:
    if isinstance(inputs, str):
        if inputs not in allowed:
            raise InputError(f"expected one of {allowed} (or one per teacher)", argument="inputs", value=repr(inputs))
        return inputs
    if not isinstance(inputs, Sequence) or not inputs:
        raise InputError(f"expected one of {allowed} or a sequence of them", argument="inputs", value=repr(inputs))
    kinds = tuple(inputs)
    for i, kind in enumerate(kinds):
        if kind not in allowed:
            raise InputError(f"expected one of {allowed}", argument=f"inputs[{i}]", value=repr(kind))
    return kinds


def _weights(weights) -> tuple[float, ...] | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    bad = ~(torch.isfinite(w) & (w > 0))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise InputError("teacher weights must be finite and > 0", argument=f"weights[{i}]", value=str(float(w[i])))
    return tuple(w.tolist())
