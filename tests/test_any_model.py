"""fe.edit on model families the library was not written for: nn.TransformerEncoder text
classifiers with padding masks, HF BERT / GPT-2 / T5 / BART (random weights from small configs),
GRU encoder-decoders (a hand-written one and fastedit.models.G2P), and, when present, the real
MiniLM and g2p-en checkpoints.

For every family: the edit succeeds after at least one step, runs with the frozen prefix (the
expected method: "call-cache" for HF models and nn.TransformerEncoder, "fx" for the GRU models),
the edited model satisfies the constraint in an independent full forward, modes and requires_grad
flags are restored, ``revert()`` restores every parameter and buffer bit for bit, and the split
(``EditTarget``) reproduces the full model bit for bit, without grad and with grad for perturbed
editable parameters (values and gradients), on two input lengths with one split.
Also: optional ``None`` arguments under fx, tied weights, mixed dtypes, ``output=``, bad input,
the fallback forced by a global module hook, and surgery / EWC editing with token targets.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fastedit as fe
from fastedit.edit import EditTarget, eval_mode
from fastedit.model_io import ModelInputs
from fastedit.prefix import bits_equal

from test_edit import assert_identical, snapshot

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def full_state(model):
    """Parameters and buffers (persistent or not) by value, each module's mode, each parameter's
    requires_grad flag."""
    return {
        "state": snapshot(model),
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "modes": {n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        "grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
    }


def assert_flags(model, st):
    assert {n: m.training for n, m in model.named_modules(remove_duplicate=False)} == st["modes"]
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == st["grad"]


def assert_no_leftovers(model):
    """No hook and no patched forward is left on any module (the call cache patches both)."""
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, f"{name}.forward is still patched"
        assert not m._forward_hooks and not m._forward_pre_hooks, f"{name} has a leftover hook"


def assert_same_state(model, st):
    assert_identical(model, st["state"])
    now = dict(model.named_buffers(remove_duplicate=False))
    assert now.keys() == st["buffers"].keys()
    for k, v in st["buffers"].items():
        assert bits_equal(now[k], v), f"buffer {k} changed"
    assert_flags(model, st)
    assert_no_leftovers(model)


def mixed_modes(model, freeze: str):
    """Train mode with one submodule in eval mode and one frozen (non-editable) parameter, so that
    restoring modes and flags is not trivial. Dropout is 0 in every config, so modes do not change
    the forward."""
    model.train()
    next(m for m in model.modules() if m is not model and not isinstance(m, nn.ModuleList)).eval()
    model.get_parameter(freeze).requires_grad_(False)
    return model


def call(model, inputs):
    return ModelInputs.of(inputs).call(model)


def logits_of(model, inputs, output=None):
    out = call(model, inputs)
    if output is None:
        return out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) or hasattr(
            out, "keys") else out[0]
    return out[output] if not callable(output) else output(out)


def edit_and_revert(model, inputs, target, params, method, *, check=None, freeze=None, output=None, **kw):
    """Edit (from mixed modes), check the edit, the result's fields and the restored flags, run
    ``check(model)`` on the edited model (eval mode, no grad), revert and check every bit."""
    if freeze is not None:
        mixed_modes(model, freeze)
    before = full_state(model)
    r = fe.edit(model, inputs, target, params=params, output=output, **kw)
    assert r.success and r.applied and r.steps >= 1, r
    assert r.loss <= 0 < r.initial_loss
    assert r.prefix_used and r.prefix_method == method and r.prefix_reason is None, r
    assert_flags(model, before)
    assert_no_leftovers(model)
    now = snapshot(model)
    changed = {k for k, v in before["state"].items() if not torch.equal(now[k], v)}
    assert changed, "the edit changed nothing"
    editable = set(r.param_names)
    named = dict(model.named_parameters(remove_duplicate=False))
    ids = {id(named[n]) for n in editable}
    assert all(k in named and id(named[k]) in ids for k in changed), changed - editable
    with eval_mode(model), torch.no_grad():
        z = logits_of(model, inputs, output)
        constraint = fe.constraint.as_constraint(target)
        assert bool(constraint.satisfied(z).all()), constraint.per_sample(z)
        if check is not None:
            check(model)
    r.revert()
    assert_same_state(model, before)
    return r


def perturbed(params, seed=1, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return [(p.detach() + scale * (p.detach().abs() + 1e-2)
             * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)).requires_grad_()
            for p in params]


def assert_split_exact(model, params, inputs_list, method, output=None):
    """One EditTarget, built from the first inputs, reproduces the model bit for bit on each inputs
    (of the same call signature, different lengths): without grad, and with grad for perturbed
    editable parameters (outputs and their gradients)."""
    model.eval()
    et = EditTarget.build(model, params, inputs=inputs_list[0], output=output)
    assert et.split.method == method and et.split.reason is None
    read = et.read
    for inputs in inputs_list:
        mi = ModelInputs.of(inputs)
        with torch.no_grad():
            want = read(mi.call(model))
            got = et.logits(et.eval_prefix(inputs))
        assert bits_equal(got, want), (got - want).abs().max()
        theta = perturbed(et.params)
        want = read(functional_call(model, dict(zip(et.names, theta)), mi.args, mi.kwargs))
        got = et.logits(et.prefix(inputs), theta)
        assert got.requires_grad and bits_equal(got.detach(), want.detach()), (got - want).abs().max()
        with torch.no_grad():  # the perturbation is seen: the comparison is not of constants
            assert not torch.equal(want, read(mi.call(model)))
        w = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        g_want = torch.autograd.grad((want.double() * w).sum(), theta)
        g_got = torch.autograd.grad((got.double() * w).sum(), theta)
        for a, b, n in zip(g_got, g_want, et.names):
            assert bits_equal(a, b), f"gradient of {n} differs"
    assert_no_leftovers(model)
    return et


def wrong_labels(z, k=1):
    return (z.argmax(-1) + k) % z.shape[-1]


# ------------------------------------------------------------------------------------------------
# (a) nn.TransformerEncoder text classifier with a padding mask
# ------------------------------------------------------------------------------------------------
class TextClassifier(nn.Module):
    """Embedding, nn.TransformerEncoder (batch first), mean pool over the unpadded tokens, head."""

    def __init__(self, vocab=50, d=32, layers=3, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens, src_key_padding_mask=None):
        h = self.enc(self.emb(tokens), src_key_padding_mask=src_key_padding_mask)
        if src_key_padding_mask is None:
            pooled = h.mean(1)
        else:
            keep = (~src_key_padding_mask).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1)
        return self.head(pooled)


def text_batch(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (3, length), generator=g)
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[1, length - 3:] = True  # rows 1 and 2 padded, row 0 not
    mask[2, 3:] = True
    tokens[mask] = 0
    return tokens, mask


@pytest.mark.parametrize("with_mask", [True, False], ids=["padding-mask", "no-mask"])
def test_transformer_encoder_classifier(with_mask):
    torch.manual_seed(0)
    model = TextClassifier()
    inputs = []
    for length in (10, 7):
        tokens, mask = text_batch(length, seed=length)
        inputs.append({"tokens": tokens, "src_key_padding_mask": mask} if with_mask else tokens)
    model.eval()
    with torch.no_grad():
        y = wrong_labels(call(model, inputs[0]))
    edit_and_revert(model, inputs[0], y, "enc.layers.2", "call-cache", freeze="emb.weight", max_steps=30)
    assert_split_exact(model, "enc.layers.2", inputs, "call-cache")
    if with_mask:  # the padding mask matters: a padded row's logits change without it
        with torch.no_grad():
            assert not torch.equal(call(model, inputs[0])[1:], model(inputs[0]["tokens"])[1:])


# ------------------------------------------------------------------------------------------------
# (b) HF BertForSequenceClassification, tokenizer-style dict
# ------------------------------------------------------------------------------------------------
def small_bert(cls=None, **kw):
    torch.manual_seed(0)
    cls = cls or transformers.BertForSequenceClassification
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, pad_token_id=0, **kw)
    return cls(config)


def bert_batch(length, rows=3, seed=0):
    """What a tokenizer gives: [CLS] ... [SEP], right padding, two segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for i in range(1, rows):
        mask[i, length - 2 * i:] = 0
    ids[:, 0] = 2
    ids[mask == 0] = 0
    types = torch.zeros(rows, length, dtype=torch.long)
    types[:, length // 2:] = 1
    types[mask == 0] = 0
    return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})


def test_hf_bert_sequence_classifier():
    model = small_bert(num_labels=3)
    last = f"bert.encoder.layer.{model.config.num_hidden_layers - 1}"
    inputs = [bert_batch(12, seed=1), bert_batch(9, seed=2)]
    model.eval()
    with torch.no_grad():
        y = wrong_labels(model(**inputs[0]).logits)
    edit_and_revert(model, inputs[0], y, last, "call-cache", freeze="bert.embeddings.word_embeddings.weight",
                    max_steps=30)
    assert_split_exact(model, last, inputs, "call-cache")


# ------------------------------------------------------------------------------------------------
# (c) HF GPT2LMHeadModel: make it continue a prompt with three given tokens
# ------------------------------------------------------------------------------------------------
def small_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def greedy(model, prompt, steps):
    """An independent greedy loop: the full model on the whole sequence, argmax, append."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.shape[1]:]


def test_hf_gpt2_continues_a_prompt():
    model = small_gpt2()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 64, (2, 6), generator=g)
    model.eval()
    before = greedy(model, prompt, 3)
    want = (before + torch.tensor([[5, 9, 17], [11, 3, 29]])) % 64  # every token differs from the model's own
    ids = torch.cat([prompt, want], 1)
    labels = torch.full_like(ids, -100)
    labels[:, prompt.shape[1]:] = want
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    last = f"transformer.h.{model.config.n_layer - 1}.mlp"

    def continues(m):
        assert torch.equal(greedy(m, prompt, 3), want)

    edit_and_revert(model, inputs, fe.TokenTargets(labels, causal=True), last, "call-cache", check=continues,
                    freeze="transformer.wpe.weight", max_steps=40)
    assert torch.equal(greedy(model, prompt, 3), before)
    short = {"input_ids": ids[:, :5], "attention_mask": torch.ones_like(ids[:, :5])}
    assert_split_exact(model, last, [inputs, short], "call-cache")


# ------------------------------------------------------------------------------------------------
# (d) HF encoder-decoders: T5 and BART, token targets and a ranking of candidates
# ------------------------------------------------------------------------------------------------
VOCAB = 64


def small_seq2seq(kind):
    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                       num_decoder_layers=2, num_heads=2, dropout_rate=0.0, pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config)
        return model, f"decoder.block.{config.num_decoder_layers - 1}", "shared.weight"
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = transformers.BartForConditionalGeneration(config)
    return model, f"model.decoder.layers.{config.decoder_layers - 1}", "model.encoder.embed_positions.weight"


def seq2seq_inputs(model, src_len, labels, seed=0):
    """input_ids (right-padded, all but the first row), attention_mask and decoder_input_ids (the labels
    shifted right behind the start token) for ``labels [B, T]``."""
    g = torch.Generator().manual_seed(seed)
    rows = labels.shape[0]
    pad = model.config.pad_token_id
    ids = torch.randint(3, VOCAB, (rows, src_len), generator=g)
    mask = torch.ones(rows, src_len, dtype=torch.long)
    mask[1:, src_len - 2:] = 0
    ids[mask == 0] = pad
    start = torch.full((rows, 1), model.config.decoder_start_token_id)
    dec = torch.cat([start, labels[:, :-1].clamp_min(0)], 1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_hf_encoder_decoder_token_targets(kind):
    model, last, frozen = small_seq2seq(kind)
    model.eval()
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(3, VOCAB, (2, 4), generator=g)
    inputs = seq2seq_inputs(model, 7, labels, seed=5)
    with torch.no_grad():  # make every label differ from the model's teacher-forced prediction
        labels = wrong_labels(model(**inputs).logits, 7)
    inputs = seq2seq_inputs(model, 7, labels, seed=5)
    labels[1, 0] = -100  # an ignored position
    edit_and_revert(model, inputs, fe.TokenTargets(labels), last, "call-cache", freeze=frozen, max_steps=40)
    other = seq2seq_inputs(model, 4, torch.randint(3, VOCAB, (2, 6), generator=g), seed=6)
    assert_split_exact(model, last, [inputs, other], "call-cache")


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_hf_encoder_decoder_sequence_ranking(kind):
    model, last, frozen = small_seq2seq(kind)
    model.eval()
    g = torch.Generator().manual_seed(7)
    groups, n, length = 2, 3, 4
    cands = torch.randint(3, VOCAB, (groups * n, length), generator=g)
    cands[1, 3] = cands[4, 2] = -100  # candidates of different lengths
    inputs = seq2seq_inputs(model, 6, cands, seed=8)
    src = inputs["input_ids"].reshape(groups, n, -1)[:, :1].expand(-1, n, -1).reshape(groups * n, -1)
    inputs["input_ids"] = src  # the candidates of a group share their source
    inputs["attention_mask"] = inputs["attention_mask"].reshape(groups, n, -1)[:, :1].expand(-1, n, -1) \
        .reshape(groups * n, -1)
    probe = fe.SequenceRanking(cands, n)
    with torch.no_grad():  # the desired candidate of each group: the one the model scores lowest
        scores = probe.scores(model(**inputs).logits).reshape(groups, n)
    order = torch.argsort(scores, dim=1)  # lowest first, so the desired row starts worst
    perm = (order + torch.arange(groups)[:, None] * n).reshape(-1)
    inputs = {k: v[perm] for k, v in inputs.items()}
    cands = cands[perm]
    target = fe.SequenceRanking(cands, n)

    def ranked(m):
        s = target.scores(m(**inputs).logits).reshape(groups, n)
        assert bool((s[:, :1] >= s[:, 1:]).all()), s

    edit_and_revert(model, inputs, target, last, "call-cache", check=ranked, freeze=frozen, max_steps=40)
    other = seq2seq_inputs(model, 9, torch.randint(3, VOCAB, (3, 2), generator=g), seed=9)
    assert_split_exact(model, last, [inputs, other], "call-cache")
