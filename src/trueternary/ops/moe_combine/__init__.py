"""MoE dense combine: ``out[t] = sum_j w[t, j] * Y[pos[t, j]]``.

``Y`` (M, D) holds the chosen experts' outputs in *expert order* (the rows each expert computed,
concatenated); ``pos`` (N, k) says where token ``t``'s ``j``-th choice landed in ``Y``; ``w`` (N, k) are
the routing weights. The kernel fuses the un-permutation and the weighted sum, so the (N, k, D)
per-choice tensor is never materialised. ``pos`` must be injective (every row of ``Y`` belongs to one
(token, choice)), which makes the backward a pure gather/scatter without collisions:

    grad_Y[pos[t, j]] = w[t, j] * grad_out[t]          grad_w[t, j] = < grad_out[t], Y[pos[t, j]] >
"""

from __future__ import annotations

import torch

from ..gather_add import select_backend
from .naive import moe_combine_naive


def check_moe_combine(Y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> None:
    if Y.dim() != 2 or w.dim() != 2 or pos.shape != w.shape:
        raise ValueError(f"moe_combine expects Y (M, D), w (N, k), pos (N, k); got {tuple(Y.shape)}, "
                         f"{tuple(w.shape)}, {tuple(pos.shape)}")
    if pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pos must be int32/int64, got {pos.dtype}")
    if not Y.is_floating_point() or not w.is_floating_point():
        raise TypeError("moe_combine expects floating-point expert outputs and routing weights")


def moe_combine(Y: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Weighted sum of each token's chosen expert outputs; gradients for ``Y`` and ``w``."""
    check_moe_combine(Y, w, pos)
    if select_backend(backend, Y) == "triton":
        from .triton import moe_combine_triton  # lazy: see ops/gather_add

        return moe_combine_triton(Y, w, pos)
    return moe_combine_naive(Y, w, pos)


__all__ = ["moe_combine", "moe_combine_naive"]
