"""`ce`: damped Newton on the teacher-space dual, one sample per program, every step fused.

The algorithm, precision rules and convergence test are those of ``uhc_fast/reference/ce.py`` and
``csrc/core/ce.h`` (read the reference's docstring first): solver state in float64 whatever the
inputs, and the grounded Newton Laplacian assembled and solved in float64 too (reference/ce.py:
Precision says why) by positive elimination; steps capped at ``max_log_step``; Armijo
backtracking on the change of ``F`` measured term by term (its slope clamped at 0); convergence
when the relative KKT residual and the Newton step's largest change of a soft label are both
<= tol, a converged sample taking that last full step if Armijo accepts it.

Work per sample, on the groups of classes covered by the same teachers (``plan.py``):

- once: the teachers' rows (``read_sample``, one pass over HBM), class evidence ``n`` (K), entry
  evidence ``e`` (E), group evidence ``N_g`` and largest class evidence ``M_g`` (G);
- once more: each group's top teacher (the covering teacher with the most evidence, G);
- per Newton step: three passes over the group table (``D_g``; the KKT sums; the step's change
  ``m_g``), two teacher passes over the entries (masses and shared evidence), one over the entries
  one position at a time for the gradient's flows, one pass over the teacher pairs' shared groups
  for the Laplacian's links (``P`` adds instead of a dense ``N x N x K`` product), an ``O(N^3)``
  elimination on register tiles, and one group pass per line-search trial;
- at the end: one pass over the classes writing the soft labels.

The gradient is carried as flows between teachers (uhc_fast/reference/ce.py; per group here, not per
class): each entry's difference ``pi_ig N_g - e_ig`` flows from its teacher to the group's top
teacher, ``F = P - P^T`` is exactly antisymmetric, and the Newton system is solved in flow form
(:func:`.linalg.gth_solve_flows`), so a block of teachers joined to the rest only through groups of
tiny mass gets the step its leaving flows ask for, not the rounding of its internal ones. The line
search measures each group's steps relative to its top teacher's.

Register state: ``t``, ``r``, the step (``(BLOCK_N,)`` float64), the flows and the Newton tiles
``(BLOCK_N, BLOCK_N)`` in float64. Per-group and per-entry state
lives in the program's workspace (L1/L2-resident), laid out by :func:`workspace`.
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
    PARAM_CHANGE_ROUNDING,
    PARAM_CONVERGED_LOG_STEP,
    PARAM_MAX_HALVINGS,
    PARAM_MAX_LOG_STEP,
    PARAM_TOL,
    read_sample,
)
from .linalg import gth_solve_flows
from .sd import class_evidence


def workspace(sizes: dict) -> tuple[int, int]:
    """``(value row, float64 workspace)`` elements per program for `ce` (see :func:`regions`)."""
    n, k, g, e = sizes["N"], sizes["K"], sizes["G"], sizes["E"]
    return sizes["nnz"], k + e + 7 * g + 2 * n + n * n + max(1, sizes["pairs_g"])


@device_function
def regions(ws, tables):
    """The workspace's regions: class evidence n (K), entry evidence e (E), per group N_g, M_g,
    D_g, x_g, m_g and y_g (G each), two teacher vectors (N each), the gradient's flows (N x N) and
    the groups' top teachers (G) (:func:`flow_regions`: not in the tuple, whose shape mf-p shares),
    the pairs' links (pairs)."""
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
    pairs = tv1 + N + N * N + G
    return n_cls, e_ent, ng, mg, dg, xg, mm, yg, tv0, tv1, pairs


@device_function
def flow_regions(tv1, N):
    """The workspace's flows (N x N, row-major) and per-group top teachers (G, as float64), right
    after the second teacher vector (from it: one more pointer carried through ce_solve's loop
    spilled)."""
    return tv1 + N, tv1 + N + N * N


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
def group_tops(tables, e_ent, tops, BLOCK_R: tl.constexpr):
    """Each group's top teacher (stored as float64): the covering teacher with the most evidence
    ``e_ig``, the first of equals (a group's teachers are in ascending order). It depends on the
    sample's evidence only; a group no teacher covers gets teacher 0."""
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    tch_ptr = sec(tables, S_G_TCH)
    pos_ptr = sec(tables, S_G_POS)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        most = tl.full((BLOCK_R,), -1.0, tl.float64)
        top = tl.zeros((BLOCK_R,), tl.int32)
        for j in range(width):
            teacher = tl.load(tch_ptr + base + j * BLOCK_R + lanes)
            pos = tl.load(pos_ptr + base + j * BLOCK_R + lanes)
            e = tl.load(e_ent + pos, mask=pos >= 0, other=-1.0)
            more = (teacher >= 0) & (e > most)
            most = tl.where(more, e, most)
            top = tl.where(more, teacher, top)
        tl.store(tops + rows, top.to(tl.float64), mask=rows < G)
    tl.debug_barrier()


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
def shared_evidence(tables, ng, e_ent, N, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per teacher, its evidence on the groups it shares: the entries with ``N_g > e_ig`` (a group
    it alone covers has ``N_g = e_ig`` exactly)."""
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
        acc += tl.where(live & (big_n > e), e, 0.0)
    return rsum(acc, 1)


@device_function
def flows(tables, r, xg, e_ent, tops, N, BLOCK_N: tl.constexpr):
    """The gradient as flows (float64 ``(BLOCK_N, BLOCK_N)``, ``g_i = sum_j F_ij``): each entry's
    difference ``pi_ig N_g - e_ig = r_i x_g - e_ig`` flows from its teacher i to its group's top teacher, ``P[i][top]
    += c_ig``, and ``F = P - P^T`` is exactly antisymmetric (uhc_fast/reference/ce.py). One entry
    position of every teacher at a time: a one-hot of the tops against a ``(BLOCK_N, BLOCK_T)``
    tile would need a ``BLOCK_N x BLOCK_T x BLOCK_N`` one."""
    start, size = teacher_vector(tables, S_TCH_PTR, N, BLOCK_N)
    group_ptr = sec(tables, S_ENT_GROUP)
    offs = tl.arange(0, BLOCK_N)
    out = tl.zeros((BLOCK_N, BLOCK_N), tl.float64)
    for j in range(hdr(tables, P_TMAX_ENT)):
        live = j < size
        pos = start + j
        g = tl.load(group_ptr + pos, mask=live, other=0)
        x = tl.load(xg + g, mask=live, other=0.0)
        e = tl.load(e_ent + pos, mask=live, other=0.0)
        top = tl.load(tops + g, mask=live, other=-1.0).to(tl.int32)
        c = r * x - e
        out += tl.where(live[:, None] & (top[:, None] == offs[None, :]), c[:, None], 0.0)
    return out - tl.trans(out)


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
    dg,
    ng,
    e_ent,
    yg,
    tv1,
    pairs,
    N,
    max_log_step,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The Newton step grounded at the teacher with the most evidence on shared groups (the last of
    equals, as ``ground_teacher`` in ``csrc/core/ce.h``), capped at ``max_log_step`` in every t_i.

    The links ``W_ij = r_i r_j sum_{g covers i and j} N_g / D_g^2`` are summed per teacher pair
    over its shared groups, then the Laplacian is solved on a register tile with the
    gradient's :func:`flows` as the right-hand side. Returns ``(step, ok, slope)``: ``ok`` is False
    when the solve gave a non-finite step (the step is then 0), and the slope ``g.step = sum_{i<j}
    F_ij (step_i - step_j)`` is formed from the flows (a common shift of the steps cancels exactly).
    The float64 flows wait in the workspace for the slope (a tile carried beside the solve spilled)."""
    flow_ws, tops = flow_regions(tv1, N)
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
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
        acc = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            g = tl.load(grp_ptr + base + j * BLOCK_R + lanes)
            acc += tl.load(yg + g, mask=g >= 0, other=0.0)
        tl.store(pairs + rows, acc, mask=rows < count)
    tl.debug_barrier()
    # (formed here, not once per sample: one more value carried through ce_solve's loop spilled)
    on_shared = shared_evidence(tables, ng, e_ent, N, BLOCK_N, BLOCK_T)
    most = rmax(tl.where(real, on_shared, -1.0), 0)
    grounded = rmax(tl.where(real & (on_shared == most), offs, -1), 0)
    # the grounded teacher's links become the others' ground; it keeps none (the solve gives it 0)
    free = real & (offs != grounded)
    # the right-hand side -g as the flows -F; the grounded teacher's become the others' flows to ground
    flow = flows(tables, r, dg + hdr(tables, P_G), e_ent, tops, N, BLOCK_N)  # (x_g follows D_g)
    tl.store(flow_ws + offs[:, None] * N + offs[None, :], flow, mask=real[:, None] & real[None, :])
    out = tl.where(free[:, None] & free[None, :], -flow, 0.0)
    out_to_ground = tl.where(free, rsum(tl.where(offs[None, :] == grounded, -flow, 0.0), 1), 0.0)
    index = tl.load(
        sec(tables, S_PG_INDEX) + offs[:, None] * N + offs[None, :],
        mask=free[:, None] & free[None, :],
        other=-1,
    )
    shared = tl.load(pairs + index, mask=index >= 0, other=0.0)
    links = r[:, None] * r[None, :] * shared
    to_ground = tl.load(sec(tables, S_PG_INDEX) + offs * N + grounded, mask=free, other=-1)
    r_ground = pick(r, offs, grounded)
    ground = r * r_ground * tl.load(pairs + to_ground, mask=to_ground >= 0, other=0.0)
    # isolated teachers get step 0, as the reference
    tl.debug_barrier()  # the flows stored
    x, _isolated = gth_solve_flows(links, ground, out, out_to_ground, N, BLOCK_N)
    step = tl.where(free, x, 0.0)
    finite = rsum(tl.where(step == step, 0, 1), 0) == 0
    step = tl.where(finite, step, 0.0)
    longest = rmax(tl.abs(step), 0)
    step = step * (max_log_step / tl.maximum(longest, max_log_step))
    slope = tl.zeros((), tl.float64)
    for i in range(N):  # row by row: a pointer tile carried through the solve spilled
        later = (offs > i) & real
        slope += rsum(tl.load(flow_ws + i * N + offs, mask=later, other=0.0) * (pick(step, offs, i) - step), 0)
    return step, finite, slope


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
def change(tables, a, slope, step, real, tv0, tv1, ng, dg, N, rounding, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``F(t + a step) - F(t) = a slope + sum_g N_g (log(1 + sum_{i in g} pi_ig expm1(a step_i)) - a
    m_g)``, less ``rounding`` times the size of its terms (the reference's line search; constants.py:
    CHANGE_ROUNDING says why). ``r`` is in ``tv0`` (:func:`point`); the step goes into ``tv1``."""
    store_vector(tv1, tl.where(real, step, 0.0), N, BLOCK_N)
    G = hdr(tables, P_G)
    lanes = tl.arange(0, BLOCK_R)
    width_ptr = sec(tables, S_G_WIDTH)
    base_ptr = sec(tables, S_G_BASE)
    tch_ptr = sec(tables, S_G_TCH)
    acc = tl.zeros((BLOCK_R,), tl.float64)
    noise = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_G_CHUNKS)):
        rows = c * BLOCK_R + lanes
        live = rows < G
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        spread = tl.zeros((BLOCK_R,), tl.float64)
        below = tl.zeros((BLOCK_R,), tl.float64)
        size = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            teacher = tl.load(tch_ptr + base + j * BLOCK_R + lanes)
            member = teacher >= 0
            s = tl.load(tv1 + teacher, mask=member, other=0.0)
            r = tl.load(tv0 + teacher, mask=member, other=0.0)
            moved = r * expm1(a * s)
            spread += moved
            below += r * s
            size += tl.abs(moved) + tl.abs(a * r * s)
        d = tl.load(dg + rows, mask=live, other=1.0)
        big_n = tl.load(ng + rows, mask=live, other=0.0)
        acc += tl.where(live, big_n * (log1p(spread / d) - a * (below / d)), 0.0)
        noise += tl.where(live, big_n * (size / d), 0.0)
    return a * slope + rsum(acc, 0) - rounding * rsum(noise, 0)


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

    class_evidence(tables, vals, weights_ptr, n_cls, BLOCK_R)
    entry_evidence(tables, vals, weights_ptr, e_ent, BLOCK_R)
    total_n = group_evidence(tables, e_ent, n_cls, ng, mg, BLOCK_R)
    _flow_ws, tops = flow_regions(tv1, N)
    group_tops(tables, e_ent, tops, BLOCK_R)
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
    # (the loop re-reads the weights, the parameters and the regions' sizes where it uses them, and
    # divides the absolute residual by the total weight at the end: carried through it, they spilled)
    while running != 0:
        n_cls, e_ent, ng, mg, dg, xg, mm, yg, tv0, tv1, pairs = regions(ws, tables)
        r, Z, mass = point(tables, t, real, tv0, ng, dg, xg, N, BLOCK_N, BLOCK_R, BLOCK_T)
        w = tl.load(weights_ptr + offs, mask=real, other=0.0)
        relative, absolute = kkt(tables, w, mass, real, tv1, ng, mg, dg, N, BLOCK_N, BLOCK_R)
        max_log_step = tl.load(params_ptr + PARAM_MAX_LOG_STEP)
        step, _finite, slope = newton_step(
            tables, r, dg, ng, e_ent, yg, tv1, pairs, N, max_log_step, BLOCK_N, BLOCK_R, BLOCK_T
        )
        n_cls, e_ent, ng, mg, dg, xg, mm, yg, tv0, tv1, pairs = regions(ws, tables)
        r = tl.load(tv0 + offs, mask=real, other=0.0)  # (point's, re-read: carried, it spilled)
        pred = predicted(tables, r, step, Z, real, tv1, ng, mg, dg, mm, N, BLOCK_N, BLOCK_R)
        if active != 0:
            residual = relative
            abs_residual = absolute
            predicted_change = pred
        # (uhc_fast/reference/ce.py: the step's length says when the two tests can be trusted)
        short = rmax(tl.abs(step), 0) <= tl.load(params_ptr + PARAM_CONVERGED_LOG_STEP)
        tol = tl.load(params_ptr + PARAM_TOL)
        done = (active != 0) & (relative <= tol) & (pred <= tol) & short
        if done:
            converged = 1
        searching = (active != 0) & (~done) & (slope < 0) & (iteration < max_iter)
        # backtracking from the full step; a converged sample may take only that full (tiny) step
        trying = searching | done
        a = tl.full((), 1.0, tl.float64)
        taken = tl.zeros((), tl.float64)
        accepted = 0
        halvings = 0
        while trying & (halvings < tl.load(params_ptr + PARAM_MAX_HALVINGS).to(tl.int32)):
            rounding = tl.load(params_ptr + PARAM_CHANGE_ROUNDING)
            df = change(tables, a, slope, step, real, tv0, tv1, ng, dg, N, rounding, BLOCK_N, BLOCK_R)
            ok = (
                (df <= tl.load(params_ptr + PARAM_ARMIJO) * a * tl.minimum(slope, 0.0))
                & (df == df)
                & (tl.abs(df) < float("inf"))
            )
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
    n_cls, e_ent, ng, mg, dg, xg, mm, yg, tv0, tv1, pairs = regions(ws, tables)
    _r, Z, _mass = point(tables, t, real, tv0, ng, dg, xg, N, BLOCK_N, BLOCK_R, BLOCK_T)
    total_w = tl.zeros((), tl.float64)
    for i in range(N):
        total_w += tl.load(weights_ptr + i)
    abs_residual = abs_residual / total_w
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
            tables, vals, ws, weights_ptr, params_ptr, valid, max_iter, BLOCK_N, BLOCK_R, BLOCK_T
        )
        write_soft(tables, ws, Z, out_ptr + as_i64(b) * K, BLOCK_R)
        tl.store(iterations_ptr + b, iterations)
        tl.store(converged_ptr + b, converged != 0)
        tl.store(residual_ptr + b, residual.to(residual_ptr.dtype.element_ty))
        tl.store(step_ptr + b, step.to(step_ptr.dtype.element_ty))
        tl.store(abs_residual_ptr + b, abs_residual.to(abs_residual_ptr.dtype.element_ty))
        tl.debug_barrier()
