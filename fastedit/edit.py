"""One edit: patch a model so that it satisfies a constraint on some inputs, in place, atomically and
revertibly.

The loop (docs/design.md): up to ``max_steps`` editor steps on the editable parameters, each step
active only while the constraint ``l_e > 0``. The active flag lives on the device, so the loop needs
no host synchronisation; on the CPU, where reading a flag costs nothing, the loop also *exits* once
the edit is satisfied (``early_exit="auto"``), which gives the same result bit for bit because
inactive steps are the identity.

Only the suffix of the model that depends on the editable parameters is re-run per step: the frozen
prefix's activations are computed once (:mod:`fastedit.prefix`: an fx graph split, or cached module
calls for models fx cannot trace). A model whose prefix cannot be skipped is edited whole, and the
result says so (``prefix_used``, ``prefix_reason``; a :class:`PrefixFallbackWarning` once per model).

Atomicity: the loop runs on copies of the editable parameters and writes them into the model only
at the end, when the edit is accepted. Any error, bad input or non-finite value leaves the model bit
for bit as it was; :meth:`EditResult.revert` restores the parameters from a saved copy.

This module is the public edit API; the loop and the machinery it shares with fe.evaluate, fe.tune,
fe.surgery, the baselines and Editable Training are in :mod:`fastedit._core`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._core import (
    EditTarget,
    applied_edits,
    check_common,
    commit_params,
    eval_mode,
    model_failure,
    resolve_aliases,
    resolve_early_exit,
    run_edit_loop,
    split_info,
)
from .compiled import check_compile, graphed_loop, resolve_compile
from .editors import Editor, make_editor
from .kept_logits import keep_labelled_logits, needs_recheck, whole_loss
from .model_io import OutputSpec
from .selection import ParamSpec

__all__ = ["edit", "EditResult", "EditError", "PrefixFallbackWarning"]


class EditError(RuntimeError):
    """An edit could not be carried out (non-finite loss or gradient, a failing forward); the model
    is unchanged."""


class PrefixFallbackWarning(UserWarning):
    """Edits of a model run without the frozen prefix (the reason is in the message)."""


# ------------------------------------------------------------------------------------------------
# the public edit
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class EditResult:
    """What :func:`edit` did. ``applied`` tells whether the model now holds the edited parameters;
    ``prefix_used`` whether the frozen prefix was skipped in the editor steps (``prefix_method``:
    ``"fx"`` or ``"call-cache"``), and if not, ``prefix_reason`` says why. ``rows_pruned``: the
    submodules that computed only the output positions the model reads (a BERT classifier's last
    layer at [CLS], :mod:`fastedit.rows`); ``rows_reason``: why pruning stopped, if it did. ``compiled`` and
    ``cuda_graph`` say whether the steps ran compiled or as a replayed CUDA graph; where one was asked
    for and not used, ``compile_reason``/``cuda_graph_reason`` say why. ``compile_seconds``: time this
    edit spent compiling (0 once the shapes are compiled). ``logits_kept``: for a token constraint, the
    logits positions the language-model head computed in the steps (the labelled ones,
    :mod:`fastedit.kept_logits`; 0: every position), and ``logits_reason`` why the head ran whole
    where it could have kept fewer."""

    success: bool
    steps: int
    loss: float
    initial_loss: float
    applied: bool
    param_names: list[str]
    prefix_used: bool = False
    prefix_reason: str | None = None
    prefix_method: str = "none"
    rows_pruned: list[str] = field(default_factory=list)
    rows_reason: str | None = None
    compiled: bool = False
    compile_reason: str | None = None
    compile_seconds: float = 0.0
    cuda_graph: bool = False
    cuda_graph_reason: str | None = None
    logits_kept: int = 0
    logits_reason: str | None = None
    _params: list[nn.Parameter] = field(repr=False, default_factory=list)
    _backup: list[Tensor] = field(repr=False, default_factory=list)
    _model: Any = field(default=None, repr=False)
    _before: list[int] = field(repr=False, default_factory=list)   # version counters before the write
    _written: list[int] = field(repr=False, default_factory=list)  # and right after it

    def changed_since(self) -> list[str]:
        """Names of the edited parameters that no longer hold what this edit wrote: written in place
        since (PyTorch's version counters: another edit, an optimizer step, ``load_state_dict``), or
        replaced in the model by another tensor."""
        out = []
        for name, p, v in zip(self.param_names, self._params, self._written):
            replaced = self._model is not None and _lookup(self._model, name) is not p
            if replaced or p._version != v:
                out.append(name)
        return out

    def revert(self, force: bool = False) -> None:
        """Restore every edited parameter bit-identically to its value before the edit (a no-op if
        the edit was not applied or was already reverted).

        Raises ``ValueError`` and writes nothing if a parameter no longer holds the values this edit
        wrote (:meth:`changed_since`), e.g. a later edit of the same parameters is still applied:
        revert edits in the reverse order of applying them. ``force=True`` writes the backup anyway."""
        if not self.applied:
            return
        changed = self.changed_since()
        if changed and not force:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise ValueError(f"cannot revert this edit: {shown} no longer hold the values it wrote (changed since, "
                             "e.g. by a later edit that is still applied); revert the later edits first, or pass "
                             "force=True to write this edit's backup anyway")
        with torch.no_grad():
            for p, saved in zip(self._params, self._backup):
                p.copy_(saved)
        restored = [p._version for p in self._params]
        # the edit applied right before this one holds its values again: it may be reverted next
        for other in list(applied_edits):
            if other is self or not other.applied:
                continue
            for k, q in enumerate(other._params):
                for p, before, now in zip(self._params, self._before, restored):
                    if q is p and other._written[k] == before:
                        other._written[k] = now
        self.applied = False
        applied_edits.discard(self)

    def to_dict(self) -> dict:
        return {"success": self.success, "steps": self.steps, "loss": self.loss,
                "initial_loss": self.initial_loss, "applied": self.applied, "params": list(self.param_names),
                "prefix_used": self.prefix_used, "prefix_reason": self.prefix_reason,
                "prefix_method": self.prefix_method, "rows_pruned": list(self.rows_pruned),
                "rows_reason": self.rows_reason, "compiled": self.compiled,
                "compile_reason": self.compile_reason, "compile_seconds": self.compile_seconds,
                "cuda_graph": self.cuda_graph, "cuda_graph_reason": self.cuda_graph_reason,
                "logits_kept": self.logits_kept, "logits_reason": self.logits_reason}


def _lookup(model: nn.Module, name: str):
    """``model.get_parameter(name)``, or None where there is none; the registries walked directly
    (revert asks for every edited parameter, and ``get_parameter`` costs ~5 µs a name)."""
    *path, leaf = name.split(".")
    module = model
    for part in path:
        module = module._modules.get(part)
        if module is None:
            return None
    return module._parameters.get(leaf)


def edit(model: nn.Module, inputs=None, target=None, editor: Editor | str = "rmsprop", params: ParamSpec = None,
         max_steps: int = 10, *, on_failure: str = "revert", reduction: str = "max",
         use_prefix: bool = True, early_exit: bool | str = "auto", output: OutputSpec = None,
         include_frozen: bool = False, compile: bool | str = False, cuda_graph: bool | str = False,
         x=None, y=None) -> EditResult:
    """Edit ``model`` in place so that it satisfies ``target`` on ``inputs``.

    Args:
        model: any ``nn.Module``; run in eval mode during the edit (BatchNorm uses its running
            statistics, dropout is off) and restored to its modes afterwards.
        inputs: what the model is called with: a tensor ``[B, ...]``, a tuple of positional
            arguments, or a mapping of keyword arguments (a tokenizer's output); the first dimension
            of every tensor is the sample dimension (one edit may hold several samples). On the
            parameters' device. (Formerly ``x``, still accepted as a keyword.)
        target: what the edit must achieve: class label(s) (an int or an integer tensor ``[B]``,
            i.e. :class:`~fastedit.Classification`), a :class:`~fastedit.TokenTargets`, a
            :class:`~fastedit.SequenceRanking`, any :class:`~fastedit.Constraint`, or a callable
            ``logits -> l_e`` per unit (≤ 0 when satisfied). (Formerly ``y``.)
        editor: an :class:`~fastedit.editors.Editor` or its name (default hyper-parameters).
        params: the editable parameters: a module-name prefix (``"layer3"``), a list of names, or
            parameters; ``None`` edits every parameter. Any alias of a tied weight selects it.
        max_steps: at most this many editor steps (the paper's k = 10).
        on_failure: when the constraint is still violated after ``max_steps``: ``"revert"``
            (default) leaves the model as it was; ``"keep"`` keeps the partially edited parameters.
        reduction: ``"max"`` (every unit must be satisfied) or ``"mean"`` over the units.
        use_prefix: skip the frozen prefix in the editor steps (an fx split, or cached module calls
            for models fx cannot trace; see ``prefix_used``); ``False`` re-runs the whole model.
        early_exit: stop once satisfied (``"auto"``: on the CPU, where the check is free).
        output: where the logits are in the model's output: ``None`` (a tensor is itself, a
            ``ModelOutput``/dict gives ``["logits"]``, a tuple ``[0]``), a key, an index or a callable.
        include_frozen: also edit parameters with ``requires_grad=False`` (by default a module prefix
            skips them and naming one raises).
        compile: run the editor steps' suffix forward and backward ``torch.compile``d
            (:mod:`fastedit.compiled`): ``True``, ``False`` (default) or ``"auto"`` (on CUDA once the
            same model, selection and input signature has served 32 eager edits; never on the CPU,
            where compilation does not pay off). Cached with the prefix split; the first edit of
            each input shape compiles (``compile_seconds``). Results equal the eager path within
            floating-point rounding; a split that cannot be compiled, or a compiler failure, runs
            eager and says why (``compile_reason``).
        cuda_graph: on CUDA, capture the whole masked ``max_steps`` loop (no early exit) as a CUDA
            graph once per model, selection, editor, step count and input shapes, and replay it per
            edit (``True``, ``False`` (default), or ``"auto"``: where it applies); see
            :class:`fastedit.compiled.GraphedEditLoop` for what it supports. ``True`` on parameters
            not on CUDA raises ``ValueError``.

    Returns:
        :class:`EditResult` with ``success``, ``steps``, ``loss`` (final ``l_e``), ``applied``,
        ``prefix_used``/``prefix_reason`` and ``revert()`` (which refuses while a later edit of the
        same parameters is applied).

    Raises:
        ValueError / TypeError for bad input (unknown or empty ``params``, a label out of range or of
        the wrong shape, no labelled position, a failing model, a device mismatch, an ``output`` key
        that is missing); :class:`EditError` for a non-finite loss or gradient. In every such case
        the model is left bit-identical to before.
    """
    inputs, target = resolve_aliases(inputs, target, x, y)
    check_common(max_steps, reduction, on_failure)
    editor = make_editor(editor)
    check_compile(compile)
    with eval_mode(model):
        et = EditTarget.build(model, params, use_prefix, inputs=inputs, output=output,
                              include_frozen=include_frozen)
        mi, constraint = et.check_inputs(inputs, target)
        et.use_compiled(resolve_compile(compile, et.device, et.eager_edits))
        compile_reason = None
        graph, graph_reason = graphed_loop(et, cuda_graph, editor, max_steps, reduction, mi, constraint,
                                           early_exit)
        compiled_before = et.compiled.compile_seconds if et.compiled is not None else 0.0
        acts = et.checked_prefix(mi)
        fixed = ("the steps run as a CUDA graph (fixed shapes)" if graph is not None else
                 "the steps run compiled (fixed shapes)" if et.compiled is not None else None)
        kept, kept_reason = keep_labelled_logits(model, constraint, et.entry, et.params,
                                                 lambda: _logits(et, acts, et.params, mi), fixed)
        if graph is not None:
            out = graph.run(acts, constraint)
        else:
            with kept.installed(frozen=True) if kept is not None else contextlib.nullcontext():
                steps_constraint = kept.constraint if kept is not None else constraint
                out = run_edit_loop(et.loss_fn(acts, steps_constraint, reduction, mi), et.params, editor, max_steps,
                                    early_exit=resolve_early_exit(early_exit, et.device), names=et.names)
            if kept is not None and bool(torch.isfinite(out.loss)) and needs_recheck(kept):
                out.loss = whole_loss(constraint, _logits(et, acts, out.params), reduction)
        compiled = et.compiled is not None and et.compiled.failed is None
        if et.compiled is not None and et.compiled.failed is not None:
            compile_reason = et.compiled.failed
        compile_seconds = et.compiled.compile_seconds - compiled_before if et.compiled is not None else 0.0
        if not compiled:
            et.count_eager_edit()

    bad_step = int(out.bad_step)  # the one host sync of the edit
    if bad_step >= 0:
        raise EditError(f"non-finite constraint or gradient at step {bad_step} of the edit "
                        f"(editor {editor!r}); the model is unchanged")
    success = bool(out.success)
    result = EditResult(success=success, steps=int(out.steps), loss=float(out.loss),
                        initial_loss=float(out.initial_loss), applied=False, param_names=list(et.names),
                        **split_info(et), compiled=compiled, compile_reason=compile_reason,
                        compile_seconds=compile_seconds, cuda_graph=graph is not None,
                        cuda_graph_reason=graph_reason, logits_kept=kept.index.numel() if kept is not None else 0,
                        logits_reason=kept_reason, _params=list(et.params))
    if success or on_failure == "keep":
        commit_params(result, et.params, out.params, model)
    return result


def _logits(et: EditTarget, acts, theta, inputs=None) -> Tensor:
    """The logits from the edit's activations with ``theta``, in the grad mode of the editor steps
    (cached module calls are bound to it), without a graph kept; a failing model raises as in the
    steps (:func:`fastedit._core.model_failure`)."""
    try:
        with torch.enable_grad():
            return et.logits(acts, [t.detach() for t in theta]).detach()
    except (TypeError, ValueError):
        raise
    except Exception as exc:
        raise model_failure(et.model, inputs, exc) from exc
