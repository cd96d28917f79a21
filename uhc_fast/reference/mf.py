"""Matrix-factorisation methods: `mf-p` (probability space), `mf-lf` and `mf-lu` (logit space).

Teacher weights weight each teacher's squared residuals (default 1, as in the math notes).
"""

from __future__ import annotations

import torch

from ..inputs import PackedProblem, scatter_classes, segment_sum
from .ce import solve_ce
from .common import DEFAULT_MAX_ITER, Solution, backtrack, default_tol, masked_softmax, row_chunks


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
    """``min_{q in simplex, v >= 0} sum_i w_i sum_{l in L_i} (p_il - v_i q_l)^2``.

    For fixed ``v`` the optimal ``q_l = A_l / B_l`` (``A_l = sum_{i: l in L_i} w_i v_i p_il``,
    ``B_l = sum_{i: l in L_i} w_i v_i^2``) is a closed form, which leaves the N-dimensional problem
    ``f(v) = -sum_l A_l^2 / B_l`` (+ const), invariant to scaling v. We start from the `ce`
    estimate (exact on consistent teachers, so recovery costs no sweep) and take Newton steps on
    ``f`` with a backtracking line search; where the Hessian (gauge-fixed along v) is not positive
    definite, the step is an alternating-least-squares sweep instead, which always descends.
    The residual is ``max_i |df/dv_i| / sum_i w_i`` with q normalised to sum 1.
    """
    p, layout = problem.values, problem.layout
    tol = default_tol(p.dtype) if tol is None else tol
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    start = solve_ce(problem, tol=tol).soft
    soft = torch.zeros_like(start)
    iterations = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
    residual = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    for rows in row_chunks(p.shape[0], layout.num_teachers * layout.num_classes):
        soft[rows], iterations[rows], residual[rows] = _mf_p_newton(
            p[rows], start[rows], layout, problem.weights, tol, max_iter
        )
    return Solution(soft, iterations, residual)


def _mf_p_newton(p, q, layout, w, tol, max_iter):
    ci, ti = layout.class_index, layout.teacher_index
    batch, teachers, classes = p.shape[0], layout.num_teachers, layout.num_classes
    wt, total = w[ti], w.sum()
    tiny = torch.finfo(p.dtype).tiny
    dense_index = ti * classes + ci  # packed column -> position in a (N, K) matrix

    def fit(v):  # A_l, B_l for the optimal q given v
        vt = v[:, ti]
        return scatter_classes(wt * vt * p_a, layout), scatter_classes(wt * vt * vt, layout)

    def objective(v):
        a, b = fit(v)
        return -(a * a / b.clamp_min(tiny)).sum(dim=1)

    def v_of(q_packed):  # the v-half of an ALS sweep
        return segment_sum(p_a * q_packed, layout) / segment_sum(q_packed * q_packed, layout).clamp_min(tiny)

    p_a = p
    v = v_of(q[:, ci])
    iterations = torch.zeros(batch, dtype=torch.int32, device=p.device)
    residual = torch.zeros(batch, dtype=p.dtype, device=p.device)
    active = torch.arange(batch, device=p.device)
    for step in range(max_iter + 1):
        p_a, va = p[active], v[active]
        a, b = fit(va)
        qa = torch.where(b > 0, a / b.clamp_min(tiny), 0)
        scale = qa.sum(dim=1, keepdim=True)
        qa, va, b = qa / scale, va * scale, b * scale * scale
        qg, vt = qa[:, ci], va[:, ti]
        grad = -2 * w * segment_sum(qg * p_a - qg * qg * vt, layout)
        residual[active] = grad.abs().amax(dim=1) / total
        q[active], v[active] = qa, va
        keep = residual[active] > tol
        if step == max_iter or not bool(keep.any()):
            break
        active, p_a, qa, va, qg, vt, grad, b = (x[keep] for x in (active, p_a, qa, va, qg, vt, grad, b))

        # Hessian of f: 2 w_j sum_{L_j} q_l^2 on the diagonal minus
        # 2 w_j w_k sum_{l in L_j and L_k} e_jl e_kl / B_l, with e_il = p_il - 2 q_l v_i.
        e = p.new_zeros(active.numel(), teachers * classes)
        e[:, dense_index] = p_a - 2 * qg * vt
        e = e.view(-1, teachers, classes)
        hess = torch.diag_embed(2 * w * segment_sum(qg * qg, layout))
        hess = hess - 2 * w.unsqueeze(1) * w * ((e / b.clamp_min(tiny).unsqueeze(1)) @ e.transpose(1, 2))
        direction = va / va.norm(dim=1, keepdim=True)
        level = hess.diagonal(dim1=1, dim2=2).abs().mean(dim=1)
        hess = hess + level[:, None, None] * direction.unsqueeze(2) * direction.unsqueeze(1)  # gauge
        factor, failed = torch.linalg.cholesky_ex(hess)
        delta = torch.cholesky_solve(-grad.unsqueeze(2), factor).squeeze(2)
        delta = torch.where((failed != 0).unsqueeze(1), v_of(qg) - va, delta)

        floor = 1e-12 * va.amax(dim=1, keepdim=True)
        (v[active],) = backtrack(
            lambda step: ((va + step.unsqueeze(1) * delta).clamp_min(floor),),
            objective,
            objective(va),
            (grad * delta).sum(dim=1),
            (va,),
        )
        iterations[active] += 1
    return q, iterations, residual


# ---------------------------------------------------------------------- mf-lu
def solve_mf_lu(problem: PackedProblem, tol: float | None = None, max_iter: int | None = None) -> Solution:
    """``min_{u, c, v >= 0} sum_i w_i sum_{l in L_i} (z_il - v_i u_l - c_i)^2`` with the
    weighted mean ``sum_i w_i v_i / sum_i w_i = 1`` (plain ``mean(v) = 1`` for unit weights), by
    damped Gauss-Newton from the `mf-lf` solution (``v = 1``).

    The normal matrix's u-block is diagonal, so each step eliminates u and solves a 2N x 2N
    Schur complement in ``(c, v)``: ``O(sum_l d_l^2 + N^3)`` per sample, quadratic convergence on
    consistent teachers. A small Levenberg term handles the two gauge directions (scale and
    shift of u), a backtracking line search keeps every step a descent, and ``v`` stays ``>= 0``
    (a scale at its bound whose gradient points outward is held there for the step). The residual
    is the largest diagonally scaled gradient entry (a coordinate Newton step) after the gauge is
    reset: in logits for u and c, relative to ``1 + mean |z|``, and in v's own units.
    """
    z, layout = problem.values, problem.layout
    tol = default_tol(z.dtype) if tol is None else tol
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    u, c = _mf_lf(problem)
    soft = torch.zeros_like(u)
    iterations = torch.zeros(z.shape[0], dtype=torch.int32, device=z.device)
    residual = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for rows in row_chunks(z.shape[0], 4 * layout.num_teachers * layout.num_classes):
        u_rows, iterations[rows], residual[rows] = _mf_lu_gauss_newton(
            z[rows], u[rows], c[rows], layout, problem.weights, tol, max_iter
        )
        soft[rows] = masked_softmax(u_rows, layout.covered)
    return Solution(soft, iterations, residual)


def _mf_lu_gauss_newton(z, u, c, layout, w, tol, max_iter):
    ci, ti = layout.class_index, layout.teacher_index
    batch, teachers, classes = z.shape[0], layout.num_teachers, layout.num_classes
    wt, total = w[ti], w.sum()
    tiny, eps = torch.finfo(z.dtype).tiny, torch.finfo(z.dtype).eps
    covered = layout.covered
    v = torch.ones_like(c)
    dense_c = ti * classes + ci  # packed column -> position in the c rows of a (2N, K) matrix
    dense_v = dense_c + teachers * classes  # ... and in the v rows
    count = layout.mask_as(z.dtype).sum(dim=1)

    def objective(z_, u_, c_, v_):
        r = z_ - v_[:, ti] * u_[:, ci] - c_[:, ti]
        return (wt * r * r).sum(dim=1)

    iterations = torch.zeros(batch, dtype=torch.int32, device=z.device)
    residual = torch.zeros(batch, dtype=z.dtype, device=z.device)
    active = torch.arange(batch, device=z.device)
    for step in range(max_iter + 1):
        za, ua, ca, va = z[active], u[active], c[active], v[active]
        scale = ((va @ w) / total).clamp_min(tiny).unsqueeze(1)  # gauge: weighted mean(v) = 1
        va, ua = va / scale, ua * scale
        ug, vt = ua[:, ci], va[:, ti]
        r = za - vt * ug - ca[:, ti]
        # half the negative gradient of the objective, per block
        grad_u = scatter_classes(wt * vt * r, layout)
        grad_c = segment_sum(wt * r, layout)
        grad_v = segment_sum(wt * ug * r, layout)
        pinned = (va <= 0) & (grad_v <= 0)  # v at its bound, pushed outward: held there this step
        grad_v = torch.where(pinned, 0, grad_v)
        # J^T W J = [[A, X], [X^T, C]]: A diagonal over classes, C block-diagonal over teachers
        a = torch.where(covered, scatter_classes(wt * vt * vt, layout), 1)
        cc = (w * count).expand(za.shape[0], -1)
        cv = torch.where(pinned, 0, segment_sum(wt * ug, layout))
        vv = torch.where(pinned, 1, segment_sum(wt * ug * ug, layout))
        # residual: the largest diagonally scaled (coordinate Newton) step, u and c relative to the logits' scale
        logit_scale = 1 + za.abs().mean(dim=1)
        residual[active] = torch.stack(
            [
                (grad_u / a).abs().amax(dim=1) / logit_scale,
                (grad_c / cc).abs().amax(dim=1) / logit_scale,
                (grad_v / vv.clamp_min(tiny)).abs().amax(dim=1),
            ]
        ).amax(dim=0)
        u[active], v[active] = ua, va
        keep = residual[active] > tol
        if step == max_iter or not bool(keep.any()):
            break
        active, za, ua, ca, va, ug, vt, grad_u, grad_c, grad_v, pinned, a, cc, cv, vv = (
            x[keep] for x in (active, za, ua, ca, va, ug, vt, grad_u, grad_c, grad_v, pinned, a, cc, cv, vv)
        )
        b = active.numel()

        # Levenberg term: fixes the gauge directions, sized to the precision
        damping = 1e-2 * eps**0.5 * (cc.mean(dim=1, keepdim=True) + vv.mean(dim=1, keepdim=True))
        a = a + damping
        x = z.new_zeros(b, 2 * teachers * classes)
        x[:, dense_c] = wt * vt
        x[:, dense_v] = torch.where(pinned[:, ti], 0, wt * vt * ug)
        x = x.view(b, 2 * teachers, classes)
        schur = torch.diag_embed(torch.cat([cc, vv], dim=1) + damping)
        schur[:, :teachers, teachers:] += torch.diag_embed(cv)
        schur[:, teachers:, :teachers] += torch.diag_embed(cv)
        schur = schur - (x / a.unsqueeze(1)) @ x.transpose(1, 2)
        rhs = torch.cat([grad_c, grad_v], dim=1) - (x @ (grad_u / a).unsqueeze(2)).squeeze(2)
        step_cv, failed = torch.linalg.solve_ex(schur, rhs)
        step_cv = torch.where((failed != 0).unsqueeze(1), rhs / schur.diagonal(dim1=1, dim2=2), step_cv)
        step_u = (grad_u - (x.transpose(1, 2) @ step_cv.unsqueeze(2)).squeeze(2)) / a
        step_c, step_v = step_cv[:, :teachers], step_cv[:, teachers:]

        u[active], c[active], v[active] = backtrack(
            lambda step: (
                ua + step.unsqueeze(1) * step_u,
                ca + step.unsqueeze(1) * step_c,
                (va + step.unsqueeze(1) * step_v).clamp_min(0),
            ),
            lambda *cand: objective(za, *cand),
            objective(za, ua, ca, va),
            -2 * ((grad_u * step_u).sum(dim=1) + (grad_c * step_c).sum(dim=1) + (grad_v * step_v).sum(dim=1)),
            (ua, ca, va),
        )
        iterations[active] += 1
    return u, iterations, residual
