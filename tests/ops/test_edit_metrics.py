"""edit_metrics: every backend available here (C++ CPU, Triton interpreter, reference; CUDA when a GPU
is present) against a plain PyTorch computation written here, plus the API's checks and dispatch."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fastedit.ops import _extension as extension
from fastedit.ops import dispatch

metrics = importlib.import_module("fastedit.ops.edit_metrics")

import hypothesis  # noqa: E402,F401  (a test dependency: missing, the module must fail, not skip)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# numpy, under the Triton interpreter, warns about -inf - -inf in masked lanes (their values are
# never stored)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KEYS = metrics.METRIC_KEYS
COUNT_KEYS = ("errors", "flips", "correct_to_wrong", "wrong_to_correct", "errors_per_class")
HAS_EXT = extension.load() is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# The oracle of this file: float64, written out, independent of fastedit's reference.


def naive(ref: torch.Tensor, labels: torch.Tensor, edited: torch.Tensor) -> dict[str, torch.Tensor]:
    E, N, C = edited.shape
    ref_pred = torch.argmax(ref, dim=-1)  # argmax on the given dtype: the tie/NaN rule to match
    pred = torch.argmax(edited, dim=-1)
    r, e = ref.double(), edited.double()
    logp_r = r - torch.logsumexp(r, dim=-1, keepdim=True)
    logp_e = e - torch.logsumexp(e, dim=-1, keepdim=True)
    kl_rows = (logp_r.exp() * (logp_r - logp_e)).sum(-1)
    finite = torch.isfinite(r).all(-1) & torch.isfinite(e).all(-1)
    kl_rows = torch.where(finite, kl_rows, torch.nan)
    wrong = pred != labels
    was_right = ref_pred == labels
    per_class = torch.stack([torch.bincount(labels[wrong[i]], minlength=C) for i in range(E)]) \
        if E else torch.zeros(0, C, dtype=torch.int64)
    return {
        "errors": wrong.sum(1), "flips": (pred != ref_pred).sum(1),
        "correct_to_wrong": (was_right & wrong).sum(1), "wrong_to_correct": (~was_right & ~wrong).sum(1),
        "kl": kl_rows.mean(1), "errors_per_class": per_class, "kl_rows": kl_rows,
    }


# ------------------------------------------------------------------------------------------------
# Backends as functions returning the result dict (with kl_rows).


def _run_cpu(ref, labels, edited):
    return dict(zip(KEYS, torch.ops.fastedit.edit_metrics(ref, labels, edited, True)))


def _run_triton(ref, labels, edited):
    from fastedit.ops.triton.edit_metrics import edit_metrics_triton
    return dict(zip(KEYS, edit_metrics_triton(ref, labels, edited, True)))


def _run_reference(ref, labels, edited):
    return metrics.reference(ref, labels, edited, return_kl_rows=True)


BACKENDS = {
    "cpu": pytest.param(_run_cpu, id="cpu", marks=pytest.mark.skipif(
        not HAS_EXT, reason=f"fastedit._C not built: {extension.unavailable_reason()}")),
    "triton": pytest.param(_run_triton, id="triton", marks=pytest.mark.skipif(
        not HAS_TRITON, reason="triton missing or TRITON_INTERPRET != 1")),
    "reference": pytest.param(_run_reference, id="reference"),
}


def check(out: dict, ref, labels, edited, *, exact_kl: bool = False) -> None:
    """Counts exactly; the KL within the tolerance rule: error vs float64 truth at most twice
    that of PyTorch's own computation in the input dtype (the reference), or 8 float32 ulp of
    max(1, |KL|). The floor is an exception to the 1-ulp rule: the KL is a difference of terms of
    size ~1 (log-sum-exps, here built from polynomial exp/log without FMA on the CPU), so float32
    arithmetic carries a few ulp of 1 in absolute terms, and on special inputs (uniform rows, whose
    log-softmax is exactly -log C) the reference is right by luck and its error is no yardstick. For the
    mean ``kl`` "the reference's error" is the larger of its mean's and its worst row's: a mean
    carries its rows' errors, and the reference's mean can be lucky by cancellation."""
    E, N, C = edited.shape
    truth = naive(ref, labels, edited)
    for k in COUNT_KEYS:
        assert out[k].dtype == torch.int64, k
        assert torch.equal(out[k], truth[k]), (k, out[k], truth[k])
    assert out["errors_per_class"].shape == (E, C)
    assert torch.equal(out["errors_per_class"].sum(1), out["errors"])
    assert out["kl"].dtype == torch.float32 and out["kl"].shape == (E,)
    assert out["kl_rows"].dtype == torch.float32 and out["kl_rows"].shape == (E, N)
    theirs = _run_reference(ref, labels, edited)
    row_bound = 0.0  # the largest per-row error of the reference: the mean may carry that much
    for k in ("kl_rows", "kl"):
        mine, want, torch_way = out[k].double(), truth[k], theirs[k].double()
        assert torch.equal(mine.isnan(), want.isnan()), k
        ok = ~want.isnan()
        if not ok.any():
            continue
        if exact_kl:
            assert torch.equal(mine[ok], want[ok]), k
            continue
        err = (mine[ok] - want[ok]).abs().max().item()
        err_torch = max((torch_way[ok] - want[ok]).abs().max().item(), row_bound)
        row_bound = err_torch
        ulp = 8 * torch.finfo(torch.float32).eps * max(want[ok].abs().max().item(), 1.0)
        assert err <= max(2 * err_torch, ulp) + 1e-300, (k, err, err_torch, ulp)


def make(E, N, C, dtype, scale=3.0, change=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    edited = ref + change * torch.randn(E, N, C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    # make a good share of the original predictions right, so both flip directions occur
    labels[::2] = ref[::2].argmax(-1)
    return ref.to(dtype), labels, edited.to(dtype)


# ------------------------------------------------------------------------------------------------
# Agreement with the oracle


@pytest.mark.parametrize("run", list(BACKENDS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 2, 3, 10, 17, 1000])
@pytest.mark.parametrize("E", [1, 5])
def test_matches_naive(run, dtype, C, E):
    N = 9 if (C == 1000 and run is _run_triton) else 37  # the interpreter is slow
    ref, labels, edited = make(E, N, C, dtype, seed=C * 10 + E)
    check(run(ref, labels, edited), ref, labels, edited)


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [31, 64, 65, 256, 257, 513])  # lane/row paths, block edges
def test_cpu_block_edges(dtype, C):
    ref, labels, edited = make(3, 21, C, dtype, seed=C)
    check(_run_cpu(ref, labels, edited), ref, labels, edited)


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing or TRITON_INTERPRET != 1")
@pytest.mark.parametrize("C", [127, 128, 129, 300])  # chunk edges of BLOCK_C = 128
def test_triton_chunk_edges(C):
    ref, labels, edited = make(2, 7, C, torch.float32, seed=C)
    check(_run_triton(ref, labels, edited), ref, labels, edited)


@pytest.mark.parametrize("run", list(BACKENDS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [3, 10, 70, 300])
def test_argmax_ties_like_torch(run, dtype, C):
    g = torch.Generator().manual_seed(C)
    E, N = 3, 41
    ref = torch.randint(0, 3, (N, C), generator=g).to(dtype)  # many ties of the maximum
    edited = torch.randint(0, 3, (E, N, C), generator=g).to(dtype)
    ref[0] = 1  # whole rows equal: argmax 0
    edited[:, 1] = -2
    edited[1, 2] = ref[2]
    # labels: for half the rows the LAST maximal index of edit 0, where it differs from the first
    labels = torch.argmax(edited[0], -1)
    last = C - 1 - torch.argmax(edited[0].flip(-1), -1)
    labels[1::2] = last[1::2]
    out = run(ref, labels, edited)
    check(out, ref, labels, edited)
    assert out["errors"][0] == (labels != torch.argmax(edited[0], -1)).sum()


@pytest.mark.parametrize("run", list(BACKENDS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [5, 40, 300])
def test_nan_and_inf(run, dtype, C):
    E, N = 2, 13
    ref, labels, edited = make(E, N, C, dtype, seed=C)
    nan, inf = float("nan"), float("inf")
    edited[0, 0, C // 2] = nan          # argmax = the NaN
    edited[0, 1, 1] = nan
    edited[0, 1, C - 1] = nan           # the first NaN wins
    edited[1, 2, :] = nan
    edited[0, 3, C // 3] = inf
    edited[1, 4, 0] = -inf
    edited[0, 5, :] = -inf              # all -inf: argmax 0
    ref[6, C - 1] = nan                 # ref NaN: that sample's KL is NaN for every edit
    ref[7, 0] = -inf
    labels[:6] = torch.argmax(edited[0, :6], -1)
    out = run(ref, labels, edited)
    check(out, ref, labels, edited)
    rows = out["kl_rows"]
    assert rows[:, 6].isnan().all() and rows[:, 7].isnan().all()
    assert rows[0, [0, 1, 3, 5]].isnan().all() and rows[1, [2, 4]].isnan().all()
    assert not rows[:, 8:].isnan().any()
    assert out["kl"].isnan().all()


@pytest.mark.parametrize("run", list(BACKENDS.values()))
@pytest.mark.parametrize("C", [10, 1000])
def test_extreme_logits(run, C):
    E, N = 2, 9
    ref, labels, edited = make(E, N, C, torch.float32, scale=1.0, seed=1)
    ref = ref * 1e4                     # spread +-4e4
    edited = (ref + 1e4).expand(E, N, C).clone()  # a large common offset
    edited[1] = -ref                    # large spread, very different: a KL of ~1e4
    out = run(ref, labels, edited)
    assert torch.isfinite(out["kl_rows"]).all()
    check(out, ref, labels, edited)
    ref_shift = ref + 1e4  # the same distributions as edited[0]
    small = run(ref_shift, labels, edited[:1])
    assert small["kl_rows"].abs().max() <= 1e-3  # offsets are exact in float32 here: 0 up to rounding


@pytest.mark.parametrize("run", list(BACKENDS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 10, 17, 1000])
def test_identical_rows_give_zero(run, dtype, C):
    ref, labels, _ = make(1, 11 if C == 1000 else 29, C, dtype, seed=3)
    edited = ref.expand(3, *ref.shape).clone()
    out = run(ref, labels, edited)
    assert (out["kl_rows"] == 0).all() and (out["kl"] == 0).all()
    assert (out["flips"] == 0).all() and (out["correct_to_wrong"] == 0).all()
    assert (out["wrong_to_correct"] == 0).all()
    base_errors = (torch.argmax(ref, -1) != labels).sum()
    assert (out["errors"] == base_errors).all()


@pytest.mark.parametrize("run", list(BACKENDS.values()))
def test_empty(run):
    labels = torch.zeros(0, dtype=torch.long)
    out = run(torch.randn(0, 4), labels, torch.randn(3, 0, 4))
    assert out["errors"].tolist() == [0, 0, 0] and out["kl"].isnan().all()
    assert out["errors_per_class"].shape == (3, 4) and out["kl_rows"].shape == (3, 0)
    out = run(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(0, 5, 4))
    assert out["errors"].shape == (0,) and out["kl"].shape == (0,) and out["errors_per_class"].shape == (0, 4)


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
def test_non_contiguous_inputs():
    ref, labels, edited = make(4, 15, 12, torch.float32)
    ref_nc = ref.t().contiguous().t()
    edited_nc = edited.transpose(0, 1).contiguous().transpose(0, 1)
    labels_nc = torch.stack([labels, labels], 1)[:, 0]
    assert not (ref_nc.is_contiguous() or edited_nc.is_contiguous() or labels_nc.is_contiguous())
    a, b = _run_cpu(ref_nc, labels_nc, edited_nc), _run_cpu(ref, labels, edited)
    for k in KEYS:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@pytest.mark.parametrize("C", [10, 1000])
def test_deterministic_across_thread_counts(C):
    ref, labels, edited = make(6, 4001 if C == 10 else 301, C, torch.float32, seed=7)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run_cpu(ref, labels, edited))
    finally:
        torch.set_num_threads(before)
    for k in KEYS:
        assert torch.equal(results[0][k], results[1][k]), k


# ------------------------------------------------------------------------------------------------
# Property test


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@settings(max_examples=30, deadline=None)
@given(E=st.integers(0, 4), N=st.integers(0, 40), C=st.integers(1, 80), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([0.0, 0.01, 1.0, 30.0]), change=st.sampled_from([0.0, 1e-3, 1.0]),
       seed=st.integers(0, 2**16))
def test_property_cpu_matches_naive(E, N, C, dtype, scale, change, seed):
    ref, labels, edited = make(E, N, C, dtype, scale=scale, change=change, seed=seed)
    out = _run_cpu(ref, labels, edited)
    if N:
        check(out, ref, labels, edited)
    # invariants of the definitions
    base_errors = (torch.argmax(ref, -1) != labels).sum()
    assert torch.equal(out["errors"] - base_errors, out["correct_to_wrong"] - out["wrong_to_correct"])
    assert (out["flips"] >= out["correct_to_wrong"] + out["wrong_to_correct"]).all()
    assert (out["kl_rows"] >= -1e-5).all()


# ------------------------------------------------------------------------------------------------
# The public API: validation and dispatch


def _bad_inputs():
    ref, labels, edited = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.randn(2, 4, 3)
    return [
        ("shape-N", (ref, labels[:3], edited), ValueError, "shape mismatch"),
        ("shape-C", (ref, labels, torch.randn(2, 4, 5)), ValueError, "shape mismatch"),
        ("edited-2d", (ref, labels, edited[0]), ValueError, "edited_logits must be 3-D"),
        ("ref-3d", (edited, labels, edited), ValueError, "ref_logits must be 2-D"),
        ("labels-2d", (ref, labels[:, None], edited), ValueError, "labels must be 1-D"),
        ("label-too-large", (ref, torch.tensor([0, 1, 3, 0]), edited), ValueError, r"labels\[2\] = 3 is out of range"),
        ("label-negative", (ref, torch.tensor([0, -1, 2, 0]), edited), ValueError, r"labels\[1\] = -1 is out of range"),
        ("labels-int32", (ref, labels.int(), edited), TypeError, "labels must be int64"),
        ("labels-float", (ref, labels.float(), edited), TypeError, "labels must be int64"),
        ("logits-int", (ref.long(), labels, edited.long()), TypeError, "must be float32, float64, float16 or bfloat16"),
        ("dtype-mismatch", (ref, labels, edited.double()), TypeError, "must have the dtype of ref_logits"),
        ("device", (ref, labels, edited.to("meta")), ValueError, "all inputs must be on one device"),
        ("no-classes", (torch.randn(4, 0), labels, torch.randn(2, 4, 0)), ValueError, "at least one class"),
        ("not-a-tensor", (ref.tolist(), labels, edited), TypeError, "must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_EXT, reason="no ext"))])
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_api_rejects_bad_inputs(monkeypatch, backend, case):
    monkeypatch.setenv("FASTEDIT_BACKEND", backend)
    _, args, error, message = case
    with pytest.raises(error, match=message):
        metrics.edit_metrics(*args)


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 3), torch.tensor([0, 1, 3, 0]), torch.randn(2, 4, 3)), r"labels\[2\] = 3 is out of range"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.int32), torch.randn(2, 4, 3)), "labels must be int64"),
        ((torch.randn(4, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4, 3)), "shape mismatch"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 4, 3).double()), "dtype of ref_logits"),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 3)), "must be 3-D"),
        ((torch.randn(4, 3).int(), torch.zeros(4, dtype=torch.long), torch.randn(2, 4, 3).int()), "must be float32"),
    ],
    ids=["label-range", "labels-int32", "shape", "dtype-mismatch", "edited-2d", "int-logits"],
)
def test_compiled_op_rejects_bad_inputs(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastedit.edit_metrics(*args, False)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_EXT, reason="no ext"))])
def test_api_dispatch_and_keys(monkeypatch, backend):
    monkeypatch.setenv("FASTEDIT_BACKEND", backend)
    assert dispatch.choose_backend("edit_metrics", torch.device("cpu")) == backend
    ref, labels, edited = make(3, 11, 7, torch.float32)
    out = metrics.edit_metrics(ref, labels, edited)
    assert tuple(out) == KEYS[:-1]
    full = metrics.edit_metrics(ref, labels, edited.requires_grad_(), return_kl_rows=True)
    assert tuple(full) == KEYS and not any(v.requires_grad for v in full.values())
    check(full, ref, labels, edited.detach())


def test_default_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTEDIT_BACKEND", raising=False)
    expected = "cpu" if extension.has_cpu_ops() else "reference"
    assert dispatch.choose_backend("edit_metrics", torch.device("cpu")) == expected


def test_forcing_triton_on_cpu_tensors_fails_loudly(monkeypatch):
    monkeypatch.setenv("FASTEDIT_BACKEND", "triton")
    ref, labels, edited = make(1, 3, 4, torch.float32)
    with pytest.raises(dispatch.BackendError, match="FASTEDIT_BACKEND=triton"):
        metrics.edit_metrics(ref, labels, edited)


# ------------------------------------------------------------------------------------------------
# The compiled op's registration


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("return_kl_rows", [False, True])
def test_opcheck(dtype, return_kl_rows):
    ref, labels, edited = make(3, 9, 11, dtype)
    op = torch.ops.fastedit.edit_metrics
    torch.library.opcheck(op, (ref, labels, edited, return_kl_rows))
    # With inputs that require grad: the schema, the autograd registration (which exists, and whose
    # backward raises, see below) and the fake kernel; not test_aot_dispatch_dynamic, which sums
    # all outputs into the first one (an int64 count here: it fails before the op is involved)
    # and then back-propagates through an op that is not differentiable.
    torch.library.opcheck(op, (ref.clone().requires_grad_(), labels, edited.clone().requires_grad_(),
                               return_kl_rows),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
def test_not_differentiable_says_so():
    ref, labels, edited = make(2, 5, 4, torch.float32)
    out = torch.ops.fastedit.edit_metrics(ref, labels, edited.requires_grad_(), True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out[4].sum().backward()


@pytest.mark.skipif(not HAS_EXT, reason="fastedit._C not built")
def test_torch_compile_fullgraph():
    ref, labels, edited = make(2, 13, 10, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(r, y, e):
        return torch.ops.fastedit.edit_metrics(r, y, e, True)

    for a, b in zip(f(ref, labels, edited), _run_cpu(ref, labels, edited).values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped here: no GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not extension.has_cuda_ops(),
                                reason="no CUDA device, or fastedit._C built without its CUDA kernels")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 3, 10, 17, 32, 33, 1000, 1001])
def test_cuda_matches_naive(dtype, C):
    ref, labels, edited = make(4, 37, C, dtype, seed=C)
    out = dict(zip(KEYS, torch.ops.fastedit.edit_metrics(ref.cuda(), labels.cuda(), edited.cuda(), True)))
    check({k: v.cpu() for k, v in out.items()}, ref, labels, edited)
    same = torch.ops.fastedit.edit_metrics(ref.cuda(), labels.cuda(), ref.cuda().expand_as(edited), True)
    assert (same[6] == 0).all()


@pytest.mark.gpu
@needs_cuda
def test_cuda_ties_nan_opcheck_and_triton():
    ref, labels, edited = make(2, 13, 40, torch.float32)
    edited[0, 0, 3] = float("nan")
    edited[1, 1] = 1.0
    out = dict(zip(KEYS, torch.ops.fastedit.edit_metrics(ref.cuda(), labels.cuda(), edited.cuda(), True)))
    check({k: v.cpu() for k, v in out.items()}, ref, labels, edited)
    torch.library.opcheck(torch.ops.fastedit.edit_metrics, (ref.cuda(), labels.cuda(), edited.cuda(), True))
    tri = _run_triton(ref.cuda(), labels.cuda(), edited.cuda())
    check({k: v.cpu() for k, v in tri.items()}, ref, labels, edited)
