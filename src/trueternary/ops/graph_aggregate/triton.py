"""Triton kernels of the multi-head weighted graph aggregation and its backward.

    forward   out[n]    = sum_{j in CSR-by-dst segment n} w[eid_j, head] * x[nbr_j]      nbr = src, eid = j
    grad x    gx[n]     = the same kernel on the reversed graph:  nbr = dst[rev_perm], eid = rev_perm
    grad w    gw[e, h]  = < gout[dst_e, head h], x[src_e, head h] >                      one program per (e, h)

Every output element is written by exactly one program that sums in a fixed order: deterministic,
no atomics. Arithmetic in float32; outputs stored in ``promote(x, w)`` (gradients in the inputs' dtypes).
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
def _csr_aggregate_kernel(x_ptr, w_ptr, indptr_ptr, nbr_ptr, eid_ptr, out_ptr, D, H, DH,
                          BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    head = cols // DH
    start = tl.load(indptr_ptr + n)
    end = tl.load(indptr_ptr + n + 1)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for j in range(start, end):
        s = tl.load(nbr_ptr + j)
        e = tl.load(eid_ptr + j)
        wv = tl.load(w_ptr + e * H + head, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + s * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc += wv * xv
    tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _edge_grad_kernel(g_ptr, x_ptr, src_ptr, dst_ptr, gw_ptr, D, H, DH, BLOCK_DH: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.load(src_ptr + e)
    d = tl.load(dst_ptr + e)
    acc = tl.full([BLOCK_DH], 0.0, tl.float32)
    for c0 in range(0, DH, BLOCK_DH):
        offs = c0 + tl.arange(0, BLOCK_DH)
        mask = offs < DH
        cols = h * DH + offs
        gv = tl.load(g_ptr + d * D + cols, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + s * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc += gv * xv
    tl.store(gw_ptr + e * H + h, tl.reduce(acc, 0, _add).to(gw_ptr.dtype.element_ty))


def _aggregate(x, w, indptr, nbr, eid, out_dtype):
    N, D = x.shape
    H = w.shape[1]
    out = torch.empty(N, D, dtype=out_dtype, device=x.device)
    if N == 0:
        return out
    BLOCK_D = min(BLOCK_D_MAX, triton.next_power_of_2(D))
    _csr_aggregate_kernel[(N, triton.cdiv(D, BLOCK_D))](
        x.contiguous(), w.contiguous(), indptr, nbr, eid, out, D, H, D // H, BLOCK_D=BLOCK_D
    )
    return out


def graph_aggregate_forward(x: torch.Tensor, w: torch.Tensor, graph) -> torch.Tensor:
    assert x.shape[0] == graph.num_nodes and w.shape[0] == graph.num_edges and x.shape[1] % w.shape[1] == 0
    eid = torch.arange(graph.num_edges, dtype=torch.int64, device=x.device)
    return _aggregate(x, w, graph.indptr, graph.src, eid, torch.promote_types(x.dtype, w.dtype))


def graph_aggregate_backward(g, x, w, graph, need_x: bool, need_w: bool):
    gx = gw = None
    g = g.contiguous()
    if need_x:
        nbr = graph.dst[graph.rev_perm].contiguous()
        gx = _aggregate(g, w, graph.rev_indptr, nbr, graph.rev_perm, x.dtype)
    if need_w:
        E, H = w.shape
        D = x.shape[1]
        gw = torch.empty(E, H, dtype=w.dtype, device=w.device)
        if E:
            DH = D // H
            BLOCK_DH = min(BLOCK_D_MAX, triton.next_power_of_2(DH))
            _edge_grad_kernel[(E, H)](g, x.contiguous(), graph.src, graph.dst, gw, D, H, DH, BLOCK_DH=BLOCK_DH)
    return gx, gw


class GraphAggregateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, graph):
        ctx.save_for_backward(x, w)
        ctx.graph = graph
        return graph_aggregate_forward(x, w, graph)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx, gw = graph_aggregate_backward(g, x, w, ctx.graph, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None


def graph_aggregate_triton(x: torch.Tensor, w: torch.Tensor, graph) -> torch.Tensor:
    return GraphAggregateFunction.apply(x, w, graph)
