"""fastedit.call_cache: the frozen prefix of any model as cached module calls.

Every replay must equal the model's own forward bit for bit, with the editable parameters as they
are and changed, whatever the model's glue code does between its modules (in-place writes, modules
called twice, hooks, training-mode randomness); what the cache cannot serve is refused, not guessed.
"""
import pytest
import torch
from seq_models import Borrower
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from fastedit import call_cache
from fastedit.call_cache import CachedActs, CallCacheError, record, replay
from fastedit.model_io import ModelInputs
from fastedit.prefix import bits_equal, build_split


def _under(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def _ids(model, prefix):
    return {id(p) for n, p in model.named_parameters() if _under(n, prefix)}


def _names(model, prefix):
    return [n for n, _ in model.named_parameters() if _under(n, prefix)]


def _check_replays(model, prefix, *args, grad=False, **kwargs):
    """Replays equal the model, with its parameters and with the editable ones moved; returns the acts."""
    inputs = ModelInputs((tuple(args)), dict(kwargs))
    names = _names(model, prefix)
    with torch.set_grad_enabled(grad):
        out, acts = record(model, _ids(model, prefix), inputs)
        full = model(*args, **kwargs)
        assert bits_equal(out, full)
        for _ in range(2):  # a replay leaves the cache as it was
            assert bits_equal(replay(model, acts), full)
        moved = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters() if n in names}
        suffix = call_cache.CallCacheSuffix(model)
        want = functional_call(model, moved, tuple(args), kwargs)
        got = functional_call(suffix, moved, (acts,))
        assert bits_equal(got, want)
        assert not bits_equal(got, full)  # the editable parameters do matter
    return acts


class InplaceGlue(nn.Module):
    """The glue code writes a frozen module's output in place after the call returned."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)       # written after a's call: the cache must hold a's output as returned
        g = self.b(h)
        h.add_(1.0)       # and again after the first editable module ran
        return self.c(g + h)


def test_outputs_written_in_place_are_copied():
    torch.manual_seed(0)
    model = InplaceGlue().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    acts = _check_replays(model, "b", x)
    assert [written for _, _, written in acts.plan] == [True]


class TwiceCalled(nn.Module):
    """One module object called before the editable layer (frozen) and after it (live)."""

    def __init__(self):
        super().__init__()
        self.act, self.a, self.b, self.c = nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        h = self.b(h)
        return self.c(self.act(h) + h)


def test_a_module_called_before_and_after_the_edited_one():
    torch.manual_seed(0)
    model = TwiceCalled().double()
    acts = _check_replays(model, "b", torch.randn(3, 4, dtype=torch.float64))
    cached = [(type(m).__name__, k) for m, k, _ in acts.plan]
    assert ("Tanh", 0) in cached and ("Tanh", 1) not in cached


class Stack(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.GELU()) for _ in range(n))
        self.head = nn.Linear(6, 2)

    def forward(self, x, scale: float = 1.0, mask=None):
        for block in self.blocks:
            x = block(x) * scale
            if mask is not None:
                x = x.masked_fill(mask, 0.0)
        return self.head(x)


def test_outermost_frozen_calls_are_cached_and_any_length_works():
    torch.manual_seed(0)
    model = Stack().double()
    for t in (3, 8):  # another sequence length: a new record, nothing specialised
        x = torch.randn(2, t, 6, dtype=torch.float64)
        mask = torch.rand(2, t, 1) < 0.3
        acts = _check_replays(model, "blocks.2", x, scale=0.5, mask=mask)
        # blocks 0 and 1 (not their Linear/GELU children) are the cached calls
        assert [(type(m).__name__, k) for m, k, _ in acts.plan] == [("Sequential", 0), ("Sequential", 0)]
        assert acts.plan[0][0] is model.blocks[0] and acts.plan[1][0] is model.blocks[1]


def test_grad_mode_is_part_of_the_cache():
    torch.manual_seed(0)
    model = Stack().double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    _check_replays(model, "blocks.3", x, grad=True)
    with torch.no_grad():
        _, acts = record(model, _ids(model, "blocks.3"), ModelInputs((x,), {}))
    with pytest.raises(CallCacheError, match="grad"):
        replay(model, acts)


def test_requires_grad_flags_of_detached_outputs_are_kept():
    torch.manual_seed(0)
    model = Stack().double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    _, acts = record(model, _ids(model, "blocks.3"), ModelInputs((x,), {}), detach=True)
    leaves = [t for t in pytree.tree_leaves(acts.outputs) if isinstance(t, torch.Tensor)]
    assert leaves and all(t.requires_grad and t.grad_fn is None for t in leaves)


class Counted(nn.Module):
    """Calls a frozen module a number of times set from outside (control flow the cache cannot see)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
        self.times = 2

    def forward(self, x):
        for _ in range(self.times):
            x = self.a(x)
        return self.b(x)


def test_changed_control_flow_is_detected():
    model = Counted()
    x = torch.randn(2, 3)
    with torch.no_grad():
        _, acts = record(model, _ids(model, "b"), ModelInputs((x,), {}))
        model.times = 1
        with pytest.raises(CallCacheError, match="control flow"):
            replay(model, acts)
        model.times = 2
        assert bits_equal(replay(model, acts), model(x))
    assert "forward" not in model.a.__dict__  # the temporary forward is removed even after an error


def _halve_in_place(module, args, output):
    output.mul_(0.5)


def test_hooks_run_around_cached_calls_as_around_calls():
    torch.manual_seed(0)
    model = Stack().double()
    calls = []
    model.blocks[1].register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)       # replaces the output
    model.blocks[0].register_forward_hook(_halve_in_place)                              # writes it in place
    inner = []
    model.blocks[1][0].register_forward_hook(lambda m, i, o: inner.append(1))
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    acts = _check_replays(model, "blocks.2", x)
    assert [m for m, _, _ in acts.plan] == [model.blocks[0], model.blocks[1]]
    assert [written for _, _, written in acts.plan] == [True, False]  # the in-place hook: copies on replay
    n, m = len(calls), len(inner)
    with torch.no_grad():
        replay(model, acts)
    assert len(calls) == n + 1  # the cached module's hook ran once, as in a forward of the model
    assert len(inner) == m      # the call inside the cached one did not happen


def test_hooks_do_not_change_what_the_recorded_modules_do():
    """nn.TransformerEncoderLayer leaves its fast path when hooks are attached; recording must not."""
    torch.manual_seed(0)
    layer = lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)  # noqa: E731
    model = nn.Sequential(nn.TransformerEncoder(layer(), 2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _, acts = record(model, _ids(model, "1"), ModelInputs((x,), {}))
        assert bits_equal(replay(model, acts), model(x))  # fast path in both


def test_global_hooks_run_on_replay_too():
    torch.manual_seed(0)
    model = Stack().double()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        acts = _check_replays(model, "blocks.2", torch.randn(2, 3, 6, dtype=torch.float64))
        seen.clear()
        with torch.no_grad():
            replay(model, acts)
        assert seen.count("Sequential") == 4 and seen.count("Linear") == 3  # blocks 0, 1 answered: no inner calls
    finally:
        handle.remove()


class Sneaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(3, 3)
        self.a = Borrower(self.b)
        self.c = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # a's call ends before b is entered, yet it reads b.weight
        return self.c(self.b(h))


def test_a_cached_call_that_reads_the_editable_parameters_is_caught():
    torch.manual_seed(0)
    model = Sneaky().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    split = build_split(model, ["b.weight"], ModelInputs((x,), {}), lambda o: o)  # fx traces it, exactly
    assert split.method == "fx"
    dyn = Untraceable().double()
    dyn.a, dyn.b = Borrower(model.b), model.b  # the same trick in a model fx cannot trace
    split = build_split(dyn, ["b.weight"], ModelInputs((x,), {}), lambda o: o)
    assert split.method == "none" and "perturbed" in split.reason and "fx" in split.reason


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent: fx cannot trace it
            h = h * 2
        return self.b(h)


def test_untraceable_models_get_the_cached_split():
    torch.manual_seed(0)
    model = Untraceable().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    split = build_split(model, ["b.weight", "b.bias"], ModelInputs((x,), {}), lambda o: o)
    assert split.method == "call-cache" and split.reason is None
    with torch.no_grad():
        assert bits_equal(split.suffix(split.prefix(ModelInputs((x,), {}))), model(x))


def test_a_selection_the_output_does_not_reach_is_refused():
    model = Untraceable()
    model.unused = nn.Linear(3, 3)
    with pytest.raises(CallCacheError, match="never entered"):
        record(model, _ids(model, "unused"), ModelInputs((torch.randn(2, 3),), {}))


class Noisy(nn.Module):
    """Training-mode randomness and BatchNorm statistics in the prefix, an in-place write after it."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.drop = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.drop(self.bn(self.a(x)))
        out = self.b(h)
        h.mul_(0.5)  # forces the second recording run
        return out + h.sum(-1, keepdim=True)


def test_a_second_run_in_train_mode_starts_from_the_same_state():
    torch.manual_seed(0)
    model = Noisy().double().train()
    x = torch.randn(8, 4, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    ref = model(x)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    after_ref = torch.rand(1)
    model.load_state_dict(state)
    torch.manual_seed(5)
    out, acts = record(model, _ids(model, "b"), ModelInputs((x,), {}))
    assert bits_equal(out, ref)  # the same dropout mask, the output of one run
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k  # statistics moved once
    assert torch.equal(torch.rand(1), after_ref)  # the random stream advanced as by one forward
    assert [(type(m).__name__, written) for m, _, written in acts.plan] == [
        ("Linear", False), ("BatchNorm1d", False), ("Dropout", True)]


def test_cached_acts_are_a_pytree_and_replays_vmap_over_parameters():
    torch.manual_seed(0)
    model = Stack().double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        _, acts = record(model, _ids(model, "head"), ModelInputs((x,), {}))
    leaves, spec = pytree.tree_flatten(acts)
    again = pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, CachedActs) and again.plan == acts.plan and again.grad == acts.grad
    suffix = call_cache.CallCacheSuffix(model)
    ws = torch.randn(5, 2, 6, dtype=torch.float64)
    with torch.no_grad():
        batched = vmap(lambda w: functional_call(suffix, {"head.weight": w}, (acts,)))(ws)
        looped = torch.stack([functional_call(model, {"head.weight": w}, (x,)) for w in ws])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


def test_fused_code_that_reads_its_childrens_weights_is_not_cached():
    """nn.TransformerEncoderLayer's fast path uses linear1.weight without calling linear1: the layer
    contains the editable parameter, so its call is live; the layer before it is cached."""
    torch.manual_seed(0)
    layer = lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)  # noqa: E731
    model = nn.Sequential(nn.TransformerEncoder(layer(), 2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 16)
    prefix = "0.layers.1.linear1"
    with torch.no_grad():
        _, acts = record(model, _ids(model, prefix), ModelInputs((x,), {}))
        assert [m for m, _, _ in acts.plan] == [model[0].layers[0]]
        moved = {f"{prefix}.weight": model[0].layers[1].linear1.weight + 0.1}
        want = functional_call(model, moved, (x,))
        assert bits_equal(functional_call(call_cache.CallCacheSuffix(model), moved, (acts,)), want)


class RootParameter(nn.Module):
    """The root's own code reads an editable parameter before calling its children."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(3))
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(x + self.pos))


def test_calls_after_the_callers_own_editable_parameter_are_not_cached():
    torch.manual_seed(0)
    model = RootParameter().double()
    acts = _check_replays(model, "pos", torch.randn(4, 3, dtype=torch.float64))
    assert acts.plan == ()


def test_a_stopped_run_caches_the_same_calls_and_skips_the_rest():
    torch.manual_seed(0)
    model = Stack(n=6).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(1))
    with torch.no_grad():
        out, whole = record(model, _ids(model, "blocks.2"), ModelInputs((x,), {}))
        n = len(seen)
        none, short = record(model, _ids(model, "blocks.2"), ModelInputs((x,), {}), whole=False)
        assert none is None and len(seen) == n  # stopped after blocks.2: the head never ran
        assert [(m, k) for m, k, _ in short.plan] == [(m, k) for m, k, _ in whole.plan]
        assert bits_equal(replay(model, short), model(x))


class LateWrite(Untraceable):
    """Writes a cached output in place only after the editable layer ran (a stopped run cannot see it)."""

    def forward(self, x):
        h = self.a(x)
        out = self.b(h)
        h.mul_(0.5)
        return out + h.sum(-1, keepdim=True)


def test_writes_after_the_stop_are_caught_and_such_models_record_whole_runs():
    torch.manual_seed(0)
    model = LateWrite().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        _, acts = record(model, _ids(model, "b"), ModelInputs((x,), {}), whole=False)
        with pytest.raises(CallCacheError, match="in place"):
            replay(model, acts)  # never silently wrong: the next replay would read a halved cache
    split = build_split(model, ["b.weight", "b.bias"], ModelInputs((x,), {}), lambda o: o)
    assert split.method == "call-cache" and split.whole_records
    with torch.no_grad():
        acts = split.prefix(ModelInputs((x,), {}))
        for _ in range(2):
            assert bits_equal(split.suffix(acts), model(x))


class Skips(nn.Module):
    """Frozen blocks before the edited one: the glue reads block 0's output again (a skip to the end),
    block 1's feeds only block 2's call (answered from the cache), except for inputs of more than four
    rows, where the glue reads it too (and fx cannot trace the test)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        h0 = self.blocks[0](x)
        h1 = self.blocks[1](h0)
        h2 = self.blocks[2](h1)
        if x.shape[0] > 4:
            h2 = h2 + h1
        return self.blocks[3](h2) + h0


def test_outputs_no_replay_reads_are_kept_as_placeholders():
    torch.manual_seed(0)
    model = Skips().double()
    x = torch.randn(2, 6, dtype=torch.float64)
    names = _names(model, "blocks.3")
    inputs = ModelInputs((x,), {})
    split = build_split(model, names, inputs, lambda o: o)
    assert split.method == "call-cache"
    assert split.unread == {(id(model.blocks[1]), 0)}  # block 0's output is read by the skip, block 2's by block 3
    with torch.no_grad():
        acts = split.prefix(inputs)
        assert [type(o) for o in acts.outputs] == [torch.Tensor, call_cache.Unread, torch.Tensor]
        assert acts.outputs[1].shape == (2, 6) and acts.outputs[1].device == x.device
        leaves = [t for t in pytree.tree_leaves(acts) if isinstance(t, torch.Tensor)]
        assert not any(isinstance(t, call_cache.Unread) for t in leaves)  # byte counts, stacks, maps skip it
        assert bits_equal(split.suffix(acts), model(x))
        copied = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, acts)
        assert copied.thin and isinstance(copied.outputs[1], call_cache.Unread)  # survives a round trip
    params = [model.get_parameter(n) for n in names]
    steps = split.edit_acts(inputs, names, params)
    moved = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in zip(names, params)}
    with torch.enable_grad():
        assert bits_equal(functional_call(split.suffix_module, moved, (steps,)), functional_call(model, moved, (x,)))


def test_a_placeholder_that_gets_read_fails_loudly():
    torch.manual_seed(0)
    model = Skips().double()
    split = build_split(model, _names(model, "blocks.3"), ModelInputs((torch.randn(2, 6, dtype=torch.float64),), {}),
                        lambda o: o)
    long = ModelInputs((torch.randn(6, 6, dtype=torch.float64),), {})  # takes the branch that reads block 1
    with torch.no_grad():
        acts = split.prefix(long)
        with pytest.raises(CallCacheError, match="use_prefix=False"):
            split.suffix(acts)
    hole = call_cache.Unread(torch.ones(2, 3))
    assert hole.shape == (2, 3) and hole.dtype == torch.float32 and "Unread" in repr(hole)
    with pytest.raises(CallCacheError, match="found unused"):
        hole + 1


def test_a_transformer_caches_only_the_hidden_states_the_edited_layer_reads():
    from seq_models import small_bert
    torch.manual_seed(0)
    from transformers import BertModel
    model = small_bert(BertModel, layers=4).eval()
    ids = torch.randint(0, 100, (3, 9))
    inputs = ModelInputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    names = _names(model, "encoder.layer.3")
    split = build_split(model, names, inputs, lambda o: o.last_hidden_state)
    assert split.method == "call-cache"
    with torch.no_grad():
        acts = split.prefix(inputs)
        # the embeddings and layers 0-1 are placeholders (the mask code only asks the embeddings' device)
        assert [type(m).__name__ for m, _, _ in acts.plan] == ["BertEmbeddings"] + ["BertLayer"] * 3
        assert [isinstance(o, call_cache.Unread) for o in acts.outputs] == [True, True, True, False]
        out = split.suffix(acts)
        full = model(**inputs.kwargs)
        assert bits_equal(out.last_hidden_state, full.last_hidden_state)
        assert bits_equal(out.pooler_output, full.pooler_output)


def _unread_one_at_a_time(suffix, acts):
    """The reference search: each cached call in turn answered by a placeholder, kept when the replay
    still equals the full one bit for bit."""
    with torch.no_grad():
        base = pytree.tree_leaves(suffix(acts))
        unread = frozenset()
        for m, k, _ in acts.plan:
            trial = unread | {(id(m), k)}
            try:
                got = pytree.tree_leaves(suffix(call_cache.thinned(acts, trial)))
            except CallCacheError:
                continue
            if all(not isinstance(g, torch.Tensor) or bits_equal(g, b) for g, b in zip(got, base)):
                unread = trial
    return unread


def _skips():
    return Skips().double(), "blocks.3", ModelInputs((torch.randn(2, 6, dtype=torch.float64),), {})


def _bert():
    from seq_models import small_bert
    from transformers import BertModel
    ids = torch.randint(0, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return small_bert(BertModel, layers=4).eval(), "encoder.layer.3", ModelInputs((), {"input_ids": ids,
                                                                                      "attention_mask": mask})


def _gpt2():
    from seq_models import small_gpt2
    return small_gpt2(layers=3).eval(), "transformer.h.2.mlp", ModelInputs((), {"input_ids": torch.randint(0, 64, (2, 7))})


@pytest.mark.parametrize("make", [_skips, _bert, _gpt2], ids=["skips", "bert", "gpt2"])
def test_watching_one_replay_finds_what_the_call_by_call_search_finds(make):
    from fastedit.prefix import _unread_calls
    torch.manual_seed(0)
    model, prefix, inputs = make()
    with torch.no_grad():
        _, acts = record(model, _ids(model, prefix), inputs)
    suffix = call_cache.CallCacheSuffix(model)
    want = _unread_one_at_a_time(suffix, acts)
    assert want  # each model has cached outputs nothing reads
    with torch.no_grad():
        assert call_cache.unread_by_watching(suffix, acts) == want
    assert _unread_calls(suffix, acts) == want


@pytest.mark.parametrize("proposal", ["raises", "too_many"])
def test_a_watched_replay_that_fails_or_proposes_too_much_falls_back_to_one_call_at_a_time(monkeypatch, proposal):
    from fastedit import prefix as prefix_mod
    torch.manual_seed(0)
    model, prefix, inputs = _skips()
    with torch.no_grad():
        _, acts = record(model, _ids(model, prefix), inputs)
    suffix = call_cache.CallCacheSuffix(model)

    def propose(suffix, acts):
        if proposal == "raises":  # glue that asks a watched tensor for its storage, say
            raise RuntimeError("no storage")
        return frozenset((id(m), k) for m, k, _ in acts.plan)  # block 0's and block 2's outputs are read
    monkeypatch.setattr(call_cache, "unread_by_watching", propose)
    assert prefix_mod._unread_calls(suffix, acts) == {(id(model.blocks[1]), 0)}
