"""fastedit's kernel ops, each dispatched to the best usable backend (CUDA → Triton → C++ CPU →
PyTorch reference; ``FASTEDIT_BACKEND`` forces one, :func:`fastedit.backends` says which can run).

- :func:`editor_step_`: one fused, in-place step of any editor over all editable parameters (tensor
  list or flat buffer, optional edit dimension with a per-edit active mask, optional sparse mask).
- :func:`editor_step`: the same step, functional and differentiable (closed-form backward, works
  under ``torch.func.grad``/``vmap``), for Editable Training's unrolled meta-gradient.
- :func:`edit_metrics`: per-edit errors, flips and mean KL of edited logits against the original
  model's, in one pass per row.
- :func:`edit_constraint`: the edit constraint ``max_i z_i − z_y`` per row.
"""
from .kernels.differentiable import editor_step
from .kernels.dispatch import edit_constraint
from .kernels.editor_step import editor_step_
from .kernels.metrics import edit_metrics

__all__ = ["editor_step_", "editor_step", "edit_metrics", "edit_constraint"]
