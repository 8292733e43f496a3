// CUDA kernels of fastedit::edit_metrics (see edit_metrics.h). Plain CUDA only.
//
// Per row (e, n), the same arithmetic as the CPU kernel (csrc/cpu/edit_metrics.cpp):
//   argmax like torch.argmax (first maximal index, the first NaN if any), and an online
//   log-sum-exp of the ref and the edited row at once with the KL accumulator
//     t = sum_c exp(zr_c - Mr) ((zr_c - Mr) - (ze_c - Me)),   KL = t / sr + log se - log sr;
//   when the maxima grow by dr, de: s <- s exp(-d), t <- exp(-dr) (t + (de - dr) sr).
//   A non-finite logit in either row makes the row's KL NaN.
// The ref row is re-read for each edit: rows are numbered e * N + n, so a block's rows share ref
// rows only across edits; the ref rows of a wave stay in L2.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "accumulate.h"  // AccType, to_acc, dispatch_dtype
#include "cuda/edit_metrics.h"

namespace fastedit {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kSmallC = 32;           // thread per row up to this C
constexpr int kLargeRowsPerBlock = 8;  // warps per block, warp per row
constexpr int kReduceThreads = 256;
constexpr int32_t kNoIndex = 2147483647;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // beyond: grid-stride loops

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// torch.argmax bookkeeping: the best value so far and its index (kNoIndex before the first).
template <typename A>
struct ArgMax {
  A val;
  int32_t idx;
  __device__ __forceinline__ void init() {
    val = static_cast<A>(0);
    idx = kNoIndex;
  }
  // elements must come in increasing index order
  __device__ __forceinline__ void update(A v, int32_t i) {
    const bool take = idx == kNoIndex || (val == val && (v > val || v != v));
    val = take ? v : val;
    idx = take ? i : idx;
  }
  // merge with another lane's (indices interleaved): NaN beats numbers, then larger, then first
  __device__ __forceinline__ void merge(A ov, int32_t oi) {
    bool take;
    if (oi == kNoIndex) {
      take = false;
    } else if (idx == kNoIndex) {
      take = true;
    } else {
      const bool a_nan = val != val;
      const bool b_nan = ov != ov;
      if (a_nan != b_nan) {
        take = b_nan;
      } else if (a_nan || ov == val) {
        take = oi < idx;
      } else {
        take = ov > val;
      }
    }
    val = take ? ov : val;
    idx = take ? oi : idx;
  }
};

// Online state of one (ref, edited) row pair, or of a lane's share of it.
template <typename A>
struct Online {
  A m_r, m_e, s_r, s_e, t, poison;
  bool started;
  __device__ __forceinline__ void init() {
    m_r = m_e = s_r = s_e = t = poison = static_cast<A>(0);
    started = false;
  }
  // Moves the maxima to (nm_r, nm_e) >= the current ones, rescaling the sums and t.
  __device__ __forceinline__ void rescale(A nm_r, A nm_e) {
    const A d_r = nm_r - m_r;
    const A d_e = nm_e - m_e;
    const A a_r = exp_(-d_r);
    t = a_r * (t + (d_e - d_r) * s_r);
    s_r = s_r * a_r;
    s_e = s_e * exp_(-d_e);
    m_r = nm_r;
    m_e = nm_e;
  }
  // A chunk of V classes: maxima first (NaN ignored: such rows are poisoned), then the terms.
  template <int V>
  __device__ __forceinline__ void add_chunk(const A (&zr)[V], const A (&ze)[V]) {
    A cm_r = zr[0], cm_e = ze[0];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      cm_r = zr[k] > cm_r ? zr[k] : cm_r;
      cm_e = ze[k] > cm_e ? ze[k] : cm_e;
      poison += (zr[k] - zr[k]) + (ze[k] - ze[k]);  // 0 for finite values, NaN otherwise
    }
    if (!started) {
      m_r = cm_r;
      m_e = cm_e;
      started = true;
    } else {
      rescale(cm_r > m_r ? cm_r : m_r, cm_e > m_e ? cm_e : m_e);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A d_r = zr[k] - m_r;
      const A d_e = ze[k] - m_e;
      const A w_r = exp_(d_r);
      s_r += w_r;
      s_e += exp_(d_e);
      t += w_r * (d_r - d_e);
    }
  }
  // Merge another lane's state (fixed order: the caller always merges the higher lane in).
  __device__ __forceinline__ void merge(const Online& o) {
    poison += o.poison;
    if (!o.started) return;
    if (!started) {
      m_r = o.m_r;
      m_e = o.m_e;
      s_r = o.s_r;
      s_e = o.s_e;
      t = o.t;
      started = true;
      return;
    }
    const A nm_r = o.m_r > m_r ? o.m_r : m_r;
    const A nm_e = o.m_e > m_e ? o.m_e : m_e;
    rescale(nm_r, nm_e);
    const A od_r = nm_r - o.m_r;
    const A od_e = nm_e - o.m_e;
    const A oa_r = exp_(-od_r);
    t += oa_r * (o.t + (od_e - od_r) * o.s_r);
    s_r += o.s_r * oa_r;
    s_e += o.s_e * exp_(-od_e);
  }
  __device__ __forceinline__ float kl() const {
    const A value = t / s_r + (log_(s_e) - log_(s_r));
    return poison == static_cast<A>(0) ? static_cast<float>(value) : __int_as_float(0x7fc00000);
  }
};

// ---------------------------------------------------------------------------------------------
// C <= kSmallC: thread per row. A block's ROWS consecutive rows (e * N + n) are staged in shared
// memory with coalesced loads (consecutive threads read consecutive elements), at an odd row
// stride so that the row-per-thread reads do not conflict on banks (4-byte types).

template <typename T, int ROWS>
__global__ void __launch_bounds__(ROWS)
    rows_small_kernel(const T* __restrict__ ref, const T* __restrict__ edited, int64_t R, int64_t N,
                      int C, int32_t* __restrict__ pred_ref, int32_t* __restrict__ pred,
                      float* __restrict__ kl_rows) {
  using A = typename AccType<T>::type;
  constexpr int kStride = kSmallC + 1;
  __shared__ T s_ref[ROWS * kStride];
  __shared__ T s_ed[ROWS * kStride];
  const int S = C | 1;
  const int k = static_cast<int>(threadIdx.x);
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * ROWS; r0 < R;
       r0 += static_cast<int64_t>(gridDim.x) * ROWS) {
    const int rows = static_cast<int>(R - r0 < ROWS ? R - r0 : ROWS);
    const int total = rows * C;
    const T* eb = edited + r0 * C;
    const int64_t n0 = r0 % N;
    for (int i = k; i < total; i += ROWS) {
      const int row = i / C;
      const int c = i - row * C;
      s_ed[row * S + c] = eb[i];
      const int64_t n = (n0 + row) % N;
      s_ref[row * S + c] = ref[n * C + c];
    }
    __syncthreads();
    if (k < rows) {
      const T* zr = s_ref + k * S;
      const T* ze = s_ed + k * S;
      ArgMax<A> ar, ae;
      ar.init();
      ae.init();
      Online<A> st;
      st.init();
      A mr = to_acc(zr[0]), me = to_acc(ze[0]);
      for (int c = 0; c < C; ++c) {
        const A vr = to_acc(zr[c]);
        const A ve = to_acc(ze[c]);
        ar.update(vr, c);
        ae.update(ve, c);
        mr = vr > mr ? vr : mr;
        me = ve > me ? ve : me;
        st.poison += (vr - vr) + (ve - ve);
      }
      st.m_r = mr;
      st.m_e = me;
      for (int c = 0; c < C; ++c) {
        const A d_r = to_acc(zr[c]) - mr;
        const A d_e = to_acc(ze[c]) - me;
        const A w_r = exp_(d_r);
        st.s_r += w_r;
        st.s_e += exp_(d_e);
        st.t += w_r * (d_r - d_e);
      }
      const int64_t row = r0 + k;
      pred[row] = ae.idx;
      kl_rows[row] = st.kl();
      if (row < N) pred_ref[row] = ar.idx;  // the rows of edit 0
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// C > kSmallC: warp per row; lane l takes chunks l, l + 32, ... of V classes (16-byte loads when
// VEC), then the lanes' states are merged down to lane 0 in a fixed order.

template <typename T, int V>
__device__ __forceinline__ void load_chunk(const T* p, typename AccType<T>::type (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_acc(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "a chunk is 16 bytes");
    union {
      uint4 raw;
      T v[V];
    } u;
    u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_acc(u.v[k]);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kWarpSize * kLargeRowsPerBlock)
    rows_large_kernel(const T* __restrict__ ref, const T* __restrict__ edited, int64_t R, int64_t N,
                      int64_t C, int32_t* __restrict__ pred_ref, int32_t* __restrict__ pred,
                      float* __restrict__ kl_rows) {
  using A = typename AccType<T>::type;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kLargeRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kLargeRowsPerBlock + warp; row < R;
       row += step) {  // the same row for the whole warp: the shuffles below are safe
    const T* zr = ref + (row % N) * C;
    const T* ze = edited + row * C;
    ArgMax<A> ar, ae;
    ar.init();
    ae.init();
    Online<A> st;
    st.init();
    const int64_t chunks = C / V;  // V divides C (checked by the launcher)
    for (int64_t ch = lane; ch < chunks; ch += kWarpSize) {
      A vr[V], ve[V];
      load_chunk<T, V>(zr + ch * V, vr);
      load_chunk<T, V>(ze + ch * V, ve);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int32_t i = static_cast<int32_t>(ch * V + k);
        ar.update(vr[k], i);
        ae.update(ve[k], i);
      }
      st.add_chunk<V>(vr, ve);
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      Online<A> o;
      o.m_r = __shfl_down_sync(0xffffffffu, st.m_r, offset);
      o.m_e = __shfl_down_sync(0xffffffffu, st.m_e, offset);
      o.s_r = __shfl_down_sync(0xffffffffu, st.s_r, offset);
      o.s_e = __shfl_down_sync(0xffffffffu, st.s_e, offset);
      o.t = __shfl_down_sync(0xffffffffu, st.t, offset);
      o.poison = __shfl_down_sync(0xffffffffu, st.poison, offset);
      o.started = __shfl_down_sync(0xffffffffu, static_cast<int>(st.started), offset) != 0;
      const A arv = __shfl_down_sync(0xffffffffu, ar.val, offset);
      const int32_t ari = __shfl_down_sync(0xffffffffu, ar.idx, offset);
      const A aev = __shfl_down_sync(0xffffffffu, ae.val, offset);
      const int32_t aei = __shfl_down_sync(0xffffffffu, ae.idx, offset);
      if (lane + offset < kWarpSize) {
        st.merge(o);
        ar.merge(arv, ari);
        ae.merge(aev, aei);
      }
    }
    if (lane == 0) {
      pred[row] = ae.idx;
      kl_rows[row] = st.kl();
      if (row < N) pred_ref[row] = ar.idx;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One block per edit: counts and the KL sum (double) in a fixed order, so the result is
// deterministic; errors_per_class by integer atomics (exact in any order).

__global__ void __launch_bounds__(kReduceThreads)
    reduce_kernel(const int32_t* __restrict__ pred, const int32_t* __restrict__ pred_ref,
                  const float* __restrict__ kl_rows, const int64_t* __restrict__ labels, int64_t E,
                  int64_t N, int64_t C, int64_t* __restrict__ errors, int64_t* __restrict__ flips,
                  int64_t* __restrict__ c2w, int64_t* __restrict__ w2c, float* __restrict__ kl,
                  unsigned long long* __restrict__ per_class) {
  __shared__ long long s_cnt[4][kReduceThreads];
  __shared__ double s_kl[kReduceThreads];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
    long long n_err = 0, n_flip = 0, n_c2w = 0, n_w2c = 0;
    double kl_sum = 0.0;
    const int32_t* p = pred + e * N;
    const float* k = kl_rows + e * N;
    for (int64_t n = tid; n < N; n += kReduceThreads) {
      const int64_t y = labels[n];
      const int64_t pe = p[n];
      const int64_t pr = pred_ref[n];
      const bool wrong = pe != y;
      const bool was_right = pr == y;
      n_err += wrong;
      n_flip += pe != pr;
      n_c2w += was_right && wrong;
      n_w2c += !was_right && !wrong;
      if (wrong && y >= 0 && y < C) atomicAdd(per_class + e * C + y, 1ULL);
      kl_sum += static_cast<double>(k[n]);
    }
    s_cnt[0][tid] = n_err;
    s_cnt[1][tid] = n_flip;
    s_cnt[2][tid] = n_c2w;
    s_cnt[3][tid] = n_w2c;
    s_kl[tid] = kl_sum;
    __syncthreads();
    for (int half = kReduceThreads / 2; half > 0; half /= 2) {
      if (tid < half) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s_cnt[j][tid] += s_cnt[j][tid + half];
        s_kl[tid] += s_kl[tid + half];
      }
      __syncthreads();
    }
    if (tid == 0) {
      errors[e] = s_cnt[0][0];
      flips[e] = s_cnt[1][0];
      c2w[e] = s_cnt[2][0];
      w2c[e] = s_cnt[3][0];
      kl[e] = static_cast<float>(s_kl[0] / static_cast<double>(N));  // N = 0: NaN
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_rows(const void* ref_v, const void* edited_v, int64_t R, int64_t N, int64_t C,
                        int32_t* pred_ref, int32_t* pred, float* kl_rows, cudaStream_t stream) {
  const T* ref = static_cast<const T*>(ref_v);
  const T* edited = static_cast<const T*>(edited_v);
  if (C <= kSmallC) {
    constexpr int kRows = sizeof(T) == 8 ? 64 : 128;  // 2 * kRows * 33 * sizeof(T) <= 34 KB
    int64_t blocks = (R + kRows - 1) / kRows;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    rows_small_kernel<T, kRows><<<static_cast<unsigned int>(blocks), kRows, 0, stream>>>(
        ref, edited, R, N, static_cast<int>(C), pred_ref, pred, kl_rows);
  } else {
    int64_t blocks = (R + kLargeRowsPerBlock - 1) / kLargeRowsPerBlock;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    const bool aligned = C % V == 0 && reinterpret_cast<uintptr_t>(ref) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(edited) % 16 == 0;
    const unsigned int threads = kWarpSize * kLargeRowsPerBlock;
    if (aligned) {
      rows_large_kernel<T, V><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
          ref, edited, R, N, C, pred_ref, pred, kl_rows);
    } else {
      rows_large_kernel<T, 1><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
          ref, edited, R, N, C, pred_ref, pred, kl_rows);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t edit_metrics_launch(const void* ref, const void* edited, const int64_t* labels, int64_t E,
                                int64_t N, int64_t C, DType dtype, int32_t* pred_ref, int32_t* pred,
                                float* kl_rows, int64_t* errors, int64_t* flips,
                                int64_t* correct_to_wrong, int64_t* wrong_to_correct, float* kl,
                                int64_t* errors_per_class, cudaStream_t stream) {
  if (E < 0 || N < 0 || C < 1 || C >= kNoIndex) return cudaErrorInvalidValue;
  if (E == 0) return cudaSuccess;
  cudaError_t status =
      cudaMemsetAsync(errors_per_class, 0, static_cast<size_t>(E * C) * sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  const int64_t R = E * N;
  if (R > 0) {
    status = dispatch_dtype(dtype, cudaErrorInvalidValue, [&](auto tag) {
      return launch_rows<typename decltype(tag)::type>(ref, edited, R, N, C, pred_ref, pred,
                                                       kl_rows, stream);
    });
    if (status != cudaSuccess) return status;
  }
  const int64_t blocks = E < kMaxBlocks ? E : kMaxBlocks;
  reduce_kernel<<<static_cast<unsigned int>(blocks), kReduceThreads, 0, stream>>>(
      pred, pred_ref, kl_rows, labels, E, N, C, errors, flips, correct_to_wrong, wrong_to_correct, kl,
      reinterpret_cast<unsigned long long*>(errors_per_class));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastedit
