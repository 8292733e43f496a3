"""Frozen-prefix split: compute once what an edit cannot change.

An edit changes only the *editable* parameters θ_e of a model (for example all of ``layer3``).
Every intermediate value of the forward pass that does not depend on θ_e -- the *prefix* -- is the
same for all k editor steps, and (in evaluation) for every edit of the same control set. This module
splits a model into

* ``prefix_module``: ``forward(*inputs) -> tuple`` of *frontier* values, the non-dependent values
  that dependent computations (or the model output) consume. Run it once, usually under
  ``torch.no_grad()``.
* ``suffix_module``: ``forward(acts: tuple) -> model output``, the part that depends on θ_e. Run it
  once per editor step. It shares the model's module objects and parameters, and its parameters keep
  their qualified names in the original model, so

      torch.func.functional_call(split.suffix_module, {"layer3.0.conv1.weight": w, ...}, (acts,))

  evaluates the model with those parameters replaced, and composes with autograd,
  ``torch.func.grad`` and ``torch.func.vmap`` (batched parameters, shared ``acts``).

Why: the suffix of a ResNet whose last stage is edited is a fraction of the full forward, so the
k-step edit loop costs a fraction of k full passes (``python tests/api/test_prefix.py`` prints the
ratio measured here).

How: ``torch.fx`` traces the model. A node is *dependent* if it reads an editable parameter
(``get_attr``), calls a module that owns one (directly or in a submodule; parameters are matched by
identity, so tied/shared parameters are handled), or has a dependent input. Every non-dependent node
goes to the prefix (nothing is recomputed); the dependent nodes, in their original order, form the
suffix. ``get_attr`` nodes are never passed through the frontier: they are re-read in the suffix, so
non-editable parameters used by the suffix stay live module attributes.

Invariants:

* ``split(*x)`` gives exactly (bit for bit) the output of ``model(*x)``: the same operations run on
  the same values, only grouped differently. Frontier values may be any Python value (tensors,
  ``torch.Size``, ints, tuples).
* No copies: both parts hold the original submodules and parameters, so in-place changes to the
  model's parameters and buffers (e.g. ``p.add_(...)`` under ``no_grad``) are seen by the split.
  Tensors that the graph reads with ``get_attr`` (functional code such as ``F.linear(x, self.w)``)
  are bound at split time: re-*assigning* such an attribute, or ``model.to(...)`` replacing such a
  buffer, is not seen (modules called as modules are always live). Split after moving the model.
* ``suffix_module.named_parameters(remove_duplicate=False)`` names are a subset of the model's, and
  every editable name is among them (aliases of shared modules included).
* Python-level control flow is fixed at split time, as with any fx trace (e.g. ``if self.training``
  in a ``forward``); split the model in the mode it will be edited in (eval). Leaf modules such as
  BatchNorm and Dropout still read their own ``training`` flag at run time. BatchNorm running stats
  are buffers of shared modules; they live wherever their module is called.

In-place operations: reordering non-dependent work before dependent work is only valid if no
in-place operation is affected. The split detects (best effort, through view-like ops) an in-place
operation in the suffix that would modify a prefix value (the ``acts`` would change between editor
steps), and an in-place operation in the prefix that runs after a suffix node read its operand; both
cause the fallback below. The ubiquitous ``ReLU(inplace=True)`` on a fresh value is fine.

Fallback: if tracing fails (data-dependent control flow, untraceable code) or the split is unsafe or
unsupported, ``split_prefix`` does not raise: it returns ``traced=False`` with the short reason, an
identity prefix (``prefix(*x) == x``) and a suffix that runs the whole model. The fallback suffix
shares the model's parameter/buffer/submodule registries, so its ``named_parameters()`` equal the
model's and ``functional_call`` with the original names works. Invalid ``editable`` names always
raise ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import call_cache
from .model_io import ModelInputs, ModelView

__all__ = ["PrefixSplit", "split_prefix", "whole_model_split", "ModelSplit", "build_split"]


@dataclasses.dataclass(eq=False)
class PrefixSplit:
    """A model split into a frozen prefix and an editable suffix (see the module docstring)."""

    prefix_module: nn.Module
    suffix_module: nn.Module
    traced: bool
    reason: str | None
    num_prefix_nodes: int
    num_suffix_nodes: int
    frontier: tuple[str, ...] = ()  # names of the fx nodes passed from prefix to suffix (reports)
    #: ``(qualified name, tensor)`` of every model tensor the graphs hold directly (``get_attr`` targets
    #: and the editable parameters installed in the suffix): the split is stale once one is replaced
    bindings: tuple = ()
    #: the names in ``bindings`` that are plain tensor attributes (not registered parameters or buffers)
    plain_bindings: frozenset = frozenset()

    def current(self, model: nn.Module, *, registered_unchanged: bool = False) -> bool:
        """Whether ``model`` still holds every tensor the split is bound to (re-assigning a parameter or
        buffer, ``load_state_dict(..., assign=True)`` or a ``model.to(...)`` that replaces a buffer make a
        traced split stale; in-place changes are seen through the shared tensors).

        ``registered_unchanged``: the caller knows that every module, registered parameter and buffer is
        the same object under the same name as when the split was made (equal
        :func:`fastedit._core.model_fingerprint`), so only the plain tensor attributes are looked up."""
        for name, tensor in self.bindings:
            if registered_unchanged and name not in self.plain_bindings:
                continue
            try:
                if _get_attr(model, name) is not tensor:
                    return False
            except AttributeError:
                return False
        return True

    def prefix(self, *inputs) -> tuple:
        """Frontier values for ``inputs``; independent of the editable parameters."""
        return self.prefix_module(*inputs)

    def suffix(self, acts: tuple):
        """The model output from the frontier values ``acts``."""
        return self.suffix_module(acts)

    def __call__(self, *inputs):
        return self.suffix(self.prefix(*inputs))


# --------------------------------------------------------------------------------------------------
# fallback parts


class _InputsPrefix(nn.Module):
    """Identity prefix of the fallback: the frontier is the model's inputs."""

    def forward(self, *inputs):
        return tuple(inputs)


_WholeModelSuffix = ModelView  # the fallback suffix: the whole model on its inputs


def _fallback(model: nn.Module, reason: str) -> PrefixSplit:
    return PrefixSplit(
        prefix_module=_InputsPrefix(),
        suffix_module=_WholeModelSuffix(model),
        traced=False,
        reason=reason,
        num_prefix_nodes=0,
        num_suffix_nodes=0,
    )


def whole_model_split(model: nn.Module) -> PrefixSplit:
    """The trivial split: no prefix, the whole model as suffix (``use_prefix=False``)."""
    return _fallback(model, "prefix split disabled (use_prefix=False)")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class _Unsupported(Exception):
    """The traced model cannot be split safely; becomes a fallback with this message as reason."""


# --------------------------------------------------------------------------------------------------
# in-place / aliasing analysis (best effort, conservative where it matters)

_INPLACE_OPERATORS = {
    operator.iadd, operator.iand, operator.ifloordiv, operator.ilshift, operator.imod,
    operator.imul, operator.imatmul, operator.ior, operator.ipow, operator.irshift,
    operator.isub, operator.itruediv, operator.ixor, operator.setitem, operator.delitem,
}

# Ops whose result may share storage with their first argument.
_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "T", "mT", "H", "mH", "expand", "expand_as", "narrow", "select",
    "unfold", "diagonal", "detach", "contiguous", "to", "type", "type_as", "float", "double",
    "half", "bfloat16", "chunk", "split", "tensor_split", "unbind", "movedim", "moveaxis",
    "swapaxes", "swapdims", "as_strided", "view_as_real", "view_as_complex", "real", "imag",
    "data", "getitem", "__getitem__", "getattr", "alias", "cpu", "cuda",
}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _mutated_nodes(node: fx.Node, model: nn.Module) -> list[fx.Node]:
    """Nodes whose storage ``node`` writes in place (empty for pure nodes)."""
    if not node.args and not node.kwargs:
        return []
    first = node.args[0] if node.args else None
    out: list[Any] = []
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if getattr(mod, "inplace", False) is True:
            out.append(first)
    elif node.op in ("call_method", "call_function"):
        name = _target_name(node.target)
        if node.target in _INPLACE_OPERATORS or (
            name.endswith("_") and not name.endswith("__") and not name.startswith("_")
        ) or name in ("__setitem__", "__delitem__"):
            out.append(first)
        if "out" in node.kwargs:
            out.extend(pytree.tree_leaves(node.kwargs["out"]))
        if node.op == "call_function":
            inplace = node.kwargs.get("inplace", None)
            if inplace is None and callable(node.target):
                try:
                    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
                    inplace = bound.arguments.get("inplace", None)
                except (TypeError, ValueError):
                    inplace = None
            if inplace is True:
                out.append(first)
    return [n for n in out if isinstance(n, fx.Node)]


def _alias_sources(node: fx.Node, model: nn.Module) -> list[fx.Node]:
    """Inputs of ``node`` whose storage its result may share."""
    srcs: list[fx.Node] = list(_mutated_nodes(node, model))  # in-place ops return their operand
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        if isinstance(model.get_submodule(node.target), _VIEW_MODULES):
            srcs.append(first)
    elif node.op in ("call_method", "call_function"):
        if _target_name(node.target) in _VIEW_NAMES:
            srcs.append(first)
    return [n for n in srcs if isinstance(n, fx.Node)]


def _check_inplace(graph: fx.Graph, model: nn.Module, dep: set[fx.Node]) -> None:
    """Raise _Unsupported if an in-place op would make the prefix/suffix split inexact."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    # undirected "may alias" edges
    adj: dict[fx.Node, set[fx.Node]] = {}
    mutations: list[tuple[fx.Node, fx.Node]] = []
    for n in nodes:
        for src in _alias_sources(n, model):
            adj.setdefault(n, set()).add(src)
            adj.setdefault(src, set()).add(n)
        mutations.extend((n, m) for m in _mutated_nodes(n, model))
    for node, target in mutations:
        group, stack = {target}, [target]
        while stack:
            for nb in adj.get(stack.pop(), ()):
                if nb not in group:
                    group.add(nb)
                    stack.append(nb)
        if node in dep:
            outside = [g for g in group if g not in dep]
            if outside:
                raise _Unsupported(
                    f"in-place op {node.name!r} in the suffix would modify prefix value "
                    f"{min(outside, key=order.get).name!r}"
                )
        else:
            for g in group:
                for user in g.users:
                    if user in dep and order[user] < order[node]:
                        raise _Unsupported(
                            f"in-place op {node.name!r} in the prefix runs after suffix node "
                            f"{user.name!r} reads its operand"
                        )


# --------------------------------------------------------------------------------------------------
# the split


def _resolve_editable(model: nn.Module, editable: Iterable[str]) -> tuple[list[str], set[int]]:
    if isinstance(editable, str):
        names = [editable]
    else:
        names = list(editable)
    bad_type = [n for n in names if not isinstance(n, str)]
    if bad_type:
        raise TypeError(f"editable must be parameter names (str); got {bad_type[:3]!r}")
    if not names:
        raise ValueError("editable is empty: select at least one parameter")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(n for n in names if n not in params))
    if unknown:
        raise ValueError(f"unknown editable parameter name(s) for {type(model).__name__}: {unknown}")
    names = list(dict.fromkeys(names))
    return names, {id(params[n]) for n in names}


def _install_param_path(gm: nn.Module, model: nn.Module, qualname: str) -> None:
    """Make ``qualname`` reachable in ``gm``, pointing at the model's own parameter."""
    *path, leaf = qualname.split(".")
    src, dst = model, gm
    for item in path:
        s = src.get_submodule(item)
        d = dst._modules.get(item)
        if d is s:
            return  # the original submodule (with everything below it) is already installed
        if d is None:
            d = nn.Module()
            dst.add_module(item, d)
        src, dst = s, d
    param = src.get_parameter(leaf)
    if dst._parameters.get(leaf) is not param:
        dst.register_parameter(leaf, param)


def _registered(model: nn.Module, target: str) -> bool:
    """Whether the dotted ``target`` names a registered parameter or buffer of its module."""
    owner, _, leaf = target.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf in module._parameters or leaf in module._buffers


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for item in target.split("."):
        obj = getattr(obj, item)
    return obj


def _traced_split(
    model: nn.Module,
    graph: fx.Graph,
    names: list[str],
    ed_ids: set[int],
) -> PrefixSplit:
    owns_cache: dict[int, bool] = {}

    def owns(mod: nn.Module) -> bool:
        key = id(mod)
        if key not in owns_cache:
            owns_cache[key] = any(id(p) in ed_ids for p in mod.parameters())
        return owns_cache[key]

    nodes = list(graph.nodes)
    output_node = next(n for n in nodes if n.op == "output")
    dep: set[fx.Node] = set()
    for n in nodes:
        if n.op == "output":
            continue
        if n.op == "get_attr":
            obj = _get_attr(model, n.target)
            if (isinstance(obj, torch.Tensor) and id(obj) in ed_ids) or (
                isinstance(obj, nn.Module) and owns(obj)
            ):
                dep.add(n)
        elif n.op == "call_module" and owns(model.get_submodule(n.target)):
            dep.add(n)
        if any(i in dep for i in n.all_input_nodes):
            dep.add(n)
    if not dep:
        raise ValueError(
            f"no computation of {type(model).__name__} uses the editable parameters {names[:5]}"
            + ("..." if len(names) > 5 else "")
        )
    _check_inplace(graph, model, dep)
    if not any(i in dep for i in output_node.all_input_nodes):
        raise ValueError(
            f"the output of {type(model).__name__} does not depend on the editable parameters "
            f"{names[:5]}" + ("..." if len(names) > 5 else "")
        )

    frontier = [
        n for n in nodes
        if n not in dep and n.op not in ("get_attr", "output")
        and any(u in dep or u is output_node for u in n.users)
    ]

    # prefix: every non-dependent node, in order; returns the frontier tuple
    pg = fx.Graph()
    penv: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n not in dep and n.op != "output":
            penv[n] = pg.node_copy(n, lambda a: penv[a])
    pg.output(tuple(penv[f] for f in frontier))

    # suffix: acts -> getitem per frontier value -> dependent nodes -> output
    sg = fx.Graph()
    acts = sg.placeholder("acts")
    senv: dict[fx.Node, fx.Node] = {}
    for i, f in enumerate(frontier):
        senv[f] = sg.create_node("call_function", operator.getitem, (acts, i), name=f.name)

    def lookup(a: fx.Node) -> fx.Node:
        if a not in senv:
            if a.op != "get_attr":  # cannot happen: every non-dependent input is in the frontier
                raise _Unsupported(f"internal: node {a.name!r} missing from the frontier")
            senv[a] = sg.create_node("get_attr", a.target, name=a.name)
        return senv[a]

    for n in nodes:
        if n in dep:
            senv[n] = sg.node_copy(n, lookup)
    sg.node_copy(output_node, lookup)

    prefix_gm = fx.GraphModule(model, pg, class_name="FrozenPrefix")
    suffix_gm = fx.GraphModule(model, sg, class_name="EditableSuffix")
    for name in names:
        _install_param_path(suffix_gm, model, name)

    model_names = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    suffix_params = dict(suffix_gm.named_parameters(remove_duplicate=False))
    foreign = [n for n, p in suffix_params.items() if model_names.get(n) is not p]
    if foreign:
        raise _Unsupported(f"suffix parameter names not in the model: {foreign[:5]}")
    missing = [n for n in names if suffix_params.get(n) is not model_names[n]]
    if missing:
        raise _Unsupported(f"editable parameters missing from the suffix: {missing[:5]}")

    bound = {n.target for n in nodes if n.op == "get_attr"} | set(names)
    bindings = tuple((t, obj) for t in sorted(bound) if isinstance(obj := _get_attr(model, t), torch.Tensor))
    plain = frozenset(t for t, obj in bindings if not _registered(model, t))
    return PrefixSplit(
        prefix_module=prefix_gm,
        suffix_module=suffix_gm,
        traced=True,
        reason=None,
        num_prefix_nodes=sum(1 for n in nodes if n not in dep and n.op not in ("placeholder", "output")),
        num_suffix_nodes=len(dep),
        frontier=tuple(f.name for f in frontier),
        bindings=bindings,
        plain_bindings=plain,
    )


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (so NaN equals the same NaN, and -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


def _outputs_equal(a: Any, b: Any, other_leaves: bool = True) -> bool:
    """Same structure and tensors bit for bit; ``other_leaves=False`` leaves non-tensor leaves (a
    KV-cache object) uncompared."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if not bits_equal(x, y):
                return False
        elif other_leaves and x != y:
            return False
    return True


def _verify(model: nn.Module, split: PrefixSplit, example_inputs: tuple) -> str | None:
    """None if ``split`` reproduces ``model`` exactly on ``example_inputs``, else why not."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def fresh_inputs():
        return pytree.tree_map(
            lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tuple(example_inputs)
        )

    def restore():
        for b, saved in buffers:
            b.copy_(saved)

    with torch.no_grad():
        try:
            ref = model(*fresh_inputs())
            restore()
            got = split(*fresh_inputs())
        finally:
            restore()
    if not _outputs_equal(ref, got):
        return "verification on example_inputs: split output differs from the model output"
    return None


def split_prefix(
    model: nn.Module,
    editable: Iterable[str],
    *,
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple | None = None,
) -> PrefixSplit:
    """Split ``model`` into a frozen prefix and a suffix that depends on ``editable`` parameters.

    Args:
        model: the model; its modules and parameters are shared, not copied.
        editable: qualified parameter names of ``model`` (as in ``named_parameters()``, aliases of
            shared modules allowed). Unknown or empty selection -> ``ValueError``.
        concrete_args: passed to ``torch.fx.Tracer.trace`` to specialise arguments.
        example_inputs: optional positional inputs; when given, the traced split is checked to give
            bit-identical outputs (buffers are restored afterwards) and falls back otherwise.

    Returns:
        A :class:`PrefixSplit`; ``traced=False`` (with ``reason``) if the model could not be split.

    Raises:
        ValueError: invalid ``editable``, or the traced model does not use/depend on it.
    """
    names, ed_ids = _resolve_editable(model, editable)
    before = set(model.__dict__)
    try:
        try:
            graph = fx.Tracer().trace(model, concrete_args)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "fall back"
            return _fallback(model, f"tracing failed: {_short(exc)}")
        try:
            split = _traced_split(model, graph, names, ed_ids)
        except ValueError:
            raise
        except _Unsupported as exc:
            return _fallback(model, str(exc))
        except Exception as exc:  # noqa: BLE001
            return _fallback(model, f"split failed: {_short(exc)}")
    finally:
        # the fx tracer stores captured constant tensors as new attributes of the root module;
        # the GraphModules hold their own references, so remove them from the user's model
        for key in set(model.__dict__) - before:
            del model.__dict__[key]
    if example_inputs is not None:
        try:
            why = _verify(model, split, example_inputs)
        except Exception as exc:  # noqa: BLE001
            why = f"verification on example_inputs failed: {_short(exc)}"
        if why is not None:
            return _fallback(model, why)
    return split


# --------------------------------------------------------------------------------------------------
# the split an edit uses: fx where it traces finely, else cached module calls, else the whole model


@dataclasses.dataclass(eq=False)
class ModelSplit:
    """How edits of ``model`` skip its frozen prefix, for any inputs of one call signature.

    ``method``: ``"fx"`` (a traced graph split, :func:`split_prefix`), ``"call-cache"`` (cached module
    calls, :mod:`fastedit.call_cache`; any Python control flow, any input length) or ``"none"`` (the
    whole model at every step; ``reason`` says why). ``suffix_module`` takes the activations of
    :meth:`prefix` and is called with the model's own parameter names under
    ``torch.func.functional_call``.
    """

    model: nn.Module
    method: str
    reason: str | None
    suffix_module: nn.Module
    names: tuple[str, ...]
    fx_split: PrefixSplit | None = None
    bind: Any = None  # ModelInputs -> the fx prefix's positional arguments
    whole_records: bool = False  # cached calls: the model writes cached outputs in place, record whole runs
    unread: frozenset = frozenset()  # cached calls whose outputs no replay reads: kept as placeholders
    _watch: Any = None
    _module_names: dict | None = None

    def module_name(self, module: nn.Module) -> str:
        """``module``'s qualified name in the model (its class name if it is not one of the model's);
        the names are gathered once per split, which the model's fingerprint keys."""
        if self._module_names is None:
            self._module_names = {id(m): n for n, m in self.model.named_modules()}
        return self._module_names.get(id(module), type(module).__name__)

    @property
    def used(self) -> bool:
        return self.method != "none"

    @property
    def rows(self) -> tuple:
        """The :class:`fastedit.rows.RowPruned` submodules of a cached-call split (computing only the
        output positions the model reads)."""
        return getattr(self.suffix_module, "rows", ())

    @property
    def grad_mode_free(self) -> bool:
        """Whether activations from :meth:`edit_acts` also serve forwards without grad (fx and none:
        plain values; cached module calls are bound to the grad mode they were recorded in)."""
        return self.method != "call-cache"

    def current(self, *, registered_unchanged: bool = False) -> bool:
        """Whether the split still fits the model (a traced split binds tensors; the cached calls and
        the whole model read the live model at every step); ``registered_unchanged`` as in
        :meth:`PrefixSplit.current`."""
        return self.fx_split is None or self.fx_split.current(self.model, registered_unchanged=registered_unchanged)

    def watch(self) -> "call_cache.Watch":
        """The call cache's view of the editable parameters, redone if one was re-registered."""
        params = [self.model.get_parameter(n) for n in self.names]
        if self._watch is None or any(a is not b for a, b in zip(self._watch.params, params)):
            self._watch = call_cache.Watch(self.model, params)
        return self._watch

    def prefix(self, inputs: ModelInputs):
        """The frozen activations of ``inputs``, in the ambient grad mode (the graph is kept)."""
        if self.method == "fx":
            return self.fx_split.prefix(*self.bind(inputs))
        if self.method == "call-cache":
            return call_cache.record(self.model, self.watch(), inputs, whole=self.whole_records,
                                     unread=self.unread)[1]
        return inputs

    def prefix_and_output(self, inputs: ModelInputs) -> tuple[Any, Any]:
        """``(prefix(inputs), model output)``; the cached-call split records both in one run."""
        if self.method == "call-cache":
            out, acts = call_cache.record(self.model, self.watch(), inputs, unread=self.unread)
            return acts, out
        acts = self.prefix(inputs)
        return acts, self.suffix(acts)

    def eval_acts(self, inputs: ModelInputs):
        """The frozen activations for forwards without grad (control sets, checks)."""
        with torch.no_grad():
            return self.prefix(inputs)

    def edit_acts(self, inputs: ModelInputs, names: list[str], params: list[torch.Tensor]):
        """The frozen activations for editor steps: no graph, recorded as the steps will run (grad
        enabled, the editable parameters replaced by leaves that require grad), so that code which
        branches on grad mode takes the same path in the prefix run and in the steps."""
        if self.method == "call-cache":
            watch = self.watch()
            leaves = [p.detach().requires_grad_() for p in watch.params]
            with torch.enable_grad():
                return call_cache.record(self.model, watch, inputs, params=leaves, detach=True,
                                         whole=self.whole_records, unread=self.unread)[1]
        with torch.no_grad():
            return self.prefix(inputs)

    def suffix(self, acts):
        return self.suffix_module(acts)


def _fx_binding(model: nn.Module, inputs: ModelInputs) -> tuple[list, dict]:
    """The model's ``forward`` arguments in order, and those fx must treat as constants (every
    non-tensor value, ``None`` included, so ``if mask is not None`` takes the branch it takes here)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise _Unsupported(f"no signature: {exc}") from None
    params = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise _Unsupported("forward takes *args or **kwargs")
    try:
        bound = sig.bind(*inputs.args, **inputs.kwargs)
    except TypeError as exc:
        raise ValueError(f"the inputs do not fit {type(model).__name__}.forward{sig}: {exc}") from None
    bound.apply_defaults()
    values = [bound.arguments[p.name] for p in params]
    concrete = {}
    for p, v in zip(params, values):
        if isinstance(v, torch.Tensor):
            continue
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(v)):
            raise _Unsupported(f"argument {p.name!r} is a container of tensors")
        concrete[p.name] = v
    return values, concrete


def _bind_positional(model: nn.Module):
    sig = inspect.signature(model.forward)

    def bind(inputs: ModelInputs) -> list:
        bound = sig.bind(*inputs.args, **inputs.kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())
    return bind


def _coarse(split: PrefixSplit, model: nn.Module, ed_ids: set[int]) -> bool:
    """Whether the fx suffix calls, as one leaf, a module with a parametrised submodule that holds no
    editable parameter (``nn.TransformerEncoder`` is an fx leaf): cached calls may keep more."""
    for node in split.suffix_module.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = model.get_submodule(node.target)
        for sub in leaf.modules():
            if sub is leaf:
                continue
            params = list(sub.parameters())
            if params and not any(id(p) in ed_ids for p in params):
                return True
    return False


def _verify_call_cache(model: nn.Module, names: list[str], inputs: ModelInputs,
                       read: Any) -> tuple[str | None, bool, frozenset, tuple]:
    """``(None, writes, unread, rows)`` if replaying the cached calls reproduces the model bit for bit on
    ``inputs``, with its own parameters and with the editable ones perturbed (a cached call that
    depended on them would then differ), else ``(why not, _, _, _)``. ``writes``: the model writes a
    cached output in place; ``unread``: the calls whose outputs the replays do not read
    (:func:`_unread_calls`); ``rows``: the edited submodules that compute only the output positions
    the model reads (:func:`_read_rows`), checked close to the model with perturbed parameters."""
    from torch.func import functional_call

    suffix = call_cache.CallCacheSuffix(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    params = [named[n] for n in names]
    watch = call_cache.Watch(model, params)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def perturbed_replay(steps):
        with torch.enable_grad():
            return read(functional_call(suffix, swapped, (steps,), strict=False)).detach()

    try:
        with torch.no_grad():
            full = read(inputs.call(model))
            _, acts = call_cache.record(model, watch, inputs)
            if not bits_equal(read(suffix(acts)), full):
                return "verification: the replayed output differs from the model's", False, frozenset(), ()
        swapped = {n: t.requires_grad_() for n, t in zip(names, call_cache.perturbed(params))}
        leaves = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            steps = call_cache.record(model, watch, inputs, params=leaves, detach=True)[1]
            want = read(functional_call(model, swapped, inputs.args, inputs.kwargs, strict=False)).detach()
        if not bits_equal(perturbed_replay(steps), want):
            return ("verification: with perturbed editable parameters the replay differs from the model "
                    "(a cached module call depends on them)"), False, frozenset(), ()
        unread = _unread_calls(suffix, acts)
        if unread and not _same_replay(lambda: perturbed_replay(call_cache.thinned(steps, unread)), want):
            unread = frozenset()
        rows = _read_rows(model, watch, suffix, call_cache.thinned(acts, unread))
        if rows:
            suffix = call_cache.CallCacheSuffix(model, rows)
            got = perturbed_replay(call_cache.thinned(steps, unread))
            if not (got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))):
                rows = ()
    except call_cache.CallCacheError as exc:
        return str(exc), False, frozenset(), ()
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return None, any(copied for _, _, copied in acts.plan + steps.plan), unread, rows


def _read_rows(model: nn.Module, watch: "call_cache.Watch", suffix: nn.Module, acts: "call_cache.CachedActs") -> tuple:
    """:class:`fastedit.rows.RowPruned` forwards for the edited submodules (those a compiled split
    compiles) whose output the model reads at its first position only (:func:`fastedit.rows.read_axis`)."""
    from .compiled import compile_units
    from .rows import RowPruned, read_axis
    with torch.no_grad():
        base = suffix(acts)
    found = []
    for unit in compile_units(model, watch.containers, {id(m) for m, _, _ in acts.plan}):
        try:
            with torch.no_grad():
                where = read_axis(unit, lambda: suffix(acts), lambda out: _same_replay(lambda: out, base))
        except Exception:  # noqa: BLE001 - a unit the probe cannot run is computed whole
            where = None
        if where is not None:
            found.append(RowPruned(unit, *where))
    return tuple(found)


def _same_replay(run, want) -> bool:
    """Whether ``run()`` returns the tensors of ``want`` bit for bit, none of them a placeholder (other
    leaves are not compared). A placeholder read raises: that counts as no."""
    try:
        got = run()
        return (not any(isinstance(t, call_cache.Unread) for t in pytree.tree_leaves(got))
                and _outputs_equal(got, want, other_leaves=False))
    except Exception:  # noqa: BLE001 - any failure means the output was read
        return False


def _unread_calls(suffix: nn.Module, acts: "call_cache.CachedActs") -> frozenset:
    """The cached calls whose outputs a replay of ``acts`` does not read, kept only when every tensor
    of the replay with those outputs as placeholders (not only the logits) is still bit for bit what
    the full replay returns. In a transformer these are every cached layer but the last one before
    the edited layer: a cached call's output feeds the next call, which is answered from the cache too.

    One replay with every cached output watched (:func:`fastedit.call_cache.unread_by_watching`)
    proposes the set and one checks it; if the watched replay fails or its set does not pass, each
    call in turn is tried (one replay per cached call: 18 for GPT-2, each through its output layer)."""
    with torch.no_grad():
        base = suffix(acts)

    def unread_all(trial: frozenset) -> bool:
        with torch.no_grad():
            return _same_replay(lambda: suffix(call_cache.thinned(acts, trial)), base)
    try:
        with torch.no_grad():
            proposed = call_cache.unread_by_watching(suffix, acts)
    except Exception:  # noqa: BLE001 - glue that cannot take a watched tensor: one call at a time
        proposed = None
    if proposed and unread_all(proposed):
        return proposed
    unread: frozenset = frozenset()
    for module, k, _ in acts.plan:
        if unread_all(unread | {(id(module), k)}):
            unread = unread | {(id(module), k)}
    return unread


def build_split(model: nn.Module, names: list[str], inputs: ModelInputs, read: Any,
                use_prefix: bool = True) -> ModelSplit:
    """The split for editing ``names`` of ``model`` with inputs like ``inputs`` (their call signature:
    structure, ranks, dtypes, non-tensor values; not their sizes). Build it in the mode the edits
    run in (eval).

    Order: the fx split when the model traces with ``inputs``' non-tensor arguments as constants
    (exact by construction: the same operations on the same values), unless it treats a module with
    frozen parametrised submodules as one leaf; else the cached-call split, verified bit for bit on
    ``inputs`` (with the editable parameters as they are and perturbed); else the fx split if there
    was one; else the whole model, with every reason. ``read``: model output -> logits, which the
    checks compare.
    """
    names, ed_ids = _resolve_editable(model, names)
    if not use_prefix:
        return ModelSplit(model, "none", "prefix split disabled (use_prefix=False)", _WholeModelSuffix(model),
                          tuple(names))
    reasons = []
    fx_split = None
    try:
        _, concrete = _fx_binding(model, inputs)
    except _Unsupported as exc:
        reasons.append(f"fx: {exc}")
    else:
        fx_split = split_prefix(model, names, concrete_args=concrete or None)
        if fx_split.traced and not _coarse(fx_split, model, ed_ids):
            return ModelSplit(model, "fx", None, fx_split.suffix_module, tuple(names), fx_split,
                              _bind_positional(model))
        if not fx_split.traced:
            reasons.append(f"fx: {fx_split.reason}")
            fx_split = None
    why, writes, unread, rows = _verify_call_cache(model, names, inputs, read)
    if why is None:
        return ModelSplit(model, "call-cache", None, call_cache.CallCacheSuffix(model, rows), tuple(names),
                          whole_records=writes, unread=unread)
    if fx_split is not None:
        return ModelSplit(model, "fx", None, fx_split.suffix_module, tuple(names), fx_split,
                          _bind_positional(model))
    reasons.append(f"call cache: {why}")
    return ModelSplit(model, "none", "; ".join(reasons), _WholeModelSuffix(model), tuple(names))
