"""Teachers' top-k outputs as one call's checked problem: :class:`TopkBatch` (what `estimate_topk`
was given, checked in shape), :class:`TopkSolution` (what a backend returns) and the checks'
codes and errors, shared by the entry point (``uhc_fast/topk.py``), the backends
(``uhc_fast/backends/topk.py``) and the reference (``uhc_fast/reference/topk.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .constants import DEFAULT_DISCONNECTED_ALPHA, SUM_TOLERANCE, compute_dtype
from .errors import InputError
from .inputs import FLOAT_DTYPES
from .options import Options

# codes shared with csrc/core/topk.h (TopkKind, TopkCheck, TopkIdType) and kernels/topk.py
KIND_CODES = {"probs": 0, "logprobs": 1, "logits": 2}
CHECKS = ("bad id", "duplicate", "not finite", "out of range", "no mass", "sum over one")
ID_DTYPES = {torch.int32: 0, torch.int64: 1}
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
METHOD_CODES = {"sd": 0, "ce": 1}
# one bit per teacher in the compiled core's and the kernel's masks
MAX_TEACHERS = 63


@dataclass(frozen=True)
class TopkBatch:
    """One call's top-k teacher outputs, checked in shape but not yet in value.

    Attributes:
        ids: N tensors ``(B, k_i)`` int32 or int64 (other integer dtypes are widened to int64):
            ids in the shared vocabulary, or in teacher i's own when ``maps[i]`` is given; -1 marks
            unused slots.
        values: N tensors ``(B, k_i)`` in their stored float dtype.
        kinds: per teacher, ``"probs"``, ``"logprobs"`` or ``"logits"``.
        maps: per teacher, None or an int64 ``(V_i,)`` tensor: teacher id -> shared id (-1: the
            token has no shared id; such slots are dropped).
        weights: ``(N,)`` float64 per-teacher weights on the CPU.
        alpha: the prior's weight as given (None: the default on disconnected samples only).
        vocab_size: shared ids must be below it (None: no bound).
        options: the validated options; numpy_out: every input was numpy.
    """

    ids: list[torch.Tensor]
    values: list[torch.Tensor]
    kinds: tuple[str, ...]
    maps: list[torch.Tensor | None]
    weights: torch.Tensor
    alpha: float | None
    vocab_size: int | None
    options: Options
    numpy_out: bool

    @property
    def batch_size(self) -> int:
        return int(self.ids[0].shape[0])

    @property
    def num_teachers(self) -> int:
        return len(self.ids)

    @property
    def device(self) -> torch.device:
        return self.ids[0].device

    @property
    def total_slots(self) -> int:
        """``sum k_i``: no union is larger."""
        return sum(int(x.shape[1]) for x in self.ids)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The soft labels' dtype: float64 if any teacher's values are float64, else float32."""
        return compute_dtype(torch.float64 if any(v.dtype == torch.float64 for v in self.values) else torch.float32)

    @property
    def prior_weight(self) -> float:
        """The prior's weight where it applies: ``alpha``, or the default on disconnected samples."""
        return DEFAULT_DISCONNECTED_ALPHA if self.alpha is None else self.alpha


@dataclass
class TopkSolution:
    """A backend's answer: ``(B, width)`` ids (-1-padded) and soft labels, and per-sample diagnostics.

    Attributes:
        ids, soft: each sample's union ids by decreasing soft label (ties: increasing id), at most
            ``width`` of them (renormalised to sum 1 when the union was larger).
        union_size: ``(B,)`` int32 ids in each sample's union (0: no teacher listed anything).
        disconnected: ``(B,)`` bool, samples whose teachers' overlap graph is disconnected.
        kept: ``(B,)`` the mass of the kept ids before renormalisation (1 unless truncated; 0 for
            empty samples).
        iterations, residual, converged, extra: as :class:`uhc_fast.inputs.Solution` (`ce` only).
        errors: ``(N, len(CHECKS))`` int64, each teacher's first row failing each check (-1: none).
    """

    ids: torch.Tensor
    soft: torch.Tensor
    union_size: torch.Tensor
    disconnected: torch.Tensor
    kept: torch.Tensor
    errors: torch.Tensor
    iterations: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    extra: dict | None = None
    backend: str | None = None


def _as_tensor(x, what: str, i: int) -> tuple[torch.Tensor, bool]:
    """A numpy array or torch tensor as a tensor (numpy shared, not copied); whether it was numpy."""
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:  # torch's unsigned types beyond uint8 are partial
            if x.size and int(x.max()) > np.iinfo(np.int64).max:
                raise InputError(f"{what} hold values beyond int64", teacher=i, argument=what)
            x = x.astype(np.int64)
        return torch.from_numpy(x), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise TypeError(f"teacher {i}: {what} must be a torch tensor or numpy array, got {type(x).__name__}")


def _sequence(x, name: str) -> list:
    if isinstance(x, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a sequence of N per-teacher arrays shaped (B, k_i)")
    return list(x)


def convert(
    indices: Sequence,
    values: Sequence,
    options: Options,
    *,
    vocab_maps=None,
    vocab_size: int | None = None,
    checked_maps: list[torch.Tensor | None] | None = None,
) -> TopkBatch:
    """Check the teachers' arrays (containers, dtypes, shapes, devices) and the per-call settings.

    ``checked_maps``: vocabulary maps already checked and on the arrays' device (a streaming job
    checks its maps once), used instead of ``vocab_maps``.

    Raises TypeError/InputError naming the teacher and the argument; the values themselves are
    checked by the backend, in its pass over the data.
    """
    ids_list, values_list = _sequence(indices, "indices"), _sequence(values, "values")
    if not ids_list:
        raise InputError("no teachers: indices is empty", argument="indices")
    if len(values_list) != len(ids_list):
        raise InputError(f"lists {len(values_list)} teachers but indices lists {len(ids_list)}", argument="values")
    n = len(ids_list)
    if n > MAX_TEACHERS:
        raise InputError(f"{n} teachers: estimate_topk takes at most {MAX_TEACHERS}", argument="indices")
    ids, vals, all_numpy = [], [], True
    for i, (x, v) in enumerate(zip(ids_list, values_list, strict=True)):
        x, x_numpy = _as_tensor(x, "indices", i)
        v, v_numpy = _as_tensor(v, "values", i)
        all_numpy &= x_numpy and v_numpy
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"teacher {i}: indices must be integers, got {x.dtype}")
        if v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"teacher {i}: values must be float16/bfloat16/float32/float64, got {v.dtype}")
        if x.dim() != 2:
            raise InputError(f"indices must be 2-D (B, k), got shape {tuple(x.shape)}", teacher=i, argument="indices")
        if tuple(v.shape) != tuple(x.shape):
            raise InputError(
                f"values have shape {tuple(v.shape)} but indices {tuple(x.shape)}", teacher=i, argument="values"
            )
        if ids and x.shape[0] != ids[0].shape[0]:
            raise InputError(f"batch size {x.shape[0]} differs from teacher 0's {ids[0].shape[0]}", teacher=i)
        if v.device != x.device or (ids and x.device != ids[0].device):
            raise InputError(
                f"indices on {x.device} and values on {v.device}, teacher 0 on {ids[0].device if ids else x.device}",
                teacher=i,
            )
        if x.dtype not in ID_DTYPES:
            x = x.to(torch.int64)
        if torch.is_grad_enabled() and v.requires_grad:
            raise InputError(
                "values require grad, but estimate_topk does not differentiate soft labels with respect to the "
                "teachers' outputs (they are training targets): pass values.detach()",
                teacher=i,
            )
        ids.append(x)
        vals.append(v)
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1
    ):
        raise InputError("must be an int >= 1", argument="vocab_size", value=repr(vocab_size))
    if checked_maps is not None:
        maps = list(checked_maps)
    else:
        maps = _maps(vocab_maps, n, ids[0].device, None if vocab_size is None else int(vocab_size))
    if options.weights is None:
        weights = torch.ones(n, dtype=torch.float64)
    elif len(options.weights) != n:
        raise InputError(f"has {len(options.weights)} entries for {n} teachers", argument="weights")
    else:
        weights = torch.tensor(options.weights, dtype=torch.float64)
    return TopkBatch(
        ids,
        vals,
        options.kinds(n),
        maps,
        weights,
        options.alpha,
        None if vocab_size is None else int(vocab_size),
        options,
        all_numpy,
    )


def _maps(vocab_maps, n: int, device, vocab_size: int | None) -> list[torch.Tensor | None]:
    """The vocabulary maps as int64 tensors on ``device``, checked: ids >= -1, below ``vocab_size``,
    one-to-one on the ids they map."""
    if vocab_maps is None:
        return [None] * n
    if isinstance(vocab_maps, (torch.Tensor, np.ndarray)) or not isinstance(vocab_maps, Sequence):
        raise TypeError("vocab_maps must be a sequence of N entries (None or a 1-D integer array)")
    if len(vocab_maps) != n:
        raise InputError(f"has {len(vocab_maps)} entries for {n} teachers", argument="vocab_maps")
    maps = []
    for i, m in enumerate(vocab_maps):
        if m is None:
            maps.append(None)
            continue
        name = f"vocab_maps[{i}]"
        if isinstance(m, np.ndarray):
            if m.dtype.kind not in "iu":
                raise TypeError(f"{name}: must hold integers, got {m.dtype}")
            m = torch.from_numpy(m.astype(np.int64))
        elif isinstance(m, torch.Tensor):
            if m.dtype.is_floating_point or m.dtype.is_complex or m.dtype == torch.bool:
                raise TypeError(f"{name}: must hold integers, got {m.dtype}")
        else:
            m = torch.as_tensor(m, dtype=torch.int64)
        m = m.to(device=device, dtype=torch.int64).contiguous()
        if m.dim() != 1:
            raise InputError(f"must be 1-D (teacher id -> shared id), got shape {tuple(m.shape)}", argument=name)
        if m.numel():
            low = int(m.min())
            if low < -1:
                at = int(torch.nonzero(m < -1)[0])
                raise InputError(f"maps teacher id {at} to {low}; shared ids are >= 0, or -1 for none", argument=name)
            mapped = m[m >= 0]
            if vocab_size is not None and mapped.numel() and int(mapped.max()) >= vocab_size:
                at = int(torch.nonzero(m >= vocab_size)[0])
                raise InputError(
                    f"maps teacher id {at} to {int(m[at])}, out of range for vocab_size={vocab_size}", argument=name
                )
            if mapped.numel() > 1:
                values, counts = torch.unique(mapped, return_counts=True)
                if bool((counts > 1).any()):
                    shared = int(values[counts > 1][0])
                    twice = torch.nonzero(m == shared).flatten()[:2].tolist()
                    raise InputError(
                        f"maps teacher ids {twice[0]} and {twice[1]} to the same shared id {shared}; a map must be "
                        "one-to-one (merge such tokens' probabilities before calling)",
                        argument=name,
                    )
        maps.append(m)
    return maps


def check_error(batch: TopkBatch, teacher: int, check: str, row: int) -> InputError:
    """The error for teacher ``teacher``'s row ``row`` failing ``check`` (one of :data:`CHECKS`),
    its message naming what is wrong in that row."""
    kind = batch.kinds[teacher]
    raw = batch.ids[teacher][row].cpu().long()
    vals = batch.values[teacher][row].cpu().double()
    m = batch.maps[teacher]
    shared = raw.clone()
    if m is not None:
        inside = (raw >= 0) & (raw < m.numel())
        shared[inside] = m.cpu()[raw[inside]]
        listed = inside & (shared != -1)  # the slots that name a shared id
    else:
        listed = raw >= 0
    if check == "bad id":
        low = raw[raw < -1]
        if low.numel():
            return InputError(f"id {int(low[0])} is negative (-1 marks unused slots)", teacher=teacher, row=row)
        if m is not None and bool((raw >= m.numel()).any()):
            bad = int(raw[raw >= m.numel()][0])
            return InputError(
                f"id {bad} is out of range for vocab_maps[{teacher}] ({m.numel()} ids)", teacher=teacher, row=row
            )
        bad = int(shared[listed & (shared >= (batch.vocab_size or 0))][0])
        return InputError(f"id {bad} is out of range for vocab_size={batch.vocab_size}", teacher=teacher, row=row)
    if check == "duplicate":
        ids = shared[listed]
        unique, counts = torch.unique(ids, return_counts=True)
        twice = int(unique[counts > 1][0])
        via = f" (shared id, through vocab_maps[{teacher}])" if m is not None else ""
        return InputError(f"id {twice}{via} is listed twice", teacher=teacher, row=row)
    v = vals[listed]
    if check == "not finite":
        return InputError(
            "values contain NaN or Inf" if kind == "probs" else "values contain NaN or +Inf", teacher=teacher, row=row
        )
    if check == "out of range":
        if kind == "probs":
            return InputError(
                f"negative probability {float(v[v < 0][0]):g} (did you mean inputs='logprobs' or 'logits'?)",
                teacher=teacher,
                row=row,
            )
        return InputError(
            f"log-probability {float(v.max()):g} > 0 (did you mean inputs='logits'?)", teacher=teacher, row=row
        )
    if check == "no mass":
        what = "probabilities are zero" if kind == "probs" else "log-values are -inf"
        return InputError(f"all listed {what}", teacher=teacher, row=row)
    total = float(v.sum()) if kind == "probs" else float(torch.logsumexp(v, 0).exp())
    tolerance = SUM_TOLERANCE[batch.values[teacher].dtype]
    return InputError(
        f"listed probabilities sum to {total:.6g} > 1 (tolerance {tolerance:g}; did you mean inputs='logits'?)",
        teacher=teacher,
        row=row,
    )


def raise_first_failure(batch: TopkBatch, first_rows: torch.Tensor) -> None:
    """Raise the error of the first teacher with a failing row, its first check (in
    :data:`CHECKS` order) and that check's first row; ``first_rows`` ``(N, len(CHECKS))`` holds
    each teacher's first failing row per check (-1: none)."""
    first_rows = first_rows.cpu()
    failing = first_rows.ne(-1)
    if not bool(failing.any()):
        return
    teacher = int(torch.nonzero(failing.any(dim=1))[0])
    check = int(torch.nonzero(failing[teacher])[0])
    raise check_error(batch, teacher, CHECKS[check], int(first_rows[teacher, check]))


def empty_solution(batch: TopkBatch, width: int, method: str, device=None, fill: bool = True) -> TopkSolution:
    """Fresh output tensors for ``batch``: padding and zeros, or (``fill=False``, for a backend
    that writes every element) uninitialised; the error table always starts at -1."""
    b, dtype, device = batch.batch_size, batch.compute_dtype, device or batch.device
    new = (
        (lambda shape, dt, value: torch.full(shape, value, dtype=dt, device=device))
        if fill
        else (lambda shape, dt, value: torch.empty(shape, dtype=dt, device=device))
    )
    solution = TopkSolution(
        new((b, width), torch.int64, -1),
        new((b, width), dtype, 0),
        new((b,), torch.int32, 0),
        new((b,), torch.bool, False),
        new((b,), dtype, 0),
        torch.full((batch.num_teachers, len(CHECKS)), -1, dtype=torch.int64, device=device),
    )
    if method == "ce":
        solution.iterations = new((b,), torch.int32, 0)
        solution.converged = new((b,), torch.bool, False)
        solution.residual = new((b,), dtype, 0)
        solution.extra = {"step": new((b,), dtype, 0), "abs_residual": new((b,), dtype, 0)}
    return solution


def teacher_table(batch: TopkBatch) -> torch.Tensor:
    """The ``(N, 12)`` int64 table of csrc/core/topk.h's TopkTeacher rows."""
    rows = []
    for x, v, kind, m in zip(batch.ids, batch.values, batch.kinds, batch.maps, strict=True):
        rows.append(
            [
                x.data_ptr(),
                x.stride(0),
                x.stride(1),
                ID_DTYPES[x.dtype],
                x.shape[1],
                v.data_ptr(),
                v.stride(0),
                v.stride(1),
                DTYPE_CODES[v.dtype],
                KIND_CODES[kind],
                0 if m is None else m.data_ptr(),
                0 if m is None else m.numel(),
            ]
        )
    return torch.tensor(rows, dtype=torch.int64)
