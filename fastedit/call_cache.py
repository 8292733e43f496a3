"""The frozen prefix of any model: cache the calls of submodules that finish before the editable
parameters are first reached, and replay the model's own Python with those calls answered from the
cache.

Why: ``torch.fx`` cannot trace most transformers (HF code creates masks with data-dependent Python,
``nn.TransformerEncoder`` checks its inputs' values), and ``torch.export`` specialises the graph to
the example's shapes. Recording module calls needs neither: it runs the model once, as it is, on the
actual inputs, and works for any Python control flow and any input length.

Record (once per input, :func:`record`): the model runs with forward hooks on every submodule. A
module *holds* an editable parameter if the parameter is in its own ``_parameters`` (tied weights:
every module that holds the shared tensor). A call is *frozen* if it finishes before any module that
holds an editable parameter is entered: its output cannot depend on the editable parameters, since
nothing that could read them has run yet. The outermost frozen calls are cached (module, its call
number, output); their inner calls are not.

Replay (every editor step, :func:`replay`): the model's own ``forward`` runs on the same inputs, each
cached module's ``forward`` temporarily replaced by one that answers its recorded call numbers from
the cache and runs the module normally otherwise. The glue code between modules (mask creation,
residual additions) runs again; everything inside the cached calls does not. The same operations
run on the same values, so the output is bit-identical to the model's (checked when the split is
built, with perturbed editable parameters too, :func:`verify`).

Limits, each detected and reported as the reason for not using the cache: global module hooks
(they would run again on replay; a module with hooks of its own is simply not cached), a model
whose output does not depend on the editable parameters, a model whose calls differ between record
and replay. A cached output that the model later modifies in place is copied when recorded and on
every replay.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .model_io import ModelInputs

__all__ = ["CachedActs", "record", "replay", "CallCacheError", "holders_of"]


class CallCacheError(RuntimeError):
    """The model cannot be split by caching module calls (the message says why)."""


class CachedActs:
    """What the prefix run of one input leaves for the editor steps: the inputs, and the outputs of
    the outermost frozen module calls. A pytree node (the tensors are its leaves; the call plan, a
    tuple of ``(module, call number, clone)``, and the grad mode of the run are its static context).

    Replays must run in the recorded grad mode: models branch on it (``nn.TransformerEncoder``
    switches to nested tensors under ``no_grad``), so a cache recorded with grad enabled cannot
    answer a forward without grad (:func:`replay` raises)."""

    __slots__ = ("inputs", "outputs", "plan", "grad")

    def __init__(self, inputs: ModelInputs, outputs: tuple, plan: tuple, grad: bool):
        self.inputs, self.outputs, self.plan, self.grad = inputs, outputs, plan, grad

    def __repr__(self) -> str:
        return f"CachedActs({len(self.plan)} cached calls, grad={self.grad})"


pytree.register_pytree_node(
    CachedActs,
    lambda a: ([a.inputs, a.outputs], (a.plan, a.grad)),
    lambda children, ctx: CachedActs(children[0], tuple(children[1]), *ctx),
    serialized_type_name="fastedit.CachedActs",
    flatten_with_keys_fn=lambda a: ([(pytree.GetAttrKey("inputs"), a.inputs),
                                     (pytree.GetAttrKey("outputs"), a.outputs)], (a.plan, a.grad)),
)


def holders_of(model: nn.Module, editable_ids: set[int]) -> set[int]:
    """ids of the modules whose own ``_parameters`` hold an editable tensor."""
    return {id(m) for m in model.modules()
            if any(p is not None and id(p) in editable_ids for p in m._parameters.values())}


def _global_hooks() -> bool:
    from torch.nn.modules import module as mm
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks)


def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class _Recorder:
    """Forward hooks on every submodule that classify each call as frozen or not."""

    def __init__(self, model: nn.Module, editable_ids: set[int], copy: frozenset = frozenset()):
        self.holders = holders_of(model, editable_ids)
        self.uncacheable = {id(m) for m in model.modules() if _own_hooks(m)}
        self.copy = copy                 # call indices whose outputs the model writes later: copied
        self.reached = False             # a module holding an editable parameter has been entered
        self.calls: list[tuple[nn.Module, int]] = []  # (module, parent call index) in call order
        self.stack: list[tuple[int, list]] = []       # (call index, frozen calls finished inside it)
        self.cached: list[tuple] = []                 # (call index, output, versions): outermost frozen

    def pre(self, module: nn.Module, args, kwargs):
        if id(module) in self.holders:
            self.reached = True
        self.calls.append((module, self.stack[-1][0] if self.stack else -1))
        self.stack.append((len(self.calls) - 1, []))

    def post(self, module: nn.Module, args, kwargs, output):
        index, inner = self.stack.pop()
        outer = self.stack[-1][1] if self.stack else self.cached
        if not self.reached and id(module) not in self.uncacheable:  # frozen: replaces the calls inside
            if index in self.copy:
                output = _clone_tensors(output)
            outer.append((index, output, _versions(output)))
        else:
            outer.extend(inner)  # the frozen calls inside stay outermost


def _hooked(model: nn.Module, rec: _Recorder):
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, with_kwargs=True, always_call=True))
    return handles


def _versions(value) -> list[tuple[Tensor, int]]:
    return [(t, t._version) for t in pytree.tree_leaves(value) if isinstance(t, Tensor)]


def _clone_tensors(value):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, value)


def _state(model: nn.Module) -> tuple:
    """What a second run must start from when the model is training: its buffers and the RNG."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return [(b, b.detach().clone()) for b in model.buffers()], torch.get_rng_state(), cuda


def _restore(state: tuple) -> None:
    buffers, cpu, cuda = state
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _run(model, rec, inputs, params):
    handles = _hooked(model, rec)
    try:
        return inputs.call(model) if params is None else functional_call(model, params, inputs.args,
                                                                         inputs.kwargs, strict=False)
    finally:
        for h in handles:
            h.remove()


def record(model: nn.Module, editable_ids: set[int], inputs: ModelInputs, *,
           params: dict[str, Tensor] | None = None, detach: bool = False) -> tuple[Any, CachedActs]:
    """Run ``model`` on ``inputs`` once and cache its frozen module calls.

    ``params``: run with these tensors in place of the model's (``functional_call``), so the run
    sees the same ``requires_grad`` flags as the editor steps will. ``detach``: drop the cached
    outputs' graph, keeping their ``requires_grad`` flags (for editor steps; Editable Training keeps
    the graph).

    A cached output that the model writes in place later in the run (its version counter moved) is
    recorded again, copied when its call returns, by a second run from the same buffers and random
    state; replays then hand out copies of it.

    Returns the model's output and the :class:`CachedActs`. Raises :class:`CallCacheError` if the
    cache cannot be used for this model.
    """
    if _global_hooks():
        raise CallCacheError("global module forward hooks are registered; they would run again on replay")
    grad = torch.is_grad_enabled()
    rec = _Recorder(model, editable_ids)
    if not rec.holders:
        raise CallCacheError("no submodule holds the editable parameters")
    start = _state(model) if any(m.training for m in model.modules()) else None
    out = _run(model, rec, inputs, params)
    if not rec.reached:
        raise CallCacheError("the model never entered a module holding the editable parameters")
    written = frozenset(i for i, _, versions in rec.cached if any(t._version != v for t, v in versions))
    if written:
        if start is not None:
            _restore(start)
        rec = _Recorder(model, editable_ids, written)
        out = _run(model, rec, inputs, params)
    entries = [(i, o, i in written) for i, o, _ in sorted(rec.cached, key=lambda e: e[0])]
    plan, outputs = _plan(rec, entries)
    if detach:
        outputs = [pytree.tree_map(_detached, o) for o in outputs]
    return out, CachedActs(inputs, tuple(outputs), plan, grad)


def _detached(t):
    """``t`` without its graph, but with its ``requires_grad`` flag: kernels choose their algorithm by
    it (``matmul`` folds batch dimensions only for inputs that do not require grad), and the replay must
    round as the model does."""
    if not isinstance(t, Tensor):
        return t
    out = t.detach()
    return out.requires_grad_() if t.requires_grad and out.is_floating_point() else out


def _plan(rec: _Recorder, entries: list[tuple[int, Any, bool]]):
    """Number each module's calls as the replay will see them (calls inside a cached call vanish)."""
    cached = {i for i, _, _ in entries}
    hidden: set[int] = set()
    ordinal: dict[int, int] = {}
    number: dict[int, int] = {}
    for i, (module, parent) in enumerate(rec.calls):
        if parent in cached or parent in hidden:
            hidden.add(i)
            continue
        k = ordinal.get(id(module), 0)
        ordinal[id(module)] = k + 1
        number[i] = k
    plan = tuple((rec.calls[i][0], number[i], written) for i, _, written in entries)
    return plan, [o for _, o, _ in entries]


@contextlib.contextmanager
def _answering(acts: CachedActs):
    """Replace the cached modules' ``forward`` for the duration of one replay."""
    tables: dict[int, tuple[nn.Module, dict[int, tuple[Any, bool]]]] = {}
    for (module, k, clone), out in zip(acts.plan, acts.outputs):
        tables.setdefault(id(module), (module, {}))[1][k] = (out, clone)
    calls: dict[int, int] = {}
    saved = []
    for key, (module, table) in tables.items():
        original = module.forward
        saved.append((module, module.__dict__.get("forward", _MISSING)))

        def answer(*args, _key=key, _table=table, _original=original, **kwargs):
            n = calls.get(_key, 0)
            calls[_key] = n + 1
            hit = _table.get(n)
            if hit is None:
                return _original(*args, **kwargs)
            out, clone = hit
            return _clone_tensors(out) if clone else out

        module.forward = answer
    try:
        yield
    finally:
        for module, old in saved:
            if old is _MISSING:
                del module.__dict__["forward"]
            else:
                module.forward = old
    for key, (module, table) in tables.items():
        if calls.get(key, 0) <= max(table):
            raise CallCacheError(f"the model called {type(module).__name__} fewer times than when its prefix "
                                 "was recorded: its control flow changed between the prefix run and the editor "
                                 "step")


_MISSING = object()


def replay(model: nn.Module, acts: CachedActs) -> Any:
    """The model's output on ``acts.inputs``, the cached calls answered from ``acts``."""
    if torch.is_grad_enabled() != acts.grad:
        raise CallCacheError(f"cached module calls recorded with grad {'en' if acts.grad else 'dis'}abled cannot "
                             f"be replayed with grad {'dis' if acts.grad else 'en'}abled (the model may branch on "
                             "the grad mode); record them in the mode of the replay")
    with _answering(acts):
        return acts.inputs.call(model)


class CallCacheSuffix(nn.Module):
    """``forward(acts) = replay(model, acts)``, sharing the model's parameter, buffer and submodule
    registries, so ``torch.func.functional_call(suffix, {name: tensor}, (acts,))`` with the model's
    own parameter names runs the replay with those tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for key in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[key] = model.__dict__[key]
        self.__dict__["_fastedit_model"] = model
        self.__dict__["training"] = model.training

    def forward(self, acts: CachedActs):
        return replay(self.__dict__["_fastedit_model"], acts)

    def train(self, mode: bool = True):
        self.__dict__["_fastedit_model"].train(mode)
        self.__dict__["training"] = mode
        return self

    def extra_repr(self) -> str:
        return f"cached calls of {type(self.__dict__['_fastedit_model']).__name__}"


def perturbed(params: Sequence[Tensor], seed: int = 0) -> list[Tensor]:
    """Deterministically perturbed copies of ``params`` (relative 1e-2), for :func:`verify`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        out.append((p.detach() + 1e-2 * (p.detach().abs() + 1e-2) * noise).detach())
    return out
