// Input checks of fastedit::edit_metrics shared by the CPU kernel and the CUDA binding, so both
// devices reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "binding_utils.h"  // is_kernel_dtype

namespace fastedit {

// Everything that can be checked without reading tensor data: devices, dtypes, dims, matching
// sizes, C >= 1. The range of the labels is checked by each backend.
inline void check_edit_metrics_inputs(const at::Tensor& ref, const at::Tensor& labels,
                                      const at::Tensor& edited, c10::DeviceType device,
                                      const char* backend) {
  TORCH_CHECK(ref.device().type() == device, "fastedit::edit_metrics (", backend,
              "): ref_logits must be a ", backend, " tensor, got a tensor on ", ref.device());
  TORCH_CHECK(labels.device() == ref.device() && edited.device() == ref.device(),
              "fastedit::edit_metrics (", backend, "): all inputs must be on one device, got "
              "ref_logits on ", ref.device(), ", labels on ", labels.device(),
              ", edited_logits on ", edited.device());
  TORCH_CHECK(ref.dim() == 2, "fastedit::edit_metrics: ref_logits must be 2-D [N, C], got a ",
              ref.dim(), "-D tensor of shape ", ref.sizes());
  TORCH_CHECK(labels.dim() == 1, "fastedit::edit_metrics: labels must be 1-D [N], got a ",
              labels.dim(), "-D tensor of shape ", labels.sizes());
  TORCH_CHECK(edited.dim() == 3, "fastedit::edit_metrics: edited_logits must be 3-D [E, N, C], "
              "got a ", edited.dim(), "-D tensor of shape ", edited.sizes());
  const auto dtype = ref.scalar_type();
  TORCH_CHECK(is_kernel_dtype(dtype),
              "fastedit::edit_metrics: ref_logits must be float32, float64, float16 or bfloat16, "
              "got ", dtype);
  TORCH_CHECK(edited.scalar_type() == dtype,
              "fastedit::edit_metrics: edited_logits must have the dtype of ref_logits (", dtype,
              "), got ", edited.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong,
              "fastedit::edit_metrics: labels must be int64 (torch.long), got ",
              labels.scalar_type());
  TORCH_CHECK(labels.size(0) == ref.size(0) && edited.size(1) == ref.size(0) &&
                  edited.size(2) == ref.size(1),
              "fastedit::edit_metrics: shape mismatch: ref_logits ", ref.sizes(), " [N, C], labels ",
              labels.sizes(), " [N], edited_logits ", edited.sizes(), " [E, N, C]");
  TORCH_CHECK(ref.size(1) >= 1,
              "fastedit::edit_metrics: logits must have at least one class (C >= 1), got shape ",
              ref.sizes());
  // predictions are stored as int32 and a row index as int64
  TORCH_CHECK(ref.size(1) <= std::numeric_limits<int32_t>::max(),
              "fastedit::edit_metrics: at most 2^31 - 1 classes, got ", ref.size(1));
}

}  // namespace fastedit
