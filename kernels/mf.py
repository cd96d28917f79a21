"""Matrix-factorisation methods, each a single launch: `mf-lf`, `mf-p`, `mf-lu`.

Same objectives, starts, steps and residuals as :mod:`uhc_fast.reference.mf`:

- `mf-lf`: closed form. Per sample ``zbar_l = sum_i w_i z_il / W_l`` and
  ``b_i = sum_{l in L_i} (z_il - zbar_l)``; ``c = G^+ b`` with the mask-only ``(N, N)`` matrix
  ``G^+`` computed once on the host (:func:`uhc_fast.reference.mf_lf_system`); then
  ``u_l = zbar_l - sum_i w_i c_i / W_l`` and ``q = softmax(u)`` over covered classes. Three
  passes over the row, all in cache.
- `mf-p`: the `ce` solve (the same device function the `ce` kernel runs) gives the start, then
  Newton steps in the teacher scales ``v`` with an alternating-least-squares step wherever the
  gauge-fixed Hessian is not positive definite (detected by the on-chip elimination's pivots),
  and the same backtracking line search.
- `mf-lu`: damped Gauss-Newton in ``(u, c, v)`` from the `mf-lf` solution; ``u`` (K values) is kept
  in the output row, ``c`` and ``v`` in registers; the ``2N x 2N`` Schur system is solved by block
  elimination of its two ``N x N`` blocks on chip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    compute_dtype,
    device_function,
    gather,
    launch_geometry,
    map_tile,
    rmax,
    rsum,
    solution_buffers,
    spd_solve,
    spd_solve_many,
)
from .ce import ce_solve_row

# The `ce` start of mf-p uses the `ce` solver's own default step cap, as the reference does.
_CE_START_MAX_ITER = 100


# ====================================================================== mf-lf
@device_function
def _lf_chunk(row_ptr, w, c, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K):
    """On classes ``k0:k0+BLOCK_K``: ``(z, present, offs_k, covered, zbar, u)`` for teacher shifts ``c``."""
    col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
    z = gather(row_ptr, col, present, DT)
    m = present.to(DT)
    class_weight = rsum(w[:, None] * m, axis=0)
    covered = class_weight > 0
    safe = tl.where(covered, class_weight, 1.0)
    zbar = rsum(w[:, None] * z, axis=0) / safe
    u = zbar - rsum(w[:, None] * m * c[:, None], axis=0) / safe
    return z, present, offs_k, covered, zbar, u


@device_function
def _lf_shifts(row_ptr, w, gp, colmap_ptr, num_teachers, num_classes, DT, BLOCK_N, BLOCK_K):
    """The mf-lf teacher shifts ``c = G^+ b`` of one sample."""
    b = tl.zeros((BLOCK_N,), dtype=DT)
    zero = tl.zeros((BLOCK_N,), dtype=DT)
    for k0 in range(0, num_classes, BLOCK_K):
        z, present, _offs_k, _covered, zbar, _u = _lf_chunk(
            row_ptr, w, zero, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K
        )
        b += rsum(tl.where(present, z - zbar[None, :], 0.0), axis=1)
    return rsum(gp * b[None, :], axis=1)


@triton.jit
def _mf_lf_kernel(
    values_ptr,  # (B, nnz) packed teacher logits, any float dtype
    weights_ptr,  # (N,)
    gp_ptr,  # (N, N) G^+ of the eliminated normal equations, DT
    colmap_ptr,  # (N, K) int32
    out_ptr,  # (B, K) soft labels, DT
    batch,
    nnz,
    num_teachers,
    num_classes,
    rows_per_program,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_n < num_teachers
    w = tl.load(weights_ptr + offs_n, mask=real, other=0.0).to(DT)
    gp = tl.load(
        gp_ptr + offs_n[:, None] * num_teachers + offs_n[None, :], mask=real[:, None] & real[None, :], other=0.0
    ).to(DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        row_ptr = values_ptr + row * nnz
        out_row = out_ptr + row * num_classes
        c = _lf_shifts(row_ptr, w, gp, colmap_ptr, num_teachers, num_classes, DT, BLOCK_N, BLOCK_K)
        top = tl.full((), float("-inf"), DT)
        sum_exp = tl.zeros((), dtype=DT)
        for k0 in range(0, num_classes, BLOCK_K):
            _z, _present, offs_k, covered, _zbar, u = _lf_chunk(
                row_ptr, w, c, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K
            )
            top, sum_exp = _online_softmax(u, covered & (offs_k < num_classes), top, sum_exp)
        for k0 in range(0, num_classes, BLOCK_K):
            _z, _present, offs_k, covered, _zbar, u = _lf_chunk(
                row_ptr, w, c, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K
            )
            soft = tl.where(covered, tl.exp(u - top) / sum_exp, 0.0)
            tl.store(out_row + offs_k, soft, mask=offs_k < num_classes)


@device_function
def _online_softmax(u, keep, top, sum_exp):
    """Fold one chunk of logits (where ``keep``) into a running ``(max, sum exp(u - max))``."""
    new_top = tl.maximum(top, rmax(tl.where(keep, u, float("-inf")), axis=0))
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
    rescale = tl.where(top == float("-inf"), 0.0, tl.exp(top - shift))
    sum_exp = sum_exp * rescale + rsum(tl.where(keep, tl.exp(u - shift), 0.0), axis=0)
    return new_top, sum_exp


# ====================================================================== mf-p
@device_function
def _mfp_stats(
    row_ptr,
    inv,
    v,
    w,
    colmap_ptr,
    num_teachers,
    num_classes,
    TINY: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HESSIAN: tl.constexpr,
):
    """At teacher scales ``v``, with the optimal unnormalised ``q_l = A_l / B_l``:
    ``(sum q, sum_{L_i} p q, sum_{L_i} q^2, sum_l e_jl e_kl / B_l, -sum_l A_l^2 / B_l)``,
    ``e_il = p_il - 2 q_l v_i`` (the ``e`` term only when ``HESSIAN``); ``p = inv_i x`` stored value."""
    tiny = tl.full((), TINY, DT)
    s = tl.zeros((), dtype=DT)
    pq = tl.zeros((BLOCK_N,), dtype=DT)
    qq = tl.zeros((BLOCK_N,), dtype=DT)
    ee = tl.zeros((BLOCK_N, BLOCK_N), dtype=DT)
    objective = tl.zeros((), dtype=DT)
    for k0 in range(0, num_classes, BLOCK_K):
        col, present, _offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
        p = inv[:, None] * gather(row_ptr, col, present, DT)
        m = present.to(DT)
        a = rsum((w * v)[:, None] * p, axis=0)
        b = tl.maximum(rsum((w * v * v)[:, None] * m, axis=0), tiny)
        has = rsum((w * v * v)[:, None] * m, axis=0) > 0
        q = tl.where(has, a / b, 0.0)
        s += rsum(q, axis=0)
        pq += rsum(p * q[None, :], axis=1)
        qq += rsum(m * (q * q)[None, :], axis=1)
        objective -= rsum(a * a / b, axis=0)
        if HESSIAN:
            e = m * (p - 2 * q[None, :] * v[:, None])
            # ieee: the Hessian is a difference of two close terms
            ee += tl.dot(e / b[None, :], tl.trans(e), input_precision="ieee")
    return s, pq, qq, ee, objective


@device_function
def _mfp_objective(row_ptr, inv, v, w, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K):
    _unused0, _unused1, _unused2, _unused3, objective = _mfp_stats(
        row_ptr, inv, v, w, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K, False
    )
    return objective


@triton.jit
def _mf_p_kernel(
    values_ptr,  # (B, nnz) packed teacher probabilities, any float dtype
    weights_ptr,  # (N,)
    colmap_ptr,  # (N, K) int32
    out_ptr,  # (B, K) soft labels, DT
    iterations_ptr,  # (B,) int32 Newton/ALS steps in v
    residual_ptr,  # (B,) DT: max_i |df/dv_i| / sum w
    batch,
    nnz,
    num_teachers,
    num_classes,
    rows_per_program,
    tol,
    max_iter,
    ce_max_iter,  # step cap of the `ce` start
    EPS: tl.constexpr,
    TINY: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_n < num_teachers
    eye = offs_n[:, None] == offs_n[None, :]
    block = real[:, None] & real[None, :]
    w = tl.load(weights_ptr + offs_n, mask=real, other=0.0).to(DT)
    total = rsum(w, axis=0)
    tiny = tl.full((), TINY, DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        row_ptr = values_ptr + row * nnz
        out_row = out_ptr + row * num_classes
        _iterations, _residual, inv = ce_solve_row(
            row_ptr,
            out_row,
            w,
            colmap_ptr,
            num_teachers,
            num_classes,
            tol,
            ce_max_iter,
            EPS,
            TINY,
            DT,
            BLOCK_N,
            BLOCK_K,
        )
        # v from the ce estimate: the v-half of an ALS sweep
        pq = tl.zeros((BLOCK_N,), dtype=DT)
        qq = tl.zeros((BLOCK_N,), dtype=DT)
        for k0 in range(0, num_classes, BLOCK_K):
            col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            q = tl.load(out_row + offs_k, mask=offs_k < num_classes, other=0.0)
            p = inv[:, None] * gather(row_ptr, col, present, DT)
            pq += rsum(p * q[None, :], axis=1)
            qq += rsum(tl.where(present, (q * q)[None, :], 0.0), axis=1)
        v = tl.where(real, pq / tl.maximum(qq, tiny), 0.0)

        iterations = 0
        residual = tl.zeros((), dtype=DT)
        running = 1
        while running:
            s, pq, qq, ee, f0 = _mfp_stats(
                row_ptr, inv, v, w, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K, True
            )
            # normalise q to sum 1 (v scales inversely): gradient and Hessian follow by s and s^2
            grad = -2 * w * (pq - qq * v) / s
            v = v * s
            residual = rmax(tl.abs(grad), axis=0) / total
            if (residual > tol) & (iterations < max_iter):
                hess = tl.where(eye, (2 * w * qq)[:, None], 0.0) - 2 * w[:, None] * w[None, :] * ee
                hess = hess / (s * s)
                level = rsum(tl.where(eye & block, tl.abs(hess), 0.0), axis=1)
                level = rsum(level, axis=0) / num_teachers
                direction = v / tl.sqrt(rsum(v * v, axis=0))
                hess += level * direction[:, None] * direction[None, :]  # gauge: v's scale is free
                hess = tl.where(block, hess, tl.where(eye, 1.0, 0.0))
                delta, ok = spd_solve(hess, -grad, num_teachers, BLOCK_N)
                als = s * pq / tl.maximum(qq, tiny) - v
                delta = tl.where(real, tl.where(ok, delta, als), 0.0)

                slope = tl.minimum(rsum(grad * delta, axis=0), 0.0)
                slack = 16 * EPS * tl.abs(f0)
                floor = 1e-12 * rmax(v, axis=0)
                scale = tl.full((), 1.0, DT)
                accepted = 0
                halvings = 0
                v_new = v
                while (accepted == 0) & (halvings < 40):
                    cand = tl.where(real, tl.maximum(v + scale * delta, floor), 0.0)
                    f = _mfp_objective(
                        row_ptr, inv, cand, w, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K
                    )
                    ok_step = f <= f0 + 1e-4 * scale * slope + slack
                    v_new = tl.where(ok_step, cand, v_new)
                    accepted = ok_step.to(tl.int32)
                    scale = tl.where(ok_step, scale, scale * 0.5)
                    halvings += 1
                v = v_new
                iterations += 1
            else:
                running = 0

        # v is normalised (sum q = 1) after the last pass above; write q = A / B
        s, _unused4, _unused5, _unused6, _unused7 = _mfp_stats(
            row_ptr, inv, v, w, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K, False
        )
        for k0 in range(0, num_classes, BLOCK_K):
            col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            p = inv[:, None] * gather(row_ptr, col, present, DT)
            m = present.to(DT)
            a = rsum((w * v)[:, None] * p, axis=0)
            bsum = rsum((w * v * v)[:, None] * m, axis=0)
            q = tl.where(bsum > 0, a / tl.maximum(bsum, tiny), 0.0) / s
            tl.store(out_row + offs_k, q, mask=offs_k < num_classes)
        tl.store(iterations_ptr + row, iterations)
        tl.store(residual_ptr + row, residual)


# ====================================================================== mf-lu
@device_function
def _lu_chunk(row_ptr, out_row, u_scale, c, v, w, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K):
    """On classes ``k0:k0+BLOCK_K``: ``(m, offs_k, covered, u, z, r, grad_u)``.

    ``r = M o (z - v u - c)`` is the residual tile and ``grad_u_l = sum_i w_i v_i r_il`` half the
    negative gradient in ``u``.
    """
    col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
    m = present.to(DT)
    covered = rsum(m, axis=0) > 0
    u = u_scale * tl.load(out_row + offs_k, mask=offs_k < num_classes, other=0.0)
    z = gather(row_ptr, col, present, DT)
    r = m * (z - v[:, None] * u[None, :] - c[:, None])
    grad_u = rsum((w * v)[:, None] * r, axis=0)
    return m, offs_k, covered, u, z, r, grad_u


@device_function
def _lu_step_u(m, u, grad_u, covered, w, v, step_c, step_v, damping):
    """``a_l`` (the diagonal u-block) and the u part of the Gauss-Newton step on one chunk."""
    a = tl.where(covered, rsum((w * v * v)[:, None] * m, axis=0), 1.0) + damping
    xc = (w * v)[:, None] * m
    coupled = rsum(xc * (step_c[:, None] + step_v[:, None] * u[None, :]), axis=0)
    return a, (grad_u - coupled) / a


@triton.jit
def _mf_lu_kernel(
    values_ptr,  # (B, nnz) packed teacher logits, any float dtype
    weights_ptr,  # (N,)
    gp_ptr,  # (N, N) mf-lf's G^+, DT (the start)
    colmap_ptr,  # (N, K) int32
    out_ptr,  # (B, K) soft labels, DT (holds u while solving)
    iterations_ptr,  # (B,) int32 Gauss-Newton steps
    residual_ptr,  # (B,) DT largest diagonally scaled gradient entry (see the reference)
    batch,
    nnz,
    num_teachers,
    num_classes,
    rows_per_program,
    tol,
    max_iter,
    EPS: tl.constexpr,
    TINY: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_n < num_teachers
    eye = offs_n[:, None] == offs_n[None, :]
    block = real[:, None] & real[None, :]
    w = tl.load(weights_ptr + offs_n, mask=real, other=0.0).to(DT)
    total = rsum(w, axis=0)
    tiny = tl.full((), TINY, DT)
    gp = tl.load(gp_ptr + offs_n[:, None] * num_teachers + offs_n[None, :], mask=block, other=0.0).to(DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        row_ptr = values_ptr + row * nnz
        out_row = out_ptr + row * num_classes
        # start: mf-lf's (u, c) with v = 1; u parked in the output row
        c = _lf_shifts(row_ptr, w, gp, colmap_ptr, num_teachers, num_classes, DT, BLOCK_N, BLOCK_K)
        for k0 in range(0, num_classes, BLOCK_K):
            z, present, offs_k, covered, _zbar, u = _lf_chunk(
                row_ptr, w, c, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K
            )
            tl.store(out_row + offs_k, u, mask=offs_k < num_classes)
        tl.debug_barrier()
        v = tl.where(real, 1.0, 0.0).to(DT)
        u_scale = tl.full((), 1.0, DT)  # u = u_scale * (stored u): the gauge rescaling costs no pass

        iterations = 0
        residual = tl.zeros((), dtype=DT)
        running = 1
        while running:
            gauge = tl.maximum(rsum(v * w, axis=0) / total, tiny)  # weighted mean(v) = 1
            v = v / gauge
            u_scale = u_scale * gauge
            grad_c = tl.zeros((BLOCK_N,), dtype=DT)
            grad_v = tl.zeros((BLOCK_N,), dtype=DT)
            cv = tl.zeros((BLOCK_N,), dtype=DT)
            vv = tl.zeros((BLOCK_N,), dtype=DT)
            count = tl.zeros((BLOCK_N,), dtype=DT)
            f0 = tl.zeros((), dtype=DT)
            worst_u = tl.zeros((), dtype=DT)
            sum_abs_z = tl.zeros((), dtype=DT)
            for k0 in range(0, num_classes, BLOCK_K):
                m, offs_k, covered, u, z, r, grad_u = _lu_chunk(
                    row_ptr, out_row, u_scale, c, v, w, colmap_ptr, num_teachers, num_classes, k0, DT, BLOCK_N, BLOCK_K
                )
                wr = w[:, None] * r
                grad_c += rsum(wr, axis=1)
                grad_v += rsum(wr * u[None, :], axis=1)
                cv += rsum(w[:, None] * m * u[None, :], axis=1)
                vv += rsum(w[:, None] * m * (u * u)[None, :], axis=1)
                count += rsum(m, axis=1)
                f0 += rsum(rsum(wr * r, axis=1), axis=0)
                a_diag = tl.where(covered, rsum((w * v * v)[:, None] * m, axis=0), 1.0)
                worst_u = tl.maximum(worst_u, rmax(tl.abs(grad_u) / a_diag, axis=0))
                sum_abs_z += rsum(rsum(m * tl.abs(z), axis=1), axis=0)
            cc = w * count
            pinned = real & (v <= 0) & (grad_v <= 0)  # v at its bound, pushed outward: held this step
            grad_v = tl.where(pinned, 0.0, grad_v)
            cv = tl.where(pinned, 0.0, cv)
            vv = tl.where(pinned, 1.0, vv)
            logit_scale = 1 + sum_abs_z / nnz
            worst_c = rmax(tl.where(real, tl.abs(grad_c) / tl.maximum(cc, tiny), 0.0), axis=0)
            worst_v = rmax(tl.where(real, tl.abs(grad_v) / tl.maximum(vv, tiny), 0.0), axis=0)
            residual = tl.maximum(tl.maximum(worst_u, worst_c) / logit_scale, worst_v)
            if (residual > tol) & (iterations < max_iter):
                root_eps = tl.sqrt(tl.full((), EPS, DT))
                damping = 1e-2 * root_eps * (rsum(cc, axis=0) + rsum(vv, axis=0)) / num_teachers
                # Schur complement of the diagonal u-block: [[P, Q], [Q^T, R]] over (c, v)
                scc = tl.zeros((BLOCK_N, BLOCK_N), dtype=DT)
                scv = tl.zeros((BLOCK_N, BLOCK_N), dtype=DT)
                svv = tl.zeros((BLOCK_N, BLOCK_N), dtype=DT)
                rc = tl.zeros((BLOCK_N,), dtype=DT)
                rv = tl.zeros((BLOCK_N,), dtype=DT)
                zero = tl.zeros((BLOCK_N,), dtype=DT)
                for k0 in range(0, num_classes, BLOCK_K):
                    m, offs_k, covered, u, z, r, grad_u = _lu_chunk(
                        row_ptr,
                        out_row,
                        u_scale,
                        c,
                        v,
                        w,
                        colmap_ptr,
                        num_teachers,
                        num_classes,
                        k0,
                        DT,
                        BLOCK_N,
                        BLOCK_K,
                    )
                    a, _unused8 = _lu_step_u(m, u, grad_u, covered, w, v, zero, zero, damping)
                    xc = (w * v)[:, None] * m
                    xv = tl.where(pinned[:, None], 0.0, xc * u[None, :])
                    xc_a = xc / a[None, :]
                    xv_a = xv / a[None, :]
                    scc += tl.dot(xc_a, tl.trans(xc), input_precision="ieee")
                    scv += tl.dot(xc_a, tl.trans(xv), input_precision="ieee")
                    svv += tl.dot(xv_a, tl.trans(xv), input_precision="ieee")
                    rc += rsum(xc_a * grad_u[None, :], axis=1)
                    rv += rsum(xv_a * grad_u[None, :], axis=1)
                identity = tl.where(eye, 1.0, 0.0)
                p_blk = tl.where(block, tl.where(eye, (cc + damping)[:, None], 0.0) - scc, identity)
                q_blk = tl.where(block, tl.where(eye, cv[:, None], 0.0) - scv, 0.0)
                r_blk = tl.where(block, tl.where(eye, (vv + damping)[:, None], 0.0) - svv, identity)
                g1 = tl.where(real, grad_c - rc, 0.0)
                g2 = tl.where(real, grad_v - rv, 0.0)
                pq_blk, p_g1, _unused9 = spd_solve_many(p_blk, q_blk, g1, num_teachers, BLOCK_N)
                t_blk = r_blk - tl.dot(tl.trans(q_blk), pq_blk, input_precision="ieee")
                step_v, _unused10 = spd_solve(t_blk, g2 - rsum(q_blk * p_g1[:, None], axis=0), num_teachers, BLOCK_N)
                step_v = tl.where(real, step_v, 0.0)
                step_c = tl.where(real, p_g1 - rsum(pq_blk * step_v[None, :], axis=1), 0.0)

                slack = 16 * EPS * tl.abs(f0)
                base = rsum(grad_c * step_c, axis=0) + rsum(grad_v * step_v, axis=0)
                scale = tl.full((), 1.0, DT)
                taken = tl.zeros((), dtype=DT)  # accepted step length (0: none)
                accepted = 0
                halvings = 0
                while (accepted == 0) & (halvings < 40):
                    c_try = c + scale * step_c
                    v_try = tl.maximum(v + scale * step_v, 0.0)
                    f = tl.zeros((), dtype=DT)
                    gs = tl.zeros((), dtype=DT)
                    for k0 in range(0, num_classes, BLOCK_K):
                        m, offs_k, covered, u, z, r, grad_u = _lu_chunk(
                            row_ptr,
                            out_row,
                            u_scale,
                            c,
                            v,
                            w,
                            colmap_ptr,
                            num_teachers,
                            num_classes,
                            k0,
                            DT,
                            BLOCK_N,
                            BLOCK_K,
                        )
                        _unused11, step_u = _lu_step_u(m, u, grad_u, covered, w, v, step_c, step_v, damping)
                        step_u = tl.where(offs_k < num_classes, step_u, 0.0)
                        gs += rsum(grad_u * step_u, axis=0)
                        u_try = u + scale * step_u
                        r_try = m * (z - v_try[:, None] * u_try[None, :] - c_try[:, None])
                        f += rsum(rsum(w[:, None] * r_try * r_try, axis=1), axis=0)
                    slope = tl.minimum(-2 * (gs + base), 0.0)
                    ok_step = f <= f0 + 1e-4 * scale * slope + slack
                    taken = tl.where(ok_step, scale, taken)
                    accepted = ok_step.to(tl.int32)
                    scale = tl.where(ok_step, scale, scale * 0.5)
                    halvings += 1
                if accepted != 0:
                    for k0 in range(0, num_classes, BLOCK_K):
                        m, offs_k, covered, u, z, r, grad_u = _lu_chunk(
                            row_ptr,
                            out_row,
                            u_scale,
                            c,
                            v,
                            w,
                            colmap_ptr,
                            num_teachers,
                            num_classes,
                            k0,
                            DT,
                            BLOCK_N,
                            BLOCK_K,
                        )
                        _unused12, step_u = _lu_step_u(m, u, grad_u, covered, w, v, step_c, step_v, damping)
                        tl.store(out_row + offs_k, u + taken * step_u, mask=offs_k < num_classes)
                    tl.debug_barrier()
                    u_scale = tl.full((), 1.0, DT)
                    c = c + taken * step_c
                    v = tl.maximum(v + taken * step_v, 0.0)
                iterations += 1
            else:
                running = 0

        # q = softmax(u) over covered classes
        top = tl.full((), float("-inf"), DT)
        sum_exp = tl.zeros((), dtype=DT)
        for k0 in range(0, num_classes, BLOCK_K):
            _col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            covered = rsum(present.to(DT), axis=0) > 0
            u = u_scale * tl.load(out_row + offs_k, mask=offs_k < num_classes, other=0.0)
            top, sum_exp = _online_softmax(u, covered & (offs_k < num_classes), top, sum_exp)
        for k0 in range(0, num_classes, BLOCK_K):
            _col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
            covered = rsum(present.to(DT), axis=0) > 0
            u = u_scale * tl.load(out_row + offs_k, mask=offs_k < num_classes, other=0.0)
            tl.store(out_row + offs_k, tl.where(covered, tl.exp(u - top) / sum_exp, 0.0), mask=offs_k < num_classes)
        tl.debug_barrier()
        tl.store(iterations_ptr + row, iterations)
        tl.store(residual_ptr + row, residual)


# ====================================================================== host launchers
def _launch_common(values, cmap, rows_per_program):
    batch, nnz = values.shape
    torch_dt, tl_dt = compute_dtype(values.dtype)
    grid, rows, bn, bk = launch_geometry(batch, cmap.shape[0], cmap.shape[1], rows_per_program, values.device)
    return batch, nnz, torch_dt, tl_dt, bn, bk, grid, rows


def mf_lf(
    values: torch.Tensor,
    weights: torch.Tensor,
    cmap: torch.Tensor,
    system: torch.Tensor,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """``(B, nnz)`` packed logits -> ``(B, K)`` soft labels; ``system`` is the ``(N, N)`` ``G^+``."""
    batch, nnz, torch_dt, tl_dt, bn, bk, grid, rows = _launch_common(values, cmap, rows_per_program)
    out = torch.empty(batch, cmap.shape[1], dtype=torch_dt, device=values.device)
    if batch == 0:
        return out
    _mf_lf_kernel[(grid,)](
        values,
        weights,
        system.to(torch_dt).contiguous(),
        cmap,
        out,
        batch,
        nnz,
        cmap.shape[0],
        cmap.shape[1],
        rows,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out


def mf_p(
    values: torch.Tensor,
    weights: torch.Tensor,
    cmap: torch.Tensor,
    tol: float,
    max_iter: int,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, nnz)`` packed probabilities -> ``(soft (B, K), iterations (B,), residual (B,))``."""
    batch, nnz, torch_dt, tl_dt, bn, bk, grid, rows = _launch_common(values, cmap, rows_per_program)
    device = values.device
    out, iterations, residual = solution_buffers(batch, cmap.shape[1], torch_dt, device)
    if batch == 0:
        return out, iterations, residual
    finfo = torch.finfo(torch_dt)
    _mf_p_kernel[(grid,)](
        values,
        weights,
        cmap,
        out,
        iterations,
        residual,
        batch,
        nnz,
        cmap.shape[0],
        cmap.shape[1],
        rows,
        float(tol),
        int(max_iter),
        _CE_START_MAX_ITER,
        EPS=finfo.eps,
        TINY=finfo.tiny,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out, iterations, residual


def mf_lu(
    values: torch.Tensor,
    weights: torch.Tensor,
    cmap: torch.Tensor,
    system: torch.Tensor,
    tol: float,
    max_iter: int,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, nnz)`` packed logits -> ``(soft (B, K), iterations (B,), residual (B,))``."""
    batch, nnz, torch_dt, tl_dt, bn, bk, grid, rows = _launch_common(values, cmap, rows_per_program)
    device = values.device
    out, iterations, residual = solution_buffers(batch, cmap.shape[1], torch_dt, device)
    if batch == 0:
        return out, iterations, residual
    finfo = torch.finfo(torch_dt)
    _mf_lu_kernel[(grid,)](
        values,
        weights,
        system.to(torch_dt).contiguous(),
        cmap,
        out,
        iterations,
        residual,
        batch,
        nnz,
        cmap.shape[0],
        cmap.shape[1],
        rows,
        float(tol),
        int(max_iter),
        EPS=finfo.eps,
        TINY=finfo.tiny,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out, iterations, residual
