"""Neural Network Surgery: sparse, bit-exact, revertible changes (fastedit.surgery, fastedit.sparse_delta).

Oracles: bit patterns compared coordinate by coordinate with plain PyTorch, fe.edit for "this edit
can be done", plain autograd for the gradient-selected mask, and replaying NEW values by hand for the
journal.
"""
import copy

import pytest
import torch
from helpers import assert_identical, bits, snapshot
from torch import nn

import fastedit as fe
from fastedit.edit import EditError
from fastedit.edit_journal import EditJournal
from fastedit.models.small import MLP, SmallCNN
from fastedit.sparse_delta import SparseDelta
from fastedit.surgery import METHODS, SurgeryResult, resolve_budget, surgery
from fastedit.surgery.tuner import Tuner

D, C = 16, 4
_W = torch.randn(D, C, generator=torch.Generator().manual_seed(1))


def data(n, seed):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, (x @ _W).argmax(1)


@pytest.fixture(scope="module")
def trained():
    """A 16-32-4 MLP (676 parameters) fitted to a linear rule."""
    torch.manual_seed(0)
    model = MLP(D, 32, C)
    x, y = data(512, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def fresh(model):
    return copy.deepcopy(model)


def changed_coords(model, snap):
    """{name: flat indices whose bits differ from the snapshot} (naive, per tensor)."""
    out = {}
    for k, v in model.state_dict().items():
        diff = torch.nonzero(bits(v).reshape(-1) != bits(snap[k]).reshape(-1)).reshape(-1)
        if diff.numel():
            out[k] = diff
    return out


def assert_sparse(model, snap, result, n):
    """At most n scalars changed, only parameters, exactly the delta's coordinates with its NEW bits."""
    diff = changed_coords(model, snap)
    params = dict(model.named_parameters())
    assert all(k in params for k in diff), "a buffer changed"
    assert sum(v.numel() for v in diff.values()) <= n
    assert result.nnz <= n
    if result.applied:
        assert set(diff) == set(result.delta.names)
        for k, idx in diff.items():
            e = result.delta.entry(k)
            assert torch.equal(e["indices"], idx)
            assert torch.equal(bits(e["new"]), bits(params[k].detach().reshape(-1)[idx]))
            assert torch.equal(bits(e["old"]), bits(snap[k].reshape(-1)[idx]))
    else:
        assert diff == {}


def edit_case(model):
    x, _ = data(1, 7)
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % C
    return x, y


# editors per method for the goal tests: lagrange is ISTA with GD (see the module docstring)
CASES = [("select-random", None), ("select-grad", None), ("select-delta", None), ("lagrange", fe.GD(0.1)),
         ("lagrange", None), ("dynamic", None)]


# ------------------------------------------------------------------------------------------------
# surgery: goal reached, sparsity, bit identity, revert
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,editor", CASES, ids=lambda v: str(v))
def test_edit_goal_sparse_and_revertible(trained, method, editor):
    x, y = edit_case(trained)
    oracle = fresh(trained)
    assert fe.edit(oracle, x, y, editor=fe.ScaledGD(0.1), max_steps=50).success  # the edit can be done

    model = fresh(trained)
    snap = snapshot(model)
    n = 60 if method == "select-random" else 20
    r = surgery(model, x, y, n, method=method, editor=editor)
    assert isinstance(r, SurgeryResult) and r.success and r.applied and r.method == method
    assert 0 < r.nnz <= n and r.budget == n and r.steps > 0
    assert_sparse(model, snap, r, n)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), y)
    assert r.loss <= 0 < r.initial_loss
    d = r.to_dict()
    assert d["nnz"] == r.nnz and d["success"] and d["method"] == method
    r.revert()
    assert not r.applied
    assert_identical(model, snap)
    r.revert()  # a no-op now
    r.apply()
    assert_sparse(model, snap, r, n)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget,params,expect", [(1, None, 1), (0.01, None, 6), (10**6, "classifier", 132),
                                                  (0.5, "features.0.bias", 16), (7, "classifier.weight", 7)])
def test_budget_is_respected(trained, method, budget, params, expect):
    x, y = edit_case(trained)
    model = fresh(trained)
    snap = snapshot(model)
    r = surgery(model, x, y, budget, method=method, params=params, steps=4, on_failure="keep",
                probe_steps=2, refit_steps=2, shrink_every=1)
    assert r.budget == expect
    assert r.applied
    assert_sparse(model, snap, r, expect)
    allowed = {n for n, _ in fe.select_parameters(model, params)}
    assert set(r.delta.names) <= allowed
    r.revert()
    assert_identical(model, snap)


def test_resolve_budget():
    assert resolve_budget(3, 10) == 3 and resolve_budget(30, 10) == 10
    assert resolve_budget(0.25, 10) == 2 and resolve_budget(0.01, 10) == 1 and resolve_budget(0.999, 1000) == 999
    for bad in (0, -2, 1.0, 1.5, 0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            resolve_budget(bad, 10)
    for bad in (True, "5", None, [3]):
        with pytest.raises(TypeError):
            resolve_budget(bad, 10)


def test_select_grad_mask_is_top_gradient(trained):
    """select-grad only touches the top-n coordinates of |∇ l_e(θ₀)| (plain autograd oracle)."""
    x, y = edit_case(trained)
    model = fresh(trained)
    n = 15
    z = model(x)
    loss = (z.amax(1) - z.gather(1, y[:, None])[:, 0]).amax()
    names, ps = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, ps)
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    top = set(torch.topk(flat, n).indices.tolist())
    offsets = dict(zip(names, torch.tensor([0] + [p.numel() for p in ps]).cumsum(0).tolist()))
    r = surgery(model, x, y, n, method="select-grad", on_failure="keep")
    got = {offsets[k] + i for k in r.delta.names for i in r.delta.entry(k)["indices"].tolist()}
    assert got and got <= top


def test_dynamic_uses_budget_and_seeded_random_is_reproducible(trained):
    x, y = edit_case(trained)
    a, b, c = fresh(trained), fresh(trained), fresh(trained)
    ra = surgery(a, x, y, 30, method="select-random", seed=3, steps=5, on_failure="keep")
    rb = surgery(b, x, y, 30, method="select-random", seed=3, steps=5, on_failure="keep")
    rc = surgery(c, x, y, 30, method="select-random", seed=4, steps=5, on_failure="keep")
    assert ra.delta == rb.delta
    assert ra.delta != rc.delta


def test_lagrange_prox_matches_formula():
    t0 = [torch.randn(5, 7), torch.randn(11)]
    t = [a + torch.randn_like(a) * 0.3 for a in t0]
    tau = 0.2
    want = []
    for a, b in zip(t, t0):
        d = a - b
        want.append(torch.where(d.abs() <= tau, b, b + torch.sign(d) * (d.abs() - tau)))
    tuner = Tuner(None, fe.GD(1.0), t0, 3)
    tuner.prox(t, tau)
    for a, w, b in zip(t, want, t0):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-6)
        assert torch.equal(bits(a)[(a - b).abs() <= 0], bits(b)[(a - b).abs() <= 0])  # exact θ₀ bits
        assert torch.equal((w == b), bits(a) == bits(b))


def test_failure_reverts_by_default_and_keep_keeps(trained):
    x, y = data(8, 11)
    y = (trained(x).argmax(1) + 2) % C  # 8 flips with one scalar: impossible
    model = fresh(trained)
    snap = snapshot(model)
    r = surgery(model, x, y, 1, method="dynamic", steps=3)
    assert not r.success and not r.applied and r.nnz <= 1
    assert_identical(model, snap)
    r2 = surgery(model, x, y, 1, method="dynamic", steps=3, on_failure="keep")
    assert not r2.success and r2.applied
    assert_sparse(model, snap, r2, 1)
    r2.revert()
    assert_identical(model, snap)


def test_already_satisfied_changes_nothing(trained):
    x, _ = data(3, 5)
    y = trained(x).argmax(1)
    model = fresh(trained)
    snap = snapshot(model)
    r = surgery(model, x, y, 10)
    assert r.success and r.steps == 0 and r.nnz == 0 and r.loss <= 0
    assert_identical(model, snap)


def test_modes_and_buffers_kept_with_batchnorm():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=5, width=3, pool_size=1)
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 1, 6, 6))
    model.features[1].eval()  # mixed modes must come back as they were
    flags = [m.training for m in model.modules()]
    snap = snapshot(model)
    x = torch.randn(2, 1, 6, 6)
    model.eval()
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 5
    model.train()
    model.features[1].eval()
    r = surgery(model, x, y, 25, method="dynamic", params="features", steps=200, reduction="mean")
    assert [m.training for m in model.modules()] == flags
    assert_sparse(model, snap, r, 25)  # buffers (running stats, counters) untouched
    assert set(r.delta.names) <= {n for n, _ in model.named_parameters() if n.startswith("features")}
    if r.success:
        model.eval()
        with torch.no_grad():
            z = model(x)
        assert (z.amax(1) - z.gather(1, y[:, None])[:, 0]).mean() <= 0
    r.revert()
    assert_identical(model, snap)


# ------------------------------------------------------------------------------------------------
# pattern injection
# ------------------------------------------------------------------------------------------------
def trigger(x):
    x = x.clone()
    x[:, :3] = 3.0
    return x


@pytest.mark.parametrize("method,editor", CASES, ids=lambda v: str(v))
def test_pattern_injection(trained, method, editor):
    xs, ys = data(96, 2)
    xt = trigger(xs[ys != 0])
    xc, yc = data(128, 3)
    xte, yte = data(256, 4)
    xtt = trigger(xte[yte != 0])
    with torch.no_grad():
        assert (trained(xtt).argmax(1) == 0).float().mean() < 0.2  # the trigger is new to the model
    model = fresh(trained)
    snap = snapshot(model)
    n = 80 if method == "select-random" else 40
    r = surgery(model, xt, 0, n, method=method, editor=editor, goal="pattern", clean=(xc, yc), batch_size=32,
                target_rate=0.9, steps=40, seed=1)
    assert r.success and r.applied and r.goal == "pattern"
    assert r.metrics["target_rate"] >= 0.9 and set(r.metrics) >= {"clean_agreement", "clean_kl", "clean_accuracy"}
    assert_sparse(model, snap, r, n)
    with torch.no_grad():
        assert (model(xtt).argmax(1) == 0).float().mean() >= 0.75  # generalises to held-out triggered inputs
        assert (model(xte).argmax(1) == trained(xte).argmax(1)).float().mean() >= 0.8  # clean mostly kept
    r.revert()
    assert_identical(model, snap)


def test_pattern_reproducible_and_clean_optional(trained):
    xs, ys = data(40, 2)
    xt = trigger(xs[ys != 0])
    a, b = fresh(trained), fresh(trained)
    ra = surgery(a, xt, 0, 30, goal="pattern", batch_size=8, steps=3, seed=5, on_failure="keep")
    rb = surgery(b, xt, torch.zeros(xt.shape[0], dtype=torch.long), 30, goal="pattern", batch_size=8, steps=3,
                 seed=5, on_failure="keep")
    assert ra.delta == rb.delta and ra.nnz > 0
    assert "clean_agreement" not in ra.metrics


# ------------------------------------------------------------------------------------------------
# bad input: clear errors, model untouched
# ------------------------------------------------------------------------------------------------
BAD = [
    (dict(budget=0), ValueError, "budget"),
    (dict(budget=-3), ValueError, "budget"),
    (dict(budget=1.0), ValueError, "fraction"),
    (dict(budget=2.5), ValueError, "fraction"),
    (dict(budget=float("nan")), ValueError, "budget"),
    (dict(budget=True), TypeError, "budget"),
    (dict(budget="10"), TypeError, "budget"),
    (dict(method="magic"), ValueError, "method"),
    (dict(goal="other"), ValueError, "goal"),
    (dict(y=9), ValueError, "out of range"),
    (dict(y=-1), ValueError, "out of range"),
    (dict(y=torch.tensor([0.5])), TypeError, "integer"),
    (dict(y=torch.tensor([0, 1])), ValueError, "one label per sample"),
    (dict(params=[]), ValueError, "empty"),
    (dict(params="nope"), ValueError, "nope"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(shrink=1.0), ValueError, "shrink"),
    (dict(start_factor=0.5), ValueError, "start_factor"),
    (dict(l1=-1.0), ValueError, "l1"),
    (dict(target_rate=0.0), ValueError, "target_rate"),
    (dict(on_failure="maybe"), ValueError, "on_failure"),
    (dict(editor="nadam"), ValueError, "editor"),
    (dict(x=torch.randn(1, D, dtype=torch.float64)), ValueError, "dtype"),
    (dict(x=torch.randn(0, D)), ValueError, "non-empty"),
    (dict(x=torch.randn(1, 5)), ValueError, "failed"),
    (dict(clean=torch.randn(3, D)), ValueError, "pattern"),
    (dict(goal="pattern", clean=(torch.randn(3, D), torch.tensor([0, 1, 7]))), ValueError, "out of range"),
    (dict(goal="pattern", clean="x"), TypeError, "clean"),
    (dict(goal="pattern", batch_size=0), ValueError, "batch_size"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[f"{i}-{case[2]}" for i, case in enumerate(BAD)])
def test_bad_input_leaves_model_identical(trained, kwargs, exc, match):
    model = fresh(trained)
    snap = snapshot(model)
    args = dict(x=data(1, 7)[0], y=1, budget=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        surgery(model, **args)
    assert_identical(model, snap)


def test_non_finite_loss_raises_edit_error(trained):
    model = fresh(trained)
    snap = snapshot(model)
    x = torch.full((1, D), float("nan"))
    for goal in ("edit", "pattern"):
        with pytest.raises(EditError, match="non-finite"):
            surgery(model, x, 1, 5, goal=goal)
    assert_identical(model, snap)


# ------------------------------------------------------------------------------------------------
# SparseDelta
# ------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def pair(dtype, seed=0):
    """before/after dicts with a few changed coordinates, including NaN, ±0.0 and odd shapes."""
    g = torch.Generator().manual_seed(seed)
    before = {"a": torch.randn(7, 5, generator=g).to(dtype), "b": torch.randn(13, generator=g).to(dtype),
              "c": torch.randn(3, 1, 2, generator=g).to(dtype), "s": torch.tensor(1.5, dtype=dtype)}
    before["b"][4] = float("nan")
    after = {k: v.clone() for k, v in before.items()}
    after["a"].view(-1)[[0, 9, 34]] += 1.0
    after["b"][[4]] = float("nan")  # NaN → NaN with the same bits: unchanged
    after["b"][[2]] = float("nan")
    after["b"][[5]] = 0.0
    before["b"][5] = -0.0  # -0.0 → 0.0 is a bit change
    after["s"] = torch.tensor(-2.0, dtype=dtype)
    return before, after


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_apply_revert_bit_exact(dtype):
    before, after = pair(dtype)
    delta = SparseDelta.from_models(before, after)
    assert delta.nnz == 3 + 2 + 1 and delta.nnz_per_param == {"a": 3, "b": 2, "s": 1}
    assert delta.names == ["a", "b", "s"] and "nnz=6" in repr(delta)
    work = {k: v.clone() for k, v in before.items()}
    delta.apply(work)
    for k in before:
        assert torch.equal(bits(work[k]), bits(after[k])), k
    with pytest.raises(ValueError, match="OLD"):
        delta.apply(work)  # already applied: check fails, nothing written
    delta.revert(work)
    for k in before:
        assert torch.equal(bits(work[k]), bits(before[k])), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_on_modules(dtype):
    torch.manual_seed(0)
    a = MLP(5, 3, 2).to(dtype)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.classifier.weight[1, 2] += 1
        b.features[0].bias[0] = -7
    delta = SparseDelta.from_models(a, b)
    assert delta.nnz_per_param == {"features.0.bias": 1, "classifier.weight": 1}
    snap = snapshot(a)
    delta.apply(a)
    assert changed_coords(a, snapshot(b)) == {}
    delta.revert(a)
    assert_identical(a, snap)


def test_delta_check_rejects_and_writes_nothing():
    before, after = pair(torch.float32)
    delta = SparseDelta.from_models(before, after)
    work = {k: v.clone() for k, v in before.items()}
    work["s"] += 1  # the last parameter differs: the earlier ones must not be written either
    snap = {k: v.clone() for k, v in work.items()}
    with pytest.raises(ValueError, match="s: 1 of 1"):
        delta.apply(work)
    assert all(torch.equal(bits(work[k]), bits(snap[k])) for k in work)
    delta.apply(work, check=False)  # without the check it writes
    assert torch.equal(work["s"], after["s"])
    for bad, match in [({k: v for k, v in before.items() if k != "b"}, "no parameter"),
                       ({**before, "a": before["a"].reshape(5, 7)}, "shape"),
                       ({**before, "a": before["a"].double()}, "float64")]:
        with pytest.raises(ValueError, match=match):
            delta.apply({k: v.clone() for k, v in bad.items()})


def test_delta_write_failure_restores():
    with torch.inference_mode():
        frozen = torch.zeros(4)  # an inference tensor: readable, but in-place writes outside inference mode fail
    base = {"a": torch.zeros(4), "b": frozen}
    delta = SparseDelta.from_entries({"a": (torch.tensor([1, 3]), torch.zeros(2), torch.ones(2), (4,)),
                                      "b": (torch.tensor([0, 2]), torch.zeros(2), torch.ones(2), (4,))})
    with pytest.raises(RuntimeError):
        delta.apply(base)
    assert torch.equal(base["a"], torch.zeros(4))


def test_from_entries_sorts_and_validates():
    d = SparseDelta.from_entries({"w": (torch.tensor([5, 1, 3]), torch.tensor([5., 1., 3.]),
                                        torch.tensor([50., 10., 30.]), (2, 3))})
    e = d.entry("w")
    assert e["indices"].tolist() == [1, 3, 5] and e["new"].tolist() == [10., 30., 50.] and e["old"].tolist() == [1., 3., 5.]
    with pytest.raises(ValueError, match="unique"):
        SparseDelta.from_entries({"w": (torch.tensor([1, 1]), torch.zeros(2), torch.ones(2), (4,))})
    with pytest.raises(ValueError, match="lie in"):
        SparseDelta.from_entries({"w": (torch.tensor([1, 4]), torch.zeros(2), torch.ones(2), (4,))})
    with pytest.raises(ValueError, match="indices but"):
        SparseDelta.from_entries({"w": (torch.tensor([1, 2]), torch.zeros(3), torch.ones(2), (4,))})
    with pytest.raises(TypeError, match="dtype"):
        SparseDelta.from_entries({"w": (torch.tensor([1]), torch.zeros(1), torch.ones(1, dtype=torch.float64), (4,))})
    with pytest.raises(ValueError, match="different names"):
        SparseDelta.from_models({"a": torch.zeros(2)}, {"b": torch.zeros(2)})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_and_patched_state_dict(dtype):
    before, after = pair(dtype, seed=3)
    for k in ("b",):  # no NaN for the dense comparison
        before[k] = torch.nan_to_num(before[k])
        after[k] = torch.nan_to_num(after[k])
    delta = SparseDelta.from_models(before, after)
    dense = delta.dense()
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    for k in before:
        want = after[k].to(cd) - before[k].to(cd)
        if k in dense:
            assert dense[k].dtype == cd and torch.equal(dense[k], want), k
        else:
            assert not want.any()

    torch.manual_seed(1)
    model = MLP(4, 3, 2).to(dtype)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.classifier.weight[0, 1] = 3.0
    delta = SparseDelta.from_models(model, edited)
    snap = snapshot(model)
    sd = delta.patched_state_dict(model)
    assert_identical(model, snap)
    delta.apply(model)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(bits(sd[k]), bits(v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_load_round_trip(tmp_path, dtype):
    before, after = pair(dtype)
    delta = SparseDelta.from_models(before, after)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    back = SparseDelta.load(path)
    assert back == delta
    for n in delta.names:
        e, f = delta.entry(n), back.entry(n)
        assert torch.equal(bits(e["new"]), bits(f["new"])) and torch.equal(bits(e["old"]), bits(f["old"]))
        assert e["shape"] == f["shape"] and e["dtype"] == f["dtype"] == dtype
    work = {k: v.clone() for k, v in before.items()}
    back.apply(work)
    assert all(torch.equal(bits(work[k]), bits(after[k])) for k in work)


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    before, after = pair(torch.float32)
    delta = SparseDelta.from_models(before, after)
    good = tmp_path / "good.safetensors"
    delta.save(good)
    raw = good.read_bytes()

    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "format.safetensors"), metadata={"format": "fastedit.sparse_delta",
                                                                                     "version": "99"})
    save_file({"0.indices": torch.tensor([3, 1]), "0.old": torch.zeros(2), "0.new": torch.ones(2)},
              str(tmp_path / "unsorted.safetensors"),
              metadata={"format": "fastedit.sparse_delta", "version": "1",
                        "delta": '{"params": [{"name": "w", "shape": [4], "dtype": "float32"}]}'})
    save_file({"0.indices": torch.tensor([1])}, str(tmp_path / "missing.safetensors"),
              metadata={"format": "fastedit.sparse_delta", "version": "1",
                        "delta": '{"params": [{"name": "w", "shape": [4], "dtype": "float32"}]}'})
    for name, match in [("trunc", "safetensors"), ("junk", "safetensors"), ("foreign", "format"),
                        ("format", "version"), ("unsorted", "sorted"), ("missing", "missing")]:
        with pytest.raises(ValueError, match=match):
            SparseDelta.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError):
        SparseDelta.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="format"):
        EditJournal.load(good, {"a": torch.zeros(1)})


def test_surgery_result_save_and_apply_to_copy(trained, tmp_path):
    x, y = edit_case(trained)
    model = fresh(trained)
    other = fresh(trained)
    r = surgery(model, x, y, 20)
    assert r.success
    r.save(tmp_path / "s.safetensors")
    d = SparseDelta.load(tmp_path / "s.safetensors")
    assert d == r.delta
    r.apply(other)
    assert changed_coords(other, snapshot(model)) == {}
    r.revert(other)
    assert changed_coords(other, snapshot(trained)) == {}


# ------------------------------------------------------------------------------------------------
# EditJournal
# ------------------------------------------------------------------------------------------------
def random_delta(base, seed, coords):
    """A delta of ``base`` (dict) setting the given flat coordinates of "w" and "v" to new values."""
    g = torch.Generator().manual_seed(seed)
    after = {k: v.clone() for k, v in base.items()}
    for k, idx in coords.items():
        after[k].view(-1)[torch.tensor(idx)] = torch.randn(len(idx), generator=g, dtype=base[k].dtype)
    return SparseDelta.from_models(base, after)


def replay(base, deltas):
    """The documented result: NEW values written in order onto the original."""
    out = {k: v.clone() for k, v in base.items()}
    for d in deltas:
        d.apply(out, check=False)
    return out


def same_state(a, b):
    return all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


@pytest.fixture
def base():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(6, 5, generator=g), "v": torch.randn(9, generator=g).double()}


def test_journal_disjoint_rollback_middle(base):
    d1 = random_delta(base, 1, {"w": [0, 3], "v": [1]})
    d2 = random_delta(base, 2, {"w": [5, 7, 29]})
    d3 = random_delta(base, 3, {"v": [0, 8], "w": [11]})
    model = {k: v.clone() for k, v in base.items()}
    j = EditJournal(model)
    ids = [j.apply(d, name=f"d{i}") for i, d in enumerate((d1, d2, d3))]
    with pytest.raises(ValueError, match="OLD"):
        j.apply(d1, check=True)  # the model no longer holds d1's OLD values
    assert len(j) == 3
    assert len(j) == 3 and same_state(model, replay(base, [d1, d2, d3]))
    removed = j.rollback(ids[1])
    assert removed.name == "d1" and [e.id for e in j.entries] == [ids[0], ids[2]]
    assert same_state(model, replay(base, [d1, d3]))
    j.undo()
    assert same_state(model, replay(base, [d1]))
    j.undo()
    assert same_state(model, base) and len(j) == 0
    with pytest.raises(IndexError):
        j.undo()


@pytest.mark.parametrize("drop", [0, 1, 2])
def test_journal_overlapping_rollback(base, drop):
    deltas = [random_delta(base, 1, {"w": [0, 1, 2, 3], "v": [4]}),
              random_delta(base, 2, {"w": [2, 3, 4, 5], "v": [4, 5]}),
              random_delta(base, 3, {"w": [3, 5, 6], "v": [6]})]
    model = {k: v.clone() for k, v in base.items()}
    j = EditJournal(model)
    ids = [j.apply(d) for d in deltas]
    assert same_state(model, replay(base, deltas))
    j.rollback(ids[drop])
    kept = [d for i, d in enumerate(deltas) if i != drop]
    assert same_state(model, replay(base, kept))
    for e in list(j.entries)[::-1]:
        j.rollback(e.id)
    assert same_state(model, base)


def test_journal_detects_external_change_and_changes_nothing(base):
    model = {k: v.clone() for k, v in base.items()}
    j = EditJournal(model)
    a = j.apply(random_delta(base, 1, {"w": [0, 1]}))
    j.apply(random_delta(base, 2, {"w": [1, 2]}))
    model["w"].view(-1)[2] += 1  # someone else wrote over the journal's coordinate
    snap = {k: v.clone() for k, v in model.items()}
    with pytest.raises(ValueError, match="NEW"):
        j.rollback(a)
    assert same_state(model, snap) and len(j) == 2
    with pytest.raises(KeyError):
        j.rollback(99)


def test_journal_on_module_and_save_load(trained, tmp_path):
    model = fresh(trained)
    snap = snapshot(model)
    x, y = edit_case(trained)
    j = EditJournal(model)
    r1 = surgery(fresh(trained), x, y, 20)
    x2, _ = data(1, 8)
    y2 = (trained(x2).argmax(1) + 2) % C
    r2 = surgery(fresh(trained), x2, y2, 20)
    assert r1.success and r2.success
    i1 = j.apply(r1.delta, name="first")
    j.apply(r2.delta)  # may overlap r1: the journal re-records OLD
    path = tmp_path / "journal.safetensors"
    j.save(path)
    loaded = EditJournal.load(path, model)
    assert [(e.id, e.name) for e in loaded.entries] == [(e.id, e.name) for e in j.entries]
    assert all(a.delta == b.delta for a, b in zip(loaded.entries, j.entries))
    with pytest.raises(ValueError):
        EditJournal.load(path, fresh(trained))  # that model does not hold the journal's state
    loaded.rollback(i1)
    want = fresh(trained)
    r2.delta.apply(want)
    assert changed_coords(model, snapshot(want)) == {}
    loaded.undo()
    assert_identical(model, snap)
    assert loaded.apply(r1.delta) == 2  # ids keep counting after a load


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_surgery_keeps_dtype(trained, dtype):
    model = fresh(trained).to(dtype)
    x, _ = data(1, 7)
    x = x.to(dtype)
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % C
    snap = snapshot(model)
    r = surgery(model, x, y, 20, method="dynamic", on_failure="keep")
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(r.delta.entry(n)["dtype"] == dtype for n in r.delta.names)
    assert_sparse(model, snap, r, 20)
    if dtype == torch.float64:
        assert r.success
    r.revert()
    assert_identical(model, snap)


def test_mixed_float64_selection_rejected(trained):
    model = fresh(trained)
    model.classifier.double()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="float64"):
        surgery(model, data(1, 7)[0], 1, 5)
    assert_identical(model, snap)


def test_journal_records_surgeries_applied_in_place(trained):
    """surgery writes the model itself; record() logs it, rollback of the first keeps the second."""
    model = fresh(trained)
    snap = snapshot(model)
    x, y = edit_case(trained)
    x2, _ = data(1, 8)
    y2 = (trained(x2).argmax(1) + 2) % C
    j = EditJournal(model)
    r1 = surgery(model, x, y, 20)
    i1 = j.record(r1, name="first")
    r2 = surgery(model, x2, y2, 20)           # made on top of the first
    j.record(r2.delta)
    assert r1.success and r2.success and len(j) == 2
    untouched = fresh(trained)
    with pytest.raises(ValueError, match="NEW"):
        EditJournal(untouched).record(r1.delta)  # that model does not hold the delta: refused, …
    assert_identical(untouched, snap)
    j.rollback(i1)                            # … and a rollback gives "r2 alone on the original"
    want = {k: v.clone() for k, v in snap.items()}
    r2.delta.apply(want, check=False)
    assert changed_coords(model, want) == {}
    j.undo()
    assert_identical(model, snap)
    with pytest.raises(TypeError):
        j.record("not a delta")
