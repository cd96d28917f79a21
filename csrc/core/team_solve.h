// The methods solved by a team per sample (team.h): `sd` and `mf-lf`, whose floor is the memory
// traffic, and `ce` (team_ce.h). The lanes read each teacher's row at consecutive columns and share
// the sample's state in one scratch block of team_slots() doubles (the GPU's shared memory where it
// fits). The answers are those of sd.h, mf_lf.h and ce.h up to the order of additions.
#pragma once

#include "team_ce.h"

namespace UHC_NAMESPACE {

// Whether a method runs by teams on the GPU (mf-p and mf-lu: one thread per sample, grid.h).
UHC_HD constexpr bool team_method(int method) { return method == kSD || method == kMFLF || method == kCE; }

// How a team method's teams sit on the GPU: `lanes` threads a team, `per_block` teams a block of
// kTeamBlock threads. sd and mf-lf: a warp a sample. ce: a block a sample (its state, 108 KB at
// K=1000, N=20 on random 25% subsets, fits a block's shared memory once, not four times; four
// warps share its work).
constexpr int kTeamBlock = 128;
struct TeamShape {
  int lanes, per_block;
};
UHC_HD constexpr TeamShape team_shape(int method) {
  return method == kCE ? TeamShape{kTeamBlock, 1} : TeamShape{32, kTeamBlock / 32};
}

// Doubles of scratch one team needs for `method` (a team method).
UHC_HD int64_t team_slots(int method, const Structure& s) {
  if (method == kCE) return TeamCeScratch::slots(s);
  return method == kSD ? s.K : int64_t(s.K) + 2 * s.N;
}

// `sd`: n_l = sum_{i covers l} w_i p_il, normalised.
template <class Team, class Out>
UHC_HD void team_sd(const Team& team, const Problem<Out>& prob, int64_t b, double* n) {
  const Structure& s = prob.s;
  team_class_sums(team, prob, b, n, nullptr, [](int, int, double) { return 0.0; });
  const double inv = 1.0 / team_sum_over(team, s.K, [n](int l) { return n[l]; });
  Out* out = prob.soft + b * s.K;
  for (int l = team.lane(); l < s.K; l += team.size()) out[l] = static_cast<Out>(n[l] * inv);
  team.sync();  // the team's next sample reuses n
}

// `mf-lf` (mf_lf.h): u_l = zbar_l - sum_{i covers l} w_i c_i / W_l with c = S b, where
// b_i = sum_{j in L_i} (z_ij - zbar_j) is formed as (sum_j z_ij) - (sum_{l in L_i} zbar_l), so that
// no packed copy of the logits is kept and no row is read again once zbar is known.
template <class Team, class Out>
UHC_HD void team_mf_lf(const Team& team, const Problem<Out>& prob, int64_t b, double* scratch) {
  const Structure& s = prob.s;
  const double* w = prob.weights;
  double* u = scratch;           // (K): the weighted sums of logits, then zbar, then u
  double* bias = scratch + s.K;  // (N): b
  double* c = bias + s.N;        // (N): c = S b
  team_class_sums(team, prob, b, u, bias, [](int, int, double z) { return z; });  // bias_i = sum_j z_ij for now
  // zbar_l: the weighted mean of the teachers' logits of class l
  for (int l = team.lane(); l < s.K; l += team.size()) {
    double total = 0;
    for (int k = s.cls_ptr[l]; k < s.cls_ptr[l + 1]; ++k) total += w[s.cls_teacher[k]];
    u[l] = u[l] / (total > 0 ? total : 1.0);
  }
  team.sync();
  for (int i = 0; i < s.N; ++i) {
    const int lo = s.offsets[i];
    const double on_classes = team_sum_over(team, s.offsets[i + 1] - lo, [&](int j) { return u[s.class_index[lo + j]]; });
    if (team.lane() == 0) bias[i] -= on_classes;
  }
  team.sync();
  for (int i = team.lane(); i < s.N; i += team.size()) {
    double acc = 0;
    for (int k = 0; k < s.N; ++k) acc += prob.system[int64_t(i) * s.N + k] * bias[k];
    c[i] = acc;
  }
  team.sync();
  double top = -INFINITY;
  for (int l = team.lane(); l < s.K; l += team.size()) {
    double wc = 0, total = 0;
    for (int k = s.cls_ptr[l]; k < s.cls_ptr[l + 1]; ++k) {
      const double wi = w[s.cls_teacher[k]];
      wc += wi * c[s.cls_teacher[k]], total += wi;
    }
    u[l] -= wc / (total > 0 ? total : 1.0);
    if (s.cls_ptr[l + 1] > s.cls_ptr[l]) top = vmax(top, u[l]);
  }
  // the softmax over the covered classes, zero elsewhere
  top = team.max(top);
  for (int l = team.lane(); l < s.K; l += team.size()) u[l] = s.cls_ptr[l + 1] > s.cls_ptr[l] ? vexp(u[l] - top) : 0.0;
  const double inv = 1.0 / team_sum_over(team, s.K, [u](int l) { return u[l]; });
  Out* out = prob.soft + b * s.K;
  for (int l = team.lane(); l < s.K; l += team.size()) out[l] = static_cast<Out>(u[l] * inv);
  team.sync();  // the team's next sample reuses the scratch
}

// Sample b of a team method M by `team`, in its scratch block.
template <int M, class Team, class Out>
UHC_HD void solve_sample_by_team(const Team& team, const Problem<Out>& prob, int64_t b, double* scratch) {
  if constexpr (M == kSD)
    team_sd(team, prob, b, scratch);
  else if constexpr (M == kMFLF)
    team_mf_lf(team, prob, b, scratch);
  else if constexpr (M == kCE)
    team_ce(team, prob, b, scratch);
}

}  // namespace UHC_NAMESPACE
