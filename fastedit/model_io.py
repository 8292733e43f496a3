"""How fastedit calls a model: structured inputs in, logits out.

Inputs (the second argument of every entry point) may be

* a tensor: ``model(x)``;
* a tuple or list: positional arguments, ``model(*inputs)``;
* a ``Mapping`` (a dict, a tokenizer's ``BatchEncoding``): keyword arguments, ``model(**inputs)``.

Nested containers are allowed. The first dimension of every tensor leaf is the *sample* dimension:
it is how control sets are cut into chunks and how the rows of one edit are told apart; all tensor
leaves must agree on it. Other leaves (``None``, numbers, strings, flags) pass through unchanged.

Outputs: ``output=`` says where the logits are in the model's return value. Default: a tensor is
itself, a ``Mapping`` (an HF ``ModelOutput`` included) gives ``["logits"]``, a tuple or list gives
``[0]``; or a key, an integer index, or a callable ``out -> logits``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = ["ModelInputs", "ModelView", "OutputSpec", "read_logits", "resolve_output"]

OutputSpec = Union[None, str, int, Callable[[Any], Tensor]]


def _leaf_name(path) -> str:
    """A readable name of a leaf of ``(args, kwargs)``: ``input_ids``, ``argument 1``, ``past[0]``."""
    where, rest = path[0].idx, path[1:]
    if where == 0:  # positional: path = (0, SequenceKey(i), ...)
        head, rest = f"argument {rest[0].idx}", rest[1:]
    else:           # keyword: path = (1, MappingKey(name), ...)
        head, rest = str(rest[0].key), rest[1:]
    return head + (pytree.keystr(rest) if rest else "")


@dataclass(frozen=True, eq=False)
class ModelInputs:
    """A model's call arguments, normalised: ``model(*args, **kwargs)``.

    Built by :meth:`of` from what a user passes; validated there (every tensor leaf has a sample
    dimension and all agree on it). A pytree node, so ``torch.func`` transforms and
    ``torch.utils._pytree`` see through it.
    """

    args: tuple
    kwargs: dict

    @classmethod
    def of(cls, inputs, what: str = "inputs") -> "ModelInputs":
        """Normalise a tensor, a tuple/list of positional arguments or a mapping of keyword arguments."""
        if isinstance(inputs, ModelInputs):
            return inputs
        if isinstance(inputs, Tensor):
            out = cls((inputs,), {})
        elif isinstance(inputs, (tuple, list)):
            out = cls(tuple(inputs), {})
        elif isinstance(inputs, Mapping):
            bad = [k for k in inputs if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{what}: keyword-argument names must be strings, got {bad[0]!r}")
            out = cls((), dict(inputs.items()))
        else:
            raise TypeError(f"{what} must be a tensor, a tuple/list of positional arguments or a mapping of "
                            f"keyword arguments (e.g. a tokenizer's output), got {type(inputs).__name__}")
        out.num_samples_checked(what)
        return out

    # -- structure -------------------------------------------------------------------------------
    def tensor_leaves(self) -> list[tuple[str, Tensor]]:
        """``[(name, tensor)]`` for every tensor leaf, in call order."""
        return list(self._tensor_leaves)

    # Flattened once per instance: an edit asks for the leaves, the sample count, the device and the
    # signature several times. The instance is frozen and ``of`` copies the caller's containers.
    @functools.cached_property
    def _tensor_leaves(self) -> tuple:
        leaves, _ = pytree.tree_flatten_with_path((self.args, self.kwargs))
        return tuple((_leaf_name(p), v) for p, v in leaves if isinstance(v, Tensor))

    def num_samples_checked(self, what: str = "inputs") -> int:
        """The sample count, or ``ValueError`` naming the leaves whose first dimensions disagree."""
        leaves = self.tensor_leaves()
        if not leaves:
            raise TypeError(f"{what} hold no tensor: pass the model's input tensor(s)")
        sizes = {}
        for name, t in leaves:
            if t.dim() == 0:
                raise ValueError(f"{what}: the tensor {name} has no sample dimension (0-dim); every tensor "
                                 "input needs the samples in its first dimension (pass scalars as Python numbers)")
            sizes.setdefault(int(t.shape[0]), name)
        if len(sizes) > 1:
            desc = ", ".join(f"{name} has {n}" for n, name in sizes.items())
            raise ValueError(f"{what}: the sample dimensions (first dimensions) of the input tensors disagree: {desc}")
        n = next(iter(sizes))
        if n == 0:
            raise ValueError(f"{what} must have a non-empty sample dimension (the first dimension is 0)")
        return n

    @property
    def num_samples(self) -> int:
        return int(self.tensor_leaves()[0][1].shape[0])

    @property
    def device(self) -> torch.device:
        return self.tensor_leaves()[0][1].device

    def map_tensors(self, fn: Callable[[Tensor], Any]) -> "ModelInputs":
        args, kwargs = pytree.tree_map(lambda v: fn(v) if isinstance(v, Tensor) else v, (self.args, self.kwargs))
        return ModelInputs(tuple(args), dict(kwargs))

    def rows(self, lo: int, hi: int) -> "ModelInputs":
        """Samples ``lo:hi`` (views)."""
        return self.map_tensors(lambda t: t[lo:hi])

    def take(self, index: Tensor) -> "ModelInputs":
        """The samples at ``index`` (int64 ``[k]``, on any device)."""
        return self.map_tensors(lambda t: t[index.to(t.device)])

    def call(self, fn: Callable) -> Any:
        return fn(*self.args, **self.kwargs)

    def describe(self) -> str:
        """``x of shape (1, 3, 8, 8)`` for one tensor, else ``input_ids (2, 7), attention_mask (2, 7)``."""
        leaves = self.tensor_leaves()
        if len(leaves) == 1 and not self.kwargs:
            return f"x of shape {tuple(leaves[0][1].shape)}"
        return ", ".join(f"{name} {tuple(t.shape)}" for name, t in leaves)

    def check_device(self, device: torch.device, what: str = "inputs") -> None:
        for name, t in self.tensor_leaves():
            if t.device != device:
                raise ValueError(f"{what}: {name} is on {t.device} but the editable parameters are on {device}")

    def float_dtypes(self) -> set[torch.dtype]:
        return {t.dtype for _, t in self.tensor_leaves() if t.is_floating_point()}

    def signature(self) -> tuple:
        """What a trace specialises on: the pytree structure, the non-tensor values, the tensors' ranks
        and dtypes (not their sizes)."""
        return self._signature

    @functools.cached_property
    def _signature(self) -> tuple:
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        desc = tuple(("T", v.dim(), v.dtype) if isinstance(v, Tensor) else ("C", _hashable(v)) for v in leaves)
        return (str(spec), desc)


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _flatten_inputs(mi: ModelInputs):
    return [mi.args, mi.kwargs], None


def _unflatten_inputs(children, _ctx) -> ModelInputs:
    args, kwargs = children
    return ModelInputs(tuple(args), dict(kwargs))


def _flatten_inputs_with_keys(mi: ModelInputs):
    return [(pytree.GetAttrKey("args"), mi.args), (pytree.GetAttrKey("kwargs"), mi.kwargs)], None


pytree.register_pytree_node(ModelInputs, _flatten_inputs, _unflatten_inputs,
                            serialized_type_name="fastedit.ModelInputs",
                            flatten_with_keys_fn=_flatten_inputs_with_keys)


class ModelView(nn.Module):
    """``forward(acts)`` = the model called on ``acts`` (:class:`ModelInputs`, or a tuple of positional
    arguments); a base for suffixes that run the whole model's forward.

    It shares the model's ``_parameters``, ``_buffers`` and ``_modules`` dictionaries (the very same
    objects), so ``named_parameters()``/``state_dict()`` names equal the model's, and swapping a
    tensor in those dictionaries (``torch.func.functional_call``, :func:`fastedit.selection.swapped`)
    affects the model's own forward. The model itself is kept outside the module registries.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for key in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[key] = model.__dict__[key]
        self.__dict__["_fastedit_model"] = model
        self.__dict__["training"] = model.training

    def _fastedit_wrapped(self) -> nn.Module:
        """The model (an unusual name: attributes of the class shadow the model's submodules of that name)."""
        return self.__dict__["_fastedit_model"]

    def forward(self, acts):
        model = self._fastedit_wrapped()
        return acts.call(model) if isinstance(acts, ModelInputs) else model(*acts)

    def train(self, mode: bool = True):
        self._fastedit_wrapped().train(mode)
        self.__dict__["training"] = mode
        return self

    def extra_repr(self) -> str:
        return f"whole model: {type(self._fastedit_wrapped()).__name__}"


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _default_logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" not in out:
            keys = list(out.keys())
            raise ValueError(f"the model returned a {type(out).__name__} without 'logits' (keys {keys}); "
                             "pass output= (a key, an index or a callable) to say where the logits are")
        return out["logits"]
    if isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("the model returned an empty tuple; pass output= to say where the logits are")
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; pass output= (a key, an index or a callable) "
                    "to say where the logits are")


def resolve_output(output: OutputSpec) -> Callable[[Any], Tensor]:
    """A function ``model output -> logits`` for ``output=`` (see the module docstring)."""
    if output is None:
        return _default_logits
    if isinstance(output, bool):
        raise TypeError("output must be None, a key, an index or a callable, got a bool")
    if isinstance(output, str):
        def by_key(out) -> Tensor:
            if isinstance(out, Mapping):
                if output not in out:
                    raise ValueError(f"output={output!r}: the model's {type(out).__name__} has no such key "
                                     f"(keys {list(out.keys())})")
                return out[output]
            if hasattr(out, output):
                return getattr(out, output)
            raise ValueError(f"output={output!r}: the model returned {type(out).__name__}, which has no such "
                             "key or attribute")
        return by_key
    if isinstance(output, int):
        def by_index(out) -> Tensor:
            if isinstance(out, Tensor):
                raise ValueError(f"output={output}: the model returned a tensor, not a tuple; leave output=None")
            try:
                return out[output]
            except (IndexError, KeyError, TypeError) as exc:
                raise ValueError(f"output={output}: cannot index the model's {type(out).__name__} ({exc})") from None
        return by_index
    if callable(output):
        return output
    raise TypeError(f"output must be None, a key (str), an index (int) or a callable, got {type(output).__name__}")


def read_logits(out, reader: Callable[[Any], Tensor]) -> Tensor:
    """``reader(out)``, checked to be a floating-point tensor."""
    logits = reader(out)
    if not isinstance(logits, Tensor):
        raise TypeError(f"output= gave {type(logits).__name__}, not a logits tensor")
    if not logits.is_floating_point():
        raise TypeError(f"the logits must be floating point, got dtype {logits.dtype}")
    return logits
