"""The machinery shared by every edit (fe.edit, fe.evaluate, fe.tune, fe.surgery, the baselines and
Editable Training): the edit loop, a model prepared for editing, and the argument checks.

Not public API: the public edit is :func:`fastedit.edit` (fastedit/edit.py), with its
:class:`~fastedit.edit.EditResult`, :class:`~fastedit.edit.EditError` and
:class:`~fastedit.edit.PrefixFallbackWarning`. The names here without a leading underscore are
meant for fastedit's own modules.

The loop (docs/design.md): up to ``max_steps`` editor steps on the editable parameters, each step
active only while the constraint ``l_e > 0`` (:func:`edit_loop`, :func:`run_edit_loop`,
:func:`run_edit_loop_batched`). :class:`EditTarget` holds the editable parameters and the prefix
split (cached per model by :func:`cached_entry`); :func:`commit_params` writes an accepted edit
into the model atomically.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .compiled import CompiledSplit, compiled_split
from .constraint import REDUCTIONS, Classification, Constraint, as_constraint, check_label_range, reduce_constraint
from .editors import Editor
from .model_io import ModelInputs, OutputSpec, read_logits, resolve_output
from .ops.editor_step import editor_step_
from .prefix import ModelSplit, build_split
from .selection import ParamSpec, parameter_slots, select_parameters, swapped

if TYPE_CHECKING:
    from .edit import EditResult

__all__ = ["EditLoopOutput", "edit_loop", "run_edit_loop", "run_edit_loop_batched", "EditTarget", "cached_entry",
           "clear_split_cache", "warn_fallback", "eval_mode", "check_editable", "check_rows", "model_failure",
           "math_attention", "resolve_early_exit", "check_common", "split_info", "resolve_aliases",
           "commit_params", "applied_edits"]


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
    """Whether every gradient entry is finite: per edit (``[E]``) when batched, else 0-dim.

    ``(g * 0).sum()`` is 0 when every entry is finite and NaN otherwise (``inf · 0`` and ``NaN · 0``
    are NaN; a sum of zeros cannot overflow); one pass, 6x faster than ``isfinite().all()`` on the CPU."""
    if not batched and grads[0].device.type == "cpu":
        # fast path (the host reads the flag for free on the CPU): every L2 norm finite implies every
        # entry finite; a non-finite norm (a NaN or inf, or a huge finite gradient whose square
        # overflows) is decided exactly below. One foreach pass instead of a reduction per tensor.
        if bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            return torch.ones((), dtype=torch.bool)
    if batched:
        e = grads[0].shape[0]
        return torch.stack([(g.reshape(e, -1) * 0).sum(1) for g in grads]).isfinite().all(0)
    return torch.stack([(g * 0).sum() for g in grads]).isfinite().all()


def edit_loop(forward: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor], editor: Editor,
               max_steps: int, early_exit: bool, batched: bool, penalised: bool = False,
               names: Sequence[str] | None = None) -> EditLoopOutput:
    """The loop shared by :func:`run_edit_loop` (0-dim loss) and :func:`run_edit_loop_batched`
    (``[E]`` losses, a leading edit dimension on ``params``, per-edit masks), and by the EWC
    baseline (:func:`fastedit.baselines.ewc.run_penalised_loop`). With ``penalised``, ``forward``
    returns ``(objective, constraint)``: the steps follow the objective's gradient, while activity,
    success and the reported losses are the constraint's (EWC editing). ``names`` (one per
    parameter) name the parameters in the step kernel's error messages."""
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
            grads = torch.autograd.grad(loss_total, leaves, allow_unused=True)
            if all(g is None for g in grads):
                raise ValueError("the constraint does not depend on the editable parameters: select "
                                 "parameters the model's output depends on")
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
            bad_grad = active & ~_finite_per_edit(grads, batched)
            bad_step = torch.where(bad_grad & (bad_step < 0), k, bad_step)
            active = active & ~bad_grad
            editor_step_(editor, theta, grads, state, active, batched=batched, names=names)
            steps = steps + active
    return EditLoopOutput(theta, loss, initial, steps, bad_step)


def run_edit_loop(loss_fn: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor], editor: Editor,
                  max_steps: int, *, early_exit: bool = False, names: Sequence[str] | None = None) -> EditLoopOutput:
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
    return edit_loop(loss_fn, params, editor, max_steps, early_exit, batched=False, names=names)


def run_edit_loop_batched(loss_one: Callable[[list[Tensor], Any], Tensor], params: Sequence[Tensor], inputs: Any,
                          editor: Editor, max_steps: int, *, early_exit: bool = False,
                          names: Sequence[str] | None = None) -> EditLoopOutput:
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
    # contiguous per-edit copies: torch.func.vmap computes wrong conv2d weight gradients for batched
    # channels_last weights (torch 2.13 CPU; tests/api/test_memory_formats.py), and the loop's clone
    # would keep those strides. The edited parameters are returned [G, ...], never written back.
    expanded = [p.detach().unsqueeze(0).expand(g, *p.shape).contiguous() for p in params]
    return edit_loop(lambda leaves: batched_loss(leaves, inputs), expanded, editor, max_steps, early_exit,
                      batched=True, names=names)


# ------------------------------------------------------------------------------------------------
# a model prepared for editing: selection, prefix split (cached), eval mode
# ------------------------------------------------------------------------------------------------
_SPLIT_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_SPLITS_PER_MODEL = 4  # a model is usually edited with one selection and one or two input signatures
_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def model_fingerprint(model: nn.Module) -> tuple:
    """Everything a selection, a prefix split and a captured CUDA graph depend on, in one walk of the
    model: each submodule's identity and attribute name, each registered parameter's identity, ``requires_grad``,
    dtype, device and storage address (``model.to()`` and ``p.data = ...`` keep the Parameter object
    but not its device or storage), and each buffer's identity and storage address. Equal
    fingerprints mean the cached selection and split still describe the model; replacing, moving,
    adding or freezing anything changes it."""
    out: list = []
    add, stack, seen = out.append, [model], set()
    while stack:  # an explicit walk: 2x faster than named_modules(), which builds every name
        m = stack.pop()
        add(id(m))
        if id(m) in seen:  # shared (or, pathologically, cyclic) submodule: walked once
            continue
        seen.add(id(m))
        for k, p in m._parameters.items():
            if p is not None:
                add((k, id(p), p.requires_grad, p.dtype, p.device, _address(p)))
        for k, b in m._buffers.items():
            if b is not None:
                add((k, id(b), _address(b)))
        for k, child in m._modules.items():
            add(k)
            if child is not None:
                stack.append(child)
    return tuple(out)


def _address(t: Tensor) -> int:
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse or wrapper subclasses: identity only
        return -1


def cached_entry(model: nn.Module, names: Sequence[str], use_prefix: bool, inputs: ModelInputs,
                 read: Callable | None = None, fingerprint: tuple | None = None) -> dict:
    """``{"split": ModelSplit}`` for this model, editable names and input signature, built once (in
    eval mode: mode-dependent Python is fixed at trace time) and kept for the next calls while the
    model's :func:`model_fingerprint` and every tensor the split binds stay the same (checked at
    every call; pass ``fingerprint`` when the caller has it)."""
    key = (frozenset(names), use_prefix, fingerprint or model_fingerprint(model), inputs.signature())
    per_model = _SPLIT_CACHE.setdefault(model, {})
    # an equal fingerprint vouches for every registered tensor; current() looks up the plain attributes
    if key in per_model and not per_model[key]["split"].current(registered_unchanged=True):
        del per_model[key]  # a tensor the split binds was replaced: never serve it stale
    if key not in per_model:
        while len(per_model) >= _SPLITS_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        with eval_mode(model):
            split = build_split(model, list(names), inputs, read or _default_read, use_prefix)
        per_model[key] = {"split": split}
    return per_model[key]


_SELECTIONS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_SELECTIONS_PER_MODEL = 8


def _spec_key(params: ParamSpec) -> tuple | None:
    """A hashable key for a selection spec (tensors by identity: while the caller holds them and the
    fingerprint matches, an equal id is the same parameter), or None when it has no stable key."""
    if params is None or isinstance(params, str):
        return ("spec", params)
    if isinstance(params, Tensor):
        return ("tensor", id(params))
    if isinstance(params, (list, tuple)):
        parts = []
        for item in params:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, Tensor):
                parts.append(("tensor", id(item)))
            else:
                return None  # select_parameters raises the error
        return ("list", tuple(parts))
    return None  # a generator or other iterable: select anew


def cached_selection(model: nn.Module, params: ParamSpec, include_frozen: bool,
                     fingerprint: tuple) -> list[tuple[str, nn.Parameter]]:
    """:func:`fastedit.selection.select_parameters`, kept per model while its fingerprint is equal
    (the selection depends on nothing else), so a stream of edits selects once."""
    spec = _spec_key(params)
    if spec is None:
        return select_parameters(model, params, include_frozen=include_frozen)
    key = (spec, include_frozen, fingerprint)
    per_model = _SELECTIONS.setdefault(model, {})
    chosen = per_model.get(key)
    if chosen is None:
        chosen = select_parameters(model, params, include_frozen=include_frozen)
        while len(per_model) >= _SELECTIONS_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        per_model[key] = chosen
    return list(chosen)


def clear_split_cache(model: nn.Module | None = None) -> None:
    """Forget the prefix splits kept for ``model`` (every model when None); the next edit builds anew."""
    if model is None:
        _SPLIT_CACHE.clear()
        _SELECTIONS.clear()
    else:
        _SPLIT_CACHE.pop(model, None)
        _SELECTIONS.pop(model, None)


def _default_read(out):
    return read_logits(out, resolve_output(None))


def warn_fallback(model: nn.Module, split: ModelSplit) -> None:
    """Warn once per model that its edits run without the frozen prefix, and why."""
    if split.used or split.reason is None or split.reason.startswith("prefix split disabled"):
        return
    if model in _WARNED:
        return
    _WARNED.add(model)
    from .edit import PrefixFallbackWarning  # late: the public edit API imports this module
    warnings.warn(f"fastedit: the frozen prefix of {type(model).__name__} is not used, so every editor step "
                  f"runs the whole model ({split.reason})", PrefixFallbackWarning, stacklevel=3)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards (nothing to do
    for a model in eval mode already, the common case when editing a deployed model)."""
    flags = [(m, m.training) for m in model.modules()]
    if not any(flag for _, flag in flags):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _first_param_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@dataclass
class EditTarget:
    """The editable parameters of a model, its prefix split and how to read its logits, ready for
    functional edits. The split belongs to one input call signature (:meth:`ModelInputs.signature`);
    it is made from the first inputs seen (``build(inputs=...)`` or the first :meth:`prefix`), and
    :meth:`for_inputs` gives the target for inputs of another signature."""

    model: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    read: Callable = field(default=_default_read, repr=False)
    use_prefix: bool = True
    _entry: dict | None = field(default=None, repr=False)
    _signature: tuple | None = field(default=None, repr=False)
    compiled: CompiledSplit | None = field(default=None, repr=False)  # edits through torch.compile

    @classmethod
    def build(cls, model: nn.Module, params: ParamSpec = None, use_prefix: bool = True, *, inputs=None,
              output: OutputSpec = None, include_frozen: bool = False) -> "EditTarget":
        """Select the parameters (see :func:`fastedit.selection.select_parameters`); with ``inputs``
        (a tensor, tuple or mapping, see :mod:`fastedit.model_io`) also get the split for inputs like
        them. A model that fails on ``inputs`` raises ``ValueError``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        fingerprint = model_fingerprint(model)  # one walk serves the selection and the split caches
        chosen = cached_selection(model, params, include_frozen, fingerprint)
        check_editable(chosen)
        reader = resolve_output(output)

        def read(out):
            return read_logits(out, reader)
        target = cls(model, [n for n, _ in chosen], [p for _, p in chosen], read, use_prefix)
        if inputs is not None:
            target._ensure_split(ModelInputs.of(inputs), fingerprint)
        return target

    def _ensure_split(self, mi: ModelInputs, fingerprint: tuple | None = None) -> None:
        if self._entry is not None:
            return
        mi.check_device(self.device)
        try:
            self._entry = cached_entry(self.model, self.names, self.use_prefix, mi, self.read, fingerprint)
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            raise model_failure(self.model, mi, exc) from exc
        self._signature = mi.signature()
        warn_fallback(self.model, self._entry["split"])

    def for_inputs(self, inputs) -> "EditTarget":
        """This target if ``inputs`` have its call signature (or it has none yet), else a target
        with the same parameters and the split for ``inputs``."""
        mi = ModelInputs.of(inputs)
        if self._entry is None:
            self._ensure_split(mi)
            return self
        if mi.signature() == self._signature:
            return self
        other = EditTarget(self.model, self.names, self.params, self.read, self.use_prefix)
        other._ensure_split(mi)
        return other

    @property
    def entry(self) -> dict:
        """The split's cache entry (one per model fingerprint, selection and input signature), where
        checks made once per split keep their verdicts."""
        if self._entry is None:
            raise RuntimeError("internal: the split is made from the first inputs (EditTarget.prefix)")
        return self._entry

    @property
    def split(self) -> ModelSplit:
        if self._entry is None:
            raise RuntimeError("internal: the split is made from the first inputs (EditTarget.prefix)")
        return self._entry["split"]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def prefix_used(self) -> bool:
        return self.split.used

    @property
    def prefix_reason(self) -> str | None:
        return self.split.reason

    def check_inputs(self, inputs, target, what: str = "inputs") -> tuple[ModelInputs, Constraint]:
        """Normalise and validate ``inputs`` and ``target`` (device, sample counts, label types)."""
        mi = ModelInputs.of(inputs, what)
        mi.check_device(self.device, what)
        if isinstance(target, int) and not isinstance(target, bool):
            target = torch.tensor(target, device=self.device)
        constraint = as_constraint(target)
        constraint.check_device(self.device)
        check_rows(constraint, mi.num_samples)
        return mi, constraint

    def prefix(self, inputs) -> Any:
        """The frozen activations of ``inputs`` for editor steps (no graph)."""
        mi = ModelInputs.of(inputs)
        self._ensure_split(mi)
        if self.compiled is not None and self.compiled.prefix is not None:
            with torch.no_grad():
                args = tuple(self.split.bind(mi))
                return self.compiled.prefix(args, lambda: self.split.edit_acts(mi, self.names, self.params))
        return self.split.edit_acts(mi, self.names, self.params)

    def output(self, acts, theta: Sequence[Tensor] | None = None):
        """The model's output from the frozen activations, with ``theta`` in place of the editable
        parameters (every alias of a tied one)."""
        if theta is None:
            return self.split.suffix(acts)
        if self.compiled is not None and torch.is_grad_enabled():
            return self.compiled.suffix((list(theta), acts), lambda: self._swapped_output(acts, theta))
        return self._swapped_output(acts, theta)

    def _swapped_output(self, acts, theta: Sequence[Tensor]):
        slots = self._entry.get("slots")
        if slots is None:
            slots = self._entry["slots"] = parameter_slots(self.split.suffix_module, self.params)
        with swapped(slots, theta):
            return self.split.suffix(acts)

    def use_compiled(self, on: bool) -> None:
        """Run the editor steps' suffix forwards (and so their backwards) compiled when ``on``
        (:mod:`fastedit.compiled`; a compiler failure is reported by ``compiled.failed``)."""
        self.compiled = compiled_split(self._entry, self.names) if on else None

    @property
    def eager_edits(self) -> int:
        """Edits this split has served without compilation (``compile="auto"`` counts them)."""
        return self._entry.get("eager_edits", 0)

    def count_eager_edit(self) -> None:
        self._entry["eager_edits"] = self.eager_edits + 1

    def logits(self, acts, theta: Sequence[Tensor] | None = None) -> Tensor:
        return self.read(self.output(acts, theta))

    def loss_fn(self, acts, target, reduction: str, inputs: ModelInputs | None = None) -> Callable[[list[Tensor]], Tensor]:
        """``theta -> l_e`` (0-dim). The first call also validates the constraint against the logits
        (shapes, label ranges) and turns a failing forward into ``ValueError``: nothing is written
        before, since the loop edits copies."""
        constraint = as_constraint(target)
        first = [True]

        def loss(theta: list[Tensor]) -> Tensor:
            if first[0]:
                first[0] = False
                try:
                    logits = self.logits(acts, theta)
                except (TypeError, ValueError):
                    raise
                except Exception as exc:
                    raise model_failure(self.model, inputs, exc) from exc
                constraint.validate(logits.detach())
                return reduce_constraint(constraint.pack(constraint.per_sample(logits)), reduction)
            return reduce_constraint(constraint.pack(constraint.per_sample(self.logits(acts, theta))), reduction)
        return loss

    def eval_prefix(self, inputs) -> Any:
        """The frozen activations of ``inputs`` for forwards without grad (control sets, checks)."""
        mi = ModelInputs.of(inputs)
        self._ensure_split(mi)
        return self.split.eval_acts(mi)

    def num_classes(self, inputs) -> int:
        """The model's class count, from one forward of ``inputs`` (never cached: a head may change)."""
        with torch.no_grad():
            return int(self.logits(self.checked_prefix(inputs, steps=False)).shape[-1])

    def check_labels(self, num_classes: int, y: Tensor) -> None:
        check_label_range(y, num_classes)

    def checked_prefix(self, inputs, steps: bool = True) -> Any:
        """The frozen activations of ``inputs`` for editor steps (``steps``) or for forwards without
        grad; a model that cannot take them (a shape or dtype mismatch, say) raises ``ValueError``
        before anything is written."""
        mi = ModelInputs.of(inputs)
        try:
            return self.prefix(mi) if steps else self.eval_prefix(mi)
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            raise model_failure(self.model, mi, exc) from exc


def check_editable(chosen: Sequence[tuple[str, Tensor]]) -> None:
    """Refuse, saying what to do, parameters an edit cannot change: under ``torch.inference_mode()``
    (no autograd), parameters created under it (inference tensors), parameters on the meta device."""
    from .edit import EditError  # late: the public edit API imports this module
    if torch.is_inference_mode_enabled():
        raise EditError("fastedit cannot edit inside torch.inference_mode() (autograd is off there): call it "
                        "outside the `with torch.inference_mode():` block; the model is unchanged")
    for name, p in chosen:
        if p.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device (a shape, no values): materialise the model "
                             "first, e.g. model.to_empty(device='cpu') and then load its weights")
        if p.is_inference():
            raise EditError(f"parameter {name} was created under torch.inference_mode(), so autograd cannot "
                            "differentiate it: build the model outside inference mode and load the weights into it "
                            "(`fresh.load_state_dict(model.state_dict())`); the model is unchanged")


def check_rows(constraint: Constraint, num_samples: int) -> None:
    """``ValueError`` unless a per-row constraint has one row per input sample."""
    if isinstance(constraint, Classification):
        constraint.check_rows(num_samples)
    elif hasattr(constraint, "labels") and isinstance(constraint.labels, Tensor):
        rows = constraint.labels.shape[0]
        if rows != num_samples:
            raise ValueError(f"{type(constraint).__name__}: the labels have {rows} rows but the inputs "
                             f"{num_samples} samples")


def model_failure(model: nn.Module, inputs: ModelInputs | None, exc: BaseException) -> ValueError:
    """A clear ``ValueError`` for a model that fails on the user's inputs (naming a dtype mismatch)."""
    where = inputs.describe() if inputs is not None else "the inputs"
    hint = ""
    want = _first_param_dtype(model)
    if inputs is not None and want is not None:
        other = sorted(str(d) for d in inputs.float_dtypes() if d != want)
        if other:
            hint = (f"; the inputs have dtype {', '.join(other)} but the model's parameters start with {want}: "
                    "cast the inputs")
    return ValueError(f"the model failed on {where}: {exc}{hint}")


def math_attention():
    """A context in which scaled-dot-product attention uses its math backend: the fused CPU/CUDA
    kernels have no double backward, which Editable Training's unrolled steps need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def resolve_early_exit(early_exit: bool | str, device: torch.device) -> bool:
    if early_exit == "auto":
        return device.type == "cpu"
    if isinstance(early_exit, bool):
        return early_exit
    raise ValueError(f"early_exit must be True, False or 'auto', got {early_exit!r}")


def check_common(max_steps: int, reduction: str, on_failure: str = "revert") -> None:
    """Validate the arguments shared by edit, evaluate and EditableTraining."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer ≥ 0, got {max_steps!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if on_failure not in ("revert", "keep"):
        raise ValueError(f"on_failure must be 'revert' or 'keep', got {on_failure!r}")


def split_info(target: EditTarget) -> dict:
    """The ``prefix_*`` fields of results and reports."""
    split = target.split
    rows = split.rows
    return {"prefix_used": split.used, "prefix_reason": split.reason,
            "prefix_method": split.method,
            "rows_pruned": [split.module_name(r.module) for r in rows if not r.disabled],
            "rows_reason": next((r.disabled for r in rows if r.disabled), None)}


def resolve_aliases(inputs, target, x, y) -> tuple[Any, Any]:
    """``inputs``/``target``, or their former names ``x``/``y`` (still accepted as keywords)."""
    if x is not None:
        if inputs is not None:
            raise TypeError("pass inputs or x, not both")
        inputs = x
    if y is not None:
        if target is not None:
            raise TypeError("pass target or y, not both")
        target = y
    if inputs is None:
        raise TypeError("missing the inputs (the second argument)")
    if target is None:
        raise TypeError("missing the target (the third argument): class labels or a fe.Constraint")
    return inputs, target


# ------------------------------------------------------------------------------------------------
# writing an accepted edit into the model
# ------------------------------------------------------------------------------------------------
#: edits applied and not reverted; a LIFO revert hands the restored state back to the edit below it
#: (:meth:`fastedit.edit.EditResult.revert`)
applied_edits: "weakref.WeakSet[EditResult]" = weakref.WeakSet()


def commit_params(result: EditResult, params: Sequence[Tensor], new_values: Sequence[Tensor],
                  model: nn.Module | None = None) -> None:
    """Copy ``new_values`` into ``params`` atomically (restored if a copy fails), keeping a backup in
    ``result`` for :meth:`EditResult.revert` and the version counters it checks."""
    result._backup = [p.detach().clone() for p in params]
    result._model = model
    result._before = [p._version for p in params]
    try:
        with torch.no_grad():
            for p, new in zip(params, new_values):
                p.copy_(new)
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(params, result._backup):
                p.copy_(saved)
        raise
    result._written = [p._version for p in params]
    result.applied = True
    applied_edits.add(result)
