"""fastedit.rows: edited submodules compute only the output positions the model reads.

The pruned graph must equal the module's own forward at the read positions (fresh random inputs,
padding masks, odd sizes, float64 for gradients), pruning must be found only where the model really
reads one position, and a model that reads another position after all must get the exact result.
"""
import copy

import pytest
import torch
from seq_models import small_bert
from torch import nn
from torch.func import functional_call, vmap
from torch.fx.experimental.proxy_tensor import make_fx

import fastedit as fe
from fastedit import call_cache
from fastedit.model_io import ModelInputs
from fastedit.prefix import build_split
from fastedit.rows import RowPruned, prune_graph

pytest.importorskip("transformers")


def _bert_inputs(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, length - 2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def _names(model, prefix):
    return [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]


def _layer_call(model, layer, inputs):
    """The arguments the model calls ``layer`` with."""
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, k, o: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["args"], seen["kwargs"]


def test_the_pruned_layer_equals_the_layer_at_the_first_position():
    model = small_bert(layers=2, heads=4).eval()
    layer = model.bert.encoder.layer[1]
    for batch, length in [(3, 7), (1, 5), (2, 13)]:
        args, kwargs = _layer_call(model, layer, _bert_inputs(batch, length, seed=length))
        state = dict(layer.named_parameters())

        def run(state, args, kwargs):
            return functional_call(layer, state, args, kwargs)
        gm = make_fx(run, pre_dispatch=True, tracing_mode="fake")(state, args, kwargs)
        pruned, count = prune_graph(gm, leaf=0, axis=1)
        assert count >= 10  # the query path, attention output, residuals, LayerNorms and feed-forward
        ops = [n.target for n in pruned.graph.nodes if n.op == "call_function"]
        assert 1 <= sum(op == torch.ops.aten.narrow.default for op in ops) <= 2  # the queries (and the mask)
        with torch.no_grad():
            want = layer(*args, **kwargs)
            got = pruned(state, args, kwargs)
        assert got.shape == (batch, 1, 32)
        torch.testing.assert_close(got, want[:, :1], rtol=1e-5, atol=1e-6)


def test_an_op_without_a_rule_is_computed_whole():
    class CumSum(nn.Module):  # position t reads positions 0..t: nothing to prune before the cumsum
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).cumsum(1).relu()

    mod = CumSum()
    x = torch.randn(2, 6, 4)
    state = dict(mod.named_parameters())
    gm = make_fx(lambda state, x: functional_call(mod, state, (x,)), pre_dispatch=True, tracing_mode="fake")(state, x)
    pruned, count = prune_graph(gm, leaf=0, axis=1)
    assert count == 1  # the relu after the cumsum
    with torch.no_grad():
        torch.testing.assert_close(pruned(state, x), mod(x)[:, :1])


def _split(model, prefix, inputs):
    return build_split(model, _names(model, prefix), ModelInputs((), inputs), lambda o: o.logits)


def test_a_classifier_prunes_its_last_layer_only():
    model = small_bert(layers=2, heads=4).eval()
    inputs = _bert_inputs()
    last = _split(model, "bert.encoder.layer.1", inputs)
    assert last.method == "call-cache"
    assert [r.module for r in last.rows] == [model.bert.encoder.layer[1]]
    # editing layer 0, the whole encoder is the edited unit: layer 1 reads every position of layer 0,
    # the pooler only the first of the encoder's output
    first = _split(model, "bert.encoder.layer.0", inputs)
    assert [r.module for r in first.rows] == [model.bert.encoder]
    whole = build_split(model.bert, _names(model.bert, "encoder.layer.1"), ModelInputs((), inputs),
                        lambda o: o.last_hidden_state)
    assert whole.rows == ()  # BertModel returns every position


def test_the_pruned_replay_and_its_gradients_equal_the_model_in_float64():
    model = small_bert(layers=2, heads=4).double().eval()
    inputs = _bert_inputs(length=9)
    split = _split(model, "bert.encoder.layer.1", inputs)
    assert split.rows
    names = list(split.names)
    named = dict(model.named_parameters())
    moved = {n: (named[n].detach() + 0.05 * torch.randn_like(named[n])).requires_grad_() for n in names}
    plain = call_cache.CallCacheSuffix(model)
    acts = split.edit_acts(ModelInputs((), inputs), names, [named[n] for n in names])
    outs, grads = [], []
    for suffix in (split.suffix_module, plain):
        logits = functional_call(suffix, moved, (acts,)).logits
        outs.append(logits)
        grads.append(torch.autograd.grad(logits.square().sum(), list(moved.values())))
    assert split.rows[0].pruned_calls > 0 and split.rows[0].disabled is None
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_edits_agree_with_the_whole_model():
    model = small_bert(layers=2, heads=4).eval()
    for seed in range(3):
        inputs = _bert_inputs(batch=1, length=6 + seed, seed=seed)
        with torch.no_grad():
            target = 1 - model(**inputs).logits.argmax(-1)
        results = []
        for use_prefix in (True, False):
            m = copy.deepcopy(model)
            r = fe.edit(m, inputs, target, editor=fe.RMSProp(3e-3), params="bert.encoder.layer.1",
                        max_steps=20, use_prefix=use_prefix)
            with torch.no_grad():
                results.append((r, m(**inputs).logits))
        (pr, pl), (wr, wl) = results
        assert pr.rows_pruned == ["bert.encoder.layer.1"] and pr.rows_reason is None
        assert wr.rows_pruned == []
        assert (pr.success, pr.steps) == (wr.success, wr.steps)
        assert pr.success == bool((pl.argmax(-1) == target).all())  # agrees with an independent forward
        torch.testing.assert_close(pl, wl, rtol=1e-4, atol=1e-5)


class PickPosition(nn.Module):
    """Reads the position given by ``pos``: one input reads the first position, another does not."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x, pos):
        if bool((pos < 0).any()):  # data-dependent Python: fx cannot trace it, the call cache serves it
            raise IndexError("negative position")
        h = self.body(self.emb(x))
        return self.head(h[torch.arange(h.shape[0]), pos])


def test_a_model_that_reads_another_position_gets_the_exact_result():
    torch.manual_seed(0)
    model = PickPosition().eval()
    x = torch.randn(2, 5, 4)
    first = ModelInputs((x, torch.zeros(2, dtype=torch.long)), {})
    split = build_split(model, _names(model, "body"), first, lambda o: o)
    assert [r.module for r in split.rows] == [model.body]
    other = ModelInputs((x, torch.tensor([0, 3])), {})
    with torch.no_grad():
        got = split.suffix(split.eval_acts(other))
        want = model(*other.args)
    assert torch.equal(got, want)  # run again whole, not NaN
    assert "unread" in split.rows[0].disabled
    with torch.no_grad():
        assert torch.equal(split.suffix(split.eval_acts(first)), model(*first.args))  # whole from now on


def test_vmap_runs_the_layer_whole():
    model = small_bert(layers=2, heads=4).eval()
    inputs = _bert_inputs()
    split = _split(model, "bert.encoder.layer.1", inputs)
    names = list(split.names)
    named = dict(model.named_parameters())
    stacked = {n: torch.stack([named[n].detach(), named[n].detach() * 1.01]) for n in names}
    acts = split.eval_acts(ModelInputs((), inputs))
    calls = split.rows[0].pruned_calls
    with torch.no_grad():
        got = vmap(lambda p: functional_call(split.suffix_module, p, (acts,)).logits)(stacked)
        want = torch.stack([functional_call(call_cache.CallCacheSuffix(model), {n: stacked[n][i] for n in names},
                                            (acts,)).logits for i in range(2)])
    assert split.rows[0].pruned_calls == calls
    torch.testing.assert_close(got, want)


def test_a_module_that_does_not_trace_runs_as_it_is():
    class Branchy(nn.Module):  # data-dependent Python: the fake-tensor trace fails
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return h if bool(h.sum() > 0) else -h

    branchy = Branchy()
    rp = RowPruned(branchy, 0, 1)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(rp(x), branchy(x))
    assert rp.disabled and "trace" in rp.disabled and rp.pruned_calls == 0


def _encoder(kind):
    import transformers as tf
    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=2)
        return tf.DistilBertForSequenceClassification(cfg), "distilbert.transformer.layer.1"
    if kind == "roberta":
        cfg = tf.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, num_labels=2, pad_token_id=1, max_position_embeddings=40)
        return tf.RobertaForSequenceClassification(cfg), "roberta.encoder.layer.1"
    if kind == "electra":
        cfg = tf.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_labels=2)
        return tf.ElectraForSequenceClassification(cfg), "electra.encoder.layer.1"
    return small_bert(layers=2, heads=4, attn_implementation="eager"), "bert.encoder.layer.1"  # matmul + softmax


@pytest.mark.parametrize("kind", ["distilbert", "roberta", "electra", "bert-eager-attention"])
def test_other_encoder_classifiers_prune_their_last_layer(kind):
    model, params = _encoder(kind)
    model.eval()
    ids = torch.randint(2, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        target = 1 - model(**inputs).logits.argmax(-1)
    out = []
    for use_prefix in (True, False):
        m = copy.deepcopy(model)
        r = fe.edit(m, inputs, target, editor=fe.RMSProp(3e-3), params=params, max_steps=30, use_prefix=use_prefix)
        with torch.no_grad():
            out.append((r, m(**inputs).logits))
    (pr, pl), (wr, wl) = out
    assert pr.rows_pruned == [params] and pr.rows_reason is None
    assert (pr.success, pr.steps) == (wr.success, wr.steps) and pr.success
    torch.testing.assert_close(pl, wl, rtol=1e-4, atol=1e-5)


def test_autocast_is_part_of_the_call_signature():
    model = small_bert(layers=2, heads=4).eval()
    layer = model.bert.encoder.layer[1]
    args, kwargs = _layer_call(model, layer, _bert_inputs())
    rp = RowPruned(layer, 0, 1)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, want_low = rp(*args, **kwargs), layer(*args, **kwargs)
        full, want = rp(*args, **kwargs), layer(*args, **kwargs)
    assert rp.disabled is None and len(rp.graphs) == 2
    assert low.dtype == want_low.dtype and full.dtype == want.dtype == torch.float32
    torch.testing.assert_close(full[:, :1], want[:, :1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low[:, :1].float(), want_low[:, :1].float(), rtol=2e-2, atol=2e-2)
    assert torch.isnan(full[:, 1:]).all()
