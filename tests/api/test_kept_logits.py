"""Token edits computing the language-model head at the labelled positions only (fastedit.kept_logits).

The oracle is the same edit with the whole head (``keep_labelled_logits`` patched to keep nothing):
steps, success and the edited parameters must agree, and a reported success must agree with the
edited model's own forward."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from helpers import assert_identical, snapshot
from seq_models import small_bert, small_gpt2
from torch import nn

import fastedit as fe
import fastedit.kept_logits as kl

edit_module = importlib.import_module("fastedit.edit")  # the module: fastedit.edit is also the function
LAST = "transformer.h.1.mlp"


def prompt_and_labels(model, b=2, t=10, seed=3, ragged=True):
    """Token ids ``[b, t]`` and causal labels on the last positions (row 0 from position 6, the
    others from 8 when ``ragged``), each label differing from the model's own argmax."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=g)
    with torch.no_grad():
        own = model(input_ids=ids).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    for row in range(b):
        start = 6 if (row == 0 or not ragged) else 8
        labels[row, start:] = (own[row, start - 1:t - 1] + 1 + row) % model.config.vocab_size
    return {"input_ids": ids}, labels


def whole_head_edit(model, inputs, target, **kw):
    """The same edit with the head computing every position (the established path)."""
    saved = edit_module.keep_labelled_logits
    edit_module.keep_labelled_logits = lambda *a, **k: (None, None)
    try:
        return fe.edit(model, inputs, target, **kw)
    finally:
        edit_module.keep_labelled_logits = saved


def satisfied(model, inputs, target) -> bool:
    """Whether the model's own forward meets the token target (argmax at every labelled position)."""
    with torch.no_grad():
        z = model(**inputs).logits
    labels = target.labels
    if target.causal:
        z, labels = z[:, :-1], labels[:, 1:]
    mask = labels != -100
    return bool((z.argmax(-1)[mask] == labels[mask]).all())


def assert_same_edit(a, b, model_a, model_b, names):
    assert a.steps == b.steps and a.success == b.success
    assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-5)
    for n in names:
        torch.testing.assert_close(model_a.get_parameter(n), model_b.get_parameter(n), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ragged,use_prefix", [(True, True), (False, True), (True, False)])
def test_steps_and_parameters_match_the_whole_head(ragged, use_prefix):
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model, ragged=ragged)
    target = fe.TokenTargets(labels, causal=True)
    other = copy.deepcopy(model)
    kw = dict(params=LAST, editor=fe.RMSProp(1e-2), max_steps=40, use_prefix=use_prefix)
    r = fe.edit(model, inputs, target, **kw)
    ref = whole_head_edit(other, inputs, target, **kw)
    # labelled logits positions: 5..8 in row 0 (labels 6..9 after the causal shift), 7..8 in the other
    assert r.logits_kept == 4 and r.logits_reason is None and ref.logits_kept == 0
    assert r.to_dict()["logits_kept"] == 4
    assert r.steps >= 2 and r.success
    assert_same_edit(r, ref, model, other, r.param_names)
    assert satisfied(model, inputs, target) == r.success
    assert "forward" not in vars(model.lm_head)  # the kept head is gone after the edit
    r.revert()
    ref.revert()
    assert_identical(model, snapshot(other))


def test_sequence_ranking_matches_the_whole_head():
    model = small_gpt2().eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (4, 9), generator=g)  # two groups: desired row, then an alternative
    labels = torch.full_like(ids, -100)
    labels[:, 6:] = ids[:, 6:]
    target = fe.SequenceRanking(labels, num_candidates=2, causal=True)
    with torch.no_grad():  # make both groups wrong: the alternative scores higher
        s = target.scores(model(input_ids=ids).logits).reshape(2, 2)
    order = torch.where((s[:, 0] > s[:, 1]).repeat_interleave(2), torch.tensor([1, 0, 3, 2]), torch.arange(4))
    target = fe.SequenceRanking(labels[order], num_candidates=2, causal=True)
    inputs = {"input_ids": ids[order]}
    other = copy.deepcopy(model)
    kw = dict(params=LAST, editor=fe.RMSProp(1e-2), max_steps=30)
    r = fe.edit(model, inputs, target, **kw)
    ref = whole_head_edit(other, inputs, target, **kw)
    assert r.logits_kept == 3 and ref.logits_kept == 0
    assert r.steps >= 1
    assert_same_edit(r, ref, model, other, r.param_names)
    with torch.no_grad():
        assert bool((target.per_sample(model(**inputs).logits) <= 0).all()) == r.success


def test_an_edit_that_raises_removes_the_kept_head_and_changes_nothing():
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model)
    calls = []

    def fail_in_the_steps(module, args, out):
        if out.shape[-2] == 4:  # the kept head: the check's forward, the first step's, then a failing one
            calls.append(out.shape[-2])
            if len(calls) == 3:
                raise RuntimeError("boom")
    handle = model.lm_head.register_forward_hook(fail_in_the_steps)
    before = snapshot(model)
    with pytest.raises(Exception, match="boom"):
        fe.edit(model, inputs, fe.TokenTargets(labels, causal=True), params=LAST, max_steps=10)
    handle.remove()
    assert len(calls) == 3
    assert "forward" not in vars(model.lm_head)
    assert_identical(model, before)


def test_the_whole_head_runs_where_it_must():
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model)
    # the tied head holds the edited embedding
    r = fe.edit(model, inputs, fe.TokenTargets(labels, causal=True), params="lm_head", max_steps=3)
    assert r.logits_kept == 0 and "edited parameter" in r.logits_reason
    r.revert()
    # every position labelled: nothing to leave out
    with torch.no_grad():
        every = (model(**inputs).logits.argmax(-1) + 1) % 64
    r = fe.edit(model, inputs, fe.TokenTargets(every), params=LAST, max_steps=2)
    assert r.logits_kept == 0 and r.logits_reason is None
    r.revert()
    # fixed shapes (compiled steps, CUDA graphs) keep the whole head and say so
    assert kl.keep_labelled_logits(model, fe.TokenTargets(labels, causal=True), {}, [], lambda: None,
                                   "the steps run compiled (fixed shapes)") == (None, "the steps run compiled (fixed shapes)")


def test_a_classifier_has_nothing_to_keep():
    model = small_bert().eval()
    ids = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = (model(input_ids=ids).logits.argmax(-1) + 1) % model.config.num_labels
    r = fe.edit(model, {"input_ids": ids}, y, params="classifier", max_steps=5)
    assert r.logits_kept == 0 and r.logits_reason is None


class MixingLM(nn.Module):
    """An embedding, a body and a head, then code after the head: ``mix="mean"`` subtracts the mean
    over positions (mixes them), ``mix="reshape"`` reshapes to the whole position count (fails with
    fewer), ``mix=None`` does neither."""

    def __init__(self, mix, vocab=40, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.mix, self.vocab = mix, vocab
        self.embed, self.body, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)

    def get_output_embeddings(self):
        return self.head

    def forward(self, tokens):
        z = self.head(torch.tanh(self.body(self.embed(tokens))))
        if self.mix == "mean":
            z = z - z.mean(1, keepdim=True)
        elif self.mix == "reshape":
            z = z.reshape(tokens.shape[0], tokens.shape[1], self.vocab)
        return z


@pytest.mark.parametrize("mix,kept,reason", [(None, 2, None), ("mean", 0, "mixes positions"),
                                             ("reshape", 0, "fails with the head")])
def test_code_after_the_head_is_checked(mix, kept, reason):
    model = MixingLM(mix).eval()
    tokens = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(tokens).argmax(-1)
    labels = torch.full_like(tokens, -100)
    labels[0, [3, 7]] = (own[0, [3, 7]] + 1) % 40
    target = fe.TokenTargets(labels)
    other = copy.deepcopy(model)
    kw = dict(params="body", editor=fe.RMSProp(3e-2), max_steps=40)
    r = fe.edit(model, (tokens,), target, **kw)
    ref = whole_head_edit(other, (tokens,), target, **kw)
    assert r.logits_kept == kept
    assert (r.logits_reason is None) if reason is None else (reason in r.logits_reason)
    assert r.success
    assert_same_edit(r, ref, model, other, ["body.weight", "body.bias"])


def test_checked_once_per_split_and_number_of_kept_positions(monkeypatch):
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model)
    checks = []
    check = kl._check
    monkeypatch.setattr(kl, "_check", lambda *a: checks.append(1) or check(*a))
    fewer = labels.clone()
    fewer[0, 6] = -100  # row 0 from 7: logits positions 6..8
    moved = labels.clone()
    moved[0, 8] = -100  # positions 5, 6, 7, 8 still: 4 of them, another set
    moved[1, 7] = 1
    for lab, n, kept in [(labels, 1, 4), (labels, 1, 4), (fewer, 2, 3), (moved, 2, 4), (labels, 2, 4)]:
        r = fe.edit(model, inputs, fe.TokenTargets(lab, causal=True), params=LAST, max_steps=2)
        r.revert()
        assert len(checks) == n and r.logits_kept == kept


def test_user_errors_raise_as_with_the_whole_head():
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model)
    before = snapshot(model)
    bad = labels.clone()
    bad[0, -1] = 999
    with pytest.raises(ValueError, match="label 999 is out of range"):  # at the split's first edit
        fe.edit(model, inputs, fe.TokenTargets(bad, causal=True), params=LAST)
    assert_identical(model, before)
    r = fe.edit(model, inputs, fe.TokenTargets(labels, causal=True), params=LAST, max_steps=2)
    assert r.logits_kept == 4  # the failed first edit left no verdict behind
    r.revert()
    with pytest.raises(ValueError, match="label 999 is out of range"):  # with the verdict cached
        fe.edit(model, inputs, fe.TokenTargets(bad, causal=True), params=LAST)
    longer = torch.cat([labels, torch.full((2, 2), 5)], 1)
    with pytest.raises(ValueError, match="labels have shape"):
        fe.edit(model, inputs, fe.TokenTargets(longer, causal=True), params=LAST)
    assert_identical(model, before)


def test_a_verdict_near_a_flip_is_recomputed_with_the_whole_head(monkeypatch):
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model)
    target = fe.TokenTargets(labels, causal=True)
    rechecks = []
    whole = kl.whole_loss
    monkeypatch.setattr(edit_module, "whole_loss", lambda *a: rechecks.append(1) or whole(*a))
    other = copy.deepcopy(model)
    kw = dict(params=LAST, editor=fe.RMSProp(1e-2), max_steps=40)
    monkeypatch.setattr(kl, "RECHECK_BAND", float("inf"))  # every verdict counts as near a flip
    r = fe.edit(model, inputs, target, **kw)
    assert rechecks == [1] and r.logits_kept == 4
    assert_same_edit(r, whole_head_edit(other, inputs, target, **kw), model, other, r.param_names)
    assert satisfied(model, inputs, target) == r.success
    r.revert()
    monkeypatch.setattr(kl, "RECHECK_BAND", 0.0)
    fe.edit(model, inputs, target, **kw).revert()
    assert rechecks == [1]  # a success with a margin to spare is not recomputed


def test_distance_to_a_flip():
    labels = torch.tensor([[2, 0, -100]])
    c = kl._on_positions(fe.TokenTargets(labels), torch.tensor([0, 1, 2]))
    z = torch.tensor([[[0.0, 1.0, 3.0], [5.0, 4.9, 0.0], [9.0, 0.0, 0.0]]])
    assert c.per_sample(z).item() <= 0
    assert c.closest.item() == pytest.approx(0.1, abs=1e-6)  # position 1: label 0 leads by 0.1
    assert c.largest.item() == 9.0  # the ignored position's logits count for the scale
    ranking = kl._on_positions(fe.SequenceRanking(torch.tensor([[1, 2], [2, 1], [1, 1], [0, 0]]), 2),
                               torch.tensor([0, 1]))
    values = ranking.per_sample(torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0)))
    assert ranking.closest.item() == pytest.approx(min(values.abs().min(), values.mean().abs()).item())
    # the band widens to 8 ulps of a half-precision head
    kept = kl.KeptLogits(nn.Identity(), torch.tensor([0, 1, 2]), c)
    c.dtype, c.closest, c.largest = torch.bfloat16, torch.tensor(0.05 * 9.0), torch.tensor(9.0)
    assert kl.needs_recheck(kept)
    c.dtype = torch.float32
    assert not kl.needs_recheck(kept)


# ------------------------------------------------------------------------------------------------
# Editable Training: the inner steps and L_edit with the kept head
# ------------------------------------------------------------------------------------------------
training_module = importlib.import_module("fastedit.training")
KEEP = training_module.keep_labelled_logits


def et_objective(model, kept: bool, monkeypatch, given: bool, **kw):
    """The Editable Training objective and its gradients (float64), and what keep_labelled_logits gave."""
    torch.manual_seed(5)  # the sampled edits
    et = fe.EditableTraining(model, params="transformer.h.1", editor=fe.RMSProp(1e-2), max_steps=3, c_edit=1.0,
                             c_loc=1.0, learn=("lr",), **kw)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    edit = {}
    if given:
        e_ids = torch.randint(0, 64, (2, 10), generator=g)
        e_labels = torch.full_like(e_ids, -100)
        e_labels[0, [4, 9]] = torch.tensor([3, 7])
        e_labels[1, 6] = 11
        edit = dict(edit_inputs={"input_ids": e_ids}, edit_target=fe.TokenTargets(e_labels, causal=True))
    got = []
    monkeypatch.setattr(training_module, "keep_labelled_logits",
                        (lambda *a: got.append(KEEP(*a)) or got[-1]) if kept else (lambda *a: (None, None)))
    loss, stats = et({"input_ids": ids}, fe.TokenTargets(ids, causal=True), **edit)
    grads = torch.autograd.grad(loss, [p for p in et.parameters() if p.requires_grad], allow_unused=True)
    return loss, stats, grads, got


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("rematerialize", [False, True])
def test_editable_training_with_the_kept_head_matches_the_whole_head(monkeypatch, given, rematerialize):
    start = small_gpt2(dropout=0.0).double().train()
    ref = et_objective(copy.deepcopy(start), False, monkeypatch, given, rematerialize=rematerialize)
    loss, stats, grads, got = et_objective(copy.deepcopy(start), True, monkeypatch, given,
                                           rematerialize=rematerialize)
    assert got and all(k is not None for k, _ in got)  # every edit's steps ran with the kept head
    assert [k.index.numel() for k, _ in got] == ([2, 1] if given else [1])
    assert stats["edit_steps"] == ref[1]["edit_steps"] and stats["edit_steps"] >= 1
    torch.testing.assert_close(loss, ref[0], rtol=1e-10, atol=1e-12)
    for key in ("loss_base", "loss_edit", "loss_loc"):
        torch.testing.assert_close(stats[key], ref[1][key], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref[2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(a is not None and a.abs().sum() > 0 for a in grads)


def test_editable_training_given_edits_with_bad_labels_raise_naming_the_edit(monkeypatch):
    model = small_gpt2().train()
    et = fe.EditableTraining(model, params="transformer.h.1", max_steps=2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    bad = torch.full_like(ids, -100)
    bad[:, 5] = 999
    before = snapshot(model)
    for _ in range(2):  # before and after a verdict is cached
        with pytest.raises(ValueError, match=r"edit_target \(edit_y\), edit 0.*999"):
            et({"input_ids": ids}, fe.TokenTargets(ids, causal=True), {"input_ids": ids},
               fe.TokenTargets(bad, causal=True))
        assert_identical(model, before)
        good = bad.clone()
        good[:, 5] = 1
        et({"input_ids": ids}, fe.TokenTargets(ids, causal=True), {"input_ids": ids}, fe.TokenTargets(good, causal=True))
        model.load_state_dict(before)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_input_gradient_reads_the_nonzero_columns(dense, bias):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(53, 7, generator=g, dtype=torch.float64)
    b = torch.randn(53, generator=g, dtype=torch.float64) if bias else None
    grad = torch.zeros(2, 3, 53, dtype=torch.float64)
    if dense:
        grad.normal_(generator=g)
    else:  # a margin's: two columns per position, some shared
        grad[0, :, 5], grad[1, :, 40], grad[0, 1, 52], grad[1, 2, 0] = 1.0, -1.0, 0.5, 2.0
    y = kl._FrozenLinear.apply(x, weight, b)
    torch.testing.assert_close(y, nn.functional.linear(x, weight, b), rtol=0, atol=0)
    (got,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(got, grad @ weight, rtol=1e-12, atol=1e-12)


def test_only_fe_edit_uses_the_frozen_head(monkeypatch):
    applied = []
    apply = kl._FrozenLinear.apply
    monkeypatch.setattr(kl._FrozenLinear, "apply", lambda *a: applied.append(1) or apply(*a))
    model = small_gpt2().eval()
    inputs, labels = prompt_and_labels(model)
    r = fe.edit(model, inputs, fe.TokenTargets(labels, causal=True), params=LAST, max_steps=3)
    assert r.logits_kept == 4 and len(applied) == r.steps + 1  # each step's evaluation and the last one
    r.revert()
    et = fe.EditableTraining(model.train(), params="transformer.h.1", max_steps=2)
    del applied[:]
    et(inputs, fe.TokenTargets(inputs["input_ids"], causal=True))  # differentiates the head: never frozen
    assert applied == []
