"""Dense ``N x N`` solves on register tiles, one system per program.

A ``(BLOCK_N, BLOCK_N)`` tile holds one symmetric matrix (both triangles); elimination step ``k``
extracts row ``k`` with a masked reduction and updates the trailing block with an outer product,
``O(N)`` steps of ``O(BLOCK_N^2)`` lane work. The algorithms are those of ``csrc/core/linalg.h``:

- :func:`gth_solve`: grounded graph Laplacians by positive (Grassmann-Taksar-Heyman) elimination,
  every pivot and update a sum of non-negative terms (mf-lu's projection); :func:`gth_solve_flows`
  the same with the right-hand side given as flows between the nodes (`ce`'s Newton system);
- :func:`cholesky` / :func:`cholesky_solve`: symmetric positive definite systems, with the
  factorisation's success per system (every pivot > 0, the test LAPACK's potrf applies).
"""

from __future__ import annotations

import triton.language as tl

from ._common import device_function, rsum


@device_function
def gth_solve(links, ground, rhs, n, BLOCK_N: tl.constexpr):
    """Solve ``(diag(links.sum(1) + ground) - links) x = rhs`` over the leading ``n`` nodes.

    ``links`` is ``(BLOCK_N, BLOCK_N)`` symmetric, >= 0 (its diagonal is ignored), ``ground`` and
    ``rhs`` are ``(BLOCK_N,)``; entries beyond ``n`` are ignored. Returns ``(x, isolated)``: ``x`` is
    0 beyond ``n`` and at nodes with no path to ground, and ``isolated`` says whether there were any.
    """
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    pivots = tl.zeros((BLOCK_N,), links.dtype)
    isolated = n < 0
    for k in range(n):
        row_k = rsum(tl.where(rows == k, links, 0.0), 0)  # links[k, :]
        g_k = rsum(tl.where(idx == k, ground, 0.0), 0)
        b_k = rsum(tl.where(idx == k, rhs, 0.0), 0)
        later = (idx > k) & (idx < n)
        d = g_k + rsum(tl.where(later, row_k, 0.0), 0)
        positive = d > 0
        inv = tl.where(positive, 1.0 / tl.where(positive, d, 1.0), 0.0)
        isolated = isolated | (d <= 0)
        pivots = tl.where(idx == k, inv, pivots)
        f = tl.where(later, row_k * inv, 0.0)  # the multipliers are links too: no sign changes
        links = links + tl.where(later[:, None] & later[None, :], f[:, None] * row_k[None, :], 0.0)
        ground = ground + f * g_k
        rhs = rhs + f * b_k
    return back_substitute(links, rhs, pivots, n, BLOCK_N), isolated


@device_function
def gth_solve_flows(links, ground, flows, to_ground, n, BLOCK_N: tl.constexpr):
    """:func:`gth_solve` for ``rhs_i = sum_j flows_ij + to_ground_i``, the flows (antisymmetric,
    ``(BLOCK_N, BLOCK_N)``; only the upper triangle ``j > i`` is read) and each node's flow to the
    ground carried through the elimination instead of their sums: merging node k into the rest adds
    ``f_i F_kj - f_j F_ki`` to ``F_ij``, so a block's right-hand side is the sum of the flows that
    leave it (uhc_fast/linalg.py: grounded_laplacian_solve_flows says why `ce` needs it; the
    algorithm is csrc/core/linalg.h's). Returns ``(x, isolated)`` as :func:`gth_solve`.
    """
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    # an eliminated node's entries of ground and to_ground are free: they keep its right-hand side
    # and its pivot's reciprocal (two vectors fewer: ce's Newton step spilled)
    isolated = n < 0
    for k in range(n):
        row_k = rsum(tl.where(rows == k, links, 0.0), 0)  # links[k, :]
        later = (idx > k) & (idx < n)
        out_k = rsum(tl.where(rows == k, flows, 0.0), 0)  # flows[k, :], upper triangle only
        out_k = tl.where(later, out_k, 0.0)
        g_k = rsum(tl.where(idx == k, ground, 0.0), 0)
        to_ground_k = rsum(tl.where(idx == k, to_ground, 0.0), 0)
        d = g_k + rsum(tl.where(later, row_k, 0.0), 0)
        positive = d > 0
        inv = tl.where(positive, 1.0 / tl.where(positive, d, 1.0), 0.0)
        isolated = isolated | (d <= 0)
        f = tl.where(later, row_k * inv, 0.0)  # the multipliers are links too: no sign changes
        later2 = later[:, None] & later[None, :]
        links = links + tl.where(later2, f[:, None] * row_k[None, :], 0.0)
        flows = flows + tl.where(later2, f[:, None] * out_k[None, :] - out_k[:, None] * f[None, :], 0.0)
        ground = tl.where(idx == k, to_ground_k + rsum(out_k, 0), ground + f * g_k)
        to_ground = tl.where(idx == k, inv, to_ground + (f * to_ground_k - (g_k * inv) * out_k))
    return back_substitute(links, ground, to_ground, n, BLOCK_N), isolated


@device_function
def back_substitute(links, rhs, pivots, n, BLOCK_N: tl.constexpr):
    """The elimination's back substitution (:func:`gth_solve`, :func:`gth_solve_flows`): ``x_k =
    (rhs_k + sum_{j > k} links_kj x_j) * pivots_k`` (``pivots``: the pivots' reciprocals)."""
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    x = tl.zeros((BLOCK_N,), links.dtype)
    for kk in range(n):
        k = n - 1 - kk
        row_k = rsum(tl.where(rows == k, links, 0.0), 0)
        b_k = rsum(tl.where(idx == k, rhs, 0.0), 0)
        p_k = rsum(tl.where(idx == k, pivots, 0.0), 0)
        acc = b_k + rsum(tl.where((idx > k) & (idx < n), row_k * x, 0.0), 0)
        x = tl.where(idx == k, acc * p_k, x)
    return x


@device_function
def cholesky(a, n, BLOCK_N: tl.constexpr):
    """Factor the symmetric positive definite leading ``n x n`` block of ``a`` in place.

    Returns ``(u, pivots, ok)``: ``u``'s row ``k`` (columns >= k) is row ``k`` of the eliminated
    matrix (``U_k = u_k / sqrt(pivot_k)`` is the Cholesky factor's row), ``pivots`` its diagonal, and
    ``ok`` whether every pivot was > 0 (NaN fails).
    """
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    pivots = tl.zeros((BLOCK_N,), a.dtype)
    ok = n >= 0
    for k in range(n):
        row_k = rsum(tl.where(rows == k, a, 0.0), 0)
        d = rsum(tl.where(idx == k, row_k, 0.0), 0)
        good = d > 0
        ok = ok & good
        safe = tl.where(good, d, 1.0)
        pivots = tl.where(idx == k, safe, pivots)
        later = (idx > k) & (idx < n)
        a = a - tl.where(later[:, None] & later[None, :], (row_k / safe)[:, None] * row_k[None, :], 0.0)
    return a, pivots, ok


@device_function
def cholesky_solve(u, pivots, b, n, BLOCK_N: tl.constexpr):
    """Solve ``A x = b`` with :func:`cholesky`'s ``(u, pivots)`` of ``A`` (``b``: ``(BLOCK_N,)``;
    entries beyond ``n`` are returned unchanged)."""
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    for k in range(n):  # forward: eliminate below the pivots
        row_k = rsum(tl.where(rows == k, u, 0.0), 0)
        p_k = rsum(tl.where(idx == k, pivots, 0.0), 0)
        b_k = rsum(tl.where(idx == k, b, 0.0), 0)
        later = (idx > k) & (idx < n)
        b = b - tl.where(later, row_k / p_k * b_k, 0.0)
    for kk in range(n):  # backward
        k = n - 1 - kk
        row_k = rsum(tl.where(rows == k, u, 0.0), 0)
        p_k = rsum(tl.where(idx == k, pivots, 0.0), 0)
        b_k = rsum(tl.where(idx == k, b, 0.0), 0)
        acc = b_k - rsum(tl.where((idx > k) & (idx < n), row_k * b, 0.0), 0)
        b = tl.where(idx == k, acc / p_k, b)
    return b


@device_function
def cholesky_solve_many(u, pivots, m, n, BLOCK_N: tl.constexpr):
    """Solve ``A X = M`` for a ``(BLOCK_N, BLOCK_N)`` right-hand side ``m`` (its rows are the
    system's unknowns) with :func:`cholesky`'s ``(u, pivots)`` of ``A``; rows beyond ``n`` unchanged."""
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    for k in range(n):
        row_k = rsum(tl.where(rows == k, u, 0.0), 0)
        p_k = rsum(tl.where(idx == k, pivots, 0.0), 0)
        m_k = rsum(tl.where(rows == k, m, 0.0), 0)
        later = (idx > k) & (idx < n)
        m = m - tl.where(later[:, None], (row_k / p_k)[:, None] * m_k[None, :], 0.0)
    for kk in range(n):
        k = n - 1 - kk
        row_k = rsum(tl.where(rows == k, u, 0.0), 0)
        p_k = rsum(tl.where(idx == k, pivots, 0.0), 0)
        m_k = rsum(tl.where(rows == k, m, 0.0), 0)
        coupled = rsum(tl.where(((idx > k) & (idx < n))[:, None], row_k[:, None] * m, 0.0), 0)
        m = tl.where(rows == k, ((m_k - coupled) / p_k)[None, :], m)
    return m


@device_function
def row_of(a, k, BLOCK_N: tl.constexpr):
    """Row ``k`` of a ``(BLOCK_N, BLOCK_N)`` tile."""
    idx = tl.arange(0, BLOCK_N)
    return rsum(tl.where(idx[:, None] == k, a, 0.0), 0)
