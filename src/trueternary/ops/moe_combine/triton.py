"""Triton MoE combine ``out[t] = sum_j w[t, j] * Y[pos[t, j]]`` and its fused backward.

    forward   one program per (token, column block): k gathers of Y rows, weighted, summed in j order
    backward  one program per (token, choice): streams over D once, writing grad_Y[pos] = w * g and
              accumulating grad_w = <g, Y[pos]>; each output element has exactly one writer
              (``pos`` is injective), so the result is deterministic with no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D_MAX = 256


# Only core builtins (tl.full, tl.reduce, ...) and jit functions of this module are used inside the
# kernels: triton.language's own @jit helpers (tl.zeros, tl.sum) are decorated when triton is first
# imported, so under TRITON_INTERPRET=1 they break if anything imported triton before the flag was set.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _combine_fwd_kernel(y_ptr, w_ptr, pos_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for j in range(K):
        p = tl.load(pos_ptr + t * K + j).to(tl.int64)
        wv = tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += wv * tl.load(y_ptr + p * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(g_ptr, y_ptr, w_ptr, pos_ptr, gy_ptr, gw_ptr, D, K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    tj = tl.program_id(0).to(tl.int64)  # flat (token, choice)
    t = tj // K
    p = tl.load(pos_ptr + tj).to(tl.int64)
    wv = tl.load(w_ptr + tj).to(tl.float32)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        gv = tl.load(g_ptr + t * D + cols, mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + p * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(gy_ptr + p * D + cols, (wv * gv).to(gy_ptr.dtype.element_ty), mask=mask)
        acc += gv * yv
    tl.store(gw_ptr + tj, tl.reduce(acc, 0, _add).to(gw_ptr.dtype.element_ty))


def moe_combine_forward(Y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    assert Y.dim() == 2 and w.shape == pos.shape and Y.device == w.device == pos.device
    N, K = w.shape
    D = Y.shape[1]
    out = torch.empty(N, D, dtype=torch.promote_types(Y.dtype, w.dtype), device=Y.device)
    if N == 0 or K == 0:
        return out.zero_()
    BLOCK_D = min(BLOCK_D_MAX, triton.next_power_of_2(D))
    _combine_fwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
        Y.contiguous(), w.contiguous(), pos.contiguous().to(torch.int64), out, D, K=K, BLOCK_D=BLOCK_D
    )
    return out


def moe_combine_backward(g: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor):
    N, K = w.shape
    M, D = Y.shape
    # Rows of Y that no (token, choice) points at get no gradient: start from zeros.
    gy = torch.zeros(M, D, dtype=Y.dtype, device=Y.device)
    gw = torch.empty(N, K, dtype=w.dtype, device=w.device)
    if N == 0 or K == 0:
        return gy, gw
    BLOCK_D = min(BLOCK_D_MAX, triton.next_power_of_2(D))
    _combine_bwd_kernel[(N * K,)](
        g.contiguous(), Y.contiguous(), w.contiguous(), pos.contiguous().to(torch.int64), gy, gw, D,
        K=K, BLOCK_D=BLOCK_D,
    )
    return gy, gw


class MoECombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Y, w, pos):
        ctx.save_for_backward(Y, w, pos)
        return moe_combine_forward(Y, w, pos)

    @staticmethod
    def backward(ctx, g):
        Y, w, pos = ctx.saved_tensors
        gy, gw = moe_combine_backward(g, Y, w, pos)
        return (gy if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None


def moe_combine_triton(Y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return MoECombineFunction.apply(Y, w, pos)
