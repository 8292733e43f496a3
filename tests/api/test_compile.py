"""fe.edit(compile=...) and fe.edit(cuda_graph=...): the compiled step and the captured loop agree with
the eager edit, are cached without ever serving a stale model, and report every fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastedit as fe
from fastedit import compiled as fc
from fastedit._core import _finite_per_edit, clear_split_cache, model_fingerprint
from tests.helpers import assert_identical, make_model, snapshot, wrong_label

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def edits(model, n=5, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 1, 8, 8, generator=gen) for _ in range(n)]
    return [(x, wrong_label(model, x)) for x in xs]


def run(model, cases, **kw):
    """(success, steps, edited parameters) of each edit, each applied to the original model."""
    out = []
    for x, y in cases:
        r = fe.edit(model, x, y, editor=fe.RMSProp(1e-2), params="block", **kw)
        out.append((r, [p.detach().clone() for _, p in model.block.named_parameters()]))
        r.revert()
    return out


def compiled_calls(model) -> int:
    """Calls of the compiled suffixes kept for ``model`` (proof that a compiled path really ran)."""
    from fastedit._core import _SPLIT_CACHE
    return sum(e["compiled"].suffix.calls for e in _SPLIT_CACHE.get(model, {}).values() if "compiled" in e)


def assert_same(eager, other, rtol=1e-4, atol=1e-5):
    for (re, pe), (ro, po) in zip(eager, other):
        assert (re.success, re.steps) == (ro.success, ro.steps)
        for a, b in zip(pe, po):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_compiled_edits_equal_eager_cached_per_shape_and_never_stale():
    model = make_model()
    snap = snapshot(model)
    cases = edits(model)
    eager = run(model, cases)
    compiled = run(model, cases, compile=True)
    assert_same(eager, compiled)
    assert all(r.compiled and r.compile_reason is None for r, _ in compiled)
    assert compiled[0][0].compile_seconds > 0 and all(r.compile_seconds == 0 for r, _ in compiled[1:])
    assert_identical(model, snap)  # every edit reverted bit for bit
    # a new input shape compiles once more, the known one does not
    two = edits(model, n=2, seed=1, batch=2)
    r2 = run(model, two, compile=True)
    assert r2[0][0].compile_seconds > 0 and r2[1][0].compile_seconds == 0
    assert_same(run(model, two), r2)
    # the model changes in place (a kept edit) and by replacement: compiled edits follow it
    kept = fe.edit(model, *cases[0], editor=fe.RMSProp(1e-2), params="block", on_failure="keep")
    assert kept.applied
    assert_same(run(model, cases[1:3]), run(model, cases[1:3], compile=True))
    with torch.no_grad():
        model.block[0].weight = nn.Parameter(model.block[0].weight * 1.5)
        model.block[1].running_var.mul_(2.0)  # a buffer changed in place is an input, not a constant
    assert_same(run(model, cases[1:3]), run(model, cases[1:3], compile=True))


@pytest.mark.slow
def test_a_compiler_failure_runs_eager_exactly_and_says_so(monkeypatch):
    model = make_model()
    cases = edits(model, n=2)
    eager = run(model, cases)
    clear_split_cache(model)

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call
    monkeypatch.setattr(fc.torch, "compile", broken)
    got = run(model, cases, compile=True)
    for (re, pe), (ro, po) in zip(eager, got):
        assert not ro.compiled and "torch.compile failed" in ro.compile_reason and "no C++ compiler" in ro.compile_reason
        assert (re.success, re.steps, re.loss) == (ro.success, ro.steps, ro.loss)
        assert all(torch.equal(a, b) for a, b in zip(pe, po))  # the eager path, bit for bit


class Untraceable(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it, the call cache skips the prefix."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if float(h.sum()) > 1e9:
            h = h * 0
        return self.b(torch.relu(h))


@pytest.mark.slow
def test_cached_call_splits_compile_their_edited_submodules_and_equal_eager():
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(1, 4)
    with torch.no_grad():
        y = (model(x).argmax(-1) + 1) % 3
    eager = fe.edit(model, x, y, params="b")
    theta = model.b.weight.detach().clone()
    eager.revert()
    r = fe.edit(model, x, y, params="b", compile=True)
    assert r.prefix_method == "call-cache" and r.compiled and r.compile_reason is None and r.compile_seconds > 0
    assert (r.success, r.steps) == (eager.success, eager.steps) and compiled_calls(model) > 0
    torch.testing.assert_close(model.b.weight.detach(), theta, rtol=1e-4, atol=1e-5)
    r.revert()


@pytest.mark.slow
def test_compiled_hf_layer_edits_equal_eager_and_follow_the_model():
    from tests.seq_models import small_bert
    model = small_bert(layers=2, num_labels=3).eval()
    snap = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(3):
        ids = torch.randint(1, 100, (1, 12), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            y = (model(**inputs).logits.argmax(-1) + 1) % 3
        cases.append((inputs, y))

    def run_bert(**kw):
        out = []
        for x, y in cases:
            r = fe.edit(model, x, y, editor=fe.RMSProp(1e-2), params="bert.encoder.layer.1", **kw)
            out.append((r, [p.detach().clone() for p in model.bert.encoder.layer[1].parameters()]))
            r.revert()
        return out
    eager = run_bert()
    comp = run_bert(compile=True)
    assert all(r.prefix_method == "call-cache" and r.compiled and r.compile_reason is None for r, _ in comp)
    # the classifier reads layer 1 at [CLS]: the compiled unit is its pruned graph (fastedit.rows)
    assert all(r.rows_pruned == ["bert.encoder.layer.1"] for r, _ in comp)
    from fastedit._core import _SPLIT_CACHE
    assert any(r._compiled for e in _SPLIT_CACHE[model].values() for r in e["split"].rows)
    assert compiled_calls(model) > 0
    assert_same(eager, comp)
    units = fc.compile_units(model, {id(m) for m in (model, model.bert, model.bert.encoder,
                                                     model.bert.encoder.layer, model.bert.encoder.layer[1])},
                             {id(model.bert.embeddings), id(model.bert.encoder.layer[0])})
    assert units == [model.bert.encoder.layer[1]]
    assert_identical(model, snap)
    with torch.no_grad():  # an in-place change of the edited layer: the compiled unit reads it
        model.bert.encoder.layer[1].output.dense.weight.mul_(1.5)
    assert_same(run_bert(), run_bert(compile=True))


def test_auto_stays_eager_on_the_cpu():
    m = make_model()
    x, y = edits(m, n=1)[0]
    for _ in range(fc.AUTO_COMPILE_AFTER + 1):
        r = fe.edit(m, x, y, params="block", compile="auto")
        assert not r.compiled and r.compile_reason is None
        r.revert()


def test_auto_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not fc.resolve_compile("auto", cpu, 10_000)
    assert not fc.resolve_compile("auto", gpu, fc.AUTO_COMPILE_AFTER - 1)
    assert fc.resolve_compile("auto", gpu, fc.AUTO_COMPILE_AFTER)
    assert fc.resolve_compile(True, cpu, 0) and not fc.resolve_compile(False, gpu, 10**6)


@pytest.mark.parametrize("kw, match", [({"compile": "yes"}, "compile must be"), ({"compile": 1}, "compile must be"),
                                       ({"cuda_graph": "always"}, "cuda_graph must be"),
                                       ({"cuda_graph": True}, "needs the editable parameters on a CUDA device")])
def test_bad_switches_raise_and_leave_the_model_unchanged(kw, match):
    model = make_model()
    snap = snapshot(model, layout=True)
    x, y = edits(model, n=1)[0]
    with pytest.raises(ValueError, match=match):
        fe.edit(model, x, y, params="block", **kw)
    assert_identical(model, snap)


def test_cuda_graph_auto_on_the_cpu_runs_eager_exactly_and_says_why():
    model = make_model()
    cases = edits(model, n=2)
    eager = run(model, cases)
    got = run(model, cases, cuda_graph="auto")
    for (re, pe), (ro, po) in zip(eager, got):
        assert not ro.cuda_graph and "not CUDA" in ro.cuda_graph_reason and re.cuda_graph_reason is None
        assert (re.success, re.steps, re.loss) == (ro.success, ro.steps, ro.loss)
        assert all(torch.equal(a, b) for a, b in zip(pe, po))


def test_fingerprint_sees_replaced_moved_frozen_and_rebound_tensors():
    model = make_model()
    base = model_fingerprint(model)
    assert model_fingerprint(model) == base
    with torch.no_grad():
        model.block[0].weight.add_(1.0)  # in place: the same tensors, the same fingerprint
    assert model_fingerprint(model) == base
    changes = [lambda m: m.block[0].weight.requires_grad_(False),
               lambda m: setattr(m.block[0].weight, "data", m.block[0].weight.data.clone()),
               lambda m: setattr(m.block[0], "weight", nn.Parameter(m.block[0].weight.detach().clone())),
               lambda m: m.block[1].register_buffer("running_mean", m.block[1].running_mean.clone()),
               lambda m: m.to(torch.float64),
               lambda m: m.block.append(nn.Identity())]
    for change in changes:
        m = make_model()
        before = model_fingerprint(m)
        change(m)
        assert model_fingerprint(m) != before


def test_selection_cache_follows_freezing():
    model = make_model()
    x, y = edits(model, n=1)[0]
    r = fe.edit(model, x, y, params="block")
    assert "block.0.weight" in r.param_names
    r.revert()
    model.block[0].weight.requires_grad_(False)
    r = fe.edit(model, x, y, params="block")
    assert "block.0.weight" not in r.param_names and "block.0.bias" in r.param_names
    r.revert()


def test_finite_check_fast_path_is_exact():
    ok = [torch.randn(5, 3), torch.randn(7)]
    assert bool(_finite_per_edit(ok, False))
    huge = [torch.full((4,), 3e30), torch.randn(3)]  # finite, but its squared norm overflows float32
    assert bool(_finite_per_edit(huge, False))
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = [torch.randn(5, 3), torch.randn(7)]
        g[1][4] = bad
        assert not bool(_finite_per_edit(g, False))


# ------------------------------------------------------------------------------------------------
# CUDA: the captured loop and the compiled step against the eager loop (run by benchmarks/gpu/check.sh)
# ------------------------------------------------------------------------------------------------
@cuda
def test_cuda_graph_edits_equal_the_eager_loop():
    model = make_model().cuda()
    cases = [(x.cuda(), y.cuda()) for x, y in edits(model.cpu(), n=6)]
    model.cuda()
    snap = snapshot(model)
    eager = run(model, cases, early_exit=False)
    graphed = run(model, cases, cuda_graph=True)
    assert all(r.cuda_graph and r.cuda_graph_reason is None for r, _ in graphed)
    assert_same(eager, graphed, rtol=1e-5, atol=1e-6)
    assert_identical(model, snap)
    # a kept edit changes the parameters in place: the next replay reads them
    kept = fe.edit(model, *cases[0], editor=fe.RMSProp(1e-2), params="block", cuda_graph=True, on_failure="keep")
    assert kept.applied
    assert_same(run(model, cases[1:], early_exit=False), run(model, cases[1:], cuda_graph=True), rtol=1e-5, atol=1e-6)
    kept.revert()
    # bad labels raise before the replay, the model unchanged
    x, _ = cases[0]
    with pytest.raises(ValueError):
        fe.edit(model, x, torch.tensor([12], device="cuda"), params="block", cuda_graph=True)
    assert_identical(model, snap)


@cuda
def test_cuda_compiled_and_graphed_edits_equal_eager():
    model = make_model()
    cases = [(x.cuda(), y.cuda()) for x, y in edits(model, n=4)]
    model.cuda()
    eager = run(model, cases, early_exit=False)
    assert_same(eager, run(model, cases, compile=True, early_exit=False))
    assert_same(eager, run(model, cases, compile=True, cuda_graph=True))


@pytest.mark.slow
def test_evaluate_and_tune_compiled_equal_eager():
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    edits_ = (x, wrong_label(model, x))
    cx = torch.randn(40, 1, 8, 8, generator=gen)
    control = (cx, torch.randint(0, 10, (40,), generator=gen))
    kw = dict(editor=fe.RMSProp(1e-2), params="block", progress=False)
    eager = fe.evaluate(model, edits_, control, **kw)
    comp = fe.evaluate(model, edits_, control, compile=True, **kw)
    assert not eager.compiled and comp.compiled and comp.compile_reason is None and compiled_calls(model) > 0
    assert torch.equal(eager.per_edit["steps"], comp.per_edit["steps"])
    assert torch.equal(eager.per_edit["success"], comp.per_edit["success"])
    assert torch.equal(eager.per_edit["errors"], comp.per_edit["errors"])
    assert comp.to_dict()["compiled"] is True
    vm = fe.evaluate(model, edits_, control, compile=True, strategy="vmap", edits_per_group=3, **kw)
    assert not vm.compiled and "vmap" in vm.compile_reason
    tuned = fe.tune(model, edits_, control, editor="rmsprop", params="block", grid={"lr": [1e-2]}, progress=False,
                    compile=True)
    assert tuned.report.compiled


@pytest.mark.slow
def test_surgery_compiled_equals_eager():
    model = make_model()
    x, y = edits(model, n=1)[0]
    snap = snapshot(model)
    eager = fe.surgery(model, x, y, budget=20, params="block", on_failure="keep")
    eager_state = {k: v.clone() for k, v in model.state_dict().items()}
    eager.revert()
    assert_identical(model, snap)
    comp = fe.surgery(model, x, y, budget=20, params="block", on_failure="keep", compile=True)
    assert comp.compiled and not eager.compiled and compiled_calls(model) > 0
    assert (comp.success, comp.steps, comp.nnz) == (eager.success, eager.steps, eager.nnz)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, eager_state[k], rtol=1e-4, atol=1e-5)
    comp.revert()


class _FakeGraph:
    """A CUDA graph stand-in on the CPU: capture runs the loop once (as a capture records it) and
    replay runs it again, writing into the captured outputs as a replay does. What it checks: the
    static buffers, the per-edit validation, the cache keys and the reads of the live parameters."""

    active = None

    def __init__(self):
        self.fn = None

    def replay(self):
        fresh = self.fn()
        for old, new in zip(torch.utils._pytree.tree_leaves(vars(self.out)), torch.utils._pytree.tree_leaves(vars(fresh))):
            old.copy_(new)


def _fake_cuda(monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def graph(g):
        yield
    real = fc.GraphedEditLoop._capture

    def capture(self, acts, constraint):
        g = _FakeGraph()
        monkeypatch.setattr(fc.torch.cuda, "CUDAGraph", lambda: g)
        real(self, acts, constraint)
        g.fn = self._loop
        g.out = self.out
    monkeypatch.setattr(fc, "_graph_device", lambda device: True)
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(fc.torch.cuda, "Stream", stream)
    monkeypatch.setattr(fc.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(fc.torch.cuda, "current_stream", stream)
    monkeypatch.setattr(fc.torch.cuda, "graph", graph)
    monkeypatch.setattr(fc.GraphedEditLoop, "_capture", capture)


def test_captured_loop_logic_on_the_cpu_equals_the_masked_eager_loop(monkeypatch):
    model = make_model()
    cases = edits(model, n=4)
    snap = snapshot(model)
    eager = run(model, cases, early_exit=False)
    _fake_cuda(monkeypatch)
    graphed = run(model, cases, cuda_graph=True)
    assert all(r.cuda_graph for r, _ in graphed)
    assert_same(eager, graphed, rtol=0, atol=0)
    assert_identical(model, snap)
    # one capture serves every edit of these shapes; another batch size captures again
    from fastedit._core import _SPLIT_CACHE
    entry = next(e for e in _SPLIT_CACHE[model].values() if "graphs" in e)
    assert len(entry["graphs"]) == 1
    two = edits(model, n=2, seed=4, batch=2)
    assert_same(run(model, two, early_exit=False), run(model, two, cuda_graph=True), rtol=0, atol=0)
    # a kept edit changed the parameters in place: the replay reads them
    kept = fe.edit(model, *cases[0], editor=fe.RMSProp(1e-2), params="block", on_failure="keep")
    assert_same(run(model, cases[1:], early_exit=False), run(model, cases[1:], cuda_graph=True), rtol=0, atol=0)
    kept.revert()
    # bad labels raise before any replay, the model unchanged
    with pytest.raises(ValueError, match="out of range|label"):
        fe.edit(model, cases[0][0], torch.tensor([12]), params="block", cuda_graph=True)
    assert_identical(model, snap)
    # early_exit=True and constraints that are not captured run eager, saying why
    r = fe.edit(model, *cases[0], params="block", cuda_graph="auto", early_exit=True)
    assert not r.cuda_graph and "early_exit" in r.cuda_graph_reason
    r.revert()
    r = fe.edit(model, cases[0][0], fe.FunctionConstraint(lambda z: z[:, 0] - z[:, 1]), params="block",
                cuda_graph="auto")
    assert not r.cuda_graph and "not captured" in r.cuda_graph_reason
    r.revert()
