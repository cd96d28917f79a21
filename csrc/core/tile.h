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
    for (int k = 0; k < W; ++k) {
      double factor = 1.0;
      if (!read_row(prob.in, i, sample(k), n, lane_slots(values, k), scale ? &factor : nullptr)) set_lane(valid, k, 0);
      if (scale) set_lane(*scale, k, factor);
    }
    return valid;
  }

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
