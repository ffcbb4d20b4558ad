"""Data-parallel votes: the ranks of a data-parallel run vote as one process on the global batch.

One process casts a call's votes from the call's weight gradient ``g``: the per-tile statistics of ``g`` (and their
moving averages) normalise it, then ``v = floor(s g - decay T + u)`` (rule.py). Under data parallelism ``g`` is the
sum of the ranks' gradients, each from its share of the global batch. :class:`ExchangedVotes` therefore exchanges
the gradients, not votes, and casts exactly the votes one process casts on their sum, each rank those of its own
share of the rows; then every rank adds every share's votes:

    backward  rank r writes each call's gradient G_r into a gradient bucket (as DDP buckets float gradients), cut
              by rows into N shares, share k for rank k; a full bucket is sent off at once (all-to-all, not waited
              for), so the exchange runs while backward goes on
    step()    per bucket: wait; G = (G_0 + G_1 + ... + G_{N-1}) / N (rank order, float32) over this rank's rows (each
              G_r is of the mean loss over rank r's share, so G is one process's gradient); the votes
              of one process on G for those rows: statistics, moving averages, random numbers, all those of the
              whole call -> int8 votes (and the moving averages' codes); all-gather them (not waited for) ...
              then every rank adds every share's votes to its accumulators and copies its codes, so all ranks hold
              bit-identical state without ever exchanging weights

A share is a run of whole normalisation row-tiles (``norm_block`` rows), so each tile's statistics are complete on
its owner; rules whose normaliser spans the whole matrix (``normalize='tensor'``), embedding row calls (whose tiles
follow the touched rows) and integer biases are one share each. The shares of a bucket are dealt out to the ranks
in order, as evenly as whole shares allow. Each element draws the random number of its position in the whole
weight, under the single-process seed: given the same summed gradient, N ranks cast bit for bit the votes of one
process (tests/test_distributed.py checks this with gradients whose sum is exact). With real data the sum differs
from one process's gradient by float rounding only.

Bytes each rank sends per step, per weight called once: ``(N-1)/N * (b + 1 + ...)``: its gradients but its own
share, ``b`` = 4 (float32) or 2 (bfloat16, ``grad_dtype``), then the votes of its share to the N-1 others (ring
all-gather), 1 byte, plus the scale votes (1 / group_size) and the codes (2 / norm_block**2 + 2 / norm_block).

    ExchangedVotes        the dense backend's rule and flips, on the exchanged gradients
    ExchangedKernelVotes  the same votes; the flips in the flip kernel (``gpu`` backends)

``comm`` (trueternary.distributed.VoteExchange, set by ``distributed.attach``) has ``world_size``, ``rank``,
``grad_dtype``, ``bucket_bytes``, ``first_bucket_bytes`` and the collectives ``all_to_all(out, inp)`` and
``all_gather(out, inp)`` (asynchronous: they return a work whose ``wait()`` completes them) and
``check_same(text)`` (every rank built the same buckets).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..layers import IntegerBias
from ..rule import accumulate, norm_tiles, real_rows, uses_norm_memory
from .context import BIAS_Q_MAX, BIAS_VOTE_CLIP, CALLS_PER_STEP, VoteContext
from .dense import DenseVotes
from .kernel import KernelVotes

MATRIX, ROWS, BIAS = "matrix", "rows", "bias"  # a whole-matrix call, an embedding's row call, an integer bias
ALIGN = 8  # byte alignment of each result in a rank's result buffer (int16 codes, int32 bias votes)
CODE_NAMES = ("norm_tile", "norm_row", "norm_col")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(eq=False)
class Slot:
    """One vote call of a step: the gradient every rank contributes, cut into shares (:class:`Piece`)."""

    key: tuple[int, int]  # (id(module), call index within the step)
    module: object
    kind: str  # MATRIX, ROWS or BIAS
    rows: int
    cols: int
    scale: bool  # scale votes (integer scales, scale_update_interval > 0)
    memory: bool  # the normaliser's moving averages (norm_beta)
    block: int  # norm_block
    split: bool  # shares of whole row-tiles (else one share)
    pieces: list = field(default_factory=list)
    pinned: bool = False  # all shares on one rank (plan_buckets)

    @property
    def signature(self) -> tuple:
        return (self.kind, self.rows, self.cols, self.scale, self.memory, self.block, self.split)


@dataclass(eq=False)
class Piece:
    """Rows ``[r0, r1)`` of a slot's gradient: every rank contributes them, ``owner`` sums and votes on them."""

    slot: Slot
    r0: int
    r1: int
    owner: int = 0
    grad_off: int = 0  # element offset in the owner's gradient segment
    out_off: int = 0  # byte offset in the owner's result segment

    @property
    def grad_numel(self) -> int:
        """Gradient elements, then (row calls) each row's touched count, then the non-finite flag."""
        s = self.slot
        if s.kind == ROWS:
            return s.rows * s.cols + s.rows + 1
        return (self.r1 - self.r0) * s.cols + 1

    def outputs(self) -> list[tuple[str, torch.dtype, tuple]]:
        """What the owner sends back: (name, dtype, shape) of each result, in order."""
        s, n = self.slot, self.r1 - self.r0
        if s.kind == BIAS:
            return [("q", torch.int32, (n,))]
        out = [("T", torch.int8, (n, s.cols))]
        if s.scale:
            out.append(("E", torch.int8, (n, s.module.n_groups)))
        if s.memory:
            _, br, cb, bc = norm_tiles((s.rows, s.cols), s.block)
            k = -(-n // br)
            out += [("norm_tile", torch.int16, (k, cb)), ("norm_row", torch.int8, (k, br, cb)),
                    ("norm_col", torch.int8, (k, cb, bc))]
        return out

    @property
    def out_bytes(self) -> int:
        return sum(_aligned(_numel(shape) * _itemsize(dt)) for _, dt, shape in self.outputs())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def make_slot(key: tuple[int, int], module, kind: str, group: dict) -> Slot:
    """The slot of a vote call of ``module`` under its param group's rule, cut into its shares."""
    if kind == BIAS:
        return Slot(key, module, BIAS, module.n, 1, False, False, group["norm_block"], False)
    interval = group["scale_update_interval"]
    split = kind == MATRIX and (group["normalize"] == "block_factored"
                                or (group["vote"] == "sign" and group["scale_vote"] == "sign"))
    return Slot(key, module, kind, module.rows, module.cols, module.scale_mode == "int" and interval > 0,
                kind == MATRIX and uses_norm_memory(group), group["norm_block"], split)


def _cut(slot: Slot) -> list[Piece]:
    """A slot's shares: one per normalisation row-tile when it splits, else one."""
    if not slot.split:
        return [Piece(slot, 0, slot.rows)]
    br = norm_tiles((slot.rows, slot.cols), slot.block)[1]
    return [Piece(slot, r, min(slot.rows, r + br)) for r in range(0, slot.rows, br)]


class Bucket:
    """The gradients of consecutive vote calls, exchanged together. Rank k owns ``grad_sizes[k]`` gradient elements
    (its shares, back to back) and answers with ``out_sizes[k]`` bytes of results:

        send      (sum grad_sizes,)      this rank's contribution to every rank's shares, rank k's from grad_base[k]
        recv      (N, grad_sizes[me])    every rank's contribution to this rank's shares
        result    (N, out_sizes[me])     this rank's results, once for each rank (an all-gather as an all-to-all:
                                         the ranks' results differ in size)
        gathered  (sum out_sizes,)       every rank's results, rank k's from out_base[k]
    """

    def __init__(self, slots: list[Slot], world_size: int, rank: int, pins: dict[int, int]) -> None:
        self.slots, self.world_size, self.rank = slots, world_size, rank
        chunks = _chunks(slots)
        _deal(chunks, world_size, pins)
        pieces = _merged([p for chunk in chunks for p in chunk])
        self.by_owner: list[list[Piece]] = [[] for _ in range(world_size)]
        for p in pieces:
            self.by_owner[p.owner].append(p)
        for s in slots:
            s.pieces = [p for p in pieces if p.slot is s]
        self.grad_sizes, self.out_sizes = [0] * world_size, [0] * world_size
        for k, owned in enumerate(self.by_owner):
            for p in owned:
                p.grad_off, p.out_off = self.grad_sizes[k], self.out_sizes[k]
                self.grad_sizes[k] += p.grad_numel
                self.out_sizes[k] += p.out_bytes
        self.grad_base = [sum(self.grad_sizes[:k]) for k in range(world_size)]
        self.out_base = [sum(self.out_sizes[:k]) for k in range(world_size)]
        self.filled: set[tuple[int, int]] = set()
        self.a2a = self.gather = None
        self.send = self.recv = self.result = self.gathered = None

    def allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        n, me = self.world_size, self.rank
        self.send = torch.zeros(sum(self.grad_sizes), dtype=dtype, device=device)
        self.recv = torch.zeros(n, self.grad_sizes[me], dtype=dtype, device=device)
        self.result = torch.zeros(n, self.out_sizes[me], dtype=torch.uint8, device=device)
        self.gathered = torch.zeros(sum(self.out_sizes), dtype=torch.uint8, device=device)

    def sent_bytes(self, elsize: int, rank: int) -> int:
        """What rank ``rank`` sends in this bucket's two collectives: its gradients but its own shares', then its
        results to the N - 1 others."""
        n = self.world_size
        return (sum(self.grad_sizes) - self.grad_sizes[rank]) * elsize + (n - 1) * self.out_sizes[rank]

    def describe(self) -> list:
        return [[s.signature for s in self.slots],
                [(self.slots.index(p.slot), p.r0, p.r1, p.owner) for owned in self.by_owner for p in owned]]


def _chunks(slots: list[Slot]) -> list[list[Piece]]:
    """A slot's shares one chunk each (a pinned slot: all its shares in one chunk)."""
    out = []
    for s in slots:
        pieces = _cut(s)
        out += [pieces] if s.pinned else [[p] for p in pieces]
    return out


def _deal(chunks: list[list[Piece]], world_size: int, pins: dict[int, int]) -> None:
    """Owners: pinned modules' chunks to their rank; the others in order, contiguous and as even as whole chunks
    allow (chunk i to the rank its middle element falls to)."""
    free = [c for c in chunks if id(c[0].slot.module) not in pins]
    total = sum(p.grad_numel for c in free for p in c) or 1
    done = 0
    for c in chunks:
        pin = pins.get(id(c[0].slot.module))
        size = sum(p.grad_numel for p in c)
        owner = pin if pin is not None else min(world_size - 1, int((done + size / 2) * world_size / total))
        if pin is None:
            done += size
        for p in c:
            p.owner = owner


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent shares of one slot with one owner as one piece (fewer, larger copies and kernels)."""
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last is not None and last.slot is p.slot and last.owner == p.owner and last.r1 == p.r0:
            last.r1 = p.r1
        else:
            out.append(Piece(p.slot, p.r0, p.r1, p.owner))
    return out


def plan_buckets(slots: list[Slot], world_size: int, rank: int, elsize: int, bucket_bytes: int,
                 first_bucket_bytes: int) -> list[Bucket]:
    """Buckets of consecutive slots, each up to ``bucket_bytes`` of gradient (the first up to
    ``first_bucket_bytes``, so the first exchange starts early in backward), as DDP buckets its gradients.

    A module called more than once per step whose rule keeps moving averages has its calls' shares on one rank
    (each call's averages start from the previous call's), rank ``i mod N`` for the i-th such module."""
    counts: dict[int, int] = {}
    for s in slots:
        counts[id(s.module)] = counts.get(id(s.module), 0) + 1
    pins: dict[int, int] = {}
    for s in slots:
        s.pinned = s.memory and counts[id(s.module)] > 1
        if s.pinned and id(s.module) not in pins:
            pins[id(s.module)] = len(pins) % world_size
    buckets, current, size = [], [], 0
    for s in slots:
        n = s.rows * s.cols * elsize
        cap = first_bucket_bytes if not buckets else bucket_bytes
        if current and size + n > cap:
            buckets.append(Bucket(current, world_size, rank, pins))
            current, size = [], 0
        current.append(s)
        size += n
    if current:
        buckets.append(Bucket(current, world_size, rank, pins))
    return buckets


def _views(p: Piece, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """The piece's results in a rank's result bytes ``buf``."""
    out, off = {}, p.out_off
    for name, dt, shape in p.outputs():
        n = _numel(shape) * _itemsize(dt)
        out[name] = buf[off:off + n].view(dt).view(shape)
        off += _aligned(n)
    return out


@dataclass
class _Cast:
    """What a rank knows of one vote call of this step."""

    group: dict
    lr: object
    mat: torch.Tensor | None = None  # stashed (unplanned) contribution
    extra: torch.Tensor | None = None
    bad: torch.Tensor | None = None
    slot: Slot | None = None


class ExchangedVotes(DenseVotes):
    """The votes of one process on the ranks' summed gradients (module docstring); dense flips."""

    def __init__(self, ctx: VoteContext, comm) -> None:
        super().__init__(ctx)
        self.comm = comm
        self.buckets: list[Bucket] | None = None  # the plan, from the first step's calls
        self.planned: dict[tuple[int, int], tuple[Bucket, Slot]] = {}
        self.extra: list[Bucket] = []  # this step's buckets of unplanned calls
        self.casts: dict[tuple[int, int], _Cast] = {}  # this step's calls, in order
        self.stash: list[tuple[int, int]] = []  # this step's unplanned calls
        self.replan = False
        self._trit_cache: dict[int, torch.Tensor] = {}
        self._sent_in_backward = 0
        self.last_step: dict = {}  # the last exchange: buckets, how many were sent during backward, bytes sent

    # ------------------------------------------------------------------ backward: contribute gradients
    def fuses_matmul_votes(self, gy: torch.Tensor, x: torch.Tensor, group: dict) -> bool:
        return False  # the gradient itself is exchanged

    @torch.no_grad()
    def cast_votes(self, weight, g: torch.Tensor, T, group: dict, lr, rows: torch.Tensor | None = None,
                   n_rows: torch.Tensor | None = None) -> None:
        """This rank's gradient of the call into its bucket (the votes come in ``step()``)."""
        key = (id(weight), self.ctx.counters.call_index(weight))
        bad = self.ctx.finite.flag(g)
        if rows is None:
            self._contribute(key, weight, MATRIX, group, lr, g, None, bad)
            return
        # a row call: the dense gradient in natural row order and each row's touched flag (0 or 1); the owner
        # orders the rows any rank touched as one process orders its own
        real = (real_rows(n_rows, rows.numel(), g.device) if n_rows is not None
                else torch.ones(rows.numel(), dtype=torch.bool, device=g.device))
        mat = torch.zeros(weight.rows, weight.cols, dtype=torch.float32, device=g.device)
        mat.index_copy_(0, rows, torch.where(real[:, None], g.float(), 0.0))
        touched = torch.zeros(weight.rows, dtype=torch.float32, device=g.device).index_copy_(0, rows, real.float())
        self._contribute(key, weight, ROWS, group, lr, mat, touched, bad)

    @torch.no_grad()
    def cast_bias_votes(self, bias, g: torch.Tensor, group: dict, lr) -> None:
        key = (id(bias), self.ctx.counters.call_index(bias))
        self._contribute(key, bias, BIAS, group, lr, g.reshape(-1, 1), None, self.ctx.finite.flag(g))

    def _contribute(self, key, module, kind: str, group: dict, lr, mat, extra, bad) -> None:
        cast = self.casts[key] = _Cast(group, lr)
        entry = self.planned.get(key)
        slot = make_slot(key, module, kind, group)
        if entry is None or entry[1].signature != slot.signature:
            cast.mat, cast.extra, cast.bad, cast.slot = mat.float().clone(), extra, bad, slot
            self.stash.append(key)
            return
        bucket, slot = entry
        cast.slot = slot
        with record_function("trueternary.dp.write_gradient"):
            _write(bucket, slot, mat, extra, bad)
        bucket.filled.add(key)
        if len(bucket.filled) == len(bucket.slots):
            self._send(bucket, in_backward=True)

    def _send(self, bucket: Bucket, in_backward: bool = False) -> None:
        with record_function("trueternary.dp.send_gradients"):
            bucket.a2a = self.comm.all_to_all(bucket.recv.view(-1), bucket.send, bucket.grad_sizes)
        self._sent_in_backward += in_backward

    # ------------------------------------------------------------------ step: votes on the summed gradients
    @torch.no_grad()
    def exchange_votes(self) -> None:
        """Collective (every rank, every step, before anything can raise): the step's gradients exchanged, this
        rank's shares voted on, every share's votes gathered and added on every rank."""
        if not self.casts:
            return
        if self.stash:
            self._plan_stash()
        buckets = [b for b in (self.buckets or []) + self.extra if b.filled]
        for b in buckets:  # calls that never came this step: the rest goes now (every rank misses the same)
            if b.a2a is None:
                self._send(b)
        for b in buckets:
            with record_function("trueternary.dp.wait_gradients"):
                b.a2a.wait()
            self._vote_shares(b)
            with record_function("trueternary.dp.send_votes"):
                b.gather = self.comm.all_gather(b.gathered, b.result, b.out_sizes)
        for b in buckets:
            with record_function("trueternary.dp.wait_votes"):
                b.gather.wait()
            with record_function("trueternary.dp.add_votes"):
                self._apply(b)
        elsize = _itemsize(self.comm.grad_dtype)
        self.last_step = {"buckets": len(buckets), "sent_in_backward": self._sent_in_backward,
                          "sent_bytes": sum(b.sent_bytes(elsize, self.comm.rank) for b in buckets)}
        self._clear_step()

    def _plan_stash(self) -> None:
        """Buckets for the calls no bucket holds: the plan, at the first step (or after a step whose calls
        changed); otherwise this step's extra buckets. Every rank must build the same (checked)."""
        slots = [self.casts[k].slot for k in self.stash]
        first = self.buckets is None
        new = plan_buckets(slots, self.comm.world_size, self.comm.rank, _itemsize(self.comm.grad_dtype),
                           self.comm.bucket_bytes, self.comm.first_bucket_bytes)
        self.comm.check_same(hashlib.sha256(repr([b.describe() for b in new]).encode()).hexdigest())
        device = slots[0].module.T_accum.device if slots[0].kind != BIAS else slots[0].module.q.device
        for b in new:
            b.allocate(self.comm.grad_dtype, device)
            for s in b.slots:
                cast = self.casts[s.key]
                _write(b, s, cast.mat, cast.extra, cast.bad)
                cast.mat = cast.extra = None
                b.filled.add(s.key)
            self._send(b)
        if first:
            self.buckets = new
            self.planned = {s.key: (b, s) for b in new for s in b.slots}
        else:
            self.extra = new
            self.replan = True  # the calls changed: plan again from the next step's calls
        self.stash.clear()

    def _vote_shares(self, b: Bucket) -> None:
        """This rank's shares: the summed gradient (rank order, float32), then one process's votes on it."""
        me = self.comm.rank
        owned = [p for p in b.by_owner[me] if p.slot.key in b.filled]
        if not owned:
            return
        with record_function("trueternary.dp.sum_gradients"):
            total = b.recv[0].float()
            for j in range(1, b.world_size):
                total = total + b.recv[j].float()
            # each rank's gradient is of the mean loss over its share of the batch, N times its part of the global
            # batch's gradient: their mean is one process's (the moving averages' codes hold its scale, so that a
            # checkpoint continues alike on any number of ranks); exact for N a power of two
            total = total / b.world_size
        with record_function("trueternary.dp.votes"):
            for p in owned:
                self._vote_piece(p, total[p.grad_off:p.grad_off + p.grad_numel], _views(p, b.result[0]))
            b.result[1:].copy_(b.result[0])  # (one copy for each rank)

    def _vote_piece(self, p: Piece, seg: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        s = p.slot
        cast = self.casts[s.key]
        group, lr, w = cast.group, cast.lr, s.module
        step = self.ctx.counters.device_step(seg.device)
        counter = step * CALLS_PER_STEP + s.key[1]
        check = self.ctx.finite.enabled

        def finite(g):  # any rank's gradient of the call had NaN/inf, or the sum overflowed: zero, as one process
            if not check:
                return g, None
            bad = (seg[-1] > 0) | ~torch.isfinite(g).all()
            return torch.where(bad, torch.zeros_like(g), g), bad

        if s.kind == BIAS:
            g, _ = finite(seg[:-1])
            out["q"].copy_(self._votes(group["vote"], group, g, lr, 2 * w.stream, counter, BIAS_VOTE_CLIP, "tensor"))
            return
        interval = group["scale_update_interval"]
        if s.kind == ROWS:  # one process's row call on the rows any rank touched
            R, C = s.rows, s.cols
            g, bad = finite(seg[:R * C].view(R, C))
            touched = seg[R * C:R * C + R] > 0
            order = torch.argsort((~touched).to(torch.int8), stable=True)
            n = touched.sum()
            v, vE = self.call_votes(w, g[order], self._trits(w)[order], group, lr, counter, s.scale, bad,
                                    rows=order, n_rows=n)
            real = real_rows(n, R, seg.device)[:, None]
            out["T"].index_copy_(0, order, torch.where(real, v, 0))
            if vE is not None:
                out["E"].index_copy_(0, order, torch.where(real & (step % interval == 0), vE, 0))
            return
        R, C, n = s.rows, s.cols, p.r1 - p.r0
        g, bad = finite(seg[:-1].view(n, C))
        T = self._trits(w)[p.r0:p.r1]
        _, br, _, _ = norm_tiles((R, C), s.block)
        if n == R:
            v, vE = self.call_votes(w, g, T, group, lr, counter, s.scale, bad)
        else:
            n_rows = None
            if R % br:  # the whole matrix's statistics take the padded path (a short last tile): so do these
                n_rows = torch.full((), n, dtype=torch.int64, device=g.device)
                pad = -n % br
                g, T = F.pad(g, (0, 0, 0, pad)), F.pad(T, (0, 0, 0, pad))
            v, vE = self.call_votes(w, g, T, group, lr, counter, s.scale, bad, n_rows=n_rows, first_row=p.r0)
            v, vE = v[:n], (vE[:n] if vE is not None else None)
        out["T"].copy_(v)
        if vE is not None:  # (scale steps decided on the device, so a captured step keeps them)
            out["E"].copy_(torch.where(step % interval == 0, vE, 0))
        if s.memory:  # the codes call_votes moved
            codes, t0 = self.ctx.norm_codes(w, group), p.r0 // br
            for name in CODE_NAMES:
                out[name].copy_(codes[name][t0:t0 + out[name].shape[0]])

    def _trits(self, w) -> torch.Tensor:
        t = self._trit_cache.get(id(w))
        if t is None:
            t = self._trit_cache[id(w)] = w.trits()
        return t

    def _apply(self, b: Bucket) -> None:
        """Every share's votes (and codes) into this rank's state, call by call in order."""
        for s in b.slots:
            if s.key not in b.filled:
                continue
            w = s.module
            for p in s.pieces:
                res = _views(p, b.gathered[b.out_base[p.owner]:])
                if s.kind == BIAS:
                    q = w.q.to(torch.int64) + res["q"].to(torch.int64)
                    w.q.copy_(q.clamp(-BIAS_Q_MAX, BIAS_Q_MAX).to(torch.int32))
                    continue
                A = w.T_accum[p.r0:p.r1]
                A.copy_(accumulate(A, res["T"]))
                if "E" in res:
                    EA = w.E_accum[p.r0:p.r1]
                    EA.copy_(accumulate(EA, res["E"]))
                if s.memory:
                    codes = self.ctx.norm_codes(w, self.casts[s.key].group)
                    t0 = p.r0 // norm_tiles((s.rows, s.cols), s.block)[1]
                    for name in CODE_NAMES:
                        codes[name][t0:t0 + res[name].shape[0]].copy_(res[name])

    def _clear_step(self) -> None:
        for b in (self.buckets or []) + self.extra:
            b.filled.clear()
            b.a2a = b.gather = None
        self.extra = []
        self._sent_in_backward = 0
        self.casts.clear()
        self.stash.clear()
        self._trit_cache.clear()
        if self.replan:
            self.buckets, self.planned, self.replan = None, {}, False

    # ------------------------------------------------------------------ state
    def flush_votes(self) -> None:
        """Votes cast and not yet exchanged (a ``state_dict()`` between backward and ``step()``): exchanged now,
        a collective (every rank must call it at the same point)."""
        super().flush_votes()
        self.exchange_votes()

    def drop_votes(self) -> None:
        super().drop_votes()
        for b in (self.buckets or []) + self.extra:
            if b.a2a is not None:
                b.a2a.wait()  # (every rank sent it: let it complete, then forget it)
        self._clear_step()


def _write(bucket: Bucket, slot: Slot, mat: torch.Tensor, extra: torch.Tensor | None, bad) -> None:
    """This rank's contribution to each share of ``slot``: its rows of the gradient ``mat``, (row calls) the
    touched flags, and its non-finite flag."""
    for p in slot.pieces:
        start = bucket.grad_base[p.owner] + p.grad_off
        region = bucket.send[start:start + p.grad_numel]
        if slot.kind == ROWS:
            n = slot.rows * slot.cols
            region[:n].view(slot.rows, slot.cols).copy_(mat)
            region[n:-1].copy_(extra)
        else:
            region[:-1].view(p.r1 - p.r0, slot.cols).copy_(mat.reshape(slot.rows, slot.cols)[p.r0:p.r1])
        if bad is None:
            region[-1:].zero_()
        else:
            region[-1:].copy_(bad.reshape(1))


class ExchangedKernelVotes(ExchangedVotes, KernelVotes):
    """:class:`ExchangedVotes` with the ``gpu`` backends' flip kernel (leak, flips, repack, scale flips in one
    launch per weight)."""


def exchange_slots(opt, model) -> list[Slot]:
    """The slots of the FlipOptimizer ``opt`` training ``model`` when each module it trains votes once per step, in
    the reverse of their order (backward's usual order), for the communication model
    (distributed.exchange_model)."""
    from ..layers import TernaryEmbedding

    row_voted = {id(m.weight) for m in model.modules() if isinstance(m, TernaryEmbedding)}
    slots = []
    for i, m in enumerate(reversed(opt.modules_trained())):
        kind = BIAS if isinstance(m, IntegerBias) else ROWS if id(m) in row_voted else MATRIX
        slots.append(make_slot((i, 0), m, kind, opt.param_groups[m._group_index]))
    return slots
