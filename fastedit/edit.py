"""One edit: patch a model so that it predicts ``y`` on ``x``, in place, atomically and revertibly.

The loop (DESIGN.md §1): up to ``max_steps`` editor steps on the editable parameters, each step
active only while the constraint ``l_e > 0``. The active flag lives on the device, so the loop needs
no host synchronisation; on the CPU, where reading a flag costs nothing, the loop also *exits* once
the edit is satisfied (``early_exit="auto"``), which gives the same result bit for bit because
inactive steps are the identity.

Only the suffix of the model that depends on the editable parameters is re-run per step: the frozen
prefix's activations are computed once (:mod:`fastedit.prefix`).

Atomicity: the loop runs on copies of the editable parameters and writes them into the model only
at the end, when the edit is accepted. Any error, bad input or non-finite value leaves the model bit
for bit as it was; :meth:`EditResult.revert` restores the parameters from a saved copy.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .constraint import REDUCTIONS, constraint_per_sample, reduce_constraint
from .editors import Editor, make_editor
from .kernels.editor_step import editor_step_
from .prefix import PrefixSplit, split_prefix, whole_model_split
from .selection import ParamSpec, select_parameters

__all__ = ["edit", "EditResult", "EditError", "EditLoopOutput", "run_edit_loop", "run_edit_loop_batched",
           "EditTarget"]


class EditError(RuntimeError):
    """An edit could not be carried out (non-finite loss or gradient, a failing forward); the model
    is unchanged."""


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
@dataclass
class EditLoopOutput:
    params: list[Tensor]      # edited copies of the editable parameters
    loss: Tensor              # constraint value after the last step (0-dim, on device)
    initial_loss: Tensor      # constraint value before the first step
    steps: Tensor             # number of steps taken (int64, 0-dim)
    bad_step: Tensor          # first step with a non-finite loss/gradient, or -1

    @property
    def success(self) -> Tensor:
        return self.loss <= 0


def _finite_per_edit(grads: Sequence[Tensor], batched: bool) -> Tensor:
    """Whether every gradient entry is finite: per edit (``[E]``) when batched, else 0-dim."""
    if batched:
        e = grads[0].shape[0]
        return torch.stack([g.reshape(e, -1).isfinite().all(1) for g in grads]).all(0)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def _edit_loop(forward: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor], editor: Editor,
               max_steps: int, early_exit: bool, batched: bool, penalised: bool = False) -> EditLoopOutput:
    """The loop shared by :func:`run_edit_loop` (0-dim loss) and :func:`run_edit_loop_batched`
    (``[E]`` losses, a leading edit dimension on ``params``, per-edit masks). With ``penalised``,
    ``forward`` returns ``(objective, constraint)``: the steps follow the objective's gradient, while
    activity, success and the reported losses are the constraint's (EWC editing)."""
    theta = [p.detach().clone() for p in params]  # updated in place by the fused step
    state = editor.init_state(theta, batched=batched)
    shape = (theta[0].shape[0],) if batched else ()
    steps = torch.zeros(shape, dtype=torch.int64, device=theta[0].device)
    bad_step = torch.full(shape, -1, dtype=torch.int64, device=theta[0].device)
    initial = loss = None
    with torch.no_grad():  # the editor update and the bookkeeping record no graph
        for k in range(max_steps + 1):
            leaves = [t.detach().requires_grad_() for t in theta]
            with torch.enable_grad():
                out = forward(leaves)
                objective, loss_graph = out if penalised else (out, out)
                # each edit's loss depends on its own slice only, so the gradient of the sum is the
                # stack of the per-edit gradients (a non-finite loss stays in its own slice)
                loss_total = objective.sum() if batched else objective
            loss = loss_graph.detach()
            if initial is None:
                initial = loss
            finite = torch.isfinite(loss) & torch.isfinite(objective.detach()) if penalised else torch.isfinite(loss)
            bad_step = torch.where(~finite & (bad_step < 0), k, bad_step)
            if k == max_steps:
                break
            active = (loss > 0) & (bad_step < 0)
            if early_exit and not bool(active.any()):
                break  # satisfied (or failed): every further step would be the identity
            grads = torch.autograd.grad(loss_total, leaves)
            bad_grad = active & ~_finite_per_edit(grads, batched)
            bad_step = torch.where(bad_grad & (bad_step < 0), k, bad_step)
            active = active & ~bad_grad
            editor_step_(editor, theta, [g.contiguous() for g in grads], state, active, batched=batched)
            steps = steps + active
    return EditLoopOutput(theta, loss, initial, steps, bad_step)


def run_edit_loop(loss_fn: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor], editor: Editor,
                  max_steps: int, *, early_exit: bool = False) -> EditLoopOutput:
    """Run up to ``max_steps`` steps of ``editor`` on ``loss_fn(params)`` (a 0-dim constraint value).

    A step is taken only while ``loss > 0`` (the active mask); a step with a non-finite loss or
    gradient is not taken and is recorded in ``bad_step``. ``params`` are not modified: the loop
    updates copies in place with the fused :func:`fastedit.ops.editor_step_` (through the kernel
    dispatcher).

    Each iteration runs the forward first and the backward only if it is needed, so with
    ``early_exit`` (one host read of the active flag per step) an edit satisfied after ``s`` steps
    costs ``s + 1`` forwards and ``s`` backwards. Without it the loop always runs ``max_steps``
    masked steps (no host synchronisation), with the same result.
    """
    return _edit_loop(loss_fn, params, editor, max_steps, early_exit, batched=False)


def run_edit_loop_batched(loss_one: Callable[[list[Tensor], Any], Tensor], params: Sequence[Tensor], inputs: Any,
                          editor: Editor, max_steps: int, *, early_exit: bool = False) -> EditLoopOutput:
    """``G`` independent edits of the same ``params`` side by side: :func:`run_edit_loop` with a
    leading edit dimension, the forward vectorised by :func:`torch.func.vmap`.

    ``loss_one(theta, inp)`` is one edit's 0-dim constraint value; ``inputs`` is a pytree whose
    tensors carry the edit dimension ``G`` in front (``inp`` is one slice of it). The editor runs
    with ``batched=True`` and the per-edit active mask, so each edit stops on its own; the outputs
    carry the edit dimension (``params`` ``[G, ...]``, the rest ``[G]``). ``params`` are not modified.

    Equal to ``G`` calls of :func:`run_edit_loop` up to floating-point rounding: vmap turns
    convolutions with per-edit weights into grouped convolutions, which may round differently.
    """
    from torch.func import vmap

    g = next(t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, Tensor)).shape[0]
    batched_loss = vmap(loss_one)
    expanded = [p.detach().unsqueeze(0).expand(g, *p.shape) for p in params]  # cloned by the loop
    return _edit_loop(lambda leaves: batched_loss(leaves, inputs), expanded, editor, max_steps, early_exit,
                      batched=True)


# ------------------------------------------------------------------------------------------------
# a model prepared for editing: selection, prefix split (cached), eval mode
# ------------------------------------------------------------------------------------------------
_SPLIT_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module) -> tuple:
    return tuple((name, id(m)) for name, m in model.named_modules())


def cached_entry(model: nn.Module, names: Sequence[str], use_prefix: bool = True) -> dict:
    """``{"split": PrefixSplit, "num_classes": int | None}`` for this model and editable names,
    traced once per model structure (the class count is filled in by the first label check)."""
    key = (frozenset(names), use_prefix, _structure_key(model))
    per_model = _SPLIT_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model.clear()  # a model is usually edited with one selection; keep the cache small
        with eval_mode(model):  # trace in eval mode: mode-dependent Python is fixed at trace time
            split = split_prefix(model, names) if use_prefix else whole_model_split(model)
        per_model[key] = {"split": split, "num_classes": None}
    return per_model[key]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _as_logits(out, where: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{where} returned {type(out).__name__}; fastedit edits classifiers whose forward "
                        "returns a logits tensor [batch, classes]")
    if out.dim() != 2:
        raise ValueError(f"{where} returned shape {tuple(out.shape)}; expected logits [batch, classes]")
    return out


@dataclass
class EditTarget:
    """The editable parameters of a model and its prefix split, ready for functional edits."""

    model: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    split: PrefixSplit
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: nn.Module, params: ParamSpec = None, use_prefix: bool = True) -> "EditTarget":
        chosen = select_parameters(model, params)
        names = [n for n, _ in chosen]
        entry = cached_entry(model, names, use_prefix)
        return cls(model, names, [p for _, p in chosen], entry["split"], entry)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def check_inputs(self, x: Tensor, y) -> Tensor:
        """Validate ``x``/``y`` against the model (device, dtype, batch) and return ``y`` as int64 ``[B]``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the editable parameters are on {self.device}")
        if x.is_floating_point() and x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {self.dtype}")
        if isinstance(y, bool) or not isinstance(y, (int, Tensor)):
            raise TypeError(f"y must be an int or an integer tensor, got {type(y).__name__}")
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        y = y.reshape(1) if y.dim() == 0 else y
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must hold one label per sample of x: x has {x.shape[0]} samples, "
                             f"y has shape {tuple(y.shape)}")
        return y.to(torch.int64)

    def prefix(self, x: Tensor) -> tuple:
        with torch.no_grad():
            return self.split.prefix(x)

    def logits(self, acts: tuple, theta: Sequence[Tensor] | None = None) -> Tensor:
        if theta is None:
            out = self.split.suffix(acts)
        else:
            out = functional_call(self.split.suffix_module, dict(zip(self.names, theta)), (acts,))
        return _as_logits(out, "the model")

    def loss_fn(self, acts: tuple, y: Tensor, reduction: str) -> Callable[[list[Tensor]], Tensor]:
        def loss(theta: list[Tensor]) -> Tensor:
            return reduce_constraint(constraint_per_sample(self.logits(acts, theta), y), reduction)
        return loss

    def num_classes(self, acts: tuple) -> int:
        """The model's class count: one forward of ``acts`` the first time, cached afterwards."""
        if self._cache.get("num_classes") is None:
            with torch.no_grad():
                self._cache["num_classes"] = int(self.logits(acts).shape[-1])
        return self._cache["num_classes"]

    def check_labels(self, num_classes: int, y: Tensor) -> None:
        check_label_range(y, num_classes)

    def checked_prefix(self, x: Tensor, y: Tensor) -> tuple:
        """The prefix activations of ``x`` and the class count, with ``y`` checked against it; a model
        that cannot take ``x`` (a shape mismatch, say) raises ``ValueError`` before anything is written."""
        try:
            acts = self.prefix(x)
            num_classes = self.num_classes(acts)
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            raise ValueError(f"the model failed on x of shape {tuple(x.shape)}: {exc}") from exc
        self.check_labels(num_classes, y)
        return acts, num_classes


def resolve_early_exit(early_exit: bool | str, device: torch.device) -> bool:
    if early_exit == "auto":
        return device.type == "cpu"
    if isinstance(early_exit, bool):
        return early_exit
    raise ValueError(f"early_exit must be True, False or 'auto', got {early_exit!r}")


def check_label_range(y: Tensor, num_classes: int, what: str = "label") -> None:
    """``ValueError`` naming the first label outside ``[0, num_classes)`` (one host read)."""
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{what} {int(y[bad][0])} is out of range for a model with {num_classes} classes")


def check_common(max_steps: int, reduction: str, on_failure: str = "revert") -> None:
    """Validate the arguments shared by edit, evaluate and EditableTraining."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer ≥ 0, got {max_steps!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if on_failure not in ("revert", "keep"):
        raise ValueError(f"on_failure must be 'revert' or 'keep', got {on_failure!r}")


# ------------------------------------------------------------------------------------------------
# the public edit
# ------------------------------------------------------------------------------------------------
@dataclass
class EditResult:
    """What :func:`edit` did. ``applied`` tells whether the model now holds the edited parameters."""

    success: bool
    steps: int
    loss: float
    initial_loss: float
    applied: bool
    param_names: list[str]
    _params: list[nn.Parameter] = field(repr=False, default_factory=list)
    _backup: list[Tensor] = field(repr=False, default_factory=list)

    def revert(self) -> None:
        """Restore every edited parameter bit-identically to its value before the edit (a no-op if
        the edit was not applied or was already reverted)."""
        if not self.applied:
            return
        with torch.no_grad():
            for p, saved in zip(self._params, self._backup):
                p.copy_(saved)
        self.applied = False

    def to_dict(self) -> dict:
        return {"success": self.success, "steps": self.steps, "loss": self.loss,
                "initial_loss": self.initial_loss, "applied": self.applied, "params": list(self.param_names)}


def edit(model: nn.Module, x: Tensor, y, editor: Editor | str = "rmsprop", params: ParamSpec = None,
         max_steps: int = 10, *, on_failure: str = "revert", reduction: str = "max",
         use_prefix: bool = True, early_exit: bool | str = "auto") -> EditResult:
    """Edit ``model`` in place so that it predicts ``y`` on ``x``.

    Args:
        model: a classifier returning logits ``[B, C]``; run in eval mode during the edit (BatchNorm
            uses its running statistics, dropout is off) and restored to its modes afterwards.
        x: inputs ``[B, ...]`` (one edit may hold several samples), on the parameters' device.
        y: target class(es): an int or an integer tensor ``[B]``.
        editor: an :class:`~fastedit.editors.Editor` or its name (default hyper-parameters).
        params: the editable parameters: a module-name prefix (``"layer3"``), a list of names, or
            parameters; ``None`` edits every parameter.
        max_steps: at most this many editor steps (the paper's k = 10).
        on_failure: when the constraint is still violated after ``max_steps``: ``"revert"``
            (default) leaves the model as it was; ``"keep"`` keeps the partially edited parameters.
        reduction: ``"max"`` (every sample must be satisfied) or ``"mean"`` over the samples.
        use_prefix: run the frozen prefix once (fx split); ``False`` re-runs the whole model.
        early_exit: stop once satisfied (``"auto"``: on the CPU, where the check is free).

    Returns:
        :class:`EditResult` with ``success``, ``steps``, ``loss`` (final ``l_e``), ``applied`` and
        ``revert()``.

    Raises:
        ValueError / TypeError for bad input (unknown or empty ``params``, a label out of range, a
        device, dtype or shape mismatch); :class:`EditError` for a non-finite loss or gradient.
        In every such case the model is left bit-identical to before.
    """
    check_common(max_steps, reduction, on_failure)
    editor = make_editor(editor)
    with eval_mode(model):
        target = EditTarget.build(model, params, use_prefix)
        y = target.check_inputs(x, y)
        acts, _ = target.checked_prefix(x, y)
        out = run_edit_loop(target.loss_fn(acts, y, reduction), target.params, editor, max_steps,
                            early_exit=resolve_early_exit(early_exit, target.device))

    bad_step = int(out.bad_step)  # the one host sync of the edit
    if bad_step >= 0:
        raise EditError(f"non-finite constraint or gradient at step {bad_step} of the edit "
                        f"(editor {editor!r}); the model is unchanged")
    success = bool(out.success)
    result = EditResult(success=success, steps=int(out.steps), loss=float(out.loss),
                        initial_loss=float(out.initial_loss), applied=False, param_names=list(target.names),
                        _params=list(target.params))
    if success or on_failure == "keep":
        commit_params(result, target.params, out.params)
    return result


def commit_params(result: EditResult, params: Sequence[Tensor], new_values: Sequence[Tensor]) -> None:
    """Copy ``new_values`` into ``params`` atomically (restored if a copy fails), keeping a backup in
    ``result`` for :meth:`EditResult.revert`."""
    result._backup = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, new in zip(params, new_values):
                p.copy_(new)
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(params, result._backup):
                p.copy_(saved)
        raise
    result.applied = True
