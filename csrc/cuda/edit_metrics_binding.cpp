// Torch binding of the CUDA kernels of fastedit::edit_metrics (compiled only in CUDA builds; the
// kernels themselves are plain CUDA in edit_metrics.cu). Checks the inputs like the CPU kernel,
// switches to the tensors' device, and launches on the current stream.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "binding_utils.h"
#include "cuda/edit_metrics.h"
#include "edit_metrics_checks.h"

namespace fastedit {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
edit_metrics_cuda(const at::Tensor& ref_in, const at::Tensor& labels_in, const at::Tensor& edited_in,
                  bool return_kl_rows) {
  check_edit_metrics_inputs(ref_in, labels_in, edited_in, c10::DeviceType::CUDA, "CUDA");
  const c10::cuda::CUDAGuard device_guard(ref_in.device());
  const at::Tensor ref = ref_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor edited = edited_in.contiguous();
  const int64_t E = edited.size(0);
  const int64_t N = ref.size(0);
  const int64_t C = ref.size(1);

  // Label range: the same error as on the CPU, at the price of one host synchronisation. While a
  // CUDA graph is being captured the check is skipped (it cannot synchronise); the kernels never
  // index out of bounds with such labels (they count as errors, not in errors_per_class).
  if (N > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_class_indices(labels, C, "fastedit::edit_metrics", "labels", "label");
  }

  const auto long_opts = ref.options().dtype(at::kLong);
  const auto float_opts = ref.options().dtype(at::kFloat);
  at::Tensor errors = at::empty({E}, long_opts);
  at::Tensor flips = at::empty({E}, long_opts);
  at::Tensor c2w = at::empty({E}, long_opts);
  at::Tensor w2c = at::empty({E}, long_opts);
  at::Tensor kl = at::empty({E}, float_opts);
  at::Tensor errors_per_class = at::empty({E, C}, long_opts);  // zeroed by the launcher
  at::Tensor kl_rows = at::empty({E, N}, float_opts);
  at::Tensor pred_ref = at::empty({N}, ref.options().dtype(at::kInt));
  at::Tensor pred = at::empty({E, N}, ref.options().dtype(at::kInt));
  if (E > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    C10_CUDA_CHECK(cuda::edit_metrics_launch(
        ref.const_data_ptr(), edited.const_data_ptr(), labels.const_data_ptr<int64_t>(), E, N, C,
        to_kernel_dtype(ref.scalar_type(), "fastedit::edit_metrics (CUDA)"),
        pred_ref.mutable_data_ptr<int32_t>(), pred.mutable_data_ptr<int32_t>(),
        kl_rows.mutable_data_ptr<float>(),
        errors.mutable_data_ptr<int64_t>(), flips.mutable_data_ptr<int64_t>(),
        c2w.mutable_data_ptr<int64_t>(), w2c.mutable_data_ptr<int64_t>(),
        kl.mutable_data_ptr<float>(), errors_per_class.mutable_data_ptr<int64_t>(), stream));
  }
  if (!return_kl_rows) kl_rows = at::empty({E, 0}, float_opts);
  return {errors, flips, c2w, w2c, kl, errors_per_class, kl_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CUDA, m) {
  m.impl("edit_metrics", &edit_metrics_cuda);
}

}  // namespace fastedit
