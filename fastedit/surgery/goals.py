"""The goals of :func:`fastedit.surgery`: :class:`EditGoal` (``goal="edit"``) and
:class:`PatternGoal` (``goal="pattern"``).

A goal gives the tuner (:class:`~fastedit.surgery.tuner.Tuner`) what it needs, for parameters
``theta`` (the selected parameters' tensors, in order):

- ``batches(unit)``: the batches of one tuning unit (one editor step each);
- ``loss(theta, batch)``: the differentiable loss of one batch, run with grad;
- ``check(theta)``: ``(value, met, metrics)`` on all the inputs, without grad: the goal's loss,
  whether the goal is met, and goal-specific metrics. A non-finite value raises
  :class:`~fastedit.edit.EditError`.

Both goals run the model as :func:`fastedit.surgery` leaves it, in eval mode.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core import EditTarget
from ..constraint import check_label_range
from ..edit import EditError
from ..model_io import ModelInputs

__all__ = ["GOALS", "EditGoal", "PatternGoal"]

GOALS = ("edit", "pattern")


class EditGoal:
    """``goal="edit"``: the edit constraint of :func:`fastedit.edit` on fixed inputs, any constraint.

    With class labels the loss is ``l_e = max_{i≠y} z_i − z_y``, reduced over the samples with
    ``reduction`` (``"max"``: every sample must hold; ``"mean"``); other constraints bring their
    own ``l_e``. The goal is met when ``l_e ≤ 0``. :meth:`batches` yields one batch per unit: a
    unit is one editor step on all of the inputs, whose frozen-prefix activations are computed
    once, here.
    """

    kind = "edit"

    def __init__(self, target: EditTarget, inputs, constraint, reduction: str):
        self.target = target
        mi, c = target.check_inputs(inputs, constraint)
        self.acts = target.checked_prefix(mi)
        # the goal is judged without grad, on activations made for that (cached module calls are bound
        # to a grad mode); the first check validates the constraint against the logits
        acts_eval = self.acts if target.split.grad_mode_free else target.checked_prefix(mi, steps=False)
        self._loss = target.loss_fn(self.acts, c, reduction, mi)
        self._value = target.loss_fn(acts_eval, c, reduction, mi)

    def batches(self, unit: int) -> list:
        return [None]

    def loss(self, theta: Sequence[Tensor], batch) -> Tensor:
        return self._loss(theta)

    def check(self, theta: Sequence[Tensor]) -> tuple[float, bool, dict]:
        with torch.no_grad():
            value = float(self._value(theta))
        if not math.isfinite(value):
            raise EditError(f"non-finite edit constraint ({value}); the model is unchanged")
        return value, value <= 0, {}


class PatternGoal:
    """``goal="pattern"``: inject a data pattern, triggered inputs → target class(es), optionally
    keeping the original predictions on clean inputs.

    Loss of a minibatch ``b``::

        CE(f(x_b), y_b) + clean_weight · KL(f₀(c_b) ‖ f(c_b))

    with ``x`` the triggered inputs, ``y`` their target class (one int for all, or one per input),
    ``c`` the clean inputs and ``f₀`` the original model, whose clean log-probabilities are computed
    once, here (KL averaged per sample, ``batchmean``, computed in float32 at least). Without clean
    inputs the loss is the cross-entropy alone.

    A unit is one epoch (:meth:`batches`): the triggered inputs, shuffled by a ``torch.Generator``
    seeded from ``seed`` and the epoch's number, cut into minibatches of ``batch_size`` (default:
    all at once), each paired with an equal share of the clean inputs (shuffled by the same
    generator); one editor step per minibatch.

    The goal is met when at least ``target_rate`` of all the triggered inputs (default 1.0: every
    one) are predicted as their target, checked on all of ``x`` (:meth:`check`), which also reports
    ``target_rate`` and, with clean inputs, their agreement with ``f₀``, their mean KL and (given
    clean labels) their accuracy.
    """

    kind = "pattern"

    def __init__(self, target: EditTarget, inputs, y, clean, clean_weight: float,
                 batch_size: int | None, seed: int, target_rate: float):
        self.target = target
        mi = ModelInputs.of(inputs)
        if isinstance(y, int) and not isinstance(y, bool) or isinstance(y, Tensor) and y.dim() == 0:
            y = torch.as_tensor(y, device=target.device).expand(mi.num_samples)  # one class for every input
        if not isinstance(y, (int, Tensor)) or isinstance(y, bool):
            raise TypeError(f"a pattern's target must be class labels (an int or an integer tensor), got "
                            f"{type(y).__name__}")
        self.mi, c = target.check_inputs(mi, y)
        self.y = c.labels
        self.clean_weight = clean_weight
        self.seed = seed
        self.target_rate = target_rate
        n = self.mi.num_samples
        self.batch_size = n if batch_size is None else min(batch_size, n)
        self.xc = self.yc = None
        if clean is not None:
            if isinstance(clean, (tuple, list)) and len(clean) == 2:
                xc, yc = clean
            elif isinstance(clean, (Tensor, Mapping)):
                xc, yc = clean, None
            else:
                raise TypeError("clean must be the clean inputs (a tensor or a mapping) or a pair (clean inputs, "
                                "clean labels or None)")
            xc = ModelInputs.of(xc, "clean")
            if yc is not None:
                _, yc = target.check_inputs(xc, yc, "clean")
                yc = yc.labels
            xc.check_device(target.device, "clean")
            self.xc, self.yc = xc, yc
        try:
            num_classes = target.num_classes(self.mi.rows(0, 1))
            if self.xc is not None:
                with torch.no_grad():
                    self.logp0 = self._logp(self._forward(None, self.xc))
        except (TypeError, ValueError):
            raise
        except Exception as exc:
            raise ValueError(f"the model failed on the inputs: {exc}") from exc
        check_label_range(self.y, num_classes, "target label")
        if self.yc is not None:
            check_label_range(self.yc, num_classes, "clean label")
        self.num_batches = math.ceil(n / self.batch_size)

    def _forward(self, theta, inputs: ModelInputs) -> Tensor:
        """Logits of ``inputs`` with ``theta``, in the ambient grad mode (steps with, checks without)."""
        acts = self.target.checked_prefix(inputs, steps=torch.is_grad_enabled())
        return self.target.logits(acts, theta)

    @staticmethod
    def _logp(z: Tensor) -> Tensor:
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        return F.log_softmax(z, dim=-1)

    def batches(self, unit: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + unit)
        device = self.target.device
        order = torch.randperm(self.mi.num_samples, generator=g).to(device)
        trig = list(order.split(self.batch_size))
        if self.xc is None:
            return [(t, None) for t in trig]
        corder = torch.randperm(self.xc.num_samples, generator=g).to(device)
        clean = list(corder.tensor_split(len(trig)))  # an equal share of clean inputs per step
        return list(zip(trig, clean))

    def loss(self, theta: Sequence[Tensor], batch) -> Tensor:
        ti, ci = batch
        z = self._forward(theta, self.mi.take(ti))
        loss = F.cross_entropy(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, self.y[ti])
        if ci is not None and ci.numel() and self.clean_weight > 0:
            logq = self._logp(self._forward(theta, self.xc.take(ci)))
            p0 = self.logp0[ci]
            loss = loss + self.clean_weight * F.kl_div(logq, p0.to(logq.dtype), reduction="batchmean", log_target=True)
        return loss

    def _chunks(self, inputs: ModelInputs) -> list[ModelInputs]:
        n, b = inputs.num_samples, max(self.batch_size, 1)
        return [inputs.rows(lo, min(lo + b, n)) for lo in range(0, n, b)]

    def check(self, theta: Sequence[Tensor]) -> tuple[float, bool, dict]:
        with torch.no_grad():
            hits, ce_sum = 0, 0.0
            for xb, yb in zip(self._chunks(self.mi), self.y.split(max(self.batch_size, 1))):
                z = self._forward(theta, xb)
                zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
                ce_sum += float(F.cross_entropy(zf, yb, reduction="sum"))
                hits += int((z.argmax(-1) == yb).sum())
            n = self.mi.num_samples
            value = ce_sum / n
            metrics = {"target_rate": hits / n}
            if self.xc is not None:
                kl_sum, same, correct = 0.0, 0, 0
                chunks = self._chunks(self.xc)
                b = max(self.batch_size, 1)
                labels = self.yc.split(b) if self.yc is not None else [None] * len(chunks)
                for xb, lb, yb in zip(chunks, self.logp0.split(b), labels):
                    logq = self._logp(self._forward(theta, xb))
                    kl_sum += float(F.kl_div(logq, lb.to(logq.dtype), reduction="sum", log_target=True))
                    pred = logq.argmax(-1)
                    same += int((pred == lb.argmax(-1)).sum())
                    if yb is not None:
                        correct += int((pred == yb).sum())
                nc = self.xc.num_samples
                value += self.clean_weight * kl_sum / nc
                metrics["clean_agreement"] = same / nc
                metrics["clean_kl"] = kl_sum / nc
                if self.yc is not None:
                    metrics["clean_accuracy"] = correct / nc
        if not math.isfinite(value):
            raise EditError(f"non-finite surgery loss ({value}); the model is unchanged")
        met = hits >= math.ceil(self.target_rate * self.mi.num_samples - 1e-9)
        return value, met, metrics
