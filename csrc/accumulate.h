// Accumulate types and the conversions between a storage type and its accumulate type, shared by
// the CPU kernels (csrc/cpu/) and the plain CUDA kernels (csrc/cuda/*.cu).
//
// Plain C++17: no torch header (nvcc compiles it inside the .cu files on their own, see
// tests/packaging/test_extension.py); the CUDA part is compiled only by nvcc (__CUDACC__) and uses only the
// CUDA toolkit's cuda_fp16.h / cuda_bf16.h.
//
//   AccType<T>, acc_type_t<T>   float for float and the 16-bit float types, double for double
//                               (the same choice as ATen's at::opmath_type for these four types)
//   CUDA (device):  to_acc(x), from_acc<T>(x)   storage <-> accumulate type with the CUDA
//                   intrinsics (round to nearest even); dispatch_dtype(dtype, otherwise, f)
//                   calls f with the device storage type of a fastedit::DType
//   CPU (host):     CodecF32, CodecF64, CodecF16, CodecBF16   load/store between a storage type
//                   (16-bit types as their raw uint16_t bits) and the compute type, written with
//                   integer and float operations so that loops over them vectorise
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtypes.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fastedit {

// ---------------------------------------------------------------------------------------------
// Accumulate types.

// The type a kernel computes in for elements stored as T: float for float and for every 16-bit
// float type (c10::Half, c10::BFloat16, __half, __nv_bfloat16), double for double.
template <typename T>
struct AccType {
  static_assert(!std::is_integral_v<T> && sizeof(T) <= sizeof(float),
                "AccType: a floating-point storage type of at most 32 bits (or double)");
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

// ---------------------------------------------------------------------------------------------
// CUDA: conversions on the device, and the storage type of a DType.
#if defined(__CUDACC__)

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// The accumulate value x stored as T (16-bit types: rounded to nearest even).
template <typename T>
__device__ __forceinline__ T from_acc(acc_type_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Host side of a launcher: returns f(TypeTag<T>{}) for the device storage type T of `dtype`
// (float, double, __half, __nv_bfloat16), or `otherwise` for a value outside the enum.
template <typename R, typename F>
inline R dispatch_dtype(DType dtype, R otherwise, F&& f) {
  switch (dtype) {
    case DType::Float32:
      return f(TypeTag<float>{});
    case DType::Float64:
      return f(TypeTag<double>{});
    case DType::Float16:
      return f(TypeTag<__half>{});
    case DType::BFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return otherwise;
}

#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------
// CPU: storage codecs. Codec::T is the storage type (uint16_t holds the bits of a float16 or
// bfloat16), load() gives the compute value, store() rounds a compute value back. The 16-bit
// conversions follow c10's algorithms bit for bit (round to nearest even; a NaN becomes a quiet
// NaN: float16 0x7E00 with the sign kept, bfloat16 0x7FC0), written with integer and float
// operations and without branches so that loops using them vectorise (c10::Half's own conversion
// did not, and ran ~20x slower than float32 in the editor-step kernel).
//
// Host code only. Include it where FP contraction is off (CodecF16::store adds to a product,
// which an FMA would round differently) and, with GCC, trapping math off too (without
// no-trapping-math GCC does not if-convert the float16 paths and their loops stay scalar): see
// the pragma at the top of csrc/cpu/editor_step.cpp.

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

struct CodecF32 {
  using T = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
struct CodecF64 {
  using T = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
struct CodecF16 {  // IEEE half, as c10::detail::fp16_ieee_{to,from}_fp32_value
  using T = uint16_t;
  static float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(0x07800000u);
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    // a bit mask instead of ?: so that GCC does not sink the float operations into branches
    // (with -ftrapping-math it will not speculate them back, and the loop stays scalar)
    const uint32_t denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    return f32_from_bits(sign | (f32_bits(denormalized) & denormal) | (f32_bits(normalized) & ~denormal));
  }
  static uint16_t store(float f) {
    const float scale_to_inf = f32_from_bits(239u << 23);
    const float scale_to_zero = f32_from_bits(17u << 23);
    float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};
struct CodecBF16 {  // bfloat16, as c10::BFloat16 (round to nearest even, NaN -> 0x7FC0)
  using T = uint16_t;
  static float load(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  }
};

}  // namespace fastedit
