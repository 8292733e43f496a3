"""Editors: the update rules of Editable Neural Networks (Sinitsin et al., 2020, Table 1).

An editor is a plain object holding hyper-parameters, like a ``torch.optim`` optimizer without the
parameters. Its :meth:`Editor.step` is *functional* and *differentiable*: it takes a list of
parameter tensors, their gradients and the editor state, and returns new tensors without touching
its inputs, so the same code serves a plain edit, a batch of independent edits and the unrolled
meta-gradient of Editable Training.

Shapes
    ``params`` is a list of tensors (or one tensor: a flat buffer). With ``batched=True`` every tensor
    carries a leading edit dimension ``E``: ``E`` independent edits of the same parameters, side by
    side. Per-edit reductions (the norm of Scaled GD) then run per edit.

Early stopping without host synchronisation
    ``active`` is a boolean tensor, ``[E]`` when batched, 0-dim otherwise. Where it is False the step
    is the identity for that edit: parameters *and* state keep their values bit for bit, and the
    edit's step counter does not advance. Running ``k`` steps with ``active = l_e > 0`` computed on
    the device therefore gives exactly the early-stopped result.

Precision
    Updates are computed in float32 (float64 for float64 parameters) and cast back to the
    parameter's dtype; the state (moments, step counts) is float32/float64. fp16/bf16 parameters
    thus get fp32 state, as in the fused kernels.

Hyper-parameters may be Python floats or tensors (e.g. learnable, in Editable Training).

Defaults
    Every hyper-parameter has a default, so ``fe.edit(model, x, y, editor="gd")`` and
    ``fe.GD()`` work. The learning rates of GD, Scaled GD, RProp, Momentum and Adam are the ones
    :func:`fastedit.tune` chose for the pretrained CIFAR ResNet-20 with ``layer3`` editable (the
    paper's protocol: least drawdown with ≥ 95% success within k = 10 steps, 1,000 reported edits,
    tuning edits from training images; README "The paper's editor comparison (Table 1)",
    ``benchmarks/results/evaluation/cells/resnet20_layer3_<editor>.json``). RMSProp keeps the
    official Editable code's ``lr = 1e-3, β = 0.5``. The other defaults (``eps``, Momentum's
    ``μ = 0.9``, Adam's ``betas = (0.5, 0.999)``) are those the tuning runs used. A learning rate
    suits one model and one choice of editable parameters: for others, search it with
    :func:`fastedit.tune`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ._validate import check_real

__all__ = [
    "Editor", "GD", "ScaledGD", "RProp", "SignGD", "RMSProp", "Momentum", "Adam",
    "EDITORS", "make_editor", "TUNED_LR",
]

#: lr ≈ 3.16e-4 (10^-3.5, a point of :data:`fastedit.tuning.DEFAULT_LRS`): the learning rate
#: :func:`fastedit.tune` chose for GD, RProp and Adam on the pretrained ResNet-20's ``layer3`` (see
#: "Defaults" above)
TUNED_LR: float = 10.0 ** -3.5

EditorState = dict  # {"t": Tensor, <slot name>: list[Tensor], ...}; a pytree, so torch.func sees through it


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_edit(value: Tensor, like: Tensor, batched: bool) -> Tensor:
    """Reshape a per-edit tensor ``[E]`` (or 0-dim) so it broadcasts against ``like``."""
    if batched:
        return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))
    return value


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x ≥ 0`` whose derivative at 0 is 0 instead of ∞.

    Where a rule takes ``sqrt`` of an accumulated square that is exactly 0 (a coordinate whose
    gradient has been 0 so far: behind a dead ReLU, or a satisfied edit whose masked step still
    runs), the update does not depend on it, so 0 is the right derivative; plain ``sqrt`` would give
    0·∞ = NaN in second-order (Editable Training) gradients.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _keep_inactive(active: Tensor | None, new: Tensor, old: Tensor, batched: bool) -> Tensor:
    if active is None:
        return new
    return torch.where(_per_edit(active, new, batched), new, old)


def _check_positive(name: str, value: Any) -> None:
    """A positive, finite hyper-parameter (a number or a one-element tensor), checked once, at
    construction: a tensor is read here and never in a step."""
    check_real(name, value, 0.0, math.inf, low_open=True, high_open=True, tensor_ok=True)


class Editor:
    """Base class. Subclasses define ``slots`` (state tensors per parameter) and :meth:`_rule`."""

    name: str = "editor"
    slots: tuple[str, ...] = ()
    hyperparameter_names: tuple[str, ...] = ("lr",)

    # -- hyper-parameters ------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters, as stored (floats or tensors)."""
        return {k: getattr(self, k) for k in self.hyperparameter_names}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: ``{"editor": name, **hyper-parameters as floats}``."""
        out: dict[str, Any] = {"editor": self.name}
        for k, v in self.hparams().items():
            if isinstance(v, Tensor):
                v = v.detach().cpu().tolist()
            elif isinstance(v, tuple):
                v = [float(x.detach()) if isinstance(x, Tensor) else x for x in v]
            out[k] = v
        return out

    def with_hparams(self, **changes: Any) -> "Editor":
        """A copy with some hyper-parameters replaced (validated again)."""
        values = self.hparams()
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"{self.name} has no hyper-parameter(s) {sorted(unknown)}; "
                             f"it has {list(values)}")
        values.update(changes)
        return type(self)(**values)

    @classmethod
    def from_trusted(cls, **hparams: Any) -> "Editor":
        """An editor from hyper-parameters known to be valid (e.g. tensors produced by a bounded
        parametrisation in Editable Training): no range checks, so no host synchronisation."""
        obj = cls.__new__(cls)
        obj.__dict__.update(hparams)
        return obj

    def __repr__(self) -> str:
        def fmt(v):
            if isinstance(v, Tensor):
                return f"tensor({v.detach().cpu().tolist()})"
            return repr(v)
        args = ", ".join(f"{k}={fmt(v)}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]

    # -- state -----------------------------------------------------------------------------------
    def init_state(self, params: Tensor | Sequence[Tensor], *, batched: bool = False) -> EditorState:
        """Zero state for ``params``: per-slot lists of float32/float64 zeros and a step count ``t``.

        ``t`` counts the steps each edit has taken (``[E]`` when batched, 0-dim otherwise).
        """
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ValueError("init_state needs at least one parameter tensor")
        first = params[0]
        if batched and first.dim() == 0:
            raise ValueError("batched=True needs a leading edit dimension on every tensor")
        t_shape = (first.shape[0],) if batched else ()
        state: EditorState = {"t": torch.zeros(t_shape, dtype=_compute_dtype(first.dtype), device=first.device)}
        for slot in self.slots:
            state[slot] = [torch.zeros(p.shape, dtype=_compute_dtype(p.dtype), device=p.device) for p in params]
        return state

    # -- the update --------------------------------------------------------------------------------
    def step(self, params: Tensor | Sequence[Tensor], grads: Tensor | Sequence[Tensor], state: EditorState,
             active: Tensor | None = None, *, batched: bool = False):
        """One editor step. Returns ``(new_params, new_state)``; inputs are not modified.

        ``params``/``grads``: lists of equally shaped tensors (or single tensors: a flat buffer, in
        which case a single tensor is returned). ``active``: optional bool mask (``[E]`` if batched,
        else 0-dim); inactive edits keep parameters and state unchanged.
        """
        single = isinstance(params, Tensor)
        params = [params] if single else list(params)
        grads = [grads] if isinstance(grads, Tensor) else list(grads)
        self._check_inputs(params, grads, state, active, batched)

        t_old = state["t"]
        t = t_old + 1  # the step number this step would be (1-based), per edit
        context = self._prepare(grads, batched)
        new_params: list[Tensor] = []
        new_state: EditorState = {"t": t_old, **{slot: [] for slot in self.slots}}  # init_state's key order
        for i, (p, g) in enumerate(zip(params, grads)):
            dtype = _compute_dtype(p.dtype)
            g32 = g.to(dtype)
            t_i = _per_edit(t, g32, batched)
            ctx_i = None if context is None else _per_edit(context, g32, batched)
            old_slots = [state[slot][i] for slot in self.slots]
            delta, slots = self._rule(g32, old_slots, t_i, ctx_i)
            p_new = (p.to(dtype) - delta).to(p.dtype)
            new_params.append(_keep_inactive(active, p_new, p, batched))
            for slot, new, old in zip(self.slots, slots, old_slots):
                new_state[slot].append(_keep_inactive(active, new, old, batched))
        new_state["t"] = t if active is None else t_old + active.to(t_old.dtype)
        return (new_params[0] if single else new_params), new_state

    def _prepare(self, grads: list[Tensor], batched: bool) -> Tensor | None:
        """Per-edit quantities needing all gradients (Scaled GD's norm). None by default."""
        return None

    def _rule(self, g: Tensor, slots: list[Tensor], t: Tensor, context: Tensor | None):
        """Elementwise rule: returns ``(delta, new_slots)`` with ``θ_new = θ - delta``."""
        raise NotImplementedError

    def _check_inputs(self, params, grads, state, active, batched):
        if len(params) != len(grads):
            raise ValueError(f"{len(params)} parameter tensors but {len(grads)} gradients")
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.shape != g.shape:
                raise ValueError(f"parameter {i} has shape {tuple(p.shape)} but its gradient {tuple(g.shape)}")
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} has dtype {p.dtype}; editors need floating point")
        for slot in self.slots:
            if slot not in state or len(state[slot]) != len(params):
                raise ValueError(f"editor state does not match the parameters (slot {slot!r}); "
                                 "create it with init_state(params)")
        if batched:
            e = params[0].shape[0] if params[0].dim() else None
            if e is None or any(p.dim() == 0 or p.shape[0] != e for p in params):
                raise ValueError("batched=True needs the same leading edit dimension on every tensor")
            if active is not None and tuple(active.shape) != (e,):
                raise ValueError(f"active must have shape ({e},) for {e} edits, got {tuple(active.shape)}")
        elif active is not None and active.dim() != 0:
            raise ValueError(f"active must be a 0-dim bool tensor for a single edit, got shape {tuple(active.shape)}")
        if active is not None and active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got {active.dtype}")


class GD(Editor):
    """Gradient descent: ``θ ← θ − lr·g``.

    Default ``lr = 10^-3.5 ≈ 3.16e-4`` (:data:`TUNED_LR`): tuned on the pretrained ResNet-20's
    ``layer3`` (module docstring, "Defaults")."""

    name = "gd"

    def __init__(self, lr: float | Tensor = TUNED_LR):
        _check_positive("lr", lr)
        self.lr = lr

    def _rule(self, g, slots, t, context):
        return self.lr * g, []


class ScaledGD(Editor):
    """Gradient descent with a normalised step: ``θ ← θ − lr·g / max(‖g‖₂, eps)``.

    ``‖g‖₂`` is the global L2 norm of the gradient over *all* editable parameters of one edit (per
    edit when batched), so every step moves the parameters by exactly ``lr`` in L2 (unless the
    gradient is smaller than ``eps``).

    Default ``lr = 0.1``: tuned on the pretrained ResNet-20's ``layer3`` (module docstring,
    "Defaults"); also the default editor of :func:`fastedit.surgery`.
    """

    name = "scaled_gd"
    hyperparameter_names = ("lr", "eps")

    def __init__(self, lr: float | Tensor = 0.1, eps: float = 1e-12):
        _check_positive("lr", lr)
        _check_positive("eps", eps)
        self.lr, self.eps = lr, eps

    def _prepare(self, grads, batched):
        dims = lambda g: tuple(range(1, g.dim())) if batched else tuple(range(g.dim()))  # noqa: E731
        sq = sum(g.to(_compute_dtype(g.dtype)).pow(2).sum(dim=dims(g)) for g in grads)
        return _safe_sqrt(sq).clamp_min(self.eps).reciprocal()

    def _rule(self, g, slots, t, inv_norm):
        return self.lr * g * inv_norm, []


class RProp(Editor):
    """Sign gradient descent (the paper's "RProp"): ``θ ← θ − lr·sign(g)``.

    ``sign`` has zero derivative, so in Editable Training the step's Jacobian w.r.t. θ is the
    identity.

    Default ``lr = 10^-3.5 ≈ 3.16e-4`` (:data:`TUNED_LR`): tuned on the pretrained ResNet-20's
    ``layer3`` (module docstring, "Defaults").
    """

    name = "rprop"

    def __init__(self, lr: float | Tensor = TUNED_LR):
        _check_positive("lr", lr)
        self.lr = lr

    def _rule(self, g, slots, t, context):
        return self.lr * torch.sign(g), []


SignGD = RProp


class RMSProp(Editor):
    """RMSProp as in the official Editable code: ``s₀ = g₀²``, ``s ← β·s + (1−β)·g²``,
    ``θ ← θ − lr·g / √(s + eps)`` (eps inside the root). The first step is ≈ ``lr·sign(g)``.

    Defaults ``lr = 1e-3, beta = 0.5, eps = 1e-6``: the official Editable code's (the tuned value
    on the pretrained ResNet-20's ``layer3`` is ``lr ≈ 3.16e-4``, β = 0.5).
    """

    name = "rmsprop"
    slots = ("square_avg",)
    hyperparameter_names = ("lr", "beta", "eps")

    def __init__(self, lr: float | Tensor = 1e-3, beta: float | Tensor = 0.5, eps: float | Tensor = 1e-6):
        _check_positive("lr", lr)
        check_real("beta", beta, 0.0, 1.0, tensor_ok=True)
        _check_positive("eps", eps)
        self.lr, self.beta, self.eps = lr, beta, eps

    def _rule(self, g, slots, t, context):
        (s,) = slots
        g2 = g * g
        s = torch.where(t == 1, g2, self.beta * s + (1 - self.beta) * g2)
        return self.lr * g / torch.sqrt(s + self.eps), [s]


class Momentum(Editor):
    """Momentum: ``v₀ = 0``, ``v ← lr·g + μ·v``, ``θ ← θ − v``.

    Defaults ``lr = 1e-4`` (tuned on the pretrained ResNet-20's ``layer3``, module docstring,
    "Defaults") and ``momentum = 0.9``."""

    name = "momentum"
    slots = ("velocity",)
    hyperparameter_names = ("lr", "momentum")

    def __init__(self, lr: float | Tensor = 1e-4, momentum: float | Tensor = 0.9):
        _check_positive("lr", lr)
        check_real("momentum", momentum, 0.0, 1.0, high_open=True, tensor_ok=True)
        self.lr, self.momentum = lr, momentum

    def _rule(self, g, slots, t, context):
        (v,) = slots
        v = self.lr * g + self.momentum * v
        return v, [v]


class Adam(Editor):
    """Adam (Kingma & Ba) with bias correction: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``θ ← θ − lr·m̂ / (√v̂ + eps)``.

    β₁ is restricted to [0.1, 1) as in the paper (β₁ = 1 would leave m at zero and make m̂ = 0/0);
    β₂ to [0, 1).

    Defaults ``lr = 10^-3.5 ≈ 3.16e-4`` (:data:`TUNED_LR`, tuned on the pretrained ResNet-20's
    ``layer3``, module docstring, "Defaults"), ``betas = (0.5, 0.999)``, ``eps = 1e-8``.
    """

    name = "adam"
    slots = ("exp_avg", "exp_avg_sq")
    hyperparameter_names = ("lr", "betas", "eps")

    def __init__(self, lr: float | Tensor = TUNED_LR, betas: tuple = (0.5, 0.999), eps: float | Tensor = 1e-8):
        _check_positive("lr", lr)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_real("beta1", betas[0], 0.1, 1.0, high_open=True, tensor_ok=True)
        check_real("beta2", betas[1], 0.0, 1.0, high_open=True, tensor_ok=True)
        _check_positive("eps", eps)
        self.lr, self.betas, self.eps = lr, tuple(betas), eps

    def _rule(self, g, slots, t, context):
        m, v = slots
        beta1, beta2 = self.betas
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        return self.lr * m_hat / (_safe_sqrt(v_hat) + self.eps), [m, v]


EDITORS: dict[str, type[Editor]] = {
    "gd": GD, "scaled_gd": ScaledGD, "rprop": RProp, "signgd": RProp,
    "rmsprop": RMSProp, "momentum": Momentum, "adam": Adam,
}


def make_editor(spec: str | Editor, **hparams: Any) -> Editor:
    """An editor from its name (``"rmsprop"``, ``"scaled-gd"``, …) and hyper-parameters (those not
    given take the class defaults, see the module docstring), or the editor itself (a copy with
    ``hparams`` replaced, if any)."""
    if isinstance(spec, Editor):
        return spec.with_hparams(**hparams) if hparams else spec
    key = str(spec).lower().replace("-", "_")
    if key not in EDITORS:
        raise ValueError(f"unknown editor {spec!r}; choose one of {sorted(EDITORS)}")
    return EDITORS[key](**hparams)
