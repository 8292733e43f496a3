"""Deep k-Nearest Neighbours (Papernot & McDaniel, 2018) and its label-flip edits (Editable NNs §4.1).

Embedding
    Each named layer's output (a forward hook), flattened per sample, for every training sample.
    Neighbours are found by exact search (``torch.cdist`` over chunks), Euclidean distance,
    nearest first; equal distances are ordered by training index (a stable sort), so the
    neighbour lists are deterministic.

Prediction
    With ``N_l(x)`` the ``k`` nearest training points of ``x`` in layer ``l`` and ``ℓ`` the stored
    training labels, the class scores are the neighbour label counts over all ``L`` layers::

        count(x, j) = Σ_l |{i ∈ N_l(x) : ℓ_i = j}|,     α(x, j) = L·k − count(x, j)

    (``α`` is the DkNN nonconformity). ``predict(x) = argmax_j count(x, j)`` (= argmin α), ties to
    the smallest class index, like ``torch.argmax``. With a calibration set ``(x_c, y_c)``, the
    p-value of class ``j`` is ``p_j(x) = |{c : α(x_c, y_c) ≥ α(x, j)}| / |calib|``;
    ``credibility(x)`` is the p-value of the predicted class. Calibration neighbours are stored, so
    the calibration scores follow the current (possibly edited) labels.

Edit rule (the paper's: flip labels of nearest neighbours until the prediction is the target)
    For an input ``x`` and target ``t``, candidates are visited rank by rank, and within a rank
    layer by layer in the order of ``layers``::

        for r = 1..k:  for l = 1..L:  i = the r-th nearest neighbour of x in layer l

    A candidate already labelled ``t`` (originally, or relabelled earlier in this edit) is skipped.
    Otherwise its label becomes ``t`` and the prediction on ``x`` is re-checked; the edit stops at
    the first relabel after which ``predict(x) == t``. So the edit relabels the shortest prefix of
    that sequence that suffices (none if ``x`` is already predicted as ``t``); relabelling every
    candidate gives ``count(x, t) = L·k``, so an edit always succeeds. Only the stored labels change
    (the network is never touched); :meth:`DkNNEdit.revert` restores them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .._core import eval_mode
from .._validate import check_count

__all__ = ["DeepKNN", "DkNNEdit", "dknn_evaluate"]


def _check_pair(data, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
        raise TypeError(f"{what} must be a pair (x, y) of tensors")
    x, y = data
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{what}: y must hold integer class labels, got dtype {y.dtype}")
    if x.dim() == 0 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same, non-zero number "
                         "of samples")
    return x, y.to(torch.int64)


@dataclass
class DkNNEdit:
    """One DkNN edit: the training points relabelled (in relabel order) and their old labels."""

    success: bool
    target: int
    indices: Tensor       # int64 [n], training indices in the order they were relabelled
    old_labels: Tensor    # int64 [n]
    applied: bool
    _dknn: "DeepKNN" = field(repr=False, default=None)

    @property
    def num_relabelled(self) -> int:
        return int(self.indices.numel())

    def revert(self) -> None:
        """Restore the relabelled points' labels (exact; a no-op once reverted). Revert edits in
        the reverse order of applying them when they overlap."""
        if not self.applied:
            return
        self._dknn.labels[self.indices] = self.old_labels
        self.applied = False


class DeepKNN:
    """Deep k-NN classifier over the embeddings of ``layers`` of ``model`` (see the module docstring).

    Args:
        model: the network; run in eval mode (its modes restored) and never modified.
        layers: names of submodules (``model.get_submodule``) whose outputs are the embeddings.
        train_x, train_y: the training set to embed and its integer labels ``[N]``.
        k: neighbours per layer (``1 ≤ k ≤ N``); the paper's DkNN used 75.
        batch_size: samples per forward pass and per distance chunk.
        calib: optional calibration set ``(x, y)`` for p-values / credibility.
        num_classes: the class count; default: the model's output width.

    Raises:
        ValueError / TypeError: unknown layer names, a layer whose output is not a batched tensor,
        bad ``k``, labels out of range, mismatched data.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], train_x: Tensor, train_y: Tensor, k: int = 75, *,
                 batch_size: int = 256, calib=None, num_classes: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one submodule")
        names = dict(model.named_modules())
        for name in layers:
            if name not in names:
                raise ValueError(f"layers: {type(model).__name__} has no submodule {name!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers has duplicates: {layers}")
        self.model = model
        self.layers = layers
        self.batch_size = check_count("batch_size", batch_size)
        train_x, train_y = _check_pair((train_x, train_y), "train data")
        embs, logits = self._embed_with_logits(train_x)
        if num_classes is None:
            if logits is None:
                raise ValueError("num_classes is needed: the model did not return logits [batch, classes]")
            num_classes = int(logits.shape[-1])
        self._init(embs, train_y, k, num_classes)
        if calib is not None:
            self.calibrate(calib)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, train_embeddings: Sequence[Tensor], train_y: Tensor, k: int = 75, *,
                        num_classes: int, batch_size: int = 256) -> "DeepKNN":
        """A DkNN over precomputed per-layer embeddings ``[N, D_l]`` (no model: predict with
        :meth:`predict_embeddings` / :meth:`neighbors_of_embeddings`)."""
        self = cls.__new__(cls)
        self.model, self.layers = None, [f"layer{i}" for i in range(len(train_embeddings))]
        self.batch_size = check_count("batch_size", batch_size)
        if not train_embeddings:
            raise ValueError("train_embeddings must hold at least one layer")
        embs = [e.reshape(e.shape[0], -1) if e.dim() else e for e in train_embeddings]
        _, train_y = _check_pair((embs[0], train_y), "train data")
        self._init(embs, train_y, k, num_classes)
        return self

    def _init(self, embs: list[Tensor], train_y: Tensor, k: int, num_classes: int) -> None:
        n = train_y.shape[0]
        for e in embs:
            if e.dim() != 2 or e.shape[0] != n:
                raise ValueError(f"every embedding must be [N={n}, D], got {tuple(e.shape)}")
        self.k = check_count("k", k)
        if self.k > n:
            raise ValueError(f"k = {k} exceeds the {n} training samples")
        self.num_classes = check_count("num_classes", num_classes)
        bad = (train_y < 0) | (train_y >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"training label {int(train_y[bad][0])} is out of range for {self.num_classes} classes")
        self.embeddings = embs
        self.labels = train_y.clone()              # edited in place by edits
        self.original_labels = train_y.clone()
        self._calib_nbrs = None
        self._calib_y = None

    def _embed_with_logits(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        modules = dict(self.model.named_modules())
        chunks: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        logits_chunks: list[Tensor] = []
        captured: dict[str, Tensor] = {}

        def hook_for(name):
            def hook(_m, _inp, out):
                if not isinstance(out, Tensor) or out.dim() == 0:
                    raise TypeError(f"layer {name!r} returned {type(out).__name__}; DkNN needs a batched tensor")
                captured[name] = out.detach().reshape(out.shape[0], -1)
            return hook

        handles = [modules[name].register_forward_hook(hook_for(name)) for name in self.layers]
        try:
            with eval_mode(self.model), torch.no_grad():
                for start in range(0, x.shape[0], self.batch_size):
                    captured.clear()
                    out = self.model(x[start:start + self.batch_size])
                    for name in self.layers:
                        if name not in captured:
                            raise ValueError(f"layer {name!r} was not called in the model's forward")
                        chunks[name].append(captured[name])
                    if isinstance(out, Tensor) and out.dim() == 2:
                        logits_chunks.append(out.detach())
        finally:
            for h in handles:
                h.remove()
        logits = torch.cat(logits_chunks) if len(logits_chunks) == len(chunks[self.layers[0]]) else None
        return [torch.cat(chunks[name]) for name in self.layers], logits

    def embed(self, x: Tensor) -> list[Tensor]:
        """Per-layer embeddings ``[B, D_l]`` of ``x`` (the model in eval mode)."""
        if self.model is None:
            raise ValueError("this DkNN was built from embeddings; pass embeddings to the *_embeddings methods")
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty batch tensor")
        return self._embed_with_logits(x)[0]

    # -- neighbours ------------------------------------------------------------------------------------
    def neighbors_of_embeddings(self, embs: Sequence[Tensor]) -> Tensor:
        """Indices ``[B, L, k]`` of the ``k`` nearest training points per layer, nearest first
        (ties: smaller training index first)."""
        embs = list(embs)
        if len(embs) != len(self.embeddings):
            raise ValueError(f"expected embeddings for {len(self.embeddings)} layers, got {len(embs)}")
        b = embs[0].shape[0]
        out = torch.empty(b, len(embs), self.k, dtype=torch.int64, device=self.labels.device)
        for li, (q, train) in enumerate(zip(embs, self.embeddings)):
            q = q.reshape(q.shape[0], -1)
            if q.shape[0] != b or q.shape[1] != train.shape[1]:
                raise ValueError(f"layer {li}: query embeddings {tuple(q.shape)} do not match the training "
                                 f"embeddings [*, {train.shape[1]}] / batch {b}")
            q = q.to(train.dtype)
            for start in range(0, b, self.batch_size):
                d = torch.cdist(q[start:start + self.batch_size], train)
                # a stable sort orders equal distances by index; topk would not
                idx = torch.sort(d, dim=1, stable=True).indices[:, :self.k]
                out[start:start + idx.shape[0], li] = idx.to(out.device)
        return out

    def neighbors(self, x: Tensor) -> Tensor:
        """Indices ``[B, L, k]`` of the nearest training points of ``x`` in every layer."""
        return self.neighbors_of_embeddings(self.embed(x))

    def counts_from_neighbors(self, nbrs: Tensor, labels: Tensor | None = None) -> Tensor:
        """Neighbour label counts ``[B, C]`` (int64) summed over layers, under ``labels``
        (default: the current labels)."""
        labels = self.labels if labels is None else labels
        lab = labels[nbrs.reshape(nbrs.shape[0], -1)]  # [B, L*k]
        counts = torch.zeros(nbrs.shape[0], self.num_classes, dtype=torch.int64, device=lab.device)
        return counts.scatter_add_(1, lab, torch.ones_like(lab))

    def predict_from_neighbors(self, nbrs: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.counts_from_neighbors(nbrs, labels).argmax(1)

    # -- prediction ------------------------------------------------------------------------------------
    def counts(self, x: Tensor) -> Tensor:
        return self.counts_from_neighbors(self.neighbors(x))

    def nonconformity(self, x: Tensor) -> Tensor:
        """``α(x, j) = L·k − count(x, j)``, ``[B, C]``."""
        return len(self.embeddings) * self.k - self.counts(x)

    def predict(self, x: Tensor) -> Tensor:
        """Predicted classes ``[B]``: argmax of the neighbour counts (ties: smallest class)."""
        return self.predict_from_neighbors(self.neighbors(x))

    def predict_embeddings(self, embs: Sequence[Tensor]) -> Tensor:
        return self.predict_from_neighbors(self.neighbors_of_embeddings(embs))

    def predict_proba(self, x: Tensor) -> Tensor:
        """Neighbour label frequencies ``count / (L·k)``, ``[B, C]`` (rows sum to 1)."""
        c = self.counts(x)
        return c.to(torch.get_default_dtype()) / (len(self.embeddings) * self.k)

    def calibrate(self, calib) -> None:
        """Store a calibration set's neighbours and labels for p-values."""
        x, y = _check_pair(calib, "calib")
        bad = (y < 0) | (y >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"calibration label {int(y[bad][0])} is out of range for {self.num_classes} classes")
        self._calib_nbrs = self.neighbors(x)
        self._calib_y = y.to(self.labels.device)

    def p_values(self, x: Tensor) -> Tensor:
        """DkNN p-values ``[B, C]`` (float64): share of calibration samples at least as nonconforming."""
        if self._calib_nbrs is None:
            raise ValueError("p-values need a calibration set: pass calib=(x, y) or call calibrate()")
        lk = len(self.embeddings) * self.k
        cal_counts = self.counts_from_neighbors(self._calib_nbrs)
        alpha_cal = lk - cal_counts.gather(1, self._calib_y[:, None]).squeeze(1)  # [N_cal]
        alpha = lk - self.counts(x)                                                # [B, C]
        ge = (alpha_cal[None, None, :] >= alpha[:, :, None]).sum(-1)
        return ge.to(torch.float64) / alpha_cal.shape[0]

    def credibility(self, x: Tensor) -> Tensor:
        """The p-value of the predicted class, ``[B]``."""
        p = self.p_values(x)
        return p.gather(1, self.predict(x)[:, None]).squeeze(1)

    # -- editing ------------------------------------------------------------------------------------------
    def edit(self, x: Tensor, y_target) -> DkNNEdit:
        """Relabel nearest neighbours of one input ``x`` (``[1, ...]``) until it is predicted as
        ``y_target`` (the order is in the module docstring). In place on :attr:`labels`."""
        if self.model is None:
            raise ValueError("this DkNN was built from embeddings; use edit_embeddings")
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != 1:
            raise ValueError(f"x must be one input with a batch dimension of 1, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return self.edit_neighbors(self.neighbors(x)[0], y_target)

    def edit_embeddings(self, embs: Sequence[Tensor], y_target) -> DkNNEdit:
        """:meth:`edit` for one input given by its per-layer embeddings (each ``[1, D_l]``)."""
        if any(e.shape[0] != 1 for e in embs):
            raise ValueError("edit_embeddings takes one input: every embedding must be [1, D]")
        return self.edit_neighbors(self.neighbors_of_embeddings(embs)[0], y_target)

    def edit_neighbors(self, nbrs: Tensor, y_target) -> DkNNEdit:
        """The edit rule on one input's neighbour table ``[L, k]``."""
        if isinstance(y_target, Tensor):
            if y_target.numel() != 1 or y_target.is_floating_point() or y_target.dtype == torch.bool:
                raise TypeError("y_target must be one integer class label")
            y_target = int(y_target)
        if isinstance(y_target, bool) or not isinstance(y_target, int):
            raise TypeError(f"y_target must be an int class label, got {type(y_target).__name__}")
        if not 0 <= y_target < self.num_classes:
            raise ValueError(f"y_target {y_target} is out of range for {self.num_classes} classes")
        if nbrs.dim() != 2 or nbrs.shape != (len(self.embeddings), self.k):
            raise ValueError(f"nbrs must be [L={len(self.embeddings)}, k={self.k}], got {tuple(nbrs.shape)}")
        # simulate on the host: the candidates are few (L·k) and each relabel moves
        # multiplicity(i) votes from the old class to the target
        table = nbrs.cpu()
        labels_host = self.labels[table.reshape(-1)].cpu().reshape(table.shape)
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        counts.scatter_add_(0, labels_host.reshape(-1), torch.ones(labels_host.numel(), dtype=torch.int64))
        mult: dict[int, int] = {}
        for i in table.reshape(-1).tolist():
            mult[i] = mult.get(i, 0) + 1
        label_of = {i: int(lab) for i, lab in zip(table.reshape(-1).tolist(), labels_host.reshape(-1).tolist())}
        chosen: list[int] = []
        old: list[int] = []
        success = int(counts.argmax()) == y_target
        if not success:
            for r in range(self.k):
                for li in range(table.shape[0]):
                    i = int(table[li, r])
                    if label_of[i] == y_target:
                        continue
                    chosen.append(i)
                    old.append(label_of[i])
                    counts[label_of[i]] -= mult[i]
                    counts[y_target] += mult[i]
                    label_of[i] = y_target
                    if int(counts.argmax()) == y_target:
                        success = True
                        break
                if success:
                    break
        dev = self.labels.device
        indices = torch.tensor(chosen, dtype=torch.int64, device=dev)
        old_labels = torch.tensor(old, dtype=torch.int64, device=dev)
        self.labels[indices] = y_target
        return DkNNEdit(success=success, target=y_target, indices=indices, old_labels=old_labels, applied=True,
                        _dknn=self)

    def reset_labels(self) -> None:
        """Undo every edit: restore the labels given at construction."""
        self.labels.copy_(self.original_labels)


def dknn_evaluate(dknn: DeepKNN, edits, control, *, edit_neighbors: Tensor | None = None,
                  control_neighbors: Tensor | None = None) -> dict:
    """The paper's protocol for DkNN: each edit applied independently to the unedited labels,
    measured on the control set, then reverted.

    The control set's neighbour tables are computed once (edits change labels, not embeddings),
    so each edit costs one gather-and-count over ``N_control · L · k`` labels.

    Args:
        dknn: the classifier (its current labels are the "before" state).
        edits: ``(x_e, y_e)``; control: ``(x_c, y_c)``.
        edit_neighbors / control_neighbors: precomputed :meth:`DeepKNN.neighbors` tables (optional).

    Returns:
        dict with ``base_error``, ``drawdown`` (mean over edits of error after − before),
        ``success_rate``, ``mean_relabelled``, ``flip_rate``, and per-edit tensors ``errors``,
        ``success``, ``relabelled``, ``flips``.
    """
    x_e, y_e = _check_pair(edits, "edits")
    x_c, y_c = _check_pair(control, "control")
    nb_e = dknn.neighbors(x_e) if edit_neighbors is None else edit_neighbors
    nb_c = dknn.neighbors(x_c) if control_neighbors is None else control_neighbors
    y_c = y_c.to(dknn.labels.device)
    base_pred = dknn.predict_from_neighbors(nb_c)
    base_error = (base_pred != y_c).double().mean().item()
    errors, success, relabelled, flips = [], [], [], []
    for j in range(nb_e.shape[0]):
        e = dknn.edit_neighbors(nb_e[j], int(y_e[j]))
        try:
            pred = dknn.predict_from_neighbors(nb_c)
        finally:
            e.revert()
        errors.append((pred != y_c).double().mean().item())
        flips.append((pred != base_pred).double().mean().item())
        success.append(e.success)
        relabelled.append(e.num_relabelled)
    errors_t = torch.tensor(errors, dtype=torch.float64)
    return {
        "base_error": base_error,
        "drawdown": float((errors_t - base_error).mean()),
        "success_rate": float(torch.tensor(success, dtype=torch.float64).mean()),
        "mean_relabelled": float(torch.tensor(relabelled, dtype=torch.float64).mean()),
        "flip_rate": float(torch.tensor(flips, dtype=torch.float64).mean()),
        "errors": errors_t, "success": torch.tensor(success), "relabelled": torch.tensor(relabelled),
        "flips": torch.tensor(flips, dtype=torch.float64),
    }
