"""Plain-PyTorch references of the packed ternary matmul kernels (``triton.py`` beside this file).

``weight`` is a :class:`~trueternary.weight.TernaryScaleTensor`: ``W[r, c] = T[r, c] * 2**E[r, c // group_size]``.

    forward           y  = x  @ W.T      x: (M, cols)  -> (M, rows)
    backward-input    gx = gy @ W        gy: (M, rows) -> (M, cols)        (``transposed=True``)

fp8 variant (what the fp8 kernel computes, evaluated in float32):

    x_q[m, :] = clamp(x[m, :] / a[m], +-448) in e4m3,   a[m] = max|x[m, :]| / 448  (1 where the row is 0)
    W_q = T * 2**(E - E_ref)  with E_ref the largest E sharing an output element (the row of W forward,
          the group column of W backward); groups more than 2**9 below E_ref underflow to 0 (e4m3's
          smallest subnormal is 2**-9); every other value is exact in e4m3 because T is ternary.
    out[m, o] = a[m] * 2**E_ref[o] * sum_k x_q[m, k] * W_q[o, k]        (fp32 accumulation)
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_EXP = -9  # 2**-9 is e4m3's smallest subnormal: every 2**k with -9 <= k <= 8 is exact


def ternary_matmul_naive(x: torch.Tensor, weight, transposed: bool = False) -> torch.Tensor:
    """``x @ W.T`` (``transposed=False``) or ``x @ W`` in x's dtype: the dense-fallback path (unpack + matmul)."""
    W = weight.dense(x.dtype)
    return x @ (W if transposed else W.t())


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) e4m3 quantisation of a 2-D ``x``: ``(x_q, a)`` with ``x ~= x_q * a[:, None]``.

    Shared by the fp8 kernel's launcher and this reference (the quantisation is two PyTorch passes over
    ``x``; the kernel then reads the 1-byte ``x_q``).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    a = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x_q = (xf / a[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x_q, a


def fp8_reference_exponent(E: torch.Tensor, transposed: bool) -> torch.Tensor:
    """E_ref (int32): the largest E of each weight row (forward) or of each group column (backward-input)."""
    return (E.amax(dim=0) if transposed else E.amax(dim=1)).to(torch.int32)


def fp8_weight_naive(weight, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q, E_ref)``: W_q (rows, cols) float32 holds the exact values the fp8 kernel multiplies."""
    E_ref = fp8_reference_exponent(weight.E, transposed)
    rel = weight.E.to(torch.int32) - (E_ref[None, :] if transposed else E_ref[:, None])
    rel = weight.expand_groups(rel)
    Wq = weight.trits().float() * torch.exp2(rel.float())
    return torch.where(rel >= FP8_MIN_EXP, Wq, torch.zeros_like(Wq)), E_ref


def ternary_matmul_fp8_naive(x: torch.Tensor, weight, transposed: bool = False) -> torch.Tensor:
    """What the fp8 kernel computes (per-token activation scale, per-output exponent), in x's dtype."""
    x_q, a = quantize_rows_fp8(x)
    Wq, E_ref = fp8_weight_naive(weight, transposed)
    acc = x_q.float() @ (Wq if transposed else Wq.t())
    out_scale = torch.exp2(E_ref.float())
    if transposed:  # output column c belongs to group c // group_size
        out_scale = out_scale.repeat_interleave(weight.group_size)[: weight.cols]
    return (acc * a[:, None] * out_scale[None, :]).to(x.dtype)
