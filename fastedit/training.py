"""Editable Training (Sinitsin et al. 2020, eq. 2): train a model so that later edits stay local.

    Obj(θ) = L_base(θ) + c_edit · L_edit(θ) + c_loc · L_loc(θ)
    L_edit = mean over edits of max(0, l_e(Edit_α^k(θ, l_e)))
    L_loc  = mean over edits of  mean over the batch of KL( p(y|x, θ) ‖ p(y|x, Edit_α^k(θ, l_e)) )

The gradient flows through the ``k`` unrolled editor steps (second order) into every model parameter
and into the editor's learnable hyper-parameters.

How one step of :class:`EditableTraining` computes it (and which BatchNorm mode each forward uses)
    1. ``L_base``: the batch through the frozen prefix and the suffix, in the module's own mode (train
       mode during training: batch statistics). This is the only forward that updates BatchNorm
       running statistics, so they move exactly once per training step, as in plain training.
    2. The edit: the edit input's prefix activations and the ``k`` editor steps run in **eval mode**
       (running statistics, no dropout), exactly as :func:`fastedit.edit` applies edits after
       training. Early stopping uses the active mask ``l_e > 0``: a satisfied edit's later steps are
       the identity, and on the CPU the loop also exits (same result, no wasted steps).
    3. ``L_loc`` (``loc_mode="shared"``, default): the suffix alone, with the edited parameters, on the
       *batch's prefix activations from step 1* (shared work, no second prefix pass), in the same
       BatchNorm mode as step 1 so both sides of the KL are normalised alike; its BatchNorm layers
       update throw-away copies of the running statistics. The reference distribution is step 1's
       detached prediction. ``loc_mode="eval"`` instead runs the batch in eval mode (one more prefix
       pass, forward and backward), comparing eval-mode predictions before and after the edit.

The reference distribution of ``L_loc`` is detached (a stop-gradient, as in the paper's code), so
with ``c_loc > 0`` the returned gradient is not the derivative of the reported objective's value.
Random ops in the suffix (dropout in train mode) draw different masks for ``L_base`` and ``L_loc``
with ``loc_mode="shared"``; use ``loc_mode="eval"`` for such models.

Under ``DistributedDataParallel`` each rank's eval-mode edits use the running statistics it has just
updated from its own part of the batch (DDP broadcasts buffers from rank 0 only at the next
forward), so with BatchNorm the objective differs slightly from a single-process run on the whole
batch; the parameters stay identical across ranks.

Closed-form editor steps (``closed_form=True``, default): each inner editor step is one autograd
node (:func:`fastedit.ops.editor_step`) whose backward is written out per rule and
saves only a few of the step's inputs, instead of autograd recording ``Editor.step``'s chain of
elementwise ops; same values and derivatives. Measured (ResNet-20 ``layer3``, RMSProp, ~6 inner
steps, batch 32, one thread): 21% fewer peak tensor bytes without rematerialisation, time unchanged
within noise (benchmarks/results/bench_editable_training_closed_form*.json).

Rematerialisation (``rematerialize=True``): each inner step is an ``autograd.Function`` that saves
only its inputs and recomputes itself (with ``torch.func.vjp``) during backward, so the unrolled
graph's intermediate activations are not kept. ``torch.utils.checkpoint`` cannot do this inside
``torch.func`` transforms (docs/design.md). Gradients are identical either way: both paths run the same
step function.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._core import (
    cached_entry,
    check_common,
    check_rows,
    eval_mode,
    math_attention,
    resolve_aliases,
    resolve_early_exit,
)
from .constraint import (
    IGNORE_INDEX,
    Classification,
    Constraint,
    TokenTargets,
    as_constraint,
    is_numpy,
    reduce_constraint,
    validate,
)
from .editors import Adam, Editor, RMSProp, make_editor
from .kept_logits import keep_labelled_logits
from .locality_kl import locality_kl
from .model_io import ModelInputs, OutputSpec, read_logits, resolve_output
from .ops.editor_step import editor_step, supports
from .selection import ParamSpec, select_parameters

__all__ = ["EditableTraining", "LearnableEditor"]


# ------------------------------------------------------------------------------------------------
# learnable hyper-parameters
# ------------------------------------------------------------------------------------------------
# name -> (raw -> constrained value, constrained value -> raw, parameter name); raw is unconstrained
_UNIT = 1e-6  # sigmoid-mapped values stay in [1e-6, 1 - 1e-6]: a saturated sigmoid must not give 1.0


def _logit(v: float, low: float = 0.0, high: float = 1.0) -> float:
    u = min(max((v - low) / (high - low), _UNIT), 1 - _UNIT)
    return math.log(u / (1 - u))


def _unit(r: Tensor) -> Tensor:
    return torch.sigmoid(r).clamp(_UNIT, 1 - _UNIT)


_TRANSFORMS = {
    "lr": (lambda r: r.exp(), math.log, "log_lr"),
    "eps": (lambda r: r.exp(), math.log, "log_eps"),
    "beta": (_unit, _logit, "logit_beta"),
    "momentum": (_unit, _logit, "logit_momentum"),
    "beta1": (lambda r: 0.1 + 0.9 * _unit(r), lambda v: _logit(v, 0.1, 1.0), "logit_beta1"),
    "beta2": (_unit, _logit, "logit_beta2"),
}


def _flat_hparams(editor: Editor) -> dict[str, float]:
    values = {}
    for k, v in editor.hparams().items():
        if k == "betas":
            values["beta1"], values["beta2"] = (float(b) for b in v)
        else:
            values[k] = float(v)
    return values


class LearnableEditor(nn.Module):
    """An editor whose chosen hyper-parameters are ``nn.Parameter``s in unconstrained coordinates:
    ``lr`` and ``eps`` in log space, ``beta``/``momentum``/``beta2`` through a sigmoid, Adam's
    ``beta1`` as ``0.1 + 0.9·sigmoid`` (its [0.1, 1) range).

    ``learn``: names of the hyper-parameters to learn (default, as the paper: ``("beta",)`` for
    RMSProp, ``("lr",)`` otherwise); ``()`` learns nothing. Calling the module returns an
    :class:`~fastedit.editors.Editor` whose hyper-parameters are differentiable tensors;
    :meth:`editor` returns a plain editor with the current values as floats.
    """

    def __init__(self, editor: Editor | str, learn: Iterable[str] | None = None):
        super().__init__()
        editor = make_editor(editor)
        self.kind = type(editor)
        values = _flat_hparams(editor)
        if learn is None:
            learn = ("beta",) if isinstance(editor, RMSProp) else ("lr",)
        learn = (learn,) if isinstance(learn, str) else tuple(learn)
        unknown = set(learn) - set(values)
        if unknown:
            raise ValueError(f"{editor.name} cannot learn {sorted(unknown)}; its hyper-parameters are {sorted(values)}")
        self.learn = learn
        self.fixed = {k: v for k, v in values.items() if k not in learn}
        for name in learn:
            _, inverse, raw_name = _TRANSFORMS[name]
            self.register_parameter(raw_name, nn.Parameter(torch.tensor(inverse(values[name]), dtype=torch.float64)))

    def values(self) -> dict[str, Tensor | float]:
        """Constrained hyper-parameter values: tensors for learned ones, floats for fixed ones."""
        out: dict[str, Any] = dict(self.fixed)
        for name in self.learn:
            forward, _, raw_name = _TRANSFORMS[name]
            out[name] = forward(getattr(self, raw_name))
        return out

    def _build(self, values: dict) -> dict:
        values = dict(values)
        if self.kind is Adam:
            values["betas"] = (values.pop("beta1"), values.pop("beta2"))
        return values

    def forward(self) -> Editor:
        return self.kind.from_trusted(**self._build(self.values()))

    def editor(self) -> Editor:
        """A plain editor with the learned values (floats), for :func:`fastedit.edit` / ``evaluate``."""
        values = {k: (float(v.detach()) if isinstance(v, Tensor) else v) for k, v in self.values().items()}
        return self.kind(**self._build(values))

    def extra_repr(self) -> str:
        return f"{self.kind.__name__}, learn={self.learn}, fixed={self.fixed}"


# ------------------------------------------------------------------------------------------------
# one differentiable inner step, as a pure function of tensors
# ------------------------------------------------------------------------------------------------
class _StepSpec:
    """Everything an inner step needs that is not a differentiable tensor."""

    def __init__(self, suffix: nn.Module, theta_names, other_names, acts_spec, acts_consts, state_spec,
                 learnable: LearnableEditor, hp_names, constraint: Constraint, reduction: str, read,
                 closed_form: bool = True):
        self.closed_form = closed_form
        self.suffix, self.theta_names, self.other_names = suffix, theta_names, other_names
        self.acts_spec, self.acts_consts, self.state_spec = acts_spec, acts_consts, state_spec
        self.learnable, self.hp_names, self.constraint = learnable, hp_names, constraint
        self.reduction, self.read = reduction, read
        self.validate = None  # (edit, rows) to check the constraint against at the first evaluation
        self.kept = None      # KeptLogits: the head at the labelled positions only (fastedit.kept_logits)

    def unpack(self, flat: tuple, n_theta: int, n_state: int, n_acts: int, n_other: int):
        """Cut the flat tensor inputs of a step into (theta, state, acts, others, hyper-parameters)."""
        i = 0
        out = []
        for n in (n_theta, n_state, n_acts, n_other):
            out.append(list(flat[i:i + n]))
            i += n
        out.append(list(flat[i:]))
        return out

    def acts(self, tensors: list[Tensor]) -> tuple:
        leaves, it = [], iter(tensors)
        for c in self.acts_consts:
            leaves.append(next(it) if c is _TENSOR else c)
        return tree_unflatten(leaves, self.acts_spec)

    def loss_fn(self, acts: tuple, others: list[Tensor]):
        other_map = dict(zip(self.other_names, others))

        def loss(theta: list[Tensor]) -> Tensor:
            logits = self.logits(acts, other_map, theta)
            c = self.constraint
            if self.validate is not None:
                where, self.validate = self.validate, None
                _check_given_edit(c, logits.detach(), *where)
            return reduce_constraint(c.pack(c.per_sample(logits)), self.reduction)
        return loss

    def logits(self, acts: tuple, other_map: dict, theta: list[Tensor]) -> Tensor:
        """The suffix's logits with ``theta``; at the kept positions only where ``kept`` is set (also
        when a rematerialised step recomputes itself in backward)."""
        mapping = {**other_map, **dict(zip(self.theta_names, theta))}
        with self.kept.installed() if self.kept is not None else contextlib.nullcontext():
            return self.read(functional_call(self.suffix, mapping, (acts,), strict=False))

    def editor(self, hps: list[Tensor]) -> Editor:
        values = dict(self.learnable.fixed)
        values.update(zip(self.hp_names, hps))
        return self.learnable.kind.from_trusted(**self.learnable._build(values))


_TENSOR = object()  # marks a tensor leaf of the prefix activations


def _inner_step(spec: _StepSpec, theta, state_leaves, act_tensors, others, hps, *, early_exit: bool):
    """One masked editor step from ``theta``: returns ``(theta', state_leaves', loss, active)``.

    ``loss`` is the constraint at ``theta``; the step is the identity when ``loss ≤ 0``. With
    ``early_exit`` and an inactive edit, the gradient is not computed at all (one host read).
    """
    loss_fn = spec.loss_fn(spec.acts(act_tensors), others)
    with math_attention():  # the step's gradient is differentiated again: fused attention has no double backward
        loss, pullback = vjp(loss_fn, theta)
        active = loss.detach() > 0
        if early_exit and not bool(active):
            return list(theta), list(state_leaves), loss, active
        (grads,) = pullback(torch.ones_like(loss))
    state = tree_unflatten(list(state_leaves), spec.state_spec)
    editor = spec.editor(hps)
    if spec.closed_form:  # one autograd node per step, closed-form backward (same values and derivatives)
        new_theta, new_state = editor_step(editor, theta, grads, state, active)
    else:
        new_theta, new_state = editor.step(theta, grads, state, active)
    return new_theta, tree_flatten(new_state)[0], loss, active


class _RematStep(torch.autograd.Function):
    """``_inner_step`` that keeps only its inputs and recomputes itself in backward."""

    @staticmethod
    def forward(ctx, spec, early_exit, counts, *flat):
        ctx.spec, ctx.early_exit, ctx.counts = spec, early_exit, counts
        # backward runs after the caller's eval_mode (and autocast) have been left: replay them
        ctx.modes = [(m, m.training) for m in spec.suffix.modules()]
        ctx.autocast = [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                        for dev in ("cpu", "cuda")]
        ctx.save_for_backward(*flat)
        theta, state, acts, others, hps = spec.unpack(flat, *counts)
        with torch.no_grad():
            new_theta, new_state, loss, active = _inner_step(spec, theta, state, acts, others, hps,
                                                             early_exit=early_exit)
        loss, active = loss.detach(), active.detach()
        # the returned tensors themselves: otherwise a consumer of the loss (an early exit's L_edit)
        # would reach this node and recompute the step in backward for a zero gradient
        ctx.mark_non_differentiable(loss, active)
        return (*[t.detach() for t in new_theta], *[s.detach() for s in new_state], loss, active)

    @staticmethod
    def backward(ctx, *grad_outs):
        flat = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in flat]
        theta, state, acts, others, hps = ctx.spec.unpack(inputs, *ctx.counts)
        current = [(m, m.training) for m, _ in ctx.modes]
        try:
            for m, mode in ctx.modes:
                m.training = mode
            with contextlib.ExitStack() as stack:
                for dev, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
                stack.enter_context(torch.enable_grad())
                new_theta, new_state, _, _ = _inner_step(ctx.spec, theta, state, acts, others, hps,
                                                         early_exit=ctx.early_exit)
        finally:
            for m, mode in current:
                m.training = mode
        outputs = [*new_theta, *new_state]
        pairs = [(o, g) for o, g in zip(outputs, grad_outs) if g is not None and o.requires_grad]
        if ctx.spec.closed_form:
            _release_step_outputs(outputs)
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                    [g for _, g in pairs], allow_unused=True) if pairs and wanted else []
        result: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, None, None, *result)


def _release_step_outputs(outputs: list[Tensor]) -> None:
    """Free the memory of a recomputed closed-form step's new parameters and state (two copies of
    the editable parameters). The backward needs them only as the roots of the gradient: the
    closed-form step saves only its inputs (``ops.editor_step``), and autograd reads an output's
    shape, never its values. Outputs that are inputs (a step that did not run: leaves, no
    ``grad_fn``) and views are kept."""
    for o in outputs:
        if o.grad_fn is not None and o._base is None:
            o.untyped_storage().resize_(0)


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------
class EditableTraining(nn.Module):
    """Editable Training as a module to drop into a training loop.

    Args:
        model: the model being trained, any ``nn.Module`` (registered as ``self.model``, so
            ``et.parameters()`` holds the model's and the editor's learnable parameters, and
            ``DistributedDataParallel(et)`` works).
        params: the editable parameters (as in :func:`fastedit.edit`; default ``"layer3"``).
        editor: the editor (default ``RMSProp(1e-3, beta=0.5)``, as the official code).
        max_steps: ``k``, editor steps per edit (default 10).
        c_edit, c_loc: the loss weights (default 0.01 each, as the paper).
        learn: which editor hyper-parameters learn (see :class:`LearnableEditor`).
        num_edits: edits sampled per batch when ``edit_inputs``/``edit_target`` are not given: for class
            labels, a random row of the batch with a uniformly random target class; for
            ``fe.TokenTargets``, a random row, one of its labelled positions and a uniformly random
            token there.
        rematerialize: recompute each inner step in backward instead of storing it (less memory).
        reduction: ``"max"`` or ``"mean"`` over the samples of one edit (each sampled edit has one).
        loc_mode: ``"shared"`` (default) or ``"eval"``; see the module docstring.
        early_exit: stop each edit's loop once satisfied (``"auto"``: on the CPU).
        closed_form: run each editor step as one autograd node with a closed-form backward
            (:func:`fastedit.ops.editor_step`) instead of ``Editor.step``'s chain
            of elementwise ops; same values and derivatives, fewer saved tensors.
        output: where the logits are in the model's output (as in :func:`fastedit.edit`).
        include_frozen: also edit parameters with ``requires_grad=False`` (as in :func:`fastedit.edit`:
            by default a module prefix skips them and naming one raises).

    ``loss, stats = et(inputs, target)``: ``inputs`` as in :func:`fastedit.edit` (a tensor, a tuple,
    a mapping such as a tokenizer's output), ``target`` class labels ``[B]`` (an integer tensor or a
    NumPy integer array; ``L_base`` is the cross-entropy, ``L_loc`` the batch-mean KL) or
    ``fe.TokenTargets`` (token cross-entropy over the labelled positions, ``L_loc`` the mean
    per-token KL over them; at least one position of the batch must be labelled). Edits may be given per batch,
    ``et(inputs, target, edit_inputs, edit_target)``, with any constraint; each unit of
    ``edit_target`` is one edit (a row, a group of ranking candidates; a callable covers all rows).
    The inner editor steps run under the math SDPA backend, so models with fused attention
    (``nn.TransformerEncoder``, HF SDPA attention) get their second-order gradients.

    It returns the objective and a dict of detached 0-dim tensors:
    ``loss_base``, ``loss_edit``, ``loss_loc``, ``edit_success`` (share of edits satisfied within
    ``k`` steps), ``edit_steps`` (mean steps taken), ``objective``.

    Bad input raises ``TypeError`` (labels that are not integers, a target of the wrong kind) or
    ``ValueError`` (an empty batch, a label count that does not match the samples, a label out of
    range for the model's classes or vocabulary, a ``fe.TokenTargets`` batch with no labelled
    position, labels on another device than the logits, a given edit that does not fit), naming the
    problem, and leaves the model as it was: parameters, buffers (the train-mode forward's BatchNorm
    running statistics are put back: every buffer is copied before a step and restored if it raises),
    every module's mode and ``requires_grad``. Checks that need no forward (types, counts, labelled
    positions, given edits' shapes) run before the model does.
    """

    def __init__(self, model: nn.Module, params: ParamSpec = "layer3", editor: Editor | str | None = None,
                 max_steps: int = 10, c_edit: float = 0.01, c_loc: float = 0.01, *,
                 learn: Iterable[str] | None = None, num_edits: int = 1, rematerialize: bool = False,
                 reduction: str = "max", loc_mode: str = "shared", early_exit: bool | str = "auto",
                 closed_form: bool = True, output: OutputSpec = None, include_frozen: bool = False):
        super().__init__()
        check_common(max_steps, reduction)
        if isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits < 1:
            raise ValueError(f"num_edits must be an integer ≥ 1, got {num_edits!r}")
        if loc_mode not in ("shared", "eval"):
            raise ValueError(f"loc_mode must be 'shared' or 'eval', got {loc_mode!r}")
        if not (math.isfinite(c_edit) and math.isfinite(c_loc) and c_edit >= 0 and c_loc >= 0):
            raise ValueError(f"c_edit and c_loc must be finite and ≥ 0, got {c_edit}, {c_loc}")
        self.model = model
        self.learned_editor = LearnableEditor(editor if editor is not None else RMSProp(1e-3, beta=0.5), learn)
        self.param_names = [n for n, _ in select_parameters(model, params, include_frozen=include_frozen)]
        self.max_steps, self.c_edit, self.c_loc = max_steps, float(c_edit), float(c_loc)
        self.num_edits, self.rematerialize = num_edits, rematerialize
        self.reduction, self.loc_mode, self.early_exit = reduction, loc_mode, early_exit
        self.closed_form = bool(closed_form)
        self._reader = resolve_output(output)

    def _read(self, out) -> Tensor:
        return read_logits(out, self._reader)

    def editor(self) -> Editor:
        """A plain editor with the learned hyper-parameters, for :func:`fastedit.edit` / ``evaluate``."""
        return self.learned_editor.editor()

    def extra_repr(self) -> str:
        return (f"params={len(self.param_names)} tensors, max_steps={self.max_steps}, c_edit={self.c_edit}, "
                f"c_loc={self.c_loc}, num_edits={self.num_edits}, rematerialize={self.rematerialize}, "
                f"loc_mode={self.loc_mode!r}")

    # -- pieces ------------------------------------------------------------------------------------
    def _entry(self, inputs: ModelInputs) -> dict:
        """The split's cache entry for inputs like these (``entry["split"]``), built once (in eval mode)
        and cached per call signature."""
        return cached_entry(self.model, self.param_names, True, inputs, self._read)

    def _split(self, inputs: ModelInputs):
        return self._entry(inputs)["split"]

    def _sample_edits(self, inputs: ModelInputs, target: Constraint, logits: Tensor):
        """``num_edits`` edits drawn from the batch: the rows of the edit inputs, and per edit
        ``(first row, end row, constraint)``."""
        device = logits.device
        k = self.num_edits
        if isinstance(target, Classification):
            rows = torch.randint(0, inputs.num_samples, (k,), device=device)
            labels = torch.randint(0, logits.shape[-1], (k,), device=device)
            return inputs.take(rows), [(i, i + 1, Classification(labels[i:i + 1])) for i in range(k)]
        labelled = target.mask().nonzero()        # [M, 2]: (row, position) after the causal shift
        pick = labelled[torch.randint(0, labelled.shape[0], (k,), device=device)]
        tokens = torch.randint(0, logits.shape[-1], (k,), device=device)
        labels = torch.full((k, target.labels.shape[1]), IGNORE_INDEX, dtype=torch.int64, device=device)
        labels[torch.arange(k, device=device), pick[:, 1] + int(target.causal)] = tokens
        return inputs.take(pick[:, 0]), [(i, i + 1, TokenTargets(labels[i:i + 1], causal=target.causal))
                                         for i in range(k)]

    def _run_edit(self, entry: dict, acts_e, constraint: Constraint, editor_module: LearnableEditor,
                  validate: tuple | None = None):
        """The unrolled edit: returns (edited params, final constraint, steps taken). ``entry``: the
        edit inputs' split cache entry. ``validate``: ``(edit number, first row, end row)`` of an edit
        given by the caller, whose constraint is checked against the logits first."""
        suffix = entry["split"].suffix_module
        params = dict(self.model.named_parameters())
        theta = [params[n] for n in self.param_names]
        theta_set = set(self.param_names)
        other_names = [n for n, _ in suffix.named_parameters() if n not in theta_set]
        others = [params[n] for n in other_names]
        leaves, acts_spec = tree_flatten(acts_e)
        act_tensors = [v for v in leaves if isinstance(v, Tensor)]
        consts = [(_TENSOR if isinstance(v, Tensor) else v) for v in leaves]
        hp_values = editor_module.values()
        hp_names = list(editor_module.learn)
        hps = [hp_values[k] for k in hp_names]
        editor = editor_module()
        state_leaves, state_spec = tree_flatten(editor.init_state([t.detach() for t in theta]))
        # closed form only where the op has it: an editor subclass runs its own step (an autograd chain)
        spec = _StepSpec(suffix, self.param_names, other_names, acts_spec, consts, state_spec, editor_module,
                         hp_names, constraint, self.reduction, self._read, self.closed_form and supports(editor))
        spec.validate = validate
        # a token edit's steps compute the head at its labelled positions only. A given edit is
        # checked against the whole logits where the kept head is first tried; later ones are
        # checked against the kept logits, which accepts and rejects the same labels (their shape
        # is the whole logits', kept_logits makes sure)
        other_map = dict(zip(other_names, others))
        unchecked = [validate]  # a given edit's check, made on the first (whole) logits

        def head_logits() -> Tensor:  # in the grad mode the activations were recorded in
            with torch.enable_grad():
                z = spec.logits(acts_e, other_map, [t.detach() for t in theta]).detach()
            if unchecked[0] is not None:
                where, unchecked[0] = unchecked[0], None
                _check_given_edit(constraint, z, *where)
            return z
        spec.kept, _ = keep_labelled_logits(self.model, constraint, entry, theta, head_logits)
        if spec.kept is not None:
            spec.constraint = spec.kept.constraint
        device = theta[0].device
        early = resolve_early_exit(self.early_exit, device)
        steps = torch.zeros((), dtype=torch.int64, device=device)
        for _ in range(self.max_steps):
            if self.rematerialize:
                counts = (len(theta), len(state_leaves), len(act_tensors), len(others))
                out = _RematStep.apply(spec, early, counts, *theta, *state_leaves, *act_tensors, *others, *hps)
                n_t, n_s = len(theta), len(state_leaves)
                new_theta, new_state, loss, active = list(out[:n_t]), list(out[n_t:n_t + n_s]), out[-2], out[-1]
            else:
                new_theta, new_state, loss, active = _inner_step(spec, theta, state_leaves, act_tensors, others,
                                                                 hps, early_exit=early)
            if early and not bool(active):
                # satisfied: L_edit = relu(loss) with loss ≤ 0 has a zero gradient (relu'(0) = 0), so
                # the check's graph is not kept (its backward would only carry zeros)
                return theta, loss.detach(), steps
            theta, state_leaves = new_theta, new_state
            steps = steps + active
        with torch.enable_grad():  # differentiable: L_edit's input (the activations were made with grad)
            final = spec.loss_fn(spec.acts(act_tensors), others)(theta)
        return theta, final, steps

    def _kl_to_edited(self, split, acts, ref_logits: Tensor, theta: list[Tensor], target: Constraint) -> Tensor:
        """Mean KL(softmax(ref) ‖ softmax(edited)) over the batch (class labels) or over its labelled
        positions (tokens), the edited logits from the suffix with ``theta``."""
        suffix = split.suffix_module
        mapping = dict(zip(self.param_names, theta))
        # in train mode BatchNorm would update running statistics a second time: give it copies
        mapping.update({n: b.clone() for n, b in suffix.named_buffers()})
        edited = self._read(functional_call(suffix, mapping, (acts,), strict=False))
        if isinstance(target, TokenTargets):
            # the labelled positions as rows of the flattened [B·T, V] logits (the last position of a
            # causal target has no label)
            mask = F.pad(target.mask(), (0, 1)) if target.causal else target.mask()
            vocab = edited.shape[-1]
            return locality_kl(ref_logits.reshape(-1, vocab), edited.reshape(-1, vocab), mask.flatten().nonzero()[:, 0])
        return locality_kl(ref_logits, edited)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, inputs, target=None, edit_inputs=None, edit_target=None, *, x=None, y=None,
                edit_x=None, edit_y=None):
        inputs, target = resolve_aliases(inputs, target, x, y)
        if edit_x is not None or edit_y is not None:
            if edit_inputs is not None or edit_target is not None:
                raise TypeError("pass edit_inputs/edit_target or edit_x/edit_y, not both")
            edit_inputs, edit_target = edit_x, edit_y
        # every check that needs no forward, before the model runs
        mi = ModelInputs.of(inputs)
        base = _batch_target(target, mi)
        given = None
        if edit_inputs is not None:
            given = _given_edits(edit_inputs, edit_target)
        elif edit_target is not None:
            raise ValueError("edit_target (edit_y) was given without edit_inputs (edit_x)")
        with _buffers_restored_on_error(self.model):
            return self._objective(mi, base, given)

    def _objective(self, mi: ModelInputs, base: Constraint, given: tuple[ModelInputs, Constraint] | None):
        split = self._split(mi)
        acts, out = split.prefix_and_output(mi)  # (1) the module's own mode; BN statistics move here only
        logits = self._read(out)
        _on_device(base, logits.device, _BATCH)
        loss_base = _base_loss(logits, base)
        if given is None:
            edit_rows, edits = self._sample_edits(mi, base, logits)
        else:
            edit_rows, c = given
            _on_device(c, logits.device, "edit_target (edit_y)")
            edits = _edit_units(edit_rows, c)

        with eval_mode(self.model):           # (2) edits in eval mode, as fastedit.edit
            if self.loc_mode == "eval":
                acts_loc, out_loc = split.prefix_and_output(mi)
                ref_loc = self._read(out_loc).detach()
            entry_e = self._entry(edit_rows)
            split_e = entry_e["split"]
            results = []
            for k, (lo, hi, c_e) in enumerate(edits):
                # each edit's own prefix run: activations need not be batch-first (a GRU's hidden state
                # is [layers, B, H]), so rows of one run cannot be told apart. With grad: the steps
                # differentiate through them even when the caller is under no_grad
                with torch.enable_grad():
                    acts_e = split_e.prefix(edit_rows.rows(lo, hi))
                results.append(self._run_edit(entry_e, acts_e, c_e, self.learned_editor,
                                              validate=(k, lo, hi) if given else None))

        loss_edit = torch.stack([F.relu(final) for _, final, _ in results]).mean()
        loc_terms = []
        early = resolve_early_exit(self.early_exit, logits.device)
        for theta, _, steps in results:
            if early and int(steps) == 0:      # no step taken: θ unchanged, KL exactly 0
                loc_terms.append(loss_base.new_zeros(()))
            elif self.loc_mode == "eval":
                with eval_mode(self.model):
                    loc_terms.append(self._kl_to_edited(split, acts_loc, ref_loc, theta, base))
            else:                              # (3) shared prefix activations, same BN mode as (1)
                loc_terms.append(self._kl_to_edited(split, acts, logits, theta, base))
        loss_loc = torch.stack(loc_terms).mean()
        objective = loss_base + self.c_edit * loss_edit + self.c_loc * loss_loc
        # every learnable hyper-parameter takes part in the graph even when no edit took a step, so
        # DistributedDataParallel needs no find_unused_parameters
        for p in self.learned_editor.parameters():
            objective = objective + (0.0 * p.sum()).to(objective.dtype)
        stats = {
            "loss_base": loss_base.detach(), "loss_edit": loss_edit.detach(), "loss_loc": loss_loc.detach(),
            "edit_success": torch.stack([(f.detach() <= 0) for _, f, _ in results]).float().mean(),
            "edit_steps": torch.stack([s for _, _, s in results]).float().mean(),
            "objective": objective.detach(),
        }
        return objective, stats


@contextlib.contextmanager
def _buffers_restored_on_error(model: nn.Module):
    """Copy every buffer of ``model`` and put the copies back if the body raises: the batch's forward
    in the module's own mode moves BatchNorm running statistics before the labels can be checked
    against the logits, and a step that fails must leave the model as it was. Buffers are small
    (statistics, position ids), so the copy costs little next to a training step."""
    saved = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
             if b is not None]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, name, b, copy in saved:
                b.copy_(copy)
                m._buffers[name] = b  # also when the forward replaced the tensor
        raise


_BATCH = "the batch's target"


def _batch_target(target, inputs: ModelInputs) -> Constraint:
    """The batch's labels as a constraint, checked before the model runs: class labels ``[B]`` (an
    integer tensor or a NumPy integer array) or ``fe.TokenTargets`` with one row per sample and, for
    tokens, at least one labelled position."""
    if isinstance(target, TokenTargets):
        c = target
    elif isinstance(target, Tensor) or is_numpy(target):
        try:
            c = as_constraint(target, _BATCH)
        except ValueError as exc:
            raise ValueError(f"{_BATCH}: {exc}") from None
    elif isinstance(target, Constraint):
        raise TypeError(f"{_BATCH} must be class labels [B] or fe.TokenTargets(labels), got {type(target).__name__}: "
                        "other constraints are edits (pass them as edit_target with edit_inputs)")
    else:
        raise TypeError(f"{_BATCH} must be class labels [B] (an integer tensor or NumPy integer array) or "
                        f"fe.TokenTargets(labels), got {type(target).__name__}")
    try:
        check_rows(c, inputs.num_samples)
    except ValueError as exc:
        raise ValueError(f"{_BATCH}: {exc}") from None
    if isinstance(c, TokenTargets) and not bool(c.mask().any()):
        shift = " after the causal shift (labels[:, 1:])" if c.causal else ""
        raise ValueError(f"{_BATCH}: no position of the batch is labelled{shift}: every label is {IGNORE_INDEX}; "
                         "L_base and the sampled edits need at least one labelled token")
    return c


def _on_device(c: Constraint, device: torch.device, what: str) -> None:
    """Labels on the logits' device (host labels are moved there), else ``ValueError``."""
    try:
        c.check_device(device)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _base_loss(logits: Tensor, target: Constraint) -> Tensor:
    """L_base: cross-entropy over the batch (class labels) or its labelled tokens (``-100`` ignored)."""
    if isinstance(target, TokenTargets):
        validate(target, logits.detach(), _BATCH, allow_unlabelled_rows=True)
        z, labels = target.aligned(logits)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    validate(target, logits.detach(), _BATCH)
    return F.cross_entropy(logits, target.labels)


def _given_edits(edit_inputs, edit_target) -> tuple[ModelInputs, Constraint]:
    """The edits given for the batch, checked before the model runs (types, one label per row)."""
    if edit_target is None:
        raise ValueError("edit_target (edit_y) is missing: give the edits' constraint (e.g. their target classes, "
                         "one per row of edit_inputs)")
    mi = ModelInputs.of(edit_inputs, "edit_inputs")
    c = as_constraint(edit_target, "edit_target (edit_y)")  # ints, NumPy: host labels, moved to the logits' device
    try:
        check_rows(c, mi.num_samples)
    except ValueError as exc:
        raise ValueError(f"edit_target (edit_y): {exc}") from None
    return mi, c


def _edit_units(mi: ModelInputs, c: Constraint) -> list:
    """Each unit of the given edits' constraint is one edit: ``(first row, end row, constraint)``."""
    if c.rows_per_unit is None:
        return [(0, mi.num_samples, c)]
    r = c.rows_per_unit
    return [(i * r, (i + 1) * r, c.units(i, i + 1)) for i in range(c.num_units(mi.num_samples))]


def _check_given_edit(c: Constraint, logits: Tensor, k: int, lo: int, hi: int) -> None:
    """Check edit ``k`` (rows ``lo:hi`` of ``edit_inputs``) against its logits; messages count rows
    of ``edit_inputs``."""
    rows = f"row {lo}" if hi == lo + 1 else f"rows {lo}:{hi}"
    validate(c, logits, f"edit_target (edit_y), edit {k} ({rows} of edit_inputs)", row_offset=lo)
