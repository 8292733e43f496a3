"""Safe, lazy loading of the compiled extension ``fastedit._C``, and what it says about itself.

fastedit works without the extension (pure-Python installs, ``FASTEDIT_SKIP_EXTENSION=1`` builds,
broken builds): nothing here imports ``fastedit._C`` until :func:`load` is called, and a failure is
kept as a sentence that :func:`unavailable_reason` returns instead of raising.

Importing ``fastedit._C`` registers its tensor ops with the dispatcher, as
``torch.ops.fastedit.<name>`` (names in :data:`fastedit.ops._table.SCHEMA`). Their Python parts
(fake kernels for ``torch.compile``/meta tensors, autograd formulas) live next to each op, in
``fastedit/ops/<op>.py``; ``fastedit.ops._register_python_parts`` registers them, and both the
extension's own initialisation (csrc/module.cpp) and :func:`load` call it. ``csrc/ops.cpp`` names
``fastedit.ops`` with ``set_python_module``, so torch imports it whenever those parts are needed.

Runtime switch: ``FASTEDIT_NO_EXTENSION=1`` (or ``FASTEDIT_SKIP_EXTENSION=1``) makes :func:`load`
return None without importing the extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from types import ModuleType
from typing import Any

import torch

from ._table import SCHEMA

__all__ = ["load", "unavailable_reason", "build_info", "has_cpu_ops", "has_cuda_ops", "op_exists", "require",
           "DISABLE_ENV_VARS"]

#: Environment variables that disable the extension at run time when set to 1/true/yes/on.
DISABLE_ENV_VARS = ("FASTEDIT_NO_EXTENSION", "FASTEDIT_SKIP_EXTENSION")

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_reason: str | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def op_exists(schema: str) -> bool:
    """Whether ``torch.ops.fastedit.<schema>`` is registered (fastedit._C was imported); imports nothing."""
    try:
        getattr(torch.ops.fastedit, schema).default
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_load() -> tuple[ModuleType | None, str | None]:
    for var in DISABLE_ENV_VARS:
        if _env_flag(var):
            return None, f"disabled at run time by {var}={os.environ[var]}"
    try:
        spec = importlib.util.find_spec("fastedit._C")
    except (ImportError, ValueError) as error:
        spec, find_error = None, error
    else:
        find_error = None
    if spec is None:
        detail = f" ({find_error})" if find_error else ""
        return None, (
            "fastedit._C is not built: the package was installed without its extension "
            "(FASTEDIT_SKIP_EXTENSION=1, or a source tree that was never compiled)"
            f"{detail}; build it with `pip install --no-build-isolation -e .`")
    try:
        module = importlib.import_module("fastedit._C")
    except Exception as error:  # ImportError, OSError (missing libraries), undefined symbols, ...
        return None, (
            f"importing fastedit._C failed ({type(error).__name__}: {error}); it was probably "
            f"built against another torch than the installed {torch.__version__}: rebuild it")
    missing = [name for name in SCHEMA.values() if not op_exists(name)]
    if missing:
        return None, (f"fastedit._C was imported but did not register torch.ops.fastedit."
                      f"{', '.join(missing)}")
    # the extension's initialisation registered the ops' Python parts already; this covers a
    # module that could not (idempotent)
    importlib.import_module("fastedit.ops")._register_python_parts()
    return module, None


def load() -> ModuleType | None:
    """Import ``fastedit._C`` once; return the module, or None when it is unavailable."""
    global _loaded, _module, _reason
    if not _loaded:
        with _lock:
            if not _loaded:
                _module, _reason = _try_load()
                _loaded = True
    return _module


def unavailable_reason() -> str | None:
    """None when the extension is usable, else a sentence saying why not."""
    load()
    return _reason


def require() -> None:
    """``RuntimeError`` saying why when the extension is unavailable (the compiled ops' entry points)."""
    if load() is None:
        raise RuntimeError(f"fastedit._C is unavailable: {_reason}")


def build_info() -> dict[str, Any]:
    """How ``fastedit._C`` was built (see csrc/module.cpp), or {} without the extension."""
    module = load()
    return dict(module.build_info()) if module is not None else {}


def _has_kernel(schema: str, dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastedit::{schema}", dispatch_key))
    except RuntimeError:
        return False


def has_cpu_ops() -> bool:
    """True when the extension is loaded and its ops have CPU kernels."""
    return load() is not None and all(_has_kernel(op, "CPU") for op in SCHEMA.values())


def has_cuda_ops() -> bool:
    """True when the extension was built with its CUDA sources and their kernels are registered.

    This says nothing about whether a GPU is present (see torch.cuda.is_available()).
    """
    return (load() is not None and bool(build_info().get("with_cuda"))
            and all(_has_kernel(op, "CUDA") for op in SCHEMA.values()))
