"""`mf-p`: rank-one factorisation of the teachers' probabilities, one sample per program.

The algorithm, rules and convergence test of ``uhc_fast/reference/mf_p.py`` and
``csrc/core/mf_p.h``, in float64: start from the `ce` estimate (the same device code as the `ce`
kernel, run in the same program), the scales from one ALS half-sweep; then Newton steps in log
scale on the N scales (one held, the gauge: the heaviest teacher, of those the largest), an ALS
half-sweep where the Hessian is not positive definite, steps capped at ``max_log_step``, Armijo
backtracking on the objective evaluated as the sum of squares it is (slope clamped at 0);
converged when the coordinate Newton steps and the step's largest change of a soft label are
<= tol and the Hessian is positive definite.

Work per Newton step: the fit ``q_l = A_l / B_l`` is a pass over the class table; gradient,
Hessian diagonal and objective are teacher passes over the packed columns; the Hessian's
off-diagonal ``-sum_l e_il e_jl / B_l`` is a pass over the teacher pairs' shared classes
(``sum_l d_l (d_l - 1) / 2`` terms, not ``N^2 K``); the ``N x N`` Cholesky runs on a register tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import ce as _ce
from ._common import (
    P_C_CHUNKS,
    P_K,
    P_N,
    P_PAIRS_C,
    P_PAIRS_G,
    P_PC_CHUNKS,
    P_TMAX_COL,
    S_C_BASE,
    S_C_COL,
    S_C_TCH,
    S_C_WIDTH,
    S_CLASS_GROUP,
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
from .inputs import PARAM_ARMIJO, PARAM_MAX_HALVINGS, PARAM_MAX_LOG_STEP, PARAM_TOL, read_sample
from .linalg import cholesky, cholesky_solve


def workspace(sizes: dict) -> tuple[int, int]:
    """``(value row, float64 workspace)`` per program: `ce`'s, then q, B, the step's change of q
    (K each), two teacher vectors (N each) and the pairs' Hessian entries."""
    vals, ce_ws = _ce.workspace(sizes)
    return vals, ce_ws + 3 * sizes["K"] + 2 * sizes["N"] + max(1, sizes["pairs_c"])


@device_function
def regions(ws, tables):
    """``(q, B, moved, v, dv, pairs)`` after `ce`'s regions."""
    K = hdr(tables, P_K)
    N = hdr(tables, P_N)
    _n, _e, _ng, _mg, _dg, _xg, _mm, _yg, _tv0, _tv1, ce_pairs = _ce.regions(ws, tables)
    q = ce_pairs + tl.maximum(hdr(tables, P_PAIRS_G), 1)
    big_b = q + K
    moved = big_b + K
    v_store = moved + K
    dv_store = v_store + N
    pairs = dv_store + N
    return q, big_b, moved, v_store, dv_store, pairs


@device_function
def fit(tables, vals, weights_ptr, v_store, q, big_b, BLOCK_R: tl.constexpr):
    """``q_l = A_l / B_l`` (``A_l = sum w_i v_i p_il``, ``B_l = sum w_i v_i^2``) for the scales in
    ``v_store``, into ``q`` and ``big_b``; returns ``sum_l q_l``."""
    K = hdr(tables, P_K)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    lanes = tl.arange(0, BLOCK_R)
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    total = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_C_CHUNKS)):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        live = rows < K
        a = tl.zeros((BLOCK_R,), tl.float64)
        b = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            t = tl.load(tch_ptr + at)
            ok = t >= 0
            wv = tl.load(weights_ptr + t, mask=ok, other=0.0) * tl.load(v_store + t, mask=ok, other=0.0)
            a += wv * tl.load(vals + tl.load(col_ptr + at), mask=ok, other=0.0).to(tl.float64)
            b += wv * tl.load(v_store + t, mask=ok, other=0.0)
        ql = tl.where(b > 0, a / tl.maximum(b, tiny), 0.0)
        tl.store(q + rows, ql, mask=live)
        tl.store(big_b + rows, b, mask=live)
        total += tl.where(live, ql, 0.0)
    tl.debug_barrier()
    return rsum(total, 0)


@device_function
def teacher_stats(
    tables, vals, weights_ptr, q, big_b, v, N, HESSIAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Per teacher over its columns: ``(sum q (p - v q), sum q^2, sum p q, sum (w (p - 2 q v))^2 / B,
    sum (p - v q)^2)`` (the fourth only with ``HESSIAN``, else 0)."""
    start, size = teacher_vector(tables, S_OFFSETS, N, BLOCK_N)
    class_ptr = sec(tables, S_CLASS_INDEX)
    offs = tl.arange(0, BLOCK_N)
    w = tl.load(weights_ptr + offs, mask=offs < N, other=0.0)
    cols = tl.arange(0, BLOCK_T)
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    g = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    qq = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    pq = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    hd = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    ff = tl.zeros((BLOCK_N, BLOCK_T), tl.float64)
    for j0 in range(0, hdr(tables, P_TMAX_COL), BLOCK_T):
        j = j0 + cols[None, :]
        live = j < size[:, None]
        col = start[:, None] + j
        p = tl.load(vals + col, mask=live, other=0.0).to(tl.float64)
        cls = tl.load(class_ptr + col, mask=live, other=0)
        ql = tl.load(q + cls, mask=live, other=0.0)
        r = p - v[:, None] * ql
        g += ql * r
        qq += ql * ql
        pq += p * ql
        if HESSIAN:
            bl = tl.load(big_b + cls, mask=live, other=1.0)
            e = w[:, None] * (p - 2.0 * ql * v[:, None])
            hd += tl.where(live, e * (e / tl.maximum(bl, tiny)), 0.0)
        ff += r * r
    return rsum(g, 1), rsum(qq, 1), rsum(pq, 1), rsum(hd, 1), rsum(w * rsum(ff, 1), 0)


@device_function
def objective(
    tables,
    vals,
    weights_ptr,
    v,
    v_store,
    q,
    big_b,
    N,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``sum_i w_i sum_{l in L_i} (p_il - v_i q_l(v))^2``, evaluated as the sum of squares it is."""
    _ce.store_vector(v_store, v, N, BLOCK_N)
    fit(tables, vals, weights_ptr, v_store, q, big_b, BLOCK_R)
    _g, _qq, _pq, _hd, f = teacher_stats(tables, vals, weights_ptr, q, big_b, v, N, False, BLOCK_N, BLOCK_T)
    return f


@device_function
def pair_hessian(tables, vals, weights_ptr, v_store, q, big_b, pairs, BLOCK_R: tl.constexpr):
    """``-sum_{l in L_i and L_j} e_il e_jl / B_l`` per teacher pair sharing classes, into ``pairs``."""
    width_ptr = sec(tables, S_PC_WIDTH)
    base_ptr = sec(tables, S_PC_BASE)
    cls_ptr = sec(tables, S_PC_CLS)
    coli_ptr = sec(tables, S_PC_COLI)
    colj_ptr = sec(tables, S_PC_COLJ)
    count = hdr(tables, P_PAIRS_C)
    lanes = tl.arange(0, BLOCK_R)
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    for c in range(hdr(tables, P_PC_CHUNKS)):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        live = rows < count
        ti = tl.load(sec(tables, S_PC_I) + rows, mask=live, other=0)
        tj = tl.load(sec(tables, S_PC_J) + rows, mask=live, other=0)
        wi = tl.load(weights_ptr + ti)
        wj = tl.load(weights_ptr + tj)
        vi = tl.load(v_store + ti)
        vj = tl.load(v_store + tj)
        acc = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            cls = tl.load(cls_ptr + at)
            ok = cls >= 0
            ql = tl.load(q + cls, mask=ok, other=0.0)
            bl = tl.load(big_b + cls, mask=ok, other=1.0)
            pi = tl.load(vals + tl.load(coli_ptr + at), mask=ok, other=0.0).to(tl.float64)
            pj = tl.load(vals + tl.load(colj_ptr + at), mask=ok, other=0.0).to(tl.float64)
            ei = wi * (pi - 2.0 * ql * vi)
            ej = wj * (pj - 2.0 * ql * vj)
            acc -= tl.where(ok, ei / tl.maximum(bl, tiny) * ej, 0.0)
        tl.store(pairs + rows, acc, mask=live)
    tl.debug_barrier()


@device_function
def pair_tile(tables, pairs, N, BLOCK_N: tl.constexpr):
    """The ``(BLOCK_N, BLOCK_N)`` tile of the pairs' values (0 on the diagonal and where no class is shared)."""
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    index = tl.load(
        sec(tables, S_PC_INDEX) + offs[:, None] * N + offs[None, :], mask=real[:, None] & real[None, :], other=-1
    )
    return tl.load(pairs + index, mask=index >= 0, other=0.0)


@device_function
def predicted_change(tables, vals, weights_ptr, v_store, dv_store, q, big_b, moved, total, BLOCK_R: tl.constexpr):
    """The step's largest first-order change of a normalised soft label."""
    K = hdr(tables, P_K)
    width_ptr = sec(tables, S_C_WIDTH)
    base_ptr = sec(tables, S_C_BASE)
    tch_ptr = sec(tables, S_C_TCH)
    col_ptr = sec(tables, S_C_COL)
    lanes = tl.arange(0, BLOCK_R)
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    moved_total = tl.zeros((BLOCK_R,), tl.float64)
    for c in range(hdr(tables, P_C_CHUNKS)):
        width = tl.load(width_ptr + c)
        base = tl.load(base_ptr + c)
        rows = c * BLOCK_R + lanes
        live = rows < K
        ql = tl.load(q + rows, mask=live, other=0.0)
        bl = tl.load(big_b + rows, mask=live, other=0.0)
        acc = tl.zeros((BLOCK_R,), tl.float64)
        for j in range(width):
            at = base + j * BLOCK_R + lanes
            t = tl.load(tch_ptr + at)
            ok = t >= 0
            w = tl.load(weights_ptr + t, mask=ok, other=0.0)
            vi = tl.load(v_store + t, mask=ok, other=0.0)
            dvi = tl.load(dv_store + t, mask=ok, other=0.0)
            p = tl.load(vals + tl.load(col_ptr + at), mask=ok, other=0.0).to(tl.float64)
            acc += w * (p - 2.0 * ql * vi) * dvi
        m = tl.where(bl > 0, acc / tl.maximum(bl, tiny) / total, 0.0)
        tl.store(moved + rows, m, mask=live)
        moved_total += tl.where(live, m, 0.0)
    tl.debug_barrier()
    mt = rsum(moved_total, 0)
    worst = tl.zeros((BLOCK_R,), tl.float64)
    for k0 in range(0, K, BLOCK_R):
        k = k0 + lanes
        live = k < K
        m = tl.load(moved + k, mask=live, other=0.0)
        ql = tl.load(q + k, mask=live, other=0.0)
        worst = tl.maximum(worst, tl.where(live, tl.abs(m - ql / total * mt), 0.0))
    return rmax(worst, 0)


@triton.jit(do_not_specialize=["batch", "vals_stride", "ws_stride", "max_iter", "ce_max_iter"])
def _mf_p_kernel(
    teachers_ptr,  # (N, 5) int64 teacher table (inputs.py)
    tables,  # int32 plan buffer (plan.py)
    weights_ptr,  # (N,) float64
    params_ptr,  # float64 launch parameters (inputs.py: PARAM_*)
    vals_ptr,  # (programs, vals_stride) VDT value rows
    ws_ptr,  # (programs, ws_stride) float64 workspaces (regions())
    out_ptr,  # (B, K) soft labels
    iterations_ptr,  # (B,) int32 steps in v
    converged_ptr,  # (B,) bool
    residual_ptr,  # (B,) largest coordinate Newton step in log scale
    step_ptr,  # (B,) the last step's predicted largest change of a soft label
    abs_residual_ptr,  # (B,) unused (0)
    errors_ptr,  # (N, 4) int64
    batch,
    vals_stride,
    ws_stride,
    max_iter,
    ce_max_iter,  # the step cap of the `ce` start
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
    offs = tl.arange(0, BLOCK_N)
    real = offs < N
    idx_r = offs[:, None]
    idx_c = offs[None, :]
    tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
    eps64 = tl.full((), 2.220446049250313e-16, tl.float64)
    lanes = tl.arange(0, BLOCK_R)
    for b in range(pid, batch, programs):
        valid = read_sample(b, teachers_ptr, tables, vals, errors_ptr, params_ptr, IN_DT, VDT, False, BLOCK_R)
        Z, _it, _cv, _res, _abs, _st = _ce.ce_solve(
            tables, vals, ws, weights_ptr, params_ptr, valid, ce_max_iter, BLOCK_N, BLOCK_R, BLOCK_T
        )
        n_cls, _e, _ng, _mg, dg, _xg, _mm, _yg, _tv0, _tv1, _cp = _ce.regions(ws, tables)
        q, big_b, moved, v_store, dv_store, pairs = regions(ws, tables)
        # the ce estimate into q, then the v-half of an ALS sweep from it
        group_ptr = sec(tables, S_CLASS_GROUP)
        for k0 in range(0, K, BLOCK_R):
            k = k0 + lanes
            live = k < K
            d = tl.load(dg + tl.load(group_ptr + k, mask=live, other=0), mask=live, other=1.0)
            tl.store(q + k, tl.load(n_cls + k, mask=live, other=0.0) / (d * Z), mask=live)
        tl.debug_barrier()
        w = tl.load(weights_ptr + offs, mask=real, other=0.0)
        _g, qq, pq, _hd, _f = teacher_stats(tables, vals, weights_ptr, q, big_b, w * 0.0, N, False, BLOCK_N, BLOCK_T)
        v = tl.where(real, pq / tl.maximum(qq, tiny), 0.0)
        # the scale gauge: the heaviest teacher, of those the one with the most classes (the first)
        heaviest = real & (w == rmax(tl.where(real, w, 0.0), 0))
        _start, size = teacher_vector(tables, S_OFFSETS, N, BLOCK_N)
        most = rmax(tl.where(heaviest, size, -1), 0)
        held = -rmax(tl.where(heaviest & (size == most), -offs, -BLOCK_N), 0)

        iterations = 0
        converged = 0
        residual = tl.zeros((), tl.float64)
        pred_out = tl.zeros((), tl.float64)
        active = valid
        iteration = 0
        running = 1
        while running != 0:
            # (loaded here, not hoisted above the loops: fewer registers live across the line search)
            q, big_b, moved, v_store, dv_store, pairs = regions(ws, tables)
            w = tl.load(weights_ptr + offs, mask=real, other=0.0)
            is_held = offs == held
            _ce.store_vector(v_store, v, N, BLOCK_N)
            total = fit(tables, vals, weights_ptr, v_store, q, big_b, BLOCK_R)
            g, qq, pq, hd, f0 = teacher_stats(tables, vals, weights_ptr, q, big_b, v, N, True, BLOCK_N, BLOCK_T)
            grad = w * g  # half the negative gradient in v
            pair_hessian(tables, vals, weights_ptr, v_store, q, big_b, pairs, BLOCK_R)
            off = pair_tile(tables, pairs, N, BLOCK_N)
            gs = v * grad
            diag = v * v * (w * qq - hd) - gs
            hess = v[:, None] * v[None, :] * off + tl.where(idx_r == idx_c, diag[:, None], 0.0)
            hold = is_held[:, None] | is_held[None, :]
            hess = tl.where(hold, tl.where(idx_r == idx_c, 1.0, 0.0), hess)
            hess = tl.where(real[:, None] & real[None, :], hess, tl.where(idx_r == idx_c, 1.0, 0.0))
            coord = tl.where(is_held | (~real), 0.0, tl.abs(gs) / tl.maximum(tl.abs(diag), tiny))
            res = rmax(coord, 0)
            u, pivots, factored = cholesky(hess, N, BLOCK_N)
            newton = cholesky_solve(u, pivots, tl.where(is_held | (~real), 0.0, gs), N, BLOCK_N)
            finite = rsum(tl.where(real & ((newton - newton) != 0.0), 1, 0), 0) == 0
            exact = factored & finite
            als = tl.log(tl.maximum(pq / tl.maximum(qq, tiny), tiny) / tl.where(real, v, 1.0))
            step = tl.where(is_held | (~real), 0.0, tl.where(exact, newton, als))
            longest = rmax(tl.abs(step), 0)
            max_log_step = tl.load(params_ptr + PARAM_MAX_LOG_STEP)
            step = step * (max_log_step / tl.maximum(longest, max_log_step))
            dv = v * step
            _ce.store_vector(dv_store, dv, N, BLOCK_N)
            pred = predicted_change(tables, vals, weights_ptr, v_store, dv_store, q, big_b, moved, total, BLOCK_R)
            if active != 0:
                residual = res
                pred_out = pred
            tol = tl.load(params_ptr + PARAM_TOL)
            done = (active != 0) & exact & (res <= tol) & (pred <= tol)
            if done:
                converged = 1
            slope = -2.0 * rsum(grad * dv, 0)
            searching = (active != 0) & (~done) & (slope < 0) & (iteration < max_iter)
            trying = searching | done
            slack = 16.0 * eps64 * tl.abs(f0)
            a = tl.full((), 1.0, tl.float64)
            taken = tl.zeros((), tl.float64)
            accepted = 0
            halvings = 0
            max_halvings = tl.load(params_ptr + PARAM_MAX_HALVINGS).to(tl.int32)
            while trying & (halvings < max_halvings):
                armijo = tl.load(params_ptr + PARAM_ARMIJO)
                cand = v * tl.exp(a * step)
                f = objective(tables, vals, weights_ptr, cand, v_store, q, big_b, N, BLOCK_N, BLOCK_R, BLOCK_T)
                ok = (f <= f0 + armijo * a * tl.minimum(slope, 0.0) + slack) & (f == f) & (tl.abs(f) < float("inf"))
                if ok:
                    taken = a
                    accepted = 1
                trying = trying & (~ok) & (~done)
                a = a * 0.5
                halvings += 1
            v = v * tl.exp(taken * step)
            if (accepted != 0) & (~done):
                iterations += 1
            active = (searching & (accepted != 0)).to(tl.int32)
            running = active
            iteration += 1
        q, big_b, moved, v_store, dv_store, pairs = regions(ws, tables)
        _ce.store_vector(v_store, v, N, BLOCK_N)
        total = fit(tables, vals, weights_ptr, v_store, q, big_b, BLOCK_R)
        out_row = out_ptr + as_i64(b) * K
        for k0 in range(0, K, BLOCK_R):
            k = k0 + lanes
            live = k < K
            tl.store(
                out_row + k, (tl.load(q + k, mask=live, other=0.0) / total).to(out_ptr.dtype.element_ty), mask=live
            )
        tl.store(iterations_ptr + b, iterations)
        tl.store(converged_ptr + b, converged != 0)
        tl.store(residual_ptr + b, residual.to(residual_ptr.dtype.element_ty))
        tl.store(step_ptr + b, pred_out.to(step_ptr.dtype.element_ty))
        tl.store(abs_residual_ptr + b, tl.zeros((), abs_residual_ptr.dtype.element_ty))
        tl.debug_barrier()
