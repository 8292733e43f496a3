"""EWC-regularised editing: the "GD+EWC" / "RMSProp+EWC" baselines of Editable Neural Networks.

An edit minimises, with any editor, the constraint plus an elastic penalty that holds each
editable coordinate near its value before the edit, weighted by the diagonal Fisher information
estimated on training data (Kirkpatrick et al., 2017)::

    J(θ) = l_e(θ) + λ Σ_i F_i (θ_i − θ⁰_i)²

The editor steps on ``∇J`` but the edit stops, and is judged, on the constraint alone: a step is
taken only while ``l_e > 0`` (the penalty is ≥ 0 and would otherwise keep every edit "active").
:func:`fastedit._core.run_edit_loop` judges activity on the loss it differentiates, so this module
runs the shared loop (:func:`fastedit._core.edit_loop`) in its penalised form
(:func:`run_penalised_loop`), which differentiates ``J`` and judges ``l_e``. With ``λ = 0`` it performs exactly :func:`fastedit.edit`'s floating-point operations
(the penalty's gradient is an exact zero added to the constraint's), so the results are bit-identical.

Fisher diagonal (:func:`fisher_diagonal`), per editable coordinate::

    F_i = 1/N Σ_n ( ∂/∂θ_i log p(ŷ_n | x_n, θ) )²

with ``ŷ_n = y_n`` ("empirical" Fisher) or ``ŷ_n`` drawn from the model's predictive distribution
``p(· | x_n, θ)`` ("true" Fisher), in eval mode (BatchNorm on running statistics, dropout off).
Per-sample gradients come from ``torch.func.vmap(grad(...))`` over chunks of the data.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .._core import (
    EditLoopOutput,
    EditTarget,
    check_common,
    commit_params,
    edit_loop,
    eval_mode,
    model_failure,
    resolve_aliases,
    resolve_early_exit,
    split_info,
)
from ..edit import EditError, EditResult
from ..editors import Editor, _compute_dtype, make_editor
from ..model_io import ModelInputs, OutputSpec, read_logits, resolve_output
from ..selection import ParamSpec, select_parameters

__all__ = ["fisher_diagonal", "ewc_edit", "EWCEditResult", "run_penalised_loop", "ewc_penalty"]

FISHER_MODES = ("empirical", "true")


# ------------------------------------------------------------------------------------------------
# Fisher diagonal
# ------------------------------------------------------------------------------------------------
def _check_data(data, what: str = "data") -> tuple[ModelInputs, Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{what} must be a pair (inputs, labels), got {type(data).__name__}")
    x, y = data
    if not isinstance(y, Tensor):
        raise TypeError(f"{what} must be a pair (inputs, labels) with labels an integer tensor")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{what}: the labels must be integer class labels, got dtype {y.dtype}")
    if isinstance(x, Tensor) and x.shape[0] == 0 or y.numel() == 0:
        raise ValueError(f"{what} is empty")
    mi = ModelInputs.of(x, what)
    n = mi.num_samples
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{what}: the inputs hold {n} samples but the labels have shape {tuple(y.shape)}: they must "
                         "hold the same number of samples (one label per sample)")
    if mi.device != y.device:
        raise ValueError(f"{what}: the inputs are on {mi.device} but the labels on {y.device}")
    return mi, y.to(torch.int64)


def _sample_labels(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling from ``softmax(logits)`` with uniforms ``u`` (one per row).

    The label is the first class whose cumulative probability exceeds ``u`` (computed in float64),
    so the draw is a deterministic function of ``u`` that a per-sample loop reproduces exactly.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    idx = torch.searchsorted(cdf, u.double().unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)  # u above a rounded-down total → the last class


def fisher_diagonal(model: nn.Module, data, params: ParamSpec = None, *, batch_size: int = 128,
                    num_samples: int | None = None, mode: str = "empirical",
                    generator: torch.Generator | None = None, output: OutputSpec = None,
                    include_frozen: bool = False) -> dict[str, Tensor]:
    """The diagonal Fisher information of the selected parameters, estimated on ``data``.

    Args:
        model: a classifier (its logits ``[B, C]`` read with ``output``, as in :func:`fastedit.edit`);
            run in eval mode (its modes are restored), never modified (the gradients are functional:
            no ``.grad`` is touched).
        data: ``(inputs, labels)``: training inputs (a tensor ``[N, ...]``, a tuple or a mapping; see
            :func:`fastedit.edit`) and integer labels ``[N]``, on the model's device.
        params, include_frozen: the parameters to estimate it for (as in :func:`fastedit.edit`); ``None``:
            all (frozen ones only with ``include_frozen``).
        batch_size: samples per vectorised chunk (memory: ``batch_size`` copies of the gradients);
            a model that ``torch.func.vmap`` cannot batch is run one sample at a time (warned).
        num_samples: use only the first ``num_samples`` samples (shuffle ``data`` for a random subset).
        mode: ``"empirical"``: gradients of ``log p(y_n | x_n)`` at the true labels; ``"true"``:
            of ``log p(ŷ_n | x_n)`` with ``ŷ_n`` sampled from the model's predictive distribution,
            by inverse CDF from ``u = torch.rand(n, generator=generator)`` drawn once for all samples.
        generator: the random generator for ``"true"`` (default: torch's global one).

    Returns:
        ``{name: F}``, ``F`` with the parameter's shape, dtype and device: the mean over samples of
        the squared per-sample gradient (accumulated in float32, float64 for float64 parameters).

    Raises:
        ValueError / TypeError: a bad mode, batch size, sample count, selection or data.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode must be one of {FISHER_MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x, y = _check_data(data)
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
        x, y = x.rows(0, num_samples), y[:num_samples]
    chosen = select_parameters(model, params, include_frozen=include_frozen)
    names = [n for n, _ in chosen]
    device = chosen[0][1].device
    if x.device != device:
        raise ValueError(f"data is on {x.device} but the parameters are on {device}")
    read = resolve_output(output)
    n = x.num_samples
    u = None
    if mode == "true":
        # drawn on the generator's device (the CPU by default), then moved: the same labels on any device
        u = torch.rand(n, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu").to(device)

    frozen = {name: p.detach() for name, p in chosen}

    def log_lik(theta: dict, xi: ModelInputs, yi: Tensor) -> Tensor:
        """log p(y | x) of one sample (inputs with a sample dimension of 1)."""
        logits = read_logits(functional_call(model, theta, xi.args, xi.kwargs), read)
        return torch.log_softmax(logits, dim=-1)[0].gather(0, yi.reshape(1)).squeeze(0)

    def one(theta, xi, yi):  # under vmap the sample dimension is gone: put it back
        return log_lik(theta, xi.map_tensors(lambda t: t.unsqueeze(0)), yi)

    per_sample_grad = vmap(grad(one), in_dims=(None, _in_dims(x), 0))
    use_vmap = [True]
    sums = {name: torch.zeros(p.shape, dtype=_compute_dtype(p.dtype), device=device) for name, p in chosen}
    with eval_mode(model), torch.no_grad():
        for start in range(0, n, batch_size):
            xb, yb = x.rows(start, min(start + batch_size, n)), y[start:start + batch_size]
            if mode == "true":
                try:
                    logits = read_logits(xb.call(model), read)
                except (TypeError, ValueError):
                    raise
                except Exception as exc:
                    raise model_failure(model, xb, exc) from exc
                if logits.dim() != 2:
                    raise ValueError("the model must return logits [batch, classes]")
                yb = _sample_labels(logits, u[start:start + batch_size])
            with torch.enable_grad():
                try:
                    grads = _per_sample_grads(per_sample_grad, grad(log_lik), frozen, xb, yb, use_vmap)
                except (TypeError, ValueError):
                    raise
                except Exception as exc:
                    raise model_failure(model, xb, exc) from exc
            for name in names:
                g = grads[name].to(sums[name].dtype)
                sums[name].add_((g * g).sum(0))
    return {name: (sums[name] / n).to(p.dtype) for name, p in chosen}


def _in_dims(x: ModelInputs):
    """vmap's ``in_dims`` for inputs: 0 for every tensor leaf, None for the others."""
    args, kwargs = tree_map(lambda v: 0 if isinstance(v, Tensor) else None, (x.args, x.kwargs))
    return ModelInputs(tuple(args), dict(kwargs))


def _per_sample_grads(batched, single, theta, xb: ModelInputs, yb: Tensor, use_vmap: list) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [B, ...]}``: vectorised, or one sample at a time for a model that
    vmap cannot batch (warned once per call of :func:`fisher_diagonal`)."""
    failure = None
    if use_vmap[0]:
        try:
            return batched(theta, xb, yb)
        except Exception as exc:  # noqa: BLE001 - no batching rule for some op of the model?
            failure = exc
    rows = [single(theta, xb.rows(i, i + 1), yb[i]) for i in range(yb.shape[0])]  # a model error raises here
    if failure is not None:
        use_vmap[0] = False
        warnings.warn(f"fisher_diagonal: vmap cannot batch this model ({type(failure).__name__}: "
                      f"{str(failure).splitlines()[0][:150]}); computing per-sample gradients one by one",
                      UserWarning, stacklevel=3)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------
# the penalised loop
# ------------------------------------------------------------------------------------------------
def run_penalised_loop(objective_fn: Callable[[list[Tensor]], tuple[Tensor, Tensor]], params: Sequence[Tensor],
                       editor: Editor, max_steps: int, *, early_exit: bool = False,
                       names: Sequence[str] | None = None) -> EditLoopOutput:
    """:func:`fastedit._core.run_edit_loop` for an objective that differs from the constraint.

    ``objective_fn(theta)`` returns ``(objective, constraint)`` (0-dim each). The editor steps on
    the gradient of ``objective``; a step is taken only while ``constraint > 0`` (and every value so
    far is finite). The returned ``loss`` / ``initial_loss`` / ``success`` refer to the constraint.
    ``params`` are not modified. It is fe.edit's loop itself, so an objective equal to the
    constraint gives its result bit for bit.
    """
    return edit_loop(objective_fn, params, editor, max_steps, early_exit, batched=False, penalised=True,
                      names=names)


def ewc_penalty(theta: Sequence[Tensor], anchor: Sequence[Tensor], fisher: Sequence[Tensor]) -> Tensor:
    """``Σ_i F_i (θ_i − θ⁰_i)²`` over every tensor (0-dim, in the parameters' dtype)."""
    total = None
    for t, a, f in zip(theta, anchor, fisher):
        d = t - a
        term = (f * d * d).sum()
        total = term if total is None else total + term
    return total


@dataclass(eq=False)
class EWCEditResult(EditResult):
    """:class:`fastedit.edit.EditResult` plus the final EWC penalty ``Σ F (θ − θ⁰)²`` (without λ)."""

    penalty: float = 0.0
    ewc_lambda: float = 0.0

    def to_dict(self) -> dict:
        return {**super().to_dict(), "penalty": self.penalty, "ewc_lambda": self.ewc_lambda}


def check_fisher(fisher, names: list[str], params: list[nn.Parameter], what: str) -> list[Tensor]:
    if not isinstance(fisher, Mapping):
        raise TypeError(f"{what} must be a dict name → tensor (e.g. from fisher_diagonal), got {type(fisher).__name__}")
    out = []
    for name, p in zip(names, params):
        if name not in fisher:
            raise ValueError(f"{what} has no entry for the editable parameter {name!r}")
        f = fisher[name]
        if not isinstance(f, Tensor):
            raise TypeError(f"{what}[{name!r}] must be a tensor, got {type(f).__name__}")
        if f.shape != p.shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(f.shape)} but the parameter {tuple(p.shape)}")
        if f.device != p.device:
            raise ValueError(f"{what}[{name!r}] is on {f.device} but the parameter on {p.device}")
        if not f.is_floating_point():
            raise TypeError(f"{what}[{name!r}] must be floating point, got {f.dtype}")
        out.append(f.detach().to(p.dtype))
    return out


def ewc_edit(model: nn.Module, inputs=None, target=None, fisher: Mapping[str, Tensor] | None = None, *,
             ewc_lambda: float, editor: Editor | str = "rmsprop", params: ParamSpec = None, max_steps: int = 10,
             on_failure: str = "revert", reduction: str = "max", anchor: Mapping[str, Tensor] | None = None,
             use_prefix: bool = True, early_exit: bool | str = "auto", output: OutputSpec = None,
             include_frozen: bool = False, x=None, y=None) -> EWCEditResult:
    """Edit ``model`` in place, like :func:`fastedit.edit`, with an EWC penalty in the editor's loss.

    The editor minimises ``l_e(θ) + ewc_lambda · Σ_i F_i (θ_i − θ⁰_i)²`` over the editable
    parameters; the edit stops, and succeeds, when the constraint ``l_e ≤ 0`` (the prediction on
    ``x`` is ``y``), whatever the penalty.

    Args:
        model, inputs, target, editor, params, max_steps, on_failure, reduction, use_prefix, early_exit,
            output, include_frozen: as in :func:`fastedit.edit` (any constraint; ``x``/``y`` still accepted as
            keywords).
        fisher: ``{name: F}`` with a non-negative tensor per editable parameter (its shape/device),
            e.g. from :func:`fisher_diagonal`; extra entries are ignored.
        ewc_lambda: the penalty weight ``λ ≥ 0`` (``0``: exactly :func:`fastedit.edit`).
        anchor: ``{name: θ⁰}``; default: the parameters' values before the edit.

    Returns:
        :class:`EWCEditResult` (``success``, ``steps``, ``loss`` = final ``l_e``, ``penalty``,
        ``applied``, ``revert()``).

    Raises:
        ValueError / TypeError for bad input (as :func:`fastedit.edit`, plus a Fisher or anchor
        that is missing an editable parameter, has the wrong shape/device, or is negative/non-finite;
        a negative or non-finite ``ewc_lambda``); :class:`~fastedit.edit.EditError` for a non-finite
        loss or gradient. In every such case the model is left bit-identical to before.
    """
    inputs, target = resolve_aliases(inputs, target, x, y)
    if fisher is None:
        raise TypeError("missing fisher: a dict name → diagonal Fisher tensor (e.g. from fisher_diagonal)")
    check_common(max_steps, reduction, on_failure)
    if isinstance(ewc_lambda, bool) or not isinstance(ewc_lambda, (int, float)) or not math.isfinite(ewc_lambda) \
            or ewc_lambda < 0:
        raise ValueError(f"ewc_lambda must be a finite number ≥ 0, got {ewc_lambda!r}")
    editor = make_editor(editor)
    with eval_mode(model):
        et = EditTarget.build(model, params, use_prefix, output=output, include_frozen=include_frozen)
        f_list = check_fisher(fisher, et.names, et.params, "fisher")
        if any(bool(((f < 0) | ~torch.isfinite(f)).any()) for f in f_list):
            raise ValueError("fisher must be finite and non-negative")
        if anchor is None:
            a_list = [p.detach().clone() for p in et.params]
        else:
            a_list = check_fisher(anchor, et.names, et.params, "anchor")
        et = et.for_inputs(inputs)
        mi, c = et.check_inputs(inputs, target)
        acts = et.checked_prefix(mi)
        constraint = et.loss_fn(acts, c, reduction, mi)
        lam = float(ewc_lambda)

        def objective(theta: list[Tensor]) -> tuple[Tensor, Tensor]:
            c = constraint(theta)
            # the penalty is computed even for λ = 0: its gradient is then an exact zero, so the
            # steps are fe.edit's bit for bit (tested)
            return c + lam * ewc_penalty(theta, a_list, f_list), c

        out = run_penalised_loop(objective, et.params, editor, max_steps,
                                 early_exit=resolve_early_exit(early_exit, et.device), names=et.names)

    bad_step = int(out.bad_step)
    if bad_step >= 0:
        raise EditError(f"non-finite constraint, penalty or gradient at step {bad_step} of the EWC edit "
                        f"(editor {editor!r}); the model is unchanged")
    success = bool(out.success)
    with torch.no_grad():
        penalty = float(ewc_penalty(out.params, a_list, f_list))
    result = EWCEditResult(success=success, steps=int(out.steps), loss=float(out.loss),
                           initial_loss=float(out.initial_loss), applied=False, param_names=list(et.names),
                           **split_info(et), _params=list(et.params), penalty=penalty, ewc_lambda=lam)
    if success or on_failure == "keep":
        commit_params(result, et.params, out.params, model)
    return result
