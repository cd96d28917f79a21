// Dense kernels for the solvers' small N x N systems, on lanes: W systems with the same shape
// factorised in lockstep (no pivoting, so every lane runs the same instructions).
//
// Matrices are row-major n x n in a scratch view; only the upper triangle (j >= i) is read or
// written. `ok` reports per lane whether the factorisation succeeded.
#pragma once

#include "simd.h"
#include "vmath.h"

namespace UHC_NAMESPACE {

// Grounded graph Laplacian: solve (diag(sum_j L_ij + g_i) - L) x = b for link weights L >= 0
// (upper triangle), ground weights g >= 0, by positive (Grassmann-Taksar-Heyman) elimination:
// every pivot and update is a sum of non-negative terms, so a system whose links span many orders
// of magnitude keeps the relative precision of its weakest link. R right-hand sides b[r] (solutions
// x[r]) share one elimination. L, g and b are overwritten. A node with no path to ground (a
// disconnected graph) gets x = 0. The inverse of such a system is entrywise non-negative (an
// M-matrix): with b >= 0 every operation adds non-negative terms.
// (uhc_fast/linalg.py: grounded_laplacian_solve is the same algorithm.)
template <class V, int R, class Buf>
UHC_HD void grounded_laplacian_solve(Buf L, Buf g, const Buf (&b)[R], Buf pivot, const Buf (&x)[R], int n) {
  for (int k = 0; k < n; ++k) {
    V d = g[k];
    for (int j = k + 1; j < n; ++j) d += V(L[k * n + j]);
    const auto positive = d > 0;
    const V one = splat<V>(1.0), zero = splat<V>(0.0);
    const V inv = select(positive, one / select(positive, d, one), zero);
    pivot[k] = inv;
    for (int i = k + 1; i < n; ++i) {
      const V f = V(L[k * n + i]) * inv;  // the multipliers are links too: no sign changes anywhere
      for (int j = i + 1; j < n; ++j) L[i * n + j] = V(L[i * n + j]) + f * V(L[k * n + j]);
      g[i] = V(g[i]) + f * V(g[k]);
      for (int r = 0; r < R; ++r) b[r][i] = V(b[r][i]) + f * V(b[r][k]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = n - 1; k >= 0; --k) {
      V acc = b[r][k];
      for (int j = k + 1; j < n; ++j) acc += V(L[k * n + j]) * V(x[r][j]);
      x[r][k] = acc * V(pivot[k]);
    }
}

// grounded_laplacian_solve for b_i = sum_j F_ij + Fg_i, with the flows F (antisymmetric: only the
// upper triangle, j > i, is read or written) and Fg (each node's flow to the ground) carried
// through the elimination instead of their sums: merging node k into the rest adds
// f_i F_kj - f_j F_ki to F_ij (f_i = L_ki / pivot_k), so the right-hand side a group of nodes
// presents to the rest is the sum of the flows that leave it, never formed from its own (larger,
// cancelling) internal flows (uhc_fast/linalg.py: grounded_laplacian_solve_flows, the same
// algorithm, says why ce needs it). L, g, F and Fg are overwritten; x gets the solution (it holds
// the multipliers meanwhile) and b each node's right-hand side at its elimination.
template <class V, class Buf>
UHC_HD void grounded_laplacian_solve_flows(Buf L, Buf g, Buf F, Buf Fg, Buf b, Buf pivot, Buf x, int n) {
  const V one = splat<V>(1.0), zero = splat<V>(0.0);
  for (int k = 0; k < n; ++k) {
    V d = g[k], rhs = Fg[k];
    for (int j = k + 1; j < n; ++j) d += V(L[k * n + j]), rhs += V(F[k * n + j]);
    const auto positive = d > 0;
    const V inv = select(positive, one / select(positive, d, one), zero);
    pivot[k] = inv, b[k] = rhs;
    for (int i = k + 1; i < n; ++i) x[i] = V(L[k * n + i]) * inv;  // the multipliers
    const V fk = V(g[k]) * inv, Fgk = Fg[k];
    for (int i = k + 1; i < n; ++i) {
      const V f = x[i], Fki = F[k * n + i];
      for (int j = i + 1; j < n; ++j) {
        L[i * n + j] = V(L[i * n + j]) + f * V(L[k * n + j]);
        F[i * n + j] = V(F[i * n + j]) + (f * V(F[k * n + j]) - V(x[j]) * Fki);
      }
      g[i] = V(g[i]) + f * V(g[k]);
      Fg[i] = V(Fg[i]) + (f * Fgk - fk * Fki);
    }
  }
  for (int k = n - 1; k >= 0; --k) {
    V acc = b[k];
    for (int j = k + 1; j < n; ++j) acc += V(L[k * n + j]) * V(x[j]);
    x[k] = acc * V(pivot[k]);
  }
}

// Cholesky A = U^T U of a symmetric matrix (upper triangle), in place: U's upper triangle with the
// reciprocals of its diagonal. Returns the lanes where every pivot was positive (A positive
// definite, the test LAPACK's potrf applies); other lanes' factors are undefined.
template <class V, class M, class Buf>
UHC_HD M cholesky(Buf A, int n) {
  const V one = splat<V>(1.0);
  M ok = one == one;
  for (int j = 0; j < n; ++j) {
    const V d = A[j * n + j];
    ok = ok & (d > 0);
    const V inv = one / vsqrt(select(d > 0, d, one));
    A[j * n + j] = inv;
    for (int k = j + 1; k < n; ++k) A[j * n + k] = V(A[j * n + k]) * inv;
    for (int i = j + 1; i < n; ++i) {
      const V uji = A[j * n + i];
      for (int k = i; k < n; ++k) A[i * n + k] = V(A[i * n + k]) - uji * V(A[j * n + k]);
    }
  }
  return ok;
}

// Solve U^T U x = b with the factor from cholesky(); b is overwritten by x.
template <class V, class Buf, class Vec>
UHC_HD void cholesky_solve(Buf U, Vec b, int n) {
  for (int i = 0; i < n; ++i) {  // U^T y = b
    const V yi = V(b[i]) * V(U[i * n + i]);
    b[i] = yi;
    for (int k = i + 1; k < n; ++k) b[k] = V(b[k]) - V(U[i * n + k]) * yi;
  }
  for (int i = n - 1; i >= 0; --i) {  // U x = y
    const V xi = V(b[i]) * V(U[i * n + i]);
    b[i] = xi;
    for (int k = 0; k < i; ++k) b[k] = V(b[k]) - V(U[k * n + i]) * xi;
  }
}

}  // namespace UHC_NAMESPACE
