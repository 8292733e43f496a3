"""fastedit.baselines: EWC editing, Deep k-NN, Editable+CNP, each against a naive reference."""
import copy

import pytest
import torch
from helpers import assert_identical, snapshot
from torch import nn

import fastedit as fe
from fastedit.baselines import (
    ConditionedModel,
    ConditionEncoder,
    DeepKNN,
    cnp_edit,
    cnp_evaluate,
    dknn_evaluate,
    ewc_edit,
    fisher_diagonal,
    train_cnp,
)
from fastedit.edit import EditError


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """stem → block (the chain) → pool → head; BatchNorm and dropout to exercise eval mode."""

    def __init__(self, dtype=torch.float32, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(24, classes)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.drop(self.pool(self.block(self.stem(x))).flatten(1)))


def make_convnet(dtype=torch.float32, seed=0, classes=5):
    torch.manual_seed(seed)
    model = ConvNet(dtype, classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        for _ in range(3):
            model(torch.randn(32, 1, 6, 6, dtype=dtype))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# EWC: Fisher diagonal
# ------------------------------------------------------------------------------------------------
def naive_fisher(model, x, y, names, mode, seed=None):
    """One sample at a time, plain autograd, eval mode."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    u = None
    if mode == "true":
        u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for i in range(x.shape[0]):
        logp = torch.log_softmax(model(x[i:i + 1]), -1)[0]
        label = int(y[i])
        if mode == "true":  # inverse CDF, the first class whose cumulative probability exceeds u
            probs = logp.detach().double().exp()
            acc, label = 0.0, probs.shape[0] - 1
            for j in range(probs.shape[0]):
                acc += float(probs[j])
                if acc > float(u[i]):
                    label = j
                    break
        grads = torch.autograd.grad(logp[label], [params[n] for n in names])
        for n, g in zip(names, grads):
            sums[n] += g * g
    return {n: s / x.shape[0] for n, s in sums.items()}


@pytest.mark.parametrize("mode", ["empirical", "true"])
def test_fisher_diagonal_matches_naive_per_sample_loop(mode):
    model = make_convnet(torch.float64)
    x = torch.randn(23, 1, 6, 6, dtype=torch.float64)  # 23 with chunks of 5: a ragged last chunk
    y = torch.randint(0, 5, (23,))
    model.train()  # the estimate must switch to eval mode (dropout off) and restore the mode
    snap = snapshot(model)
    got = fisher_diagonal(model, (x, y), ["block", "head.weight"], batch_size=5, mode=mode,
                          generator=torch.Generator().manual_seed(7))
    assert model.training and model.drop.training
    assert_identical(model, snap)
    assert all(p.grad is None for p in model.parameters())
    names = ["block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias", "head.weight"]
    assert list(got) == names
    want = naive_fisher(copy.deepcopy(model), x, y, names, mode, seed=7)
    for n in names:
        assert got[n].shape == want[n].shape and got[n].dtype == torch.float64
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)
        assert bool((got[n] > 0).any())


def test_fisher_true_mode_samples_from_the_model_and_num_samples_prefix():
    model = make_convnet(torch.float64)
    x = torch.randn(30, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (30,))
    a = fisher_diagonal(model, (x, y), "head", mode="true", generator=torch.Generator().manual_seed(1))
    b = fisher_diagonal(model, (x, y), "head", mode="true", generator=torch.Generator().manual_seed(1))
    c = fisher_diagonal(model, (x, y), "head", mode="empirical")
    assert all(torch.equal(a[n], b[n]) for n in a)  # reproducible with the same generator
    assert not torch.allclose(a["head.weight"], c["head.weight"])  # labels do come from the model
    d = fisher_diagonal(model, (x, y), "head", num_samples=7, batch_size=3)
    e = fisher_diagonal(model, (x[:7], y[:7]), "head", batch_size=4)
    for n in d:
        torch.testing.assert_close(d[n], e[n], rtol=1e-12, atol=0)


def test_fisher_rejects_bad_input():
    model = make_convnet()
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="mode"):
        fisher_diagonal(model, (x, y), mode="fisher")
    with pytest.raises(ValueError, match="batch_size"):
        fisher_diagonal(model, (x, y), batch_size=0)
    with pytest.raises(TypeError, match="integer"):
        fisher_diagonal(model, (x, y.float()))
    with pytest.raises(ValueError, match="same number"):
        fisher_diagonal(model, (x, y[:3]))
    with pytest.raises(ValueError, match="no parameter"):
        fisher_diagonal(model, (x, y), "nope")
    with pytest.raises(ValueError, match="dtype"):
        fisher_diagonal(model, (x.double(), y))
    with pytest.raises(ValueError, match="num_samples"):
        fisher_diagonal(model, (x, y), num_samples=0)


# ------------------------------------------------------------------------------------------------
# EWC: edits
# ------------------------------------------------------------------------------------------------
def wrong_label(model, x):
    """The least likely class: an edit that takes several steps."""
    with torch.no_grad():
        return model(x).argmin(-1)


@pytest.mark.parametrize("editor", [fe.GD(0.1), fe.RMSProp(0.01), fe.Adam(0.01)], ids=lambda e: e.name)
def test_ewc_with_lambda_zero_is_fe_edit_bit_for_bit(editor):
    base = make_convnet(seed=1)
    torch.manual_seed(1)
    x = torch.randn(1, 1, 6, 6)
    y = wrong_label(base, x)
    fisher = {n: torch.rand_like(p) for n, p in base.named_parameters()}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = fe.edit(a, x, y, editor=editor, params="block", max_steps=30)
    rb = ewc_edit(b, x, y, fisher, ewc_lambda=0.0, editor=editor, params="block", max_steps=30)
    assert ra.success
    assert ra.steps >= 2  # a multi-step edit, or the penalty would never matter
    assert (ra.success, ra.steps, ra.loss, ra.initial_loss) == (rb.success, rb.steps, rb.loss, rb.initial_loss)
    assert_identical(b, snapshot(a))
    assert rb.penalty > 0  # the penalty is measured (with F > 0), just not weighted


def test_ewc_moves_high_fisher_coordinates_less():
    model = make_convnet(seed=1)
    torch.manual_seed(1)
    x = torch.randn(1, 1, 6, 6)
    y = wrong_label(model, x)
    torch.manual_seed(5)
    high = {n: torch.rand_like(p) < 0.5 for n, p in model.named_parameters()}
    fisher = {n: high[n].float() * 50.0 for n in high}  # 2·lr·λ·F = 1 for GD(0.1), λ = 0.1: stable
    moves = {}
    for lam in (0.0, 0.1):
        m = copy.deepcopy(model)
        before = snapshot(m)
        r = ewc_edit(m, x, y, fisher, ewc_lambda=lam, editor=fe.GD(0.1), params="block", max_steps=30,
                     on_failure="keep")
        assert r.steps >= 2
        d = {n: (p.detach() - before[n]).abs() for n, p in m.named_parameters() if n.startswith("block")}
        hi = torch.cat([d[n][high[n]] for n in d]).mean()
        lo = torch.cat([d[n][~high[n]] for n in d]).mean()
        moves[lam] = (float(hi), float(lo))
    ratio0 = moves[0.0][0] / moves[0.0][1]
    ratio1 = moves[0.1][0] / moves[0.1][1]
    assert ratio1 < 0.7 * ratio0, moves


def test_ewc_large_penalty_fails_and_reverts_exactly():
    model = make_convnet(seed=0)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 6)
    y = wrong_label(model, x)
    plain = fe.edit(copy.deepcopy(model), x, y, editor=fe.GD(0.05), params="head", max_steps=10)
    assert plain.success and plain.steps >= 2
    # 2·lr·λ·F = 1: every step resets θ to θ⁰ − lr·g, so no more than one step of progress is kept
    fisher = {n: torch.full_like(p, 10.0) for n, p in model.named_parameters()}
    snap = snapshot(model)
    r = ewc_edit(model, x, y, fisher, ewc_lambda=1.0, editor=fe.GD(0.05), params="head", max_steps=10)
    assert not r.success and r.steps == 10 and not r.applied
    assert_identical(model, snap)
    # success, then an exact revert
    r = ewc_edit(model, x, y, fisher, ewc_lambda=1e-3, editor=fe.RMSProp(0.01), params="block", max_steps=30)
    assert r.success and r.applied
    with torch.no_grad():
        assert int(model(x).argmax(-1)) == int(y)
    r.revert()
    assert_identical(model, snap)


def test_ewc_edit_rejects_bad_input_and_leaves_the_model_unchanged():
    model = make_convnet()
    x = torch.randn(1, 1, 6, 6)
    y = wrong_label(model, x)
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    snap = snapshot(model)
    bad = [
        (dict(fisher={"head.weight": fisher["head.weight"]}, ewc_lambda=1.0), ValueError, "no entry"),
        (dict(fisher={**fisher, "block.0.weight": torch.ones(3)}, ewc_lambda=1.0), ValueError, "shape"),
        (dict(fisher={**fisher, "block.0.bias": -torch.ones(6)}, ewc_lambda=1.0), ValueError, "non-negative"),
        (dict(fisher=[1.0], ewc_lambda=1.0), TypeError, "dict"),
        (dict(fisher=fisher, ewc_lambda=-1.0), ValueError, "ewc_lambda"),
        (dict(fisher=fisher, ewc_lambda=float("nan")), ValueError, "ewc_lambda"),
        (dict(fisher=fisher, ewc_lambda=1.0, max_steps=-1), ValueError, "max_steps"),
    ]
    for kwargs, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            ewc_edit(model, x, y, params="block", **kwargs)
        assert_identical(model, snap)
    with pytest.raises(ValueError, match="out of range"):
        ewc_edit(model, x, 9, fisher, ewc_lambda=1.0, params="block")
    with pytest.raises(ValueError, match="dtype"):
        ewc_edit(model, x.double(), y, fisher, ewc_lambda=1.0, params="block")
    with pytest.raises(EditError):
        ewc_edit(model, torch.full_like(x, float("nan")), y, fisher, ewc_lambda=1.0, params="block")
    assert_identical(model, snap)


# ------------------------------------------------------------------------------------------------
# Deep k-NN
# ------------------------------------------------------------------------------------------------
class EmbNet(nn.Module):
    """Two embedding layers (Identity modules: hookable) and a 4-class head."""

    def __init__(self):
        super().__init__()
        self.first = nn.Identity()
        self.lin = nn.Linear(5, 3)
        self.second = nn.Identity()
        self.head = nn.Linear(3, 4)
        self.double()

    def forward(self, x):
        a = self.first(x)
        return self.head(self.second(torch.tanh(self.lin(a))))


def naive_neighbors(train, q, k):
    """Nearest first, ties by index, distances one pair at a time."""
    d = [(float(((q - train[i]) ** 2).sum().sqrt()), i) for i in range(train.shape[0])]
    return [i for _, i in sorted(d)[:k]]


def naive_predict(tables, labels, classes):
    counts = [0] * classes
    for table in tables:
        for i in table:
            counts[int(labels[i])] += 1
    return max(range(classes), key=lambda j: (counts[j], -j)), counts  # ties → smallest class


def test_dknn_predictions_match_brute_force():
    torch.manual_seed(0)
    model = EmbNet()
    xt, yt = torch.randn(57, 5, dtype=torch.float64), torch.randint(0, 4, (57,))
    xq = torch.randn(13, 5, dtype=torch.float64)
    xc, yc = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 4, (11,))
    dk = DeepKNN(model, ["first", "second"], xt, yt, k=7, batch_size=4, calib=(xc, yc))
    assert dk.num_classes == 4
    with torch.no_grad():
        embs_t = [xt, torch.tanh(model.lin(xt))]
        embs_q = [xq, torch.tanh(model.lin(xq))]
        embs_c = [xc, torch.tanh(model.lin(xc))]
    nbrs = dk.neighbors(xq)
    preds = dk.predict(xq)
    counts = dk.counts(xq)
    for b in range(xq.shape[0]):
        tables = [naive_neighbors(embs_t[k], embs_q[k][b], 7) for k in range(2)]
        assert nbrs[b].tolist() == tables
        pred, cnt = naive_predict(tables, yt, 4)
        assert int(preds[b]) == pred and counts[b].tolist() == cnt
    torch.testing.assert_close(dk.predict_proba(xq).sum(1), torch.ones(13))
    # p-values: share of calibration samples with nonconformity ≥ the query's, per class
    alpha_cal = [14 - naive_predict([naive_neighbors(embs_t[k], embs_c[k][c], 7) for k in range(2)], yt, 4)[1][int(yc[c])]
                 for c in range(11)]
    pv = dk.p_values(xq)
    for b in range(13):
        for j in range(4):
            want = sum(a >= 14 - int(counts[b, j]) for a in alpha_cal) / 11
            assert abs(float(pv[b, j]) - want) < 1e-12
    cred = dk.credibility(xq)
    assert torch.equal(cred, pv.gather(1, preds[:, None]).squeeze(1))


def test_dknn_ties_are_broken_by_index_and_class():
    # integer embeddings: distances exact, many equal; labels chosen to tie the counts
    train = torch.tensor([[0.0], [1.0], [1.0], [-1.0], [2.0], [-1.0]], dtype=torch.float64)
    dk = DeepKNN.from_embeddings([train], torch.tensor([3, 1, 0, 2, 0, 1]), k=3, num_classes=4)
    nb = dk.neighbors_of_embeddings([torch.zeros(1, 1, dtype=torch.float64)])
    assert nb[0, 0].tolist() == [0, 1, 2]  # 1 and 2 tie with 3 and 5 at distance 1: lowest indices first
    assert int(dk.predict_embeddings([torch.zeros(1, 1, dtype=torch.float64)])) == 0  # counts 1,1,0,1 → class 0


def simulate_edit(tables, labels, target, classes):
    """The documented rule, one relabel at a time, predictions recomputed from scratch."""
    labels = labels.clone()
    chosen = []
    if naive_predict(tables, labels, classes)[0] == target:
        return chosen
    for r in range(len(tables[0])):
        for table in tables:
            i = table[r]
            if int(labels[i]) == target:
                continue
            labels[i] = target
            chosen.append(i)
            if naive_predict(tables, labels, classes)[0] == target:
                return chosen
    raise AssertionError("the rule must always succeed")


def test_dknn_edit_flips_exactly_the_documented_neighbours():
    torch.manual_seed(3)
    n, classes, k = 40, 4, 6
    base = torch.randn(n, 3, dtype=torch.float64)
    # correlated layers share neighbours, so some points count in several layers
    embs = [base, base + 0.3 * torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)]
    labels = torch.randint(0, classes, (n,))
    dk = DeepKNN.from_embeddings(embs, labels, k=k, num_classes=classes, batch_size=7)
    sizes, overlaps = [], 0
    for trial in range(25):
        q = [torch.randn(1, e.shape[1], dtype=torch.float64) for e in embs]
        q[1] = q[0] + 0.3 * torch.randn(1, 3, dtype=torch.float64)
        tables = [naive_neighbors(e, qq[0], k) for e, qq in zip(embs, q)]
        overlaps += len(set(tables[0]) & set(tables[1])) > 0
        target = trial % classes
        want = simulate_edit(tables, labels, target, classes)
        e = dk.edit_embeddings(q, target)
        assert e.success and e.indices.tolist() == want
        assert e.old_labels.tolist() == [int(labels[i]) for i in want]
        assert int(dk.predict_embeddings(q)) == target
        if want:  # minimal: one relabel fewer is not enough
            short = labels.clone()
            short[torch.tensor(want[:-1], dtype=torch.int64)] = target
            assert int(dk.predict_from_neighbors(dk.neighbors_of_embeddings(q), short)) != target
        sizes.append(len(want))
        e.revert()
        assert torch.equal(dk.labels, labels)
        e.revert()  # a no-op
        assert torch.equal(dk.labels, labels)
    assert min(sizes) == 0 and max(sizes) >= 3 and overlaps > 0  # the cases that matter occurred


def test_dknn_edit_and_evaluate_through_the_model():
    torch.manual_seed(1)
    model = EmbNet()
    snap = snapshot(model)
    xt, yt = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 4, (50,))
    dk = DeepKNN(model, ["first", "second"], xt, yt, k=5)
    x_e, y_e = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    x_c, y_c = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 4, (20,))
    rep = dknn_evaluate(dk, (x_e, y_e), (x_c, y_c))
    base = (dk.predict(x_c) != y_c).double().mean().item()
    assert rep["base_error"] == base
    for j in range(6):
        e = dk.edit(x_e[j:j + 1], int(y_e[j]))
        assert int(dk.predict(x_e[j:j + 1])) == int(y_e[j])
        err = (dk.predict(x_c) != y_c).double().mean().item()
        e.revert()
        assert rep["errors"][j].item() == err and rep["relabelled"][j].item() == e.num_relabelled
    assert rep["success_rate"] == 1.0
    assert abs(rep["drawdown"] - (rep["errors"].mean().item() - base)) < 1e-12
    assert torch.equal(dk.labels, yt)
    assert_identical(model, snap)
    with pytest.raises(ValueError, match="batch dimension of 1"):
        dk.edit(x_e[:2], 1)
    with pytest.raises(ValueError, match="out of range"):
        dk.edit(x_e[:1], 4)
    with pytest.raises(ValueError, match="exceeds"):
        DeepKNN(model, ["first"], xt, yt, k=51)
    with pytest.raises(ValueError, match="no submodule"):
        DeepKNN(model, ["third"], xt, yt, k=3)
    with pytest.raises(ValueError, match="out of range"):
        DeepKNN(model, ["first"], xt, yt + 4, k=3)
    assert torch.equal(dk.labels, yt)


# ------------------------------------------------------------------------------------------------
# Editable+CNP
# ------------------------------------------------------------------------------------------------
def make_cnp(seed=0):
    model = make_convnet(seed=seed)
    torch.manual_seed(seed + 100)
    enc = ConditionEncoder.for_model(model, "block", torch.randn(1, 1, 6, 6))
    assert (enc.in_channels, enc.out_channels, enc.num_classes) == (4, 6, 5)
    return model, ConditionedModel(model, "block", enc)


def test_cnp_zero_condition_is_bit_identical_and_clear_restores():
    model, wrapped = make_cnp()
    ref = copy.deepcopy(model)
    x = torch.randn(9, 1, 6, 6)
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(wrapped(x), want)
        wrapped.set_condition(torch.zeros(6))
        assert torch.equal(wrapped(x), want)
        wrapped.set_condition(torch.randn(1, 6))
        assert not torch.equal(wrapped(x), want)
        wrapped.clear_condition()
        assert torch.equal(wrapped(x), want)
        # per-sample conditions = one condition per sample, run separately
        cs = torch.randn(9, 6)
        with wrapped.conditioned(cs):
            per = wrapped(x)
        for i in range(9):
            with wrapped.conditioned(cs[i]):
                torch.testing.assert_close(per[i], wrapped(x[i:i + 1])[0], rtol=1e-6, atol=1e-6)
        assert wrapped.condition_vector is None
    c = wrapped.condition(x[:2], torch.tensor([0, 3]))
    assert torch.equal(c, torch.zeros(2, 6))  # the zero-initialised output layer: c = 0 at init
    with pytest.raises(ValueError, match="C_out"):
        wrapped.set_condition(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="out of range"):
        wrapped.condition(x[:1], 5)
    with pytest.raises(ValueError, match="batch of"):
        with wrapped.conditioned(torch.zeros(3, 6)), torch.no_grad():
            wrapped(x)


def test_cnp_training_makes_edits_succeed():
    model, wrapped = make_cnp(seed=4)
    torch.manual_seed(11)
    templates = torch.randn(5, 1, 6, 6)  # a learnable task, so the frozen model has varied predictions
    y = torch.randint(0, 5, (320,))
    x = templates[y] + 0.8 * torch.randn(320, 1, 6, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, 320, (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        pred = model(x).argmax(-1)
    assert (pred == y).float().mean() > 0.8 and len(pred.unique()) == 5
    snap = snapshot(model)
    x_e, x_c, y_c = x[:16], x[256:], y[256:]
    g = torch.Generator().manual_seed(2)
    y_e = (pred[:16] + torch.randint(1, 5, (16,), generator=g)) % 5  # every target differs from the prediction
    before = cnp_evaluate(wrapped, (x_e, y_e), (x_c, y_c), batch_size=24)
    assert before["success_rate"] == 0.0 and before["drawdown"] == 0.0  # c = 0 at init
    stats = train_cnp(wrapped, (x[:256], y[:256]), steps=60, batch_size=32, lr=0.03, c_edit=1.0, c_loc=1.0,
                      edits_per_batch=8, generator=torch.Generator().manual_seed(0))
    assert len(stats["loss"]) == 60
    assert sum(stats["edit_loss"][-10:]) < 0.5 * sum(stats["edit_loss"][:10])
    assert_identical(model, snap)  # the frozen model: parameters and BatchNorm statistics untouched
    assert all(p.grad is None for p in wrapped.parameters())
    after = cnp_evaluate(wrapped, (x_e, y_e), (x_c, y_c), batch_size=24)
    assert after["split"] and after["success_rate"] >= 0.4
    # the evaluation equals single edits, one at a time, through the full forward
    for j in range(16):
        e = cnp_edit(wrapped, x_e[j:j + 1], int(y_e[j]))
        assert e.success == bool(after["success"][j])
        with torch.no_grad():
            pred = wrapped(x_c).argmax(-1)
        assert (pred != y_c).double().mean().item() == after["errors"][j].item()
        e.revert()
        assert wrapped.condition_vector is None
    # the fallback without the fx tail gives the same numbers
    wrapped._post, wrapped._post_reason = None, "forced"
    slow = cnp_evaluate(wrapped, (x_e, y_e), (x_c, y_c), batch_size=24)
    assert not slow["split"]
    assert torch.equal(slow["errors"], after["errors"]) and torch.equal(slow["success"], after["success"])
    with torch.no_grad():
        assert torch.equal(wrapped(x_c), copy.deepcopy(model)(x_c))
    e = cnp_edit(wrapped, x_e[:1], int(y_e[0]), on_failure="revert")
    assert e.applied == e.success


def test_cnp_joint_training_updates_the_model():
    model, wrapped = make_cnp(seed=5)
    snap = snapshot(model)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 5, (64,))
    stats = train_cnp(wrapped, (x, y), steps=3, batch_size=16, train_model=True, edit_loss="ce",
                      generator=torch.Generator().manual_seed(0))
    assert all(v > 0 for v in stats["base_loss"])
    assert not torch.equal(model.head.weight, snap["head.weight"])
    assert not model.training  # modes restored
    with pytest.raises(ValueError, match="edit_loss"):
        train_cnp(wrapped, (x, y), steps=1, edit_loss="mse")
