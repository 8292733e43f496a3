"""SparseDelta and EditJournal on tied weights (one tensor under several names) and the SHA-256
digest of their files (fastedit.sparse_delta).

Oracles: bit patterns compared name by name with plain PyTorch (`bits`), `load_state_dict` into
tied and untied models, the same edits made by hand on an untied copy, and the safetensors layout
(8-byte header length, JSON header with data offsets) to damage a file's tensor bytes.
"""
import copy
import json
import struct

import pytest
import torch
from helpers import bits
from safetensors.torch import save_file
from torch import nn

import fastedit as fe
from fastedit.edit_journal import JOURNAL_FORMAT, EditJournal
from fastedit.sparse_delta import FORMAT, VERSION, SparseDelta


class Tied(nn.Module):
    """An embedding whose matrix is also the output layer's weight (``head.weight``, registered
    after ``emb.weight``), plus an untied layer and a buffer."""

    def __init__(self, tied=True):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight if tied else nn.Parameter(self.emb.weight.detach().clone())
        self.register_buffer("count", torch.zeros(2))

    def forward(self, ids):  # ids [B] → logits [B, 7]
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def tied_model(seed=0):
    torch.manual_seed(seed)
    return Tied().double()


def untied_copy(model):
    """The same values, ``head.weight`` a separate tensor."""
    out = Tied(tied=False).double()
    out.load_state_dict(model.state_dict())
    assert out.head.weight is not out.emb.weight
    return out


def edited(model):
    """A deep copy (still tied) with three scalars of the tied matrix and one of mid.bias changed."""
    out = copy.deepcopy(model)
    assert out.head.weight is out.emb.weight
    with torch.no_grad():
        out.emb.weight.view(-1)[[1, 9, 27]] += 1.0
        out.mid.bias[2] = -3.0
    return out


def fingerprint(model):
    """Everything the library promises to leave as it was: every state-dict tensor's bits, every
    module's ``training`` flag, every parameter's ``requires_grad``, and which names are tied."""
    sd = {k: bits(v).clone() for k, v in model.state_dict().items()}
    return (sd, [m.training for m in model.modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
            model.head.weight is model.emb.weight if isinstance(model, Tied) else None)


def same_fingerprint(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


def same_values(model, other):
    """Bit-identical state dicts (both names of a tied weight included)."""
    sa, sb = model.state_dict(), other.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(bits(sa[k]), bits(sb[k])) for k in sa)


# ------------------------------------------------------------------------------------------------
# one storage, one entry
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["modules", "state_dicts", "alias_name", "both_names"])
def test_from_models_counts_a_tied_tensor_once(given):
    model = tied_model()
    after = edited(model)
    if given == "modules":
        delta = SparseDelta.from_models(model, after)
    elif given == "state_dicts":
        delta = SparseDelta.from_models(model.state_dict(), after.state_dict())
    elif given == "alias_name":
        delta = SparseDelta.from_models(model, after, names=["head.weight", "mid.bias"])
    else:
        delta = SparseDelta.from_models(model.state_dict(), after.state_dict(),
                                        names=["head.weight", "emb.weight", "mid.bias"])
    assert delta.names == ["emb.weight", "mid.bias"]  # the canonical name: first in named_parameters()
    assert delta.nnz == 4 and delta.nnz_per_param["emb.weight"] == 3
    assert delta.aliases == {"emb.weight": ("head.weight",)}
    assert delta.entry("head.weight")["indices"].tolist() == [1, 9, 27]  # an alias finds the entry
    assert "head.weight" in repr(delta)


def test_from_models_rejects_disagreeing_copies_of_a_tied_tensor():
    model = tied_model()
    after = untied_copy(edited(model))
    with torch.no_grad():
        after.head.weight[0, 0] += 1  # after holds different values under the two names of one tensor
    with pytest.raises(ValueError, match="one tensor in before"):
        SparseDelta.from_models(model.state_dict(), after.state_dict())
    agreeing = untied_copy(edited(model))  # separate tensors, equal values: one entry as well
    assert SparseDelta.from_models(model, agreeing) == SparseDelta.from_models(model, edited(model))


@pytest.mark.parametrize("built_from", ["modules", "state_dicts"])
def test_apply_revert_on_tied_model_state_dict_and_untied_copy(built_from):
    model = tied_model()
    after = edited(model)
    if built_from == "modules":
        delta = SparseDelta.from_models(model, after)
    else:
        delta = SparseDelta.from_models(model.state_dict(), after.state_dict())
    want = untied_copy(after)

    for target in (copy.deepcopy(model), untied_copy(model)):
        start = fingerprint(target)
        delta.apply(target)
        assert same_values(target, want)  # an untied copy gets the change under both names
        with pytest.raises(ValueError, match="OLD"):
            delta.apply(target)
        delta.revert(target)
        assert same_fingerprint(fingerprint(target), start)

    sd = copy.deepcopy(model).state_dict()  # a state dict with both names, one memory
    delta.apply(sd)
    assert all(torch.equal(bits(sd[k]), bits(v)) for k, v in want.state_dict().items())
    inv = delta.inverse()
    assert inv.aliases == delta.aliases
    inv.apply(sd)
    assert all(torch.equal(bits(sd[k]), bits(v)) for k, v in model.state_dict().items())


def test_untied_target_with_different_alias_values_is_rejected_and_untouched():
    model = tied_model()
    delta = SparseDelta.from_models(model, edited(model))
    target = untied_copy(model)
    with torch.no_grad():
        target.head.weight.view(-1)[9] += 0.5  # head.weight no longer holds the delta's OLD values
    start = fingerprint(target)
    with pytest.raises(ValueError, match=r"head.weight: 1 of 3 coordinates do not hold the delta's OLD"):
        delta.apply(target)
    assert same_fingerprint(fingerprint(target), start)
    j = EditJournal(target)
    with pytest.raises(ValueError, match="cannot record one OLD"):
        j.apply(delta)
    assert same_fingerprint(fingerprint(target), start) and len(j) == 0


def test_patched_state_dict_patches_every_alias():
    model = tied_model()
    after = edited(model)
    delta = SparseDelta.from_models(model, after)
    start = fingerprint(model)
    sd = delta.patched_state_dict(model)
    assert same_fingerprint(fingerprint(model), start)  # the model is not modified
    assert torch.equal(bits(sd["head.weight"]), bits(after.emb.weight))
    assert sd["head.weight"].data_ptr() != sd["emb.weight"].data_ptr()  # independent tensors

    tied = tied_model(seed=1)
    tied.load_state_dict(sd)  # copies head.weight last: must carry the change too
    assert tied.head.weight is tied.emb.weight and same_values(tied, after)
    untied = Tied(tied=False).double()
    untied.load_state_dict(sd)
    assert same_values(untied, untied_copy(after))

    # a delta that knows only the canonical name (as fe.surgery builds it): the model's own ties
    bare = SparseDelta.from_entries({n: {k: delta.entry(n)[k] for k in ("indices", "old", "new", "shape")}
                                     for n in delta.names})
    assert bare.aliases == {}
    sd = bare.patched_state_dict(model)
    tied = tied_model(seed=1)
    tied.load_state_dict(sd)
    assert same_values(tied, after)


def test_dense_on_tied_model():
    model = tied_model()
    after = edited(model)
    delta = SparseDelta.from_models(model.state_dict(), after.state_dict())
    dense = delta.dense(model)
    assert sorted(dense) == ["emb.weight", "mid.bias"]  # one dense tensor per entry, canonical names
    assert torch.equal(dense["emb.weight"], after.emb.weight.detach() - model.emb.weight.detach())
    assert torch.equal(dense["mid.bias"], after.mid.bias.detach() - model.mid.bias.detach())
    assert delta.dense(untied_copy(model)).keys() == dense.keys()
    bare = SparseDelta.from_models({"head.weight": model.head.weight}, {"head.weight": after.head.weight})
    assert torch.equal(bare.dense(model)["head.weight"], dense["emb.weight"])  # found under its alias


def test_entries_landing_on_one_tied_tensor_are_merged_or_rejected():
    """Deltas naming both aliases as separate entries (files of earlier versions, untied sources)."""
    model = tied_model()
    w = model.emb.weight.detach().reshape(-1)
    idx = torch.tensor([1, 9])
    same = SparseDelta.from_entries({"emb.weight": (idx, w[idx].clone(), w[idx] + 1, (7, 4)),
                                     "head.weight": (idx, w[idx].clone(), w[idx] + 1, (7, 4))})
    target = copy.deepcopy(model)
    same.apply(target)  # one write, not a failed second check
    assert torch.equal(bits(target.emb.weight.detach().reshape(-1)[idx]), bits(w[idx] + 1))
    same.revert(target)
    assert same_values(target, model)

    part = SparseDelta.from_entries({"emb.weight": (torch.tensor([1]), w[[1]].clone(), w[[1]] + 1, (7, 4)),
                                     "head.weight": (torch.tensor([5]), w[[5]].clone(), w[[5]] + 2, (7, 4))})
    j = EditJournal(target)
    j.apply(part)  # disjoint coordinates of one tensor: united
    assert j.entries[0].delta.names == ["emb.weight"] and j.entries[0].delta.nnz == 2
    assert j.entries[0].delta.aliases == {"emb.weight": ("head.weight",)}
    j.undo()
    assert same_values(target, model)

    clash = SparseDelta.from_entries({"emb.weight": (idx, w[idx].clone(), w[idx] + 1, (7, 4)),
                                      "head.weight": (idx, w[idx].clone(), w[idx] + 2, (7, 4))})
    start = fingerprint(target)
    with pytest.raises(ValueError, match="one tensor in the model"):
        clash.apply(target)
    assert same_fingerprint(fingerprint(target), start)
    clash.apply(untied_copy(model))  # separate tensors: each gets its own change
    with pytest.raises(ValueError, match="named twice"):
        SparseDelta.from_entries({"emb.weight": {"indices": idx, "old": w[idx], "new": w[idx] + 1, "shape": (7, 4),
                                                 "aliases": ["head.weight"]},
                                  "head.weight": (idx, w[idx], w[idx] + 1, (7, 4))})


def test_save_load_keeps_aliases(tmp_path):
    model = tied_model()
    after = edited(model)
    delta = SparseDelta.from_models(model, after)
    delta.save(tmp_path / "d.safetensors")
    back = SparseDelta.load(tmp_path / "d.safetensors")
    assert back == delta and back.aliases == {"emb.weight": ("head.weight",)}
    target = untied_copy(model)
    back.apply(target)
    assert same_values(target, untied_copy(after))
    lost = SparseDelta.from_entries({"emb.weight": {k: delta.entry("emb.weight")[k]
                                                    for k in ("indices", "old", "new", "shape")}})
    assert lost != delta  # aliases are part of equality


# ------------------------------------------------------------------------------------------------
# the journal on a tied model
# ------------------------------------------------------------------------------------------------
def delta_on(model, name, coords, seed):
    """A delta setting flat ``coords`` of ``model``'s tensor ``name`` (any alias) to new values,
    built from a mapping that knows that tensor under ``name`` only."""
    g = torch.Generator().manual_seed(seed)
    t = dict(model.named_parameters(remove_duplicate=False))[name].detach()
    after = t.clone()
    after.view(-1)[torch.tensor(coords)] = torch.randn(len(coords), generator=g, dtype=t.dtype)
    return SparseDelta.from_models({name: t}, {name: after})


def test_journal_alias_and_canonical_names_behave_the_same(tmp_path):
    base = tied_model()
    states, stored = {}, {}
    for naming in ("canonical", "alias"):
        model = copy.deepcopy(base)
        start = fingerprint(model)
        head = "emb.weight" if naming == "canonical" else "head.weight"
        d1 = delta_on(model, "emb.weight", [0, 1, 2, 3], 1)
        d2 = delta_on(model, head, [2, 3, 4, 5], 2)       # overlaps d1 on the one tied tensor
        d3 = delta_on(model, "mid.weight", [0, 7], 3)
        j = EditJournal(model)
        ids = [j.apply(d) for d in (d1, d2, d3)]
        stored[naming] = [e.delta for e in j.entries]  # as landed: canonical names, the model's aliases
        seen = [untied_copy(model)]
        j.rollback(ids[0])  # d2's values win at 2, 3; 0, 1 return to the original
        seen.append(untied_copy(model))
        j.save(tmp_path / f"{naming}.safetensors")
        loaded = EditJournal.load(tmp_path / f"{naming}.safetensors", model)
        loaded.undo()
        loaded.undo()
        assert same_fingerprint(fingerprint(model), start)
        states[naming] = seen
    for a, b in zip(states["canonical"], states["alias"]):
        assert same_values(a, b)
    assert stored["canonical"] == stored["alias"]
    assert stored["alias"][1].aliases == {"emb.weight": ("head.weight",)}
    # the oracle: d2 alone (at 2..5) on the original, on an untied copy written under both names
    want = untied_copy(base)
    d2 = delta_on(base, "emb.weight", [2, 3, 4, 5], 2)
    d3 = delta_on(base, "mid.weight", [0, 7], 3)
    with torch.no_grad():
        for p in (want.emb.weight, want.head.weight):
            p.view(-1)[2:6] = d2.entry("emb.weight")["new"]
        want.mid.weight.view(-1)[[0, 7]] = d3.entry("mid.weight")["new"]
    assert same_values(states["alias"][1], want)


def test_journal_records_surgery_and_detects_writes_through_an_alias():
    model = tied_model()
    start = fingerprint(model)
    ids = torch.tensor([3])
    with torch.no_grad():
        y = (model(ids).argmax(1) + 1) % 7
    j = EditJournal(model)
    r = fe.surgery(model, ids, y, 6, params="head")
    assert r.success and r.delta.names == ["emb.weight"]
    j.record(r, name="surgery")
    j.apply(delta_on(model, "head.weight", [0, 1], 4))
    with torch.no_grad():
        model.head.weight.view(-1)[int(j.entries[1].delta.entry("emb.weight")["indices"][0])] += 1  # another writer
    before_rollback = fingerprint(model)
    with pytest.raises(ValueError, match="NEW"):
        j.rollback(j.entries[0].id)
    with pytest.raises(ValueError, match="NEW"):
        j.verify()
    assert same_fingerprint(fingerprint(model), before_rollback) and len(j) == 2
    with torch.no_grad():
        model.head.weight.view(-1)[int(j.entries[1].delta.entry("emb.weight")["indices"][0])] -= 1
    j.verify()
    j.rollback(j.entries[0].id)
    j.undo()
    assert same_fingerprint(fingerprint(model), start)


def test_hf_gpt2_surgery_on_lm_head_survives_patched_state_dict():
    pytest.importorskip("transformers")
    from seq_models import small_gpt2

    model = small_gpt2(vocab=32, positions=16, width=16, inner=32, layers=1).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    start = fingerprint(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (1, 6), generator=g)
    with torch.no_grad():
        pred = model(input_ids=ids).logits[:, -2].argmax(-1)
    ids[:, -1] = (pred + 5) % 32
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    fresh = copy.deepcopy(model)
    r = fe.surgery(model, {"input_ids": ids}, fe.TokenTargets(labels, causal=True), 30, params="lm_head",
                   on_failure="keep")
    assert r.delta.names == ["transformer.wte.weight"] and r.nnz == 30
    sd = r.delta.patched_state_dict(fresh)
    assert same_fingerprint(fingerprint(fresh), start)
    fresh.load_state_dict(sd)
    assert same_values(fresh, model)  # the edit survives the copy of lm_head.weight
    r.revert()
    assert same_fingerprint(fingerprint(model), start)

    delta = SparseDelta.from_models(model.state_dict(), fresh.state_dict())
    assert delta.nnz == 30 and delta.aliases == {"transformer.wte.weight": ("lm_head.weight",)}
    j = EditJournal(model)
    j.apply(delta)
    assert same_values(model, fresh)
    j.undo()
    assert same_fingerprint(fingerprint(model), start)


# ------------------------------------------------------------------------------------------------
# digests
# ------------------------------------------------------------------------------------------------
def tensor_span(path, key):
    """[begin, end) of tensor ``key``'s bytes in a safetensors file (after the header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    begin, end = header[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip(path, pos, out):
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x01
    out.write_bytes(bytes(raw))
    return out


def small_delta():
    model = tied_model()
    return SparseDelta.from_models(model, edited(model)), model


@pytest.mark.parametrize("key,where", [("0.new", 0), ("0.new", -1), ("0.old", 3), ("1.indices", 0)])
def test_flipped_byte_in_tensor_data_is_rejected(tmp_path, key, where):
    delta, _ = small_delta()
    good = tmp_path / "good.safetensors"
    delta.save(good)
    begin, end = tensor_span(good, key)
    bad = flip(good, begin if where == 0 else end - 1 if where == -1 else begin + where, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors is damaged"):
        SparseDelta.load(bad)
    back = SparseDelta.load(good)
    assert back == delta
    for n in delta.names:
        for k in ("indices", "old", "new"):
            assert torch.equal(bits(back.entry(n)[k]), bits(delta.entry(n)[k]))


def test_flipped_byte_in_journal_file_is_rejected(tmp_path):
    delta, model = small_delta()
    j = EditJournal(model)
    j.apply(delta, name="x")
    good = tmp_path / "j.safetensors"
    j.save(good)
    begin, _ = tensor_span(good, "e0.0.new")
    start = fingerprint(model)
    bad = flip(good, begin + 2, tmp_path / "bad.safetensors")
    for check in (True, False):  # the digest, not only the model check, rejects it
        with pytest.raises(ValueError, match="damaged"):
            EditJournal.load(bad, model, check=check)
    assert same_fingerprint(fingerprint(model), start)
    assert [e.delta for e in EditJournal.load(good, model).entries] == [j.entries[0].delta]


def test_changed_metadata_is_rejected(tmp_path):
    """Same-length edit of the JSON that names the tensors (a parameter renamed): the digest covers it."""
    delta, _ = small_delta()
    good = tmp_path / "good.safetensors"
    delta.save(good)
    raw = good.read_bytes()
    assert raw.count(b"mid.bias") >= 1
    (tmp_path / "renamed.safetensors").write_bytes(raw.replace(b"mid.bias", b"mid.bia2"))
    with pytest.raises(ValueError, match="damaged"):
        SparseDelta.load(tmp_path / "renamed.safetensors")


def test_files_without_a_digest_still_load(tmp_path):
    """Files of the previous version: no sha256 and no aliases in the metadata."""
    delta, model = small_delta()
    tensors, meta = delta._tensors_and_meta()
    for p in meta["params"]:
        del p["aliases"]
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"format": FORMAT, "version": VERSION, "delta": json.dumps(meta)})
    back = SparseDelta.load(tmp_path / "old.safetensors")
    assert back.names == delta.names and back.aliases == {} and back.nnz == delta.nnz
    target = copy.deepcopy(model)
    back.apply(target)  # the model's own ties still carry it to head.weight
    assert same_values(target, edited(model))

    t, m = delta._tensors_and_meta(prefix="e0.")
    save_file(t, str(tmp_path / "old_journal.safetensors"),
              metadata={"format": JOURNAL_FORMAT, "version": VERSION,
                        "journal": json.dumps({"entries": [{"id": 0, "name": None, **m}], "next_id": 1})})
    j = EditJournal.load(tmp_path / "old_journal.safetensors", target)
    j.undo()
    assert same_values(target, model)
