// Input checks of fastedit::editor_step_ shared by the CPU kernel and the CUDA binding, so both
// devices reject the same inputs with the same messages. Everything is checked before anything is
// written: a rejected call leaves every tensor untouched.
//
// Tensors may have any strides (channels_last weights, transposed views, strided slices): the
// kernels run on contiguous stand-ins of the non-contiguous ones (csrc/editor_step_strided.h).
// Only tensors that are written (parameters, state, t) must not overlap themselves (a stride-0
// dimension of size > 1, as made by expand()), since one memory location would receive several
// results.
//
// Messages name each tensor by its parameter: by the caller's name when the op is given `names`
// (one per parameter, e.g. "layer3.0.conv1.weight"), else by its position in the list.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <optional>
#include <string>
#include <vector>

#include "binding_utils.h"  // is_kernel_dtype
#include "editor_step_math.h"

namespace fastedit {

// The geometry of a call once it has been checked.
struct EditorStepGeometry {
  int64_t edits = 1;             // E (1 when not batched)
  std::vector<int64_t> row;      // per tensor: elements per edit (numel / E)
  std::vector<int64_t> mask_edit_stride;  // per tensor: 0 (mask shared by the edits) or row
  bool fp64 = false;             // compute (and state) dtype float64, else float32
};

using EditorStepNames = std::optional<c10::List<std::string>>;

// "parameter 'fc.weight'" with names, "parameter 3" without.
inline std::string editor_step_param_label(const EditorStepNames& names, size_t i) {
  if (names.has_value() && i < names->size()) {
    return "parameter '" + static_cast<std::string>(names->get(i)) + "'";
  }
  return "parameter " + std::to_string(i);
}

// True when `x` has a stride-0 dimension of size > 1 (ATen's MemOverlap::Yes): an in-place write
// would store several results in one location.
inline bool editor_step_overlaps_itself(const at::Tensor& x) {
  return at::has_internal_overlap(x) == at::MemOverlap::Yes;
}

inline EditorStepGeometry check_editor_step_inputs(
    const at::TensorList params, const at::TensorList grads, const at::TensorList slot1,
    const at::TensorList slot2, const at::Tensor& t, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& inv_norm, const at::TensorList masks, int64_t rule,
    bool batched, c10::DeviceType device, const char* backend, const EditorStepNames& names) {
  const char* op = "fastedit::editor_step_";
  TORCH_CHECK(rule >= 0 && rule < step::kNumRules, op, ": unknown rule id ", rule,
              " (0 GD, 1 ScaledGD, 2 sign, 3 RMSProp, 4 Momentum, 5 Adam)");
  const size_t n = params.size();
  TORCH_CHECK(!names.has_value() || names->size() == n, op, ": ",
              names.has_value() ? names->size() : 0, " names for ", n,
              " parameter tensors (give one name per parameter, or none)");
  TORCH_CHECK(grads.size() == n, op, ": ", n, " parameter tensors but ", grads.size(),
              " gradients");
  const size_t want1 = step::num_slot1(static_cast<int>(rule)) ? n : 0;
  const size_t want2 = step::num_slot2(static_cast<int>(rule)) ? n : 0;
  TORCH_CHECK(slot1.size() == want1 && slot2.size() == want2, op, ": rule ", rule, " needs ",
              want1, " + ", want2, " state tensors for ", n, " parameters, got ", slot1.size(),
              " + ", slot2.size());
  TORCH_CHECK(masks.empty() || masks.size() == n, op, ": ", masks.size(), " masks for ", n,
              " parameter tensors (give none or one per parameter)");

  EditorStepGeometry geo;
  TORCH_CHECK(t.device().type() == device, op, " (", backend, "): t must be a ", backend,
              " tensor, got a tensor on ", t.device());
  const c10::Device dev = t.device();
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the step count t must be float32 or float64, got ", t.scalar_type());
  geo.fp64 = t.scalar_type() == at::kDouble;
  const at::ScalarType state_dtype = t.scalar_type();
  if (batched) {
    TORCH_CHECK(t.dim() == 1, op, ": batched=True needs t of shape [E], got shape ", t.sizes());
    geo.edits = t.size(0);
  } else {
    TORCH_CHECK(t.dim() == 0, op, ": t must be 0-dim for a single edit, got shape ", t.sizes());
  }
  TORCH_CHECK(!editor_step_overlaps_itself(t), op,
              ": the step count t overlaps itself in memory (a stride-0 dimension, e.g. from "
              "expand()); it is written in place: pass t.clone()");
  if (active.has_value()) {
    const at::Tensor& a = *active;
    TORCH_CHECK(a.device() == dev, op, ": active is on ", a.device(), ", t on ", dev);
    TORCH_CHECK(a.scalar_type() == at::kBool, op, ": active must be a bool tensor, got ",
                a.scalar_type());
    TORCH_CHECK(a.sizes() == t.sizes(), op, ": active must have the shape of t ", t.sizes(),
                ", got ", a.sizes());
  }
  if (rule == step::kScaledGD) {
    TORCH_CHECK(inv_norm.has_value(), op, ": rule ScaledGD needs inv_norm");
    const at::Tensor& s = *inv_norm;
    TORCH_CHECK(s.device() == dev && s.scalar_type() == state_dtype && s.sizes() == t.sizes(),
                op, ": inv_norm must be a ", state_dtype, " tensor of shape ", t.sizes(), " on ",
                dev, ", got ", s.scalar_type(), " ", s.sizes(), " on ", s.device());
  }

  geo.row.resize(n);
  geo.mask_edit_stride.assign(n, 0);
  for (const auto i : c10::irange(n)) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const std::string what = editor_step_param_label(names, i);
    TORCH_CHECK(p.device() == dev && g.device() == dev, op, ": ", what, " (", p.device(),
                ") and its gradient (", g.device(), ") must be on the device of t (", dev, ")");
    const auto dt = p.scalar_type();
    TORCH_CHECK(is_kernel_dtype(dt), op, ": ", what,
                " must be float32, float64, float16 or bfloat16, got ", dt);
    TORCH_CHECK((dt == at::kDouble) == geo.fp64, op, ": ", what, " is ", dt, " but t is ",
                state_dtype,
                " (state is float64 for float64 parameters, float32 for the others; the fused "
                "kernel does not mix them)");
    TORCH_CHECK(g.scalar_type() == dt, op, ": the gradient of ", what, " is ", g.scalar_type(),
                " but the parameter is ", dt);
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": ", what, " has shape ", p.sizes(),
                " but its gradient ", g.sizes());
    TORCH_CHECK(!editor_step_overlaps_itself(p), op, ": ", what,
                " overlaps itself in memory (a stride-0 dimension, e.g. from expand()); the step "
                "is written in place: pass a .clone() of it");
    if (batched) {
      TORCH_CHECK(p.dim() >= 1 && p.size(0) == geo.edits, op, ": batched=True: ", what,
                  " of shape ", p.sizes(), " must have the leading edit dimension ", geo.edits);
      geo.row[i] = geo.edits == 0 ? 0 : p.numel() / geo.edits;
    } else {
      geo.row[i] = p.numel();
    }
    for (const at::TensorList* slots : {&slot1, &slot2}) {
      if (slots->empty()) continue;
      const at::Tensor& s = (*slots)[i];
      TORCH_CHECK(s.device() == dev && s.scalar_type() == state_dtype && s.sizes() == p.sizes(),
                  op, ": the state of ", what, " must be a ", state_dtype, " tensor of shape ",
                  p.sizes(), " on ", dev, ", got ", s.scalar_type(), " ", s.sizes(), " on ",
                  s.device(), " (create it with Editor.init_state)");
      TORCH_CHECK(!s.is_same(p) && !(p.numel() > 0 && s.data_ptr() == p.data_ptr()), op,
                  ": the state of ", what, " aliases the parameter");
      TORCH_CHECK(!editor_step_overlaps_itself(s), op, ": the state of ", what,
                  " overlaps itself in memory (a stride-0 dimension, e.g. from expand()); it is "
                  "written in place (create it with Editor.init_state)");
    }
    if (!masks.empty()) {
      const at::Tensor& m = masks[i];
      TORCH_CHECK(m.device() == dev && m.scalar_type() == at::kBool, op, ": the mask of ", what,
                  " must be a bool tensor on ", dev, ", got ", m.scalar_type(), " on ",
                  m.device());
      const bool full = m.sizes() == p.sizes();
      const bool shared = batched && p.dim() >= 1 && m.sizes() == p.sizes().slice(1);
      TORCH_CHECK(full || shared, op, ": the mask of ", what, " must have the shape of the "
                  "parameter ", p.sizes(), batched ? " (or that shape without the edit dimension)" : "",
                  ", got ", m.sizes());
      geo.mask_edit_stride[i] = (full && batched) ? geo.row[i] : 0;
    }
  }
  return geo;
}

}  // namespace fastedit
