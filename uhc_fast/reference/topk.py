"""Per-sample class sets (top-k outputs) in plain torch: the definition of what every top-k backend
computes (``../shared/uhc-math.md``, "Per-sample class sets").

Batched, with no Python loop over samples: each sample's union of listed ids is densified into a
local index space ``0 .. M-1`` (its ids in increasing order, ``M`` the largest union of the rows at
hand), which turns the per-sample class sets into a ``(B, N + 1, M)`` membership mask (the teachers,
then the uniform prior teacher where a sample has one) and the problem into a batch of dense ones
that differ in their masks:

- ``sd``: ``q_l`` proportional to ``sum_{i lists l} w_i p_il`` (plus ``alpha / |U|`` with the prior).
- ``ce``: damped Newton on the teacher-space dual, the algorithm of :mod:`uhc_fast.reference.ce`
  (same start, gradient as flows to each class's top teacher solved in flow form, capped steps,
  line search allowing for rounding, relative-KKT and predicted-step convergence test)
  with a mask per sample. A teacher that lists nothing for a sample is absent from it: its row of the
  mask is empty and its dual variable stays put. Each sample's Newton system is grounded at its
  last present teacher. State and Newton systems are float64 throughout.

Validation follows ``uhc_fast/topk_inputs.py`` (:data:`~uhc_fast.topk_inputs.CHECKS`): per teacher and check,
the first failing row.
"""

from __future__ import annotations

import torch

from ..constants import (
    ARMIJO,
    CHANGE_ROUNDING,
    CONVERGED_LOG_STEP,
    DEFAULT_DISCONNECTED_ALPHA,
    MAX_HALVINGS,
    MAX_LOG_STEP,
    SUM_TOLERANCE,
)
from ..linalg import grounded_laplacian_solve_flows
from ..topk_inputs import CHECKS, empty_solution
from .common import full_precision, row_chunks

_SENTINEL = torch.iinfo(torch.int64).max  # sorts after every id


def solve_topk(batch, width: int, tol: float, max_iter: int):
    """Solve a :class:`~uhc_fast.topk_inputs.TopkBatch` into a :class:`~uhc_fast.topk_inputs.TopkSolution` of
    ``(B, width)`` outputs; rows are taken in chunks that bound the dense temporaries."""
    method = batch.options.method
    out = empty_solution(batch, width, method)
    b = batch.batch_size
    if b == 0:
        return out
    slots = batch.total_slots
    # validate everything first: a bad row anywhere is an error, and nothing is solved
    errors = out.errors
    for rows in row_chunks(b, max(1, slots), 1 << 22):
        _, _, failing = _read(batch, rows)
        for i, per_check in enumerate(failing):
            for c, bad in enumerate(per_check):
                if errors[i, c] < 0 and bool(bad.any()):
                    errors[i, c] = int(torch.nonzero(bad)[0]) + rows.start
    if bool((errors >= 0).any()):
        return out
    assert len(CHECKS) == errors.shape[1]
    for rows in row_chunks(b, max(1, slots * (batch.num_teachers + 1)), 1 << 21):
        _solve_rows(batch, rows, width, tol, max_iter, out)
    return out


def _read(batch, rows: slice):
    """Rows ``rows`` of every teacher: ``(shared ids, probabilities, failing)``.

    ``shared``: N int64 ``(b, k_i)`` shared ids, -1 where a slot lists nothing (unused, dropped
    by the map, or bad). ``probs``: N float64 ``(b, k_i)`` renormalised over the listed slots.
    ``failing``: per teacher, per check, ``(b,)`` bool.
    """
    shared_all, probs_all, failing = [], [], []
    for i in range(batch.num_teachers):
        raw = batch.ids[i][rows].long()
        v = batch.values[i][rows].double()
        kind, m = batch.kinds[i], batch.maps[i]
        tolerance = SUM_TOLERANCE[batch.values[i].dtype]
        bad = raw < -1
        shared = raw.clone()
        if m is not None:
            bad |= raw >= m.numel()
            inside = (raw >= 0) & ~bad
            shared = torch.where(inside, m[raw.clamp(0, max(0, m.numel() - 1))] if m.numel() else raw, -1)
        shared = torch.where(bad, -1, shared)
        if batch.vocab_size is not None:
            beyond = shared >= batch.vocab_size
            bad |= beyond
            shared = torch.where(beyond, -1, shared)
        listed = shared >= 0
        ordered = torch.sort(torch.where(listed, shared, -1), dim=1).values
        duplicate = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(dim=1)
        count = listed.sum(dim=1)
        if kind == "probs":
            not_finite = (~torch.isfinite(v) & listed).any(dim=1)
            x = torch.where(listed, v, 0)
            out_of_range = ((x < 0) & listed).any(dim=1)
            total = x.sum(dim=1)
            no_mass = (count > 0) & (total == 0)
            over = total - 1 > tolerance
            p = x / torch.where(total > 0, total, 1)[:, None]
        else:
            not_finite = ((torch.isnan(v) | (v == float("inf"))) & listed).any(dim=1)
            z = torch.where(listed, v, float("-inf"))
            out_of_range = ((z > tolerance) & listed).any(dim=1) if kind == "logprobs" else torch.zeros_like(duplicate)
            top = z.amax(dim=1) if z.shape[1] else torch.full((z.shape[0],), float("-inf"), dtype=z.dtype)
            no_mass = (count > 0) & (top == float("-inf"))
            safe_top = torch.where(torch.isfinite(top), top, 0)
            e = torch.exp(z - safe_top[:, None])
            mass = e.sum(dim=1)
            over = (torch.exp(safe_top) * mass - 1 > tolerance) if kind == "logprobs" else torch.zeros_like(duplicate)
            p = torch.where(listed, e / torch.where(mass > 0, mass, 1)[:, None], 0)
        bad_row = bad.any(dim=1)
        failing.append([bad_row, duplicate, not_finite, out_of_range, no_mass, over & ~no_mass])
        shared_all.append(shared)
        probs_all.append(torch.nan_to_num(p, nan=0.0))
    return shared_all, probs_all, failing


def _union(shared: list[torch.Tensor]):
    """Each row's union of listed ids in increasing order: ``(uid (b, M) -1-padded, size (b,),
    local)`` with ``local`` per teacher ``(b, k_i)``, each slot's index in its row's union (M where
    it lists nothing)."""
    keys = torch.cat(shared, dim=1)
    b = keys.shape[0]
    keys = torch.where(keys >= 0, keys, _SENTINEL)
    ordered, perm = torch.sort(keys, dim=1, stable=True)
    listed = ordered != _SENTINEL
    new = listed.clone()
    new[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    size = new.sum(dim=1)
    width = int(size.max()) if b else 0
    position = new.long().cumsum(dim=1) - 1
    local_sorted = torch.where(listed, position, width)
    local = torch.empty_like(local_sorted).scatter_(1, perm, local_sorted)
    uid = torch.full((b, width + 1), -1, dtype=torch.int64, device=keys.device)
    uid.scatter_(1, torch.where(new, position, width), torch.where(new, ordered, -1))
    return uid[:, :width], size, list(torch.split(local, [s.shape[1] for s in shared], dim=1)), width


def _solve_rows(batch, rows: slice, width: int, tol: float, max_iter: int, out) -> None:
    shared, probs, _ = _read(batch, rows)
    uid, size, local, m = _union(shared)
    b, n = uid.shape[0], batch.num_teachers
    device = uid.device
    f64 = torch.float64
    out.union_size[rows] = size.to(torch.int32)
    if m == 0:
        return
    # membership and evidence over the union: teachers 0..N-1, then the prior (N)
    mask = torch.zeros(b, n + 1, m + 1, dtype=f64, device=device)
    evidence = torch.zeros(b, n + 1, m + 1, dtype=f64, device=device)
    weights = batch.weights.to(device=device, dtype=f64)
    for i in range(n):
        mask[:, i].scatter_(1, local[i], 1.0)
        evidence[:, i].scatter_(1, local[i], weights[i] * probs[i])
    mask, evidence = mask[:, :, :m].contiguous(), evidence[:, :, :m].contiguous()
    present = mask[:, :n].amax(dim=2) > 0
    covered = torch.arange(m, device=device)[None, :] < size[:, None]
    disconnected = _disconnected(mask[:, :n], present)
    if batch.alpha is not None:
        alpha = torch.full((b,), float(batch.alpha), dtype=f64, device=device)
    else:
        alpha = torch.where(disconnected, DEFAULT_DISCONNECTED_ALPHA, 0.0).to(f64)
    prior = (alpha > 0) & (size > 0)
    mask[:, n] = (covered & prior[:, None]).to(f64)
    evidence[:, n] = mask[:, n] * (alpha / size.clamp_min(1))[:, None]
    present = torch.cat([present, prior[:, None]], dim=1)
    w = torch.where(present, torch.cat([weights.expand(b, n), alpha[:, None]], dim=1), 0.0)
    out.disconnected[rows] = disconnected

    if batch.options.method == "sd":
        q = evidence.sum(dim=1)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(torch.finfo(f64).tiny)
    else:
        q, report = _newton(evidence, mask, w, present, tol, max_iter)
        out.iterations[rows] = report["iterations"]
        out.converged[rows] = report["converged"]
        out.residual[rows] = report["residual"].to(out.residual.dtype)
        for name in ("step", "abs_residual"):
            out.extra[name][rows] = report[name].to(out.extra[name].dtype)
    _write(q, uid, size, width, out, rows)


def _disconnected(mask: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``(b,)``: the present teachers of a row do not form one component of the overlap graph
    (teachers linked when they list a common id)."""
    n = mask.shape[1]
    if n == 1:
        return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    with full_precision():
        links = (mask @ mask.transpose(1, 2)) > 0
    first = torch.argmax(present.int(), dim=1)
    reached = torch.nn.functional.one_hot(first, n).bool() & present
    for _ in range(n - 1):
        reached = reached | ((reached.unsqueeze(2) & links).any(dim=1))
    return (present & ~reached).any(dim=1)


def _write(q: torch.Tensor, uid: torch.Tensor, size: torch.Tensor, width: int, out, rows: slice) -> None:
    """Union ids by decreasing soft label (ties: increasing id, the union's order), the first
    ``width``, renormalised when the union was larger."""
    m = q.shape[1]
    covered = torch.arange(m, device=q.device)[None, :] < size[:, None]
    key = torch.where(covered, q, -1.0)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    kept = min(width, m)
    order = order[:, :kept]
    soft = torch.gather(q, 1, order)
    ids = torch.gather(uid, 1, order)
    inside = torch.arange(kept, device=q.device)[None, :] < size[:, None]
    soft = torch.where(inside, soft, 0.0)
    ids = torch.where(inside, ids, -1)
    mass = soft.sum(dim=1)
    truncated = size > width
    soft = torch.where(truncated[:, None], soft / mass.clamp_min(torch.finfo(q.dtype).tiny)[:, None], soft)
    out.soft[rows, :kept] = soft.to(out.soft.dtype)
    out.ids[rows, :kept] = ids
    out.kept[rows] = torch.where(size > 0, torch.where(truncated, mass, 1.0), 0.0).to(out.kept.dtype)


def _newton(
    evidence: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, present: torch.Tensor, tol: float, max_iter: int
):
    """`ce` by damped Newton on the dual, rows in lockstep, each with its own mask.

    ``evidence``, ``mask``: ``(b, T, M)`` (``e_il = w_i p_il``, 1 where teacher i lists local id l);
    ``w``: ``(b, T)`` weights (0 for absent teachers); ``present``: ``(b, T)``. Returns
    ``(q (b, M), report)``.
    """
    b, teachers = mask.shape[:2]
    device, f64 = mask.device, torch.float64
    tiny = torch.finfo(f64).tiny
    n = evidence.sum(dim=1)
    has = n > 0
    total = w.sum(dim=1)
    nonempty = has.any(dim=1)
    share = torch.einsum("btm,bm->bt", mask, n / n.sum(dim=1, keepdim=True).clamp_min(tiny))
    t = torch.where(present, torch.log(w.clamp_min(tiny)) - torch.log(share.clamp_min(tiny)), 0.0)
    # each row's Newton system is grounded at its last present teacher: that teacher goes last
    index = torch.arange(teachers, device=device)
    ground = torch.argmax(torch.where(present, index + 1, 0), dim=1)
    perm = torch.argsort(index[None, :] + teachers * (index[None, :] == ground[:, None]), dim=1)
    # per row and class, the top teacher (the covering one with the most evidence, the first of
    # equals), to which the other covering teachers' gradient terms flow (reference/ce.py)
    top = torch.argmax(torch.where(mask > 0, evidence, -1.0), dim=1)
    to_top = torch.nn.functional.one_hot(top, teachers).to(f64)  # (b, M, T)
    report = {
        "iterations": torch.zeros(b, dtype=torch.int32, device=device),
        "converged": ~nonempty,
        "residual": torch.zeros(b, dtype=f64, device=device),
        "abs_residual": torch.zeros(b, dtype=f64, device=device),
        "step": torch.zeros(b, dtype=f64, device=device),
    }
    active = torch.nonzero(nonempty).flatten()
    for iteration in range(max_iter + 1):
        if active.numel() == 0:
            break
        ta, ea, ma, wa, pa = t[active], evidence[active], mask[active], w[active], present[active]
        na, ev, pm, tops = n[active], has[active], perm[active], to_top[active]
        r = _shifted(ta, pa)
        d = torch.einsum("bt,btm->bm", r, ma).clamp_min(tiny)
        x = torch.where(ev, na / d, 0.0)
        q = x / x.sum(dim=1, keepdim=True)

        # the two convergence measures at this point (see reference/ce.py)
        mass = torch.einsum("btm,bm->bt", ma, x)
        kkt = torch.einsum("bt,btm->bm", torch.where(pa, wa / torch.where(pa, mass, 1.0), 0.0), ma) / d
        gap = torch.where(ev, (kkt - 1).abs(), 0.0)
        report["residual"][active] = gap.amax(dim=1)
        report["abs_residual"][active] = (na * gap).amax(dim=1) / total[active]
        # the gradient as flows (reference/ce.py): each class's difference flows from its teacher to
        # the class's top teacher (a class one teacher lists has none); F = P - P^T is exactly
        # antisymmetric and g_i = sum_j F_ij
        diff = ma * ((r[:, :, None] / d[:, None, :]) * na[:, None, :] - ea)
        with full_precision():
            flow = diff @ tops  # (adds exact zeros beside each class's one term)
            links = r[:, :, None] * r[:, None, :] * torch.einsum("bim,bjm->bij", ma * (x / d)[:, None, :], ma)
        flow = flow - flow.transpose(1, 2)
        links.diagonal(dim1=1, dim2=2).zero_()
        # the right-hand side -g as the flows -F, the grounded teacher's becoming the others' flows to ground
        grounded, out_flow = _in_order(links, pm), _in_order(-flow, pm)
        reduced, _ = grounded_laplacian_solve_flows(
            grounded[:, :-1, :-1], grounded[:, :-1, -1], out_flow[:, :-1, :-1], out_flow[:, :-1, -1]
        )
        step = torch.zeros_like(ta).scatter_(1, pm, torch.cat([reduced, reduced.new_zeros(reduced.shape[0], 1)], dim=1))
        step = step * (MAX_LOG_STEP / step.abs().amax(dim=1, keepdim=True).clamp_min(MAX_LOG_STEP))
        mean = torch.einsum("bt,btm->bm", r * step, ma) / d  # sum_i pi_il step_i
        change = q * ((q * mean).sum(dim=1, keepdim=True) - mean)
        report["step"][active] = change.abs().amax(dim=1)
        done = (report["residual"][active] <= tol) & (report["step"][active] <= tol)
        done &= step.abs().amax(dim=1) <= CONVERGED_LOG_STEP  # (as reference/ce.py)
        report["converged"][active] = done

        slope = (flow * (step[:, :, None] - step[:, None, :])).sum(dim=(1, 2)) / 2  # common shifts cancel
        searching = (slope < 0) & ~done if iteration < max_iter else torch.zeros_like(done)
        a = torch.ones_like(slope)
        accepted = torch.zeros_like(done)
        for _ in range(MAX_HALVINGS):
            moved = ma * r[:, :, None] * torch.expm1(a[:, None, None] * step[:, :, None])
            spread = moved.sum(dim=1) / d
            change_f = a * slope + torch.where(ev, na * (torch.log1p(spread) - a[:, None] * mean), 0.0).sum(dim=1)
            # less a bound on the rounding of its terms (CHANGE_ROUNDING, as reference/ce.py)
            size = (moved.abs() + (a[:, None, None] * ma * r[:, :, None] * step[:, :, None]).abs()).sum(dim=1) / d
            change_f = change_f - CHANGE_ROUNDING * torch.where(ev, na * size, 0.0).sum(dim=1)
            ok = (searching | done) & ~accepted & (change_f <= ARMIJO * a * slope) & torch.isfinite(change_f)
            accepted |= ok
            if not bool((searching & ~accepted).any()):
                break
            a = torch.where(accepted | done, a, a / 2)
        t[active] = ta + torch.where(accepted, a, 0.0)[:, None] * step
        report["iterations"][active] += (accepted & ~done).int()
        active = active[searching & accepted]
    r = _shifted(t, present)
    x = torch.where(has, n / torch.einsum("bt,btm->bm", r, mask).clamp_min(tiny), 0.0)
    q = x / x.sum(dim=1, keepdim=True).clamp_min(tiny)
    return q, report


def _in_order(a: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``(b, T, T)`` ``a`` with both teacher axes in the order ``perm`` ``(b, T)``."""
    teachers = a.shape[1]
    return a.gather(1, perm[:, :, None].expand(-1, -1, teachers)).gather(2, perm[:, None, :].expand(-1, teachers, -1))


def _shifted(t: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``exp(t - max t)`` over the present teachers, 0 for the absent ones."""
    top = torch.where(present, t, float("-inf")).amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return torch.where(present, torch.exp(t - top), 0.0)
