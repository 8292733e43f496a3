// Torch binding of the CUDA kernel of fastedit::editor_step_ (compiled only in CUDA builds; the
// kernel itself is plain CUDA in editor_step.cu). Checks the inputs exactly like the CPU kernel
// (csrc/editor_step_checks.h), runs non-contiguous tensors through contiguous stand-ins like it
// (csrc/editor_step_strided.h), groups the tensors by parameter dtype (one multi-tensor launch
// per dtype, usually one), launches on the current stream, then advances t with a tiny kernel
// (after the step kernels, which read it). No host synchronisation: active, t and inv_norm are
// read by the kernels on the device; CUDA-graph capturable.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "binding_utils.h"
#include "cuda/editor_step.h"
#include "editor_step_checks.h"
#include "editor_step_strided.h"

namespace fastedit {
namespace {

void editor_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList slot1,
                      at::TensorList slot2, at::Tensor t, const std::optional<at::Tensor>& active,
                      const std::optional<at::Tensor>& inv_norm, at::TensorList masks,
                      int64_t rule, double lr, double beta1, double beta2, double eps,
                      bool batched, const EditorStepNames& names) {
  const EditorStepGeometry geo =
      check_editor_step_inputs(params, grads, slot1, slot2, t, active, inv_norm, masks, rule,
                               batched, c10::DeviceType::CUDA, "CUDA", names);
  const c10::cuda::CUDAGuard device_guard(t.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const double hyper[4] = {lr, beta1, beta2, eps};
  // Any strides: contiguous tensors are stepped in place, others through contiguous stand-ins
  // written back afterwards on the same stream (csrc/editor_step_strided.h).
  editor_step_on_contiguous(
      params, grads, slot1, slot2, t, active, inv_norm, masks,
      [&](at::TensorList P, at::TensorList G, at::TensorList S1, at::TensorList S2, at::Tensor& T,
          const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& I,
          at::TensorList M) {
        const bool* act = A.has_value() ? A->const_data_ptr<bool>() : nullptr;
        const void* inv = I.has_value() ? I->const_data_ptr() : nullptr;
        for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
          std::vector<cuda::StepTensor> group;
          for (size_t i = 0; i < P.size(); ++i) {
            if (P[i].scalar_type() != dtype || geo.row[i] == 0) continue;  // empty: nothing to do
            cuda::StepTensor s;
            s.p = P[i].data_ptr();
            s.g = G[i].const_data_ptr();
            s.s1 = S1.empty() ? nullptr : S1[i].data_ptr();
            s.s2 = S2.empty() ? nullptr : S2[i].data_ptr();
            s.mask = M.empty() ? nullptr : M[i].const_data_ptr<bool>();
            s.row = geo.row[i];
            s.mask_edit_stride = geo.mask_edit_stride[i];
            group.push_back(s);
          }
          if (group.empty()) continue;
          const DType kernel_dtype = to_kernel_dtype(dtype, "fastedit::editor_step_ (CUDA)");
          C10_CUDA_CHECK(cuda::editor_step_launch(group.data(), static_cast<int>(group.size()),
                                                  geo.edits, kernel_dtype, static_cast<int>(rule),
                                                  hyper, T.const_data_ptr(), act, inv, stream));
        }
        C10_CUDA_CHECK(cuda::editor_step_advance_t(T.data_ptr(), act, geo.edits, geo.fp64, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CUDA, m) {
  m.impl("editor_step_", &editor_step_cuda);
}

}  // namespace fastedit
