// CUDA kernel of fastedit::edit_constraint: one warp per row, several rows per block.
// Plain CUDA only (raw pointers, cudaStream_t): see edit_constraint.h.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "accumulate.h"  // AccType, to_acc, from_acc, dispatch_dtype
#include "cuda/edit_constraint.h"

namespace fastedit {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 8;  // warps per block
constexpr int kThreads = kWarpSize * kRowsPerBlock;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // rows beyond this are covered by a grid-stride loop

// max that propagates NaN from either side (like torch.max).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    edit_constraint_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                           T* __restrict__ out, int64_t B, int64_t C) {
  using A = typename AccType<T>::type;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; row < B;
       row += row_step) {  // row is the same for the whole warp: the shuffles below are safe
    const T* z = logits + row * C;
    A m = -static_cast<A>(INFINITY);
    for (int64_t i = lane; i < C; i += kWarpSize) m = nan_max(m, to_acc(z[i]));
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) {
      const int64_t t = target[row];
      const A r = (t >= 0 && t < C) ? m - to_acc(z[t]) : static_cast<A>(NAN);
      out[row] = from_acc<T>(r);
    }
  }
}

template <typename T>
cudaError_t launch(const void* logits, const int64_t* target, void* out, int64_t B, int64_t C,
                   cudaStream_t stream) {
  int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  edit_constraint_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), target, static_cast<T*>(out), B, C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t edit_constraint_launch(const void* logits, const int64_t* target, void* out, int64_t B,
                                   int64_t C, DType dtype, cudaStream_t stream) {
  if (B < 0 || C < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, cudaErrorInvalidValue, [&](auto tag) {
    return launch<typename decltype(tag)::type>(logits, target, out, B, C, stream);
  });
}

}  // namespace cuda
}  // namespace fastedit
