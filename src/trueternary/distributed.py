"""Data parallelism over ``torch.distributed``: integer vote all-reduce for ternary weights, DDP for floats.

Launch any script (or ``trueternary train``) with ``torchrun --nproc_per_node N``; each rank trains on
its own shard of the data. For ternary weights nothing float is exchanged:

    rank r    votes v_r = votes(g_r, lr / N, stream_r)     int8, |v_r| <= vote_clip  (optim/data_parallel.py)
    all       V = sum_r v_r                               integer all-reduce (VoteAllReduce.sum_votes)
              T_accum = clamp(T_accum + clamp(V, -vote_clip, vote_clip), -127, 127)   on every rank

Every rank adds the same integers, so trits, scales and accumulators stay bit-identical on all ranks
without ever broadcasting weights; normalisation is per call and stateless, so no float statistics are
exchanged either. Sign votes (``TrueTernary_Naive``) take the sign of V: signSGD with majority vote.

Transport. Neither NCCL nor gloo reduces int16, so the summed votes travel in the narrowest type that
holds every partial sum *exactly* (|partial sum| <= bound * N, bound = vote_clip, 1 for sign votes):

    int8     while bound * N <= 127           1 byte per vote   (vote_clip 8: up to 15 ranks)
    float16  while bound * N <= 2048          2 bytes; integers up to 2**11 are exact in fp16 and so
                                              is every partial sum of a ring or tree reduction
    int32    otherwise                        4 bytes
    (integer-bias votes, |v| <= 2**20: int32 up to 2047 ranks, int64 beyond)

Nothing wraps: the sum is exact, then clamped to +-vote_clip (the saturation the single-process rule
already applies to one vote), then added with the usual saturating int8 accumulate.

Float parameters (``Adam_FP32``, ``BitNet_QAT``, ``SignSGD_Old``, the hybrid's ``log2_scale``) are
trained with ``torch.nn.parallel.DistributedDataParallel``; a comm hook counts the gradient bytes it
all-reduces (fp32, or bf16 with ``grad_dtype="bf16"``, torch's ``bf16_compress_hook``).

Library use without the CLI::

    ctx = trueternary.distributed.setup()          # reads torchrun's environment; NCCL on GPU, gloo on CPU
    model = ternarize(build_model(...)).to(ctx.device)
    opt = FlipOptimizer(model)
    trueternary.distributed.attach(opt)            # opt.comm = VoteAllReduce(...): votes are summed
    ... each rank: forward / backward on its own batch, opt.step() ...
    ctx.close()

``trueternary train`` asks its questions of a :class:`Ranks` (``join()``): am I the main process, run this on
rank 0 and let every rank learn of its error, does any rank want to stop, which slice of the data is mine.
In one process every answer is trivial; :class:`GroupRanks` answers them with collectives.

The communication model (bytes per step per weight, ring all-reduce traffic) is :func:`comm_table`;
docs/distributed.md has the math and measurements.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .data import RandomWindows
from .layers import IntegerBias
from .optim import BIAS_VOTE_CLIP, FlipOptimizer, norm_codes_of
from .rule import uses_norm_memory
from .weight import ternary_weights

BACKEND_ENV = "TRUETERNARY_DIST_BACKEND"  # force 'gloo' or 'nccl' (default: nccl on CUDA, gloo on CPU)
STEP_SYNC_BYTES = 16  # per step: float64 [loss, non-finite flag], summed so every rank sees the same verdict
INT8_MAX = 127
FP16_EXACT = 2048  # every integer in [-2**11, 2**11] is exact in float16
GRAD_DTYPES = ("fp32", "bf16")


# ------------------------------------------------------------------------------------ environment
def launched() -> bool:
    """True under torchrun (``WORLD_SIZE`` set) or when a process group is already initialised."""
    return "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized())


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def requested_world_size() -> int:
    """The world size this process will train in (1 when not launched), known before any rendezvous."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    n = _env_int("WORLD_SIZE", 1)
    if n < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {n}")
    return n


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the one process that prints and writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return _env_int("RANK", 0) == 0
    except ValueError:  # setup() reports the bad RANK; until then this process speaks
        return True


def say(*args) -> None:
    """``print`` on the main process only (every line of a data-parallel run would otherwise appear once per rank)."""
    if is_main_process():
        print(*args, flush=True)


# ------------------------------------------------------------------------------------ the context
class RankError(RuntimeError):
    """A declared error raised on another rank, re-raised here so every rank stops together."""


@dataclass
class DistContext:
    """The process group this process trains in; ``setup()`` makes one."""

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: torch.device
    owns_group: bool = False  # setup() initialised the group, so close() destroys it
    group: object = None  # None: the default (WORLD) group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_group(self) -> bool:
        """False for the one-process context of an unlaunched script (its collectives are local no-ops)."""
        return self.backend != "none"

    def barrier(self) -> None:
        if self.has_group:
            dist.barrier(group=self.group)

    def all_gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
        if not self.has_group:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.has_group:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def agree(self, err: BaseException | None, declared: tuple[type[BaseException], ...] = ()) -> None:
        """Collective: if any rank passes an error, every rank raises (the first failing rank's error).

        The failing rank re-raises its own exception; the others raise an exception of the same class
        when it is in ``declared`` (so the CLI reports it in one line), else :class:`RankError`.
        """
        info = None if err is None else (type(err).__name__, str(err))
        infos = self.all_gather_objects(info)
        failed = [(r, i) for r, i in enumerate(infos) if i is not None]
        if not failed:
            return
        if err is not None:
            raise err
        r, (name, msg) = failed[0]
        cls = next((c for c in declared if c.__name__ == name), RankError)
        raise cls(f"rank {r}: {msg}")

    def sync_step(self, loss: torch.Tensor, bad: bool) -> tuple[float, bool]:
        """Collective, once per step: (mean loss over ranks, whether any rank saw non-finite gradients).

        The loss is the mean over the global batch (equal shards); the verdict is the same on every rank,
        so all ranks stop together instead of one raising while the others wait in the next all-reduce.
        """
        if not self.has_group:
            return float(loss), bad
        t = torch.stack([loss.detach().to(self.device, torch.float64).reshape(()),
                         torch.tensor(float(bad), dtype=torch.float64, device=self.device)])
        dist.all_reduce(t, group=self.group)
        total, n_bad = t.tolist()
        return total / self.world_size, n_bad > 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _choose_backend(device: torch.device) -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"{BACKEND_ENV} must be 'gloo' or 'nccl', got {forced!r}")
        return forced
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def setup(device: str | torch.device = "auto", backend: str = "auto",
          timeout: datetime.timedelta | None = None) -> DistContext:
    """Join (or reuse) the process group torchrun describes; returns this rank's :class:`DistContext`.

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; on CUDA each rank takes
    ``cuda:<LOCAL_RANK>``. ``backend``: ``auto`` is NCCL on CUDA and gloo on CPU (``$TRUETERNARY_DIST_BACKEND``
    overrides). Without torchrun's environment (and no initialised group) this is a one-process context
    whose collectives are never called. Raises ``ValueError`` with a one-line message on a bad setup.
    """
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed support")
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA device is available")
        n_gpu = torch.cuda.device_count()
        if dev.index is not None and requested_world_size() > 1:
            raise ValueError(f"under torchrun every rank takes cuda:<LOCAL_RANK>; pass --device cuda, not {dev}")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % n_gpu)
    chosen = _choose_backend(dev) if backend == "auto" else backend
    if chosen not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if chosen == "nccl" and dev.type != "cuda":
        raise ValueError("the NCCL backend needs CUDA tensors; use --device cuda or the gloo backend")
    if not launched():
        return DistContext(1, 0, 0, "none", dev)
    if dist.is_initialized():
        return DistContext(dist.get_world_size(), dist.get_rank(), local_rank, dist.get_backend(), dev,
                           owns_group=False)
    world = requested_world_size()
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if chosen == "nccl":
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        if local_world > torch.cuda.device_count():
            raise ValueError(f"NCCL needs one GPU per rank: {local_world} ranks on this node but "
                             f"{torch.cuda.device_count()} GPU(s); use fewer ranks or {BACKEND_ENV}=gloo")
        torch.cuda.set_device(dev)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"torch.distributed needs {' and '.join(missing)} in the environment; launch with "
                         "torchrun --nproc_per_node N")
    kw = {"timeout": timeout} if timeout is not None else {}
    if chosen == "nccl":
        kw["device_id"] = dev
    try:
        dist.init_process_group(chosen, rank=rank, world_size=world, **kw)
    except (RuntimeError, ValueError) as e:  # bad address, port in use, store timeout, ...
        raise ValueError(f"cannot start torch.distributed ({chosen}): {' '.join(str(e).split())[:300]}") from None
    return DistContext(world, rank, local_rank, chosen, dev, owns_group=True)


# ------------------------------------------------------------------------------------ the ranks of a run
class Ranks:
    """The processes one training run spans, as its loop asks about them. This class is one process, where every
    answer is trivial; :class:`GroupRanks` is one rank of a process group. :func:`join` gives this process's.

    ``declared``: the error classes a rank raises only together with every other rank (through :meth:`run`, or
    because every rank reads the same input), so one of them reports it for all; any other exception propagates
    on its own rank.
    """

    parallel = False  # True in a process group (even of one rank): steps, positions and errors are exchanged

    def __init__(self, device: torch.device, declared: tuple[type[BaseException], ...] = ()) -> None:
        self.device, self.declared = device, declared
        self.world_size, self.rank, self.local_rank, self.backend = 1, 0, 0, "none"
        self.comm_model: dict | None = None  # recipe_comm() of the recipe prepare() made data-parallel

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes the run directory."""
        return self.rank == 0

    def run(self, fn: Callable, here: bool = True):
        """``fn()`` where ``here`` (None elsewhere); a declared error it raises on any rank is raised on every rank."""
        return fn() if here else None

    def node_first(self, fn: Callable):
        """``fn()`` on every rank, local rank 0 of each node first (so it alone fills the node's caches)."""
        return fn()

    def broadcast(self, obj):
        """Rank 0's ``obj`` (small, picklable), on every rank."""
        return obj

    def any(self, flag: bool) -> bool:
        """Whether the flag is set on any rank (every rank calls this at the same point)."""
        return flag

    def sync_step(self, loss: torch.Tensor, bad: bool) -> tuple[float, bool]:
        """Once per step: the global batch's loss, and whether any rank saw non-finite gradients."""
        return float(loss), bad  # (float() waits for the device, so the step's time is complete)

    def windows(self, data: torch.Tensor, batch_size: int, ctx: int, seed: int,
                resumed_at: int | None = None) -> RandomWindows:
        """This rank's slice of the data: ``batch_size / world_size`` windows a step from its own stream. A run
        resumed (at step ``resumed_at``) from a checkpoint of another world size starts new streams instead."""
        if resumed_at is None:
            return RandomWindows(data, batch_size // self.world_size, ctx, seed=rank_data_seed(seed, self.rank))
        windows = RandomWindows(data, batch_size // self.world_size, ctx,
                                seed=rank_data_seed(seed, self.rank, self.world_size, resumed_at))
        windows.batches_drawn = resumed_at
        return windows

    def data_positions(self, position: dict) -> list[dict] | None:
        """Every rank's data position in rank order, for a checkpoint; None in one process (whose checkpoint
        holds its own position only)."""
        return None

    def differing_tensors(self, tensors: Callable[[], dict[str, torch.Tensor]]) -> list[str]:
        """Names of the tensors ``tensors()`` (called only in a group) whose bytes differ between ranks."""
        return []

    def prepare(self, recipe, grad_dtype: str = "fp32") -> None:
        """Make a built (and restored) Recipe data-parallel (:func:`prepare_recipe`); one process trains it as is."""

    def comm_step(self) -> dict:
        """Bytes all-reduced since the previous call (one step), as metrics columns; none in one process."""
        return {}

    def close(self) -> None:
        """Leave the process group if :func:`join` created it."""

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class GroupRanks(Ranks):
    """One rank of a torch.distributed process group (its :class:`DistContext`)."""

    parallel = True

    def __init__(self, ctx: DistContext, declared: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__(ctx.device, declared)
        self.ctx = ctx
        self.world_size, self.rank, self.local_rank = ctx.world_size, ctx.rank, ctx.local_rank
        self.backend = ctx.backend
        self._meter: CommMeter | None = None

    def run(self, fn: Callable, here: bool = True):
        out, err = None, None
        try:
            out = fn() if here else None
        except self.declared as e:
            err = e
        self.ctx.agree(err, self.declared)
        return out

    def node_first(self, fn: Callable):
        first = self.run(fn, here=self.local_rank == 0)
        rest = self.run(fn, here=self.local_rank != 0)
        return first if self.local_rank == 0 else rest

    def broadcast(self, obj):
        return self.ctx.broadcast_object(obj)

    def any(self, flag: bool) -> bool:
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctx.group)
        return bool(t.item())

    def sync_step(self, loss: torch.Tensor, bad: bool) -> tuple[float, bool]:
        return self.ctx.sync_step(loss, bad)

    def data_positions(self, position: dict) -> list[dict]:
        return self.ctx.all_gather_objects(position)

    def differing_tensors(self, tensors: Callable[[], dict[str, torch.Tensor]]) -> list[str]:
        return mismatched_replicas(tensors(), self.ctx)

    def prepare(self, recipe, grad_dtype: str = "fp32") -> None:
        self._meter = prepare_recipe(recipe, self.ctx, grad_dtype)
        self.comm_model = recipe_comm(recipe, self.world_size, grad_dtype)

    def comm_step(self) -> dict:
        return self._meter.take_step()

    def close(self) -> None:
        self.ctx.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, self.declared):  # raised by every rank together: rank 0 reports it for all of them
            exc.raised_on_all_ranks = True
        self.close()


def join(device: torch.device, declared: tuple[type[BaseException], ...] = ()) -> Ranks:
    """This process's :class:`Ranks`: a rank of the process group torchrun describes (:func:`setup`; ``close()``
    leaves it again if it was created here), or the one process of a run that torchrun did not launch."""
    if launched():
        return GroupRanks(setup(device), declared)
    return Ranks(device, declared)


# ------------------------------------------------------------------------------------ vote all-reduce
def vote_transport_dtype(bound: int, world_size: int) -> torch.dtype:
    """The narrowest all-reduce type in which a sum of ``world_size`` integers in [-bound, bound] is exact."""
    total = bound * world_size
    if total <= INT8_MAX:
        return torch.int8
    if total <= FP16_EXACT:
        return torch.float16
    if total <= 2**31 - 1:
        return torch.int32
    return torch.int64


def vote_bound(group: dict) -> int:
    """Largest |vote| one rank casts under a FlipOptimizer param group (sign votes are +-1)."""
    if group["vote"] == "sign" and group["scale_vote"] == "sign":
        return 1
    return int(group["vote_clip"])


class VoteAllReduce:
    """``FlipOptimizer.comm``: sums int votes over the ranks exactly, and counts what it sent.

    ``payload_bytes`` / ``calls`` grow by the size of every all-reduce buffer (numel x transport bytes);
    what a rank puts on the wire depends on the algorithm (ring: 2 (N-1)/N of the payload).
    """

    def __init__(self, opt: FlipOptimizer, world_size: int, rank: int, group=None) -> None:
        self.opt, self.world_size, self.rank, self.group = opt, world_size, rank, group
        self.payload_bytes = 0
        self.calls = 0

    def _bound(self, vote_dtype: torch.dtype) -> int:
        if vote_dtype == torch.int8:
            return max(vote_bound(g) for g in self.opt.param_groups)
        if vote_dtype == torch.int32:  # integer-bias votes (FlipOptimizer clips them to +-2**20)
            return BIAS_VOTE_CLIP
        raise TypeError(f"votes must be int8 or int32, got {vote_dtype}")

    def transport_dtype(self, vote_dtype: torch.dtype) -> torch.dtype:
        return vote_transport_dtype(self._bound(vote_dtype), self.world_size)

    def sum_votes(self, v: torch.Tensor) -> torch.Tensor:
        """The exact sum of every rank's ``v`` (same shape on every rank) as an integer tensor."""
        bound = self._bound(v.dtype)
        dtype = vote_transport_dtype(bound, self.world_size)
        if dtype == torch.int8:
            return self._sum_bytes(v, bound)
        t = v.to(dtype).contiguous()
        if t.data_ptr() == v.data_ptr():  # never reduce into the caller's tensor
            t = t.clone()
        dist.all_reduce(t, group=self.group)
        self.payload_bytes += t.numel() * t.element_size()
        self.calls += 1
        return t if not t.is_floating_point() else t.to(torch.int32)  # fp16 holds exact integers here

    def _sum_bytes(self, v: torch.Tensor, bound: int) -> torch.Tensor:
        """The int8 transport: each vote travels as the byte ``v + bound`` in [0, 2 bound], four to an int32 lane.

        The int8 transport is chosen only while ``bound * N <= 127``, so a byte's sum over the N ranks is at
        most ``2 bound N <= 254``: no byte carries into its neighbour and the int32 sum is the bytewise sum,
        exact. The sum is then ``bytes - N bound``. Same bytes on the wire as int8, but NCCL reduces int32
        lanes far faster than single bytes (docs/distributed.md: the int8 ring kernel moved ~4 GB/s on two
        H200s, several times below fp32's). A tail of ``numel % 4`` bytes is reduced as uint8.
        """
        n = v.numel()
        u = (v.reshape(-1).to(torch.int16) + bound).to(torch.uint8)  # a fresh buffer: v is never reduced in place
        lanes = n - n % 4
        if lanes:
            dist.all_reduce(u[:lanes].view(torch.int32), group=self.group)
        if lanes < n:
            dist.all_reduce(u[lanes:], group=self.group)
        self.payload_bytes += n
        self.calls += 1
        return (u.to(torch.int16) - self.world_size * bound).to(torch.int8).view(v.shape)


def attach(opt: FlipOptimizer, ctx: DistContext | None = None) -> VoteAllReduce:
    """Make ``opt`` sum its votes over the ranks of ``ctx`` (default: the initialised default group)."""
    if not isinstance(opt, FlipOptimizer):
        raise TypeError(f"attach() takes a FlipOptimizer, got {type(opt).__name__}")
    if ctx is None:
        if not dist.is_initialized():
            raise ValueError("attach() needs an initialised process group: call trueternary.distributed.setup()")
        comm = VoteAllReduce(opt, dist.get_world_size(), dist.get_rank())
    else:
        comm = VoteAllReduce(opt, ctx.world_size, ctx.rank, ctx.group)
    opt.comm = comm
    return comm


# ------------------------------------------------------------------------------------ DDP for float parameters
@dataclass
class DDPHookState:
    group: object
    grad_dtype: str = "fp32"
    payload_bytes: int = 0
    calls: int = 0


def _counting_allreduce_hook(state: DDPHookState, bucket):
    """DDP comm hook: torch's allreduce (or bf16-compress) hook, counting the bucket bytes it sends."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state.payload_bytes += buf.numel() * (2 if state.grad_dtype == "bf16" else buf.element_size())
    state.calls += 1
    if state.grad_dtype == "bf16":
        return default_hooks.bf16_compress_hook(state.group, bucket)
    return default_hooks.allreduce_hook(state.group, bucket)


@dataclass
class CommMeter:
    """Counters of one training run's all-reduces: votes, DDP gradient buckets and the per-step sync."""

    votes: list[VoteAllReduce] = field(default_factory=list)
    ddp: DDPHookState | None = None
    _last: tuple[int, int] = (0, 0)

    def totals(self) -> tuple[int, int]:
        vote_b = sum(c.payload_bytes for c in self.votes)
        ddp_b = self.ddp.payload_bytes if self.ddp is not None else 0
        return vote_b, ddp_b

    def take_step(self) -> dict:
        """Bytes all-reduced since the previous call (one optimiser step), including the step sync."""
        vote_b, ddp_b = self.totals()
        out = {"comm_vote_bytes": vote_b - self._last[0], "comm_grad_bytes": ddp_b - self._last[1]}
        out["comm_bytes"] = out["comm_vote_bytes"] + out["comm_grad_bytes"] + STEP_SYNC_BYTES
        self._last = (vote_b, ddp_b)
        return out


def trainable_float_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def prepare_recipe(recipe, ctx: DistContext, grad_dtype: str = "fp32") -> CommMeter:
    """Make a built (and restored) Recipe data-parallel: votes summed over ranks, floats under DDP.

    Call after restoring a checkpoint: DDP broadcasts rank 0's float state when it wraps the model
    (identical anyway: every rank builds the same model from the same seed or checkpoint).
    """
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}")
    meter = CommMeter()
    for o in recipe.optimizers:
        if isinstance(o, FlipOptimizer):
            meter.votes.append(attach(o, ctx))
    if trainable_float_parameters(recipe.model):
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Buffers (ternary state, rotary tables) are identical on every rank by construction: never broadcast
        # them before each forward (torch >= 2.13 spells it forward_sync_buffers, older ones broadcast_buffers).
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel)
                   .parameters else "broadcast_buffers")
        ddp = DistributedDataParallel(recipe.model, device_ids=ids, process_group=ctx.group, **{no_sync: False})
        meter.ddp = DDPHookState(group=ctx.group, grad_dtype=grad_dtype)
        ddp.register_comm_hook(meter.ddp, _counting_allreduce_hook)
        recipe.forward_model = ddp
    return meter


# ------------------------------------------------------------------------------------ data and replicas
def rank_data_seed(seed: int, rank: int, world_size: int | None = None, step: int | None = None) -> int:
    """Seed of rank ``rank``'s window stream. Rank 0 of a fresh run uses ``seed`` itself, so a world of one
    draws exactly the single-process batches; other ranks (and every rank of a run resumed on another
    world size, which passes ``world_size`` and ``step``) use a 63-bit hash of the tuple."""
    if rank == 0 and world_size is None:
        return seed
    key = f"trueternary-data:{seed}:{rank}:{world_size}:{step}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def state_fingerprint(tensors: dict[str, torch.Tensor], chunk: int = 1 << 22) -> tuple[list[str], torch.Tensor]:
    """(sorted names, int64 checksum per tensor), computed on the tensors' device in ``chunk``-byte pieces:
    sum of byte * (position mod 65521 + 1) + length, so a changed byte changes it (barring a collision)."""
    names = sorted(tensors)
    sums = []
    for n in names:
        b = tensors[n].detach().contiguous().reshape(-1).view(torch.uint8)
        total = torch.zeros((), dtype=torch.int64, device=b.device) + b.numel()
        for start in range(0, b.numel(), chunk):
            part = b[start:start + chunk].to(torch.int64)
            w = torch.arange(start, start + part.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
            total += (part * w).sum()
        sums.append(total)
    dev = sums[0].device if sums else torch.device("cpu")
    return names, torch.stack([t.to(dev) for t in sums]) if sums else torch.zeros(0, dtype=torch.int64)


def mismatched_replicas(tensors: dict[str, torch.Tensor], ctx: DistContext) -> list[str]:
    """Collective: names of the tensors whose bytes differ between ranks (empty when all ranks agree)."""
    if not ctx.has_group:
        return []
    names, fp = state_fingerprint(tensors)
    fp = fp.to(ctx.device)
    lo, hi = fp.clone(), fp.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=ctx.group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=ctx.group)
    return [n for n, bad in zip(names, (lo != hi).tolist()) if bad]


# ------------------------------------------------------------------------------------ communication model
def vote_payload(model: nn.Module, bound: int, world_size: int, scale_votes: bool,
                 norm_block: int | None = None, finite_flags: bool = False) -> dict:
    """Bytes all-reduced per step when every ternary weight (and integer bias) is called once per step.

    Per call of a (rows x cols) weight: rows*cols T votes, plus rows*n_groups E votes on scale-vote steps
    (integer scales only), each of ``vote_transport_dtype(bound, N)``; sparse embedding votes are densified
    to the full matrix first. Integer biases: n votes of ``vote_transport_dtype(2**20, N)``. With
    ``norm_block`` (a rule with ``norm_beta > 0``): the normaliser's statistics of every weight voted whole
    (not the embeddings' row votes), one int32 log2 code per tile-row, tile-column and tile, in three calls,
    and with ``finite_flags`` (check_finite) one int32 per such weight: whether any rank's gradient was bad.
    """
    dt = vote_transport_dtype(bound, world_size)
    b = torch.tensor([], dtype=dt).element_size()
    bias_b = torch.tensor([], dtype=vote_transport_dtype(BIAS_VOTE_CLIP, world_size)).element_size()
    t_votes = e_votes = calls = 0
    for w in ternary_weights(model):
        t_votes += w.numel()
        calls += 1
        if scale_votes and w.scale_mode == "int":
            e_votes += w.rows * w.n_groups
            calls += 1
    codes = norm_codes_of(model, norm_block) if norm_block else []
    norm_codes = sum(t.numel() for c in codes for t in c.values()) + (len(codes) if finite_flags else 0)
    calls += (4 if finite_flags else 3) * len(codes)
    biases = [m for m in model.modules() if isinstance(m, IntegerBias)]
    bias_votes = sum(m.n for m in biases)
    return {"dtype": dt, "bytes": b * (t_votes + e_votes) + bias_b * bias_votes + 4 * norm_codes,
            "calls": calls + len(biases), "T_votes": t_votes, "E_votes": e_votes, "bias_votes": bias_votes,
            "norm_codes": norm_codes}


def ring_bytes_per_rank(payload: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``payload`` bytes: 2 (N-1)/N payload."""
    return 2 * (world_size - 1) / world_size * payload


def recipe_comm(recipe, world_size: int, grad_dtype: str = "fp32") -> dict:
    """The model of one step's all-reduce payload for a built Recipe at ``world_size`` ranks."""
    votes = {"dtype": None, "bytes": 0, "calls": 0, "norm_codes": 0}
    for o in recipe.optimizers:
        if isinstance(o, FlipOptimizer) and world_size > 1:  # one rank: FlipOptimizer never calls sum_votes
            g = o.param_groups[0]
            bound = max(vote_bound(gr) for gr in o.param_groups)
            votes = vote_payload(recipe.model, bound, world_size, scale_votes=g["scale_update_interval"] > 0,
                                 norm_block=g["norm_block"] if uses_norm_memory(g) else None,
                                 finite_flags=o.check_finite)
    params = trainable_float_parameters(recipe.model)
    grad_bytes = sum(p.numel() for p in params) * (2 if grad_dtype == "bf16" else 4)
    n_weights = sum(w.numel() for w in ternary_weights(recipe.model)) or sum(p.numel() for p in params)
    payload = votes["bytes"] + grad_bytes + STEP_SYNC_BYTES
    return {"vote_dtype": votes["dtype"], "vote_bytes": votes["bytes"], "vote_calls": votes["calls"],
            "norm_codes": votes["norm_codes"],
            "grad_bytes": grad_bytes, "grad_dtype": grad_dtype if params else None, "payload": payload,
            "weights": n_weights, "per_weight": payload / n_weights,
            "ring_per_rank": ring_bytes_per_rank(payload, world_size)}


def comm_table(base_model: nn.Module, hp, world_sizes: list[int], title: str = "") -> str:
    """Bytes all-reduced per optimiser step, for every config, at each world size (the ``--comm_report``)."""
    from .recipes import CONFIG_NAMES, build_recipe

    recipes = {name: build_recipe(name, base_model, hp) for name in CONFIG_NAMES}
    rows = [(name, "fp32") for name in CONFIG_NAMES]
    rows += [(name, "bf16") for name in ("Adam_FP32", "BitNet_QAT", "SignSGD_Old", "TrueTernary_Hybrid")]
    lines = [f"Bytes all-reduced per optimiser step (payload: the sum of all-reduce buffer sizes){title}",
             "ring model: each rank sends and receives 2 (N-1)/N x payload per step; "
             f"+{STEP_SYNC_BYTES} B/step: the loss and non-finite flag every rank agrees on"]
    for n in world_sizes:
        ref = recipe_comm(recipes["Adam_FP32"], n, "fp32")
        lines += ["", f"world size {n}",
                  f"{'config':<33}{'sent as':<32}{'payload B/step':>16}{'B/weight':>10}{'all-reduces':>13}"
                  f"{'ring B/rank/step':>18}{'vs Adam fp32':>14}"]
        for name, gd in rows:
            c = recipe_comm(recipes[name], n, gd)
            parts = []
            if c["vote_dtype"] is not None:
                parts.append(f"votes {str(c['vote_dtype']).removeprefix('torch.')}")
            if c["grad_dtype"] is not None:
                parts.append(f"{c['grad_dtype']} grads (DDP)")
            calls = f"{c['vote_calls']}" if c["vote_dtype"] is not None else "buckets"
            if c["vote_dtype"] is not None and c["grad_dtype"] is not None:
                calls += " + buckets"
            label = name if c["grad_dtype"] is None or gd == "fp32" else f"{name} (bf16 grads)"
            lines.append(f"{label:<33}{' + '.join(parts):<32}{c['payload']:>16,}{c['per_weight']:>10.4f}"
                         f"{calls:>13}{c['ring_per_rank']:>18,.0f}{c['payload'] / ref['payload']:>13.3f}x")
    return "\n".join(lines)
