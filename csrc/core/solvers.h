// The per-sample solvers of every method, written once for the OpenMP and the CUDA launchers.
//
// Each solver is the per-sample transcription of the batched torch reference in
// uhc_fast/reference/ (same initialisation, update order, step rules, stopping test and residual),
// so the compiled backends agree with it to rounding. Notation follows docs/uhc-math: p (or z) is
// one sample's packed teacher output, w the teacher weights, n_l = sum_{i: l in L_i} w_i p_il.
#pragma once

#include "common.h"

namespace uhc {

// Solve A x = b in place by Gaussian elimination with partial pivoting (x overwrites b); row i of
// A starts at A[i * ld].
// Returns false on an exactly singular pivot (A is then destroyed and b undefined).
template <class Acc, class Buf>
UHC_HD bool lu_solve(Buf A, Buf b, int n, int ld) {
  for (int k = 0; k < n; ++k) {
    int piv = k;
    Acc best = uabs(A[k * ld + k]);
    for (int i = k + 1; i < n; ++i) {
      const Acc cand = uabs(A[i * ld + k]);
      if (cand > best) best = cand, piv = i;
    }
    if (!(best > Acc(0))) return false;
    if (piv != k) {
      for (int j = k; j < n; ++j) {
        const Acc tmp = A[k * ld + j];
        A[k * ld + j] = A[piv * ld + j];
        A[piv * ld + j] = tmp;
      }
      const Acc tmp = b[k];
      b[k] = b[piv];
      b[piv] = tmp;
    }
    const Acc inv = Acc(1) / A[k * ld + k];
    for (int i = k + 1; i < n; ++i) {
      const Acc f = A[i * ld + k] * inv;
      if (f == Acc(0)) continue;
      for (int j = k + 1; j < n; ++j) A[i * ld + j] -= f * A[k * ld + j];
      b[i] -= f * b[k];
    }
  }
  for (int i = n - 1; i >= 0; --i) {
    Acc acc = b[i];
    for (int j = i + 1; j < n; ++j) acc -= A[i * ld + j] * b[j];
    b[i] = acc / A[i * ld + i];
  }
  return true;
}

// Cholesky factorisation A = U^T U of a symmetric A in place, row i of A starting at A[i * ld]
// with ld = padded(n): U's strict upper triangle and the reciprocals of its diagonal overwrite
// A's upper triangle, and the rest of each row becomes scratch. False where A is not positive
// definite, the same test LAPACK's potrf (torch.linalg.cholesky_ex) applies. Right-looking over
// rows: each step updates the trailing rows with independent multiply-adds, four at a time from a
// multiple of 4 to the padded end of the row (the extra entries are scratch), so the updates run as
// whole 4-wide vectors with no remainder loops; keeping 1/U_jj turns the solve's divisions into
// multiplications.
template <class Acc, class Buf>
UHC_HD bool cholesky(Buf A, int n, int ld) {
  for (int j = 0; j < n; ++j) {
    const Acc d = A[j * ld + j];
    if (!(d > Acc(0))) return false;
    const Acc inv = Acc(1) / usqrt(d);
    A[j * ld + j] = inv;
    for (int k = j + 1; k < n; ++k) A[j * ld + k] *= inv;
    const Buf row_j = A.at(j * ld);
    for (int i = j + 1; i < n; ++i) {
      const Buf row_i = A.at(i * ld);
      const Acc uji = row_j[i];
      for (int k = i & ~3; k < ld; k += 4) {  // all loads before the stores: vectorisable as is
        const Acc a0 = row_i[k], a1 = row_i[k + 1], a2 = row_i[k + 2], a3 = row_i[k + 3];
        const Acc b0 = row_j[k], b1 = row_j[k + 1], b2 = row_j[k + 2], b3 = row_j[k + 3];
        row_i[k] = a0 - uji * b0, row_i[k + 1] = a1 - uji * b1, row_i[k + 2] = a2 - uji * b2, row_i[k + 3] = a3 - uji * b3;
      }
    }
  }
  return true;
}

// Solve U^T U x = b with the factor from cholesky() (x overwrites b), by rows of U forwards and
// by columns backwards: both update b with independent multiply-adds.
template <class Acc, class Buf>
UHC_HD void cholesky_solve(Buf U, Buf b, int n, int ld) {
  for (int i = 0; i < n; ++i) {  // U^T y = b
    const Acc yi = b[i] * U[i * ld + i];
    b[i] = yi;
    for (int k = i + 1; k < n; ++k) b[k] -= U[i * ld + k] * yi;
  }
  for (int i = n - 1; i >= 0; --i) {  // U x = y
    const Acc xi = b[i] * U[i * ld + i];
    b[i] = xi;
    for (int k = 0; k < i; ++k) b[k] -= U[k * ld + i] * xi;
  }
}

// What every solver writes for one sample.
template <class Acc>
struct Result {
  int32_t iterations;
  Acc residual;
};

// One sample: its packed values, the shared mask structure and weights, and its scratch.
template <class Acc, class In, class Buf>
struct Sample {
  const Structure& s;
  Row<In, Acc> p;   // (nnz,) packed probabilities or logits
  const Acc* w;     // (N,) teacher weights
  Acc total;        // sum_i w_i
  Buf work;         // scratch_elements(method, N, K) elements
  Acc* out;         // (K,) soft labels

  // ---------------------------------------------------------------- shared pieces
  UHC_HD bool covered(int l) const { return s.cls_ptr[l + 1] > s.cls_ptr[l]; }

  // n_l = sum_{i: l in L_i} w_i p_il, reading p in order. A teacher's classes are distinct
  // (TeacherSet enforces it), so four updates can load before they store: the one-at-a-time loop
  // stalls on the possible store-to-load dependence between neighbouring updates.
  UHC_HD void evidence(Buf n) const {
    for (int l = 0; l < s.K; ++l) n[l] = 0;
    for (int i = 0; i < s.N; ++i) {
      const Acc wi = w[i];
      const int hi = s.offsets[i + 1];
      int j = s.offsets[i];
      for (; j + 4 <= hi; j += 4) {
        const int c0 = s.class_index[j], c1 = s.class_index[j + 1], c2 = s.class_index[j + 2],
                  c3 = s.class_index[j + 3];
        const Acc n0 = n[c0] + wi * p[j], n1 = n[c1] + wi * p[j + 1], n2 = n[c2] + wi * p[j + 2],
                  n3 = n[c3] + wi * p[j + 3];
        n[c0] = n0, n[c1] = n1, n[c2] = n2, n[c3] = n3;
      }
      for (; j < hi; ++j) n[s.class_index[j]] += wi * p[j];
    }
  }

  template <class V>
  UHC_HD void write_normalised(V q) const {  // out = q / sum(q)
    Acc part[4] = {0, 0, 0, 0};  // four running sums: one would wait on every previous add
    int l = 0;
    for (; l + 4 <= s.K; l += 4)
      for (int u = 0; u < 4; ++u) part[u] += q[l + u];
    for (; l < s.K; ++l) part[0] += q[l];
    const Acc sum = (part[0] + part[1]) + (part[2] + part[3]);
    for (l = 0; l < s.K; ++l) out[l] = q[l] / sum;
  }

  UHC_HD void write_masked_softmax(Buf u) const {  // softmax over covered classes, 0 elsewhere
    Acc top = 0;
    bool any = false;
    for (int l = 0; l < s.K; ++l)
      if (covered(l) && (!any || u[l] > top)) top = u[l], any = true;
    Acc sum = 0;
    for (int l = 0; l < s.K; ++l) {
      const Acc e = covered(l) ? uexp(u[l] - top) : Acc(0);
      out[l] = e;
      sum += e;
    }
    for (int l = 0; l < s.K; ++l) out[l] /= sum;
  }

  // ---------------------------------------------------------------- sd
  UHC_HD Result<Acc> sd() const {
    Buf n = work;
    evidence(n);
    write_normalised(n);
    return {0, Acc(0)};
  }

  // ---------------------------------------------------------------- ce
  // Classes covered by the same teachers ("groups") share D_l = sum_{i covers l} exp(t_i), so the
  // dual, its derivatives and the KKT residual need only the per-group evidence
  // Ng = sum_{l in g} n_l and max_{l in g} n_l: each Newton step costs O(sum_g |g|^2 + N^3),
  // independent of K. Per class work happens once, before and after the iterations.

  // At t: r = exp(t - top) with top = max t, and D_g = sum_{i in g} r_i clamped like the
  // reference. Returns top. Everything else about a point is computed from r and D.
  UHC_HD Acc ce_point(Buf t, Buf r, Buf D) const {
    Acc top = t[0];
    for (int i = 1; i < s.N; ++i) top = umax(top, t[i]);
    for (int i = 0; i < s.N; ++i) r[i] = uexp(t[i] - top);
    for (int g = 0; g < s.G; ++g) {
      Acc d = 0;
      for (int e = s.grp_ptr[g]; e < s.grp_ptr[g + 1]; ++e) d += r[s.grp_teacher[e]];
      D[g] = umax(d, Limits<Acc>::tiny);
    }
    return top;
  }

  // KKT residual max_l |q_l sum_{i covers l} w_i / S_i(q) - n_l| / sum_i w_i at the primal point
  // q_l = n_l / (D_g Z) of ce_point's D. Fills qg (group mass Ng / D_g, unnormalised), Z, the mass
  // each teacher covers (mass_i = Z S_i, which the derivatives reuse) and si = w_i / S_i.
  UHC_HD Acc ce_residual(Buf D, Buf Ng, Buf Mg, Buf qg, Buf mass, Buf si, Acc& Z) const {
    Z = 0;
    for (int i = 0; i < s.N; ++i) mass[i] = 0;
    for (int g = 0; g < s.G; ++g) {
      const Acc group_mass = Ng[g] / D[g];
      qg[g] = group_mass;
      Z += group_mass;
      for (int e = s.grp_ptr[g]; e < s.grp_ptr[g + 1]; ++e) mass[s.grp_teacher[e]] += group_mass;
    }
    for (int i = 0; i < s.N; ++i) si[i] = w[i] / (mass[i] / Z);
    Acc worst = 0;
    for (int g = 0; g < s.G; ++g) {
      if (s.grp_ptr[g + 1] == s.grp_ptr[g]) continue;  // uncovered classes: q = n = 0
      Acc acc = 0;
      for (int e = s.grp_ptr[g]; e < s.grp_ptr[g + 1]; ++e) acc += si[s.grp_teacher[e]];
      worst = umax(worst, Mg[g] * uabs(acc / (D[g] * Z) - Acc(1)));
    }
    return worst / total;
  }

  // F(t) = sum_g Ng log D_g(t) - sum_i w_i t_i, shift-safe, from ce_point's D and top.
  UHC_HD Acc ce_dual(Buf t, Buf Ng, Buf D, Acc top) const {
    Acc f = 0;
    for (int g = 0; g < s.G; ++g)
      if (Ng[g] != Acc(0)) f += Ng[g] * (ulog(D[g]) + top);
    for (int i = 0; i < s.N; ++i) f -= w[i] * t[i];
    return f;
  }

  // Gradient g and gauge-fixed Hessian H of F from ce_point's r and D and ce_residual's qg and
  // mass at the same point (H = diag(a) - r r^T o C + total/N + ridge, a_i = r_i mass_i).
  UHC_HD void ce_derivatives(Buf r, Buf D, Buf qg, Buf mass, Buf grad, Buf H) const {
    const int N = s.N, ld = padded(N);
    for (int k = 0; k < N * ld; ++k) H[k] = 0;
    for (int g = 0; g < s.G; ++g) {
      const int lo = s.grp_ptr[g], hi = s.grp_ptr[g + 1];
      const Acc curvature = qg[g] / D[g];
      // upper triangle only: teachers are ascending within a group
      for (int e = lo; e < hi; ++e) {
        const int ti = s.grp_teacher[e];
        for (int f = e; f < hi; ++f) H[ti * ld + s.grp_teacher[f]] += curvature;
      }
    }
    const Acc gauge = total / Acc(N), ridge = Limits<Acc>::eps * total;
    for (int i = 0; i < N; ++i) grad[i] = r[i] * mass[i] - w[i];
    for (int i = 0; i < N; ++i) {
      for (int j = i; j < N; ++j) {
        Acc h = gauge - r[i] * r[j] * H[i * ld + j];
        if (i == j) h += r[i] * mass[i] + ridge;
        H[i * ld + j] = h;
        H[j * ld + i] = h;
      }
    }
  }

  // Damped Newton on the dual (reference.ce._newton); writes the normalised q into `q` (K) and
  // returns steps and residual. n: K scratch; gbuf: 5 G scratch; nbuf: 8 N + N padded(N) scratch.
  // The candidate a line search accepts becomes the next iterate with its r, D and F, so each
  // step evaluates exp, the group sums and log once per trial point and never twice.
  template <class Q>
  UHC_HD Result<Acc> ce_solve(Buf n, Q q, Buf gbuf, Buf nbuf, Acc tol, int max_iter) const {
    const int N = s.N, G = s.G;
    Buf Ng = gbuf, Mg = gbuf.at(G), qg = gbuf.at(2 * G), D = gbuf.at(3 * G), cand_D = gbuf.at(4 * G);
    Buf t = nbuf, r = nbuf.at(N), mass = nbuf.at(2 * N), grad = nbuf.at(3 * N), delta = nbuf.at(4 * N),
        cand = nbuf.at(5 * N), si = nbuf.at(6 * N), cand_r = nbuf.at(7 * N), H = nbuf.at(8 * N);
    evidence(n);
    // per-group sum and max of the evidence, walking each group's classes
    Acc sum = 0;
    for (int g = 0; g < G; ++g) {
      Acc group_sum = 0, group_max = 0;
      for (int e = s.grp_cls_ptr[g]; e < s.grp_cls_ptr[g + 1]; ++e) {
        const Acc nl = n[s.grp_cls[e]];
        group_sum += nl;
        group_max = umax(group_max, nl);
      }
      Ng[g] = group_sum, Mg[g] = group_max;
      sum += group_sum;
    }
    // start at sd (q = n / sum n): t_i = log w_i - log S_i(q)
    for (int i = 0; i < N; ++i) si[i] = 0;
    for (int g = 0; g < G; ++g)
      for (int e = s.grp_ptr[g]; e < s.grp_ptr[g + 1]; ++e) si[s.grp_teacher[e]] += Ng[g];
    for (int i = 0; i < N; ++i) t[i] = ulog(w[i]) - ulog(si[i] / sum);
    const Acc eps = Limits<Acc>::eps;
    Result<Acc> res{0, Acc(0)};
    Acc Z = 1, top = ce_point(t, r, D), f = 0;
    bool have_f = false;  // F(t) is needed only once a step is taken
    for (int step = 0;; ++step) {
      res.residual = ce_residual(D, Ng, Mg, qg, mass, si, Z);
      if (!(res.residual > tol) || step >= max_iter) break;
      ce_derivatives(r, D, qg, mass, grad, H);
      for (int i = 0; i < N; ++i) delta[i] = -grad[i];
      if (cholesky<Acc>(H, N, padded(N))) {  // H is positive definite up to rounding: half LU's work
        cholesky_solve<Acc>(H, delta, N, padded(N));
      } else {
        ce_derivatives(r, D, qg, mass, grad, H);  // cholesky overwrote H
        if (!lu_solve<Acc>(H, delta, N, padded(N)))
          for (int i = 0; i < N; ++i) delta[i] = -grad[i];  // singular: fall back to steepest descent
      }
      if (!have_f) f = ce_dual(t, Ng, D, top), have_f = true;
      Acc slope = 0;
      for (int i = 0; i < N; ++i) slope += grad[i] * delta[i];
      slope = umin(slope, Acc(0));
      const Acc slack = 16 * eps * uabs(f);  // near the optimum F is flat to rounding
      Acc scale = 1;
      for (int h = 0; h < 40; ++h) {
        for (int i = 0; i < N; ++i) cand[i] = t[i] + scale * delta[i];
        const Acc cand_top = ce_point(cand, cand_r, cand_D), cand_f = ce_dual(cand, Ng, cand_D, cand_top);
        if (cand_f <= f + Acc(1e-4) * scale * slope + slack) {
          swap_buffers(t, cand), swap_buffers(r, cand_r), swap_buffers(D, cand_D);
          top = cand_top, f = cand_f;
          break;
        }
        scale /= 2;
      }
      ++res.iterations;
    }
    // q_l = n_l / (D_g Z) at the point the last residual was measured at: scaled in scratch group
    // by group, then written out in class order (sequential stores to the output)
    for (int g = 0; g < G; ++g) {
      const Acc scale = s.grp_ptr[g + 1] > s.grp_ptr[g] ? Acc(1) / (D[g] * Z) : Acc(0);
      for (int e = s.grp_cls_ptr[g]; e < s.grp_cls_ptr[g + 1]; ++e) n[s.grp_cls[e]] *= scale;
    }
    for (int l = 0; l < s.K; ++l) q[l] = n[l];
    return res;
  }

  UHC_HD Result<Acc> ce(Acc tol, int max_iter) const {
    Buf n = work, gbuf = work.at(s.K), nbuf = work.at(s.K + 5 * s.G);
    return ce_solve(n, Dense<Acc>{out}, gbuf, nbuf, tol, max_iter);
  }

  // ---------------------------------------------------------------- mf-p
  // f(v) = -sum_l A_l^2 / B_l, A_l = sum_{i covers l} w_i v_i p_il, B_l = sum w_i v_i^2.
  UHC_HD Acc mfp_objective(Buf v) const {
    Acc f = 0;
    for (int l = 0; l < s.K; ++l) {
      Acc A = 0, B = 0;
      for (int e = s.cls_ptr[l]; e < s.cls_ptr[l + 1]; ++e) {
        const int ti = s.cls_teacher[e];
        const Acc wv = w[ti] * v[ti];
        A += wv * p[s.cls_col[e]];
        B += wv * v[ti];
      }
      f -= A * A / umax(B, Limits<Acc>::tiny);
    }
    return f;
  }

  // The v-half of an ALS sweep: v_i = sum_{L_i} p q / sum_{L_i} q^2.
  UHC_HD void mfp_v_of(Buf q, Buf v) const {
    for (int i = 0; i < s.N; ++i) {
      Acc pq = 0, qq = 0;
      for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) {
        const Acc ql = q[s.class_index[j]];
        pq += p[j] * ql;
        qq += ql * ql;
      }
      v[i] = pq / umax(qq, Limits<Acc>::tiny);
    }
  }

  // reference.mf._mf_p_newton from the ce estimate, with ce capped at ce_max_iter steps.
  UHC_HD Result<Acc> mfp(Acc tol, int max_iter, int ce_max_iter) const {
    const int N = s.N, K = s.K;
    Buf n = work, q = work.at(K), Bl = work.at(2 * K), gbuf = work.at(3 * K), nbuf = work.at(3 * K + 5 * s.G);
    ce_solve(n, q, gbuf, nbuf, tol, ce_max_iter);
    Buf v = nbuf, g = nbuf.at(N), delta = nbuf.at(2 * N), cand = nbuf.at(3 * N), e = nbuf.at(4 * N),
        sq = nbuf.at(5 * N), H = nbuf.at(6 * N);
    mfp_v_of(q, v);
    const Acc tiny = Limits<Acc>::tiny, eps = Limits<Acc>::eps;
    Result<Acc> res{0, Acc(0)};
    for (int step = 0;; ++step) {
      // optimal q for this v, normalised to sum 1 (v absorbs the scale)
      Acc sum = 0;
      for (int l = 0; l < K; ++l) {
        Acc A = 0, B = 0;
        for (int k = s.cls_ptr[l]; k < s.cls_ptr[l + 1]; ++k) {
          const int ti = s.cls_teacher[k];
          const Acc wv = w[ti] * v[ti];
          A += wv * p[s.cls_col[k]];
          B += wv * v[ti];
        }
        const Acc ql = B > Acc(0) ? A / umax(B, tiny) : Acc(0);
        q[l] = ql, Bl[l] = B;
        sum += ql;
      }
      for (int l = 0; l < K; ++l) q[l] /= sum, Bl[l] *= sum * sum;
      for (int i = 0; i < N; ++i) v[i] *= sum;
      // gradient of f in v
      Acc worst = 0;
      for (int i = 0; i < N; ++i) {
        Acc acc = 0, qq = 0;
        for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) {
          const Acc ql = q[s.class_index[j]];
          acc += ql * p[j] - ql * ql * v[i];
          qq += ql * ql;
        }
        g[i] = -2 * w[i] * acc;
        sq[i] = qq;
        worst = umax(worst, uabs(g[i]));
      }
      res.residual = worst / total;
      if (!(res.residual > tol) || step >= max_iter) break;

      // Hessian: 2 w_j sum_{L_j} q^2 on the diagonal minus 2 w_j w_k sum_{l in L_j, L_k} e_jl e_kl / B_l
      const int ld = padded(N);
      for (int k = 0; k < N * ld; ++k) H[k] = 0;
      for (int l = 0; l < K; ++l) {
        const int lo = s.cls_ptr[l], hi = s.cls_ptr[l + 1];
        if (lo == hi) continue;
        const Acc inv = Acc(2) / umax(Bl[l], tiny);
        for (int k = lo; k < hi; ++k) {
          const int ti = s.cls_teacher[k];
          e[k - lo] = w[ti] * (p[s.cls_col[k]] - 2 * q[l] * v[ti]);
        }
        for (int k = lo; k < hi; ++k) {
          const int ti = s.cls_teacher[k];
          const Acc ek = e[k - lo] * inv;
          for (int m = k; m < hi; ++m) H[ti * ld + s.cls_teacher[m]] -= ek * e[m - lo];
        }
      }
      Acc vnorm2 = 0, level = 0;
      for (int i = 0; i < N; ++i) {
        H[i * ld + i] += 2 * w[i] * sq[i];
        vnorm2 += v[i] * v[i];
      }
      for (int i = 0; i < N; ++i) level += uabs(H[i * ld + i]);
      level /= Acc(N);
      for (int i = 0; i < N; ++i) {  // gauge: curvature along v, the direction f ignores
        for (int j = i; j < N; ++j) {
          const Acc h = H[i * ld + j] + level * v[i] * v[j] / vnorm2;
          H[i * ld + j] = h;
          H[j * ld + i] = h;
        }
      }
      if (cholesky<Acc>(H, N, ld)) {
        for (int i = 0; i < N; ++i) delta[i] = -g[i];
        cholesky_solve<Acc>(H, delta, N, ld);
      } else {  // not positive definite: an ALS sweep, which always descends
        mfp_v_of(q, delta);
        for (int i = 0; i < N; ++i) delta[i] -= v[i];
      }

      const Acc f0 = mfp_objective(v);
      Acc slope = 0, top = v[0];
      for (int i = 0; i < N; ++i) slope += g[i] * delta[i], top = umax(top, v[i]);
      slope = umin(slope, Acc(0));
      const Acc slack = 16 * eps * uabs(f0), floor = Acc(1e-12) * top;
      Acc t = 1;
      for (int h = 0; h < 40; ++h) {
        for (int i = 0; i < N; ++i) cand[i] = umax(v[i] + t * delta[i], floor);
        if (mfp_objective(cand) <= f0 + Acc(1e-4) * t * slope + slack) {
          for (int i = 0; i < N; ++i) v[i] = cand[i];
          break;
        }
        t /= 2;
      }
      ++res.iterations;
    }
    for (int l = 0; l < K; ++l) out[l] = q[l];
    return res;
  }

  // ---------------------------------------------------------------- mf-lf
  // (u, c) of the fixed-scale logit fit from the eliminated system c = G^+ b (reference._mf_lf).
  UHC_HD void mflf_fit(const Acc* gplus, Buf u, Buf zbar, Buf b, Buf c) const {
    for (int l = 0; l < s.K; ++l) {
      Acc wz = 0, W = 0;
      for (int e = s.cls_ptr[l]; e < s.cls_ptr[l + 1]; ++e) {
        const Acc wi = w[s.cls_teacher[e]];
        wz += wi * p[s.cls_col[e]];
        W += wi;
      }
      zbar[l] = wz / (covered(l) ? W : Acc(1));
    }
    for (int i = 0; i < s.N; ++i) {
      Acc acc = 0;
      for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) acc += p[j] - zbar[s.class_index[j]];
      b[i] = acc;
    }
    for (int i = 0; i < s.N; ++i) {
      Acc acc = 0;
      for (int k = 0; k < s.N; ++k) acc += gplus[i * s.N + k] * b[k];
      c[i] = acc;
    }
    for (int l = 0; l < s.K; ++l) {
      Acc wc = 0, W = 0;
      for (int e = s.cls_ptr[l]; e < s.cls_ptr[l + 1]; ++e) {
        const Acc wi = w[s.cls_teacher[e]];
        wc += wi * c[s.cls_teacher[e]];
        W += wi;
      }
      u[l] = zbar[l] - wc / (covered(l) ? W : Acc(1));
    }
  }

  UHC_HD Result<Acc> mflf(const Acc* gplus) const {
    Buf u = work, zbar = work.at(s.K), b = work.at(2 * s.K), c = work.at(2 * s.K + s.N);
    mflf_fit(gplus, u, zbar, b, c);
    write_masked_softmax(u);
    return {0, Acc(0)};
  }

  // ---------------------------------------------------------------- mf-lu
  // sum_i w_i sum_{l in L_i} (z_il - v_i u_l - c_i)^2 at (u, c, v).
  UHC_HD Acc mflu_objective(Buf u, Buf c, Buf v) const {
    Acc f = 0;
    for (int i = 0; i < s.N; ++i) {
      Acc acc = 0;
      for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) {
        const Acc r = p[j] - v[i] * u[s.class_index[j]] - c[i];
        acc += r * r;
      }
      f += w[i] * acc;
    }
    return f;
  }

  // Damped Gauss-Newton from the mf-lf solution (reference.mf._mf_lu_gauss_newton): u is
  // eliminated (its normal block is diagonal), leaving a 2N x 2N Schur system in (c, v).
  UHC_HD Result<Acc> mflu(const Acc* gplus, Acc tol, int max_iter) const {
    const int N = s.N, K = s.K, M = 2 * N;
    Buf u = work, a = work.at(K), gu = work.at(2 * K), su = work.at(3 * K), cu = work.at(4 * K),
        nbuf = work.at(5 * K);
    Buf c = nbuf, v = nbuf.at(N), gcv = nbuf.at(2 * N), rhs = nbuf.at(4 * N), diag = nbuf.at(6 * N),
        cc = nbuf.at(8 * N), cv = nbuf.at(9 * N), vv = nbuf.at(10 * N), cand_c = nbuf.at(11 * N),
        cand_v = nbuf.at(12 * N), pin = nbuf.at(13 * N), S = nbuf.at(14 * N);
    mflf_fit(gplus, u, a, rhs, c);  // a and rhs as scratch here
    const Acc tiny = Limits<Acc>::tiny, eps = Limits<Acc>::eps;
    for (int i = 0; i < N; ++i) v[i] = 1;
    Result<Acc> res{0, Acc(0)};
    for (int step = 0;; ++step) {
      // gauge: weighted mean(v) = 1 (v u is unchanged)
      Acc wv = 0;
      for (int i = 0; i < N; ++i) wv += w[i] * v[i];
      const Acc scale = umax(wv / total, tiny);
      for (int i = 0; i < N; ++i) v[i] /= scale;
      for (int l = 0; l < K; ++l) u[l] *= scale;
      // half the negative gradient, per block: gu (K), gc = gcv[0:N], gv = gcv[N:2N]
      for (int l = 0; l < K; ++l) gu[l] = 0;
      Acc abs_z = 0, mean_cc = 0, mean_vv = 0;
      for (int i = 0; i < N; ++i) {
        Acc gc = 0, gv = 0, sum_u = 0, sum_uu = 0;
        for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) {
          const int l = s.class_index[j];
          const Acc zj = p[j], ul = u[l];
          const Acc r = zj - v[i] * ul - c[i];
          gu[l] += w[i] * v[i] * r;
          gc += r, gv += ul * r;
          sum_u += ul, sum_uu += ul * ul;
          abs_z += uabs(zj);
        }
        gc *= w[i], gv *= w[i];
        // v at its bound, pushed outward: held there this step (no v row in the system)
        const bool pinned = v[i] <= Acc(0) && gv <= Acc(0);
        gcv[i] = gc, gcv[N + i] = pinned ? Acc(0) : gv;
        cc[i] = w[i] * Acc(s.offsets[i + 1] - s.offsets[i]);
        cv[i] = pinned ? Acc(0) : w[i] * sum_u;
        vv[i] = pinned ? Acc(1) : w[i] * sum_uu;
        pin[i] = pinned ? Acc(1) : Acc(0);
        mean_cc += cc[i], mean_vv += vv[i];
      }
      for (int l = 0; l < K; ++l) {
        Acc al = 0;
        for (int e = s.cls_ptr[l]; e < s.cls_ptr[l + 1]; ++e) {
          const int ti = s.cls_teacher[e];
          al += w[ti] * v[ti] * v[ti];
        }
        a[l] = covered(l) ? al : Acc(1);
      }
      // residual: the largest diagonally scaled (coordinate Newton) step, u and c relative to the logits' scale
      const Acc logit_scale = 1 + abs_z / Acc(s.nnz);
      Acc worst_uc = 0, worst_v = 0;
      for (int l = 0; l < K; ++l) worst_uc = umax(worst_uc, uabs(gu[l] / a[l]));
      for (int i = 0; i < N; ++i) {
        worst_uc = umax(worst_uc, uabs(gcv[i] / cc[i]));
        worst_v = umax(worst_v, uabs(gcv[N + i] / umax(vv[i], tiny)));
      }
      res.residual = umax(worst_uc / logit_scale, worst_v);
      if (!(res.residual > tol) || step >= max_iter) break;

      // J^T W J = [[A, X], [X^T, C]]: A diagonal over classes, C block-diagonal over teachers.
      // Levenberg term: fixes the gauge directions, sized to the precision
      const Acc damping = Acc(1e-2) * usqrt(eps) * (mean_cc + mean_vv) / Acc(N);
      for (int l = 0; l < K; ++l) a[l] += damping;
      for (int k = 0; k < M * M; ++k) S[k] = 0;
      for (int i = 0; i < N; ++i) {
        S[i * M + i] = cc[i] + damping;
        S[(N + i) * M + N + i] = vv[i] + damping;
        S[i * M + N + i] = cv[i];
        S[(N + i) * M + i] = cv[i];
        rhs[i] = gcv[i], rhs[N + i] = gcv[N + i];
      }
      // minus X A^-1 X^T, class by class: X has rows (c_i, v_i) = (w_i v_i, w_i v_i u_l) for i covering l
      for (int l = 0; l < K; ++l) {
        const int lo = s.cls_ptr[l], hi = s.cls_ptr[l + 1];
        const Acc inv = Acc(1) / a[l], gu_a = gu[l] * inv;
        for (int e = lo; e < hi; ++e) {
          const int ti = s.cls_teacher[e];
          const Acc xc = w[ti] * v[ti], xv = pin[ti] != Acc(0) ? Acc(0) : xc * u[l];
          rhs[ti] -= xc * gu_a;
          rhs[N + ti] -= xv * gu_a;
          for (int f = lo; f < hi; ++f) {
            const int tj = s.cls_teacher[f];
            const Acc yc = w[tj] * v[tj] * inv, yv = pin[tj] != Acc(0) ? Acc(0) : yc * u[l];
            S[ti * M + tj] -= xc * yc;
            S[ti * M + N + tj] -= xc * yv;
            S[(N + ti) * M + tj] -= xv * yc;
            S[(N + ti) * M + N + tj] -= xv * yv;
          }
        }
      }
      for (int k = 0; k < M; ++k) diag[k] = S[k * M + k];
      Buf step_cv = cand_c;  // borrow cand_c / cand_v (2N contiguous) for the solve
      for (int k = 0; k < M; ++k) step_cv[k] = rhs[k];
      if (!lu_solve<Acc>(S, step_cv, M, M))
        for (int k = 0; k < M; ++k) step_cv[k] = rhs[k] / diag[k];  // singular: a diagonal step
      // keep the step in rhs (the gradient stays in gcv), free cand_c / cand_v again
      for (int k = 0; k < M; ++k) rhs[k] = step_cv[k];
      for (int l = 0; l < K; ++l) {
        Acc acc = gu[l];
        for (int e = s.cls_ptr[l]; e < s.cls_ptr[l + 1]; ++e) {
          const int ti = s.cls_teacher[e];
          const Acc xc = w[ti] * v[ti], xv = pin[ti] != Acc(0) ? Acc(0) : xc * u[l];
          acc -= xc * rhs[ti] + xv * rhs[N + ti];
        }
        su[l] = acc / a[l];
      }

      const Acc f0 = mflu_objective(u, c, v);
      Acc slope = 0;
      for (int l = 0; l < K; ++l) slope += gu[l] * su[l];
      for (int k = 0; k < M; ++k) slope += gcv[k] * rhs[k];
      slope = umin(Acc(-2) * slope, Acc(0));
      const Acc slack = 16 * eps * uabs(f0);
      Acc t = 1;
      for (int h = 0; h < 40; ++h) {
        for (int l = 0; l < K; ++l) cu[l] = u[l] + t * su[l];
        for (int i = 0; i < N; ++i) {
          cand_c[i] = c[i] + t * rhs[i];
          cand_v[i] = umax(v[i] + t * rhs[N + i], Acc(0));
        }
        if (mflu_objective(cu, cand_c, cand_v) <= f0 + Acc(1e-4) * t * slope + slack) {
          for (int l = 0; l < K; ++l) u[l] = cu[l];
          for (int i = 0; i < N; ++i) c[i] = cand_c[i], v[i] = cand_v[i];
          break;
        }
        t /= 2;
      }
      ++res.iterations;
    }
    write_masked_softmax(u);
    return res;
  }
};

// Everything one launch needs, shared by every sample.
template <class Acc, class In>
struct Problem {
  Structure s;
  const In* values;     // (B, nnz) packed values, element (b, j) at values[b * row_stride + j * col_stride]
  int64_t row_stride;
  int64_t col_stride;
  int64_t batch;
  const Acc* weights;   // (N,)
  const Acc* gplus;     // (N, N) mf-lf system (mf-lf, mf-lu), else unused
  int method;
  Acc tol;
  int max_iter;
  int ce_max_iter;      // cap of the ce solve mf-p starts from
  Acc* soft;            // (B, K)
  int32_t* iterations;  // (B,) or null
  Acc* residual;        // (B,) or null
};

// Solve sample b of `prob` with scratch `work`.
template <class Acc, class In, class Buf>
UHC_HD void solve_sample(const Problem<Acc, In>& prob, int64_t b, Buf work) {
  const Row<In, Acc> row{prob.values + b * prob.row_stride, prob.col_stride};
  Acc total = 0;
  for (int i = 0; i < prob.s.N; ++i) total += prob.weights[i];
  const Sample<Acc, In, Buf> sample{prob.s, row, prob.weights, total, work, prob.soft + b * prob.s.K};
  Result<Acc> res{0, Acc(0)};
  switch (prob.method) {
    case kSD:
      res = sample.sd();
      break;
    case kCE:
      res = sample.ce(prob.tol, prob.max_iter);
      break;
    case kMFP:
      res = sample.mfp(prob.tol, prob.max_iter, prob.ce_max_iter);
      break;
    case kMFLF:
      res = sample.mflf(prob.gplus);
      break;
    default:
      res = sample.mflu(prob.gplus, prob.tol, prob.max_iter);
      break;
  }
  if (prob.iterations) prob.iterations[b] = res.iterations;
  if (prob.residual) prob.residual[b] = res.residual;
}

}  // namespace uhc
