"""What :func:`fastedit.surgery` returns: :class:`SurgeryResult`, the change it made (a
:class:`~fastedit.sparse_delta.SparseDelta`) with its outcome, and a handle to undo or redo it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..sparse_delta import SparseDelta

__all__ = ["SurgeryResult"]


@dataclass
class SurgeryResult:
    """What :func:`surgery` did. ``applied`` tells whether the model now holds ``delta``'s NEW values."""

    delta: SparseDelta
    success: bool
    steps: int
    loss: float
    initial_loss: float
    method: str
    goal: str
    budget: int
    applied: bool
    param_names: list[str]
    metrics: dict = field(default_factory=dict)
    editor: dict = field(default_factory=dict)
    prefix_used: bool = False
    prefix_reason: str | None = None
    prefix_method: str = "none"
    rows_pruned: list = field(default_factory=list)  # submodules computing only the positions read
    rows_reason: str | None = None
    compiled: bool = False  # the goal's gradient steps through torch.compile (``compile=``)
    compile_reason: str | None = None
    _model: Any = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        """Number of changed scalars (≤ ``budget``)."""
        return self.delta.nnz

    def revert(self, model: nn.Module | None = None) -> None:
        """Write the original values back, bit-exact. Without ``model``: the surgered model (a no-op
        if the change is not applied). With another model: :meth:`SparseDelta.revert` on it.

        Raises ``ValueError`` (and writes nothing) if the model no longer holds the delta's values."""
        if model is None or model is self._model:
            if not self.applied:
                return
            self.delta.revert(self._model, check=True)
            self.applied = False
        else:
            self.delta.revert(model, check=True)

    def apply(self, model: nn.Module | None = None) -> None:
        """Apply the change (again): to the surgered model (a no-op if already applied) or another."""
        if model is None or model is self._model:
            if self.applied:
                return
            self.delta.apply(self._model, check=True)
            self.applied = True
        else:
            self.delta.apply(model, check=True)

    def save(self, path) -> None:
        """Save :attr:`delta` (:meth:`SparseDelta.save`)."""
        self.delta.save(path)

    def to_dict(self) -> dict:
        return {"success": self.success, "steps": self.steps, "loss": self.loss,
                "initial_loss": self.initial_loss, "method": self.method, "goal": self.goal,
                "budget": self.budget, "nnz": self.nnz, "nnz_per_param": self.delta.nnz_per_param,
                "applied": self.applied, "params": list(self.param_names), "metrics": dict(self.metrics),
                "editor": dict(self.editor), "prefix_used": self.prefix_used, "prefix_reason": self.prefix_reason,
                "prefix_method": self.prefix_method, "rows_pruned": list(self.rows_pruned),
                "rows_reason": self.rows_reason, "compiled": self.compiled,
                "compile_reason": self.compile_reason}
