"""The dense vote backend: rule.py's plain-PyTorch votes on the formed weight gradient, rule.py's flips.

The reference every other backend reproduces (the kernels bit for bit on integer state; docs/performance.md).
Under data parallelism data_parallel.ExchangedVotes casts the same votes, on the ranks' summed gradient.
"""

from __future__ import annotations

import torch

from .. import rng
from ..rule import (
    accumulate,
    apply_flips,
    apply_scale_flips,
    block_factored_stats,
    ema_block_factored_stats,
    factored_ms,
    leak,
    norm_tiles,
    real_rows,
    scale_gradient,
    sign_votes,
    stochastic_votes,
    uses_norm_memory,
    vote_multiplier,
    vote_scale,
)
from ..weight import TernaryScaleTensor
from .backend import FlipCounts, VoteBackend
from .context import BIAS_Q_MAX, BIAS_VOTE_CLIP, CALLS_PER_STEP, NORM_SALT


class DenseVotes(VoteBackend):
    """Votes and flips in plain PyTorch, any device (the ``dense-fallback`` backend)."""

    # ------------------------------------------------------------------ backward
    @torch.no_grad()
    def cast_votes(self, weight: TernaryScaleTensor, g: torch.Tensor, T: torch.Tensor | None, group: dict, lr,
                   rows: torch.Tensor | None = None, n_rows: torch.Tensor | None = None) -> None:
        """Votes of ``g`` into ``T_accum`` / ``E_accum``.

        Row calls (``rows`` given: an embedding's backward, ``ops.embedding``) read no tensor on the host, so a
        CUDA graph can capture them with the rest of the step: ``g`` and ``T`` are the weight's rows ``rows``,
        of which only the first ``n_rows`` (a 0-dim device tensor; default all) are real. The normalisation
        averages over the real rows, the others cast no votes and their accumulators keep their values. Their
        RNG counter is the device step times ``CALLS_PER_STEP`` plus the call index (the host counter's value,
        which a replayed graph would not advance), and the scale-vote interval is tested on the device step.
        Dense calls (``rows`` None) keep the host counter and host interval test.
        """
        counters = self.ctx.counters
        T = weight.trits() if T is None else T
        g = g.float()
        bad = self.ctx.finite.flag(g)
        if bad is not None:  # a layer whose gradient has NaN/inf casts no votes
            g = torch.where(bad, torch.zeros_like(g), g)
        interval = group["scale_update_interval"]
        scale_votes = weight.scale_mode == "int" and interval > 0
        real = real_e = None
        if rows is None:
            counter = counters.host_counter(weight)
            scale_votes = scale_votes and counters.step % interval == 0
        else:
            step = counters.device_step(g.device)
            counter = step * CALLS_PER_STEP + counters.call_index(weight)
            # (n, 1): the rows that vote (all of them without n_rows)
            real = real_rows(n_rows, rows.numel(), g.device)[:, None] if n_rows is not None else None
            if scale_votes:
                on = step % interval == 0  # scale steps decided on the device (no host step read)
                real_e = on if real is None else real & on
        v, vE = self.call_votes(weight, g, T, group, lr, counter, scale_votes, bad, rows=rows, n_rows=n_rows)
        self._accumulate(weight.T_accum, v, rows, real)
        if vE is not None:
            self._accumulate(weight.E_accum, vE, rows, real_e)

    def call_votes(self, weight: TernaryScaleTensor, g: torch.Tensor, T: torch.Tensor, group: dict, lr, counter,
                   scale_votes: bool, bad: torch.Tensor | None = None, *, rows: torch.Tensor | None = None,
                   n_rows: torch.Tensor | None = None, first_row: int | None = None):
        """One call's votes, ``(T votes, scale votes or None)``, shaped like ``g`` and its group sums: the rule of
        rule.py for the float32 gradient ``g`` (zeroed where ``bad``) with the RNG counter ``counter``.

        ``rows`` (a row call): ``g`` and ``T`` are these rows of the weight, the first ``n_rows`` of them real.
        ``first_row`` (a data-parallel rank's share of a whole call, data_parallel.py): ``g`` and ``T`` are the
        weight's rows from ``first_row`` on, a whole number of its normalisation row-tiles, of which the first
        ``n_rows`` are real (None: all); the moving averages move those tiles' codes only. Either way every
        element draws the random number of its position in the weight, so the votes are the whole call's.
        """
        index = eidx = tiles = None
        cols, ng = weight.cols, weight.n_groups
        if rows is not None:  # RNG offsets: the rows' weight positions
            index = (rows.reshape(-1, 1) * cols + torch.arange(cols, device=g.device)).reshape(-1)
            eidx = (rows.reshape(-1, 1) * ng + torch.arange(ng, device=g.device)).reshape(-1)
        elif first_row is not None:
            index = first_row * cols + torch.arange(g.numel(), device=g.device)
            eidx = first_row * ng + torch.arange(g.shape[0] * ng, device=g.device)
            br = norm_tiles((weight.rows, cols), group["norm_block"])[1]
            tiles = slice(first_row // br, first_row // br + g.shape[0] // br)
        s = None
        if uses_norm_memory(group) and rows is None and g.dim() == 2:  # (embedding rows: per call, no memory)
            stats = block_factored_stats(g, group["norm_block"], n_rows)
            factors = self._norm_memory(weight, group, counter, stats, bad, tiles)
            s = vote_multiplier(factored_ms(*factors, g.shape), lr)
        v = self._votes(group["vote"], group, g, lr, 2 * weight.stream, counter, group["vote_clip"],
                        group["normalize"], T, group["decay"], index, s=s, n_rows=n_rows)
        if not scale_votes:
            return v, None
        gE = scale_gradient(g, T, weight.group_size)
        vE = self._votes(group["scale_vote"], group, gE, lr * group["scale_lr"], 2 * weight.stream + 1, counter,
                         group["vote_clip"], group["normalize"], index=eidx, n_rows=n_rows)
        return v, vE

    @torch.no_grad()
    def cast_bias_votes(self, bias, g: torch.Tensor, group: dict, lr) -> None:
        """Votes for an integer bias go straight into its int32 ``q`` (it is its own accumulator)."""
        g = g.float()
        bad = self.ctx.finite.flag(g)
        if bad is not None:
            g = torch.where(bad, torch.zeros_like(g), g)
        counter = self.ctx.counters.host_counter(bias)
        v = self._votes(group["vote"], group, g, lr, 2 * bias.stream, counter, BIAS_VOTE_CLIP, "tensor")
        q = bias.q.to(torch.int64) + v.to(torch.int64)
        bias.q.copy_(q.clamp(-BIAS_Q_MAX, BIAS_Q_MAX).to(torch.int32))

    def _votes(self, vote: str, group: dict, g, lr, stream, counter, clip, normalize, T=None, decay=0.0, index=None,
               s=None, n_rows=None):
        """Votes for one gradient: sign votes, or stochastic votes normalised per call (rule.py). ``vote``: the
        group's ``vote`` (trits, biases) or ``scale_vote`` (scales).

        ``n_rows`` (0-dim tensor): only the first ``n_rows`` rows of ``g`` are real; the normalisation averages
        over them (rule.vote_scale). The votes of the other rows are not zero (decay, the random offset):
        the caller drops them (:meth:`_accumulate`'s ``real``). ``index``: the elements' flat positions in the
        weight (their random numbers), default 0 .. numel - 1.
        """
        if vote == "sign":
            return sign_votes(g)
        p = group["vote_power"]
        if s is None and p != 1:  # compress (p < 1) the normalised magnitudes: g -> sign(g) |g / rms|**p, s = -lr
            s1 = vote_scale(g, 1.0, normalize, group["norm_block"], n_rows)
            g = torch.sign(g) * (g * s1).abs().pow(p)
            s = torch.as_tensor(-lr, dtype=torch.float32, device=g.device)
        elif s is None:  # (given: from the statistics' moving averages, norm_beta's, call_votes)
            s = vote_scale(g, lr, normalize, group["norm_block"], n_rows)
        key = rng.stream_key(self.ctx.seed, stream, counter)
        return stochastic_votes(g, s, key, clip, T, decay, index)

    def _norm_memory(self, weight: TernaryScaleTensor, group: dict, counter, stats, bad=None, tiles=None):
        """One step of the weight's moving averages from this call's ``stats`` (rule.ema_block_factored_stats):
        stores the new codes (kept as they were where ``bad``) and returns the means they stand for. ``counter``
        keys the codes' rounding (the fused kernels derive the same key on the device). ``tiles`` (a slice of
        row-tiles): the stats are those tiles' only (a data-parallel rank's share), and so are the codes moved."""
        key = rng.stream_key(self.ctx.seed ^ NORM_SALT, weight.stream, counter)
        codes = self.ctx.norm_codes(weight, group)
        n_tiles = codes["norm_tile"].shape[0]
        if tiles is not None:
            codes = {k: v[tiles] for k, v in codes.items()}
        factors, new = ema_block_factored_stats(stats, codes, group["norm_beta"], key,
                                                None if tiles is None else (tiles.start, n_tiles))
        for k, v in new.items():
            codes[k].copy_(v if bad is None else torch.where(bad, codes[k], v))
        return factors

    def _accumulate(self, accum: torch.Tensor, v: torch.Tensor, rows, real=None) -> None:
        """Add the votes ``v`` of ``rows`` (default all) to ``accum``.

        ``real`` (bool, broadcastable to ``v``; row calls): the votes that count. The others are zeroed by a
        mask, not dropped by boolean indexing (no data-dependent shapes): a saturating add of 0 keeps ``accum``
        bit for bit.
        """
        if real is not None:
            v = torch.where(real, v, torch.zeros_like(v))
        if rows is None:
            accum.copy_(accumulate(accum, v))
        else:
            accum[rows] = accumulate(accum[rows], v)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def apply_flips(self, groups):
        counts = FlipCounts()
        for group, mods in groups:
            for m in mods:
                if isinstance(m, TernaryScaleTensor):
                    self._flip(m, group, counts)
        return counts.totals()

    def _flip(self, m: TernaryScaleTensor, group: dict, counts: FlipCounts) -> None:
        """Leak, flips and repack of one weight (rule.py), then its scale flips."""
        A = leak(m.T_accum, group["leak"]) if group["leak"] else m.T_accum
        T, A, n = apply_flips(m.trits(), A, group["accum_threshold"], group["clip_at_bounds"],
                              group.get("flip_reset", 0))
        m._store_trits(T)
        m.T_accum.copy_(A)
        ne = None
        if m.scale_mode == "int" and group["scale_update_interval"]:
            E, EA, ne = apply_scale_flips(m.E, m.E_accum, group["scale_threshold"])
            m.E.copy_(E)
            m.E_accum.copy_(EA)
        counts.add(n, ne)
