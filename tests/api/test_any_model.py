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
the whole-model fallback for a model the prefix cannot split (warned once per model), global module
hooks, and surgery / EWC editing with token targets.
"""
import warnings

import pytest
import torch
from helpers import assert_identical, snapshot
from seq_models import Borrower, GRUSeq2Seq, TransformerClassifier, small_bert, small_gpt2
from torch import nn
from torch.func import functional_call

import fastedit as fe
from fastedit._core import EditTarget, eval_mode
from fastedit.model_io import ModelInputs, resolve_output
from fastedit.prefix import bits_equal

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = [pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
              pytest.mark.usefixtures("one_thread")]


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
    """No forward hook and no instance-level ``forward`` is left on any module (recording and
    replaying cached calls patch modules for the duration of a run)."""
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
    return resolve_output(output)(call(model, inputs))


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
        assert_satisfied(logits_of(model, inputs, output), target)
        if check is not None:
            check(model)
    r.revert()
    assert_same_state(model, before)
    return r


def assert_satisfied(z, target):
    """The edit's goal, checked here without the library's constraint code (ties: ``torch.argmax``)."""
    z = z.double()
    if isinstance(target, (fe.TokenTargets, fe.SequenceRanking)):
        labels = target.labels
        if target.causal:
            z, labels = z[:, :-1], labels[:, 1:]
        mask = labels != -100
        if isinstance(target, fe.TokenTargets):
            assert bool((z.argmax(-1) == labels)[mask].all()), (z.argmax(-1), labels)
        else:
            logp = z.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            score = ((logp * mask).sum(-1) / mask.sum(-1)).reshape(-1, target.num_candidates)
            assert bool((score[:, :1] >= score[:, 1:]).all()), score
    else:
        y = torch.as_tensor(target).reshape(-1)
        assert bool((z.argmax(-1) == y).all()), (z.argmax(-1), y)


def perturbed(params, seed=1, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return [(p.detach() + scale * (p.detach().abs() + 1e-2)
             * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)).requires_grad_()
            for p in params]


def assert_split_exact(model, params, inputs_list, method, output=None):
    """One EditTarget, built from the first inputs, reproduces the model bit for bit on each inputs
    (of the same call signature, different lengths): without grad, and with grad for perturbed
    editable parameters (outputs and their gradients). Where a submodule computes only the output
    positions the model reads (``split.rows``), other matrix sizes round differently: equal within
    float32 rounding there, bit for bit everywhere else."""
    model.eval()
    et = EditTarget.build(model, params, inputs=inputs_list[0], output=output)
    assert et.split.method == method and et.split.reason is None
    read = et.read

    def same(a, b, scale=None):
        if not et.split.rows:
            return bits_equal(a, b)
        scale = float(b.abs().max()) if scale is None else scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        return True
    for inputs in inputs_list:
        mi = ModelInputs.of(inputs)
        with torch.no_grad():
            want = read(mi.call(model))
            got = et.logits(et.eval_prefix(inputs))
        assert same(got, want), (got - want).abs().max()
        theta = perturbed(et.params)
        want = read(functional_call(model, dict(zip(et.names, theta)), mi.args, mi.kwargs))
        got = et.logits(et.prefix(inputs), theta)
        assert got.requires_grad and same(got.detach(), want.detach()), (got - want).abs().max()
        with torch.no_grad():  # the perturbation is seen: the comparison is not of constants
            assert not torch.equal(want, read(mi.call(model)))
        w = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        g_want = torch.autograd.grad((want.double() * w).sum(), theta)
        g_got = torch.autograd.grad((got.double() * w).sum(), theta)
        scale = max(float(b.abs().max()) for b in g_want)  # a key bias's gradient is 0 but for rounding
        for a, b, n in zip(g_got, g_want, et.names):
            assert same(a, b, scale), f"gradient of {n} differs"
    assert_no_leftovers(model)
    return et


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, fe.PrefixFallbackWarning)]


def wrong_labels(z, k=1):
    return (z.argmax(-1) + k) % z.shape[-1]


# ------------------------------------------------------------------------------------------------
# (a) nn.TransformerEncoder text classifier with a padding mask
# ------------------------------------------------------------------------------------------------
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
    model = TransformerClassifier(encoder="enc")  # vocabulary 50, width 32, 3 layers, 4 classes, mean pool
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
    edit_and_revert(model, inputs, fe.TokenTargets(labels), last, "call-cache", freeze=frozen,
                    editor=fe.RMSProp(1e-2), max_steps=40)
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

    edit_and_revert(model, inputs, target, last, "call-cache", freeze=frozen,
                    editor=fe.RMSProp(1e-2), max_steps=40)
    other = seq2seq_inputs(model, 9, torch.randint(3, VOCAB, (3, 2), generator=g), seed=9)
    assert_split_exact(model, last, [inputs, other], "call-cache")


# ------------------------------------------------------------------------------------------------
# (e) GRU encoder-decoders: seq_models.GRUSeq2Seq, and fastedit.models.G2P
# ------------------------------------------------------------------------------------------------
def gru_task(model, rows=2, src_len=6, tgt_len=5, seed=0):
    """``(src, dec_in)`` and labels [B, T] that differ from the model's teacher-forced argmax, with
    dec_in = the labels shifted right behind token 0, and one ignored position."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, 20, (rows, src_len), generator=g)
    labels = torch.randint(1, 16, (rows, tgt_len), generator=g)
    for _ in range(3):  # a fixed point of "labels differ from the prediction given their own prefix"
        dec_in = torch.cat([torch.zeros(rows, 1, dtype=torch.long), labels[:, :-1]], 1)
        with torch.no_grad():
            labels = wrong_labels(model(src, dec_in), 3)
    dec_in = torch.cat([torch.zeros(rows, 1, dtype=torch.long), labels[:, :-1]], 1)
    labels[0, -1] = -100
    return (src, dec_in), labels


def test_gru_seq2seq():
    torch.manual_seed(0)
    model = GRUSeq2Seq().eval()
    inputs, labels = gru_task(model)
    edit_and_revert(model, inputs, fe.TokenTargets(labels), "decoder", "fx", freeze="src_emb.weight",
                    editor=fe.RMSProp(1e-2), max_steps=40)
    other, _ = gru_task(model, rows=3, src_len=4, tgt_len=8, seed=1)
    assert_split_exact(model, "decoder", [inputs, other], "fx")


def g2p_task(words, prons):
    from fastedit.models.g2p import encode_phonemes, encode_words
    dec_in, labels = encode_phonemes(prons)
    return (encode_words(words), dec_in), labels


def test_g2p_random_weights():
    from fastedit.models.g2p import G2P
    torch.manual_seed(0)
    model = G2P(hidden=32).eval()
    inputs, labels = g2p_task(["cat", "editing"], [["K", "AE1", "T"], ["EH1", "D", "AH0", "T", "IH0", "NG"]])

    def decodes(m):  # teacher-forced argmax = labels, so greedy decoding spells them
        assert m.greedy_decode(inputs[0]) == [["K", "AE1", "T"], ["EH1", "D", "AH0", "T", "IH0", "NG"]]

    edit_and_revert(model, inputs, fe.TokenTargets(labels), ["decoder", "fc"], "fx", check=decodes,
                    freeze="enc_emb.weight", editor=fe.RMSProp(1e-2), max_steps=60)
    other, _ = g2p_task(["a", "grapheme", "qu"], [["AH0"], ["G", "R", "AE1", "F", "IY2", "M"], ["K", "W"]])
    assert_split_exact(model, ["decoder", "fc"], [inputs, other], "fx")


def test_g2p_checkpoint_fixes_a_word(shared_models_dir, shared_data_dir):
    from fastedit.data import read_cmudict
    from fastedit.models.g2p import G2P, encode_words
    ckpt = shared_models_dir / "g2p-en" / "checkpoint20.npz"
    cmu = shared_data_dir / "g2p" / "cmudict.dict"
    if not ckpt.is_file() or not cmu.is_file():
        pytest.skip("the g2p-en checkpoint or CMUdict is not there")
    model = G2P.from_checkpoint(ckpt)
    prons = read_cmudict(cmu)
    words = sorted(w for w in prons if w.isalpha() and w.isascii() and 4 <= len(w) <= 7)[::500][:64]
    predicted = model.greedy_decode(encode_words(words))
    wrong = [(w, p) for w, p in zip(words, predicted) if p != prons[w]]
    assert wrong, "the pretrained model spells every probed word right"
    word, before = wrong[0]
    inputs, labels = g2p_task([word], [prons[word]])

    def spelled(m):
        assert m.predict(word) == prons[word]

    edit_and_revert(model, inputs, fe.TokenTargets(labels), "decoder", "fx", check=spelled, freeze="fc.weight",
                    max_steps=20)
    assert model.predict(word) == before
    pair = [w for w in words if len(w) != len(word)][:2]  # another batch size and length
    other, _ = g2p_task(pair, [prons[w] for w in pair])
    assert_split_exact(model, "decoder", [inputs, other], "fx")


# ------------------------------------------------------------------------------------------------
# (f) the real MiniLM (all-MiniLM-L6-v2) with its tokenizer, 64-token padded inputs
# ------------------------------------------------------------------------------------------------
def test_minilm_checkpoint(shared_models_dir):
    path = shared_models_dir / "all-MiniLM-L6-v2"
    if not (path / "model.safetensors").is_file():
        pytest.skip("all-MiniLM-L6-v2 is not there")
    torch.manual_seed(0)  # the classification head is new: fixed random weights
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["the film was a delight from start to finish", "a dull, plodding story with no surprises"]
    inputs = [tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
              for n in (64, 24)]
    assert inputs[0]["input_ids"].shape == (2, 64) and bool((inputs[0]["attention_mask"] == 0).any())
    model.eval()
    with torch.no_grad():  # a wider head than the default init (std 0.02), so the edit takes steps
        model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        y = wrong_labels(model(**inputs[0]).logits)
    edit_and_revert(model, inputs[0], y, "bert.encoder.layer.5", "call-cache",
                    freeze="bert.embeddings.word_embeddings.weight", max_steps=20)
    assert_split_exact(model, "bert.encoder.layer.5", inputs, "call-cache")


# ------------------------------------------------------------------------------------------------
# an optional argument left None is a constant of the fx trace, not a traced value
# ------------------------------------------------------------------------------------------------
class MaskedPool(nn.Module):
    """fx-traceable; branches on ``mask is not None`` (masked mean pool, else plain mean)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, mask=None):
        h = torch.relu(self.inp(x))
        if mask is not None:
            pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        else:
            pooled = h.mean(1)
        return self.head(torch.relu(self.mid(pooled)))


def masked_batch(length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, 6, generator=g)
    mask = torch.ones(3, length)
    mask[1, length - 2:] = 0
    mask[2, 2:] = 0
    return x, mask


def test_optional_none_argument_is_a_trace_constant():
    torch.manual_seed(0)
    model = MaskedPool().eval()
    plain = [masked_batch(n, n)[0] for n in (7, 4)]
    masked = [dict(zip(("x", "mask"), masked_batch(n, n))) for n in (7, 4)]
    with torch.no_grad():  # the mask matters
        assert not torch.equal(model(plain[0]), model(**masked[0]))
    for inputs in (plain, masked):  # the unmasked split first: a traced None must not leak into the masked one
        with torch.no_grad():
            y = wrong_labels(call(model, inputs[0]))
        edit_and_revert(model, inputs[0], y, "mid", "fx", freeze="inp.weight", editor=fe.RMSProp(1e-2),
                        max_steps=40)
    for inputs in (plain, masked):
        assert_split_exact(model, "mid", inputs, "fx")
    # mask given positionally and as None explicitly: the same splits as above
    x, mask = masked_batch(5, 0)
    assert_split_exact(model, "mid", [(x, mask)], "fx")
    assert_split_exact(model, "mid", [{"x": x, "mask": None}], "fx")


# ------------------------------------------------------------------------------------------------
# tied weights: GPT-2's lm_head.weight is transformer.wte.weight
# ------------------------------------------------------------------------------------------------
def test_tied_weights_gpt2():
    model = small_gpt2().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    labels = torch.full_like(ids, -100)
    with torch.no_grad():
        labels[:, 5:] = (model(input_ids=ids).logits[:, 4:7].argmax(-1) + 1) % 64
    before = full_state(model)
    w0 = model.lm_head.weight.detach().clone()
    r = fe.edit(model, {"input_ids": ids}, fe.TokenTargets(labels, causal=True), params="lm_head",
                editor=fe.RMSProp(1e-2), max_steps=40)
    assert r.success and r.steps >= 1 and r.prefix_used
    assert r.param_names == ["transformer.wte.weight"]
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor
    assert not torch.equal(model.lm_head.weight, w0) and not torch.equal(model.transformer.wte.weight, w0)
    changed = {k for k, v in snapshot(model).items() if not torch.equal(v, before["state"][k])}
    assert changed <= {"transformer.wte.weight", "lm_head.weight"} and "transformer.wte.weight" in changed
    with torch.no_grad():
        assert_satisfied(model(input_ids=ids).logits, fe.TokenTargets(labels, causal=True))
    r.revert()
    assert_same_state(model, before)
    assert torch.equal(model.lm_head.weight, w0) and model.lm_head.weight is model.transformer.wte.weight
    # any alias selects it once
    assert EditTarget.build(model, ["lm_head", "transformer.wte"]).names == ["transformer.wte.weight"]


# ------------------------------------------------------------------------------------------------
# dtypes: an fp16 head on an fp32 body; a float64 input to a float32 model
# ------------------------------------------------------------------------------------------------
class HalfHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4).half()

    def forward(self, x):
        return self.head(self.body(x).half())


def test_fp16_head_on_fp32_body():
    torch.manual_seed(0)
    model = HalfHead().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = wrong_labels(model(x))
    r = edit_and_revert(model, x, y, "head", "fx", freeze="body.0.weight", editor=fe.RMSProp(1e-2), max_steps=40)
    assert r.param_names == ["head.weight", "head.bias"]
    assert model.head.weight.dtype == torch.float16 and model.body[0].weight.dtype == torch.float32


@pytest.mark.parametrize("family", ["fx", "call-cache"])
def test_float64_input_to_float32_model_is_a_value_error(family):
    torch.manual_seed(0)
    if family == "fx":
        model, params, x = MaskedPool().eval(), "mid", masked_batch(5, 0)[0]
    else:  # inputs_embeds: the float input of an HF model
        model, params = small_bert(num_labels=3).eval(), "bert.encoder.layer.1"
        x = {"inputs_embeds": torch.randn(2, 5, 32), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    y = torch.zeros(ModelInputs.of(x).num_samples, dtype=torch.long)
    assert fe.edit(model, x, y, params=params, max_steps=0, on_failure="keep").prefix_used  # float32 is fine
    before = full_state(model)
    bad = x.double() if isinstance(x, torch.Tensor) else {**x, "inputs_embeds": x["inputs_embeds"].double()}
    with pytest.raises(ValueError, match=r"(?s)float64.*float32"):
        fe.edit(model, bad, y, params=params)
    assert_same_state(model, before)


# ------------------------------------------------------------------------------------------------
# output=: where the logits are
# ------------------------------------------------------------------------------------------------
class DictOut(nn.Module):
    def __init__(self, as_tuple=False):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)
        self.as_tuple = as_tuple

    def forward(self, x):
        h = torch.tanh(self.body(x))
        z = self.head(h)
        return (h, z) if self.as_tuple else {"features": h, "scores": z}


@pytest.mark.parametrize("output", ["scores", "callable", 1])
def test_output_selects_the_logits(output):
    torch.manual_seed(0)
    model = DictOut(as_tuple=output == 1).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = wrong_labels(model.head(torch.tanh(model.body(x))))
    before = full_state(model)
    if output != 1:  # the default reads "logits", which this model does not return
        with pytest.raises(ValueError, match=r"(?s)logits.*features.*scores"):
            fe.edit(model, x, y, params="head")
        assert_same_state(model, before)
    spec = (lambda out: out["scores"]) if output == "callable" else output
    edit_and_revert(model, x, y, "head", "fx", freeze="body.weight", output=spec, editor=fe.RMSProp(1e-2),
                    max_steps=40)
    assert_split_exact(model, "head", [x, x[:2, :]], "fx", output=spec)


# ------------------------------------------------------------------------------------------------
# bad input leaves the model bit-identical (state, modes, requires_grad), on an fx and a
# call-cache model
# ------------------------------------------------------------------------------------------------
def token_bert():
    model = small_bert(transformers.BertForTokenClassification, num_labels=5).eval()
    inputs = bert_batch(8, rows=2, seed=3)
    with torch.no_grad():
        labels = wrong_labels(model(**inputs).logits)
    labels[inputs["attention_mask"] == 0] = -100
    labels[:, 0] = -100  # [CLS]
    labels[:, 4:] = -100
    return model, inputs, labels, "bert.encoder.layer.1", "bert.embeddings.word_embeddings.weight"


def token_gru():
    torch.manual_seed(0)
    model = GRUSeq2Seq().eval()
    inputs, labels = gru_task(model)
    return model, inputs, labels, "decoder", "src_emb.weight"


def bad_case(case, inputs, labels):
    """``(inputs, target, keyword arguments, message pattern)`` of one kind of bad input; labels
    ``[2, T]`` are valid token targets for ``inputs`` (2 samples)."""
    target, kw = fe.TokenTargets, {}
    if case == "labels-shape":
        return inputs, lambda: target(labels[:, :-1]), kw, r"labels have shape"
    if case == "no-labelled-position":
        empty = labels.clone()
        empty[1] = -100
        return inputs, lambda: target(empty), kw, r"row 1 has no labelled position"
    if case == "causal-no-labelled-position":  # labelled only at t = 0, which the shift drops
        first = torch.full_like(labels, -100)
        first[:, 0] = 1
        return inputs, lambda: target(first, causal=True), kw, r"no labelled position after the causal shift"
    if case == "label-out-of-range":
        return inputs, lambda: target(torch.where(labels >= 0, 999, labels)), kw, r"label 999 is out of range"
    if case == "ranking-count":  # 2 rows, groups of 3
        return inputs, lambda: fe.SequenceRanking(labels, 3), kw, r"do not divide"
    if case == "missing-output-key":
        return inputs, lambda: target(labels), {"output": "scores"}, r"'scores'"
    if case == "sample-dims-disagree":
        if isinstance(inputs, tuple):
            bad = (inputs[0], torch.cat([inputs[1], inputs[1][:1]]))
            return bad, lambda: target(labels), kw, r"argument 0 has 2.*argument 1 has 3"
        bad = {**inputs, "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:1]])}
        return bad, lambda: target(labels), kw, r"input_ids has 2.*attention_mask has 3"
    if case == "target-rows":
        return inputs, lambda: target(torch.cat([labels, labels[:1]])), kw, r"3 rows.*2 samples"
    if case == "class-labels-for-tokens":
        return inputs, lambda: torch.tensor([0, 1]), kw, r"logits \[batch, classes\]"
    raise AssertionError(case)


BAD_INPUTS = ["labels-shape", "no-labelled-position", "causal-no-labelled-position", "label-out-of-range",
              "ranking-count", "missing-output-key", "sample-dims-disagree", "target-rows",
              "class-labels-for-tokens"]


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("family", ["bert", "gru"])
def test_bad_input_leaves_the_model_identical(family, case):
    model, inputs, labels, params, frozen = token_bert() if family == "bert" else token_gru()
    mixed_modes(model, frozen)
    before = full_state(model)
    bad_inputs, make_target, kw, match = bad_case(case, inputs, labels)
    if family == "gru" and case == "missing-output-key":  # a tensor output has no keys
        match = r"no such key or attribute"
    with pytest.raises(ValueError, match="(?s)" + match):
        fe.edit(model, bad_inputs, make_target(), params=params, **kw)
    assert_same_state(model, before)
    # and the model still edits normally afterwards
    r = fe.edit(model, inputs, fe.TokenTargets(labels), params=params, editor=fe.RMSProp(1e-2), max_steps=40)
    assert r.success and r.prefix_used
    r.revert()
    assert_same_state(model, before)


# ------------------------------------------------------------------------------------------------
# models the prefix cannot split: the whole model at every step, said once per model
# ------------------------------------------------------------------------------------------------
class Unsplittable(nn.Module):
    """fx cannot trace it (a branch on a value), and its first call, which ends before ``b`` is
    entered, reads ``b.weight``: a cached answer to it would go stale as ``b`` is edited."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 8)
        self.a = Borrower(self.b)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool(h.abs().sum() > 0):
            h = h * 2
        return self.head(torch.tanh(self.b(h)))


def test_unsplittable_model_falls_back_and_warns_once():
    torch.manual_seed(0)
    model = Unsplittable().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = wrong_labels(model(x))
    mixed_modes(model, "head.bias")
    before = full_state(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = fe.edit(model, x, y, params="b", editor=fe.RMSProp(1e-2), max_steps=40)
    assert r.success and r.steps >= 1 and not r.prefix_used and r.prefix_method == "none"
    assert "fx" in r.prefix_reason and "perturbed" in r.prefix_reason, r.prefix_reason
    found = _fallback_warnings(record)
    assert len(found) == 1 and r.prefix_reason in str(found[0].message)
    with eval_mode(model), torch.no_grad():  # the edit ran on the live model, not on stale answers
        assert_satisfied(model(x), y)
    assert_flags(model, before)
    r.revert()
    assert_same_state(model, before)
    with warnings.catch_warnings(record=True) as record:  # not again for this model
        warnings.simplefilter("always")
        r = fe.edit(model, x, (y + 1) % 3, params="b", editor=fe.RMSProp(1e-2), max_steps=40)
    assert r.success and not r.prefix_used and not _fallback_warnings(record)
    r.revert()
    assert_same_state(model, before)
    with pytest.warns(fe.PrefixFallbackWarning, match="perturbed"):  # another model: warned again
        fe.edit(Unsplittable().eval(), x, y, params="b", max_steps=1, on_failure="keep")


# ------------------------------------------------------------------------------------------------
# global module forward hooks: they run around answered calls as around calls, and the split
# stays exact (the call cache records inside forward, not with hooks)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def global_hook():
    """A global forward hook that changes every LayerNorm's output (so a replay that skipped it, or
    ran it twice, would differ) and counts the calls of BERT layers."""
    calls = []

    def hook(module, args, out):
        if isinstance(module, nn.LayerNorm):
            return out * 1.25
        if type(module).__name__ == "BertLayer":
            calls.append(module)
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("split_before_hook", [False, True], ids=["fresh", "split-built-before-the-hook"])
def test_global_module_hook(split_before_hook, request):
    model = small_bert(num_labels=3)
    params = "bert.encoder.layer.1"
    inputs = [bert_batch(10, seed=4), bert_batch(7, seed=5)]
    model.eval()
    if split_before_hook:  # the split is kept for the model's next edits
        with torch.no_grad():
            y = wrong_labels(model(**inputs[0]).logits)
        r = fe.edit(model, inputs[0], y, params=params, editor=fe.RMSProp(1e-2), max_steps=40)
        assert r.success and r.prefix_method == "call-cache"
        r.revert()
    with torch.no_grad():
        unhooked = model(**inputs[0]).logits
    calls = request.getfixturevalue("global_hook")
    with torch.no_grad():
        hooked = model(**inputs[0]).logits
    assert len(calls) == 2 and not torch.equal(hooked, unhooked)  # the hook runs and matters
    y = wrong_labels(hooked)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        edit_and_revert(model, inputs[0], y, params, "call-cache", freeze="bert.pooler.dense.bias",
                        editor=fe.RMSProp(1e-2), max_steps=40)
    assert not _fallback_warnings(record)
    assert_split_exact(model, params, inputs, "call-cache")  # under the hook, bit for bit


# ------------------------------------------------------------------------------------------------
# surgery and EWC editing with token targets
# ------------------------------------------------------------------------------------------------
def count_changed(model, before):
    now = snapshot(model)
    return sum(int((now[k] != v).sum()) for k, v in before.items())


@pytest.mark.parametrize("family", ["gru", "bert"])
def test_surgery_token_targets(family):
    model, inputs, labels, params, frozen = token_gru() if family == "gru" else token_bert()
    mixed_modes(model, frozen)
    before = full_state(model)
    target = fe.TokenTargets(labels)
    budget = 300
    r = fe.surgery(model, inputs, target, budget=budget, params=params, goal="edit", editor=fe.ScaledGD(0.3))
    assert r.success and r.applied and r.steps >= 1 and r.prefix_used
    assert 0 < r.nnz <= budget and count_changed(model, before["state"]) == r.nnz
    assert_flags(model, before)
    with eval_mode(model), torch.no_grad():
        assert_satisfied(logits_of(model, inputs), target)
    r.revert()
    assert_same_state(model, before)


@pytest.mark.parametrize("family", ["gru", "bert"])
def test_ewc_edit_token_targets(family):
    model, inputs, labels, params, frozen = token_gru() if family == "gru" else token_bert()
    mixed_modes(model, frozen)
    before = full_state(model)
    names = EditTarget.build(model, params).names
    if family == "bert":  # a Fisher from class labels at one position ([B, C] through output=)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # vmap cannot batch BERT: one sample at a time
            fisher = fe.baselines.fisher_diagonal(model, (inputs, labels[:, 1].clamp_min(0)), params=params,
                                                  output=lambda out: out.logits[:, 1])
        assert_same_state(model, before)
    else:
        g = torch.Generator().manual_seed(0)
        fisher = {n: torch.rand(model.get_parameter(n).shape, generator=g) for n in names}
    assert sorted(fisher) == sorted(names) and all(bool((f > 0).any()) for f in fisher.values())
    target = fe.TokenTargets(labels)
    r = fe.baselines.ewc_edit(model, inputs, target, fisher, ewc_lambda=0.1, params=params,
                              editor=fe.RMSProp(1e-2), max_steps=40)
    assert r.success and r.applied and r.steps >= 1 and r.penalty > 0 and r.prefix_used
    assert_flags(model, before)
    with eval_mode(model), torch.no_grad():
        assert_satisfied(logits_of(model, inputs), target)
    r.revert()
    assert_same_state(model, before)
