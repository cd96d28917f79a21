"""User arrays -> what a backend solves, and what it returns.

:func:`convert` checks the containers, dtypes, shapes and devices of the teachers' outputs and
resolves the per-call settings that depend on the teachers (weights, the ``alpha`` prior) into a
:class:`Batch`. The values themselves are checked where they are read: :func:`pack` (the torch
path) validates and converts them into a :class:`PackedProblem`; the compiled backends validate
in their own pass over the data, with the same rules and the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .constants import DEFAULT_DISCONNECTED_ALPHA, SUM_TOLERANCE, compute_dtype
from .errors import InputError
from .options import Options
from .problem import Layout, TeacherSet

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Batch:
    """One call's teacher outputs, checked in shape but not yet in value.

    Attributes:
        tensors: N tensors ``(B, |L_i|)`` in their stored dtype, on one device (numpy inputs are
            shared, not copied).
        kinds: per teacher, ``"probs"`` or ``"logits"``.
        teachers: the TeacherSet (without the prior teacher).
        weights: ``(N,)`` float64 per-teacher weights on the CPU.
        alpha: the prior teacher's weight (0: no prior).
        options: the call's validated options.
    """

    tensors: list[torch.Tensor]
    kinds: tuple[str, ...]
    teachers: TeacherSet
    weights: torch.Tensor
    alpha: float
    options: Options
    numpy_out: bool

    @property
    def batch_size(self) -> int:
        return int(self.tensors[0].shape[0])

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 if any teacher is float64, else float32."""
        return torch.float64 if any(x.dtype == torch.float64 for x in self.tensors) else torch.float32

    @property
    def solved_teachers(self) -> TeacherSet:
        """The teachers a solver sees: with the prior teacher appended when ``alpha > 0``."""
        return self.teachers.with_prior() if self.alpha > 0 else self.teachers

    @property
    def solved_weight_values(self) -> tuple[float, ...]:
        """The solver's per-teacher weights as plain floats: the prior's ``alpha`` appended when in use."""
        values = self.options.weights or (1.0,) * self.teachers.num_teachers
        return (*values, self.alpha) if self.alpha > 0 else tuple(values)

    def solved_weights(self, dtype: torch.dtype, device) -> torch.Tensor:
        return torch.tensor(self.solved_weight_values, dtype=dtype, device=device)


@dataclass(frozen=True)
class PackedProblem:
    """What a torch-side solver solves.

    Attributes:
        values: ``(B, nnz)`` contiguous. Probabilities renormalised per teacher for
            probability-space methods; logits (already divided by the temperature) for logit-space ones.
        layout: the packed layout on ``values.device`` (including the prior teacher, if any).
        weights: ``(N,)`` per-teacher weights in the values' dtype, all > 0.
        teachers: the TeacherSet the layout came from (including the prior teacher, if any).
        dtype: the dtype of the answer (float64 for float64 inputs, else float32), which may be
            narrower than the values' (the torch reference packs in float64).
    """

    values: torch.Tensor
    layout: Layout
    weights: torch.Tensor
    teachers: TeacherSet
    dtype: torch.dtype

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])


@dataclass
class Solution:
    """A backend's answer for a batch.

    Attributes:
        soft: ``(B, K)`` soft labels, rows sum to 1, zero on uncovered classes.
        iterations: ``(B,)`` int32 iterations used per sample (iterative methods), else None.
        residual: ``(B,)`` the method's scale-free optimality residual (iterative methods), else None.
        converged: ``(B,)`` bool, the method's convergence test (iterative methods), else None.
        extra: further per-sample diagnostics by name (for instance `ce`'s absolute residual).
        backend: the backend that ran (set by the backend layer).
    """

    soft: torch.Tensor
    iterations: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    extra: dict | None = None
    backend: str | None = None


def convert(outputs: Sequence, teachers: TeacherSet, options: Options) -> Batch:
    """Check the teachers' arrays against their class sets and hold them as torch tensors.

    Raises TypeError/InputError naming the teacher for: wrong container, non-array, integer dtype,
    wrong rank, wrong column count, mismatched batch sizes, mixed devices; and naming the argument
    for weights of the wrong length.
    """
    if isinstance(outputs, (torch.Tensor, np.ndarray)) or not isinstance(outputs, Sequence):
        raise TypeError("outputs must be a sequence of N per-teacher arrays shaped (B, |L_i|)")
    if len(outputs) != teachers.num_teachers:
        raise InputError(f"got outputs for {len(outputs)} teachers but class sets for {teachers.num_teachers}")
    tensors = []
    all_numpy = True
    for i, x in enumerate(outputs):
        if isinstance(x, np.ndarray):
            if x.dtype.kind != "f":
                raise TypeError(f"teacher {i}: outputs must be floating point, got numpy {x.dtype}")
            if not x.dtype.isnative:
                x = x.astype(x.dtype.newbyteorder("="))
            if min(x.strides, default=0) < 0:  # a reversed view: torch has no negative strides
                x = np.ascontiguousarray(x)
            x = torch.from_numpy(x)
        elif isinstance(x, torch.Tensor):
            all_numpy = False
        else:
            raise TypeError(f"teacher {i}: expected a torch tensor or numpy array, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"teacher {i}: outputs must be float16/bfloat16/float32/float64, got {x.dtype}")
        if x.dim() != 2:
            raise InputError(f"outputs must be 2-D (B, {teachers.sizes[i]}), got shape {tuple(x.shape)}", teacher=i)
        if x.shape[1] != teachers.sizes[i]:
            raise InputError(f"outputs have {x.shape[1]} columns but its class set has {teachers.sizes[i]}", teacher=i)
        if tensors and x.shape[0] != tensors[0].shape[0]:
            raise InputError(f"batch size {x.shape[0]} differs from teacher 0's {tensors[0].shape[0]}", teacher=i)
        if tensors and x.device != tensors[0].device:
            raise InputError(f"on {x.device} but teacher 0 is on {tensors[0].device}", teacher=i)
        tensors.append(x)
    if options.method == "mf-lu":
        teachers.warn_if_scales_unidentifiable()
    if options.weights is None:
        weights = torch.ones(teachers.num_teachers, dtype=torch.float64)
    elif len(options.weights) != teachers.num_teachers:
        raise InputError(f"has {len(options.weights)} entries for {teachers.num_teachers} teachers", argument="weights")
    else:
        weights = torch.tensor(options.weights, dtype=torch.float64)
    return Batch(
        tensors,
        options.kinds(teachers.num_teachers),
        teachers,
        weights,
        resolve_alpha(options.alpha, teachers),
        options,
        all_numpy,
    )


def resolve_alpha(alpha: float | None, teachers: TeacherSet) -> float:
    """The prior's weight: as given, else 0 on a connected graph, else a small default (warned)."""
    if alpha is None:
        if teachers.is_connected:
            return 0.0
        teachers.warn_if_disconnected()
        return DEFAULT_DISCONNECTED_ALPHA
    if alpha == 0:
        teachers.warn_if_disconnected()
    return float(alpha)


# The value checks, in the order they are applied to a teacher (the compiled core reports the first
# failing row of each, per teacher, in this order: csrc/core/input.h, Check).
CHECKS = ("not finite", "negative", "all zero", "sum off")


def value_error(i: int, x: torch.Tensor, check: str, row: int) -> InputError:
    """The error for teacher ``i``'s row ``row`` failing ``check`` (one of :data:`CHECKS`)."""
    if check == "not finite":
        return InputError("outputs contain NaN or Inf", teacher=i, row=row)
    if check == "negative":
        return InputError("negative probability (did you mean inputs='logits'?)", teacher=i, row=row)
    if check == "all zero":
        return InputError("all probabilities are zero", teacher=i, row=row)
    total, tol = float(x[row].sum(dtype=torch.float64)), SUM_TOLERANCE[x.dtype]
    return InputError(
        f"probabilities sum to {total:.6g}, not 1 (tolerance {tol:g}; did you mean inputs='logits'?)",
        teacher=i,
        row=row,
    )


def check_values(i: int, x: torch.Tensor, kind: str) -> None:
    """Teacher i's outputs must be finite; probabilities also non-negative and summing to 1 per row.

    Raises :class:`~uhc_fast.errors.InputError` with the teacher and the first offending row.
    """
    if x.numel() == 0 or torch.compiler.is_compiling():  # data-dependent checks would break a compiled graph
        return
    # One pass: NaN/Inf anywhere in a row make its float64 sum non-finite. Rows are located only
    # when something is wrong.
    sums = x.sum(dim=1, dtype=torch.float64)
    failing = {}
    if not bool(torch.isfinite(sums).all()):
        failing["not finite"] = ~torch.isfinite(x).all(dim=1)  # (all False if the sum overflowed on finite values)
    if kind == "probs" and not failing.get("not finite", torch.zeros(1, dtype=torch.bool)).any():
        failing["negative"] = (x < 0).any(dim=1) if bool(x.min() < 0) else None
        failing["all zero"] = sums == 0
        failing["sum off"] = (sums - 1).abs() > SUM_TOLERANCE[x.dtype]
    for check in CHECKS:
        rows = failing.get(check)
        if rows is not None and bool(rows.any()):
            raise value_error(i, x, check, int(torch.nonzero(rows)[0]))


def raise_first_failure(tensors: list[torch.Tensor], first_rows: torch.Tensor) -> None:
    """Raise the error ``check_values`` would, from the compiled core's report: ``first_rows``
    ``(N, len(CHECKS))`` holds each teacher's first failing row per check (-1: none)."""
    failing = first_rows.ne(-1)
    if not bool(failing.any()):
        return
    teacher = int(torch.nonzero(failing.any(dim=1))[0])
    check = int(torch.nonzero(failing[teacher])[0])
    raise value_error(teacher, tensors[teacher], CHECKS[check], int(first_rows[teacher, check]))


def pack(batch: Batch, value_kind: str, dtype: torch.dtype | None = None) -> PackedProblem:
    """Validate ``batch``'s values and build the :class:`PackedProblem` a torch solver solves.

    ``value_kind`` is what the method works on: ``"probs"`` (renormalised per teacher) or
    ``"logits"`` (probabilities become ``log(max(p, eps))``), at the options' temperature. The
    values are converted and packed in ``dtype`` (default: the batch's compute dtype).
    """
    options = batch.options
    answer = compute_dtype(batch.compute_dtype)
    dtype, device = dtype or answer, batch.device
    for i, (x, kind) in enumerate(zip(batch.tensors, batch.kinds, strict=True)):
        check_values(i, x, kind)
    values = torch.cat(
        [
            as_value_kind(x.to(dtype), kind, value_kind, options.temperature, options.eps)
            for x, kind in zip(batch.tensors, batch.kinds, strict=True)
        ],
        dim=1,
    )
    teachers = batch.solved_teachers
    if batch.alpha > 0:
        k = teachers.sizes[-1]
        fill = 1.0 / k if value_kind == "probs" else 0.0
        values = torch.cat([values, values.new_full((values.shape[0], k), fill)], dim=1)
    return PackedProblem(
        values.contiguous(), teachers.layout(device), batch.solved_weights(dtype, device), teachers, answer
    )


def as_value_kind(x: torch.Tensor, kind: str, value_kind: str, temperature: float, eps: float) -> torch.Tensor:
    """One teacher's ``(B, |L_i|)`` outputs as renormalised probabilities or as logits, at ``temperature``."""
    if value_kind == "probs" and kind == "probs" and temperature == 1.0:
        return x / x.sum(dim=1, keepdim=True)  # absorbs the rounding of a stored softmax
    logits = torch.log(x.clamp_min(eps)) if kind == "probs" else x
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
