"""`uhc_fast.estimate`: teacher outputs over their own class sets -> soft labels over the union."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends
from .constants import DEFAULT_EPS
from .errors import InputError
from .inputs import Batch, Solution, convert
from .options import Options
from .problem import TeacherSet, as_teacher_set


def estimate(
    outputs: Sequence,
    class_sets: Sequence[Sequence] | TeacherSet,
    method: str = "ce",
    *,
    inputs: str | Sequence[str] = "probs",
    num_classes: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    return_info: bool = False,
):
    """Estimate soft labels over the union of the teachers' classes.

    Args:
        outputs: N arrays, teacher ``i`` shaped ``(B, |L_i|)`` with columns in the order of
            ``class_sets[i]``: torch tensors (one device; float16/bfloat16/float32/float64) or
            numpy arrays.
        class_sets: N sequences of class indices or names, or a :class:`TeacherSet`.
        method: ``"sd"``, ``"ce"``, ``"mf-p"``, ``"mf-lf"`` or ``"mf-lu"`` (see the README).
        inputs: ``"probs"`` (rows sum to 1) or ``"logits"``, or one of those per teacher.
        num_classes: K, declaring classes no teacher covers (they get zero mass).
        weights: ``(N,)`` positive per-teacher weights (default 1).
        temperature: teacher logits (or log-probabilities) are divided by it before use.
        alpha: weight of a uniform pseudo-teacher over all covered classes. Default: 0 when the
            class-overlap graph is connected, else 0.01 with a warning naming the components.
        tol: convergence threshold of the iterative methods (default 1e-9 in float64, 1e-5 in
            float32 computation). A row is ``converged`` when its method's scale-free optimality
            residual and the correction its next Newton step would make to the soft labels are
            both at most ``tol``: its soft labels are then within about ``tol`` of the optimum.
        max_iter: iteration cap: Newton (`ce`, `mf-p`, `mf-lu`) steps, default 100.
        eps: probabilities are clamped to ``eps`` before taking logs (logit-space methods).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        return_info: also return a dict of diagnostics.

    Returns:
        ``(B, K)`` soft labels, rows summing to 1: a tensor on the inputs' device (float64 if any
        input is float64, else float32), or a numpy array when every input was numpy. With
        ``return_info``, ``(soft, info)``; ``info`` names the ``method`` and the ``backend`` that
        ran, and for iterative methods holds per-sample ``iterations``, ``residual`` and
        ``converged`` (and method-specific diagnostics).
    """
    options = Options(
        method=method,
        inputs=inputs,
        weights=weights,
        temperature=temperature,
        alpha=alpha,
        tol=tol,
        max_iter=max_iter,
        eps=eps,
        backend=backend,
    )
    batch = convert(outputs, as_teacher_set(class_sets, num_classes), options)
    solution = solve(batch)
    soft = solution.soft.cpu().numpy() if batch.numpy_out else solution.soft
    return (soft, diagnostics(batch, solution)) if return_info else soft


def solve(batch: Batch) -> Solution:
    """Run ``batch`` on the backend its options choose for its device and method."""
    spec = batch.options.spec
    chosen = backends.select(batch.options.backend, batch.device, spec.name)
    if torch.is_grad_enabled() and any(x.requires_grad for x in batch.tensors):
        teacher = next(i for i, x in enumerate(batch.tensors) if x.requires_grad)
        raise InputError(
            "outputs require grad, but estimate does not differentiate soft labels with respect to the "
            "teachers' outputs (they are training targets): pass outputs.detach(), or train through "
            "uhc_fast.UHCLoss",
            teacher=teacher,
        )
    return chosen.solve(batch, spec)


def diagnostics(batch: Batch, solution: Solution) -> dict:
    """The ``info`` dict of :func:`estimate`."""
    options, teachers = batch.options, batch.teachers
    details = {
        "method": options.method,
        "backend": solution.backend,
        "alpha": batch.alpha,
        "uncovered_classes": list(teachers.uncovered),
        "components": len(teachers.components),
    }
    if options.spec.iterative:
        details.update(convergence(options, solution))
    return details


def convergence(options: Options, solution) -> dict:
    """The ``info`` entries of an iterative solve (:func:`estimate`, :func:`uhc_fast.estimate_topk`):
    the tolerance it used, per-sample iterations, residual and converged, and the method's extras."""
    return {
        "tol": options.tol_for(solution.soft.dtype),
        "iterations": solution.iterations,
        "residual": solution.residual,
        "converged": solution.converged,
        **(solution.extra or {}),
    }
