// The teachers' outputs as the user passed them (one array per teacher, any float dtype, any
// strides): read once, validated with the rules of uhc_fast/inputs.py (check_values) and
// converted to what the method reads, in the same pass. Nothing is packed or widened beforehand.
#pragma once

#include <cstdint>

#if defined(__F16C__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#include "simd.h"
#include "vmath.h"

namespace UHC_NAMESPACE {

// dtype codes (uhc_fast/backends/native_launch.py: DTYPE_CODES)
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };
// what a teacher's outputs are, and what a method reads (uhc_fast/methods.py: value_kind)
enum Kind : int { kProbs = 0, kLogits = 1 };
// the checks, in the order uhc_fast.inputs.check_values applies them to a teacher
enum Check : int { kNotFinite = 0, kNegative = 1, kAllZero = 2, kSumOff = 3, kChecks = 4 };

// 16-bit floats are carried as raw bits and widened here, so neither the host compiler nor
// nvcc needs a half type (and the CPU build needs no CUDA headers).
UHC_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}
UHC_HD float half_to_float(uint16_t h) {
#if defined(__F16C__) && !defined(__CUDA_ARCH__)
  return _cvtsh_ss(h);  // one instruction where the CPU variant has F16C (AVX2, AVX-512)
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float f = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}
UHC_HD float bfloat16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// One teacher's outputs: element (b, j) at data + (b * row_stride + j * col_stride) elements.
// A teacher with no data is the alpha prior: uniform probabilities (logits 0).
struct TeacherInput {
  uintptr_t data;
  int64_t row_stride;
  int64_t col_stride;
  int32_t dtype;
  int32_t kind;
};

struct Inputs {
  const TeacherInput* teachers;  // (N,), the prior teacher last when there is one
  double temperature;
  double eps;                // probabilities are clamped to eps before logs
  double sum_tolerance[4];   // how far a probability row may sum from 1, per dtype code
  int value_kind;            // what the method reads: kProbs (renormalised) or kLogits
  unsigned long long* errors;  // (N, kChecks): the first row failing each check, per teacher
};

// Lower an error slot to `row` (concurrent callers: the smallest row wins).
UHC_HD void record(unsigned long long* slot, unsigned long long row) {
#if defined(__CUDA_ARCH__)
  atomicMin(slot, row);
#else
  unsigned long long seen = __atomic_load_n(slot, __ATOMIC_RELAXED);
  while (row < seen && !__atomic_compare_exchange_n(slot, &seen, row, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
#endif
}

// What the first pass over a row learns.
struct RowStats {
  bool finite = true, negative = false;
  double sum = 0;
};

#if UHC_VECTORS
// A row is read in chunks of one vector register of doubles of the instruction set this file is
// compiled for (wider chunks are split by the compiler, and their selects done one lane at a time:
// AVX2 read rows no faster than SSE2 with chunks of 8).
#if defined(__AVX512F__)
constexpr int kRowLanes = 8;
#elif defined(__AVX__)
constexpr int kRowLanes = 4;
#else
constexpr int kRowLanes = 2;
#endif
typedef double RowDoubles __attribute__((vector_size(8 * kRowLanes)));

// `count` stored values p[0], p[stride], ... widened to the double lanes of V, the rest zero (which
// none of the checks notices): one vector load and conversion where all of V's lanes are
// contiguous float32 / float64, else one at a time (16-bit floats: one instruction each with F16C).
template <class V, class In, class Widen>
inline V widen_vector(const In* p, int64_t stride, int count, Widen widen_one) {
  constexpr int lanes = sizeof(V) / sizeof(double);
  if constexpr (std::is_same<In, float>::value || std::is_same<In, double>::value) {
    if (stride == 1 && count == lanes) {
      typedef In X __attribute__((vector_size(lanes * sizeof(In))));
      X x;
      memcpy(&x, p, sizeof(X));
      return __builtin_convertvector(x, V);
    }
  }
  V y{};
  for (int k = 0; k < count; ++k) y[k] = widen_one(p[k * stride]);
  return y;
}
#endif

// The stats of n stored values of type In, `stride` elements apart; with a `copy` view (not
// nullptr) the widened values are written there as they are read.
template <class In, class Widen, class Copy>
UHC_HD RowStats row_stats(const In* row, int n, int64_t stride, Widen widen_one, Copy copy) {
  constexpr bool copying = !std::is_same<Copy, std::nullptr_t>::value;
  RowStats st;
  int j = 0;
#if UHC_VECTORS
  if (stride == 1) {  // contiguous: a vector at a time (x - x is NaN exactly for NaN and +-Inf)
    RowDoubles sum{}, spread{}, low{};
    for (; j + kRowLanes <= n; j += kRowLanes) {
      __builtin_prefetch(row + j + 512);  // the first read of the row, from memory: ask well ahead
      const RowDoubles y = widen_vector<RowDoubles>(row + j, 1, kRowLanes, widen_one);
      if constexpr (copying)
        for (int k = 0; k < kRowLanes; ++k) copy[j + k] = y[k];
      sum += y, spread += y - y;
      low = low < y ? low : y;
    }
    for (int k = 0; k < kRowLanes; ++k) {
      st.sum += sum[k];
      st.finite &= spread[k] == 0;
      st.negative |= low[k] < 0;
    }
  }
#endif
  for (; j < n; ++j) {
    const double x = widen_one(row[j * stride]);
    if constexpr (copying) copy[j] = x;
    st.finite &= x - x == 0;
    st.negative |= x < 0;
    st.sum += x;
  }
  return st;
}

// Row b of teacher t as What it is (stats, then its values: `convert(x)` of each widened value into out).
// `convert` takes a double or (on the CPU) a RowDoubles of them, so that its log / exp run as vector code.
template <class In, class Widen, class Convert, class Out>
UHC_HD void convert_row(const In* row, int n, int64_t stride, Widen widen_one, Convert convert, Out out) {
#if UHC_VECTORS
  // the tail too as a (zero-padded) vector: every value gets the vector functions' rounding, as in
  // the tile's block reads (Tile::load_teacher_block), so that any layout gives the same bits
  for (int j = 0; j < n; j += kRowLanes) {
    const int count = n - j < kRowLanes ? n - j : kRowLanes;
    const RowDoubles y = convert(widen_vector<RowDoubles>(row + j * stride, stride, count, widen_one));
    for (int k = 0; k < count; ++k) out[j + k] = y[k];
  }
#else
  for (int j = 0; j < n; ++j) out[j] = convert(widen_one(row[j * stride]));
#endif
}

// out[j] = f(out[j]) for j < n, a vector at a time on the CPU (f as in convert_row).
template <class Out, class F>
UHC_HD void map_row(Out out, int n, F f) {
#if UHC_VECTORS
  for (int j = 0; j < n; j += kRowLanes) {  // the tail as a padded vector, as in convert_row
    const int count = n - j < kRowLanes ? n - j : kRowLanes;
    RowDoubles x{};
    for (int k = 0; k < count; ++k) x[k] = out[j + k];
    const RowDoubles y = f(x);
    for (int k = 0; k < count; ++k) out[j + k] = y[k];
  }
#else
  for (int j = 0; j < n; ++j) out[j] = f(static_cast<double>(out[j]));
#endif
}

// The first check (Check) a row of teacher t with these stats fails, or -1.
UHC_HD int failed_check(const Inputs& in, const TeacherInput& t, const RowStats& stats) {
  if (!stats.finite) return kNotFinite;
  if (t.kind != kProbs) return -1;
  const double off = stats.sum - 1;
  if (stats.negative) return kNegative;
  if (stats.sum == 0) return kAllZero;
  if ((off < 0 ? -off : off) > in.sum_tolerance[t.dtype]) return kSumOff;
  return -1;
}

// Calls f(row pointer, widen function) for row b of teacher t in its stored type.
template <class F>
UHC_HD auto with_row(const TeacherInput& t, int64_t b, F f) {
  const int64_t at = b * t.row_stride;
  switch (t.dtype) {  // once per row: the loops themselves read one stored type
    case kFloat16:
      return f(reinterpret_cast<const uint16_t*>(t.data) + at, [](uint16_t h) { return double(half_to_float(h)); });
    case kBFloat16:
      return f(reinterpret_cast<const uint16_t*>(t.data) + at, [](uint16_t h) { return double(bfloat16_to_float(h)); });
    case kFloat32:
      return f(reinterpret_cast<const float*>(t.data) + at, [](float x) { return double(x); });
    default:
      return f(reinterpret_cast<const double*>(t.data) + at, [](double x) { return x; });
  }
}

// Teacher i's row b (n values) into out[0 .. n) as what the method reads: probabilities
// renormalised over the row, or logits, at the temperature. Returns false (and records why) when
// the row fails a check; `out` then holds a harmless uniform row so the solver finishes quickly.
// A method that only weights the values (`scale` not null) may get them unnormalised: where
// renormalising is all the reading does, `out` holds the stored values, written in the checking
// pass, and *scale their factor (1 / the row's sum); otherwise *scale = 1.
template <class Out>
UHC_HD bool read_row(const Inputs& in, int i, int64_t b, int n, Out out, double* scale = nullptr) {
  const TeacherInput& t = in.teachers[i];
  const bool logits_out = in.value_kind == kLogits;
  if (scale) *scale = 1.0;
  if (t.data == 0) {  // the alpha prior
    for (int j = 0; j < n; ++j) out[j] = logits_out ? 0.0 : 1.0 / n;
    return true;
  }
  const bool renormalise = t.kind == kProbs && !logits_out && in.temperature == 1.0;
  const bool copy = scale && renormalise;
  const RowStats stats = with_row(t, b, [&](const auto* row, auto widen_one) {
    return copy ? row_stats(row, n, t.col_stride, widen_one, out) : row_stats(row, n, t.col_stride, widen_one, nullptr);
  });
  const double sum = stats.sum;
  const bool probs_in = t.kind == kProbs;
  const int failed = failed_check(in, t, stats);
  if (failed >= 0) {
    record(in.errors + i * kChecks + failed, static_cast<unsigned long long>(b));
    for (int j = 0; j < n; ++j) out[j] = logits_out ? 0.0 : 1.0 / n;
    return false;
  }
  if (renormalise) {  // absorbs a stored softmax's rounding
    const double inv = 1.0 / sum;
    if (copy) {
      *scale = inv;
      return true;
    }
    with_row(t, b, [&](const auto* row, auto widen_one) {
      convert_row(row, n, t.col_stride, widen_one, [inv](auto x) { return x * inv; }, out);
      return 0;
    });
    return true;
  }
  // logits (of probabilities: log max(p, eps)) at the temperature
  const double eps = in.eps, inv_t = 1.0 / in.temperature;
  with_row(t, b, [&](const auto* row, auto widen_one) {
    if (probs_in)
      convert_row(row, n, t.col_stride, widen_one,
                  [eps, inv_t](auto x) { return vlog_clamped(x, eps) * inv_t; }, out);
    else
      convert_row(row, n, t.col_stride, widen_one, [inv_t](auto x) { return x * inv_t; }, out);
    return 0;
  });
  if (logits_out) return true;
  double zmax = -INFINITY;
  for (int j = 0; j < n; ++j) zmax = out[j] > zmax ? static_cast<double>(out[j]) : zmax;
  map_row(out, n, [zmax](auto z) { return vexp(z - zmax); });
  double total = 0;
  for (int j = 0; j < n; ++j) total += out[j];
  const double inv = 1.0 / total;
  for (int j = 0; j < n; ++j) out[j] = out[j] * inv;
  return true;
}

}  // namespace UHC_NAMESPACE
