"""Fused weight-gradient votes for the ``gpu`` and ``gpu-signcache`` update backends.

One call per layer call in backward (every scalar it needs stays on the device or is a constant of the
call: no host sync, so the sequence can be captured in a CUDA graph)::

    cast_matmul_votes(weight, gy, x, group, seed=..., step=..., call=..., calls_per_step=...,
                      nonfinite=None, cache=None)

does for a :class:`~trueternary.weight.TernaryScaleTensor` what ``FlipOptimizer.cast_votes(weight, gy.T @ x, T)``
does (``rows=None``, one process). Up to M = VOTES_FUSED_MAX_TOKENS tokens (impl 'fused') the weight gradient is
formed tile by tile inside the vote kernel so it never reaches memory; above (impl 'gemm') cuBLAS forms it in
the operands' dtype, exactly as the dense-fallback path does, and two kernels read it: at 16k tokens the vote
kernel's own mainloop runs at about half cuBLAS's speed, and the transient gradient is one layer's (at most
rows x cols x 2 bytes in bf16, freed on return). Launches::

    scratch = zeros(rows*n_groups + 1)       gE, then the layer's non-finite flag   (when needed)
    impl 'fused':
    _matmul_votes_kernel    gW tile -> block_factored normalisation -> votes -> T_accum (or the vote cache);
                            gE = sum_group(gW * T)
    impl 'gemm':
    gW = gy.T @ x           cuBLAS
    _gw_stats_kernel        per normalisation tile: non-finite check, the normaliser's means (moving averages
                            kept) -> a small float32 buffer
    _gw_votes_kernel        per block of rows: votes from those means -> T_accum (or the cache); gE
    _scale_votes_kernel     gE -> votes normalised like the weights' -> E_accum   (weights with integer scales)

What is fused (:func:`fused_votes_supported`, rules with ``vote_power == 1``): sign votes, and stochastic
votes with ``normalize='block_factored'`` and ``norm_block`` in :data:`FUSED_NORM_BLOCKS`: each kernel tile
is a whole number of norm_block x norm_block normalisation tiles, so the statistics are complete in the
epilogue, and so are the moving averages of the default rule (``norm_beta > 0``): the kernel loads each
tile's integer codes, moves them (rule.ema_block_factored_stats, exact float32 arithmetic) and normalises by
the means the new codes stand for, in the same pass. ``normalize='tensor'`` needs the whole gradient's mean
square before the first vote (a second pass over gW, or gW in memory): not fused for the weights, the
optimiser uses the dense path for it. The scale votes are normalised per call like the weights' (rule.py)
over the small, complete gE: either way is fused.

Differences from the dense-fallback path, all documented in docs/performance.md:

* With impl 'fused', gW is the fp32 tensor-core accumulator (dense-fallback rounds it to the inputs' dtype
  first; impl 'gemm' uses that same rounded gW) and the float sums run in another order; votes are
  bit-identical wherever the arithmetic is exact, statistically equal elsewhere.
* A non-finite gradient zeroes the kernel *tiles* (impl 'gemm': normalisation tiles) holding NaN/inf (the
  reference zeroes the whole matrix when ``check_finite``), the layer casts no scale votes, those tiles keep
  their moving averages' codes (the reference keeps the whole layer's), ``nonfinite`` is incremented once and
  ``FlipOptimizer.step`` raises as on the dense path.

gpu-signcache (:class:`VoteCache`): the backward kernel writes the votes into a compact per-layer cache
(2 bits per weight for sign votes, 4 for vote_clip <= 7, else 8) instead of read-modify-writing
``T_accum``; the step kernel (``trueternary.ops.flip.apply_flips_(..., cache=...)``) accumulates, flips
and repacks in one pass. A second call of the same layer within one step first flushes the pending
cache into ``T_accum`` (saturating, so the result equals sequential accumulation exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...rule import uses_norm_memory
from .naive import (
    FUSED_NORM_BLOCKS,
    cast_matmul_votes_naive,
    decode_vote_cache,
    encode_vote_cache,
    matmul_votes_naive,
    scale_votes_naive,
    weight_grad,
    zero_nonfinite_tiles,
)

VOTES_IMPLS = ("auto", "fused", "gemm")
# auto: the gradient tile formed in the vote kernel up to this many tokens, by cuBLAS above. The kernel's mainloop
# runs at a fraction of cuBLAS's speed on a training step's shapes (ops.ternary_matmul.FUSED_MAX_TOKENS: the two
# crossovers were measured together); the gradient cuBLAS writes is one layer's, in the operands' dtype, freed
# when the call returns.
VOTES_FUSED_MAX_TOKENS = 128


def resolve_votes_impl(impl: str, tokens: int) -> str:
    if impl not in VOTES_IMPLS:
        raise ValueError(f"unknown votes impl {impl!r}; choose one of {', '.join(VOTES_IMPLS)}")
    if impl == "auto":
        return "fused" if tokens <= VOTES_FUSED_MAX_TOKENS else "gemm"
    return impl


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


def fused_votes_supported(group: Mapping) -> bool:
    """Whether the fused kernels implement this param group's vote rule (see the module docstring)."""
    if group.get("vote_power", 1) != 1:  # compressed vote magnitudes (also on scale votes): dense path only
        return False
    block_ok = group["normalize"] == "block_factored" and group["norm_block"] in FUSED_NORM_BLOCKS
    if group["vote"] == "stochastic" and not block_ok:
        return False
    # scale votes are normalised like the weights' (rule.py): 'tensor' there is one more pass over the small gE
    return group["scale_vote"] == "sign" or block_ok or group["normalize"] == "tensor"


def cast_matmul_votes(weight, gy: torch.Tensor, x: torch.Tensor, group: Mapping, *, seed: int,
                      step: torch.Tensor, call: int, calls_per_step: int, nonfinite: torch.Tensor | None = None,
                      cache: VoteCache | None = None, config: dict | None = None, norm_codes: dict | None = None,
                      norm_seed: int = 0, impl: str = "auto") -> None:
    """Votes of ``gW = gy.T @ x`` (gy: (M, rows), x: (M, cols)) into ``weight``'s accumulators, fused.

    ``group``: the FlipOptimizer param group (vote, lr, normalize, norm_block, vote_clip, decay, scale_vote,
    scale_lr, scale_update_interval; see :func:`fused_votes_supported`); ``lr`` must be a Python number.
    RNG keys are ``rng.stream_key(seed, 2*weight.stream (+1 for scales), step*calls_per_step + call)`` with
    ``step`` a 0-dim int64 tensor on gy's device (read by the kernels, never by the host). Scale votes
    happen on steps where ``scale_update_interval`` divides ``step`` (decided on the device).
    ``nonfinite``: the optimiser's int32 counter (+1 if gW had NaN/inf); ``cache``: write the votes to this
    :class:`VoteCache` (gpu-signcache) instead of ``T_accum``. ``norm_codes`` (rules with ``norm_beta > 0``):
    the weight's moving-average codes (rule.empty_norm_codes' dict), updated in place; their stochastic
    rounding uses ``rng.stream_key(norm_seed, weight.stream, step*calls_per_step + call)`` as the reference.
    ``impl``: where the gradient tiles come from (:func:`resolve_votes_impl`; triton.matmul_votes_).
    """
    from .triton import key_base, matmul_votes_, scale_votes_

    if not fused_votes_supported(group):
        raise ValueError(f"the fused vote kernels do not implement normalize={group['normalize']!r} with "
                         f"norm_block={group['norm_block']!r} (supported: 'block_factored', {FUSED_NORM_BLOCKS})")
    impl = resolve_votes_impl(impl, gy.shape[0])
    if gy.shape[0] == 0:  # an empty batch carries no gradient (as ops/linear.py): no votes
        return
    rows, ng = weight.rows, weight.n_groups
    interval = group["scale_update_interval"]
    scale_on = weight.scale_mode == "int" and interval > 0
    scratch = flag = gE = None
    if scale_on or nonfinite is not None:
        scratch = torch.zeros(rows * ng * scale_on + 1, dtype=torch.float32, device=gy.device)
        flag = scratch[-1]
        gE = scratch[:-1].view(rows, ng) if scale_on else None
    if cache is not None and cache.pending:
        from ..flip import flush_vote_cache_

        flush_vote_cache_(weight, cache)
    keys = dict(step=step, call=call, calls_per_step=calls_per_step)
    vote_kw = dict(vote=group["vote"], lr=group["lr"], vote_clip=group["vote_clip"], norm_block=group["norm_block"],
                   decay=group["decay"], key_base=key_base(seed, 2 * weight.stream), config=config, **keys)
    norm = {}
    if uses_norm_memory(group):
        assert norm_codes is not None, "a norm_beta rule needs the weight's codes (rule.empty_norm_codes)"
        norm = dict(norm_codes=norm_codes, norm_beta=group["norm_beta"],
                    norm_key_base=key_base(norm_seed, weight.stream))
    matmul_votes_(gy, x, weight, gE=gE, flag=flag, nonfinite=nonfinite, cache=cache, impl=impl, **norm, **vote_kw)
    if cache is not None:
        cache.pending = True
    if scale_on:
        scale_votes_(gE, weight.E_accum, vote=group["scale_vote"], lr_e=group["lr"] * group["scale_lr"],
                     vote_clip=group["vote_clip"], normalize=group["normalize"], norm_block=group["norm_block"],
                     key_base=key_base(seed, 2 * weight.stream + 1), interval=interval, flag=flag, **keys)


__all__ = [
    "FUSED_NORM_BLOCKS",
    "VOTES_FUSED_MAX_TOKENS",
    "VOTES_IMPLS",
    "VoteCache",
    "cast_matmul_votes",
    "cast_matmul_votes_naive",
    "decode_vote_cache",
    "encode_vote_cache",
    "fused_votes_supported",
    "resolve_votes_impl",
    "matmul_votes_naive",
    "scale_votes_naive",
    "weight_grad",
    "zero_nonfinite_tiles",
]
