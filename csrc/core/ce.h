// `ce`: damped Newton on the teacher-space dual, a tile of samples in lockstep. The algorithm,
// its precision rules and its convergence test are those of uhc_fast/reference/ce.py (read its
// docstring first): state and Newton system in double, the gradient as flows between teachers (to
// each group's top teacher), the grounded Laplacian solved by positive elimination in flow form,
// steps capped at kMaxLogStep, and a line search measuring F's change term by term. Two shortcuts
// the reference does not take: a full step whose curvature bound already passes Armijo's test is
// accepted without F's per-group logarithms (full_step_bound; the same decision, since the bound is
// above the exact change), and the Newton step is solved from the summed gradient, from the flows
// only where a bound on the summed gradient's rounding says it matters (newton_step).
//
// Classes covered by the same teachers ("groups") share D_g = sum_{i in g} exp(t_i), so every
// per-iteration loop runs over groups and their (group, teacher) entries: O(E) for the point and
// each line-search trial and the flows, O(sum_g d_g^2) for the Newton system, O(N^3) to solve it.
#pragma once

#include "linalg.h"
#include "tile.h"

namespace UHC_NAMESPACE {

template <int W, class Arena>
struct CeScratch {
  using D = typename Lanes<W>::D;
  View<Arena, D> n;                             // class evidence (K)
  View<Arena, D> row;                           // one teacher's rows (at most K values)
  View<Arena, D> entry;                         // per (group, teacher) entry: the teacher's evidence e_ig on the group
  View<Arena, D> Ng, Mg, top, Dg, inv, x, mg, trial, next;  // per group: evidence, largest class evidence, the
                                                            // teacher with the most evidence (its index, per
                                                            // lane), D_g, 1 / D_g, N_g / D_g, step mean, the
                                                            // trial's D_g, next D_g
  View<Arena, D> t, r, step, mass, evidence, evidence_shared, moved, wm, rs, ex, ex_size;  // per teacher
  View<Arena, D> gradient, rounding;  // per teacher: the summed gradient and a bound on its rounding
  View<Arena, D> to_top;  // N x N: the gradient's flows P_ij (to each group's top teacher j)
  View<Arena, D> curvature;                     // per group: N_g / D_g^2, the Newton system's link weight
  View<Arena, D> links, ground, flows, flows_to_ground, rhs, pivot, sol;  // the grounded Newton system
  View<Arena, D> links_copy, ground_copy, rhs_bound, bound;  // the summed gradient's solve: the system's copy,
                                                             // the rounding bounds and the step's error bounds
  UHC_HD CeScratch(Arena& a, const Structure& s)
      : n(a.template take<D>(s.K)),
        row(a.template take<D>(s.K)),
        entry(a.template take<D>(s.E)),
        Ng(a.template take<D>(s.G)),
        Mg(a.template take<D>(s.G)),
        top(a.template take<D>(s.G)),
        Dg(a.template take<D>(s.G)),
        inv(a.template take<D>(s.G)),
        x(a.template take<D>(s.G)),
        mg(a.template take<D>(s.G)),
        trial(a.template take<D>(s.G)),
        next(a.template take<D>(s.G)),
        t(a.template take<D>(s.N)),
        r(a.template take<D>(s.N)),
        step(a.template take<D>(s.N)),
        mass(a.template take<D>(s.N)),
        evidence(a.template take<D>(s.N)),
        evidence_shared(a.template take<D>(s.N)),
        moved(a.template take<D>(s.N)),
        wm(a.template take<D>(s.N)),
        rs(a.template take<D>(s.N)),
        ex(a.template take<D>(s.N)),
        ex_size(a.template take<D>(s.N)),
        gradient(a.template take<D>(s.N)),
        rounding(a.template take<D>(s.N)),
        to_top(a.template take<D>(int64_t(s.N) * s.N)),
        curvature(a.template take<D>(s.G)),
        links(a.template take<D>(int64_t(s.N) * s.N)),
        ground(a.template take<D>(s.N)),
        flows(a.template take<D>(int64_t(s.N) * s.N)),
        flows_to_ground(a.template take<D>(s.N)),
        rhs(a.template take<D>(s.N)),
        pivot(a.template take<D>(s.N)),
        sol(a.template take<D>(s.N)),
        links_copy(a.template take<D>(int64_t(s.N) * s.N)),
        ground_copy(a.template take<D>(s.N)),
        rhs_bound(a.template take<D>(s.N)),
        bound(a.template take<D>(s.N)) {}
};

// An upper bound on F(t + step) - F(t) from the step's slope and curvature, with no logarithms.
// F's Hessian is sum_g N_g Cov_{pi_g}; along the step the weights pi_ig change by at most the
// factor e^{s range} (range = max step - min step), so the curvature does too, and
//   F(t + step) - F(t) <= slope + quad (e^x - 1 - x) / x^2,  x = range, quad = step' H step.
// quad is formed as a difference of sums up to `spread` (sum_g N_g E[step^2]); `rounding` times
// spread is the margin for their rounding. Where the bound passes Armijo, so does the exact change:
// the line search accepts the full step without the per-group logarithms (most steps after the first).
template <class D>
UHC_HD D full_step_bound(const D& slope, const D& quad, const D& spread, const D& range, double rounding) {
  const D x = range;
  const D series = 0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 700))));  // x < 1e-2: above the tail
  const D safe = vmax(x, splat<D>(1e-2));
  const D closed = (vexpm1(safe) - safe) / (safe * safe);
  const D phi = select(x < 1e-2, series, closed);
  return slope + (vmax(quad, splat<D>(0.0)) + rounding * spread) * phi * (1.0 + 1e-9);
}

// ce's step is solved again from the gradient as flows where the summed gradient's rounding could
// move it by more than this fraction of tol (CeSolver::newton_step): the next step's change of the
// soft labels, which the convergence test measures, then moves by at most 2 tol / 32.
constexpr double kSummedStepError = 1.0 / 32;

// The margin full_step_bound needs for quad = spread - sum_g N_g m_g^2: both sums' rounding is
// within (G + N) ulps of spread.
UHC_HD double quad_rounding(const Structure& s) { return 1e-12 + 4.5e-16 * (s.G + s.N); }

// Per lane (V: lanes or one double), the teacher whose Newton step is 0 (F is invariant to a common
// shift of t): the one with the most evidence on the classes it shares, the last of equals. Its
// gradient is formed from the largest terms, so it is the least precise: a heavy teacher among
// light ones, or a teacher of a well-covered block beside one joined to it only through classes of
// tiny mass, whose gradient alone can say how the mass splits.
template <class V, class Values>
UHC_HD V ground_teacher(const Values& evidence_shared, int N) {
  V most = evidence_shared[0], k = splat<V>(0.0);
  for (int i = 1; i < N; ++i) {
    const V e = evidence_shared[i];
    const auto more = e >= most;
    most = select(more, e, most), k = select(more, splat<V>(i), k);
  }
  return k;
}

template <int W, class Out, class Arena>
struct CeSolver {
  using D = typename Lanes<W>::D;
  using M = typename Lanes<W>::M;
  const Tile<W, Out>& tile;
  CeScratch<W, Arena>& sc;

  UHC_HD const Structure& s() const { return tile.s(); }
  static UHC_HD D num(double x) { return splat<D>(x); }

  // Adds teacher i's evidence, wi times its columns' values value(j - offsets[i]), to n and to its
  // (group, teacher) entries, and sets its total evidence E_i and its evidence on the groups it
  // shares (which teacher is grounded).
  template <class Value>
  UHC_HD void add_teacher(int i, const D& wi, Value value) const {
    const Structure& st = s();
    const int lo = st.offsets[i];
    D on_shared = num(0), total = num(0);
    for (int j = lo; j < st.offsets[i + 1]; ++j) {
      const int l = st.class_index[j], g = st.class_group[l];
      const D v = wi * value(j - lo);
      sc.n[l] = D(sc.n[l]) + v;
      const int k = st.col_entry[j];
      sc.entry[k] = D(sc.entry[k]) + v;
      total += v;
      if (st.grp_ptr[g + 1] - st.grp_ptr[g] > 1) on_shared += v;
    }
    sc.evidence[i] = total, sc.evidence_shared[i] = on_shared;
  }

  UHC_HD void clear_evidence() const {
    const Structure& st = s();
    for (int l = 0; l < st.K; ++l) sc.n[l] = num(0);
    for (int k = 0; k < st.E; ++k) sc.entry[k] = num(0);
  }

  // n (per class), the (group, teacher) entries and, per teacher, its evidence on the groups it
  // shares, read from the teachers' rows one teacher at a time (every lane's row into sc.row);
  // returns the lanes whose rows passed the checks.
  UHC_HD M read_evidence() const {
    const Structure& st = s();
    const double* w = tile.prob.weights;
    clear_evidence();
    M valid = num(0) == num(0);
    for (int i = 0; i < st.N; ++i) {
      D scale = num(1);
      valid = valid & tile.load_teacher(i, sc.row, &scale);
      add_teacher(i, num(w[i]) * scale, [&](int j) { return D(sc.row[j]); });
    }
    group_evidence();
    return valid;
  }

  // The same from packed probabilities p (nnz lanes, already read: mf-p starts from ce).
  template <class Packed>
  UHC_HD void packed_evidence(Packed p) const {
    const Structure& st = s();
    const double* w = tile.prob.weights;
    clear_evidence();
    for (int i = 0; i < st.N; ++i) {
      const int lo = st.offsets[i];
      add_teacher(i, num(w[i]), [&](int j) { return D(p[lo + j]); });
    }
    group_evidence();
  }

  // N_g and M_g: per group, the total and the largest class evidence; and its top teacher, the one
  // with the most evidence on it (the first of equals), to which the others' gradient terms flow.
  UHC_HD void group_evidence() const {
    const Structure& st = s();
    for (int g = 0; g < st.G; ++g) {
      D sum = num(0), top = num(0);
      for (int c = st.grp_cls_ptr[g]; c < st.grp_cls_ptr[g + 1]; ++c) {
        const D nl = sc.n[st.grp_cls[c]];
        sum += nl, top = vmax(top, nl);
      }
      sc.Ng[g] = sum, sc.Mg[g] = top;
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      D most = lo < hi ? D(sc.entry[lo]) : num(0), who = num(lo < hi ? st.grp_teacher[lo] : 0);
      for (int k = lo + 1; k < hi; ++k) {
        const D e = sc.entry[k];
        const auto more = e > most;
        most = select(more, e, most), who = select(more, num(st.grp_teacher[k]), who);
      }
      sc.top[g] = who;
    }
  }

  // r = exp(t - max t) and D_g = sum_{i in g} r_i: the point from t (the first iteration; later ones
  // carry r over from the accepted step).
  UHC_HD void point_from_t() const {
    const Structure& st = s();
    D top = sc.t[0];
    for (int i = 1; i < st.N; ++i) top = vmax(top, D(sc.t[i]));
    for (int i = 0; i < st.N; ++i) sc.r[i] = vexp(D(sc.t[i]) - top);
    group_sums_of_r();
  }

  // D_g = sum_{i in g} r_i.
  UHC_HD void group_sums_of_r() const {
    const Structure& st = s();
    for (int g = 0; g < st.G; ++g) {
      D d = num(0);
      for (int k = st.grp_ptr[g]; k < st.grp_ptr[g + 1]; ++k) d += D(sc.r[st.grp_teacher[k]]);
      sc.Dg[g] = d;
    }
  }

  // From D_g (first rescaled by `rescale`, as r was): 1 / D_g, x_g = N_g / D_g and the Newton
  // system's link weight N_g / D_g^2 per group; per teacher (`with_gradient`: all but the final
  // point) the mass it covers, mass_i = sum_{g covers i} x_g, and the summed gradient
  // g_i = r_i mass_i - E_i with a bound on its rounding. Returns Z = sum_g x_g.
  UHC_HD D point(const D& rescale, bool with_gradient = true) const {
    const Structure& st = s();
    D Z = num(0);
    for (int g = 0; g < st.G; ++g) {
      const D d = D(sc.Dg[g]) * rescale;
      sc.Dg[g] = d;
      const D inv = vrecip(vmax(d, num(2.2250738585072014e-308))), x = D(sc.Ng[g]) * inv;
      sc.inv[g] = inv, sc.x[g] = x, sc.curvature[g] = x * inv;
      Z += x;
    }
    if (!with_gradient) return Z;
    if (st.tch_ptr) {  // by teacher, in registers
      for (int i = 0; i < st.N; ++i) sc.mass[i] = gather_sum<D>(sc.x, st.tch_group, st.tch_ptr[i], st.tch_ptr[i + 1]);
    } else {  // group by group
      for (int i = 0; i < st.N; ++i) sc.mass[i] = num(0);
      for (int g = 0; g < st.G; ++g)
        for (int k = st.grp_ptr[g]; k < st.grp_ptr[g + 1]; ++k)
          sc.mass[st.grp_teacher[k]] = D(sc.mass[st.grp_teacher[k]]) + D(sc.x[g]);
    }
    // its rounding, to first order: D_g and n_l sum at most N terms each, a group's N_g, mass_i and
    // E_i at most |L_i| (teacher i's classes), and a few operations more: within
    // 2^-53 (2N + 2|L_i| + 4) of r_i mass_i + E_i
    for (int i = 0; i < st.N; ++i) {
      const D covered = D(sc.r[i]) * D(sc.mass[i]), evidence = sc.evidence[i];
      sc.gradient[i] = covered - evidence;
      sc.rounding[i] = (0x1p-52 * (st.N + st.offsets[i + 1] - st.offsets[i] + 2)) * (covered + evidence);
    }
    return Z;
  }

  // The gradient g_i = sum_{g covers i} (pi_ig N_g - e_ig) as flows between teachers
  // (reference/ce.py says why), for the lanes of `lanes` (the others' are left 0): each group's
  // term of every teacher but its top one flows to the top one, P_{i top} += pi_ig N_g - e_ig;
  // g_i = sum_j (P_ij - P_ji). A group one teacher covers has no flow. The top teacher differs
  // between lanes, so the flows are added lane by lane.
  UHC_HD void flow_to_top(const M& lanes) const {
    const Structure& st = s();
    const int N = st.N;
    int chosen[W], count = 0;
    for (int l = 0; l < W; ++l)
      if (lane(lanes, l)) chosen[count++] = l;
    for (int k = 0; k < N * N; ++k) sc.to_top[k] = num(0);
    for (int g = 0; g < st.G; ++g) {
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      if (hi - lo < 2) continue;
      const D inv = sc.inv[g], Ng = sc.Ng[g];
      int top[W];
      for (int c = 0; c < count; ++c) top[c] = static_cast<int>(lane(D(sc.top[g]), chosen[c]));
      for (int k = lo; k < hi; ++k) {
        const int i = st.grp_teacher[k];
        const D term = D(sc.r[i]) * inv * Ng - D(sc.entry[k]);  // (pi_ig first: exactly 0 between equal teachers)
        // (the top teacher's own term lands on the diagonal, which F leaves out: no branch)
        if constexpr (W > 1) {  // lane by lane, as scalars in memory
          double values[W];
          std::memcpy(values, &term, sizeof(values));
          double* row = reinterpret_cast<double*>(&sc.to_top[i * N]);
          for (int c = 0; c < count; ++c) row[top[c] * W + chosen[c]] += values[chosen[c]];
        } else {
          add_to_lane(sc.to_top[i * N + top[0]], 0, lane(term, 0));
        }
      }
    }
  }

  // The flow F_ij = P_ij - P_ji from teacher i to j (exactly antisymmetric).
  UHC_HD D flow(int i, int j) const { return D(sc.to_top[i * s().N + j]) - D(sc.to_top[j * s().N + i]); }

  // The gradient's slope along the step, sum_i g_i step_i = sum_{i<j} F_ij (step_i - step_j) from
  // the flows: a common shift of the step cancels exactly.
  UHC_HD D flow_slope() const {
    const int N = s().N;
    D out = num(0);
    for (int i = 0; i < N; ++i)
      for (int j = i + 1; j < N; ++j) out += flow(i, j) * (D(sc.step[i]) - D(sc.step[j]));
    return out;
  }

  // The Newton step, grounded at ground_teacher() and capped at kMaxLogStep, and its slope; returns
  // its longest component (after the cap). The step is solved from the summed gradient (point()),
  // with a bound on how far that gradient's rounding moves it: the grounded system's inverse is
  // non-negative, so solving it for the rounding bounds gives bounds on the step's error. Lanes of
  // `active` where a bound exceeds kSummedStepError tol, or where the slope's sign is in doubt,
  // solve again from the gradient as flows (flow_to_top): the summed gradient's rounding swamps a
  // split across tiny classes (reference/ce.py), and the flows cost a lane-by-lane scatter that
  // rows of well-joined teachers do not need (one shortcut more than the reference takes).
  UHC_HD D newton_step(const M& active, double tol, D& slope) const {
    const Structure& st = s();
    const int N = st.N;
    // C_ij = sum over the groups holding teachers i < j of N_g / D_g^2 (sc.curvature, from point())
    if (st.pair_ptr) {
      for (int i = 0, p = 0; i < N; ++i)
        for (int j = i + 1; j < N; ++j, ++p) sc.links[i * N + j] = gather_sum<D>(sc.curvature, st.pair_group, st.pair_ptr[p], st.pair_ptr[p + 1]);
    } else {
      for (int k = 0; k < N * N; ++k) sc.links[k] = num(0);
      for (int g = 0; g < st.G; ++g) {
        const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
        const D y = sc.curvature[g];
        for (int a = lo; a < hi; ++a) {
          const int row = st.grp_teacher[a] * N;
          for (int b = a + 1; b < hi; ++b) sc.links[row + st.grp_teacher[b]] = D(sc.links[row + st.grp_teacher[b]]) + y;
        }
      }
    }
    // each lane's grounded teacher's links become the others' ground; it is left with no links and
    // no ground, which the elimination solves with step 0 (links_ij = r_i r_j C_ij for the rest)
    const D grounded = ground_teacher<D>(sc.evidence_shared, N), zero = num(0);
    D r_grounded = zero;
    for (int j = 0; j < N; ++j) r_grounded = select(grounded == num(j), D(sc.r[j]), r_grounded);
    for (int i = 0; i < N; ++i) {
      D link = zero;  // C_ik
      for (int j = 0; j < N; ++j)
        if (j != i) link = select(grounded == num(j), D(sc.links[i < j ? i * N + j : j * N + i]), link);
      const M is_grounded = grounded == num(i);
      sc.ground[i] = sc.ground_copy[i] = select(is_grounded, zero, D(sc.r[i]) * r_grounded * link);
      sc.rhs[i] = select(is_grounded, zero, -D(sc.gradient[i]));
      sc.rhs_bound[i] = select(is_grounded, zero, D(sc.rounding[i]));
    }
    for (int i = 0; i < N; ++i)  // (after every C_ik is read)
      for (int j = i + 1; j < N; ++j) {
        const M off = (grounded == num(i)) | (grounded == num(j));
        sc.links[i * N + j] = sc.links_copy[i * N + j] = select(off, zero, D(sc.r[i]) * D(sc.r[j]) * D(sc.links[i * N + j]));
      }
    grounded_laplacian_solve<D>(sc.links_copy, sc.ground_copy, {sc.rhs, sc.rhs_bound}, sc.pivot, {sc.sol, sc.bound}, N);
    D worst = zero, summed_slope = zero, slope_rounding = zero, longest = zero;
    for (int i = 0; i < N; ++i) {
      const D step = select(grounded == num(i), zero, D(sc.sol[i]));
      sc.step[i] = step;
      worst = vmax(worst, D(sc.bound[i]));
      summed_slope += D(sc.gradient[i]) * step, slope_rounding += D(sc.rounding[i]) * vabs(step);
      longest = vmax(longest, vabs(step));
    }
    const D allowed = num(kSummedStepError * tol);
    const M doubtful_slope = lnot(summed_slope + slope_rounding < 0) & (longest > allowed);
    const M flows = active & (lnot(worst <= allowed) | doubtful_slope);
    if (any(flows)) {
      // the right-hand side -g as the flows -F, the grounded teacher's becoming the others' flows to
      // ground
      flow_to_top(flows);
      for (int i = 0; i < N; ++i) {
        D out = zero;  // -F_ik
        for (int j = 0; j < N; ++j)
          if (j != i) out = select(grounded == num(j), flow(j, i), out);
        const M is_grounded = grounded == num(i);
        sc.flows_to_ground[i] = select(is_grounded, zero, out);
        for (int j = i + 1; j < N; ++j) sc.flows[i * N + j] = select(is_grounded | (grounded == num(j)), zero, flow(j, i));
      }
      grounded_laplacian_solve_flows<D>(sc.links, sc.ground, sc.flows, sc.flows_to_ground, sc.rhs, sc.pivot, sc.sol, N);
      longest = zero;
      for (int i = 0; i < N; ++i) {
        const D from_flows = select(grounded == num(i), zero, D(sc.sol[i]));
        sc.step[i] = select(flows, from_flows, D(sc.step[i])), longest = vmax(longest, vabs(D(sc.step[i])));
      }
    }
    const D cap = num(kMaxLogStep) / vmax(longest, num(kMaxLogStep));
    slope = zero;
    for (int i = 0; i < N; ++i) sc.step[i] = D(sc.step[i]) * cap, slope += D(sc.gradient[i]) * D(sc.step[i]);
    if (any(flows)) slope = select(flows, flow_slope(), slope);
    return vmin(longest, num(kMaxLogStep));
  }

  // One pass over the groups after the Newton step, for the convergence test and the full step's
  // trial together: the relative and absolute KKT residuals of the current point (per class with
  // evidence, |q_l sum_{i covers l} w_i / S_i / n_l - 1| = |sum_{i in g} (w_i / mass_i) / D_g - 1|),
  // the step's largest first-order change of a soft label (m_g = sum_{i in g} pi_ig step_i), and
  // a bound on F(t + step) - F(t) (full_step_bound), or where the bound does not pass Armijo's test
  // for an active lane, the exact change (change(1)). Leaves m_g and the full step's D_g (summed
  // afresh: solve() says why) in sc.mg and sc.trial.
  UHC_HD void measure(const D& Z, const D& slope, const M& active, D& relative, D& absolute, D& predicted,
                      D& change_full) const {
    const Structure& st = s();
    const double* w = tile.prob.weights;
    // spread = sum_g N_g E_{pi_g}[step^2] = sum_i r_i step_i^2 mass_i: by teacher, so that the
    // group pass gathers three values per entry, not four
    D low = num(0), high = num(0), spread = num(0);  // the step's range (the grounded teacher's step is 0)
    for (int i = 0; i < st.N; ++i) {
      const D ri = sc.r[i], di = sc.step[i], mi = sc.mass[i];
      sc.wm[i] = w[i] / mi, sc.rs[i] = ri * di, sc.moved[i] = ri * vexp(di);
      spread += ri * di * di * mi;
      low = vmin(low, di), high = vmax(high, di);
    }
    relative = num(0), absolute = num(0);
    D c = num(0), mean_square = num(0);
    for (int g = 0; g < st.G; ++g) {
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      D kkt = num(0), m = num(0), moved = num(0);
      for (int k = lo; k < hi; ++k) {
        const int i = st.grp_teacher[k];
        kkt += D(sc.wm[i]), m += D(sc.rs[i]), moved += D(sc.moved[i]);
      }
      const D inv = sc.inv[g], Ng = sc.Ng[g];
      m = m * inv;
      sc.mg[g] = m, sc.trial[g] = moved;
      c += D(sc.x[g]) * m;
      mean_square += Ng * m * m;
      const D gap = vabs(kkt * inv - 1.0);
      const auto has = Ng > 0;
      relative = vmax(relative, select(has, gap, num(0)));
      absolute = vmax(absolute, select(has, D(sc.Mg[g]) * gap, num(0)));
    }
    const D inv_z = num(1) / Z;
    c = c * inv_z;
    D worst = num(0);
    for (int g = 0; g < st.G; ++g) worst = vmax(worst, D(sc.Mg[g]) * D(sc.inv[g]) * vabs(c - D(sc.mg[g])));
    predicted = worst * inv_z;

    // quad = step' H step = sum_g N_g Var_{pi_g}(step) = spread - sum_g N_g m_g^2 (each part >= 0)
    const D bound = full_step_bound(slope, spread - mean_square, spread, high - low, quad_rounding(st));
    const M certified = bound <= kArmijo * slope;
    change_full = bound;
    if (any(active & lnot(certified))) change_full = select(certified, bound, change(num(1), slope));
  }

  // F(t + a step) - F(t) = a slope + sum_g N_g (log(1 + sum_{i in g} pi_ig expm1(a step_i)) - a m_g),
  // each term formed without cancelling F's large values, less a bound on the rounding of those
  // terms (reference/ce.py: CHANGE_ROUNDING says why).
  UHC_HD D change(const D& a, const D& slope) const {
    const Structure& st = s();
    for (int i = 0; i < st.N; ++i) {
      const D ex = D(sc.r[i]) * vexpm1(a * D(sc.step[i]));
      sc.ex[i] = ex, sc.ex_size[i] = vabs(ex) + vabs(a * D(sc.rs[i]));
    }
    D total = a * slope, rounding = num(0);
    for (int g = 0; g < st.G; ++g) {
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      D spread = num(0), size = num(0);
      for (int k = lo; k < hi; ++k) spread += D(sc.ex[st.grp_teacher[k]]), size += D(sc.ex_size[st.grp_teacher[k]]);
      const D inv = sc.inv[g], Ng = sc.Ng[g];
      total += Ng * (vlog1p(spread * inv) - a * D(sc.mg[g]));
      rounding += Ng * size * inv;
    }
    return total - kChangeRounding * rounding;
  }

  // Solve the tile from its evidence (read_evidence or packed_evidence first); q (K lanes) ends in
  // sc.n. Returns the lanes' diagnostics.
  UHC_HD Report<W> solve(M active, double tol, int max_iter) const {
    const Structure& st = s();
    const double* w = tile.prob.weights;
    D sum = num(0);
    for (int g = 0; g < st.G; ++g) sum += D(sc.Ng[g]);
    // start at sd: t_i = log w_i - log S_i(n / sum n)
    if (st.tch_ptr) {  // by teacher, in registers
      for (int i = 0; i < st.N; ++i) sc.mass[i] = gather_sum<D>(sc.Ng, st.tch_group, st.tch_ptr[i], st.tch_ptr[i + 1]);
    } else {
      for (int i = 0; i < st.N; ++i) sc.mass[i] = num(0);
      for (int g = 0; g < st.G; ++g)
        for (int k = st.grp_ptr[g]; k < st.grp_ptr[g + 1]; ++k) sc.mass[st.grp_teacher[k]] = D(sc.mass[st.grp_teacher[k]]) + D(sc.Ng[g]);
    }
    for (int i = 0; i < st.N; ++i) sc.t[i] = vlog(num(w[i])) - vlog(D(sc.mass[i]) / sum);

    Report<W> rep{num(0), num(0), num(0), num(0), num(0) != num(0)};
    const D zero = num(0), one = num(1);
    D total_w = zero;
    for (int i = 0; i < st.N; ++i) total_w += num(w[i]);
    point_from_t();
    D rescale = one;
    for (int iteration = 0;; ++iteration) {
      const D Z = point(rescale);
      D slope;
      const D longest = newton_step(active, tol, slope);
      D relative, absolute, pred, change_full;
      measure(Z, slope, active, relative, absolute, pred, change_full);
      rep.residual = select(active, relative, rep.residual);
      rep.abs_residual = select(active, absolute / total_w, rep.abs_residual);
      rep.step = select(active, pred, rep.step);
      // (reference/ce.py: the step's length says when the two tests can be trusted)
      const M done = active & (relative <= tol) & (pred <= tol) & (longest <= kConvergedLogStep);
      rep.converged = rep.converged | done;

      M searching = active & lnot(done) & (slope < 0);
      if (iteration >= max_iter) searching = zero != zero;  // out of steps
      // backtracking from the full step (its trial measured above); converged lanes may take only
      // that full (tiny) step
      M trying = searching | done;
      M accepted = trying & (change_full <= kArmijo * slope) & isfinite_lanes(change_full);
      for (int g = 0; g < st.G; ++g) sc.next[g] = select(accepted, D(sc.trial[g]), D(sc.Dg[g]));
      D a = one, taken = select(accepted, one, zero);
      trying = trying & lnot(accepted) & lnot(done);
      M halved = zero != zero;
      for (int h = 1; h < kMaxHalvings && any(trying); ++h) {
        a = a * 0.5;
        const D df = change(a, slope);
        const M ok = trying & (df <= kArmijo * a * slope) & isfinite_lanes(df);
        taken = select(ok, a, taken);
        halved = halved | ok;
        trying = trying & lnot(ok);
      }
      accepted = accepted | halved;
      // the accepted point: t and r move along, r rescaled so that max r = 1; D_g = sum_{i in g} r_i
      // there, summed afresh from r (measure()'s sums for a full step), never carried as D_g +
      // sum_{i in g} r_i expm1(a step_i): carried, each step's rounding stayed in D_g while D_g shrank
      // (its heavy teacher's r falling step after step), and where groups are joined only through
      // classes of tiny mass, D_g drifted until the Newton steps went wrong: rows stalled where the
      // reference converged
      D top = zero;
      for (int i = 0; i < st.N; ++i) {
        const D move = taken * D(sc.step[i]);
        sc.t[i] = D(sc.t[i]) + move;
        sc.r[i] = D(sc.r[i]) * vexp(move);
        top = vmax(top, D(sc.r[i]));
      }
      rescale = one / top;
      for (int i = 0; i < st.N; ++i) sc.r[i] = D(sc.r[i]) * rescale;
      if (any(halved)) {  // (rare after the first steps)
        group_sums_of_r();
        rescale = one;
      } else {  // D_g's buffer and its successor's trade places; D_g rescaled by the next point()
        const auto Dg = sc.Dg;
        sc.Dg = sc.next, sc.next = Dg;
      }
      rep.iterations = rep.iterations + select(accepted & lnot(done), one, zero);
      active = searching & accepted;
      if (!any(active)) break;
    }
    // q_l = n_l / (D_g Z) at the final point
    const D inv_z = one / point(rescale, false);
    for (int g = 0; g < st.G; ++g) {
      const bool covered = st.grp_ptr[g + 1] > st.grp_ptr[g];
      const D scale = covered ? D(sc.inv[g]) * inv_z : zero;
      for (int c = st.grp_cls_ptr[g]; c < st.grp_cls_ptr[g + 1]; ++c) sc.n[st.grp_cls[c]] = D(sc.n[st.grp_cls[c]]) * scale;
    }
    return rep;
  }
};

}  // namespace UHC_NAMESPACE
