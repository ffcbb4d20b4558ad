"""Fused flip/update of a ternary weight on its packed bytes (``gpu`` / ``gpu-signcache`` backends).

One call per weight per optimiser step::

    apply_flips_(weight, threshold, clip_at_bounds, scale_threshold=None, counts=None, cache=None, leak=0, reset=0)

is ``FlipOptimizer.step``'s per-weight body (rule.leak if the rule has one, rule.apply_flips on the
unpacked trits, repack, and rule.apply_scale_flips) in a single launch that reads and writes
``T_packed`` and ``T_accum`` once. With a pending :class:`~trueternary.ops.votes.VoteCache` it first
adds the cached votes (gpu-signcache: accumulate + flip + repack in one pass). ``counts`` (int32 (2,),
device) receives ``+= (trit flips, scale flips)``: pass one zeroed buffer for all weights of a step
and read the totals with one sync. Integer state is bit-identical to the reference (``naive.flip_naive``).
"""

from __future__ import annotations

import torch

from .naive import accumulate_cache_naive, flip_naive


def apply_flips_(weight, threshold: int, clip_at_bounds: bool, scale_threshold: int | None = None,
                 counts: torch.Tensor | None = None, cache=None, leak: int = 0, reset: int = 0) -> torch.Tensor:
    """Flip ``weight`` in place (Triton); returns ``counts``. ``scale_threshold=None`` leaves E alone;
    ``leak`` is the rule's leak shift (0: off), ``reset`` its ``flip_reset``."""
    from .triton import flip_triton_

    pending = cache if cache is not None and cache.pending else None
    counts = flip_triton_(weight, threshold, clip_at_bounds, scale_threshold, counts, pending, leak=leak, reset=reset)
    if pending is not None:
        pending.pending = False
    return counts


def flush_vote_cache_(weight, cache) -> None:
    """Add a pending vote cache into ``T_accum`` (saturating) without flipping; the cache is then empty."""
    from .triton import flip_triton_

    if cache.pending:
        flip_triton_(weight, 1, False, None, cache=cache, flip=False)
        cache.pending = False


@torch.no_grad()
def apply_flips_naive_(weight, threshold: int, clip_at_bounds: bool, scale_threshold: int | None = None,
                       counts: torch.Tensor | None = None, cache=None, leak: int = 0, reset: int = 0) -> torch.Tensor:
    """The same as :func:`apply_flips_` in plain PyTorch (reference; works on any device)."""
    from ..votes.naive import decode_vote_cache

    votes = None
    if cache is not None and cache.pending:
        votes = decode_vote_cache(cache.buf, cache.bits, cache.numel)
        cache.pending = False
    P, A, E, EA, n, ne = flip_naive(weight, threshold, clip_at_bounds, scale_threshold, votes, leak, reset)
    weight.T_packed.copy_(P)
    weight.T_accum.copy_(A)
    weight.E.copy_(E)
    weight.E_accum.copy_(EA)
    if counts is None:
        counts = torch.zeros(2, dtype=torch.int32, device=A.device)
    counts += torch.stack([n, ne]).to(counts)
    return counts


__all__ = ["accumulate_cache_naive", "apply_flips_", "apply_flips_naive_", "flip_naive", "flush_vote_cache_"]
