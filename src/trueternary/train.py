"""``trueternary train``: one training run, from flags (or a checkpoint) to ``runs/<run_name>/``.

The loop in :func:`train` reads top to bottom like nanoGPT's ``train.py``: set up data, model and
recipe (or restore them from a checkpoint), then step, log, evaluate and save. Everything a run
produces goes to ``<out_dir>/<run_name>/``:

    config.json          the run's TrainConfig, model config, hyper-parameters, data and device
    metrics.jsonl        one JSON object per logged step ({"step", "loss", "train_bpb", "lr", "flips",
                         "tokens_per_s", "elapsed_s"}) and per evaluation ({"step", "val_bpb"})
    plot.png             training loss and validation bits per byte against step
    checkpoints/         step_<NNNNNNN>.safetensors (see trueternary.checkpoint); the newest
                         ``keep_checkpoints`` are kept
    tensorboard/         event files, only when the optional ``tensorboard`` package is installed

``step`` always counts completed optimiser steps. Resuming (``--resume PATH|auto``) restores model,
optimiser, RNG and data position, so the continued run is bit-identical to one that never stopped
(on CPU; see docs/training.md for GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .bench import parse_overrides, validation_bpb
from .checkpoint import CheckpointError
from .data import Corpus, RandomWindows, eval_windows, load_corpus
from .models import build_model, model_names
from .optim import BACKENDS, NonFiniteGradientError
from .recipes import CONFIG_NAMES, Hparams, build_recipe, lr_factor
from .rule import FlipRule

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged); reported in one line, exit code 1."""


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # None: the embedded default corpus (Python stdlib sources)
    data_dir: str | None = None  # download cache for --data enwik8
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
    # run
    max_steps: int = 300
    batch_size: int = 16
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


# Flags that define the run: a resumed run must keep them (or it would not continue the same run).
RUN_DEFINING = ("data", "model", "d_model", "n_layers", "n_heads", "group_size", "config", "lr",
                "accum_threshold", "scale_update_interval", "rule", "batch_size", "ctx", "seed")
_FIELDS = {f.name for f in fields(TrainConfig)}


# ------------------------------------------------------------------------------------ configuration
def hparams_for(cfg: TrainConfig) -> Hparams:
    """The recipe hyper-parameters: recipe defaults, FlipRule defaults, and the run's overrides."""
    rule_over = dict(cfg.rule)
    rule_over["scale_update_interval"] = cfg.scale_update_interval
    if cfg.accum_threshold is not None:
        rule_over["accum_threshold"] = cfg.accum_threshold
    rule = FlipRule.from_dict({**FlipRule().to_dict(), **rule_over})
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
                 "log_every"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"--{name} must be a positive integer, got {v!r}")
    for name in ("eval_every", "save_every", "keep_checkpoints", "seed", "scale_update_interval", "threads"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(f"--{name} must be an integer >= 0, got {v!r}")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at:
        raise UsageError(f"--stop_at must be >= 1, got {cfg.stop_at}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.run_name is not None and (not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", "..")):
        raise UsageError(f"--run_name must be a plain directory name, got {cfg.run_name!r}")
    try:
        hp = hparams_for(cfg)
        model_config(cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return hp


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
            print(f"resume auto: no checkpoint in {Path(cfg.out_dir) / cfg.run_name}, starting a fresh run")
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
    if "out_dir" not in explicit:
        merged.out_dir = cfg.out_dir
    if merged.max_steps != saved.get("max_steps"):
        print(f"note: --max_steps {merged.max_steps} differs from the checkpoint's {saved.get('max_steps')}: "
              "the learning-rate schedule changes from here on")
    return merged


def _explicit_fields(cfg: TrainConfig) -> set[str]:
    default = TrainConfig()
    return {f for f in _FIELDS if getattr(cfg, f) != getattr(default, f)}


# ------------------------------------------------------------------------------------ run directory
class RunLog:
    """metrics.jsonl (and TensorBoard when installed) of one run directory."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop rows after the resumed step (all, for a fresh run): they are recomputed
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in rows if start_step and _row_step(ln) <= start_step]
            if len(keep) != len(rows):
                ckpt_io.atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except Exception:  # ImportError without tensorboard; anything else must not stop training
            self.tb = None

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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


def _unique_run_name(out_dir: str, config: str) -> str:
    base = f"{config}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, i = base, 1
    while (Path(out_dir) / name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


def _device_text(device: torch.device) -> str:
    if device.type != "cpu":
        return str(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n > 1 else ''})"


def _write_json(path: Path, obj: dict) -> None:
    ckpt_io.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


# ------------------------------------------------------------------------------------ checkpoints
def save(run_dir: Path, recipe, batches: RandomWindows, cfg: TrainConfig, hp: Hparams, corpus: Corpus,
         fingerprint: str, device: torch.device) -> Path:
    tensors, meta = ckpt_io.recipe_state(recipe)
    meta.update(
        model={"name": cfg.model, "config": recipe.model.cfg.to_dict()},
        train_config=asdict(cfg),
        hparams=hp.to_dict(),
        rng=ckpt_io.rng_state(device),
        data={"name": corpus.name, "fingerprint": fingerprint, "position": batches.state_dict()},
    )
    ckpt_io.remove_stale_temporaries(run_dir)
    path = ckpt_io.save_checkpoint(ckpt_io.checkpoint_path(run_dir, recipe.step_count), tensors, meta)
    ckpt_io.prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return path


# ------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Run (or continue) one training run and return its summary.

    ``explicit`` names the fields the user set (the CLI knows); by default, the fields that differ
    from ``TrainConfig()``. On resume, the checkpoint's config is used with these fields on top.
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
    autocast = device.type == "cuda"  # bf16 autocast on GPU, as in bench
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))

    # ---- data
    corpus = load_corpus(cfg.data, cache_dir=cfg.data_dir)
    val_windows = eval_windows(corpus.val, cfg.ctx, cfg.eval_windows)
    batches = RandomWindows(corpus.train, cfg.batch_size, cfg.ctx, seed=cfg.seed)
    fingerprint = corpus.fingerprint()

    # ---- run directory
    if cfg.run_name is None:
        cfg.run_name = _unique_run_name(cfg.out_dir, cfg.config)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    newest = ckpt_io.latest_checkpoint(run_dir)
    if ckpt is None and newest is not None:
        raise UsageError(f"{run_dir} already holds checkpoints; continue it with --resume auto "
                         "or choose another --run_name")
    if ckpt is not None and newest is not None and ckpt_io.checkpoint_step(newest) > ckpt.step:
        raise UsageError(f"{run_dir} has a newer checkpoint ({newest.name}) than the one resumed "
                         f"(step {ckpt.step}); resume into another --run_name to branch off")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None

    # ---- model, optimisers, and the state to continue from
    if ckpt is not None:
        mcfg = ckpt.meta["model"]["config"]
    else:
        mcfg = model_config(cfg)
    base = build_model(cfg.model, seed=cfg.seed, **mcfg)
    try:
        recipe = build_recipe(cfg.config, base, hp, device=device, backend=cfg.update_backend, seed=cfg.seed)
    except ValueError as e:  # e.g. a GPU backend without CUDA
        raise UsageError(str(e)) from None
    del base
    start_step = 0
    if ckpt is not None:
        ckpt_io.restore_recipe(recipe, ckpt)
        try:
            batches.load_state_dict(ckpt.meta["data"]["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        ckpt_io.restore_rng(ckpt.meta.get("rng", {}), device)
        start_step = ckpt.step
        if ckpt.meta["data"].get("fingerprint") != fingerprint:
            print(f"warning: the data differs from the data {ckpt.path.name} was trained on "
                  f"({ckpt.meta['data'].get('name')}); the run will not match an uninterrupted one")
        del ckpt  # drop the loaded tensors
    end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.max_steps
    _write_json(run_dir / "config.json", {
        "train": asdict(cfg), "model": {"name": cfg.model, "config": recipe.model.cfg.to_dict()},
        "hparams": hp.to_dict(), "device": str(device), "torch": torch.__version__,
        "data": {"name": corpus.name, "fingerprint": fingerprint, "train_bytes": len(corpus.train),
                 "val_bytes": len(corpus.val)},
        "started_at_step": start_step,
    })
    log = RunLog(run_dir, start_step)
    report = recipe.state_report()
    n_weights = report["ternary_weights"] or report["float_params"]
    print(f"train: {cfg.config} on {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} held-out "
          f"bytes), {cfg.model} d={cfg.d_model} L={cfg.n_layers} ({n_weights:,} weights), "
          f"batch {cfg.batch_size} x ctx {cfg.ctx}, {_device_text(device)}, run dir {run_dir}", flush=True)
    if start_step:
        print(f"resumed from step {start_step}", flush=True)

    # ---- the loop
    from tqdm.auto import tqdm

    title = f"{cfg.config}, {cfg.model} d={cfg.d_model} L={cfg.n_layers}, batch {cfg.batch_size} x ctx {cfg.ctx}"
    tokens_per_step = cfg.batch_size * cfg.ctx
    losses: list[float] = []
    val_bpb = initial_val_bpb = None
    last_saved = None
    t_start = time.perf_counter()
    tok_s_ema = None
    if start_step == 0:
        initial_val_bpb = validation_bpb(recipe.model, val_windows, device, autocast)
        log.write({"step": 0, "val_bpb": initial_val_bpb})
    bar = tqdm(total=end_step, initial=start_step, desc=cfg.run_name, unit="step", dynamic_ncols=True,
               disable=None, leave=True)
    try:
        for step in range(start_step, end_step):
            x, y = batches.next(device)
            t0 = time.perf_counter()
            try:
                loss = recipe.train_step(x, y, autocast)
            except NonFiniteGradientError as e:
                raise TrainingError(f"training diverged at step {step + 1}: {e}") from None
            lv = float(loss)  # synchronises the device, so the step time is complete
            dt = time.perf_counter() - t0
            done = step + 1
            if not math.isfinite(lv) or lv > 4 * math.log(recipe.model.cfg.vocab_size):
                raise TrainingError(f"training diverged at step {done}: loss {lv:.4g}")
            losses.append(lv)
            flips = recipe.flips_last_step()
            tok_s = tokens_per_step / dt if dt > 0 else float("nan")
            tok_s_ema = tok_s if tok_s_ema is None else 0.9 * tok_s_ema + 0.1 * tok_s
            if done % cfg.log_every == 0 or done == end_step:
                log.write({"step": done, "loss": lv, "train_bpb": lv / LN2,
                           "lr": hp.lr_for(cfg.config) * lr_factor(step, hp.steps, hp.warmup_frac, hp.min_lr_frac),
                           "flips": flips, "tokens_per_s": tok_s, "elapsed_s": time.perf_counter() - t_start})
            bar.set_postfix_str(f"loss {lv:.3f} bpb {lv / LN2:.3f} {tok_s_ema:,.0f} tok/s flips/step {flips:,}",
                                refresh=False)
            bar.update(1)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == end_step:
                val_bpb = validation_bpb(recipe.model, val_windows, device, autocast)
                log.write({"step": done, "val_bpb": val_bpb})
                el = time.perf_counter() - t_start
                eta = el / (done - start_step) * (end_step - done)
                bar.write(f"step {done:>6}/{cfg.max_steps} | loss {lv:.4f} | train {lv / LN2:.3f} bpb | "
                          f"val {val_bpb:.3f} bpb | {tok_s_ema:,.0f} tok/s | flips/step {flips:,} | "
                          f"{el:.0f}s elapsed, ETA {eta:.0f}s")
            if (cfg.save_every and done % cfg.save_every == 0) or done == end_step:
                last_saved = save(run_dir, recipe, batches, cfg, hp, corpus, fingerprint, device)
                if done != end_step:  # the final plot is drawn after the loop
                    plot_run(run_dir, title)
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - t_start
    if last_saved is None:  # nothing left to train (resumed a finished run)
        last_saved = ckpt_io.latest_checkpoint(run_dir)
        print(f"nothing to do: the run is at step {start_step} of {end_step}")
    plot = plot_run(run_dir, title)
    summary = {
        "run_dir": str(run_dir), "start_step": start_step, "end_step": max(start_step, end_step),
        "seconds": seconds, "losses": losses,
        "initial_val_bpb": initial_val_bpb, "val_bpb": val_bpb,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s": tokens_per_step * len(losses) / seconds if losses and seconds > 0 else None,
        "checkpoint": str(last_saved) if last_saved else None, "plot": str(plot),
    }
    if losses:
        first = f"val {initial_val_bpb:.3f} -> " if initial_val_bpb is not None else ""
        print(f"done: {len(losses)} steps in {seconds:.1f}s ({summary['tokens_per_s']:,.0f} tok/s), "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {first}val {val_bpb:.3f} bits/byte\n"
              f"checkpoint {last_saved}\nplot {plot}", flush=True)
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
    flag("data_dir", metavar="DIR", help="download cache for enwik8 (default: $TRUETERNARY_CACHE or "
         "~/.cache/trueternary)")
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
    flag("max_steps", type=int, help="optimiser steps (also the length of the lr schedule)")
    flag("batch_size", type=int, help="sequences per step")
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


def run(args: argparse.Namespace) -> dict:
    cfg, explicit = config_from_args(args)
    return train(cfg, explicit)
