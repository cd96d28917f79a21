"""The training-loop side: the direct CE loss on student logits, and distillation on soft labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import dispatch
from .inputs import PackedProblem, pack, segment_logsumexp
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


def direct_ce_loss(student_logits: torch.Tensor, problem: PackedProblem) -> torch.Tensor:
    """Reference per-sample loss ``sum_i w_i [logsumexp_{L_i} u - sum_{l in L_i} p_il u_l]``, ``(B,)``.

    Its gradient is ``sum_{i: l in L_i} w_i (softmax_{L_i}(u)_l - p_il)``, by autograd.
    """
    layout, w = problem.layout, problem.weights
    packed = student_logits[:, layout.class_index]
    lse = segment_logsumexp(packed, layout)
    return lse @ w - (packed * problem.values * w[layout.teacher_index]).sum(dim=1)


class UHCLoss(nn.Module):
    """The direct `ce` loss: train a student over all K classes on heterogeneous teachers.

    ``loss_fn(student_logits, outputs)`` with ``student_logits`` of shape ``(B, K)`` and
    ``outputs`` as for :func:`uhc_fast.estimate` (N arrays shaped ``(B, |L_i|)``). Minimising it
    over free logits gives ``softmax(u) = estimate(outputs, class_sets, method="ce")``.

    Args:
        class_sets: N class sets (indices or names) or a :class:`TeacherSet`.
        num_classes: K, declaring uncovered classes.
        weights: per-teacher weights (default 1).
        inputs: ``"probs"`` or ``"logits"``: what the teachers' outputs are.
        temperature: T; teacher logits and student logits are both divided by T and the loss is
            multiplied by ``T**2`` (Hinton's convention, keeping gradient scale independent of T).
        alpha: weight of a uniform pseudo-teacher over covered classes (default 0).
        reduction: ``"mean"`` over samples (default), ``"sum"``, or ``"none"`` for ``(B,)``.
        backend: as for :func:`uhc_fast.estimate`; backends without a fused loss use the
            reference.
    """

    def __init__(
        self,
        class_sets: Sequence[Sequence] | TeacherSet,
        *,
        num_classes: int | None = None,
        weights=None,
        inputs: str = "probs",
        temperature: float = 1.0,
        alpha: float = 0.0,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.teachers = as_teacher_set(class_sets, num_classes)
        self.weights = weights
        self.inputs = inputs
        self.temperature = float(temperature)
        self.alpha = alpha
        self.reduction = _check_reduction(reduction)
        dispatch.check_backend_name(backend)
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, outputs: Sequence) -> torch.Tensor:
        k = self.teachers.num_classes
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(f"student_logits must be a torch tensor, got {type(student_logits).__name__}")
        if student_logits.dim() != 2 or student_logits.shape[1] != k:
            raise ValueError(f"student_logits must be (B, {k}), got shape {tuple(student_logits.shape)}")
        if not student_logits.is_floating_point():
            raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
        problem, converted = pack(
            outputs,
            self.teachers,
            inputs=self.inputs,
            value_kind="probs",
            weights=self.weights,
            temperature=self.temperature,
            alpha=self.alpha,
        )
        if converted.batch_size != student_logits.shape[0]:
            raise ValueError(
                f"student_logits has {student_logits.shape[0]} rows but the teachers' outputs have "
                f"{converted.batch_size}"
            )
        if converted.device != student_logits.device:
            raise ValueError(f"student_logits are on {student_logits.device}, teacher outputs on {converted.device}")
        logits = student_logits / self.temperature if self.temperature != 1.0 else student_logits
        chosen = dispatch.select(self.backend, logits.device, need_loss=True)
        loss = chosen.loss if chosen.loss is not None else direct_ce_loss
        dtype = torch.promote_types(logits.dtype, problem.values.dtype)
        per_sample = loss(logits.to(dtype), problem) * self.temperature**2
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
    class weights ``(K,)``.
    """
    _check_reduction(reduction)
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
