"""Which parameters an edit may change.

``params`` may be ``None`` (every parameter), a module-name prefix (``"layer3"``; an exact parameter
name works too), a list of names/prefixes, or an iterable of the model's own parameter tensors.

Tied weights (one tensor registered under several names, e.g. a language model's ``lm_head.weight``
and ``transformer.wte.weight``): any alias selects the shared tensor, which is then named once, by
its first name in ``named_parameters()``.

Frozen parameters (``requires_grad=False``) are not edited unless asked for: a module prefix skips
them, naming one raises, ``include_frozen=True`` allows both.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn

ParamSpec = Union[None, str, Iterable[Union[str, torch.Tensor]]]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_parameters(model: nn.Module, params: ParamSpec = None, *,
                      include_frozen: bool = False) -> list[tuple[str, nn.Parameter]]:
    """``[(qualified name, parameter)]`` in the model's own order.

    Frozen parameters (``requires_grad=False``) are left out of a selection by module prefix (or of
    ``None``, every parameter); naming one exactly (its name, or the tensor) raises unless
    ``include_frozen=True``, which also keeps them in prefix selections.

    Raises ``ValueError`` for an empty or unknown selection, one with nothing editable left, a frozen
    parameter named without ``include_frozen``, or parameters on several devices; ``TypeError`` for
    non-floating parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    aliases, canonical, named = [], {}, []  # named: shared parameters once, under their first name
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in canonical:
            canonical[id(p)] = n
            named.append((n, p))
        aliases.append((n, canonical[id(p)]))
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to edit")
    frozen = {n for n, p in named if not p.requires_grad}

    explicit: set[str] = set()  # named exactly: a frozen one is an error, not silently dropped
    if params is None:
        wanted = {n for n, _ in named}
    else:
        items = [params] if isinstance(params, (str, torch.Tensor)) else list(params)
        if not items:
            raise ValueError("params selects nothing: the list is empty")
        by_id = {id(p): n for n, p in named}
        wanted: set[str] = set()
        for item in items:
            if isinstance(item, str):
                hits = {first for n, first in aliases if _matches(n, item)}
                if not hits:
                    tops = sorted({n.split(".")[0] for n, _ in aliases})
                    raise ValueError(f"params: no parameter of {type(model).__name__} is named {item!r} or "
                                     f"lies under it; top-level names are {tops}")
                wanted |= hits
                explicit |= {first for n, first in aliases if n == item}
            elif isinstance(item, torch.Tensor):
                if id(item) not in by_id:
                    raise ValueError(f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model")
                wanted.add(by_id[id(item)])
                explicit.add(by_id[id(item)])
            else:
                raise TypeError(f"params entries must be names or parameters, got {type(item).__name__}")
    if not include_frozen:
        named_frozen = sorted(explicit & frozen)
        if named_frozen:
            raise ValueError(f"params names the frozen parameter(s) {named_frozen[:3]} (requires_grad=False); pass "
                             "include_frozen=True to edit them anyway, or unfreeze them")
        if wanted and wanted <= frozen:
            raise ValueError(f"params selects only frozen parameters (requires_grad=False): {sorted(wanted)[:3]}"
                             f"{' ...' if len(wanted) > 3 else ''}; pass include_frozen=True to edit them anyway")
        wanted -= frozen
    chosen = [(n, p) for n, p in named if n in wanted]

    if not chosen:
        raise ValueError("params selects no parameter")
    for n, p in chosen:
        if not p.is_floating_point():
            raise TypeError(f"parameter {n} has dtype {p.dtype}; only floating-point parameters can be edited")
    devices = {p.device for _, p in chosen}
    if len(devices) > 1:
        raise ValueError(f"the editable parameters lie on several devices {sorted(map(str, devices))}; "
                         "an edit needs them on one")
    return chosen


Slots = list[list[tuple[nn.Module, str]]]


def parameter_slots(root: nn.Module, params: Sequence[torch.Tensor]) -> Slots:
    """For each tensor of ``params``, every ``(module, name)`` under ``root`` that registers it (all
    aliases of a tied weight), for :func:`swapped`."""
    index = {id(p): i for i, p in enumerate(params)}
    slots: Slots = [[] for _ in params]
    for m in root.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in index:
                slots[index[id(p)]].append((m, name))
    return slots


@contextlib.contextmanager
def swapped(slots: Slots, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run with ``tensors`` in place of the parameters of ``slots`` (what
    ``torch.func.functional_call`` does, without walking every module of the model at each call);
    composes with autograd and ``torch.func`` transforms. The parameters are put back afterwards."""
    saved = []
    try:
        for where, t in zip(slots, tensors):
            for m, name in where:
                saved.append((m, name, m._parameters[name]))
                m._parameters[name] = t
        yield
    finally:
        for m, name, p in reversed(saved):
            m._parameters[name] = p
