// Launcher of the CUDA kernel of fastedit::editor_step_. Plain CUDA: no torch header here or in
// editor_step.cu, so the kernel compiles with nvcc alone (.ci/run checks it on every run). The
// torch side (checks, grouping by dtype, device guard, current stream) is editor_step_binding.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtypes.h"  // fastedit::DType

namespace fastedit {
namespace cuda {

// One parameter tensor of a step: contiguous memory of E rows of `row` elements (E = 1 when not
// batched). p, g: parameter dtype; s1, s2: the rule's state (float, or double for Float64
// parameters), nullptr when the rule has no such slot; mask: nullptr (dense) or bools, row j of
// edit e at mask + e * mask_edit_stride (stride 0: one mask shared by the edits).
struct StepTensor {
  void* p;
  const void* g;
  void* s1;
  void* s2;
  const bool* mask;
  int64_t row;
  int64_t mask_edit_stride;
};

// One step of rule `rule` (csrc/editor_step_math.h: 0 GD .. 5 Adam) over `num_tensors` tensors
// of one parameter dtype, on `stream`, in as few launches as the by-value argument block allows.
// hyper = {lr, beta1, beta2, eps} (the op's floats). t: E step counts (float, or double for
// Float64), read only: call editor_step_advance_t afterwards. active: E bools or nullptr.
// inv_norm: E values of t's dtype (Scaled GD) or nullptr. Inactive edits are neither read nor
// written; masked-out coordinates are neither read nor written.
// Returns cudaErrorInvalidValue for bad arguments, else the status of the last launch.
cudaError_t editor_step_launch(const StepTensor* tensors, int num_tensors, int64_t edits,
                               DType dtype, int rule, const double hyper[4], const void* t,
                               const bool* active, const void* inv_norm, cudaStream_t stream);

// t[e] += active[e] (or 1 without `active`) for e < edits; `fp64` says t's dtype.
cudaError_t editor_step_advance_t(void* t, const bool* active, int64_t edits, bool fp64,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace fastedit
