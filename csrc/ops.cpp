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
}
