"""The one Python table of fastedit's kernel ops and of the editor rules the fused step knows.

Every Python user (the dispatcher, the op modules, the extension loader, the Triton kernel) reads
these names and numbers from here; tests/packaging/test_extension.py checks them against what the compiled
extension says about itself (``fastedit._C.build_info()["ops"]`` and ``["rules"]``, written in
csrc/module.cpp from the schemas of csrc/ops.cpp and the ``step::Rule`` enum of
csrc/editor_step_math.h).
"""
from __future__ import annotations

__all__ = ["OPS", "SCHEMA", "BACKEND_OPS", "RULE_IDS"]

#: The op names, one per op: ``fastedit/ops/<op>.py``, ``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.*``,
#: ``tests/test_<op>.py``. This is also the name the dispatcher is asked about
#: (``choose_backend("editor_step", device)``).
OPS: tuple[str, ...] = ("edit_constraint", "editor_step", "edit_metrics")

#: The name of each op in ``torch.ops.fastedit`` (the in-place step carries PyTorch's trailing ``_``).
SCHEMA: dict[str, str] = {"edit_constraint": "edit_constraint", "editor_step": "editor_step_",
                          "edit_metrics": "edit_metrics"}

#: The ops each backend implements in this version (Triton has no edit_constraint kernel: the
#: compiled op or the reference serves it).
BACKEND_OPS: dict[str, tuple[str, ...]] = {
    "cuda": OPS,
    "triton": ("editor_step", "edit_metrics"),
    "cpu": OPS,
    "reference": OPS,
}

#: The ``rule`` argument of ``torch.ops.fastedit.editor_step_``, keyed by the editor's ``name``
#: (:attr:`fastedit.editors.Editor.name`): GD, Scaled GD, sign (RProp/SignGD), RMSProp, Momentum,
#: Adam. The C++ side numbers them ``step::kGD`` … ``step::kAdam``.
RULE_IDS: dict[str, int] = {"gd": 0, "scaled_gd": 1, "rprop": 2, "rmsprop": 3, "momentum": 4, "adam": 5}
