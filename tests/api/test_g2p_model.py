"""Tests for fastedit.models.g2p: the g2p-en GRU encoder-decoder against a numpy re-implementation
of the reference ``G2p.predict``, padding, fx / functional_call / double backward, and the
pretrained checkpoint's greedy accuracy on CMUdict."""
import random
import re

import numpy as np
import pytest
import torch
import torch.fx
from torch.func import functional_call

from fastedit.data import read_cmudict
from fastedit.models.g2p import (
    G2P,
    GRAPHEME_EOS,
    GRAPHEME_PAD,
    GRAPHEME_UNK,
    GRAPHEMES,
    IGNORE_INDEX,
    PHONEME_EOS,
    PHONEME_PAD,
    PHONEME_SOS,
    PHONEME_UNK,
    PHONEMES,
    encode_phonemes,
    encode_words,
    load_g2p,
)

WORDS = ["a", "cat", "editing", "grapheme", "xylophone", "qu", "zzzz", "antidisestablishment"]


# --- numpy reference: the arithmetic of g2p_en 2.1.0 G2p.grucell / gru / predict -------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _grucell(x, h, w_ih, w_hh, b_ih, b_hh):
    rzn_ih = x @ w_ih.T + b_ih
    rzn_hh = h @ w_hh.T + b_hh
    k = rzn_ih.shape[-1] * 2 // 3
    r, z = np.split(_sigmoid(rzn_ih[:, :k] + rzn_hh[:, :k]), 2, -1)
    n = np.tanh(rzn_ih[:, k:] + r * rzn_hh[:, k:])
    return (1 - z) * n + z * h


def _np_encode(v: dict, word: str) -> np.ndarray:
    h = np.zeros((1, v["enc_w_hh"].shape[1]), np.float32)
    for i in [GRAPHEMES.index(c) for c in word] + [GRAPHEME_EOS]:
        h = _grucell(v["enc_emb"][[i]], h, v["enc_w_ih"], v["enc_w_hh"], v["enc_b_ih"], v["enc_b_hh"])
    return h


def _np_step(v: dict, tok: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = _grucell(v["dec_emb"][[tok]], h, v["dec_w_ih"], v["dec_w_hh"], v["dec_b_ih"], v["dec_b_hh"])
    return h @ v["fc_w"].T + v["fc_b"], h


def np_predict(v: dict, word: str) -> list[str]:
    h, tok, preds = _np_encode(v, word), PHONEME_SOS, []
    for _ in range(20):
        logits, h = _np_step(v, tok, h)
        tok = int(logits.argmax())
        if tok == PHONEME_EOS:
            break
        preds.append(PHONEMES[tok])
    return preds


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


def np_beam_search(v: dict, word: str, k: int, max_len: int = 20) -> list[tuple[list[str], float]]:
    """The shrinking-beam rule of ``G2P.beam_search``, one word, one hypothesis at a time."""
    live = [([], 0.0, _np_encode(v, word), PHONEME_SOS)]  # (phoneme ids, score, hidden, last token)
    done: list[tuple[list[str], float]] = []
    for _ in range(max_len):
        if not live:
            break
        cands = []
        for rank, (ids, score, h, tok) in enumerate(live):
            logits, h2 = _np_step(v, tok, h)
            for t, lp in enumerate(_log_softmax(logits[0])):
                cands.append((score + lp, rank, t, ids, h2))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        live = []
        for score, _, t, ids, h2 in cands[: k - len(done)]:
            if t == PHONEME_EOS:
                done.append(([PHONEMES[i] for i in ids], score))
            else:
                live.append((ids + [t], score, h2, t))
    done += [([PHONEMES[i] for i in ids], score) for ids, score, _, _ in live]
    return sorted(done, key=lambda d: -d[1])


def np_teacher_logits(v: dict, word: str, dec_in: list[int]) -> np.ndarray:
    h, out = _np_encode(v, word), []
    for tok in dec_in:
        logits, h = _np_step(v, tok, h)
        out.append(logits[0])
    return np.stack(out)


# --- fixtures ----------------------------------------------------------------------------------------


def _random_arrays(hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"enc_emb": (len(GRAPHEMES), hidden), "dec_emb": (len(PHONEMES), hidden)}
    for side in ("enc", "dec"):
        shapes |= {f"{side}_w_ih": (3 * hidden, hidden), f"{side}_w_hh": (3 * hidden, hidden)}
        shapes |= {f"{side}_b_ih": (3 * hidden,), f"{side}_b_hh": (3 * hidden,)}
    shapes |= {"fc_w": (len(PHONEMES), hidden), "fc_b": (len(PHONEMES),)}
    arrays = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
    arrays["fc_b"][PHONEME_EOS] += 0.5  # some random-model words stop at </s>, some run 20 steps
    return arrays


@pytest.fixture
def random_g2p(tmp_path) -> tuple[G2P, dict[str, np.ndarray]]:
    """A small random model built from an npz (so from_checkpoint is exercised) and its arrays."""
    arrays = _random_arrays(hidden=16)
    np.savez(tmp_path / "ckpt.npz", **arrays)
    return G2P.from_checkpoint(tmp_path / "ckpt.npz"), arrays


@pytest.fixture(scope="module")
def checkpoint(shared_models_dir):
    path = shared_models_dir / "g2p-en" / "checkpoint20.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def cmudict(shared_data_dir) -> dict[str, list[str]]:
    path = shared_data_dir / "g2p" / "cmudict.dict"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return read_cmudict(path)


def _batch(words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    # teacher-forcing inputs of varied lengths: the first len(word) phonemes of a fixed cycle
    prons = [[PHONEMES[4 + (i + j) % 70] for j in range(len(w))] for i, w in enumerate(words)]
    return encode_words(words), encode_phonemes(prons)[0]


# --- vocabularies and encoders ------------------------------------------------------------------------


def test_vocabularies():
    assert len(GRAPHEMES) == 29 and len(PHONEMES) == 74 and len(set(PHONEMES)) == 74
    assert [GRAPHEMES[i] for i in (GRAPHEME_PAD, GRAPHEME_UNK, GRAPHEME_EOS)] == ["<pad>", "<unk>", "</s>"]
    assert [PHONEMES[i] for i in (PHONEME_PAD, PHONEME_UNK, PHONEME_SOS, PHONEME_EOS)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert PHONEMES[4:7] == ("AA0", "AA1", "AA2") and PHONEMES[-1] == "ZH" and "UW" in PHONEMES


def test_encode_words_round_trip():
    src = encode_words(["Cat", "a-b", ""])
    assert src.dtype == torch.long and src.shape == (3, 4)
    assert src.tolist() == [
        [GRAPHEMES.index(c) for c in "cat"] + [GRAPHEME_EOS],
        [GRAPHEMES.index("a"), GRAPHEME_UNK, GRAPHEMES.index("b"), GRAPHEME_EOS],
        [GRAPHEME_EOS, GRAPHEME_PAD, GRAPHEME_PAD, GRAPHEME_PAD],
    ]
    words = ["hello", "xylophone", "q"]
    decoded = ["".join(GRAPHEMES[i] for i in row if i > GRAPHEME_EOS) for row in encode_words(words).tolist()]
    assert decoded == words


def test_encode_phonemes_round_trip():
    prons = [["K", "AE1", "T"], ["AH0"], []]
    dec_in, labels = encode_phonemes(prons)
    assert dec_in.shape == labels.shape == (3, 4) and dec_in.dtype == labels.dtype == torch.long
    assert dec_in[:, 0].tolist() == [PHONEME_SOS] * 3
    for row, pron in enumerate(prons):
        n = len(pron)
        assert [PHONEMES[i] for i in dec_in[row, 1 : n + 1].tolist()] == pron
        assert [PHONEMES[i] for i in labels[row, :n].tolist()] == pron
        assert labels[row, n] == PHONEME_EOS
        assert (labels[row, n + 1 :] == IGNORE_INDEX).all() and (dec_in[row, n + 1 :] == PHONEME_PAD).all()
    bare, labels2 = encode_phonemes(prons, add_sos=False)
    assert torch.equal(labels2, labels) and bare.shape == labels.shape
    assert bare[0].tolist() == [PHONEMES.index(p) for p in ("K", "AE1", "T")] + [PHONEME_PAD]
    with pytest.raises(ValueError, match="'AH'"):
        encode_phonemes([["K", "AH", "T"]])


# --- against the numpy reference, random weights -----------------------------------------------------


def test_matches_numpy_reference(random_g2p):
    model, arrays = random_g2p
    assert not model.training and model.fc.weight.dtype == torch.float32
    preds = [model.predict(w) for w in WORDS]
    assert preds == [np_predict(arrays, w) for w in WORDS]
    assert model.greedy_decode(encode_words(WORDS)) == preds  # batched = one by one
    assert any(len(p) < 20 for p in preds) and any(len(p) == 20 for p in preds)  # both stopping rules
    src, dec_in = _batch(WORDS)
    with torch.no_grad():
        logits = model(src, dec_in)
    assert logits.shape == (len(WORDS), dec_in.shape[1], len(PHONEMES))
    for row, word in enumerate(WORDS):
        ref = np_teacher_logits(arrays, word, dec_in[row].tolist())
        np.testing.assert_allclose(logits[row].numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_beam_search_matches_numpy_reference(random_g2p, k):
    model, arrays = random_g2p
    got = model.beam_search(encode_words(WORDS), beam_size=k, max_len=12)
    assert len(got) == len(WORDS)
    for word, hyps in zip(WORDS, got):
        ref = np_beam_search(arrays, word, k, max_len=12)
        assert [p for p, _ in hyps] == [p for p, _ in ref], word
        np.testing.assert_allclose([s for _, s in hyps], [s for _, s in ref], atol=1e-4, rtol=0)
        assert len(hyps) == k and all(a[1] >= b[1] for a, b in zip(hyps, hyps[1:]))
    if k == 1:  # a beam of one is greedy decoding
        assert [h[0][0] for h in got] == model.greedy_decode(encode_words(WORDS), max_len=12)
    lengths = [len(p) for hyps in got for p, _ in hyps]
    assert min(lengths) < 12 and max(lengths) == 12  # both endings: </s> and out of steps


def test_beam_search_scores_are_teacher_forced_log_probs(random_g2p):
    model, _ = random_g2p
    hyps = model.beam_search(encode_words(["editing"]), beam_size=4, n_best=2)[0]
    assert len(hyps) == 2
    for phonemes, score in hyps:
        dec_in, labels = encode_phonemes([phonemes])
        with torch.no_grad():
            logp = model(encode_words(["editing"]), dec_in).log_softmax(-1)[0]
        n = len(phonemes) + (len(phonemes) < 20)  # </s> counts unless the hypothesis ran out of steps
        assert score == pytest.approx(logp[torch.arange(n), labels[0, :n]].sum().item(), abs=1e-4)


def test_beam_search_bad_arguments():
    model = G2P(hidden=8).eval()
    src = encode_words(["ab"])
    for kwargs in ({"beam_size": 0}, {"beam_size": 2, "n_best": 3}, {"n_best": 0}, {"max_len": -1}, {"beam_size": True}):
        with pytest.raises(ValueError):
            model.beam_search(src, **kwargs)


def test_sample_follows_the_model_distribution(random_g2p):
    model, arrays = random_g2p
    src = encode_words(["cat"] * 4000)
    first = [p[0] if p else "</s>" for p in model.sample(src, max_len=1, generator=torch.Generator().manual_seed(0))]
    probs = np.exp(_log_softmax(_np_step(arrays, PHONEME_SOS, _np_encode(arrays, "cat"))[0][0]))
    counts = np.array([first.count(p) for p in PHONEMES]) / len(first)
    counts[PHONEME_EOS] = first.count("</s>") / len(first)
    assert np.abs(counts - probs).max() < 4 * np.sqrt(probs.max() / len(first))  # within 4 sigma
    again = model.sample(src[:50], generator=torch.Generator().manual_seed(3))
    assert again == model.sample(src[:50], generator=torch.Generator().manual_seed(3))  # seeded
    assert any(len(p) < 20 for p in again)
    cold = model.sample(encode_words(WORDS), temperature=1e-4, generator=torch.Generator().manual_seed(1))
    assert cold == model.greedy_decode(encode_words(WORDS))  # temperature → 0 is greedy
    with pytest.raises(ValueError, match="temperature"):
        model.sample(src[:1], temperature=0)


def test_save_checkpoint_round_trip(tmp_path):
    model = G2P(hidden=8)
    model.save_checkpoint(tmp_path / "m.npz")
    again = G2P.from_checkpoint(tmp_path / "m.npz")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with np.load(tmp_path / "m.npz") as npz:
        assert sorted(npz.files) == sorted(_random_arrays(8))


def test_greedy_decode_max_len():
    model = G2P(hidden=8).eval()
    with torch.no_grad():
        model.fc.bias.zero_()
        model.fc.weight.zero_()
        model.fc.bias[PHONEMES.index("K")] = 1.0
    assert model.greedy_decode(encode_words(["ab", "c"]), max_len=3) == [["K"] * 3] * 2
    assert model.greedy_decode(encode_words(["ab"]), max_len=0) == [[]]
    with torch.no_grad():
        model.fc.bias[PHONEME_EOS] = 2.0
    assert model.predict("ab") == []


def test_padding_invariance():
    model = G2P(hidden=32).eval()
    src, dec_in = _batch(WORDS)
    assert (src == GRAPHEME_PAD).any() and (dec_in == PHONEME_PAD).any()
    with torch.no_grad():
        batched = model(src, dec_in)
        for row, word in enumerate(WORDS):
            alone = model(encode_words([word]), dec_in[row : row + 1, : len(word) + 1])[0]
            torch.testing.assert_close(batched[row, : len(word) + 1], alone, atol=1e-6, rtol=0)


# --- transforms -----------------------------------------------------------------------------------------


def test_fx_trace():
    model = G2P(hidden=8).eval()
    traced = torch.fx.symbolic_trace(model)
    src, dec_in = _batch(WORDS)
    with torch.no_grad():
        assert torch.equal(traced(src, dec_in), model(src, dec_in))


def test_functional_call_replaces_fc_weight():
    model = G2P(hidden=8)
    src, dec_in = _batch(WORDS[:3])
    params = dict(model.named_parameters())
    params["fc.weight"] = torch.zeros_like(model.fc.weight, requires_grad=True)
    logits = functional_call(model, params, (src, dec_in))
    torch.testing.assert_close(logits, model.fc.bias.expand_as(logits))
    (grad,) = torch.autograd.grad(logits.square().sum(), params["fc.weight"])
    assert grad.abs().sum() > 0


def test_double_backward():
    model = G2P(hidden=8).double()
    dec_in, labels = encode_phonemes([["K", "AE1", "T"], ["AH0"], ["T", "IY1"]])
    logits = model(encode_words(["cat", "a", "tea"]), dec_in)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    (g,) = torch.autograd.grad(loss, model.fc.weight, create_graph=True)
    g.square().sum().backward()  # grad of grad reaches the encoder through the GRUs
    assert model.encoder.weight_hh_l0.grad is not None and model.encoder.weight_hh_l0.grad.abs().sum() > 0


# --- the pretrained checkpoint --------------------------------------------------------------------------


def test_checkpoint_matches_reference(checkpoint, cmudict):
    model = load_g2p(checkpoint)
    assert not model.training
    assert model.enc_emb.weight.shape == (29, 256) and model.dec_emb.weight.shape == (74, 256)
    assert model.encoder.weight_ih_l0.shape == model.decoder.weight_hh_l0.shape == (768, 256)
    assert model.fc.weight.shape == (74, 256) and model.fc.bias.shape == (74,)
    with np.load(checkpoint) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.testing.assert_array_equal(model.decoder.bias_ih_l0.detach().numpy(), arrays["dec_b_ih"])
    words = random.Random(1).sample(sorted(w for w in cmudict if re.fullmatch("[a-z]+", w)), 20)
    assert model.greedy_decode(encode_words(words)) == [np_predict(arrays, w) for w in words]


def test_checkpoint_greedy_accuracy(checkpoint, cmudict):
    # the sampling rule quoted in the module docstring
    words = sorted(w for w in cmudict if re.fullmatch("[a-z]+", w))
    sample = random.Random(0).sample(words, 500)
    preds = load_g2p(checkpoint).greedy_decode(encode_words(sample))
    accuracy = sum(p == cmudict[w] for p, w in zip(preds, sample)) / len(sample)
    print(f"g2p-en greedy word accuracy on 500 CMUdict words: {accuracy:.1%}")
    assert 0.55 <= accuracy <= 0.85
