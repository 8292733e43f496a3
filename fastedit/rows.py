"""Rows nothing reads: run a module computing only the positions of its output that the model reads.

Why: a BERT-style classifier reads its last layer's output at one position (``hidden[:, 0]``, the
[CLS] token, feeds the pooler). Editing that layer, the edit's steps and the control passes would
compute 64 positions of it to use one. Only the query of that position is needed in attention (keys
and values still come from every position); the attention output, the residuals, the LayerNorms and
the feed-forward block work position by position. So the layer's arithmetic drops to its key and
value projections plus one position of the rest.

How (:class:`RowPruned`, installed as the module's ``forward`` during a replay):

1. which positions are read is found once, when the split is built (:func:`read_axis`): the module's
   output with every position but the first along an axis set to NaN, and the model's output compared
   bit for bit with the plain replay's. NaN propagates through any arithmetic that reads it.
2. the module is traced once per call signature (shapes, dtypes, non-tensor values, training flags,
   grad and autocast modes) with ``make_fx(pre_dispatch=True)``: ATen ops above autograd
   (``linear``, ``layer_norm``, ``scaled_dot_product_attention``, views), run eagerly with autograd
   like the module itself.
3. :func:`prune_graph` walks the graph back from the output: every op that works position by position
   (pointwise ops with broadcasting, ``linear`` and ``layer_norm`` over the last dimensions, views
   that keep the position axis, attention's queries) is computed on the read positions only; what
   needs every position (attention's keys and values) is computed whole and narrowed where a
   position-wise op reads it. An op without a rule is computed whole, so the pass is exact for any
   graph, only less useful.
4. the pruned output is padded back to the module's output shape with NaN in the unread positions.
   The first traced call of each signature is checked against the module's own forward (close within
   float tolerance: different matrix sizes may round differently); a replay whose output holds a
   NaN is run again unpruned (and if that changes the output, pruning stops for good:
   :meth:`RowPruned.disable`, reported), so a model that reads another position after all (other
   inputs) gets the exact result, never a NaN.

The module runs as it is under ``torch.func`` transforms (vmap groups of ``evaluate``), with nested
tensors, with an argument that is neither a tensor nor a constant, with hooks inside it, and when
its trace fails.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

__all__ = ["RowPruned", "prune_graph", "read_axis"]

aten = torch.ops.aten
_ALL = "all"  # a requirement: every position
_GRAPHS_PER_MODULE = 16  # call signatures kept per module (LRU)
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)  # arguments a trace may bake in

# ops computed position by position along any axis, with their tensor arguments broadcast
_POINTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.neg.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


# ------------------------------------------------------------------------------------------------
# the graph pass
# ------------------------------------------------------------------------------------------------
def _val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor_node(x) -> bool:
    return isinstance(_val(x), Tensor)


def _broadcast_req(arg, out_ndim: int, axis: int, req: tuple):
    """What a broadcast operand needs of itself when the op's output is needed at ``req``."""
    val = _val(arg)
    a = axis - (out_ndim - val.dim())
    if a < 0 or val.shape[a] == 1:
        return _ALL  # broadcast along the axis: used whole, and small
    return (a,) + req[1:]


def _view_axis(in_shape, out_shape, out_axis: int) -> int | None:
    """The input axis that ``out_axis`` of a view is, if the view keeps it as one axis."""
    before = math.prod(out_shape[:out_axis])
    size = out_shape[out_axis]
    for a in range(len(in_shape)):
        if math.prod(in_shape[:a]) == before and in_shape[a] == size:
            return a
    return None


def _arg_reqs(node: fx.Node, req: tuple) -> dict | None:
    """``{argument position or kwarg name: requirement}`` for the tensor arguments of ``node`` when its
    output is needed at ``req`` = ``(axis, start, length)``; ``None``: no rule, compute it whole."""
    axis = req[0]
    out = _val(node)
    if not isinstance(out, Tensor) or axis >= out.dim():
        return None
    t, args, kwargs = node.target, node.args, node.kwargs
    if t in _POINTWISE:
        return {i: _broadcast_req(a, out.dim(), axis, req) for i, a in enumerate(args) if _is_tensor_node(a)}
    if t == aten.dropout.default:
        train = args[2] if len(args) > 2 else kwargs.get("train", False)
        return None if train else {0: req}
    if t == aten.linear.default:
        if axis >= out.dim() - 1:
            return None
        return {0: req, **{i: _ALL for i in (1, 2) if i < len(args) and _is_tensor_node(args[i])}}
    if t == aten.layer_norm.default:
        if axis >= out.dim() - len(args[1]):
            return None
        return {0: req, **{i: _ALL for i in (2, 3) if i < len(args) and _is_tensor_node(args[i])}}
    if t == aten.softmax.int or t == aten._softmax.default:
        return None if args[1] % out.dim() == axis else {0: req}
    if t == aten.transpose.int:
        d0, d1 = (d % out.dim() for d in args[1:3])
        return {0: ((d1 if axis == d0 else d0 if axis == d1 else axis),) + req[1:]}
    if t == aten.permute.default:
        return {0: (args[1][axis] % out.dim(),) + req[1:]}
    if t in _VIEWS:
        a = _view_axis(tuple(_val(args[0]).shape), tuple(out.shape), axis)
        return None if a is None else {0: (a,) + req[1:]}
    if t == aten.scaled_dot_product_attention.default:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        given = dict(zip(names, args)) | dict(kwargs)
        if axis != out.dim() - 2 or given.get("dropout_p", 0.0) or given.get("is_causal", False):
            return None
        reqs = {0: req, 1: _ALL, 2: _ALL}
        mask = given.get("attn_mask")
        if _is_tensor_node(mask):
            reqs[3 if len(args) > 3 else "attn_mask"] = _broadcast_req(mask, out.dim(), axis, req)
        return reqs
    if t == aten.matmul.default:
        left = _val(args[0])
        if axis != out.dim() - 2 or left.dim() < 2:
            return None
        return {0: (left.dim() - 2,) + req[1:], 1: _ALL}
    return None


def _resized(shape, axis: int, length: int) -> list:
    shape = list(shape)
    if shape[axis] != -1:
        shape[axis] = length
    return shape


def prune_graph(gm: fx.GraphModule, leaf: int, axis: int, length: int = 1) -> tuple[fx.GraphModule, int]:
    """A graph computing ``gm``'s output leaf ``leaf`` only at positions ``[0, length)`` of ``axis``
    (other leaves whole), and how many of its ops now run on those positions only. Nodes need
    ``meta["val"]`` (``make_fx`` sets it)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    output = nodes[-1]
    out_leaves = pytree.tree_leaves(output.args[0])
    want = (axis, 0, length)

    # backward: what each node's users need of it; a node is pruned when they all need the same rows
    needs: dict[fx.Node, list] = {n: [] for n in nodes}
    for i, x in enumerate(out_leaves):
        if isinstance(x, fx.Node):
            needs[x].append(want if i == leaf else _ALL)
    mode: dict[fx.Node, Any] = {}
    reqs_of: dict[fx.Node, dict] = {}
    for node in reversed(nodes[:-1]):
        got = needs[node]
        if not got:
            continue
        m = got[0] if all(g == got[0] for g in got) else _ALL
        reqs = _arg_reqs(node, m) if m != _ALL and node.op == "call_function" else None
        if reqs is None:
            m = _ALL
        mode[node], reqs_of[node] = m, reqs or {}
        flat_args = list(enumerate(node.args)) + list(node.kwargs.items())
        for key, a in flat_args:
            for x in pytree.tree_leaves(a):
                if isinstance(x, fx.Node):
                    needs[x].append(reqs.get(key, _ALL) if reqs is not None and x is a else _ALL)

    # forward: rebuild, each pruned node from pruned (or narrowed) arguments
    new = fx.Graph()
    new._codegen = graph._codegen  # the same pytree calling convention
    env: dict[fx.Node, fx.Node] = {}
    narrowed: dict[tuple, fx.Node] = {}
    pruned_ops = 0

    def full(x):
        return env[x]

    def at(x, req):
        if req == _ALL:
            return env[x]
        if mode.get(x) == req:
            return env[x]
        key = (x, req)
        if key not in narrowed:
            narrowed[key] = new.call_function(aten.narrow.default, (env[x], req[0], req[1], req[2]))
        return narrowed[key]

    for node in nodes[:-1]:
        if node.op == "placeholder":  # every input kept: the calling convention
            env[node] = new.node_copy(node, full)
            continue
        if node not in mode:
            continue
        m = mode[node]
        if m == _ALL:
            env[node] = new.node_copy(node, full)
            continue
        reqs = reqs_of[node]
        args = [at(a, reqs[i]) if i in reqs else fx.map_arg(a, full) for i, a in enumerate(node.args)]
        kwargs = {k: at(v, reqs[k]) if k in reqs else fx.map_arg(v, full) for k, v in node.kwargs.items()}
        if node.target in _VIEWS:
            args[1] = _resized(args[1], m[0], m[2])
        env[node] = new.call_function(node.target, tuple(args), kwargs)
        env[node].meta = dict(node.meta)
        pruned_ops += 1
    leaves, spec = pytree.tree_flatten(output.args[0])
    mapped = [(at(x, want if i == leaf else _ALL) if isinstance(x, fx.Node) else x) for i, x in enumerate(leaves)]
    new.output(pytree.tree_unflatten(mapped, spec))
    new.eliminate_dead_code()
    return fx.GraphModule(gm, new), pruned_ops


# ------------------------------------------------------------------------------------------------
# finding the read positions
# ------------------------------------------------------------------------------------------------
def _nan_rows(t: Tensor, axis: int) -> Tensor:
    """``t`` with every position but the first along ``axis`` set to NaN (a new tensor)."""
    out = t.detach().clone()
    out.narrow(axis, 1, t.shape[axis] - 1).fill_(float("nan"))
    return out


def read_axis(module: nn.Module, replay: Callable[[], Any], same: Callable[[Any], bool]) -> tuple | None:
    """``(leaf, axis)``: the tensor leaf of ``module``'s output and the axis along which the model
    reads only the first position (``hidden[:, 0]``), found by replaying with the other positions set
    to NaN (``same(output)``: the replay's output is bit for bit the plain one's); ``None``: none."""
    from .call_cache import installed_forwards
    forward = module.forward
    seen: dict[str, Any] = {}

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.setdefault("out", out)
        return out
    with installed_forwards([(module, spy)]):
        replay()
    if "out" not in seen:
        return None
    for leaf, t in enumerate(pytree.tree_leaves(seen["out"])):
        if not isinstance(t, Tensor) or _nested(t) or not t.is_floating_point():
            continue
        for axis in range(t.dim() - 1):
            if t.shape[axis] < 2:
                continue

            def nan_forward(*args, _leaf=leaf, _axis=axis, **kwargs):
                leaves, spec = pytree.tree_flatten(forward(*args, **kwargs))
                leaves[_leaf] = _nan_rows(leaves[_leaf], _axis)
                return pytree.tree_unflatten(leaves, spec)
            try:
                with installed_forwards([(module, nan_forward)]):
                    if same(replay()):
                        return leaf, axis
            except Exception:  # noqa: BLE001 - a replay that fails on NaN reads them
                continue
    return None


# ------------------------------------------------------------------------------------------------
# the installed forward
# ------------------------------------------------------------------------------------------------
def _nested(t) -> bool:
    return isinstance(t, Tensor) and t.is_nested  # no sizes: the trace and the probe cannot take it


class RowPruned:
    """``module``'s forward computing leaf ``leaf`` of its output only at the first position along
    ``axis``, the rest of that leaf NaN (see the module docstring). Install it as the module's
    ``forward`` (:func:`fastedit.call_cache.installed_forwards`); ``disabled`` says why it stopped
    pruning, if it did."""

    def __init__(self, module: nn.Module, leaf: int, axis: int):
        self.module, self.leaf, self.axis = module, leaf, axis
        self.forward = module.forward  # the module's own, bound before anything is installed
        # the structure is fixed while the split lives (its fingerprint): walked once, read per call
        self._modules = tuple(module.modules())
        self._slots = [(f"{name}.{k}" if name else k, registry, k)
                       for kind in ("_parameters", "_buffers")
                       for name, m in module.named_modules(remove_duplicate=False)
                       for registry in (getattr(m, kind),) for k, v in registry.items() if v is not None]
        self.graphs: OrderedDict[tuple, Any] = OrderedDict()  # call signature -> pruned graph or None
        self.disabled: str | None = None
        self.pruned_calls = 0
        self.compile = False  # run the pruned graphs through torch.compile (set by compile=True splits)
        self._compiled: dict[tuple, Callable] = {}

    def disable(self, why: str) -> None:
        self.disabled = self.disabled or why

    def _key(self, leaves, spec, values) -> tuple:
        sig = tuple((tuple(x.shape), x.dtype, x.device, x.requires_grad) if isinstance(x, Tensor) else repr(x)
                    for x in leaves)
        state = tuple((tuple(v.shape), v.dtype, v.device, v.requires_grad) for v in values)
        autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
        return spec, sig, state, tuple(m.training for m in self._modules), torch.is_grad_enabled(), autocast

    def _state(self) -> dict:
        """The unit's parameters and buffers by name, as registered now (swapped-in edit tensors too)."""
        return {name: registry[k] for name, registry, k in self._slots}

    def _trace(self, state, args, kwargs):
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.nn.utils.stateless import _reparametrize_module
        module, forward = self.module, self.forward

        def run(state, args, kwargs):
            with _reparametrize_module(module, state):
                return forward(*args, **kwargs)
        try:
            gm = make_fx(run, pre_dispatch=True, tracing_mode="fake")(state, args, kwargs)
            pruned, count = prune_graph(gm, self.leaf, self.axis)
            if not count:
                return None
            with torch.no_grad():  # checked once per signature against the module's own forward
                want = pytree.tree_leaves(forward(*args, **kwargs))[self.leaf]
                got = pytree.tree_leaves(pruned(state, args, kwargs))[self.leaf]
        except Exception as exc:  # noqa: BLE001 - an untraceable module runs as it is
            self.disable(f"the trace of {type(module).__name__} failed: {type(exc).__name__}: {exc}"[:300])
            return None
        ref = want.narrow(self.axis, 0, 1)
        tol = 1e-3 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=tol * 10, atol=tol * float(ref.abs().max())):
            self.disable(f"the pruned {type(module).__name__} differs from its forward")
            return None
        return pruned, want.shape[self.axis]

    def _runs_whole(self, leaves, values) -> bool:
        """Whether this call runs the module as it is: pruning stopped; a torch.func transform is active
        (the NaN check after the replay reads the host); a nested tensor; an
        argument that is neither a tensor nor a constant (a cache object the trace would fill with
        fake tensors); hooks inside the module (a graph would run them once, at trace time)."""
        if self.disabled or torch._C._functorch.maybe_current_level() is not None:
            return True  # stopped, or inside a torch.func transform (vmap, grad, vjp): no host reads there
        if any(_nested(x) or not isinstance(x, (Tensor, *_CONSTANTS)) for x in leaves) or any(map(_nested, values)):
            return True
        hooks = nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in self._modules[1:])

    def __call__(self, *args, **kwargs):
        state = self._state()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        values = list(state.values())
        if self._runs_whole(leaves, values):
            return self.forward(*args, **kwargs)
        key = self._key(leaves, spec, values)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            traced = self.graphs[key]
        else:
            traced = self.graphs[key] = self._trace(state, args, kwargs)
            while len(self.graphs) > _GRAPHS_PER_MODULE:
                self._compiled.pop(self.graphs.popitem(last=False)[0], None)
        if traced is None:
            return self.forward(*args, **kwargs)
        pruned, length = traced
        if self.compile:
            if key not in self._compiled:
                self._compiled[key] = torch.compile(pruned, dynamic=False)
            pruned = self._compiled[key]
        leaves, spec = pytree.tree_flatten(pruned(state, args, kwargs))
        first = leaves[self.leaf]
        rest = list(first.shape)
        rest[self.axis] = length - 1
        leaves[self.leaf] = torch.cat([first, first.new_full((), float("nan")).expand(rest)], self.axis)
        self.pruned_calls += 1
        return pytree.tree_unflatten(leaves, spec)
