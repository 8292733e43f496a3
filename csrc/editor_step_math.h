// The per-element math of fastedit::editor_step_, shared by the CPU kernel (csrc/cpu/) and the
// CUDA kernel (csrc/cuda/editor_step.cu). Plain C++/CUDA: no torch header, so nvcc compiles it
// on its own.
//
// Every formula mirrors fastedit/editors.py (Editor._rule) operation by operation, in the same
// order and with the same constants (Python floats rounded once to the compute type, like torch
// does with a Python scalar), and without fused multiply-adds: torch evaluates each operation of
// the reference as a separate, correctly rounded kernel, so with the same order the fused kernels
// give bit-identical results (only Adam's beta**t may differ in the last bit: pow is not
// correctly rounded, and torch and libm/CUDA may pick different neighbours).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTEDIT_HD __host__ __device__ __forceinline__
#else
#define FASTEDIT_HD inline __attribute__((always_inline))
#endif

namespace fastedit {
namespace step {

// Rule ids of the op's `rule` argument (fastedit/ops/_table.py keeps the same table, RULE_IDS).
enum Rule : int { kGD = 0, kScaledGD = 1, kSign = 2, kRMSProp = 3, kMomentum = 4, kAdam = 5 };
constexpr int kNumRules = 6;

// State tensors per parameter: (slot1, slot2).
//   RMSProp: square_avg; Momentum: velocity; Adam: exp_avg, exp_avg_sq; others: none.
FASTEDIT_HD constexpr int num_slot1(int rule) {
  return (rule == kRMSProp || rule == kMomentum || rule == kAdam) ? 1 : 0;
}
FASTEDIT_HD constexpr int num_slot2(int rule) { return rule == kAdam ? 1 : 0; }

// Hyper-parameters rounded to the compute type C (float, or double for float64 parameters).
//   lr; b1 = RMSProp beta | Momentum momentum | Adam beta1; b2 = Adam beta2; eps;
//   omb1 = (C)(1 - beta) and omb2 = (C)(1 - beta2), with 1 - beta computed in double as Python does.
template <typename C>
struct Coef {
  C lr, b1, omb1, b2, omb2, eps;
};

// Per-edit quantities, computed once per edit before the elementwise pass.
//   scale: Scaled GD's 1 / max(||g||, eps) of this edit; first: RMSProp's t_new == 1;
//   bc1/bc2: Adam's 1 - beta1**t_new, 1 - beta2**t_new.
template <typename C>
struct EditCoef {
  C scale, bc1, bc2;
  int first;
};

// Correctly rounded single operations; on the device the _rn intrinsics also stop nvcc from
// contracting a*b + c into an FMA (which the reference never does).
FASTEDIT_HD float op_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTEDIT_HD double op_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTEDIT_HD float op_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTEDIT_HD double op_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTEDIT_HD float op_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTEDIT_HD double op_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTEDIT_HD float op_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTEDIT_HD double op_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTEDIT_HD float op_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
FASTEDIT_HD double op_sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return __builtin_sqrt(a);
#endif
}

// One coordinate: returns delta (theta_new = theta - delta) and updates the slots in place.
template <int RULE, typename C>
FASTEDIT_HD C rule_delta(C g, C& s1, C& s2, const Coef<C>& k, const EditCoef<C>& e) {
  (void)s1;
  (void)s2;
  (void)e;
  if constexpr (RULE == kGD) {
    return op_mul(k.lr, g);  // lr * g
  } else if constexpr (RULE == kScaledGD) {
    return op_mul(op_mul(k.lr, g), e.scale);  // lr * g * inv_norm
  } else if constexpr (RULE == kSign) {
    // torch.sign: +1, -1, and +0 for +-0 and NaN
    const C sign = static_cast<C>(g > C(0)) - static_cast<C>(g < C(0));
    return op_mul(k.lr, sign);
  } else if constexpr (RULE == kRMSProp) {
    const C g2 = op_mul(g, g);
    // where(t == 1, g2, beta * s + (1 - beta) * g2)
    s1 = e.first ? g2 : op_add(op_mul(k.b1, s1), op_mul(k.omb1, g2));
    return op_div(op_mul(k.lr, g), op_sqrt(op_add(s1, k.eps)));  // lr * g / sqrt(s + eps)
  } else if constexpr (RULE == kMomentum) {
    s1 = op_add(op_mul(k.lr, g), op_mul(k.b1, s1));  // lr * g + momentum * v
    return s1;
  } else {  // kAdam
    s1 = op_add(op_mul(k.b1, s1), op_mul(k.omb1, g));                // beta1 m + (1 - beta1) g
    s2 = op_add(op_mul(k.b2, s2), op_mul(op_mul(k.omb2, g), g));     // beta2 v + (1 - beta2) g g
    const C m_hat = op_div(s1, e.bc1);
    const C v_hat = op_div(s2, e.bc2);
    const C root = v_hat > C(0) ? op_sqrt(v_hat) : C(0);             // _safe_sqrt (NaN -> 0)
    return op_div(op_mul(k.lr, m_hat), op_add(root, k.eps));         // lr m_hat / (sqrt + eps)
  }
}

}  // namespace step
}  // namespace fastedit
