"""Triton kernel of ``edit_metrics`` (contract: :func:`fastedit.ops.edit_metrics.edit_metrics`).

One program per block of ``BLOCK_R`` rows of the flattened ``[E * N]`` edited rows; the classes are
walked in ``BLOCK_C`` chunks with an online log-sum-exp for the ref and the edited row at once:

    t = sum_c exp(zr_c - Mr) ((zr_c - Mr) - (ze_c - Me)),   KL = t / sr + log se - log sr

(sr, se: sums of exp(z - M); when a chunk raises the maxima by dr, de the sums are rescaled by
exp(-d) and t becomes exp(-dr) (t + (de - dr) sr)), the same arithmetic as the C++ CPU kernel.
Argmax like torch.argmax (first maximal index, the first NaN if any). The per-row predictions and
KL go to ``[E, N]`` buffers; the per-edit counts and the mean (in float64, a fixed-order torch
reduction: deterministic) are a few small torch ops on those.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BIG = 2147483647  # "no index yet"; C < 2^31 is checked


@triton.jit
def _edit_metrics_rows_kernel(ref_ptr, ed_ptr, pred_ptr, pred_ref_ptr, kl_ptr, R, N, C,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC_F64: tl.constexpr):
    acc_t = tl.float64 if ACC_F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    n = rows % N
    ref_base = ref_ptr + n * C
    ed_base = ed_ptr + rows * C

    ninf = float("-inf")
    m_r = tl.full([BLOCK_R], ninf, acc_t)
    m_e = tl.full([BLOCK_R], ninf, acc_t)
    s_r = tl.zeros([BLOCK_R], acc_t)
    s_e = tl.zeros([BLOCK_R], acc_t)
    t = tl.zeros([BLOCK_R], acc_t)
    poison = tl.zeros([BLOCK_R], acc_t)
    best_r = tl.full([BLOCK_R], ninf, acc_t)
    best_e = tl.full([BLOCK_R], ninf, acc_t)
    idx_r = tl.full([BLOCK_R], _BIG, tl.int32)
    idx_e = tl.full([BLOCK_R], _BIG, tl.int32)
    nan_r = tl.zeros([BLOCK_R], tl.int1)
    nan_e = tl.zeros([BLOCK_R], tl.int1)

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        zr = tl.load(ref_base[:, None] + cols[None, :], mask=mask, other=ninf).to(acc_t)
        ze = tl.load(ed_base[:, None] + cols[None, :], mask=mask, other=ninf).to(acc_t)
        colsi = cols.to(tl.int32)[None, :]

        # argmax, torch's rule: a NaN wins (the first one), else the first maximal index; chunks
        # come in column order, so a later chunk wins only when strictly greater
        isnan_r = (zr != zr) & mask
        first_nan_r = tl.min(tl.where(isnan_r, colsi, _BIG), axis=1)
        zr_num = tl.where(mask & (zr == zr), zr, ninf)
        cmax_r = tl.max(zr_num, axis=1)
        first_max_r = tl.min(tl.where(mask & (zr_num == cmax_r[:, None]), colsi, _BIG), axis=1)
        take_nan_r = (~nan_r) & (first_nan_r != _BIG)
        take_max_r = (~nan_r) & (first_nan_r == _BIG) & (first_max_r != _BIG) & ((idx_r == _BIG) | (cmax_r > best_r))
        idx_r = tl.where(take_nan_r, first_nan_r, tl.where(take_max_r, first_max_r, idx_r))
        best_r = tl.where(take_max_r, cmax_r, best_r)
        nan_r = nan_r | take_nan_r

        isnan_e = (ze != ze) & mask
        first_nan_e = tl.min(tl.where(isnan_e, colsi, _BIG), axis=1)
        ze_num = tl.where(mask & (ze == ze), ze, ninf)
        cmax_e = tl.max(ze_num, axis=1)
        first_max_e = tl.min(tl.where(mask & (ze_num == cmax_e[:, None]), colsi, _BIG), axis=1)
        take_nan_e = (~nan_e) & (first_nan_e != _BIG)
        take_max_e = (~nan_e) & (first_nan_e == _BIG) & (first_max_e != _BIG) & ((idx_e == _BIG) | (cmax_e > best_e))
        idx_e = tl.where(take_nan_e, first_nan_e, tl.where(take_max_e, first_max_e, idx_e))
        best_e = tl.where(take_max_e, cmax_e, best_e)
        nan_e = nan_e | take_nan_e

        # a non-finite logit poisons the row's KL (z - z is 0 for finite z, NaN otherwise)
        poison += tl.sum(tl.where(mask, (zr - zr) + (ze - ze), 0.0), axis=1)

        # online log-sum-exp of both rows and the KL accumulator (NaN-free maxima: NaN rows are
        # poisoned anyway)
        new_m_r = tl.maximum(m_r, cmax_r)
        new_m_e = tl.maximum(m_e, cmax_e)
        d_mr = new_m_r - m_r
        d_me = new_m_e - m_e
        alpha_r = tl.exp(m_r - new_m_r)  # 0 on the first chunk (m = -inf)
        alpha_e = tl.exp(m_e - new_m_e)
        shift = tl.where(s_r > 0, (d_me - d_mr) * s_r, 0.0)  # s_r = 0 on the first chunk
        t = alpha_r * (t + shift)
        s_r = s_r * alpha_r
        s_e = s_e * alpha_e
        m_r = new_m_r
        m_e = new_m_e
        dr = zr - m_r[:, None]
        de = ze - m_e[:, None]
        wr = tl.where(mask, tl.exp(dr), 0.0)
        s_r += tl.sum(wr, axis=1)
        s_e += tl.sum(tl.where(mask, tl.exp(de), 0.0), axis=1)
        t += tl.sum(tl.where(mask, wr * (dr - de), 0.0), axis=1)

    kl = t / s_r + (tl.log(s_e) - tl.log(s_r))
    kl = tl.where(poison == 0, kl, float("nan"))
    tl.store(pred_ptr + rows, idx_e, mask=row_ok)
    tl.store(kl_ptr + rows, kl.to(tl.float32), mask=row_ok)
    tl.store(pred_ref_ptr + rows, idx_r, mask=row_ok & (rows < N))  # the rows of edit 0


def _blocks(C: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(C), 128)
    block_r = max(1, min(64, 2048 // block_c))
    return block_r, block_c


def edit_metrics_triton(ref_logits: torch.Tensor, labels: torch.Tensor, edited_logits: torch.Tensor,
                        return_kl_rows: bool = False) -> tuple[torch.Tensor, ...]:
    """The 7 outputs of the op, ``(errors, flips, correct_to_wrong, wrong_to_correct, kl,
    errors_per_class, kl_rows)``; ``kl_rows`` is ``[E, 0]`` unless ``return_kl_rows``.

    Inputs are assumed validated (:func:`fastedit.ops.edit_metrics.edit_metrics` does it, label range
    included). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    ref = ref_logits.contiguous()
    edited = edited_logits.contiguous()
    E, N, C = edited.shape
    if C >= _BIG:
        raise ValueError(f"fastedit.edit_metrics (Triton): at most 2^31 - 2 classes, got {C}")
    device = ref.device
    pred = torch.empty(E, N, dtype=torch.int32, device=device)
    pred_ref = torch.empty(N, dtype=torch.int32, device=device)
    kl_rows = torch.empty(E, N, dtype=torch.float32, device=device)
    R = E * N
    if R > 0:
        block_r, block_c = _blocks(C)
        grid = (triton.cdiv(R, block_r),)
        _edit_metrics_rows_kernel[grid](ref, edited, pred, pred_ref, kl_rows, R, N, C,
                                        BLOCK_R=block_r, BLOCK_C=block_c,
                                        ACC_F64=ref.dtype == torch.float64)
    elif N > 0:  # E = 0: no edited rows, nothing to count
        pred_ref.zero_()
    pred = pred.long()
    pred_ref = pred_ref.long()
    wrong = pred != labels
    was_right = pred_ref == labels
    errors = wrong.sum(1)
    flips = (pred != pred_ref).sum(1)
    c2w = (wrong & was_right).sum(1)
    w2c = (~wrong & ~was_right).sum(1)
    per_class = torch.zeros(E, C, dtype=torch.int64, device=device)
    per_class.scatter_add_(1, labels.expand(E, N), wrong.long())
    kl = (kl_rows.double().sum(1) / N).float() if N > 0 else torch.full((E,), float("nan"), device=device)
    if not return_kl_rows:
        kl_rows = kl_rows.new_empty(E, 0)
    return errors, flips, c2w, w2c, kl, per_class, kl_rows
