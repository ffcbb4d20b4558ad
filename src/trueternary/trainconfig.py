"""The flags of one training run: :class:`TrainConfig`, their checks and bounds, and ``trueternary train``'s parser.

:func:`validate` refuses a bad configuration in one line (``UsageError``) before anything is written or
allocated; :func:`merge_resumed` puts the flags given on top of a resumed checkpoint's configuration;
:func:`add_arguments` / :func:`config_from_args` map the command line onto :class:`TrainConfig`.

No torch at module level (the defaults and names come from ``settings`` and ``backends``): ``trueternary train
--help`` and ``audit --help`` build their parsers from here without it; the checks import the modules that need
torch (``recipes``, ``models``, ``distributed``) when they run.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .backends import UPDATE_BACKENDS, UpdateBackend, resolve_backend
from .errors import UsageError
from .flags import THREADS_HELP, parse_overrides
from .settings import CONFIG_NAMES, GROUP_SIZE_DEFAULTS, MODEL_NAMES, FlipRule, default_group_size

if TYPE_CHECKING:  # checkpoint reads TrainConfig from here
    from .checkpoint import Checkpoint
    from .recipes import Hparams


@dataclass
class TrainConfig:
    """Everything ``trueternary train`` is told (its flags, one field each), stored in every checkpoint."""

    # data
    data: str | None = None  # None: the embedded default corpus (Python stdlib sources)
    data_dir: str | None = None  # data cache: the enwik8 download, decompressed .gz files and directories
    # model
    model: str = "transformer"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    group_size: int | None = None  # None: the model family's (settings.default_group_size), set on construction
    # training configuration (trueternary.recipes)
    config: str = "TrueTernary"
    lr: float | None = None  # peak lr (vote scale for TrueTernary); None: the recipe's default
    accum_threshold: int | None = None  # None: FlipRule's default
    scale_update_interval: int = FlipRule.scale_update_interval
    rule: dict = field(default_factory=dict)  # further FlipRule field overrides
    # On purpose not the library's DEFAULT_UPDATE_BACKEND (dense-fallback, which bench and build_recipe use): a
    # training run takes the fastest backend this machine has (auto: gpu where CUDA and Triton are, else dense).
    update_backend: str = UpdateBackend.AUTO.value
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
    threads: int = 0  # CPU intra-op threads; 0: flags.cpu_threads's choice for the model's size
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
    profile_steps: int = 0  # profile this many steps (after two) on every rank: where the time goes (stepprofile)

    def __post_init__(self) -> None:
        if self.group_size is None:
            self.group_size = default_group_size(self.model)


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
    "profile_steps": STEP_LIMIT,
    "d_model": 1 << 16, "n_layers": 1 << 12, "n_heads": 1 << 12, "group_size": 1 << 20, "ctx": 1 << 20,
    "batch_size": 1 << 20, "eval_windows": 1 << 20, "threads": 1 << 10, "seed": 2**64 - 1,
}


# ------------------------------------------------------------------------------------ checks
def graph_capable(cfg: TrainConfig) -> bool:
    """Whether the configuration can run its step as one CUDA graph (on a CUDA device, in one process):
    TrueTernary / TrueTernary_Naive on the gpu update backend (``Recipe.use_cuda_graph`` checks the rest)."""
    return cfg.config in ("TrueTernary", "TrueTernary_Naive") and cfg.update_backend in ("auto", "gpu")


def hparams_for(cfg: TrainConfig) -> Hparams:
    """The run's hyper-parameters (:meth:`Hparams.for_run`, which bench uses too): the run's flags on the defaults."""
    from .recipes import Hparams

    return Hparams.for_run(cfg.max_steps, lr={cfg.config: cfg.lr} if cfg.lr is not None else {}, rule=cfg.rule,
                           accum_threshold=cfg.accum_threshold, scale_update_interval=cfg.scale_update_interval,
                           group_size=cfg.group_size, batch_tokens=cfg.batch_size * cfg.ctx)


def validate(cfg: TrainConfig) -> Hparams:
    """Check every flag; raise UsageError with a one-line message. Returns the hyper-parameters."""
    from . import distributed
    from .models import check_compile_ops, model_names

    if cfg.config not in CONFIG_NAMES:
        raise UsageError(f"unknown --config {cfg.config!r}; choose from {', '.join(CONFIG_NAMES)}")
    if cfg.model not in model_names():
        raise UsageError(f"unknown --model {cfg.model!r}; choose from {', '.join(model_names())}")
    if cfg.update_backend not in UPDATE_BACKENDS:
        raise UsageError(f"unknown --update_backend {cfg.update_backend!r}; choose from {', '.join(UPDATE_BACKENDS)}")
    for name in ("max_steps", "batch_size", "ctx", "d_model", "n_layers", "n_heads", "group_size", "eval_windows",
                 "log_every", "stop_at"):
        v = getattr(cfg, name)
        if v is None and name == "stop_at":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"--{name} must be a positive integer, got {v!r}")
    for name in ("eval_every", "save_every", "keep_checkpoints", "seed", "scale_update_interval", "threads",
                 "profile_steps"):
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
    """Bytes a run needs at least, in one process, and one step's float32 logits besides. A float or latent
    config: its float32 model (the lazy base is filled in on the copy only, so once). A ternary config: its
    ternary state, 1.2 bytes per weight at least (``T_accum`` and the packed trits), and one float32 layer
    (built layer by layer from a lazy base: docs/scaling.md). Weights counted: the embedding, the output head
    and four d x d attention matrices per layer, which every model family has (the transformer has three times
    as many; the bound is for refusing what cannot fit)."""
    from .recipes import TERNARY_CONFIGS

    vocab = int(model_config(cfg).get("vocab_size", 256))
    weights = cfg.n_layers * 4 * cfg.d_model ** 2 + 2 * vocab * cfg.d_model
    logits = 4 * (cfg.batch_size // world) * cfg.ctx * vocab
    if cfg.config in TERNARY_CONFIGS:
        return int(1.2 * weights) + 4 * max(cfg.d_model ** 2, vocab * cfg.d_model) + logits
    return 4 * weights + logits


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

    need, have = memory_floor(cfg, world), machine_memory()
    if have is not None and need > have:
        raise UsageError(f"--d_model {cfg.d_model} --n_layers {cfg.n_layers} --batch_size {cfg.batch_size} "
                         f"--ctx {cfg.ctx}: the run needs at least {_gib(need)} of memory (its weights and one step's "
                         f"logits), more than this machine's {_gib(have)}")


def model_config(cfg: TrainConfig) -> dict:
    """The model family's config for this run (validated by building the config object)."""
    from .models import _MODELS

    _, cfg_cls = _MODELS[cfg.model]
    return cfg_cls.from_dict(dict(ctx=cfg.ctx, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                  n_heads=cfg.n_heads)).to_dict()


# ------------------------------------------------------------------------------------ resuming
def merge_resumed(ckpt: Checkpoint, cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The checkpoint's TrainConfig with the flags the user gave on top; run-defining ones must agree. A flag not
    given keeps the checkpoint's value, not today's default (a llama checkpoint in groups of 64 stays in them)."""
    from . import distributed

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
    if "profile_steps" not in explicit:  # a measurement of the first process, not part of the run
        merged.profile_steps = 0
    if "out_dir" not in explicit:
        merged.out_dir = cfg.out_dir
    if merged.max_steps != saved.get("max_steps"):
        distributed.say(f"note: --max_steps {merged.max_steps} differs from the checkpoint's "
                        f"{saved.get('max_steps')}: the learning-rate schedule changes from here on")
    return merged


def explicit_fields(cfg: TrainConfig) -> set[str]:
    """The fields of ``cfg`` that differ from their defaults (what a caller of train() set); the group size's
    default is its model family's."""
    family = TrainConfig(model=cfg.model)  # every default, the group size this model family's
    given = {f for f in _FIELDS if getattr(cfg, f) != getattr(family, f)}
    return given | {"model"} if cfg.model != TrainConfig().model else given


# ------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """``trueternary train`` flags. Every default is None here so a resumed run can tell which flags
    were given; the real defaults are TrainConfig's, written into the help. On a ``flags.Parser`` both
    ``--max_steps`` and ``--max-steps`` work."""
    d = TrainConfig()

    def flag(name, **kw):
        default = getattr(d, name, None)
        kw.setdefault("help", "")
        if default is not None and kw.get("action") is None:
            kw["help"] += f" (default: {default})"
        p.add_argument(f"--{name}", dest=name, default=None, **kw)

    flag("data", metavar="SPEC", help="text file, .gz file, directory (files in sorted order) or 'enwik8'; "
         "default: the embedded corpus (Python stdlib sources)")
    flag("data_dir", metavar="DIR", help="data cache: the enwik8 download, decompressed .gz files and directories "
         "(default: $TRUETERNARY_CACHE or ~/.cache/trueternary)")
    flag("model", help="model family: " + ", ".join(MODEL_NAMES))
    flag("d_model", type=int, help="model width")
    flag("n_layers", type=int, help="transformer blocks")
    flag("n_heads", type=int, help="attention heads")
    p.add_argument("--group_size", dest="group_size", type=int, default=None,
                   help=f"weights per int8 scale E (default: {GROUP_SIZE_DEFAULTS})")
    flag("config", help="training configuration: " + ", ".join(CONFIG_NAMES))
    p.add_argument("--strict_ternary", dest="strict_ternary", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="strict ternary (TrueTernary); --no-strict_ternary selects TrueTernary_Hybrid (float log2 "
                        "scales trained by AdamW) (default: strict, unless --config says otherwise)")
    flag("lr", type=float, help="peak learning rate (vote scale for TrueTernary; default: the recipe's)")
    flag("accum_threshold", type=int, help="votes a trit needs to flip (default: FlipRule's)")
    flag("scale_update_interval", type=int, help="steps between scale votes; 0 freezes E")
    p.add_argument("--rule", action="append", default=None, metavar="FIELD=VALUE",
                   help="further FlipRule overrides, e.g. vote_clip=4,decay=0.01 (default: none)")
    flag("update_backend", help="vote/flip backend: " + ", ".join(UPDATE_BACKENDS))
    p.add_argument("--compile", dest="compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the model's norms, attention and activations (the linear layers stay eager): "
                        "on a GPU, float configs' steps about 2x faster after a compile of up to a minute "
                        "(TrueTernary's eager step is host-bound and gains little); transformer only (default: off)")
    p.add_argument("--cuda_graph", dest="cuda_graph", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="TrueTernary on the gpu backend: capture the whole training step in one CUDA graph and "
                        "replay it (no Python per layer: 2-7x faster steps on an H200, the same results); CUDA "
                        "only (default: auto, on wherever it can be in one process; data-parallel over NCCL with "
                        "--cuda_graph; --no-cuda_graph: eager steps)")
    p.add_argument("--deterministic", dest="deterministic", default=None, action=argparse.BooleanOptionalAction,
                   help="bit-for-bit repeatable steps on a GPU too: deterministic algorithms and math attention "
                        "(PyTorch's flash/cuDNN/memory-efficient attention backward is not deterministic at long "
                        "contexts); about 3.3x the step time at 151M on an H100 (default: off)")
    p.add_argument("--activation_checkpointing", dest="activation_checkpointing",
                   default=None, action=argparse.BooleanOptionalAction,
                   help="recompute each transformer block's activations in backward instead of keeping them: "
                        "activation memory of one block input per layer, about one more forward per step, the "
                        "same results bit for bit (default: off)")
    flag("ddp_grad_dtype", help="under torchrun: dtype in which gradients travel between the ranks, the ternary "
         "weights' (summed in float32 after) and DDP's for float parameters (fp32, or bf16: half the bytes)")
    flag("max_steps", type=int, help="optimiser steps (also the length of the lr schedule)")
    flag("batch_size", type=int, help="sequences per step, over all data-parallel ranks together")
    flag("ctx", type=int, help="bytes per sequence (the model's context)")
    flag("seed", type=int, help="seed of the model init, the data order and the vote RNG")
    flag("device", help="auto, cpu, cuda or cuda:N")
    flag("threads", type=int, help=THREADS_HELP)
    flag("eval_every", type=int, help="steps between validation evaluations (0: only at the end)")
    flag("eval_windows", type=int, help="held-out windows per evaluation")
    flag("save_every", type=int, help="steps between checkpoints (0: only at the end)")
    flag("keep_checkpoints", type=int, help="newest checkpoints kept (0: all)")
    flag("log_every", type=int, help="steps between metrics.jsonl rows")
    flag("stop_at", type=int, help="stop and save after this step, keeping the --max_steps schedule "
         "(for jobs with a time limit; continue with --resume; default: run to --max_steps)")
    flag("profile_steps", type=int, help="profile this many steps (after the first two) on every rank and print "
         "where a step's time goes, phase by phase, a column per rank; also <run dir>/profile.json and rank 0's "
         "trace profile_trace.json (docs/distributed.md; default: off)")
    flag("run_name", help="directory under --out_dir (default: <config>-<date>-<time>)")
    flag("out_dir", help="parent of run directories")
    flag("resume", metavar="PATH|auto", help="continue from a checkpoint file, a run directory, or 'auto' "
         "(the newest checkpoint of --run_name; a fresh run if there is none); default: a fresh run")
    flag("overwrite", action="store_true", help="start a fresh run in a --run_name that holds another run: its "
         "files (config.json, metrics.jsonl, plot.png, checkpoints/, tensorboard/) are moved into "
         "<run dir>/replaced-<time>/ first (default: off, such a directory is refused)")
    p.add_argument("--comm_report", dest="comm_report", default=None, metavar="N[,N...]",
                   help="print the bytes each rank sends per step (and per weight) for every config of this "
                        "model at N data-parallel ranks (see docs/distributed.md) and exit without training "
                        "(default: off: train)")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from parsed flags, and the set of fields the user gave."""

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
