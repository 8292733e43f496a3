// Input checks of fastedit::edit_constraint shared by the CPU kernel and the CUDA binding, so
// both devices reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "binding_utils.h"  // is_kernel_dtype

namespace fastedit {

// Checks everything that can be checked without reading tensor data: device, dtype, dims,
// matching batch sizes, C >= 1. The range of target values is checked by each backend.
inline void check_edit_constraint_inputs(const at::Tensor& logits, const at::Tensor& target,
                                         c10::DeviceType device, const char* backend) {
  TORCH_CHECK(logits.device().type() == device, "fastedit::edit_constraint (", backend,
              "): logits must be a ", backend, " tensor, got a tensor on ", logits.device());
  TORCH_CHECK(target.device() == logits.device(), "fastedit::edit_constraint (", backend,
              "): target must be on the same device as logits (", logits.device(), "), got ",
              target.device());
  TORCH_CHECK(logits.dim() == 2, "fastedit::edit_constraint: logits must be 2-D [B, C], got a ",
              logits.dim(), "-D tensor of shape ", logits.sizes());
  TORCH_CHECK(target.dim() == 1, "fastedit::edit_constraint: target must be 1-D [B], got a ",
              target.dim(), "-D tensor of shape ", target.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(is_kernel_dtype(dtype),
              "fastedit::edit_constraint: logits must be float32, float64, float16 or bfloat16, "
              "got ", dtype);
  TORCH_CHECK(target.scalar_type() == at::kLong,
              "fastedit::edit_constraint: target must be int64 (torch.long), got ",
              target.scalar_type());
  TORCH_CHECK(target.size(0) == logits.size(0),
              "fastedit::edit_constraint: shape mismatch: logits has ", logits.size(0),
              " rows (shape ", logits.sizes(), ") but target has ", target.size(0),
              " entries (shape ", target.sizes(), ")");
  TORCH_CHECK(logits.size(1) >= 1,
              "fastedit::edit_constraint: logits must have at least one class (C >= 1), got shape ",
              logits.sizes());
}

}  // namespace fastedit
