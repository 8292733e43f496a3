// CPU kernel of fastedit::editor_step_ (schema in csrc/ops.cpp, math in csrc/editor_step_math.h):
// one editor step over all parameter tensors, in place, reading g, theta and the state once and
// writing theta and the state once.
//
// Work is cut into items of at most kChunk elements of one (tensor, edit) row and the items are
// spread over threads with one at::parallel_for (the multi-tensor "apex" pattern: one parallel
// region for all tensors). Inactive edits are skipped inside the loop (the active mask is read
// here, never on the host of the caller); their parameters and state are not even read.
//
// Vectorisation: the inner loops are plain loops over one row that GCC/Clang vectorise; on
// x86-64 Linux with GCC they are compiled for AVX-512, AVX2 and baseline x86-64
// (FASTEDIT_CPU_CLONES, csrc/cpu/cpu_clones.h) and the best clone is picked at load time. The
// parameter dtypes are loaded and stored through the storage codecs of csrc/accumulate.h
// (float16/bfloat16 as raw bits, with vectorisable conversions). at::vec::Vectorized<float> is not
// used: it is only SIMD when the whole file is compiled with CPU_CAPABILITY_AVX2/AVX512 and the
// matching -m flags (ATen compiles such files once per capability), which the shared build flags
// of setup.py/CMakeLists.txt do not do; without them it is a scalar array.
//
// Floating point, set for this file only, before any header: no contraction into FMAs (the results
// are then bit-identical to the PyTorch reference, fastedit/editors.py, which evaluates every
// operation separately), and no trapping math (FP exception flags are not used; without it GCC
// will not if-convert the float16 conversions and those loops stay scalar). Neither changes a
// result. sqrt vectorises because the build passes -fno-math-errno (GCC ignores that
// flag in pragmas; see setup.py).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#include "accumulate.h"        // CodecF32, CodecF64, CodecF16, CodecBF16
#include "cpu/cpu_clones.h"     // FASTEDIT_CPU_CLONES
#include "editor_step_checks.h"
#include "editor_step_math.h"
#include "editor_step_strided.h"

namespace fastedit {
namespace {

using step::Coef;
using step::EditCoef;

constexpr int64_t kChunk = 16384;     // elements per work item (64 KiB of fp32 parameters)
constexpr int64_t kGrainElems = 65536;  // below this many elements in total: one thread

// Dense row: every coordinate of [0, n).
template <int RULE, typename Codec, typename C, typename P = typename Codec::T>
FASTEDIT_CPU_CLONES void step_dense(P* __restrict__ p, const P* __restrict__ g,
                                   C* __restrict__ s1, C* __restrict__ s2, int64_t n,
                                   Coef<C> k, EditCoef<C> e) {
  constexpr bool has1 = step::num_slot1(RULE) != 0;
  constexpr bool has2 = step::num_slot2(RULE) != 0;
  for (int64_t j = 0; j < n; ++j) {
    C a = has1 ? s1[j] : C(0);
    C b = has2 ? s2[j] : C(0);
    const C d = step::rule_delta<RULE, C>(Codec::load(g[j]), a, b, k, e);
    if constexpr (has1) s1[j] = a;
    if constexpr (has2) s2[j] = b;
    p[j] = Codec::store(step::op_sub(Codec::load(p[j]), d));
  }
}

// Masked row: only coordinates with mask[j] are read or written (sparse surgery masks are mostly
// false, so a branch per coordinate beats computing everything and blending).
template <int RULE, typename Codec, typename C, typename P = typename Codec::T>
void step_masked(P* __restrict__ p, const P* __restrict__ g, C* __restrict__ s1,
                 C* __restrict__ s2, const bool* __restrict__ mask, int64_t n, Coef<C> k,
                 EditCoef<C> e) {
  constexpr bool has1 = step::num_slot1(RULE) != 0;
  constexpr bool has2 = step::num_slot2(RULE) != 0;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    C a = has1 ? s1[j] : C(0);
    C b = has2 ? s2[j] : C(0);
    const C d = step::rule_delta<RULE, C>(Codec::load(g[j]), a, b, k, e);
    if constexpr (has1) s1[j] = a;
    if constexpr (has2) s2[j] = b;
    p[j] = Codec::store(step::op_sub(Codec::load(p[j]), d));
  }
}

struct Item {
  int64_t tensor, edit, begin, end;
};

template <typename C>
Coef<C> make_coef(double lr, double beta1, double beta2, double eps) {
  // Python floats enter torch ops rounded to the tensor's dtype; 1 - beta is computed in double
  // first, as Python does in the reference.
  return Coef<C>{static_cast<C>(lr),          static_cast<C>(beta1), static_cast<C>(1.0 - beta1),
                 static_cast<C>(beta2),       static_cast<C>(1.0 - beta2), static_cast<C>(eps)};
}

template <typename C>
EditCoef<C> make_edit_coef(C t_old, C scale, const Coef<C>& k) {
  const C t_new = t_old + C(1);
  EditCoef<C> e;
  e.scale = scale;
  e.first = t_new == C(1);
  e.bc1 = C(1) - std::pow(k.b1, t_new);
  e.bc2 = C(1) - std::pow(k.b2, t_new);
  return e;
}

// Raw pointers of one call, per tensor (resolved once, not per work item).
struct Pointers {
  std::vector<void*> p, s1, s2;
  std::vector<const void*> g;
  std::vector<const bool*> mask;
  std::vector<at::ScalarType> dtype;
};

template <int RULE, typename Codec, typename C>
void run_item(const Item& it, const Pointers& ptr, const EditorStepGeometry& geo,
              const EditCoef<C>& e, const Coef<C>& k) {
  using P = typename Codec::T;
  constexpr bool has1 = step::num_slot1(RULE) != 0;
  constexpr bool has2 = step::num_slot2(RULE) != 0;
  const auto i = static_cast<size_t>(it.tensor);
  const int64_t off = it.edit * geo.row[i] + it.begin;
  const int64_t len = it.end - it.begin;
  P* p = static_cast<P*>(ptr.p[i]) + off;
  const P* g = static_cast<const P*>(ptr.g[i]) + off;
  C* s1 = has1 ? static_cast<C*>(ptr.s1[i]) + off : nullptr;
  C* s2 = has2 ? static_cast<C*>(ptr.s2[i]) + off : nullptr;
  if (ptr.mask.empty()) {
    step_dense<RULE, Codec, C>(p, g, s1, s2, len, k, e);
  } else {
    const bool* m = ptr.mask[i] + it.edit * geo.mask_edit_stride[i] + it.begin;
    step_masked<RULE, Codec, C>(p, g, s1, s2, m, len, k, e);
  }
}

template <int RULE, typename C>
void run_items(const std::vector<Item>& items, int64_t begin, int64_t end, const Pointers& ptr,
               const EditorStepGeometry& geo, const std::vector<EditCoef<C>>& ecoef,
               const Coef<C>& k) {
  for (int64_t w = begin; w < end; ++w) {
    const Item& it = items[w];
    const EditCoef<C>& e = ecoef[it.edit];
    if constexpr (std::is_same_v<C, double>) {
      run_item<RULE, CodecF64, C>(it, ptr, geo, e, k);
    } else {
      switch (ptr.dtype[it.tensor]) {  // float32, float16 and bfloat16 parameters may be mixed
        case at::kHalf: run_item<RULE, CodecF16, C>(it, ptr, geo, e, k); break;
        case at::kBFloat16: run_item<RULE, CodecBF16, C>(it, ptr, geo, e, k); break;
        default: run_item<RULE, CodecF32, C>(it, ptr, geo, e, k); break;
      }
    }
  }
}

template <typename C>
void editor_step_typed(const at::TensorList params, const at::TensorList grads,
                       const at::TensorList slot1, const at::TensorList slot2, at::Tensor& t,
                       const std::optional<at::Tensor>& active,
                       const std::optional<at::Tensor>& inv_norm, const at::TensorList masks,
                       int64_t rule, const Coef<C>& k, const EditorStepGeometry& geo) {
  const int64_t E = geo.edits;
  C* t_ptr = t.data_ptr<C>();
  const bool* act = active.has_value() ? active->const_data_ptr<bool>() : nullptr;
  const C* inv = inv_norm.has_value() ? inv_norm->const_data_ptr<C>() : nullptr;

  std::vector<EditCoef<C>> ecoef(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) ecoef[e] = make_edit_coef<C>(t_ptr[e], inv ? inv[e] : C(1), k);

  std::vector<Item> items;
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = geo.row[i];
    for (int64_t e = 0; e < E; ++e) {
      if (act != nullptr && !act[e]) continue;  // nothing to do for a satisfied edit
      for (int64_t b = 0; b < n; b += kChunk) {
        items.push_back(Item{static_cast<int64_t>(i), e, b, std::min(n, b + kChunk)});
      }
      total += n;
    }
  }

  if (!items.empty()) {
    const int64_t grain = total < kGrainElems ? static_cast<int64_t>(items.size())
                                              : std::max<int64_t>(1, kGrainElems / kChunk);
    const auto n_items = static_cast<int64_t>(items.size());
    Pointers ptr;
    for (size_t i = 0; i < params.size(); ++i) {
      ptr.p.push_back(params[i].data_ptr());
      ptr.g.push_back(grads[i].const_data_ptr());
      ptr.s1.push_back(slot1.empty() ? nullptr : slot1[i].data_ptr());
      ptr.s2.push_back(slot2.empty() ? nullptr : slot2[i].data_ptr());
      if (!masks.empty()) ptr.mask.push_back(masks[i].const_data_ptr<bool>());
      ptr.dtype.push_back(params[i].scalar_type());
    }
    auto with_dtype = [&](auto rule_tag) {
      constexpr int R = decltype(rule_tag)::value;
      at::parallel_for(0, n_items, grain, [&](int64_t b, int64_t e) {
        run_items<R, C>(items, b, e, ptr, geo, ecoef, k);
      });
    };
    switch (rule) {
      case step::kGD: with_dtype(std::integral_constant<int, step::kGD>{}); break;
      case step::kScaledGD: with_dtype(std::integral_constant<int, step::kScaledGD>{}); break;
      case step::kSign: with_dtype(std::integral_constant<int, step::kSign>{}); break;
      case step::kRMSProp: with_dtype(std::integral_constant<int, step::kRMSProp>{}); break;
      case step::kMomentum: with_dtype(std::integral_constant<int, step::kMomentum>{}); break;
      case step::kAdam: with_dtype(std::integral_constant<int, step::kAdam>{}); break;
    }
  }

  // The step count advances last (the pass above read it): t <- t + active.
  for (int64_t e = 0; e < E; ++e) t_ptr[e] = t_ptr[e] + ((act == nullptr || act[e]) ? C(1) : C(0));
}

void editor_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList slot1,
                     at::TensorList slot2, at::Tensor t, const std::optional<at::Tensor>& active,
                     const std::optional<at::Tensor>& inv_norm, at::TensorList masks,
                     int64_t rule, double lr, double beta1, double beta2, double eps,
                     bool batched, const EditorStepNames& names) {
  const EditorStepGeometry geo =
      check_editor_step_inputs(params, grads, slot1, slot2, t, active, inv_norm, masks, rule,
                               batched, c10::DeviceType::CPU, "CPU", names);
  // Any strides: contiguous tensors are stepped in place, others through contiguous stand-ins
  // written back afterwards (csrc/editor_step_strided.h).
  editor_step_on_contiguous(
      params, grads, slot1, slot2, t, active, inv_norm, masks,
      [&](at::TensorList p, at::TensorList g, at::TensorList s1, at::TensorList s2, at::Tensor& tc,
          const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& inv,
          at::TensorList m) {
        if (geo.fp64) {
          editor_step_typed<double>(p, g, s1, s2, tc, a, inv, m, rule,
                                    make_coef<double>(lr, beta1, beta2, eps), geo);
        } else {
          editor_step_typed<float>(p, g, s1, s2, tc, a, inv, m, rule,
                                   make_coef<float>(lr, beta1, beta2, eps), geo);
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastedit, CPU, m) {
  m.impl("editor_step_", &editor_step_cpu);
}

}  // namespace fastedit
