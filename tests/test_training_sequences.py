"""Editable Training (fastedit.training) on sequence models and fused attention.

1. Meta-gradients against an independent, naive unrolled reference written here (the sequence
   analogue of ``naive_objective`` in test_training.py): full-model forwards through
   ``torch.func.functional_call``, ``torch.autograd.grad(create_graph=True)``, the editor rules,
   the hyper-parameter transforms and the sequence losses written out again (token cross-entropy,
   per-token KL over the labelled positions, the TokenTargets margin, the SequenceRanking score),
   explicit Python early stopping. Float64. Models: a tiny transformer LM (bidirectional: split by
   torch.fx; causal, with a sliced mask that fx cannot trace: the whole model at every step) editing
   the last block's feed-forward or the head, and a GRU encoder-decoder editing the decoder GRU or
   the output layer. Edits given per batch, ``fe.TokenTargets`` and ``fe.SequenceRanking``; the batch
   target ``fe.TokenTargets``. The objective, each loss term and the gradients of every model
   parameter and of every raw editor hyper-parameter must agree to 1e-8 relative, by default and
   with ``rematerialize=True``, ``closed_form=False`` and ``early_exit=False`` (those variants agree
   with each other to 1e-12).
2. Fused attention: a float32 ``nn.TransformerEncoder`` classifier with a padding mask (dropout 0.1,
   train mode; eval-mode fast paths available) and a tiny HF BERT with ``attn_implementation="sdpa"``:
   ``loss.backward()`` works (the inner steps' second order goes through the math SDPA backend; a
   fused CPU kernel has no double backward), finite gradients, the editor's parameter gets one.
3. Edits sampled from a token batch: reproducible under ``torch.manual_seed``, one labelled position
   of one batch row each, a token in ``[0, V)``.
4. Bad input: clear errors, parameters and modes unchanged.
5. A short training loop on the tiny LM, then ``et.editor()`` with ``fe.edit``.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastedit as fe
from fastedit.edit import EditTarget
from test_edit import assert_identical, snapshot

F64 = torch.float64
V, D, T = 11, 8, 5  # vocabulary, width, sequence length of the tiny models
K = 5               # inner steps in the meta-gradient tests
IGNORE = -100
RTOL, ATOL = 1e-8, 1e-12  # against the reference; between fastedit's own variants: 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only cost synchronisation on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Embedding + positions, two post-norm transformer blocks (dropout 0), a token head: [B, T, V].
    ``causal``: an additive causal mask sliced to the input length (torch.fx cannot trace the slice,
    so the whole model runs at every editor step)."""

    def __init__(self, causal: bool = False, dtype=F64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.3 * torch.randn(8, D))
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
                                     for _ in range(2)])
        self.head = nn.Linear(D, V)
        self.causal = causal
        self.register_buffer("mask", torch.triu(torch.full((8, 8), float("-inf")), 1))
        self.to(dtype)

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.emb(tokens) + self.pos[:t]
        for layer in self.layers:
            h = layer(h, src_mask=self.mask[:t, :t] if self.causal else None)
        return self.head(h)


class Seq2Seq(nn.Module):
    """GRU encoder-decoder: ``forward(src [B, S], dec_in [B, T]) -> [B, T, V]``."""

    def __init__(self, dtype=F64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.src_emb = nn.Embedding(V, D)
        self.encoder = nn.GRU(D, D, batch_first=True)
        self.dec_emb = nn.Embedding(V, D)
        self.decoder = nn.GRU(D, D, batch_first=True)
        self.fc = nn.Linear(D, V)
        self.to(dtype)

    def forward(self, src, dec_in):
        _, h = self.encoder(self.src_emb(src))
        out, _ = self.decoder(self.dec_emb(dec_in), h)
        return self.fc(out)


LM_FF = ["layers.1.linear1", "layers.1.linear2"]  # the last block's feed-forward


# ------------------------------------------------------------------------------------------------
# an independent reference
# ------------------------------------------------------------------------------------------------
def _aligned(z, labels, causal):
    return (z[:, :-1], labels[:, 1:]) if causal else (z, labels)


def naive_token_ce(z, labels, causal):
    """Mean over the labelled positions of −log p(label)."""
    z, labels = _aligned(z, labels, causal)
    mask = labels != IGNORE
    logp = torch.log_softmax(z, -1)[mask]              # [M, V]
    return -logp.gather(1, labels[mask][:, None]).mean()


def naive_token_kl(z_ref, z_edit, labels, causal):
    """Mean over the labelled positions of KL(softmax(z_ref) ‖ softmax(z_edit))."""
    z_ref, lab = _aligned(z_ref, labels, causal)
    z_edit, _ = _aligned(z_edit, labels, causal)
    mask = lab != IGNORE
    log_p, log_q = torch.log_softmax(z_ref[mask], -1), torch.log_softmax(z_edit[mask], -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def naive_token_margin(z, labels, causal):
    """One edit of one row: max over its labelled positions of (max_v z − z_label)."""
    z, labels = _aligned(z, labels, causal)
    values = [z[0, t].max() - z[0, t, labels[0, t]] for t in range(labels.shape[1]) if labels[0, t] != IGNORE]
    return torch.stack(values).max()


def naive_ranking_margin(z, labels, causal):
    """One group (desired row first): max over alternatives of score − score(desired), score = mean
    log-probability of a row's labelled tokens."""
    z, labels = _aligned(z, labels, causal)
    scores = []
    for r in range(z.shape[0]):
        logp = torch.log_softmax(z[r], -1)
        picked = [logp[t, labels[r, t]] for t in range(labels.shape[1]) if labels[r, t] != IGNORE]
        scores.append(torch.stack(picked).mean())
    return torch.stack(scores[1:]).max() - scores[0]


def _sigmoid(r):
    return 1.0 / (1.0 + torch.exp(-r))


def naive_hparams(learned: fe.LearnableEditor) -> dict:
    hp = dict(learned.fixed)
    for raw_name, value in learned.named_parameters():
        if raw_name == "log_lr":
            hp["lr"] = torch.exp(value)
        elif raw_name == "logit_beta":
            hp["beta"] = _sigmoid(value)
        else:
            raise AssertionError(f"no reference transform for {raw_name}")
    return hp


def naive_step(kind, hp, theta, grads, state, t):
    if kind is fe.GD:
        return [p - hp["lr"] * g for p, g in zip(theta, grads)], state
    if kind is fe.RMSProp:  # s₁ = g², s ← β·s + (1−β)·g², θ ← θ − lr·g/√(s + eps)
        s = [g * g for g in grads] if t == 1 else [hp["beta"] * si + (1 - hp["beta"]) * g * g
                                                  for si, g in zip(state, grads)]
        return [p - hp["lr"] * g / torch.sqrt(si + hp["eps"]) for p, g, si in zip(theta, grads, s)], s
    raise AssertionError(f"no reference rule for {kind}")


def naive_objective(et: fe.EditableTraining, inputs: tuple, target: fe.TokenTargets, edit_inputs: tuple,
                    edit_target):
    """Obj = L_base + c_edit·L_edit + c_loc·L_loc from scratch on ``et.model`` (one forward of the
    batch in the model's own mode; edits in eval mode; L_loc's reference detached)."""
    model, names, kind = et.model, et.param_names, et.learned_editor.kind
    flags = [m.training for m in model.modules()]
    params = dict(model.named_parameters())

    def full(theta, inp, own_mode):
        for m, f in zip(model.modules(), flags):
            m.training = f if own_mode else False
        try:
            return functional_call(model, {**params, **dict(zip(names, theta))}, inp)
        finally:
            for m, f in zip(model.modules(), flags):
                m.training = f

    z_base = model(*inputs)
    loss_base = naive_token_ce(z_base, target.labels, target.causal)
    z_ref = z_base.detach()
    hp = naive_hparams(et.learned_editor)
    labels, causal = edit_target.labels, edit_target.causal
    if isinstance(edit_target, fe.SequenceRanking):
        n, margin = edit_target.num_candidates, naive_ranking_margin
    else:
        n, margin = 1, naive_token_margin
    theta0 = [params[nm] for nm in names]

    edits, locs, steps, success = [], [], [], []
    for e in range(labels.shape[0] // n):
        rows = tuple(v[e * n:(e + 1) * n] for v in edit_inputs)

        def constraint(theta):
            return margin(full(theta, rows, own_mode=False), labels[e * n:(e + 1) * n], causal)

        theta, state, t = theta0, None, 0
        for _ in range(et.max_steps):
            if constraint(theta).item() <= 0:
                break
            grads = torch.autograd.grad(constraint(theta), theta, create_graph=True)
            t += 1
            theta, state = naive_step(kind, hp, theta, grads, state, t)
        final = constraint(theta)
        edits.append(F.relu(final))
        steps.append(t)
        success.append(final.item() <= 0)
        locs.append(naive_token_kl(z_ref, full(theta, inputs, own_mode=True), target.labels, target.causal))
    loss_edit, loss_loc = torch.stack(edits).mean(), torch.stack(locs).mean()
    objective = loss_base + et.c_edit * loss_edit + et.c_loc * loss_loc
    info = dict(loss_base=loss_base.item(), loss_edit=loss_edit.item(), loss_loc=loss_loc.item(), steps=steps,
                success=success)
    return objective, info


def grads_of(loss, module):
    named = list(module.named_parameters())
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


# ------------------------------------------------------------------------------------------------
# data: a token batch and edits that are violated at the start (so each takes steps)
# ------------------------------------------------------------------------------------------------
def _labels_with_holes(tokens, g, causal):
    labels = tokens.clone()
    holes = torch.rand(labels.shape, generator=g) < 0.3
    labels[holes] = IGNORE
    labels[:, 1 if causal else 0] = tokens[:, 1 if causal else 0]  # every row keeps a labelled position
    if causal:
        labels[:, 0] = IGNORE  # never compared after the shift
    return labels


def lm_data(model, kind, g):
    """``(inputs, batch target, edit_inputs, edit_target)`` for TinyLM."""
    causal = model.causal
    tokens = torch.randint(0, V, (6, T), generator=g)
    batch = fe.TokenTargets(_labels_with_holes(tokens, g, causal), causal=causal)
    if kind == "tokens":
        edit_tokens = torch.randint(0, V, (2, T), generator=g)
        with torch.no_grad():
            pred = model.eval()(edit_tokens).argmax(-1)
        model.train()
        labels = torch.full((2, T), IGNORE)
        # row 0: one position, row 1: two positions; each label differs from the model's prediction
        for r, positions in ((0, [2]), (1, [1, 3])):
            for p in positions:
                labels[r, p + int(causal)] = (pred[r, p] + 1 + r + p) % V
        return (tokens,), batch, (edit_tokens,), fe.TokenTargets(labels, causal=causal)
    # ranking: 2 groups of 3 candidate sequences, the model's lowest-scoring one put first (desired)
    cands = torch.randint(0, V, (6, T), generator=g)
    labels = cands.clone()
    if causal:
        labels[:, 0] = IGNORE
    else:
        labels[:, 0] = IGNORE  # a "prompt" position
    ranking = fe.SequenceRanking(labels, 3, causal=causal)
    with torch.no_grad():
        scores = ranking.scores(model.eval()(cands)).reshape(2, 3)
    model.train()
    order = torch.cat([torch.roll(torch.arange(3), -int(scores[i].argmin())) + 3 * i for i in range(2)])
    return (tokens,), batch, (cands[order],), fe.SequenceRanking(labels[order], 3, causal=causal)


def s2s_data(model, kind, g):
    """``(inputs, batch target, edit_inputs, edit_target)`` for Seq2Seq (dec_in = BOS 0 + labels[:-1])."""
    def dec_in(y):
        return torch.cat([torch.zeros(y.shape[0], 1, dtype=y.dtype), y[:, :-1]], 1)

    src = torch.randint(1, V, (6, 4), generator=g)
    y = torch.randint(1, V, (6, T), generator=g)
    batch = fe.TokenTargets(_labels_with_holes(y, g, False))
    if kind == "tokens":
        e_src = torch.randint(1, V, (2, 4), generator=g)
        e_y = torch.randint(1, V, (2, T), generator=g)
        with torch.no_grad():
            pred = model.eval()(e_src, dec_in(e_y)).argmax(-1)
        model.train()
        labels = torch.full((2, T), IGNORE)
        for r, positions in ((0, [3]), (1, [0, 2])):
            for p in positions:
                labels[r, p] = (pred[r, p] + 1 + r + p) % V
        return (src, dec_in(y)), batch, (e_src, dec_in(e_y)), fe.TokenTargets(labels)
    e_src = torch.randint(1, V, (2, 4), generator=g).repeat_interleave(3, 0)  # one source per group
    cands = torch.randint(1, V, (6, T), generator=g)
    ranking = fe.SequenceRanking(cands, 3)
    with torch.no_grad():
        scores = ranking.scores(model.eval()(e_src, dec_in(cands))).reshape(2, 3)
    model.train()
    order = torch.cat([torch.roll(torch.arange(3), -int(scores[i].argmin())) + 3 * i for i in range(2)])
    cands = cands[order]
    return (src, dec_in(y)), batch, (e_src, dec_in(cands)), fe.SequenceRanking(cands, 3)


# (model, params, constraint, editor, learned hyper-parameters, expected split method)
CASES = [
    ("lm", LM_FF, "tokens", fe.RMSProp(0.1), ("beta",), "fx"),
    ("lm", "head", "ranking", fe.GD(0.03), ("lr",), "fx"),
    ("lm", LM_FF, "ranking", fe.RMSProp(0.01), ("lr", "beta"), "fx"),
    ("lm-causal", "head", "tokens", fe.GD(0.03), ("lr",), "none"),
    ("lm-causal", LM_FF, "ranking", fe.RMSProp(0.03), ("beta",), "none"),
    ("s2s", "decoder", "tokens", fe.RMSProp(0.03), ("beta",), "fx"),
    ("s2s", "fc", "ranking", fe.RMSProp(0.03), ("lr", "beta"), "fx"),
    ("s2s", "decoder", "ranking", fe.GD(0.3), ("lr",), "fx"),
]
CASE_IDS = [f"{m}-{p if isinstance(p, str) else 'ff'}-{c}-{e.name}-{'+'.join(learn)}" for m, p, c, e, learn, _ in CASES]

VARIANTS = [dict(), dict(rematerialize=True), dict(closed_form=False), dict(early_exit=False),
            dict(rematerialize=True, closed_form=False)]


def build_case(case):
    name, params, kind, editor, learn, _ = case
    g = torch.Generator().manual_seed(11)
    if name.startswith("lm"):
        model = TinyLM(causal=name == "lm-causal")
        data = lm_data(model, kind, g)
    else:
        model = Seq2Seq()
        data = s2s_data(model, kind, g)
    model.train()
    kwargs = dict(params=params, editor=editor, max_steps=K, c_edit=0.7, c_loc=3.0, learn=learn)
    return model, data, kwargs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_meta_gradient_matches_naive_unrolled_reference(case):
    start, (inputs, target, edit_inputs, edit_target), kwargs = build_case(case)
    split = EditTarget.build(copy.deepcopy(start).eval(), kwargs["params"], inputs=inputs).split
    assert split.method == case[-1], split.reason

    ref_et = fe.EditableTraining(copy.deepcopy(start), **kwargs)
    ref_obj, info = naive_objective(ref_et, inputs, target, edit_inputs, edit_target)
    ref_grads = grads_of(ref_obj, ref_et)
    # every edit takes two or more steps (RMSProp's beta enters at the second)
    assert min(info["steps"]) >= 2, info
    assert info["loss_loc"] > 1e-6 and info["loss_base"] > 0, info
    assert set(ref_grads) == {f"model.{n}" for n, _ in start.named_parameters()} | {
        f"learned_editor.{n}" for n, _ in ref_et.learned_editor.named_parameters()}
    for n, g in ref_grads.items():
        assert g is not None, n
        if n.startswith("learned_editor."):
            assert g.abs() > 1e-8, f"{n}: the test would not see a wrong hyper-parameter gradient"

    num_edits = len(info["steps"])
    first = None
    for variant in VARIANTS:
        where = ", ".join(f"{k}={v}" for k, v in variant.items()) or "default"
        et = fe.EditableTraining(copy.deepcopy(start), **kwargs, **variant)
        loss, stats = et(inputs, target, edit_inputs, edit_target)
        grads = grads_of(loss, et)
        assert loss.dtype == F64
        torch.testing.assert_close(loss, ref_obj.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")
        for key in ("loss_base", "loss_edit", "loss_loc"):
            assert stats[key].item() == pytest.approx(info[key], rel=RTOL, abs=ATOL), (key, where)
        assert stats["edit_steps"].item() == pytest.approx(sum(info["steps"]) / num_edits, abs=1e-9), where
        assert stats["edit_success"].item() == pytest.approx(sum(info["success"]) / num_edits, abs=1e-9), where
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            assert g is not None, (n, where)
            torch.testing.assert_close(g, ref_grads[n], rtol=RTOL, atol=ATOL, msg=lambda m: f"{n} ({where}): {m}")
        if first is None:
            first = (loss.detach(), grads)
        else:
            torch.testing.assert_close(loss.detach(), first[0], rtol=1e-12, atol=1e-14)
            for n, g in grads.items():
                torch.testing.assert_close(g, first[1][n], rtol=1e-12, atol=1e-14, msg=lambda m: f"{n}: {m}")
