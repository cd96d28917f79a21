// A tile: W consecutive samples solved in lockstep, one per lane. What every method shares:
// the tile's context, reading the teachers' rows into lanes, writing the answers out.
#pragma once

#include <utility>

#include "constants.h"
#include "input.h"
#include "simd.h"
#include "structure.h"
#include "vmath.h"

namespace UHC_NAMESPACE {

// The type of an arena's view of T (Dense<T> on the CPU, Strided<double> on the GPU).
template <class Arena, class T>
using View = decltype(std::declval<Arena&>().template take<T>(0));

// Everything a launch shares across samples.
template <class Out>
struct Problem {
  Structure s;
  Inputs in;
  int64_t batch;
  const double* weights;  // (N,)
  const double* system;   // (N, N) mf-lf's eliminated system (mf-lf), else unused
  int method;
  double tol;
  int max_iter;
  Out* soft;              // (B, K) in the output dtype
  int32_t* iterations;    // (B,) per-sample outputs of the iterative methods
  bool* converged;
  Out* residual;
  Out* step;
  Out* abs_residual;
};

// Per-lane diagnostics of an iterative solve, written out with the soft labels.
template <int W>
struct Report {
  using D = typename Lanes<W>::D;
  D iterations, residual, step, abs_residual;
  typename Lanes<W>::M converged;
};

template <int W, class Out>
struct Tile {
  using D = typename Lanes<W>::D;
  using M = typename Lanes<W>::M;
  const Problem<Out>& prob;
  int64_t first;  // the tile's first sample
  int lanes;      // samples in the tile (< W in the last tile: the spare lanes repeat the last sample)

  UHC_HD const Structure& s() const { return prob.s; }
  UHC_HD int64_t sample(int k) const { return first + (k < lanes ? k : lanes - 1); }

  // Every teacher's row of every lane into `values` (nnz, packed teacher by teacher) as the method
  // reads them. Returns the lanes whose rows all passed the checks.
  template <class Values>
  UHC_HD M load(Values values) const {
    M valid = splat<D>(0.0) == splat<D>(0.0);
    for (int i = 0; i < s().N; ++i) valid = valid & load_teacher(i, values.at(s().offsets[i]));
    return valid;
  }

  // Teacher i's row of every lane into values[0 .. |L_i|) (lanes), each lane's row written straight
  // into its slots. Returns the lanes whose rows passed the checks. With `scale`, the values may be
  // left unnormalised and *scale holds each lane's factor (see read_row).
  template <class Values>
  UHC_HD M load_teacher(int i, Values values, D* scale = nullptr) const {
    M valid = splat<D>(0.0) == splat<D>(0.0);
    const int n = s().offsets[i + 1] - s().offsets[i];
#if UHC_VECTORS
    if constexpr (W > 1) {
      const TeacherInput& t = prob.in.teachers[i];
      if (t.data != 0 && t.col_stride == 1) return load_teacher_block(i, n, values, scale);
    }
#endif
    for (int k = 0; k < W; ++k) {
      double factor = 1.0;
      if (!read_row(prob.in, i, sample(k), n, lane_slots(values, k), scale ? &factor : nullptr)) set_lane(valid, k, 0);
      if (scale) set_lane(*scale, k, factor);
    }
    return valid;
  }

#if UHC_VECTORS
  // load_teacher on the CPU for rows with contiguous columns, by read_row's rules (input.h), lanes
  // at a time: each lane's next W values are read as one vector, the W x W block transposed in
  // registers and stored as W lane vectors (one store a class, not W strided ones), the checks'
  // statistics and every conversion computed on lane vectors.
  template <class Values>
  M load_teacher_block(int i, int n, Values values, D* scale) const {
    const Inputs& in = prob.in;
    const TeacherInput& t = in.teachers[i];
    D sum = splat<D>(0.0), spread = sum, low = sum;
    // the next teacher's rows are asked for while these are read (a row is short: its own next
    // lines are already on their way when the prefetch would issue)
    const char* ahead[W] = {};
    int ahead_size = 0, ahead_n = 0;
    if (i + 1 < s().N && in.teachers[i + 1].data != 0) {
      const TeacherInput& u = in.teachers[i + 1];
      ahead_size = u.dtype == kFloat64 ? 8 : u.dtype == kFloat32 ? 4 : 2;
      ahead_n = s().offsets[i + 2] - s().offsets[i + 1];
      for (int k = 0; k < W; ++k) ahead[k] = reinterpret_cast<const char*>(u.data) + sample(k) * u.row_stride * ahead_size;
    }
    with_row(t, 0, [&](const auto* base, auto widen_one) {
      decltype(base) rows[W];
      for (int k = 0; k < W; ++k) rows[k] = base + sample(k) * t.row_stride;
      const int step = ahead_size ? 64 / ahead_size : 0;  // a cache line of each next row per W columns read
      for (int j = 0, next = 0; j < n; j += W, next += step) {
        const int count = n - j < W ? n - j : W;
        D r[W];
        for (int k = 0; k < W; ++k) {
          if (next < ahead_n) __builtin_prefetch(ahead[k] + next * ahead_size);
          r[k] = widen_vector<D>(rows[k] + j, 1, count, widen_one);
        }
        transpose<W>(r);
        for (int c = 0; c < count; ++c) {
          values[j + c] = r[c];
          sum += r[c], spread += r[c] - r[c];  // x - x is NaN exactly for NaN and +-Inf
          low = vmin(low, r[c]);
        }
      }
      return 0;
    });
    M valid = splat<D>(0.0) == splat<D>(0.0);
    for (int k = 0; k < W; ++k) {
      RowStats st;
      st.sum = sum[k], st.finite = spread[k] == 0, st.negative = low[k] < 0;
      const int failed = failed_check(in, t, st);
      if (failed < 0) continue;
      record(in.errors + i * kChecks + failed, static_cast<unsigned long long>(sample(k)));
      valid[k] = 0;
    }
    const bool logits_out = in.value_kind == kLogits;
    if (t.kind == kProbs && !logits_out && in.temperature == 1.0) {  // renormalise
      const D inv = splat<D>(1.0) / sum;
      if (scale) {
        *scale = valid ? inv : splat<D>(1.0);
      } else {
        for (int j = 0; j < n; ++j) values[j] = D(values[j]) * inv;
      }
    } else {  // logits (of probabilities: log max(p, eps)) at the temperature
      const D inv_t = splat<D>(1.0 / in.temperature);
      if (t.kind == kProbs) {
        for (int j = 0; j < n; ++j) values[j] = vlog_clamped(D(values[j]), in.eps) * inv_t;
      } else {
        for (int j = 0; j < n; ++j) values[j] = D(values[j]) * inv_t;
      }
      if (!logits_out) {  // softmax
        D top = splat<D>(-INFINITY), total = splat<D>(0.0);
        for (int j = 0; j < n; ++j) top = vmax(top, D(values[j]));
        for (int j = 0; j < n; ++j) {
          const D e = vexp(D(values[j]) - top);
          values[j] = e;
          total += e;
        }
        const D inv = splat<D>(1.0) / total;
        for (int j = 0; j < n; ++j) values[j] = D(values[j]) * inv;
      }
    }
    if (!all(valid)) {  // failed lanes: a harmless uniform row, so the solver finishes quickly
      const D uniform = splat<D>(logits_out ? 0.0 : 1.0 / n);
      for (int j = 0; j < n; ++j) values[j] = valid ? D(values[j]) : uniform;
    }
    return valid;
  }
#endif

  // Lane k of element i of a lanes array, as a double.
  template <class Values>
  static UHC_HD double& lane_ref(Values values, int64_t i, int k) {
    if constexpr (W == 1) {
      (void)k;
      return values[i];
    } else {
      return reinterpret_cast<double*>(&values[i])[k];
    }
  }

  // Lane k of elements 0, 1, ... of a lanes array, as a view of doubles.
  template <class Values>
  static UHC_HD auto lane_slots(Values values, int k) {
    if constexpr (W == 1) {
      (void)k;
      return values;
    } else {
      return Strided<double>{reinterpret_cast<double*>(&values[0]) + k, W};
    }
  }

  // soft[b, l] = q[l] of lane b (q over the K classes).
  template <class Q>
  UHC_HD void write_soft(Q q) const {
    const int K = s().K;
    int l0 = 0;
#if UHC_VECTORS
    if constexpr (W > 1) {  // W classes at a time: transposed in registers, each sample's W values stored as one vector
      using O = std::conditional_t<std::is_same<Out, float>::value, typename Lanes<W>::F, D>;
      for (; lanes == W && l0 + W <= K; l0 += W) {
        D r[W];
        for (int c = 0; c < W; ++c) r[c] = q[l0 + c];
        transpose<W>(r);
        for (int k = 0; k < W; ++k) {
          const O values = __builtin_convertvector(r[k], O);
          memcpy(prob.soft + (first + k) * K + l0, &values, sizeof(O));
        }
      }
    }
#endif
    for (int k = 0; k < lanes; ++k) {
      Out* out = prob.soft + (first + k) * K;
      for (int l = l0; l < K; ++l) out[l] = static_cast<Out>(lane_ref(q, l, k));
    }
  }

  UHC_HD void write_report(const Report<W>& r) const {
    for (int k = 0; k < lanes; ++k) {
      const int64_t b = first + k;
      prob.iterations[b] = static_cast<int32_t>(lane(r.iterations, k));
      prob.converged[b] = lane(r.converged, k) != 0;
      prob.residual[b] = static_cast<Out>(lane(r.residual, k));
      prob.step[b] = static_cast<Out>(lane(r.step, k));
      prob.abs_residual[b] = static_cast<Out>(lane(r.abs_residual, k));
    }
  }

  // softmax over covered classes of u (K), zero elsewhere, written out.
  template <class U>
  UHC_HD void write_masked_softmax(U u) const {
    const Structure& st = s();
    const D neg = splat<D>(-INFINITY);
    D top = neg;
    for (int l = 0; l < st.K; ++l)
      if (st.cls_ptr[l + 1] > st.cls_ptr[l]) top = vmax(top, D(u[l]));
    D sum = splat<D>(0.0);
    for (int l = 0; l < st.K; ++l) {
      const bool covered = st.cls_ptr[l + 1] > st.cls_ptr[l];
      const D e = covered ? vexp(D(u[l]) - top) : splat<D>(0.0);
      u[l] = e;
      sum += e;
    }
    const D inv = splat<D>(1.0) / sum;
    for (int l = 0; l < st.K; ++l) u[l] = D(u[l]) * inv;
    write_soft(u);
  }
};

}  // namespace UHC_NAMESPACE
