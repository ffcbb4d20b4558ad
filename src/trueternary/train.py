"""``trueternary train``: one training run, from flags (or a checkpoint) to ``runs/<run_name>/``.

The loop in :func:`train` reads top to bottom like nanoGPT's ``train.py``: set up data, model and
recipe (or restore them from a checkpoint), then step, log, evaluate and save. Everything a run
produces goes to ``<out_dir>/<run_name>/``:

    config.json          the run's TrainConfig, model config, hyper-parameters, data and device
    metrics.jsonl        one JSON object per logged step ({"step", "loss", "train_bpb", "lr", "flips",
                         "tokens_per_s", "elapsed_s"}) and per evaluation ({"step", "val_bpb",
                         "peak_memory_bytes"}: this rank's CUDA allocator peak, or the process RSS peak on CPU)
    plot.png             training loss and validation bits per byte against step
    checkpoints/         step_<NNNNNNN>.safetensors (see trueternary.checkpoint); the newest
                         ``keep_checkpoints`` are kept
    tensorboard/         event files, only when the optional ``tensorboard`` package is installed
    .lock                locked (flock) by the process that runs in the directory, and naming it
                         (:class:`RunDirectory`): one process per run directory
    replaced-<time>/     the files of an earlier run, moved here by ``--overwrite``

``step`` always counts completed optimiser steps. Resuming (``--resume PATH|auto``) restores model,
optimiser, RNG and data position, so the continued run is bit-identical to one that never stopped
(on CPU; see docs/training.md for GPU). A directory that holds another run's files is never written
into without ``--resume`` or ``--overwrite``. SIGTERM (what job schedulers send before a kill) ends the
run after its current step with a checkpoint (:class:`StopSignal`). A file that cannot be written (disk
full, read-only, permissions) ends the run with a one-line error naming it; checkpoints already written
stay intact. docs/training.md, "Reliability", lists what is guaranteed and which tests check it.

Under ``torchrun --nproc_per_node N`` (see trueternary.distributed and docs/distributed.md) the same loop
trains data-parallel: ``--batch_size`` is the global batch, split evenly over the ranks, each rank
draws its own windows; ternary votes are summed over the ranks as integers and float parameters go
through DDP. Rank 0 alone prints and writes the run directory; a checkpoint holds every rank's data
position and resumes on any world size.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import determinism, distributed, memory
from .bench import parse_overrides, validation_bpb
from .checkpoint import CheckpointError, WriteError
from .data import Corpus, RandomWindows, eval_windows, load_corpus
from .models import build_model, check_compile_ops, model_names
from .optim import BACKENDS, NonFiniteGradientError, resolve_backend
from .recipes import CONFIG_NAMES, Hparams, build_recipe, lr_factor
from .rule import FlipRule

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged); reported in one line, exit code 1."""


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # None: the embedded default corpus (Python stdlib sources)
    data_dir: str | None = None  # data cache: the enwik8 download, decompressed .gz files and directories
    # model
    model: str = "transformer"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    group_size: int = 64
    # training configuration (trueternary.recipes)
    config: str = "TrueTernary"
    lr: float | None = None  # peak lr (vote scale for TrueTernary); None: the recipe's default
    accum_threshold: int | None = None  # None: FlipRule's default
    scale_update_interval: int = 1
    rule: dict = field(default_factory=dict)  # further FlipRule field overrides
    update_backend: str = "auto"
    compile: bool = False  # torch.compile the model's shared ops (norms, attention, activations; transformer)
    # TrueTernary, gpu backend: the whole step as one CUDA graph (Recipe.use_cuda_graph); "auto": where it can be
    cuda_graph: bool | str = "auto"
    # bit-for-bit repeatable steps on a GPU too (trueternary.determinism: deterministic algorithms, math attention)
    deterministic: bool = False
    # recompute each transformer block's activations in backward (ByteTransformer.use_activation_checkpointing)
    activation_checkpointing: bool = False
    ddp_grad_dtype: str = "fp32"  # data parallelism: dtype of the float gradients DDP all-reduces (fp32, bf16)
    # run
    max_steps: int = 300
    batch_size: int = 16  # the global batch: split evenly over data-parallel ranks
    ctx: int = 64
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0: auto (1 for models up to d_model 256, else torch's default)
    eval_every: int = 100
    eval_windows: int = 128
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    stop_at: int | None = None  # stop (and save) after this step, keeping the --max_steps schedule
    run_name: str | None = None
    out_dir: str = "runs"
    resume: str | None = None  # checkpoint file, run directory, or "auto"
    overwrite: bool = False  # a fresh run in a directory holding another run: move its files aside first


# Flags that define the run: a resumed run must keep them (or it would not continue the same run).
RUN_DEFINING = ("data", "model", "d_model", "n_layers", "n_heads", "group_size", "config", "lr",
                "accum_threshold", "scale_update_interval", "rule", "batch_size", "ctx", "seed")
_FIELDS = {f.name for f in fields(TrainConfig)}
# Upper bounds of the integer flags (lower bounds: validate): step counts within int32 (beyond any run,
# and within every integer type that holds one), shapes where a run could still fit some machine (the memory
# check refuses most large ones sooner), the seed what torch.manual_seed takes.
STEP_LIMIT = 2**31 - 1
FLAG_LIMITS = {
    "max_steps": STEP_LIMIT, "stop_at": STEP_LIMIT, "eval_every": STEP_LIMIT, "save_every": STEP_LIMIT,
    "log_every": STEP_LIMIT, "keep_checkpoints": STEP_LIMIT, "scale_update_interval": STEP_LIMIT,
    "d_model": 1 << 16, "n_layers": 1 << 12, "n_heads": 1 << 12, "group_size": 1 << 20, "ctx": 1 << 20,
    "batch_size": 1 << 20, "eval_windows": 1 << 20, "threads": 1 << 10, "seed": 2**64 - 1,
}


# ------------------------------------------------------------------------------------ configuration
def _say(*args) -> None:
    """print on rank 0 only (every line of a data-parallel run would otherwise appear once per rank)."""
    if distributed.is_main_process():
        print(*args, flush=True)


def graph_capable(cfg: TrainConfig) -> bool:
    """Whether the configuration can run its step as one CUDA graph (on a CUDA device, in one process):
    TrueTernary / TrueTernary_Naive on the gpu update backend (``Recipe.use_cuda_graph`` checks the rest)."""
    return cfg.config in ("TrueTernary", "TrueTernary_Naive") and cfg.update_backend in ("auto", "gpu")


def hparams_for(cfg: TrainConfig) -> Hparams:
    """The recipe hyper-parameters: recipe defaults, FlipRule defaults, and the run's overrides."""
    rule_over = dict(cfg.rule)
    rule_over["scale_update_interval"] = cfg.scale_update_interval
    if cfg.accum_threshold is not None:
        rule_over["accum_threshold"] = cfg.accum_threshold
    rule = FlipRule.for_run(cfg.max_steps, **rule_over)
    hp = Hparams(steps=cfg.max_steps, group_size=cfg.group_size, rule=rule,
                 lr={cfg.config: cfg.lr} if cfg.lr is not None else {})
    if cfg.accum_threshold is not None:
        hp.naive_threshold = cfg.accum_threshold
    return hp


def validate(cfg: TrainConfig) -> Hparams:
    """Check every flag; raise UsageError with a one-line message. Returns the hyper-parameters."""
    from .cli import UsageError

    if cfg.config not in CONFIG_NAMES:
        raise UsageError(f"unknown --config {cfg.config!r}; choose from {', '.join(CONFIG_NAMES)}")
    if cfg.model not in model_names():
        raise UsageError(f"unknown --model {cfg.model!r}; choose from {', '.join(model_names())}")
    if cfg.update_backend not in BACKENDS:
        raise UsageError(f"unknown --update_backend {cfg.update_backend!r}; choose from {', '.join(BACKENDS)}")
    for name in ("max_steps", "batch_size", "ctx", "d_model", "n_layers", "n_heads", "group_size", "eval_windows",
                 "log_every", "stop_at"):
        v = getattr(cfg, name)
        if v is None and name == "stop_at":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"--{name} must be a positive integer, got {v!r}")
    for name in ("eval_every", "save_every", "keep_checkpoints", "seed", "scale_update_interval", "threads"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(f"--{name} must be an integer >= 0, got {v!r}")
    for name, limit in FLAG_LIMITS.items():
        v = getattr(cfg, name)
        if v is not None and v > limit:
            raise UsageError(f"--{name} must be at most {limit}, got {v}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.run_name is not None and (not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", "..")):
        raise UsageError(f"--run_name must be a plain directory name, got {cfg.run_name!r}")
    if cfg.ddp_grad_dtype not in distributed.GRAD_DTYPES:
        raise UsageError(f"--ddp_grad_dtype must be one of {', '.join(distributed.GRAD_DTYPES)}, "
                         f"got {cfg.ddp_grad_dtype!r}")
    try:
        world = distributed.requested_world_size()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.batch_size % world:
        raise UsageError(f"--batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                         f"{world} data-parallel ranks (each rank trains on batch_size / {world} sequences)")
    if cfg.compile is not True and cfg.compile is not False:
        raise UsageError(f"compile must be true or false, got {cfg.compile!r}")
    if cfg.deterministic is not True and cfg.deterministic is not False:
        raise UsageError(f"deterministic must be true or false, got {cfg.deterministic!r}")
    if cfg.cuda_graph is not True and cfg.cuda_graph is not False and cfg.cuda_graph != "auto":
        raise UsageError(f"cuda_graph must be true, false or 'auto', got {cfg.cuda_graph!r}")
    if cfg.cuda_graph is True and not graph_capable(cfg):
        raise UsageError("--cuda_graph is for TrueTernary / TrueTernary_Naive on the gpu update backend "
                         f"(got --config {cfg.config}, --update_backend {cfg.update_backend})")
    if cfg.overwrite is not True and cfg.overwrite is not False:
        raise UsageError(f"overwrite must be true or false, got {cfg.overwrite!r}")
    if cfg.overwrite and cfg.resume is not None:
        raise UsageError("--overwrite starts a fresh run and --resume continues one: give one of them")
    try:
        hp = hparams_for(cfg)
        model_config(cfg)
        if cfg.compile:
            check_compile_ops(cfg.model)
        resolve_backend(cfg.update_backend)  # e.g. the gpu backend without CUDA: refused before anything is written
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    check_memory(cfg, world)
    return hp


def memory_floor(cfg: TrainConfig, world: int = 1) -> int:
    """Bytes a run needs at least, in one process: its float32 initial model twice over (the recipe is
    built from a deep copy, and both exist until it is built) and one step's float32 logits. Weights
    counted: the embedding, the output head and four d x d attention matrices per layer, which every
    model family has (the transformer has three times as many; the bound is for refusing what cannot fit)."""
    vocab = int(model_config(cfg).get("vocab_size", 256))
    weights = cfg.n_layers * 4 * cfg.d_model ** 2 + 2 * vocab * cfg.d_model
    return 8 * weights + 4 * (cfg.batch_size // world) * cfg.ctx * vocab


def machine_memory() -> int | None:
    """Physical memory of this machine, or the process's cgroup limit when smaller; None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(cfg: TrainConfig, world: int = 1) -> None:
    """Refuse a run that cannot fit this machine's memory (:func:`memory_floor`), before anything is written
    or allocated: a model too large to build would otherwise fail half-way, or draw the OOM killer."""
    from .cli import UsageError

    need, have = memory_floor(cfg, world), machine_memory()
    if have is not None and need > have:
        raise UsageError(f"--d_model {cfg.d_model} --n_layers {cfg.n_layers} --batch_size {cfg.batch_size} "
                         f"--ctx {cfg.ctx}: the run needs at least {_gib(need)} of memory (the float initial model "
                         f"twice and one step's logits), more than this machine's {_gib(have)}")


def model_config(cfg: TrainConfig) -> dict:
    """The model family's config for this run (validated by building the config object)."""
    from .models import _MODELS

    _, cfg_cls = _MODELS[cfg.model]
    return cfg_cls.from_dict(dict(ctx=cfg.ctx, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                  n_heads=cfg.n_heads)).to_dict()


SMALL_MODEL_D = 256


def cpu_threads(cfg: TrainConfig) -> int:
    """Intra-op threads on CPU. Small models get one by default: their matrices are small, and whether a
    second thread helps depends on what else runs on the cores (measured in docs/training.md: from ~1.4x
    faster on a quiet machine to ~10x slower on a busy one, where OpenMP threads wait for descheduled
    peers). One thread bounds the worst case; ``--threads`` chooses."""
    if cfg.threads:
        return cfg.threads
    return 1 if cfg.d_model <= SMALL_MODEL_D else torch.get_num_threads()


def _resume_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint file ``--resume`` names, or None for a fresh run."""
    from .cli import UsageError

    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        if cfg.run_name is None:
            raise UsageError("--resume auto needs --run_name (the run to continue)")
        found = ckpt_io.latest_checkpoint(Path(cfg.out_dir) / cfg.run_name)
        if found is None:
            _say(f"resume auto: no checkpoint in {Path(cfg.out_dir) / cfg.run_name}, starting a fresh run")
        return found
    p = Path(cfg.resume)
    if p.is_dir():
        found = ckpt_io.latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"no checkpoint in {p / ckpt_io.CHECKPOINT_DIR}")
        return found
    return p  # load_checkpoint reports a missing or bad file


def merge_resumed(ckpt: ckpt_io.Checkpoint, cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The checkpoint's TrainConfig with the flags the user gave on top; run-defining ones must agree."""
    from .cli import UsageError

    saved = {k: v for k, v in (ckpt.meta.get("train_config") or {}).items() if k in _FIELDS}
    merged = TrainConfig(**saved)
    mcfg = ckpt.meta["model"].get("config", {})
    if "ctx" in explicit and isinstance(mcfg.get("ctx"), int) and cfg.ctx > mcfg["ctx"]:
        raise UsageError(f"--ctx {cfg.ctx} exceeds the model's context {mcfg['ctx']} (from {ckpt.path})")
    clashes = [f"--{k} {getattr(cfg, k)!r} (checkpoint: {saved.get(k)!r})" for k in RUN_DEFINING
               if k in explicit and k in saved and getattr(cfg, k) != saved[k]]
    if clashes:
        raise UsageError(f"resuming continues the same run; these flags differ from {ckpt.path}: "
                         + "; ".join(clashes))
    for k in explicit:
        setattr(merged, k, getattr(cfg, k))
    merged.resume = cfg.resume
    if "stop_at" not in explicit:  # a one-off stop of the interrupted process, not part of the run
        merged.stop_at = None
    if "overwrite" not in explicit:  # what the first process did to its directory, not part of the run
        merged.overwrite = False
    if "out_dir" not in explicit:
        merged.out_dir = cfg.out_dir
    if merged.max_steps != saved.get("max_steps"):
        _say(f"note: --max_steps {merged.max_steps} differs from the checkpoint's {saved.get('max_steps')}: "
              "the learning-rate schedule changes from here on")
    return merged


def _explicit_fields(cfg: TrainConfig) -> set[str]:
    default = TrainConfig()
    return {f for f in _FIELDS if getattr(cfg, f) != getattr(default, f)}


# ------------------------------------------------------------------------------------ run directory
LOCK_FILE = ".lock"
# What a run writes into its directory: finding any of these, a fresh run refuses to start (or, with
# --overwrite, moves them into REPLACED_PREFIX<time>/).
RUN_FILES = ("config.json", "metrics.jsonl", "plot.png", ckpt_io.CHECKPOINT_DIR, "tensorboard")
REPLACED_PREFIX = "replaced-"


class RunDirectory:
    """A run directory, held by one process for the run's life (rank 0 of a data-parallel run).

    ``<run_dir>/.lock`` is locked with ``flock`` and names its holder (pid, host, start time): a second
    process is refused with a one-line error naming it, before it writes anything. The kernel releases the
    lock when the holder exits, however it exits (SIGKILL included), so a killed run never blocks the next.
    If the run fails before writing anything, :meth:`abandon` removes the lock file and the directories
    this process created, so no empty run directory is left behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._created: list[Path] = []  # directories this process made, outermost first
        self._lock_fd: int | None = None
        self._lock_created = False

    @classmethod
    def claim(cls, out_dir: str, run_name: str | None, config_name: str) -> RunDirectory:
        """Create (if needed) and lock ``<out_dir>/<run_name>``; with no ``run_name``, a new directory
        ``<config>-<date>-<time>[-N]`` (created with ``mkdir``, which fails if another process took the name)."""
        if run_name is None:
            base = f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            self = cls(Path(out_dir) / base)
            self._make_dirs(self.path.parent)
            for i in itertools.count(1):
                self.path = Path(out_dir) / (base if i == 1 else f"{base}-{i}")
                try:
                    self.path.mkdir()
                except FileExistsError:
                    continue
                except OSError as e:
                    self.abandon()
                    raise ckpt_io.write_error(self.path, e, "create run directory") from None
                self._created.append(self.path)
                break
        else:
            self = cls(Path(out_dir) / run_name)
            self._make_dirs(self.path)
        try:
            self._lock()
        except BaseException:
            self.abandon()
            raise
        return self

    def _make_dirs(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._created = [d for d in reversed(missing) if d.is_dir()]
            self.abandon()
            raise ckpt_io.write_error(path, e, "create run directory") from None
        self._created += reversed(missing)

    def _lock(self) -> None:
        from .cli import UsageError

        path = self.path / LOCK_FILE
        while True:
            existed = path.exists()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ckpt_io.write_error(path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise UsageError(f"{self.path} is in use by another training run ({holder}); wait for it "
                                 "to end, or choose another --run_name") from None
            except OSError as e:  # e.g. a file system without locks
                os.close(fd)
                raise ckpt_io.write_error(path, e, "lock") from None
            try:  # the file locked must still be the one at the path (abandon() of another run may remove it)
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd, self._lock_created = fd, not existed
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, "
                         f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError as e:
            raise ckpt_io.write_error(path, e) from None

    def run_files(self) -> list[str]:
        return [n for n in RUN_FILES if (self.path / n).exists()]

    def check_fresh(self, overwrite: bool) -> None:
        """A fresh run starts only in a directory without another run's files; ``overwrite`` moves them into
        ``replaced-<time>/`` (nothing is deleted)."""
        from .cli import UsageError

        found = self.run_files()
        if not found:
            return
        ckpts = ckpt_io.list_checkpoints(self.path)
        held = ", ".join(n for n in found if n != ckpt_io.CHECKPOINT_DIR) or "checkpoints/"
        held += f"; {len(ckpts)} checkpoint(s), the newest {ckpts[-1].name}" if ckpts else "; no checkpoint"
        if not overwrite:
            raise UsageError(f"{self.path} already holds a run ({held}); continue it with --resume auto, "
                             "move its files aside with --overwrite, or choose another --run_name")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path / f"{REPLACED_PREFIX}{stamp}"
        i = 1
        while dest.exists():
            i += 1
            dest = self.path / f"{REPLACED_PREFIX}{stamp}-{i}"
        try:
            dest.mkdir()
            for n in found:
                os.rename(self.path / n, dest / n)
        except OSError as e:
            raise ckpt_io.write_error(dest, e, "move the previous run's files to") from None
        _say(f"--overwrite: moved the previous run's files ({', '.join(found)}) to {dest}/")

    def check_resumed(self, step: int) -> None:
        """Resuming step ``step`` here must not go back behind a newer checkpoint of this directory."""
        from .cli import UsageError

        newest = ckpt_io.latest_checkpoint(self.path)
        if newest is not None and ckpt_io.checkpoint_step(newest) > step:
            raise UsageError(f"{self.path} has a newer checkpoint ({newest.name}) than the one resumed "
                             f"(step {step}); resume into another --run_name to branch off")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    def abandon(self) -> None:
        """After a failure: remove the lock file if this process created it, and the directories it created if
        they hold nothing else; then release the lock. A run that wrote nothing leaves nothing behind."""
        if self._lock_fd is not None and self._lock_created:
            ckpt_io._remove_quietly(self.path / LOCK_FILE)  # (while still locked: see the inode check in _lock)
            self._lock_created = False
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if empty
            except FileNotFoundError:
                continue
            except OSError:
                break
        self._created = []
        self.release()


class RunLog:
    """metrics.jsonl (and TensorBoard when installed) of one run directory."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.failed = False
        if self.path.exists():
            # Keep the rows up to the resumed step (none, for a fresh run): later ones are recomputed. A row
            # cut short by a kill or a full disk does not parse and is dropped with them; the file is rewritten
            # if its last line lacks its newline, so the next row starts on a line of its own.
            raw = self.path.read_bytes()
            rows = [ln for ln in raw.decode(errors="replace").splitlines() if ln.strip()]
            keep = [ln for ln in rows if start_step and 0 <= _row_step(ln) <= start_step]
            if len(keep) != len(rows) or (raw and not raw.endswith(b"\n")):
                ckpt_io.atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
        try:
            self.file = open(self.path, "a")
        except OSError as e:
            raise ckpt_io.write_error(self.path, e) from None
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except Exception:  # ImportError without tensorboard; anything else must not stop training
            self.tb = None

    def write(self, row: dict) -> None:
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            self.failed = True
            raise ckpt_io.write_error(self.path, e) from None
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            if not self.failed:  # (after a failed write, closing retries the same bytes: already reported)
                raise ckpt_io.write_error(self.path, e) from None
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """SIGTERM, what job schedulers send before they kill a job: the run finishes its current step, saves a
    checkpoint and ends like a finished ``--stop_at`` (exit 0). Installed for the run's life, in the main
    thread only (where Python delivers signals). A second SIGTERM changes nothing (the save goes on); SIGINT
    still interrupts at once (checkpoint writes are atomic, so an interrupted save leaves the previous one)."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _on_any_rank(ctx: distributed.DistContext | None, flag: bool) -> bool:
    """Collective under data parallelism (every rank calls it at every step): whether any rank's flag is set."""
    if ctx is None or not ctx.has_group:
        return flag
    t = torch.tensor(float(flag), device=ctx.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=ctx.group)
    return bool(t.item())


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue  # a line cut by a crash
    return out


def plot_run(run_dir: str | os.PathLike, title: str = "") -> Path:
    """plot.png: training loss (bits/byte, raw and smoothed) and validation bpb against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["train_bpb"]) for r in rows if "train_bpb" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        xs, ys = zip(*train)
        k = max(1, len(ys) // 40)
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(xs, smooth, color="tab:blue", label="training loss (bits/byte, smoothed)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="tab:orange", label=f"validation (final {ys[-1]:.3f} bits/byte)")
    ax.axhline(math.log2(288), color="grey", ls=":", label="uniform over 288 tokens (8.17)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "plot.png"
    ckpt_io.atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def _device_text(device: torch.device) -> str:
    if device.type != "cpu":
        return str(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n > 1 else ''})"


def _write_json(path: Path, obj: dict) -> None:
    ckpt_io.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


# ------------------------------------------------------------------------------------ checkpoints
def save(run_dir: Path, recipe, batches: RandomWindows, cfg: TrainConfig, hp: Hparams, corpus: Corpus,
         fingerprint: str, device: torch.device, positions: list[dict] | None = None) -> Path:
    """Write a checkpoint. ``positions``: every data-parallel rank's data position (rank order), saved
    next to rank 0's so a resume on the same world size continues every rank's window stream."""
    tensors, meta = ckpt_io.recipe_state(recipe)
    data = {"name": corpus.name, "fingerprint": fingerprint, "position": batches.state_dict()}
    if positions is not None:
        data.update(position=positions[0], positions=positions, world_size=len(positions))
    meta.update(
        model={"name": cfg.model, "config": recipe.model.cfg.to_dict()},
        train_config=asdict(cfg),
        hparams=hp.to_dict(),
        rng=ckpt_io.rng_state(device),
        data=data,
    )
    path = ckpt_io.save_checkpoint(ckpt_io.checkpoint_path(run_dir, recipe.step_count), tensors, meta)
    ckpt_io.prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return path


def _declared_errors() -> tuple[type[BaseException], ...]:
    from .cli import UsageError
    from .data import DataError

    return (UsageError, DataError, CheckpointError, WriteError, TrainingError)


def _on_all_ranks(ctx: distributed.DistContext | None, fn, run_here: bool = True):
    """``fn()`` where ``run_here``; under data parallelism every rank then learns whether any rank failed
    with a declared error, and all raise it together (instead of the others waiting in a collective)."""
    if ctx is None:
        return fn() if run_here else None
    out, err = None, None
    try:
        out = fn() if run_here else None
    except _declared_errors() as e:
        err = e
    ctx.agree(err, _declared_errors())
    return out


def _restore_data_position(batches: RandomWindows, data_meta: dict, cfg: TrainConfig, rank: int, world: int,
                           start_step: int, ckpt_path: Path) -> RandomWindows:
    """Continue this rank's window stream when the checkpoint was written by as many ranks; otherwise
    start a fresh, deterministic stream per (seed, rank, world size, step) and say so."""
    saved_world = int(data_meta.get("world_size", 1))
    try:
        if saved_world == world:
            positions = data_meta.get("positions") or [data_meta["position"]]
            batches.load_state_dict(positions[rank])
            return batches
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{ckpt_path}: {e}") from None
    fresh = RandomWindows(batches.data, batches.batch, batches.ctx,
                          seed=distributed.rank_data_seed(cfg.seed, rank, world, start_step))
    fresh.batches_drawn = start_step
    _say(f"note: {ckpt_path.name} was written by {saved_world} rank(s), this run has {world}: model, optimiser "
         f"and schedule continue exactly, but each rank draws a new window stream from step {start_step}, so "
         "the data order differs from an uninterrupted run")
    return fresh


def _load_data(cfg: TrainConfig):
    corpus = load_corpus(cfg.data, cache_dir=cfg.data_dir)
    return corpus, eval_windows(corpus.val, cfg.ctx, cfg.eval_windows)


# ------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Run (or continue) one training run and return its summary.

    ``explicit`` names the fields the user set (the CLI knows); by default, the fields that differ
    from ``TrainConfig()``. On resume, the checkpoint's config is used with these fields on top.
    Under torchrun (``WORLD_SIZE`` in the environment) or inside an initialised process group, the run
    is data-parallel (trueternary.distributed); the process group is created here if needed and
    destroyed at the end if it was.
    """
    from .cli import UsageError, resolve_device

    explicit = _explicit_fields(cfg) if explicit is None else set(explicit)
    # ---- resume: the checkpoint's config, the user's flags on top
    source = _resume_source(cfg)
    ckpt = ckpt_io.load_checkpoint(source) if source is not None else None
    if ckpt is not None:
        cfg = merge_resumed(ckpt, cfg, explicit)
    hp = validate(cfg)
    device = resolve_device(cfg.device)
    ctx = None
    if distributed.launched():
        try:
            ctx = distributed.setup("auto" if cfg.device == "auto" else device)
        except ValueError as e:
            raise UsageError(str(e)) from None
        device = ctx.device
    loaded = [ckpt]  # handed over so _train can drop the checkpoint's tensors once they are restored
    del ckpt
    held: list[RunDirectory] = []  # the run directory _train claims (rank 0): given back here, however it ends
    try:
        with StopSignal() as stop:
            return _train(cfg, hp, loaded, device, ctx, held, stop)
    except BaseException as e:
        for run_directory in held:
            run_directory.abandon()  # (removes it again if nothing was written into it)
        # Past setup every declared error is raised by all ranks together (agreed through a collective,
        # or deterministic in data every rank reads): rank 0 reports it for all of them.
        if isinstance(e, _declared_errors()) and ctx is not None and ctx.has_group:
            e.raised_on_all_ranks = True
        raise
    finally:
        for run_directory in held:
            run_directory.release()
        if ctx is not None:
            ctx.close()


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def _train(cfg: TrainConfig, hp: Hparams, loaded: list, device: torch.device,
           ctx: distributed.DistContext | None, held: list[RunDirectory], stop: StopSignal) -> dict:
    from .cli import UsageError

    ckpt: ckpt_io.Checkpoint | None = loaded.pop()

    main = ctx is None or ctx.is_main
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    autocast = device.type == "cuda"  # bf16 autocast on GPU, as in bench
    if cfg.cuda_graph is True and (device.type != "cuda" or ctx is not None):
        raise UsageError("--cuda_graph needs a CUDA device and one process (no torchrun data parallelism)")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    if cfg.deterministic:
        determinism.enable()  # before the first GEMM: cuBLAS reads its workspace setting when it starts

    # ---- data (one download per node: local rank 0 first, the others then read the cache)
    if ctx is None:
        corpus, val_windows = _load_data(cfg)
    else:
        node_first = _on_all_ranks(ctx, lambda: _load_data(cfg), run_here=ctx.local_rank == 0)
        the_rest = _on_all_ranks(ctx, lambda: _load_data(cfg), run_here=ctx.local_rank != 0)
        corpus, val_windows = node_first if ctx.local_rank == 0 else the_rest
    batches = RandomWindows(corpus.train, cfg.batch_size // world, cfg.ctx,
                            seed=distributed.rank_data_seed(cfg.seed, rank))
    fingerprint = corpus.fingerprint()

    # ---- run directory: rank 0 creates (or names) and locks it, and checks what it holds; every rank
    # learns of a failure. From here on nothing else may write into it until the run ends.
    def claim() -> RunDirectory:
        run_directory = RunDirectory.claim(cfg.out_dir, cfg.run_name, cfg.config)
        held.append(run_directory)
        if ckpt is not None:
            run_directory.check_resumed(ckpt.step)
        elif cfg.resume is None:
            run_directory.check_fresh(cfg.overwrite)
        # (--resume auto without a checkpoint restarts the run at step 0, replacing the rows of a process
        # that stopped before its first save, as a resume replaces every row after its step)
        ckpt_io.remove_stale_temporaries(run_directory.path)
        return run_directory

    claimed = _on_all_ranks(ctx, claim, run_here=main)
    if cfg.run_name is None:
        name = claimed.path.name if main else None
        cfg.run_name = ctx.broadcast_object(name) if ctx is not None else name
    run_dir = Path(cfg.out_dir) / cfg.run_name

    # ---- model, optimisers, and the state to continue from
    if ckpt is not None:
        mcfg = ckpt.meta["model"]["config"]
    else:
        mcfg = model_config(cfg)

    def build():
        try:
            base = build_model(cfg.model, seed=cfg.seed, compile_ops=cfg.compile, lazy=True,
                               activation_checkpointing=cfg.activation_checkpointing, **mcfg)
            return build_recipe(cfg.config, base, hp, device=device, backend=cfg.update_backend, seed=cfg.seed)
        except ValueError as e:  # e.g. a GPU backend without CUDA
            raise UsageError(str(e)) from None
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise UsageError(f"not enough memory for --d_model {cfg.d_model} --n_layers {cfg.n_layers} on "
                             f"{device} ({' '.join(str(e).split())[:200]})") from None

    recipe = _on_all_ranks(ctx, build)
    start_step = 0
    if ckpt is not None:
        ckpt_io.restore_recipe(recipe, ckpt)
        try:
            data_meta = dict(ckpt.meta["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: bad data position ({e})") from None
        batches = _restore_data_position(batches, data_meta, cfg, rank, world, ckpt.step, ckpt.path)
        ckpt_io.restore_rng(ckpt.meta.get("rng", {}), device)
        start_step = ckpt.step
        if data_meta.get("fingerprint") != fingerprint:
            _say(f"warning: the data differs from the data {ckpt.path.name} was trained on "
                 f"({data_meta.get('name')}); the run will not match an uninterrupted one")
        ckpt = None  # drop the loaded tensors
    meter = distributed.prepare_recipe(recipe, ctx, cfg.ddp_grad_dtype) if ctx is not None else None
    comm_model = distributed.recipe_comm(recipe, world, cfg.ddp_grad_dtype) if ctx is not None else None
    end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.max_steps

    def open_log() -> RunLog:
        info = {
            "train": asdict(cfg), "model": {"name": cfg.model, "config": recipe.model.cfg.to_dict()},
            "hparams": hp.to_dict(), "device": str(device), "torch": torch.__version__,
            "data": {"name": corpus.name, "fingerprint": fingerprint, "train_bytes": len(corpus.train),
                     "val_bytes": len(corpus.val)},
            "started_at_step": start_step,
        }
        if ctx is not None:
            info["distributed"] = {"world_size": world, "backend": ctx.backend, "batch_per_rank": batches.batch,
                                   "comm_model": {k: str(v) if isinstance(v, torch.dtype) else v
                                                  for k, v in comm_model.items()}}
        _write_json(run_dir / "config.json", info)
        return RunLog(run_dir, start_step)

    log = _on_all_ranks(ctx, open_log, run_here=main)
    report = recipe.state_report()
    n_weights = report["ternary_weights"] or report["float_params"]
    _say(f"train: {cfg.config} on {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} held-out "
         f"bytes), {cfg.model} d={cfg.d_model} L={cfg.n_layers} ({n_weights:,} weights), "
         f"batch {cfg.batch_size} x ctx {cfg.ctx}, {_device_text(device)}, run dir {run_dir}")
    if ctx is not None:
        sent = [f"votes as {str(comm_model['vote_dtype']).removeprefix('torch.')}"] if comm_model["vote_dtype"] \
            else []
        sent += [f"{comm_model['grad_dtype']} gradients by DDP"] if comm_model["grad_dtype"] else []
        _say(f"data parallel: {world} rank(s) ({ctx.backend}), {batches.batch} sequences per rank; "
             f"{' + '.join(sent) or 'only the step sync'}: {comm_model['payload']:,} bytes all-reduced per step "
             f"({comm_model['per_weight']:.4f} B/weight)")
    if start_step:
        _say(f"resumed from step {start_step}")

    def write_checkpoint(positions: list[dict] | None, plot_now: bool) -> Path:
        path = save(run_dir, recipe, batches, cfg, hp, corpus, fingerprint, device, positions)
        if plot_now:  # the final plot is drawn after the loop
            plot_run(run_dir, title)
        return path

    # ---- the loop
    from tqdm.auto import tqdm

    title = f"{cfg.config}, {cfg.model} d={cfg.d_model} L={cfg.n_layers}, batch {cfg.batch_size} x ctx {cfg.ctx}"
    if world > 1:
        title += f", {world} ranks"
    tokens_per_step = cfg.batch_size * cfg.ctx
    losses: list[float] = []
    comm_bytes: list[int] = []
    val_bpb = initial_val_bpb = None
    last_saved = stopped_at = None
    t_start = time.perf_counter()
    tok_s_ema = None
    memory.reset_peak(device)
    if start_step == 0 and main:
        initial_val_bpb = validation_bpb(recipe.model, val_windows, device, autocast)
        log.write({"step": 0, "val_bpb": initial_val_bpb})
    auto_graph = cfg.cuda_graph == "auto" and graph_capable(cfg) and device.type == "cuda" and ctx is None
    if (cfg.cuda_graph is True or auto_graph) and start_step < end_step:
        shape = (cfg.batch_size // world, cfg.ctx)
        try:
            recipe.use_cuda_graph(torch.zeros(shape, dtype=torch.long, device=device),
                                  torch.zeros(shape, dtype=torch.long, device=device), autocast)
            _say("step: one CUDA graph, replayed (--no-cuda_graph for eager steps)")
        except ValueError as e:
            if cfg.cuda_graph is True:
                raise UsageError(f"--cuda_graph: {e}") from None
            _say(f"step: eager ({e})")
    bar = tqdm(total=end_step, initial=start_step, desc=cfg.run_name, unit="step", dynamic_ncols=True,
               disable=None if main else True, leave=True)
    try:
        for step in range(start_step, end_step):
            x, y = batches.next(device)
            t0 = time.perf_counter()
            done = step + 1
            try:
                loss = recipe.train_step(x, y, autocast)
                bad = None
            except NonFiniteGradientError as e:
                if ctx is None:
                    raise TrainingError(f"training diverged at step {done}: {e}") from None
                loss, bad = torch.full((), float("nan")), e
            except (MemoryError, RuntimeError) as e:
                if not _out_of_memory(e):
                    raise
                raise UsageError(f"out of memory at step {done} on {device} ({' '.join(str(e).split())[:200]}); "
                                 "lower --batch_size, --ctx or the model size") from None
            if ctx is not None:  # the global batch's loss, and one verdict for every rank
                lv, any_bad = ctx.sync_step(loss, bad is not None)
                if any_bad:
                    why = str(bad) if bad is not None else "another rank's gradients had NaN/inf"
                    raise TrainingError(f"training diverged at step {done}: {why}")
            else:
                lv = float(loss)  # synchronises the device, so the step time is complete
            dt = time.perf_counter() - t0
            if not math.isfinite(lv) or lv > 4 * math.log(recipe.model.cfg.vocab_size):
                bad = recipe.nonfinite_layers_last_step()  # a graphed step reports NaN/inf gradients this way
                why = f"{bad} layer gradient(s) had NaN/inf; their votes were dropped" if bad else f"loss {lv:.4g}"
                raise TrainingError(f"training diverged at step {done}: {why}")
            losses.append(lv)
            flips = recipe.flips_last_step()
            tok_s = tokens_per_step / dt if dt > 0 else float("nan")
            tok_s_ema = tok_s if tok_s_ema is None else 0.9 * tok_s_ema + 0.1 * tok_s
            comm = meter.take_step() if meter is not None else {}
            if comm:
                comm_bytes.append(comm["comm_bytes"])
            final = done == end_step
            # SIGTERM: this step is the last; every rank stops at the same one (a collective at every step)
            stopping = _on_any_rank(ctx, stop.received) and not final
            if main and (done % cfg.log_every == 0 or final or stopping):
                log.write({"step": done, "loss": lv, "train_bpb": lv / LN2,
                           "lr": hp.lr_for(cfg.config) * lr_factor(step, hp.steps, hp.warmup_frac, hp.min_lr_frac),
                           "flips": flips, "tokens_per_s": tok_s, "elapsed_s": time.perf_counter() - t_start,
                           **comm})
            bar.set_postfix_str(f"loss {lv:.3f} bpb {lv / LN2:.3f} {tok_s_ema:,.0f} tok/s flips/step {flips:,}",
                                refresh=False)
            bar.update(1)
            if main and ((cfg.eval_every and done % cfg.eval_every == 0) or final):
                val_bpb = validation_bpb(recipe.model, val_windows, device, autocast)
                log.write({"step": done, "val_bpb": val_bpb, "peak_memory_bytes": memory.peak(device)})
                el = time.perf_counter() - t_start
                eta = el / (done - start_step) * (end_step - done)
                bar.write(f"step {done:>6}/{cfg.max_steps} | loss {lv:.4f} | train {lv / LN2:.3f} bpb | "
                          f"val {val_bpb:.3f} bpb | {tok_s_ema:,.0f} tok/s | flips/step {flips:,} | "
                          f"{el:.0f}s elapsed, ETA {eta:.0f}s")
            if (cfg.save_every and done % cfg.save_every == 0) or final or stopping:
                positions = None
                if ctx is not None:
                    positions = ctx.all_gather_objects(batches.state_dict())
                    diverged = distributed.mismatched_replicas(ckpt_io.recipe_state(recipe)[0], ctx)
                    if diverged:  # never save a state the ranks disagree on
                        shown = ", ".join(diverged[:4]) + (" ..." if len(diverged) > 4 else "")
                        raise TrainingError(f"ranks hold different training state at step {done} ({shown}): "
                                            "some update was not applied identically on every rank")
                last_saved = _on_all_ranks(ctx, partial(write_checkpoint, positions, not (final or stopping)),
                                           run_here=main)
            if stopping:
                stopped_at = done
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t_start
    if last_saved is None and main:  # nothing left to train (resumed a finished run)
        last_saved = ckpt_io.latest_checkpoint(run_dir)
        print(f"nothing to do: the run is at step {start_step} of {end_step}")
    plot = plot_run(run_dir, title) if main else None
    summary = {
        "run_dir": str(run_dir), "start_step": start_step,
        "end_step": stopped_at if stopped_at is not None else max(start_step, end_step),
        "stopped_by_signal": "SIGTERM" if stopped_at is not None else None,
        "seconds": seconds, "losses": losses,
        "initial_val_bpb": initial_val_bpb, "val_bpb": val_bpb,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s": tokens_per_step * len(losses) / seconds if losses and seconds > 0 else None,
        "checkpoint": str(last_saved) if last_saved else None, "plot": str(plot) if plot else None,
        "world_size": world, "rank": rank, "peak_memory_bytes": memory.peak(device),
        "peak_memory_kind": memory.peak_kind(device),
    }
    if ctx is not None:
        summary["comm_model"] = comm_model
        summary["comm_bytes_per_step"] = sum(comm_bytes) / len(comm_bytes) if comm_bytes else None
    if losses and main:
        first = f"val {initial_val_bpb:.3f} -> " if initial_val_bpb is not None else ""
        comm_line = ""
        if comm_bytes:
            per_step = summary["comm_bytes_per_step"]
            comm_line = (f"comm: {per_step:,.0f} bytes all-reduced per step, measured ({per_step / n_weights:.4f} "
                         f"B/weight; ring all-reduce: {distributed.ring_bytes_per_rank(per_step, world):,.0f} "
                         f"bytes sent per rank per step)\n")
        val = f", {first}val {val_bpb:.3f} bits/byte" if val_bpb is not None else ""
        print(f"done: {len(losses)} steps in {seconds:.1f}s ({summary['tokens_per_s']:,.0f} tok/s), "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}{val}\n{comm_line}"
              f"checkpoint {last_saved}\nplot {plot}", flush=True)
    if stopped_at is not None and main:
        out_dir = f" --out_dir {cfg.out_dir}" if cfg.out_dir != TrainConfig.out_dir else ""
        print(f"stopped on SIGTERM after step {stopped_at} of {cfg.max_steps} (checkpoint saved); continue with: "
              f"trueternary train --resume auto --run_name {cfg.run_name}{out_dir}", flush=True)
    return summary


# ------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """``trueternary train`` flags. Every default is None here so a resumed run can tell which flags
    were given; the real defaults are TrainConfig's. Both ``--max_steps`` and ``--max-steps`` work."""
    d = TrainConfig()

    def flag(name, **kw):
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = getattr(d, name, None)
        kw.setdefault("help", "")
        if default is not None and kw.get("action") is None:
            kw["help"] += f" (default: {default})"
        p.add_argument(*names, dest=name, default=None, **kw)

    flag("data", metavar="SPEC", help="text file, .gz file, directory (files in sorted order) or 'enwik8'; "
         "default: the embedded corpus (Python stdlib sources)")
    flag("data_dir", metavar="DIR", help="data cache: the enwik8 download, decompressed .gz files and directories "
         "(default: $TRUETERNARY_CACHE or ~/.cache/trueternary)")
    flag("model", help="model family: " + ", ".join(model_names()))
    flag("d_model", type=int, help="model width")
    flag("n_layers", type=int, help="transformer blocks")
    flag("n_heads", type=int, help="attention heads")
    flag("group_size", type=int, help="weights per int8 scale E")
    flag("config", help="training configuration: " + ", ".join(CONFIG_NAMES))
    p.add_argument("--strict_ternary", dest="strict_ternary", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="strict ternary (TrueTernary, the default); --no-strict_ternary selects TrueTernary_Hybrid "
                        "(float log2 scales trained by AdamW)")
    flag("lr", type=float, help="peak learning rate (vote scale for TrueTernary; default: the recipe's)")
    flag("accum_threshold", type=int, help="votes a trit needs to flip (default: FlipRule's)")
    flag("scale_update_interval", type=int, help="steps between scale votes; 0 freezes E")
    p.add_argument("--rule", action="append", default=None, metavar="FIELD=VALUE",
                   help="further FlipRule overrides, e.g. vote_clip=4,decay=0.01")
    flag("update_backend", help="vote/flip backend: " + ", ".join(BACKENDS))
    p.add_argument("--compile", dest="compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the model's norms, attention and activations (the linear layers stay eager): "
                        "on a GPU, float configs' steps about 2x faster after a compile of up to a minute "
                        "(TrueTernary's eager step is host-bound and gains little); transformer only (default: off)")
    p.add_argument("--cuda_graph", "--cuda-graph", dest="cuda_graph", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="TrueTernary on the gpu backend: capture the whole training step in one CUDA graph and "
                        "replay it (no Python per layer: 2-7x faster steps on an H200, the same results); one "
                        "process, CUDA only (default: auto, on wherever it can be; --no-cuda_graph: eager steps)")
    p.add_argument("--deterministic", dest="deterministic", default=None, action=argparse.BooleanOptionalAction,
                   help="bit-for-bit repeatable steps on a GPU too: deterministic algorithms and math attention "
                        "(PyTorch's flash/cuDNN/memory-efficient attention backward is not deterministic at long "
                        "contexts); about 3.3x the step time at 151M on an H100 (default: off)")
    p.add_argument("--activation_checkpointing", "--activation-checkpointing", dest="activation_checkpointing",
                   default=None, action=argparse.BooleanOptionalAction,
                   help="recompute each transformer block's activations in backward instead of keeping them: "
                        "activation memory of one block input per layer, about one more forward per step, the "
                        "same results bit for bit (default: off)")
    flag("ddp_grad_dtype", help="under torchrun: dtype of the float gradients DDP all-reduces for float "
         "parameters (fp32, or bf16 via torch's bf16_compress_hook)")
    flag("max_steps", type=int, help="optimiser steps (also the length of the lr schedule)")
    flag("batch_size", type=int, help="sequences per step, over all data-parallel ranks together")
    flag("ctx", type=int, help="bytes per sequence (the model's context)")
    flag("seed", type=int, help="seed of the model init, the data order and the vote RNG")
    flag("device", help="auto, cpu, cuda or cuda:N")
    flag("threads", type=int, help="CPU threads; 0: 1 for small models (d_model <= 256), else torch's default")
    flag("eval_every", type=int, help="steps between validation evaluations (0: only at the end)")
    flag("eval_windows", type=int, help="held-out windows per evaluation")
    flag("save_every", type=int, help="steps between checkpoints (0: only at the end)")
    flag("keep_checkpoints", type=int, help="newest checkpoints kept (0: all)")
    flag("log_every", type=int, help="steps between metrics.jsonl rows")
    flag("stop_at", type=int, help="stop and save after this step, keeping the --max_steps schedule "
         "(for jobs with a time limit; continue with --resume)")
    flag("run_name", help="directory under --out_dir (default: <config>-<date>-<time>)")
    flag("out_dir", help="parent of run directories")
    flag("resume", metavar="PATH|auto", help="continue from a checkpoint file, a run directory, or 'auto' "
         "(the newest checkpoint of --run_name; a fresh run if there is none)")
    flag("overwrite", action="store_true", help="start a fresh run in a --run_name that holds another run: its "
         "files (config.json, metrics.jsonl, plot.png, checkpoints/, tensorboard/) are moved into "
         "<run dir>/replaced-<time>/ first (without this flag such a directory is refused)")
    p.add_argument("--comm_report", "--comm-report", dest="comm_report", default=None, metavar="N[,N...]",
                   help="print the bytes all-reduced per step per weight of every config for this model at "
                        "N data-parallel ranks (see docs/distributed.md) and exit without training")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from parsed flags, and the set of fields the user gave."""
    from .cli import UsageError

    given = {k: v for k, v in vars(args).items() if k in _FIELDS and v is not None}
    if args.rule:
        try:
            given["rule"] = parse_overrides(args.rule, "rule")
        except ValueError as e:
            raise UsageError(str(e)) from None
    strict = args.strict_ternary
    if strict is False:
        if given.get("config", "TrueTernary_Hybrid") not in ("TrueTernary", "TrueTernary_Hybrid"):
            raise UsageError(f"--no-strict_ternary selects TrueTernary_Hybrid; "
                             f"it contradicts --config {given['config']}")
        given["config"] = "TrueTernary_Hybrid"
    elif strict is True and given.get("config") is not None and given["config"] not in ("TrueTernary",
                                                                                       "TrueTernary_Naive"):
        raise UsageError(f"--strict_ternary contradicts --config {given['config']} (not a strict ternary config)")
    return TrainConfig(**given), set(given)


def comm_report(cfg: TrainConfig, world_sizes: str) -> str:
    """The ``--comm_report`` table for the model ``cfg`` describes (trueternary.distributed.comm_table)."""
    from .cli import UsageError

    try:
        sizes = [int(v) for v in str(world_sizes).split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--comm_report takes world sizes like 2,8,64, got {world_sizes!r}")
    saved_world = os.environ.pop("WORLD_SIZE", None)  # the report is for the sizes asked, not this launch
    try:
        hp = validate(cfg)
    finally:
        if saved_world is not None:
            os.environ["WORLD_SIZE"] = saved_world
    base = build_model(cfg.model, seed=cfg.seed, **model_config(cfg))
    title = (f"\n{cfg.model} d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}, group_size {cfg.group_size}, "
             f"vote_clip {hp.rule.vote_clip}, scale votes every {hp.rule.scale_update_interval or 'never'} step(s)")
    return distributed.comm_table(base, hp, sizes, title)


def run(args: argparse.Namespace) -> dict | None:
    cfg, explicit = config_from_args(args)
    if args.comm_report is not None:
        print(comm_report(cfg, args.comm_report))
        return None
    if distributed.is_main_process():
        return train(cfg, explicit)
    # Other ranks of a data-parallel run: an error every rank raised together is reported by rank 0, so
    # exit with the same status without printing it once per rank; anything else is printed here.
    try:
        return train(cfg, explicit)
    except _declared_errors() as e:
        if not getattr(e, "raised_on_all_ranks", False):
            raise
        raise SystemExit(1 if isinstance(e, TrainingError) else 2) from None
