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

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_identical, snapshot
from seq_models import GRUSeq2Seq, TransformerClassifier, small_bert
from test_training import assert_gradients_cover
from torch import nn
from torch.func import functional_call

import fastedit as fe
from fastedit._core import EditTarget

F64 = torch.float64
V, D, T = 11, 8, 5  # vocabulary, width, sequence length of the tiny models
K = 5               # inner steps in the meta-gradient tests
IGNORE = -100
RTOL, ATOL = 1e-8, 1e-12  # against the reference; between fastedit's own variants: 1e-12

pytestmark = pytest.mark.usefixtures("one_thread")


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


def seq2seq(seed: int = 0):
    """The GRU encoder-decoder of the s2s cases: vocabulary V, width D, readout ``fc``, float64."""
    torch.manual_seed(seed)
    return GRUSeq2Seq(V, V, D, head="fc").to(F64)


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
    labels[:, 0] = IGNORE  # a "prompt" position (causal: never compared after the shift anyway)
    ranking = fe.SequenceRanking(labels, 3, causal=causal)
    with torch.no_grad():
        scores = ranking.scores(model.eval()(cands)).reshape(2, 3)
    model.train()
    order = torch.cat([torch.roll(torch.arange(3), -int(scores[i].argmin())) + 3 * i for i in range(2)])
    return (tokens,), batch, (cands[order],), fe.SequenceRanking(labels[order], 3, causal=causal)


def s2s_data(model, kind, g):
    """``(inputs, batch target, edit_inputs, edit_target)`` for seq2seq() (dec_in = BOS 0 + labels[:-1])."""
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


# (model, params, constraint, editor, learned hyper-parameters, expected split method); fx treats the
# nn.TransformerEncoderLayer as one leaf, so editing its feed-forward takes the finer cached-call split
CASES = [
    ("lm", LM_FF, "tokens", fe.RMSProp(0.1), ("beta",), "call-cache"),
    ("lm", "head", "ranking", fe.GD(0.03), ("lr",), "fx"),
    ("lm", LM_FF, "ranking", fe.RMSProp(0.01), ("lr", "beta"), "call-cache"),
    ("lm-causal", "head", "tokens", fe.GD(0.03), ("lr",), "call-cache"),
    ("lm-causal", LM_FF, "ranking", fe.RMSProp(0.03), ("beta",), "call-cache"),
    ("s2s", "decoder", "tokens", fe.RMSProp(0.03), ("beta",), "fx"),
    ("s2s", "fc", "ranking", fe.RMSProp(0.03), ("lr", "beta"), "fx"),
    ("s2s", "decoder", "ranking", fe.GD(0.3), ("lr",), "fx"),
]
CASE_IDS = [f"{m}-{p if isinstance(p, str) else 'ff'}-{c}-{e.name}-{'+'.join(learn)}" for m, p, c, e, learn, _ in CASES]

VARIANTS = [dict(), dict(rematerialize=True), dict(closed_form=False), dict(early_exit=False)]


def build_case(case):
    name, params, kind, editor, learn, _ = case
    g = torch.Generator().manual_seed(11)
    if name.startswith("lm"):
        model = TinyLM(causal=name == "lm-causal")
        data = lm_data(model, kind, g)
    else:
        model = seq2seq()
        data = s2s_data(model, kind, g)
    model.train()
    kwargs = dict(params=params, editor=editor, max_steps=K, c_edit=0.7, c_loc=3.0, learn=learn)
    return model, data, kwargs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_meta_gradient_matches_naive_unrolled_reference(case):
    """The edit rows' prefix activations must be cut per edit along each tensor's *sample* dimension:
    the GRU decoder's initial state is ``[num_layers, B, H]`` (the s2s-decoder cases)."""
    start, (inputs, target, edit_inputs, edit_target), kwargs = build_case(case)
    split = EditTarget.build(copy.deepcopy(start).eval(), kwargs["params"], inputs=inputs).split
    assert split.method == case[-1], split.reason

    ref_et = fe.EditableTraining(copy.deepcopy(start), **kwargs)
    ref_obj, info = naive_objective(ref_et, inputs, target, edit_inputs, edit_target)
    ref_grads = grads_of(ref_obj, ref_et)
    # every edit takes two or more steps (RMSProp's beta enters at the second)
    assert min(info["steps"]) >= 2, info
    assert info["loss_loc"] > 1e-6 and info["loss_base"] > 0, info
    assert_gradients_cover(ref_grads, start, ref_et)

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


# ------------------------------------------------------------------------------------------------
# 2. fused attention: second order through the math SDPA backend, first order through the fused one
# ------------------------------------------------------------------------------------------------
def _padded_batch(g, vocab, n=6, s=7, key="tokens", mask_key="src_key_padding_mask", bert=False):
    tokens = torch.randint(1, vocab, (n, s), generator=g)
    lengths = torch.tensor([7, 5, 3, 7, 6, 4][:n])
    valid = torch.arange(s)[None] < lengths[:, None]
    tokens = tokens.masked_fill(~valid, 0)
    return {key: tokens, mask_key: valid.long() if bert else ~valid}


def encoder_classifier(dropout=0.1):
    """``nn.TransformerEncoder`` (2 layers, width 16, learned positions) with a masked mean-pool, float32."""
    torch.manual_seed(0)
    model = TransformerClassifier(20, 16, 3, ff=32, layers=2, dropout=dropout, positions=12)
    g = torch.Generator().manual_seed(2)
    return model, _padded_batch(g, 20), "encoder.layers.1"


def tiny_bert(dropout=0.1):
    transformers = pytest.importorskip("transformers")
    model = small_bert(vocab=30, hidden=16, intermediate=32, max_positions=16, dropout=dropout, num_labels=3,
                       attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(2)
    batch = transformers.BatchEncoding(_padded_batch(g, 30, key="input_ids", mask_key="attention_mask", bert=True))
    return model, batch, "bert.encoder.layer.1"


ATTENTION_MODELS = {"nn.TransformerEncoder": encoder_classifier, "hf-bert-sdpa": tiny_bert}
NESTED_WARNING = "ignore:The PyTorch API of nested tensors is in prototype stage"  # eval-mode fast path


def _rows(inputs, lo, hi):
    return type(inputs)({k: v[lo:hi] for k, v in inputs.items()})


def _wrong_labels(model, inputs):
    """Class labels that the model (eval mode) gets wrong on every row."""
    flags = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        logits = model(**inputs)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    for m, f in zip(model.modules(), flags):
        m.training = f
    return (logits.argmin(-1)).detach()


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("rematerialize", [False, True])
@pytest.mark.parametrize("loc_mode", ["shared", "eval"])
@pytest.mark.parametrize("which", list(ATTENTION_MODELS))
def test_fused_attention_models_train_with_second_order(which, loc_mode, rematerialize):
    model, inputs, params = ATTENTION_MODELS[which]()
    model.train()  # dropout 0.1 in the batch forward (fused SDPA with dropout)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    edit_inputs = _rows(inputs, 1, 3)  # two edits, each of one (padded) row
    edit_y = _wrong_labels(model, edit_inputs)
    flags = [(n, m.training) for n, m in model.named_modules()]
    before = snapshot(model)
    et = fe.EditableTraining(model, params=params, editor=fe.RMSProp(0.01), max_steps=4, c_edit=1.0, c_loc=1.0,
                             learn=("lr", "beta"), loc_mode=loc_mode, rematerialize=rematerialize)
    loss, stats = et(inputs, y, edit_inputs, edit_y)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values()), stats
    assert stats["edit_steps"] >= 2, stats  # beta enters from the second step on
    assert stats["loss_loc"] > 0, stats
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    assert_identical(model, before)
    loss.backward()  # the failure this guards: no derivative for the fused CPU kernel's backward
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    for n, p in et.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    for n, p in et.learned_editor.named_parameters():
        assert p.grad.abs() > 0, f"{n}: the editor's hyper-parameter got no gradient"
    editable = set(et.param_names)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in editable)


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("which", list(ATTENTION_MODELS))
def test_fused_attention_gives_the_numbers_of_the_math_backend(which):
    """Without dropout: the objective and every gradient as with the math SDPA backend everywhere
    (float32 round-off apart), so the fused kernels in the outer forwards change nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = []
    for math_everywhere in (False, True):
        model, inputs, params = ATTENTION_MODELS[which](dropout=0.0)
        model.train()
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        edit_inputs = _rows(inputs, 1, 3)
        edit_y = _wrong_labels(model, edit_inputs)
        et = fe.EditableTraining(model, params=params, editor=fe.RMSProp(0.01), max_steps=4, c_edit=1.0,
                                 c_loc=1.0, learn=("lr", "beta"))
        with sdpa_kernel([SDPBackend.MATH]) if math_everywhere else contextlib.nullcontext():
            loss, stats = et(inputs, y, edit_inputs, edit_y)
            grads = grads_of(loss, et)
        assert stats["edit_steps"] >= 2
        results.append((loss.detach(), grads))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss0, loss1, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.filterwarnings(NESTED_WARNING)
@pytest.mark.parametrize("which", list(ATTENTION_MODELS))
def test_no_grad_evaluation_of_attention_models(which):
    """Evaluating held-out edits without grad (as after training: eval mode, ``torch.no_grad()``,
    where nn.TransformerEncoder takes its nested-tensor fast path) gives the numbers of the call with
    grad. The inner steps need grad (``torch.func.vjp`` enables it), so the edit inputs' cached
    prefix calls must be recorded with grad enabled."""
    model, inputs, params = ATTENTION_MODELS[which](dropout=0.1)
    model.eval()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    edit_inputs = _rows(inputs, 1, 3)
    edit_y = _wrong_labels(model, edit_inputs)
    et = fe.EditableTraining(model, params=params, editor=fe.RMSProp(0.01), max_steps=4, c_edit=1.0, c_loc=1.0)
    out = []
    for no_grad in (False, True):
        with torch.set_grad_enabled(not no_grad):
            loss, stats = et(inputs, y, edit_inputs, edit_y)
        assert loss.requires_grad == (not no_grad)
        out.append({k: v.item() for k, v in stats.items()})
    assert out[0]["edit_steps"] >= 2
    for k in out[0]:
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-4, abs=1e-6), k


# ------------------------------------------------------------------------------------------------
# 3. edits sampled from a token batch
# ------------------------------------------------------------------------------------------------
def _recording(et):
    """Record what ``et._sample_edits`` returns: (edit rows' tokens, [TokenTargets labels])."""
    seen = []
    original = et._sample_edits

    def wrapped(inputs, target, logits):
        rows, edits = original(inputs, target, logits)
        seen.append((rows.args[0].clone(), [(lo, hi, c) for lo, hi, c in edits]))
        return rows, edits

    et._sample_edits = wrapped
    return seen


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_token_edits_are_reproducible_and_target_one_labelled_position(causal):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (8, T), generator=g)
    tokens[:, 0] = torch.arange(8)  # distinct rows: the first token tells which
    labels = _labels_with_holes(tokens, g, causal)
    labels[3] = IGNORE            # a row without labelled positions is never drawn
    labels[5, :] = IGNORE
    labels[5, T - 1] = tokens[5, T - 1]  # a row with a single labelled position
    target = fe.TokenTargets(labels, causal=causal)
    mask = target.mask()          # [B, T'] after the shift
    runs = []
    for seed in (3, 3, 4, 5, 6, 7):
        model = TinyLM(causal=causal)
        model.train()
        et = fe.EditableTraining(model, params="head", editor=fe.RMSProp(0.05), max_steps=3, c_edit=1.0, c_loc=1.0,
                                 num_edits=3)
        seen = _recording(et)
        torch.manual_seed(seed)
        loss, stats = et(tokens, target)
        grads = grads_of(loss, et)
        assert len(seen) == 1
        rows, edits = seen[0]
        assert rows.shape == (3, T) and len(edits) == 3
        drawn = []
        for i, (lo, hi, c) in enumerate(edits):
            assert (lo, hi) == (i, i + 1)
            assert isinstance(c, fe.TokenTargets) and c.causal == causal and c.labels.shape == (1, T)
            row = int(rows[i, 0])                       # which batch row this edit is
            assert torch.equal(rows[i], tokens[row])
            positions = (c.mask()[0]).nonzero().flatten().tolist()
            assert len(positions) == 1, c.labels       # exactly one labelled position...
            p = positions[0]
            assert mask[row, p], (row, p)               # ...which is labelled in that batch row
            token = int(c.aligned_labels()[0, p])
            assert 0 <= token < V
            assert int(c.labels[0, p + int(causal)]) == token and (c.labels != IGNORE).sum() == 1
            drawn.append((row, p, token))
        assert 0 <= stats["edit_steps"] <= 3
        runs.append((loss.item(), {k: v.item() for k, v in stats.items()}, grads, drawn))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1] and runs[0][3] == runs[1][3]
    for n, gr in runs[0][2].items():
        assert torch.equal(gr, runs[1][2][n]), n
    assert len({tuple(r[3]) for r in runs[1:]}) > 1, "different seeds must draw different edits"
    assert len({row for r in runs for row, _, _ in r[3]}) > 2


# ------------------------------------------------------------------------------------------------
# 4. bad input
# ------------------------------------------------------------------------------------------------
def _bad_calls():
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, V, (4, T), generator=g)
    batch = fe.TokenTargets(tokens.clone())
    e_tok = torch.randint(0, V, (2, T), generator=g)
    good = torch.full((2, T), IGNORE)
    good[:, 2] = 3
    empty = good.clone()
    empty[1] = IGNORE
    out_of_range = good.clone()
    out_of_range[0, 1] = V
    ranking_rows = torch.randint(0, V, (3, T), generator=g)
    return [
        ("labels of the wrong length", (tokens, batch, e_tok, fe.TokenTargets(torch.full((2, T + 1), 3))),
         ValueError, r"edit_y.*labels have shape \(\d, 6\).*\[batch, time\]"),
        ("labels for the wrong number of rows", (tokens, batch, e_tok, fe.TokenTargets(torch.full((3, T), 3))),
         ValueError, "edit_y.*3 rows but the inputs 2 samples"),
        # the message must name the caller's row of edit_target (1), not the row inside its one-row edit
        ("an edit without labelled position", (tokens, batch, e_tok, fe.TokenTargets(empty)),
         ValueError, "edit_y.*row 1 has no labelled position"),
        ("a label outside the vocabulary", (tokens, batch, e_tok, fe.TokenTargets(out_of_range)),
         ValueError, "edit_y.*label 11 is out of range for a vocabulary of 11"),
        ("a ranking group that does not fit the edit rows", (tokens, batch, e_tok, fe.SequenceRanking(ranking_rows, 3)),
         ValueError, "edit_y.*3 rows but the inputs 2 samples"),
        ("class labels for a token model", (tokens, batch, e_tok, torch.tensor([1, 2])),
         ValueError, "edit_y.*fe.TokenTargets"),
        ("a ranking as the batch target", (tokens, fe.SequenceRanking(tokens.clone(), 2), e_tok, fe.TokenTargets(good)),
         TypeError, "batch's target must be class labels.*fe.TokenTargets"),
        ("batch labels of the wrong shape", (tokens, fe.TokenTargets(tokens[:, :3].clone()), e_tok, fe.TokenTargets(good)),
         ValueError, r"labels have shape \(4, 3\)"),
        ("batch labels for the wrong number of rows", (tokens, fe.TokenTargets(tokens[:3].clone()), e_tok,
                                                      fe.TokenTargets(good)),
         ValueError, "3 rows but the inputs 4 samples"),
    ]


BAD = _bad_calls()


@pytest.mark.parametrize("rematerialize", [False, True])
@pytest.mark.parametrize("call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(call, rematerialize):
    _, args, exc, match = call
    model = TinyLM()
    model.train()
    model.layers[0].eval()  # a mixed state, which must come back
    flags = [(n, m.training) for n, m in model.named_modules()]
    before = snapshot(model)
    et = fe.EditableTraining(model, params=LM_FF, editor=fe.RMSProp(0.05), max_steps=3, c_edit=1.0, c_loc=1.0,
                             rematerialize=rematerialize)
    editor_before = snapshot(et.learned_editor)
    with pytest.raises(exc, match=match):
        et(*args)
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    assert_identical(model, before)
    assert_identical(et.learned_editor, editor_before)
    assert all(p.grad is None for p in et.parameters())
    # and the module still works
    tokens, batch, e_tok = BAD[0][1][:3]
    good = torch.full((2, T), IGNORE)
    good[:, 2] = 3
    loss, _ = et(tokens, batch, e_tok, fe.TokenTargets(good))
    assert torch.isfinite(loss)


def test_a_ranking_needs_whole_groups():
    with pytest.raises(ValueError, match="do not divide into groups of num_candidates=3"):
        fe.SequenceRanking(torch.zeros(4, T, dtype=torch.int64), 3)


# ------------------------------------------------------------------------------------------------
# 5. a short training loop, then a plain edit with the learned editor
# ------------------------------------------------------------------------------------------------
def test_training_loop_on_a_tiny_lm_then_edit_with_the_learned_editor():
    """20 Adam steps of Editable Training on a "next token = token + 1" task (float32, bidirectional
    TinyLM, batch target TokenTargets with holes, two sampled edits per batch)."""
    model = TinyLM(dtype=torch.float32, seed=1)
    model.train()
    et = fe.EditableTraining(model, params="head", editor=fe.RMSProp(0.05, beta=0.5), max_steps=5, c_edit=1.0,
                             c_loc=1.0, num_edits=2, learn=("lr", "beta"))
    opt = torch.optim.Adam(et.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    history = []
    for _ in range(20):
        tokens = torch.randint(0, V, (16, T), generator=g)
        labels = (tokens + 1) % V
        labels[torch.rand(labels.shape, generator=g) < 0.2] = IGNORE
        labels[:, 0] = (tokens[:, 0] + 1) % V
        loss, stats = et(tokens, fe.TokenTargets(labels))
        assert torch.isfinite(loss)
        assert set(stats) == {"loss_base", "loss_edit", "loss_loc", "edit_success", "edit_steps", "objective"}
        assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in stats.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(et.parameters(), 10)
        opt.step()
        history.append(stats["loss_base"].item())
    assert sum(history[-5:]) < sum(history[:5]) * 0.9, history  # it learns
    assert model.training

    editor = et.editor()
    assert type(editor) is fe.RMSProp and isinstance(editor.lr, float) and isinstance(editor.beta, float)
    assert editor.lr != 0.05 and editor.beta != 0.5  # both moved
    model.eval()
    x = torch.randint(0, V, (1, T), generator=g)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    labels = torch.full((1, T), IGNORE)
    labels[0, 2] = (pred[0, 2] + 3) % V
    before = snapshot(model)
    r = fe.edit(model, x, fe.TokenTargets(labels), editor=editor, params="head", max_steps=50)
    assert r.success and r.steps >= 1 and r.initial_loss > 0 >= r.loss
    with torch.no_grad():
        assert model(x).argmax(-1)[0, 2] == labels[0, 2]
    r.revert()
    assert_identical(model, before)
