"""csrc/cpu/fast_math.h, the branch-free exp and log of the CPU edit_metrics kernel, against
torch.exp / torch.log and (float64) mpmath, in ulp, with the bounds the header documents.

The functions are reached through the test-only ops torch.ops.fastedit_testing.exp_nonpos and
.log_ge1, compiled in csrc/cpu/edit_metrics.cpp under that kernel's pragma and clones: what is
measured here is the code the kernel runs on this CPU (its AVX-512, AVX2 or baseline clone)."""
from __future__ import annotations

import math

import pytest
import torch

try:
    import fastedit._C  # noqa: F401  (registers torch.ops.fastedit_testing)
except ImportError as error:  # a pure-Python install (FASTEDIT_SKIP_EXTENSION=1)
    pytest.skip(f"fastedit._C is not available: {error}", allow_module_level=True)

# The header's bounds, in ulp of the exact result. Largest errors measured (GCC 12, AVX-512
# clone): float32 over every argument of the contract (1.1e9 for exp, 2^30 for log), float64 on
# samples like those below, against mpmath.
EXP_ULP = {torch.float32: 1.0, torch.float64: 1.0}   # measured 0.992 / 0.93
LOG_ULP = {torch.float32: 3.0, torch.float64: 3.0}   # measured 2.84 / 2.58
EXP_CLAMP = {torch.float32: -87.3, torch.float64: -708.0}
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
MANTISSA = {torch.float32: 24, torch.float64: 53}
MAX_EXPONENT = {torch.float32: 128, torch.float64: 1024}  # 2^MAX_EXPONENT is the first overflow


def exp_nonpos(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastedit_testing.exp_nonpos(x)


def log_ge1(s: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastedit_testing.log_ge1(s)


def ulp_error(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - exact| in ulp of `exact` (float64) at the precision of `dtype`; exact 0 -> 0 or inf."""
    _, exponent = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), exponent - MANTISSA[dtype])
    err = (got.double() - exact).abs() / ulp
    return torch.where(exact == 0, torch.where(got == 0, 0.0, math.inf), err)


def int_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values lie between a and b (same sign, finite)."""
    ints = BITS[a.dtype]
    return (a.view(ints).long() - b.view(ints).long()).abs()


def float_from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.to(BITS[dtype]).view(dtype)


def exp_arguments(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """Arguments in [clamp, 0]: random bit patterns (every binade, subnormals included), uniform
    values, the neighbourhood of 0 and of multiples of ln 2 (where the reduction changes n)."""
    g = torch.Generator().manual_seed(seed)
    clamp = EXP_CLAMP[dtype]
    top = torch.tensor([clamp], dtype=dtype).abs().view(BITS[dtype]).long().item()
    patterns = -float_from_bits(torch.randint(0, top + 1, (n,), generator=g), dtype)
    uniform = (torch.rand(n, generator=g, dtype=torch.float64) * clamp).to(dtype)
    k = torch.arange(0, int(-clamp / math.log(2)) + 1, dtype=torch.float64)
    around_ln2 = (-(k * math.log(2)).unsqueeze(1) + torch.linspace(-1e-3, 1e-3, 41, dtype=torch.float64)).flatten()
    near_zero = -torch.logspace(-30, 0, 2001, dtype=torch.float64)
    extra = torch.cat([around_ln2, near_zero]).to(dtype)
    x = torch.cat([patterns, uniform, extra, torch.tensor([0.0, -0.0, clamp], dtype=dtype)])
    return x[(x >= clamp) & (x <= 0)]


def log_arguments(dtype: torch.dtype, n: int, seed: int = 1) -> torch.Tensor:
    """Finite s >= 1: random bit patterns up to the largest finite value, uniform values in
    [1, 16], the neighbourhood of 1 and of sqrt(2) * 2^e (where the reduction switches binade),
    powers of two and the largest finite value."""
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    one = torch.tensor([1.0], dtype=dtype).view(BITS[dtype]).long().item()
    biggest = torch.tensor([info.max], dtype=dtype).view(BITS[dtype]).long().item()
    patterns = float_from_bits(torch.randint(one, biggest + 1, (n,), generator=g), dtype)
    uniform = (1 + 15 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    steps = torch.arange(0, 20001, dtype=torch.float64)
    near_one = (1 + steps * info.eps).to(dtype)
    e = torch.arange(0, MAX_EXPONENT[dtype] - 1, dtype=torch.float64)
    wiggle = 1 + torch.linspace(-8, 8, 17, dtype=torch.float64) * info.eps
    root2 = (math.sqrt(2) * torch.exp2(e)).unsqueeze(1) * wiggle
    powers = torch.exp2(e)
    s = torch.cat([patterns, uniform, near_one, root2.flatten().to(dtype), powers.to(dtype),
                   torch.tensor([1.0, info.max], dtype=dtype)])
    return s[torch.isfinite(s) & (s >= 1)]


# ------------------------------------------------------------------------------------------------
# float32: the exact value is torch.exp / torch.log in float64 (its own error is ~2^-29 float32 ulp)


def test_exp_nonpos_float32_within_its_bound():
    x = exp_arguments(torch.float32, 1_000_000)
    got = exp_nonpos(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    err = ulp_error(got, torch.exp(x.double()), torch.float32)
    assert err.max().item() <= EXP_ULP[torch.float32], f"max {err.max().item()} ulp at x = {x[err.argmax()].item()!r}"
    # and next to torch.exp in float32 (itself within 1 ulp)
    assert int_ulp_distance(got, torch.exp(x)).max().item() <= EXP_ULP[torch.float32] + 1


def test_log_ge1_float32_within_its_bound():
    s = log_arguments(torch.float32, 1_000_000)
    got = log_ge1(s)
    err = ulp_error(got, torch.log(s.double()), torch.float32)
    assert err.max().item() <= LOG_ULP[torch.float32], f"max {err.max().item()} ulp at s = {s[err.argmax()].item()!r}"
    assert int_ulp_distance(got, torch.log(s)).max().item() <= LOG_ULP[torch.float32] + 1


def check_float32_exhaustively(fn: str) -> None:
    """The float32 bounds on every argument of the contract: the 1,118,738,843 floats of
    [-87.3f, 0] for exp_nonpos, the 2^30 finite floats >= 1 for log_ge1 (where the header's
    measured maxima come from). About 4 minutes, so not a test the suite runs (the sampled tests
    above are): ``python tests/ops/test_fast_math.py``."""
    def bits(value: float) -> int:  # the unsigned bit pattern of a float32
        return torch.tensor([value], dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF

    if fn == "exp":  # -0.0, -1e-45, ..., -87.3f: increasing patterns
        first, last, op, exact, bound = bits(-0.0), bits(EXP_CLAMP[torch.float32]), exp_nonpos, torch.exp, EXP_ULP
    else:  # 1.0 ... the largest finite float
        first, last, op, exact, bound = bits(1.0), bits(torch.finfo(torch.float32).max), log_ge1, torch.log, LOG_ULP
    worst = 0.0
    for start in range(first, last + 1, 1 << 24):
        x = float_from_bits(torch.arange(start, min(start + (1 << 24), last + 1)), torch.float32)
        worst = max(worst, ulp_error(op(x), exact(x.double()), torch.float32).max().item())
    assert worst <= bound[torch.float32], f"max {worst} ulp"


# ------------------------------------------------------------------------------------------------
# float64: the exact value from mpmath (120 bits) on a sample; torch.exp / torch.log on many more


def _mp_ulp_errors(got: torch.Tensor, args: torch.Tensor, fn) -> list[float]:
    mpmath = pytest.importorskip("mpmath")
    errors = []
    with mpmath.workprec(120):
        for value, arg in zip(got.tolist(), args.tolist()):
            exact = getattr(mpmath, fn)(mpmath.mpf(arg))
            if exact == 0:
                errors.append(0.0 if value == 0 else math.inf)
                continue
            ulp = math.ldexp(1.0, math.frexp(float(exact))[1] - 53)
            errors.append(float(abs(mpmath.mpf(value) - exact) / ulp))
    return errors


@pytest.mark.parametrize("fn", ["exp", "log"])
def test_float64_within_its_bound(fn):
    args = exp_arguments(torch.float64, 400_000) if fn == "exp" else log_arguments(torch.float64, 400_000)
    op, bound = (exp_nonpos, EXP_ULP) if fn == "exp" else (log_ge1, LOG_ULP)
    got = op(args)
    assert got.dtype == torch.float64
    reference = torch.exp(args) if fn == "exp" else torch.log(args)
    distance = int_ulp_distance(got, reference)
    assert distance.max().item() <= bound[torch.float64] + 1, f"{distance.max().item()} ulp from torch.{fn}"
    # the exact error on a sample: the worst cases next to torch, and random others
    sample = torch.cat([distance.argsort(descending=True)[:2000],
                        torch.randperm(args.numel(), generator=torch.Generator().manual_seed(2))[:6000]])
    errors = _mp_ulp_errors(got[sample], args[sample], fn)
    assert max(errors) <= bound[torch.float64], f"max {max(errors)} ulp"


# ------------------------------------------------------------------------------------------------
# The edges the header promises


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_exp_nonpos_edges(dtype):
    info = torch.finfo(dtype)
    clamp = EXP_CLAMP[dtype]
    at_clamp = exp_nonpos(torch.tensor([clamp], dtype=dtype))
    # e^0 = 1 exactly, for +0, -0 and the negative subnormals (e^x rounds to 1 there)
    subnormals = -info.smallest_normal * torch.tensor([0.5, 2**-10, info.eps], dtype=torch.float64)
    zeros = torch.cat([torch.tensor([0.0, -0.0], dtype=torch.float64), subnormals]).to(dtype)
    assert (zeros[2:] != 0).all() and (zeros[2:].abs() < info.smallest_normal).all()
    assert torch.equal(exp_nonpos(zeros), torch.ones(5, dtype=dtype))
    # below the clamp, -inf and NaN: the value at the clamp, a positive normal number
    assert at_clamp.item() >= info.smallest_normal and math.isfinite(at_clamp.item())
    exact = torch.exp(torch.tensor([clamp], dtype=dtype).double())
    assert ulp_error(at_clamp, exact, dtype).item() <= EXP_ULP[dtype]
    below = torch.tensor([clamp * (1 + 4 * info.eps), clamp - 1, -1e4, -info.max, -math.inf, math.nan, -math.nan],
                         dtype=dtype)
    assert torch.equal(exp_nonpos(below), at_clamp.expand(below.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_log_ge1_edges(dtype):
    info = torch.finfo(dtype)
    assert log_ge1(torch.ones(1, dtype=dtype)).item() == 0.0  # log 1 = 0 exactly
    just_above = torch.tensor([1 + info.eps], dtype=dtype)
    assert ulp_error(log_ge1(just_above), torch.log(just_above.double()), dtype).item() <= LOG_ULP[dtype]
    biggest = log_ge1(torch.tensor([info.max], dtype=dtype))
    assert math.isfinite(biggest.item())
    powers = torch.exp2(torch.arange(0, MAX_EXPONENT[dtype] - 1, dtype=torch.float64)).to(dtype)
    exact = torch.arange(0, MAX_EXPONENT[dtype] - 1, dtype=torch.float64) * math.log(2)
    assert ulp_error(log_ge1(powers)[1:], exact[1:], dtype).max().item() <= LOG_ULP[dtype]


def test_the_ops_take_any_strides_and_check_their_input():
    x = -torch.rand(4, 6, dtype=torch.float64).t()[::2]  # a non-contiguous view
    assert torch.equal(exp_nonpos(x), exp_nonpos(x.contiguous()))
    assert exp_nonpos(torch.empty(0)).shape == (0,)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        log_ge1(torch.ones(3, dtype=torch.float16))


if __name__ == "__main__":
    for name in ("exp", "log"):
        check_float32_exhaustively(name)
        print(f"{name}: every float32 argument within its bound")
