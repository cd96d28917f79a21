"""`ce`: maximum likelihood of the soft labels, solved by damped Newton in teacher space.

Per sample, with evidence ``n_l = sum_{i: l in L_i} w_i p_il`` and ``r_i = exp(t_i)``, the optimum
is ``q_l proportional to n_l / D_l`` with ``D_l = sum_{i: l in L_i} r_i``, where ``t`` minimises the
convex dual

    F(t) = sum_l n_l log D_l(t) - sum_i w_i t_i        (N unknowns, not K).

Its gradient is ``g_i = sum_{l in L_i} (pi_il n_l - w_i p_il)`` (``pi_il = r_i / D_l``). Its Hessian is
the weighted graph Laplacian of the teachers with links ``W_ij = r_i r_j sum_l M_il M_jl n_l / D_l^2``:
F is invariant to a common shift of t, so one teacher per row is grounded (its step is 0) and the
rest is solved by positive elimination (:mod:`uhc_fast.linalg`), which keeps the relative precision
of weak links (teachers joined only through classes of tiny mass: the hard case). The grounded
teacher is the one with the most evidence on the classes it shares (the last of equals).

The gradient as flows. Where a block of teachers is joined to the rest only through classes of
tiny mass, the step along the split (the block moving against the rest) is the sum of the block's
gradients over the weak link, and that sum is the small total of the terms of the classes that
join the block to the rest: summed from the block's g_i, whose other terms are large and cancel,
it drowned in their rounding (1e-26 against 1e-28), the step saw no split, and rows of confident
teachers were reported converged up to 0.5 off. So each class's difference ``pi_il n_l - w_i p_il``
is a flow from teacher i to the class's top teacher (the covering teacher with the most evidence
on it, the first of equals): ``F = P - P^T``, exactly antisymmetric, ``g_i = sum_j F_ij``. A block's
internal flows cancel exactly in any sum over it, the elimination carries the flows rather than
their sums (:func:`uhc_fast.linalg.grounded_laplacian_solve_flows`), and the slope is
``sum_{i<j} F_ij (d_i - d_j)``. (Relative to the top teacher each flow keeps the precision of its
own terms; to a fixed teacher of tiny evidence, the heavy teacher's flow, formed from
``n_l = big + tiny``, carried the rounding of the big term across the weak link.) A class only
teacher i covers has no flow.

Precision: the solver's state (t, evidence, gradient, primal point, line search) and its Newton
system are float64 whatever the input dtype. Where teachers' weights span orders of magnitude, the
problem's conditioning would amplify float32 rounding in the state to errors of 1e-4 and more; and
a Newton system in float32 loses the links of classes whose mass lies below float32's range
(1e-38, which float32 inputs of confident teachers reach): float32 rows were reported converged
0.03 to 1.0 off the optimum of their own inputs.

Globalisation: a Newton step is capped at ``MAX_LOG_STEP`` in every t_i (far from the optimum it can
ask for far more than its quadratic model holds), then backtracked from the full step with Armijo's
test on ``F(t + a d) - F(t) = a g.d + sum_l n_l (log(1 + sum_i pi_il expm1(a d_i)) - a m_l)``
(``pi_il = r_i / D_l``, ``m_l = sum_i pi_il d_i``), whose terms are computed without cancelling the
large values of F, less a bound on their rounding (``CHANGE_ROUNDING`` in constants.py says why).

Convergence (``tol``) asks two things of the returned point: the relative optimality residual
``max_l |q_l sum_{i covers l} w_i / S_i(q) / n_l - 1|`` over classes with evidence (each class's own
KKT condition, whatever its mass), and the Newton correction ``max_l |dq_l|`` the next step would
make to the soft labels. The first alone is blind where two groups of classes are joined only
through a class of tiny mass: there every class satisfies its condition to rounding while the split
of mass between the groups is off by 0.3; the Newton step sees that error. A row that meets both
takes that last (tiny) step and stops. Both are first-order, so a third condition says when
they can be trusted: the Newton step is at most ``CONVERGED_LOG_STEP`` in every t_i. Far from the
optimum, a class of mass 0.9 there can sit at 1e-10 while its teacher's t steps by about 1 at
a time (Newton on an exponential); the step's first-order change of the soft labels is then
1e-10, and the relative residual is blind where the class is joined to the rest only through
classes of tiny mass (float32 rows of confident teachers were reported converged 0.7 off).
"""

from __future__ import annotations

import torch

from ..constants import ARMIJO, CHANGE_ROUNDING, CONVERGED_LOG_STEP, MAX_HALVINGS, MAX_LOG_STEP
from ..inputs import PackedProblem, Solution, scatter_classes, segment_sum
from ..linalg import grounded_laplacian_solve_flows
from .common import full_precision, masked_gram, row_chunks, teacher_pairs


def solve_ce(problem: PackedProblem, tol: float, max_iter: int) -> Solution:
    """Solve ``min_q J(q)`` per sample (see the module docstring for what ``tol`` asks)."""
    values, layout = problem.values, problem.layout
    batch, classes = values.shape[0], layout.num_classes
    outputs = {
        "soft": torch.zeros(batch, classes, dtype=problem.dtype, device=values.device),
        "iterations": torch.zeros(batch, dtype=torch.int32, device=values.device),
        "converged": torch.zeros(batch, dtype=torch.bool, device=values.device),
    }
    for name in ("residual", "abs_residual", "step"):
        outputs[name] = torch.zeros(batch, dtype=problem.dtype, device=values.device)
    weights = problem.weights.double()
    e = values.double() * weights[layout.teacher_index]  # (B, nnz) packed evidence w_i p_il
    mask = layout.mask_as(torch.float64)
    pairs = teacher_pairs(mask)
    for rows in row_chunks(batch, layout.nnz, 1 << 21):  # float64 temporaries stay in cache
        result = _newton(e[rows], layout, mask, weights, pairs, tol, max_iter)
        for name, value in result.items():
            outputs[name][rows] = value
    return Solution(
        outputs["soft"],
        outputs["iterations"],
        outputs["residual"],
        outputs["converged"],
        {"abs_residual": outputs["abs_residual"], "step": outputs["step"]},
    )


def _newton(e, layout, mask, weights, pairs, tol, max_iter):
    """Newton on the dual for float64 packed evidence ``e`` ``(B, nnz)``; returns the outputs of its rows."""
    batch, device = e.shape[0], e.device
    ci, ti = layout.class_index, layout.teacher_index
    tiny = torch.finfo(torch.float64).tiny
    n = scatter_classes(e, layout)  # a class one teacher covers: exactly that teacher's evidence
    evidence = n > 0
    total = weights.sum()
    # per row, the grounded teacher: the one with the most evidence on classes it shares (the last of
    # equals): its gradient is formed from the largest terms, so it is the least precise
    teachers = len(weights)
    shared_column = (mask.sum(dim=0) > 1)[ci]
    ground = teachers - 1 - torch.argmax(segment_sum(e * shared_column, layout).flip(1), dim=1)
    grounded = torch.nn.functional.one_hot(ground, teachers).bool()
    to_top = ti * teachers + _top_teachers(e, n, layout)[:, ci]  # packed column -> its flow's entry (i, top)
    t = torch.log(weights) - torch.log((n / n.sum(dim=1, keepdim=True)) @ mask.T)  # sd's q gives the start
    out = {
        "iterations": torch.zeros(batch, dtype=torch.int32, device=device),
        "converged": torch.zeros(batch, dtype=torch.bool, device=device),
    }
    for name in ("residual", "abs_residual", "step"):
        out[name] = torch.zeros(batch, dtype=torch.float64, device=device)
    active = torch.arange(batch, device=device)
    for iteration in range(max_iter + 1):
        ta, ea, na, ev = t[active], e[active], n[active], evidence[active]
        r = torch.exp(ta - ta.amax(dim=1, keepdim=True))
        d = (r @ mask).clamp_min(tiny)
        x = torch.where(ev, na / d, 0)
        q = x / x.sum(dim=1, keepdim=True)

        # the two convergence measures, at this point (mass_i = Z S_i(q))
        mass = x @ mask.T
        kkt = ((weights / mass) @ mask) / d  # q_l sum_{i covers l} w_i / S_i / n_l
        gap = torch.where(ev, (kkt - 1).abs(), 0)
        out["residual"][active] = gap.amax(dim=1)
        out["abs_residual"][active] = (na * gap).amax(dim=1) / total
        # the gradient as flows between teachers (module docstring): each class's difference flows
        # from its teacher to the class's top teacher; F = P - P^T is exactly antisymmetric
        diff = (r[:, ti] / d[:, ci]) * na[:, ci] - ea
        entry = to_top[active] + teachers * teachers * torch.arange(active.numel(), device=device).unsqueeze(1)
        flow = ea.new_zeros(active.numel() * teachers * teachers).index_add_(0, entry.flatten(), diff.flatten())
        flow = flow.view(-1, teachers, teachers)
        flow = flow - flow.transpose(1, 2)
        links = r.unsqueeze(2) * r.unsqueeze(1) * masked_gram(torch.where(ev, x / d, 0), mask, pairs)
        links.diagonal(dim1=1, dim2=2).zero_()
        # the grounded teacher's links become the others' ground; with none left, its step is 0
        ga = grounded[active]
        # (and its flows, the others' flows to ground: the right-hand side is -grad, minus the flows)
        column = ground[active][:, None, None].expand(-1, teachers, 1)
        off = ga.unsqueeze(2) | ga.unsqueeze(1)
        to_ground = links.gather(2, column).squeeze(2).masked_fill(ga, 0)
        out_flow = -flow
        out_to_ground = out_flow.gather(2, column).squeeze(2).masked_fill(ga, 0)
        solved, _ = grounded_laplacian_solve_flows(
            links.masked_fill(off, 0), to_ground, out_flow.masked_fill(off, 0), out_to_ground
        )
        step = solved.masked_fill(ga, 0)
        step = step * (MAX_LOG_STEP / step.abs().amax(dim=1, keepdim=True).clamp_min(MAX_LOG_STEP))
        with full_precision():
            m = ((r * step) @ mask) / d  # m_l = sum_i pi_il step_i
        change = q * ((q * m).sum(dim=1, keepdim=True) - m)  # the step's first-order change of q
        out["step"][active] = change.abs().amax(dim=1)
        done = (out["residual"][active] <= tol) & (out["step"][active] <= tol)
        done &= step.abs().amax(dim=1) <= CONVERGED_LOG_STEP  # (constants.py says why)
        out["converged"][active] = done

        # backtracking from the full step; a converged row may take only the full (tiny) step, and
        # a row out of iterations none
        slope = (flow * (step.unsqueeze(2) - step.unsqueeze(1))).sum(dim=(1, 2)) / 2
        searching = (slope < 0) & ~done if iteration < max_iter else torch.zeros_like(done)
        a = torch.ones_like(slope)
        accepted = torch.zeros_like(done)
        for _ in range(MAX_HALVINGS):
            moved = r[:, ti] * torch.expm1(a.unsqueeze(1) * step[:, ti])
            spread = scatter_classes(moved, layout) / d
            change_f = a * slope + torch.where(ev, na * (torch.log1p(spread) - a.unsqueeze(1) * m), 0).sum(dim=1)
            size = scatter_classes(moved.abs() + (a.unsqueeze(1) * r[:, ti] * step[:, ti]).abs(), layout) / d
            change_f = change_f - CHANGE_ROUNDING * torch.where(ev, na * size, 0).sum(dim=1)  # (constants.py)
            ok = (searching | done) & ~accepted & (change_f <= ARMIJO * a * slope) & torch.isfinite(change_f)
            accepted |= ok
            if not bool((searching & ~accepted).any()):
                break
            a = torch.where(accepted | done, a, a / 2)
        t[active] = ta + torch.where(accepted, a, 0).unsqueeze(1) * step
        out["iterations"][active] += (accepted & ~done).int()
        active = active[searching & accepted]
        if active.numel() == 0:
            break
    r = torch.exp(t - t.amax(dim=1, keepdim=True))
    x = torch.where(evidence, n / (r @ mask).clamp_min(tiny), 0)
    out["soft"] = x / x.sum(dim=1, keepdim=True)
    return out


def _top_teachers(e: torch.Tensor, n: torch.Tensor, layout) -> torch.Tensor:
    """``(B, K)``: per row and class, the covering teacher with the most evidence (the first of
    equals); a class no teacher covers gets teacher 0."""
    ci, ti = layout.class_index, layout.teacher_index
    columns = e.shape[1]
    most = torch.zeros_like(n).scatter_reduce(1, ci.expand_as(e), e, "amax", include_self=False)
    column = torch.arange(columns, device=e.device).expand_as(e)
    first = torch.full_like(n, columns, dtype=torch.long).scatter_reduce(
        1, ci.expand_as(e), torch.where(e == most[:, ci], column, columns), "amin"
    )
    return ti[first.clamp_max(columns - 1)]
