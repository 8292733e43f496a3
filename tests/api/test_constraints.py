"""fastedit.constraint and fastedit.model_io, tested directly.

Constraints against naive Python references (float64 for exact comparisons), satisfaction against
constructed logits, gradients with autograd, bad input, unit slicing, pytrees and vmap; model inputs
normalisation (tensor, tuple, list, dict, BatchEncoding) and the rules that read the logits.
"""

import hypothesis  # noqa: F401  (a test dependency: missing, the module must fail, not skip)
import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_outputs import SequenceClassifierOutput

import fastedit as fe
from fastedit.constraint import IGNORE_INDEX, Constraint, FunctionConstraint, as_constraint
from fastedit.model_io import ModelInputs, read_logits, resolve_output

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# naive references and generators
# ------------------------------------------------------------------------------------------------
def naive_token_values(z, labels, causal=False):
    """Per row: max over labelled positions of (max_v z − z_label), by Python loops; -inf if none."""
    if causal:
        z, labels = z[:, :-1], labels[:, 1:]
    out = []
    for b in range(labels.shape[0]):
        worst = NEG_INF
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = z[b, t].tolist()
            worst = max(worst, max(row) - row[y])
        out.append(worst)
    return torch.tensor(out, dtype=torch.float64)


def naive_worst_position(z, labels, b):
    """(t, argmax v) of the worst labelled position of row b (no causal shift)."""
    best, where = NEG_INF, None
    for t in range(labels.shape[1]):
        y = int(labels[b, t])
        if y == IGNORE_INDEX:
            continue
        row = z[b, t].tolist()
        m = max(row) - row[y]
        if m > best:
            best, where = m, (t, row.index(max(row)), y)
    return where


def naive_scores(z, labels, causal=False):
    """Mean log-probability of each row's labelled tokens, one candidate at a time."""
    if causal:
        z, labels = z[:, :-1], labels[:, 1:]
    scores = []
    for b in range(labels.shape[0]):
        logp = torch.log_softmax(z[b].to(torch.float64), dim=-1)
        picked = [logp[t, int(y)].item() for t, y in enumerate(labels[b].tolist()) if y != IGNORE_INDEX]
        scores.append(sum(picked) / len(picked))
    return scores


def naive_ranking(z, labels, n, causal=False):
    s = naive_scores(z, labels, causal)
    return torch.tensor([max(s[g + 1:g + n]) - s[g] for g in range(0, len(s), n)], dtype=torch.float64)


def ragged_labels(gen, b, t, v, min_labelled=1, lo=0):
    """Labels [b, t] where row i labels a random number (min_labelled..t-lo) of random positions ≥ lo,
    every other position -100."""
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.int64)
    for i in range(b):
        k = int(torch.randint(min_labelled, t - lo + 1, (1,), generator=gen))
        pos = lo + torch.randperm(t - lo, generator=gen)[:k]
        labels[i, pos] = torch.randint(0, v, (k,), generator=gen)
    return labels


SHAPES = [(1, 1, 2), (3, 1, 5), (2, 4, 3), (4, 7, 11), (5, 3, 17), (1, 9, 4)]


# ------------------------------------------------------------------------------------------------
# 1. Classification
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_classification_equals_max_minus_picked(dtype, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("FASTEDIT_BACKEND", "reference")
    gen = torch.Generator().manual_seed(1)
    for b, c in [(1, 2), (5, 10), (17, 3), (8, 100)]:
        z = (torch.randn(b, c, generator=gen) * 4).to(dtype)
        y = torch.randint(0, c, (b,), generator=gen)
        got = fe.Classification(y).per_sample(z)
        exact = z.double()  # half inputs are exactly representable in float64
        want = exact.max(-1).values - exact.gather(1, y[:, None])[:, 0]
        promoted = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        assert got.dtype == promoted and got.shape == (b,)
        if dtype == torch.float64:
            assert torch.equal(got, want)
        else:
            # float32 arithmetic on the (promoted) values: one rounding of an exact difference
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        assert (got >= 0).all()


def test_classification_half_is_computed_in_float32():
    """Half logits are promoted: 2048 − 0.5 = 2047.5 is not a half value (spacing 2 there), but the
    margin must be exact, not rounded to 2048."""
    for dtype in (torch.float16, torch.bfloat16):
        z = torch.tensor([[2048.0, 0.5]], dtype=dtype)
        got = fe.Classification(torch.tensor([1])).per_sample(z)
        assert got.dtype == torch.float32 and got.item() == 2047.5
        assert fe.Classification(torch.tensor([0])).per_sample(z).item() == 0.0


def test_classification_satisfied_iff_argmax_is_label_ties_included():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    y[:3] = z[:3].argmax(-1)  # rows 0-2 satisfied
    y[3:] = (z[3:].argmax(-1) + 1) % 5  # rows 3-5 not
    c = fe.Classification(y)
    assert c.satisfied(z).tolist() == [True, True, True, False, False, False]
    assert (c.satisfied(z) == (z.argmax(-1) == y)).all()
    # ties break like torch.argmax: the first maximal index wins
    z[4, 0] = z[4, 1] = z[4, 3] = 9.0
    y4 = torch.tensor([0, 1, 3])
    rows = z[[4, 4, 4]]
    assert fe.Classification(y4).satisfied(rows).tolist() == [True, False, False]
    assert (fe.Classification(y4).satisfied(rows) == (rows.argmax(-1) == y4)).all()
    got = fe.Classification(y4).per_sample(rows)
    tiny = torch.finfo(torch.float64).tiny
    assert got.tolist() == [0.0, tiny, tiny]  # a lost tie is just above 0
    # ... and its gradient is the margin's: the maximum's gradient shared by the tied classes
    leaf = rows.clone().requires_grad_()
    fe.Classification(y4).per_sample(leaf).sum().backward()
    plain = rows.clone().requires_grad_()
    (plain.amax(-1) - plain.gather(1, y4[:, None]).squeeze(1)).sum().backward()
    assert torch.equal(leaf.grad, plain.grad)
    # low precision: bfloat16 logits tie often, the rule still follows argmax
    zb = torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.bfloat16)
    assert fe.Classification(torch.tensor([1])).satisfied(zb).tolist() == [False]
    assert fe.Classification(torch.tensor([0])).satisfied(zb).tolist() == [True]


def test_classification_gradient_is_onehot_argmax_minus_onehot_label():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        y[0] = z[0].argmax()  # satisfied row: gradient 0
    v = fe.Classification(y).per_sample(z)
    (g,) = torch.autograd.grad(v.sum(), z)
    want = torch.zeros_like(z)
    want[torch.arange(4), z.argmax(-1)] += 1
    want[torch.arange(4), y] -= 1
    assert torch.equal(g, want)
    assert g[0].abs().sum() == 0


def test_classification_label_forms():
    assert fe.Classification(3).labels.tolist() == [3]
    assert fe.Classification(torch.tensor(2)).labels.tolist() == [2]
    c = fe.Classification(torch.tensor([1, 0], dtype=torch.int32))
    assert c.labels.dtype == torch.int64 and c.labels.tolist() == [1, 0]
    assert c.num_units(2) == 2 and c.rows_per_unit == 1


# ------------------------------------------------------------------------------------------------
# 2. TokenTargets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_token_targets_equals_naive_double_loop(causal):
    gen = torch.Generator().manual_seed(4)
    for b, t, v in SHAPES:
        if causal and t == 1:
            continue  # nothing left after the shift
        z = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3
        labels = ragged_labels(gen, b, t, v, lo=1 if causal else 0)
        c = fe.TokenTargets(labels, causal=causal)
        c.validate(z)
        got = c.per_sample(z)
        assert got.shape == (b,) and got.dtype == torch.float64
        assert torch.equal(got, naive_token_values(z, labels, causal)), (b, t, v)
        # float32 logits agree with the float64 reference within float32 rounding
        got32 = c.per_sample(z.float())
        torch.testing.assert_close(got32.double(), naive_token_values(z.float().double(), labels, causal),
                                   rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(b=st.integers(1, 4), t=st.integers(1, 6), v=st.integers(2, 9), seed=st.integers(0, 2 ** 31 - 1),
       min_labelled=st.integers(0, 1))
def test_token_targets_property(b, t, v, seed, min_labelled):
    """Also rows with no labelled position (value -inf: nothing to satisfy)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    labels = ragged_labels(gen, b, t, v, min_labelled=min_labelled)
    c = fe.TokenTargets(labels)
    got = c.per_sample(z)
    want = naive_token_values(z, labels)
    assert torch.equal(got, want)
    greedy = ((z.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(-1)
    assert torch.equal(c.satisfied(z), greedy)  # continuous random logits: no ties


def test_token_targets_satisfied_iff_greedy_reproduces_labels():
    gen = torch.Generator().manual_seed(5)
    b, t, v = 4, 6, 8
    labels = ragged_labels(gen, b, t, v)
    z = torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    lab = labels != IGNORE_INDEX
    bb, tt = lab.nonzero(as_tuple=True)
    z[bb, tt, labels[bb, tt]] = z[bb, tt].amax(-1) + 1.0  # argmax == label at every labelled position
    # ignored positions keep random argmaxes, which must not matter
    c = fe.TokenTargets(labels)
    assert c.satisfied(z).all()
    assert (c.per_sample(z) == 0).all()
    # perturb one labelled position of row 2: that row fails, the others still hold
    t2 = int(lab[2].nonzero()[0, 0])
    y2 = int(labels[2, t2])
    other = (y2 + 1) % v
    z_bad = z.clone()
    z_bad[2, t2, other] = z_bad[2, t2, y2] + 0.25
    assert c.satisfied(z_bad).tolist() == [True, True, False, True]
    assert c.per_sample(z_bad)[2].item() == pytest.approx(0.25, abs=1e-12)
    # a tie with the label is satisfied iff the label is the first maximal index, like torch.argmax
    z_tie = z.clone()
    z_tie[2, t2, other] = z_tie[2, t2, y2]
    assert c.satisfied(z_tie)[2].item() == (y2 < other)
    assert c.satisfied(z_tie)[2].item() == bool((z_tie[2, t2].argmax() == y2))
    # perturbing an ignored position changes nothing
    ignored = (~lab).nonzero()
    if len(ignored):
        i, j = ignored[0].tolist()
        z_ign = z.clone()
        z_ign[i, j] = torch.randn(v, generator=gen, dtype=torch.float64) * 100
        assert torch.equal(c.per_sample(z_ign), c.per_sample(z))


def test_token_targets_causal_equals_shifted():
    gen = torch.Generator().manual_seed(6)
    for b, t, v in [(1, 2, 3), (3, 5, 7), (2, 9, 4)]:
        z = torch.randn(b, t, v, generator=gen, dtype=torch.float64)
        labels = ragged_labels(gen, b, t, v, lo=1)
        labels[:, 0] = torch.randint(0, v, (b,), generator=gen)  # position 0 is never compared
        causal = fe.TokenTargets(labels, causal=True)
        shifted = fe.TokenTargets(labels[:, 1:])
        assert torch.equal(causal.per_sample(z), shifted.per_sample(z[:, :-1]))
        assert torch.equal(causal.satisfied(z), shifted.satisfied(z[:, :-1]))
        assert torch.equal(causal.mask(), labels[:, 1:] != IGNORE_INDEX)
        # the last position's logits are not used
        z2 = z.clone()
        z2[:, -1] = 1e6
        assert torch.equal(causal.per_sample(z2), causal.per_sample(z))


def test_token_targets_ignored_positions_with_extreme_logits():
    """-inf logits at ignored positions (e.g. a banned token 0) do not leak into the value or gradient."""
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2, -100], [-100, 3, -100, -100]])
    z[:, :, 0] = NEG_INF
    z.requires_grad_(True)
    v = fe.TokenTargets(labels).per_sample(z)
    assert torch.equal(v.detach(), naive_token_values(z.detach(), labels))
    (g,) = torch.autograd.grad(v.sum(), z)
    assert torch.isfinite(g).all()


def test_token_targets_gradient_flows_only_through_worst_position():
    gen = torch.Generator().manual_seed(8)
    b, t, v = 4, 6, 7
    z = torch.randn(b, t, v, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = ragged_labels(gen, b, t, v)
    labels[0] = IGNORE_INDEX
    labels[0, 3] = 2  # one labelled position
    c = fe.TokenTargets(labels)
    values = c.per_sample(z)
    for row in range(b):
        (g,) = torch.autograd.grad(values[row], z, retain_graph=True)
        pos, arg, y = naive_worst_position(z.detach(), labels, row)
        want = torch.zeros_like(z)
        want[row, pos, arg] += 1.0
        want[row, pos, y] -= 1.0
        assert torch.equal(g, want), row
        if arg != y:
            assert g[row, pos].abs().sum() == 2 and g.abs().sum() == 2


# ------------------------------------------------------------------------------------------------
# 3. SequenceRanking
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_sequence_ranking_equals_naive_scorer(causal, n):
    gen = torch.Generator().manual_seed(9)
    for groups, t, v in [(1, 2, 3), (2, 5, 7), (3, 4, 11), (1, 8, 5)]:
        b = groups * n
        z = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2
        labels = ragged_labels(gen, b, t, v, lo=1 if causal else 0)
        c = fe.SequenceRanking(labels, n, causal=causal)
        c.validate(z)
        torch.testing.assert_close(c.scores(z), torch.tensor(naive_scores(z, labels, causal), dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
        got = c.per_sample(z)
        want = naive_ranking(z, labels, n, causal)
        assert got.shape == (groups,)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        s = naive_scores(z, labels, causal)
        sat = [s[g] >= max(s[g + 1:g + n]) for g in range(0, b, n)]
        assert c.satisfied(z).tolist() == sat
        # float32 logits: same within float32 rounding
        torch.testing.assert_close(c.per_sample(z.float()).double(),
                                   naive_ranking(z.float().double(), labels, n, causal), rtol=1e-5, atol=1e-5)


def test_sequence_ranking_causal_equals_shifted():
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(6, 5, 7, generator=gen, dtype=torch.float64)
    labels = ragged_labels(gen, 6, 5, 7, lo=1)
    causal = fe.SequenceRanking(labels, 3, causal=True)
    shifted = fe.SequenceRanking(labels[:, 1:], 3)
    assert torch.equal(causal.per_sample(z), shifted.per_sample(z[:, :-1]))


def test_sequence_ranking_satisfied_iff_desired_scores_at_least_every_alternative():
    gen = torch.Generator().manual_seed(11)
    n, t, v = 3, 4, 6
    z = torch.randn(2 * n, t, v, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * n, t), generator=gen)
    labels[1, 2:] = IGNORE_INDEX  # ragged
    # group 0: the desired row's tokens are very likely, the alternatives' are not
    z[0, torch.arange(t), labels[0]] = 20.0
    # group 1: one alternative beats the desired row
    z[n + 2, torch.arange(t), labels[n + 2]] = 20.0
    c = fe.SequenceRanking(labels, n)
    assert c.satisfied(z).tolist() == [True, False]
    v0, v1 = c.per_sample(z).tolist()
    assert v0 < 0 < v1
    # a tie (an alternative identical to the desired row) is satisfied, with value exactly 0
    z_tie, labels_tie = z.clone(), labels.clone()
    z_tie[n + 2], labels_tie[n + 2] = z_tie[n], labels_tie[n]
    z_tie[n + 1], labels_tie[n + 1] = z_tie[n], labels_tie[n]
    tie = fe.SequenceRanking(labels_tie, n)
    assert tie.per_sample(z_tie)[1].item() == 0.0 and tie.satisfied(z_tie)[1]


def test_sequence_ranking_ignores_unlabelled_positions():
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    labels = ragged_labels(gen, 4, 5, 6)
    c = fe.SequenceRanking(labels, 2)
    base = c.per_sample(z)
    z2 = z.clone()
    ign = labels == IGNORE_INDEX
    z2[ign] = torch.randn(int(ign.sum()), 6, generator=gen, dtype=torch.float64) * 50
    torch.testing.assert_close(c.per_sample(z2), base, rtol=0, atol=0)


def test_sequence_ranking_ignored_positions_with_minus_inf_logits():
    """A model that bans token 0 (logit -inf everywhere): the ignored positions' labels are replaced
    by 0 internally, whose log-prob is -inf; those positions must still not count (no NaN)."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    z[:, :, 0] = NEG_INF
    labels = torch.tensor([[1, 2, -100], [3, -100, -100], [2, 2, 2], [4, 1, -100]])
    c = fe.SequenceRanking(labels, 2)
    want = naive_ranking(z, labels, 2)
    assert torch.isfinite(want).all()
    got = c.per_sample(z)
    assert torch.isfinite(got).all(), f"ignored positions leak -inf * 0 = NaN into the scores: {got}"
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(c.per_sample(zg).sum(), zg)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------------------------------------
# 4. callables and user constraints
# ------------------------------------------------------------------------------------------------
class Margin(Constraint):
    """Class 0 must beat class 1 by 3 logits over the whole edit (one 0-dim value)."""

    def per_sample(self, logits):
        return (3.0 - (logits[:, 0] - logits[:, 1])).max()


def test_callables_and_user_constraints():
    z = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    per_row = as_constraint(lambda lg: 3.0 - (lg[:, 0] - lg[:, 1]))
    assert isinstance(per_row, FunctionConstraint)
    assert per_row.per_sample(z).tolist() == [-1.0, 2.0]
    assert per_row.satisfied(z).tolist() == [True, False]
    assert per_row.rows_per_unit is None and per_row.num_units(2) == 1
    per_row.validate(z)

    scalar = as_constraint(lambda lg: (3.0 - (lg[:, 0] - lg[:, 1])).max())
    out = scalar.per_sample(z)
    assert out.shape == (1,) and out.item() == 2.0

    user = Margin()
    assert as_constraint(user) is user
    assert user.per_sample(z).dim() == 0
    packed = user.pack(user.per_sample(z))
    assert packed.shape == (1,) and packed.item() == 2.0
    assert user.satisfied(z[:1]).item() is True
    user.validate(z)
    assert user.num_units(5) == 1
    with pytest.raises(TypeError, match="cannot be split"):
        user.units(0, 1)
    with pytest.raises(TypeError, match="cannot be split"):
        per_row.units(0, 1)
    # 1-D values stay as they are
    v = torch.tensor([1.0, -2.0])
    assert user.pack(v) is v

    # the callable stays differentiable
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(per_row.per_sample(zz).sum(), zz)
    assert g.tolist() == [[-1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]]


def test_callables_and_user_constraints_bad_results():
    z = torch.randn(2, 3)
    with pytest.raises(TypeError, match="returned float"):
        as_constraint(lambda lg: 1.5).per_sample(z)
    with pytest.raises(TypeError, match="must be callable"):
        FunctionConstraint(3)

    class TwoD(Constraint):
        def per_sample(self, logits):
            return logits

    class Ints(Constraint):
        def per_sample(self, logits):
            return logits.argmax(-1)

    with pytest.raises(ValueError, match="floating value per unit"):
        TwoD().validate(z)
    with pytest.raises(ValueError, match="floating value per unit"):
        Ints().validate(z)
    with pytest.raises(ValueError, match="floating value per unit"):
        as_constraint(lambda lg: lg).validate(z)
    with pytest.raises(NotImplementedError):
        Constraint().per_sample(z)


@pytest.mark.parametrize("bad", [1.5, "logits", None, True, [1, 2], torch.tensor([1.0]), torch.tensor([True]),
                                 torch.tensor([1j])], ids=repr)
def test_as_constraint_rejects_bad_types(bad):
    with pytest.raises(TypeError) as info:
        as_constraint(bad, what="my target")
    assert "my target" in str(info.value)


def test_as_constraint_integer_targets():
    c = as_constraint(4)
    assert isinstance(c, fe.Classification) and c.labels.tolist() == [4]
    c = as_constraint(torch.tensor([1, 2], dtype=torch.int16))
    assert isinstance(c, fe.Classification) and c.labels.dtype == torch.int64
    t = fe.TokenTargets(torch.zeros(1, 2, dtype=torch.long))
    assert as_constraint(t) is t


# ------------------------------------------------------------------------------------------------
# 5. bad input
# ------------------------------------------------------------------------------------------------
def test_classification_bad_input():
    with pytest.raises(TypeError, match="integer"):
        fe.Classification(1.5)
    with pytest.raises(TypeError, match="bool"):
        fe.Classification(True)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        fe.Classification(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="dtype torch.bool"):
        fe.Classification(torch.tensor([True]))
    with pytest.raises(ValueError, match=r"one label per sample \[B\], got shape \(2, 2\)"):
        fe.Classification(torch.zeros(2, 2, dtype=torch.long))
    c = fe.Classification(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"logits \[batch, classes\].*\(2, 4, 3\).*TokenTargets"):
        c.validate(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"logits \[batch, classes\].*\(2,\)"):
        c.validate(torch.randn(2))
    with pytest.raises(ValueError, match=r"3 samples.*shape \(2,\)"):
        c.validate(torch.randn(3, 5))
    with pytest.raises(ValueError, match="label 2 is out of range for a model with 2 classes"):
        c.validate(torch.randn(2, 2))
    with pytest.raises(ValueError, match="label -1 is out of range"):
        fe.Classification(torch.tensor([0, -1])).validate(torch.randn(2, 3))
    c.validate(torch.randn(2, 3))  # fits


@pytest.mark.parametrize("cls", ["TokenTargets", "SequenceRanking"])
def test_token_label_constraints_bad_input(cls):
    def make(labels, causal=False):
        return fe.TokenTargets(labels, causal) if cls == "TokenTargets" else fe.SequenceRanking(labels, 2, causal)

    with pytest.raises(TypeError, match="integer token ids, got dtype torch.float32"):
        make(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="dtype torch.bool"):
        make(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer tensor"):
        make([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"\[batch, time\], got shape \(4,\)"):
        make(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, time\], got shape \(2, 2, 2\)"):
        make(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="causal"):
        make(torch.zeros(2, 3, dtype=torch.long), causal="yes")

    labels = torch.tensor([[1, 2, -100], [0, -100, 4]])
    c = make(labels)
    with pytest.raises(ValueError, match=rf"{cls} needs logits \[batch, time, vocab\].*\(2, 5\)"):
        c.validate(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 1\)"):
        c.validate(torch.randn(2, 3, 5, 1))
    with pytest.raises(ValueError, match=r"labels have shape \(2, 3\) but the logits \(2, 4, 5\)"):
        c.validate(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"labels have shape \(2, 3\) but the logits \(3, 3, 5\)"):
        c.validate(torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match="label 4 is out of range for a vocabulary of 4"):
        c.validate(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="label -7 is out of range"):
        make(torch.tensor([[1, -7, -100], [0, 1, 2]])).validate(torch.randn(2, 3, 5))
    c.validate(torch.randn(2, 3, 5))  # fits

    empty = make(torch.tensor([[1, 2, -100], [-100, -100, -100]]))
    with pytest.raises(ValueError, match="row 1 has no labelled position"):
        empty.validate(torch.randn(2, 3, 5))
    empty.validate(torch.randn(2, 3, 5), allow_unlabelled_rows=True)
    # causal: a row labelled only at position 0 has nothing left after the shift
    shifted = make(torch.tensor([[3, -100, -100], [1, 2, 3]]), causal=True)
    with pytest.raises(ValueError, match=r"row 0 has no labelled position after the causal shift"):
        shifted.validate(torch.randn(2, 3, 5))
    shifted.validate(torch.randn(2, 3, 5), allow_unlabelled_rows=True)
    # causal: a label at position 0 is never compared, so it is not range-checked either
    make(torch.tensor([[99, 1, 2], [99, 0, 1]]), causal=True).validate(torch.randn(2, 3, 5))


def test_token_targets_unlabelled_row_is_trivially_satisfied():
    c = fe.TokenTargets(torch.tensor([[1, -100], [-100, -100]]))
    z = torch.randn(2, 2, 3)
    assert c.per_sample(z)[1].item() == NEG_INF and c.satisfied(z)[1]


def test_sequence_ranking_bad_candidates():
    labels = torch.zeros(6, 3, dtype=torch.long)
    for bad in (1, 0, -2, True, 2.0, "2"):
        with pytest.raises(ValueError, match="num_candidates must be an integer ≥ 2"):
            fe.SequenceRanking(labels, bad)
    with pytest.raises(ValueError, match=r"6 rows do not divide into groups of num_candidates=4"):
        fe.SequenceRanking(labels, 4)
    with pytest.raises(ValueError, match="5 rows do not divide"):
        fe.SequenceRanking(labels[:5], 2)
    c = fe.SequenceRanking(labels, 3)
    assert c.rows_per_unit == 3 and c.num_units(6) == 2
    assert c.to_dict() == {"kind": "SequenceRanking", "causal": False, "num_candidates": 3}


def test_to_dict():
    assert fe.Classification(1).to_dict() == {"kind": "Classification"}
    assert fe.TokenTargets(torch.zeros(1, 2, dtype=torch.long), causal=True).to_dict() == \
        {"kind": "TokenTargets", "causal": True}

    def my_margin(z):
        return z[:, 0]

    assert as_constraint(my_margin).to_dict() == {"kind": "function", "name": "my_margin"}
    assert Margin().to_dict() == {"kind": "Margin"}


# ------------------------------------------------------------------------------------------------
# 6. units, pytrees, vmap
# ------------------------------------------------------------------------------------------------
def _cases(gen):
    """(constraint, logits) of each class; 4 units each."""
    v = 6
    cls = (fe.Classification(torch.randint(0, v, (4,), generator=gen)),
           torch.randn(4, v, generator=gen, dtype=torch.float64))
    tok = (fe.TokenTargets(ragged_labels(gen, 4, 5, v, lo=1), causal=True),
           torch.randn(4, 5, v, generator=gen, dtype=torch.float64))
    rank = (fe.SequenceRanking(ragged_labels(gen, 8, 3, v), 2),
            torch.randn(8, 3, v, generator=gen, dtype=torch.float64))
    return [cls, tok, rank]


def test_units_slicing():
    gen = torch.Generator().manual_seed(14)
    for c, z in _cases(gen):
        full = c.per_sample(z)
        assert full.shape == (4,)
        r = c.rows_per_unit
        assert c.num_units(z.shape[0]) == 4
        for lo, hi in [(0, 1), (1, 3), (3, 4), (0, 4)]:
            part = c.units(lo, hi)
            assert type(part) is type(c) and part.rows_per_unit == r
            assert getattr(part, "causal", None) == getattr(c, "causal", None)
            assert torch.equal(part.labels, c.labels[lo * r:hi * r])
            assert torch.equal(part.per_sample(z[lo * r:hi * r]), full[lo:hi])


def test_pytree_round_trip():
    gen = torch.Generator().manual_seed(15)
    for c, z in _cases(gen):
        leaves, spec = pytree.tree_flatten(c)
        assert len(leaves) == 1 and leaves[0] is c.labels
        back = pytree.tree_unflatten([leaves[0].clone()], spec)
        assert type(back) is type(c) and back is not c
        assert back.rows_per_unit == c.rows_per_unit
        for field in ("causal", "num_candidates"):
            assert getattr(back, field, None) == getattr(c, field, None)
        assert torch.equal(back.per_sample(z), c.per_sample(z))
        mapped = pytree.tree_map(lambda t: t.clone(), c)
        assert type(mapped) is type(c) and torch.equal(mapped.per_sample(z), c.per_sample(z))
        # the spec serialises (named types) and the loaded spec rebuilds the same constraint
        loaded = pytree.treespec_loads(pytree.treespec_dumps(spec))
        again = pytree.tree_unflatten(leaves, loaded)
        assert type(again) is type(c) and torch.equal(again.per_sample(z), c.per_sample(z))
    # the static fields are part of the spec: constraints that differ there do not stack
    a = fe.TokenTargets(torch.zeros(2, 3, dtype=torch.long))
    b = fe.TokenTargets(torch.zeros(2, 3, dtype=torch.long), causal=True)
    assert pytree.tree_flatten(a)[1] != pytree.tree_flatten(b)[1]
    r2 = fe.SequenceRanking(torch.zeros(6, 3, dtype=torch.long), 2)
    r3 = fe.SequenceRanking(torch.zeros(6, 3, dtype=torch.long), 3)
    assert pytree.tree_flatten(r2)[1] != pytree.tree_flatten(r3)[1]


def test_vmap_over_stacked_constraints_equals_per_edit_calls():
    gen = torch.Generator().manual_seed(16)
    num_edits, v = 3, 7
    makers = [
        (lambda: fe.Classification(torch.randint(0, v, (2,), generator=gen)), (2, v)),
        (lambda: fe.TokenTargets(ragged_labels(gen, 2, 4, v), causal=False), (2, 4, v)),
        (lambda: fe.TokenTargets(ragged_labels(gen, 2, 4, v, lo=1), causal=True), (2, 4, v)),
        (lambda: fe.SequenceRanking(ragged_labels(gen, 4, 3, v), 2), (4, 3, v)),
        (lambda: fe.SequenceRanking(ragged_labels(gen, 6, 4, v, lo=1), 3, causal=True), (6, 4, v)),
    ]
    for make, shape in makers:
        cs = [make() for _ in range(num_edits)]
        zs = torch.randn(num_edits, *shape, generator=gen, dtype=torch.float64)
        flat = [pytree.tree_flatten(c) for c in cs]
        assert all(f[1] == flat[0][1] for f in flat)
        stacked = pytree.tree_unflatten([torch.stack([f[0][0] for f in flat])], flat[0][1])
        got = torch.func.vmap(lambda c, z: c.per_sample(z))(stacked, zs)
        want = torch.stack([c.per_sample(z) for c, z in zip(cs, zs)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        sat = torch.func.vmap(lambda c, z: c.satisfied(z))(stacked, zs)
        assert torch.equal(sat, want <= 0)
        # and gradients per edit under vmap(grad)
        gz = torch.func.vmap(torch.func.grad(lambda z, c: c.per_sample(z).amax()), in_dims=(0, 0))(zs, stacked)
        for i, (c, z) in enumerate(zip(cs, zs)):
            z = z.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(c.per_sample(z).amax(), z)
            torch.testing.assert_close(gz[i], g, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 7. ModelInputs
# ------------------------------------------------------------------------------------------------
def _record(*args, **kwargs):
    return args, kwargs


def test_model_inputs_normalisation():
    x = torch.randn(3, 4)
    mi = ModelInputs.of(x)
    assert mi.args == (x,) and mi.kwargs == {} and mi.args[0] is x
    assert ModelInputs.of(mi) is mi
    assert mi.num_samples == 3 and mi.device == x.device
    assert mi.call(_record) == ((x,), {})
    assert mi.describe() == "x of shape (3, 4)"

    m = torch.ones(3, 4, dtype=torch.long)
    for seq in ((x, m, None, 2.5), [x, m, None, 2.5]):
        mi = ModelInputs.of(seq)
        assert isinstance(mi.args, tuple) and mi.kwargs == {}
        args, kwargs = mi.call(_record)
        assert args[0] is x and args[1] is m and args[2] is None and args[3] == 2.5 and kwargs == {}
        assert mi.describe() == "argument 0 (3, 4), argument 1 (3, 4)"

    d = {"input_ids": m, "attention_mask": m.clone(), "return_dict": True}
    mi = ModelInputs.of(d)
    assert mi.args == () and mi.kwargs == d and mi.kwargs is not d
    assert mi.call(_record) == ((), d)
    assert mi.describe() == "input_ids (3, 4), attention_mask (3, 4)"

    enc = transformers.BatchEncoding({"input_ids": m, "attention_mask": torch.ones_like(m)})
    mi = ModelInputs.of(enc)
    assert type(mi.kwargs) is dict and list(mi.kwargs) == ["input_ids", "attention_mask"]
    assert mi.kwargs["input_ids"] is m and mi.num_samples == 3
    args, kwargs = mi.call(_record)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}
    assert mi.describe() == "input_ids (3, 4), attention_mask (3, 4)"

    # a single tensor given as a keyword is not "x"
    assert ModelInputs.of({"pixel_values": x}).describe() == "pixel_values (3, 4)"
    # nested containers are fine; their leaves are named by path
    mi = ModelInputs.of({"input_ids": m, "past": (torch.zeros(3, 2), torch.zeros(3, 5))})
    assert mi.describe() == "input_ids (3, 4), past[0] (3, 2), past[1] (3, 5)"
    assert [n for n, _ in mi.tensor_leaves()] == ["input_ids", "past[0]", "past[1]"]


def test_model_inputs_rows_take():
    x = torch.arange(20.0).reshape(5, 4)
    ids = torch.arange(10).reshape(5, 2)
    mi = ModelInputs.of((x, {"ids": ids, "flag": False}, None))
    part = mi.rows(1, 3)
    assert part.num_samples == 2
    assert torch.equal(part.args[0], x[1:3]) and part.args[0].data_ptr() == x[1:3].data_ptr()  # a view
    assert torch.equal(part.args[1]["ids"], ids[1:3])
    assert part.args[1]["flag"] is False and part.args[2] is None
    index = torch.tensor([4, 0, 4])
    took = mi.take(index)
    assert took.num_samples == 3
    assert torch.equal(took.args[0], x[index]) and torch.equal(took.args[1]["ids"], ids[index])
    assert took.args[1]["flag"] is False
    enc = ModelInputs.of(transformers.BatchEncoding({"input_ids": ids, "attention_mask": ids * 0}))
    assert torch.equal(enc.rows(2, 5).kwargs["input_ids"], ids[2:5])
    assert torch.equal(enc.take(torch.tensor([1])).kwargs["attention_mask"], (ids * 0)[[1]])
    # a pytree node: torch.func transforms see through it
    leaves, spec = pytree.tree_flatten(mi)
    assert sum(isinstance(v, torch.Tensor) for v in leaves) == 2
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, ModelInputs) and back.call(_record) == mi.call(_record)


def test_model_inputs_bad():
    a, b = torch.zeros(2, 3), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="argument 0 has 2, argument 1 has 3"):
        ModelInputs.of((a, b))
    with pytest.raises(ValueError, match="input_ids has 2, attention_mask has 3"):
        ModelInputs.of(transformers.BatchEncoding({"input_ids": a, "attention_mask": b}))
    with pytest.raises(ValueError, match=r"my_inputs: .*input_ids has 2, past\[1\] has 3"):
        ModelInputs.of({"input_ids": a, "past": (a, b)}, what="my_inputs")
    with pytest.raises(ValueError, match=r"argument 1 has no sample dimension \(0-dim\)"):
        ModelInputs.of((a, torch.tensor(1.0)))
    with pytest.raises(ValueError, match=r"scale has no sample dimension"):
        ModelInputs.of({"x": a, "scale": torch.tensor(2.0)})
    with pytest.raises(ValueError, match="non-empty sample dimension"):
        ModelInputs.of(torch.zeros(0, 3))
    for none in ((None, 3), [], {}, {"flag": True}):
        with pytest.raises(TypeError, match="hold no tensor"):
            ModelInputs.of(none)
    for wrong in (3, "text", 2.5, None):
        with pytest.raises(TypeError, match="must be a tensor, a tuple/list"):
            ModelInputs.of(wrong)
    with pytest.raises(TypeError, match="names must be strings, got 0"):
        ModelInputs.of({0: a})


def test_model_inputs_signature():
    def sig(*args, **kwargs):
        return ModelInputs.of(kwargs if kwargs else args).signature()

    ids = torch.zeros(2, 5, dtype=torch.long)
    base = sig(input_ids=ids, attention_mask=ids, use_cache=False)
    # sizes do not matter
    assert sig(input_ids=torch.zeros(7, 9, dtype=torch.long), attention_mask=torch.zeros(7, 9, dtype=torch.long),
               use_cache=False) == base
    # dtypes, ranks, non-tensor values, keys and structure do
    assert sig(input_ids=ids, attention_mask=ids.int(), use_cache=False) != base
    assert sig(input_ids=ids, attention_mask=ids[..., None], use_cache=False) != base
    assert sig(input_ids=ids, attention_mask=ids, use_cache=True) != base
    assert sig(input_ids=ids, attention_mask=ids, use_cache=None) != base
    assert sig(input_ids=ids, token_type_ids=ids, use_cache=False) != base
    assert sig(input_ids=ids, attention_mask=ids) != base
    x = torch.zeros(3, 4)
    assert sig(x, 1.0) == sig(torch.zeros(8, 6), 1.0)
    assert sig(x, 1.0) != sig(x, 2.0)
    assert sig(x, None) != sig(x, x)
    assert sig(x, [1, 2]) == sig(torch.zeros(1, 1), [1, 2])  # unhashable leaves are compared by repr
    assert sig(x) != sig(x.double())
    hash(base)  # usable as a cache key


# ------------------------------------------------------------------------------------------------
# 8. reading the logits
# ------------------------------------------------------------------------------------------------
def test_resolve_output_defaults():
    z = torch.randn(2, 3)
    read = resolve_output(None)
    assert read(z) is z
    assert read({"logits": z, "hidden": 1}) is z
    assert read(SequenceClassifierOutput(logits=z)) is z
    assert read(SequenceClassifierOutput(loss=torch.tensor(1.0), logits=z)) is z
    assert read((z, "other")) is z and read([z]) is z
    assert read_logits((z, None), read) is z
    with pytest.raises(ValueError, match=r"without 'logits' \(keys \['scores', 'hidden'\]\).*output="):
        read({"scores": z, "hidden": z})
    with pytest.raises(ValueError, match="empty tuple"):
        read(())
    with pytest.raises(TypeError, match="the model returned int"):
        read(3)


def test_resolve_output_key_index_callable():
    z, h = torch.randn(2, 3), torch.randn(2, 5)
    by_key = resolve_output("scores")
    assert by_key({"scores": z}) is z
    with pytest.raises(ValueError, match=r"output='scores'.*has no such key \(keys \['logits', 'hidden'\]\)"):
        by_key({"logits": z, "hidden": h})
    out = SequenceClassifierOutput(logits=z)
    assert resolve_output("logits")(out) is z
    with pytest.raises(ValueError, match=r"output='loss'.*SequenceClassifierOutput.*keys \['logits'\]"):
        resolve_output("loss")(out)

    class Obj:
        scores = z

    assert by_key(Obj()) is z
    with pytest.raises(ValueError, match="has no such key or attribute"):
        resolve_output("missing")(Obj())

    assert resolve_output(1)((h, z)) is z
    assert resolve_output(-1)([h, h, z]) is z
    assert resolve_output(0)(out) is z  # ModelOutput indexes like its tuple
    with pytest.raises(ValueError, match="output=2: cannot index the model's tuple"):
        resolve_output(2)((h, z))
    with pytest.raises(ValueError, match="returned a tensor, not a tuple"):
        resolve_output(0)(z)
    with pytest.raises(ValueError, match="cannot index the model's dict"):
        resolve_output(0)({"logits": z})

    fn = resolve_output(lambda o: o["a"][1])
    assert fn({"a": (h, z)}) is z
    assert read_logits({"a": (h, z)}, fn) is z

    for bad in (True, 1.5, b"logits"):
        with pytest.raises(TypeError, match="output must be None"):
            resolve_output(bad)


def test_read_logits_checks():
    read = resolve_output(None)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z = torch.zeros(2, 3, dtype=dtype)
        assert read_logits(z, read) is z
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(TypeError, match=f"floating point, got dtype {dtype}"):
            read_logits(torch.zeros(2, 3, dtype=dtype), read)
    with pytest.raises(TypeError, match=f"floating point, got dtype {torch.int64}"):
        read_logits({"logits": torch.zeros(2, 3, dtype=torch.long)}, read)
    with pytest.raises(TypeError, match="output= gave list, not a logits tensor"):
        read_logits({"logits": [1.0, 2.0]}, read)
    with pytest.raises(TypeError, match="output= gave NoneType"):
        read_logits((None, torch.zeros(1)), read)
