// Launcher of the CUDA kernel of fastedit::edit_constraint. Plain CUDA: no torch header here or in
// edit_constraint.cu, so the kernel compiles with nvcc alone (.ci/run checks it on every run).
// The torch side (checks, device guard, current stream) is csrc/cuda/edit_constraint_binding.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtypes.h"  // fastedit::DType

namespace fastedit {
namespace cuda {

// out[b] = max_i logits[b, i] - logits[b, target[b]] for b < B, on `stream`.
// logits: B x C row-major (contiguous) values of `dtype`; target: B int64 values in [0, C); out: B
// values of `dtype`. float16/bfloat16 accumulate in float. A NaN in a row (or a target outside
// [0, C), which the caller is expected to have rejected) gives NaN. Nothing is launched for B == 0.
// Returns cudaErrorInvalidValue for B < 0, C < 1 or an unknown dtype, else the launch's status.
cudaError_t edit_constraint_launch(const void* logits, const int64_t* target, void* out, int64_t B,
                                   int64_t C, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastedit
