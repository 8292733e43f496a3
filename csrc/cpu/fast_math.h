// Branch-free exp and log for the CPU kernels (today csrc/cpu/edit_metrics.cpp's log-sum-exp and
// KL): plain arithmetic and bit operations only, so that loops calling them vectorise (libm's exp
// and log are calls, which stop the vectorisation). Each function covers only the arguments a
// log-sum-exp produces:
//
//   exp_nonpos(x)   e^x for x <= 0 (x = z - max(z))
//     float:  for -87.3f <= x <= 0 within 1 ulp of e^x (max 0.992 ulp, checked on every one of
//             the 1,118,738,843 float arguments of that range);
//             exp_nonpos(+-0) = 1 exactly, and a negative subnormal x gives 1;
//             x < -87.3f, -inf and NaN give exp_nonpos(-87.3f) ~ 1.2e-38 (the argument is
//             clamped: the result stays a normal float, and a sum holding a 1 does not see it)
//     double: the same with -708 as the clamp: within 1 ulp (max 0.93 ulp measured against
//             mpmath on samples of every binade), exp_nonpos(-708.0) ~ 3.3e-308
//     x > 0:  outside the contract (no overflow handling)
//   log_ge1(s)      log(s) for finite s >= 1 (a sum of exp(z - max(z)), which holds a 1)
//     float:  within 3 ulp of log(s) (max 2.84 ulp, checked on every finite float >= 1)
//     double: within 3 ulp (max 2.58 ulp measured against mpmath on samples)
//     log_ge1(1) = 0 exactly; s < 1, inf, NaN: outside the contract (a meaningless result,
//     nothing traps)
// tests/ops/test_fast_math.py checks these bounds (on samples) and the edge cases.
//
// Requirements on the including translation unit:
//   * FP contraction off for its own code (a * b + c must not become an FMA, or the rounding,
//     and with it the error bounds above, would depend on the clone and the compiler): define
//     FASTEDIT_FP_CONTRACT_OFF right after the `#pragma GCC optimize("fp-contract=off")` /
//     `#pragma clang fp contract(off)` that does it (as csrc/cpu/edit_metrics.cpp does);
//   * C++20 (std::bit_cast); no torch header is needed.
// The functions are force-inlined (FASTEDIT_INLINE): each call site computes them with the FP
// settings and the instruction set (FASTEDIT_CPU_CLONES) of its own function.
#pragma once

#if !defined(FASTEDIT_FP_CONTRACT_OFF)
#error "cpu/fast_math.h needs FP contraction off: see FASTEDIT_FP_CONTRACT_OFF at its top"
#endif

#include <bit>
#include <cstdint>

#include "cpu/cpu_clones.h"

namespace fastedit {

// e^x for x <= 0, Cephes' expf polynomial: n = round(x / ln 2) by the 1.5 * 2^23 trick (the
// rounding of the addition does it), r = x - n ln 2 in two steps (ln 2 split into a short high
// part and a correction), e^r by a degree-7 polynomial, 2^n built in the exponent bits.
FASTEDIT_INLINE float exp_nonpos(float x) {
  x = x > -87.3f ? x : -87.3f;  // also NaN (the comparison is false) and -inf
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t biased = std::bit_cast<int32_t>(t) - 0x4B400000 + 127;  // n + 127, in [1, 127]
  const float scale = std::bit_cast<float>(biased << 23);
  return p * scale;
}

// e^x for x <= 0 in double: the same reduction (1.5 * 2^52, ln 2 in a high and a low part), e^r
// by its Taylor series to degree 13 (|r| <= ln 2 / 2); x clamped at -708 like the float version.
FASTEDIT_INLINE double exp_nonpos(double x) {
  x = x > -708.0 ? x : -708.0;
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634 + kMagic;
  const double n = t - kMagic;
  double r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;    // 1/13!
  p = p * r + 1.0 / 479001600.0;    // 1/12!
  p = p * r + 1.0 / 39916800.0;     // 1/11!
  p = p * r + 1.0 / 3628800.0;      // 1/10!
  p = p * r + 1.0 / 362880.0;       // 1/9!
  p = p * r + 1.0 / 40320.0;        // 1/8!
  p = p * r + 1.0 / 5040.0;         // 1/7!
  p = p * r + 1.0 / 720.0;          // 1/6!
  p = p * r + 1.0 / 120.0;          // 1/5!
  p = p * r + 1.0 / 24.0;           // 1/4!
  p = p * r + 1.0 / 6.0;            // 1/3!
  p = p * r + 0.5;                  // 1/2!
  p = p * r * r + r + 1.0;
  const int64_t biased = std::bit_cast<int64_t>(t) - 0x4338000000000000LL + 1023;
  const double scale = std::bit_cast<double>(biased << 52);
  return p * scale;
}

// log(s) for finite s >= 1: s = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(u) with
// u = (m - 1) / (m + 1), |u| <= 0.172, atanh by its odd series; e ln 2 added in two parts.
FASTEDIT_INLINE float log_ge1(float s) {
  const int32_t bits = std::bit_cast<int32_t>(s);
  const int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f800000);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  const float ef = static_cast<float>(e + (big ? 1 : 0));
  const float u = (m - 1.0f) / (m + 1.0f);
  const float u2 = u * u;
  float p = 1.0f / 11.0f;
  p = p * u2 + 1.0f / 9.0f;
  p = p * u2 + 1.0f / 7.0f;
  p = p * u2 + 1.0f / 5.0f;
  p = p * u2 + 1.0f / 3.0f;
  p = p * u2 + 1.0f;
  return ef * 0.693145751953125f + (2.0f * u * p + ef * 1.428606820309417e-06f);
}

FASTEDIT_INLINE double log_ge1(double s) {
  const int64_t bits = std::bit_cast<int64_t>(s);
  const int64_t e = ((bits >> 52) & 0x7ff) - 1023;
  double m = std::bit_cast<double>((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  const double ef = static_cast<double>(e + (big ? 1 : 0));
  const double u = (m - 1.0) / (m + 1.0);
  const double u2 = u * u;
  double p = 1.0 / 21.0;
  p = p * u2 + 1.0 / 19.0;
  p = p * u2 + 1.0 / 17.0;
  p = p * u2 + 1.0 / 15.0;
  p = p * u2 + 1.0 / 13.0;
  p = p * u2 + 1.0 / 11.0;
  p = p * u2 + 1.0 / 9.0;
  p = p * u2 + 1.0 / 7.0;
  p = p * u2 + 1.0 / 5.0;
  p = p * u2 + 1.0 / 3.0;
  p = p * u2 + 1.0;
  return ef * 6.93147180369123816490e-01 + (2.0 * u * p + ef * 1.90821492927058770002e-10);
}

}  // namespace fastedit
