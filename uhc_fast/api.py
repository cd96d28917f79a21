"""`uhc_fast.estimate`: teacher outputs over their own class sets -> soft labels over the union."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from .inputs import pack
from .problem import TeacherSet, as_teacher_set
from .reference.common import default_tol

# method -> the value kind it works on
METHODS = {"sd": "probs", "ce": "probs", "mf-p": "probs", "mf-lf": "logits", "mf-lu": "logits"}
ITERATIVE = ("ce", "mf-p", "mf-lu")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {tuple(METHODS)}")
    return method


def estimate(
    outputs: Sequence,
    class_sets: Sequence[Sequence] | TeacherSet,
    method: str = "ce",
    *,
    inputs: str = "probs",
    num_classes: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    eps: float = 1e-12,
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
        inputs: ``"probs"`` (rows sum to 1) or ``"logits"``.
        num_classes: K, declaring classes no teacher covers (they get zero mass).
        weights: ``(N,)`` positive per-teacher weights (default 1).
        temperature: teacher logits (or log-probabilities) are divided by it before use.
        alpha: weight of a uniform pseudo-teacher over all covered classes. Default: 0 when the
            class-overlap graph is connected, else 0.01 with a warning naming the components.
        tol: convergence threshold of the iterative methods' residual (default 1e-9 in float64,
            1e-5 in float32 computation).
        max_iter: iteration cap: Newton (`ce`, `mf-p`) or Gauss-Newton (`mf-lu`) steps, default 100.
        eps: probabilities are clamped to ``eps`` before taking logs (logit-space methods).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        return_info: also return a dict of diagnostics.

    Returns:
        ``(B, K)`` soft labels, rows summing to 1: a tensor on the inputs' device (float64 if any
        input is float64, else float32), or a numpy array when every input was numpy. With
        ``return_info``, ``(soft, info)``; for iterative methods ``info`` holds per-sample
        ``iterations``, ``residual`` and ``converged``.
    """
    check_method(method)
    dispatch.check_backend_name(backend)
    if tol is not None and not (tol > 0):
        raise ValueError(f"tol={tol}: must be > 0")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 0):
        raise ValueError(f"max_iter={max_iter!r}: must be an int >= 0")
    teachers = as_teacher_set(class_sets, num_classes)
    problem, converted = pack(
        outputs,
        teachers,
        inputs=inputs,
        value_kind=METHODS[method],
        weights=weights,
        temperature=temperature,
        alpha=alpha,
        eps=eps,
    )
    chosen = dispatch.select(backend, converted.device, method)
    tol = default_tol(converted.compute_dtype) if tol is None else float(tol)
    solution = chosen.solvers[method](problem, tol, max_iter)
    soft = solution.soft
    if converted.numpy_out:
        soft = soft.cpu().numpy()
    if not return_info:
        return soft
    details = {
        "method": method,
        "backend": chosen.name,
        "alpha": float(problem.weights[-1]) if problem.teachers is not teachers else 0.0,
        "uncovered_classes": list(teachers.uncovered),
        "components": len(teachers.components),
    }
    if method in ITERATIVE:
        details.update(
            tol=tol,
            iterations=solution.iterations,
            residual=solution.residual,
            converged=solution.residual <= tol,
        )
    return soft, details
