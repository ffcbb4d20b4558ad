"""Fused weight-gradient votes for the ``gpu`` and ``gpu-signcache`` update backends.

One call per layer call in backward (``keys``/``s``/``vote_ms`` stay on the device: no host sync, so the
sequence can be captured in a CUDA graph)::

    cast_matmul_votes(weight, gy, x, group, keys, scale_step=..., nonfinite=..., cache=None)

does for a :class:`~trueternary.weight.TernaryScaleTensor` what ``FlipOptimizer.cast_votes(weight, gy.T @ x, T)``
does (``rows=None``, no ``vote_reducer``), with the weight gradient formed tile by tile inside the vote
kernel so it never reaches memory. Five launches::

    scratch = zeros(4 + rows*n_groups)                 sum gW**2, sum gE**2, non-finite tiles, -, gE
    _vote_prep_kernel      s[slot] = reciprocal(sqrt(vote_ms[slot] + eps)) * -lr[slot]
    _matmul_votes_kernel   gW tile -> votes -> T_accum (or the vote cache); sum gW**2; gE = sum_group(gW*T)
    _scale_votes_kernel    gE -> votes -> E_accum; sum gE**2                  (scale steps only)
    _ms_update_kernel      vote_ms[slot] <- running mean square; nonfinite += 1 if a tile was non-finite

Differences from the dense-fallback path, all documented in docs/performance.md:

* gW is the fp32 tensor-core accumulator (dense-fallback rounds it to the inputs' dtype first); votes
  are bit-identical wherever the arithmetic is exact, statistically equal elsewhere.
* A weight whose ``vote_ms`` slot is still <= 0 (no gradient seen yet) gets ``s = 0`` here (no votes but
  the decay term), and the slot is initialised from this gradient; the reference instead votes with the
  gradient's own mean square. Call the dense path for a weight's first gradient
  (:func:`fused_votes_ready` says when the fused path is exact).
* A non-finite gradient zeroes the kernel *tiles* holding NaN/inf (the reference zeroes the whole
  matrix, so only the decay term votes there); either way ``vote_ms`` is left as is, ``nonfinite`` is
  incremented once and ``FlipOptimizer.step`` raises.
* ``normalize='factored'`` is not fused (:func:`fused_votes_supported`).

gpu-signcache (:class:`VoteCache`): the backward kernel writes the votes into a compact per-layer cache
(2 bits per weight for sign votes) instead of read-modify-writing ``T_accum``; the step kernel
(``trueternary.ops.flip.apply_flips_(..., cache=...)``) accumulates, flips and repacks in one pass.
A second call of the same layer within one step first flushes the pending cache into ``T_accum``
(saturating, so the result equals sequential accumulation exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ... import rng
from .naive import (
    cast_matmul_votes_naive,
    decode_vote_cache,
    encode_vote_cache,
    matmul_votes_naive,
    ms_update_naive,
    scale_votes_naive,
    vote_prep_naive,
    weight_grad,
)

SCRATCH_HEAD = 4  # scratch[0] sum gW**2, [1] sum gE**2, [2] non-finite tiles, [3] padding; gE from [4]


@dataclass
class VoteCache:
    """A layer's votes of one step, cast in backward and applied by the step kernel (gpu-signcache).

    ``buf`` (uint8) holds ``numel`` votes in the ``bits`` layout of ``naive.encode_vote_cache``; ``pending``
    is a host flag: votes were written and not yet applied to ``T_accum``.
    """

    buf: torch.Tensor
    bits: int
    numel: int
    pending: bool = False

    @staticmethod
    def bits_for(vote: str, vote_clip: int, cols: int) -> int:
        """Smallest layout that holds every vote: 2 bits for |v| <= 1, 4 for |v| <= 7, else 8."""
        if (vote == "sign" or vote_clip <= 1) and cols % 4 == 0:
            return 2
        if (vote == "sign" or vote_clip <= 7) and cols % 2 == 0:
            return 4
        return 8

    @classmethod
    def for_weight(cls, weight, vote: str, vote_clip: int) -> VoteCache:
        bits = cls.bits_for(vote, vote_clip, weight.cols)
        numel = weight.rows * weight.cols
        buf = torch.empty(numel * bits // 8, dtype=torch.uint8, device=weight.T_accum.device)
        return cls(buf, bits, numel)

    @property
    def nbytes(self) -> int:
        return self.buf.numel()


def vote_keys(seed: int, stream: int, counter: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """int64 (2,) keys of a weight's vote streams ``2*stream`` (trits) and ``2*stream + 1`` (scales).

    Equal to ``rng.stream_key`` as ``FlipOptimizer.cast_votes`` derives them. Pass ``counter`` as a device
    tensor to compute them on the device (inside a CUDA graph); a Python int costs one host-to-device copy.
    """
    keys = torch.stack([rng.stream_key(seed, 2 * stream, counter), rng.stream_key(seed, 2 * stream + 1, counter)])
    return keys.to(device)


def fused_votes_supported(group: Mapping) -> bool:
    """Whether the fused kernels implement this param group's rule (``normalize='factored'`` needs the
    whole gradient's row and column statistics before the first vote: not fused, use the dense path)."""
    return group.get("normalize", "tensor") == "tensor"


def fused_votes_ready(weight, group: Mapping, scale_step: bool) -> bool:
    """True when the fused path reproduces the dense path for this call: the rule is supported and every
    ``vote_ms`` slot it uses has seen a gradient (``> 0``). Costs one host sync."""
    if not fused_votes_supported(group):
        return False
    need = []
    if group["vote"] == "stochastic":
        need.append(0)
    if scale_step and weight.scale_mode == "int" and group["scale_vote"] == "stochastic":
        need.append(1)
    return not need or bool((weight.vote_ms[need] > 0).all())


def cast_matmul_votes(weight, gy: torch.Tensor, x: torch.Tensor, group: Mapping, keys: torch.Tensor, *,
                      scale_step: bool, nonfinite: torch.Tensor | None = None, cache: VoteCache | None = None,
                      config: dict | None = None) -> None:
    """Votes of ``gW = gy.T @ x`` (gy: (M, rows), x: (M, cols)) into ``weight``'s accumulators, fused.

    ``group``: the FlipOptimizer param group (vote, lr, eps, grad_beta, vote_clip, decay, scale_vote,
    scale_lr; ``normalize`` must be 'tensor', see :func:`fused_votes_supported`); ``keys``: :func:`vote_keys`;
    ``scale_step``: whether this optimiser step votes on scales
    (``scale_update_interval and step % scale_update_interval == 0``); ``nonfinite``: the optimiser's int32
    counter; ``cache``: write votes to this :class:`VoteCache` (gpu-signcache) instead of ``T_accum``.
    """
    from .triton import matmul_votes_, ms_update_, scale_votes_, vote_prep

    if not fused_votes_supported(group):
        raise ValueError(f"the fused vote kernels do not implement normalize={group['normalize']!r}")
    M = gy.shape[0]
    if M == 0:  # an empty batch carries no gradient (as ops/linear.py): no votes, vote_ms untouched
        return
    dev = gy.device
    if not isinstance(keys, torch.Tensor):
        keys = torch.tensor(list(keys), dtype=torch.int64)
    keys = keys.to(device=dev, dtype=torch.int64)
    rows, ng = weight.rows, weight.n_groups
    vote = group["vote"]
    scale_on = bool(scale_step) and weight.scale_mode == "int"
    scale_stochastic = scale_on and group["scale_vote"] == "stochastic"
    scratch = torch.zeros(SCRATCH_HEAD + (rows * ng if scale_on else 0), dtype=torch.float32, device=dev)
    lr_e = group["lr"] * group["scale_lr"]  # scale votes are scaled relative to lr (FlipOptimizer.cast_votes)
    if dev.type == "cpu":  # PyTorch's CPU sqrt is not correctly rounded: match FlipOptimizer on the CPU
        s = vote_prep_naive(weight.vote_ms, group["lr"], lr_e, group["eps"])
    else:  # CUDA sqrt/division are IEEE, as the kernel's sqrt_rn/div_rn
        s = vote_prep(weight.vote_ms, group["lr"], lr_e, group["eps"])
    if cache is not None and cache.pending:
        from ..flip import flush_vote_cache_

        flush_vote_cache_(weight, cache)
    matmul_votes_(
        gy, x, weight, s[0], keys[0], vote=vote, vote_clip=group["vote_clip"], decay=group["decay"],
        sumsq=scratch[0] if vote == "stochastic" else None,
        gE=scratch[SCRATCH_HEAD:].view(rows, ng) if scale_on else None, bad=scratch[2], cache=cache, config=config,
    )
    if cache is not None:
        cache.pending = True
    if scale_on:
        scale_votes_(scratch[SCRATCH_HEAD:].view(rows, ng), weight.E_accum, s[1], keys[1],
                     vote=group["scale_vote"], vote_clip=group["vote_clip"],
                     sumsq=scratch[1] if scale_stochastic else None)
    if vote == "stochastic" or scale_stochastic or nonfinite is not None:
        ms_update_(weight.vote_ms, scratch, weight.rows * weight.cols, rows * ng, group["grad_beta"],
                   update_w=vote == "stochastic", update_e=scale_stochastic, nonfinite=nonfinite)


__all__ = [
    "VoteCache",
    "cast_matmul_votes",
    "cast_matmul_votes_naive",
    "decode_vote_cache",
    "encode_vote_cache",
    "fused_votes_ready",
    "fused_votes_supported",
    "matmul_votes_naive",
    "ms_update_naive",
    "scale_votes_naive",
    "vote_keys",
    "vote_prep_naive",
    "weight_grad",
]
