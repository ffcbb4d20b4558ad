"""The kernel vote backend (``gpu``, ``gpu-signcache``): Triton kernels cast the votes and apply the flips.

A linear map's votes are cast in the vote kernel's epilogue (``ops.votes.cast_matmul_votes``: the weight
gradient formed tile by tile inside the kernel, or read from cuBLAS's gW for large batches), when the rule is
one the kernel implements (``ops.votes.fused_votes_supported``) and the operands are where the kernels run;
other votes (formed gradients: embeddings, LSTMs, biases; rules the kernel does not implement) take the dense
path. ``step()`` runs one flip kernel per weight (leak, flips, repack, scale flips). No host sync anywhere: the
RNG counter is the device step plus the call's index, the NaN/inf check bumps a device counter, so a CUDA
graph can capture the whole step.

gpu-signcache: the vote kernel writes a layer's votes into a compact per-layer vote cache
(``ops.votes.VoteCache``) that the flip kernel accumulates in the same pass as the flips.
"""

from __future__ import annotations

import torch

from ..ops import flip as flip_ops
from ..ops import kernels_can_run
from ..ops import votes as vote_ops
from ..ops.linear import KERNEL_DTYPES
from ..rule import uses_norm_memory
from ..weight import TernaryScaleTensor
from .backend import FlipCounts
from .context import CALLS_PER_STEP, NORM_SALT, VoteContext
from .dense import DenseVotes


class KernelVotes(DenseVotes):
    """Fused votes and flips on the Triton kernels, the dense path where they do not apply (one process).

    ``signcache``: hold each layer's votes in a vote cache until the flip kernel applies them."""

    def __init__(self, ctx: VoteContext, signcache: bool = False) -> None:
        super().__init__(ctx)
        self.signcache = signcache
        self.caches: dict[int, tuple[TernaryScaleTensor, vote_ops.VoteCache]] = {}  # id(weight) -> its cache

    # ------------------------------------------------------------------ backward
    def fuses_matmul_votes(self, gy: torch.Tensor, x: torch.Tensor, group: dict) -> bool:
        return (kernels_can_run(gy) and gy.dtype in KERNEL_DTYPES and x.dtype == gy.dtype
                and vote_ops.fused_votes_supported(group))

    @torch.no_grad()
    def cast_fused_matmul_votes(self, weight: TernaryScaleTensor, gy: torch.Tensor, x: torch.Tensor, group: dict,
                                lr) -> None:
        """``ops.votes.cast_matmul_votes`` with this optimiser's keys, counters and (signcache) vote cache."""
        ctx = self.ctx
        call = ctx.counters.call_index(weight)
        cache = self._vote_cache(weight, group) if self.signcache else None
        nonfinite = ctx.finite.counter(gy.device)
        step = ctx.counters.device_step(gy.device)
        codes = ctx.norm_codes(weight, group) if uses_norm_memory(group) else None
        vote_ops.cast_matmul_votes(weight, gy, x, dict(group, lr=lr), seed=ctx.seed, step=step, call=call,
                                   calls_per_step=CALLS_PER_STEP, nonfinite=nonfinite, cache=cache,
                                   norm_codes=codes, norm_seed=ctx.seed ^ NORM_SALT)

    def _vote_cache(self, weight: TernaryScaleTensor, group: dict) -> vote_ops.VoteCache:
        """The weight's vote cache in the layout its rule needs (a new one when the rule changed it)."""
        entry = self.caches.get(id(weight))
        cache = entry[1] if entry is not None else None
        if cache is None or cache.bits != vote_ops.VoteCache.bits_for(group["vote"], group["vote_clip"], weight.cols):
            if cache is not None and cache.pending:  # the rule changed: apply the old layout's votes first
                flip_ops.flush_vote_cache_(weight, cache)
            cache = vote_ops.VoteCache.for_weight(weight, group["vote"], group["vote_clip"])
            self.caches[id(weight)] = (weight, cache)
        return cache

    # ------------------------------------------------------------------ step
    def _flip(self, m: TernaryScaleTensor, group: dict, counts: FlipCounts) -> None:
        """Leak + flips + repack (+ scale flips, + pending vote cache) of one weight in one kernel launch, its
        counts into the device's buffer; the dense flips where the kernels do not run."""
        if not kernels_can_run(m.T_accum):
            super()._flip(m, group, counts)
            return
        scale = m.scale_mode == "int" and bool(group["scale_update_interval"])
        flip_ops.apply_flips_(m, group["accum_threshold"], group["clip_at_bounds"],
                              group["scale_threshold"] if scale else None, counts.kernel_counts(m.T_accum.device),
                              cache=self._pending_cache(m), leak=group["leak"], reset=group.get("flip_reset", 0))
        counts.kernel_scale |= scale

    def _pending_cache(self, m: TernaryScaleTensor) -> vote_ops.VoteCache | None:
        """The vote cache the flip kernel applies to ``m`` with its flips (None: no votes held back)."""
        entry = self.caches.get(id(m))
        return entry[1] if entry is not None else None

    # ------------------------------------------------------------------ state
    def flush_votes(self) -> None:
        for weight, cache in self.caches.values():
            if cache.pending:
                flip_ops.flush_vote_cache_(weight, cache)

    def drop_votes(self) -> None:
        for _, cache in self.caches.values():
            cache.pending = False
