"""Triton kernel of ``editor_step_`` (the fused, in-place editor step; contract in
``fastedit/ops/editor_step.py``, math in ``csrc/editor_step_math.h``).

**Multi-tensor launch (apex style).** A call steps a list of tensors (a layer's ~15, a model's
hundreds) with ONE launch per parameter dtype group (float32 / float16 / bfloat16 / float64: the
dtype is a constexpr of the kernel, so a call mixing float32 and float16 parameters makes two
launches; one dtype makes one). Per call a small int64 table, 8 words per tensor, travels to the
device::

    [param addr, grad addr, slot1 addr, slot2 addr, mask addr, row, mask stride, first block]

``row`` is the per-edit length (numel / E), ``first block`` the prefix sum of the tensors'
``cdiv(row, BLOCK)``. The 1-D grid is ``E × total blocks`` (edit-major); a program finds its tensor
by a branch-free binary search over the ``first block`` column (``LOG_T = ceil(log2 T)`` scalar
loads, unrolled; the table is padded to ``2**LOG_T`` rows whose ``first block`` is INT64_MAX, so the
search needs no bounds check) and turns the addresses into typed pointers with
``tl.load(tab + k).to(tl.pointer_type(dtype))`` (an ``int → ptr`` cast: ``inttoptr`` when compiled,
a bit-cast in the interpreter). The alternative trick (one base tensor plus element offsets
``(data_ptr - base_ptr) / element_size``) was not needed: Triton 3.9's interpreter supports the
cast (``create_int_to_ptr`` is its bitcast, and CPU tensors are read and written in place), and the
compiled path was checked offline, without a GPU (``triton.compile`` for sm_90, all 6 rules × 4
dtypes × mask on/off compile with fp fusion off; ptxas for sm_90a, Adam + mask + active: 86 / 92 /
116 registers for float32 / bfloat16 / float64, 0 spills, 0 stack). Loads are one element per
instruction (coalesced, not vectorised), as in the former per-tensor kernel whose row length was not
specialised either. Under the interpreter only CPU tensors can be used (it copies *arguments* to
the host, not memory reached through table addresses), which the wrapper checks. The wrapper reads
``data_ptr()``, so torch.compile does not trace this path (the compiled extension op is the
traceable one). The table is cached per (device, addresses, rows, strides) key: its content is a pure
function of that key, so a hit is always correct even if a tensor was freed and another allocated
at the same address; it is never written after creation, so a running launch can still read it.
On a GPU it is copied from pinned memory with ``non_blocking`` (no host synchronisation).

Int64 offsets everywhere, masked ragged tails, the edit's active flag and the per-edit state read
on the device. Hyper-parameters travel as the bit patterns of their values rounded to the compute
dtype (int args, bit-cast in the kernel): Triton would otherwise round a Python float to float32,
which is wrong for float64 parameters. Adam's bias corrections ``1 - beta ** t`` are computed per
edit with torch, by the reference's own expression, on the device (no host synchronisation). FMA
contraction is switched off (``enable_fp_fusion=False``) and division/sqrt are the correctly
rounded ``div_rn``/``sqrt_rn``, as in the reference. Under ``TRITON_INTERPRET=1`` it runs on CPU
tensors (slowly: tests only).
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .._table import RULE_IDS

__all__ = ["editor_step_triton"]

_BLOCK = 1024

# rule ids from the one table (constexpr globals: what a @triton.jit function may read)
_GD = tl.constexpr(RULE_IDS["gd"])
_SCALED = tl.constexpr(RULE_IDS["scaled_gd"])
_SIGN = tl.constexpr(RULE_IDS["rprop"])
_RMSPROP = tl.constexpr(RULE_IDS["rmsprop"])
_MOMENTUM = tl.constexpr(RULE_IDS["momentum"])
_ADAM = tl.constexpr(RULE_IDS["adam"])

# columns of the per-tensor table
_P, _G, _S1, _S2, _M, _ROW, _MSTRIDE, _FIRST = range(8)
_NCOL = 8
_INT64_MAX = 2**63 - 1

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    # correctly rounded: div_rn for float32 (plain / may be approximate); float64 / is div.rn
    if FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, FP64: tl.constexpr):
    if FP64:
        return tl.sqrt(a)  # sqrt.rn.f64
    else:
        return tl.sqrt_rn(a)


@triton.jit(do_not_specialize=["lr_b", "b1_b", "omb1_b", "b2_b", "omb2_b", "eps_b", "total"])
def _editor_step_kernel(tab_ptr, t_ptr, a_ptr, inv_ptr, bc1_ptr, bc2_ptr,
                        total, lr_b, b1_b, omb1_b, b2_b, omb2_b, eps_b,
                        RULE: tl.constexpr, HAS_ACTIVE: tl.constexpr, HAS_MASK: tl.constexpr,
                        FP64: tl.constexpr, DT: tl.constexpr, LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    e = pid // total  # edit-major: all blocks of all tensors of edit 0, then edit 1, ...
    c = pid - e * total
    # tensor index: the last i with first_block[i] <= c (padding rows hold INT64_MAX)
    i = c * 0
    for k in tl.static_range(LOG_T):
        cand = i + (1 << (LOG_T - 1 - k))
        i = tl.where(tl.load(tab_ptr + cand * 8 + 7) <= c, cand, i)
    rec = tab_ptr + i * 8
    row = tl.load(rec + 5)
    blk = c - tl.load(rec + 7)
    if FP64:
        cdt = tl.float64
        lr = lr_b.to(tl.int64).to(tl.float64, bitcast=True)
        b1 = b1_b.to(tl.int64).to(tl.float64, bitcast=True)
        omb1 = omb1_b.to(tl.int64).to(tl.float64, bitcast=True)
        b2 = b2_b.to(tl.int64).to(tl.float64, bitcast=True)
        omb2 = omb2_b.to(tl.int64).to(tl.float64, bitcast=True)
        eps = eps_b.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        cdt = tl.float32
        lr = lr_b.to(tl.int32).to(tl.float32, bitcast=True)
        b1 = b1_b.to(tl.int32).to(tl.float32, bitcast=True)
        omb1 = omb1_b.to(tl.int32).to(tl.float32, bitcast=True)
        b2 = b2_b.to(tl.int32).to(tl.float32, bitcast=True)
        omb2 = omb2_b.to(tl.int32).to(tl.float32, bitcast=True)
        eps = eps_b.to(tl.int32).to(tl.float32, bitcast=True)
    # this edit's row of this tensor: typed pointers from the table's addresses (int64 -> ptr)
    base = e * row
    p_ptr = tl.load(rec + 0).to(tl.pointer_type(DT)) + base
    g_ptr = tl.load(rec + 1).to(tl.pointer_type(DT)) + base

    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if HAS_ACTIVE:  # inactive edit: an empty row, nothing loaded, nothing stored
        row_e = tl.where(tl.load(a_ptr + e) != 0, row, 0)
    else:
        row_e = row
    sel = offs < row_e
    if HAS_MASK:
        m_ptr = tl.load(rec + 4).to(tl.pointer_type(tl.uint8)) + e * tl.load(rec + 6)
        sel = sel & (tl.load(m_ptr + offs, mask=sel, other=0) != 0)
    p_raw = tl.load(p_ptr + offs, mask=sel, other=0.0)
    p = p_raw.to(cdt)
    g = tl.load(g_ptr + offs, mask=sel, other=0.0).to(cdt)
    t_new = tl.load(t_ptr + e) + 1.0

    if RULE == _GD:
        d = lr * g
    elif RULE == _SCALED:  # lr * g * inv_norm
        d = (lr * g) * tl.load(inv_ptr + e)
    elif RULE == _SIGN:  # torch.sign gives +0 for +-0 and NaN
        sign = tl.where(g > 0, 1.0, 0.0).to(cdt) - tl.where(g < 0, 1.0, 0.0).to(cdt)
        d = lr * sign
    elif RULE == _RMSPROP:
        s1_ptr = tl.load(rec + 2).to(tl.pointer_type(cdt)) + base
        s = tl.load(s1_ptr + offs, mask=sel, other=0.0)
        g2 = g * g
        s = tl.where(t_new == 1.0, g2, b1 * s + omb1 * g2)
        tl.store(s1_ptr + offs, s, mask=sel)
        d = _div(lr * g, _sqrt(s + eps, FP64), FP64)
    elif RULE == _MOMENTUM:
        s1_ptr = tl.load(rec + 2).to(tl.pointer_type(cdt)) + base
        v = tl.load(s1_ptr + offs, mask=sel, other=0.0)
        v = lr * g + b1 * v
        tl.store(s1_ptr + offs, v, mask=sel)
        d = v
    else:  # _ADAM
        s1_ptr = tl.load(rec + 2).to(tl.pointer_type(cdt)) + base
        s2_ptr = tl.load(rec + 3).to(tl.pointer_type(cdt)) + base
        m = tl.load(s1_ptr + offs, mask=sel, other=0.0)
        v = tl.load(s2_ptr + offs, mask=sel, other=0.0)
        m = b1 * m + omb1 * g
        v = b2 * v + (omb2 * g) * g
        tl.store(s1_ptr + offs, m, mask=sel)
        tl.store(s2_ptr + offs, v, mask=sel)
        m_hat = _div(m, tl.load(bc1_ptr + e), FP64)
        v_hat = _div(v, tl.load(bc2_ptr + e), FP64)
        root = tl.where(v_hat > 0, _sqrt(tl.where(v_hat > 0, v_hat, 1.0), FP64), 0.0)
        d = _div(lr * m_hat, root + eps, FP64)
    tl.store(p_ptr + offs, (p - d).to(p_raw.dtype), mask=sel)


def _bits(value: float, fp64: bool) -> int:
    """The bit pattern of ``value`` rounded to float64/float32, as a signed integer."""
    if fp64:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return struct.unpack("<i", struct.pack("<f", value))[0]


# (device, table words) -> device table; small LRU (a training loop steps the same lists again)
_TABLES: OrderedDict = OrderedDict()
_TABLES_MAX = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _table(words: tuple, device: torch.device) -> torch.Tensor:
    """The int64 table holding ``words`` on ``device``, cached: its content is a pure function of
    the key, so a hit is always right; it is never written after creation."""
    key = (str(device), words)
    tab = _TABLES.get(key)
    if tab is not None:
        _TABLES.move_to_end(key)
        return tab
    host = torch.tensor(words, dtype=torch.int64)
    if device.type == "cpu":
        tab = host
    else:  # pinned + non_blocking: no host synchronisation (the caching host allocator keeps the
        # pinned block alive until the copy has run)
        tab = host.pin_memory().to(device, non_blocking=True)
    _TABLES[key] = tab
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return tab


def _groups(params, grads, slot1, slot2, masks, edits: int, batched: bool):
    """``{param dtype: (table words, total blocks per edit, number of tensors)}``; empty rows skipped."""
    rows: dict = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        row = p.numel() // edits if edits else 0
        if row == 0:
            continue
        pa = p.data_ptr()
        ma, mstride = pa, 0
        if masks:
            m = masks[i]
            ma = m.data_ptr()
            mstride = row if (batched and m.shape == p.shape) else 0
        rows.setdefault(p.dtype, []).append(
            [pa, g.data_ptr(), slot1[i].data_ptr() if slot1 else pa, slot2[i].data_ptr() if slot2 else pa,
             ma, row, mstride, 0])
    out = {}
    for dtype, recs in rows.items():
        first = 0
        for r in recs:
            r[_FIRST] = first
            first += triton.cdiv(r[_ROW], _BLOCK)
        n = len(recs)
        log_t = (n - 1).bit_length()  # ceil(log2(n)); 0 for one tensor
        recs += [[0] * (_NCOL - 1) + [_INT64_MAX]] * ((1 << log_t) - n)
        out[dtype] = (tuple(w for r in recs for w in r), first, log_t)
    return out


def editor_step_triton(params, grads, slot1, slot2, t, active, inv_norm, masks, rule: int, lr: float,
                       beta1: float, beta2: float, eps: float, batched: bool) -> None:
    """Same arguments as ``torch.ops.fastedit.editor_step_`` (inputs already checked by
    ``fastedit.ops.editor_step``): updates params, slots and t in place, with one kernel launch
    per parameter dtype present."""
    device = t.device
    if _interpreting() and device.type != "cpu":
        # the interpreter copies kernel *arguments* to the host; memory reached through the
        # table's raw device addresses would not be
        raise ValueError(f"TRITON_INTERPRET=1 runs the Triton editor step on CPU tensors only, got {device}")
    fp64 = t.dtype == torch.float64
    edits = t.shape[0] if batched else 1
    hyper = [_bits(v, fp64) for v in (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps)]
    t_new = t + 1
    if rule == _ADAM.value:  # the reference's expression, per edit, on the device
        bc1, bc2 = 1 - beta1 ** t_new, 1 - beta2 ** t_new
    else:
        bc1 = bc2 = t
    a = active.view(torch.uint8) if active is not None else t
    inv = inv_norm if inv_norm is not None else t
    for dtype, (words, total, log_t) in _groups(params, grads, slot1, slot2, masks, edits, batched).items():
        if edits * total > 2**31 - 1:  # CUDA's grid.x limit (not split here: ~2e12 elements)
            raise ValueError(f"editor_step_ (Triton): {edits} edits x {total} blocks exceed one launch's grid")
        tab = _table(words, device)
        _editor_step_kernel[(edits * total,)](
            tab, t, a, inv, bc1, bc2, total, *hyper,
            RULE=rule, HAS_ACTIVE=active is not None, HAS_MASK=bool(masks), FP64=fp64,
            DT=_TL_DTYPE[dtype], LOG_T=log_t, BLOCK=_BLOCK, enable_fp_fusion=False)
    # the step count advances last (the launches above read it): t <- t + active
    if active is None:
        t.add_(1)
    else:
        t.add_(active.to(t.dtype))
