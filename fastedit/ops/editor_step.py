"""The editor step, one op in two forms: fused in place (``editor_step_``) and differentiable (``editor_step``).

Both compute exactly what :meth:`fastedit.editors.Editor.step` (fastedit/editors.py) computes, for
the six built-in rules (GD, Scaled GD, sign/RProp, RMSProp, Momentum, Adam); ``Editor.step`` is the
oracle every backend and both forms are tested against (tests/ops/test_editor_step.py,
tests/ops/test_differentiable_step.py). The rule ids of the compiled op come from the one table,
:data:`fastedit.ops._table.RULE_IDS`.

``editor_step_``: one pass over all editable parameters, in place
    Backends (:func:`fastedit.ops.dispatch.choose_backend` for ``"editor_step"``, or the
    ``backend=`` keyword): the CUDA extension (``csrc/cuda/editor_step.cu``), Triton
    (``fastedit/ops/triton/editor_step.py``, on GPUs when the CUDA extension is absent; one launch
    per parameter dtype over the whole tensor list), the C++ CPU kernel (``csrc/cpu/editor_step.cpp``)
    and the reference, which runs :meth:`fastedit.editors.Editor.step` and copies its results in
    place. The math of the compiled kernels is in ``csrc/editor_step_math.h``, their checks in
    ``csrc/editor_step_checks.h``; the Python checks here (:func:`_check`) give the same errors on
    every backend.

    Any strides: the kernels walk flat contiguous rows, so a non-contiguous tensor (a
    ``channels_last`` convolution weight, a transposed view, a strided slice) is stepped through a
    contiguous copy that is written back into it afterwards (dense: ``copy_``; masked: only the
    selected coordinates, by a host-sync-free ``masked_scatter_``), in C++ for the compiled kernels
    (``csrc/editor_step_strided.h``) and here for Triton. The tensors keep their strides, memory
    format and storage; calls whose tensors are all contiguous take no copy. Error messages name
    the parameter (``names=``).

``editor_step``: differentiable, a closed-form backward (for Editable Training's unrolled steps)
    ``editor_step(editor, params, grads, state, active=None, *, batched=False)`` has exactly the
    signature, the values and the derivatives of ``editor.step(params, grads, state, active,
    batched=batched)`` for the six editors; other ``Editor`` subclasses fall back to their own
    ``step``. It is plain PyTorch (no backend choice: it runs wherever its inputs are).

    Why an ``autograd.Function`` (docs/design.md): the reference step is a chain of elementwise ops,
    and autograd records every intermediate of it (``g²``, ``√(s+ε)``, ``m̂``, ``v̂``, …) for each of
    the ``k`` unrolled steps of Editable Training. Here the whole step (all tensors of one edit) is
    one node that saves only some of its *inputs* (listed per rule in
    ``_EditorStep.setup_context``) and recomputes the few elementwise intermediates in backward. A
    ``torch.library.custom_op`` with ``register_autograd`` would not work under
    ``torch.func.grad``/``grad(grad)``/``vmap(grad)``; an ``autograd.Function`` with a separate
    ``setup_context`` and ``generate_vmap_rule=True`` works under all of them.

    Values: the forward evaluates the reference's expressions in the reference's order, so new
    parameters and state are bit-identical to ``Editor.step`` (tested in float64, float32 and bf16
    parameters with fp32 state). The backward's own arithmetic (e.g. ``rsqrt`` instead of
    ``1/sqrt``, per-edit dot products) differs from autograd's only by round-off.

    Double backward: ``backward`` is written in differentiable torch ops on saved *inputs* only
    (never on tensors made in ``forward``, which would be constants to the second
    differentiation), so ``grad(grad)`` and ``create_graph=True`` are exact.

    Gradients flow to the parameters (identity), the gradients ``g`` (the second-order path of
    Editable Training), the state slots and every hyper-parameter given as a tensor (floats are
    constants). The step counter ``t`` and ``active`` get none. Where ``active`` is False the step
    is the identity: the incoming gradient passes unchanged to the old parameters and state, and
    ``g`` and the hyper-parameters get zero from that edit.

The compiled op's Python part, its fake kernel (for ``torch.compile`` and meta tensors), is here
too (:func:`_fake`, in :data:`PYTHON_PARTS`, which fastedit.ops registers when fastedit._C is loaded).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..editors import (
    GD,
    Adam,
    Editor,
    EditorState,
    Momentum,
    RMSProp,
    RProp,
    ScaledGD,
    _compute_dtype,
    _per_edit,
    _safe_sqrt,
)
from ._table import RULE_IDS
from .dispatch import choose_backend

__all__ = ["editor_step_", "editor_step", "supports", "RULES", "rule_id"]

#: The editor classes whose rule the fused kernels and the closed-form backward know, each by its
#: ``name`` (a key of :data:`fastedit.ops._table.RULE_IDS`).
_BUILT_IN: tuple[type[Editor], ...] = (GD, ScaledGD, RProp, RMSProp, Momentum, Adam)

#: Rule ids of ``torch.ops.fastedit.editor_step_``, by editor class (exact class: a subclass may
#: change the rule).
RULES: dict[type, int] = {cls: RULE_IDS[cls.name] for cls in _BUILT_IN}

_KNOWN_RULE_IDS = frozenset(RULE_IDS.values())

# the hyper-parameters of each rule, in the closed-form step's order (Adam's ``betas`` split in two)
_HPARAMS: dict[str, tuple[str, ...]] = {
    "gd": ("lr",), "scaled_gd": ("lr", "eps"), "rprop": ("lr",), "rmsprop": ("lr", "beta", "eps"),
    "momentum": ("lr", "momentum"), "adam": ("lr", "beta1", "beta2", "eps"),
}


# ================================================================================================
# editor_step_: fused, in place
# ================================================================================================
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
def _backend_for(device_type: str, requested: str | None = None) -> str:
    """The dispatcher's choice (or the ``requested`` backend, checked), taken as a constant by
    torch.compile (it reads the environment and the extension's build description, which dynamo
    cannot trace)."""
    return choose_backend("editor_step", torch.device(device_type), requested)


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
    from .triton.editor_step import editor_step_triton  # late: imports triton
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
                 mask: Tensor | Sequence[Tensor] | None = None, names: Sequence[str] | None = None,
                 backend: str | None = None) -> None:
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
        backend: None for the dispatcher's choice (:func:`fastedit.ops.use_backend`,
            ``FASTEDIT_BACKEND``, else the priority order), or a backend name to force for this call
            (``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``). Editors the kernels do not know
            (see ``editor``) still run on the reference path.

    Raises ``TypeError``/``ValueError`` (before writing anything) for mismatched lengths, shapes,
    dtypes or devices, self-overlapping written tensors, state not made by ``init_state``, a bad
    ``active``, mask or ``names``; an ``IndexError`` for an index mask outside its parameter. Every
    message names the tensor's parameter. :class:`~fastedit.ops.dispatch.BackendError` when the
    forced backend cannot run here. Never synchronises with the host. Runs under
    ``torch.no_grad()`` (like an optimizer's step: the update is not recorded by autograd; the
    differentiable step is :func:`editor_step`).
    """
    with torch.no_grad():
        _editor_step(editor, params, grads, state, active, batched, mask, names=names, requested=backend)


def _editor_step(editor, params, grads, state, active, batched, mask, backend: str | None = None,
                 names: Sequence[str] | None = None, *, requested: str | None = None) -> None:
    """The body of :func:`editor_step_`. ``backend`` (tests, benchmarks) bypasses the dispatcher
    and its checks (e.g. Triton's interpreter on CPU tensors); ``requested`` is the public
    ``backend=``, which the dispatcher checks."""
    params_l = params if type(params) is list else _as_list(params, "params")
    grads_l = grads if type(grads) is list else _as_list(grads, "grads")
    names_l = names if names is None or type(names) is list else _names_from(names, len(params_l))
    masks = _masks_from(mask, params_l, batched, names_l)
    rule = RULES.get(type(editor))
    hp = _kernel_hparams(editor) if rule is not None else None
    if backend is None and params_l:
        backend = _backend_for(params_l[0].device.type, requested)

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


# ================================================================================================
# editor_step: differentiable (closed-form backward)
# ================================================================================================
def supports(editor: Editor) -> bool:
    """Whether ``editor`` gets the closed-form backward (its exact class is one of the six)."""
    return type(editor) in RULES


class _Layout(NamedTuple):
    """The non-tensor part of a step: how the flat tensor inputs are laid out, and float hparams.

    Tensor inputs, in order: ``n`` params, ``n`` grads, ``n`` per slot (slot-major), ``t``,
    ``active`` (if ``has_active``), then one tensor per hyper-parameter whose entry in ``hp_const``
    is None (the others are Python floats).
    """
    rule: str
    batched: bool
    n: int
    n_slots: int
    has_active: bool
    hp_names: tuple
    hp_const: tuple


def _unpack(layout: _Layout, tensors: Sequence):
    n, k = layout.n, layout.n_slots
    params, grads = list(tensors[:n]), list(tensors[n:2 * n])
    slots = [list(tensors[2 * n + j * n: 2 * n + (j + 1) * n]) for j in range(k)]
    i = 2 * n + k * n
    t = tensors[i]
    i += 1
    active = None
    if layout.has_active:
        active = tensors[i]
        i += 1
    hp, hp_index = {}, {}
    for name, const in zip(layout.hp_names, layout.hp_const):
        if const is None:
            hp[name], hp_index[name] = tensors[i], i
            i += 1
        else:
            hp[name] = const
    return params, grads, slots, t, active, hp, hp_index


def _dims(x: Tensor, batched: bool) -> tuple:
    return tuple(range(1, x.dim())) if batched else tuple(range(x.dim()))


# ------------------------------------------------------------------------------------------------
# forward formulas: the reference's expressions, in the reference's order (bit-identical values)
# ------------------------------------------------------------------------------------------------
def _scaled_gd_norm(g32s: list[Tensor], eps, batched: bool):
    """(sum of squares, ‖g‖, 1/max(‖g‖, eps)) per edit, as ``ScaledGD._prepare``."""
    sq = sum(g.pow(2).sum(dim=_dims(g, batched)) for g in g32s)
    norm = _safe_sqrt(sq)
    return sq, norm, norm.clamp_min(eps).reciprocal()


def _rule_fwd(rule: str, g, slots, t, hp, inv_norm):
    """``(delta, new_slots)`` for one tensor, as ``Editor._rule`` (``t``: this step's number)."""
    if rule == "gd":
        return hp["lr"] * g, []
    if rule == "rprop":
        return hp["lr"] * torch.sign(g), []
    if rule == "scaled_gd":
        return hp["lr"] * g * inv_norm, []
    if rule == "rmsprop":
        g2 = g * g
        s = torch.where(t == 1, g2, hp["beta"] * slots[0] + (1 - hp["beta"]) * g2)
        return hp["lr"] * g / torch.sqrt(s + hp["eps"]), [s]
    if rule == "momentum":
        v = hp["lr"] * g + hp["momentum"] * slots[0]
        return v, [v]
    if rule == "adam":
        beta1, beta2 = hp["beta1"], hp["beta2"]
        m = beta1 * slots[0] + (1 - beta1) * g
        v = beta2 * slots[1] + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        return hp["lr"] * m_hat / (_safe_sqrt(v_hat) + hp["eps"]), [m, v]
    raise AssertionError(rule)


def _keep(active, new, old, batched):
    return new if active is None else torch.where(_per_edit(active, new, batched), new, old)


# ------------------------------------------------------------------------------------------------
# the Function
# ------------------------------------------------------------------------------------------------
class _EditorStep(torch.autograd.Function):
    """One step of any of the six rules over all tensors of the edit(s); closed-form backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(layout: _Layout, *tensors):
        params, grads, slots, t, active, hp, _ = _unpack(layout, tensors)
        batched = layout.batched
        t1 = t + 1
        inv_norm = None
        if layout.rule == "scaled_gd":
            _, _, inv_norm = _scaled_gd_norm([g.to(_compute_dtype(g.dtype)) for g in grads], hp["eps"], batched)
        new_params, new_slots = [], [[] for _ in range(layout.n_slots)]
        for i, (p, g) in enumerate(zip(params, grads)):
            dtype = _compute_dtype(p.dtype)
            g32 = g.to(dtype)
            t_i = _per_edit(t1, g32, batched)
            ctx_i = None if inv_norm is None else _per_edit(inv_norm, g32, batched)
            old = [slots[j][i] for j in range(layout.n_slots)]
            delta, new = _rule_fwd(layout.rule, g32, old, t_i, hp, ctx_i)
            new_params.append(_keep(active, (p.to(dtype) - delta).to(p.dtype), p, batched))
            for j in range(layout.n_slots):
                new_slots[j].append(_keep(active, new[j], old[j], batched))
        return tuple(new_params) + tuple(s for per_slot in new_slots for s in per_slot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        layout, tensors = inputs[0], inputs[1:]
        params, grads, slots, t, active, hp, hp_index = _unpack(layout, tensors)
        needs = ctx.needs_input_grad[1:]
        hp_needs = {name: needs[i] for name, i in hp_index.items()}
        ctx.layout, ctx.hp_needs = layout, hp_needs
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.param_shapes = [p.shape for p in params]
        ctx.grad_dtypes = [g.dtype for g in grads]
        ctx.grads_need = [needs[layout.n + i] for i in range(layout.n)]
        ctx.set_materialize_grads(False)  # unused outputs (e.g. the last step's state) stay None
        rule = layout.rule
        # Saved: inputs only (θ never: its Jacobian is the identity), so double backward is exact:
        #   gd, rprop: g only if lr needs a gradient;  scaled_gd: g (its norm is recomputed);
        #   momentum: g if lr needs a gradient, v_old if momentum does;
        #   rmsprop: g, s_old;  adam: g, m_old, v_old;  always t, active and the tensor hparams.
        # Recomputed in backward: g², s', √(s'+ε) (RMSProp); m', v', the bias corrections, m̂, v̂, √v̂
        # (Adam); ‖g‖ and 1/max(‖g‖, ε) (ScaledGD): a few elementwise ops instead of the 3–8 tensors
        # per parameter tensor and step that autograd keeps for Editor.step's op chain.
        lr_needed = hp_needs.get("lr", False)
        keep_g = {"gd": lr_needed, "rprop": lr_needed, "momentum": lr_needed}.get(rule, True)
        saved_g = grads if keep_g else [None] * layout.n
        if rule == "momentum":
            saved_slots = slots[0] if hp_needs.get("momentum", False) else [None] * layout.n
        else:
            saved_slots = [s for per_slot in slots for s in per_slot]
        ctx.n_saved_slots = len(saved_slots)
        ctx.save_for_backward(*saved_g, *saved_slots, t, active, *(hp[name] for name in hp_index))

    @staticmethod
    def backward(ctx, *grad_outputs):
        layout = ctx.layout
        n, k, batched, rule = layout.n, layout.n_slots, layout.batched, layout.rule
        saved = ctx.saved_tensors
        n_s = ctx.n_saved_slots
        grads, flat_slots = list(saved[:n]), list(saved[n:n + n_s])
        t, active = saved[n + n_s], saved[n + n_s + 1]
        it = iter(saved[n + n_s + 2:])
        hp = {name: (next(it) if const is None else const) for name, const in zip(layout.hp_names, layout.hp_const)}
        hp_needs = ctx.hp_needs
        old_slots = [flat_slots] if rule == "momentum" else [flat_slots[j * n:(j + 1) * n] for j in range(k)]
        g_out, s_out = grad_outputs[:n], grad_outputs[n:]
        if all(x is None for x in grad_outputs):
            n_hp = sum(const is None for const in layout.hp_const)
            return (None,) * (1 + 2 * n + k * n + 1 + layout.has_active + n_hp)
        t1 = t + 1                                   # this step's number, per edit ([E] or 0-dim)
        sums: dict = {}                              # hparam name -> per-edit partial sums

        def add(name, per_edit_value):
            if hp_needs.get(name, False):
                sums[name] = per_edit_value if name not in sums else sums[name] + per_edit_value

        def esum(x):                                 # per-edit sum over all but the edit dim
            return x.sum(dim=_dims(x, batched))

        def edot(a, b):                              # per-edit ⟨a, b⟩
            if batched:
                return torch.linalg.vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
            return torch.dot(a.reshape(-1), b.reshape(-1))

        def pe(v, like):                             # a per-edit value, broadcastable against `like`
            return _per_edit(v, like, batched)

        def upstream(i):
            """(dtype, go, gs): ∂L/∂θ' in the compute dtype (= −∂L/∂δ) and ∂L/∂(new slot j), both
            zeroed where the edit is inactive (there the step is the identity); None when unused."""
            dtype = _compute_dtype(ctx.param_dtypes[i])
            go = g_out[i]
            if go is None:  # θ' unused but the new state used: rare, so simply zeros
                go = torch.zeros(ctx.param_shapes[i], dtype=dtype, device=t.device)
            go = go.to(dtype)
            if active is not None:
                go = torch.where(pe(active, go), go, 0.0)
            gs = []
            for j in range(k):
                x = s_out[j * n + i]
                gs.append(x if x is None or active is None else torch.where(pe(active, x), x, 0.0))
            return dtype, go, gs

        def plus(a, b):
            return b if a is None else a + b

        d_grads: list = [None] * n
        d_slots: list = [None] * (k * n)

        def set_grad(i, dg):
            if dg is not None and ctx.grads_need[i]:
                d_grads[i] = dg.to(ctx.grad_dtypes[i])  # zero where inactive: go and gs are

        def set_slots(i, d_old):
            """Old slot j: the rule's gradient where the edit is active, the incoming one where not."""
            for j in range(k):
                incoming = s_out[j * n + i]
                if active is None or incoming is None:
                    d_slots[j * n + i] = d_old[j]
                else:
                    d_slots[j * n + i] = torch.where(pe(active, d_old[j]), d_old[j], incoming)

        lr = hp["lr"]
        if rule == "scaled_gd":
            g32s = [grads[i].to(_compute_dtype(ctx.param_dtypes[i])) for i in range(n)]
            sq, norm, inv = _scaled_gd_norm(g32s, hp["eps"], batched)
            gos = [upstream(i)[1] for i in range(n)]
            # δ = lr·g·inv with inv = 1/max(‖g‖, eps) per edit; a = Σ_tensors ⟨g, go⟩ = −Σ ⟨g, ∂L/∂δ⟩
            a = sum(edot(g, go) for g, go in zip(g32s, gos))
            add("lr", -(inv * a))
            d_clamped = lr * a * inv * inv                   # ∂L/∂max(‖g‖, eps)
            # clamp_min: the gradient goes to ‖g‖ where ‖g‖ ≥ eps (ties included, as torch), else to eps
            if hp_needs.get("eps", False):
                add("eps", torch.where(norm < hp["eps"], d_clamped, 0.0))
            d_norm = torch.where(norm >= hp["eps"], d_clamped, 0.0)
            # _safe_sqrt: zero derivative at 0 (then every g is 0 and the clamp is active anyway)
            positive = sq > 0
            d_sq2 = torch.where(positive, d_norm / torch.where(positive, norm, 1.0), 0.0)  # 2·∂L/∂Σg²
            for i in range(n):
                if ctx.grads_need[i]:
                    g = g32s[i]
                    set_grad(i, torch.addcmul(gos[i] * pe(-(lr * inv), g), g, pe(d_sq2, g)))
        else:
            for i in range(n):
                dtype, go, gs = upstream(i)
                g = None if grads[i] is None else grads[i].to(dtype)
                old = [old_slots[j][i] for j in range(len(old_slots))]
                if rule == "gd":                                  # δ = lr·g
                    set_grad(i, go * (-lr))
                    if g is not None:
                        add("lr", -edot(g, go))
                elif rule == "rprop":                             # δ = lr·sign(g)
                    # sign has zero derivative (a.e.): g gets none, lr gets ⟨sign g, ∂L/∂δ⟩
                    if g is not None:
                        add("lr", -edot(torch.sign(g), go))
                elif rule == "momentum":                          # v' = lr·g + μ·v, δ = v'
                    d_v = plus(gs[0], -go)
                    set_grad(i, d_v * lr)
                    set_slots(i, [d_v * hp["momentum"]])
                    if g is not None:
                        add("lr", edot(g, d_v))
                    if old[0] is not None:
                        add("momentum", edot(old[0], d_v))
                elif rule == "rmsprop":
                    _rmsprop_bwd(hp, hp_needs, g, old[0], t1, go, gs[0], pe, edot, esum, add, set_grad, set_slots, i)
                elif rule == "adam":
                    _adam_bwd(hp, hp_needs, g, old[0], old[1], t1, go, gs, pe, edot, esum, add, set_grad,
                              set_slots, i)

        d_hp = []
        for name, const in zip(layout.hp_names, layout.hp_const):
            if const is None:
                ref = hp[name]
                value = sums.get(name)
                d_hp.append(None if value is None else value.sum().to(ref.dtype).reshape(ref.shape))
        d_t_active = [None, None] if layout.has_active else [None]
        return (None, *g_out, *d_grads, *d_slots, *d_t_active, *d_hp)


def _rmsprop_bwd(hp, hp_needs, g, s_old, t1, go, gs, pe, edot, esum, add, set_grad, set_slots, i):
    """s' = g² at the first step (t == 1), else β·s + (1−β)·g²; δ = lr·g / r with r = √(s' + eps)."""
    lr, beta, eps = hp["lr"], hp["beta"], hp["eps"]
    first = t1 == 1
    g2 = g * g
    s_new = torch.where(pe(first, g), g2, beta * s_old + (1 - beta) * g2)
    inv_r = torch.rsqrt(s_new + eps)                     # r > 0: eps > 0
    u = go * inv_r                                       # −∂L/∂δ / r
    ug = u * g
    add("lr", -esum(ug))
    d_inside = ug * (inv_r * inv_r) * (0.5 * lr)         # ∂L/∂(s' + eps): ∂δ/∂(s'+eps) = −δ / (2 r²)
    add("eps", esum(d_inside))
    d_s = d_inside if gs is None else gs + d_inside      # ∂L/∂s'
    # first step (t == 1): s' = g² does not depend on s_old or β. Per-edit coefficients, in g's dtype:
    # ∂s'/∂g² = 1 − [t>1]·β, ∂s'/∂s_old = [t>1]·β
    later_beta = (~first).to(g.dtype) * beta
    set_grad(i, torch.addcmul(u * (-lr), g, d_s * pe(2 * (1 - later_beta), g)))
    set_slots(i, [d_s * pe(later_beta, g)])
    if hp_needs.get("beta", False):
        add("beta", torch.where(first, 0.0, edot(d_s, s_old - g2)))


def _adam_bwd(hp, hp_needs, g, m_old, v_old, t1, go, gs, pe, edot, esum, add, set_grad, set_slots, i):
    """m' = β₁m + (1−β₁)g, v' = β₂v + (1−β₂)g², m̂ = m'/(1−β₁ᵗ), v̂ = v'/(1−β₂ᵗ),
    δ = lr·m̂ / (√v̂ + eps) with _safe_sqrt (zero derivative where v̂ = 0)."""
    lr, beta1, beta2, eps = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"]
    bc1, bc2 = 1 - beta1 ** t1, 1 - beta2 ** t1          # per edit
    m = beta1 * m_old + (1 - beta1) * g
    g2 = g * g
    v = beta2 * v_old + (1 - beta2) * g2
    m_hat = m * pe(1 / bc1, g)
    v_hat = v * pe(1 / bc2, g)
    positive = v_hat > 0
    q_safe = torch.sqrt(torch.where(positive, v_hat, 1.0))
    q = torch.where(positive, q_safe, 0.0)
    inv_den = 1 / (q + eps)
    u = go * inv_den                                     # −∂L/∂δ / den
    um = u * m_hat
    add("lr", -esum(um))
    d_den = um * inv_den * lr                            # ∂L/∂den = −∂L/∂δ · δ / den; also ∂L/∂eps
    add("eps", esum(d_den))
    d_vhat2 = torch.where(positive, d_den / q_safe, 0.0)  # 2·∂L/∂v̂ (√ has derivative 1/(2√v̂))
    d_m = torch.addcmul(gs[0], u, pe(-lr / bc1, g)) if gs[0] is not None else u * pe(-lr / bc1, g)
    d_v = torch.addcmul(gs[1], d_vhat2, pe(0.5 / bc2, g)) if gs[1] is not None else d_vhat2 * pe(0.5 / bc2, g)
    set_grad(i, torch.addcmul(d_m * (1 - beta1), g, d_v * (2 * (1 - beta2))))
    set_slots(i, [d_m * beta1, d_v * beta2])
    # β enters the moment update and the bias correction 1 − βᵗ (∂/∂β = −t·β^(t−1)):
    #   Σ ∂L/∂bc1 = Σ −∂L/∂m̂ · m̂ / bc1 = lr·Σ(u·m̂)/bc1;  Σ ∂L/∂bc2 = −Σ ∂L/∂v̂ · v̂ / bc2 = −½Σ(∂L/∂den·q)/bc2
    if hp_needs.get("beta1", False):
        d_bc1 = lr * esum(um) / bc1
        add("beta1", edot(d_m, m_old - g) - d_bc1 * t1 * beta1 ** (t1 - 1))
    if hp_needs.get("beta2", False):
        d_bc2 = -0.5 * edot(d_den, q) / bc2
        add("beta2", edot(d_v, v_old - g2) - d_bc2 * t1 * beta2 ** (t1 - 1))


# ------------------------------------------------------------------------------------------------
# the public function
# ------------------------------------------------------------------------------------------------
def _hparams(editor: Editor, names: tuple) -> dict:
    values = {}
    for name in names:
        if name in ("beta1", "beta2"):
            values[name] = editor.betas[0 if name == "beta1" else 1]
        else:
            values[name] = getattr(editor, name)
    return values


def editor_step(editor: Editor, params: Tensor | Sequence[Tensor], grads: Tensor | Sequence[Tensor],
                state: EditorState, active: Tensor | None = None, *, batched: bool = False):
    """``editor.step(params, grads, state, active, batched=batched)`` as one autograd node.

    Same arguments, values and derivatives as :meth:`fastedit.editors.Editor.step`; the backward is
    in closed form and saves only a few of the step's inputs (see ``_EditorStep.setup_context``).
    Composes with ``torch.func.grad``/``vmap`` (any nesting), double backward and ``torch.compile``.
    Editors other than the six built-in classes run their own ``step``.
    """
    if type(editor) not in RULES:
        return editor.step(params, grads, state, active, batched=batched)
    rule, slot_names, hp_names = editor.name, editor.slots, _HPARAMS[editor.name]
    single = isinstance(params, Tensor)
    params = [params] if single else list(params)
    grads = [grads] if isinstance(grads, Tensor) else list(grads)
    editor._check_inputs(params, grads, state, active, batched)
    hp = _hparams(editor, hp_names)
    hp_const = tuple(None if isinstance(v, Tensor) else float(v) for v in hp.values())
    layout = _Layout(rule, batched, len(params), len(slot_names), active is not None, hp_names, hp_const)
    t_old = state["t"]
    tensors = [*params, *grads, *(s for name in slot_names for s in state[name]), t_old]
    if active is not None:
        tensors.append(active)
    tensors += [v for v in hp.values() if isinstance(v, Tensor)]
    out = _EditorStep.apply(layout, *tensors)
    n = len(params)
    new_params = list(out[:n])
    new_state: EditorState = {"t": t_old + 1 if active is None else t_old + active.to(t_old.dtype)}
    for j, name in enumerate(slot_names):
        new_state[name] = list(out[n + j * n: n + (j + 1) * n])
    return (new_params[0] if single else new_params), new_state


# ================================================================================================
# Python part of the compiled op (fastedit.ops registers it once fastedit._C is imported)
# ================================================================================================
def _fake(params, grads, slot1, slot2, t, active, inv_norm, masks, rule, lr, beta1, beta2, eps, batched,
          names=None) -> None:
    # In place, no outputs: nothing to allocate. The checks that need no data (lengths, dtypes)
    # run here too, so torch.compile rejects what the kernels would reject.
    torch._check(len(grads) == len(params),
                 lambda: f"fastedit::editor_step_: {len(params)} parameter tensors but {len(grads)} gradients")
    torch._check(rule in _KNOWN_RULE_IDS, lambda: f"fastedit::editor_step_: unknown rule id {rule}")
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


#: What fastedit.ops registers for ``fastedit::editor_step_`` once the op exists.
PYTHON_PARTS = {"fake": _fake}
