"""Editable+CNP: edits as condition vectors added to a chain's output (Editable NNs, baselines).

An encoder maps one edit ``(x_e, y_e)`` to a vector ``c``; every later input is run with ``c``
added to the output of the editable chain (``layer3`` of a CIFAR ResNet)::

    h      = chain input activations of x_e         (the unconditioned model's)
    c      = W · ( GAP(ResBlock(h)) + E[y_e] ) + b  (W: C_in → C_out, E: nn.Embedding(classes, C_in))
    f_c(x) = model(x) with chain(·) + c[:, :, None, None]

``ResBlock`` is one ResNet basic block at the chain's input width: conv3×3-BN-ReLU-conv3×3-BN,
plus the identity, then ReLU. The output linear is initialised to zero, so an untrained encoder
gives ``c = 0``: the conditioned model starts as the unmodified one.

Training (:func:`train_cnp`), the Editable Training objective with the edit replaced by the
condition (one forward instead of ``k`` unrolled editor steps)::

    L = L_base + c_edit · L_edit(f_c(x_e), y_e) + c_loc · KL( f(x_batch) ‖ f_c(x_batch) )

with ``L_edit`` the edit constraint ``max_i z_i − z_{y_e}`` (``"constraint"``, the paper's
``max(0, l_e)``, ``l_e ≥ 0`` here) or the cross-entropy (``"ce"``). With ``E`` edits per batch,
batch sample ``i`` is conditioned on edit ``i mod E`` for the locality term (an unbiased estimate of
the mean KL over edits, at the cost of one forward).

An edit (:func:`cnp_edit`) sets the condition; reverting clears it (exact: with no condition the
model's forward is untouched).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._core import eval_mode
from ..constraint import classification_margins

__all__ = ["ConditionEncoder", "ConditionedModel", "train_cnp", "cnp_edit", "CNPEdit", "cnp_evaluate"]


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


def _labels(y, n: int, num_classes: int, device, what: str = "y") -> Tensor:
    if isinstance(y, bool) or not isinstance(y, (int, Tensor)):
        raise TypeError(f"{what} must be an int or an integer tensor, got {type(y).__name__}")
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer class labels, got dtype {y.dtype}")
    y = y.reshape(1).expand(n) if y.dim() == 0 else y
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{what} must hold one label per sample ({n}), got shape {tuple(y.shape)}")
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{what}: label {int(y[bad][0])} is out of range for {num_classes} classes")
    return y.to(torch.int64)


class ConditionEncoder(nn.Module):
    """``(chain input h [B, C_in, H, W], target y [B]) → c [B, C_out]`` (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.in_channels, self.out_channels, self.num_classes = in_channels, out_channels, num_classes
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.embedding = nn.Embedding(num_classes, in_channels)
        self.out = nn.Linear(in_channels, out_channels)
        nn.init.zeros_(self.out.weight)  # c = 0 at init: the wrapped model starts unmodified
        nn.init.zeros_(self.out.bias)

    @classmethod
    def for_model(cls, model: nn.Module, chain: str, example_x: Tensor, num_classes: int | None = None
                  ) -> "ConditionEncoder":
        """An encoder sized for ``model``'s ``chain`` (channels probed with one forward of ``example_x``)."""
        h_in, h_out, logits = _probe(model, chain, example_x[:1])
        if num_classes is None:
            num_classes = int(logits.shape[-1])
        enc = cls(int(h_in.shape[1]), int(h_out.shape[1]), num_classes)
        p = next(model.parameters(), None)
        return enc.to(device=example_x.device, dtype=p.dtype if p is not None else None)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        if h.dim() != 4 or h.shape[1] != self.in_channels:
            raise ValueError(f"the encoder takes chain inputs [B, {self.in_channels}, H, W], got {tuple(h.shape)}")
        z = F.relu(self.bn1(self.conv1(h)))
        z = F.relu(self.bn2(self.conv2(z)) + h)
        z = z.mean(dim=(2, 3)) + self.embedding(y)
        return self.out(z)


def _probe(model: nn.Module, chain: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chain input, chain output and logits of ``model`` on ``x`` (eval mode, no grad)."""
    module = _get_chain(model, chain)
    seen: dict[str, Tensor] = {}

    def pre(_m, args):
        seen.setdefault("in", args[0])

    def post(_m, _args, out):
        seen.setdefault("out", out)

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen["in"], seen["out"], logits


def _get_chain(model: nn.Module, chain: str) -> nn.Module:
    if not isinstance(chain, str):
        raise TypeError(f"chain must be a submodule name, got {type(chain).__name__}")
    try:
        return model.get_submodule(chain)
    except AttributeError:
        tops = [n for n, _ in model.named_children()]
        raise ValueError(f"{type(model).__name__} has no submodule {chain!r}; its children are {tops}") from None


class ConditionedModel(nn.Module):
    """``model`` whose ``chain`` output gets ``+ c`` while a condition is set.

    A forward hook on the chain adds the condition (``[1, C_out]``: every sample; ``[B, C_out]``:
    one per sample of the batch). With no condition set the hook returns nothing, so the outputs
    are bit-identical to the unwrapped model's. The hook lives on ``model``'s chain module until
    :meth:`remove`, so calling ``model`` directly also sees the condition.
    """

    def __init__(self, model: nn.Module, chain: str = "layer3", encoder: ConditionEncoder | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(encoder, nn.Module):
            raise TypeError("encoder must be an nn.Module (e.g. ConditionEncoder.for_model(model, chain, x))")
        self.model = model
        self.encoder = encoder
        self.chain = chain
        self._chain_module = _get_chain(model, chain)
        self._condition: Tensor | None = None
        self._handle = self._chain_module.register_forward_hook(self._add_condition)
        self._post = None  # the fx tail after the chain, built on demand by tail()
        self._post_reason: str | None = None

    # -- the condition --------------------------------------------------------------------------------
    def _add_condition(self, _m, _args, out):
        c = self._condition
        if c is None:
            return None
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[1] != c.shape[1]:
            raise ValueError(f"the chain output {tuple(getattr(out, 'shape', ()))} does not match the condition "
                             f"[*, {c.shape[1]}]")
        if c.shape[0] not in (1, out.shape[0]):
            raise ValueError(f"a per-sample condition for {c.shape[0]} samples met a batch of {out.shape[0]}")
        return out + c.reshape(c.shape + (1,) * (out.dim() - 2))

    @property
    def condition_vector(self) -> Tensor | None:
        return self._condition

    def set_condition(self, c: Tensor | None) -> None:
        """Set ``c`` (``[C_out]``, ``[1, C_out]`` or ``[B, C_out]``); ``None`` clears it."""
        if c is None:
            self._condition = None
            return
        if not isinstance(c, Tensor) or not c.is_floating_point():
            raise TypeError("the condition must be a floating-point tensor")
        c = c.reshape(1, -1) if c.dim() == 1 else c
        out_ch = getattr(self.encoder, "out_channels", None)
        if c.dim() != 2 or (out_ch is not None and c.shape[1] != out_ch):
            raise ValueError(f"the condition must be [C_out] or [B, C_out] with C_out = {out_ch}, "
                             f"got {tuple(c.shape)}")
        p = next(self.model.parameters(), None)
        if p is not None and (c.device != p.device or c.dtype != p.dtype):
            raise ValueError(f"the condition is {c.dtype} on {c.device} but the model is {p.dtype} on {p.device}")
        self._condition = c

    def clear_condition(self) -> None:
        self._condition = None

    @contextlib.contextmanager
    def conditioned(self, c: Tensor | None) -> Iterator["ConditionedModel"]:
        """Run with condition ``c``, restoring the previous one afterwards."""
        old = self._condition
        self.set_condition(c)
        try:
            yield self
        finally:
            self._condition = old

    def remove(self) -> None:
        """Detach the hook from the model's chain (the wrapper is unusable afterwards)."""
        self._handle.remove()

    # -- activations ----------------------------------------------------------------------------------
    def _capture(self, x: Tensor, where: str) -> Tensor:
        """The chain's input (``where="in"``) or unconditioned output (``"out"``) for ``x``; the
        rest of the forward is skipped."""
        box: list[Tensor] = []

        def pre(_m, args):
            box.append(args[0])
            raise _Stop

        def post(_m, _args, out):
            box.append(out)
            raise _Stop

        old, self._condition = self._condition, None
        handle = (self._chain_module.register_forward_pre_hook(pre) if where == "in"
                  else self._chain_module.register_forward_hook(post, prepend=True))
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
            self._condition = old
        if not box:
            raise ValueError(f"the chain {self.chain!r} was not called in the model's forward")
        return box[0]

    def chain_input(self, x: Tensor) -> Tensor:
        return self._capture(x, "in")

    def chain_output(self, x: Tensor) -> Tensor:
        return self._capture(x, "out")

    def condition(self, x_edit: Tensor, y_edit) -> Tensor:
        """The encoder's condition ``[B, C_out]`` for edits ``(x_edit [B, ...], y_edit [B] or int)``
        (the encoder and model in their current modes; gradients recorded if enabled)."""
        if not isinstance(x_edit, Tensor) or x_edit.dim() == 0 or x_edit.shape[0] == 0:
            raise ValueError("x_edit must be a non-empty batch tensor")
        y = _labels(y_edit, x_edit.shape[0], self.encoder.num_classes, x_edit.device, "y_edit")
        return self.encoder(self.chain_input(x_edit), y)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # -- the tail after the chain (fast evaluation) ------------------------------------------------------
    def tail(self, example_x: Tensor | None = None):
        """A module mapping the chain output to the logits (an fx graph of the nodes after the chain),
        or ``None`` when the model cannot be split there (then evaluation re-runs whole forwards).
        Verified bit-exact against the full forward on ``example_x`` when given."""
        if self._post is None and self._post_reason is None:
            self._post, self._post_reason = _tail_after(self.model, self.chain)
            if self._post is not None and example_x is not None:
                with eval_mode(self.model), torch.no_grad():
                    old, self._condition = self._condition, None
                    try:
                        ok = torch.equal(self._post(self.chain_output(example_x)), self.model(example_x))
                    finally:
                        self._condition = old
                if not ok:
                    self._post, self._post_reason = None, "the tail's output differs from the model's"
        return self._post


class _ChainLeaf(fx.Tracer):
    def __init__(self, chain: str):
        super().__init__()
        self.chain = chain

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.chain or super().is_leaf_module(m, qualname)


def _tail_after(model: nn.Module, chain: str):
    try:
        graph = _ChainLeaf(chain).trace(model)
    except Exception as exc:  # untraceable Python in forward
        return None, f"torch.fx could not trace the model: {exc}"
    chain_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == chain]
    if len(chain_nodes) != 1:
        return None, f"the chain is called {len(chain_nodes)} times"
    nodes = list(graph.nodes)
    start = nodes.index(chain_nodes[0])
    new = fx.Graph()
    env = {chain_nodes[0]: new.placeholder("h")}
    for node in nodes[start + 1:]:
        for inp in node.all_input_nodes:
            if inp not in env:
                if inp.op == "get_attr":
                    env[inp] = new.node_copy(inp, lambda n: env[n])
                else:  # the tail reads an activation from before the chain (a skip around it)
                    return None, f"node {node.name} after the chain reads {inp.name} from before it"
        env[node] = new.node_copy(node, lambda n: env[n])
    return fx.GraphModule(model, new), None


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _pair(data, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
        raise TypeError(f"{what} must be a pair (x, y) of tensors")
    x, y = data
    if x.dim() == 0 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same, non-zero number "
                         "of samples")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{what}: y must hold integer labels")
    return x, y.to(torch.int64)


def train_cnp(wrapped: ConditionedModel, train_data, *, steps: int, batch_size: int = 128, lr: float = 1e-3,
              c_edit: float = 0.01, c_loc: float = 0.01, edits_per_batch: int = 1, edit_loss: str = "constraint",
              train_model: bool = False, grad_clip: float | None = 10.0, generator: torch.Generator | None = None,
              progress: bool = False) -> dict[str, list[float]]:
    """Train the condition encoder (and optionally the model) with the objective of the module docstring.

    Args:
        wrapped: the :class:`ConditionedModel` (its encoder is trained in place).
        train_data: ``(x, y)`` tensors on the model's device; batches drawn uniformly with replacement.
        steps: optimisation steps (Adam, ``lr``, gradient-norm clipping at ``grad_clip``).
        batch_size: samples per batch (the locality batch).
        c_edit, c_loc: weights of the edit and locality terms.
        edits_per_batch: edits sampled per batch: the first ``E`` batch samples, with targets drawn
            uniformly from the classes (the paper: one).
        edit_loss: ``"constraint"`` (the edit constraint ``max_i z_i − z_y``) or ``"ce"``.
        train_model: also train the model, with ``L_base`` = cross-entropy on the batch (train
            mode; both passes then update BatchNorm statistics). Default: the model is frozen and
            run in eval mode, ``L_base`` is constant and omitted.
        generator: random generator for the batches and targets.
        progress: a tqdm bar.

    Returns:
        per-step lists: ``loss``, ``edit_loss``, ``loc_loss``, ``base_loss``, ``edit_success``
        (share of the step's edits satisfied before the update).
    """
    x, y = _pair(train_data, "train_data")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("edits_per_batch", edits_per_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if edit_loss not in ("constraint", "ce"):
        raise ValueError(f"edit_loss must be 'constraint' or 'ce', got {edit_loss!r}")
    model, encoder = wrapped.model, wrapped.encoder
    num_classes = encoder.num_classes
    e = edits_per_batch
    params = [p for p in encoder.parameters() if p.requires_grad]
    if train_model:
        params += [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "edit_loss", "loc_loss", "base_loss", "edit_success")}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="CNP training", leave=False)
        except ImportError:
            bar = None
    flags = [(m, m.training) for m in wrapped.modules()]
    model.train(train_model)
    encoder.train()
    old_condition = wrapped.condition_vector
    wrapped.clear_condition()
    chain = wrapped._chain_module
    try:
        for _ in range(steps):
            idx = torch.randint(x.shape[0], (batch_size,), generator=generator, device="cpu").to(x.device)
            xb, yb = x[idx], y[idx]
            x_e = xb[:e]
            y_e = torch.randint(num_classes, (x_e.shape[0],), generator=generator, device="cpu").to(x.device)
            # the reference pass (no condition) also yields the chain inputs of the edits
            box: list[Tensor] = []
            handle = chain.register_forward_pre_hook(lambda _m, args: box.append(args[0]))
            try:
                with torch.set_grad_enabled(train_model):
                    ref = model(torch.cat([x_e, xb]))
            finally:
                handle.remove()
            h_e = box[0][: x_e.shape[0]]
            ref_b = ref[x_e.shape[0]:]
            base = F.cross_entropy(ref_b, yb) if train_model else ref_b.new_zeros(())
            c = encoder(h_e, y_e)
            assign = torch.arange(batch_size, device=x.device) % x_e.shape[0]
            with wrapped.conditioned(torch.cat([c, c[assign]])):
                out = model(torch.cat([x_e, xb]))
            z_e, z_b = out[: x_e.shape[0]], out[x_e.shape[0]:]
            if edit_loss == "ce":
                l_edit = F.cross_entropy(z_e, y_e)
            else:
                l_edit = classification_margins(z_e, y_e).mean()
            l_loc = F.kl_div(F.log_softmax(z_b, -1), F.log_softmax(ref_b.detach(), -1), log_target=True,
                             reduction="batchmean")
            loss = base + c_edit * l_edit + c_loc * l_loc
            # autograd.grad, not backward: a frozen model's parameters get no .grad
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = None if g is None else g
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            succ = float((z_e.detach().argmax(-1) == y_e).double().mean())
            values = {"loss": loss, "edit_loss": l_edit, "loc_loss": l_loc, "base_loss": base}
            for key, v in values.items():
                stats[key].append(float(v.detach()))
            stats["edit_success"].append(succ)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss'][-1]:.4f}", succ=f"{succ:.2f}")
    finally:
        for p in params:
            p.grad = None
        for m, flag in flags:
            m.training = flag
        wrapped.set_condition(old_condition)
        if bar is not None:
            bar.close()
    return stats


# ------------------------------------------------------------------------------------------------
# edits and evaluation
# ------------------------------------------------------------------------------------------------
@dataclass
class CNPEdit:
    """One CNP edit: the condition it set and whether it made the model predict the target."""

    success: bool
    condition: Tensor
    applied: bool
    _wrapped: ConditionedModel = field(repr=False, default=None)

    def revert(self) -> None:
        """Clear the condition (exact: the model is then the unmodified one)."""
        if self.applied:
            if self._wrapped.condition_vector is self.condition:
                self._wrapped.clear_condition()
            self.applied = False


def cnp_edit(wrapped: ConditionedModel, x: Tensor, y, *, on_failure: str = "keep") -> CNPEdit:
    """Edit by conditioning: compute ``c`` for ``(x [1, ...], y)`` and set it on ``wrapped``.

    Success: the conditioned model predicts ``y`` on ``x``. ``on_failure="revert"`` clears the
    condition of a failed edit (the default keeps it, like a failed edit measured by the protocol).
    Runs in eval mode (modes restored).
    """
    if on_failure not in ("revert", "keep"):
        raise ValueError(f"on_failure must be 'revert' or 'keep', got {on_failure!r}")
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != 1:
        raise ValueError("x must be one input with a batch dimension of 1")
    with eval_mode(wrapped), torch.no_grad():
        c = wrapped.condition(x, y)
        yt = _labels(y, 1, wrapped.encoder.num_classes, x.device)
        with wrapped.conditioned(c):
            success = bool(wrapped(x).argmax(-1)[0] == yt[0])
    result = CNPEdit(success=success, condition=c, applied=False, _wrapped=wrapped)
    if success or on_failure == "keep":
        wrapped.set_condition(c)
        result.condition = wrapped.condition_vector
        result.applied = True
    return result


def cnp_evaluate(wrapped: ConditionedModel, edits, control, *, batch_size: int = 256) -> dict:
    """The paper's protocol for CNP: each edit's condition applied alone, measured on ``control``.

    The control set's chain outputs are computed once and only the tail after the chain is re-run
    per edit (when the model splits there, see :meth:`ConditionedModel.tail`; else whole forwards).

    Returns:
        dict with ``base_error``, ``drawdown``, ``success_rate``, ``flip_rate``, ``split`` (whether the
        tail was used) and per-edit tensors ``errors``, ``success``, ``flips``.
    """
    x_e, y_e = _pair(edits, "edits")
    x_c, y_c = _pair(control, "control")
    num_classes = wrapped.encoder.num_classes
    _labels(y_e, x_e.shape[0], num_classes, x_e.device, "edit label")
    old = wrapped.condition_vector
    wrapped.clear_condition()
    try:
        with eval_mode(wrapped), torch.no_grad():
            tail = wrapped.tail(x_c[:batch_size])
            cs = torch.cat([wrapped.condition(x_e[i:i + batch_size], y_e[i:i + batch_size])
                            for i in range(0, x_e.shape[0], batch_size)])
            z_e = torch.cat([_run_conditioned(wrapped, x_e[i:i + batch_size], cs[i:i + batch_size])
                             for i in range(0, x_e.shape[0], batch_size)])
            success = z_e.argmax(-1) == y_e
            chunks = [x_c[i:i + batch_size] for i in range(0, x_c.shape[0], batch_size)]
            h_c = [wrapped.chain_output(xc) for xc in chunks] if tail is not None else None
            if tail is not None:
                base_pred = torch.cat([tail(h).argmax(-1) for h in h_c])
            else:
                base_pred = torch.cat([wrapped(xc).argmax(-1) for xc in chunks])
            errors, flips = [], []
            for j in range(cs.shape[0]):
                c = cs[j:j + 1]
                if tail is not None:
                    shape = (1, -1) + (1,) * (h_c[0].dim() - 2)
                    pred = torch.cat([tail(h + c.reshape(shape)).argmax(-1) for h in h_c])
                else:
                    with wrapped.conditioned(c):
                        pred = torch.cat([wrapped(xc).argmax(-1) for xc in chunks])
                errors.append((pred != y_c).double().mean())
                flips.append((pred != base_pred).double().mean())
    finally:
        wrapped.set_condition(old)
    base_error = float((base_pred != y_c).double().mean())
    errors_t = torch.stack(errors).cpu()
    flips_t = torch.stack(flips).cpu()
    return {"base_error": base_error, "drawdown": float((errors_t - base_error).mean()),
            "success_rate": float(success.double().mean()), "flip_rate": float(flips_t.mean()),
            "split": tail is not None, "errors": errors_t, "success": success.cpu(), "flips": flips_t}


def _run_conditioned(wrapped: ConditionedModel, x: Tensor, c: Tensor) -> Tensor:
    with wrapped.conditioned(c):
        return wrapped(x)
