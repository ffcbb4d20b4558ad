"""Causal graph aggregation over positions, with ternary edge attributes.

Nodes are the ``B * L`` positions of a batch. Every position ``t`` receives messages from

* **window edges**: itself and its ``window - 1`` predecessors ``t - d`` (``d = 0 .. window-1``),
  edge type ``d`` (relative distance);
* **match edges** (optional): the most recent earlier position ``t' < t`` of the same sequence whose
  VQ code equals ``t``'s code, edge type ``window`` -- a content-addressed long-range link ("the last
  time this concept occurred"), the kind of edge an induction head learns, here given by the codes.

All edges point from the past to the present (``src <= dst`` within one sequence), so the layer is
causal. Edge weights are *ternary edge attributes*: an embedding table ``edge_attr`` of
``(window + 1) x heads`` indexed by edge type (a ``TernaryEmbeddingTable`` once ternarised; its rows
learn by sparse votes), one scalar per edge and head:

    m   = W_msg rms(x)                                  (B*L, d), heads of d/heads channels
    a   = graph_aggregate(m, edge_attr[type], graph)    a[dst] += w_e * m[src]      (Triton / naive)
    out = W_out rms(a)

The graph has at most ``window + 1`` in-edges per node and is built without sorting (edges are
enumerated destination by destination); only the backward's reversed index needs one argsort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TernaryEmbedding, TernaryLinear
from ..ops.graph_aggregate import CSRGraph, graph_aggregate
from ..weight import DEFAULT_GROUP_SIZE


def previous_same_code(codes: torch.Tensor) -> torch.Tensor:
    """For codes (B, L): flat index (b*L + t') of the last t' < t with the same code in row b, else -1."""
    B, L = codes.shape
    flat = codes.reshape(-1).to(torch.int64)
    n_codes = int(flat.max()) + 1 if flat.numel() else 1
    key = torch.arange(B, device=codes.device).repeat_interleave(L) * n_codes + flat
    order = torch.argsort(key, stable=True)  # stable: positions of one (row, code) stay in time order
    prev = torch.full_like(flat, -1)
    if flat.numel() > 1:
        same = key[order[1:]] == key[order[:-1]]
        prev[order[1:]] = torch.where(same, order[:-1], torch.full_like(order[:-1], -1))
    return prev


def causal_graph(batch: int, length: int, window: int, codes: torch.Tensor | None = None,
                 device=None) -> tuple[CSRGraph, torch.Tensor]:
    """The window (+ match) graph of a (batch, length) block of positions and each edge's type."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    N = batch * length
    dev = codes.device if codes is not None else device
    node = torch.arange(N, device=dev)
    t = node % length
    dist = torch.arange(window, device=dev)
    src = node[:, None] - dist[None, :]  # (N, window)
    valid = t[:, None] >= dist[None, :]
    etype = dist.expand(N, window)
    if codes is not None:
        prev = previous_same_code(codes)
        src = torch.cat([src, prev[:, None]], 1)
        valid = torch.cat([valid, (prev >= 0)[:, None]], 1)
        etype = torch.cat([etype, torch.full((N, 1), window, device=dev)], 1)
    dst = node[:, None].expand_as(src)
    # Row-major over (dst, slot): already sorted by dst, no sort needed.
    graph = CSRGraph.from_sorted_edges(src[valid], dst[valid], N, check=False)
    return graph, etype[valid]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class CausalGraphAggregation(nn.Module):
    """Message passing over the causal window (+ same-code) graph; see the module docstring."""

    def __init__(
        self,
        d_model: int,
        window: int = 8,
        heads: int = 4,
        *,
        match_edges: bool = True,
        ternary: bool = True,
        backend: str = "auto",
        group_size: int = DEFAULT_GROUP_SIZE,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by graph heads ({heads})")
        if window < 1:
            raise ValueError(f"graph window must be >= 1, got {window}")
        self.d_model, self.window, self.heads = d_model, window, heads
        self.match_edges, self.backend = match_edges, backend
        n_types = window + 1
        if ternary:
            self.msg = TernaryLinear(d_model, d_model, group_size=group_size, generator=generator)
            self.out = TernaryLinear(d_model, d_model, group_size=group_size, generator=generator)
            self.edge_attr = TernaryEmbedding(n_types, heads, group_size=group_size, generator=generator)
        else:
            self.msg = nn.Linear(d_model, d_model, bias=False)
            self.out = nn.Linear(d_model, d_model, bias=False)
            self.edge_attr = nn.Embedding(n_types, heads)
            with torch.no_grad():
                self.msg.weight.normal_(0.0, init_std, generator=generator)
                self.out.weight.normal_(0.0, init_std, generator=generator)
                self.edge_attr.weight.normal_(0.0, 1.0, generator=generator)

    def forward(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d), codes (B, L) or None -> (B, L, d)."""
        B, L, d = x.shape
        graph, etype = causal_graph(B, L, self.window, codes if self.match_edges else None, device=x.device)
        m = self.msg(_rms(x)).reshape(B * L, d)
        w = self.edge_attr(etype)  # (E, heads): the ternary edge attributes
        a = graph_aggregate(m, w, graph, self.backend)
        return self.out(_rms(a.view(B, L, d)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, window={self.window}, heads={self.heads}, match_edges={self.match_edges}"
