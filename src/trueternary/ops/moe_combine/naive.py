"""Plain-PyTorch reference of the MoE combine: ``out[t] = sum_j w[t, j] * Y[pos[t, j]]``."""

from __future__ import annotations

import torch


def moe_combine_naive(Y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(Y.dtype, w.dtype)
    return (w.to(dtype).unsqueeze(-1) * Y.to(dtype)[pos.long()]).sum(1)
