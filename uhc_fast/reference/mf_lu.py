"""`mf-lu`: logit space with an unknown scale per teacher.

``min_{u, c, v} sum_i w_i sum_{l in L_i} (z_il - v_i u_l - c_i)^2`` over scales
``v_i >= MIN_SCALE``, reported at the scale where the teachers' weighted mean ``v`` is 1 (the
objective is invariant to ``u -> a u, v -> v / a``, but the soft labels ``softmax(u)`` are not:
this choice sets their temperature to the teachers' average).

Solved by variable projection: for fixed scales the problem is linear least squares in ``(u, c)``
(:func:`project`, mf-lf's closed form with a scaled design), which leaves a function of the N
scales alone. Newton steps on it in log scale (from ``v = 1``, where the projection is the `mf-lf`
answer; multiplicative steps keep scales positive and move temperatures by factors, not by
increments that overshoot through zero) eliminate u (its Hessian block is diagonal) and then c
from the exact Hessian; where that is not positive definite (far from a minimum) the step is
Gauss-Newton's. Re-solving ``(u, c)`` exactly after every step, instead of moving them along the
linearisation, keeps the iteration fast where the scales must travel far (teachers at very
different temperatures, linked through a teacher of small weight).

The invariances are removed by holding variables rather than by damping: the last teacher's shift
(the common shift of u), and one *anchor* scale per group of teachers whose scales the data fix
relative to each other (:attr:`uhc_fast.TeacherSet.scale_components`; more than one group draws an
:class:`~uhc_fast.UnidentifiableScalesWarning`). A scale at its bound whose gradient points outward
is held too, for that step.

Convergence asks three things: the scaled gradient in the free scales (a coordinate Newton step,
in v's own units) is at most ``tol`` (the reported ``residual``), the Newton system is positive
definite (a minimum, not a saddle), and the Newton step would change no soft label by more than
``tol`` (``step``).
"""

from __future__ import annotations

import torch

from ..constants import MAX_LOG_STEP, MIN_SCALE
from ..inputs import PackedProblem, Solution, scatter_classes, segment_sum
from ..linalg import grounded_laplacian_solve
from .common import backtrack, full_precision, masked_gram, masked_softmax, row_chunks, teacher_pairs


def solve_mf_lu(problem: PackedProblem, tol: float, max_iter: int) -> Solution:
    z, layout = problem.values, problem.layout
    batch = z.shape[0]
    soft = torch.zeros(batch, layout.num_classes, dtype=problem.dtype, device=z.device)
    iterations = torch.zeros(batch, dtype=torch.int32, device=z.device)
    residual, step = (torch.zeros(batch, dtype=problem.dtype, device=z.device) for _ in range(2))
    converged = torch.zeros(batch, dtype=torch.bool, device=z.device)
    pairs = teacher_pairs(layout.mask_as(z.dtype))
    for rows in row_chunks(batch, 4 * layout.num_teachers * layout.num_classes):
        u, iterations[rows], residual[rows], step[rows], converged[rows] = _newton(
            z[rows], problem, pairs, tol, max_iter
        )
        soft[rows] = masked_softmax(u, layout.covered)
    return Solution(soft, iterations, residual, converged, {"step": step})


def project(z: torch.Tensor, v: torch.Tensor, problem: PackedProblem, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, c)`` minimising the objective for scales ``v`` ``(B, N)``, with the last teacher's shift 0.

    Eliminating ``u_l = (sum_i w_i v_i (z_il - c_i)) / a_l`` (``a_l = sum_{i covers l} w_i v_i^2``)
    leaves a system in c whose matrix, written in ``c_i = v_i ct_i``, is the weighted graph
    Laplacian of the teachers with links ``w_i v_i^2 w_j v_j^2 sum_{l in L_i and L_j} 1 / a_l``;
    grounding the last teacher fixes the common shift and positive elimination solves it.
    """
    layout, w = problem.layout, problem.weights
    ci, ti = layout.class_index, layout.teacher_index
    mask = layout.mask_as(z.dtype)
    wv = w * v
    a = torch.where(layout.covered, (wv * v) @ mask, 1)
    zv = scatter_classes(wv[:, ti] * z, layout)
    beta = w * segment_sum(z - v[:, ti] * (zv / a)[:, ci], layout)
    weight = wv * v
    links = weight.unsqueeze(2) * weight.unsqueeze(1) * masked_gram(torch.where(layout.covered, 1 / a, 0), mask, pairs)
    links.diagonal(dim1=1, dim2=2).zero_()
    reduced, _ = grounded_laplacian_solve(links[:, :-1, :-1], links[:, :-1, -1], (v * beta)[:, :-1])
    c = v * torch.cat([reduced, reduced.new_zeros(reduced.shape[0], 1)], dim=1)
    u = (zv - scatter_classes((wv * c)[:, ti], layout)) / a
    return torch.where(layout.covered, u, 0), c


def _newton(z, problem, pairs, tol, max_iter):
    layout, w = problem.layout, problem.weights
    ci, ti = layout.class_index, layout.teacher_index
    batch, teachers, classes = z.shape[0], layout.num_teachers, layout.num_classes
    wt, tiny = w[ti], torch.finfo(z.dtype).tiny
    dense_c = ti * classes + ci  # packed column -> position in the c rows of a (2N, K) matrix
    dense_v = dense_c + teachers * classes  # ... and in the v rows
    count = layout.mask_as(z.dtype).sum(dim=1)
    last = torch.arange(teachers, device=z.device) == teachers - 1  # its shift is held: the common shift

    def objective(z_, v_):
        u_, c_ = project(z_, v_, problem, pairs)
        r = z_ - v_[:, ti] * u_[:, ci] - c_[:, ti]
        return (wt * r * r).sum(dim=1)

    v = torch.ones(batch, teachers, dtype=z.dtype, device=z.device)
    iterations = torch.zeros(batch, dtype=torch.int32, device=z.device)
    residual, predicted = torch.zeros_like(z[:, 0]), torch.zeros_like(z[:, 0])
    converged = torch.zeros(batch, dtype=torch.bool, device=z.device)
    active = torch.arange(batch, device=z.device)
    for iteration in range(max_iter + 1):
        za, va = z[active], v[active]
        b = active.numel()
        ua, ca = project(za, va, problem, pairs)
        ug, vt = ua[:, ci], va[:, ti]
        r = za - vt * ug - ca[:, ti]
        grad_v = segment_sum(wt * ug * r, layout)  # half the negative gradient (u and c are optimal)
        held = layout.scale_anchor | ((va <= MIN_SCALE) & (grad_v <= 0))
        grad_v = torch.where(held, 0, grad_v)
        # the Hessian's blocks (halved): A (diagonal over classes), [[cc, cv], [cv, vv]] (diagonal
        # per teacher) and X (c and v rows over classes)
        a = torch.where(layout.covered, scatter_classes(wt * vt * vt, layout), 1)
        cc = (w * count).expand(b, -1)
        cv = segment_sum(wt * ug, layout)
        vv = segment_sum(wt * ug * ug, layout)
        residual[active] = (grad_v / vv.clamp_min(tiny)).abs().amax(dim=1)

        exact = None
        for coupling in ("exact", "gauss-newton"):
            x = z.new_zeros(b, 2 * teachers * classes)
            x[:, dense_c] = wt * vt
            x[:, dense_v] = wt * (vt * ug - r) if coupling == "exact" else wt * vt * ug
            x = x.view(b, 2 * teachers, classes)
            with full_precision():
                schur = torch.diag_embed(torch.cat([cc, vv], dim=1))
                schur[:, :teachers, teachers:] += torch.diag_embed(cv)
                schur[:, teachers:, :teachers] += torch.diag_embed(cv)
                schur = schur - (x / a.unsqueeze(1)) @ x.transpose(1, 2)
            # the v-system: eliminate the free shifts from the (c, v) Schur complement
            free_c = ~last.expand(b, -1)
            s_cc = torch.where(free_c.unsqueeze(2) & free_c.unsqueeze(1), schur[:, :teachers, :teachers], 0)
            s_cc = s_cc + torch.diag_embed((~free_c).to(z.dtype))
            s_cv = torch.where(free_c.unsqueeze(2), schur[:, :teachers, teachers:], 0)
            solved_c, failed_c = torch.linalg.cholesky_ex(s_cc)
            reduced = schur[:, teachers:, teachers:] - s_cv.transpose(1, 2) @ torch.cholesky_solve(s_cv, solved_c)
            # in log scales s = log v: H_s = V H_v V - diag(v g) for the exact Hessian
            reduced = va.unsqueeze(2) * reduced * va.unsqueeze(1)
            if coupling == "exact":
                reduced = reduced - torch.diag_embed(va * grad_v)
            free = ~held
            reduced = torch.where(free.unsqueeze(2) & free.unsqueeze(1), reduced, torch.diag_embed(held.to(z.dtype)))
            factor, failed = torch.linalg.cholesky_ex(reduced)
            solved = torch.cholesky_solve((va * grad_v).unsqueeze(2), factor).squeeze(2)
            ok = (failed == 0) & (failed_c == 0) & torch.isfinite(solved).all(dim=1)
            if coupling == "exact":
                exact, step_v = ok, torch.where(ok.unsqueeze(1), solved, 0)
                if bool(ok.all()):
                    break
            else:  # Gauss-Newton where the exact system is indefinite; a diagonal step where even that fails
                fallback = torch.where(ok.unsqueeze(1), solved, va * grad_v / reduced.diagonal(dim1=1, dim2=2))
                step_v = torch.where(exact.unsqueeze(1), step_v, fallback)
        step_s = torch.where(held, 0, step_v)  # a step in log scale: v -> v exp(t step_s)
        longest = step_s.abs().amax(dim=1, keepdim=True)
        step_s = step_s * (MAX_LOG_STEP / longest.clamp_min(MAX_LOG_STEP))  # far from the optimum: a factor e^2 at most
        step_v = va * step_s  # its first-order change of v

        # the step's first-order change of the soft labels, at the reporting scale
        step_c = -torch.cholesky_solve(s_cv @ step_v.unsqueeze(2), solved_c).squeeze(2)
        step_u = -(x.transpose(1, 2) @ torch.cat([step_c, step_v], dim=1).unsqueeze(2)).squeeze(2) / a
        scale = _scale(va, w, layout).unsqueeze(1)
        moved = scale * step_u + ua * _scale(step_v, w, layout).unsqueeze(1)
        q = masked_softmax(ua * scale, layout.covered)
        predicted[active] = (q * (moved - (q * moved).sum(dim=1, keepdim=True))).abs().amax(dim=1)
        done = (residual[active] <= tol) & (predicted[active] <= tol) & exact
        converged[active] = done
        if iteration == max_iter:
            break
        slope = -2 * (grad_v * step_v).sum(dim=1)
        searching = (slope < 0) & ~done
        (v[active],), accepted = backtrack(
            lambda t: ((va * torch.exp(t.unsqueeze(1) * step_s)).clamp_min(MIN_SCALE),),
            lambda cand: objective(za, cand),
            objective(za, va),
            slope,
            (va,),
            full_only=done,
            frozen=~(searching | done),
        )
        iterations[active] += (searching & accepted).int()
        active = active[searching & accepted]
        if active.numel() == 0:
            break
    u, _ = project(z, v, problem, pairs)
    return u * _scale(v, w, layout).unsqueeze(1), iterations, residual, predicted, converged


def _scale(v: torch.Tensor, w: torch.Tensor, layout) -> torch.Tensor:
    """The teachers' weighted mean scale, the prior teacher excluded: ``(B, N) -> (B,)``."""
    real = ~layout.prior_mask
    return (v * w * real).sum(dim=1) / (w * real).sum()
