"""Data parallelism over ``torch.distributed``: the ranks vote as one process on the global batch; DDP for floats.

Launch any script (or ``trueternary train``) with ``torchrun --nproc_per_node N`` (several nodes: ``--nnodes``
and a rendezvous, docs/distributed.md); each rank trains on its share of every global batch. For ternary weights
no weight and no vote is all-reduced: each rank sends its weight gradients in buckets during backward, each rank
casts one process's votes on the summed gradient for its share of the rows, and the votes are gathered, so every
rank adds the same integers (optim/data_parallel.py):

    backward  rank r: gradient G_r of each call -> bucket -> all_to_all as the bucket fills (overlaps backward)
    step()    rank k: G = sum_r G_r over its rows -> the votes of one process on G -> all_gather -> every rank
              accumulates every rank's votes and flips, identically

Float parameters (``Adam_FP32``, ``BitNet_QAT``, ``SignSGD_Old``, the hybrid's ``log2_scale``) are trained with
``torch.nn.parallel.DistributedDataParallel``; a comm hook counts the gradient bytes it all-reduces (fp32, or
bf16 with ``grad_dtype="bf16"``, torch's ``bf16_compress_hook``). ``grad_dtype`` sets the ternary gradients'
transport the same way (bfloat16 halves their bytes; the sum is taken in float32 either way).

Library use without the CLI::

    ctx = trueternary.distributed.setup()          # reads torchrun's environment; NCCL on GPU, gloo on CPU
    model = ternarize(build_model(...)).to(ctx.device)
    opt = FlipOptimizer(model)
    trueternary.distributed.attach(opt, ctx)       # opt.comm = VoteExchange(...): the ranks vote as one
    ... each rank: forward / backward on its share of the batch, opt.step() ...
    ctx.close()

``trueternary train`` asks its questions of a :class:`Ranks` (``join()``): am I the main process, run this on
rank 0 and let every rank learn of its error, does any rank want to stop, which share of the batch is mine.
In one process every answer is trivial; :class:`GroupRanks` answers them with collectives.

The communication model (bytes each rank sends per step) is :func:`comm_table`; docs/distributed.md has the
math and measurements.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from .data import RandomWindows
from .optim import FlipOptimizer
from .weight import ternary_weights

BACKEND_ENV = "TRUETERNARY_DIST_BACKEND"  # force 'gloo' or 'nccl' (default: nccl on CUDA, gloo on CPU)
STEP_SYNC_BYTES = 16  # per step: float64 [loss, non-finite flag], summed so every rank sees the same verdict
GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # gradient transport (DDP and ternary alike)
BUCKET_BYTES = 25 << 20  # gradient bytes per bucket after the first (DDP's bucket_cap_mb default)
FIRST_BUCKET_BYTES = 1 << 20  # the first bucket: small, so the exchange starts early in backward (as DDP's)


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

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
        return [obj]

    def sync_step(self, loss: torch.Tensor, bad: bool) -> tuple[float, bool]:
        """Once per step: the global batch's loss, and whether any rank saw non-finite gradients."""
        return float(loss), bad  # (float() waits for the device, so the step's time is complete)

    def windows(self, data: torch.Tensor, batch_size: int, ctx: int, seed: int) -> RandomWindows:
        """This rank's share of every global batch: ``batch_size`` windows a step drawn from one stream seeded by
        ``seed`` on every rank (so the batches, and a checkpoint's data position, do not depend on the number of
        ranks), of which rank r takes the r-th ``batch_size / world_size``."""
        return RandomWindows(data, batch_size, ctx, seed=seed, rank=self.rank, world_size=self.world_size)

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

    def gather(self, obj) -> list:
        return self.ctx.all_gather_objects(obj)

    def sync_step(self, loss: torch.Tensor, bad: bool) -> tuple[float, bool]:
        return self.ctx.sync_step(loss, bad)

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


# ------------------------------------------------------------------------------------ the ternary exchange
def ring_all_reduce_bytes(payload: int, world_size: int) -> int:
    """Bytes each rank sends in a ring all-reduce of ``payload`` bytes: 2 (N-1)/N of it (a reduce-scatter, then an
    all-gather)."""
    return 2 * (world_size - 1) * payload // world_size


class VoteExchange:
    """``FlipOptimizer.comm`` under data parallelism: the collectives through which the ranks vote as one
    (optim/data_parallel.py), each counted as the bytes this rank sends.

    ``grad_dtype`` ('fp32' or 'bf16'): the gradients' transport; ``bucket_bytes`` / ``first_bucket_bytes``: the
    gradient bytes per bucket (data_parallel.plan_buckets).
    """

    def __init__(self, world_size: int, rank: int, group=None, grad_dtype: str = "fp32",
                 bucket_bytes: int = BUCKET_BYTES, first_bucket_bytes: int = FIRST_BUCKET_BYTES) -> None:
        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {grad_dtype!r}")
        self.world_size, self.rank, self.group = world_size, rank, group
        self.grad_dtype = GRAD_DTYPES[grad_dtype]
        self.bucket_bytes, self.first_bucket_bytes = bucket_bytes, first_bucket_bytes
        self.sent_bytes = 0
        self.calls = 0

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, sizes: list[int]):
        """Asynchronous, returns the work: the k-th ``sizes[k]`` elements of ``inp`` to rank k; into ``out``, the
        ``sizes[rank]`` elements every rank sends here, in rank order."""
        me = self.rank
        self._count((inp.numel() - sizes[me]) * inp.element_size())
        return dist.all_to_all_single(out, inp, output_split_sizes=[sizes[me]] * self.world_size,
                                      input_split_sizes=list(sizes), group=self.group, async_op=True)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, sizes: list[int]):
        """Asynchronous, returns the work: every rank's ``sizes[k]`` elements into ``out``, in rank order. ``inp``
        (N, sizes[rank]) holds this rank's elements once for each rank: an all-to-all, as the sizes differ (NCCL's
        and gloo's all-gathers take equal sizes)."""
        self._count((self.world_size - 1) * inp[0].numel() * inp.element_size())
        return dist.all_to_all_single(out, inp.view(-1), output_split_sizes=list(sizes),
                                      input_split_sizes=[inp.shape[1]] * self.world_size, group=self.group,
                                      async_op=True)

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can hold these collectives (NCCL's; gloo's run on the host)."""
        return dist.get_backend(self.group) == "nccl"

    def check_same(self, text: str) -> None:
        """RuntimeError unless every rank passes the same ``text`` (the description of the buckets it built)."""
        texts = [None] * self.world_size
        dist.all_gather_object(texts, text, group=self.group)
        if len(set(texts)) > 1:
            raise RuntimeError("the ranks built different gradient buckets: their backward passes cast different "
                               "vote calls (every rank must run the same model on batches of the same shape)")

    def _count(self, n: int) -> None:
        self.sent_bytes += n
        self.calls += 1


def attach(opt: FlipOptimizer, ctx: DistContext | None = None, grad_dtype: str = "fp32", **caps) -> VoteExchange:
    """Make ``opt`` vote as one with the other ranks of ``ctx`` (default: the initialised default group).
    ``caps``: ``bucket_bytes`` / ``first_bucket_bytes`` of :class:`VoteExchange`."""
    if not isinstance(opt, FlipOptimizer):
        raise TypeError(f"attach() takes a FlipOptimizer, got {type(opt).__name__}")
    if ctx is None:
        if not dist.is_initialized():
            raise ValueError("attach() needs an initialised process group: call trueternary.distributed.setup()")
        comm = VoteExchange(dist.get_world_size(), dist.get_rank(), None, grad_dtype, **caps)
    else:
        comm = VoteExchange(ctx.world_size, ctx.rank, ctx.group, grad_dtype, **caps)
    opt.comm = comm
    return comm


# ------------------------------------------------------------------------------------ DDP for float parameters
@dataclass
class DDPHookState:
    group: object
    world_size: int
    grad_dtype: str = "fp32"
    sent_bytes: int = 0
    calls: int = 0


def _counting_allreduce_hook(state: DDPHookState, bucket):
    """DDP comm hook: torch's allreduce (or bf16-compress) hook, counting the bytes the ring sends per rank."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    payload = buf.numel() * (2 if state.grad_dtype == "bf16" else buf.element_size())
    state.sent_bytes += ring_all_reduce_bytes(payload, state.world_size)
    state.calls += 1
    with record_function("trueternary.ddp.allreduce"):
        if state.grad_dtype == "bf16":
            return default_hooks.bf16_compress_hook(state.group, bucket)
        return default_hooks.allreduce_hook(state.group, bucket)


@dataclass
class CommMeter:
    """Bytes one rank of a training run sends: the ternary exchange, DDP's gradient buckets, the per-step sync."""

    exchanges: list[VoteExchange] = field(default_factory=list)
    ddp: DDPHookState | None = None
    world_size: int = 1
    _last: tuple[int, int] = (0, 0)

    def totals(self) -> tuple[int, int]:
        ternary = sum(c.sent_bytes for c in self.exchanges)
        floats = self.ddp.sent_bytes if self.ddp is not None else 0
        return ternary, floats

    def take_step(self) -> dict:
        """Bytes this rank sent since the previous call (one optimiser step), the step sync included."""
        ternary, floats = self.totals()
        out = {"comm_ternary_bytes": ternary - self._last[0], "comm_float_bytes": floats - self._last[1]}
        out["comm_bytes"] = (out["comm_ternary_bytes"] + out["comm_float_bytes"]
                             + ring_all_reduce_bytes(STEP_SYNC_BYTES, self.world_size))
        self._last = (ternary, floats)
        return out


def trainable_float_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def prepare_recipe(recipe, ctx: DistContext, grad_dtype: str = "fp32") -> CommMeter:
    """Make a built (and restored) Recipe data-parallel: votes summed over ranks, floats under DDP.

    Call after restoring a checkpoint: DDP broadcasts rank 0's float state when it wraps the model
    (identical anyway: every rank builds the same model from the same seed or checkpoint).
    """
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {grad_dtype!r}")
    meter = CommMeter(world_size=ctx.world_size)
    for o in recipe.optimizers:
        if isinstance(o, FlipOptimizer):
            meter.exchanges.append(attach(o, ctx, grad_dtype))
    if trainable_float_parameters(recipe.model):
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Buffers (ternary state, rotary tables) are identical on every rank by construction: never broadcast
        # them before each forward (torch >= 2.13 spells it forward_sync_buffers, older ones broadcast_buffers).
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel)
                   .parameters else "broadcast_buffers")
        ddp = DistributedDataParallel(recipe.model, device_ids=ids, process_group=ctx.group, **{no_sync: False})
        meter.ddp = DDPHookState(group=ctx.group, world_size=ctx.world_size, grad_dtype=grad_dtype)
        ddp.register_comm_hook(meter.ddp, _counting_allreduce_hook)
        recipe.forward_model = ddp
    return meter


# ------------------------------------------------------------------------------------ data and replicas
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
def exchange_model(opt: FlipOptimizer, model: nn.Module, world_size: int, grad_dtype: str = "fp32", rank: int = 0,
                   bucket_bytes: int = BUCKET_BYTES, first_bucket_bytes: int = FIRST_BUCKET_BYTES) -> dict:
    """What rank ``rank`` of ``opt``'s exchange sends per step when every module it trains votes once per step, the
    calls coming in the reverse of the model's order (backward's usual order): the buckets its first step builds.

    Per bucket, rank k sends the gradients of the other ranks' shares and its shares' results (votes, scale votes,
    moving-average codes) to the N - 1 others; ``mean_bytes`` is the mean over the ranks, (N-1)/N of all
    gradients and all results.
    """
    from .optim.data_parallel import exchange_slots, plan_buckets

    if world_size == 1:  # one rank: nothing is exchanged
        return {"bytes": 0, "mean_bytes": 0, "gradient_bytes": 0, "vote_bytes": 0, "collectives": 0}
    elsize = torch.empty((), dtype=GRAD_DTYPES[grad_dtype]).element_size()
    buckets = plan_buckets(exchange_slots(opt, model), world_size, rank, elsize, bucket_bytes, first_bucket_bytes)
    grads = sum(sum(b.grad_sizes) for b in buckets) * elsize
    votes = sum(sum(b.out_sizes) for b in buckets)
    return {"bytes": sum(b.sent_bytes(elsize, rank) for b in buckets),
            "mean_bytes": (world_size - 1) * (grads + votes) // world_size,
            "gradient_bytes": (world_size - 1) * grads // world_size,
            "vote_bytes": (world_size - 1) * votes // world_size,
            "collectives": 2 * len(buckets)}


def recipe_comm(recipe, world_size: int, grad_dtype: str = "fp32", rank: int = 0) -> dict:
    """The model of the bytes rank ``rank`` sends per step for a built Recipe at ``world_size`` ranks (``sent``;
    ``sent_mean``: the mean over the ranks): the ternary exchange (:func:`exchange_model`), DDP's ring all-reduce
    of the float gradients, the step sync."""
    ternary = (exchange_model(recipe.flip, recipe.model, world_size, grad_dtype, rank)
               if recipe.flip is not None else exchange_model(None, None, 1))
    params = trainable_float_parameters(recipe.model)
    float_payload = sum(p.numel() for p in params) * (2 if grad_dtype == "bf16" else 4)
    float_bytes = ring_all_reduce_bytes(float_payload, world_size)
    sync = ring_all_reduce_bytes(STEP_SYNC_BYTES, world_size)
    n_weights = sum(w.numel() for w in ternary_weights(recipe.model)) or sum(p.numel() for p in params)
    sent = ternary["bytes"] + float_bytes + sync
    mean = ternary["mean_bytes"] + float_bytes + sync
    return {"grad_dtype": grad_dtype, "ternary": recipe.flip is not None, "ternary_bytes": ternary["bytes"],
            "ternary_gradient_bytes": ternary["gradient_bytes"], "ternary_vote_bytes": ternary["vote_bytes"],
            "ternary_collectives": ternary["collectives"], "float": bool(params), "float_payload": float_payload,
            "float_bytes": float_bytes, "sync_bytes": sync, "sent": sent, "sent_mean": mean, "weights": n_weights,
            "per_weight": sent / n_weights, "per_weight_mean": mean / n_weights}


def comm_sent_as(c: dict) -> str:
    """How a :func:`recipe_comm` travels, in words."""
    parts = []
    if c["ternary"]:
        parts.append(f"{c['grad_dtype']} gradients + int8 votes")
    if c["float"]:
        parts.append(f"{c['grad_dtype']} grads (DDP)")
    return " + ".join(parts) or "only the step sync"


def comm_table(base_model: nn.Module, hp, world_sizes: list[int], title: str = "") -> str:
    """Bytes each rank sends per optimiser step (the mean over the ranks), for every config, at each world size
    (the ``--comm_report``)."""
    from .recipes import CONFIG_NAMES, build_recipe

    recipes = {name: build_recipe(name, base_model, hp) for name in CONFIG_NAMES}
    rows = [(name, "fp32") for name in CONFIG_NAMES] + [(name, "bf16") for name in CONFIG_NAMES]
    lines = [f"Bytes each rank sends per optimiser step{title}",
             "ternary configs: their gradients (but their own share) in buckets, then their share's votes "
             "(optim/data_parallel.py); float configs: DDP's ring all-reduce, 2 (N-1)/N x the gradients; "
             f"+{STEP_SYNC_BYTES} B all-reduced per step: the loss and non-finite flag every rank agrees on"]
    for n in world_sizes:
        ref = recipe_comm(recipes["Adam_FP32"], n, "fp32")
        lines += ["", f"world size {n}",
                  f"{'config':<33}{'sent as':<48}{'sent B/rank/step':>18}{'B/weight':>10}{'collectives':>13}"
                  f"{'vs Adam fp32':>14}"]
        for name, gd in rows:
            c = recipe_comm(recipes[name], n, gd)
            calls = f"{c['ternary_collectives']}" if c["ternary"] else "buckets"
            if c["ternary"] and c["float"]:
                calls += " + buckets"
            label = name if gd == "fp32" else f"{name} (bf16)"
            vs = f"{c['sent_mean'] / ref['sent_mean']:>13.3f}x" if ref["sent_mean"] else f"{'-':>14}"
            lines.append(f"{label:<33}{comm_sent_as(c):<48}{c['sent_mean']:>18,}{c['per_weight_mean']:>10.4f}"
                         f"{calls:>13}{vs}")
    return "\n".join(lines)
