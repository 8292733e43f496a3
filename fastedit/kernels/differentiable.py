"""The differentiable editor step: :meth:`fastedit.editors.Editor.step` with a closed-form backward.

``editor_step(editor, params, grads, state, active=None, *, batched=False)`` has exactly the
signature, the values and the derivatives of ``editor.step(params, grads, state, active,
batched=batched)`` for the six editors (GD, ScaledGD, RProp/SignGD, RMSProp, Momentum, Adam); other
``Editor`` subclasses fall back to their own ``step``.

Why an ``autograd.Function`` (DESIGN.md §3)
    The reference step is a chain of elementwise ops, and autograd records every intermediate of
    it (``g²``, ``√(s+ε)``, ``m̂``, ``v̂``, …) for each of the ``k`` unrolled steps of Editable
    Training. Here the whole step (all tensors of one edit) is one node that saves only some of
    its *inputs* (listed per rule below) and recomputes the few elementwise intermediates in
    backward. A ``torch.library.custom_op`` with ``register_autograd`` would not work under
    ``torch.func.grad``/``grad(grad)``/``vmap(grad)``; an ``autograd.Function`` with a separate
    ``setup_context`` and ``generate_vmap_rule=True`` works under all of them.

Double backward
    ``backward`` is written in differentiable torch ops on saved *inputs* only (never on tensors
    made in ``forward``, which would be constants to the second differentiation), so
    ``grad(grad)`` and ``create_graph=True`` are exact.

Gradients flow to the parameters (identity), the gradients ``g`` (the second-order path of Editable
Training), the state slots and every hyper-parameter given as a tensor (floats are constants). The
step counter ``t`` and ``active`` get none. Where ``active`` is False the step is the identity: the
incoming gradient passes unchanged to the old parameters and state, and ``g`` and the
hyper-parameters get zero from that edit.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..editors import (GD, Adam, Editor, EditorState, Momentum, RMSProp, RProp, ScaledGD, _compute_dtype,
                       _per_edit, _safe_sqrt)

__all__ = ["editor_step", "supports"]

# rule name, slot names and hyper-parameter names (Adam's ``betas`` split in two) per editor class
_RULES: dict[type, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    GD: ("gd", (), ("lr",)),
    ScaledGD: ("scaled_gd", (), ("lr", "eps")),
    RProp: ("rprop", (), ("lr",)),
    RMSProp: ("rmsprop", ("square_avg",), ("lr", "beta", "eps")),
    Momentum: ("momentum", ("velocity",), ("lr", "momentum")),
    Adam: ("adam", ("exp_avg", "exp_avg_sq"), ("lr", "beta1", "beta2", "eps")),
}


def supports(editor: Editor) -> bool:
    """Whether ``editor`` gets the closed-form backward (its exact class is one of the six)."""
    return type(editor) in _RULES


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


def _rmsprop_fwd(g, s, t, hp):
    g2 = g * g
    s = torch.where(t == 1, g2, hp["beta"] * s + (1 - hp["beta"]) * g2)
    r = torch.sqrt(s + hp["eps"])
    return hp["lr"] * g / r, s, r


def _adam_fwd(g, m, v, t, hp):
    beta1, beta2 = hp["beta1"], hp["beta2"]
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** t
    bc2 = 1 - beta2 ** t
    m_hat = m / bc1
    v_hat = v / bc2
    den = _safe_sqrt(v_hat) + hp["eps"]
    return hp["lr"] * m_hat / den, m, v, (bc1, bc2, m_hat, v_hat, den)


def _rule_fwd(rule: str, g, slots, t, hp, inv_norm):
    """``(delta, new_slots)`` for one tensor, as ``Editor._rule``."""
    if rule == "gd":
        return hp["lr"] * g, []
    if rule == "rprop":
        return hp["lr"] * torch.sign(g), []
    if rule == "scaled_gd":
        return hp["lr"] * g * inv_norm, []
    if rule == "rmsprop":
        delta, s, _ = _rmsprop_fwd(g, slots[0], t, hp)
        return delta, [s]
    if rule == "momentum":
        v = hp["lr"] * g + hp["momentum"] * slots[0]
        return v, [v]
    if rule == "adam":
        delta, m, v, _ = _adam_fwd(g, slots[0], slots[1], t, hp)
        return delta, [m, v]
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
        ctx.layout = layout
        ctx.hp_needs = hp_needs
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.grad_dtypes = [g.dtype for g in grads]
        ctx.grads_need = [needs[layout.n + i] for i in range(layout.n)]
        rule = layout.rule
        # Saved (inputs only; θ is never saved, its Jacobian is the identity):
        #   gd, rprop: g only if lr needs a gradient;  scaled_gd: g (the norm is recomputed);
        #   momentum: g if lr needs a gradient, v_old if momentum does;
        #   rmsprop: g, s_old;  adam: g, m_old, v_old;  always t, active and the tensor hparams.
        # Recomputed in backward: g², s_new, √(s+ε) (RMSProp); m, v, bias corrections, m̂, v̂, √v̂+ε
        # (Adam); ‖g‖ and 1/max(‖g‖, ε) (ScaledGD): a few elementwise ops instead of ~5 saved tensors
        # per parameter tensor and step.
        keep_g = {"gd": hp_needs.get("lr", False), "rprop": hp_needs.get("lr", False),
                  "momentum": hp_needs.get("lr", False)}.get(rule, True)
        saved_g = grads if keep_g else [None] * layout.n
        if rule == "momentum":
            saved_slots = slots[0] if hp_needs.get("momentum", False) else [None] * layout.n
        else:
            saved_slots = [s for per_slot in slots for s in per_slot]
        hp_tensors = [hp[name] for name in hp_index]
        ctx.n_saved_slots = len(saved_slots)
        ctx.save_for_backward(*saved_g, *saved_slots, t, active, *hp_tensors)

    @staticmethod
    def backward(ctx, *grad_outputs):
        layout = ctx.layout
        n, k, batched, rule = layout.n, layout.n_slots, layout.batched, layout.rule
        saved = ctx.saved_tensors
        grads = list(saved[:n])
        flat_slots = list(saved[n:n + ctx.n_saved_slots])
        t, active = saved[n + ctx.n_saved_slots], saved[n + ctx.n_saved_slots + 1]
        hp_tensors = saved[n + ctx.n_saved_slots + 2:]
        hp = {}
        it = iter(hp_tensors)
        for name, const in zip(layout.hp_names, layout.hp_const):
            hp[name] = next(it) if const is None else const
        hp_needs = ctx.hp_needs
        if rule == "momentum":
            old_slots = [flat_slots]
        else:
            old_slots = [flat_slots[j * n:(j + 1) * n] for j in range(k)]
        g_out, s_out = grad_outputs[:n], grad_outputs[n:]
        t1 = t + 1

        d_params = list(g_out)  # θ' = θ − δ (or θ where inactive): identity Jacobian either way
        d_grads: list = [None] * n
        d_slots: list = [None] * (k * n)
        d_hp = {name: None for name in hp_needs}

        def add_hp(name, contribution):
            if hp_needs.get(name, False):
                total = contribution.sum()
                d_hp[name] = total if d_hp[name] is None else d_hp[name] + total

        def mask(x, like):  # zero where the edit is inactive
            return x if active is None else torch.where(_per_edit(active, like, batched), x, torch.zeros_like(x))

        def compute(i):
            dtype = _compute_dtype(ctx.param_dtypes[i])
            gd_ = mask(-g_out[i].to(dtype), g_out[i])          # upstream of δ
            gs_ = [mask(s_out[j * n + i], s_out[j * n + i]) for j in range(k)]  # upstream of new slots
            return dtype, gd_, gs_

        def set_slot_grads(i, d_old):
            """Old slot j: the rule's gradient where the edit is active, the incoming one where not."""
            for j in range(k):
                d_slots[j * n + i] = _keep(active, d_old[j], s_out[j * n + i], batched)

        if rule == "scaled_gd":
            g32s = [grads[i].to(_compute_dtype(ctx.param_dtypes[i])) for i in range(n)]
            sq, norm, inv = _scaled_gd_norm(g32s, hp["eps"], batched)
            gds = [compute(i)[1] for i in range(n)]
            # A = Σ_tensors ⟨g, ∂L/∂δ⟩ per edit: δ = lr·g·inv, so ∂L/∂inv = lr·A and ∂L/∂lr = inv·A
            a = sum((g * d).sum(dim=_dims(g, batched)) for g, d in zip(g32s, gds))
            add_hp("lr", inv * a)
            d_clamped = -(hp["lr"] * a) * inv * inv             # ∂L/∂max(‖g‖, eps)
            # clamp_min: the gradient goes to ‖g‖ where ‖g‖ ≥ eps (ties included, as torch), else to eps
            if hp_needs.get("eps", False):
                add_hp("eps", torch.where(norm < hp["eps"], d_clamped, torch.zeros_like(d_clamped)))
            d_norm = torch.where(norm >= hp["eps"], d_clamped, torch.zeros_like(d_clamped))
            # _safe_sqrt: zero derivative at 0 (then every g is 0 and the clamp is active anyway)
            positive = sq > 0
            d_sq = torch.where(positive, d_norm / (2 * torch.where(positive, norm, torch.ones_like(norm))),
                               torch.zeros_like(d_norm))
            for i in range(n):
                if ctx.grads_need[i]:
                    g, d = g32s[i], gds[i]
                    dg = hp["lr"] * d * _per_edit(inv, g, batched) + 2 * g * _per_edit(d_sq, g, batched)
                    d_grads[i] = mask(dg, dg).to(ctx.grad_dtypes[i])
        else:
            for i in range(n):
                dtype, gd_, gs_ = compute(i)
                g = None if grads[i] is None else grads[i].to(dtype)
                t_i = _per_edit(t1, gd_, batched)
                old = [old_slots[j][i] for j in range(len(old_slots))]
                dg, d_old = None, [None] * k
                if rule == "gd":
                    dg = hp["lr"] * gd_
                    if g is not None:
                        add_hp("lr", g * gd_)
                elif rule == "rprop":
                    # sign has zero derivative (a.e.): g gets no gradient, lr gets ⟨sign g, ∂L/∂δ⟩
                    if g is not None:
                        add_hp("lr", torch.sign(g) * gd_)
                elif rule == "momentum":
                    # v' = lr·g + μ·v and δ = v'
                    d_v = gs_[0] + gd_
                    dg = hp["lr"] * d_v
                    d_old[0] = hp["momentum"] * d_v
                    if g is not None:
                        add_hp("lr", g * d_v)
                    if old[0] is not None:
                        add_hp("momentum", old[0] * d_v)
                elif rule == "rmsprop":
                    s_old = old[0]
                    delta, s_new, r = _rmsprop_fwd(g, s_old, t_i, hp)
                    add_hp("lr", gd_ * g / r)
                    # δ = lr·g / r with r = √(s' + eps) > 0 (eps > 0): ∂δ/∂(s'+eps) = −δ / (2 r²)
                    d_inside = -gd_ * delta / (2 * r * r)
                    add_hp("eps", d_inside)
                    d_s = gs_[0] + d_inside
                    # first step (t == 1): s' = g², independent of s_old and β
                    first = t_i == 1
                    d_g2 = torch.where(first, d_s, (1 - hp["beta"]) * d_s)
                    dg = hp["lr"] * gd_ / r + 2 * g * d_g2
                    zero = torch.zeros_like(d_s)
                    d_old[0] = torch.where(first, zero, hp["beta"] * d_s)
                    if hp_needs.get("beta", False):
                        add_hp("beta", torch.where(first, zero, d_s * (s_old - g * g)))
                elif rule == "adam":
                    m_old, v_old = old
                    beta1, beta2 = hp["beta1"], hp["beta2"]
                    delta, m, v, (bc1, bc2, m_hat, v_hat, den) = _adam_fwd(g, m_old, v_old, t_i, hp)
                    add_hp("lr", gd_ * m_hat / den)
                    d_mhat = gd_ * hp["lr"] / den
                    d_den = -gd_ * delta / den                   # δ = lr·m̂ / (√v̂ + eps)
                    add_hp("eps", d_den)
                    # _safe_sqrt: zero derivative where v̂ == 0 (the update does not depend on it there)
                    positive = v_hat > 0
                    q = torch.where(positive, torch.sqrt(torch.where(positive, v_hat, torch.ones_like(v_hat))),
                                    torch.ones_like(v_hat))
                    d_vhat = torch.where(positive, d_den / (2 * q), torch.zeros_like(d_den))
                    d_m = gs_[0] + d_mhat / bc1
                    d_v = gs_[1] + d_vhat / bc2
                    dg = (1 - beta1) * d_m + (1 - beta2) * 2 * g * d_v
                    d_old = [beta1 * d_m, beta2 * d_v]
                    # β enters the moment update and the bias correction 1 − β^t (∂/∂β = −t·β^(t−1))
                    if hp_needs.get("beta1", False):
                        d_bc1 = -d_mhat * m_hat / bc1
                        add_hp("beta1", d_m * (m_old - g) - d_bc1 * t_i * beta1 ** (t_i - 1))
                    if hp_needs.get("beta2", False):
                        d_bc2 = -d_vhat * v_hat / bc2
                        add_hp("beta2", d_v * (v_old - g * g) - d_bc2 * t_i * beta2 ** (t_i - 1))
                if dg is not None and ctx.grads_need[i]:
                    d_grads[i] = mask(dg, dg).to(ctx.grad_dtypes[i])
                if k:
                    set_slot_grads(i, d_old)

        d_hp_list = []
        for name, const in zip(layout.hp_names, layout.hp_const):
            if const is None:
                value = d_hp.get(name)
                ref = hp[name]
                d_hp_list.append(None if value is None else value.to(ref.dtype).reshape(ref.shape))
        d_t_active = [None, None] if layout.has_active else [None]
        return (None, *d_params, *d_grads, *d_slots, *d_t_active, *d_hp_list)


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
    if type(editor) not in _RULES:
        return editor.step(params, grads, state, active, batched=batched)
    rule, slot_names, hp_names = _RULES[type(editor)]
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
