// Lanes: W samples solved in lockstep, one per SIMD lane.
//
// The solvers are written once against the types Lanes<W>::D (W doubles), Lanes<W>::F (W floats)
// and their masks, with the helpers below. On the CPU they are GCC vector extensions, so one
// operation of the solver code is one vector instruction over W samples whose mask structure is
// shared (the class sets are the same for every sample: only the data differ). W = 1 makes them
// plain scalars: the CUDA launcher's threads, and any compiler without vector extensions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The core's namespace: the CPU module compiles the core once per instruction set, each in its own
// namespace (uhc_baseline, uhc_avx2, ...), so that no inline function compiled for one set can be
// linked in place of another's.
#ifndef UHC_NAMESPACE
#define UHC_NAMESPACE uhc
#endif

#if defined(__CUDACC__)
#define UHC_HD __host__ __device__ inline
#else
#define UHC_HD inline
#endif

#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
#define UHC_VECTORS 1
#else
#define UHC_VECTORS 0
#endif

namespace UHC_NAMESPACE {

template <int W>
struct Lanes;

// One lane per sample, as plain scalars.
template <>
struct Lanes<1> {
  static constexpr int width = 1;
  using D = double;
  using F = float;
  using M = bool;   // a mask of D
};

#if UHC_VECTORS
template <int W>
struct Lanes {
  static_assert(W == 2 || W == 4 || W == 8 || W == 16, "lane counts are powers of two");
  static constexpr int width = W;
  typedef double D __attribute__((vector_size(8 * W)));
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int64_t M __attribute__((vector_size(8 * W)));  // all ones (-1) where true
};
#endif

// ---------------------------------------------------------------- scalar forms
UHC_HD double lane(double x, int) { return x; }
UHC_HD float lane(float x, int) { return x; }
UHC_HD bool lane(bool x, int) { return x; }
UHC_HD void set_lane(double& x, int, double value) { x = value; }
UHC_HD void set_lane(float& x, int, float value) { x = value; }
UHC_HD void set_lane(bool& x, int, bool value) { x = value; }
UHC_HD void add_to_lane(double& slot, int, double x) { slot += x; }
UHC_HD bool lnot(bool m) { return !m; }
UHC_HD bool any(bool m) { return m; }
UHC_HD bool all(bool m) { return m; }
UHC_HD double select(bool m, double a, double b) { return m ? a : b; }
UHC_HD float select(bool m, float a, float b) { return m ? a : b; }
UHC_HD double vmax(double a, double b) { return a < b ? b : a; }
UHC_HD double vmin(double a, double b) { return b < a ? b : a; }
UHC_HD float vmax(float a, float b) { return a < b ? b : a; }
UHC_HD float vmin(float a, float b) { return b < a ? b : a; }
UHC_HD double vabs(double x) { return x < 0 ? -x : x; }
UHC_HD float vabs(float x) { return x < 0 ? -x : x; }
UHC_HD bool isfinite_lanes(double x) { return x - x == 0; }  // false for NaN and +-Inf

template <class V>
UHC_HD V splat(double x);
template <>
UHC_HD double splat<double>(double x) {
  return x;
}
template <>
UHC_HD float splat<float>(double x) {
  return static_cast<float>(x);
}

// ---------------------------------------------------------------- vector forms
#if UHC_VECTORS
template <class V>
using lane_type = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;

template <class V, class = decltype(V{}[0])>
inline lane_type<V> lane(const V& v, int i) {
  return v[i];
}
template <class V, class T, class = decltype(V{}[0])>
inline void set_lane(V& v, int i, T value) {
  v[i] = value;
}
// Adds x to lane i of a vector in memory, in place: one scalar read and write (a whole-vector
// read-modify-write of one lane stalls the next one's read on the store).
template <class V, class T, class = decltype(V{}[0])>
inline void add_to_lane(V& slot, int i, T x) {
  slot[i] += x;
}
template <class M, class = decltype(M{}[0] == 0)>
inline M lnot(const M& m) {
  return ~m;
}
template <class M, class = decltype(M{}[0] == 0)>
inline bool any(const M& m) {
  constexpr int n = sizeof(M) / sizeof(m[0]);
  bool out = false;
  for (int i = 0; i < n; ++i) out |= m[i] != 0;
  return out;
}
template <class M, class = decltype(M{}[0] == 0)>
inline bool all(const M& m) {
  constexpr int n = sizeof(M) / sizeof(m[0]);
  bool out = true;
  for (int i = 0; i < n; ++i) out &= m[i] != 0;
  return out;
}
template <class M, class V, class = decltype(V{}[0])>
inline V select(const M& m, const V& a, const V& b) {
  return m ? a : b;
}
template <class V, class = decltype(V{}[0])>
inline V vmax(const V& a, const V& b) {
  return a < b ? b : a;
}
template <class V, class = decltype(V{}[0])>
inline V vmin(const V& a, const V& b) {
  return b < a ? b : a;
}
template <class V, class = decltype(V{}[0])>
inline V vabs(const V& x) {
  return x < 0 ? -x : x;
}
template <class V, class = decltype(V{}[0])>
inline auto isfinite_lanes(const V& x) -> decltype(x == x) {
  return (x - x) == 0;
}
template <class V>
inline V splat(double x) {
  using T = lane_type<V>;
  return V{} + static_cast<T>(x);
}

// W vectors of W lanes transposed in place (lane c of r[k] becomes lane k of r[c]): log2(W) rounds
// of swapping off-diagonal blocks, W shuffles a round, their indices built from a constant
// 0, 1, ..., W - 1 so that they fold to constants.
template <int W, class V, int64_t... c>
inline void transpose(V* r, std::integer_sequence<int64_t, c...>) {
  using M = typename Lanes<W>::M;
  const M lane{c...};
  for (int h = 1; h < W; h *= 2) {
    // lanes of rows p and p + h (bit h of p clear) after this round
    const M bit = (lane & h) != 0, low = bit ? lane + (W - h) : lane, high = bit ? lane + W : lane + h;
    for (int p = 0; p < W; ++p) {
      if (p & h) continue;
      const V a = r[p], b = r[p + h];
      r[p] = __builtin_shuffle(a, b, low), r[p + h] = __builtin_shuffle(a, b, high);
    }
  }
}
template <int W, class V>
inline void transpose(V* r) {
  transpose<W>(r, std::make_integer_sequence<int64_t, W>{});
}
#endif

// ---------------------------------------------------------------- scratch views
// Per-tile scratch arrays. On the CPU each thread owns a dense buffer; on the GPU the buffers of
// all threads are interleaved (element i of thread k at base[i * threads + k]) so that
// neighbouring threads touch neighbouring addresses.
template <class T>
struct Dense {
  T* p;
  UHC_HD T& operator[](int64_t i) const { return p[i]; }
  UHC_HD Dense at(int64_t offset) const { return Dense{p + offset}; }
};
template <class T>
struct Strided {
  T* p;
  int64_t stride;
  UHC_HD T& operator[](int64_t i) const { return p[i * stride]; }
  UHC_HD Strided at(int64_t offset) const { return Strided{p + offset * stride, stride}; }
};

// sum_{k in [lo, hi)} values[index[k]] as lanes of V, in four independent partial sums: a gather
// loop with one accumulator waits on the add's latency at every entry.
template <class V, class Values>
UHC_HD V gather_sum(const Values& values, const int32_t* index, int lo, int hi) {
  V a = splat<V>(0.0), b = a, c = a, d = a;
  int k = lo;
  for (; k + 4 <= hi; k += 4) {
    a += V(values[index[k]]), b += V(values[index[k + 1]]);
    c += V(values[index[k + 2]]), d += V(values[index[k + 3]]);
  }
  for (; k < hi; ++k) a += V(values[index[k]]);
  return (a + b) + (c + d);
}

// Carves one tile's scratch out of a byte buffer: arrays of elements of any lane type, each
// aligned to 64 bytes. Constructed on a null buffer it only measures (what `bytes()` returns is
// then the size to allocate), so a solver's scratch layout is written once, in the constructor
// of its Scratch struct, and serves both purposes.
class DenseArena {
 public:
  explicit DenseArena(char* base = nullptr) : base_(base) {}
  template <class T>
  Dense<T> take(int64_t n) {
    const int64_t start = (used_ + 63) & ~int64_t(63);
    used_ = start + n * int64_t(sizeof(T));
    return Dense<T>{base_ ? reinterpret_cast<T*>(base_ + start) : nullptr};
  }
  int64_t bytes() const { return used_ + 64; }

 private:
  char* base_;
  int64_t used_ = 0;
};

// The CUDA launcher's arena (W = 1): every element is a double slot of an interleaved workspace
// shared by `threads` threads; floats take double slots (the GPU path keeps one element type).
class StridedArena {
 public:
  UHC_HD StridedArena(double* base, int64_t threads) : base_(base), threads_(threads) {}
  template <class T>
  UHC_HD Strided<double> take(int64_t n) {
    const Strided<double> view{base_ ? base_ + used_ * threads_ : nullptr, threads_};
    used_ += n;
    return view;
  }
  UHC_HD int64_t elements() const { return used_; }

 private:
  double* base_;
  int64_t threads_;
  int64_t used_ = 0;
};

}  // namespace UHC_NAMESPACE
