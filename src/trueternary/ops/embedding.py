"""The ternary embedding lookup ``out[i] = T[idx[i]] * 2**E[idx[i]]``.

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
from .handles import module_of
from .linear import _ANCHOR, scale_param_grad, voting_backward_op


def row_trits(weight, rows: torch.Tensor) -> torch.Tensor:
    """Trits of the given rows (n, cols) as int8, decoded straight from ``T_packed``."""
    cols = weight.cols
    flat = rows.reshape(-1, 1).to(torch.int64) * cols + torch.arange(cols, device=rows.device)
    return packing.gather_trits(weight.T_packed, flat)


def check_indices(idx: torch.Tensor, weight) -> None:
    """IndexError for an index outside [0, rows) (a host read; skipped while a CUDA stream captures a graph)."""
    capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
    if idx.numel() and not capturing:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= weight.rows:
            raise IndexError(f"embedding index out of range [0, {weight.rows}): found {lo if lo < 0 else hi}")


def embedding_forward(idx: torch.Tensor, weight, out_dtype: torch.dtype) -> torch.Tensor:
    """The rows ``idx`` asks for, decoded from the packed trits and scaled: ``(*idx.shape, cols)``."""
    flat = idx.reshape(-1)
    T = row_trits(weight, flat)
    scale = weight.expand_groups(torch.exp2(weight.log2_scales()[flat].float()))
    return (T.float() * scale).to(out_dtype).view(*idx.shape, weight.cols)


def embedding_backward(gy: torch.Tensor, idx: torch.Tensor, log2_scale: torch.Tensor | None, weight,
                       padding_idx: int | None, need_ls: bool) -> torch.Tensor | None:
    """The votes of the rows ``idx`` touched (module docstring); returns the hybrid scale's gradient (or None)."""
    voter = weight._voter
    want_ls = log2_scale is not None and need_ls
    g_ls = None
    if voter is None and not want_ls:
        return None
    # Static shapes, no host sync (module docstring): all V rows, the n touched ones first.
    flat = idx.reshape(-1).to(torch.int64)
    # (device fills, not ``t[i] = value``, whose value would be copied from the host: not capturable)
    touched = torch.zeros(weight.rows, dtype=torch.bool, device=gy.device).index_fill_(0, flat, True)
    g_full = torch.zeros(weight.rows, weight.cols, dtype=torch.float32, device=gy.device)
    # g_full[r] = sum of gy[i] over idx[i] == r, in a fixed order: index_add_ adds with float atomics on CUDA,
    # in an order that changes from run to run (a resumed run drifted from an uninterrupted one on the H200);
    # index_put_ with accumulate sorts the indices there and adds each row's entries in turn (serially on CPU)
    g_full.index_put_((flat,), gy.reshape(-1, weight.cols).float(), accumulate=True)
    if padding_idx is not None:  # like nn.Embedding: the padding row never learns
        touched[padding_idx].fill_(False)
        g_full[padding_idx].zero_()
    order = torch.argsort((~touched).to(torch.int8), stable=True)  # touched rows first, each part ascending
    n = touched.sum()  # an empty batch or only padding: n = 0, nothing votes
    g = g_full[order]
    T = row_trits(weight, order)
    if want_ls:  # (untouched rows: g = 0, so 0)
        g_ls = torch.zeros_like(log2_scale, dtype=torch.float32)
        g_ls[order] = scale_param_grad(g, T, log2_scale[order], weight.group_size)
    if voter is not None:
        voter.cast_votes(weight, g, T, rows=order, n_rows=n)
    return g_ls


class TernaryEmbeddingFunction(torch.autograd.Function):
    """The lookup and its votes in eager code; compiled code runs the same two functions as the
    ``trueternary::embedding`` op."""

    @staticmethod
    def forward(ctx, idx, anchor, log2_scale, weight, out_dtype, padding_idx):
        ctx.weight, ctx.padding_idx = weight, padding_idx
        ctx.has_log2 = log2_scale is not None
        ctx.save_for_backward(idx, log2_scale if log2_scale is not None else torch.empty(0))
        return embedding_forward(idx, weight, out_dtype)

    @staticmethod
    def backward(ctx, gy):
        idx, log2_scale = ctx.saved_tensors
        g_ls = embedding_backward(gy, idx, log2_scale if ctx.has_log2 else None, ctx.weight, ctx.padding_idx,
                                  ctx.needs_input_grad[2])
        return None, None, g_ls, None, None, None


# ------------------------------------------------------------------ the same, as one op for torch.compile
# (why, and the integer handle: ops.linear's op)


@torch.library.custom_op("trueternary::embedding", mutates_args=())
def _embedding_op(idx: torch.Tensor, anchor: torch.Tensor | None, log2_scale: torch.Tensor | None,
                  weight_handle: int, out_dtype: torch.dtype, padding_idx: int | None) -> torch.Tensor:
    weight = module_of(weight_handle)
    check_indices(idx, weight)  # (here, not in compiled code: a host read)
    return embedding_forward(idx, weight, out_dtype)


@_embedding_op.register_fake
def _(idx, anchor, log2_scale, weight_handle, out_dtype, padding_idx):
    return torch.empty(*idx.shape, module_of(weight_handle).cols, dtype=out_dtype, device=idx.device)


@voting_backward_op("embedding_backward")
def _embedding_backward_op(gy: torch.Tensor, idx: torch.Tensor, log2_scale: torch.Tensor | None,
                           weight_handle: int, padding_idx: int | None, need_ls: bool) -> torch.Tensor:
    g_ls = embedding_backward(gy, idx, log2_scale, module_of(weight_handle), padding_idx, need_ls)
    return g_ls if g_ls is not None else gy.new_empty(0)  # (an op returns a tensor: empty for "none")


@_embedding_backward_op.register_fake
def _(gy, idx, log2_scale, weight_handle, padding_idx, need_ls):
    if need_ls and log2_scale is not None:
        return log2_scale.new_empty(log2_scale.shape, dtype=torch.float32)
    return gy.new_empty(0)


def _setup_embedding_op(ctx, inputs, output) -> None:
    idx, _anchor, log2_scale, weight_handle, _out_dtype, padding_idx = inputs
    ctx.save_for_backward(idx, log2_scale)
    ctx.weight_handle, ctx.padding_idx = weight_handle, padding_idx


def _embedding_op_backward(ctx, gy):
    idx, log2_scale = ctx.saved_tensors
    need_ls = ctx.needs_input_grad[2]
    g_ls = torch.ops.trueternary.embedding_backward(gy, idx, log2_scale, ctx.weight_handle, ctx.padding_idx,
                                                    need_ls)
    return None, None, (g_ls if need_ls else None), None, None, None


_embedding_op.register_autograd(_embedding_op_backward, setup_context=_setup_embedding_op)


def ternary_embedding(
    idx: torch.Tensor, weight, out_dtype: torch.dtype = torch.float32, padding_idx: int | None = None
) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"embedding indices must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"embedding indices must be an integer tensor, got {idx.dtype}")
    anchor = _ANCHOR if torch.is_grad_enabled() else None
    if torch.compiler.is_compiling():
        return _embedding_op(idx, anchor, weight.log2_scale, weight.op_handle, out_dtype, padding_idx)
    check_indices(idx, weight)
    return TernaryEmbeddingFunction.apply(idx, anchor, weight.log2_scale, weight, out_dtype, padding_idx)
