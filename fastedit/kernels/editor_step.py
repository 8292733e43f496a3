"""Fused, in-place editor step: ``editor_step_`` (one pass over all editable parameters).

Backends (``fastedit.kernels.dispatch.choose_backend("editor_step", device)``): the CUDA extension
(``csrc/cuda/editor_step.cu``), Triton (``fastedit/kernels/triton/editor_step.py``, on GPUs when the
CUDA extension is absent; one launch per parameter dtype over the whole tensor list), the C++ CPU kernel (``csrc/cpu/editor_step.cpp``) and the reference, which
runs :meth:`fastedit.editors.Editor.step` and copies its results in place.

Any strides: the kernels walk flat contiguous rows, so a non-contiguous tensor (a ``channels_last``
convolution weight, a transposed view, a strided slice) is stepped through a contiguous copy that is
written back into it afterwards (dense: ``copy_``; masked: only the selected coordinates, by a
host-sync-free ``masked_scatter_``), in C++ for the compiled kernels (``csrc/editor_step_strided.h``)
and here for Triton. The tensors keep their strides, memory format and storage; calls whose
tensors are all contiguous take no copy. Error messages name the parameter (``names=``).
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


def _sequence_of(x, name: str, kind: type, what: str) -> list:
    """``x`` as a list whose items are all ``kind``; a ``TypeError`` naming the first that is not."""
    try:
        out = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a {what} or a sequence of them, got {type(x).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, kind):
            raise TypeError(f"{name}[{i}] must be a {what}, got {type(v).__name__}")
    return out


def _as_list(x, name: str) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else _sequence_of(x, name, Tensor, "tensor")


def _label(names: list[str] | None, i: int) -> str:
    """How messages name parameter ``i``: ``parameter 'fc.weight'`` with names, ``parameter 3`` without."""
    return f"parameter {names[i]!r}" if names is not None else f"parameter {i}"


def _overlaps_itself(x: Tensor) -> bool:
    """A stride-0 dimension of size > 1 (``expand()``): an in-place write would store several results in
    one location (ATen's ``has_internal_overlap(x) == MemOverlap::Yes``, the C++ kernels' check)."""
    return any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape))


def _names_from(names, n: int) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise TypeError("names must be a sequence of strings, one per parameter tensor, not a single string")
    out = _sequence_of(names, "names", str, "string")
    if len(out) != n:
        raise ValueError(f"{len(out)} names for {n} parameter tensors (give one name per parameter, or none)")
    return out


def _check(editor, params, grads, state, active, batched, masks, names=None) -> None:
    """Everything the kernels need, checked before anything is written (same rules on every
    backend, so a call that works on one machine works on all). Messages name each tensor by its
    parameter (``names``, else its position)."""
    if not isinstance(editor, Editor):
        raise TypeError(f"editor must be a fastedit Editor (GD, RMSProp, ...), got {type(editor).__name__}")
    if not params:
        raise ValueError("editor_step_ needs at least one parameter tensor")
    names = _names_from(names, len(params))
    if len(grads) != len(params):
        raise ValueError(f"{len(params)} parameter tensors but {len(grads)} gradients")
    if not isinstance(state, dict) or "t" not in state or not isinstance(state["t"], Tensor):
        raise TypeError("state must be the dict of Editor.init_state(params): {'t': tensor, <slot>: [tensors]}")
    device = params[0].device
    first = _label(names, 0)
    t = state["t"]
    if batched:
        if params[0].dim() == 0:
            raise ValueError(f"batched=True needs a leading edit dimension on every tensor; {first} is 0-dim")
        e = params[0].shape[0]
        if tuple(t.shape) != (e,):
            raise ValueError(f"batched=True: state['t'] must have shape ({e},), got {tuple(t.shape)}")
    elif t.dim() != 0:
        raise ValueError(f"state['t'] must be 0-dim for a single edit, got shape {tuple(t.shape)}")
    want_t = _compute_dtype(params[0].dtype)
    if t.dtype != want_t:
        raise TypeError(f"state['t'] is {t.dtype} but must be {want_t} for {params[0].dtype} parameters "
                        f"({first} is {params[0].dtype})")
    if t.device != device:
        raise ValueError(f"state['t'] is on {t.device}, the parameters on {device}")
    if _overlaps_itself(t):
        raise ValueError("state['t'] overlaps itself in memory (a stride-0 dimension, e.g. from expand()); "
                         "it is written in place: pass a .clone() of it")
    for i, (p, g) in enumerate(zip(params, grads)):
        what = _label(names, i)
        if not p.is_floating_point() or p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"{what} has dtype {p.dtype}; editor_step_ supports float32, float64, "
                            "float16 and bfloat16")
        if g.dtype != p.dtype:
            raise TypeError(f"the gradient of {what} is {g.dtype} but the parameter is {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{what} has shape {tuple(p.shape)} but its gradient {tuple(g.shape)}")
        if p.device != device or g.device != device:
            raise ValueError(f"{what} ({p.device}) and its gradient ({g.device}) must be on {device}")
        if _overlaps_itself(p):
            raise ValueError(f"{what} overlaps itself in memory (a stride-0 dimension, e.g. from expand()); "
                             "the step is written in place: pass a .clone() of it")
        if (p.dtype == torch.float64) != (params[0].dtype == torch.float64):
            raise TypeError(f"{what} is {p.dtype} but {first} is {params[0].dtype}: float64 "
                            "parameters (float64 state) cannot be mixed with the others (float32 state)")
        if batched and (p.dim() == 0 or p.shape[0] != params[0].shape[0]):
            raise ValueError(f"batched=True needs the same leading edit dimension on every tensor: {what} has "
                             f"shape {tuple(p.shape)}, {first} {tuple(params[0].shape)}")
    for slot in editor.slots:
        tensors = state.get(slot)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
            raise ValueError(f"editor state does not match the parameters (slot {slot!r}); "
                             "create it with init_state(params)")
        for i, (s, p) in enumerate(zip(tensors, params)):
            what = _label(names, i)
            want = _compute_dtype(p.dtype)
            if not isinstance(s, Tensor) or s.shape != p.shape or s.dtype != want or s.device != device:
                got = f"{s.dtype} {tuple(s.shape)} on {s.device}" if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"state[{slot!r}] of {what} must be a {want} tensor of shape "
                                 f"{tuple(p.shape)} on {device}, got {got} (create it with init_state)")
            if s.data_ptr() == p.data_ptr() and p.numel() > 0:
                raise ValueError(f"state[{slot!r}] of {what} aliases the parameter")
            if _overlaps_itself(s):
                raise ValueError(f"state[{slot!r}] of {what} overlaps itself in memory (a stride-0 dimension, "
                                 "e.g. from expand()); it is written in place (create it with init_state)")
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
            what = _label(names, i)
            if m.device != device:
                raise ValueError(f"the mask of {what} is on {m.device}, the parameters on {device}")
            if m.dtype != torch.bool:
                raise TypeError(f"the mask of {what} must be bool (or int64 flat indices), got {m.dtype}")
            shared = batched and m.shape == p.shape[1:]
            if m.shape != p.shape and not shared:
                raise ValueError(f"the mask of {what} has shape {tuple(m.shape)}; it must have the shape of the "
                                 f"parameter {tuple(p.shape)}{' (or that shape without the edit dimension)' if batched else ''}")


def _masks_from(mask, params: list[Tensor], batched: bool, names: list[str] | None = None) -> list[Tensor] | None:
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
            try:
                flat.index_fill_(0, m.reshape(-1).to(torch.int64), True)
            except (IndexError, RuntimeError) as error:
                what = _label(names if names is not None and len(names) == len(params) else None, i)
                raise IndexError(f"the index mask of {what} holds a flat index outside [-{numel}, {numel}) "
                                 f"({error})") from None
            m = flat.reshape(shape)
        out.append(m.contiguous())
    return out


def _inv_norm(editor: ScaledGD, grads: list[Tensor], batched: bool, masks: list[Tensor] | None) -> Tensor:
    """Scaled GD's per-edit ``1 / max(‖g‖₂, eps)``: the reference's own expression (so the fused step
    is bit-identical to it), over the masked gradient when a mask is given."""
    if masks is not None:
        grads = [torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g, m in zip(grads, masks)]
    return editor._prepare(grads, batched)


def _write_back_masked(original: Tensor, new: Tensor, mask: Tensor) -> None:
    """``original[j] = new[j]`` for the coordinates ``j`` of ``mask`` (broadcast to the original's
    shape); nothing else is written, and nothing synchronises with the host (no ``masked_select``,
    whose size depends on the data): the selected values are packed by the mask's prefix sum into a
    buffer of ``numel + 1`` (unselected values all go to the spare last slot), and ``masked_scatter_``
    stores the k-th packed value at the k-th selected coordinate. The same write-back as the C++
    kernels' (csrc/editor_step_strided.h)."""
    m = mask.expand(original.shape)
    n = original.numel()
    if n == 0:
        return
    flat = m.reshape(-1)
    dest = torch.where(flat, flat.cumsum(0) - 1, n)
    packed = new.new_empty(n + 1).scatter_(0, dest, new.reshape(-1))
    original.masked_scatter_(m, packed)


def _write_back(originals: list[Tensor], staged: list[Tensor], masks: list[Tensor] | None) -> None:
    for i, (o, s) in enumerate(zip(originals, staged)):
        if s is o:
            continue  # contiguous: the kernel wrote it directly
        if masks is None:
            o.copy_(s)
        else:
            _write_back_masked(o, s, masks[i])


def _contiguous(xs: list[Tensor]) -> list[Tensor]:
    return [x.contiguous() for x in xs]  # x itself when contiguous


def _reference_(editor, params, grads, state, active, batched, masks) -> None:
    """The oracle, in place: Editor.step, then a copy of its results into the tensors (any strides;
    with a mask only the selected coordinates are written)."""
    g_in = grads
    if masks is not None and isinstance(editor, ScaledGD):
        g_in = [torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g, m in zip(grads, masks)]
    with torch.no_grad():
        new_params, new_state = editor.step(params, g_in, state, active, batched=batched)
        written = list(zip(params, new_params))
        for slot in editor.slots:
            written += list(zip(state[slot], new_state[slot]))
        for k, (x, new) in enumerate(written):
            if masks is None:
                x.copy_(new)
            else:
                _write_back_masked(x, new, masks[k % len(params)])
        state["t"].copy_(new_state["t"])


def _triton_(params, grads, slot1, slot2, t, active, inv_norm, masks, rule, lr, beta1, beta2, eps,
             batched) -> None:
    """The Triton kernel (flat rows of contiguous tensors) on any strides: non-contiguous tensors
    go through contiguous stand-ins, written back afterwards (only inside the mask when masked),
    as the C++ kernels do; all-contiguous calls run on the tensors themselves."""
    from .triton.editor_step import editor_step_triton
    optional = [x for x in (active, inv_norm) if x is not None]
    if all(x.is_contiguous() for x in (*params, *grads, *slot1, *slot2, *masks, t, *optional)):
        editor_step_triton(params, grads, slot1, slot2, t, active, inv_norm, masks, rule, lr, beta1, beta2,
                           eps, batched)
        return
    p, s1, s2, t_c = _contiguous(params), _contiguous(slot1), _contiguous(slot2), t.contiguous()
    m = _contiguous(masks)
    editor_step_triton(p, _contiguous(grads), s1, s2, t_c, None if active is None else active.contiguous(),
                       None if inv_norm is None else inv_norm.contiguous(), m, rule, lr, beta1, beta2, eps,
                       batched)
    for originals, staged in ((params, p), (slot1, s1), (slot2, s2)):
        _write_back(originals, staged, m or None)
    if t_c is not t:
        t.copy_(t_c)


def editor_step_(editor: Editor, params: Tensor | Sequence[Tensor], grads: Tensor | Sequence[Tensor],
                 state: dict, active: Tensor | None = None, *, batched: bool = False,
                 mask: Tensor | Sequence[Tensor] | None = None, names: Sequence[str] | None = None) -> None:
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
        params: a tensor (flat buffer) or a list of tensors, float32/float16/bfloat16 (float32
            state) or all float64 (float64 state), of any strides. Modified in place, keeping their
            strides, memory format and storage: a ``channels_last`` weight stays ``channels_last``
            and a view (e.g. a transposed weight) stays a view of its base. Contiguous tensors are
            stepped directly (no copy); each non-contiguous one through a contiguous copy that is
            written back after the kernel (one extra read and write of that tensor). A written
            tensor (parameter, state, ``t``) must not overlap itself (no stride-0 dimension of size
            > 1, as made by ``expand()``).
        grads: the gradients, same shapes and dtypes, any strides. Not modified.
        state: ``editor.init_state(params, batched=batched)``, modified in place: its slots and the
            step count ``state["t"]`` (``t ← t + active``). Any strides, like ``params``.
        active: optional bool tensor ``[E]`` (batched) or 0-dim, read on the device: where False the
            edit's parameters and state keep their bits and its ``t`` does not advance.
        batched: every tensor has a leading edit dimension ``E`` (independent edits).
        mask: optional sparse selection (surgery): one bool tensor per parameter (its shape, or the
            shape without the edit dimension when batched, shared by the edits), or one int64 tensor
            of flat indices per parameter. Coordinates outside the mask are never written (neither θ
            nor state, also for non-contiguous tensors, on every backend); inside it the result
            equals the dense step. Scaled GD's norm is then the norm of the *masked* gradient
            (``‖g ⊙ mask‖₂``, per edit). The step count advances as for a dense step.
        names: optional, one string per parameter tensor (e.g. ``"layer3.0.conv1.weight"``): error
            messages then name the parameter (``parameter 'layer3.0.conv1.weight'``) instead of its
            position in the list (``parameter 3``). No effect on the step.

    Raises ``TypeError``/``ValueError`` (before writing anything) for mismatched lengths, shapes,
    dtypes or devices, self-overlapping written tensors, state not made by ``init_state``, a bad
    ``active``, mask or ``names``; an ``IndexError`` for an index mask outside its parameter. Every
    message names the tensor's parameter. Never synchronises with the host. Runs under
    ``torch.no_grad()`` (like an optimizer's step: the update is not recorded by autograd; the
    differentiable step is ``Editor.step``).
    """
    with torch.no_grad():
        _editor_step(editor, params, grads, state, active, batched, mask, names=names)


def _editor_step(editor, params, grads, state, active, batched, mask, backend: str | None = None,
                 names: Sequence[str] | None = None) -> None:
    """The body of :func:`editor_step_`; ``backend`` (tests, benchmarks) bypasses the dispatcher."""
    params_l = params if type(params) is list else _as_list(params, "params")
    grads_l = grads if type(grads) is list else _as_list(grads, "grads")
    names_l = names if names is None or type(names) is list else _names_from(names, len(params_l))
    masks = _masks_from(mask, params_l, batched, names_l)
    rule = RULES.get(type(editor))
    hp = _kernel_hparams(editor) if rule is not None else None
    if backend is None and params_l:
        backend = _backend_for(params_l[0].device.type)

    if backend in ("cpu", "cuda") and hp is not None:
        # Fast path: the compiled op checks everything itself before writing anything (C++
        # TORCH_CHECKs; its fake kernel rejects mixed devices) and takes any strides. Only when it
        # refuses do the Python checks run, to turn its RuntimeError into the same clear error as on
        # other backends.
        try:
            slots = [state[s] for s in editor.slots]
            inv_norm = _inv_norm(editor, grads_l, batched, masks) if rule == RULES[ScaledGD] else None
            torch.ops.fastedit.editor_step_(
                params_l, grads_l, slots[0] if slots else [], slots[1] if len(slots) > 1 else [],
                state["t"], active, inv_norm, masks or [], rule, *hp, batched, names_l)
            return
        except (RuntimeError, KeyError, TypeError, IndexError, AttributeError):
            _check(editor, params_l, grads_l, state, active, batched, masks, names_l)
            raise

    _check(editor, params_l, grads_l, state, active, batched, masks, names_l)
    if backend == "reference" or hp is None:
        _reference_(editor, params_l, grads_l, state, active, batched, masks)
        return
    lr, beta1, beta2, eps = hp
    inv_norm = _inv_norm(editor, grads_l, batched, masks) if rule == RULES[ScaledGD] else None
    slots = [list(state[s]) for s in editor.slots]
    slot1 = slots[0] if len(slots) > 0 else []
    slot2 = slots[1] if len(slots) > 1 else []
    if backend == "triton":
        _triton_(params_l, grads_l, slot1, slot2, state["t"], active, inv_norm, masks or [],
                 rule, lr, beta1, beta2, eps, batched)
    else:
        raise ValueError(f"unknown backend {backend!r} for editor_step")
