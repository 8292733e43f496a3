"""Backend choice: CUDA extension → Triton → CPU extension → reference, per op and device.

Every backend can say why it cannot serve a call. A backend is forced, most specific first, by

1. the ``backend=`` keyword of an op (``fastedit.ops.edit_metrics(..., backend="reference")``),
2. :func:`use_backend` around the calls (``with fastedit.ops.use_backend("cpu"): fe.edit(...)``;
   per thread and per asyncio task, as a :mod:`contextvars` variable),
3. the environment variable ``FASTEDIT_BACKEND=reference|cpu|triton|cuda``.

A forced backend that cannot serve a call fails loudly (:class:`BackendError`, naming what forced
it and why it cannot); nothing falls back quietly. ``None`` everywhere means the priority order
:data:`BACKEND_ORDER`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import _extension as extension
from ._table import BACKEND_OPS

__all__ = ["BACKEND_ORDER", "ENV_BACKEND", "BackendError", "backends", "choose_backend", "forced_backend",
           "is_forced", "use_backend"]

BACKEND_ORDER = ("cuda", "triton", "cpu", "reference")
ENV_BACKEND = "FASTEDIT_BACKEND"

# the backend forced by use_backend(), or None
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastedit_backend", default=None)


class BackendError(RuntimeError):
    """No backend can serve a call (or the forced one cannot)."""


@dataclass
class BackendStatus:
    name: str
    usable: bool
    reason: str | None = None          # why not usable (None when usable)
    ops: tuple[str, ...] = field(default_factory=tuple)
    devices: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"usable": self.usable, "reason": self.reason, "ops": list(self.ops), "devices": list(self.devices)}


def _status(name: str) -> BackendStatus:
    if name not in BACKEND_OPS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_ORDER}")
    ops = BACKEND_OPS[name]
    if name == "reference":
        return BackendStatus(name, True, None, ops, ("cpu", "cuda", "any"))
    if name == "cpu":
        why = extension.unavailable_reason()
        if why is None and not extension.has_cpu_ops():
            why = "fastedit._C was built without CPU ops"
        return BackendStatus(name, why is None, why, ops if why is None else (), ("cpu",))
    if name == "cuda":
        why = extension.unavailable_reason()
        if why is None and not extension.has_cuda_ops():
            why = ("fastedit._C was built without CUDA sources (torch is a CPU build; "
                   "rebuild with a CUDA torch or FASTEDIT_FORCE_CUDA=1)")
        if why is None and not torch.cuda.is_available():
            why = "no CUDA device is available"
        return BackendStatus(name, why is None, why, ops if why is None else (), ("cuda",))
    # triton
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed"
    elif not ops:
        why = "no Triton kernels in this version of fastedit"
    elif not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        why = "Triton needs a GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
    else:
        why = None
    return BackendStatus(name, why is None, why, ops if why is None else (), ("cuda",))


def _checked_name(backend, what: str) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_ORDER:
        raise ValueError(f"{what}={backend!r} is not a backend; choose one of {BACKEND_ORDER} (or None for the "
                         "dispatcher's choice)")
    return backend


def forced_backend() -> str | None:
    """The backend ``FASTEDIT_BACKEND`` forces, or None."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKEND_ORDER:
        raise BackendError(f"{ENV_BACKEND}={value!r} is not a backend; choose one of {BACKEND_ORDER}")
    return value


def is_forced(backend: str | None = None) -> bool:
    """Whether the backend of a call is forced: by its ``backend=`` keyword, an enclosing
    :func:`use_backend` or ``FASTEDIT_BACKEND`` (an op's own size rule applies only when not)."""
    return backend is not None or _OVERRIDE.get() is not None or forced_backend() is not None


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Force ``backend`` for every op called inside the block (``None``: the dispatcher's choice
    again, e.g. inside an outer ``use_backend``). Takes precedence over ``FASTEDIT_BACKEND``; an op's
    own ``backend=`` keyword takes precedence over it. Nests, and is restored on exit (also on an
    exception). ``ValueError`` for a name that is not a backend."""
    if backend is not None:
        _checked_name(backend, "use_backend: backend")
    token = _OVERRIDE.set(backend)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def backends() -> dict:
    """What each kernel backend can do here, and why not: ``{"order", "forced", "override",
    "backends": {name: {"usable", "reason", "ops", "devices"}}, "extension": build info}``
    (``forced``: ``FASTEDIT_BACKEND``; ``override``: the enclosing :func:`use_backend`, or None)."""
    return {
        "order": list(BACKEND_ORDER),
        "forced": forced_backend(),
        "override": _OVERRIDE.get(),
        "backends": {name: _status(name).to_dict() for name in BACKEND_ORDER},
        "extension": extension.build_info(),
    }


_CHOICE_CACHE: dict[tuple, str] = {}


def choose_backend(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` if given, else the one forced by
    :func:`use_backend` or ``FASTEDIT_BACKEND``, else the first in priority order that implements
    ``op`` there. :class:`BackendError` when a forced backend cannot serve (or none can).

    Cached per (op, device type, forced backend, FASTEDIT_BACKEND), since it is asked on every
    editor step.
    """
    if backend is not None:
        requested, source = _checked_name(backend, "backend"), "backend="
    else:
        requested, source = _OVERRIDE.get(), "use_backend"
    key = (op, device.type, requested, source, os.environ.get(ENV_BACKEND, ""))
    if key not in _CHOICE_CACHE:
        _CHOICE_CACHE[key] = _choose_backend(op, device, requested, source)
    return _CHOICE_CACHE[key]


def _choose_backend(op: str, device: torch.device, requested: str | None, source: str) -> str:
    if requested is not None:
        forced, why = requested, (f"backend={requested!r}" if source == "backend=" else f"use_backend({requested!r})")
    else:
        forced = forced_backend()
        why = f"{ENV_BACKEND}={forced}" if forced else None
    candidates = (forced,) if forced else BACKEND_ORDER
    reasons = []
    for name in candidates:
        st = _status(name)
        if not st.usable:
            reasons.append(f"{name}: {st.reason}")
            continue
        if op not in st.ops:
            reasons.append(f"{name}: does not implement {op}")
            continue
        if name != "reference" and device.type not in st.devices:
            reasons.append(f"{name}: does not run on {device.type} tensors")
            continue
        return name
    raise BackendError(f"no backend can run {op} on {device.type}{f' ({why})' if why else ''}: " + "; ".join(reasons))
