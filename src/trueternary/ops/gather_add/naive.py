"""Plain-PyTorch reference of gather-add: ``out = a + table[idx]`` (autograd scatter-adds into ``table``)."""

from __future__ import annotations

import torch


def gather_add_naive(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return a + table[idx.long()]
