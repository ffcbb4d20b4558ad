"""Autograd function of the ternary embedding lookup ``out[i] = T[idx[i]] * 2**E[idx[i]]``.

Only the rows a batch asks for are decoded from the packed bytes. In backward the gradient of the
touched rows is summed per unique row and handed to the voter as a *sparse* row update: rows the
batch did not touch receive no votes and are not read or written.
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
        rows, inverse = torch.unique(flat, return_inverse=True)
        g = torch.zeros(rows.numel(), weight.cols, dtype=torch.float32, device=gy.device)
        g.index_add_(0, inverse, gy.reshape(-1, weight.cols).float())
        if ctx.padding_idx is not None:  # like nn.Embedding: the padding row never learns
            keep = rows != ctx.padding_idx
            rows, g = rows[keep], g[keep]
        if rows.numel() == 0:  # empty batch or only padding: nothing to vote on
            voter = None
        T = row_trits(weight, rows)
        if want_ls:
            g_ls = torch.zeros_like(log2_scale, dtype=torch.float32)
            g_ls[rows] = scale_param_grad(g, T, log2_scale[rows], weight.group_size)
        if voter is not None:
            voter.cast_votes(weight, g, T, rows=rows)
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
