"""Teacher outputs -> one validated, packed tensor: the single place user arrays become tensors.

Every backend receives a :class:`PackedProblem`: the teachers' outputs concatenated column-wise
into a ``(B, nnz)`` tensor in the compute dtype, already validated, already converted to the value
kind the method works on (probabilities or logits), already divided by the temperature, and with
the ``alpha`` prior appended as one more teacher when it is in use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .problem import Layout, TeacherSet

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INPUT_KINDS = ("probs", "logits")

# How far a probability row may sum from 1, per input dtype (rounding of a stored softmax).
_SUM_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-6}
# The alpha used when the overlap graph is disconnected and the caller gave none.
DEFAULT_DISCONNECTED_ALPHA = 1e-2


@dataclass(frozen=True)
class PackedProblem:
    """What a backend solves.

    Attributes:
        values: ``(B, nnz)`` contiguous, compute dtype. Probabilities renormalised per teacher for
            ``sd``/``ce``/``mf-p``; logits (already divided by the temperature) for ``mf-lf``/``mf-lu``.
        layout: the packed layout on ``values.device`` (including the prior teacher, if any).
        weights: ``(N,)`` per-teacher weights, compute dtype, all > 0.
        teachers: the TeacherSet the layout came from (including the prior teacher, if any).
    """

    values: torch.Tensor
    layout: Layout
    weights: torch.Tensor
    teachers: TeacherSet

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class Converted:
    """Validated teacher outputs as torch tensors, before packing."""

    tensors: list[torch.Tensor]
    batch_size: int
    device: torch.device
    compute_dtype: torch.dtype
    numpy_out: bool


def convert_outputs(outputs: Sequence, teachers: TeacherSet, inputs: str) -> Converted:
    """Check the teachers' arrays against their class sets and turn them into torch tensors.

    Raises TypeError/ValueError naming the teacher (and row) for: wrong container, non-array,
    integer dtype, wrong rank, wrong column count, mismatched batch sizes, mixed devices, NaN or
    Inf, and for probabilities: negative entries, all-zero rows, rows not summing to one.
    """
    if inputs not in INPUT_KINDS:
        raise ValueError(f"inputs={inputs!r}: expected one of {INPUT_KINDS}")
    if isinstance(outputs, (torch.Tensor, np.ndarray)) or not isinstance(outputs, Sequence):
        raise TypeError("outputs must be a sequence of N per-teacher arrays shaped (B, |L_i|)")
    if len(outputs) != teachers.num_teachers:
        raise ValueError(f"got outputs for {len(outputs)} teachers but class sets for {teachers.num_teachers}")
    tensors = []
    all_numpy = True
    for i, x in enumerate(outputs):
        if isinstance(x, np.ndarray):
            if x.dtype.kind != "f":
                raise TypeError(f"teacher {i}: outputs must be floating point, got numpy {x.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(x))
        elif isinstance(x, torch.Tensor):
            all_numpy = False
        else:
            raise TypeError(f"teacher {i}: expected a torch tensor or numpy array, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"teacher {i}: outputs must be float16/bfloat16/float32/float64, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"teacher {i}: outputs must be 2-D (B, {teachers.sizes[i]}), got shape {tuple(x.shape)}")
        if x.shape[1] != teachers.sizes[i]:
            raise ValueError(
                f"teacher {i}: outputs have {x.shape[1]} columns but its class set has {teachers.sizes[i]}"
            )
        if tensors and x.shape[0] != tensors[0].shape[0]:
            raise ValueError(f"teacher {i}: batch size {x.shape[0]} differs from teacher 0's {tensors[0].shape[0]}")
        if tensors and x.device != tensors[0].device:
            raise ValueError(f"teacher {i}: on {x.device} but teacher 0 is on {tensors[0].device}")
        tensors.append(x)
    for i, x in enumerate(tensors):
        check_values(i, x, inputs)
    compute_dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    return Converted(tensors, int(tensors[0].shape[0]), tensors[0].device, compute_dtype, all_numpy)


def check_values(i: int, x: torch.Tensor, inputs: str) -> None:
    """Teacher i's outputs must be finite; probabilities also non-negative and summing to 1 per row."""
    if x.numel() == 0 or torch.compiler.is_compiling():  # data-dependent checks would break a compiled graph
        return
    # One pass: NaN/Inf anywhere in a row make its float64 sum non-finite. Rows are located only
    # when something is wrong.
    sums = x.sum(dim=1, dtype=torch.float64)
    if not bool(torch.isfinite(sums).all()):
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):  # (otherwise the sum overflowed on finite values)
            raise ValueError(f"teacher {i}, row {int(torch.nonzero(bad)[0])}: outputs contain NaN or Inf")
    if inputs != "probs":
        return
    if bool(x.min() < 0):
        row = int(torch.nonzero((x < 0).any(dim=1))[0])
        raise ValueError(f"teacher {i}, row {row}: negative probability (did you mean inputs='logits'?)")
    if bool((sums == 0).any()):
        row = int(torch.nonzero(sums == 0)[0])
        raise ValueError(f"teacher {i}, row {row}: all probabilities are zero")
    tol = _SUM_TOLERANCE[x.dtype]
    off = (sums - 1).abs() > tol
    if bool(off.any()):
        row = int(torch.nonzero(off)[0])
        raise ValueError(
            f"teacher {i}, row {row}: probabilities sum to {float(sums[row]):.6g}, not 1 "
            f"(tolerance {tol:g}; did you mean inputs='logits'?)"
        )


def resolve_weights(weights, teachers: TeacherSet, dtype: torch.dtype, device) -> torch.Tensor:
    """Per-teacher weights as an ``(N,)`` tensor (default all ones); each must be finite and > 0."""
    if weights is None:
        return torch.ones(teachers.num_teachers, dtype=dtype, device=device)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != teachers.num_teachers:
        raise ValueError(f"weights has {w.numel()} entries for {teachers.num_teachers} teachers")
    bad = ~(torch.isfinite(w) & (w > 0))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"weights[{i}] = {float(w[i])}: teacher weights must be finite and > 0")
    return w.to(dtype=dtype, device=device)


def resolve_alpha(alpha: float | None, teachers: TeacherSet) -> float:
    """The prior's weight: as given, else 0 on a connected graph, else a small default (warned)."""
    if alpha is None:
        if teachers.is_connected:
            return 0.0
        teachers.warn_if_disconnected()
        return DEFAULT_DISCONNECTED_ALPHA
    alpha = float(alpha)
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha={alpha}: must be finite and >= 0")
    if alpha == 0:
        teachers.warn_if_disconnected()
    return alpha


def pack(
    outputs: Sequence,
    teachers: TeacherSet,
    *,
    inputs: str = "probs",
    value_kind: str = "probs",
    weights=None,
    temperature: float = 1.0,
    alpha: float | None = None,
    eps: float = 1e-12,
) -> tuple[PackedProblem, Converted]:
    """Validate ``outputs`` and build the :class:`PackedProblem` a backend solves.

    ``value_kind`` is what the method works on: ``"probs"`` (renormalised per teacher) or
    ``"logits"`` (probabilities become ``log(max(p, eps))``).
    """
    converted = convert_outputs(outputs, teachers, inputs)
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature}: must be finite and > 0")
    dtype, device = converted.compute_dtype, converted.device
    w = resolve_weights(weights, teachers, dtype, device)
    alpha = resolve_alpha(alpha, teachers)

    values = torch.cat(
        [_as_value_kind(x.to(dtype), inputs, value_kind, temperature, eps) for x in converted.tensors], 1
    )

    if alpha > 0:
        teachers = teachers.with_prior()
        k = teachers.sizes[-1]
        fill = 1.0 / k if value_kind == "probs" else 0.0
        values = torch.cat([values, values.new_full((values.shape[0], k), fill)], dim=1)
        w = torch.cat([w, w.new_tensor([alpha])])
    return PackedProblem(values.contiguous(), teachers.layout(device), w, teachers), converted


def _as_value_kind(x: torch.Tensor, inputs: str, value_kind: str, temperature: float, eps: float) -> torch.Tensor:
    """One teacher's ``(B, |L_i|)`` outputs as renormalised probabilities or as logits, at ``temperature``."""
    if value_kind == "probs" and inputs == "probs" and temperature == 1.0:
        return x / x.sum(dim=1, keepdim=True)  # absorbs the rounding of a stored softmax
    logits = torch.log(x.clamp_min(eps)) if inputs == "probs" else x
    if temperature != 1.0:
        logits = logits / temperature
    return torch.softmax(logits, dim=1) if value_kind == "probs" else logits


# ---------------------------------------------------------------------- packed primitives
def segment_sum(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, nnz) -> (B, N)``: per-teacher sums of packed columns."""
    out = values.new_zeros(values.shape[0], layout.num_teachers)
    return out.index_add(1, layout.teacher_index, values)


def scatter_classes(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, nnz) -> (B, K)``: add each packed column into its class."""
    out = values.new_zeros(values.shape[0], layout.num_classes)
    return out.index_add(1, layout.class_index, values)


def segment_max(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, nnz) -> (B, N)``: per-teacher maxima (no gradient: used only for stability)."""
    index = layout.teacher_index.expand(values.shape[0], -1)
    out = values.new_full((values.shape[0], layout.num_teachers), float("-inf"))
    return out.scatter_reduce(1, index, values.detach(), "amax", include_self=True)


def segment_logsumexp(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, nnz) -> (B, N)``: per-teacher logsumexp, stable for extreme values."""
    top = segment_max(values, layout)
    return torch.log(segment_sum(torch.exp(values - top[:, layout.teacher_index]), layout)) + top
