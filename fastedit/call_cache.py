"""The frozen prefix of any model: cache the calls of submodules that finish before the editable
parameters are first reached, and replay the model's own Python with those calls answered from the
cache.

Why: ``torch.fx`` cannot trace most transformers (HF code creates masks with data-dependent Python,
``nn.TransformerEncoder`` checks its inputs' values), and ``torch.export`` specialises the graph to
the example's shapes. Recording module calls needs neither: it runs the model once, as it is, on the
actual inputs, and works for any Python control flow and any input length.

Record (once per input, :func:`record`): the model runs once, every submodule's calls watched. A
module *holds* an editable parameter if the parameter is in its own ``_parameters`` (tied weights:
every module that holds the shared tensor), and *contains* it if it is in its subtree. A call is
*frozen* if its output cannot depend on the editable parameters because nothing that could read them
has run before it ended: its module contains none, no caller in progress holds one (its code
could have read it first), no call of a containing module has finished before it began, and none
began during it. The outermost frozen calls are cached (module, its call number, output); their
inner calls are not.

Replay (every editor step, :func:`replay`): the model's own ``forward`` runs on the same inputs, each
cached module's ``forward`` temporarily replaced by one that answers its recorded call numbers from
the cache and runs the module normally otherwise. The glue code between modules (mask creation,
residual additions) runs again; everything inside the cached calls does not. The same operations
run on the same values, so the output is bit-identical to the model's (checked when the split is
built, with perturbed editable parameters too, :func:`verify`).

Calls are recorded and answered from inside each module's ``forward`` (a temporary instance
attribute), not with forward hooks: the module's own hooks run around an answered call as around
any call, and modules that change their behaviour when hooks are attached (``nn.TransformerEncoderLayer``
leaves its fast path) behave as in a plain forward. The hooks of modules inside a cached call do
not run on replay (those calls do not happen).

Unread outputs: a replay reads only some cached outputs. In a transformer the glue passes layer
3's cached output to layer 4's call, which is answered from the cache and never looks at it; only
the output of the last cached layer feeds the edited one. The split finds, once, the cached calls
whose outputs nothing reads (one replay watching every cached output proposes them,
:func:`unread_by_watching`; a :func:`thinned` replay, compared bit for bit, confirms) and recordings keep
placeholders for them (:class:`Unread`: shape, dtype, device and grad flag, no storage; the glue may
ask a tensor its device, as HF mask code does). A later replay that reads one after all (other
inputs, other control flow) fails loudly rather than computing on garbage: every operation on a
placeholder raises, and a replayed output holding one is refused.

Rows nothing reads: where the model reads an edited unit's output at its first position only (a
BERT classifier's last layer), the unit computes that position alone (:mod:`fastedit.rows`,
:class:`CallCacheSuffix` ``rows``); those replays equal the model within float rounding, not bit for
bit (smaller matrix products round differently).

Limits, each detected and reported as the reason for not using the cache: a model whose output does
not depend on the editable parameters, a model whose calls differ between record and replay, a
cached call whose output depends on the editable parameters anyway (a module reading another
module's parameter; caught by the perturbed verification). A cached output that the model later
modifies in place (its version counter moves) is copied when recorded and on every replay.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .model_io import ModelInputs, ModelView
from .selection import parameter_slots, swapped

__all__ = ["CachedActs", "Watch", "record", "replay", "CallCacheError"]


_MISSING = object()  # no instance-level ``forward`` to put back


class CallCacheError(RuntimeError):
    """The model cannot be split by caching module calls (the message says why)."""


class CachedActs:
    """What the prefix run of one input leaves for the editor steps: the inputs, and the outputs of
    the outermost frozen module calls. A pytree node (the tensors are its leaves; the call plan, a
    tuple of ``(module, call number, clone)``, and the grad mode of the run are its static context).

    Replays must run in the recorded grad mode: models branch on it (``nn.TransformerEncoder``
    switches to nested tensors under ``no_grad``), so a cache recorded with grad enabled cannot
    answer a forward without grad (:func:`replay` raises)."""

    __slots__ = ("inputs", "outputs", "plan", "grad", "holes", "guard")

    def __init__(self, inputs: ModelInputs, outputs: tuple, plan: tuple, grad: bool, holes: "_Holes | None" = None):
        """``outputs``: the real ones, those not among the ``holes``."""
        self.inputs, self.plan, self.grad = inputs, plan, grad
        self.holes = holes or _Holes(())  # the placeholders of unread outputs (:func:`thinned`)
        self.outputs = self.holes.fill(tuple(outputs))
        self.guard: list | None = None  # (tensor, version) pairs a replay must leave as they are

    @property
    def thin(self) -> bool:
        return bool(self.holes.items)

    def __repr__(self) -> str:
        return f"CachedActs({len(self.plan)} cached calls, grad={self.grad}, {len(self.holes.items)} unread)"


class Unread(Tensor):
    """Stands in for a cached output that no replay reads: its shape, strides, dtype, device and grad
    flag, no storage. Every operation on it raises :class:`CallCacheError`."""

    @staticmethod
    def __new__(cls, like: Tensor):
        return Tensor._make_wrapper_subclass(cls, like.shape, like.stride(), dtype=like.dtype, device=like.device,
                                             requires_grad=like.requires_grad)

    def __init__(self, like: Tensor):
        super().__init__()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise CallCacheError(f"{_READ_UNREAD} ({func})")

    def __repr__(self) -> str:
        return f"Unread({tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class _Watched(Tensor):
    """A cached output that notes, in ``seen``, the index of its call when an operation reads it, and
    then computes on the real tensor (results are plain tensors). For :func:`unread_by_watching`."""

    @staticmethod
    def __new__(cls, real: Tensor, index: int, seen: set):
        out = Tensor._make_wrapper_subclass(cls, real.shape, real.stride(), dtype=real.dtype, device=real.device,
                                            requires_grad=real.requires_grad)
        out.inner, out.call, out.seen = real, index, seen  # not .real: a Tensor property
        return out

    def __init__(self, real: Tensor, index: int, seen: set):
        super().__init__()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            if isinstance(t, _Watched):
                t.seen.add(t.call)
                return t.inner
            return t
        return func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs or {}))


def unread_by_watching(suffix: nn.Module, acts: CachedActs) -> frozenset:
    """``(id(module), call number)`` of the cached calls whose outputs one replay of ``acts`` through
    ``suffix`` never computes with (asking a tensor its shape or device does not count), found by
    answering every call with watched outputs (:class:`_Watched`). A proposal: :func:`thinned` replays
    must confirm it."""
    seen: set = set()
    watched = tuple(pytree.tree_map(lambda t, i=i: _Watched(t, i, seen) if isinstance(t, Tensor) else t, o)
                    for i, o in enumerate(acts.outputs))
    suffix(CachedActs(acts.inputs, watched, acts.plan, acts.grad))
    return frozenset((id(m), k) for i, (m, k, _) in enumerate(acts.plan) if i not in seen)


class _Holes:
    """The outputs of a :class:`CachedActs` that are placeholders, ``((index, placeholder tree), ...)``.
    Static pytree context, not leaves: stacking, mapping and byte counts see the real outputs only,
    and under ``vmap`` the placeholders keep one sample's shape, as the replay sees it. Equal when the
    placeholders' metadata are (tree specs compare contexts)."""

    __slots__ = ("items",)

    def __init__(self, items: tuple):
        self.items = items

    def fill(self, real: tuple) -> tuple:
        """All the outputs, from the real ones."""
        holes, it = dict(self.items), iter(real)
        return tuple(holes[i] if i in holes else next(it) for i in range(len(real) + len(holes)))

    def real(self, outputs: tuple) -> tuple:
        holes = {i for i, _ in self.items}
        return tuple(o for i, o in enumerate(outputs) if i not in holes)

    def _key(self):
        return tuple((i, tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) if isinstance(t, Tensor) else t
                               for t in pytree.tree_leaves(tree))) for i, tree in self.items)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Holes) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(tuple(i for i, _ in self.items))


pytree.register_pytree_node(
    CachedActs,
    lambda a: ([a.inputs, a.holes.real(a.outputs)], (a.plan, a.grad, a.holes)),
    lambda children, ctx: CachedActs(children[0], tuple(children[1]), *ctx),
    serialized_type_name="fastedit.CachedActs",
    flatten_with_keys_fn=lambda a: ([(pytree.GetAttrKey("inputs"), a.inputs),
                                     (pytree.GetAttrKey("outputs"), a.holes.real(a.outputs))],
                                    (a.plan, a.grad, a.holes)),
)


class Watch:
    """What recordings need to know about a model and its editable parameters, worked out once:
    which modules hold them (``_parameters``), which contain them (their subtrees), and where each
    is registered (for :func:`record`'s ``params``)."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        self.model, self.params = model, list(params)
        ids = {id(p) for p in self.params}
        self.ids = frozenset(ids)
        by_name = dict(model.named_modules(remove_duplicate=False))
        held = [name for name, m in by_name.items()
                if any(p is not None and id(p) in ids for p in m._parameters.values())]
        self.holders = {id(by_name[n]) for n in held}
        # a module contains an editable parameter iff it is a holder or an ancestor of one
        self.containers = {id(by_name[".".join(n.split(".")[:k])] if k else model)
                           for n in held for k in range(len(n.split(".")) + 1 if n else 1)}
        self.root = id(model)
        self.slots = parameter_slots(model, self.params)
        self.modules = tuple(model.modules())  # a watch lives with one model structure (the split's fingerprint)

    @classmethod
    def of(cls, model: nn.Module, editable) -> "Watch":
        """``editable``: a Watch, or the ids of the editable tensors."""
        if isinstance(editable, Watch):
            return editable
        return cls(model, [p for p in _unique_params(model) if id(p) in editable])


def _unique_params(model: nn.Module) -> list[Tensor]:
    return [p for _, p in model.named_parameters()]


class _Recorder:
    """Classifies each module call as frozen or not, from inside the modules' ``forward``.

    A call is frozen when its module contains no editable parameter, no active caller holds one
    itself (its own code could have read it before the call), no call of a module containing one
    has finished before it started (its output could feed this call), and none was entered during
    it. Containers are counted, not only holders: fused code such as ``nn.TransformerEncoderLayer``'s
    fast path reads its children's weights without calling them."""

    def __init__(self, watch: Watch, copy: frozenset = frozenset(), whole: bool = True):
        self.holders, self.containers, self.root = watch.holders, watch.containers, watch.root
        self.modules = watch.modules
        self.copy = copy                 # call indices whose outputs the model writes later: copied
        self.whole = whole               # run to the end (else stop when nothing more can be frozen)
        self.ended = False               # a call of a container has finished
        self.held = False                # a holder has been entered: nothing after can be frozen
        self.entries = 0                 # calls of containers entered so far
        self.reached = False             # a holder, or a container below the root, was entered
        self.active_holders = 0          # holders among the calls in progress
        self.calls: list[tuple[nn.Module, int]] = []  # (module, parent call index) in call order
        self.stack: list[tuple] = []  # (call index, frozen calls finished inside it, may be frozen, entries)
        self.cached: list[tuple] = []                 # (call index, output, versions): outermost frozen

    def enter(self, module: nn.Module) -> None:
        key = id(module)
        eligible = key not in self.containers and not self.ended and self.active_holders == 0
        if key in self.containers:
            self.entries += 1
            self.reached |= key != self.root or key in self.holders
        if key in self.holders:
            self.active_holders += 1
            self.held = True
        self.calls.append((module, self.stack[-1][0] if self.stack else -1))
        self.stack.append((len(self.calls) - 1, [], eligible, self.entries))

    def leave(self, module: nn.Module, output) -> Any:
        index, inner, eligible, entries = self.stack.pop()
        self._left(module)
        outer = self.stack[-1][1] if self.stack else self.cached
        if eligible and self.entries == entries:  # frozen: cached in place of the calls inside it
            cached = _clone_tensors(output) if index in self.copy else output  # the model gets the original
            outer.append((index, cached, _versions(cached)))
        else:
            outer.extend(inner)  # the frozen calls inside stay outermost
        return output

    def abort(self, module: nn.Module) -> None:
        """A call left by an exception (the stop included): not frozen, the frozen calls inside stay."""
        _, inner, _, _ = self.stack.pop()
        (self.stack[-1][1] if self.stack else self.cached).extend(inner)
        self._left(module)

    @property
    def done(self) -> bool:
        """Stop here: nothing that follows can be frozen, because a containing call has finished or a
        holder has been entered (while it runs no call is eligible, after it a containing call has
        finished, and the calls in progress saw a container entered)."""
        return (self.ended or self.held) and not self.whole

    def _left(self, module: nn.Module) -> None:
        if id(module) in self.containers:
            self.ended = True
        if id(module) in self.holders:
            self.active_holders -= 1


@contextlib.contextmanager
def _recording(rec: _Recorder):
    """Wrap every submodule's ``forward`` (an instance attribute, removed afterwards). Not forward
    hooks: some modules change their behaviour when hooks are attached (``nn.TransformerEncoderLayer``
    leaves its fast path), and user hooks must run around the cached call as they run around a call."""
    saved = []
    for m in rec.modules:
        original = m.forward
        saved.append((m, m.__dict__.get("forward", _MISSING)))

        def recorded(*args, _m=m, _original=original, **kwargs):
            rec.enter(_m)
            if rec.done:  # the first holder's call: the prefix ends where the editable code begins
                rec.abort(_m)
                raise _Stop
            try:
                out = _original(*args, **kwargs)
            except BaseException:
                rec.abort(_m)
                raise
            out = rec.leave(_m, out)
            if rec.done:
                raise _Stop
            return out

        m.__dict__["forward"] = recorded  # directly: Module.__setattr__ is slow and forward is no tensor
    try:
        yield
    finally:
        _put_back(saved)


class _Stop(BaseException):
    """Ends a recording run early (a BaseException: the model's own ``except Exception`` lets it pass)."""


def _put_back(saved) -> None:
    for module, old in saved:
        if old is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = old


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


def _run(model, rec, inputs, watch, params):
    """The model's output, or None when the run stopped early."""
    try:
        with _recording(rec), (swapped(watch.slots, params) if params is not None else contextlib.nullcontext()):
            return inputs.call(model)
    except _Stop:
        return None


def record(model: nn.Module, editable, inputs: ModelInputs, *, params: Sequence[Tensor] | None = None,
           detach: bool = False, whole: bool = True, unread: frozenset = frozenset()) -> tuple[Any, CachedActs]:
    """Run ``model`` on ``inputs`` once and cache its frozen module calls.

    ``editable``: a :class:`Watch`, or the ids of the editable tensors. ``params``: run with these
    tensors in place of the editable ones (in ``watch.params``' order), so the run sees the same
    ``requires_grad`` flags as the editor steps will. ``detach``: drop the cached
    outputs' graph, keeping their ``requires_grad`` flags (for editor steps; Editable Training keeps
    the graph). ``whole=False``: stop the run as soon as a module holding an editable parameter is
    entered or a call of a module containing one has finished (nothing later can be frozen), which
    saves the rest of the forward, the edited module's own included; the
    model's output is then None. ``unread``: ``(module id, call number)`` of the cached calls whose
    outputs are kept as placeholders (:func:`thinned`).

    A cached output that the model writes in place later in the run (its version counter moved) is
    recorded again, copied when its call returns, by a second run from the same buffers and random
    state; replays then hand out copies of it. A run stopped early cannot see writes after the stop:
    replays check the versions and raise if one moved (:class:`ModelSplit` records whole runs for
    models found writing cached outputs when it was built).

    Returns the model's output and the :class:`CachedActs`. Raises :class:`CallCacheError` if the
    cache cannot be used for this model.
    """
    grad = torch.is_grad_enabled()
    watch = Watch.of(model, editable)
    if not watch.holders:
        raise CallCacheError("no submodule holds the editable parameters")
    rec = _Recorder(watch, whole=whole)
    start = _state(model) if any(m.training for m in watch.modules) else None
    out = _run(model, rec, inputs, watch, params)
    if not rec.reached:
        raise CallCacheError("the model never entered a module holding or containing the editable parameters")
    written = frozenset(i for i, _, versions in rec.cached if any(t._version != v for t, v in versions))
    if written:
        if start is not None:
            _restore(start)
        rec = _Recorder(watch, written, whole=whole)
        out = _run(model, rec, inputs, watch, params)
    entries = [(i, o, i in written) for i, o, _ in sorted(rec.cached, key=lambda e: e[0])]
    plan, outputs = _plan(rec, entries)
    if detach:
        outputs = [pytree.tree_map(_detached, o) for o in outputs]
    acts = thinned(CachedActs(inputs, tuple(outputs), plan, grad), unread)
    if not whole:  # the versions a replay must find unchanged (writes after the stop were not seen)
        acts.guard = [v for o, (_, _, copied) in zip(acts.holes.real(acts.outputs), acts.holes.real(plan))
                      if not copied for v in _versions(o)]
    return out, acts


def thinned(acts: CachedActs, unread: frozenset) -> CachedActs:
    """``acts`` with the outputs of the calls in ``unread`` (``(id(module), call number)`` pairs)
    replaced by placeholders (:class:`Unread`)."""
    done = {i for i, _ in acts.holes.items}
    drop = [i for i, (m, k, _) in enumerate(acts.plan) if (id(m), k) in unread and i not in done]
    if not drop:
        return acts
    holes = acts.holes.items + tuple((i, pytree.tree_map(_placeholder, acts.outputs[i])) for i in drop)
    holes = _Holes(tuple(sorted(holes, key=lambda h: h[0])))
    return CachedActs(acts.inputs, holes.real(acts.outputs), acts.plan, acts.grad, holes)


def _placeholder(t):
    return Unread(t) if isinstance(t, Tensor) else t


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

        module.__dict__["forward"] = answer
    try:
        yield
    finally:
        _put_back(saved)
    for key, (module, table) in tables.items():
        if calls.get(key, 0) <= max(table):
            raise CallCacheError(f"the model called {type(module).__name__} fewer times than when its prefix "
                                 "was recorded: its control flow changed between the prefix run and the editor "
                                 "step")



@contextlib.contextmanager
def installed_forwards(pairs):
    """Run with each ``(module, fn)``'s ``fn`` as the module's ``forward`` (its hooks still run around it)."""
    saved = [(m, m.__dict__.get("forward", _MISSING)) for m, _ in pairs]
    try:
        for m, fn in pairs:
            m.__dict__["forward"] = fn
        yield
    finally:
        _put_back(saved)


_READ_UNREAD = ("the model read a cached module output that fastedit had found unused when it split the model (these "
                "inputs take another path through the model's code); run these inputs with use_prefix=False")


def replay(model: nn.Module, acts: CachedActs) -> Any:
    """The model's output on ``acts.inputs``, the cached calls answered from ``acts``."""
    if torch.is_grad_enabled() != acts.grad:
        raise CallCacheError(f"cached module calls recorded with grad {'en' if acts.grad else 'dis'}abled cannot "
                             f"be replayed with grad {'dis' if acts.grad else 'en'}abled (the model may branch on "
                             "the grad mode); record them in the mode of the replay")
    with _answering(acts):
        out = acts.inputs.call(model)
    if acts.thin and any(isinstance(t, Unread) for t in pytree.tree_leaves(out)):
        raise CallCacheError(_READ_UNREAD)
    if acts.guard and any(t._version != v for t, v in acts.guard):
        raise CallCacheError("the model wrote a cached module output in place after the point where its prefix "
                             "run stopped; this model needs whole prefix runs")
    return out


def _float_leaves(out) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


class CallCacheSuffix(ModelView):
    """``forward(acts) = replay(model, acts)``, on the model's own registries (:class:`ModelView`),
    so swapping the editable tensors under their names runs the replay with them.

    ``rows``: :class:`fastedit.rows.RowPruned` forwards installed during each replay (submodules
    computing only the output positions the model reads). A replay whose output holds a NaN runs
    again without them; if that changes the output, the model read an unread position after all:
    pruning stops for good (the reason is kept in each ``RowPruned.disabled``) and the plain replay's
    output is returned."""

    def __init__(self, model: nn.Module, rows: Sequence = ()):
        super().__init__(model)
        self.__dict__["_fastedit_rows"] = tuple(rows)

    @property
    def rows(self) -> tuple:
        return self.__dict__["_fastedit_rows"]

    def forward(self, acts: CachedActs):
        model = self._fastedit_wrapped()
        rows = [r for r in self.rows if not r.disabled]
        if not rows:
            return replay(model, acts)
        before = sum(r.pruned_calls for r in rows)
        with installed_forwards([(r.module, r) for r in rows]):
            out = replay(model, acts)
        if sum(r.pruned_calls for r in rows) == before:
            return out  # every unit ran whole (a transform, hooks, an untraceable call): nothing to check
        leaves = _float_leaves(out)  # units prune only outside torch.func transforms: plain tensors here
        if not leaves:
            return out
        if not bool(torch.stack([torch.isnan(t).any() for t in leaves]).any()):  # one host read
            return out
        plain = replay(model, acts)
        if not all(a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b))
                   for a, b in zip(leaves, _float_leaves(plain))):
            for r in rows:
                r.disable("a replay read output positions that the split had found unread (other inputs take "
                          "another path); the module runs whole from then on")
        return plain

    def extra_repr(self) -> str:
        return f"cached calls of {type(self._fastedit_wrapped()).__name__}"


def perturbed(params: Sequence[Tensor], seed: int = 0) -> list[Tensor]:
    """Deterministically perturbed copies of ``params`` (relative 1e-2), for :func:`verify`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        out.append((p.detach() + 1e-2 * (p.detach().abs() + 1e-2) * noise).detach())
    return out
