// CPU kernel of fastedit::edit_constraint (schema in csrc/ops.cpp):
//   out[b] = max_i logits[b, i] - logits[b, target[b]]
// Rows are split across threads with at::parallel_for (OpenMP backend when the extension is
// compiled with -fopenmp, as setup.py and CMakeLists.txt do); each row is one pass over C values
// with kLanes independent running maxima so that the compiler vectorises the scan. On x86-64 Linux
// with GCC the row loop is compiled for AVX-512, AVX2 and baseline x86-64 (FASTEDIT_CPU_CLONES,
// csrc/cpu/cpu_clones.h) and the best one for the running CPU is picked at load time: the build
// needs no -march flag.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "accumulate.h"
#include "binding_utils.h"
#include "cpu/cpu_clones.h"
#include "edit_constraint_checks.h"

namespace fastedit {
namespace {

constexpr int64_t kLanes = 32;  // several vector registers of running maxima (AVX2: 4)
constexpr int64_t kGrainSize = 32768;  // logits per task, as at::internal::GRAIN_SIZE

template <typename scalar_t>
FASTEDIT_CPU_CLONES void edit_constraint_rows(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                          scalar_t* __restrict__ out, int64_t begin, int64_t end, int64_t C) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* row = logits + b * C;
    // `v > m ? v : m` keeps m when v is NaN; NaNs are tracked separately in `nan` and win at
    // the end, so a NaN anywhere in the row gives NaN (like torch.max / torch.amax).
    acc_t m[kLanes];
    int nan = 0;
    for (int64_t k = 0; k < kLanes; ++k) m[k] = static_cast<acc_t>(row[0]);
    int64_t i = 0;
    for (; i + kLanes <= C; i += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const acc_t v = static_cast<acc_t>(row[i + k]);
        nan |= (v != v);
        m[k] = v > m[k] ? v : m[k];
      }
    }
    for (; i < C; ++i) {
      const acc_t v = static_cast<acc_t>(row[i]);
      nan |= (v != v);
      m[0] = v > m[0] ? v : m[0];
    }
    acc_t best = m[0];
    for (int64_t k = 1; k < kLanes; ++k) best = m[k] > best ? m[k] : best;
    const acc_t result = nan ? std::numeric_limits<acc_t>::quiet_NaN()
                             : best - static_cast<acc_t>(row[target[b]]);
    out[b] = static_cast<scalar_t>(result);
  }
}

at::Tensor edit_constraint_cpu(const at::Tensor& logits_in, const at::Tensor& target_in) {
  check_edit_constraint_inputs(logits_in, target_in, c10::DeviceType::CPU, "CPU");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);

  // Validate every target before touching any logits (no out-of-bounds reads, no partial work).
  check_class_indices(target, C, "fastedit::edit_constraint", "target", "target");
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();

  at::Tensor out = at::empty({B}, logits.options());
  if (B == 0) return out;

  // Rows per task: about kGrainSize logits, at least one row.
  const int64_t grain = std::max<int64_t>(1, kGrainSize / C);
  FASTEDIT_DISPATCH_KERNEL_DTYPES(logits.scalar_type(), "fastedit::edit_constraint (CPU)", [&] {
    const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      edit_constraint_rows<scalar_t>(logits_ptr, target_ptr, out_ptr, begin, end, C);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CPU, m) {
  m.impl("edit_constraint", &edit_constraint_cpu);
}

}  // namespace fastedit
