// Operator schemas of the `fastedit` namespace. Kernels are registered per device elsewhere:
// csrc/cpu/*.cpp (CPU, every build) and csrc/cuda/*_binding.cpp (CUDA, CUDA builds only).
//
// The ops are reached as torch.ops.fastedit.<name> once fastedit._C is imported. Their Python
// parts (fake/meta kernels, autograd) live in fastedit/kernels/extension.py; set_python_module
// tells torch to import that module whenever it needs them, even if only fastedit._C was imported.

#include <torch/library.h>

TORCH_LIBRARY(fastedit, m) {
  m.set_python_module("fastedit.kernels.extension");

  // The edit constraint l_e of DESIGN.md §1 on logits z:
  //   out[b] = max_i z[b, i] - z[b, target[b]]      (<= 0 iff target[b] is an argmax of row b)
  // logits [B, C] float32/float64/float16/bfloat16, target [B] int64; out [B], dtype of logits;
  // half types accumulate in float. A NaN anywhere in a row gives NaN for that row.
  m.def("edit_constraint(Tensor logits, Tensor target) -> Tensor");

  // Per-edit metrics of edited predictions against the original model (DESIGN.md §1, evaluation):
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
