"""Autograd function of the ternary embedding lookup ``out[i] = T[idx[i]] * 2**E[idx[i]]``.

This file owns the lookup (forward) and the hand-over of the embedding's weight gradient to the voter
(backward). Only the rows a batch asks for are decoded from the packed bytes in forward. In backward the
gradient is summed per row and handed to the voter as a row update in which only the touched rows vote:
the rows the batch did not touch (and the padding row) receive no votes and keep their state.

Backward has static shapes and reads no tensor on the host, so a CUDA graph can capture a whole training
step (forward, backward, ``FlipOptimizer.step()``). Instead of compacting the touched rows with
``torch.unique`` (a host sync and a data-dependent shape) it orders all V rows, touched ones first:

    touched[r] = r occurs in the batch and r != padding_idx        bool (V,)
    order      = stable argsort(~touched)   touched rows ascending, then the untouched ones ascending
    n          = sum(touched)               0-dim device tensor, never read on the host
    g          = (sum of the batch's gradient rows per row)[order]  (V, cols), zero from row n on

and the voter normalises over the first ``n`` rows and votes on them only (``FlipOptimizer.cast_votes``'s
``n_rows``): the same votes as on the n x cols matrix of the touched rows, at the cost of V rows of work.
"""

from __future__ import annotations

import torch

from .. import packing
from .linear import _ANCHOR, scale_param_grad


def row_trits(weight, rows: torch.Tensor) -> torch.Tensor:
    """Trits of the given rows (n, cols) as int8, decoded straight from ``T_packed``."""
    cols = weight.cols
    flat = rows.reshape(-1, 1).to(torch.int64) * cols + torch.arange(cols, device=rows.device)
    return packing.gather_trits(weight.T_packed, flat)


class TernaryEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, anchor, log2_scale, weight, out_dtype, padding_idx):
        flat = idx.reshape(-1)
        T = row_trits(weight, flat)
        scale = weight.expand_groups(torch.exp2(weight.log2_scales()[flat].float()))
        out = (T.float() * scale).to(out_dtype)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        ctx.has_log2 = log2_scale is not None
        ctx.save_for_backward(flat, log2_scale if log2_scale is not None else torch.empty(0))
        return out.view(*idx.shape, weight.cols)

    @staticmethod
    def backward(ctx, gy):
        flat, log2_scale = ctx.saved_tensors
        weight = ctx.weight
        voter = weight._voter
        want_ls = ctx.has_log2 and ctx.needs_input_grad[2]
        g_ls = None
        if voter is None and not want_ls:
            return None, None, None, None, None, None
        # Static shapes, no host sync (module docstring): all V rows, the n touched ones first.
        flat = flat.to(torch.int64)
        # (device fills, not ``t[i] = value``, whose value would be copied from the host: not capturable)
        touched = torch.zeros(weight.rows, dtype=torch.bool, device=gy.device).index_fill_(0, flat, True)
        g_full = torch.zeros(weight.rows, weight.cols, dtype=torch.float32, device=gy.device)
        # g_full[r] = sum of gy[i] over idx[i] == r, in a fixed order: index_add_ adds with float atomics on CUDA,
        # in an order that changes from run to run (a resumed run drifted from an uninterrupted one on the H200);
        # index_put_ with accumulate sorts the indices there and adds each row's entries in turn (serially on CPU)
        g_full.index_put_((flat,), gy.reshape(-1, weight.cols).float(), accumulate=True)
        if ctx.padding_idx is not None:  # like nn.Embedding: the padding row never learns
            touched[ctx.padding_idx].fill_(False)
            g_full[ctx.padding_idx].zero_()
        order = torch.argsort((~touched).to(torch.int8), stable=True)  # touched rows first, each part ascending
        n = touched.sum()  # an empty batch or only padding: n = 0, nothing votes
        g = g_full[order]
        T = row_trits(weight, order)
        if want_ls:  # (untouched rows: g = 0, so 0)
            g_ls = torch.zeros_like(log2_scale, dtype=torch.float32)
            g_ls[order] = scale_param_grad(g, T, log2_scale[order], weight.group_size)
        if voter is not None:
            voter.cast_votes(weight, g, T, rows=order, n_rows=n)
        return None, None, g_ls, None, None, None


def ternary_embedding(
    idx: torch.Tensor, weight, out_dtype: torch.dtype = torch.float32, padding_idx: int | None = None
) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"embedding indices must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"embedding indices must be an integer tensor, got {idx.dtype}")
    capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
    if idx.numel() and not capturing:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= weight.rows:
            raise IndexError(f"embedding index out of range [0, {weight.rows}): found {lo if lo < 0 else hi}")
    anchor = _ANCHOR if torch.is_grad_enabled() else None
    return TernaryEmbeddingFunction.apply(idx, anchor, weight.log2_scale, weight, out_dtype, padding_idx)
