"""Triton kernel of ``editor_step_`` (the fused, in-place editor step; contract in
``fastedit/kernels/editor_step.py``, math in ``csrc/editor_step_math.h``).

One launch per parameter tensor (grid: edits × blocks of the tensor's per-edit row; a layer's ~15
tensors make ~15 launches), int64 offsets, masked ragged tails. Hyper-parameters travel as the bit
patterns of their values rounded to the compute dtype (int args, bit-cast in the kernel): Triton
would otherwise round a Python float to float32, which is wrong for float64 parameters. Adam's
bias corrections ``1 - beta ** t`` are computed per edit with torch, by the reference's own
expression, on the device (no host synchronisation). FMA contraction is switched off
(``enable_fp_fusion=False``) and division/sqrt are the correctly rounded ``div_rn``/``sqrt_rn``,
as in the reference. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (slowly: tests only).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

__all__ = ["editor_step_triton"]

_BLOCK = 1024

_GD, _SCALED, _SIGN, _RMSPROP, _MOMENTUM, _ADAM = range(6)


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


@triton.jit(do_not_specialize=["lr_b", "b1_b", "omb1_b", "b2_b", "omb2_b", "eps_b", "row", "mask_stride"])
def _editor_step_kernel(p_ptr, g_ptr, s1_ptr, s2_ptr, m_ptr, t_ptr, a_ptr, inv_ptr, bc1_ptr, bc2_ptr,
                        row, nblocks, mask_stride, lr_b, b1_b, omb1_b, b2_b, omb2_b, eps_b,
                        RULE: tl.constexpr, HAS_ACTIVE: tl.constexpr, HAS_MASK: tl.constexpr,
                        FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    e = pid // nblocks
    blk = pid - e * nblocks
    if FP64:
        lr = lr_b.to(tl.int64).to(tl.float64, bitcast=True)
        b1 = b1_b.to(tl.int64).to(tl.float64, bitcast=True)
        omb1 = omb1_b.to(tl.int64).to(tl.float64, bitcast=True)
        b2 = b2_b.to(tl.int64).to(tl.float64, bitcast=True)
        omb2 = omb2_b.to(tl.int64).to(tl.float64, bitcast=True)
        eps = eps_b.to(tl.int64).to(tl.float64, bitcast=True)
        cdt = tl.float64
    else:
        lr = lr_b.to(tl.int32).to(tl.float32, bitcast=True)
        b1 = b1_b.to(tl.int32).to(tl.float32, bitcast=True)
        omb1 = omb1_b.to(tl.int32).to(tl.float32, bitcast=True)
        b2 = b2_b.to(tl.int32).to(tl.float32, bitcast=True)
        omb2 = omb2_b.to(tl.int32).to(tl.float32, bitcast=True)
        eps = eps_b.to(tl.int32).to(tl.float32, bitcast=True)
        cdt = tl.float32

    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if HAS_ACTIVE:  # inactive edit: an empty row, nothing loaded, nothing stored
        row_e = tl.where(tl.load(a_ptr + e) != 0, row, 0)
    else:
        row_e = row
    sel = offs < row_e
    if HAS_MASK:
        sel = sel & (tl.load(m_ptr + e * mask_stride + offs, mask=sel, other=0) != 0)
    base = e * row
    p_raw = tl.load(p_ptr + base + offs, mask=sel, other=0.0)
    p = p_raw.to(cdt)
    g = tl.load(g_ptr + base + offs, mask=sel, other=0.0).to(cdt)
    t_new = tl.load(t_ptr + e) + 1.0

    if RULE == 0:  # GD
        d = lr * g
    elif RULE == 1:  # Scaled GD: lr * g * inv_norm
        d = (lr * g) * tl.load(inv_ptr + e)
    elif RULE == 2:  # sign: torch.sign gives +0 for +-0 and NaN
        sign = tl.where(g > 0, 1.0, 0.0).to(cdt) - tl.where(g < 0, 1.0, 0.0).to(cdt)
        d = lr * sign
    elif RULE == 3:  # RMSProp
        s = tl.load(s1_ptr + base + offs, mask=sel, other=0.0)
        g2 = g * g
        s = tl.where(t_new == 1.0, g2, b1 * s + omb1 * g2)
        tl.store(s1_ptr + base + offs, s, mask=sel)
        d = _div(lr * g, _sqrt(s + eps, FP64), FP64)
    elif RULE == 4:  # Momentum
        v = tl.load(s1_ptr + base + offs, mask=sel, other=0.0)
        v = lr * g + b1 * v
        tl.store(s1_ptr + base + offs, v, mask=sel)
        d = v
    else:  # Adam
        m = tl.load(s1_ptr + base + offs, mask=sel, other=0.0)
        v = tl.load(s2_ptr + base + offs, mask=sel, other=0.0)
        m = b1 * m + omb1 * g
        v = b2 * v + (omb2 * g) * g
        tl.store(s1_ptr + base + offs, m, mask=sel)
        tl.store(s2_ptr + base + offs, v, mask=sel)
        m_hat = _div(m, tl.load(bc1_ptr + e), FP64)
        v_hat = _div(v, tl.load(bc2_ptr + e), FP64)
        root = tl.where(v_hat > 0, _sqrt(tl.where(v_hat > 0, v_hat, 1.0), FP64), 0.0)
        d = _div(lr * m_hat, root + eps, FP64)
    tl.store(p_ptr + base + offs, (p - d).to(p_raw.dtype), mask=sel)


def _bits(value: float, fp64: bool) -> int:
    """The bit pattern of ``value`` rounded to float64/float32, as a signed integer."""
    if fp64:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return struct.unpack("<i", struct.pack("<f", value))[0]


def editor_step_triton(params, grads, slot1, slot2, t, active, inv_norm, masks, rule: int, lr: float,
                       beta1: float, beta2: float, eps: float, batched: bool) -> None:
    """Same arguments as ``torch.ops.fastedit.editor_step_`` (inputs already checked by
    ``fastedit.kernels.editor_step``): updates params, slots and t in place."""
    fp64 = t.dtype == torch.float64
    edits = t.shape[0] if batched else 1
    hyper = [_bits(v, fp64) for v in (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps)]
    t_new = t + 1
    if rule == _ADAM:  # the reference's expression, per edit, on the device
        bc1, bc2 = 1 - beta1 ** t_new, 1 - beta2 ** t_new
    else:
        bc1 = bc2 = t
    for i, (p, g) in enumerate(zip(params, grads)):
        row = p.numel() // edits if edits else 0
        if row == 0:
            continue
        nblocks = triton.cdiv(row, _BLOCK)
        m = masks[i] if masks else p
        mask_stride = row if (masks and batched and m.shape == p.shape) else 0
        s1 = slot1[i] if slot1 else p
        s2 = slot2[i] if slot2 else p
        _editor_step_kernel[(edits * nblocks,)](
            p, g, s1, s2, m.view(torch.uint8) if masks else m, t,
            active.view(torch.uint8) if active is not None else t, inv_norm if inv_norm is not None else t,
            bc1, bc2, row, nblocks, mask_stride, *hyper,
            RULE=rule, HAS_ACTIVE=active is not None, HAS_MASK=bool(masks), FP64=fp64, BLOCK=_BLOCK,
            enable_fp_fusion=False)
    # the step count advances last (the launches above read it): t <- t + active
    if active is None:
        t.add_(1)
    else:
        t.add_(active.to(t.dtype))
