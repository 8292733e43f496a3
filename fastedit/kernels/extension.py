"""Safe, lazy access to the compiled extension ``fastedit._C``.

fastedit works without the extension (pure-Python installs, ``FASTEDIT_SKIP_EXTENSION=1`` builds,
broken builds): nothing here imports ``fastedit._C`` until :func:`load` is called, and a failure is
kept as a sentence that :func:`unavailable_reason` returns instead of raising.

Importing ``fastedit._C`` registers its tensor ops with the dispatcher, as
``torch.ops.fastedit.<name>``; this module adds their Python parts (fake kernels for
``torch.compile``/meta tensors, autograd formulas). ``csrc/ops.cpp`` names this module with
``set_python_module``, so torch imports it whenever those parts are needed.

Runtime switch: ``FASTEDIT_NO_EXTENSION=1`` (or ``FASTEDIT_SKIP_EXTENSION=1``) makes :func:`load`
return None without importing the extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "load",
    "unavailable_reason",
    "build_info",
    "has_cpu_ops",
    "has_cuda_ops",
    "edit_constraint",
    "edit_metrics",
    "DISABLE_ENV_VARS",
]

#: Environment variables that disable the extension at run time when set to 1/true/yes/on.
DISABLE_ENV_VARS = ("FASTEDIT_NO_EXTENSION", "FASTEDIT_SKIP_EXTENSION")

_OPS = ("edit_constraint", "editor_step_", "edit_metrics")

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_reason: str | None = None
_python_parts_registered = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.fastedit, name).default
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_load() -> tuple[ModuleType | None, str | None]:
    for var in DISABLE_ENV_VARS:
        if _env_flag(var):
            return None, f"disabled at run time by {var}={os.environ[var]}"
    try:
        spec = importlib.util.find_spec("fastedit._C")
    except (ImportError, ValueError) as error:
        spec, find_error = None, error
    else:
        find_error = None
    if spec is None:
        detail = f" ({find_error})" if find_error else ""
        return None, (
            "fastedit._C is not built: the package was installed without its extension "
            "(FASTEDIT_SKIP_EXTENSION=1, or a source tree that was never compiled)"
            f"{detail}; build it with `pip install --no-build-isolation -e .`")
    try:
        module = importlib.import_module("fastedit._C")
    except Exception as error:  # ImportError, OSError (missing libraries), undefined symbols, ...
        return None, (
            f"importing fastedit._C failed ({type(error).__name__}: {error}); it was probably "
            f"built against another torch than the installed {torch.__version__}: rebuild it")
    missing = [name for name in _OPS if not _op_exists(name)]
    if missing:
        return None, (f"fastedit._C was imported but did not register torch.ops.fastedit."
                      f"{', '.join(missing)}")
    _register_python_parts()
    return module, None


def load() -> ModuleType | None:
    """Import ``fastedit._C`` once; return the module, or None when it is unavailable."""
    global _loaded, _module, _reason
    if not _loaded:
        with _lock:
            if not _loaded:
                _module, _reason = _try_load()
                _loaded = True
    return _module


def unavailable_reason() -> str | None:
    """None when the extension is usable, else a sentence saying why not."""
    load()
    return _reason


def build_info() -> dict[str, Any]:
    """How ``fastedit._C`` was built (see csrc/module.cpp), or {} without the extension."""
    module = load()
    return dict(module.build_info()) if module is not None else {}


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastedit::{op}", dispatch_key))
    except RuntimeError:
        return False


def has_cpu_ops() -> bool:
    """True when the extension is loaded and its ops have CPU kernels."""
    return load() is not None and all(_has_kernel(op, "CPU") for op in _OPS)


def has_cuda_ops() -> bool:
    """True when the extension was built with its CUDA sources and their kernels are registered.

    This says nothing about whether a GPU is present (see torch.cuda.is_available()).
    """
    return (load() is not None and bool(build_info().get("with_cuda"))
            and all(_has_kernel(op, "CUDA") for op in _OPS))


def edit_constraint(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``out[b] = max_i logits[b, i] - logits[b, target[b]]`` via ``torch.ops.fastedit.edit_constraint``.

    logits ``[B, C]`` (float32/float64/float16/bfloat16), target ``[B]`` int64 in ``[0, C)``;
    returns ``[B]`` in the dtype of logits (half types accumulate in float32). ``out <= 0`` iff
    ``target`` is an argmax of its row; a NaN in a row gives NaN. Differentiable with respect to
    logits (ties of the maximum share the gradient equally, like ``torch.amax``), also under
    ``torch.func`` transforms (grad, vmap, grad of grad) and ``torch.compile``: the op is wrapped
    in an autograd.Function with a vmap rule, which is what those need (see DESIGN.md §3).
    Raises RuntimeError when the extension is unavailable (see :func:`unavailable_reason`).
    """
    if load() is None:
        raise RuntimeError(f"fastedit._C is unavailable: {_reason}")
    return _EditConstraint.apply(logits, target)


# --------------------------------------------------------------------------------------------
# Python parts of the ops: registered once, when the ops exist (they are defined by fastedit._C).


def _edit_constraint_fake(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    torch._check(logits.dim() == 2, lambda: f"fastedit::edit_constraint: logits must be 2-D [B, C], got {logits.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"fastedit::edit_constraint: target must be 1-D [B], got {target.dim()}-D")
    torch._check(
        logits.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        lambda: f"fastedit::edit_constraint: logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    torch._check(target.dtype == torch.int64,
                 lambda: f"fastedit::edit_constraint: target must be int64 (torch.long), got {target.dtype}")
    torch._check(target.shape[0] == logits.shape[0],
                 lambda: f"fastedit::edit_constraint: shape mismatch: logits {tuple(logits.shape)}, "
                         f"target {tuple(target.shape)}")
    torch._check(logits.shape[1] >= 1, lambda: "fastedit::edit_constraint: logits must have C >= 1")
    return logits.new_empty(logits.shape[:1])


def _edit_constraint_grad(logits: torch.Tensor, target: torch.Tensor,
                          grad_out: torch.Tensor) -> torch.Tensor:
    # d out[b] / d logits[b, i] = [i is a maximum] / (number of maxima) - [i == target[b]]
    # (the subgradient torch.amax uses); differentiable torch ops only, so double backward and
    # torch.func transforms work through it.
    is_max = (logits == logits.amax(dim=1, keepdim=True)).to(grad_out.dtype)
    share = is_max / is_max.sum(dim=1, keepdim=True)
    return (share * grad_out[:, None]).scatter_add(
        1, target[:, None], -grad_out[:, None]).to(logits.dtype)


def _edit_constraint_setup_context(ctx, inputs, output) -> None:
    logits, target = inputs
    ctx.save_for_backward(logits, target)


def _edit_constraint_backward(ctx, grad_out: torch.Tensor):
    logits, target = ctx.saved_tensors
    grad_logits = _edit_constraint_grad(logits, target, grad_out) if ctx.needs_input_grad[0] else None
    return grad_logits, None


def _edit_constraint_vmap(info, in_dims, logits: torch.Tensor, target: torch.Tensor):
    # One call of the op on [N * B, C] instead of torch's per-sample fallback loop.
    n = info.batch_size
    logits_dim, target_dim = in_dims
    logits = logits.movedim(logits_dim, 0) if logits_dim is not None else logits.expand(n, *logits.shape)
    target = target.movedim(target_dim, 0) if target_dim is not None else target.expand(n, *target.shape)
    if logits.dim() != 3 or target.dim() != 2:
        raise RuntimeError(
            "fastedit::edit_constraint: logits must be 2-D [B, C] and target 1-D [B] per sample, "
            f"got shapes {tuple(logits.shape[1:])} and {tuple(target.shape[1:])}")
    b, c = logits.shape[1], logits.shape[2]
    out = torch.ops.fastedit.edit_constraint(logits.reshape(n * b, c), target.reshape(n * target.shape[1]))
    return out.reshape(n, b), 0


class _EditConstraint(torch.autograd.Function):
    """torch.ops.fastedit.edit_constraint for torch.func: the op's own autograd registration
    (torch.library.register_autograd) works in eager autograd and torch.compile but not under
    torch.func.grad; an autograd.Function with setup_context and a generated vmap rule does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.ops.fastedit.edit_constraint(logits, target)

    setup_context = staticmethod(_edit_constraint_setup_context)
    backward = staticmethod(_edit_constraint_backward)


def _editor_step_fake(params, grads, slot1, slot2, t, active, inv_norm, masks, rule, lr, beta1, beta2,
                      eps, batched, names=None) -> None:
    # In place, no outputs: nothing to allocate. The checks that need no data (lengths, dtypes)
    # run here too, so torch.compile rejects what the kernels would reject.
    torch._check(len(grads) == len(params),
                 lambda: f"fastedit::editor_step_: {len(params)} parameter tensors but {len(grads)} gradients")
    torch._check(0 <= rule < 6, lambda: f"fastedit::editor_step_: unknown rule id {rule}")
    # All tensors on t's device: a CPU/meta mix would otherwise dispatch here (Meta) and do nothing.
    tensors = [*params, *grads, *slot1, *slot2, *masks, *(x for x in (active, inv_norm) if x is not None)]
    for x in tensors:
        torch._check(x.device == t.device, lambda: f"fastedit::editor_step_: a tensor is on {x.device}, "
                                                   f"t on {t.device}: all tensors must be on one device")
    torch._check(names is None or len(names) == len(params),
                 lambda: f"fastedit::editor_step_: {len(names)} names for {len(params)} parameter tensors")
    for i, (p, g) in enumerate(zip(params, grads)):
        what = f"parameter {names[i]!r}" if names is not None else f"parameter {i}"
        torch._check(g.dtype == p.dtype and g.shape == p.shape,
                     lambda: f"fastedit::editor_step_: the gradient of {what} does not match the parameter "
                             f"({g.dtype} {tuple(g.shape)} vs {p.dtype} {tuple(p.shape)})")
    return None


def edit_metrics(ref_logits: torch.Tensor, labels: torch.Tensor, edited_logits: torch.Tensor,
                 return_kl_rows: bool = False) -> tuple[torch.Tensor, ...]:
    """``torch.ops.fastedit.edit_metrics``: the 7-tuple ``(errors, flips, correct_to_wrong,
    wrong_to_correct, kl, errors_per_class, kl_rows)``; see :func:`fastedit.kernels.metrics.edit_metrics`
    for the contract. Raises RuntimeError when the extension is unavailable."""
    if load() is None:
        raise RuntimeError(f"fastedit._C is unavailable: {_reason}")
    return torch.ops.fastedit.edit_metrics(ref_logits, labels, edited_logits, return_kl_rows)


def _edit_metrics_fake(ref_logits: torch.Tensor, labels: torch.Tensor, edited_logits: torch.Tensor,
                       return_kl_rows: bool):
    name = "fastedit::edit_metrics"
    torch._check(ref_logits.dim() == 2, lambda: f"{name}: ref_logits must be 2-D [N, C], got {ref_logits.dim()}-D")
    torch._check(labels.dim() == 1, lambda: f"{name}: labels must be 1-D [N], got {labels.dim()}-D")
    torch._check(edited_logits.dim() == 3,
                 lambda: f"{name}: edited_logits must be 3-D [E, N, C], got {edited_logits.dim()}-D")
    torch._check(ref_logits.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"{name}: ref_logits must be float32, float64, float16 or bfloat16, got {ref_logits.dtype}")
    torch._check(edited_logits.dtype == ref_logits.dtype,
                 lambda: f"{name}: edited_logits must have the dtype of ref_logits ({ref_logits.dtype}), "
                         f"got {edited_logits.dtype}")
    torch._check(labels.dtype == torch.int64, lambda: f"{name}: labels must be int64 (torch.long), got {labels.dtype}")
    n, c = ref_logits.shape
    e = edited_logits.shape[0]
    torch._check(labels.shape[0] == n and edited_logits.shape[1] == n and edited_logits.shape[2] == c,
                 lambda: f"{name}: shape mismatch: ref_logits {tuple(ref_logits.shape)} [N, C], labels "
                         f"{tuple(labels.shape)} [N], edited_logits {tuple(edited_logits.shape)} [E, N, C]")
    torch._check(c >= 1, lambda: f"{name}: logits must have at least one class (C >= 1)")
    counts = [edited_logits.new_empty((e,), dtype=torch.int64) for _ in range(4)]
    kl = edited_logits.new_empty((e,), dtype=torch.float32)
    per_class = edited_logits.new_empty((e, c), dtype=torch.int64)
    kl_rows = edited_logits.new_empty((e, n if return_kl_rows else 0), dtype=torch.float32)
    return (*counts, kl, per_class, kl_rows)


def _edit_metrics_setup_context(ctx, inputs, output) -> None:
    pass


def _edit_metrics_backward(ctx, *grads):
    raise RuntimeError("fastedit::edit_metrics is not differentiable (counts, argmax-based flips and a "
                       "reporting KL); compute a differentiable KL with torch.log_softmax instead")


def _register_python_parts() -> None:
    global _python_parts_registered
    if _python_parts_registered or not _op_exists("edit_constraint"):
        return
    if _op_exists("editor_step_"):
        torch.library.register_fake("fastedit::editor_step_", _editor_step_fake)
    if _op_exists("edit_metrics"):
        torch.library.register_fake("fastedit::edit_metrics", _edit_metrics_fake)
        # Not differentiable: an autograd kernel whose backward says so (rather than torch's
        # generic "no autograd kernel" warning, or silently zero gradients).
        torch.library.register_autograd("fastedit::edit_metrics", _edit_metrics_backward,
                                        setup_context=_edit_metrics_setup_context)
    torch.library.register_fake("fastedit::edit_constraint", _edit_constraint_fake)
    torch.library.register_autograd("fastedit::edit_constraint", _edit_constraint_backward,
                                    setup_context=_edit_constraint_setup_context)
    if hasattr(torch.library, "register_vmap"):
        torch.library.register_vmap("fastedit::edit_constraint", _edit_constraint_vmap)
    _python_parts_registered = True


# fastedit._C calls _register_python_parts() when it is imported (also directly, without load());
# if it was imported before this module, register now.
_register_python_parts()
