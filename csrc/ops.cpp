// Operator schemas of the `fastedit` namespace. Kernels are registered per device elsewhere:
// csrc/cpu/*.cpp (CPU, every build) and csrc/cuda/*_binding.cpp (CUDA, CUDA builds only).
//
// The ops are reached as torch.ops.fastedit.<name> once fastedit._C is imported. Their Python
// parts (fake/meta kernels, autograd) live next to each op in fastedit/ops/<op>.py, registered by
// the package fastedit.ops; set_python_module tells torch to import that package whenever it needs
// them, even if only fastedit._C was imported.

#include <torch/library.h>

TORCH_LIBRARY(fastedit, m) {
  m.set_python_module("fastedit.ops");

  // The edit constraint l_e of docs/design.md on logits z:
  //   out[b] = max_i z[b, i] - z[b, target[b]]      (<= 0 iff target[b] is an argmax of row b)
  // logits [B, C] float32/float64/float16/bfloat16, target [B] int64; out [B], dtype of logits;
  // half types accumulate in float. A NaN anywhere in a row gives NaN for that row.
  m.def("edit_constraint(Tensor logits, Tensor target) -> Tensor");

  // One step of an editor of fastedit/editors.py over all editable parameters, in place
  // (fastedit/ops/editor_step.py documents the contract; csrc/editor_step_math.h the math).
  //   params[i], grads[i]: same shape and dtype (float32/float16/bfloat16 with float32 state and
  //     t, or float64 with float64 state and t), any strides (non-contiguous tensors are stepped
  //     through contiguous stand-ins and written back: they keep their strides and storage);
  //     batched: leading edit dim E. Written tensors (params, state, t) must not overlap
  //     themselves (no stride-0 dimension of size > 1).
  //   slot1/slot2: the rule's state tensors (RMSProp: square_avg; Momentum: velocity; Adam:
  //     exp_avg, exp_avg_sq; others: empty lists), shape of the parameter.
  //   t: step count, [E] (batched) or 0-dim; updated to t + active.
  //   active: optional bool, shape of t; inactive edits leave params and state bit-identical.
  //   inv_norm: Scaled GD's per-edit 1 / max(||g||, eps) (shape of t), None for other rules.
  //   masks: empty, or one bool mask per parameter (its shape, or without the edit dim when
  //     batched): coordinates outside the mask are never read or written.
  //   rule: 0 GD, 1 ScaledGD, 2 sign (RProp), 3 RMSProp, 4 Momentum, 5 Adam;
  //   beta1 = RMSProp beta | momentum | Adam beta1, beta2 = Adam beta2, eps = RMSProp/Adam eps.
  //   names: optional, one name per parameter (e.g. "layer3.0.conv1.weight"): error messages
  //     then name the parameter instead of giving its position in the list.
  m.def(
      "editor_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] slot1, Tensor(c!)[] slot2, "
      "Tensor(d!) t, Tensor? active, Tensor? inv_norm, Tensor[] masks, int rule, float lr, "
      "float beta1, float beta2, float eps, bool batched, str[]? names=None) -> ()");

  // Per-edit metrics of edited predictions against the original model (docs/design.md):
  // ref_logits [N, C], labels [N] int64 in [0, C), edited_logits [E, N, C] (float32/float64/
  // float16/bfloat16, one dtype for both logits). Returns, per edit e:
  //   errors [E], flips [E], correct_to_wrong [E], wrong_to_correct [E]   (int64)
  //   kl [E] float32: mean over N of KL(softmax(ref_n) || softmax(edited_e,n))
  //   errors_per_class [E, C] int64: errors counted by true label
  //   kl_rows [E, N] float32 (the per-sample KL) when return_kl_rows, else [E, 0]
  // Predictions are torch.argmax's (first maximal index, NaN counts as the maximum); a
  // non-finite logit in a ref or edited row makes that sample's KL NaN. Not differentiable.
  m.def("edit_metrics(Tensor ref_logits, Tensor labels, Tensor edited_logits, bool return_kl_rows) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
