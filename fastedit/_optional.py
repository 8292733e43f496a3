"""Optional dependencies: the core needs only torch and numpy; figures, datasets, saved deltas and HF
models need the extras of ``pyproject.toml``. :func:`require` imports one and, when it is missing,
says which extra installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

#: the extra that installs each optional top-level module
EXTRAS = {"matplotlib": "plots", "sklearn": "plots", "PIL": "data", "safetensors": "io", "transformers": "hf"}
_PACKAGES = {"sklearn": "scikit-learn", "PIL": "pillow"}


def require(module: str, what: str, extra: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``; an ``ImportError`` naming ``what`` needs it and the extra to
    install (``extra``, else the module's usual one) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = extra or EXTRAS.get(top)
        hint = f"pip install 'fastedit[{extra}]'" if extra else f"pip install {_PACKAGES.get(top, top)}"
        raise ImportError(f"{what} needs {_PACKAGES.get(top, top)}, which is not installed: {hint}") from exc
