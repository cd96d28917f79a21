// `mf-p`: rank-one factorisation of the teachers' probabilities, a tile of samples in lockstep:
// Newton in log scale on the N scales from the `ce` estimate, in double (the algorithm, rules and
// convergence test of uhc_fast/reference/mf_p.py: read its docstring first).
#pragma once

#include "ce.h"

namespace UHC_NAMESPACE {

template <int W, class Arena>
struct MfPScratch {
  using D = typename Lanes<W>::D;
  CeScratch<W, Arena> ce;                      // the start
  View<Arena, D> p;                            // packed probabilities (nnz)
  View<Arena, D> q, B, moved;                  // per class: fitted q (unnormalised), B_l, the step's change of q
  View<Arena, D> v, cand, grad, step, dv, e;   // per teacher (e: one class's entries)
  View<Arena, D> H;                            // N x N
  UHC_HD MfPScratch(Arena& a, const Structure& s)
      : ce(a, s),
        p(a.template take<D>(s.nnz)),
        q(a.template take<D>(s.K)),
        B(a.template take<D>(s.K)),
        moved(a.template take<D>(s.K)),
        v(a.template take<D>(s.N)),
        cand(a.template take<D>(s.N)),
        grad(a.template take<D>(s.N)),
        step(a.template take<D>(s.N)),
        dv(a.template take<D>(s.N)),
        e(a.template take<D>(s.N)),
        H(a.template take<D>(int64_t(s.N) * s.N)) {}
};

template <int W, class Out, class Arena>
struct MfPSolver {
  using D = typename Lanes<W>::D;
  using M = typename Lanes<W>::M;
  const Tile<W, Out>& tile;
  MfPScratch<W, Arena>& sc;

  UHC_HD const Structure& s() const { return tile.s(); }
  static UHC_HD D num(double x) { return splat<D>(x); }

  // q_l = A_l / B_l for the scales in `v` (into sc.q, sc.B); returns sum_l q_l.
  template <class V>
  UHC_HD D fit(V v) const {
    const Structure& st = s();
    const double* w = tile.prob.weights;
    D total = num(0);
    for (int l = 0; l < st.K; ++l) {
      D A = num(0), Bl = num(0);
      for (int k = st.cls_ptr[l]; k < st.cls_ptr[l + 1]; ++k) {
        const int i = st.cls_teacher[k];
        const D wv = w[i] * D(v[i]);
        A += wv * D(sc.p[st.cls_col[k]]);
        Bl += wv * D(v[i]);
      }
      const D ql = select(Bl > 0, A / vmax(Bl, num(2.2250738585072014e-308)), num(0));
      sc.q[l] = ql, sc.B[l] = Bl;
      total += ql;
    }
    return total;
  }

  // sum_i w_i sum_{l in L_i} (p_il - v_i q_l(v))^2, evaluated as the sum of squares it is.
  template <class V>
  UHC_HD D objective(V v) const {
    const Structure& st = s();
    fit(v);
    D f = num(0);
    for (int i = 0; i < st.N; ++i) {
      D acc = num(0);
      for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
        const D r = D(sc.p[j]) - D(v[i]) * D(sc.q[st.class_index[j]]);
        acc += r * r;
      }
      f += tile.prob.weights[i] * acc;
    }
    return f;
  }

  UHC_HD Report<W> solve(M active, double tol, int max_iter) const {
    const Structure& st = s();
    const int N = st.N;
    const double* w = tile.prob.weights;
    const CeSolver<W, Out, Arena> start{tile, sc.ce};
    start.packed_evidence(sc.p);
    start.solve(active, tol, kDefaultMaxIter);  // the start, in sc.ce.n
    // the scale gauge: the heaviest teacher keeps its scale, of those the one with the most classes
    // (the first); see uhc_fast/reference/mf_p.py for why the heaviest
    int held = 0;
    for (int i = 1; i < N; ++i) {
      const int size = st.offsets[i + 1] - st.offsets[i], held_size = st.offsets[held + 1] - st.offsets[held];
      if (w[i] > w[held] || (w[i] == w[held] && size > held_size)) held = i;
    }
    const D zero = num(0), one = num(1), tiny = num(2.2250738585072014e-308);
    for (int i = 0; i < N; ++i) {  // the v-half of an ALS sweep from the ce estimate
      D pq = zero, qq = zero;
      for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
        const D ql = sc.ce.n[st.class_index[j]];
        pq += D(sc.p[j]) * ql, qq += ql * ql;
      }
      sc.v[i] = pq / vmax(qq, tiny);
    }
    Report<W> rep{zero, zero, zero, zero, zero != zero};
    for (int iteration = 0;; ++iteration) {
      const D total = fit(sc.v);
      // gradient (half the negative one) and Hessian (halved) in v, then in log v
      for (int k = 0; k < N * N; ++k) sc.H[k] = zero;
      for (int i = 0; i < N; ++i) {
        D g = zero, qq = zero;
        for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
          const D ql = sc.q[st.class_index[j]];
          g += ql * (D(sc.p[j]) - D(sc.v[i]) * ql), qq += ql * ql;
        }
        sc.grad[i] = w[i] * g;
        sc.H[i * N + i] = w[i] * qq;
      }
      for (int l = 0; l < st.K; ++l) {  // minus sum_l (w e)(w e)^T / B_l, e_il = p_il - 2 q_l v_i
        const int lo = st.cls_ptr[l], hi = st.cls_ptr[l + 1];
        if (lo == hi) continue;
        const D inv = one / vmax(D(sc.B[l]), tiny), ql = sc.q[l];
        for (int k = lo; k < hi; ++k) {
          const int i = st.cls_teacher[k];
          sc.e[k - lo] = w[i] * (D(sc.p[st.cls_col[k]]) - 2.0 * ql * D(sc.v[i]));
        }
        for (int a = lo; a < hi; ++a) {
          const D ea = D(sc.e[a - lo]) * inv;
          const int row = st.cls_teacher[a] * N;
          for (int b = a; b < hi; ++b) sc.H[row + st.cls_teacher[b]] = D(sc.H[row + st.cls_teacher[b]]) - ea * D(sc.e[b - lo]);
        }
      }
      D residual = zero;
      for (int i = 0; i < N; ++i) {
        const D vi = sc.v[i], gs = vi * D(sc.grad[i]);
        for (int j = i + 1; j < N; ++j) sc.H[i * N + j] = vi * D(sc.v[j]) * D(sc.H[i * N + j]);
        sc.H[i * N + i] = vi * vi * D(sc.H[i * N + i]) - gs;
        sc.step[i] = i == held ? zero : gs;
        if (i != held) residual = vmax(residual, vabs(gs) / vmax(vabs(D(sc.H[i * N + i])), tiny));
      }
      for (int j = 0; j < N; ++j) sc.H[held * N + j] = zero, sc.H[j * N + held] = zero;
      sc.H[held * N + held] = one;
      const M exact = cholesky<D, M>(sc.H, N);
      cholesky_solve<D>(sc.H, sc.step, N);
      // where not positive definite: the v-half of an ALS sweep, as a log step
      D longest = zero;
      for (int i = 0; i < N; ++i) {
        D pq = zero, qq = zero;
        for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
          const D ql = sc.q[st.class_index[j]];
          pq += D(sc.p[j]) * ql, qq += ql * ql;
        }
        const D als = vlog(vmax(pq / vmax(qq, tiny), tiny) / D(sc.v[i]));
        const D si = i == held ? zero : select(exact, D(sc.step[i]), als);
        sc.step[i] = si;
        longest = vmax(longest, vabs(si));
      }
      const D cap = num(kMaxLogStep) / vmax(longest, num(kMaxLogStep));
      for (int i = 0; i < N; ++i) sc.step[i] = D(sc.step[i]) * cap, sc.dv[i] = D(sc.v[i]) * D(sc.step[i]);
      // the step's first-order change of the normalised soft labels
      D moved_total = zero;
      for (int l = 0; l < st.K; ++l) {
        D acc = zero;
        for (int k = st.cls_ptr[l]; k < st.cls_ptr[l + 1]; ++k) {
          const int i = st.cls_teacher[k];
          acc += w[i] * (D(sc.p[st.cls_col[k]]) - 2.0 * D(sc.q[l]) * D(sc.v[i])) * D(sc.dv[i]);
        }
        const D m = select(D(sc.B[l]) > 0, acc / vmax(D(sc.B[l]), tiny) / total, zero);
        sc.moved[l] = m;
        moved_total += m;
      }
      D pred = zero;
      for (int l = 0; l < st.K; ++l) pred = vmax(pred, vabs(D(sc.moved[l]) - D(sc.q[l]) / total * moved_total));
      rep.residual = select(active, residual, rep.residual);
      rep.step = select(active, pred, rep.step);
      const M done = active & exact & (residual <= tol) & (pred <= tol);
      rep.converged = rep.converged | done;

      D slope = zero;
      for (int i = 0; i < N; ++i) slope += D(sc.grad[i]) * D(sc.dv[i]);
      slope = -2.0 * slope;
      M searching = active & lnot(done) & (slope < 0);
      if (iteration >= max_iter) searching = zero != zero;
      M trying = searching | done, accepted = zero != zero;
      const D f0 = objective(sc.v), slack = 16 * 2.220446049250313e-16 * vabs(f0);
      D a = one, taken = zero;
      for (int h = 0; h < kMaxHalvings && any(trying); ++h) {
        for (int i = 0; i < N; ++i) sc.cand[i] = D(sc.v[i]) * vexp(a * D(sc.step[i]));
        const D f = objective(sc.cand);
        const M ok = trying & (f <= f0 + kArmijo * a * slope + slack) & isfinite_lanes(f);
        taken = select(ok, a, taken);
        accepted = accepted | ok;
        trying = trying & lnot(ok) & lnot(done);
        a = a * 0.5;
      }
      for (int i = 0; i < N; ++i) sc.v[i] = D(sc.v[i]) * vexp(taken * D(sc.step[i]));
      rep.iterations = rep.iterations + select(accepted & lnot(done), one, zero);
      active = searching & accepted;
      if (!any(active)) break;
    }
    const D total = fit(sc.v);
    for (int l = 0; l < st.K; ++l) sc.q[l] = D(sc.q[l]) / total;
    return rep;
  }
};

}  // namespace UHC_NAMESPACE
