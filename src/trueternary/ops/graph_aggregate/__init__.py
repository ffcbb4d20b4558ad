"""Weighted graph aggregation ``out[dst] += w_e * x[src]`` over a CSR graph, multi-head.

Shapes: node features ``x`` (N, D) with D = H * Dh split into ``H`` heads of ``Dh`` channels; edge
weights ``w`` (E, H), one scalar per edge and head (MORPH: ternary edge attributes). For every edge
``e = (src, dst)`` and head ``h``::

    out[dst, h*Dh:(h+1)*Dh] += w[e, h] * x[src, h*Dh:(h+1)*Dh]

:class:`CSRGraph` stores the edges sorted by destination (``indptr`` over ``dst``) and, for the
backward pass, the permutation that sorts them by source. ``naive.py`` is the reference
(``index_add_``); ``triton.py`` the kernels (deterministic: one program per destination row adds its
incoming edges in CSR order; the input gradient is the same kernel on the reversed graph; the edge
gradient is one dot product per edge and head; no atomics anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gather_add import select_backend
from .naive import graph_aggregate_naive


@dataclass
class CSRGraph:
    """Edges ``src -> dst`` (int64, sorted by ``dst``) over ``num_nodes`` nodes, with both CSR indices."""

    num_nodes: int
    src: torch.Tensor  # (E,) int64
    dst: torch.Tensor  # (E,) int64, non-decreasing
    indptr: torch.Tensor  # (N+1,) int64: edges of dst n are [indptr[n], indptr[n+1])
    rev_perm: torch.Tensor  # (E,) int64: edge ids sorted by src (stable)
    rev_indptr: torch.Tensor  # (N+1,) int64: rev_perm[rev_indptr[n]:rev_indptr[n+1]] are the edges leaving n

    @property
    def num_edges(self) -> int:
        return int(self.src.numel())

    @classmethod
    def from_sorted_edges(cls, src: torch.Tensor, dst: torch.Tensor, num_nodes: int, check: bool = True) -> CSRGraph:
        """Build from edges already sorted by ``dst`` (``check`` validates ranges and order)."""
        src, dst = src.reshape(-1).to(torch.int64), dst.reshape(-1).to(torch.int64)
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must have the same length, got {src.numel()} and {dst.numel()}")
        if check and src.numel():
            lo = int(torch.minimum(src.min(), dst.min()))
            hi = int(torch.maximum(src.max(), dst.max()))
            if lo < 0 or hi >= num_nodes:
                raise ValueError(f"edge endpoint out of range [0, {num_nodes}): found {lo if lo < 0 else hi}")
            if bool((dst[1:] < dst[:-1]).any()):
                raise ValueError("edges must be sorted by dst (use CSRGraph.from_edges)")
        indptr = _indptr(dst, num_nodes)
        rev_perm = torch.argsort(src, stable=True)
        rev_indptr = _indptr(src, num_nodes)
        return cls(num_nodes, src, dst, indptr, rev_perm, rev_indptr)

    @classmethod
    def from_edges(cls, src: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> tuple[CSRGraph, torch.Tensor]:
        """Sort arbitrary edges by ``dst`` (stable); returns the graph and the edge permutation applied."""
        perm = torch.argsort(dst.reshape(-1).to(torch.int64), stable=True)
        g = cls.from_sorted_edges(src.reshape(-1)[perm], dst.reshape(-1)[perm], num_nodes)
        return g, perm


def _indptr(keys: torch.Tensor, n: int) -> torch.Tensor:
    indptr = torch.zeros(n + 1, dtype=torch.int64, device=keys.device)
    if keys.numel():
        torch.cumsum(torch.bincount(keys, minlength=n), 0, out=indptr[1:])
    return indptr


def check_graph_inputs(x: torch.Tensor, w: torch.Tensor, graph: CSRGraph) -> None:
    if x.dim() != 2 or x.shape[0] != graph.num_nodes:
        raise ValueError(f"node features must be ({graph.num_nodes}, D), got {tuple(x.shape)}")
    if w.dim() != 2 or w.shape[0] != graph.num_edges:
        raise ValueError(f"edge weights must be ({graph.num_edges}, H), got {tuple(w.shape)}")
    if w.shape[1] < 1 or x.shape[1] % w.shape[1]:
        raise ValueError(f"feature dim {x.shape[1]} must be divisible by the number of heads {w.shape[1]}")
    if not x.is_floating_point() or not w.is_floating_point():
        raise TypeError("graph_aggregate expects floating-point features and edge weights")


def graph_aggregate(x: torch.Tensor, w: torch.Tensor, graph: CSRGraph, backend: str = "auto") -> torch.Tensor:
    """``out[dst] += w[e] * x[src]`` per head; gradients for ``x`` and ``w``."""
    check_graph_inputs(x, w, graph)
    if select_backend(backend, x) == "triton":
        from .triton import graph_aggregate_triton  # lazy: see ops/gather_add

        return graph_aggregate_triton(x, w, graph)
    return graph_aggregate_naive(x, w, graph)


__all__ = ["CSRGraph", "graph_aggregate", "graph_aggregate_naive"]
