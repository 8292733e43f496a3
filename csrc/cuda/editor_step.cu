// CUDA kernel of fastedit::editor_step_: one fused, in-place editor step over many tensors in one
// launch (multi-tensor "apex" style: a by-value table of pointers and sizes; each block finds its
// tensor, edit and chunk from the table's prefix sums of block counts).
//
// Each block handles kBlockElems consecutive elements of one (tensor, edit) row: ResNet-18 layer3
// (2.1 M values) gives ~1000 blocks, about the 132 SMs x 8 resident blocks of an H100/H200. A block of an
// inactive edit returns before reading anything, so those parameters and state stay bit-identical.
// Dense rows use 16-byte vector loads/stores of the state (8 bytes for float16/bfloat16 params)
// when every pointer of the chunk is aligned, with a scalar tail; masked rows (sparse surgery) go
// coordinate by coordinate and touch only the selected ones. The math is csrc/editor_step_math.h,
// shared with the CPU kernel, with correctly rounded _rn operations (no FMA contraction).
// Plain CUDA only (raw pointers, cudaStream_t): see editor_step.h.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "accumulate.h"  // acc_type_t, to_acc, from_acc, dispatch_dtype
#include "cuda/editor_step.h"
#include "editor_step_math.h"

namespace fastedit {
namespace cuda {
namespace {

using step::Coef;
using step::EditCoef;

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = 2048;  // elements of one row per block (8 per thread)
constexpr int kMaxTensors = 32;        // tensors per launch (argument block ~2.3 KB < 4 KB)

struct Table {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* s1[kMaxTensors];
  void* s2[kMaxTensors];
  const bool* mask[kMaxTensors];
  int64_t row[kMaxTensors];
  int64_t mask_edit_stride[kMaxTensors];
  int64_t chunks[kMaxTensors];           // blocks per edit row: ceil(row / kBlockElems)
  int64_t block_start[kMaxTensors + 1];  // prefix sums of edits * chunks
  int count;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// One coordinate. C is the compute (and state) type of P: acc_type_t<P>.
template <int RULE, typename P, typename C>
__device__ __forceinline__ void one(P& p, P g, C& a, C& b, const Coef<C>& k, const EditCoef<C>& e) {
  static_assert(std::is_same_v<C, acc_type_t<P>>, "the state is kept in P's accumulate type");
  const C d = step::rule_delta<RULE, C>(to_acc(g), a, b, k, e);
  p = from_acc<P>(step::op_sub(to_acc(p), d));
}

__device__ __forceinline__ bool aligned(const void* ptr, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

template <int RULE, typename P, typename C, bool MASKED>
__global__ void __launch_bounds__(kThreads)
    editor_step_kernel(const Table tab, Coef<C> k, const C* __restrict__ t,
                       const bool* __restrict__ active, const C* __restrict__ inv_norm) {
  constexpr bool has1 = step::num_slot1(RULE) != 0;
  constexpr bool has2 = step::num_slot2(RULE) != 0;
  const int64_t block = blockIdx.x;
  int i = 0;
  while (i + 1 < tab.count && tab.block_start[i + 1] <= block) ++i;
  const int64_t local = block - tab.block_start[i];
  const int64_t chunks = tab.chunks[i];
  const int64_t e = local / chunks;
  const int64_t c = local - e * chunks;
  if (active != nullptr && !active[e]) return;  // satisfied edit: nothing read, nothing written

  EditCoef<C> ec;
  const C t_new = step::op_add(t[e], C(1));
  ec.first = t_new == C(1);
  ec.scale = inv_norm != nullptr ? inv_norm[e] : C(1);
  if constexpr (RULE == step::kAdam) {
    ec.bc1 = C(1) - pow(k.b1, t_new);
    ec.bc2 = C(1) - pow(k.b2, t_new);
  } else {
    ec.bc1 = C(1);
    ec.bc2 = C(1);
  }

  const int64_t row = tab.row[i];
  const int64_t begin = c * kBlockElems;
  const int64_t len = (row - begin) < kBlockElems ? (row - begin) : kBlockElems;
  const int64_t off = e * row + begin;
  P* __restrict__ p = static_cast<P*>(tab.p[i]) + off;
  const P* __restrict__ g = static_cast<const P*>(tab.g[i]) + off;
  C* __restrict__ s1 = has1 ? static_cast<C*>(tab.s1[i]) + off : nullptr;
  C* __restrict__ s2 = has2 ? static_cast<C*>(tab.s2[i]) + off : nullptr;

  if constexpr (MASKED) {
    const bool* __restrict__ m = tab.mask[i] + e * tab.mask_edit_stride[i] + begin;
    for (int64_t j = threadIdx.x; j < len; j += kThreads) {
      if (!m[j]) continue;
      P pj = p[j];
      C a = has1 ? s1[j] : C(0);
      C b = has2 ? s2[j] : C(0);
      one<RULE, P, C>(pj, g[j], a, b, k, ec);
      p[j] = pj;
      if constexpr (has1) s1[j] = a;
      if constexpr (has2) s2[j] = b;
    }
    return;
  }

  constexpr int V = 16 / sizeof(C);  // 4 floats or 2 doubles of state per 16-byte access
  using VP = Vec<P, V>;
  using VC = Vec<C, V>;
  int64_t vec_end = 0;
  if (aligned(p, sizeof(VP)) && aligned(g, sizeof(VP)) && (!has1 || aligned(s1, sizeof(VC))) &&
      (!has2 || aligned(s2, sizeof(VC)))) {
    const int64_t nvec = len / V;
    vec_end = nvec * V;
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
      VP pv = reinterpret_cast<const VP*>(p)[v];
      const VP gv = reinterpret_cast<const VP*>(g)[v];
      VC av, bv;
      if constexpr (has1) av = reinterpret_cast<const VC*>(s1)[v];
      if constexpr (has2) bv = reinterpret_cast<const VC*>(s2)[v];
#pragma unroll
      for (int q = 0; q < V; ++q) {
        C a = has1 ? av.v[q] : C(0);
        C b = has2 ? bv.v[q] : C(0);
        one<RULE, P, C>(pv.v[q], gv.v[q], a, b, k, ec);
        if constexpr (has1) av.v[q] = a;
        if constexpr (has2) bv.v[q] = b;
      }
      reinterpret_cast<VP*>(p)[v] = pv;
      if constexpr (has1) reinterpret_cast<VC*>(s1)[v] = av;
      if constexpr (has2) reinterpret_cast<VC*>(s2)[v] = bv;
    }
  }
  for (int64_t j = vec_end + threadIdx.x; j < len; j += kThreads) {  // tail, or unaligned rows
    P pj = p[j];
    C a = has1 ? s1[j] : C(0);
    C b = has2 ? s2[j] : C(0);
    one<RULE, P, C>(pj, g[j], a, b, k, ec);
    p[j] = pj;
    if constexpr (has1) s1[j] = a;
    if constexpr (has2) s2[j] = b;
  }
}

template <typename C>
__global__ void advance_t_kernel(C* t, const bool* active, int64_t edits) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < edits;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    t[e] = step::op_add(t[e], (active == nullptr || active[e]) ? C(1) : C(0));
  }
}

template <typename C>
Coef<C> make_coef(const double h[4]) {
  return Coef<C>{static_cast<C>(h[0]), static_cast<C>(h[1]), static_cast<C>(1.0 - h[1]),
                 static_cast<C>(h[2]), static_cast<C>(1.0 - h[2]), static_cast<C>(h[3])};
}

template <int RULE, typename P, typename C>
cudaError_t launch_rule(const StepTensor* tensors, int num_tensors, int64_t edits,
                        const double hyper[4], const void* t, const bool* active,
                        const void* inv_norm, cudaStream_t stream) {
  const Coef<C> k = make_coef<C>(hyper);
  const bool masked = num_tensors > 0 && tensors[0].mask != nullptr;
  int done = 0;
  while (done < num_tensors) {
    Table tab;
    tab.count = 0;
    tab.block_start[0] = 0;
    for (; done < num_tensors && tab.count < kMaxTensors; ++done) {
      const StepTensor& s = tensors[done];
      if (s.row <= 0 || edits <= 0) continue;
      const int64_t chunks = (s.row + kBlockElems - 1) / kBlockElems;
      const int64_t blocks = edits * chunks;
      if (tab.block_start[tab.count] + blocks > int64_t{0x7fffffff}) {
        if (tab.count == 0) return cudaErrorInvalidValue;  // one tensor beyond the grid limit
        break;
      }
      const int n = tab.count;
      tab.p[n] = s.p;
      tab.g[n] = s.g;
      tab.s1[n] = s.s1;
      tab.s2[n] = s.s2;
      tab.mask[n] = s.mask;
      tab.row[n] = s.row;
      tab.mask_edit_stride[n] = s.mask_edit_stride;
      tab.chunks[n] = chunks;
      tab.block_start[n + 1] = tab.block_start[n] + blocks;
      tab.count = n + 1;
    }
    if (tab.count == 0) continue;
    const auto grid = static_cast<unsigned int>(tab.block_start[tab.count]);
    if (masked) {
      editor_step_kernel<RULE, P, C, true><<<grid, kThreads, 0, stream>>>(
          tab, k, static_cast<const C*>(t), active, static_cast<const C*>(inv_norm));
    } else {
      editor_step_kernel<RULE, P, C, false><<<grid, kThreads, 0, stream>>>(
          tab, k, static_cast<const C*>(t), active, static_cast<const C*>(inv_norm));
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <typename P, typename C>
cudaError_t launch_dtype(const StepTensor* tensors, int num_tensors, int64_t edits, int rule,
                         const double hyper[4], const void* t, const bool* active,
                         const void* inv_norm, cudaStream_t stream) {
  switch (rule) {
    case step::kGD:
      return launch_rule<step::kGD, P, C>(tensors, num_tensors, edits, hyper, t, active, inv_norm, stream);
    case step::kScaledGD:
      if (inv_norm == nullptr) return cudaErrorInvalidValue;
      return launch_rule<step::kScaledGD, P, C>(tensors, num_tensors, edits, hyper, t, active, inv_norm, stream);
    case step::kSign:
      return launch_rule<step::kSign, P, C>(tensors, num_tensors, edits, hyper, t, active, inv_norm, stream);
    case step::kRMSProp:
      return launch_rule<step::kRMSProp, P, C>(tensors, num_tensors, edits, hyper, t, active, inv_norm, stream);
    case step::kMomentum:
      return launch_rule<step::kMomentum, P, C>(tensors, num_tensors, edits, hyper, t, active, inv_norm, stream);
    case step::kAdam:
      return launch_rule<step::kAdam, P, C>(tensors, num_tensors, edits, hyper, t, active, inv_norm, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t editor_step_launch(const StepTensor* tensors, int num_tensors, int64_t edits,
                               DType dtype, int rule, const double hyper[4], const void* t,
                               const bool* active, const void* inv_norm, cudaStream_t stream) {
  if (num_tensors < 0 || edits < 0 || t == nullptr || hyper == nullptr) return cudaErrorInvalidValue;
  for (int i = 1; i < num_tensors; ++i) {  // one mask mode per call
    if ((tensors[i].mask == nullptr) != (tensors[0].mask == nullptr)) return cudaErrorInvalidValue;
  }
  if (num_tensors == 0 || edits == 0) return cudaSuccess;
  // parameters of type P, state and t in its accumulate type (float, or double for Float64)
  return dispatch_dtype(dtype, cudaErrorInvalidValue, [&](auto tag) {
    using P = typename decltype(tag)::type;
    return launch_dtype<P, acc_type_t<P>>(tensors, num_tensors, edits, rule, hyper, t, active,
                                          inv_norm, stream);
  });
}

cudaError_t editor_step_advance_t(void* t, const bool* active, int64_t edits, bool fp64,
                                  cudaStream_t stream) {
  if (edits < 0 || t == nullptr) return cudaErrorInvalidValue;
  if (edits == 0) return cudaSuccess;
  const int64_t blocks64 = (edits + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned int>(blocks64 < 1024 ? blocks64 : 1024);
  if (fp64) {
    advance_t_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<double*>(t), active, edits);
  } else {
    advance_t_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<float*>(t), active, edits);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastedit
