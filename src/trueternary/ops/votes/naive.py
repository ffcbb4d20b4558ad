"""Plain-PyTorch references of the vote kernels in ``triton.py``, built from rule.py / rng.py functions.

    weight_grad(gy, x)              gW = gy.T @ x in float32 (the kernel's fp32 accumulator, un-rounded)
    matmul_votes_naive(...)         _matmul_votes_kernel: (votes, gE, zeroed tiles) for one layer call
    scale_votes_naive(...)          _scale_votes_kernel: votes on gE ('tensor' normalisation) into E_accum
    zero_nonfinite_tiles(g, tile)   the kernel's NaN/inf handling (per kernel tile)
    encode/decode_vote_cache        the gpu-signcache vote cache layouts
    cast_matmul_votes_naive(...)    the dense-fallback path itself: the voter's cast_votes on gW

Note on the dense-fallback path: ``FlipOptimizer.cast_matmul_votes`` forms ``gy.t() @ x`` in the inputs'
dtype (bf16 under autocast: cuBLAS rounds gW to bf16) before voting; the fused kernel votes on the fp32
accumulator. On inputs where the arithmetic is exact (small integers) both give the same gW and the same
integer state; otherwise they agree statistically.
"""

from __future__ import annotations

import torch

from ...rule import accumulate, scale_gradient, sign_votes, stochastic_votes, vote_scale

# Vote cache layouts (gpu-signcache), flat row-major like T_accum:
#   bits 2: 4 votes per byte, field (v + 1) in 2 bits   (|v| <= 1: sign votes, or vote_clip == 1)
#   bits 4: 2 votes per byte, field (v + 8) in 4 bits   (|v| <= 7)
#   bits 8: one int8 vote per byte                       (any vote_clip)
# lowest bits hold the lowest flat index. bits 2 / 4 need cols % 4 / cols % 2 == 0 (no byte spans two rows).
CACHE_BIAS = {2: 1, 4: 8}
# norm_block values the kernel epilogue implements (tile edges are multiples): here, where both the dispatcher
# (ops.votes) and the kernels (triton.py) read it, so neither imports the other
FUSED_NORM_BLOCKS = (16, 32, 64, 128)


def weight_grad(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gy.T @ x`` accumulated and returned in float32."""
    return gy.float().t() @ x.float()


def zero_nonfinite_tiles(g: torch.Tensor, tile: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero every (tile_r, tile_c) tile of ``g`` that holds a NaN/inf (the whole matrix if ``tile`` is None).

    Returns ``(g, number of zeroed tiles)``; the kernel zeroes per tile, the dense-fallback per matrix.
    """
    bad = ~torch.isfinite(g)
    if tile is None:
        n = bad.any().to(torch.int64)
        return torch.where(n > 0, torch.zeros_like(g), g), n
    R, C = g.shape
    tr, tc = tile
    pr, pc = -R % tr, -C % tc
    tiles = torch.nn.functional.pad(bad, (0, pc, 0, pr)).view((R + pr) // tr, tr, (C + pc) // tc, tc).any(3).any(1)
    mask = tiles.repeat_interleave(tr, 0).repeat_interleave(tc, 1)[:R, :C]
    return torch.where(mask, torch.zeros_like(g), g), tiles.sum()


def matmul_votes_naive(gy, x, weight, lr: float, key, *, vote: str, vote_clip: int, norm_block: int,
                       decay: float = 0.0, scale_grad: bool = False, tile: tuple[int, int] | None = None):
    """``(votes int8 (rows, cols), gE (rows, n_groups) or None, zeroed tiles)`` for ``gW = gy.T @ x``.

    Stochastic votes use ``normalize='block_factored'`` with ``norm_block`` (rule.block_factored_ms), as the
    kernel's epilogue does; ``tile``: the kernel tile that NaN/inf zeroes (None: no non-finite handling).
    """
    g = weight_grad(gy, x)
    n_bad = torch.zeros((), dtype=torch.int64)
    if tile is not None:
        g, n_bad = zero_nonfinite_tiles(g, tile)
    T = weight.trits()
    if vote == "sign":
        v = sign_votes(g)
    else:
        v = stochastic_votes(g, vote_scale(g, lr, "block_factored", norm_block), key, vote_clip, T, decay)
    gE = scale_gradient(g, T, weight.group_size) if scale_grad else None
    return v, gE, n_bad


def scale_votes_naive(gE, E_accum, lr_e: float, key, *, vote: str, vote_clip: int, normalize: str,
                      norm_block: int) -> torch.Tensor:
    """New ``E_accum`` after the votes on ``gE`` (normalised like FlipOptimizer.cast_votes does: rule.vote_scale)."""
    if vote == "sign":
        v = sign_votes(gE)
    else:
        v = stochastic_votes(gE, vote_scale(gE, lr_e, normalize, norm_block), key, vote_clip)
    return accumulate(E_accum, v)


def encode_vote_cache(votes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 vote cache of int8 ``votes`` (rows, cols) in the ``bits`` layout."""
    flat = votes.reshape(-1).to(torch.int32)
    if bits == 8:
        return flat.to(torch.int8).view(torch.uint8)
    per = 8 // bits
    fields = (flat + CACHE_BIAS[bits]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=votes.device) * bits
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def decode_vote_cache(cache: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Flat int8 votes of a vote cache."""
    if bits == 8:
        return cache.view(torch.int8)[:numel]
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=cache.device) * bits
    fields = (cache.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return (fields.reshape(-1)[:numel] - CACHE_BIAS[bits]).to(torch.int8)


def cast_matmul_votes_naive(voter, weight, gy: torch.Tensor, x: torch.Tensor) -> None:
    """The dense-fallback path on the fp32 gradient: ``voter.cast_votes(weight, gy.T @ x, T)``."""
    voter.cast_votes(weight, weight_grad(gy, x), weight.trits())
