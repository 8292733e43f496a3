"""The compiled edit step (``compile=``) and the captured edit loop (``cuda_graph=``).

What is compiled: the split's suffix ``theta, acts -> output`` with the editable parameters passed
in (``torch.func.functional_call``), forward and (through AOTAutograd) backward, and for fx splits
the frozen prefix under no grad; one compiled function serves every edit of a model, selection and
input shape. A cached-call split (:mod:`fastedit.call_cache`) replays the model's own Python, which
is not compiled whole: its glue runs eager and its units (:func:`compile_units`, e.g. the edited
transformer layer) are compiled. The constraint (a few ops on the logits, with its label checks), the fused editor step
(already one kernel) and the loop's bookkeeping stay eager: they are not where an edit's time goes,
and keeping the checks eager keeps the errors the eager path raises.

The cache: the compiled functions live with the prefix split (:func:`fastedit._core.cached_entry`:
per model, selection and input call signature, dropped when the model's fingerprint changes), so
they never serve a stale model; ``torch.compile`` itself specialises on the input shapes (a new
shape compiles once more). Buffers and parameters are inputs of the graph, not constants, so
in-place changes (a later edit, ``load_state_dict``) are seen.

``compile="auto"`` (:func:`resolve_compile`): compile on CUDA once a split has served
:data:`AUTO_COMPILE_AFTER` eager edits, never on the CPU. The rule follows
``benchmarks/results/bench_edit.json``: on the CPU compilation of a single-image ResNet-20
``layer3`` edit takes ~47 s from empty caches and saves ~0.3 ms per edit, so it pays off only after
~10⁵ edits; on CUDA, where tiny single-image kernels are bound by launch overhead, compiled kernels
and graph replay are expected to remove most of an edit's time.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["AUTO_COMPILE_AFTER", "COMPILE_CHOICES", "Compiled", "CompiledSplit", "GraphedEditLoop", "check_compile",
           "compile_units", "compiled_split", "graphed_loop", "resolve_compile"]

#: eager edits a split serves on CUDA before ``compile="auto"`` compiles it
AUTO_COMPILE_AFTER = 32
COMPILE_CHOICES = (False, True, "auto")


def check_compile(value) -> None:
    if not any(value is c or (isinstance(c, str) and value == c) for c in COMPILE_CHOICES):
        raise ValueError(f"compile must be True, False or 'auto', got {value!r}")


@dataclass(eq=False)
class Compiled:
    """One ``torch.compile``d function. ``compile_seconds``: wall time of the calls that compiled (the
    first of each new input shape, its backward included when ``backward``); ``calls``: every call;
    ``failed``: why compilation failed, after which every call runs eager (exact, and reported)."""

    fn: Callable
    backward: bool = False  # compile the backward with the forward (AOTAutograd makes it at the first backward)
    compile_seconds: float = 0.0
    calls: int = 0
    failed: str | None = None
    _shapes: set = field(default_factory=set)

    def __call__(self, args: tuple, eager: Callable[[], Any]) -> Any:
        """``fn(*args)``; ``eager()`` computes the same without compiling."""
        if self.failed is not None:
            return eager()
        self.calls += 1
        key = (_shape_key(args), torch.is_grad_enabled())
        if key in self._shapes:
            return self.fn(*args)
        start = time.perf_counter()
        try:
            if self.backward and torch.is_grad_enabled():
                _compile_backward(self.fn, args)
            out = self.fn(*args)
        except Exception as exc:  # noqa: BLE001 - a compiler failure falls back; a model failure re-raises in eager()
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            self.failed = f"torch.compile failed ({type(exc).__name__}: {first}); the edit ran eager"
            return eager()
        finally:
            self.compile_seconds += time.perf_counter() - start
        self._shapes.add(key)
        return out


def _compile_backward(fn: Callable, args) -> None:
    """One extra forward and backward of ``fn`` so that the backward's compilation is timed with the
    forward's, not inside the first editor step (the compiled backward frees its buffers: a graph
    is backpropagated once, so this needs its own forward)."""
    out = fn(*args)
    outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
    leaves = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, Tensor) and t.requires_grad]
    if outs and leaves:
        torch.autograd.grad(sum(o.float().sum() for o in outs), leaves, allow_unused=True)


@dataclass(eq=False)
class CompiledSplit:
    """A prefix split's compiled parts: the suffix ``theta, acts -> output`` (forward and backward),
    and for fx splits the frozen prefix (no grad)."""

    suffix: Compiled
    prefix: Compiled | None = None

    @property
    def compile_seconds(self) -> float:
        return self.suffix.compile_seconds + (self.prefix.compile_seconds if self.prefix is not None else 0.0)

    @property
    def failed(self) -> str | None:
        return self.suffix.failed or (self.prefix.failed if self.prefix is not None else None)


def _shape_key(tree) -> tuple:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) if isinstance(t, Tensor) else type(t)
                 for t in leaves)


def compile_units(model: torch.nn.Module, containers: frozenset | set, cached: set) -> list[torch.nn.Module]:
    """What a cached-call split compiles: the largest submodules (never the model itself) that contain
    editable parameters and no cached call (``containers``, ``cached``: module ids), e.g. the edited
    transformer layer. The glue between them (masks, residuals, the head's reshapes) stays eager."""
    units: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(module):
        for child in module.children():
            if id(child) not in containers or id(child) in seen:
                continue
            seen.add(id(child))
            if any(id(m) in cached for m in child.modules()):
                visit(child)
            else:
                units.append(child)
    visit(model)
    return units


class _Unit:
    """One compiled unit: its ``forward`` (bound before it is replaced) under ``torch.compile``, the
    editable tensors of the current step passed in by name (reparametrised, as ``functional_call``
    does), its frozen parameters and buffers lifted by torch.compile as graph inputs, and guards on
    its attributes (``training`` and the like): a changed module recompiles instead of running
    stale code."""

    def __init__(self, module: torch.nn.Module, index: dict[int, int]):
        from torch.nn.utils.stateless import _reparametrize_module
        forward = module.forward
        self.editable = [(n, index[id(p)]) for n, p in module.named_parameters(remove_duplicate=False)
                         if id(p) in index]
        self.theta: Sequence[Tensor] | None = None  # the step's editable tensors, set around each replay

        def run(state, args, kwargs):
            with _reparametrize_module(module, state):
                return forward(*args, **kwargs)
        self.fn = torch.compile(run, dynamic=False)

    def __call__(self, *args, **kwargs):
        return self.fn({n: self.theta[i] for n, i in self.editable}, args, kwargs)


class _CallCacheUnits:
    """A cached-call split's compiled suffix: the replay, its glue eager, the units
    (:func:`compile_units`) compiled, made once per set of cached modules (the recorded plan)."""

    def __init__(self, split, suffix_module: torch.nn.Module):
        self.split, self.suffix_module = split, suffix_module
        self.by_plan: dict[tuple, tuple] = {}  # cached module ids -> (slots outside the units, [(unit, _Unit)])

    def _plan(self, acts) -> tuple:
        key = tuple(sorted({id(m) for m, *_ in acts.plan}))
        got = self.by_plan.get(key)
        if got is None:
            from .selection import parameter_slots  # late: selection imports _validate
            params = self.split.watch().params
            index = {id(p): i for i, p in enumerate(params)}
            pruned = {id(r.module) for r in self.split.rows if not r.disabled}  # they compile their pruned graph
            units = [u for u in compile_units(self.split.model, self.split.watch().containers, set(key))
                     if id(u) not in pruned]
            inside = {id(m) for u in units for m in u.modules()}
            slots = [[(m, n) for m, n in where if id(m) not in inside]
                     for where in parameter_slots(self.suffix_module, params)]
            got = self.by_plan[key] = (slots, [(u, _Unit(u, index)) for u in units])
        return got

    def __call__(self, theta: Sequence[Tensor], acts):
        from .call_cache import installed_forwards
        from .selection import swapped
        slots, units = self._plan(acts)
        for _, unit in units:
            unit.theta = theta
        for r in self.split.rows:  # a unit computing the read positions only compiles its pruned graph
            r.compile = True
        try:
            with swapped(slots, theta), installed_forwards(units):
                return self.split.suffix(acts)
        finally:
            for _, unit in units:
                unit.theta = None
            for r in self.split.rows:
                r.compile = False


def compiled_split(entry: dict, names: Sequence[str]) -> CompiledSplit:
    """The compiled parts of the split in ``entry`` (made on first use and kept with the split)."""
    done = entry.get("compiled")
    if done is None:
        split = entry["split"]
        module = split.suffix_module
        keys = list(names)

        def suffix(theta, acts):
            return torch.func.functional_call(module, dict(zip(keys, theta)), (acts,))
        prefix = None
        if split.method == "call-cache":  # the replay's glue eager, the edited submodules compiled
            done = entry["compiled"] = CompiledSplit(Compiled(_CallCacheUnits(split, module), backward=True))
            return done
        if split.method == "fx":
            prefix = Compiled(torch.compile(split.fx_split.prefix, dynamic=False))
        done = entry["compiled"] = CompiledSplit(Compiled(torch.compile(suffix, dynamic=False), backward=True), prefix)
    return done


def resolve_compile(compile, device: torch.device, eager_edits: int) -> bool:
    """Whether this edit runs compiled: ``True``/``False`` as given; ``"auto"``: on CUDA once the split
    has served :data:`AUTO_COMPILE_AFTER` eager edits, never on the CPU."""
    check_compile(compile)
    if isinstance(compile, str):  # "auto"
        return device.type == "cuda" and eager_edits >= AUTO_COMPILE_AFTER
    return bool(compile)


# ------------------------------------------------------------------------------------------------
# the whole loop as one CUDA graph
# ------------------------------------------------------------------------------------------------
CUDA_GRAPH_CHOICES = (False, True, "auto")
_GRAPHS_PER_SPLIT = 4


def _constraint_key(constraint) -> tuple:
    """Its tensors' shapes and dtypes and its other attributes' values (``causal`` changes the graph)."""
    return tuple((k, (tuple(v.shape), v.dtype)) if isinstance(v, Tensor) else (k, repr(v))
                 for k, v in sorted(vars(constraint).items()))


def _graph_device(device: torch.device) -> bool:
    return device.type == "cuda"


def _graphable_constraint(constraint) -> bool:
    from .constraint import Classification, TokenTargets  # late: constraint imports the ops
    return type(constraint) in (Classification, TokenTargets)


def graphed_loop(target, cuda_graph, editor, max_steps: int, reduction: str, inputs, constraint,
                 early_exit) -> tuple["GraphedEditLoop | None", str | None]:
    """The captured loop for this edit, or ``(None, why not)``.

    Applies on CUDA to class-label and :class:`~fastedit.TokenTargets` edits of a model whose prefix
    is skipped by fx or not at all (cached module calls replay Python), without early exit (the
    captured loop runs every masked step; ``early_exit="auto"`` is off on CUDA anyway). ``True``
    with parameters not on CUDA raises ``ValueError``; every other case that does not apply runs the
    eager loop and returns the reason."""
    if not any(cuda_graph is c or (isinstance(c, str) and cuda_graph == c) for c in CUDA_GRAPH_CHOICES):
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
    if cuda_graph is False:
        return None, None
    if not _graph_device(target.device):
        if cuda_graph is True:
            raise ValueError(f"cuda_graph=True needs the editable parameters on a CUDA device, they are on "
                             f"{target.device}; pass cuda_graph=False (or 'auto')")
        return None, f"the parameters are on {target.device}, not CUDA"
    if early_exit is True:
        return None, "early_exit=True stops on the host, which a captured loop cannot"
    if not _graphable_constraint(constraint):
        return None, f"{type(constraint).__name__} constraints are not captured (only class labels and TokenTargets)"
    if target.split.method == "call-cache":
        return None, "the prefix is skipped by cached module calls, which replay Python per call"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None, "the stream is already being captured"
    entry = target._entry
    graphs = entry.setdefault("graphs", {})
    # equal editors share a capture (their numbers are baked into the recorded kernels); a tensor
    # hyper-parameter is read by address, so it is keyed by identity (the graph keeps the editor alive)
    tensors = tuple(id(v) for v in editor.hparams().values() if isinstance(v, Tensor))
    key = (type(editor), repr(editor.to_dict()), tensors, max_steps, reduction, type(constraint),
           _shape_key((inputs.args, inputs.kwargs)), _constraint_key(constraint), target.compiled is not None)
    graph = graphs.get(key)
    if graph is None:
        while len(graphs) >= _GRAPHS_PER_SPLIT:
            graphs.pop(next(iter(graphs)))
        graph = graphs[key] = GraphedEditLoop(target, editor, max_steps, reduction)
    return graph, None


class GraphedEditLoop:
    """The masked edit loop of one split, editor, step count and set of input shapes, captured as a
    CUDA graph on its first run and replayed by the next: the inputs' frozen activations and labels
    are copied into static buffers, the graph clones the live parameters, runs ``max_steps`` masked
    steps, and leaves the edited copies and the losses in its own memory (valid until the next run).

    The constraint is validated eagerly before every replay (against the logits' recorded shape), so
    bad labels raise as in the eager loop; a new input shape captures a new graph (keyed by
    :func:`graphed_loop`). The graph reads the parameters and buffers by address: the split it is kept
    with is dropped when any of them is replaced or moved (:func:`fastedit._core.model_fingerprint`)."""

    def __init__(self, target, editor, max_steps: int, reduction: str):
        self.target, self.editor, self.max_steps, self.reduction = target, editor, max_steps, reduction
        self.graph = None
        self.static_acts = self.static_constraint = self.out = None
        self.logits_shape = self.logits_dtype = None
        self.acts_shapes = None

    def _loss(self, theta):
        from .constraint import reduce_constraint
        c = self.static_constraint
        return reduce_constraint(c.pack(c.per_sample(self.target.logits(self.static_acts, theta))), self.reduction)

    def _capture(self, acts, constraint) -> None:
        from ._core import model_failure
        t = self.target
        try:
            with torch.no_grad():
                logits = t.logits(acts)
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            raise model_failure(t.model, None, exc) from exc
        constraint.validate(logits)
        self.logits_shape, self.logits_dtype = tuple(logits.shape), logits.dtype
        self.static_acts = torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, acts)
        self.static_constraint = copy.copy(constraint)
        for k, v in vars(constraint).items():
            if isinstance(v, Tensor):
                setattr(self.static_constraint, k, v.clone())
        self.acts_shapes = _shape_key(acts)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: autograd and the kernels allocate here
            for _ in range(2):
                self._loop()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._loop()
        self.graph = graph

    def _loop(self):
        """The masked loop on the static buffers (what the graph records)."""
        from ._core import edit_loop
        t = self.target
        return edit_loop(self._loss, t.params, self.editor, self.max_steps, False, batched=False, names=t.names)

    def run(self, acts, constraint):
        """The edit loop's output for ``acts`` and ``constraint`` (tensors owned by the graph)."""
        if self.graph is None:
            self._capture(acts, constraint)
        elif _shape_key(acts) != self.acts_shapes:
            raise RuntimeError("internal: a captured edit loop got activations of another shape")
        else:
            constraint.validate(torch.empty(self.logits_shape, dtype=self.logits_dtype, device="meta"))
        for static, new in zip(torch.utils._pytree.tree_leaves(self.static_acts), torch.utils._pytree.tree_leaves(acts)):
            if isinstance(static, Tensor):
                static.copy_(new)
        for k, v in vars(constraint).items():
            if isinstance(v, Tensor):
                getattr(self.static_constraint, k).copy_(v)
        self.graph.replay()
        return self.out
