"""Optimisers: the FlipOptimizer (votes and flips on ternary state), SignGSD, and the hybrid helper.

FlipOptimizer follows ``torch.optim.Optimizer``: ``param_groups`` carry the flip-rule
hyper-parameters (``lr`` is the vote scale, so ``torch.optim.lr_scheduler`` schedules it),
``step()`` applies flips, ``state_dict()`` round-trips. Its "params" are the ``T_accum`` buffers of
the ternary weights it trains (and the ``q`` buffers of integer biases); there are no float
weights and no per-weight float state. Votes are cast during backward, when the layer's autograd
function hands the transient weight gradient to :meth:`FlipOptimizer.cast_votes`.

Construct it after the model is on its device (like any optimiser).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import rng
from .layers import IntegerBias
from .ops.linear import KERNEL_BACKENDS, KERNEL_DTYPES, kernels_can_run
from .rule import (
    NORM_TILE_FRAC,
    NORM_TILE_MIN,
    FlipRule,
    accumulate,
    apply_flips,
    apply_scale_flips,
    block_factored_stats,
    code_value,
    ema_block_factored_stats,
    empty_norm_codes,
    factored_ms,
    leak,
    log2_code,
    real_rows,
    scale_gradient,
    sign_votes,
    stochastic_votes,
    uses_norm_memory,
    vote_multiplier,
    vote_scale,
)
from .weight import TernaryScaleTensor, ternary_weights

BACKENDS = ("auto", "dense-fallback", "none", "gpu", "gpu-signcache")
_NORM_SALT = 0x4E4F524D  # RNG key salt of the norm_beta codes' rounding (one stream for all ranks)
_CALLS_PER_STEP = 1024  # RNG counter slots per step: a layer may be called this often per step
_BIAS_CLIP = 2**20
_BIAS_Q_MAX = 2**31 - 1  # a bias's int32 q saturates at +-(2**31 - 1) (cast_bias_votes)


class _VoteBuffers:
    """A ternary weight seen by the vote kernels with other accumulators: its trits, shape and RNG stream, and
    the given ``T_accum`` / ``E_accum`` buffers (data-parallel votes are cast into zeroed ones)."""

    def __init__(self, weight: TernaryScaleTensor, T_accum: torch.Tensor, E_accum: torch.Tensor | None) -> None:
        self.rows, self.cols, self.n_groups = weight.rows, weight.cols, weight.n_groups
        self.group_size = weight.group_size
        self.T_packed, self.stream, self.scale_mode = weight.T_packed, weight.stream, weight.scale_mode
        self.T_accum, self.E_accum = T_accum, E_accum


class _DataParallelVotes:
    """Data-parallel vote bucket of the gpu backends on one device: one flat int8 buffer with a slice per
    ternary weight, trit votes first, then scale votes (layout below), so one all-reduce per step carries
    every fused vote, as DDP buckets gradients.

        buf[t_off[w] : t_off[w] + rows*cols]            weight w's trit votes, row-major
        buf[n_T + e_off[w] : n_T + e_off[w] + rows*ng]  weight w's scale votes (exchanged on scale steps only)

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


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``FlipOptimizer.step`` when a backward pass produced NaN or inf weight gradients."""


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown update backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        from .ops import triton_available

        return "gpu" if torch.cuda.is_available() and triton_available() else "dense-fallback"
    if name in ("gpu", "gpu-signcache"):
        if not torch.cuda.is_available():
            raise ValueError(f"update backend {name!r} needs a CUDA device; use 'dense-fallback' on CPU")
        from .ops import triton_available

        if not triton_available():
            raise ValueError(f"update backend {name!r} needs Triton (pip install triton)")
    return name


def _trainable_modules(obj) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        mods = ternary_weights(obj)
        mods += [m for m in obj.modules() if isinstance(m, IntegerBias)]
        return mods
    out: list[nn.Module] = []
    for m in obj:
        if not isinstance(m, (TernaryScaleTensor, IntegerBias, nn.Module)):
            raise TypeError(f"FlipOptimizer trains TernaryScaleTensor/IntegerBias modules, got {type(m).__name__}")
        out += _trainable_modules(m) if not isinstance(m, (TernaryScaleTensor, IntegerBias)) else [m]
    return out


def _state_tensor(m: nn.Module) -> torch.Tensor:
    return m.T_accum if isinstance(m, TernaryScaleTensor) else m.q


class FlipOptimizer(torch.optim.Optimizer):
    """Trains ternary weights by integer votes and flips.

    Args:
        params: a model (every TernaryScaleTensor / IntegerBias inside it), an iterable of such
            modules, or a list of param-group dicts ``{"params": modules, **rule_overrides}``.
        lr: vote scale (expected votes per unit of RMS-normalised gradient); defaults to ``rule.lr``.
        rule: a :class:`FlipRule` (default: ``FlipRule()``); keyword overrides of its fields
            (``accum_threshold=...``, ``scale_update_interval=...``) are applied on top.
        backend: ``dense-fallback`` (plain PyTorch), ``none`` (forward/backward only, no update),
            ``gpu`` / ``gpu-signcache`` (Triton kernels), or ``auto``.
        seed: key of the counter-based RNG behind stochastic votes.
        check_finite: drop a layer's votes when its gradient has NaN/inf and raise
            :class:`NonFiniteGradientError` from the next ``step()`` (one device sync per step).
    """

    def __init__(
        self,
        params,
        lr: float | None = None,
        *,
        rule: FlipRule | None = None,
        backend: str = "dense-fallback",
        seed: int = 0,
        check_finite: bool = True,
        **rule_overrides,
    ) -> None:
        rule = FlipRule() if rule is None else FlipRule.from_dict(rule.to_dict())
        if lr is not None:
            rule_overrides["lr"] = lr
        rule = FlipRule.from_dict({**rule.to_dict(), **rule_overrides})
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.backend = resolve_backend(backend)
        self.seed = seed
        self.check_finite = check_finite
        # Data parallelism (trueternary.distributed): an object with ``world_size``, ``rank`` and
        # ``sum_votes(int tensor) -> int tensor`` (an integer all-reduce). None: one process.
        self.comm = None
        self._step = 0
        self._calls: dict[int, int] = {}
        self._nonfinite: torch.Tensor | None = None
        # defer_finite_check (CUDA-graphed steps): step() moves the count here instead of reading it
        self.last_step_nonfinite: torch.Tensor | None = None
        # gpu backends: the step counter on each device the kernels run on (they derive RNG keys from it),
        # and gpu-signcache's vote caches {id(weight): (weight, VoteCache)}
        self._step_dev: dict[torch.device, torch.Tensor] = {}
        self._lr_dev: list[torch.Tensor] | None = None  # use_device_lr: each param group's lr on the device
        self._vote_caches: dict[int, tuple] = {}
        # gpu backends under data parallelism: the vote bucket per device, and the reduced votes awaiting
        # the flip kernel {id(weight): VoteCache}
        self._dp_buckets: dict[torch.device, _DataParallelVotes] = {}
        self._dp_seen: dict[torch.device, dict[int, TernaryScaleTensor]] = {}  # fused-voted weights, first step
        self._dp_caches: dict[int, object] = {}
        self.last_flips: torch.Tensor = torch.zeros((), dtype=torch.int64)
        self.last_scale_flips: torch.Tensor = torch.zeros((), dtype=torch.int64)

        if isinstance(params, (nn.Module, TernaryScaleTensor)):
            groups = [{"params": _trainable_modules(params)}]
        else:
            params = list(params)
            if params and isinstance(params[0], dict):
                groups = [dict(g, params=_trainable_modules(g["params"])) for g in params]
            else:
                groups = [{"params": _trainable_modules(params)}]
        self._group_modules: list[list[nn.Module]] = []
        tensor_groups = []
        stream = 0
        for gi, g in enumerate(groups):
            overrides = {k: v for k, v in g.items() if k != "params"}
            FlipRule.from_dict({**rule.to_dict(), **overrides})  # validate the group's rule
            for m in g["params"]:
                if getattr(m, "inference_only", False):
                    raise ValueError("cannot train a weight whose training state was released (inference only)")
                # A weight has one voter: a newer FlipOptimizer over the same model takes it over.
                m._voter = None if self.backend == "none" else self
                m._group_index = gi
                m.stream = stream
                stream += 1
            self._group_modules.append(list(g["params"]))
            tensor_groups.append(dict(overrides, params=[_state_tensor(m) for m in g["params"]]))
        if not any(self._group_modules):
            raise ValueError("FlipOptimizer got no ternary weights to train (did you call ternarize()?)")
        super().__init__(tensor_groups, rule.to_dict())

    # ------------------------------------------------------------------ device lr (CUDA-graphed steps)
    def use_device_lr(self, device: torch.device | str) -> None:
        """Read each param group's lr from a 0-dim float32 tensor on ``device`` in every vote (kernels and dense
        path alike) instead of the group's number, which a captured CUDA graph would keep as a constant. Call
        before capturing a step; then :meth:`write_device_lr` before each replay, after the schedule has set the
        groups' ``lr``. ``lr * scale_lr`` (scale votes) is then a float32 product on the device."""
        self._lr_dev = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in self.param_groups]

    def write_device_lr(self) -> None:
        """Copy the param groups' lr into the device tensors of :meth:`use_device_lr` (not capturable: run it
        between replays)."""
        for t, g in zip(self._lr_dev or [], self.param_groups):
            t.fill_(float(g["lr"]))

    def defer_finite_check(self, device: torch.device | str) -> None:
        """Keep the NaN/inf gradient check without its host read, for a step captured in a CUDA graph.

        Layer gradients with NaN/inf still have their votes dropped and are still counted on the device, but
        :meth:`step` moves the count into ``last_step_nonfinite`` (a 0-dim int32 device tensor) and zeroes it
        instead of reading it and raising: the caller reads it after the step (``Recipe.use_cuda_graph`` turns
        a non-zero count into a NaN loss). Unlike the raising check, that step's flips are applied."""
        dev = torch.device(device)
        self.check_finite = True
        self._nonfinite_counter(dev)  # created now: a graph must not allocate it
        self.last_step_nonfinite = torch.zeros((), dtype=torch.int32, device=dev)

    def create_step_state(self, device: torch.device | str, row_voted: set[int] = frozenset()) -> None:
        """Create now the state a gpu step creates on first use: the device step counter and, under a
        ``norm_beta`` rule, the moving averages' codes of every weight voted whole (not those whose ids are in
        ``row_voted``: embeddings vote per row and keep none). A CUDA graph captured before they exist would
        allocate them inside the graph, and each replay would start them afresh."""
        self._device_step(torch.device(device))
        for group, mods in zip(self.param_groups, self._group_modules):
            if uses_norm_memory(group):
                for m in mods:
                    if isinstance(m, TernaryScaleTensor) and id(m) not in row_voted:
                        self._norm_codes(m, group)

    def _lr(self, group) -> float | torch.Tensor:
        """The lr the votes of ``group`` use: its number, or its device tensor after :meth:`use_device_lr`."""
        if self._lr_dev is None:
            return group["lr"]
        return self._lr_dev[next(i for i, g in enumerate(self.param_groups) if g is group)]

    # ------------------------------------------------------------------ votes (called in backward)
    def _finite_flag(self, g: torch.Tensor) -> torch.Tensor | None:
        """Record (on device, no sync) whether this gradient is finite; returns the 0-dim 'bad' flag."""
        counter = self._nonfinite_counter(g.device)
        if counter is None:
            return None
        bad = ~torch.isfinite(g).all()  # by element: a sum of squares would overflow for finite g beyond 1.8e19
        counter += bad.to(torch.int32)
        return bad

    def _nonfinite_counter(self, device: torch.device) -> torch.Tensor | None:
        """The int32 count of non-finite layer gradients this step, on ``device`` (None without check_finite)."""
        if not self.check_finite:
            return None
        if self._nonfinite is None or self._nonfinite.device != device:
            self._nonfinite = torch.zeros((), dtype=torch.int32, device=device)
        return self._nonfinite

    def _call_index(self, m: nn.Module) -> int:
        """This step's index of the vote call for ``m`` (counted on the host, modulo ``_CALLS_PER_STEP``)."""
        c = self._calls.get(id(m), 0)
        self._calls[id(m)] = c + 1
        return c % _CALLS_PER_STEP

    def _counter(self, m: nn.Module) -> int:
        """The RNG counter of this call for ``m`` from the host step: ``step * _CALLS_PER_STEP + call``."""
        return self._step * _CALLS_PER_STEP + self._call_index(m)

    def _world(self) -> int:
        return self.comm.world_size if self.comm is not None else 1

    def _votes(self, group, g, lr, stream, counter, clip, normalize, T=None, decay=0.0, index=None, s=None,
               n_rows=None):
        """Votes for one gradient: sign votes, or stochastic votes normalised per call (rule.py).

        ``n_rows`` (0-dim tensor): only the first ``n_rows`` rows of ``g`` are real; the normalisation averages
        over them (rule.vote_scale). The votes of the other rows are not zero (decay, the random offset):
        the caller drops them (:meth:`_accumulate`'s ``real``).

        Under data parallelism each rank votes on its own gradient with ``lr / world_size`` and
        ``decay / world_size`` and its own random stream; :meth:`_reduce` then sums the ranks' votes, so the
        expected total is ``s * mean(gradients) - decay * T`` and every rank adds the same integers to its state.
        """
        if group["vote"] == "sign":
            return sign_votes(g)
        p = group["vote_power"]
        if s is None and p != 1:  # compress (p < 1) the normalised magnitudes: g -> sign(g) |g / rms|**p, s = -lr
            s1 = vote_scale(g, 1.0, normalize, group["norm_block"], n_rows)
            g = torch.sign(g) * (g * s1).abs().pow(p)
            s = torch.as_tensor(-lr, dtype=torch.float32, device=g.device)
        elif s is None:  # (given: from the statistics' moving averages, norm_beta's _ema_scale)
            s = vote_scale(g, lr, normalize, group["norm_block"], n_rows)
        key = rng.stream_key(self._rank_seed(), stream, counter)
        if self._world() > 1:  # both terms of the vote are split over the ranks, so their sum is one vote's
            s = s / self._world()
            decay = decay / self._world()
        return stochastic_votes(g, s, key, clip, T, decay, index)

    def _rank_seed(self) -> int:
        """The RNG seed of this rank's votes: ``seed`` in one process and on rank 0 (which therefore votes like
        a single process), ``seed ^ mix32(0x5EED0000 + rank)`` on rank r > 0 (dense path and kernels alike)."""
        rank = self.comm.rank if self.comm is not None else 0
        return self.seed ^ rng.mix32_int(0x5EED0000 + rank) if rank else self.seed

    def _reduce(self, v: torch.Tensor, group, clip: int) -> torch.Tensor:
        """Sum votes over data-parallel ranks (integers: int8 votes travel as int16/int32)."""
        if self._world() == 1:
            return v
        return self._finish_sum(self.comm.sum_votes(v), group["vote"], clip, v.dtype)

    @staticmethod
    def _finish_sum(total: torch.Tensor, vote: str, clip: int, dtype: torch.dtype) -> torch.Tensor:
        """The all-reduced vote sum as one vote: its sign for sign votes (signSGD with majority vote),
        else clamped to ``+-clip`` (the saturation one rank's vote has)."""
        if vote == "sign":
            return torch.sign(total).to(dtype)
        return total.clamp(-clip, clip).to(dtype)

    @torch.no_grad()
    def cast_matmul_votes(self, weight: TernaryScaleTensor, gy: torch.Tensor, x: torch.Tensor,
                          T: torch.Tensor | None) -> None:
        """Votes for a linear map's weight, whose gradient is ``gy.T @ x`` (gy: (M, rows), x: (M, cols)).

        The dense-fallback backend forms the gradient and calls :meth:`cast_votes`; the gpu backends turn it
        into votes in the vote kernel's epilogue (``ops.votes``: gradient tiles formed in the kernel, or read
        from cuBLAS's gW for large batches), when the rule is one the kernel implements
        (``ops.votes.fused_votes_supported``), else they take the dense path.
        ``T`` may be None (the kernel path decodes trits from ``T_packed`` itself).
        """
        group = self.param_groups[weight._group_index]
        if self._kernel_weight(gy) and gy.dtype in KERNEL_DTYPES and x.dtype == gy.dtype:
            from .ops.votes import fused_votes_supported

            # (norm_beta under data parallelism: the dense path, which all-reduces the statistics)
            if fused_votes_supported(group) and not (uses_norm_memory(group) and self._world() > 1):
                self._fused_matmul_votes(weight, gy, x, group)
                return
        self.cast_votes(weight, (gy.t() @ x).float(), weight.trits() if T is None else T)

    # ------------------------------------------------------------------ gpu backends (Triton kernels)
    def _kernel_weight(self, t: torch.Tensor) -> bool:
        """Whether votes/flips on tensors like ``t`` run on the Triton kernels: a gpu backend and a device they
        run on (under data parallelism too: see :meth:`_fused_votes_data_parallel`)."""
        return self.backend in KERNEL_BACKENDS and kernels_can_run(t)

    def _device_step(self, device: torch.device) -> torch.Tensor:
        """The step counter as a 0-dim int64 tensor on ``device``, created from the host counter on first use.

        ``step()`` advances it with a device op, so a captured CUDA graph replays with fresh RNG keys (the
        host counter does not advance during replays: :meth:`state_dict` reads this one back).
        """
        t = self._step_dev.get(device)
        if t is None:
            t = self._step_dev[device] = torch.full((), self._step, dtype=torch.int64, device=device)
        return t

    def _advance_step(self) -> None:
        self._step += 1
        for t in self._step_dev.values():
            t.add_(1)

    def _fused_matmul_votes(self, weight: TernaryScaleTensor, gy: torch.Tensor, x: torch.Tensor, group) -> None:
        """``ops.votes.cast_matmul_votes`` with this optimiser's keys, counters and (gpu-signcache) vote cache.

        No host sync: the RNG counter is the device step plus this call's index (a host constant of the
        step's call sequence), and the non-finite check only bumps a device counter.
        """
        from .ops.votes import VoteCache, cast_matmul_votes

        c = self._calls.get(id(weight), 0)
        self._calls[id(weight)] = c + 1
        if self._world() > 1:
            self._fused_votes_data_parallel(weight, gy, x, group, c)
            return
        cache = None
        if self.backend == "gpu-signcache":
            entry = self._vote_caches.get(id(weight))
            cache = entry[1] if entry is not None else None
            if cache is None or cache.bits != VoteCache.bits_for(group["vote"], group["vote_clip"], weight.cols):
                if cache is not None and cache.pending:  # the rule changed: apply the old layout's votes first
                    from .ops.flip import flush_vote_cache_

                    flush_vote_cache_(weight, cache)
                cache = VoteCache.for_weight(weight, group["vote"], group["vote_clip"])
                self._vote_caches[id(weight)] = (weight, cache)
        nonfinite = self._nonfinite_counter(gy.device)
        step = self._device_step(gy.device)
        codes = self._norm_codes(weight, group) if uses_norm_memory(group) else None
        if self._lr_dev is not None:
            group = dict(group, lr=self._lr(group))
        cast_matmul_votes(weight, gy, x, group, seed=self.seed, step=step, call=c % _CALLS_PER_STEP,
                          calls_per_step=_CALLS_PER_STEP, nonfinite=nonfinite, cache=cache, norm_codes=codes,
                          norm_seed=self.seed ^ _NORM_SALT)

    def _fused_votes_data_parallel(self, weight: TernaryScaleTensor, gy: torch.Tensor, x: torch.Tensor, group,
                                   call: int) -> None:
        """Fused votes under data parallelism: the vote kernel casts this rank's votes into the weight's slice
        of the device's vote bucket (:class:`_DataParallelVotes`, zeroed at the step's first vote) instead of
        its accumulators; :meth:`step` all-reduces the whole bucket once, clamps each weight's sum like
        :meth:`_reduce`, adds the scale votes to ``E_accum`` and hands the trit votes to the flip kernel
        (accumulate + flip in one pass). The resulting state equals the dense path's per-call
        reduce-and-accumulate (:meth:`_accumulate`) exactly.

        As on the dense path, each rank votes with ``lr / world_size``, ``decay / world_size`` and its own
        random stream (:meth:`_rank_seed`), so both paths cast the same votes where the arithmetic is exact.
        A vote starts from 0 and ``|v| <= vote_clip``, so the kernel's saturating add into the zeroed slice is
        the vote itself. The bucket holds the weights that voted here in the first step (so it carries no
        slice for weights voted elsewhere, e.g. embeddings); until it exists, and for a weight called again
        in the same step (shared weights) or not in it, votes take the immediate path: zeroed buffers,
        all-reduce, accumulate. Scale votes follow the host step
        counter, so this path is not for CUDA-graph capture; gpu-signcache's vote cache is not used here.
        """
        from .ops.votes import cast_matmul_votes

        interval = group["scale_update_interval"]
        scale_step = weight.scale_mode == "int" and interval > 0 and self._step % interval == 0
        dev = gy.device
        bucket = self._dp_buckets.get(dev)
        if bucket is None:  # the first step learns which weights vote here; step() then builds the bucket
            self._dp_seen.setdefault(dev, {})[id(weight)] = weight
        deferred = (bucket is not None and id(weight) in bucket.t_off and id(weight) not in bucket.pending
                    and id(weight) not in self._dp_caches)
        if deferred:
            if not bucket.pending:
                bucket.buf.zero_()
            buffers = bucket.views(weight, scale_step)
            bucket.pending[id(weight)] = (weight, group, scale_step)
        else:
            buffers = _VoteBuffers(weight, torch.zeros_like(weight.T_accum),
                                   torch.zeros_like(weight.E_accum) if scale_step else None)
        nonfinite = self._nonfinite_counter(dev)
        g = dict(group, lr=group["lr"] / self._world(), decay=group["decay"] / self._world(),
                 scale_update_interval=interval if scale_step else 0)
        cast_matmul_votes(buffers, gy, x, g, seed=self._rank_seed(), step=self._device_step(dev),
                          call=call % _CALLS_PER_STEP, calls_per_step=_CALLS_PER_STEP, nonfinite=nonfinite)
        if not deferred:
            self._accumulate(weight.T_accum, buffers.T_accum, None, group)
            if scale_step:
                self._accumulate(weight.E_accum, buffers.E_accum, None, dict(group, vote=group["scale_vote"]))

    def _reduce_vote_buckets(self) -> None:
        """Collective (every rank, every step, before anything can raise): all-reduce each device's vote
        bucket in one call, add the clamped scale-vote sums to ``E_accum`` and keep the clamped trit-vote
        sums as 8-bit vote caches for the flip kernel (``_dp_caches``)."""
        from .ops.votes import VoteCache

        for bucket in self._dp_buckets.values():
            if not bucket.pending:
                continue
            scale = any(sc for _, _, sc in bucket.pending.values())
            total = self.comm.sum_votes(bucket.buf[:bucket.n_t + (bucket.n_e if scale else 0)])
            for key, (w, group, scale_step) in bucket.pending.items():
                t0 = bucket.t_off[key]
                v = self._finish_sum(total[t0:t0 + w.rows * w.cols], group["vote"], group["vote_clip"], torch.int8)
                self._dp_caches[key] = VoteCache(v.view(torch.uint8), 8, v.numel(), pending=True)
                if scale_step:
                    e0 = bucket.n_t + bucket.e_off[key]
                    vE = self._finish_sum(total[e0:e0 + w.rows * w.n_groups], group["scale_vote"],
                                          group["vote_clip"], torch.int8)
                    w.E_accum.copy_(accumulate(w.E_accum, vE.view_as(w.E_accum)))
            bucket.pending.clear()

    def _flush_dp_caches(self) -> None:
        """Accumulate reduced data-parallel votes into ``T_accum`` without flipping (a step that raises)."""
        from .ops.flip import flush_vote_cache_

        for key, cache in self._dp_caches.items():
            w = next(m for ms in self._group_modules for m in ms if id(m) == key)
            flush_vote_cache_(w, cache)
        self._dp_caches.clear()

    def _kernel_flips(self, m: TernaryScaleTensor, group, counts: dict) -> bool:
        """Leak + flips + repack (+ scale flips, + pending vote cache) of one weight in one kernel launch;
        ``counts[device]`` (int32 (2,)) receives the flip counts. Returns whether E was considered."""
        from .ops.flip import apply_flips_

        dev = m.T_accum.device
        if dev not in counts:
            counts[dev] = torch.zeros(2, dtype=torch.int32, device=dev)
        scale = m.scale_mode == "int" and bool(group["scale_update_interval"])
        entry = self._vote_caches.get(id(m))
        cache = self._dp_caches.pop(id(m), None) or (entry[1] if entry is not None else None)
        apply_flips_(m, group["accum_threshold"], group["clip_at_bounds"], group["scale_threshold"] if scale else None,
                     counts[dev], cache=cache, leak=group["leak"], reset=group.get("flip_reset", 0))
        return scale

    def _flush_vote_caches(self, drop: bool = False) -> None:
        """Apply (or, with ``drop``, discard) every pending gpu-signcache vote cache to its ``T_accum``."""
        from .ops.flip import flush_vote_cache_

        for weight, cache in self._vote_caches.values():
            if cache.pending:
                if drop:
                    cache.pending = False
                else:
                    flush_vote_cache_(weight, cache)

    @torch.no_grad()
    def cast_votes(self, weight: TernaryScaleTensor, g: torch.Tensor, T: torch.Tensor, rows=None,
                   n_rows: torch.Tensor | None = None) -> None:
        """Turn the weight gradient ``g`` (of ``rows``, default all) into votes in ``T_accum`` / ``E_accum``.

        Row calls (``rows`` given: an embedding's backward, ``ops.embedding``) read no tensor on the host, so a
        CUDA graph can capture them with the rest of the step: ``g`` and ``T`` are the weight's rows ``rows``,
        of which only the first ``n_rows`` (a 0-dim device tensor; default all) are real. The normalisation
        averages over the real rows, the others cast no votes and their accumulators keep their values. Their
        RNG counter is the device step (:meth:`_device_step`) times ``_CALLS_PER_STEP`` plus the call index (the
        host counter's value, which a replayed graph would not advance), and the scale-vote interval is tested
        on the device step. Dense calls (``rows`` None) keep the host counter and host interval test.
        """
        group = self.param_groups[weight._group_index]
        g = g.float()
        bad = self._finite_flag(g)
        if bad is not None:  # a layer whose gradient has NaN/inf casts no votes
            g = torch.where(bad, torch.zeros_like(g), g)
        interval = group["scale_update_interval"]
        scale_votes = weight.scale_mode == "int" and interval > 0
        index = real = None
        if rows is None:
            counter = self._counter(weight)
            scale_votes = scale_votes and self._step % interval == 0
        else:
            step = self._device_step(g.device)
            counter = step * _CALLS_PER_STEP + self._call_index(weight)
            cols = torch.arange(weight.cols, device=g.device)
            index = (rows.reshape(-1, 1) * weight.cols + cols).reshape(-1)  # RNG offsets: the rows' weight positions
            n = rows.numel()
            # (n, 1): the rows that vote (all of them without n_rows)
            real = real_rows(n_rows, n, g.device)[:, None] if n_rows is not None else None
        s = None
        if uses_norm_memory(group) and rows is None and g.dim() == 2:  # (embedding rows: per call, no memory)
            s = self._ema_scale(weight, group, g, counter, bad)
        v = self._votes(group, g, self._lr(group), 2 * weight.stream, counter, group["vote_clip"],
                        group["normalize"], T, group["decay"], index, s=s, n_rows=n_rows)
        self._accumulate(weight.T_accum, v, rows, group, real)

        if not scale_votes:
            return
        gE = scale_gradient(g, T, weight.group_size)
        eidx = None
        if rows is not None:
            gidx = torch.arange(weight.n_groups, device=g.device)
            eidx = (rows.reshape(-1, 1) * weight.n_groups + gidx).reshape(-1)
            on = step % interval == 0  # scale steps decided on the device (no host step read)
            real = on if real is None else real & on
        group_e = dict(group, vote=group["scale_vote"])
        vE = self._votes(group_e, gE, self._lr(group) * group["scale_lr"], 2 * weight.stream + 1, counter,
                         group["vote_clip"], group["normalize"], index=eidx, n_rows=n_rows)
        self._accumulate(weight.E_accum, vE, rows, group_e, real)

    def _ema_scale(self, weight: TernaryScaleTensor, group, g: torch.Tensor, counter: int,
                   bad: torch.Tensor | None = None) -> torch.Tensor:
        """``s`` of the votes under ``norm_beta > 0``: the 'block_factored' statistics as moving averages kept in
        integer codes in this optimiser's state of the weight (rule.ema_block_factored_stats). Under data
        parallelism every rank averages the ranks' statistics (geometric mean, exact integer all-reduce) and
        rounds with the same random numbers, so all ranks keep the same codes. A non-finite gradient (``bad``,
        a 0-dim device flag: no host sync) leaves the codes as they were."""
        stats = block_factored_stats(g, group["norm_block"])
        if self._world() > 1:
            stats = tuple(self._rank_mean(t) for t in stats)
            if bad is not None:  # one rank's bad gradient keeps every rank's codes (they must stay equal)
                bad = self.comm.sum_votes(bad.to(torch.int32).reshape(1))[0] > 0
        factors = self._norm_memory(weight, group, counter, stats, bad)
        return vote_multiplier(factored_ms(*factors, g.shape), self._lr(group))

    def _norm_memory(self, weight: TernaryScaleTensor, group, counter: int, stats, bad=None):
        """One step of the weight's moving averages from this call's ``stats`` (rule.ema_block_factored_stats):
        stores the new codes (kept as they were where ``bad``) and returns the means they stand for. ``counter``
        keys the codes' rounding (the fused kernels derive the same key on the device)."""
        key = rng.stream_key(self.seed ^ _NORM_SALT, weight.stream, counter)
        codes = self._norm_codes(weight, group)
        factors, new = ema_block_factored_stats(stats, codes, group["norm_beta"], key)
        for k, v in new.items():
            codes[k].copy_(v if bad is None else torch.where(bad, codes[k], v))
        return factors

    def _norm_codes(self, weight: TernaryScaleTensor, group) -> dict[str, torch.Tensor]:
        """The weight's moving-average codes in this optimiser's state (rule.empty_norm_codes on first use)."""
        st = self.state[weight.T_accum]
        if "norm_tile" not in st:
            st.update(empty_norm_codes((weight.rows, weight.cols), group["norm_block"], weight.T_accum.device))
        return {k: st[k] for k in ("norm_tile", "norm_row", "norm_col")}

    def _rank_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' geometric mean of the non-negative ``t``, through log2 codes summed exactly."""
        code = log2_code(t, NORM_TILE_FRAC, NORM_TILE_MIN, 32767)
        total = self.comm.sum_votes(code).to(torch.int64)
        return code_value(torch.div(total, self._world(), rounding_mode="floor"), NORM_TILE_FRAC)

    def _accumulate(self, accum: torch.Tensor, v: torch.Tensor, rows, group, real=None) -> None:
        """Add the votes ``v`` of ``rows`` (default all) to ``accum``, summed over data-parallel ranks.

        ``real`` (bool, broadcastable to ``v``; row calls): the votes that count. The others are zeroed by a
        mask, not dropped by boolean indexing (no data-dependent shapes): a saturating add of 0 keeps ``accum``
        bit for bit.
        """
        if real is not None:
            v = torch.where(real, v, torch.zeros_like(v))
        if self._world() > 1 and rows is not None:
            # ranks touch different rows: exchange dense votes (zeros for rows this rank did not touch)
            dense = torch.zeros(accum.shape, dtype=v.dtype, device=v.device)
            dense[rows] = v
            v, rows = dense, None
        v = self._reduce(v, group, group["vote_clip"])
        if rows is None:
            accum.copy_(accumulate(accum, v))
        else:
            accum[rows] = accumulate(accum[rows], v)

    @torch.no_grad()
    def cast_bias_votes(self, bias: IntegerBias, g: torch.Tensor) -> None:
        """Votes for an integer bias go straight into its int32 ``q`` (it is its own accumulator)."""
        group = self.param_groups[bias._group_index]
        g = g.float()
        bad = self._finite_flag(g)
        if bad is not None:
            g = torch.where(bad, torch.zeros_like(g), g)
        v = self._votes(group, g, self._lr(group), 2 * bias.stream, self._counter(bias), _BIAS_CLIP, "tensor")
        v = self._reduce(v, group, _BIAS_CLIP)
        q = bias.q.to(torch.int64) + v.to(torch.int64)
        bias.q.copy_(q.clamp(-_BIAS_Q_MAX, _BIAS_Q_MAX).to(torch.int32))

    # ------------------------------------------------------------------ flips (once per step)
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._calls.clear()
        if self._dp_buckets:
            self._reduce_vote_buckets()
        if self._nonfinite is not None and self.check_finite:
            if self.last_step_nonfinite is not None:  # defer_finite_check: the caller reads it, no host read here
                self.last_step_nonfinite.copy_(self._nonfinite)
                self._nonfinite.zero_()
                bad = 0
            else:
                bad = int(self._nonfinite.item())
                self._nonfinite.zero_()
            if bad:
                self._flush_dp_caches()  # as on the dense path, the votes stay accumulated; no flips
                self._advance_step()
                raise NonFiniteGradientError(
                    f"{bad} layer gradient(s) had NaN/inf at step {self._step - 1}; their votes were dropped"
                )
        flips = scale_flips = None
        kernel_counts: dict[torch.device, torch.Tensor] = {}  # gpu backends: (flips, scale flips) per device
        kernel_scale = False
        for group, mods in zip(self.param_groups, self._group_modules):
            if self.backend == "none":
                break
            for m in mods:
                if not isinstance(m, TernaryScaleTensor):
                    continue
                if self._kernel_weight(m.T_accum):
                    kernel_scale |= self._kernel_flips(m, group, kernel_counts)
                    continue
                A = leak(m.T_accum, group["leak"]) if group["leak"] else m.T_accum
                T, A, n = apply_flips(m.trits(), A, group["accum_threshold"], group["clip_at_bounds"],
                                      group.get("flip_reset", 0))
                m._store_trits(T)
                m.T_accum.copy_(A)
                flips = n if flips is None else flips + n
                if m.scale_mode == "int" and group["scale_update_interval"]:
                    E, EA, ne = apply_scale_flips(m.E, m.E_accum, group["scale_threshold"])
                    m.E.copy_(E)
                    m.E_accum.copy_(EA)
                    scale_flips = ne if scale_flips is None else scale_flips + ne
        for dev_counts in kernel_counts.values():
            n = dev_counts[0].to(torch.int64)
            flips = n if flips is None else flips + n.to(flips.device)
            if kernel_scale:
                ne = dev_counts[1].to(torch.int64)
                scale_flips = ne if scale_flips is None else scale_flips + ne.to(scale_flips.device)
        for dev, seen in self._dp_seen.items():  # after the first data-parallel step: the vote buckets
            if dev not in self._dp_buckets:
                self._dp_buckets[dev] = _DataParallelVotes(list(seen.values()), dev)
        self._dp_seen.clear()
        if flips is not None:
            self.last_flips = flips
        if scale_flips is not None:
            self.last_scale_flips = scale_flips
        self._advance_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: votes live in the integer accumulators (kept for API compatibility)."""
        self._calls.clear()

    @property
    def step_count(self) -> int:
        return self._step

    def modules_trained(self) -> list[nn.Module]:
        return [m for mods in self._group_modules for m in mods]

    def state_bytes(self) -> int:
        """Bytes this optimiser holds beyond the modules' own buffers: the integer codes of ``norm_beta``."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values())

    # ------------------------------------------------------------------ persistence
    def state_dict(self):
        # gpu-signcache: pending votes go into T_accum now, so the modules' state is complete; gpu backends:
        # the device step counter is authoritative (replayed CUDA graphs advance only it)
        self._flush_vote_caches()
        if self._step_dev:
            self._step = int(next(iter(self._step_dev.values())).item())
        sd = super().state_dict()
        sd["trueternary"] = {"format": 1, "step": self._step, "seed": self.seed, "backend": self.backend}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load ``state_dict`` after checking all of it (ValueError, nothing changed): the rule of every group, step
        and seed, the moving-average codes, and the integer state of the trained modules it resumes (``T_accum``,
        ``E``, ``E_accum`` in rule.STATE_BOUNDS, bias ``q``), loaded into them beforehand."""
        extra = state_dict.get("trueternary") if isinstance(state_dict, dict) else None
        if not isinstance(extra, dict) or extra.get("format") != 1:
            raise ValueError("not a FlipOptimizer state_dict (missing or unknown 'trueternary' section)")
        for key in ("step", "seed"):
            v = extra.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ValueError(f"FlipOptimizer {key} must be an integer in [0, 2**63), got {v!r}")
        sd = {k: v for k, v in state_dict.items() if k != "trueternary"}
        groups = sd.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"expected {len(self.param_groups)} param groups, got {groups!r:.60}")
        rules = [FlipRule.from_dict({k: v for k, v in g.items() if k != "params"}) for g in groups]
        self._check_resumed_state(sd, rules)
        super().load_state_dict(sd)
        self._step = int(extra["step"])
        self.seed = int(extra["seed"])
        self._flush_vote_caches(drop=True)  # votes cast on the replaced state do not apply to the loaded one
        for bucket in self._dp_buckets.values():
            bucket.pending.clear()
        self._dp_caches.clear()
        for t in self._step_dev.values():
            t.fill_(self._step)


    def _check_resumed_state(self, sd: dict, rules: list[FlipRule]) -> None:
        """ValueError unless the modules' integer state is in range and ``sd["state"]`` holds, per module, only the
        moving-average codes its group's rule keeps, of the right dtypes, shapes and ranges."""
        from .rule import STATE_BOUNDS, check_norm_codes, check_state_range

        state = sd.get("state", {})
        if not isinstance(state, dict):
            raise ValueError(f"optimizer state must be a dict, got {type(state).__name__}")
        ids = {}
        for g, mods, rule in zip(sd["param_groups"], self._group_modules, rules):
            pids = g.get("params")
            if not isinstance(pids, list) or len(pids) != len(mods):
                raise ValueError(f"a param group lists {pids!r:.60} for its {len(mods)} modules")
            ids.update({pid: (m, rule) for pid, m in zip(pids, mods)})
        for pid, st in state.items():
            if pid not in ids or not isinstance(st, dict):
                raise ValueError(f"optimizer state for unknown parameter {pid!r:.40}")
            m, rule = ids[pid]
            if st and not (isinstance(m, TernaryScaleTensor) and uses_norm_memory(rule.to_dict())):
                raise ValueError(f"unexpected optimizer state {sorted(st)} for parameter {pid}")
            if st:
                check_norm_codes(f"parameter {pid}", st, (m.rows, m.cols), rule.norm_block)
        for pid, (m, _) in ids.items():
            if isinstance(m, TernaryScaleTensor):
                for name, (lo, hi) in STATE_BOUNDS.items():
                    check_state_range(f"parameter {pid}: {name}", getattr(m, name), lo, hi)
            else:
                check_state_range(f"parameter {pid}: bias q", m.q, -_BIAS_Q_MAX, _BIAS_Q_MAX)


def norm_codes_of(model: nn.Module, norm_block: int) -> list[dict[str, torch.Tensor]]:
    """The shapes (as meta tensors) of the normaliser codes a FlipOptimizer with ``norm_beta > 0`` keeps for
    ``model``: one set per ternary weight voted whole (an embedding's row votes keep none)."""
    from .layers import TernaryEmbedding

    row_voted = {id(m.weight) for m in model.modules() if isinstance(m, TernaryEmbedding)}
    return [empty_norm_codes((w.rows, w.cols), norm_block, "meta") for w in ternary_weights(model)
            if id(w) not in row_voted]


def _check_lr(lr) -> None:
    if not isinstance(lr, (int, float)) or not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


class _PerParameterOptimizer(torch.optim.Optimizer):
    """A stateless optimiser whose ``step()`` applies ``_update(p, grad, group)`` to every parameter that has a
    gradient (the math lives in a pure per-parameter function)."""

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not bool(torch.isfinite(p.grad).all()):
                    raise NonFiniteGradientError(f"{type(self).__name__} got a NaN/inf gradient")
                self._update(p, p.grad, group)
        return loss


class SignGSD(_PerParameterOptimizer):
    """Stateless sign descent: ``p -= lr * (sign(g) + weight_decay * sign(p))``. Zero optimiser state."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        _check_lr(lr)
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0 or weight_decay == float("inf"):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        signgsd_update_(p, grad, group["lr"], group["weight_decay"])


def signgsd_update_(p: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float) -> None:
    """The per-parameter SignGSD math (pure, in place; ``step()`` has checked that ``grad`` is finite)."""
    upd = torch.sign(grad)
    if weight_decay:
        upd = upd + weight_decay * torch.sign(p)
    p.add_(upd, alpha=-lr)


class TileNormSGD(_PerParameterOptimizer):
    """Normalised descent on float weights with the flip rule's normaliser (a diagnostic baseline):
    ``p -= lr * m / sqrt(ms)``, ``ms`` the rule's factored estimate of ``g**2`` (``rule.block_factored_ms``
    per ``norm_block`` tile for matrices, the mean for vectors) and ``m`` the gradient.

    With the defaults (``beta1 = beta2 = 0``) it is TrueTernary's vote without the integers: no stochastic
    rounding, no accumulator clip, no hysteresis, no history, zero optimiser state. ``beta2 > 0`` replaces
    the factored statistics of the current gradient by their exponential moving average over steps (state:
    per tile-row, tile-column and tile means, ~2/norm_block floats per weight: Adafactor's second moment,
    per tile); ``beta1 > 0`` makes ``m`` a moving average of the gradient (momentum, one float per weight),
    or with ``normalize_first`` a moving average of the normalised step ``g / sqrt(ms)``.
    Behind BitNet_QAT's ternary forward (``BitNet_QAT[optimizer=tile_sgd,beta1=..,beta2=..]`` in ``bench``)
    it says which part of AdamW's history TrueTernary's history-less vote lacks.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, norm_block: int = 64, beta1: float = 0.0,
                 beta2: float = 0.0, normalize_first: bool = False) -> None:
        _check_lr(lr)
        if isinstance(norm_block, bool) or not isinstance(norm_block, int) or norm_block < 1:
            raise ValueError(f"norm_block must be a positive integer, got {norm_block!r}")
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        super().__init__(params, {"lr": lr, "norm_block": norm_block, "beta1": beta1, "beta2": beta2,
                                  "normalize_first": bool(normalize_first)})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p] if group["beta1"] or group["beta2"] else {}  # history-less: no state entry
        tile_norm_update_(p, grad, state, group["lr"], group["norm_block"], group["beta1"], group["beta2"],
                          group["normalize_first"])


def tile_norm_update_(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, norm_block: int,
                      beta1: float = 0.0, beta2: float = 0.0, normalize_first: bool = False) -> None:
    """The per-parameter TileNormSGD math (pure, in place on ``p`` and its ``state``; ``step()`` has checked
    that ``grad`` is finite). Moving averages start at the first step's value (no bias correction needed)."""
    g = grad.float()
    if p.dim() == 2:
        stats = block_factored_stats(g, norm_block)
    else:
        stats = (g.square().mean(),)
    if beta2:
        names = ("row_sq", "col_sq", "tile_sq")[: len(stats)]
        for name, t in zip(names, stats):
            if name not in state:
                state[name] = t.clone()
            state[name].lerp_(t, 1 - beta2)
        stats = tuple(state[name] for name in names)
    ms = factored_ms(*stats, g.shape) if p.dim() == 2 else stats[0]
    s = vote_multiplier(ms, lr)  # -lr / sqrt(ms + 1e-30), like the votes'
    if normalize_first:  # momentum of the normalised step (bounded however small a later ms is)
        g = g * s
        s = 1.0
    if beta1:
        if "exp_avg" not in state:
            state["exp_avg"] = g.clone()
        g = state["exp_avg"].lerp_(g, 1 - beta1)
    p.add_(g * s)


def hybrid_optimizers(
    model: nn.Module, scale_lr: float = 1e-3, scale_weight_decay: float = 0.0, **flip_kwargs
) -> tuple[FlipOptimizer, torch.optim.AdamW]:
    """The non-strict hybrid: trits move by votes, float ``log2_scale`` parameters by AdamW.

    The model must have been ternarised with ``scale_mode="float"``.
    """
    scales = [w.log2_scale for w in ternary_weights(model) if w.log2_scale is not None]
    if not scales:
        raise ValueError("hybrid training needs weights with scale_mode='float' (ternarize(model, scale_mode='float'))")
    flip = FlipOptimizer(model, **flip_kwargs)
    adam = torch.optim.AdamW(scales, lr=scale_lr, betas=(0.9, 0.95), weight_decay=scale_weight_decay)
    return flip, adam
