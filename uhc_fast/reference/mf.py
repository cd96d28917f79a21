"""Matrix-factorisation methods: `mf-p` (probability space), `mf-lf` and `mf-lu` (logit space).

Teacher weights weight each teacher's squared residuals (default 1, as in the math notes).
"""

from __future__ import annotations

import torch

from ..inputs import PackedProblem, scatter_classes, segment_sum
from .common import Solution, default_tol, evidence, masked_softmax, normalise

DEFAULT_MAX_ITER = 1000


# ---------------------------------------------------------------------- mf-lf
def mf_lf_system(problem: PackedProblem) -> torch.Tensor:
    """The ``(N, N)`` matrix ``G^+`` with ``c = b @ G^+.T`` solving the eliminated normal equations.

    Eliminating ``u`` from ``min sum_i w_i sum_{l in L_i} (z_il - u_l - c_i)^2`` leaves
    ``G c = b`` with ``G = diag(|L_i|) - M diag(1/W) M^T diag(w)``, ``W_l = sum_{i: l in L_i} w_i``
    and ``b_i = sum_{l in L_i} (z_il - zbar_l)``. G depends on the mask and weights only and is
    singular only by the common shift of c (which softmax ignores); computed in float64.
    """
    layout, w = problem.layout, problem.weights.double()
    mask = layout.mask_as(torch.float64)
    class_weight = (w @ mask).clamp_min(torch.finfo(torch.float64).tiny)
    g = torch.diag(mask.sum(dim=1)) - (mask / class_weight) @ mask.T * w
    return torch.linalg.pinv(g).to(problem.values.dtype)


def _mf_lf(problem: PackedProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, c)`` minimising the fixed-scale logit objective; O(nnz + N^2) per sample."""
    z, layout, w = problem.values, problem.layout, problem.weights
    wt = w[layout.teacher_index]
    class_weight = w @ layout.mask_as(z.dtype)
    safe = torch.where(layout.covered, class_weight, 1)
    zbar = scatter_classes(wt * z, layout) / safe
    b = segment_sum(z - zbar[:, layout.class_index], layout)
    c = b @ mf_lf_system(problem).T
    u = zbar - scatter_classes(wt * c[:, layout.teacher_index], layout) / safe
    return u, c


def solve_mf_lf(problem: PackedProblem, tol: float | None = None, max_iter: int | None = None) -> Solution:
    """Closed form: one linear solve whose matrix depends on the mask alone."""
    u, _ = _mf_lf(problem)
    return Solution(masked_softmax(u, problem.layout.covered))


# ---------------------------------------------------------------------- mf-p
def solve_mf_p(problem: PackedProblem, tol: float | None = None, max_iter: int | None = None) -> Solution:
    """``min_{q in simplex, v >= 0} sum_i w_i sum_{l in L_i} (p_il - v_i q_l)^2`` by alternating
    least squares from the `sd` estimate.

    Both half-steps are closed forms (``v_i = <p_i, q_Li> / |q_Li|^2``; ``q_l`` the weighted
    regression of ``p_il`` on ``v_i``), each non-negative when p is. The residual is the largest
    gradient entry in q at ``v = v(q)``, divided by the total weight.
    """
    p, layout, w = problem.values, problem.layout, problem.weights
    tol = default_tol(p.dtype) if tol is None else tol
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    wt = w[layout.teacher_index]
    total = w.sum()
    q = normalise(evidence(problem))
    iterations = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
    residual = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    active = torch.arange(p.shape[0], device=p.device)
    for step in range(max_iter + 1):
        pa, qa = p[active], q[active]
        qg = qa[:, layout.class_index]
        v = segment_sum(pa * qg, layout) / segment_sum(qg * qg, layout).clamp_min(torch.finfo(p.dtype).tiny)
        vt = v[:, layout.teacher_index]
        num = scatter_classes(wt * vt * pa, layout)
        den = scatter_classes(wt * vt * vt, layout)
        grad = num - den * qa
        residual[active] = grad.abs().amax(dim=1) / total
        keep = residual[active] > tol
        if step == max_iter or not bool(keep.any()):
            break
        update = torch.where(den > 0, num / den.clamp_min(torch.finfo(p.dtype).tiny), 0)
        q[active] = torch.where(keep.unsqueeze(1), normalise(update), qa)
        iterations[active[keep]] += 1
        active = active[keep]
    return Solution(q, iterations, residual)


# ---------------------------------------------------------------------- mf-lu
def solve_mf_lu(problem: PackedProblem, tol: float | None = None, max_iter: int | None = None) -> Solution:
    """``min_{u, c, v >= 0} sum_i w_i sum_{l in L_i} (z_il - v_i u_l - c_i)^2`` with ``mean(v) = 1``,
    by block coordinate descent from the `mf-lf` solution (``v = 1``).

    Each sweep fits every teacher's ``(v_i, c_i)`` as a 1-D regression of its logits on ``u``, then
    ``u`` as a weighted regression on ``v``; a teacher with one class (no slope to fit) keeps its
    scale. The residual is the largest projected gradient entry in ``(v, c)`` after the ``u`` step
    (where the ``u`` gradient is zero), divided by the total weight.
    """
    z, layout, w = problem.values, problem.layout, problem.weights
    tol = default_tol(z.dtype) if tol is None else tol
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    ci, ti = layout.class_index, layout.teacher_index
    wt = w[ti]
    total = w.sum()
    tiny = torch.finfo(z.dtype).tiny
    count = layout.mask_as(z.dtype).sum(dim=1)
    zmean = segment_sum(z, layout) / count
    u, c = _mf_lf(problem)
    v = torch.ones_like(c)
    iterations = torch.zeros(z.shape[0], dtype=torch.int32, device=z.device)
    residual = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    active = torch.arange(z.shape[0], device=z.device)
    for step in range(max_iter + 1):
        za, ua, va = z[active], u[active], v[active]
        # (v, c): per-teacher regression of z_i on u_{L_i}
        ug = ua[:, ci]
        umean = segment_sum(ug, layout) / count
        spread = segment_sum(ug * ug, layout) / count - umean * umean
        cov = segment_sum(ug * za, layout) / count - umean * zmean[active]
        fit = spread > 64 * torch.finfo(z.dtype).eps * (umean * umean + 1)
        va = torch.where(fit, (cov / spread.clamp_min(tiny)).clamp_min(0), va)
        ca = zmean[active] - va * umean
        # u: weighted regression of z_il - c_i on v_i
        vt = va[:, ti]
        num = scatter_classes(wt * vt * (za - ca[:, ti]), layout)
        den = scatter_classes(wt * vt * vt, layout)
        ua = torch.where(den > tiny, num / den.clamp_min(tiny), ua)
        # gauge: mean(v) = 1 (v u and c are unchanged)
        scale = va.mean(dim=1, keepdim=True).clamp_min(tiny)
        va, ua = va / scale, ua * scale
        res = za - va[:, ti] * ua[:, ci] - ca[:, ti]
        grad_c = segment_sum(wt * res, layout)
        grad_v = segment_sum(wt * res * ua[:, ci], layout)
        grad_v = torch.where((va <= 0) & (grad_v < 0), 0, grad_v)  # v at its bound, pushed outward
        residual[active] = torch.maximum(grad_c.abs().amax(dim=1), grad_v.abs().amax(dim=1)) / total
        u[active], v[active] = ua, va
        iterations[active] += 1
        keep = residual[active] > tol
        if step == max_iter or not bool(keep.any()):
            break
        active = active[keep]
    return Solution(masked_softmax(u, layout.covered), iterations, residual)
