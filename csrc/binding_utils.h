// Torch-side helpers shared by the CPU kernels (csrc/cpu/*.cpp), the CUDA bindings
// (csrc/cuda/*_binding.cpp) and the input checks (csrc/*_checks.h): the dtypes the kernels take,
// the dtype switch, and the range check of class indices (targets, labels).
//
// Torch headers (ATen, c10): for .cpp files only, never included by a .cu file (the plain CUDA
// kernels get the dtype enum from csrc/dtypes.h). Nothing here needs the CUDA headers: the CPU
// build includes it too.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "dtypes.h"

namespace fastedit {

// The element types of fastedit's kernels: float32, float64, float16, bfloat16 (fastedit::DType).
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// AT_DISPATCH over exactly those four types (scalar_t: float, double, c10::Half, c10::BFloat16).
#define FASTEDIT_DISPATCH_KERNEL_DTYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The DType a plain CUDA launcher takes for a tensor's dtype; `op` names the caller in the error
// for any other dtype (the input checks reject those first), e.g. "fastedit::edit_metrics (CUDA)".
inline DType to_kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// Checks that every entry of the 1-D int64 tensor `index` is a class in [0, classes), before a
// kernel reads anything: the first entry i outside gives the error
//   "<op>: <name>[i] = <value> is out of range for <C> classes (expected 0 <= <element> < <C>)"
// (C = classes).
// The same message on every device. A CPU tensor is scanned in place; on another device the check
// runs as tensor ops and costs one host synchronisation (a CUDA binding skips it while a CUDA
// graph is being captured: its kernels never read out of bounds).
inline void check_class_indices(const at::Tensor& index, int64_t classes, const char* op,
                                const char* name, const char* element) {
  if (index.device().is_cpu()) {
    const at::Tensor values = index.contiguous();  // the kernels pass contiguous tensors: no copy
    const int64_t* v = values.const_data_ptr<int64_t>();
    const int64_t n = values.numel();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(v[i] >= 0 && v[i] < classes, op, ": ", name, "[", i, "] = ", v[i],
                  " is out of range for ", classes, " classes (expected 0 <= ", element, " < ",
                  classes, ")");
    }
    return;
  }
  const at::Tensor bad = index.lt(0).logical_or(index.ge(classes));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": ", name, "[", i, "] = ", index[i].item<int64_t>(),
                " is out of range for ", classes, " classes (expected 0 <= ", element, " < ",
                classes, ")");
  }
}

}  // namespace fastedit
