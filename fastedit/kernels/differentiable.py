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

Values
    The forward evaluates the reference's expressions in the reference's order, so new parameters
    and state are bit-identical to ``Editor.step`` (tested in float64, float32 and bf16 parameters
    with fp32 state). The backward's own arithmetic (e.g. ``rsqrt`` instead of ``1/sqrt``, per-edit
    dot products) differs from autograd's only by round-off.

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
