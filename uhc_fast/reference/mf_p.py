"""`mf-p`: rank-one factorisation of the teachers' probabilities.

``min_{q in simplex, v >= 0} sum_i w_i sum_{l in L_i} (p_il - v_i q_l)^2``. For fixed scales the
optimal ``q_l = A_l / B_l`` (``A_l = sum_{i covers l} w_i v_i p_il``, ``B_l = sum w_i v_i^2``) is a
closed form (then normalised; ``v`` absorbs the scale), which leaves a function of the N scales,
invariant to scaling them all: one scale is held, the heaviest teacher's (of those, the one with
the most classes, the first of them). A lighter teacher's held scale would leave the heaviest one's
curvature to a difference of the terms it dominates (with weights 1 and 1e-12 the compiled solver
stalled at a residual of 1e-4).

Solved by Newton steps in log scale (``v -> v exp(step)``: scales stay positive, and the optimum's
are) from the `ce` estimate, which is exact on consistent teachers; where the Hessian is not
positive definite the step is an alternating-least-squares sweep, which always descends. The
objective is evaluated as the sum of squares it is (not as ``-sum A^2 / B``, which cancels), and
the solver computes in float64 whatever the input dtype: the problem is bilinear and its Hessian's
smallest eigenvalues are below float32's resolution where teachers' weights differ by orders of
magnitude.

Convergence asks three things: the coordinate Newton steps in log scale are at most ``tol`` (the
reported ``residual``), the Hessian is positive definite (a minimum, not a saddle), and the Newton
step would change no soft label by more than ``tol`` (``step``).
"""

from __future__ import annotations

import torch

from ..constants import DEFAULT_MAX_ITER, MAX_LOG_STEP
from ..inputs import PackedProblem, Solution, scatter_classes, segment_sum
from .ce import solve_ce
from .common import backtrack, row_chunks


def solve_mf_p(problem: PackedProblem, tol: float, max_iter: int) -> Solution:
    p, layout = problem.values, problem.layout
    start = solve_ce(problem, tol, DEFAULT_MAX_ITER).soft
    batch = p.shape[0]
    soft = torch.zeros_like(start)
    iterations = torch.zeros(batch, dtype=torch.int32, device=p.device)
    residual, step = (torch.zeros(batch, dtype=problem.dtype, device=p.device) for _ in range(2))
    converged = torch.zeros(batch, dtype=torch.bool, device=p.device)
    weights = problem.weights.double()
    for rows in row_chunks(batch, 2 * layout.num_teachers * layout.num_classes):
        q, iterations[rows], residual[rows], step[rows], converged[rows] = _newton(
            p[rows].double(), start[rows].double(), layout, weights, tol, max_iter
        )
        soft[rows] = q
    return Solution(soft, iterations, residual, converged, {"step": step})


def _newton(p, q, layout, w, tol, max_iter):
    ci, ti = layout.class_index, layout.teacher_index
    batch, teachers, classes = p.shape[0], layout.num_teachers, layout.num_classes
    wt, tiny = w[ti], torch.finfo(p.dtype).tiny
    dense = ti * classes + ci  # packed column -> position in a (N, K) matrix
    count = layout.mask_as(p.dtype).sum(dim=1)
    held = torch.arange(teachers, device=p.device) == int(torch.argmax(torch.where(w == w.max(), count, -1)))

    def fit(p_, v_):
        """The optimal q for scales v (not normalised: ``v q`` fits p), and B_l at those scales."""
        vt = v_[:, ti]
        a, b = scatter_classes(wt * vt * p_, layout), scatter_classes(wt * vt * vt, layout)
        return torch.where(b > 0, a / b.clamp_min(tiny), 0), b

    def objective(p_, v_):
        fitted, _ = fit(p_, v_)
        r = p_ - v_[:, ti] * fitted[:, ci]
        return (wt * r * r).sum(dim=1)

    qg = q[:, ci]
    v = segment_sum(p * qg, layout) / segment_sum(qg * qg, layout).clamp_min(tiny)  # ALS's v for the ce start
    iterations = torch.zeros(batch, dtype=torch.int32, device=p.device)
    residual, predicted = torch.zeros_like(p[:, 0]), torch.zeros_like(p[:, 0])
    converged = torch.zeros(batch, dtype=torch.bool, device=p.device)
    active = torch.arange(batch, device=p.device)
    for iteration in range(max_iter + 1):
        pa, va = p[active], v[active]
        b = active.numel()
        qa, bl = fit(pa, va)
        total = qa.sum(dim=1, keepdim=True)
        qg = qa[:, ci]
        grad = w * segment_sum(qg * (pa - va[:, ti] * qg), layout)  # half the negative gradient in v
        # Hessian (halved) in v: diag(w sum q^2) - sum_l (w e_l)(w e_l)^T / B_l, e_il = p_il - 2 q_l v_i
        e = p.new_zeros(b, teachers * classes)
        e[:, dense] = wt * (pa - 2 * qg * va[:, ti])
        e = e.view(b, teachers, classes)
        hess = torch.diag_embed(w * segment_sum(qg * qg, layout)) - (e / bl.clamp_min(tiny).unsqueeze(1)) @ e.transpose(
            1, 2
        )
        # in log scale
        grad_s = va * grad
        hess_s = va.unsqueeze(2) * hess * va.unsqueeze(1) - torch.diag_embed(grad_s)
        grad_s = torch.where(held, 0, grad_s)
        hess_s = torch.where(
            held.unsqueeze(1) | held.unsqueeze(0), torch.diag_embed(held.to(p.dtype)).expand(b, -1, -1), hess_s
        )
        residual[active] = (grad_s / hess_s.diagonal(dim1=1, dim2=2).abs().clamp_min(tiny)).abs().amax(dim=1)
        factor, failed = torch.linalg.cholesky_ex(hess_s)
        newton = torch.cholesky_solve(grad_s.unsqueeze(2), factor).squeeze(2)
        exact = (failed == 0) & torch.isfinite(newton).all(dim=1)
        # where not positive definite: the v-half of an ALS sweep, as a log step
        als = segment_sum(pa * qg, layout) / segment_sum(qg * qg, layout).clamp_min(tiny)
        step_s = torch.where(exact.unsqueeze(1), newton, torch.log(als.clamp_min(tiny) / va))
        step_s = torch.where(held, 0, step_s)
        step_s = step_s * (MAX_LOG_STEP / step_s.abs().amax(dim=1, keepdim=True).clamp_min(MAX_LOG_STEP))
        # the step's first-order change of the normalised soft labels
        dv = va * step_s
        moved = scatter_classes(wt * (pa - 2 * qg * va[:, ti]) * dv[:, ti], layout) / bl.clamp_min(tiny) / total
        moved = torch.where(bl > 0, moved, 0)
        predicted[active] = (moved - qa / total * moved.sum(dim=1, keepdim=True)).abs().amax(dim=1)
        done = (residual[active] <= tol) & (predicted[active] <= tol) & exact
        converged[active] = done
        if iteration == max_iter:
            break
        slope = -2 * (grad_s * step_s).sum(dim=1)
        searching = (slope < 0) & ~done
        (v[active],), accepted = backtrack(
            lambda t: (va * torch.exp(t.unsqueeze(1) * step_s),),
            lambda cand: objective(pa, cand),
            objective(pa, va),
            slope,
            (va,),
            full_only=done,
            frozen=~(searching | done),
        )
        iterations[active] += (searching & accepted).int()
        active = active[searching & accepted]
        if active.numel() == 0:
            break
    q, _ = fit(p, v)
    return q / q.sum(dim=1, keepdim=True), iterations, residual, predicted, converged
