"""`ce`: damped Newton on the teacher-space dual, every iteration of a sample in one program.

Same algorithm, start, line search and residual as :mod:`uhc_fast.reference.ce`: per sample, with
evidence ``n_l = sum_i w_i p_il`` and ``r = exp(t - max t)``, ``D_l = sum_{i: l in L_i} r_i`` and
``x_l = n_l / D_l`` (so ``q = x / sum x``), Newton minimises the convex dual
``F(t) = sum_l n_l log D_l - sum_i w_i t_i`` with the ``N x N`` Hessian
``diag(a) - r_i r_j sum_l M_il M_jl x_l / D_l`` (gauge-fixed by the all-ones term), solved on chip.

The evidence row is parked in the output row (written once, re-read from cache by every pass),
then overwritten by the soft labels; ``t`` (N values) and the Hessian live in registers.
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
    teacher_scales,
)


@device_function
def _dual_stats(
    out_row,
    r,
    colmap_ptr,
    num_teachers,
    num_classes,
    TINY: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HESSIAN: tl.constexpr,
):
    """At ``r = exp(t - max t)``: ``(sum_l x_l, sum_{l in L_i} x_l, curvature, sum_l n_l log D_l)``.

    ``curvature[i, j] = sum_l M_il M_jl x_l / D_l`` (only when ``HESSIAN``, else zeros).
    """
    sum_x = tl.zeros((), dtype=DT)
    sx = tl.zeros((BLOCK_N,), dtype=DT)
    curvature = tl.zeros((BLOCK_N, BLOCK_N), dtype=DT)
    log_term = tl.zeros((), dtype=DT)
    tiny = tl.full((), TINY, DT)
    for k0 in range(0, num_classes, BLOCK_K):
        _col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
        m = present.to(DT)
        n = tl.load(out_row + offs_k, mask=offs_k < num_classes, other=0.0)
        covered = rsum(m, axis=0) > 0
        d = tl.maximum(rsum(m * r[:, None], axis=0), tiny)
        x = tl.where(covered, n / d, 0.0)
        sum_x += rsum(x, axis=0)
        sx += rsum(m * x[None, :], axis=1)
        log_term += rsum(tl.where(covered, n * tl.log(d), 0.0), axis=0)
        if HESSIAN:
            # ieee: the Hessian's rows sum to zero, so TF32 rounding would swamp the small eigenvalues
            curvature += tl.dot(m * (x / d)[None, :], tl.trans(m), input_precision="ieee")
    return sum_x, sx, curvature, log_term


@device_function
def _residual(
    out_row,
    r,
    coef,
    sum_x,
    colmap_ptr,
    num_teachers,
    num_classes,
    TINY: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``max_l |q_l sum_{i: l in L_i} coef_i - n_l|`` with ``q = x / sum_x`` (``coef = w / S``)."""
    worst = tl.zeros((), dtype=DT)
    tiny = tl.full((), TINY, DT)
    for k0 in range(0, num_classes, BLOCK_K):
        _col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
        m = present.to(DT)
        n = tl.load(out_row + offs_k, mask=offs_k < num_classes, other=0.0)
        covered = rsum(m, axis=0) > 0
        d = tl.maximum(rsum(m * r[:, None], axis=0), tiny)
        q = tl.where(covered, n / d, 0.0) / sum_x
        gap = tl.abs(q * rsum(m * coef[:, None], axis=0) - n)
        worst = tl.maximum(worst, rmax(gap, axis=0))
    return worst


@device_function
def _shifted(t, real):
    """``(exp(t - max t), max t)`` over the real teachers; padding gets r = 0."""
    top = rmax(tl.where(real, t, float("-inf")), axis=0)
    return tl.where(real, tl.exp(t - top), 0.0), top


@device_function
def ce_solve_row(
    row_ptr,
    out_row,
    w,
    colmap_ptr,
    num_teachers,
    num_classes,
    tol,
    max_iter,
    EPS: tl.constexpr,
    TINY: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Solve one sample's `ce` problem; the soft labels land in ``out_row``.

    Returns ``(iterations, residual, inv)`` with ``inv`` the per-teacher renormalisation
    ``1 / sum_{l in L_i} p_il`` that was applied to the probabilities.
    """
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_n < num_teachers
    total = rsum(w, axis=0)
    eye = offs_n[:, None] == offs_n[None, :]
    block = real[:, None] & real[None, :]

    # evidence n into the output row; sd's q gives the starting point t = log w - log S(q)
    inv = teacher_scales(row_ptr, colmap_ptr, num_teachers, num_classes, DT, BLOCK_N, BLOCK_K)
    sum_n = tl.zeros((), dtype=DT)
    sn = tl.zeros((BLOCK_N,), dtype=DT)
    for k0 in range(0, num_classes, BLOCK_K):
        col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
        n = rsum((w * inv)[:, None] * gather(row_ptr, col, present, DT), axis=0)
        tl.store(out_row + offs_k, n, mask=offs_k < num_classes)
        sum_n += rsum(n, axis=0)
        sn += rsum(tl.where(present, n[None, :], 0.0), axis=1)
    tl.debug_barrier()  # later passes read n back in other threads' layouts
    t = tl.where(real, tl.log(tl.where(real, w, 1.0)) - tl.log(tl.where(real, sn / sum_n, 1.0)), 0.0)

    iterations = 0
    residual = tl.zeros((), dtype=DT)
    # the loop ends right after evaluating t: r and sum_x then describe the final t
    r = tl.zeros((BLOCK_N,), dtype=DT)
    sum_x = tl.zeros((), dtype=DT)
    running = 1
    while running:
        r, top = _shifted(t, real)
        sum_x, sx, curvature, log_term = _dual_stats(
            out_row, r, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K, True
        )
        coef = tl.where(real, w / tl.where(real, sx / sum_x, 1.0), 0.0)
        residual = (
            _residual(out_row, r, coef, sum_x, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K)
            / total
        )
        if (residual > tol) & (iterations < max_iter):
            a = r * sx  # sum_l n_l pi_il
            grad = a - w
            hess = tl.where(eye, a[:, None], 0.0) - r[:, None] * r[None, :] * curvature
            hess += total / num_teachers + tl.where(eye, EPS * total, 0.0)  # gauge + a whisper of ridge
            hess = tl.where(block, hess, tl.where(eye, 1.0, 0.0))
            delta, _unused0 = spd_solve(hess, -grad, num_teachers, BLOCK_N)
            delta = tl.where(real, delta, 0.0)

            f0 = log_term + top * sum_n - rsum(w * t, axis=0)
            slope = rsum(grad * delta, axis=0)
            slack = 16 * EPS * tl.abs(f0)
            scale = tl.full((), 1.0, DT)
            accepted = 0
            halvings = 0
            t_new = t
            while (accepted == 0) & (halvings < 40):
                cand = t + scale * delta
                rc, top_c = _shifted(cand, real)
                _unused1, _unused2, _unused3, log_c = _dual_stats(
                    out_row, rc, colmap_ptr, num_teachers, num_classes, TINY, DT, BLOCK_N, BLOCK_K, False
                )
                f = log_c + top_c * sum_n - rsum(w * cand, axis=0)
                ok = f <= f0 + 1e-4 * scale * slope + slack
                t_new = tl.where(ok, cand, t_new)
                accepted = ok.to(tl.int32)
                scale = tl.where(ok, scale, scale * 0.5)
                halvings += 1
            t = t_new
            iterations += 1
        else:
            running = 0

    # soft labels from the final t, over the evidence (each element rewritten from its own value)
    tiny = tl.full((), TINY, DT)
    for k0 in range(0, num_classes, BLOCK_K):
        col, present, offs_k = map_tile(colmap_ptr, num_teachers, num_classes, k0, BLOCK_N, BLOCK_K)
        m = present.to(DT)
        inside = offs_k < num_classes
        n = tl.load(out_row + offs_k, mask=inside, other=0.0)
        covered = rsum(m, axis=0) > 0
        d = tl.maximum(rsum(m * r[:, None], axis=0), tiny)
        tl.store(out_row + offs_k, tl.where(covered, n / d, 0.0) / sum_x, mask=inside)
    tl.debug_barrier()
    return iterations, residual, inv


@triton.jit
def _ce_kernel(
    values_ptr,  # (B, nnz) packed teacher probabilities, any float dtype
    weights_ptr,  # (N,) teacher weights
    colmap_ptr,  # (N, K) int32 packed column of (teacher, class), -1 where absent
    out_ptr,  # (B, K) soft labels, DT (also the evidence scratch row while solving)
    iterations_ptr,  # (B,) int32 Newton steps taken
    residual_ptr,  # (B,) DT KKT residual reached
    batch,
    nnz,
    num_teachers,
    num_classes,
    rows_per_program,
    tol,  # stop when the KKT residual is <= tol
    max_iter,  # Newton step cap
    EPS: tl.constexpr,  # machine epsilon of DT
    TINY: tl.constexpr,  # smallest normal of DT
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    w = tl.load(weights_ptr + offs_n, mask=offs_n < num_teachers, other=0.0).to(DT)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, batch)
    for row in range(first, last):
        iterations, residual, _inv = ce_solve_row(
            values_ptr + row * nnz,
            out_ptr + row * num_classes,
            w,
            colmap_ptr,
            num_teachers,
            num_classes,
            tol,
            max_iter,
            EPS,
            TINY,
            DT,
            BLOCK_N,
            BLOCK_K,
        )
        tl.store(iterations_ptr + row, iterations)
        tl.store(residual_ptr + row, residual)


def ce(
    values: torch.Tensor,
    weights: torch.Tensor,
    cmap: torch.Tensor,
    tol: float,
    max_iter: int,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, nnz)`` packed probabilities -> ``(soft (B, K), iterations (B,) int32, residual (B,))``.

    Needs ``N <= MAX_NEWTON_TEACHERS``; the outputs are in the accumulation dtype.
    """
    batch, nnz = values.shape
    torch_dt, tl_dt = compute_dtype(values.dtype)
    device = values.device
    out, iterations, residual = solution_buffers(batch, cmap.shape[1], torch_dt, device)
    if batch == 0:
        return out, iterations, residual
    grid, rows, bn, bk = launch_geometry(batch, cmap.shape[0], cmap.shape[1], rows_per_program, device)
    finfo = torch.finfo(torch_dt)
    _ce_kernel[(grid,)](
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
        EPS=finfo.eps,
        TINY=finfo.tiny,
        DT=tl_dt,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out, iterations, residual
