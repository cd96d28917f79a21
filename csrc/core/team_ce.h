// `ce` solved by a team per sample (team.h): the algorithm of ce.h (read its header first) for one
// sample, its loops over groups, teachers and teacher pairs spread over the lanes, the sums and
// maxima over them team reductions, and every decision taken on values all lanes share. State in
// double, in one scratch block (TeamCeScratch); the batch structure's by-teacher and by-pair
// sections (tch_*, pair_*) are required.
#pragma once

#include "ce.h"
#include "team.h"

namespace UHC_NAMESPACE {

// The scratch of one sample, carved from `slots(s)` doubles.
struct TeamCeScratch {
  double *n, *own;                                 // class evidence (K), then q; one teacher's (K)
  double *e;                                       // per (teacher, group) entry, by teacher: its evidence (E)
  double *Ng, *Mg, *Dg, *inv, *mg, *trial;         // per group
  double *t, *r, *grad, *step, *mass, *evidence_shared, *ex, *moved, *wm, *rs;  // per teacher
  double *links, *system, *ground, *rhs, *pivot, *sol;  // C (N x N), the grounded system (n x n), n-vectors

  static UHC_HD int64_t slots(const Structure& s) {
    return 2 * int64_t(s.K) + s.E + 6 * int64_t(s.G) + 10 * int64_t(s.N) + 2 * int64_t(s.N) * s.N + 4 * int64_t(s.N);
  }
  UHC_HD TeamCeScratch(double* p, const Structure& s) {
    auto take = [&p](int64_t count) {
      double* out = p;
      p += count;
      return out;
    };
    n = take(s.K), own = take(s.K), e = take(s.E);
    Ng = take(s.G), Mg = take(s.G), Dg = take(s.G), inv = take(s.G), mg = take(s.G), trial = take(s.G);
    t = take(s.N), r = take(s.N), grad = take(s.N), step = take(s.N), mass = take(s.N);
    evidence_shared = take(s.N), ex = take(s.N), moved = take(s.N), wm = take(s.N), rs = take(s.N);
    links = take(int64_t(s.N) * s.N), system = take(int64_t(s.N) * s.N);
    ground = take(s.N), rhs = take(s.N), pivot = take(s.N), sol = take(s.N);
  }
};

// grounded_laplacian_solve (linalg.h) by a team, the same operations in the same order: each
// elimination step's updates over the lanes, a row's columns shared by team.size() / rows lanes
// (at N=20 on 128 threads, 7 a row: a step is a few dependent updates, not a whole row's).
template <class Team>
UHC_HD void team_grounded_laplacian_solve(const Team& team, double* L, double* g, double* b, double* pivot, double* x,
                                          int n) {
  for (int k = 0; k < n; ++k) {
    double d = g[k];  // every lane forms the same pivot from the finished row k
    for (int j = k + 1; j < n; ++j) d += L[k * n + j];
    const double inv = d > 0 ? 1.0 / d : 0.0;
    const int rows = n - k - 1, per = rows > 0 && team.size() > rows ? team.size() / rows : 1;
    for (int t = team.lane(); t < rows * per; t += team.size()) {
      const int i = k + 1 + t / per, first = t % per;  // row i, its columns first + i + 1, ... by per
      const double f = L[k * n + i] * inv;
      for (int j = i + 1 + first; j < n; j += per) L[i * n + j] += f * L[k * n + j];
      if (first == 0) g[i] += f * g[k], b[i] += f * b[k];
    }
    if (team.lane() == 0) pivot[k] = inv;
    team.sync();
  }
  if (team.lane() == 0)
    for (int k = n - 1; k >= 0; --k) {
      double acc = b[k];
      for (int j = k + 1; j < n; ++j) acc += L[k * n + j] * x[j];
      x[k] = acc * pivot[k];
    }
  team.sync();
}

template <class Team, class Out>
struct TeamCe {
  const Team& team;
  const Problem<Out>& prob;
  int64_t b;
  const TeamCeScratch& sc;

  UHC_HD const Structure& s() const { return prob.s; }
  UHC_HD int lane() const { return team.lane(); }
  UHC_HD int size() const { return team.size(); }

  // n, each teacher's evidence per group (sc.e, by teacher: the gradient's terms) and on the groups
  // it shares, N_g and M_g; whether every row passed. (ce.h keeps the gradient's tiny terms with
  // compensated sums instead; here the lanes' partial sums meet in a team reduction, which would
  // round them away, so each group's difference is formed first, as the reference does.)
  UHC_HD bool read_evidence() const {
    const Structure& st = s();
    for (int l = lane(); l < st.K; l += size()) sc.n[l] = 0;
    team.sync();
    bool valid = true;
    for (int i = 0; i < st.N; ++i) {
      const int lo = st.offsets[i];
      TeamRow<Team::kHeld> row = team_row<Team::kHeld>(prob.in, i, b, st.offsets[i + 1] - lo);
      valid &= row.check(team);
      const double wi = prob.weights[i];
      row.for_each_value(team, [&](int j, double v) {
        const int l = st.class_index[lo + j];
        sc.n[l] += wi * v, sc.own[l] = wi * v;
      });
      team.sync();
      // per group: a lane an entry sums the teacher's classes in it (all of them are the teacher's)
      const int first = st.tch_ptr[i], shared_end = first + st.tch_shared[i];
      double on_shared = 0;
      for (int k = first + lane(); k < st.tch_ptr[i + 1]; k += size()) {
        const int g = st.tch_group[k];
        double sum = 0;
        for (int c = st.grp_cls_ptr[g]; c < st.grp_cls_ptr[g + 1]; ++c) sum += sc.own[st.grp_cls[c]];
        sc.e[k] = sum;
        if (k < shared_end) on_shared += sum;
      }
      on_shared = team.sum(on_shared);
      if (lane() == 0) sc.evidence_shared[i] = on_shared;
      team.sync();
    }
    for (int g = lane(); g < st.G; g += size()) {
      double sum = 0, top = 0;
      for (int c = st.grp_cls_ptr[g]; c < st.grp_cls_ptr[g + 1]; ++c) {
        const double nl = sc.n[st.grp_cls[c]];
        sum += nl, top = vmax(top, nl);
      }
      sc.Ng[g] = sum, sc.Mg[g] = top;
    }
    team.sync();
    return valid;
  }

  // ce.h's point(): D_g rescaled, 1 / D_g, each teacher's mass and gradient; Z.
  UHC_HD double point(double rescale) const {
    const Structure& st = s();
    double part = 0;
    for (int g = lane(); g < st.G; g += size()) {
      const double d = sc.Dg[g] * rescale;
      sc.Dg[g] = d;
      const double inv = vrecip(vmax(d, 2.2250738585072014e-308));
      sc.inv[g] = inv;
      part += sc.Ng[g] * inv;
    }
    const double Z = team.sum(part);
    team.sync();
    auto x = [&](int k) { return sc.Ng[st.tch_group[k]] * sc.inv[st.tch_group[k]]; };  // x_g = N_g / D_g
    // by teacher, a teacher a sub-team (no block barrier in the loop): first the groups it shares,
    // each one's gradient term r_i x_g - e_ig formed before the sum, then the rest
    for (int i = team.group(); i < st.N; i += team.groups()) {
      const int lo = st.tch_ptr[i], mid = lo + st.tch_shared[i], hi = st.tch_ptr[i + 1];
      const double ri = sc.r[i];
      double on_shared = 0, rest = 0, grad = 0;
      for (int k = lo + team.group_lane(); k < mid; k += team.group_size()) {
        const double xg = x(k);
        on_shared += xg, grad += ri * xg - sc.e[k];
      }
      for (int k = mid + team.group_lane(); k < hi; k += team.group_size()) rest += x(k);
      on_shared = team.group_sum(on_shared), rest = team.group_sum(rest), grad = team.group_sum(grad);
      if (team.group_lane() == 0) sc.mass[i] = on_shared + rest, sc.grad[i] = grad;
    }
    team.sync();
    return Z;
  }

  // ce.h's newton_step(): the grounded Newton system over teacher pairs, solved; the capped step
  // and its longest component.
  UHC_HD double newton_step() const {
    const Structure& st = s();
    const int N = st.N;
    const int ground = static_cast<int>(ground_teacher<double>(sc.evidence_shared, N));
    for (int i = 0, p = 0; i < N; ++i)
      for (int j = i + 1; j < N; ++j, ++p) {
        if (p % size() != lane()) continue;
        double c = 0;  // C_ij = sum over the groups holding i and j of N_g / D_g^2
        for (int k = st.pair_ptr[p]; k < st.pair_ptr[p + 1]; ++k) {
          const int g = st.pair_group[k];
          c += sc.Ng[g] * sc.inv[g] * sc.inv[g];
        }
        sc.links[i * N + j] = c;
      }
    team.sync();
    // as ce.h: the grounded teacher's links become the others' ground, and it keeps none
    for (int i = lane(); i < N; i += size()) {
      for (int j = i + 1; j < N; ++j)
        sc.system[i * N + j] = i == ground || j == ground ? 0.0 : sc.r[i] * sc.r[j] * sc.links[i * N + j];
      const double link = i == ground ? 0.0 : sc.links[i < ground ? i * N + ground : ground * N + i];
      sc.ground[i] = sc.r[i] * sc.r[ground] * link;
      sc.rhs[i] = i == ground ? 0.0 : -sc.grad[i];
    }
    team.sync();
    team_grounded_laplacian_solve(team, sc.system, sc.ground, sc.rhs, sc.pivot, sc.sol, N);
    double longest = 0;
    for (int i = lane(); i < N; i += size()) longest = vmax(longest, i == ground ? 0.0 : vabs(sc.sol[i]));
    longest = team.max(longest);
    const double cap = kMaxLogStep / vmax(longest, kMaxLogStep);
    for (int i = lane(); i < N; i += size()) sc.step[i] = i == ground ? 0.0 : sc.sol[i] * cap;
    team.sync();
    return vmin(longest, kMaxLogStep);
  }

  // F(t + a step) - F(t) term by term (ce.h's change()).
  UHC_HD double change(double a, double slope) const {
    const Structure& st = s();
    for (int i = lane(); i < st.N; i += size()) sc.ex[i] = sc.r[i] * vexpm1(a * sc.step[i]);
    team.sync();
    double part = 0;
    for (int g = lane(); g < st.G; g += size()) {
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      double spread = 0;
      for (int k = lo; k < hi; ++k) spread += sc.ex[st.grp_teacher[k]];
      part += sc.Ng[g] * (vlog1p(spread * sc.inv[g]) - a * sc.mg[g]);
    }
    const double total = a * slope + team.sum(part);
    team.sync();
    return total;
  }

  // ce.h's measure(): the KKT residuals, the step's predicted change of the soft labels, and the
  // full step's change (its curvature bound, or where that cannot decide for an active sample, the
  // exact change).
  UHC_HD void measure(double Z, double slope, bool active, double& relative, double& absolute, double& predicted,
                      double& change_full) const {
    const Structure& st = s();
    const double* w = prob.weights;
    double low = 0, high = 0, spread = 0;
    for (int i = lane(); i < st.N; i += size()) {
      const double ri = sc.r[i], di = sc.step[i], mi = sc.mass[i];
      sc.wm[i] = w[i] / mi, sc.rs[i] = ri * di, sc.moved[i] = ri * vexp(di);
      spread += ri * di * di * mi;
      low = vmin(low, di), high = vmax(high, di);
    }
    spread = team.sum(spread), low = -team.max(-low), high = team.max(high);
    team.sync();
    double rel = 0, abs_part = 0, c = 0, mean_square = 0;
    for (int g = lane(); g < st.G; g += size()) {
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      double kkt = 0, m = 0, moved = 0;
      for (int k = lo; k < hi; ++k) {
        const int i = st.grp_teacher[k];
        kkt += sc.wm[i], m += sc.rs[i], moved += sc.moved[i];
      }
      const double inv = sc.inv[g], Ng = sc.Ng[g];
      m = m * inv;
      sc.mg[g] = m, sc.trial[g] = moved;
      c += Ng * inv * m;
      mean_square += Ng * m * m;
      const double gap = vabs(kkt * inv - 1.0);
      if (Ng > 0) rel = vmax(rel, gap), abs_part = vmax(abs_part, sc.Mg[g] * gap);
    }
    relative = team.max(rel), absolute = team.max(abs_part);
    const double inv_z = 1.0 / Z;
    c = team.sum(c) * inv_z, mean_square = team.sum(mean_square);
    team.sync();
    double worst = 0;
    for (int g = lane(); g < st.G; g += size()) worst = vmax(worst, sc.Mg[g] * sc.inv[g] * vabs(c - sc.mg[g]));
    predicted = team.max(worst) * inv_z;
    const double bound = full_step_bound(slope, spread - mean_square, spread, high - low, quad_rounding(st));
    change_full = bound;
    if (active && !(bound <= kArmijo * slope)) change_full = change(1.0, slope);
  }

  // D_g = sum_{i in g} r_i.
  UHC_HD void group_sums_of_r() const {
    const Structure& st = s();
    for (int g = lane(); g < st.G; g += size()) {
      double d = 0;
      for (int k = st.grp_ptr[g]; k < st.grp_ptr[g + 1]; ++k) d += sc.r[st.grp_teacher[k]];
      sc.Dg[g] = d;
    }
    team.sync();
  }

  // ce.h's solve() for this sample; q ends in sc.n, written out with the diagnostics.
  UHC_HD void solve() const {
    const Structure& st = s();
    const double* w = prob.weights;
    bool active = read_evidence();
    const double total_n = team_sum_over(team, st.G, [&](int g) { return sc.Ng[g]; });
    for (int i = team.group(); i < st.N; i += team.groups()) {  // start at sd: t_i = log w_i - log S_i(n / sum n)
      double mass = 0;
      for (int k = st.tch_ptr[i] + team.group_lane(); k < st.tch_ptr[i + 1]; k += team.group_size()) mass += sc.Ng[st.tch_group[k]];
      mass = team.group_sum(mass);
      if (team.group_lane() == 0) sc.t[i] = vlog(w[i]) - vlog(mass / total_n);
    }
    team.sync();
    double total_w = 0, top = sc.t[0];
    for (int i = 0; i < st.N; ++i) total_w += w[i], top = vmax(top, sc.t[i]);
    for (int i = lane(); i < st.N; i += size()) sc.r[i] = vexp(sc.t[i] - top);
    team.sync();
    group_sums_of_r();

    double iterations = 0, residual = 0, predicted_step = 0, abs_residual = 0, rescale = 1;
    bool converged = false;
    for (int iteration = 0;; ++iteration) {
      const double Z = point(rescale);
      const double longest = newton_step();
      double slope = 0;
      for (int i = lane(); i < st.N; i += size()) slope += sc.grad[i] * sc.step[i];
      slope = team.sum(slope);
      double relative, absolute, pred, change_full;
      measure(Z, slope, active, relative, absolute, pred, change_full);
      if (active) residual = relative, abs_residual = absolute / total_w, predicted_step = pred;
      // (reference/ce.py: the step's length says when the two tests can be trusted)
      const bool done = active && relative <= prob.tol && pred <= prob.tol && longest <= kConvergedLogStep;
      converged = converged || done;
      bool searching = active && !done && slope < 0;
      if (iteration >= prob.max_iter) searching = false;
      // backtracking from the full step (its trial measured above); a converged sample may take
      // only that full (tiny) step
      const bool trying = searching || done;
      bool accepted = trying && change_full <= kArmijo * slope && isfinite_lanes(change_full);
      double taken = accepted ? 1.0 : 0.0;
      if (trying && !accepted && !done) {
        double a = 1;
        for (int h = 1; h < kMaxHalvings; ++h) {
          a *= 0.5;
          const double df = change(a, slope);
          if (df <= kArmijo * a * slope && isfinite_lanes(df)) {
            accepted = true, taken = a;
            break;
          }
        }
      }
      // t and r move along, r rescaled to max 1; D_g summed afresh at the new point (ce.h's solve()
      // says why): measure()'s sums for a full step, else from r
      if (taken == 1.0)
        for (int g = lane(); g < st.G; g += size()) sc.Dg[g] = sc.trial[g];
      double largest = 0;
      for (int i = lane(); i < st.N; i += size()) {
        const double move = taken * sc.step[i];
        sc.t[i] += move, sc.r[i] *= vexp(move);
        largest = vmax(largest, sc.r[i]);
      }
      rescale = 1.0 / team.max(largest);
      for (int i = lane(); i < st.N; i += size()) sc.r[i] *= rescale;
      team.sync();
      if (accepted && taken < 1.0) group_sums_of_r(), rescale = 1.0;
      if (accepted && !done) iterations += 1;
      active = searching && accepted;
      if (!active) break;
    }
    // q_l = n_l / (D_g Z) at the final point
    const double inv_z = 1.0 / point(rescale);
    for (int g = lane(); g < st.G; g += size()) {
      const double scale = st.grp_ptr[g + 1] > st.grp_ptr[g] ? sc.inv[g] * inv_z : 0.0;
      for (int c = st.grp_cls_ptr[g]; c < st.grp_cls_ptr[g + 1]; ++c) sc.n[st.grp_cls[c]] *= scale;
    }
    team.sync();
    Out* out = prob.soft + b * st.K;
    for (int l = lane(); l < st.K; l += size()) out[l] = static_cast<Out>(sc.n[l]);
    if (lane() == 0) {
      prob.iterations[b] = static_cast<int32_t>(iterations);
      prob.converged[b] = converged;
      prob.residual[b] = static_cast<Out>(residual);
      prob.step[b] = static_cast<Out>(predicted_step);
      prob.abs_residual[b] = static_cast<Out>(abs_residual);
    }
    team.sync();  // the team's next sample reuses the scratch
  }
};

template <class Team, class Out>
UHC_HD void team_ce(const Team& team, const Problem<Out>& prob, int64_t b, double* scratch) {
  const TeamCeScratch sc(scratch, prob.s);
  TeamCe<Team, Out>{team, prob, b, sc}.solve();
}

}  // namespace UHC_NAMESPACE
