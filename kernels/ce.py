"""`ce`: damped Newton on the teacher-space dual, one sample per program, every step fused.

The algorithm, precision rules and convergence test are those of ``uhc_fast/reference/ce.py`` and
``csrc/core/ce.h`` (read the reference's docstring first): solver state in float64 whatever the
inputs; the grounded Newton Laplacian assembled and solved in the answers' dtype (``SDT``) by
positive elimination; steps capped at ``max_log_step``; Armijo backtracking on the change of ``F``
measured term by term (its slope clamped at 0); convergence when the relative KKT residual and the
Newton step's largest change of a soft label are both <= tol, a converged sample taking that last
full step if Armijo accepts it.

Work per sample, on the groups of classes covered by the same teachers (``plan.py``):

- once: the teachers' rows (``read_sample``, one pass over HBM), class evidence ``n`` (K), entry
  evidence ``e`` (E), group evidence ``N_g`` and largest class evidence ``M_g`` (G);
- per Newton step: three passes over the group table (``D_g``; the KKT sums; the step's change
  ``m_g``), two teacher passes over the entries (masses and gradient), one pass over the teacher
  pairs' shared groups for the Laplacian's links (``P`` adds instead of a dense ``N x N x K``
  product), an ``O(N^3)`` elimination on a register tile, and one group pass per line-search trial;
- at the end: one pass over the classes writing the soft labels.

Register state: ``t``, ``r``, the gradient, the step (``(BLOCK_N,)`` float64) and the Newton tile
``(BLOCK_N, BLOCK_N)`` in ``SDT``. Per-group and per-entry state lives in the program's workspace
(L1/L2-resident), laid out by :func:`workspace`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    P_E,
    P_E_CHUNKS,
    P_G,
    P_G_CHUNKS,
    P_GC_CHUNKS,
    P_K,
    P_N,
    P_PAIRS_G,
    P_PG_CHUNKS,
    P_TMAX_ENT,
    S_CLASS_GROUP,
    S_E_BASE,
    S_E_COL,
    S_E_WIDTH,
    S_ENT_GROUP,
    S_ENT_TEACHER,
    S_G_BASE,
    S_G_POS,
    S_G_TCH,
    S_G_WIDTH,
    S_GC_BASE,
    S_GC_CLS,
    S_GC_WIDTH,
    S_PG_BASE,
    S_PG_GRP,
    S_PG_INDEX,
    S_PG_WIDTH,
    S_TCH_PTR,
    as_i64,
    device_function,
    expm1,
    hdr,
    log1p,
    pick,
    rmax,
    rsum,
    sec,
    teacher_vector,
)
from .inputs import (
    PARAM_ARMIJO,
    PARAM_CONVERGED_LOG_STEP,
    PARAM_MAX_HALVINGS,
    PARAM_MAX_LOG_STEP,
    PARAM_TOL,
    read_sample,
)
from .linalg import gth_solve
from .sd import class_evidence


def workspace(sizes: dict) -> tuple[int, int]:
    """``(value row, float64 workspace)`` elements per program for `ce` (see :func:`regions`)."""
    n, k, g, e = sizes["N"], sizes["K"], sizes["G"], sizes["E"]
    return sizes["nnz"], k + e + 6 * g + 2 * n + max(1, sizes["pairs_g"])


@device_function
def regions(ws, tables):
    """The workspace's regions: class evidence n (K), entry evidence e (E), per group N_g, M_g,
    D_g, x_g, m_g and y_g (G each), two teacher vectors (N each), the pairs' links (pairs)."""
    K = hdr(tables, P_K)
    E = hdr(tables, P_E)
    G = hdr(tables, P_G)
    N = hdr(tables, P_N)
    n_cls = ws
    e_ent = n_cls + K
    ng = e_ent + E
    mg = ng + G
    dg = mg + G
    xg = dg + G
    mm = xg + G
    yg = mm + G
    tv0 = yg + G
    tv1 = tv0 + N
    pairs = tv1 + N
    return n_cls, e_ent, ng, mg, dg, xg, mm, yg, tv0, tv1, pairs


# ---------------------------------------------------------------------- passes
@device_function
def entry_evidence(tables, vals, weights_ptr, e_out, BLOCK_R: tl.constexpr):
    """``e_k = sum over entry k's packed columns of w_i p_j`` (teacher-major entries)."""
    E = hdr(tables, P_E)
    chunks = hdr(tables, P_E_CHUNKS)
    width_ptr = sec(tables, S_E_WIDTH)
    base_ptr = sec(tables, S_E_BASE)
    col_ptr = sec(tables, S_E_COL)
    teacher_ptr = sec(tables, S_ENT_TEACHER)
    lanes = tl.arange(0, BLOCK_R)
    for c in range(chunks):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        live = rows < E
        w = tl.load(weights_ptr + tl.load(teacher_ptr + rows, mask=live, other=0), mask=live, other=0.0)
        acc = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            col = tl.load(col_ptr + base + j * BLOCK_R + lanes)
            acc += tl.where(col >= 0, w * tl.load(vals + col, mask=col >= 0, other=0.0).to(tl.float64), 0.0)
        tl.store(e_out + rows, acc, mask=live)
    tl.debug_barrier()


@device_function
def sell_sum(idx_ptr, src, width, base, lanes, BLOCK_R: tl.constexpr):
    """Per row of one SELL chunk: ``sum_j src[idx[row, j]]`` (float64), in column order."""
    acc = tl.zeros((BLOCK_R,), tl.float64)
    for j in range(width):
        t = tl.load(idx_ptr + base + j * BLOCK_R + lanes)
        acc += tl.load(src + t, mask=t >= 0, other=0.0)
    return acc


@device_function
def group_evidence(tables, e_ent, n_cls, ng, mg, BLOCK_R: tl.constexpr):
    """``N_g`` (sum of the group's entries: a group one teacher covers has exactly that teacher's
    evidence) and ``M_g`` (its largest class evidence); returns ``sum_g N_g``."""
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    pos_ptr = sec(tables, S_G_POS)
    total = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        s = sell_sum(pos_ptr, e_ent, tl.load(width_ptr + c), tl.load(base_ptr + c), lanes, BLOCK_R)
        tl.store(ng + rows, s, mask=rows < G)
        total += tl.where(rows < G, s, 0.0)
    width_ptr = sec(tables, S_GC_WIDTH)
    base_ptr = sec(tables, S_GC_BASE)
    cls_ptr = sec(tables, S_GC_CLS)
    for c in range(hdr(tables, P_GC_CHUNKS)):
        rows = c * BLOCK_R + lanes
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        top = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            cls = tl.load(cls_ptr + base + j * BLOCK_R + lanes)
            top = tl.maximum(top, tl.load(n_cls + cls, mask=cls >= 0, other=0.0))
        tl.store(mg + rows, top, mask=rows < G)
    tl.debug_barrier()
    return rsum(total, 0)


@device_function
def teacher_group_sum(tables, garr, N, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """``sum_{g covers i} garr[g]`` per teacher, over the teacher-major entries."""
    start, size = teacher_vector(tables, S_TCH_PTR, N, BLOCK_N)
    group_ptr = sec(tables, S_ENT_GROUP)
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    for j0 in range(0, hdr(tables, P_TMAX_ENT), BLOCK_T):
        j = j0 + cols[None, :]
        live = j < size[:, None]
        g = tl.load(group_ptr + start[:, None] + j, mask=live, other=0)
        acc += tl.load(garr + g, mask=live, other=0.0)
    return rsum(acc, 1)


@device_function
def entry_sums(
    tables, r, dg, ng, e_ent, N, SHARED_EVIDENCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Per teacher, a sum over its (group, teacher) entries: the gradient ``g_i = sum_{g covers i}
    (pi_ig N_g - e_ig)``, each group's difference formed before the sum; or (``SHARED_EVIDENCE``)
    its evidence on the groups it shares, the entries with ``N_g > e_ig`` (a group it alone covers
    has ``N_g = e_ig`` exactly). Two calls, not one returning both: the second sum carried from one
    to the other spilled in ``ce_solve``'s loop."""
    start, size = teacher_vector(tables, S_TCH_PTR, N, BLOCK_N)
    group_ptr = sec(tables, S_ENT_GROUP)
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    for j0 in range(0, hdr(tables, P_TMAX_ENT), BLOCK_T):
        j = j0 + cols[None, :]
        live = j < size[:, None]
        pos = start[:, None] + j
        g = tl.load(group_ptr + pos, mask=live, other=0)
        big_n = tl.load(ng + g, mask=live, other=0.0)
        e = tl.load(e_ent + pos, mask=live, other=0.0)
        if SHARED_EVIDENCE:
            acc += tl.where(live & (big_n > e), e, 0.0)
        else:
            d = tl.load(dg + g, mask=live, other=1.0)
            acc += tl.where(live, r[:, None] / d * big_n - e, 0.0)
    return rsum(acc, 1)


@device_function
def store_vector(dst, vec, N, BLOCK_N: tl.constexpr):
    """A teacher vector into the workspace, visible to the whole program."""
    offs = tl.arange(0, BLOCK_N)
    tl.debug_barrier()  # earlier readers of dst are done
    tl.store(dst + offs, vec, mask=offs < N)
    tl.debug_barrier()


@device_function
def point(tables, t, real, tv0, ng, dg, xg, N, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """At ``t``: ``r = exp(t - max t)``, ``D_g`` (stored), ``x_g = N_g / D_g`` (stored) and the
    teachers' masses ``sum_{g covers i} x_g``. Returns ``(r, Z = sum_g x_g, mass)``."""
    top = rmax(tl.where(real, t, float("-inf")), 0)
    r = tl.where(real, tl.exp(t - top), 0.0)
    store_vector(tv0, r, N, BLOCK_N)
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    tch_ptr = sec(tables, S_G_TCH)
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    z = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        live = rows < G
        d = tl.maximum(sell_sum(tch_ptr, tv0, tl.load(width_ptr + c), tl.load(base_ptr + c), lanes, BLOCK_R), tiny)
        x = tl.load(ng + rows, mask=live, other=0.0) / d
        tl.store(dg + rows, d, mask=live)
        tl.store(xg + rows, x, mask=live)
        z += tl.where(live, x, 0.0)
    tl.debug_barrier()
    mass = teacher_group_sum(tables, xg, N, BLOCK_N, BLOCK_T)
    return r, rsum(z, 0), mass


@device_function
def kkt(tables, w, mass, real, tv1, ng, mg, dg, N, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The relative and absolute KKT residuals: ``max_g |sum_{i in g} (w_i / mass_i) / D_g - 1|``
    over groups with evidence, and the same weighted by ``M_g``."""
    store_vector(tv1, tl.where(real, w / tl.where(real, mass, 1.0), 0.0), N, BLOCK_N)
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    tch_ptr = sec(tables, S_G_TCH)
    relative = tl.zeros((BLOCK_R,), tl.float64)
    absolute = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        live = rows < G
        acc = sell_sum(tch_ptr, tv1, tl.load(width_ptr + c), tl.load(base_ptr + c), lanes, BLOCK_R)
        d = tl.load(dg + rows, mask=live, other=1.0)
        gap = tl.abs(acc / d - 1.0)
        has = tl.load(ng + rows, mask=live, other=0.0) > 0
        relative = tl.maximum(relative, tl.where(has, gap, 0.0))
        absolute = tl.maximum(absolute, tl.where(has, tl.load(mg + rows, mask=live, other=0.0) * gap, 0.0))
    return rmax(relative, 0), rmax(absolute, 0)


@device_function
def newton_step(
    tables,
    r,
    grad,
    dg,
    ng,
    e_ent,
    yg,
    pairs,
    N,
    max_log_step,
    SDT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The Newton step grounded at the teacher with the most evidence on shared groups (the last of
    equals, as ``ground_teacher`` in ``csrc/core/ce.h``), capped at ``max_log_step`` in every t_i.

    The links ``W_ij = r_i r_j sum_{g covers i and j} N_g / D_g^2`` are summed per teacher pair
    over its shared groups (``SDT``), then the Laplacian is solved on a register tile. Returns
    ``(step, ok)``; ``ok`` is False when the solve gave a non-finite step (the step is then 0)."""
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    for c0 in range(0, G, BLOCK_R):
        rows = c0 + lanes
        live = rows < G
        d = tl.load(dg + rows, mask=live, other=1.0)
        big_n = tl.load(ng + rows, mask=live, other=0.0)
        tl.store(yg + rows, tl.where(big_n > 0, big_n / tl.where(big_n > 0, d * d, 1.0), 0.0), mask=live)
    tl.debug_barrier()
    width_ptr = sec(tables, S_PG_WIDTH)
    base_ptr = sec(tables, S_PG_BASE)
    grp_ptr = sec(tables, S_PG_GRP)
    count = hdr(tables, P_PAIRS_G)
    for c in range(hdr(tables, P_PG_CHUNKS)):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        acc = tl.zeros((BLOCK_R,), SDT)
        for j in range(width):
            g = tl.load(grp_ptr + base + j * BLOCK_R + lanes)
            acc += tl.load(yg + g, mask=g >= 0, other=0.0).to(SDT)
        tl.store(pairs + rows, acc.to(tl.float64), mask=rows < count)
    tl.debug_barrier()
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    # (formed here, not once per sample: one more value carried through ce_solve's loop spilled)
    shared_evidence = entry_sums(tables, r, dg, ng, e_ent, N, True, BLOCK_N, BLOCK_T)
    most = rmax(tl.where(real, shared_evidence, -1.0), 0)
    grounded = rmax(tl.where(real & (shared_evidence == most), offs, -1), 0)
    # the grounded teacher's links become the others' ground; it keeps none (the solve gives it 0)
    free = real & (offs != grounded)
    index = tl.load(
        sec(tables, S_PG_INDEX) + offs[:, None] * N + offs[None, :],
        mask=free[:, None] & free[None, :],
        other=-1,
    )
    shared = tl.load(pairs + index, mask=index >= 0, other=0.0).to(SDT)
    rs = r.to(SDT)
    links = rs[:, None] * rs[None, :] * shared
    to_ground = tl.load(sec(tables, S_PG_INDEX) + offs * N + grounded, mask=free, other=-1)
    r_ground = pick(rs, offs, grounded)
    ground = rs * r_ground * tl.load(pairs + to_ground, mask=to_ground >= 0, other=0.0).to(SDT)
    rhs = tl.where(free, -grad, 0.0).to(SDT)
    x, _isolated = gth_solve(links, ground, rhs, N, BLOCK_N)  # isolated teachers get step 0, as the reference
    step = tl.where(free, x.to(tl.float64), 0.0)
    finite = rsum(tl.where(step == step, 0, 1), 0) == 0
    step = tl.where(finite, step, 0.0)
    longest = rmax(tl.abs(step), 0)
    step = step * (max_log_step / tl.maximum(longest, max_log_step))
    return step, finite


@device_function
def predicted(tables, r, step, Z, real, tv1, ng, mg, dg, mm, N, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``m_g = sum_{i in g} pi_ig step_i`` (stored) and the step's largest first-order change of a
    soft label, ``max_g M_g / (D_g Z) |c - m_g|`` with ``c = sum_g x_g m_g / Z``."""
    store_vector(tv1, tl.where(real, r * step, 0.0), N, BLOCK_N)
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    tch_ptr = sec(tables, S_G_TCH)
    cacc = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        live = rows < G
        d = tl.load(dg + rows, mask=live, other=1.0)
        m = sell_sum(tch_ptr, tv1, tl.load(width_ptr + c), tl.load(base_ptr + c), lanes, BLOCK_R) / d
        tl.store(mm + rows, m, mask=live)
        cacc += tl.where(live, tl.load(ng + rows, mask=live, other=0.0) / d * m, 0.0)
    tl.debug_barrier()
    cbar = rsum(cacc, 0) / Z
    worst = tl.zeros((BLOCK_R,), tl.float64)
    for c0 in range(0, G, BLOCK_R):
        rows = c0 + lanes
        live = rows < G
        d = tl.load(dg + rows, mask=live, other=1.0)
        m = tl.load(mm + rows, mask=live, other=0.0)
        top = tl.load(mg + rows, mask=live, other=0.0)
        worst = tl.maximum(worst, tl.where(live, top / (d * Z) * tl.abs(cbar - m), 0.0))
    return rmax(worst, 0)


@device_function
def change(tables, a, slope, r, step, real, tv1, ng, dg, mm, N, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``F(t + a step) - F(t) = a slope + sum_g N_g (log(1 + sum_{i in g} pi_ig expm1(a step_i)) - a m_g)``."""
    store_vector(tv1, tl.where(real, r * expm1(a * step), 0.0), N, BLOCK_N)
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    tch_ptr = sec(tables, S_G_TCH)
    acc = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        live = rows < G
        spread = sell_sum(tch_ptr, tv1, tl.load(width_ptr + c), tl.load(base_ptr + c), lanes, BLOCK_R)
        d = tl.load(dg + rows, mask=live, other=1.0)
        m = tl.load(mm + rows, mask=live, other=0.0)
        big_n = tl.load(ng + rows, mask=live, other=0.0)
        acc += tl.where(live, big_n * (log1p(spread / d) - a * m), 0.0)
    return a * slope + rsum(acc, 0)


# ---------------------------------------------------------------------- one sample
@device_function
def ce_solve(
    tables,
    vals,
    ws,
    weights_ptr,
    params_ptr,
    valid,
    max_iter,
    SDT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Solve one sample whose values are in ``vals``. The soft labels are left unnormalised in the
    workspace: ``q_l = n_l / (D_{g(l)} Z)``. Returns ``(Z, iterations, converged, residual,
    abs_residual, step)``."""
    N = hdr(tables, P_N)
    n_cls, e_ent, ng, mg, dg, xg, mm, yg, tv0, tv1, pairs = regions(ws, tables)
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    w = tl.load(weights_ptr + offs, mask=real, other=0.0)
    total_w = rsum(w, 0)
    tol = tl.load(params_ptr + PARAM_TOL)
    armijo = tl.load(params_ptr + PARAM_ARMIJO)
    max_log_step = tl.load(params_ptr + PARAM_MAX_LOG_STEP)
    max_halvings = tl.load(params_ptr + PARAM_MAX_HALVINGS).to(tl.int32)

    class_evidence(tables, vals, weights_ptr, n_cls, BLOCK_R)
    entry_evidence(tables, vals, weights_ptr, e_ent, BLOCK_R)
    total_n = group_evidence(tables, e_ent, n_cls, ng, mg, BLOCK_R)
    # start at sd: t_i = log w_i - log S_i(n / sum n)
    mass = teacher_group_sum(tables, ng, N, BLOCK_N, BLOCK_T)
    t = tl.where(real, tl.log(tl.where(real, w, 1.0)) - tl.log(tl.where(real, mass, 1.0) / total_n), 0.0)

    iterations = 0
    converged = 0
    residual = tl.zeros((), tl.float64)
    abs_residual = tl.zeros((), tl.float64)
    predicted_change = tl.zeros((), tl.float64)
    active = valid
    iteration = 0
    running = 1
    while running != 0:
        r, Z, mass = point(tables, t, real, tv0, ng, dg, xg, N, BLOCK_N, BLOCK_R, BLOCK_T)
        relative, absolute = kkt(tables, w, mass, real, tv1, ng, mg, dg, N, BLOCK_N, BLOCK_R)
        grad = entry_sums(tables, r, dg, ng, e_ent, N, False, BLOCK_N, BLOCK_T)
        step, _finite = newton_step(
            tables, r, grad, dg, ng, e_ent, yg, pairs, N, max_log_step, SDT, BLOCK_N, BLOCK_R, BLOCK_T
        )
        pred = predicted(tables, r, step, Z, real, tv1, ng, mg, dg, mm, N, BLOCK_N, BLOCK_R)
        if active != 0:
            residual = relative
            abs_residual = absolute / total_w
            predicted_change = pred
        # (uhc_fast/reference/ce.py: the step's length says when the two tests can be trusted)
        short = rmax(tl.abs(step), 0) <= tl.load(params_ptr + PARAM_CONVERGED_LOG_STEP)
        done = (active != 0) & (relative <= tol) & (pred <= tol) & short
        if done:
            converged = 1
        slope = rsum(grad * step, 0)
        searching = (active != 0) & (~done) & (slope < 0) & (iteration < max_iter)
        # backtracking from the full step; a converged sample may take only that full (tiny) step
        trying = searching | done
        a = tl.full((), 1.0, tl.float64)
        taken = tl.zeros((), tl.float64)
        accepted = 0
        halvings = 0
        while trying & (halvings < max_halvings):
            df = change(tables, a, slope, r, step, real, tv1, ng, dg, mm, N, BLOCK_N, BLOCK_R)
            ok = (df <= armijo * a * tl.minimum(slope, 0.0)) & (df == df) & (tl.abs(df) < float("inf"))
            if ok:
                taken = a
                accepted = 1
            trying = trying & (~ok) & (~done)
            a = a * 0.5
            halvings += 1
        t = t + taken * step
        if (accepted != 0) & (~done):
            iterations += 1
        active = (searching & (accepted != 0)).to(tl.int32)
        running = active
        iteration += 1
    _r, Z, _mass = point(tables, t, real, tv0, ng, dg, xg, N, BLOCK_N, BLOCK_R, BLOCK_T)
    return Z, iterations, converged, residual, abs_residual, predicted_change


@device_function
def write_soft(tables, ws, Z, out_row, BLOCK_R: tl.constexpr):
    """``q_l = n_l / (D_{g(l)} Z)`` for every class, written out (0 where no teacher covers l)."""
    K = hdr(tables, P_K)
    n_cls, _e, _ng, _mg, dg, _xg, _mm, _yg, _tv0, _tv1, _pairs = regions(ws, tables)
    group_ptr = sec(tables, S_CLASS_GROUP)
    lanes = tl.arange(0, BLOCK_R)
    for k0 in range(0, K, BLOCK_R):
        k = k0 + lanes
        live = k < K
        n = tl.load(n_cls + k, mask=live, other=0.0)
        d = tl.load(dg + tl.load(group_ptr + k, mask=live, other=0), mask=live, other=1.0)
        tl.store(out_row + k, (n / (d * Z)).to(out_row.dtype.element_ty), mask=live)


@triton.jit(do_not_specialize=["batch", "vals_stride", "ws_stride", "max_iter"])
def _ce_kernel(
    teachers_ptr,  # (N, 4) int64 teacher table (inputs.py)
    tables,  # int32 plan buffer (plan.py)
    weights_ptr,  # (N,) float64
    params_ptr,  # float64 launch parameters (inputs.py: PARAM_*)
    vals_ptr,  # (programs, vals_stride) VDT value rows
    ws_ptr,  # (programs, ws_stride) float64 workspaces (regions())
    out_ptr,  # (B, K) soft labels, answers' dtype
    iterations_ptr,  # (B,) int32 Newton steps taken
    converged_ptr,  # (B,) bool
    residual_ptr,  # (B,) relative KKT residual
    step_ptr,  # (B,) the last Newton step's predicted largest change of a soft label
    abs_residual_ptr,  # (B,) absolute KKT residual
    errors_ptr,  # (N, 4) int64 first failing row per teacher and check
    batch,
    vals_stride,
    ws_stride,
    max_iter,
    IN_DT: tl.constexpr,  # the teachers' stored dtype
    VDT: tl.constexpr,  # the value row's dtype (the answers')
    SDT: tl.constexpr,  # the Newton system's dtype (the answers')
    BLOCK_N: tl.constexpr,  # power of two >= N
    BLOCK_R: tl.constexpr,  # SELL chunk height
    BLOCK_T: tl.constexpr,  # entries per teacher per step of a teacher pass
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    vals = vals_ptr + pid.to(tl.int64) * vals_stride
    ws = ws_ptr + pid.to(tl.int64) * ws_stride
    K = hdr(tables, P_K)
    for b in range(pid, batch, programs):
        valid = read_sample(b, teachers_ptr, tables, vals, errors_ptr, params_ptr, IN_DT, VDT, False, BLOCK_R)
        Z, iterations, converged, residual, abs_residual, step = ce_solve(
            tables, vals, ws, weights_ptr, params_ptr, valid, max_iter, SDT, BLOCK_N, BLOCK_R, BLOCK_T
        )
        write_soft(tables, ws, Z, out_ptr + as_i64(b) * K, BLOCK_R)
        tl.store(iterations_ptr + b, iterations)
        tl.store(converged_ptr + b, converged != 0)
        tl.store(residual_ptr + b, residual.to(residual_ptr.dtype.element_ty))
        tl.store(step_ptr + b, step.to(step_ptr.dtype.element_ty))
        tl.store(abs_residual_ptr + b, abs_residual.to(abs_residual_ptr.dtype.element_ty))
        tl.debug_barrier()
