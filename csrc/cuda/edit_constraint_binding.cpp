// Torch binding of the CUDA kernel of fastedit::edit_constraint (compiled only in CUDA builds;
// the kernel itself is plain CUDA in edit_constraint.cu). Checks the inputs like the CPU kernel,
// switches to the tensors' device, and launches on the current stream.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "cuda/edit_constraint.h"
#include "edit_constraint_checks.h"

namespace fastedit {
namespace {

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
    check_class_indices(target, C, "fastedit::edit_constraint", "target", "target");
  }

  at::Tensor out = at::empty({B}, logits.options());
  if (B == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cuda::edit_constraint_launch(logits.const_data_ptr(),
                                              target.const_data_ptr<int64_t>(),
                                              out.mutable_data_ptr(), B, C,
                                              to_kernel_dtype(logits.scalar_type(),
                                                              "fastedit::edit_constraint (CUDA)"),
                                              stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CUDA, m) {
  m.impl("edit_constraint", &edit_constraint_cuda);
}

}  // namespace fastedit
