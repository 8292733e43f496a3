"""The pretrained g2p-en grapheme-to-phoneme model as a torch module.

Provenance: the GRU encoder-decoder shipped with ``g2p_en`` 2.1.0 (Kyubyong Park and Jongseok Kim,
https://github.com/Kyubyong/g2p, Apache-2.0), file ``checkpoint20.npz``, trained on CMUdict. The
original runs it in numpy (``G2p.predict``); :class:`G2P` loads the same arrays into torch modules
so the model can be edited like any other network.

Layout (``H`` = 256 in the checkpoint; embedding width = hidden width)::

    enc_emb   Embedding(29, H)    graphemes: <pad> <unk> </s> a..z
    encoder   GRU(H, H)           reads the letters then </s>, from a zero hidden state
    dec_emb   Embedding(74, H)    phonemes: <pad> <unk> <s> </s> + 70 ARPAbet symbols (stress kept)
    decoder   GRU(H, H)           starts from the encoder's hidden state after </s>
    fc        Linear(H, 74)       next-phoneme logits

Gate order (r, z, n) and the two biases of the checkpoint are PyTorch's, so the arrays copy one to
one into ``nn.GRU`` (``enc_w_ih`` -> ``encoder.weight_ih_l0`` and so on).

Tensors (int64 ids, batch first): ``src [B, S]`` = a word's letters then ``</s>``, right-padded with
``<pad>`` = 0 (:func:`encode_words`); ``dec_in [B, T]`` = ``<s>`` then the phonemes and ``labels
[B, T]`` = the phonemes then ``</s>``, padded with 0 and -100 (:func:`encode_phonemes`);
``G2P(src, dec_in)`` returns teacher-forced logits ``[B, T, 74]``.

Decoding rule (the reference ``G2p.predict``): feed ``<s>`` (index 2), take the argmax phoneme,
feed it back, and stop before the first ``</s>`` (index 3) or after ``max_len`` = 20 steps,
whichever comes first; every other index, special tokens included, is emitted as its symbol.
Unlike the reference, :func:`encode_words` lower-cases the word first (the reference maps upper-case
letters to ``<unk>``).

Greedy accuracy, measured: 70.4% of 500 CMUdict words spelled exactly as their first pronunciation
(stress digits kept). Sample: the words of ``cmudict.dict`` made of the letters a-z only, sorted,
then ``random.Random(0).sample(words, 500)`` (see ``tests/api/test_g2p_model.py``); 67.7% of the
11,750 words of :func:`fastedit.data.load_cmudict`'s test split, 69.1% with a beam of 5
(``benchmarks/results/g2p_editing/model.json``).

Decoders: :meth:`G2P.greedy_decode` (the reference rule), :meth:`G2P.beam_search` (n-best with
log-probabilities) and :meth:`G2P.sample` (ancestral sampling).

Double backward goes through ``nn.GRU`` on CPU; on CUDA, cuDNN's RNN has no double backward, so run
such code under ``torch.backends.cudnn.flags(enabled=False)``.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from torch import nn

from .resnet_cifar import load_state_dict_strict

__all__ = [
    "GRAPHEMES",
    "PHONEMES",
    "GRAPHEME_PAD",
    "GRAPHEME_UNK",
    "GRAPHEME_EOS",
    "PHONEME_PAD",
    "PHONEME_UNK",
    "PHONEME_SOS",
    "PHONEME_EOS",
    "IGNORE_INDEX",
    "G2P",
    "load_g2p",
    "encode_words",
    "encode_phonemes",
]

GRAPHEMES: tuple[str, ...] = ("<pad>", "<unk>", "</s>") + tuple("abcdefghijklmnopqrstuvwxyz")
PHONEMES: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>") + (
    "AA0", "AA1", "AA2", "AE0", "AE1", "AE2", "AH0", "AH1", "AH2", "AO0",
    "AO1", "AO2", "AW0", "AW1", "AW2", "AY0", "AY1", "AY2", "B", "CH", "D", "DH",
    "EH0", "EH1", "EH2", "ER0", "ER1", "ER2", "EY0", "EY1",
    "EY2", "F", "G", "HH",
    "IH0", "IH1", "IH2", "IY0", "IY1", "IY2", "JH", "K", "L",
    "M", "N", "NG", "OW0", "OW1",
    "OW2", "OY0", "OY1", "OY2", "P", "R", "S", "SH", "T", "TH",
    "UH0", "UH1", "UH2", "UW",
    "UW0", "UW1", "UW2", "V", "W", "Y", "Z", "ZH",
)
GRAPHEME_PAD, GRAPHEME_UNK, GRAPHEME_EOS = 0, 1, 2
PHONEME_PAD, PHONEME_UNK, PHONEME_SOS, PHONEME_EOS = 0, 1, 2, 3
#: Label padding, the ``ignore_index`` of ``F.cross_entropy`` (and HuggingFace).
IGNORE_INDEX = -100

_G2IDX = {g: i for i, g in enumerate(GRAPHEMES)}
_P2IDX = {p: i for i, p in enumerate(PHONEMES)}

# checkpoint array -> state-dict name
_NPZ_NAMES = {
    "enc_emb": "enc_emb.weight",
    "enc_w_ih": "encoder.weight_ih_l0",
    "enc_w_hh": "encoder.weight_hh_l0",
    "enc_b_ih": "encoder.bias_ih_l0",
    "enc_b_hh": "encoder.bias_hh_l0",
    "dec_emb": "dec_emb.weight",
    "dec_w_ih": "decoder.weight_ih_l0",
    "dec_w_hh": "decoder.weight_hh_l0",
    "dec_b_ih": "decoder.bias_ih_l0",
    "dec_b_hh": "decoder.bias_hh_l0",
    "fc_w": "fc.weight",
    "fc_b": "fc.bias",
}


class G2P(nn.Module):
    """GRU encoder-decoder from graphemes to phonemes (see the module docstring for the layout).

    ``forward(src, dec_in)`` is teacher forcing: ``src [B, S]`` grapheme ids (letters then ``</s>``,
    right-padded with ``<pad>``), ``dec_in [B, T]`` phoneme ids (``<s>`` then the targets, right-
    padded); returns logits ``[B, T, num_phonemes]``. A row's result does not depend on the padding.
    ``forward`` has no value-dependent control flow, so it traces with ``torch.fx`` and runs under
    ``torch.func.functional_call``.
    """

    def __init__(self, hidden: int = 256, num_graphemes: int = len(GRAPHEMES), num_phonemes: int = len(PHONEMES)) -> None:
        super().__init__()
        for name, v in (("hidden", hidden), ("num_graphemes", num_graphemes), ("num_phonemes", num_phonemes)):
            if int(v) < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        self.enc_emb = nn.Embedding(num_graphemes, hidden)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.dec_emb = nn.Embedding(num_phonemes, hidden)
        self.decoder = nn.GRU(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_phonemes)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """The decoder's initial hidden state ``[1, B, H]``: the encoder state at each row's last non-pad step."""
        out = self.encoder(self.enc_emb(src))[0]  # [B, S, H]
        # Right padding runs the GRU past a row's end; pick the state before that instead of
        # packing the sequence, which functional_call, double backward and fx do not all support.
        last = (src != GRAPHEME_PAD).sum(1) - 1
        h = out.gather(1, last.view(-1, 1, 1).expand(-1, 1, out.size(-1)))  # [B, 1, H]
        return h.transpose(0, 1).contiguous()

    def forward(self, src: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.dec_emb(dec_in), self.encode(src))[0]  # [B, T, H]
        return self.fc(out)

    def _decode(self, src: torch.Tensor, max_len: int, next_token) -> list[list[str]]:
        """Feed ``<s>``, then each step's token from ``next_token(logits [B, V]) -> [B]``, until every row
        has emitted ``</s>`` or ``max_len`` steps; each row's phonemes before its first ``</s>``."""
        src = src.to(self.fc.weight.device)
        h = self.encode(src)
        tok = src.new_full((src.size(0), 1), PHONEME_SOS)
        ids = src.new_full((src.size(0), max_len), PHONEME_EOS)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for t in range(max_len):
            out, h = self.decoder(self.dec_emb(tok), h)
            tok = next_token(self.fc(out)[:, 0]).unsqueeze(1)  # [B, 1]
            ids[:, t] = tok[:, 0]  # what follows a row's first </s> is cut off below
            done |= tok[:, 0] == PHONEME_EOS
            if done.all():
                break
        return [[PHONEMES[i] for i in itertools.takewhile(lambda i: i != PHONEME_EOS, row)] for row in ids.tolist()]

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int = 20) -> list[list[str]]:
        """Greedy phonemes for each row of ``src [B, S]``, by the reference rule (module docstring)."""
        return self._decode(src, max_len, lambda logits: logits.argmax(-1))

    @torch.no_grad()
    def sample(self, src: torch.Tensor, max_len: int = 20, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[list[str]]:
        """Ancestral samples, one per row of ``src [B, S]``: from ``<s>``, each phoneme drawn from
        ``softmax(logits / temperature)`` (``torch.multinomial`` with ``generator``), until ``</s>`` or
        ``max_len`` steps. The official Editable MT code draws the desired outputs of its training edits so."""
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        return self._decode(src, max_len, lambda logits: torch.multinomial(
            torch.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0])

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam_size: int = 4, n_best: int | None = None,
                    max_len: int = 20) -> list[list[tuple[list[str], float]]]:
        """The ``n_best`` (default ``beam_size``) pronunciations of each row of ``src [B, S]`` with scores.

        A hypothesis's score is the sum of its tokens' log-probabilities, its ``</s>`` included. Rule
        (a shrinking beam): from ``<s>``, each step extends every live hypothesis by every phoneme and
        keeps the ``beam_size − f`` best extensions, where ``f`` hypotheses have finished so far (ties
        by hypothesis rank, then phoneme index); a kept extension ending in ``</s>`` finishes
        (``</s>`` is not part of its phonemes), and after ``max_len`` steps the live ones finish as
        they are. So ``beam_size`` hypotheses finish per row; they are returned best first as
        ``(phonemes, score)``, ties in finishing order. ``beam_size=1`` is greedy decoding.
        """
        for name, v in (("beam_size", beam_size), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "beam_size" else 0):
                raise ValueError(f"{name} must be an integer ≥ {1 if name == 'beam_size' else 0}, got {v!r}")
        n_best = beam_size if n_best is None else n_best
        if isinstance(n_best, bool) or not isinstance(n_best, int) or not 1 <= n_best <= beam_size:
            raise ValueError(f"n_best must be an integer in [1, beam_size={beam_size}], got {n_best!r}")
        src = src.to(self.fc.weight.device)
        b, k, v = src.size(0), beam_size, self.fc.out_features
        h = self.encode(src).repeat_interleave(k, dim=1)  # [1, B*k, H], slot-major within a row
        score = torch.full((b, k), float("-inf"), device=src.device)
        score[:, 0] = 0.0  # one live hypothesis (<s>) per row at the start
        tokens = src.new_full((b, k, 1), PHONEME_SOS)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        budget = torch.full((b,), k, device=src.device)  # beam_size − finished so far
        for _ in range(max_len):
            if not (budget > 0).any():
                break
            out, h = self.decoder(self.dec_emb(tokens[:, :, -1].reshape(b * k, 1)), h)
            logp = torch.log_softmax(self.fc(out).float(), -1).view(b, k, v)
            cand = (score.unsqueeze(-1) + logp).view(b, k * v)  # dead slots stay -inf
            top, order = cand.sort(dim=-1, descending=True, stable=True)
            top, order = top[:, :k], order[:, :k]
            keep = torch.arange(k, device=src.device) < budget.unsqueeze(1)
            slot, tok = order // v, order % v
            ends = keep & (tok == PHONEME_EOS)
            for row, j in ends.nonzero().tolist():
                finished[row].append((top[row, j].item(), tokens[row, slot[row, j], 1:].tolist()))
            live = keep & ~ends
            budget = budget - ends.sum(1)
            score = torch.where(live, top, float("-inf"))
            tokens = torch.cat([tokens.gather(1, slot.unsqueeze(-1).expand(-1, -1, tokens.size(-1))),
                                tok.unsqueeze(-1)], dim=-1)
            h = h.view(1, b, k, -1).gather(2, slot.view(1, b, k, 1).expand(1, b, k, h.size(-1))).view(1, b * k, -1)
        for row, j in (score > float("-inf")).nonzero().tolist():  # ran out of steps
            finished[row].append((score[row, j].item(), tokens[row, j, 1:].tolist()))
        results = []
        for hyps in finished:
            ranked = sorted(hyps, key=lambda sh: -sh[0])[:n_best]  # stable: ties keep finishing order
            results.append([([PHONEMES[i] for i in ids], s) for s, ids in ranked])
        return results

    def predict(self, word: str) -> list[str]:
        """Greedy ARPAbet phonemes of one word (lower-cased; characters outside a-z are ``<unk>``)."""
        return self.greedy_decode(encode_words([word]))[0]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> G2P:
        """The g2p-en model from ``checkpoint20.npz`` (float32, eval mode); sizes are read from the file."""
        with np.load(path) as npz:
            missing = sorted(set(_NPZ_NAMES) - set(npz.files))
            if missing:
                raise ValueError(f"{path} is not a g2p-en checkpoint: arrays {missing} are missing")
            state = {name: torch.from_numpy(npz[key].astype(np.float32)) for key, name in _NPZ_NAMES.items()}
        model = cls(
            hidden=state["encoder.weight_hh_l0"].shape[1],
            num_graphemes=state["enc_emb.weight"].shape[0],
            num_phonemes=state["dec_emb.weight"].shape[0],
        )
        load_state_dict_strict(model, state, str(path))
        return model.eval()

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the parameters in the checkpoint's layout (``.npz``, float32), for :meth:`from_checkpoint`."""
        state = self.state_dict()
        np.savez(path, **{key: state[name].detach().float().cpu().numpy() for key, name in _NPZ_NAMES.items()})


def load_g2p(path: str | os.PathLike) -> G2P:
    """Alias of :meth:`G2P.from_checkpoint`."""
    return G2P.from_checkpoint(path)


def encode_words(words: list[str]) -> torch.Tensor:
    """Grapheme ids ``[B, S]`` (int64): lower-cased letters (others -> ``<unk>``), ``</s>``, right-padded with 0."""
    rows = [[_G2IDX.get(c, GRAPHEME_UNK) for c in w.lower()] + [GRAPHEME_EOS] for w in words]
    src = torch.full((len(rows), max(map(len, rows), default=0)), GRAPHEME_PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        src[i, : len(row)] = torch.tensor(row)
    return src


def encode_phonemes(prons: list[list[str]], add_sos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and labels ``[B, T]`` (int64, ``T`` = longest pronunciation + 1).

    ``dec_in`` = ``<s>`` + phonemes, right-padded with ``<pad>`` (0); ``add_sos=False`` leaves out the
    ``<s>``, so ``dec_in`` holds the bare phonemes, still ``T`` wide. ``labels`` = phonemes + ``</s>``,
    right-padded with ``IGNORE_INDEX`` (-100). A symbol outside :data:`PHONEMES` raises ValueError.
    """
    ids = []
    for pron in prons:
        unknown = [p for p in pron if p not in _P2IDX]
        if unknown:
            raise ValueError(f"unknown phoneme {unknown[0]!r} in {' '.join(pron)!r}")
        ids.append([_P2IDX[p] for p in pron])
    width = max(map(len, ids), default=0) + 1
    dec_in = torch.full((len(ids), width), PHONEME_PAD, dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(ids):
        dec_in[i, : len(row) + add_sos] = torch.tensor([PHONEME_SOS] * add_sos + row, dtype=torch.long)
        labels[i, : len(row) + 1] = torch.tensor(row + [PHONEME_EOS])
    return dec_in, labels
