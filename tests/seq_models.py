"""Small sequence models shared by the tests (no tests here): a GRU encoder-decoder, an
nn.TransformerEncoder classifier with a padding mask, small HF BERT and GPT-2 factories, and a
module that reads another module's weight.

Sizes default to those of test_any_model.py; the other test modules pass theirs. None of these
seeds the global RNG except the HF factories (``seed``), as the copies they replace did, so every
test gets the weights it got before.
"""
import torch
from torch import nn


class GRUSeq2Seq(nn.Module):
    """Embeddings, a GRU encoder whose last state starts a GRU decoder, a linear readout:
    ``forward(src [B, S], dec_in [B, T]) -> [B, T, tgt_vocab]`` (teacher-forced logits).

    ``proj``: a ``Linear(d, d)`` and tanh before the readout (attribute ``proj``). ``head``: the
    readout's attribute name (tests select it with ``params=``)."""

    def __init__(self, src_vocab=20, tgt_vocab=16, d=32, *, proj=False, head="out"):
        super().__init__()
        self.src_emb = nn.Embedding(src_vocab, d)
        self.encoder = nn.GRU(d, d, batch_first=True)
        self.tgt_emb = nn.Embedding(tgt_vocab, d)
        self.decoder = nn.GRU(d, d, batch_first=True)
        self.proj = nn.Linear(d, d) if proj else None
        self.head_name = head
        setattr(self, head, nn.Linear(d, tgt_vocab))

    def forward(self, src, dec_in):
        _, h = self.encoder(self.src_emb(src))
        y, _ = self.decoder(self.tgt_emb(dec_in), h)
        if self.proj is not None:
            y = torch.tanh(self.proj(y))
        return getattr(self, self.head_name)(y)


class TransformerClassifier(nn.Module):
    """Embedding (plus learned positions if ``positions``), a batch-first ``nn.TransformerEncoder``
    of ``layers`` layers (2 heads; nested-tensor fast path on: eval mode, no grad, padding mask), a
    pool over the unpadded tokens, a linear head: ``forward(tokens [B, S], src_key_padding_mask
    [B, S] bool, True = padding) -> [B, classes]``.

    ``pool="mean"``: mean over the unpadded tokens (over all of them without a mask); ``"sum"``: their
    sum. ``encoder``: the encoder's attribute name (tests select its layers with ``params=``)."""

    def __init__(self, vocab=50, d=32, classes=4, *, ff=64, layers=3, dropout=0.0, positions=0, pool="mean",
                 encoder="encoder"):
        super().__init__()
        if pool not in ("mean", "sum"):
            raise ValueError(f"pool must be 'mean' or 'sum', not {pool!r}")
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(positions, d)) if positions else None
        layer = nn.TransformerEncoderLayer(d, 2, ff, dropout=dropout, batch_first=True)
        self.encoder_name, self.pool = encoder, pool
        setattr(self, encoder, nn.TransformerEncoder(layer, layers, enable_nested_tensor=True))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens, src_key_padding_mask=None):
        h = self.emb(tokens)
        if self.pos is not None:
            h = h + self.pos[:tokens.shape[1]]
        h = getattr(self, self.encoder_name)(h, src_key_padding_mask=src_key_padding_mask)
        if self.pool == "sum":
            if src_key_padding_mask is not None:
                h = h.masked_fill(src_key_padding_mask.unsqueeze(-1), 0.0)
            return self.head(h.sum(1))
        if src_key_padding_mask is None:
            pooled = h.mean(1)
        else:
            keep = (~src_key_padding_mask).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1)
        return self.head(pooled)


def small_bert(cls=None, *, vocab=100, hidden=32, intermediate=64, max_positions=64, layers=2, heads=2,
               dropout=0.0, seed=0, **config):
    """A ``cls`` (default ``BertForSequenceClassification``) with random weights after
    ``torch.manual_seed(seed)``; ``dropout`` for the hidden and attention dropout, ``config`` for the
    other ``BertConfig`` fields (``num_labels``, ``initializer_range``, ``attn_implementation``...)."""
    import transformers

    torch.manual_seed(seed)
    cls = cls or transformers.BertForSequenceClassification
    return cls(transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, pad_token_id=0, **config))


def small_gpt2(*, vocab=64, positions=32, width=32, inner=64, layers=2, heads=2, dropout=0.0, seed=0, **config):
    """A ``GPT2LMHeadModel`` (tied ``lm_head``/``wte``) with random weights after
    ``torch.manual_seed(seed)``; ``dropout`` for the residual, embedding and attention dropout,
    ``config`` for the other ``GPT2Config`` fields."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads, n_inner=inner,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, **config))


class Borrower(nn.Module):
    """Reads another module's weight inside its own call, the lender held outside the module
    registry (so not among this module's parameters)."""

    def __init__(self, lender: nn.Module):
        super().__init__()
        self.lender = [lender]

    def forward(self, x):
        return x @ self.lender[0].weight.T
