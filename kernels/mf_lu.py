"""`mf-lu`: logit space with an unknown scale per teacher, one sample per program.

The algorithm, rules and convergence test of ``uhc_fast/reference/mf_lu.py`` and
``csrc/core/mf_lu.h``, in float64: variable projection (for fixed scales ``(u, c)`` are the
closed-form least squares, the shifts from a grounded Laplacian solved by positive elimination),
Newton steps in log scale from ``v = 1`` with the exact Hessian's ``(c, v)`` Schur complement
(Gauss-Newton's where that is not positive definite, a diagonal step where neither is), anchors and
scales at their bound held, steps capped at ``max_log_step``, Armijo backtracking on the projected
objective (slope clamped at 0), and the three-part convergence test.

Work per Newton step: the projection is two passes over the class table, two teacher passes over
the packed columns and one pass over the teacher pairs' shared classes (its Laplacian), then an
``O(N^3)`` elimination; the Schur complement's diagonal comes from a teacher pass and its
off-diagonal blocks from one more pass over the pairs' shared classes (six sums per pair); the
``N x N`` factorisations, the matrix solve and the reduction run on register tiles
(``BLOCK_N <= 32``: six ``(BLOCK_N, BLOCK_N)`` float64 tiles); the predicted change of the soft
labels is one more class pass. Every line-search trial is one projection.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    P_C_CHUNKS,
    P_K,
    P_N,
    P_PAIRS_C,
    P_PC_CHUNKS,
    P_PRIOR,
    P_TMAX_COL,
    S_ANCHOR,
    S_C_BASE,
    S_C_COL,
    S_C_TCH,
    S_C_WIDTH,
    S_CLASS_DEGREE,
    S_CLASS_INDEX,
    S_OFFSETS,
    S_PC_BASE,
    S_PC_CLS,
    S_PC_COLI,
    S_PC_COLJ,
    S_PC_I,
    S_PC_INDEX,
    S_PC_J,
    S_PC_WIDTH,
    as_i64,
    device_function,
    hdr,
    rmax,
    rsum,
    sec,
    teacher_vector,
)
from .ce import store_vector
from .inputs import PARAM_ARMIJO, PARAM_MAX_HALVINGS, PARAM_MAX_LOG_STEP, PARAM_MIN_SCALE, PARAM_TOL, read_sample
from .linalg import cholesky, cholesky_solve, cholesky_solve_many, gth_solve, row_of
from .mf_lf import masked_softmax

PAIR_SUMS = 7  # per teacher pair: the projection's link, then scc, scv (i, j), scv (j, i), scv_gn, svv, svv_gn


def workspace(sizes: dict) -> tuple[int, int]:
    """``(value row, float64 workspace)`` per program: a, zv, u, the step's change of u (K each),
    four teacher vectors (N each: v, c, the shifts' and the scales' steps), the pairs' sums
    (PAIR_SUMS per pair)."""
    return sizes["nnz"], 4 * sizes["K"] + 4 * sizes["N"] + PAIR_SUMS * max(1, sizes["pairs_c"])


@device_function
def regions(ws, tables):
    K = hdr(tables, P_K)
    N = hdr(tables, P_N)
    a = ws
    zv = a + K
    u = zv + K
    moved = u + K
    v_store = moved + K
    c_store = v_store + N
    dc_store = c_store + N
    st_store = dc_store + N
    pairs = st_store + N
    return a, zv, u, moved, v_store, c_store, dc_store, st_store, pairs


@device_function
def class_fit(tables, vals, weights_ptr, v_store, c_store, a, zv, u, SECOND: tl.constexpr, BLOCK_R: tl.constexpr):
    """First (``SECOND`` False): ``a_l = sum w_i v_i^2`` (1 where uncovered) and ``zv_l = sum w_i v_i
    z_il``. Second: ``u_l = (zv_l - sum w_i v_i c_i) / a_l`` (0 where uncovered)."""
    K = hdr(tables, P_K)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    degree = sec(tables, S_CLASS_DEGREE)
    lanes = tl.arange(0, BLOCK_R)
    for ch in range(hdr(tables, P_C_CHUNKS)):
        width = tl.load(width_ptr + ch)
        base = tl.load(base_ptr + ch)
        rows = ch * BLOCK_R + lanes
        live = rows < K
        covered = tl.load(degree + rows, mask=live, other=0) > 0
        acc = tl.zeros((BLOCK_R,), tl.float64)
        acc2 = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            t = tl.load(tch_ptr + at)
            ok = t >= 0
            vi = tl.load(v_store + t, mask=ok, other=0.0)
            wv = tl.load(weights_ptr + t, mask=ok, other=0.0) * vi
            if SECOND:
                acc += wv * tl.load(c_store + t, mask=ok, other=0.0)
            else:
                acc += wv * vi
                acc2 += wv * tl.load(vals + tl.load(col_ptr + at), mask=ok, other=0.0).to(tl.float64)
        if SECOND:
            al = tl.load(a + rows, mask=live, other=1.0)
            zl = tl.load(zv + rows, mask=live, other=0.0)
            tl.store(u + rows, tl.where(covered, (zl - acc) / al, 0.0), mask=live)
        else:
            tl.store(a + rows, tl.where(covered, acc, 1.0), mask=live)
            tl.store(zv + rows, acc2, mask=live)
    tl.debug_barrier()


@device_function
def project(tables, vals, ws, weights_ptr, v, N, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """``(u, c)`` minimising the objective for scales ``v`` (the last teacher's shift 0), into the
    workspace (and ``a``, ``zv``); returns ``(c, f)`` with ``f = sum_i w_i sum_{l in L_i} r_il^2``."""
    a, zv, u, _moved, v_store, c_store, _dc, _st, pairs = regions(ws, tables)
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    w = tl.load(weights_ptr + offs, mask=real, other=0.0)
    store_vector(v_store, v, N, BLOCK_N)
    class_fit(tables, vals, weights_ptr, v_store, c_store, a, zv, u, False, BLOCK_R)
    # beta_i = w_i sum_{l in L_i} (z_il - v_i zv_l / a_l)
    start, size = teacher_vector(tables, S_OFFSETS, N, BLOCK_N)
    class_ptr = sec(tables, S_CLASS_INDEX)
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    for j0 in range(0, hdr(tables, P_TMAX_COL), BLOCK_T):
        j = j0 + cols[None, :]
        live = j < size[:, None]
        col = start[:, None] + j
        z = tl.load(vals + col, mask=live, other=0.0).to(tl.float64)
        cls = tl.load(class_ptr + col, mask=live, other=0)
        al = tl.load(a + cls, mask=live, other=1.0)
        zl = tl.load(zv + cls, mask=live, other=0.0)
        acc += tl.where(live, z - v[:, None] * zl / al, 0.0)
    beta = w * rsum(acc, 1)
    # the links w_i v_i^2 w_j v_j^2 sum_{l in L_i and L_j} 1 / a_l, per pair of teachers sharing classes
    width_ptr = sec(tables, S_PC_WIDTH)
    base_ptr = sec(tables, S_PC_BASE)
    cls_ptr = sec(tables, S_PC_CLS)
    count = hdr(tables, P_PAIRS_C)
    lanes = tl.arange(0, BLOCK_R)
    for ch in range(hdr(tables, P_PC_CHUNKS)):
        width = tl.load(width_ptr + ch)
        base = tl.load(base_ptr + ch)
        rows = ch * BLOCK_R + lanes
        live = rows < count
        ti = tl.load(sec(tables, S_PC_I) + rows, mask=live, other=0)
        tj = tl.load(sec(tables, S_PC_J) + rows, mask=live, other=0)
        vi = tl.load(v_store + ti)
        vj = tl.load(v_store + tj)
        wi = tl.load(weights_ptr + ti) * vi * vi
        wj = tl.load(weights_ptr + tj) * vj * vj
        link = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            cls = tl.load(cls_ptr + base + j * BLOCK_R + lanes)
            ok = cls >= 0
            link += tl.where(ok, wi / tl.load(a + cls, mask=ok, other=1.0) * wj, 0.0)
        tl.store(pairs + rows, link, mask=live)
    tl.debug_barrier()
    n = N - 1
    inner = offs < n
    index = tl.load(
        sec(tables, S_PC_INDEX) + offs[:, None] * N + offs[None, :], mask=inner[:, None] & inner[None, :], other=-1
    )
    links = tl.load(pairs + index, mask=index >= 0, other=0.0)
    last = tl.load(sec(tables, S_PC_INDEX) + offs * N + n, mask=inner, other=-1)
    ground = tl.load(pairs + last, mask=last >= 0, other=0.0)
    x, _isolated = gth_solve(links, ground, tl.where(inner, v * beta, 0.0), n, BLOCK_N)
    c = tl.where(inner, v * x, 0.0)
    store_vector(c_store, c, N, BLOCK_N)
    class_fit(tables, vals, weights_ptr, v_store, c_store, a, zv, u, True, BLOCK_R)
    # the objective
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    for j0 in range(0, hdr(tables, P_TMAX_COL), BLOCK_T):
        j = j0 + cols[None, :]
        live = j < size[:, None]
        col = start[:, None] + j
        z = tl.load(vals + col, mask=live, other=0.0).to(tl.float64)
        ul = tl.load(u + tl.load(class_ptr + col, mask=live, other=0), mask=live, other=0.0)
        r = tl.where(live, z - v[:, None] * ul - c[:, None], 0.0)
        acc += r * r
    return c, rsum(w * rsum(acc, 1), 0)


@device_function
def mean_scale(tables, weights_ptr, v, N, BLOCK_N: tl.constexpr):
    """The teachers' weighted mean scale, the prior teacher excluded."""
    offs = tl.arange(0, BLOCK_N)
    keep = (offs < N) & (offs != hdr(tables, P_PRIOR))
    w = tl.load(weights_ptr + offs, mask=keep, other=0.0)
    return rsum(w * v, 0) / rsum(w, 0)


@device_function
def schur_pairs(tables, vals, weights_ptr, v_store, c_store, a, u, pairs, BLOCK_R: tl.constexpr):
    """The Schur complement's off-diagonal terms per teacher pair (i < j) sharing classes, summed
    over those classes (``x_i = w_i v_i``, ``xv_i = w_i (v_i u_l - r_il)``, ``xg_i = w_i v_i u_l``,
    each term over ``a_l``): into ``pairs + (1..6) * count``."""
    count = hdr(tables, P_PAIRS_C)
    width_ptr = sec(tables, S_PC_WIDTH)
    base_ptr = sec(tables, S_PC_BASE)
    cls_ptr = sec(tables, S_PC_CLS)
    coli_ptr = sec(tables, S_PC_COLI)
    colj_ptr = sec(tables, S_PC_COLJ)
    lanes = tl.arange(0, BLOCK_R)
    stride = tl.maximum(count, 1)
    for ch in range(hdr(tables, P_PC_CHUNKS)):
        width = tl.load(width_ptr + ch)
        base = tl.load(base_ptr + ch)
        rows = ch * BLOCK_R + lanes
        live = rows < count
        ti = tl.load(sec(tables, S_PC_I) + rows, mask=live, other=0)
        tj = tl.load(sec(tables, S_PC_J) + rows, mask=live, other=0)
        vi = tl.load(v_store + ti)
        vj = tl.load(v_store + tj)
        ci = tl.load(c_store + ti)
        cj = tl.load(c_store + tj)
        wi = tl.load(weights_ptr + ti)
        wj = tl.load(weights_ptr + tj)
        s_cc = tl.zeros((BLOCK_R,), tl.float64)
        s_cv = tl.zeros((BLOCK_R,), tl.float64)
        s_vc = tl.zeros((BLOCK_R,), tl.float64)
        s_cg = tl.zeros((BLOCK_R,), tl.float64)
        s_vv = tl.zeros((BLOCK_R,), tl.float64)
        s_gg = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            cls = tl.load(cls_ptr + at)
            ok = cls >= 0
            inv = 1.0 / tl.load(a + cls, mask=ok, other=1.0)
            ul = tl.load(u + cls, mask=ok, other=0.0)
            ri = tl.load(vals + tl.load(coli_ptr + at), mask=ok, other=0.0).to(tl.float64) - vi * ul - ci
            rj = tl.load(vals + tl.load(colj_ptr + at), mask=ok, other=0.0).to(tl.float64) - vj * ul - cj
            xc_i = wi * vi * inv
            xv_i = wi * (vi * ul - ri) * inv
            xg_i = wi * vi * ul * inv
            xc_j = wj * vj
            xv_j = wj * (vj * ul - rj)
            xg_j = wj * vj * ul
            s_cc -= tl.where(ok, xc_i * xc_j, 0.0)
            s_cv -= tl.where(ok, xc_i * xv_j, 0.0)  # (c_i, v_j)
            s_vc -= tl.where(ok, xc_j * inv * (wi * (vi * ul - ri)), 0.0)  # (c_j, v_i)
            s_cg -= tl.where(ok, xc_i * xg_j, 0.0)
            s_vv -= tl.where(ok, xv_i * xv_j, 0.0)
            s_gg -= tl.where(ok, xg_i * xg_j, 0.0)
        tl.store(pairs + stride + rows, s_cc, mask=live)
        tl.store(pairs + 2 * stride + rows, s_cv, mask=live)
        tl.store(pairs + 3 * stride + rows, s_vc, mask=live)
        tl.store(pairs + 4 * stride + rows, s_cg, mask=live)
        tl.store(pairs + 5 * stride + rows, s_vv, mask=live)
        tl.store(pairs + 6 * stride + rows, s_gg, mask=live)
    tl.debug_barrier()


@device_function
def pair_tile(tables, pairs, which, N, TRANSPOSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``(BLOCK_N, BLOCK_N)`` tile of pair sums ``which`` (its (i, j) for i < j, mirrored, or for
    the non-symmetric scv the (j, i) sums ``which + 1`` below the diagonal); 0 on the diagonal."""
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    count = tl.maximum(hdr(tables, P_PAIRS_C), 1)
    index = tl.load(
        sec(tables, S_PC_INDEX) + offs[:, None] * N + offs[None, :], mask=real[:, None] & real[None, :], other=-1
    )
    upper = offs[:, None] < offs[None, :]
    if TRANSPOSE:
        slot = tl.where(upper, which, which + 1)
    else:
        slot = tl.zeros((BLOCK_N, BLOCK_N), tl.int32) + which
    return tl.load(pairs + slot * count + index, mask=index >= 0, other=0.0)


@triton.jit(do_not_specialize=["batch", "vals_stride", "ws_stride", "max_iter"])
def _mf_lu_kernel(
    teachers_ptr,  # (N, 5) int64 teacher table (inputs.py)
    tables,  # int32 plan buffer (plan.py)
    weights_ptr,  # (N,) float64
    params_ptr,  # float64 launch parameters (inputs.py: PARAM_*)
    vals_ptr,  # (programs, vals_stride) VDT value rows (logits at T)
    ws_ptr,  # (programs, ws_stride) float64 workspaces (regions())
    system_ptr,  # (N, N) float64 mf-lf system (unused: the projection at v = 1 is mf-lf's fit)
    out_ptr,  # (B, K) soft labels
    iterations_ptr,  # (B,) int32 Newton steps in the scales
    converged_ptr,  # (B,) bool
    residual_ptr,  # (B,) largest scaled gradient in the free scales
    step_ptr,  # (B,) the last step's predicted largest change of a soft label
    abs_residual_ptr,  # (B,) unused (0)
    errors_ptr,  # (N, 4) int64
    batch,
    vals_stride,
    ws_stride,
    max_iter,
    IN_DT: tl.constexpr,
    VDT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    vals = vals_ptr + pid.to(tl.int64) * vals_stride
    ws = ws_ptr + pid.to(tl.int64) * ws_stride
    K = hdr(tables, P_K)
    N = hdr(tables, P_N)
    n = N - 1
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    inner = offs < n
    diagonal = offs[:, None] == offs[None, :]
    cols = tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_R)
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    eps64 = tl.full((), 2.220446049250313e-16, tl.float64)
    for b in range(pid, batch, programs):
        valid = read_sample(b, teachers_ptr, tables, vals, errors_ptr, params_ptr, IN_DT, VDT, True, BLOCK_R)
        v = tl.where(real, 1.0, 0.0).to(tl.float64)
        iterations = 0
        converged = 0
        residual = tl.zeros((), tl.float64)
        pred_out = tl.zeros((), tl.float64)
        active = valid
        iteration = 0
        running = 1
        while running != 0:
            c, f0 = project(tables, vals, ws, weights_ptr, v, N, BLOCK_N, BLOCK_R, BLOCK_T)
            # (loaded here, not hoisted above the loops: fewer registers live across the line search)
            a, _zv, u, moved, v_store, c_store, dc_store, st_store, pairs = regions(ws, tables)
            w = tl.load(weights_ptr + offs, mask=real, other=0.0)
            anchored = tl.load(sec(tables, S_ANCHOR) + offs, mask=real, other=1) != 0
            start, size = teacher_vector(tables, S_OFFSETS, N, BLOCK_N)
            count = size.to(tl.float64)
            class_ptr = sec(tables, S_CLASS_INDEX)
            # half the negative gradient in v, and the Hessian's diagonal blocks (halved)
            g = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            su = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            suu = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            d_cc = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            d_cv = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            d_cg = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            d_vv = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            d_gg = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
            for j0 in range(0, hdr(tables, P_TMAX_COL), BLOCK_T):
                j = j0 + cols[None, :]
                live = j < size[:, None]
                col = start[:, None] + j
                z = tl.load(vals + col, mask=live, other=0.0).to(tl.float64)
                cls = tl.load(class_ptr + col, mask=live, other=0)
                ul = tl.load(u + cls, mask=live, other=0.0)
                inv = 1.0 / tl.load(a + cls, mask=live, other=1.0)
                r = tl.where(live, z - v[:, None] * ul - c[:, None], 0.0)
                ul = tl.where(live, ul, 0.0)
                g += ul * r
                su += ul
                suu += ul * ul
                xc = w[:, None] * v[:, None]
                xv = w[:, None] * (v[:, None] * ul - r)
                xg = w[:, None] * v[:, None] * ul
                d_cc += tl.where(live, xc * inv * xc, 0.0)
                d_cv += tl.where(live, xc * inv * xv, 0.0)
                d_cg += tl.where(live, xc * inv * xg, 0.0)
                d_vv += tl.where(live, xv * inv * xv, 0.0)
                d_gg += tl.where(live, xg * inv * xg, 0.0)
            g = rsum(g, 1)
            cv = w * rsum(su, 1)
            vv = w * rsum(suu, 1)
            # anchors are held; so is a scale at its bound pushed outward, for this step
            held = anchored | ((v <= tl.load(params_ptr + PARAM_MIN_SCALE)) & (g <= 0)) | (~real)
            grad = tl.where(held, 0.0, w * g)
            res = rmax(tl.where(real, tl.abs(grad) / tl.maximum(vv, tiny), 0.0), 0)
            # the (c, v) Schur complement of u: blocks over (c_i, v_j)
            # (v_store and c_store hold v and c: the projection stored them)
            schur_pairs(tables, vals, weights_ptr, v_store, c_store, a, u, pairs, BLOCK_R)
            scc = pair_tile(tables, pairs, 1, N, False, BLOCK_N) + tl.where(
                diagonal, (w * count - rsum(d_cc, 1))[:, None], 0.0
            )
            # eliminate the free shifts (all but the last teacher's): scc's leading n x n block
            scc = tl.where(inner[:, None] & inner[None, :], scc, tl.where(diagonal, 1.0, 0.0))
            u_cc, p_cc, factored = cholesky(scc, n, BLOCK_N)
            exact = factored
            step = tl.zeros((BLOCK_N,), tl.float64)
            rhs = v * grad
            for coupling in tl.static_range(2):
                if (coupling == 0) | (~exact):
                    if coupling == 0:
                        scv = pair_tile(tables, pairs, 2, N, True, BLOCK_N) + tl.where(
                            diagonal, (cv - rsum(d_cv, 1))[:, None], 0.0
                        )
                        svv = pair_tile(tables, pairs, 5, N, False, BLOCK_N) + tl.where(
                            diagonal, (vv - rsum(d_vv, 1))[:, None], 0.0
                        )
                    else:
                        scv = pair_tile(tables, pairs, 4, N, False, BLOCK_N) + tl.where(
                            diagonal, (cv - rsum(d_cg, 1))[:, None], 0.0
                        )
                        svv = pair_tile(tables, pairs, 6, N, False, BLOCK_N) + tl.where(
                            diagonal, (vv - rsum(d_gg, 1))[:, None], 0.0
                        )
                    scv = tl.where(inner[:, None], scv, 0.0)
                    y = cholesky_solve_many(u_cc, p_cc, scv, n, BLOCK_N)
                    reduced = svv
                    for k in range(n):
                        reduced -= row_of(scv, k, BLOCK_N)[:, None] * row_of(y, k, BLOCK_N)[None, :]
                    reduced = v[:, None] * reduced * v[None, :]
                    if coupling == 0:
                        reduced -= tl.where(diagonal, (v * grad)[:, None], 0.0)
                    hold = held[:, None] | held[None, :]
                    reduced = tl.where(hold, tl.where(diagonal, 1.0, 0.0), reduced)
                    diag = rsum(tl.where(diagonal, reduced, 0.0), 1)
                    u_r, p_r, ok = cholesky(reduced, N, BLOCK_N)
                    solved = cholesky_solve(u_r, p_r, rhs, N, BLOCK_N)
                    ok = ok & factored
                    if coupling == 0:
                        exact = ok
                        step = tl.where(ok, solved, 0.0)
                    else:
                        step = tl.where(ok, solved, rhs / tl.maximum(tl.abs(diag), tiny))
            step = tl.where(held, 0.0, step)
            longest = rmax(tl.abs(step), 0)
            max_log_step = tl.load(params_ptr + PARAM_MAX_LOG_STEP)
            step = step * (max_log_step / tl.maximum(longest, max_log_step))
            # the step's first-order change of the soft labels at the reporting scale: the shifts and
            # u follow v through the linearised normal equations
            if exact:
                scv = pair_tile(tables, pairs, 2, N, True, BLOCK_N) + tl.where(
                    diagonal, (cv - rsum(d_cv, 1))[:, None], 0.0
                )
            else:
                scv = pair_tile(tables, pairs, 4, N, False, BLOCK_N) + tl.where(
                    diagonal, (cv - rsum(d_cg, 1))[:, None], 0.0
                )
            step_v = v * step
            x = cholesky_solve(u_cc, p_cc, tl.where(inner, rsum(scv * step_v[None, :], 1), 0.0), n, BLOCK_N)
            dc = tl.where(inner, -x, 0.0)
            store_vector(dc_store, dc, N, BLOCK_N)
            store_vector(st_store, step, N, BLOCK_N)
            scale = mean_scale(tables, weights_ptr, v, N, BLOCK_N)
            dscale = mean_scale(tables, weights_ptr, step_v, N, BLOCK_N)
            pred = predicted(
                tables,
                vals,
                weights_ptr,
                v_store,
                c_store,
                dc_store,
                st_store,
                a,
                u,
                moved,
                exact,
                scale,
                dscale,
                BLOCK_R,
            )
            if active != 0:
                residual = res
                pred_out = pred
            tol = tl.load(params_ptr + PARAM_TOL)
            done = (active != 0) & exact & (res <= tol) & (pred <= tol)
            if done:
                converged = 1
            slope = -2.0 * rsum(grad * v * step, 0)
            searching = (active != 0) & (~done) & (slope < 0) & (iteration < max_iter)
            trying = searching | done
            slack = 16.0 * eps64 * tl.abs(f0)
            t = tl.full((), 1.0, tl.float64)
            taken = tl.zeros((), tl.float64)
            accepted = 0
            halvings = 0
            max_halvings = tl.load(params_ptr + PARAM_MAX_HALVINGS).to(tl.int32)
            while trying & (halvings < max_halvings):
                min_scale = tl.load(params_ptr + PARAM_MIN_SCALE)
                armijo = tl.load(params_ptr + PARAM_ARMIJO)
                cand = tl.where(real, tl.maximum(v * tl.exp(t * step), min_scale), 0.0)
                _c, f = project(tables, vals, ws, weights_ptr, cand, N, BLOCK_N, BLOCK_R, BLOCK_T)
                ok = (f <= f0 + armijo * t * tl.minimum(slope, 0.0) + slack) & (f == f) & (tl.abs(f) < float("inf"))
                if ok:
                    taken = t
                    accepted = 1
                trying = trying & (~ok) & (~done)
                t = t * 0.5
                halvings += 1
            if accepted != 0:
                v = tl.where(real, tl.maximum(v * tl.exp(taken * step), tl.load(params_ptr + PARAM_MIN_SCALE)), 0.0)
                if ~done:
                    iterations += 1
            active = (searching & (accepted != 0)).to(tl.int32)
            running = active
            iteration += 1
        _c, _f = project(tables, vals, ws, weights_ptr, v, N, BLOCK_N, BLOCK_R, BLOCK_T)
        _a, _zv, u, _moved, _v, _cs, _dc, _st, _pairs = regions(ws, tables)
        scale = mean_scale(tables, weights_ptr, v, N, BLOCK_N)
        # u at the reporting scale, then softmax over covered classes
        top = tl.full((BLOCK_R,), float("-inf"), tl.float64)
        degree = sec(tables, S_CLASS_DEGREE)
        for k0 in range(0, K, BLOCK_R):
            k = k0 + lanes
            live = k < K
            us = tl.load(u + k, mask=live, other=0.0) * scale
            tl.store(u + k, us, mask=live)
            covered = tl.load(degree + k, mask=live, other=0) > 0
            top = tl.maximum(top, tl.where(live & covered, us, float("-inf")))
        tl.debug_barrier()
        masked_softmax(tables, u, rmax(top, 0), out_ptr + as_i64(b) * K, BLOCK_R)
        tl.store(iterations_ptr + b, iterations)
        tl.store(converged_ptr + b, converged != 0)
        tl.store(residual_ptr + b, residual.to(residual_ptr.dtype.element_ty))
        tl.store(step_ptr + b, pred_out.to(step_ptr.dtype.element_ty))
        tl.store(abs_residual_ptr + b, tl.zeros((), abs_residual_ptr.dtype.element_ty))
        tl.debug_barrier()


@device_function
def predicted(
    tables,
    vals,
    weights_ptr,
    v_store,
    c_store,
    dc_store,
    st_store,
    a,
    u,
    moved,
    exact,
    scale,
    dscale,
    BLOCK_R: tl.constexpr,
):
    """The step's largest first-order change of a soft label at the reporting scale:
    ``step_u_l = -sum_{i covers l} (w_i v_i dc_i + xv_i v_i step_i) / a_l``, ``moved = scale step_u +
    u dscale``, ``max_l |q_l (moved_l - q . moved)|`` with ``q = softmax(scale u)`` over covered classes."""
    K = hdr(tables, P_K)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    degree = sec(tables, S_CLASS_DEGREE)
    lanes = tl.arange(0, BLOCK_R)
    top = tl.full((BLOCK_R,), float("-inf"), tl.float64)
    for ch in range(hdr(tables, P_C_CHUNKS)):
        width = tl.load(width_ptr + ch)
        base = tl.load(base_ptr + ch)
        rows = ch * BLOCK_R + lanes
        live = rows < K
        ul = tl.load(u + rows, mask=live, other=0.0)
        acc = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            t = tl.load(tch_ptr + at)
            ok = t >= 0
            wi = tl.load(weights_ptr + t, mask=ok, other=0.0)
            vi = tl.load(v_store + t, mask=ok, other=0.0)
            ci = tl.load(c_store + t, mask=ok, other=0.0)
            dci = tl.load(dc_store + t, mask=ok, other=0.0)
            si = tl.load(st_store + t, mask=ok, other=0.0)
            z = tl.load(vals + tl.load(col_ptr + at), mask=ok, other=0.0).to(tl.float64)
            r = z - vi * ul - ci
            xv = tl.where(exact, wi * (vi * ul - r), wi * vi * ul)
            acc += tl.where(ok, wi * vi * dci + xv * vi * si, 0.0)
        step_u = -acc / tl.load(a + rows, mask=live, other=1.0)
        tl.store(moved + rows, scale * step_u + ul * dscale, mask=live)
        covered = tl.load(degree + rows, mask=live, other=0) > 0
        top = tl.maximum(top, tl.where(live & covered, ul * scale, float("-inf")))
    tl.debug_barrier()
    top_s = rmax(top, 0)
    total = tl.zeros((BLOCK_R,), tl.float64)
    dot = tl.zeros((BLOCK_R,), tl.float64)
    for k0 in range(0, K, BLOCK_R):
        k = k0 + lanes
        live = k < K
        covered = tl.load(degree + k, mask=live, other=0) > 0
        ql = tl.exp(tl.where(covered, tl.load(u + k, mask=live, other=0.0) * scale - top_s, float("-inf")))
        total += ql
        dot += ql * tl.load(moved + k, mask=live, other=0.0)
    s = rsum(total, 0)
    d = rsum(dot, 0)
    worst = tl.zeros((BLOCK_R,), tl.float64)
    for k0 in range(0, K, BLOCK_R):
        k = k0 + lanes
        live = k < K
        covered = tl.load(degree + k, mask=live, other=0) > 0
        ql = tl.exp(tl.where(covered, tl.load(u + k, mask=live, other=0.0) * scale - top_s, float("-inf")))
        m = tl.load(moved + k, mask=live, other=0.0)
        worst = tl.maximum(worst, tl.abs(ql / s * (m - d / s)))
    return rmax(worst, 0)
