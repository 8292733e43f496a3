// Launcher of the CUDA kernels of fastedit::edit_metrics. Plain CUDA: no torch header here or in
// edit_metrics.cu, so the kernels compile with nvcc alone (.ci/run checks them on every run).
// The torch side (checks, device guard, current stream) is csrc/cuda/edit_metrics_binding.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtypes.h"  // fastedit::DType

namespace fastedit {
namespace cuda {

// Per-edit metrics of E edited models against the original one on N samples of C classes
// (contract: fastedit/ops/edit_metrics.py). All pointers are device memory, row-major contiguous:
//   ref [N, C] and edited [E, N, C] of `dtype`; labels [N] int64 (expected in [0, C): a label
//   outside is counted as an error but not in errors_per_class, and nothing is read out of bounds);
//   scratch: pred_ref [N] int32, pred [E, N] int32;
//   outputs: kl_rows [E, N] float32 (per-sample KL), errors, flips, correct_to_wrong,
//   wrong_to_correct [E] int64, kl [E] float32 (mean of kl_rows, NaN for N = 0), errors_per_class
//   [E, C] int64 (set to zero here, then counted with integer atomics: deterministic).
// Two kernels on `stream`: one over the E * N rows (thread per row for C <= 32, staged through
// shared memory; warp per row otherwise, 16-byte loads when C * sizeof(dtype) is a multiple of 16
// and the pointers are 16-byte aligned), then one block per edit reducing in a fixed order (the
// KL sum in double). float16/bfloat16 accumulate in float, float64 in double.
// Returns cudaErrorInvalidValue for negative sizes, C < 1 or C >= 2^31 - 1, else the launches' status.
cudaError_t edit_metrics_launch(const void* ref, const void* edited, const int64_t* labels, int64_t E,
                                int64_t N, int64_t C, DType dtype, int32_t* pred_ref, int32_t* pred,
                                float* kl_rows, int64_t* errors, int64_t* flips,
                                int64_t* correct_to_wrong, int64_t* wrong_to_correct, float* kl,
                                int64_t* errors_per_class, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastedit
