"""Fused, in-place editor step: ``editor_step_`` (one pass over all editable parameters).

Backends (``fastedit.kernels.dispatch.choose_backend("editor_step", device)``): the CUDA extension
(``csrc/cuda/editor_step.cu``), Triton (``fastedit/kernels/triton/editor_step.py``, on GPUs when the
CUDA extension is absent; one launch per parameter dtype over the whole tensor list), the C++ CPU kernel (``csrc/cpu/editor_step.cpp``) and the reference, which
runs :meth:`fastedit.editors.Editor.step` and copies its results in place.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..editors import GD, RMSProp, Adam, Editor, Momentum, RProp, ScaledGD, _compute_dtype, _safe_sqrt

__all__ = ["editor_step_", "RULES", "rule_id"]

#: Rule ids of ``torch.ops.fastedit.editor_step_`` (csrc/editor_step_math.h has the same table).
RULES: dict[type, int] = {GD: 0, ScaledGD: 1, RProp: 2, RMSProp: 3, Momentum: 4, Adam: 5}


def rule_id(editor: Editor) -> int | None:
    """The fused kernels' id of ``editor``'s rule, or None when only the reference can run it
    (a user-defined subclass, whose ``_rule`` the kernels do not know)."""
    return RULES.get(type(editor))


def _kernel_hparams(editor: Editor) -> tuple[float, float, float, float] | None:
    """``(lr, beta1, beta2, eps)`` as Python floats, or None when a hyper-parameter is a tensor
    (learnable, in Editable Training): those run on the reference path, which reads tensors on the
    device; the kernels take floats."""
    h = editor.hparams()
    values = [h["lr"]]
    if isinstance(editor, RMSProp):
        values += [h["beta"], 0.0, h["eps"]]
    elif isinstance(editor, Momentum):
        values += [h["momentum"], 0.0, 0.0]
    elif isinstance(editor, Adam):
        values += [h["betas"][0], h["betas"][1], h["eps"]]
    elif isinstance(editor, ScaledGD):
        values += [0.0, 0.0, h["eps"]]
    else:
        values += [0.0, 0.0, 0.0]
    if any(isinstance(v, Tensor) for v in values):
        return None
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@torch.compiler.assume_constant_result
def _backend_for(device_type: str) -> str:
    """The dispatcher's choice, taken as a constant by torch.compile (it reads the environment and
    the extension's build description, which dynamo cannot trace)."""
    from .dispatch import choose_backend  # late: dispatch imports this module's siblings
    return choose_backend("editor_step", torch.device(device_type))


def _as_list(x, name: str) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    try:
        out = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(x).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(v).__name__}")
    return out


def _check(editor, params, grads, state, active, batched, masks) -> None:
    """Everything the kernels need, checked before anything is written (same rules on every
    backend, so a call that works on one machine works on all)."""
    if not isinstance(editor, Editor):
        raise TypeError(f"editor must be a fastedit Editor (GD, RMSProp, ...), got {type(editor).__name__}")
    if not params:
        raise ValueError("editor_step_ needs at least one parameter tensor")
    if len(grads) != len(params):
        raise ValueError(f"{len(params)} parameter tensors but {len(grads)} gradients")
    if not isinstance(state, dict) or "t" not in state or not isinstance(state["t"], Tensor):
        raise TypeError("state must be the dict of Editor.init_state(params): {'t': tensor, <slot>: [tensors]}")
    device = params[0].device
    t = state["t"]
    if batched:
        if params[0].dim() == 0:
            raise ValueError("batched=True needs a leading edit dimension on every tensor")
        e = params[0].shape[0]
        if tuple(t.shape) != (e,):
            raise ValueError(f"batched=True: state['t'] must have shape ({e},), got {tuple(t.shape)}")
    elif t.dim() != 0:
        raise ValueError(f"state['t'] must be 0-dim for a single edit, got shape {tuple(t.shape)}")
    want_t = _compute_dtype(params[0].dtype)
    if t.dtype != want_t:
        raise TypeError(f"state['t'] is {t.dtype} but must be {want_t} for {params[0].dtype} parameters")
    if t.device != device:
        raise ValueError(f"state['t'] is on {t.device}, the parameters on {device}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if not p.is_floating_point() or p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"parameter {i} has dtype {p.dtype}; editor_step_ supports float32, float64, "
                            "float16 and bfloat16")
        if g.dtype != p.dtype:
            raise TypeError(f"gradient {i} is {g.dtype} but its parameter is {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"parameter {i} has shape {tuple(p.shape)} but its gradient {tuple(g.shape)}")
        if p.device != device or g.device != device:
            raise ValueError(f"parameter {i} ({p.device}) and its gradient ({g.device}) must be on {device}")
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"parameter {i} and its gradient must be contiguous (the step is written in "
                             "place; call .contiguous() on the gradient)")
        if (p.dtype == torch.float64) != (params[0].dtype == torch.float64):
            raise TypeError(f"parameter {i} is {p.dtype} but parameter 0 is {params[0].dtype}: float64 "
                            "parameters (float64 state) cannot be mixed with the others (float32 state)")
        if batched and (p.dim() == 0 or p.shape[0] != params[0].shape[0]):
            raise ValueError("batched=True needs the same leading edit dimension on every tensor")
    for slot in editor.slots:
        tensors = state.get(slot)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
            raise ValueError(f"editor state does not match the parameters (slot {slot!r}); "
                             "create it with init_state(params)")
        for i, (s, p) in enumerate(zip(tensors, params)):
            want = _compute_dtype(p.dtype)
            if not isinstance(s, Tensor) or s.shape != p.shape or s.dtype != want or s.device != device \
                    or not s.is_contiguous():
                got = (f"{s.dtype} {tuple(s.shape)} on {s.device}{'' if s.is_contiguous() else ', non-contiguous'}"
                       if isinstance(s, Tensor) else type(s).__name__)
                raise ValueError(f"state[{slot!r}][{i}] must be a contiguous {want} tensor of shape "
                                 f"{tuple(p.shape)} on {device}, got {got} (create it with init_state)")
            if s.data_ptr() == p.data_ptr() and p.numel() > 0:
                raise ValueError(f"state[{slot!r}][{i}] aliases parameter {i}")
    if active is not None:
        if not isinstance(active, Tensor) or active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got "
                            f"{active.dtype if isinstance(active, Tensor) else type(active).__name__}")
        if tuple(active.shape) != tuple(t.shape):
            what = f"({t.shape[0]},) for {t.shape[0]} edits" if batched else "() (0-dim) for a single edit"
            raise ValueError(f"active must have shape {what}, got {tuple(active.shape)}")
        if active.device != device:
            raise ValueError(f"active is on {active.device}, the parameters on {device}")
    if masks is not None:
        if len(masks) != len(params):
            raise ValueError(f"{len(masks)} masks for {len(params)} parameter tensors")
        for i, (m, p) in enumerate(zip(masks, params)):
            if m.device != device:
                raise ValueError(f"mask {i} is on {m.device}, the parameters on {device}")
            if m.dtype != torch.bool:
                raise TypeError(f"mask {i} must be bool (or int64 flat indices), got {m.dtype}")
            shared = batched and m.shape == p.shape[1:]
            if m.shape != p.shape and not shared:
                raise ValueError(f"mask {i} has shape {tuple(m.shape)}; it must have the shape of its parameter "
                                 f"{tuple(p.shape)}{' (or that shape without the edit dimension)' if batched else ''}")


def _masks_from(mask, params: list[Tensor], batched: bool) -> list[Tensor] | None:
    """Bool masks, one per parameter; int64 index tensors become masks (flat indices into the
    parameter, or into one edit's slice of it when batched; the mask is then shared by the edits)."""
    if mask is None:
        return None
    masks = _as_list(mask, "mask")
    if len(masks) != len(params):
        raise ValueError(f"{len(masks)} masks for {len(params)} parameter tensors")
    out = []
    for i, (m, p) in enumerate(zip(masks, params)):
        if m.dtype in (torch.int64, torch.int32):
            shape = p.shape[1:] if batched else p.shape
            numel = 1
            for s in shape:
                numel *= s
            flat = torch.zeros(numel, dtype=torch.bool, device=m.device)
            # no bounds check on the host (that would synchronise); index_fill_ raises on bad indices
            flat.index_fill_(0, m.reshape(-1).to(torch.int64), True)
            m = flat.reshape(shape)
        out.append(m.contiguous())
    return out


def _inv_norm(editor: ScaledGD, grads: list[Tensor], batched: bool, masks: list[Tensor] | None) -> Tensor:
    """Scaled GD's per-edit ``1 / max(‖g‖₂, eps)``: the reference's own expression (so the fused step
    is bit-identical to it), over the masked gradient when a mask is given."""
    if masks is not None:
        grads = [torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g, m in zip(grads, masks)]
    return editor._prepare(grads, batched)


def _reference_(editor, params, grads, state, active, batched, masks) -> None:
    """The oracle, in place: Editor.step, then copy_ of its results (masked coordinates keep their
    values: torch.where(mask, new, old) writes the old bits back)."""
    g_in = grads
    if masks is not None and isinstance(editor, ScaledGD):
        g_in = [torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g, m in zip(grads, masks)]
    with torch.no_grad():
        new_params, new_state = editor.step(params, g_in, state, active, batched=batched)
        for i, (p, q) in enumerate(zip(params, new_params)):
            p.copy_(q if masks is None else torch.where(masks[i], q, p))
        for slot in editor.slots:
            for i, (s, q) in enumerate(zip(state[slot], new_state[slot])):
                s.copy_(q if masks is None else torch.where(masks[i], q, s))
        state["t"].copy_(new_state["t"])


def editor_step_(editor: Editor, params: Tensor | Sequence[Tensor], grads: Tensor | Sequence[Tensor],
                 state: dict, active: Tensor | None = None, *, batched: bool = False,
                 mask: Tensor | Sequence[Tensor] | None = None) -> None:
    """One step of ``editor`` over all parameters, **in place**, fused into one pass.

    Contract: afterwards ``params`` and ``state`` hold what
    ``editor.step(params, grads, state, active, batched=batched)`` returns. Every backend evaluates
    the reference's operations in the reference's order, in float32 (float64 for float64
    parameters), without fused multiply-adds, and rounds float16/bfloat16 results once, like the
    reference's ``(p.float() - delta).to(p.dtype)``. GD, Scaled GD, sign (RProp) and Momentum are
    therefore bit-identical to the reference; RMSProp and Adam may differ in the last bit, because
    the kernels use a correctly rounded sqrt and torch's CPU sqrt (MKL VML) is not correctly
    rounded, and Adam's ``beta ** t`` goes through ``pow``.

    Arguments
        editor: ``GD``, ``ScaledGD``, ``RProp``/``SignGD``, ``RMSProp``, ``Momentum`` or ``Adam``. A
            subclass with its own rule, or tensor hyper-parameters (Editable Training), runs on the
            reference path (still in place, still without host synchronisation).
        params: a tensor (flat buffer) or a list of tensors, contiguous, float32/float16/bfloat16
            (float32 state) or all float64 (float64 state). Modified in place.
        grads: the gradients, same shapes and dtypes, contiguous. Not modified.
        state: ``editor.init_state(params, batched=batched)``, modified in place: its slots and the
            step count ``state["t"]`` (``t ← t + active``).
        active: optional bool tensor ``[E]`` (batched) or 0-dim, read on the device: where False the
            edit's parameters and state keep their bits and its ``t`` does not advance.
        batched: every tensor has a leading edit dimension ``E`` (independent edits).
        mask: optional sparse selection (surgery): one bool tensor per parameter (its shape, or the
            shape without the edit dimension when batched, shared by the edits), or one int64 tensor
            of flat indices per parameter. Coordinates outside the mask are never written (neither θ
            nor state); inside it the result equals the dense step. Scaled GD's norm is then the norm
            of the *masked* gradient (``‖g ⊙ mask‖₂``, per edit). The step count advances as for a
            dense step.

    Raises ``TypeError``/``ValueError`` (before writing anything) for mismatched lengths, shapes,
    dtypes or devices, non-contiguous tensors, state not made by ``init_state``, a bad ``active``
    or mask. Never synchronises with the host. Runs under ``torch.no_grad()`` (like an optimizer's
    step: the update is not recorded by autograd; the differentiable step is ``Editor.step``).
    """
    with torch.no_grad():
        _editor_step(editor, params, grads, state, active, batched, mask)


def _editor_step(editor, params, grads, state, active, batched, mask, backend: str | None = None) -> None:
    """The body of :func:`editor_step_`; ``backend`` (tests, benchmarks) bypasses the dispatcher."""
    params_l = params if type(params) is list else _as_list(params, "params")
    grads_l = grads if type(grads) is list else _as_list(grads, "grads")
    masks = _masks_from(mask, params_l, batched)
    rule = RULES.get(type(editor))
    hp = _kernel_hparams(editor) if rule is not None else None
    if backend is None and params_l:
        backend = _backend_for(params_l[0].device.type)

    if backend in ("cpu", "cuda") and hp is not None:
        # Fast path: the compiled op checks everything itself before writing anything (C++
        # TORCH_CHECKs; its fake kernel rejects mixed devices). Only when it refuses do the Python
        # checks run, to turn its RuntimeError into the same clear error as on other backends.
        try:
            slots = [state[s] for s in editor.slots]
            inv_norm = _inv_norm(editor, grads_l, batched, masks) if rule == RULES[ScaledGD] else None
            torch.ops.fastedit.editor_step_(
                params_l, grads_l, slots[0] if slots else [], slots[1] if len(slots) > 1 else [],
                state["t"], active, inv_norm, masks or [], rule, *hp, batched)
            return
        except (RuntimeError, KeyError, TypeError, IndexError, AttributeError):
            _check(editor, params_l, grads_l, state, active, batched, masks)
            raise

    _check(editor, params_l, grads_l, state, active, batched, masks)
    if backend == "reference" or hp is None:
        _reference_(editor, params_l, grads_l, state, active, batched, masks)
        return
    lr, beta1, beta2, eps = hp
    inv_norm = _inv_norm(editor, grads_l, batched, masks) if rule == RULES[ScaledGD] else None
    slots = [list(state[s]) for s in editor.slots]
    slot1 = slots[0] if len(slots) > 0 else []
    slot2 = slots[1] if len(slots) > 1 else []
    if backend == "triton":
        from .triton.editor_step import editor_step_triton
        editor_step_triton(params_l, grads_l, slot1, slot2, state["t"], active, inv_norm, masks or [],
                           rule, lr, beta1, beta2, eps, batched)
    else:
        raise ValueError(f"unknown backend {backend!r} for editor_step")
