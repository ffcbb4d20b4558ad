"""The data-parallel vote backends: each rank votes on its own gradient, the ranks' votes are summed exactly.

``comm`` (trueternary.distributed.VoteAllReduce, set by ``distributed.attach``) has ``world_size``, ``rank`` and
``sum_votes(int tensor) -> int tensor``, an exact integer all-reduce. Every rank votes with ``lr / world_size``,
``decay / world_size`` and its own random stream (:meth:`DataParallelVotes._vote_seed`), so the summed vote's
expectation is one vote on the mean gradient; the sum is clamped to ``+-vote_clip`` (the saturation one vote
has; sign votes take its sign: signSGD with majority vote) and every rank adds the same integers to its state,
so all ranks stay bit-identical without exchanging weights. The normaliser's moving averages take the ranks'
geometric mean of the statistics (exact integer all-reduce of their log2 codes).

    DataParallelVotes        the dense backend: each vote call's votes are all-reduced before they accumulate
    DataParallelKernelVotes  the kernel backends: the vote kernels cast each rank's votes into one int8
                             :class:`VoteBucket`, all-reduced once per step, as DDP buckets gradients
"""

from __future__ import annotations

import torch

from ..ops import flip as flip_ops
from ..ops import votes as vote_ops
from ..rng import mix32_int
from ..rule import NORM_TILE_FRAC, NORM_TILE_MIN, accumulate, code_value, log2_code
from ..weight import TernaryScaleTensor
from .context import CALLS_PER_STEP, VoteContext
from .dense import DenseVotes
from .kernel import KernelVotes


class DataParallelVotes(DenseVotes):
    """Dense votes summed over the ranks of ``comm`` (module docstring)."""

    def __init__(self, ctx: VoteContext, comm) -> None:
        super().__init__(ctx)
        self.comm = comm

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def _vote_seed(self) -> int:
        """``seed`` on rank 0 (which therefore votes like a single process), ``seed ^ mix32(0x5EED0000 + rank)``
        on rank r > 0 (dense path and kernels alike)."""
        rank = self.comm.rank
        return self.ctx.seed ^ mix32_int(0x5EED0000 + rank) if rank else self.ctx.seed

    def _reduce(self, v: torch.Tensor, vote: str, clip: int) -> torch.Tensor:
        """Sum votes over the ranks (integers: int8 votes travel as int16/int32)."""
        return finish_sum(self.comm.sum_votes(v), vote, clip, v.dtype)

    def _pool_stats(self, stats: tuple, bad: torch.Tensor | None) -> tuple[tuple, torch.Tensor | None]:
        """Every rank averages the ranks' statistics and rounds with the same random numbers, so all ranks keep
        the same codes; one rank's bad gradient keeps every rank's codes (they must stay equal)."""
        stats = tuple(self._rank_mean(t) for t in stats)
        if bad is not None:
            bad = self.comm.sum_votes(bad.to(torch.int32).reshape(1))[0] > 0
        return stats, bad

    def _rank_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' geometric mean of the non-negative ``t``, through log2 codes summed exactly."""
        code = log2_code(t, NORM_TILE_FRAC, NORM_TILE_MIN, 32767)
        total = self.comm.sum_votes(code).to(torch.int64)
        return code_value(torch.div(total, self.world_size, rounding_mode="floor"), NORM_TILE_FRAC)

    def _exchange_rows(self, accum: torch.Tensor, v: torch.Tensor, rows):
        """Ranks touch different rows: exchange dense votes (zeros for rows this rank did not touch)."""
        if rows is None:
            return v, rows
        dense = torch.zeros(accum.shape, dtype=v.dtype, device=v.device)
        dense[rows] = v
        return dense, None


def finish_sum(total: torch.Tensor, vote: str, clip: int, dtype: torch.dtype) -> torch.Tensor:
    """The all-reduced vote sum as one vote: its sign for sign votes (signSGD with majority vote), else clamped
    to ``+-clip`` (the saturation one rank's vote has)."""
    if vote == "sign":
        return torch.sign(total).to(dtype)
    return total.clamp(-clip, clip).to(dtype)


class _VoteBuffers:
    """A ternary weight seen by the vote kernels with other accumulators: its trits, shape and RNG stream, and
    the given ``T_accum`` / ``E_accum`` buffers (data-parallel votes are cast into zeroed ones)."""

    def __init__(self, weight: TernaryScaleTensor, T_accum: torch.Tensor, E_accum: torch.Tensor | None) -> None:
        self.rows, self.cols, self.n_groups = weight.rows, weight.cols, weight.n_groups
        self.group_size = weight.group_size
        self.T_packed, self.stream, self.scale_mode = weight.T_packed, weight.stream, weight.scale_mode
        self.T_accum, self.E_accum = T_accum, E_accum


class VoteBucket:
    """The data-parallel vote bucket of the kernel backends on one device: one flat int8 buffer with a slice per
    ternary weight, trit votes first, then scale votes (layout below), so one all-reduce per step carries
    every fused vote, as DDP buckets gradients.

        buf[t_off[w] : t_off[w] + rows*cols]            weight w's trit votes, row-major
        buf[n_t + e_off[w] : n_t + e_off[w] + rows*ng]  weight w's scale votes (exchanged on scale steps only)

    ``pending`` maps id(weight) -> (weight, group, scale_step) for the weights voted into it this step.
    """

    def __init__(self, weights: list[TernaryScaleTensor], device: torch.device) -> None:
        self.t_off, self.e_off = {}, {}
        n_t = n_e = 0
        for w in weights:
            self.t_off[id(w)], self.e_off[id(w)] = n_t, n_e
            n_t += w.rows * w.cols
            n_e += w.rows * w.n_groups
        self.n_t, self.n_e = n_t, n_e
        self.buf = torch.zeros(n_t + n_e, dtype=torch.int8, device=device)
        self.pending: dict[int, tuple] = {}

    def views(self, w: TernaryScaleTensor, scale_step: bool) -> _VoteBuffers:
        t = self.buf[self.t_off[id(w)]:self.t_off[id(w)] + w.rows * w.cols].view(w.rows, w.cols)
        e0 = self.n_t + self.e_off[id(w)]
        e = self.buf[e0:e0 + w.rows * w.n_groups].view(w.rows, w.n_groups) if scale_step else None
        return _VoteBuffers(w, t, e)


class DataParallelKernelVotes(DataParallelVotes, KernelVotes):
    """Fused votes under data parallelism: the vote kernel casts this rank's votes into the weight's slice of the
    device's :class:`VoteBucket` (zeroed at the step's first vote) instead of its accumulators;
    :meth:`exchange_votes` all-reduces the whole bucket once, clamps each weight's sum like the dense path, adds
    the scale votes to ``E_accum`` and hands the trit votes to the flip kernel (accumulate + flip in one pass).
    The resulting state equals the dense path's per-call reduce-and-accumulate exactly: a vote starts from 0
    and ``|v| <= vote_clip``, so the kernel's saturating add into the zeroed slice is the vote itself.

    The bucket holds the weights that voted here in the first step (so it carries no slice for weights voted
    elsewhere, e.g. embeddings); until it exists, and for a weight called again in the same step (shared
    weights) or not in it, votes take the immediate path: zeroed buffers, all-reduce, accumulate. Scale votes
    follow the host step counter, so this backend is not for CUDA-graph capture; gpu-signcache's vote cache is
    not used here.
    """

    def __init__(self, ctx: VoteContext, comm) -> None:
        super().__init__(ctx, comm)
        self.buckets: dict[torch.device, VoteBucket] = {}
        self.first_step: dict[torch.device, dict[int, TernaryScaleTensor]] = {}  # fused-voted weights, first step
        self.reduced: dict[int, tuple[TernaryScaleTensor, vote_ops.VoteCache]] = {}  # summed votes for the flips

    @torch.no_grad()
    def cast_fused_matmul_votes(self, weight: TernaryScaleTensor, gy: torch.Tensor, x: torch.Tensor, group: dict,
                                lr) -> None:
        ctx = self.ctx
        call = ctx.counters.call_index(weight)
        interval = group["scale_update_interval"]
        scale_step = weight.scale_mode == "int" and interval > 0 and ctx.counters.step % interval == 0
        dev = gy.device
        bucket = self.buckets.get(dev)
        if bucket is None:  # the first step learns which weights vote here; end_step() then builds the bucket
            self.first_step.setdefault(dev, {})[id(weight)] = weight
        deferred = (bucket is not None and id(weight) in bucket.t_off and id(weight) not in bucket.pending
                    and id(weight) not in self.reduced)
        if deferred:
            if not bucket.pending:
                bucket.buf.zero_()
            buffers = bucket.views(weight, scale_step)
            bucket.pending[id(weight)] = (weight, group, scale_step)
        else:
            buffers = _VoteBuffers(weight, torch.zeros_like(weight.T_accum),
                                   torch.zeros_like(weight.E_accum) if scale_step else None)
        world = self.world_size
        g = dict(group, lr=lr / world, decay=group["decay"] / world,
                 scale_update_interval=interval if scale_step else 0)
        vote_ops.cast_matmul_votes(buffers, gy, x, g, seed=self._vote_seed(), step=ctx.counters.device_step(dev),
                                   call=call, calls_per_step=CALLS_PER_STEP, nonfinite=ctx.finite.counter(dev))
        if not deferred:
            self._accumulate(weight.T_accum, buffers.T_accum, None, group["vote"], group["vote_clip"])
            if scale_step:
                self._accumulate(weight.E_accum, buffers.E_accum, None, group["scale_vote"], group["vote_clip"])

    def exchange_votes(self) -> None:
        """Collective (every rank, every step, before anything can raise): all-reduce each device's vote bucket
        in one call, add the clamped scale-vote sums to ``E_accum`` and keep the clamped trit-vote sums as 8-bit
        vote caches for the flip kernel."""
        for bucket in self.buckets.values():
            if not bucket.pending:
                continue
            scale = any(sc for _, _, sc in bucket.pending.values())
            total = self.comm.sum_votes(bucket.buf[:bucket.n_t + (bucket.n_e if scale else 0)])
            for key, (w, group, scale_step) in bucket.pending.items():
                t0 = bucket.t_off[key]
                v = finish_sum(total[t0:t0 + w.rows * w.cols], group["vote"], group["vote_clip"], torch.int8)
                self.reduced[key] = (w, vote_ops.VoteCache(v.view(torch.uint8), 8, v.numel(), pending=True))
                if scale_step:
                    e0 = bucket.n_t + bucket.e_off[key]
                    vE = finish_sum(total[e0:e0 + w.rows * w.n_groups], group["scale_vote"], group["vote_clip"],
                                    torch.int8)
                    w.E_accum.copy_(accumulate(w.E_accum, vE.view_as(w.E_accum)))
            bucket.pending.clear()

    def skip_flips(self) -> None:
        """Accumulate the summed votes into ``T_accum`` without flipping."""
        for w, cache in self.reduced.values():
            flip_ops.flush_vote_cache_(w, cache)
        self.reduced.clear()

    def _pending_cache(self, m: TernaryScaleTensor) -> vote_ops.VoteCache | None:
        reduced = self.reduced.pop(id(m), None)
        return reduced[1] if reduced is not None else super()._pending_cache(m)

    def end_step(self) -> None:
        """After the first data-parallel step: the vote buckets, one per device."""
        for dev, seen in self.first_step.items():
            if dev not in self.buckets:
                self.buckets[dev] = VoteBucket(list(seen.values()), dev)
        self.first_step.clear()

    def drop_votes(self) -> None:
        super().drop_votes()
        for bucket in self.buckets.values():
            bucket.pending.clear()
        self.reduced.clear()
