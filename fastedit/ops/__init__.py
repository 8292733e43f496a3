"""fastedit's kernel ops: one semantics per op, several backends behind one dispatcher.

The ops (each in its own file, ``fastedit/ops/<op>.py``, named as its C++/CUDA sources
``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.*`` and its tests ``tests/test_<op>.py``):

- :func:`editor_step_` (``editor_step.py``): one fused, in-place step of any editor over all
  editable parameters (tensor list or flat buffer, any strides, optional edit dimension with a
  per-edit active mask, optional sparse mask). Its oracle is :meth:`fastedit.editors.Editor.step`.
- :func:`editor_step` (``editor_step.py``): the same step, functional and differentiable
  (closed-form backward, works under ``torch.func.grad``/``vmap``), for Editable Training's
  unrolled meta-gradient. Plain PyTorch: no backend choice.
- :func:`edit_metrics` (``edit_metrics.py``): per-edit errors, flips and mean KL of edited logits
  against the original model's, in one pass per row.
- :func:`edit_constraint` (``edit_constraint.py``): the edit constraint ``max_i z_i − z_y`` per row
  of ``[B, C]`` logits (the building block of :class:`fastedit.Classification`).

Each op's file holds its contract (the docstring), its Python-side checks, its pure-PyTorch
reference and the Python parts of its compiled op (fake kernel, autograd); the Triton kernels are
in ``triton/``. Backends, in priority order: CUDA extension → Triton → C++ CPU extension →
PyTorch reference (:mod:`fastedit.ops.dispatch`). :func:`backends` says which can run here, and
why not. To force one:

- per call: ``ops.edit_metrics(ref, labels, edited, backend="reference")`` (also on
  :func:`editor_step_` and :func:`edit_constraint`);
- for a block of code, every op inside it (also those run by ``fe.edit``, ``fe.evaluate``, ...):
  ``with ops.use_backend("cpu"): ...``;
- for the process: ``FASTEDIT_BACKEND=reference|cpu|triton|cuda``.

The per-call keyword wins over :func:`use_backend`, which wins over the environment variable; a
forced backend that cannot serve raises :class:`BackendError` (never a quiet fallback). Op names
and the editor rule ids live in one table, :mod:`fastedit.ops._table`; loading the compiled
extension ``fastedit._C`` is :mod:`fastedit.ops._extension`'s job.

The functions shadow their modules' names as attributes of this package (``fastedit.ops.edit_metrics``
is the function); reach a module with ``importlib.import_module("fastedit.ops.edit_metrics")`` or
``from fastedit.ops.edit_metrics import ...``.
"""
from __future__ import annotations

import importlib

import torch

from . import _extension
from ._table import OPS, SCHEMA
from .dispatch import BACKEND_ORDER, BackendError, backends, use_backend
from .edit_constraint import edit_constraint
from .edit_metrics import edit_metrics
from .editor_step import editor_step, editor_step_

__all__ = ["editor_step_", "editor_step", "edit_metrics", "edit_constraint", "backends", "use_backend",
           "BackendError", "BACKEND_ORDER"]

_registered: set[str] = set()


def _register_python_parts() -> None:
    """Register the Python parts of every compiled op that exists (``PYTHON_PARTS`` of its module:
    fake kernel, autograd formula, vmap rule); idempotent, nothing while fastedit._C is not imported.

    The registration runs here, not in the op modules, because torch checks that a C++ op's fake
    kernel is registered from the module its library names with ``set_python_module``
    (csrc/ops.cpp: ``fastedit.ops``). Called by fastedit._C when it is imported (csrc/module.cpp), by
    :func:`fastedit.ops._extension.load`, and below, in case fastedit._C was imported first.
    """
    for op in OPS:
        schema = SCHEMA[op]
        if schema in _registered or not _extension.op_exists(schema):
            continue
        parts = importlib.import_module(f"{__name__}.{op}").PYTHON_PARTS
        qualname = f"fastedit::{schema}"
        torch.library.register_fake(qualname, parts["fake"])
        if "autograd" in parts:
            backward, setup_context = parts["autograd"]
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        if "vmap" in parts and hasattr(torch.library, "register_vmap"):
            torch.library.register_vmap(qualname, parts["vmap"])
        _registered.add(schema)


_register_python_parts()
