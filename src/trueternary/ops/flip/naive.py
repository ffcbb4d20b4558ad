"""Plain-PyTorch references of the flip kernels in ``triton.py``: rule.apply_flips / apply_scale_flips + packing.

All functions are pure (they return new tensors); ``weight`` is a TernaryScaleTensor.
"""

from __future__ import annotations

import torch

from ... import packing
from ...rule import accumulate, apply_flips, apply_scale_flips, leak
from ..votes.naive import decode_vote_cache


def flip_naive(weight, threshold: int, clip_at_bounds: bool, scale_threshold: int | None = None,
               votes: torch.Tensor | None = None, leak_shift: int = 0, reset: int = 0):
    """One optimiser step's flips of ``weight`` (FlipOptimizer.step's body), optionally after accumulating
    pending ``votes`` (int8, the gpu-signcache cache) and leaking ``T_accum`` (``leak_shift`` > 0).

    Returns ``(T_packed, T_accum, E, E_accum, n_flips, n_scale_flips)``; E/E_accum/n_scale_flips are the
    inputs / 0 when ``scale_threshold`` is None.
    """
    A = weight.T_accum
    if votes is not None:
        A = accumulate(A, votes.view_as(A))
    if leak_shift:
        A = leak(A, leak_shift)
    T, A, n = apply_flips(weight.trits(), A, threshold, clip_at_bounds, reset)
    E, EA, ne = weight.E, weight.E_accum, torch.zeros((), dtype=torch.int64, device=A.device)
    if scale_threshold is not None:
        E, EA, ne = apply_scale_flips(E, EA, scale_threshold)
    return packing.pack_trits(T), A, E, EA, n, ne


def accumulate_cache_naive(weight, cache) -> torch.Tensor:
    """``T_accum`` after adding a VoteCache's votes (the flush of a pending cache)."""
    votes = decode_vote_cache(cache.buf, cache.bits, cache.numel)
    return accumulate(weight.T_accum, votes.view_as(weight.T_accum))
