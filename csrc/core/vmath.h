// exp, log, expm1 and log1p over lanes of doubles, accurate to a few ULP (Cephes' rational
// approximations after range reduction), so that the solvers' transcendental functions run as
// vector code. Scalars (W = 1: the CUDA threads) use the platform's functions.
#pragma once

#include <cmath>

#if defined(__AVX512F__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#include "simd.h"

namespace UHC_NAMESPACE {

// ---------------------------------------------------------------- scalars
UHC_HD double vexp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
UHC_HD double vlog(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
UHC_HD double vlog_clamped(double x, double floor) { return vlog(x < floor ? floor : x); }
UHC_HD double vexpm1(double x) {
#if defined(__CUDA_ARCH__)
  return ::expm1(x);
#else
  return std::expm1(x);
#endif
}
UHC_HD double vlog1p(double x) {
#if defined(__CUDA_ARCH__)
  return ::log1p(x);
#else
  return std::log1p(x);
#endif
}
UHC_HD double vsqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
UHC_HD double vrecip(double x) { return 1.0 / x; }
UHC_HD float vsqrt(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// ---------------------------------------------------------------- lanes of doubles
#if UHC_VECTORS
// 1.5 * 2^52: y + this rounds y (|y| < 2^51) to an integer, held in the low bits of the sum (the
// sum's bits minus kRoundToIntegerBits); converting lane vectors between int64 and double directly
// needs AVX-512DQ, and without it compiles to one scalar conversion a lane.
constexpr double kRoundToInteger = 6755399441055744.0;
constexpr int64_t kRoundToIntegerBits = 0x4338000000000000LL;

template <class D, class = decltype(D{}[0] + 1.0)>
inline D vexp(D x) {
  using M = decltype(x < x);
  const D hi = splat<D>(709.782712893384), lo = splat<D>(-745.1332191019412);
  const M over = x > hi, under = x < lo, nan = x != x;
  x = vmin(vmax(x, lo), hi);
  // x = n ln2 + r, |r| <= ln2 / 2
  // n = x / ln2 rounded to an integer: as a double, and (k) in the low bits of the rounding sum
  const D shifted = x * 1.4426950408889634 + kRoundToInteger;
  const D n = shifted - kRoundToInteger;
  const D r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
  const D rr = r * r;
  const D p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const D q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104739e-3) * rr + 2.27265548208155028766e-1) * rr +
              2.00000000000000000009e0;
  D e = 1.0 + 2.0 * (p / (q - p));
  // times 2^n in two halves, so that results down to the subnormals stay exact in the exponent
  M k;
  memcpy(&k, &shifted, sizeof(D));
  k = k - kRoundToIntegerBits;
  const M k1 = k >> 1, k2 = k - k1;
  D s1, s2;
  const M b1 = (k1 + 1023) << 52, b2 = (k2 + 1023) << 52;
  memcpy(&s1, &b1, sizeof(D));
  memcpy(&s2, &b2, sizeof(D));
  e = e * s1 * s2;
  e = over ? splat<D>(INFINITY) : e;
  e = under ? splat<D>(0.0) : e;
  return nan ? x : e;
}

// log of positive, finite, normal arguments only (no special cases: the solvers' own arguments).
template <class D, class = decltype(D{}[0] + 1.0)>
inline D vlog_normal(D x) {
  using M = decltype(x < x);
  M bits;
  memcpy(&bits, &x, sizeof(D));
  M e = ((bits >> 52) & 0x7ff) - 1022;
  const M mantissa_bits = (bits & 0x000fffffffffffffLL) | 0x3fe0000000000000LL;  // in [0.5, 1)
  D m;
  memcpy(&m, &mantissa_bits, sizeof(D));
  const M small = m < 0.70710678118654752440;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0 : m - 1.0;
  D ed;  // e as a double through the rounding constant's bits (AVX2 has no 64-bit integer conversion)
  e = e + kRoundToIntegerBits;
  memcpy(&ed, &e, sizeof(D));
  ed = ed - kRoundToInteger;
  const D z = m * m;
  const D p = ((((1.01875663804580931796e-4 * m + 4.97494994976747001425e-1) * m + 4.70579119878881725854e0) * m +
                1.44989225341610930846e1) *
                   m +
               1.79368678507819816313e1) *
                  m +
              7.70838733755885391666e0;
  const D q = ((((m + 1.12873587189167450590e1) * m + 4.52279145837532221105e1) * m + 8.29875266912776603211e1) * m +
               7.11544750618563894466e1) *
                  m +
              2.31251620126765340583e1;
  const D y = m * (z * p / q) - ed * 2.121944400546905827679e-4 - 0.5 * z;
  return m + y + ed * 0.693359375;
}

template <class D, class = decltype(D{}[0] + 1.0)>
inline D vlog(D x) {
  using M = decltype(x < x);
  const M bad = x < 0, zero = x == 0, inf = x == INFINITY, nan = x != x;
  // subnormals: scale into the normal range first
  const M tiny = x < 2.2250738585072014e-308;
  D y = vlog_normal(tiny ? x * 18014398509481984.0 : x);  // 2^54
  y = tiny ? y - 54 * 0.693147180559945309417 : y;
  y = zero ? splat<D>(-INFINITY) : y;
  y = inf ? x : y;
  y = bad ? splat<D>(NAN) : y;
  return nan ? x : y;
}

// log(max(x, floor)) for floor > 0 (the logits of probabilities). With a normal floor the clamped
// argument is normal, NaN or +inf, so vlog's other special cases are skipped.
template <class D, class = decltype(D{}[0] + 1.0)>
inline D vlog_clamped(D x, double floor) {
  x = vmax(x, splat<D>(floor));
  if (!(floor >= 2.2250738585072014e-308)) return vlog(x);
  return x < INFINITY ? vlog_normal(x) : x;
}

// log(1 + x) to full relative precision for small x (log(u) * x / (u - 1) with u = 1 + x rounded:
// the rounding of u cancels in the ratio), for x > -1 with 1 + x normal (the solvers' arguments).
template <class D, class = decltype(D{}[0] + 1.0)>
inline D vlog1p(D x) {
  const D u = 1.0 + x;
  const D d = u - 1.0;
  const D safe = d == 0 ? splat<D>(1.0) : d;
  return d == 0 ? x : vlog_normal(u) * (x / safe);
}

// exp(x) - 1 to full relative precision for small x ((u - 1) * x / log(u) with u = exp(x)).
template <class D, class = decltype(D{}[0] + 1.0)>
inline D vexpm1(D x) {
  const D u = vexp(x);
  const D d = u - 1.0;
  const D l = vlog_normal(u);  // (used only where u is normal: the other cases are selected below)
  const D safe = l == 0 ? splat<D>(1.0) : l;
  D y = d * (x / safe);
  y = (u == 1.0) ? x : y;
  y = (d == -1.0) ? splat<D>(-1.0) : y;
  return (x > 700.0) ? u : y;
}

// 1 / x for positive x (the solvers' denominators). With AVX-512: the 14-bit estimate and two
// Newton steps, each doubling its bits (within two ulps of the quotient, +inf to 0), at a quarter
// of a division's cost (vdivpd on 8 lanes issues once per 16 cycles).
template <class D, class = decltype(D{}[0] + 1.0)>
inline D vrecip(D x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(D) == sizeof(__m512d)) {
    __m512d estimate;
    memcpy(&estimate, &x, sizeof(D));
    estimate = _mm512_maskz_rcp14_pd(0xff, estimate);  // (the unmasked form warns of an undefined source in GCC 12)
    D y;
    memcpy(&y, &estimate, sizeof(D));
    y = y + y * (1.0 - x * y);
    y = y + y * (1.0 - x * y);
    return x == INFINITY ? splat<D>(0.0) : y;
  }
#endif
  return 1.0 / x;
}

template <class V, class = decltype(V{}[0])>
inline V vsqrt(V x) {
  constexpr int n = sizeof(V) / sizeof(x[0]);
  V out = x;
  for (int i = 0; i < n; ++i) out[i] = std::sqrt(x[i]);  // one sqrtpd: the compiler vectorises the lanes
  return out;
}
#endif

}  // namespace UHC_NAMESPACE
