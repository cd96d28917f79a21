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
  double *n, *own;  // class evidence (K), then q; one teacher's (K)
  double *e;        // per (group, teacher) entry, in the groups' order (grp_teacher): its evidence e_ig (E)
  double *Ng, *Mg, *Dg, *inv, *trial, *top;  // per group; top: its top teacher's entry (an index)
  double *t, *r, *step, *mass, *evidence_shared, *moved, *wm, *rs;  // per teacher
  // N x N: C above the diagonal, the flows F_ij (i < j) below it (at [j][i]); the grounded system the
  // same way, its flows those of the right-hand side. Then n-vectors.
  double *links, *system, *ground, *flow_to_ground, *rhs, *pivot, *sol;

  static UHC_HD int64_t slots(const Structure& s) {
    return 2 * int64_t(s.K) + s.E + 6 * int64_t(s.G) + 8 * int64_t(s.N) + 2 * int64_t(s.N) * s.N + 5 * int64_t(s.N);
  }
  UHC_HD TeamCeScratch(double* p, const Structure& s) {
    auto take = [&p](int64_t count) {
      double* out = p;
      p += count;
      return out;
    };
    n = take(s.K), own = take(s.K), e = take(s.E);
    Ng = take(s.G), Mg = take(s.G), Dg = take(s.G), inv = take(s.G), trial = take(s.G), top = take(s.G);
    t = take(s.N), r = take(s.N), step = take(s.N), mass = take(s.N);
    evidence_shared = take(s.N), moved = take(s.N), wm = take(s.N), rs = take(s.N);
    links = take(int64_t(s.N) * s.N), system = take(int64_t(s.N) * s.N);
    ground = take(s.N), flow_to_ground = take(s.N), rhs = take(s.N), pivot = take(s.N), sol = take(s.N);
  }
};

// grounded_laplacian_solve_flows (linalg.h) by a team, the same operations in the same order: each
// elimination step's updates over the lanes, a row's columns shared by team.size() / rows lanes
// (at N=20 on 128 threads, 7 a row: a step is a few dependent updates, not a whole row's). The
// flows F_ij (i < j) are read and written below L's diagonal, at L[j * n + i] (linalg.h: a separate
// F's upper triangle), so that they take no scratch of their own; the multiplier f_j = L_kj / pivot_k
// is formed where it is used (row k is final).
template <class Team>
UHC_HD void team_grounded_laplacian_solve_flows(const Team& team, double* L, double* g, double* Fg, double* b,
                                                double* pivot, double* x, int n) {
  for (int k = 0; k < n; ++k) {
    double d = g[k];  // every lane forms the same pivot from the finished row k
    for (int j = k + 1; j < n; ++j) d += L[k * n + j];
    const double inv = d > 0 ? 1.0 / d : 0.0, fk = g[k] * inv, Fgk = Fg[k];
    const int rows = n - k - 1, per = rows > 0 && team.size() > rows ? team.size() / rows : 1;
    for (int t = team.lane(); t < rows * per; t += team.size()) {
      const int i = k + 1 + t / per, first = t % per;  // row i, its columns first + i + 1, ... by per
      const double f = L[k * n + i] * inv, Fki = L[i * n + k];
      for (int j = i + 1 + first; j < n; j += per) {
        L[i * n + j] += f * L[k * n + j];
        L[j * n + i] += f * L[j * n + k] - L[k * n + j] * inv * Fki;  // F_ij += f_i F_kj - f_j F_ki
      }
      if (first == 0) g[i] += f * g[k], Fg[i] += f * Fgk - fk * Fki;
    }
    if (team.lane() == 0) {  // (rows k + 1.. are written above; row k, F_k. and Fg[k] are final)
      double rhs = Fgk;
      for (int j = k + 1; j < n; ++j) rhs += L[j * n + k];
      pivot[k] = inv, b[k] = rhs;
    }
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

  // The entry of teacher i among group g's teachers (it is one of them; they are ascending).
  UHC_HD int group_entry(int g, int i) const {
    const Structure& st = s();
    int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1] - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (st.grp_teacher[mid] < i) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // Teacher i's difference on group g, r_i N_g / D_g - e_ig: its term of the gradient, and the flow
  // it sends to the group's top teacher.
  UHC_HD double difference(int g, int i) const {
    return sc.r[i] * (sc.Ng[g] * sc.inv[g]) - sc.e[group_entry(g, i)];
  }

  // The teacher of group g's top entry.
  UHC_HD int top_teacher(int g) const { return s().grp_teacher[static_cast<int>(sc.top[g])]; }

  // n, each teacher's evidence per group (sc.e, the flows' terms) and on the groups it shares, each
  // group's top teacher (the reference's _top_teachers: the most evidence, the first of equals),
  // N_g and M_g; whether every row passed. (The gradient is formed as flows, each group's
  // difference to its top teacher, as the reference does: newton_step().)
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
      // per group: a lane an entry sums the teacher's classes in it (all of them are the teacher's);
      // the group's earlier teachers' entries are written (the teachers come in ascending order),
      // so the top so far is known (a group no teacher covers has none, and is never asked)
      const int first = st.tch_ptr[i], shared_end = first + st.tch_shared[i];
      double on_shared = 0;
      for (int k = first + lane(); k < st.tch_ptr[i + 1]; k += size()) {
        const int g = st.tch_group[k], entry = group_entry(g, i);
        double sum = 0;
        for (int c = st.grp_cls_ptr[g]; c < st.grp_cls_ptr[g + 1]; ++c) sum += sc.own[st.grp_cls[c]];
        sc.e[entry] = sum;
        if (entry == st.grp_ptr[g] || sum > sc.e[static_cast<int>(sc.top[g])]) sc.top[g] = entry;
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

  // ce.h's point(): D_g rescaled, 1 / D_g, each teacher's mass; Z (the gradient: newton_step()).
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
    // then the rest
    for (int i = team.group(); i < st.N; i += team.groups()) {
      const int lo = st.tch_ptr[i], mid = lo + st.tch_shared[i], hi = st.tch_ptr[i + 1];
      double on_shared = 0, rest = 0;
      for (int k = lo + team.group_lane(); k < mid; k += team.group_size()) on_shared += x(k);
      for (int k = mid + team.group_lane(); k < hi; k += team.group_size()) rest += x(k);
      on_shared = team.group_sum(on_shared), rest = team.group_sum(rest);
      if (team.group_lane() == 0) sc.mass[i] = on_shared + rest;
    }
    team.sync();
    return Z;
  }

  // F_ij, the flow from teacher i to j (exactly antisymmetric: F_ji = -F_ij), as newton_step() left it.
  UHC_HD double flow(int i, int j) const {
    const int N = s().N;
    return i < j ? sc.links[j * N + i] : i > j ? -sc.links[i * N + j] : 0.0;
  }

  // ce.h's newton_step() with the reference's gradient as flows (reference/ce.py): the grounded
  // Newton system over teacher pairs, its right-hand side -g the flows -F, solved in flow form;
  // the capped step and its longest component. g_i = sum_j F_ij, with F_ij the sum of i's
  // differences on the groups whose top teacher is j, less j's on those whose top is i: a block
  // of teachers joined to the rest only through classes of tiny mass presents the sum of the
  // flows that leave it, not that of its own large internal ones (which rounded the split away).
  UHC_HD double newton_step() const {
    const Structure& st = s();
    const int N = st.N;
    const int ground = static_cast<int>(ground_teacher<double>(sc.evidence_shared, N));
    for (int i = 0, p = 0; i < N; ++i)
      for (int j = i + 1; j < N; ++j, ++p) {
        if (p % size() != lane()) continue;
        double c = 0, f = 0;  // C_ij = sum over the groups holding i and j of N_g / D_g^2; F_ij
        for (int k = st.pair_ptr[p]; k < st.pair_ptr[p + 1]; ++k) {
          const int g = st.pair_group[k], top = top_teacher(g);
          c += sc.Ng[g] * sc.inv[g] * sc.inv[g];
          if (top == j) f += difference(g, i);
          else if (top == i) f -= difference(g, j);
        }
        sc.links[i * N + j] = c, sc.links[j * N + i] = f;
      }
    team.sync();
    // as ce.h: the grounded teacher's links become the others' ground, and it keeps none; its
    // flows become the others' flows to ground, and it keeps none (the right-hand side's flows: -F)
    for (int i = lane(); i < N; i += size()) {
      for (int j = i + 1; j < N; ++j) {
        const bool off = i == ground || j == ground;
        sc.system[i * N + j] = off ? 0.0 : sc.r[i] * sc.r[j] * sc.links[i * N + j];
        sc.system[j * N + i] = off ? 0.0 : -sc.links[j * N + i];
      }
      const double link = i == ground ? 0.0 : sc.links[i < ground ? i * N + ground : ground * N + i];
      sc.ground[i] = sc.r[i] * sc.r[ground] * link;
      sc.flow_to_ground[i] = -flow(i, ground);
    }
    team.sync();
    team_grounded_laplacian_solve_flows(team, sc.system, sc.ground, sc.flow_to_ground, sc.rhs, sc.pivot, sc.sol, N);
    double longest = 0;
    for (int i = lane(); i < N; i += size()) longest = vmax(longest, i == ground ? 0.0 : vabs(sc.sol[i]));
    longest = team.max(longest);
    const double cap = kMaxLogStep / vmax(longest, kMaxLogStep);
    for (int i = lane(); i < N; i += size()) sc.step[i] = i == ground ? 0.0 : sc.sol[i] * cap;
    team.sync();
    return vmin(longest, kMaxLogStep);
  }

  // The step's slope g.d = sum_{i<j} F_ij (d_i - d_j) (a common shift of d cancels exactly).
  UHC_HD double slope() const {
    const int N = s().N;
    double part = 0;
    for (int i = 0, p = 0; i < N; ++i)
      for (int j = i + 1; j < N; ++j, ++p)
        if (p % size() == lane()) part += flow(i, j) * (sc.step[i] - sc.step[j]);
    return team.sum(part);
  }

  // F(t + a step) - F(t) term by term, less a bound on the rounding of its terms (ce.h's change()).
  UHC_HD double change(double a, double slope) const {
    const Structure& st = s();
    double part = 0, rounding = 0;
    for (int g = lane(); g < st.G; g += size()) {
      const int lo = st.grp_ptr[g], hi = st.grp_ptr[g + 1];
      if (lo == hi) continue;
      double spread = 0, mean = 0, size = 0;
      for (int k = lo; k < hi; ++k) {
        const int i = st.grp_teacher[k];
        const double moved = sc.r[i] * vexpm1(a * sc.step[i]), m = sc.r[i] * sc.step[i];
        spread += moved, mean += m, size += vabs(moved) + vabs(a * m);
      }
      part += sc.Ng[g] * (vlog1p(spread * sc.inv[g]) - a * (mean * sc.inv[g]));
      rounding += sc.Ng[g] * (size * sc.inv[g]);
    }
    const double total = a * slope + team.sum(part);
    team.sync();
    const double allowed = kChangeRounding * team.sum(rounding);
    team.sync();
    return total - allowed;
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
      sc.trial[g] = moved;
      c += Ng * inv * m;
      mean_square += Ng * m * m;
      const double gap = vabs(kkt * inv - 1.0);
      if (Ng > 0) rel = vmax(rel, gap), abs_part = vmax(abs_part, sc.Mg[g] * gap);
    }
    relative = team.max(rel), absolute = team.max(abs_part);
    const double inv_z = 1.0 / Z;
    c = team.sum(c) * inv_z, mean_square = team.sum(mean_square);
    team.sync();
    double worst = 0;  // (m_g summed again: no scratch of its own)
    for (int g = lane(); g < st.G; g += size()) {
      double m = 0;
      for (int k = st.grp_ptr[g]; k < st.grp_ptr[g + 1]; ++k) m += sc.rs[st.grp_teacher[k]];
      worst = vmax(worst, sc.Mg[g] * sc.inv[g] * vabs(c - m * sc.inv[g]));
    }
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
      const double slope = this->slope();
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
