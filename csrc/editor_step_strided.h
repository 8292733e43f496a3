// Any strides for fastedit::editor_step_, shared by the CPU kernel and the CUDA binding.
//
// The kernels walk flat, contiguous rows. A call whose tensors are all contiguous (the usual case)
// runs the kernel on them directly: no copy, no extra pass. Otherwise each non-contiguous tensor
// (a channels_last convolution weight, a transposed view, a strided slice) gets a contiguous
// stand-in (Tensor::contiguous(): a copy for that tensor only; contiguous ones are used as they
// are), the kernel runs on the stand-ins, and the results are written back into the original
// tensors, which therefore keep their strides, memory format and storage (a view stays a view of
// its base). Write-back:
//   dense:  original.copy_(stand-in), every coordinate;
//   masked: only the coordinates inside the mask are written (outside it not even the same bits
//           are stored), without host synchronisation (no masked_select, whose size is data
//           dependent): the stand-in's selected values are packed by the mask's prefix sum into a
//           buffer of numel + 1 (every unselected value goes to the spare last slot), and
//           masked_scatter_ stores the k-th packed value at the k-th selected coordinate.
// Gradients, masks, active and inv_norm are only read: their stand-ins are never written back.
// Everything is checked (csrc/editor_step_checks.h) before this runs; the stand-ins are fresh
// tensors, so nothing the caller owns is written before the kernel has finished its work.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

namespace fastedit {

inline bool editor_step_all_contiguous(at::TensorList list) {
  for (const at::Tensor& x : list) {
    if (!x.is_contiguous()) return false;
  }
  return true;
}

inline std::vector<at::Tensor> editor_step_contiguous(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const at::Tensor& x : list) out.push_back(x.contiguous());  // itself when contiguous
  return out;
}

// original[j] = staged[j] for the coordinates j of `mask` (broadcast to the original's shape from
// the shape without the edit dimension when it is shared by the edits); nothing else is written.
inline void editor_step_write_back_masked(const at::Tensor& original, const at::Tensor& staged,
                                          const at::Tensor& mask) {
  const at::Tensor m = mask.expand(original.sizes());
  const int64_t n = staged.numel();
  if (n == 0) return;
  const at::Tensor flat_mask = m.reshape({-1});  // logical (row-major) order, as `staged`
  const at::Tensor dest = at::where(flat_mask, flat_mask.cumsum(0) - 1, at::Scalar(n));
  at::Tensor packed = at::empty({n + 1}, staged.options());
  packed.scatter_(0, dest, staged.reshape({-1}));
  original.masked_scatter_(m, packed);
}

inline void editor_step_write_back(at::TensorList originals, const std::vector<at::Tensor>& staged,
                                   at::TensorList masks) {
  for (size_t i = 0; i < originals.size(); ++i) {
    if (staged[i].is_same(originals[i])) continue;  // contiguous: the kernel wrote it directly
    at::Tensor original = originals[i];
    if (masks.empty()) {
      original.copy_(staged[i]);
    } else {
      editor_step_write_back_masked(original, staged[i], masks[i]);
    }
  }
}

// Runs kernel(params, grads, slot1, slot2, t, active, inv_norm, masks) on contiguous tensors (see
// the top of this file). The kernel's signature:
//   void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::Tensor&,
//        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::TensorList)
template <typename Kernel>
void editor_step_on_contiguous(at::TensorList params, at::TensorList grads, at::TensorList slot1,
                               at::TensorList slot2, at::Tensor& t,
                               const std::optional<at::Tensor>& active,
                               const std::optional<at::Tensor>& inv_norm, at::TensorList masks,
                               Kernel&& kernel) {
  const bool contiguous =
      editor_step_all_contiguous(params) && editor_step_all_contiguous(grads) &&
      editor_step_all_contiguous(slot1) && editor_step_all_contiguous(slot2) &&
      editor_step_all_contiguous(masks) && t.is_contiguous() &&
      (!active.has_value() || active->is_contiguous()) &&
      (!inv_norm.has_value() || inv_norm->is_contiguous());
  if (contiguous) {  // the fast path: the kernel on the caller's tensors
    kernel(params, grads, slot1, slot2, t, active, inv_norm, masks);
    return;
  }
  const std::vector<at::Tensor> p = editor_step_contiguous(params);
  const std::vector<at::Tensor> g = editor_step_contiguous(grads);
  const std::vector<at::Tensor> s1 = editor_step_contiguous(slot1);
  const std::vector<at::Tensor> s2 = editor_step_contiguous(slot2);
  const std::vector<at::Tensor> m = editor_step_contiguous(masks);
  at::Tensor t_c = t.contiguous();
  const std::optional<at::Tensor> a_c =
      active.has_value() ? std::optional<at::Tensor>(active->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> inv_c =
      inv_norm.has_value() ? std::optional<at::Tensor>(inv_norm->contiguous()) : std::nullopt;
  kernel(p, g, s1, s2, t_c, a_c, inv_c, m);
  // the masks were checked to be bool tensors of the parameter's shape (or without the edit dim)
  editor_step_write_back(params, p, m);
  editor_step_write_back(slot1, s1, m);
  editor_step_write_back(slot2, s2, m);
  if (!t_c.is_same(t)) t.copy_(t_c);
}

}  // namespace fastedit
