"""The training-loop side: the direct CE loss on student logits, and distillation on soft labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import backends
from .inputs import convert, pack
from .options import Options
from .problem import TeacherSet, as_teacher_set

REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    return reduction


class UHCLoss(nn.Module):
    """The direct `ce` loss: train a student over all K classes on heterogeneous teachers.

    ``loss_fn(student_logits, outputs)`` with ``student_logits`` of shape ``(B, K)`` and
    ``outputs`` as for :func:`uhc_fast.estimate` (N arrays shaped ``(B, |L_i|)``). Minimising it
    over free logits gives ``softmax(u / T) = estimate(outputs, class_sets, method="ce",
    temperature=T)`` (``softmax(u)`` at the default ``T = 1``).

    Args:
        class_sets: N class sets (indices or names) or a :class:`TeacherSet`.
        num_classes: K, declaring uncovered classes.
        weights: per-teacher weights (default 1).
        inputs: ``"probs"`` or ``"logits"``: what the teachers' outputs are.
        temperature: T; teacher logits and student logits are both divided by T and the loss is
            multiplied by ``T**2`` (Hinton's convention, keeping gradient scale independent of T).
        alpha: weight of a uniform pseudo-teacher over covered classes; the same default as
            :func:`uhc_fast.estimate` (0 on a connected class-overlap graph, else 0.01 with a
            warning), so that the loss's minimiser is ``estimate``'s `ce` soft labels.
        reduction: ``"mean"`` over samples (default), ``"sum"``, or ``"none"`` for ``(B,)``.
        backend: as for :func:`uhc_fast.estimate`. The Triton backend runs a fused kernel; the
            others run the torch reference (:func:`uhc_fast.reference.direct_ce_loss`).
    """

    def __init__(
        self,
        class_sets: Sequence[Sequence] | TeacherSet,
        *,
        num_classes: int | None = None,
        weights=None,
        inputs: str = "probs",
        temperature: float = 1.0,
        alpha: float | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.teachers = as_teacher_set(class_sets, num_classes)
        self.options = Options(
            method="ce",
            inputs=inputs,
            weights=weights,
            temperature=temperature,
            alpha=alpha,
            backend=backend,
        )
        self.temperature = self.options.temperature
        self.reduction = _check_reduction(reduction)

    def forward(self, student_logits: torch.Tensor, outputs: Sequence) -> torch.Tensor:
        k = self.teachers.num_classes
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(f"student_logits must be a torch tensor, got {type(student_logits).__name__}")
        if student_logits.dim() != 2 or student_logits.shape[1] != k:
            raise ValueError(f"student_logits must be (B, {k}), got shape {tuple(student_logits.shape)}")
        if not student_logits.is_floating_point():
            raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
        batch = convert(outputs, self.teachers, self.options)
        if batch.batch_size != student_logits.shape[0]:
            raise ValueError(
                f"student_logits has {student_logits.shape[0]} rows but the teachers' outputs have {batch.batch_size}"
            )
        if batch.device != student_logits.device:
            raise ValueError(f"student_logits are on {student_logits.device}, teacher outputs on {batch.device}")
        problem = pack(batch, "probs")
        logits = student_logits / self.temperature if self.temperature != 1.0 else student_logits
        chosen = backends.select(self.options.backend, logits.device)
        per_sample = chosen.loss(logits, problem) * self.temperature**2
        return _reduce(per_sample, self.reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    soft_labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the student against soft labels, optionally class-weighted.

    ``-T**2 sum_l c_l q_l log softmax(u / T)_l`` per sample, with ``c`` from
    :func:`class_balance_weights` (or all ones). Shapes: logits and soft labels ``(B, K)``,
    class weights ``(K,)``. Sparse targets, as :func:`uhc_fast.estimate_topk` returns them, are
    the pair ``soft_labels=(ids, soft)``: ``(B, M)`` class ids (``-1`` padding) and their soft
    labels; the sum then runs over each row's listed ids (the softmax over all K classes).
    """
    _check_reduction(reduction)
    if isinstance(soft_labels, tuple):
        return _sparse_distillation_loss(student_logits, *soft_labels, class_weights, temperature, reduction)
    if isinstance(soft_labels, np.ndarray):
        soft_labels = torch.from_numpy(soft_labels)
    soft_labels = soft_labels.to(device=student_logits.device, dtype=student_logits.dtype)
    if soft_labels.shape != student_logits.shape:
        raise ValueError(
            f"soft_labels shape {tuple(soft_labels.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )
    log_q = torch.log_softmax(student_logits / temperature, dim=1)
    target = soft_labels
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=student_logits.dtype, device=student_logits.device)
        if class_weights.shape != (student_logits.shape[1],):
            raise ValueError(f"class_weights must be ({student_logits.shape[1]},), got {tuple(class_weights.shape)}")
        target = target * class_weights
    per_sample = -(target * log_q).sum(dim=1) * temperature**2
    return _reduce(per_sample, reduction)


def _sparse_distillation_loss(student_logits, ids, soft, class_weights, temperature, reduction):
    """:func:`distillation_loss` on ``(B, M)`` ids (-1: padding) and their soft labels."""
    ids = torch.from_numpy(ids) if isinstance(ids, np.ndarray) else ids
    soft = torch.from_numpy(soft) if isinstance(soft, np.ndarray) else soft
    ids = ids.to(device=student_logits.device, dtype=torch.int64)
    soft = soft.to(device=student_logits.device, dtype=student_logits.dtype)
    batch, classes = student_logits.shape
    if ids.shape != soft.shape or ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(
            f"sparse targets must be (ids, soft) of one shape (B={batch}, M), "
            f"got {tuple(ids.shape)} and {tuple(soft.shape)}"
        )
    listed = ids >= 0
    if bool((ids >= classes).any()):
        raise ValueError(f"target ids must be below the student's {classes} classes, got {int(ids.max())}")
    log_q = torch.log_softmax(student_logits / temperature, dim=1).gather(1, ids.clamp_min(0))
    target = torch.where(listed, soft, 0)
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=student_logits.dtype, device=student_logits.device)
        if class_weights.shape != (classes,):
            raise ValueError(f"class_weights must be ({classes},), got {tuple(class_weights.shape)}")
        target = target * class_weights[ids.clamp_min(0)]
    per_sample = -(target * log_q).sum(dim=1) * temperature**2
    return _reduce(per_sample, reduction)


def class_balance_weights(soft_labels, eps: float = 0.0):
    """Per-class weights inversely proportional to each class's mean soft label, mean 1.

    Args:
        soft_labels: ``(B, K)`` soft labels over the whole unlabelled set (tensor or numpy).
        eps: added to each mean before inverting (softens extreme weights).

    Returns:
        ``(K,)`` weights, same type as the input. Classes with zero mass everywhere (uncovered
        classes) get weight 0; the others average to 1.
    """
    as_numpy = isinstance(soft_labels, np.ndarray)
    q = torch.as_tensor(soft_labels)
    if q.dim() != 2 or q.shape[0] == 0:
        raise ValueError(f"soft_labels must be (B, K) with B > 0, got shape {tuple(q.shape)}")
    mean = q.double().mean(dim=0)
    present = mean > 0
    weights = torch.where(present, 1.0 / (mean + eps).clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    weights = weights * present.sum() / weights.sum()
    weights = weights.to(q.dtype if q.is_floating_point() else torch.float32)
    return weights.numpy() if as_numpy else weights
