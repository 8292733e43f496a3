"""Editable Training at transformer scale: time and peak memory of one training step of a GPT-2-shaped
language model, against a plain step, same run.

Configuration (default ``--preset cpu``): ``transformers.GPT2LMHeadModel(GPT2Config(n_layer=12,
n_embd=768, n_head=12, vocab_size=50257))``, 124 M parameters, random weights, dropout 0 (with
``loc_mode="shared"`` dropout would draw other masks for L_base and L_loc), SDPA attention, float32,
train mode; a batch of 4 sequences of 128 random tokens, the batch target ``fe.TokenTargets(x,
causal=True)`` (next-token cross-entropy); editable parameters the last two blocks
(``transformer.h.10``, ``transformer.h.11``; HF models do not trace with fx: the frozen prefix is the
cached module calls of :mod:`fastedit.call_cache`, the suffix blocks 10-11 + ``ln_f`` + the tied LM
head); RMSProp(lr = 1e-3, β = 0.5, ε = 1e-6, learnable lr and β), k = 5, c_edit = c_loc = 0.01; one
edit per batch: one sequence of the batch, one position t in [1, T), a uniformly random target token
there (``fe.TokenTargets`` with one labelled position, causal: the logits at t−1 must put the target
first); a fixed seed, passed explicitly, so every method sees the same batches and edits. Adam
(lr 1e-4) over the model, and one more small Adam per method over its learnable lr and β. One
training step = forward + backward + optimizer step.

``--preset gpu`` (for an H200, not runnable here): n_layer 24, n_embd 2048, n_head 16 (1.31 B
parameters), sequences of 1024 tokens, batch 8, editable ``transformer.h.22``/``h.23``, bf16 autocast
(float32 master weights), CUDA. ``--quick``: a tiny model (2 layers, n_embd 64, 4 heads, 16 tokens;
both blocks editable) for CI and dry runs; ``--preset gpu --quick`` keeps the preset's autocast.

Methods, interleaved (one step of each per repetition, on the same batch and edit), median over the
repetitions after warm-up. They share one model and its Adam (a 124 M-parameter model with Adam state
is 1.5 GB: one copy per method does not fit next to the other jobs); each method's own learnable
hyper-parameters have their own optimizer. For timing it does not matter that the weights move;
the inner steps each method took are recorded.
  1. plain:           next-token cross-entropy of ``model(x)``, backward, Adam step;
  2. fastedit:        ``fe.EditableTraining(..., rematerialize=False)``;
  3. fastedit_remat:  ``fe.EditableTraining(..., rematerialize=True)``;
  4. naive:           written here, like the official code: every inner step a full-model forward of
                      the edit sequence with ``torch.func.functional_call`` (eval mode), the gradient
                      by ``torch.autograd.grad(create_graph=True)``, ``.item()`` per step for early
                      stopping; ``L_loc`` from a full second forward of the batch with the edited
                      parameters (math SDPA in the inner loop: the fused kernels have no double
                      backward);
  5. higher:          ``higher.innerloop_ctx(model, RMSprop(blocks), copy_initial_weights=False)``,
                      the same loop with ``diffopt.step``; lr and α (β) differentiable overrides.
                      torch's RMSprop, not the paper's (s₀ = 0, ε outside the root): its step counts
                      may differ. Not installed or failing: the reason is in the JSON, no numbers.

The floor, from the model's own passes (``arithmetic`` in the JSON; matmul FLOPs per token: a block
b = 24·d² + 4·T·d, the LM head h = 2·d·V, the whole forward F = L·b + h, the suffix S = E·b + h with
E editable blocks, the prefix P = (L−E)·b; a backward costs 2× its forward). A plain step is 3·F·B.
Editable Training adds, per step: (i) L_loc, the suffix forward + backward on the batch with the
edited parameters, 3·S·B, the part no implementation of the objective avoids (``floor_loc``);
(ii) the edit sequence's prefix with grad and its backward, 3·P (one row; the cached-call split
stops its recording at the first editable module); (iii) per inner step the edit sequence's suffix
forward with the head at its labelled position only (``fastedit.kept_logits``: K = 1 of T),
Se = E·b + h·K/T, a vjp to θ, V = Se + h·K/T + 2·E·b, and its backward through the unrolled graph,
≈ 2·V (3·V in all; rematerialisation recomputes the step in backward: 4·V); (iv) the last
constraint evaluation and its backward, 3·Se. For GPT-2 small at T = 128: b ≈ 14.6 M, h ≈ 77.2 M
(the head is 31% of a forward and 73% of the suffix), F ≈ 252 M, S ≈ 106 M (0.42 F), P ≈ 0.58 F,
Se ≈ 0.12 F, V ≈ 0.35 F (0.96 F with the whole head), so with B = 4 and s inner steps,
(12 + 5.07 + 1.73 + 0.35 + 1.05·s) / 12 = 1.60 + 0.088·s without rematerialisation,
1.60 + 0.12·s with it; L_loc alone: 1.42. The optimizer step (memory bound,
outside the count) is in both, so the expected time ratio is (R·t_fwd+bwd + t_opt) / (t_fwd+bwd +
t_opt), with the plain step's measured split. (``--preset gpu``: S ≈ 0.15 F, P ≈ 0.85 F, V ≈ 0.23 F;
B = 8, k = 5 masked steps: 1.41 without, 1.46 with rematerialisation; B = 16: 1.28 / 1.30.) The
suffix forward + backward on the batch is also measured (a separate E-block GPT-2 fed random hidden
states, same shapes: ``suffix_fwd_bwd``).
Targets: ≤ 1.5× a plain step in time, ≤ 1.3× its peak memory with rematerialisation.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the level before the step; on the
CPU as in bench_editable_training.py: ``gc.collect()`` + ``malloc_trim(0)``, reset VmHWM
(``clear_refs``), the peak resident-set increase during one step (separate repetitions after the
timed ones), and torch's own count (``torch.profiler`` memory timeline: peak live tensor bytes above
the step's start, one profiled step each). These are increases over the persistent state (weights
and Adam moments, ``persistent_bytes``; gradients are freed every step, so they are in the peak);
``total_memory_ratio`` compares persistent + peak.

Matmul FLOPs, measured: one step per method under ``torch.profiler(with_flops=True)``, the FLOPs of
``mm``/``addmm``/``bmm``/``baddbmm`` (fused attention kernels are not counted: ~2% of a block at
T = 128) — ``flop_ratio`` is the model's own passes' ratio, the floor of a step's time ratio when
every FLOP costs alike, and ``time_ratio / flop_ratio`` the overhead beyond it.

A breakdown of the fastedit steps (in every timed repetition, extra steps on the same batch): the
real ``EditableTraining`` call with timers wrapped around its ``_run_edit`` (the inner steps and the
last constraint evaluation), ``_kl_to_edited`` (the L_loc forward, which with ``fastedit.locality_kl``
also computes the term's gradient with respect to the logits) and the split's ``prefix`` (the
edit sequence's prefix), so base forward = forward − those; backward; optimizer step.

    python benchmarks/experiments/bench_editable_training_lm.py --device cpu --threads 1 --max-load 1.0 \\
        --out benchmarks/results/bench_editable_training_lm.json
    python benchmarks/experiments/bench_editable_training_lm.py --quick --out /tmp/lm_quick.json
    python benchmarks/experiments/bench_editable_training_lm.py --preset gpu --device cuda --out lm_gpu.json

(``--threads 1`` on a shared 2-core machine: under competing jobs two OpenMP threads wait for each
other at every parallel region, and one run's ET steps came out 12× a plain step; one thread
degrades evenly.)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import pathlib
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastedit as fe
from fastedit.model_io import ModelInputs

if __package__ in (None, ""):  # run as a file: the repository root on the path, for benchmarks.common
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

METHODS = ("plain", "fastedit", "fastedit_remat", "naive", "higher")
ALWAYS = ("plain", "fastedit", "fastedit_remat")
TIME_TARGET, MEMORY_TARGET = 1.5, 1.3

PRESETS = {
    "cpu": dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, seq=128, batch=4, editable_blocks=2,
                autocast="none", repeats=3, warmup=1, memory_repeats=1, alloc_profile=1),
    "gpu": dict(n_layer=24, n_embd=2048, n_head=16, vocab=50257, seq=1024, batch=8, editable_blocks=2,
                autocast="bf16", repeats=5, warmup=2, memory_repeats=2, alloc_profile=0),
}
QUICK = dict(n_layer=2, n_embd=64, n_head=4, seq=16, batch=4, editable_blocks=2, repeats=2, warmup=1,
             memory_repeats=1, alloc_profile=0, threads=1)


# ------------------------------------------------------------------------------------------------
# model, batches, losses
# ------------------------------------------------------------------------------------------------
def build_model(a, device: torch.device, n_layer: int | None = None) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer or a.n_layer, n_embd=a.n_embd, n_head=a.n_head, vocab_size=a.vocab,
                     n_positions=max(1024, a.seq), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(device).train()


@dataclass
class Batch:
    x: torch.Tensor          # [B, T] token ids
    base: fe.TokenTargets    # the batch target: next tokens
    ex: torch.Tensor         # [1, T]: the edit's sequence (a row of x)
    ey: fe.TokenTargets      # one labelled position
    pos: int                 # the labelled position t (the logits at t − 1 must put tok first)
    tok: int


def make_batches(a, n: int, device: torch.device) -> list[Batch]:
    gen = torch.Generator().manual_seed(a.seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)
        j = int(torch.randint(0, a.batch, (1,), generator=gen))
        pos = int(torch.randint(1, a.seq, (1,), generator=gen))
        tok = int(torch.randint(0, a.vocab, (1,), generator=gen))
        labels = torch.full((1, a.seq), -100, dtype=torch.int64)
        labels[0, pos] = tok
        x = x.to(device)
        out.append(Batch(x, fe.TokenTargets(x, causal=True), x[j:j + 1].clone(),
                         fe.TokenTargets(labels.to(device), causal=True), pos, tok))
    return out


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (the HF causal shift), float32."""
    z = logits[:, :-1].float()
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), tokens[:, 1:].reshape(-1))


def token_margin(logits: torch.Tensor, pos: int, tok: int) -> torch.Tensor:
    """l_e of a one-position edit: max_v z − z_tok at the logits that predict position ``pos``."""
    z = logits[0, pos - 1].float()
    return z.max() - z[tok]


def token_kl(ref: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(softmax(ref) ‖ softmax(edited)) over the labelled (shifted) positions."""
    v = ref.shape[-1]
    log_p = F.log_softmax(ref[:, :-1].detach().float().reshape(-1, v), -1)
    log_q = F.log_softmax(edited[:, :-1].float().reshape(-1, v), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def math_sdpa():
    """Scaled-dot-product attention on its math backend: the fused kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_gflop(fn) -> tuple[float | None, str | None]:
    """(GFLOP of the matrix products ``fn()`` runs, by ``torch.profiler(with_flops=True)``, error)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            fn()
        return sum(e.flops for e in prof.key_averages() if e.key in MATMULS and e.flops) / 1e9, None
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        return None, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------
# the methods: step(batch) -> inner steps taken
# ------------------------------------------------------------------------------------------------
class Shared:
    """The model, its Adam, the autocast context and the device, shared by every method."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg, self.device = model, cfg, device
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg["adam_lr"])

    def autocast(self):
        if self.cfg["autocast"] == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def finish(self, *extra_opts):
        for opt in (self.opt, *extra_opts):
            opt.step()
            opt.zero_grad(set_to_none=True)

    def persistent_bytes(self) -> int:
        """Weights and Adam moments (after a first step): what stays allocated between steps."""
        state = [v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return tensor_bytes(self.model.parameters()) + tensor_bytes(state)


class Plain:
    def __init__(self, sh: Shared):
        self.sh = sh

    def step(self, b: Batch, timer=None):
        sh = self.sh
        t0 = time.perf_counter()
        with sh.autocast():
            loss = lm_loss(sh.model(b.x).logits, b.x)
        if timer is not None:
            common.sync(sh.device)
        t1 = time.perf_counter()
        loss.backward()
        if timer is not None:
            common.sync(sh.device)
        t2 = time.perf_counter()
        sh.finish()
        if timer is not None:
            common.sync(sh.device)
            timer.add(fwd=t1 - t0, bwd=t2 - t1, opt=time.perf_counter() - t2)
        return 0


class FastEdit:
    def __init__(self, sh: Shared, rematerialize: bool):
        cfg = sh.cfg
        self.sh = sh
        self.et = fe.EditableTraining(sh.model, params=cfg["params"],
                                      editor=fe.RMSProp(cfg["lr"], beta=cfg["beta"], eps=cfg["eps"]),
                                      max_steps=cfg["k"], c_edit=cfg["c_edit"], c_loc=cfg["c_loc"],
                                      learn=("lr", "beta"), rematerialize=rematerialize).to(sh.device)
        self.hp_opt = torch.optim.Adam(self.et.learned_editor.parameters(), lr=cfg["adam_lr"])

    def step(self, b: Batch):
        with self.sh.autocast():
            loss, stats = self.et(b.x, b.base, edit_x=b.ex, edit_y=b.ey)
        loss.backward()
        self.sh.finish(self.hp_opt)
        return float(stats["edit_steps"])

    def step_breakdown(self, b: Batch, timer: common.Samples):
        """The real step, timers around ``_run_edit``, ``_kl_to_edited`` and the split's ``prefix``."""
        et, device = self.et, self.sh.device
        acc = {"edit_prefix": 0.0, "edit_loop": 0.0, "loc_fwd": 0.0}

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                common.sync(device)
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                common.sync(device)
                acc[name] += time.perf_counter() - t
                return out
            return wrapper

        split = et._split(ModelInputs.of(b.ex))  # the cached split the step will use
        patched = [(et, "_run_edit", "edit_loop"), (et, "_kl_to_edited", "loc_fwd"), (split, "prefix", "edit_prefix")]
        for obj, attr, name in patched:
            setattr(obj, attr, timed(name, getattr(obj, attr)))
        try:
            common.sync(device)
            t0 = time.perf_counter()
            with self.sh.autocast():
                loss, stats = et(b.x, b.base, edit_x=b.ex, edit_y=b.ey)
            common.sync(device)
            t1 = time.perf_counter()
            loss.backward()
            common.sync(device)
            t2 = time.perf_counter()
            self.sh.finish(self.hp_opt)
            common.sync(device)
            t3 = time.perf_counter()
        finally:
            for obj, attr, _ in patched:
                delattr(obj, attr)  # the class's method again
        fwd = t1 - t0
        timer.add(forward=fwd, base_fwd=fwd - sum(acc.values()), **acc, bwd=t2 - t1, opt=t3 - t2,
                  inner_steps=float(stats["edit_steps"]))
        return float(stats["edit_steps"])


class Naive:
    """Full-model forwards per inner step, autograd.grad(create_graph=True), .item() per step."""

    def __init__(self, sh: Shared):
        cfg = sh.cfg
        self.sh = sh
        self.names = [n for n, _ in sh.model.named_parameters()
                      if any(n == p or n.startswith(p + ".") for p in cfg["params"])]
        self.hp = common.RawHParams(cfg["lr"], cfg["beta"]).to(sh.device)
        self.hp_opt = torch.optim.Adam(self.hp.parameters(), lr=cfg["adam_lr"])

    def step(self, b: Batch):
        sh, cfg, model = self.sh, self.sh.cfg, self.sh.model
        with sh.autocast():
            logits = model(b.x).logits
            loss_base = lm_loss(logits, b.x)
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            theta = [params[n] for n in self.names]
            lr, beta = self.hp.values()
            s, steps = None, 0
            model.eval()                                # the edit in eval mode
            try:
                with math_sdpa():
                    for _ in range(cfg["k"]):
                        z = functional_call(model, {**params, **buffers, **dict(zip(self.names, theta))}, (b.ex,))
                        le = token_margin(z.logits, b.pos, b.tok)
                        if le.item() <= 0:              # host sync per step, as the official code
                            break
                        grads = torch.autograd.grad(le, theta, create_graph=True)
                        s = ([g * g for g in grads] if s is None
                             else [beta * si + (1 - beta) * g * g for si, g in zip(s, grads)])
                        theta = [t - lr * g / torch.sqrt(si + cfg["eps"]) for t, g, si in zip(theta, grads, s)]
                        steps += 1
                    else:
                        z = functional_call(model, {**params, **buffers, **dict(zip(self.names, theta))}, (b.ex,))
                        le = token_margin(z.logits, b.pos, b.tok)
            finally:
                model.train()
            if steps:                                   # L_loc: a full second forward of the batch
                edited = functional_call(model, {**params, **buffers, **dict(zip(self.names, theta))}, (b.x,))
                loss_loc = token_kl(logits, edited.logits)
            else:
                loss_loc = loss_base.new_zeros(())
            obj = self.hp.objective(cfg, loss_base, F.relu(le), loss_loc)
        obj.backward()
        sh.finish(self.hp_opt)
        return steps


class Higher:
    def __init__(self, sh: Shared):
        import higher  # noqa: F401  (an ImportError is recorded by the caller)

        cfg = sh.cfg
        self.sh = sh
        theta = [p for n, p in sh.model.named_parameters()
                 if any(n == q or n.startswith(q + ".") for q in cfg["params"])]
        self.inner_opt = torch.optim.RMSprop(theta, lr=cfg["lr"], alpha=cfg["beta"], eps=cfg["eps"])
        self.hp = common.RawHParams(cfg["lr"], cfg["beta"]).to(sh.device)
        self.hp_opt = torch.optim.Adam(self.hp.parameters(), lr=cfg["adam_lr"])

    def step(self, b: Batch):
        import higher

        sh, cfg, model = self.sh, self.sh.cfg, self.sh.model
        steps = 0
        with sh.autocast():
            logits = model(b.x).logits
            loss_base = lm_loss(logits, b.x)
            lr, beta = self.hp.values()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # "Differentiable RMSprop suffers from ..."
                with higher.innerloop_ctx(model, self.inner_opt, copy_initial_weights=False,
                                          override={"lr": [lr], "alpha": [beta]}) as (fmodel, diffopt):
                    fmodel.eval()
                    with math_sdpa():
                        for _ in range(cfg["k"]):
                            le = token_margin(fmodel(b.ex).logits, b.pos, b.tok)
                            if le.item() <= 0:
                                break
                            diffopt.step(le)
                            steps += 1
                        else:
                            le = token_margin(fmodel(b.ex).logits, b.pos, b.tok)
                    fmodel.train()
                    loss_loc = token_kl(logits, fmodel(b.x).logits) if steps else loss_base.new_zeros(())
                    obj = self.hp.objective(cfg, loss_base, F.relu(le), loss_loc)
                    obj.backward()
        sh.finish(self.hp_opt)
        return steps


class SuffixFloor:
    """The floor's measured part: the suffix (E blocks, ln_f, the LM head) forward + backward on the
    batch — a separate E-block GPT-2 of the same widths fed hidden states [B, T, d] with grad (L_loc's
    input is the batch's prefix activations, which need their gradient), KL to a fixed reference."""

    def __init__(self, a, cfg, device):
        self.model = build_model(a, device, n_layer=cfg["editable_blocks"])
        self.sh = Shared(self.model, cfg, device)
        gen = torch.Generator().manual_seed(a.seed + 1)
        self.h = torch.randn(a.batch, a.seq, a.n_embd, generator=gen).to(device)
        with torch.no_grad(), self.sh.autocast():
            self.ref = self.model(inputs_embeds=self.h).logits

    def step(self) -> float:
        h = self.h.clone().requires_grad_()
        common.sync(self.sh.device)
        t = time.perf_counter()
        with self.sh.autocast():
            loss = token_kl(self.ref, self.model(inputs_embeds=h).logits)
        loss.backward()
        common.sync(self.sh.device)
        elapsed = time.perf_counter() - t
        self.model.zero_grad(set_to_none=True)
        return elapsed


# ------------------------------------------------------------------------------------------------
# the arithmetic of the passes
# ------------------------------------------------------------------------------------------------
def arithmetic(a, steps: dict[str, float], split_method: str | None = "call-cache") -> dict:
    """Matmul FLOPs per token of each pass (see the module docstring) and the expected step ratios,
    with each method's inner steps. ``split_method`` is recorded only: both splits run the edit
    sequence's prefix alone (the cached-call recording stops at the first editable module) and its
    backward, 3·P. fastedit's inner steps and last evaluation compute the head at the edit's
    labelled position only (``fastedit.kept_logits``): h·K/T per token, K = 1."""
    d, t, v, L, E = a.n_embd, a.seq, a.vocab, a.n_layer, a.editable_blocks
    b = 24 * d * d + 4 * t * d
    h = 2 * d * v
    full, suffix, prefix = L * b + h, E * b + h, (L - E) * b
    kept = 1 / t                                        # labelled positions of an edit / positions
    edit_suffix = E * b + h * kept                      # the edit sequence's suffix forward, head kept
    step = edit_suffix + h * kept + 2 * E * b           # its forward + vjp to θ
    B = a.batch
    plain = 3 * full * B
    loc = 3 * suffix * B
    edit_prefix = 3 * prefix
    fixed = loc + edit_prefix + 3 * edit_suffix         # L_loc, the edit's prefix, the last evaluation
    out = {
        "flops_per_token": {"block_forward": b, "head_forward": h, "model_forward": full, "suffix_forward": suffix,
                            "prefix_forward": prefix, "inner_step_forward_and_vjp": step},
        "in_model_forwards_of_one_sequence": {"suffix": suffix / full, "prefix": prefix / full,
                                              "edit_suffix": edit_suffix / full, "inner_step": step / full,
                                              "head_share_of_forward": h / full},
        "kept_head_fraction": kept,
        "plain_step": "3·F·B (forward + backward = 2× forward)",
        "edit_prefix": f"3P (split: {split_method})",
        "floor_loc_ratio": (plain + loc) / plain,
        "expected_ratio": {},
        "formula": {
            "fastedit": "(3FB + 3SB + 3P + 3Se + s·3V) / 3FB",
            "fastedit_remat": "(3FB + 3SB + 3P + 3Se + s·4V) / 3FB (each step recomputed in backward)",
            "naive": "(3FB + 3FB + 3F + s·3(F + h + 2Eb)) / 3FB (full forwards; L_loc a full forward + "
                     "backward of the batch)",
        },
    }
    naive_step = full + h + 2 * E * b
    for name, s in steps.items():
        if name in ("fastedit", "fastedit_remat"):
            out["expected_ratio"][name] = (plain + fixed + s * (4 if name.endswith("remat") else 3) * step) / plain
        elif name in ("naive", "higher"):
            out["expected_ratio"][name] = (plain + 3 * full * B + 3 * full + s * 3 * naive_step) / plain
    return out


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--quick", action="store_true", help="a tiny model (CI, dry runs): " + str(QUICK))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    for key in ("n_layer", "n_embd", "n_head", "vocab", "seq", "batch", "editable_blocks", "repeats", "warmup",
                "memory_repeats", "alloc_profile"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"override the preset's {key}")
    ap.add_argument("--autocast", choices=("none", "bf16"), default=None, help="override the preset's autocast")
    ap.add_argument("--params", default=None,
                    help="editable parameters, comma-separated prefixes (default: the last --editable-blocks blocks)")
    ap.add_argument("--steps", type=int, default=5, help="k: the editor's maximum inner steps")
    ap.add_argument("--editor-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated methods ({', '.join(ALWAYS)} always run)")
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="wait (up to --max-wait seconds) for the 1-minute load average to drop below this")
    ap.add_argument("--max-wait", type=float, default=120.0)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    common.apply_preset(args, PRESETS, __file__, argv)
    if args.repeats < 1:
        ap.error("--repeats must be ≥ 1")
    if not 1 <= args.editable_blocks <= args.n_layer:
        ap.error(f"--editable-blocks must be in [1, {args.n_layer}]")
    wanted = set(args.methods.split(",")) | set(ALWAYS)
    unknown = wanted - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    args.methods = [m for m in METHODS if m in wanted]
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.params is None:
        args.params = [f"transformer.h.{i}" for i in range(args.n_layer - args.editable_blocks, args.n_layer)]
    else:
        args.params = [p for p in args.params.split(",") if p]
    return args


def main(argv=None) -> None:
    a = parse(argv)
    t_start = time.perf_counter()
    device = a.device
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    waited = common.wait_for_load(a.max_load, a.max_wait) if device.type == "cpu" else 0.0
    load_before = common.load_average()
    torch.manual_seed(a.seed)
    model = build_model(a, device)
    machine = common.machine_info(device)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = dict(params=a.params, editable_blocks=a.editable_blocks, lr=a.editor_lr, beta=0.5, eps=1e-6, k=a.steps,
               c_edit=0.01, c_loc=0.01, adam_lr=1e-4, autocast=a.autocast)
    sh = Shared(model, cfg, device)
    n_batches = a.warmup + a.repeats + a.memory_repeats + 1
    batches = make_batches(a, n_batches, device)

    builders = {"plain": lambda: Plain(sh), "fastedit": lambda: FastEdit(sh, False),
                "fastedit_remat": lambda: FastEdit(sh, True), "naive": lambda: Naive(sh), "higher": lambda: Higher(sh)}
    methods: dict[str, object] = {}
    errors: dict[str, str] = {}
    for name in METHODS:
        if name not in a.methods:
            errors[name] = "not selected (--methods)"
            continue
        try:
            methods[name] = builders[name]()
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON (e.g. higher not installed)
            errors[name] = f"{type(exc).__name__}: {exc}"
    floor = SuffixFloor(a, cfg, device)

    def run(name, batch):
        try:
            return methods[name].step(batch)
        except Exception as exc:  # noqa: BLE001 - e.g. higher failing with this torch or model: recorded
            errors[name] = f"{type(exc).__name__}: {exc}"
            errors[name + "_traceback"] = traceback.format_exc(limit=8)
            del methods[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    # ---- timed repetitions (interleaved) -----------------------------------------------------------
    times = {name: [] for name in methods}
    cpu_times = {name: [] for name in methods}
    steps_taken = {name: [] for name in methods}
    floor_times, load_during = [], []
    breakdown = {name: common.Samples() for name in ALWAYS}
    print(f"model: {n_params / 1e6:.1f} M parameters, batch {a.batch}×{a.seq}, editable {a.params}, device {device}, "
          f"autocast {a.autocast}; load average before: {load_before}", flush=True)
    bar = common.progress_bar(a.warmup + a.repeats, "timed repetitions")
    for rep in range(a.warmup + a.repeats):
        batch, measured = batches[rep], rep >= a.warmup
        for name in list(methods):
            s, elapsed, cpu = common.timed(lambda: run(name, batch), device)
            if s is not None and measured:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
                steps_taken[name].append(s)
        ft = floor.step()
        if measured:
            floor_times.append(ft)
            # the breakdown: extra steps of the same batch, timers around the phases
            if "plain" in methods:
                methods["plain"].step(batch, timer=breakdown["plain"])
            for name in ("fastedit", "fastedit_remat"):
                if name in methods:
                    methods[name].step_breakdown(batch, breakdown[name])
        load_during.append(common.load_average()[0])
        bar.update()
    bar.close()
    persistent = sh.persistent_bytes()

    # ---- matmul FLOPs of one step per method (torch.profiler's count) ----------------------------------
    flops, flop_errors = {}, {}
    for name in list(methods):
        gflop, err = matmul_gflop(lambda: run(name, batches[a.warmup + a.repeats]))
        if err is None and name in methods:
            flops[name] = gflop
        elif err is not None:
            flop_errors[name] = err

    # ---- peak memory ---------------------------------------------------------------------------------
    mem_method = None
    peaks = {name: [] for name in methods}
    floor_peaks = []
    for rep in range(a.memory_repeats):
        batch = batches[a.warmup + a.repeats + rep]
        for name in list(methods):
            peak, s, mem_method = common.peak_memory_increase(lambda: run(name, batch), device)
            if s is not None:
                peaks[name].append(peak)
        peak, _, _ = common.peak_memory_increase(floor.step, device)
        floor_peaks.append(peak)
    alloc_peaks, alloc_errors = {}, {}
    if device.type == "cpu" and a.alloc_profile:  # torch's own count of tensor bytes (on CUDA the allocator's peak is that already)
        batch = batches[-1]
        for name in list(methods):
            gc.collect()
            peak, s, err = common.torch_alloc_peak(lambda: run(name, batch))
            if err is not None:
                alloc_errors[name] = err
            if s is not None and peak is not None:
                alloc_peaks[name] = (peak, s)
    load_after = common.load_average()

    # ---- table ---------------------------------------------------------------------------------------
    if not times.get("plain"):
        raise SystemExit(f"the plain step failed: {errors.get('plain')}")
    plain_t = statistics.median(times["plain"])
    plain_m = statistics.median(peaks["plain"]) if peaks.get("plain") else None
    plain_a = alloc_peaks.get("plain", (None,))[0]
    table = {}
    for name in METHODS:
        if name not in methods or not times.get(name):
            table[name] = {"error": errors.get(name, "not run")}
            continue
        t = statistics.median(times[name])
        m = statistics.median(peaks[name]) if peaks[name] else None
        table[name] = {
            "seconds_per_step": t, "time_ratio": t / plain_t, "seconds_all": times[name],
            "time_ratio_of_minima": min(times[name]) / min(times["plain"]),  # a check when a load spike hit a median
            "cpu_seconds_per_step": statistics.median(cpu_times[name]),
            "cpu_time_ratio": statistics.median(cpu_times[name]) / statistics.median(cpu_times["plain"]),
            "peak_bytes": m, "memory_ratio": (m / plain_m) if m is not None and plain_m else None,
            "total_memory_ratio": ((persistent + m) / (persistent + plain_m)) if m is not None and plain_m else None,
            "peak_bytes_all": peaks[name],
            "torch_alloc_peak_bytes": alloc_peaks.get(name, (None,))[0],
            "torch_alloc_memory_ratio": (alloc_peaks[name][0] / plain_a) if name in alloc_peaks and plain_a else None,
            "torch_alloc_inner_steps": alloc_peaks.get(name, (None, None))[1],
            "mean_inner_steps": statistics.fmean(steps_taken[name]),
            "matmul_gflop": flops.get(name),
            "flop_ratio": (flops[name] / flops["plain"]) if name in flops and flops.get("plain") else None,
        }
        if table[name]["flop_ratio"]:
            table[name]["time_over_flop_ratio"] = table[name]["time_ratio"] / table[name]["flop_ratio"]
    bd = {name: timer.medians() for name, timer in breakdown.items() if timer}
    floor_t = statistics.median(floor_times)
    early = device.type == "cpu"  # EditableTraining's early_exit="auto": the loop exits on the CPU only
    executed = {name: (row["mean_inner_steps"] if early or name in ("naive", "higher") else float(a.steps))
                for name, row in table.items() if "mean_inner_steps" in row}
    split_desc = _split_method(methods.get("fastedit") or methods.get("fastedit_remat"), batches[0])
    arith = arithmetic(a, executed, split_desc)
    arith["inner_steps_executed"] = executed
    if "plain" in bd:
        fb, opt = bd["plain"]["fwd"] + bd["plain"]["bwd"], bd["plain"]["opt"]
        arith["expected_time_ratio_with_measured_optimizer"] = {
            name: (r * fb + opt) / (fb + opt) for name, r in arith["expected_ratio"].items()}
        arith["floor_loc_time_ratio_with_measured_optimizer"] = (arith["floor_loc_ratio"] * fb + opt) / (fb + opt)
    measured_floor = (plain_t + floor_t) / plain_t
    remat, noremat = table.get("fastedit_remat", {}), table.get("fastedit", {})
    targets = {
        "time_target": TIME_TARGET, "memory_target_remat": MEMORY_TARGET,
        "fastedit_time_ratio": noremat.get("time_ratio"), "fastedit_remat_time_ratio": remat.get("time_ratio"),
        "fastedit_remat_memory_ratio": remat.get("memory_ratio"),
        "fastedit_remat_total_memory_ratio": remat.get("total_memory_ratio"),
        "fastedit_remat_memory_ratio_torch_alloc": remat.get("torch_alloc_memory_ratio"),
        "floor_loc_time_ratio_measured": measured_floor,
        "floor_loc_ratio_arithmetic": arith["floor_loc_ratio"],
        "fastedit_flop_ratio": noremat.get("flop_ratio"), "fastedit_remat_flop_ratio": remat.get("flop_ratio"),
    }
    targets["time_met_remat"] = bool(remat.get("time_ratio") is not None and remat["time_ratio"] <= TIME_TARGET)
    targets["time_met_no_remat"] = bool(noremat.get("time_ratio") is not None and noremat["time_ratio"] <= TIME_TARGET)
    targets["memory_met_remat"] = bool(
        remat.get("memory_ratio") is not None and remat["memory_ratio"] <= MEMORY_TARGET
        and (remat.get("torch_alloc_memory_ratio") is None or remat["torch_alloc_memory_ratio"] <= MEMORY_TARGET))
    analysis = analyse(table, bd, arith, plain_t, floor_t)

    nan = float("nan")
    print()
    print(f"{'method':<16}{'s/step':>9}{'× plain':>9}{'expect':>8}{'FLOP×':>7}{'peak MiB':>10}{'× plain':>9}"
          f"{'total×':>8}{'alloc MiB':>11}{'× plain':>9}{'steps':>7}")
    expect = arith.get("expected_time_ratio_with_measured_optimizer", arith["expected_ratio"])
    for name, row in table.items():
        if "error" in row:
            print(f"{name:<16}  error: {row['error']}")
            continue
        mib = row["peak_bytes"] / 2**20 if row["peak_bytes"] is not None else nan
        amib = row["torch_alloc_peak_bytes"] / 2**20 if row["torch_alloc_peak_bytes"] is not None else nan
        print(f"{name:<16}{row['seconds_per_step']:>9.3f}{row['time_ratio']:>9.2f}{expect.get(name, 1.0):>8.2f}"
              f"{row['flop_ratio'] or nan:>7.2f}{mib:>10.1f}{row['memory_ratio'] or nan:>9.2f}{row['total_memory_ratio'] or nan:>8.2f}"
              f"{amib:>11.1f}{row['torch_alloc_memory_ratio'] or nan:>9.2f}{row['mean_inner_steps']:>7.2f}")
    print(f"persistent (weights + Adam): {persistent / 2**20:.0f} MiB; suffix fwd+bwd on the batch {floor_t:.3f} s: "
          f"L_loc floor {measured_floor:.2f}x measured, {arith['floor_loc_ratio']:.2f}x by the arithmetic")
    for name, d in bd.items():
        print(f"breakdown {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    ok = {True: "met", False: "MISSED"}
    print(f"targets: time ≤ {TIME_TARGET}x with remat {ok[targets['time_met_remat']]}, without "
          f"{ok[targets['time_met_no_remat']]}; memory ≤ {MEMORY_TARGET}x with remat {ok[targets['memory_met_remat']]}")
    for line in analysis:
        print("  - " + line)
    wall = time.perf_counter() - t_start
    print(f"load average after: {load_after}; wall time {wall:.0f} s")

    result = {
        "command": a.command,
        "machine": {**machine, "load_average_before": load_before, "load_average_after": load_after,
                    "load_average_1min_per_repetition": load_during, "waited_for_load_seconds": waited,
                    "note": "2 cores shared with other jobs: a load above ~2 means other processes competed for "
                            "the cores during the measurement (interleaving spreads that over all methods)"},
        "config": {**cfg, "preset": a.preset, "quick": a.quick, "model": "GPT2LMHeadModel (random init, dropout 0)",
                   "n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head, "vocab": a.vocab, "seq": a.seq,
                   "batch": a.batch, "parameters": n_params, "dtype": "float32",
                   "attn_implementation": model.config._attn_implementation,
                   "split": split_desc,
                   "optimizer": f"Adam(lr={cfg['adam_lr']}) over the model (shared by the methods) + Adam over "
                                "each method's learnable lr, beta",
                   "edits": "one per batch: a row of the batch, a position in [1, T), a uniform random token",
                   "early_exit": "on (CPU)" if early else "off (masked steps, CUDA)",
                   "warmup": a.warmup, "repeats": a.repeats, "memory_repeats": a.memory_repeats,
                   "alloc_profile": a.alloc_profile, "seed": a.seed},
        "memory_method": {
            "peak_bytes": f"{mem_method}: peak increase during one step over the level before it",
            "persistent_bytes": "weights + Adam moments (allocated between steps; gradients are set to None)",
            "torch_alloc_peak_bytes": "CPU only: torch.profiler memory timeline, peak live tensor bytes above the "
                                      "step's start, one profiled step per method",
            "torch_alloc_errors": alloc_errors if a.alloc_profile else "not measured (--alloc-profile 0)",
        },
        "flop_method": {"matmul_gflop": "torch.profiler(with_flops=True), one step per method: FLOPs of "
                                        + "/".join(MATMULS) + " (fused attention kernels not counted)",
                        "errors": flop_errors},
        "persistent_bytes": persistent,
        "table": table,
        "suffix_fwd_bwd": {"seconds": floor_t, "seconds_all": floor_times,
                           "peak_bytes": statistics.median(floor_peaks) if floor_peaks else None},
        "arithmetic": arith,
        "breakdown_seconds": bd,
        "targets": targets,
        "analysis": analysis,
        "errors": errors,
        "packages": {"higher": common.package_version("higher"), "transformers": common.package_version("transformers")},
        "wall_seconds": wall,
    }
    if a.out:
        common.write_json(a.out, result, indent=2)
        print(f"wrote {a.out}")
    return result


def _split_method(method, batch: Batch) -> str | None:
    if method is None:
        return None
    split = method.et._split(ModelInputs.of(batch.ex))
    return split.method if split.reason is None else f"{split.method} ({split.reason})"


def analyse(table: dict, bd: dict, arith: dict, plain_t: float, floor_t: float) -> list[str]:
    """Where the time of the fastedit steps goes, relative to a plain step and to the arithmetic."""
    lines = []
    p = bd.get("plain")
    expect = arith.get("expected_time_ratio_with_measured_optimizer", arith["expected_ratio"])
    for name in ("fastedit", "fastedit_remat"):
        row, d = table.get(name, {}), bd.get(name)
        if "time_ratio" not in row or d is None or p is None:
            continue
        extra = d["forward"] + d["bwd"] + d["opt"] - (p["fwd"] + p["bwd"] + p["opt"])
        steps = max(d["inner_steps"], 1.0)
        lines.append(
            f"{name}: {row['time_ratio']:.2f}x a plain step (the arithmetic expects {expect[name]:.2f}x with "
            f"{arith['inner_steps_executed'][name]:.2f} inner steps; measured matmul FLOPs "
            f"{row['flop_ratio'] or float('nan'):.2f}x; target {TIME_TARGET}x), "
            f"{row['memory_ratio'] or float('nan'):.2f}x its peak memory increase "
            f"({row['total_memory_ratio'] or float('nan'):.2f}x with the persistent state); breakdown (s): base "
            f"forward {d['base_fwd']:.3f} (plain {p['fwd']:.3f}), edit prefix {d['edit_prefix']:.3f}, edit loop "
            f"{d['edit_loop']:.3f} ({d['inner_steps']:.1f} steps + the last evaluation, {d['edit_loop'] / steps:.3f} "
            f"per step), L_loc forward {d['loc_fwd']:.3f}, backward {d['bwd']:.3f} (plain {p['bwd']:.3f}, "
            f"{d['bwd'] - p['bwd']:+.3f}), optimizer {d['opt']:.3f} (plain {p['opt']:.3f}); extra over plain "
            f"{extra:+.3f} s = {extra / plain_t:+.2f} of a plain step, of which the suffix fwd+bwd on the batch "
            f"(L_loc, unavoidable) is {floor_t:.3f} s = {floor_t / plain_t:+.2f}")
    for name in ("naive", "higher"):
        row, ref = table.get(name, {}), table.get("fastedit_remat", {})
        if "time_ratio" in row and "time_ratio" in ref:
            lines.append(f"{name}: {row['time_ratio']:.2f}x plain (arithmetic {expect.get(name, float('nan')):.2f}x), "
                         f"{row['memory_ratio'] or float('nan'):.2f}x memory, {row['mean_inner_steps']:.2f} steps; "
                         f"{row['seconds_per_step'] / ref['seconds_per_step']:.2f}x the time of fastedit_remat"
                         + (f", {row['peak_bytes'] / ref['peak_bytes']:.2f}x its peak memory"
                            if row["peak_bytes"] and ref["peak_bytes"] else ""))
    return lines


if __name__ == "__main__":
    main()
