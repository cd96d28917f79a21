// Shared building blocks of the per-sample solvers: host/device qualifiers, math wrappers,
// half-precision loads, strided scratch views and the mask structure.
//
// Everything here is header-only and compiles both as plain C++ (the OpenMP launcher) and as
// CUDA device code (the CUDA launcher), so both backends run the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define UHC_HD __host__ __device__ inline
#else
#define UHC_HD inline
#endif

namespace uhc {

// ------------------------------------------------------------------ scalar traits and math
template <class T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float tiny = 1.17549435e-38f;  // smallest normal, torch.finfo(float32).tiny
  static constexpr float eps = 1.1920929e-07f;
};
template <>
struct Limits<double> {
  static constexpr double tiny = 2.2250738585072014e-308;
  static constexpr double eps = 2.220446049250313e-16;
};

UHC_HD float uexp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
UHC_HD double uexp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
UHC_HD float ulog(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
UHC_HD double ulog(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
UHC_HD float usqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
UHC_HD double usqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
template <class T>
UHC_HD T uabs(T x) {
  return x < T(0) ? -x : x;
}
template <class T>
UHC_HD T umax(T a, T b) {
  return a < b ? b : a;
}
template <class T>
UHC_HD T umin(T a, T b) {
  return b < a ? b : a;
}

// ------------------------------------------------------------------ input element types
// 16-bit floats are carried as raw bits and widened here, so neither the host compiler nor
// nvcc needs a half type (and the CPU build needs no CUDA headers).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

UHC_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

UHC_HD float widen(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float f = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
UHC_HD float widen(BFloat16 b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }
UHC_HD float widen(float x) { return x; }
UHC_HD double widen(double x) { return x; }

// One sample's packed teacher outputs: element j at p[j * col_stride] (row already offset).
template <class In, class Acc>
struct Row {
  const In* p;
  int64_t col_stride;
  UHC_HD Acc operator[](int64_t j) const { return static_cast<Acc>(widen(p[j * col_stride])); }
};

// ------------------------------------------------------------------ scratch views
// Per-sample scratch. On the CPU each thread owns a dense buffer; on the GPU the buffers of all
// threads are interleaved (element i of thread k at base[i * threads + k]) so that neighbouring
// threads touch neighbouring addresses.
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
// Exchange two views (a solver's current and candidate state) without copying their elements.
template <class View>
UHC_HD void swap_buffers(View& a, View& b) {
  const View tmp = a;
  a = b;
  b = tmp;
}

// ------------------------------------------------------------------ mask structure
// What depends only on the class sets (identical for every sample).
struct Structure {
  int32_t N;                   // teachers (including the alpha prior, if any)
  int32_t K;                   // classes in the union
  int32_t nnz;                 // packed columns per sample
  const int32_t* offsets;      // (N+1): teacher i owns packed columns offsets[i] .. offsets[i+1]
  const int32_t* class_index;  // (nnz): class of each packed column
  const int32_t* cls_ptr;      // (K+1): class l owns entries cls_ptr[l] .. cls_ptr[l+1]
  const int32_t* cls_col;      // (nnz): packed column of each entry, entries grouped by class
  const int32_t* cls_teacher;  // (nnz): teacher of each entry (ascending within a class)
  int32_t G;                   // groups: classes covered by the same set of teachers
  const int32_t* grp_cls_ptr;  // (G+1): group g's classes are grp_cls[grp_cls_ptr[g] .. grp_cls_ptr[g+1]]
  const int32_t* grp_cls;      // (K): classes grouped by group
  const int32_t* grp_ptr;      // (G+1): group g's teachers are grp_teacher[grp_ptr[g] .. grp_ptr[g+1]]
  const int32_t* grp_teacher;  // teachers of each group, ascending
};

enum Method : int { kSD = 0, kCE = 1, kMFP = 2, kMFLF = 3, kMFLU = 4 };

// Row stride of the solvers' small dense N x N matrices: a multiple of 4, so that cholesky() can
// update rows in whole 4-wide vectors.
UHC_HD int padded(int n) { return (n + 3) & ~3; }

// Scratch elements (of the accumulation type) one sample needs for `method`.
inline int64_t scratch_elements(int method, int64_t N, int64_t K) {
  const int64_t NN = N * ((N + 3) / 4 * 4);  // an N x padded(N) matrix
  // groups G <= K; see the Buf carving at the top of each solver
  switch (method) {
    case kSD:
      return K + 1;
    case kCE:
      return 6 * K + 8 * N + NN + 16;
    case kMFP:
      return 8 * K + 8 * N + NN + 16;
    case kMFLF:
      return 3 * K + 4 * N + 16;
    default:  // kMFLU
      return 5 * K + 14 * N + 4 * N * N + 16;
  }
}

}  // namespace uhc
