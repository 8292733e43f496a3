// Torch binding of the CUDA kernel of fastedit::edit_constraint (compiled only in CUDA builds;
// the kernel itself is plain CUDA in edit_constraint.cu). Checks the inputs like the CPU kernel,
// switches to the tensors' device, and launches on the current stream.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/edit_constraint.h"
#include "edit_constraint_checks.h"

namespace fastedit {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::Float32;
    case at::kDouble:
      return cuda::DType::Float64;
    case at::kHalf:
      return cuda::DType::Float16;
    case at::kBFloat16:
      return cuda::DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastedit::edit_constraint (CUDA): unsupported dtype ", t);
  }
}

at::Tensor edit_constraint_cuda(const at::Tensor& logits_in, const at::Tensor& target_in) {
  check_edit_constraint_inputs(logits_in, target_in, c10::DeviceType::CUDA, "CUDA");
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);

  // Target range: the same error as on the CPU, at the price of one host synchronisation. While
  // a CUDA graph is being captured the check is skipped (it cannot synchronise); the kernel never
  // reads out of bounds and writes NaN for such rows.
  if (B > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    const at::Tensor bad = at::logical_or(target.lt(0), target.ge(C));
    if (bad.any().item<bool>()) {
      const int64_t b = at::nonzero(bad)[0][0].item<int64_t>();
      TORCH_CHECK(false, "fastedit::edit_constraint: target[", b, "] = ",
                  target[b].item<int64_t>(), " is out of range for ", C,
                  " classes (expected 0 <= target < ", C, ")");
    }
  }

  at::Tensor out = at::empty({B}, logits.options());
  if (B == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cuda::edit_constraint_launch(logits.const_data_ptr(),
                                              target.const_data_ptr<int64_t>(),
                                              out.mutable_data_ptr(), B, C,
                                              to_kernel_dtype(logits.scalar_type()), stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CUDA, m) {
  m.impl("edit_constraint", &edit_constraint_cuda);
}

}  // namespace fastedit
