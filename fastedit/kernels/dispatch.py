"""Backend dispatch: CUDA extension → Triton → CPU extension → reference.

Every backend can say why it cannot serve a call. ``FASTEDIT_BACKEND=reference|cpu|triton|cuda``
forces one backend for everything and fails loudly when it cannot serve.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

from . import extension, reference

BACKEND_ORDER = ("cuda", "triton", "cpu", "reference")
ENV_BACKEND = "FASTEDIT_BACKEND"

# ops each backend implements in this version (the fused editor kernels come with the kernels issue)
_OPS = {
    "cuda": ("edit_constraint", "editor_step", "edit_metrics"),
    "triton": ("editor_step", "edit_metrics"),
    "cpu": ("edit_constraint", "editor_step", "edit_metrics"),
    "reference": ("edit_constraint", "editor_step", "edit_metrics"),
}


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
    ops = _OPS[name]
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
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            why = "triton is not installed"
        elif not ops:
            why = "no Triton kernels in this version of fastedit"
        elif not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            why = "Triton needs a GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
        else:
            why = None
        return BackendStatus(name, why is None, why, ops if why is None else (), ("cuda",))
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_ORDER}")


def forced_backend() -> str | None:
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKEND_ORDER:
        raise BackendError(f"{ENV_BACKEND}={value!r} is not a backend; choose one of {BACKEND_ORDER}")
    return value


def backends() -> dict:
    """What each kernel backend can do here, and why not: ``{"order", "forced", "backends": {name:
    {"usable", "reason", "ops", "devices"}}, "extension": build info}``."""
    return {
        "order": list(BACKEND_ORDER),
        "forced": forced_backend(),
        "backends": {name: _status(name).to_dict() for name in BACKEND_ORDER},
        "extension": extension.build_info(),
    }


_CHOICE_CACHE: dict[tuple, str] = {}


def choose_backend(op: str, device: torch.device) -> str:
    """The first backend in priority order that implements ``op`` on ``device`` (or the forced one).

    Cached per (op, device type, FASTEDIT_BACKEND), since it is asked on every editor step.
    """
    key = (op, device.type, os.environ.get(ENV_BACKEND, ""))
    if key not in _CHOICE_CACHE:
        _CHOICE_CACHE[key] = _choose_backend(op, device)
    return _CHOICE_CACHE[key]


def _choose_backend(op: str, device: torch.device) -> str:
    forced = forced_backend()
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
    raise BackendError(f"no backend can run {op} on {device.type}"
                       f"{f' ({ENV_BACKEND}={forced})' if forced else ''}: " + "; ".join(reasons))


def edit_constraint(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``max_i logits[b, i] − logits[b, target[b]]`` per row, through the chosen backend.

    Differentiable on every backend, also under ``torch.func`` transforms. The compiled op takes
    ``[B, C]``; other shapes go to the reference.
    """
    name = choose_backend("edit_constraint", logits.device)
    if name == "reference" or logits.dim() != 2:
        return reference.edit_constraint(logits, target)
    return extension.edit_constraint(logits, target)
