"""Plain-PyTorch reference of the multi-head weighted graph aggregation (see ``__init__``)."""

from __future__ import annotations

import torch


def graph_aggregate_naive(x: torch.Tensor, w: torch.Tensor, graph) -> torch.Tensor:
    N, D = x.shape
    H = w.shape[1]
    dtype = torch.promote_types(x.dtype, w.dtype)
    msg = w.to(dtype)[:, :, None] * x.to(dtype).view(N, H, D // H)[graph.src]  # (E, H, Dh)
    out = torch.zeros(N, H, D // H, dtype=dtype, device=x.device)
    return out.index_add(0, graph.dst, msg).view(N, D)
