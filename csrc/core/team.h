// Teams: the threads of a GPU warp or block solving one sample together, so that a teacher's row is
// read by consecutive lanes (coalesced) and the sample's state stays in one block of on-chip memory.
// The team code (team_solve.h) is written once against this interface:
//
//   static constexpr int kHeld;       // columns of a row a lane holds in registers (TeamRow)
//   int lane() const, size() const;   // this lane, and the team's width
//   void sync() const;                // every lane's earlier memory writes are seen by all
//   double sum(double x) const;       // over the lanes, the same value in every lane
//   double max(double x) const;
//   bool any(bool p) const;
//   int group() const, groups() const, group_lane() const, group_size() const;
//   double group_sum(double x) const; // a sub-team's (a block's warp; else the team): no barrier
//
// WarpTeam (a warp) and BlockTeam (a block) run it on the GPU (cuda/kernels.cu); cpu/teams.cpp
// emulates it on the CPU with one thread per lane and a barrier, so that CI runs the GPU's team
// code where no GPU is lent.
#pragma once

#include "tile.h"

namespace UHC_NAMESPACE {

#if defined(__CUDACC__)
// A warp's 32 lanes. The butterfly leaves the same value in every lane (a + b == b + a).
struct WarpTeam {
  static constexpr int kHeld = 8;  // rows of up to 256 columns read once
  int lane_;
  __device__ int lane() const { return lane_; }
  __device__ static constexpr int size() { return 32; }
  __device__ void sync() const { __syncwarp(); }
  __device__ double sum(double x) const {
    for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
  }
  __device__ double max(double x) const {
    for (int m = 16; m > 0; m >>= 1) {
      const double y = __shfl_xor_sync(0xffffffffu, x, m);
      x = x < y ? y : x;
    }
    return x;
  }
  __device__ bool any(bool p) const { return __any_sync(0xffffffffu, p) != 0; }
  __device__ static constexpr int group() { return 0; }
  __device__ static constexpr int groups() { return 1; }
  __device__ int group_lane() const { return lane_; }
  __device__ static constexpr int group_size() { return 32; }
  __device__ double group_sum(double x) const { return sum(x); }
};

// A block's threads: each warp's butterfly, then the warps' values through `exchange` (shared
// memory, one double a warp), added in warp order by every thread.
struct BlockTeam {
  static constexpr int kHeld = 2;  // at 128 threads, rows of up to 256 columns read once
  double* exchange;
  __device__ int lane() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  template <class F>
  __device__ double reduce(double x, F f) const {
    for (int m = 16; m > 0; m >>= 1) x = f(x, __shfl_xor_sync(0xffffffffu, x, m));
    if (threadIdx.x % 32 == 0) exchange[threadIdx.x / 32] = x;
    __syncthreads();
    double out = exchange[0];
    for (int k = 1; k < static_cast<int>(blockDim.x) / 32; ++k) out = f(out, exchange[k]);
    __syncthreads();
    return out;
  }
  __device__ double sum(double x) const {
    return reduce(x, [](double a, double b) { return a + b; });
  }
  __device__ double max(double x) const {
    return reduce(x, [](double a, double b) { return a < b ? b : a; });
  }
  __device__ bool any(bool p) const { return __syncthreads_or(p) != 0; }
  // its warps as sub-teams
  __device__ int group() const { return static_cast<int>(threadIdx.x) / 32; }
  __device__ int groups() const { return static_cast<int>(blockDim.x) / 32; }
  __device__ int group_lane() const { return static_cast<int>(threadIdx.x) % 32; }
  __device__ static constexpr int group_size() { return 32; }
  __device__ double group_sum(double x) const { return WarpTeam{group_lane()}.sum(x); }
};
#endif

// Row b of teacher i as a team reads it, by read_row's rules (input.h): check() sums the checks'
// stats over the lanes (and records a failure); for_each_value() then hands each lane its columns
// as the method reads them. A lane's first Held columns are loaded together when the checks begin
// and held in registers until the values are used, so that a row of up to Held x the team's width
// columns is read from memory once, all its loads in flight at once (more would cost registers,
// and so resident teams).
template <int Held>
struct TeamRow {
  const TeacherInput* t;
  const Inputs* in;
  int64_t b;
  int n;
  bool valid = true;
  double inv_sum = 1, zmax = 0, inv_total = 1;  // renormalised probabilities; a softmax of logits
  double held[Held];                            // columns lane + k * size, as stored, widened

  UHC_HD bool logits_out() const { return in->value_kind == kLogits; }
  UHC_HD bool renormalise() const { return t->kind == kProbs && !logits_out() && in->temperature == 1.0; }

  // Column j as stored, widened (the dtype's branch is the same in every lane; a row's columns past
  // the held ones, where a branch per column keeps the code small).
  UHC_HD double stored(int j) const {
    return with_row(*t, b, [&](const auto* row, auto widen) { return widen(row[j * t->col_stride]); });
  }

  // held[k] = column lane + k * size (0 past the row's end), every load issued before any is used.
  template <class Team>
  UHC_HD void load_held(const Team& team) {
    const int step = team.size(), lane = team.lane();
    with_row(*t, b, [&](const auto* row, auto widen) {  // the dtype's branch once, outside the loads
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < Held; ++k) {
        const int j = lane + k * step;
        held[k] = j < n ? widen(row[j * t->col_stride]) : 0.0;
      }
      return 0;
    });
  }

  // f(j, x) for this lane's columns j = lane, lane + size, ..., x column j as stored: the held
  // ones, then the rest four loads at a time, issued before they are used.
  template <class Team, class F>
  UHC_HD void for_each_stored(const Team& team, F f) const {
    const int step = team.size();
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < Held; ++k) {
      const int j = team.lane() + k * step;
      if (j < n) f(j, held[k]);
    }
    int j = team.lane() + Held * step;
    for (; j + 3 * step < n; j += 4 * step) {
      const double x0 = stored(j), x1 = stored(j + step), x2 = stored(j + 2 * step), x3 = stored(j + 3 * step);
      f(j, x0), f(j + step, x1), f(j + 2 * step, x2), f(j + 3 * step, x3);
    }
    for (; j < n; j += step) f(j, stored(j));
  }

  // A stored value's logit at the temperature (the log of a probability clamped at eps).
  UHC_HD double logit(double x) const {
    return (t->kind == kProbs ? vlog_clamped(x, in->eps) : x) * (1.0 / in->temperature);
  }

  // f(j, v) for this lane's columns, v column j as the method reads it: a logit, or a probability
  // of the (renormalised) row; the prior's and a failed row's uniform values.
  template <class Team, class F>
  UHC_HD void for_each_value(const Team& team, F f) const {
    if (t->data == 0 || !valid) {
      const double v = logits_out() ? 0.0 : 1.0 / n;
      for (int j = team.lane(); j < n; j += team.size()) f(j, v);
    } else if (logits_out()) {
      for_each_stored(team, [&](int j, double x) { f(j, logit(x)); });
    } else if (renormalise()) {
      for_each_stored(team, [&](int j, double x) { f(j, x * inv_sum); });
    } else {
      for_each_stored(team, [&](int j, double x) { f(j, vexp(logit(x) - zmax) * inv_total); });
    }
  }

  // The checks over the lanes (their first failure recorded by lane 0), and what the values need.
  template <class Team>
  UHC_HD bool check(const Team& team) {
    if (t->data == 0) return true;
    load_held(team);
    double sum = 0;
    bool finite = true, negative = false;
    for_each_stored(team, [&](int, double x) { finite &= x - x == 0, negative |= x < 0, sum += x; });
    RowStats stats;
    stats.sum = team.sum(sum), stats.finite = !team.any(!finite), stats.negative = team.any(negative);
    const int failed = failed_check(*in, *t, stats);
    if (failed >= 0) {
      if (team.lane() == 0) record(in->errors + int64_t(t - in->teachers) * kChecks + failed, static_cast<unsigned long long>(b));
      valid = false;
      return false;
    }
    if (renormalise()) {
      inv_sum = 1.0 / stats.sum;
    } else if (!logits_out()) {  // a softmax of the logits at the temperature
      double top = -INFINITY;
      for_each_stored(team, [&](int, double x) { top = vmax(top, logit(x)); });
      zmax = team.max(top);
      double total = 0;
      for_each_stored(team, [&](int, double x) { total += vexp(logit(x) - zmax); });
      inv_total = 1.0 / team.sum(total);
    }
    return true;
  }
};

// sum over the lanes' items l = lane, lane + size, ... < n of f(l), over the team.
template <class Team, class F>
UHC_HD double team_sum_over(const Team& team, int n, F f) {
  double part = 0;
  for (int l = team.lane(); l < n; l += team.size()) part += f(l);
  return team.sum(part);
}

// Teacher i's row b (n columns), unchecked.
template <int Held>
UHC_HD TeamRow<Held> team_row(const Inputs& in, int i, int64_t b, int n) {
  TeamRow<Held> row;
  row.t = in.teachers + i, row.in = &in, row.b = b, row.n = n;
  return row;
}

// n_l = sum_{i covers l} w_i v_il over sample b's rows as the method reads them, the lanes over each
// row's columns (a row's classes are distinct; a sync separates the teachers). With `per_teacher`,
// per_teacher[i] = the team's sum over row i of extra(i, l, v_il). Returns whether every row
// passed its checks.
template <class Team, class Out, class Extra>
UHC_HD bool team_class_sums(const Team& team, const Problem<Out>& prob, int64_t b, double* n, double* per_teacher,
                            Extra extra) {
  const Structure& s = prob.s;
  for (int l = team.lane(); l < s.K; l += team.size()) n[l] = 0;
  team.sync();
  bool valid = true;
  for (int i = 0; i < s.N; ++i) {
    const int lo = s.offsets[i];
    TeamRow<Team::kHeld> row = team_row<Team::kHeld>(prob.in, i, b, s.offsets[i + 1] - lo);
    valid &= row.check(team);
    const double wi = prob.weights[i];
    double part = 0;
    row.for_each_value(team, [&](int j, double v) {
      const int l = s.class_index[lo + j];
      n[l] += wi * v;
      if (per_teacher) part += extra(i, l, v);
    });
    if (per_teacher) {
      const double total = team.sum(part);
      if (team.lane() == 0) per_teacher[i] = total;
    }
    team.sync();
  }
  return valid;
}

}  // namespace UHC_NAMESPACE
