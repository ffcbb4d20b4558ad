"""Triton gather-add ``out[n] = a[n] + table[idx[n]]`` and its backward.

Kernel -> launcher -> autograd.Function (Liger-Kernel's pattern). Layouts: ``a``/``out`` (N, D),
``table`` (R, D), all made contiguous by the launchers; arithmetic in float32, stored in the output
dtype ``promote(a, table)``.

Backward: ``grad_a = grad_out``; ``grad_table[r] = sum_{n: idx[n] = r} grad_out[n]``. The scatter is
done as a *segment sum*: positions are sorted by row once (stable argsort), and program ``(r, block)``
adds its segment in that fixed order, so the result is deterministic (no atomics) and bit-identical
run to run. Work per program is the row's use count, so a very popular row is the critical path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D_MAX = 256


# Only core builtins (tl.full, not tl.zeros) are used inside the kernels: triton.language's own @jit
# helpers are decorated when triton is first imported, so under TRITON_INTERPRET=1 they break if
# anything imported triton before the flag was set.


def _block_d(D: int) -> int:
    return min(BLOCK_D_MAX, triton.next_power_of_2(D))


@triton.jit
def _gather_add_fwd_kernel(a_ptr, table_ptr, idx_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    row = tl.load(idx_ptr + n).to(tl.int64)
    a = tl.load(a_ptr + n * D + cols, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(table_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * D + cols, (a + t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(g_ptr, order_ptr, indptr_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[r] = sum over j in [indptr[r], indptr[r+1]) of g[order[j]] (in that order)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    start = tl.load(indptr_ptr + r)
    end = tl.load(indptr_ptr + r + 1)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for j in range(start, end):
        n = tl.load(order_ptr + j)
        acc += tl.load(g_ptr + n * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_add_forward(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    assert a.dim() == 2 and table.dim() == 2 and a.shape[1] == table.shape[1]
    assert idx.shape == (a.shape[0],) and a.device == table.device == idx.device
    N, D = a.shape
    out = torch.empty(N, D, dtype=torch.promote_types(a.dtype, table.dtype), device=a.device)
    if N == 0:
        return out
    BLOCK_D = _block_d(D)
    _gather_add_fwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
        a.contiguous(), table.contiguous(), idx.contiguous().to(torch.int64), out, D, BLOCK_D=BLOCK_D
    )
    return out


def segment_sum(g: torch.Tensor, idx: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``out[r] = sum_{n: idx[n] = r} g[n]`` deterministically (rows sorted once, no atomics)."""
    N, D = g.shape
    out = torch.empty(n_rows, D, dtype=dtype, device=g.device)
    if n_rows == 0:
        return out
    idx = idx.to(torch.int64)
    order = torch.argsort(idx, stable=True)
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=g.device)
    torch.cumsum(torch.bincount(idx, minlength=n_rows), 0, out=indptr[1:])
    BLOCK_D = _block_d(D)
    _segment_sum_kernel[(n_rows, triton.cdiv(D, BLOCK_D))](g.contiguous(), order, indptr, out, D, BLOCK_D=BLOCK_D)
    return out


class GatherAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, table, idx):
        ctx.save_for_backward(idx)
        ctx.a_dtype, ctx.table_dtype, ctx.n_rows = a.dtype, table.dtype, table.shape[0]
        return gather_add_forward(a, table, idx)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        ga = g.to(ctx.a_dtype) if ctx.needs_input_grad[0] else None
        gt = segment_sum(g, idx, ctx.n_rows, ctx.table_dtype) if ctx.needs_input_grad[1] else None
        return ga, gt, None


def gather_add_triton(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return GatherAddFunction.apply(a, table, idx)
