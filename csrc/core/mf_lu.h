// `mf-lu`: logit space with an unknown scale per teacher, a tile of samples in lockstep: variable
// projection with Newton steps in log scale, in double (the algorithm, rules and convergence test
// of uhc_fast/reference/mf_lu.py: read its docstring first).
#pragma once

#include "linalg.h"
#include "tile.h"

namespace UHC_NAMESPACE {

template <int W, class Arena>
struct MfLuScratch {
  using D = typename Lanes<W>::D;
  View<Arena, D> z;                            // packed logits (nnz)
  View<Arena, D> u, a, zv, step_u;             // per class
  View<Arena, D> v, c, cand, grad, held, step, beta, ground, rhs, pivot, x, vv, cv;  // per teacher
  View<Arena, D> xc, xv, xg;                   // one class's column of the Hessian's X block (per teacher)
  View<Arena, D> links;                        // N x N: the projection's Laplacian
  View<Arena, D> scc, scv, scv_gn, svv, svv_gn, y;  // the Newton system's blocks (N x N each)
  UHC_HD MfLuScratch(Arena& ar, const Structure& s)
      : z(ar.template take<D>(s.nnz)),
        u(ar.template take<D>(s.K)),
        a(ar.template take<D>(s.K)),
        zv(ar.template take<D>(s.K)),
        step_u(ar.template take<D>(s.K)),
        v(ar.template take<D>(s.N)),
        c(ar.template take<D>(s.N)),
        cand(ar.template take<D>(s.N)),
        grad(ar.template take<D>(s.N)),
        held(ar.template take<D>(s.N)),
        step(ar.template take<D>(s.N)),
        beta(ar.template take<D>(s.N)),
        ground(ar.template take<D>(s.N)),
        rhs(ar.template take<D>(s.N)),
        pivot(ar.template take<D>(s.N)),
        x(ar.template take<D>(s.N)),
        vv(ar.template take<D>(s.N)),
        cv(ar.template take<D>(s.N)),
        xc(ar.template take<D>(s.N)),
        xv(ar.template take<D>(s.N)),
        xg(ar.template take<D>(s.N)),
        links(ar.template take<D>(int64_t(s.N) * s.N)),
        scc(ar.template take<D>(int64_t(s.N) * s.N)),
        scv(ar.template take<D>(int64_t(s.N) * s.N)),
        scv_gn(ar.template take<D>(int64_t(s.N) * s.N)),
        svv(ar.template take<D>(int64_t(s.N) * s.N)),
        svv_gn(ar.template take<D>(int64_t(s.N) * s.N)),
        y(ar.template take<D>(int64_t(s.N) * s.N)) {}
};

template <int W, class Out, class Arena>
struct MfLuSolver {
  using D = typename Lanes<W>::D;
  using M = typename Lanes<W>::M;
  const Tile<W, Out>& tile;
  MfLuScratch<W, Arena>& sc;

  UHC_HD const Structure& s() const { return tile.s(); }
  static UHC_HD D num(double x) { return splat<D>(x); }
  UHC_HD double weight(int i) const { return tile.prob.weights[i]; }

  // (u, c) minimising the objective for the scales in `v` (c of the last teacher 0), and a_l;
  // returns sum_i w_i sum_{l in L_i} r_il^2 (see reference.mf_lu.project).
  template <class V>
  UHC_HD D project(V v) const {
    const Structure& st = s();
    const int N = st.N, n = N - 1;
    const D zero = num(0), one = num(1);
    for (int l = 0; l < st.K; ++l) {
      D al = zero, zl = zero;
      for (int k = st.cls_ptr[l]; k < st.cls_ptr[l + 1]; ++k) {
        const int i = st.cls_teacher[k];
        const D wv = weight(i) * D(v[i]);
        al += wv * D(v[i]), zl += wv * D(sc.z[st.cls_col[k]]);
      }
      sc.a[l] = st.cls_ptr[l + 1] > st.cls_ptr[l] ? al : one;
      sc.zv[l] = zl;
    }
    for (int i = 0; i < N; ++i) {
      D acc = zero;
      for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
        const int l = st.class_index[j];
        acc += D(sc.z[j]) - D(v[i]) * D(sc.zv[l]) / D(sc.a[l]);
      }
      sc.beta[i] = weight(i) * acc;
    }
    for (int k = 0; k < N * N; ++k) sc.links[k] = zero;
    for (int l = 0; l < st.K; ++l) {
      const int lo = st.cls_ptr[l], hi = st.cls_ptr[l + 1];
      const D inv = one / D(sc.a[l]);
      for (int p = lo; p < hi; ++p) {
        const int i = st.cls_teacher[p];
        const D wi = weight(i) * D(v[i]) * D(v[i]) * inv;
        for (int q = p + 1; q < hi; ++q) {
          const int j = st.cls_teacher[q];
          sc.links[i * N + j] = D(sc.links[i * N + j]) + wi * (weight(j) * D(v[j]) * D(v[j]));
        }
      }
    }
    // grounded at the last teacher: ct (c = v ct) from the n x n system, rewritten in place
    for (int i = 0; i < n; ++i) {
      for (int j = i + 1; j < n; ++j) sc.links[i * n + j] = D(sc.links[i * N + j]);
      sc.ground[i] = D(sc.links[i * N + n]);
      sc.rhs[i] = D(v[i]) * D(sc.beta[i]);
    }
    grounded_laplacian_solve<D>(sc.links, sc.ground, {sc.rhs}, sc.pivot, {sc.x}, n);
    for (int i = 0; i < n; ++i) sc.c[i] = D(v[i]) * D(sc.x[i]);
    sc.c[n] = zero;
    for (int l = 0; l < st.K; ++l) {
      D wc = zero;
      for (int k = st.cls_ptr[l]; k < st.cls_ptr[l + 1]; ++k) {
        const int i = st.cls_teacher[k];
        wc += weight(i) * D(v[i]) * D(sc.c[i]);
      }
      sc.u[l] = st.cls_ptr[l + 1] > st.cls_ptr[l] ? (D(sc.zv[l]) - wc) / D(sc.a[l]) : zero;
    }
    D f = zero;
    for (int i = 0; i < N; ++i) {
      D acc = zero;
      for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
        const D r = D(sc.z[j]) - D(v[i]) * D(sc.u[st.class_index[j]]) - D(sc.c[i]);
        acc += r * r;
      }
      f += weight(i) * acc;
    }
    return f;
  }

  // The teachers' weighted mean scale (the prior teacher excluded).
  template <class V>
  UHC_HD D mean_scale(V v) const {
    const Structure& st = s();
    D acc = num(0);
    double total = 0;
    for (int i = 0; i < st.N; ++i)
      if (st.scale_anchor[i] != kPriorTeacher) acc += weight(i) * D(v[i]), total += weight(i);
    return acc / num(total);
  }

  UHC_HD Report<W> solve(M active, double tol, int max_iter) const {
    const Structure& st = s();
    const int N = st.N, n = N - 1;
    const D zero = num(0), one = num(1), tiny = num(2.2250738585072014e-308);
    for (int i = 0; i < N; ++i) sc.v[i] = one;
    Report<W> rep{zero, zero, zero, zero, zero != zero};
    for (int iteration = 0;; ++iteration) {
      const D f0 = project(sc.v);
      // half the negative gradient in v, and the Hessian's diagonal blocks (halved)
      D residual = zero;
      for (int i = 0; i < N; ++i) {
        D g = zero, su = zero, suu = zero;
        for (int j = st.offsets[i]; j < st.offsets[i + 1]; ++j) {
          const D ul = sc.u[st.class_index[j]];
          g += ul * (D(sc.z[j]) - D(sc.v[i]) * ul - D(sc.c[i])), su += ul, suu += ul * ul;
        }
        // anchors are held; so is a scale at its bound pushed outward, for this step
        const M at_bound = (D(sc.v[i]) <= kMinScale) & (g <= 0);
        const D held = st.scale_anchor[i] != 0 ? one : select(at_bound, one, zero);
        sc.held[i] = held;
        sc.grad[i] = select(held == 0, weight(i) * g, zero);
        sc.cv[i] = weight(i) * su, sc.vv[i] = weight(i) * suu;
        residual = vmax(residual, vabs(D(sc.grad[i])) / vmax(D(sc.vv[i]), tiny));
      }
      // the (c, v) Schur complement of u, exact and Gauss-Newton: blocks over (c_i, v_j)
      for (int k = 0; k < N * N; ++k) sc.scc[k] = zero, sc.scv[k] = zero, sc.scv_gn[k] = zero, sc.svv[k] = zero, sc.svv_gn[k] = zero;
      for (int i = 0; i < N; ++i) {
        sc.scc[i * N + i] = num(weight(i) * (st.offsets[i + 1] - st.offsets[i]));
        sc.scv[i * N + i] = D(sc.cv[i]), sc.scv_gn[i * N + i] = D(sc.cv[i]);
        sc.svv[i * N + i] = D(sc.vv[i]), sc.svv_gn[i * N + i] = D(sc.vv[i]);
      }
      for (int l = 0; l < st.K; ++l) {
        const int lo = st.cls_ptr[l], hi = st.cls_ptr[l + 1];
        const D inv = one / D(sc.a[l]), ul = sc.u[l];
        for (int p = lo; p < hi; ++p) {  // the class's column of X: (c, v exact, v Gauss-Newton) rows
          const int i = st.cls_teacher[p];
          const D vi = sc.v[i], ri = D(sc.z[st.cls_col[p]]) - vi * ul - D(sc.c[i]);
          sc.xc[p - lo] = weight(i) * vi, sc.xv[p - lo] = weight(i) * (vi * ul - ri), sc.xg[p - lo] = weight(i) * vi * ul;
        }
        for (int p = lo; p < hi; ++p) {
          const int row = st.cls_teacher[p] * N;
          const D xc_i = D(sc.xc[p - lo]) * inv, xv_i = D(sc.xv[p - lo]) * inv, xg_i = D(sc.xg[p - lo]) * inv;
          for (int q = lo; q < hi; ++q) {
            const int at = row + st.cls_teacher[q];
            const D xc_j = sc.xc[q - lo], xv_j = sc.xv[q - lo], xg_j = sc.xg[q - lo];
            sc.scv[at] = D(sc.scv[at]) - xc_i * xv_j;
            sc.scv_gn[at] = D(sc.scv_gn[at]) - xc_i * xg_j;
            if (q >= p) {  // (teachers ascend within a class: the upper triangle)
              sc.scc[at] = D(sc.scc[at]) - xc_i * xc_j;
              sc.svv[at] = D(sc.svv[at]) - xv_i * xv_j;
              sc.svv_gn[at] = D(sc.svv_gn[at]) - xg_i * xg_j;
            }
          }
        }
      }
      // eliminate the free shifts (all but the last teacher's): scc's leading n x n block
      for (int i = 0; i < n; ++i)
        for (int j = i; j < n; ++j) sc.scc[i * n + j] = D(sc.scc[i * N + j]);  // in place: reads stay ahead of writes
      const M factored = cholesky<D, M>(sc.scc, n);
      M exact = factored;
      for (int pass = 0; pass < 2; ++pass) {
        // copies, not references: a runtime-chosen reference would pin the scratch in local memory
        const auto scv = pass == 0 ? sc.scv : sc.scv_gn;
        const auto svv = pass == 0 ? sc.svv : sc.svv_gn;
        // reduced_ij = svv_ij - sum_k scv_ki y_kj with y_.j = scc^-1 scv_.j, in log scale (held rows: identity)
        for (int j = 0; j < N; ++j) {
          for (int k = 0; k < n; ++k) sc.x[k] = D(scv[k * N + j]);
          cholesky_solve<D>(sc.scc, sc.x, n);
          for (int k = 0; k < n; ++k) sc.y[k * N + j] = D(sc.x[k]);
        }
        for (int i = 0; i < N; ++i) {
          for (int j = i; j < N; ++j) {
            D acc = svv[i * N + j];
            for (int k = 0; k < n; ++k) acc -= D(scv[k * N + i]) * D(sc.y[k * N + j]);
            acc = D(sc.v[i]) * D(sc.v[j]) * acc;
            if (j == i && pass == 0) acc -= D(sc.v[i]) * D(sc.grad[i]);
            const M held = (D(sc.held[i]) != 0) | (D(sc.held[j]) != 0);
            sc.links[i * N + j] = select(held, i == j ? one : zero, acc);
          }
        }
        for (int i = 0; i < N; ++i) {
          sc.rhs[i] = D(sc.v[i]) * D(sc.grad[i]);
          sc.ground[i] = D(sc.rhs[i]) / vmax(vabs(D(sc.links[i * N + i])), tiny);  // a diagonal step, the last resort
        }
        const M ok = factored & cholesky<D, M>(sc.links, N);
        cholesky_solve<D>(sc.links, sc.rhs, N);
        for (int i = 0; i < N; ++i) {
          const D fallback = pass == 0 ? zero : select(ok, D(sc.rhs[i]), D(sc.ground[i]));
          sc.step[i] = pass == 0 ? select(ok, D(sc.rhs[i]), zero) : select(exact, D(sc.step[i]), fallback);
        }
        if (pass == 0) {
          exact = ok;
          if (all(exact | lnot(active))) break;
        }
      }
      D longest = zero;
      for (int i = 0; i < N; ++i) longest = vmax(longest, vabs(D(sc.step[i])));
      const D cap = num(kMaxLogStep) / vmax(longest, num(kMaxLogStep));
      for (int i = 0; i < N; ++i) sc.step[i] = D(sc.step[i]) * cap;
      // the step's first-order change of the soft labels at the reporting scale: the shifts and u
      // follow v through the linearised normal equations
      for (int k = 0; k < n; ++k) {
        D acc = zero;
        for (int j = 0; j < N; ++j) acc += select(exact, D(sc.scv[k * N + j]), D(sc.scv_gn[k * N + j])) * D(sc.v[j]) * D(sc.step[j]);
        sc.x[k] = acc;
      }
      cholesky_solve<D>(sc.scc, sc.x, n);
      for (int l = 0; l < st.K; ++l) {
        D acc = zero;
        for (int k = st.cls_ptr[l]; k < st.cls_ptr[l + 1]; ++k) {
          const int i = st.cls_teacher[k];
          const D vi = sc.v[i], ul = sc.u[l], ri = D(sc.z[st.cls_col[k]]) - vi * ul - D(sc.c[i]);
          const D xv = select(exact, weight(i) * (vi * ul - ri), weight(i) * vi * ul);
          const D dc = i < n ? -D(sc.x[i]) : zero;
          acc += weight(i) * vi * dc + xv * vi * D(sc.step[i]);
        }
        sc.step_u[l] = -acc / D(sc.a[l]);
      }
      for (int i = 0; i < N; ++i) sc.cand[i] = D(sc.v[i]) * D(sc.step[i]);
      const D scale = mean_scale(sc.v), dscale = mean_scale(sc.cand);
      D top = num(-INFINITY);
      for (int l = 0; l < st.K; ++l)
        if (st.cls_ptr[l + 1] > st.cls_ptr[l]) top = vmax(top, D(sc.u[l]) * scale);
      D sum = zero, dot = zero;
      for (int l = 0; l < st.K; ++l) {
        const bool covered = st.cls_ptr[l + 1] > st.cls_ptr[l];
        const D ql = covered ? vexp(D(sc.u[l]) * scale - top) : zero;
        const D moved = scale * D(sc.step_u[l]) + D(sc.u[l]) * dscale;
        sc.zv[l] = ql, sc.a[l] = moved;  // (zv and a are free until the next projection)
        sum += ql, dot += ql * moved;
      }
      D pred = zero;
      for (int l = 0; l < st.K; ++l) pred = vmax(pred, vabs(D(sc.zv[l]) / sum * (D(sc.a[l]) - dot / sum)));
      rep.residual = select(active, residual, rep.residual);
      rep.step = select(active, pred, rep.step);
      const M done = active & exact & (residual <= tol) & (pred <= tol);
      rep.converged = rep.converged | done;

      D slope = zero;
      for (int i = 0; i < N; ++i) slope += D(sc.grad[i]) * D(sc.v[i]) * D(sc.step[i]);
      slope = -2.0 * slope;
      M searching = active & lnot(done) & (slope < 0);
      if (iteration >= max_iter) searching = zero != zero;
      M trying = searching | done, accepted = zero != zero;
      const D slack = 16 * 2.220446049250313e-16 * vabs(f0);
      D a = one, taken = zero;
      for (int h = 0; h < kMaxHalvings && any(trying); ++h) {
        for (int i = 0; i < N; ++i) sc.cand[i] = vmax(D(sc.v[i]) * vexp(a * D(sc.step[i])), num(kMinScale));
        const D f = project(sc.cand);
        const M ok = trying & (f <= f0 + kArmijo * a * slope + slack) & isfinite_lanes(f);
        taken = select(ok, a, taken);
        accepted = accepted | ok;
        trying = trying & lnot(ok) & lnot(done);
        a = a * 0.5;
      }
      for (int i = 0; i < N; ++i)
        sc.v[i] = select(accepted, vmax(D(sc.v[i]) * vexp(taken * D(sc.step[i])), num(kMinScale)), D(sc.v[i]));
      rep.iterations = rep.iterations + select(accepted & lnot(done), one, zero);
      active = searching & accepted;
      if (!any(active)) break;
    }
    project(sc.v);
    const D scale = mean_scale(sc.v);
    for (int l = 0; l < st.K; ++l) sc.u[l] = D(sc.u[l]) * scale;
    return rep;
  }
};

}  // namespace UHC_NAMESPACE
