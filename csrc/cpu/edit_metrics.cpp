// CPU kernel of fastedit::edit_metrics (schema in csrc/ops.cpp): per edit e, from the original
// logits ref [N, C], labels [N] and the edited logits [E, N, C], the errors, the prediction flips
// (both directions), the errors per true class and the mean KL(softmax(ref) || softmax(edited)),
// in one pass over the edited logits and nothing of size [E, N, C] written.
//
// Phase 1 (chunks of samples, handed out dynamically to at::parallel_for's threads): each task prepares the ref row of a sample once
// (max, argmax, z - max, exp(z - max), its sum) and then streams the E edited rows of that sample,
// so the ref row stays in L1 while the edited rows are read once each. Per edited row:
//   * argmax like torch.argmax (first maximal index, a NaN counting as the maximum);
//   * an online log-sum-exp and the KL accumulator
//       t = sum_c exp(zr_c - Mr) * ((zr_c - Mr) - (ze_c - Me)),   KL = t / sr + log se - log sr,
//     (sr, se: the sums of exp(z - M) of the ref and edited rows), whose terms are all of the
//     size of the spread of the logits, not of their offset (logits around 1e4 lose nothing).
//     Large C: blocks of kBlock classes; within a block the max is taken first (the block sits in
//     L1), then one exp per class; when a block raises the running maxima by dr and de, the sums
//     and t are rescaled once: s <- s exp(-d), t <- exp(-dr) (t + (de - dr) sr).
//     Small C (<= kSmallC): kLanes samples side by side, one per vector lane (the rows are
//     transposed into a small buffer), so that nothing needs a horizontal reduction.
//   The per-row results (prediction, KL) go to [E, N] buffers.
// Phase 2 (at::parallel_for over the E edits): counts and the KL sum of each edit in a fixed order
// (sum in double): the result does not depend on the number of threads.
//
// Identical ref and edited rows give KL = 0 exactly (the two rows run through the same arithmetic).
// A non-finite logit (NaN, +-inf) in either row makes that row's KL NaN (the ref row is checked
// once per sample; a non-finite edited logit always shows in the result, see row_edit); the
// predictions still follow torch.argmax.
//
// Vectorisation: the inner loops are fixed-width lane loops over plain arrays that GCC/Clang
// vectorise; exp and log are branch-free polynomials (csrc/cpu/fast_math.h) so that they vectorise
// too (libm's do not). at::vec::Vectorized is not used: this extension is compiled once, without
// -mavx2, where Vectorized falls back to scalar code; the row loops are instead compiled for
// AVX-512, AVX2 and baseline x86-64 (FASTEDIT_CPU_CLONES, csrc/cpu/cpu_clones.h) and the best one
// is picked at load time. No FMA contraction (see the pragma below): every clone computes
// bit-identical results.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "binding_utils.h"
#include "edit_metrics_checks.h"

// No a * b + c -> fma contraction in this file's own functions (torch's headers, included above,
// keep their settings): identical ref and edited rows must run through bit-identical arithmetic,
// which contraction breaks when the same product is kept in one place and fused in another.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
#define FASTEDIT_FP_CONTRACT_OFF 1  // what cpu/fast_math.h requires

// Included after the pragma: their functions are compiled (inlined) under it.
#include "accumulate.h"
#include "cpu/cpu_clones.h"  // FASTEDIT_CPU_CLONES, FASTEDIT_INLINE
#include "cpu/fast_math.h"   // exp_nonpos, log_ge1

namespace fastedit {
namespace {

constexpr int64_t kGrainSize = 32768;  // logits per task, as at::internal::GRAIN_SIZE
constexpr int64_t kBlock = 256;        // classes per block of the online pass (large C)
constexpr int64_t kTile = 16;           // samples per tile of the row path
constexpr int64_t kTileBytes = 256 * 1024;  // at most this much prepared ref data per tile
constexpr int64_t kLaneGroups = 4;     // groups of W samples per tile of the lanes path
constexpr int64_t kSmallC = 64;        // up to this C, samples go side by side in vector lanes

template <typename acc_t>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int W = 16;  // one AVX-512 register, two AVX2 registers
};
template <>
struct Lanes<double> {
  static constexpr int W = 8;
};

template <typename acc_t>
FASTEDIT_INLINE acc_t nan_if_not_finite(acc_t x) {  // an infinite KL only comes from a -inf logit
  return x - x == 0 ? x : std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename acc_t>
FASTEDIT_INLINE acc_t lane_sum(const acc_t* x) {  // fixed order: the same in every call
  acc_t r = x[0];
  for (int k = 1; k < Lanes<acc_t>::W; ++k) r += x[k];
  return r;
}

// torch.argmax of one row: first maximal index, the first NaN if there is one.
template <typename acc_t>
FASTEDIT_INLINE int32_t argmax_like_torch(const acc_t* z, int64_t C) {
  acc_t best = z[0];
  int64_t arg = 0;
  for (int64_t c = 1; c < C; ++c) {
    const acc_t v = z[c];
    if (best == best && (v > best || v != v)) {
      best = v;
      arg = c;
    }
  }
  return static_cast<int32_t>(arg);
}

// ---------------------------------------------------------------------------------------------
// Small C: W samples side by side; z[c * W + k] is class c of sample k.

// Lane-wise max and torch.argmax (first maximal index; a NaN wins, the first NaN).
template <typename acc_t>
FASTEDIT_INLINE void lanes_argmax(const acc_t* z, int64_t C, acc_t* M, int32_t* arg) {
  constexpr int W = Lanes<acc_t>::W;
  for (int k = 0; k < W; ++k) {
    M[k] = z[k];
    arg[k] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc_t* zc = z + c * W;
    const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
    for (int k = 0; k < W; ++k) {
      const acc_t v = zc[k];
      const bool take = (v > M[k]) | ((v != v) & (M[k] == M[k]));
      M[k] = take ? v : M[k];
      arg[k] = take ? ci : arg[k];
    }
  }
}

template <typename acc_t>
struct LaneRef {  // the ref rows of W samples, prepared once for the E edits
  std::vector<acc_t> d, w;  // [C * W]: z - max, exp(z - max)
  acc_t s[Lanes<acc_t>::W], log_s[Lanes<acc_t>::W], poison[Lanes<acc_t>::W];
  int32_t arg[Lanes<acc_t>::W];
  explicit LaneRef(int64_t C) : d(C * Lanes<acc_t>::W), w(C * Lanes<acc_t>::W) {}
};

// The sums over c run in kSplit interleaved partial sums (c mod kSplit), added pairwise at the
// end: a single running sum over up to 64 classes lost a few float32 ulp to the reference.
constexpr int kSplit = 4;

template <typename acc_t>
FASTEDIT_INLINE acc_t split_sum(const acc_t (&x)[kSplit][Lanes<acc_t>::W], int k) {
  return (x[0][k] + x[1][k]) + (x[2][k] + x[3][k]);
}

template <typename acc_t>
FASTEDIT_CPU_CLONES void lanes_ref(const acc_t* z, int64_t C, LaneRef<acc_t>& R) {
  constexpr int W = Lanes<acc_t>::W;
  acc_t M[W], s[kSplit][W] = {}, poison[W] = {};
  lanes_argmax(z, C, M, R.arg);
  acc_t* d = R.d.data();
  acc_t* w = R.w.data();
  for (int64_t c = 0; c < C; ++c) {
    acc_t* sj = s[c % kSplit];
#pragma omp simd
    for (int k = 0; k < W; ++k) {
      const acc_t v = z[c * W + k];
      const acc_t dv = v - M[k];
      const acc_t wv = exp_nonpos(dv);
      d[c * W + k] = dv;
      w[c * W + k] = wv;
      sj[k] += wv;
      poison[k] += v - v;  // +0 for finite v, NaN otherwise
    }
  }
#pragma omp simd
  for (int k = 0; k < W; ++k) {
    const acc_t total = split_sum(s, k);
    R.s[k] = total;
    R.log_s[k] = log_ge1(total);
    R.poison[k] = poison[k];
  }
}

template <typename acc_t>
FASTEDIT_CPU_CLONES void lanes_edit(const acc_t* z, int64_t C, const LaneRef<acc_t>& R,
                                    int32_t* arg, float* kl) {
  constexpr int W = Lanes<acc_t>::W;
  acc_t M[W], s[kSplit][W] = {}, t[kSplit][W] = {};
  lanes_argmax(z, C, M, arg);
  const acc_t* dr = R.d.data();
  const acc_t* wr = R.w.data();
  for (int64_t c = 0; c < C; ++c) {
    acc_t* sj = s[c % kSplit];
    acc_t* tj = t[c % kSplit];
#pragma omp simd
    for (int k = 0; k < W; ++k) {
      const acc_t dv = z[c * W + k] - M[k];
      sj[k] += exp_nonpos(dv);  // the same arithmetic as lanes_ref: identical rows give KL = 0
      tj[k] += wr[c * W + k] * (dr[c * W + k] - dv);
    }
  }
#pragma omp simd
  for (int k = 0; k < W; ++k) {
    const acc_t value = split_sum(t, k) / R.s[k] + (log_ge1(split_sum(s, k)) - R.log_s[k]) + R.poison[k];
    kl[k] = static_cast<float>(nan_if_not_finite(value));
  }
}

// ---------------------------------------------------------------------------------------------
// Large C: one row at a time, blocks of kBlock classes, online across blocks.

template <typename acc_t>
FASTEDIT_INLINE acc_t block_max(const acc_t* z, int64_t len) {  // `>` max: exact for rows without NaN
  constexpr int W = Lanes<acc_t>::W;
  acc_t m[W];
  for (int k = 0; k < W; ++k) m[k] = z[0];
  int64_t i = 0;
  for (; i + W <= len; i += W) {
#pragma omp simd
    for (int k = 0; k < W; ++k) m[k] = z[i + k] > m[k] ? z[i + k] : m[k];
  }
  for (; i < len; ++i) m[0] = z[i] > m[0] ? z[i] : m[0];
  acc_t r = m[0];
  for (int k = 1; k < W; ++k) r = m[k] > r ? m[k] : r;
  return r;
}

template <typename acc_t>
FASTEDIT_INLINE int64_t first_equal(const acc_t* z, int64_t len, acc_t value) {
  constexpr int W = Lanes<acc_t>::W;
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int k = 0; k < W; ++k) any |= (z[i + k] == value);
    if (any) break;
  }
  for (; i < len; ++i)
    if (z[i] == value) return i;
  return 0;  // only for a NaN maximum, whose row is re-scanned by argmax_like_torch
}

template <typename acc_t>
struct RowRef {  // the ref row of one sample, prepared once for the E edits
  std::vector<acc_t> d, w;                // [C]: z - M_b, exp(z - M_b), M_b = running max at block b
  std::vector<acc_t> delta, alpha, s_before;  // per block b >= 1: M_b - M_{b-1}, exp(-delta), sum before
  acc_t s = 0, log_s = 0, poison = 0;
  int32_t arg = 0;
  explicit RowRef(int64_t C)
      : d(C), w(C), delta((C + kBlock - 1) / kBlock), alpha(delta.size()), s_before(delta.size()) {}
};

template <typename acc_t>
FASTEDIT_CPU_CLONES void row_ref(const acc_t* z, int64_t C, RowRef<acc_t>& R) {
  constexpr int W = Lanes<acc_t>::W;
  acc_t M = 0, s = 0, poison = 0;
  int64_t arg = 0;
  for (int64_t b0 = 0, b = 0; b0 < C; b0 += kBlock, ++b) {
    const int64_t len = std::min(kBlock, C - b0);
    const acc_t* zb = z + b0;
    const acc_t bm = block_max(zb, len);
    if (b == 0 || bm > M) arg = b0 + first_equal(zb, len, bm);
    if (b == 0) {
      M = bm;
    } else {
      const acc_t newM = bm > M ? bm : M;
      const acc_t delta = newM - M;
      const acc_t alpha = exp_nonpos(-delta);
      R.delta[b] = delta;
      R.alpha[b] = alpha;
      R.s_before[b] = s;
      s = s * alpha;
      M = newM;
    }
    acc_t sl[W] = {}, pl[W] = {};
    acc_t* db = R.d.data() + b0;
    acc_t* wb = R.w.data() + b0;
    int64_t i = 0;
    for (; i + W <= len; i += W) {
#pragma omp simd
      for (int k = 0; k < W; ++k) {
        const acc_t v = zb[i + k];
        const acc_t dv = v - M;
        const acc_t wv = exp_nonpos(dv);
        db[i + k] = dv;
        wb[i + k] = wv;
        sl[k] += wv;
        pl[k] += v - v;
      }
    }
    for (int k = 0; i < len; ++i, ++k) {
      const acc_t v = zb[i];
      const acc_t dv = v - M;
      const acc_t wv = exp_nonpos(dv);
      db[i] = dv;
      wb[i] = wv;
      sl[k] += wv;
      pl[k] += v - v;
    }
    s += lane_sum(sl);
    poison += lane_sum(pl);
  }
  R.s = s;
  R.log_s = log_ge1(s);
  R.poison = poison;
  R.arg = poison == 0 ? static_cast<int32_t>(arg) : argmax_like_torch(z, C);
}

template <typename acc_t>
FASTEDIT_CPU_CLONES void row_edit(const acc_t* z, int64_t C, const RowRef<acc_t>& R, int32_t* arg_out,
                                  float* kl_out) {
  constexpr int W = Lanes<acc_t>::W;
  acc_t M = 0, s = 0, t = 0;
  int64_t arg = 0;
  for (int64_t b0 = 0, b = 0; b0 < C; b0 += kBlock, ++b) {
    const int64_t len = std::min(kBlock, C - b0);
    const acc_t* zb = z + b0;
    const acc_t bm = block_max(zb, len);
    if (b == 0 || bm > M) arg = b0 + first_equal(zb, len, bm);
    if (b == 0) {
      M = bm;
    } else {
      // the same rescaling as row_ref (identical rows stay bit-identical), and t's terms
      // (zr - Mr) - (ze - Me) move by de - dr
      const acc_t newM = bm > M ? bm : M;
      const acc_t delta = newM - M;
      t = R.alpha[b] * (t + (delta - R.delta[b]) * R.s_before[b]);
      s = s * exp_nonpos(-delta);
      M = newM;
    }
    acc_t sl[W] = {}, tl[W] = {};
    const acc_t* db = R.d.data() + b0;
    const acc_t* wb = R.w.data() + b0;
    int64_t i = 0;
    for (; i + W <= len; i += W) {
#pragma omp simd
      for (int k = 0; k < W; ++k) {
        const acc_t v = zb[i + k];
        const acc_t dv = v - M;
        sl[k] += exp_nonpos(dv);
        tl[k] += wb[i + k] * (db[i + k] - dv);
      }
    }
    for (int k = 0; i < len; ++i, ++k) {
      const acc_t dv = zb[i] - M;
      sl[k] += exp_nonpos(dv);
      tl[k] += wb[i] * (db[i] - dv);
    }
    s += lane_sum(sl);
    t += lane_sum(tl);
  }
  const acc_t value = t / R.s + (log_ge1(s) - R.log_s) + R.poison;
  // A non-finite edited logit always reaches t as NaN or inf (a NaN or +inf makes z - M NaN,
  // a -inf makes d_ref - (z - M) infinite); only then can the block maxima have missed
  // torch.argmax's NaN rule, so only then is the row re-scanned.
  const bool finite = value - value == 0;
  *arg_out = finite ? static_cast<int32_t>(arg) : argmax_like_torch(z, C);
  *kl_out = static_cast<float>(finite ? value : std::numeric_limits<acc_t>::quiet_NaN());
}

// ---------------------------------------------------------------------------------------------
// Tasks of phase 1: samples [n0, n1), all E edits.

struct Outputs {
  int32_t* pred_ref;  // [N]
  int32_t* pred;      // [E, N]
  float* kl_rows;     // [E, N]
};

template <typename scalar_t, typename acc_t>
const acc_t* as_acc_row(const scalar_t* row, int64_t C, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t c = 0; c < C; ++c) buffer[c] = static_cast<acc_t>(row[c]);
    return buffer.data();
  }
}

template <typename scalar_t>
void rows_task(const scalar_t* ref, const scalar_t* edited, int64_t E, int64_t N, int64_t C,
               int64_t n0, int64_t n1, const Outputs& out) {
  using acc_t = acc_type_t<scalar_t>;
  // kTile samples at a time: their ref rows are prepared first, then each edit's kTile edited
  // rows are read as one contiguous stretch (rather than E scattered rows of C values, which the
  // hardware prefetchers follow badly: at C = 1000, N = 10,000 this halved the time per logit).
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(kTile, kTileBytes / (C * 2 * sizeof(acc_t))));
  std::vector<RowRef<acc_t>> R;
  R.reserve(tile);
  for (int64_t j = 0; j < tile; ++j) R.emplace_back(C);
  std::vector<acc_t> ref_buf(std::is_same_v<scalar_t, acc_t> ? 0 : C);
  std::vector<acc_t> edit_buf(ref_buf.size());
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t count = std::min(tile, n1 - t0);
    for (int64_t j = 0; j < count; ++j) {
      row_ref(as_acc_row(ref + (t0 + j) * C, C, ref_buf), C, R[j]);
      out.pred_ref[t0 + j] = R[j].arg;
    }
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < count; ++j) {
        const int64_t row = e * N + t0 + j;
        row_edit(as_acc_row(edited + row * C, C, edit_buf), C, R[j], out.pred + row, out.kl_rows + row);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
FASTEDIT_CPU_CLONES void transpose_rows(const scalar_t* rows, int64_t count, int64_t C, acc_t* out) {
  constexpr int W = Lanes<acc_t>::W;
  if (count == W) {  // full group: fixed trip count, vectorised as gathers
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int k = 0; k < W; ++k) out[c * W + k] = static_cast<acc_t>(rows[k * C + c]);
    return;
  }
  for (int64_t k = 0; k < count; ++k)
    for (int64_t c = 0; c < C; ++c) out[c * W + k] = static_cast<acc_t>(rows[k * C + c]);
  for (int64_t k = count; k < W; ++k)  // padding lanes: any finite values, results dropped
    for (int64_t c = 0; c < C; ++c) out[c * W + k] = acc_t(0);
}

template <typename scalar_t>
void lanes_task(const scalar_t* ref, const scalar_t* edited, int64_t E, int64_t N, int64_t C,
                int64_t n0, int64_t n1, const Outputs& out) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int W = Lanes<acc_t>::W;
  // kLaneGroups groups of W samples at a time, so each edit's rows are read in stretches of
  // kLaneGroups * W rows (as the tiles of rows_task)
  std::vector<LaneRef<acc_t>> R;
  R.reserve(kLaneGroups);
  for (int64_t j = 0; j < kLaneGroups; ++j) R.emplace_back(C);
  std::vector<acc_t> z(C * W);
  int32_t arg[W];
  float kl[W];
  for (int64_t t0 = n0; t0 < n1; t0 += kLaneGroups * W) {
    const int64_t t1 = std::min(n1, t0 + kLaneGroups * W);
    for (int64_t g = t0, j = 0; g < t1; g += W, ++j) {
      const int64_t count = std::min<int64_t>(W, t1 - g);
      transpose_rows(ref + g * C, count, C, z.data());
      lanes_ref(z.data(), C, R[j]);
      for (int64_t k = 0; k < count; ++k) out.pred_ref[g + k] = R[j].arg[k];
    }
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t g = t0, j = 0; g < t1; g += W, ++j) {
        const int64_t count = std::min<int64_t>(W, t1 - g);
        const int64_t row = e * N + g;
        transpose_rows(edited + row * C, count, C, z.data());
        lanes_edit(z.data(), C, R[j], arg, kl);
        for (int64_t k = 0; k < count; ++k) {
          out.pred[row + k] = arg[k];
          out.kl_rows[row + k] = kl[k];
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
edit_metrics_cpu(const at::Tensor& ref_in, const at::Tensor& labels_in, const at::Tensor& edited_in,
                 bool return_kl_rows) {
  check_edit_metrics_inputs(ref_in, labels_in, edited_in, c10::DeviceType::CPU, "CPU");
  const at::Tensor ref = ref_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor edited = edited_in.contiguous();
  const int64_t E = edited.size(0);
  const int64_t N = ref.size(0);
  const int64_t C = ref.size(1);

  // Every label is checked before any work (no out-of-bounds counts, no partial results).
  check_class_indices(labels, C, "fastedit::edit_metrics", "labels", "label");
  const int64_t* y = labels.const_data_ptr<int64_t>();

  const auto long_opts = ref.options().dtype(at::kLong);
  const auto float_opts = ref.options().dtype(at::kFloat);
  at::Tensor errors = at::empty({E}, long_opts);
  at::Tensor flips = at::empty({E}, long_opts);
  at::Tensor c2w = at::empty({E}, long_opts);
  at::Tensor w2c = at::empty({E}, long_opts);
  at::Tensor kl = at::empty({E}, float_opts);
  at::Tensor errors_per_class = at::zeros({E, C}, long_opts);
  at::Tensor kl_rows = at::empty({E, N}, float_opts);
  at::Tensor pred_ref = at::empty({N}, ref.options().dtype(at::kInt));
  at::Tensor pred = at::empty({E, N}, ref.options().dtype(at::kInt));
  const Outputs out{pred_ref.mutable_data_ptr<int32_t>(), pred.mutable_data_ptr<int32_t>(),
                    kl_rows.mutable_data_ptr<float>()};

  if (N > 0) {
    FASTEDIT_DISPATCH_KERNEL_DTYPES(ref.scalar_type(), "fastedit::edit_metrics (CPU)", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const scalar_t* ref_ptr = ref.const_data_ptr<scalar_t>();
      const scalar_t* edited_ptr = edited.const_data_ptr<scalar_t>();
      const bool lanes = C <= kSmallC;
      const int64_t unit = lanes ? Lanes<acc_t>::W * kLaneGroups : kTile;  // samples per unit
      const int64_t units = (N + unit - 1) / unit;
      const int64_t grain = std::max<int64_t>(1, kGrainSize / (C * (E + 1) * unit));
      const int64_t chunks = (units + grain - 1) / grain;
      // Dynamic scheduling: each thread takes the next chunk of `grain` units until none is
      // left (at::parallel_for's static halves leave one thread idle while another is
      // descheduled on a shared machine). Results do not depend on who computes which row.
      std::atomic<int64_t> next{0};
      const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        for (int64_t chunk = next.fetch_add(1); chunk < chunks; chunk = next.fetch_add(1)) {
          const int64_t n0 = chunk * grain * unit;
          const int64_t n1 = std::min(N, (chunk + 1) * grain * unit);
          if (lanes) {
            lanes_task(ref_ptr, edited_ptr, E, N, C, n0, n1, out);
          } else {
            rows_task(ref_ptr, edited_ptr, E, N, C, n0, n1, out);
          }
        }
      });
    });
  }

  // Phase 2: per edit, in a fixed order.
  int64_t* errors_ptr = errors.mutable_data_ptr<int64_t>();
  int64_t* flips_ptr = flips.mutable_data_ptr<int64_t>();
  int64_t* c2w_ptr = c2w.mutable_data_ptr<int64_t>();
  int64_t* w2c_ptr = w2c.mutable_data_ptr<int64_t>();
  float* kl_ptr = kl.mutable_data_ptr<float>();
  int64_t* epc_ptr = errors_per_class.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(N, 1));
  at::parallel_for(0, E, grain, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int32_t* p = out.pred + e * N;
      const float* k = out.kl_rows + e * N;
      int64_t* epc = epc_ptr + e * C;
      int64_t n_err = 0, n_flip = 0, n_c2w = 0, n_w2c = 0;
      double kl_sum = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t pr = out.pred_ref[n];
        const bool wrong = p[n] != y[n];
        const bool was_right = pr == y[n];
        n_err += wrong;
        n_flip += p[n] != pr;
        n_c2w += was_right & wrong;
        n_w2c += !was_right & !wrong;
        epc[y[n]] += wrong;
        kl_sum += k[n];
      }
      errors_ptr[e] = n_err;
      flips_ptr[e] = n_flip;
      c2w_ptr[e] = n_c2w;
      w2c_ptr[e] = n_w2c;
      // N = 0: 0 / 0 = NaN, the mean of nothing (as torch.mean)
      kl_ptr[e] = static_cast<float>(kl_sum / static_cast<double>(N));
    }
  });
  if (!return_kl_rows) kl_rows = at::empty({E, 0}, float_opts);
  return {errors, flips, c2w, w2c, kl, errors_per_class, kl_rows};
}

// ---------------------------------------------------------------------------------------------
// Test hook of csrc/cpu/fast_math.h, for tests/ops/test_fast_math.py only (not part of fastedit's
// API, hence its own op namespace): torch.ops.fastedit_testing.exp_nonpos(x) and .log_ge1(s) apply
// the functions elementwise to a float32/float64 CPU tensor. They are compiled here, in the
// kernel's translation unit, under its pragma and with its clones and vectorised loops, so that
// the test measures the code the kernel runs on this CPU.

template <typename T, bool LOG>
FASTEDIT_CPU_CLONES void fast_math_rows(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = LOG ? log_ge1(x[i]) : exp_nonpos(x[i]);
}

template <bool LOG>
at::Tensor fast_math_cpu(const at::Tensor& x_in) {
  const char* name = LOG ? "fastedit_testing::log_ge1" : "fastedit_testing::exp_nonpos";
  TORCH_CHECK(x_in.device().is_cpu(), name, ": a CPU tensor is needed, got one on ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, name,
              ": float32 or float64 is needed, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    fast_math_rows<float, LOG>(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), n);
  } else {
    fast_math_rows<double, LOG>(x.const_data_ptr<double>(), y.mutable_data_ptr<double>(), n);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CPU, m) {
  m.impl("edit_metrics", &edit_metrics_cpu);
}

TORCH_LIBRARY(fastedit_testing, m) {
  m.def("exp_nonpos(Tensor x) -> Tensor");
  m.def("log_ge1(Tensor s) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastedit_testing, CPU, m) {
  m.impl("exp_nonpos", &fast_math_cpu<false>);
  m.impl("log_ge1", &fast_math_cpu<true>);
}

}  // namespace fastedit
