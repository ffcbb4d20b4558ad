"""``trueternary bench``: train several configurations side by side on the same data and compare.

Every config sees the same batches in the same order (one data generator seeded by ``--seed``);
with ``--reuse_base`` they also start from the same base model (float configs from its float
weights, ternary configs from its absmean ternarisation). Reported per config: parameter and state
bytes, peak memory, median step time after warm-up, tokens/s, training loss (final, min, per-quarter
segments), validation bits per byte on held-out text and the same measure on training text (the
generalisation gap), flips per step.

Every config ends with a status: ``ok``, ``diverged`` (a measured outcome: its loss blew up or its gradients
went non-finite), ``failed`` (it raised), ``crashed`` (its ``--jobs`` process died without a result) or
``timeout`` (its ``--jobs`` process made no progress for ``--job_timeout`` seconds and was stopped). The
others' results are still reported and written; the exit code is then ``EXIT_JOBS_FAILED`` (3).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from . import memory
from .arguments import bench_arguments as add_arguments  # noqa: F401 (re-exported: defined torch-free for cli)
from .backends import resolve_backend
from .data import eval_windows, load_corpus, random_batch
from .errors import NonFiniteGradientError, UsageError
from .evaluate import LN2, validation_bpb
from .flags import cpu_threads, parse_overrides, resolve_device
from .init import meta_device
from .models import build_model, check_compile_ops, model_names
from .qat import QUANTIZERS, forward_trits
from .recipes import CONFIG_NAMES, LATENT_CONFIGS, TERNARY_CONFIGS, Hparams, build_recipe
from .rule import FlipRule
from .settings import default_group_size
from .weight import ternary_weights

EXIT_JOBS_FAILED = 3  # some configs failed, crashed or timed out; the others' results were written
FAILED_STATUSES = ("failed", "crashed", "timeout")


def segment_table(losses: list[float]) -> list[dict]:
    """Mean / min / trend (last-minus-first of a linear fit, per quarter) of the loss curve."""
    out = []
    n = len(losses)
    for q in range(4):
        seg = losses[q * n // 4 : (q + 1) * n // 4]
        if not seg:
            continue
        m = len(seg)
        xs = range(m)
        xm = (m - 1) / 2
        ym = sum(seg) / m
        var = sum((x - xm) ** 2 for x in xs)
        slope = sum((x - xm) * (y - ym) for x, y in zip(xs, seg)) / var if var else 0.0
        out.append({"quarter": q + 1, "mean": ym, "min": min(seg), "trend": slope * (m - 1)})
    return out


def parse_config_specs(text: str) -> list[tuple[str, str, dict]]:
    """``"Adam_FP32,TrueTernary[lr=4,leak=3]"`` -> [(label, config name, overrides)].

    Overrides in brackets apply to that entry only: ``lr`` (its peak learning rate / vote scale), for ternary
    configs any FlipRule field, for the latent configs ``quantizer`` and for BitNet_QAT ``wd`` (its weight decay;
    ``_with_overrides``). One run can so compare rule variants side by side.
    """
    specs, depth, cur = [], 0, ""
    for ch in text + ",":
        if ch == "," and depth == 0:
            if cur.strip():
                specs.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ValueError(f"unbalanced ']' in --configs {text!r}")
        cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in --configs {text!r}")
    out = []
    for spec in specs:
        name, _, rest = spec.partition("[")
        name = name.strip()
        if name not in CONFIG_NAMES:
            raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIG_NAMES)}")
        over = parse_overrides([rest.rstrip("]")], "config") if rest else {}
        out.append((spec, name, over))
    if not out:
        raise ValueError("--configs is empty")
    return out


def zero_trit_fraction(recipe) -> float | None:
    """Fraction of the trained trits that are 0 (the flip engine's, or a latent config's forward trits)."""
    if recipe.name in LATENT_CONFIGS:
        trits = list(forward_trits(recipe.model).values())
    elif recipe.name in TERNARY_CONFIGS:
        trits = [w.trits() for w in ternary_weights(recipe.model)]
    else:
        return None
    return sum(int((t == 0).sum()) for t in trits) / max(1, sum(t.numel() for t in trits))


def run_config(label: str, name: str, base, hp: Hparams, corpus, val_windows, args, device,
               train_windows: torch.Tensor | None = None, on_progress: Callable[[], None] | None = None) -> dict:
    """Train config ``name`` from ``base`` and measure it. ``on_progress`` is called after every step and
    before each evaluation (a ``--jobs`` process's liveness signal)."""
    tick = on_progress or (lambda: None)
    memory.reset_peak(device)
    gen = torch.Generator().manual_seed(args.seed)  # identical batches for every config
    recipe = build_recipe(name, base, hp, device=device, backend=args.update_backend, seed=args.seed)
    recipe.watch_forward_trits()  # latent configs report their trit changes per step like TrueTernary
    autocast = device.type == "cuda"
    losses, step_s, flips, scale_flips = [], [], [], []
    tokens = args.batch * args.ctx
    diverged = None
    burn_in = max(2, args.steps // 10)
    for step in range(args.steps):
        x, y = random_batch(corpus.train, args.batch, args.ctx, gen, device)
        t0 = time.perf_counter()
        try:
            loss = recipe.train_step(x, y, autocast)
        except NonFiniteGradientError as e:
            diverged = f"non-finite gradients at step {step}: {e}"
            break
        lv = float(loss)  # synchronises the device, so the step time is complete
        step_s.append(time.perf_counter() - t0)
        flips.append(recipe.flips_last_step())
        scale_flips.append(int(recipe.flip.last_scale_flips) if recipe.flip is not None else 0)
        losses.append(lv)
        tick()
        if not math.isfinite(lv) or lv > 4 * math.log(base.cfg.vocab_size):
            diverged = f"loss {lv:.3g} at step {step}"
            break
        if args.print_every and (step % args.print_every == 0 or step == args.steps - 1):
            print(f"  [{label}] step {step:5d}  loss {lv:.4f}  flips {flips[-1]}", flush=True)
    timed = step_s[burn_in:] or step_s
    med = statistics.median(timed) if timed else float("nan")
    tick()
    bpb = validation_bpb(recipe.model, val_windows, device, autocast) if not diverged else float("nan")
    tick()
    # the same measure on training text (mostly seen): val_bpb - train_bpb is the generalisation gap
    train_bpb = (validation_bpb(recipe.model, train_windows, device, autocast)
                 if train_windows is not None and not diverged else float("nan"))
    res = {
        "config": label,
        "recipe": name,
        "status": "diverged" if diverged else "ok",
        "lr": hp.lr_for(name) if name != "TrueTernary_Naive" else None,
        "rule": hp.rule.to_dict() if name in TERNARY_CONFIGS else None,
        "quantizer": hp.qat_quantizer if name in LATENT_CONFIGS else None,
        "weight_decay": hp.weight_decay if name in ("Adam_FP32", "BitNet_QAT") else None,
        "zero_trit_fraction": zero_trit_fraction(recipe),
        **recipe.state_report(),
        "peak_memory_bytes": memory.peak(device),
        "peak_memory_kind": memory.peak_kind(device),
        "median_step_ms": med * 1e3,
        "tokens_per_s": tokens / med if med == med and med > 0 else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "min_loss": min(losses) if losses else float("nan"),
        "val_bpb": bpb,
        "train_bpb": train_bpb,
        "flips_per_step": statistics.fmean(flips) if flips else 0.0,
        "scale_flips_per_step": statistics.fmean(scale_flips) if scale_flips else 0.0,
        "diverged": diverged,
        "segments": segment_table(losses),
        "losses": losses,
        "flips": flips,  # per step: trit changes (latent configs: changes of their forward trits)
    }
    del recipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def failure_result(label: str, name: str, status: str, error: str, trace: str | None = None) -> dict:
    """The record of a config that produced no measurements (``status`` one of FAILED_STATUSES). It keeps
    the keys readers filter on (``val_bpb`` NaN, no losses, not diverged)."""
    return {"config": label, "recipe": name, "status": status, "error": error, "traceback": trace,
            "val_bpb": float("nan"), "train_bpb": float("nan"), "diverged": None, "losses": [], "segments": []}


def format_table(results: list[dict]) -> str:
    measured = [r for r in results if r["status"] not in FAILED_STATUSES]
    ref = next((r for r in measured if r["recipe"] == "BitNet_QAT"), None)
    w = max(19, max(len(r["config"]) for r in results) + 1)
    hdr = (f"{'config':<{w}}{'status':<9}{'float params':>13}{'ternary w':>11}{'weights MB':>11}{'opt MB':>8}"
           f"{'train MB':>9}{'B/w':>6}{'peak MB':>9}{'ms/step':>9}{'tok/s':>10}{'final':>8}{'min':>8}"
           f"{'val bpb':>9}{'vs QAT':>8}{'flips/step':>11}")
    lines = [hdr, "-" * len(hdr)]
    mb = 1 / 2**20
    for r in results:
        if r["status"] in FAILED_STATUSES:  # no numbers: the reason instead
            lines.append(f"{r['config']:<{w}}{r['status']:<9}{r['error']}")
            continue
        # val bpb relative to BitNet_QAT's; "-" where there is none to compare with (not in the run, or no number)
        rel = (f"{r['val_bpb'] / ref['val_bpb']:>8.3f}" if ref and math.isfinite(ref["val_bpb"])
               and math.isfinite(r["val_bpb"]) else f"{'-':>8}")
        lines.append(
            f"{r['config']:<{w}}{r['status']:<9}{r['float_params']:>13,}{r['ternary_weights']:>11,}"
            f"{r['model_weight_bytes'] * mb:>11.2f}{r['optimizer_state_bytes'] * mb:>8.2f}"
            f"{r['training_state_bytes'] * mb:>9.2f}{r['training_state_bytes_per_weight']:>6.2f}"
            f"{r['peak_memory_bytes'] * mb:>9.1f}{r['median_step_ms']:>9.2f}{r['tokens_per_s']:>10.0f}"
            f"{r['final_loss']:>8.4f}{r['min_loss']:>8.4f}{r['val_bpb']:>9.4f}{rel}"
            f"{r['flips_per_step']:>11.1f}" + (f"   {r['diverged']}" if r["diverged"] else "")
        )
    if measured:
        lines += ["", "loss segments (mean / min / trend per quarter of the run)"]
    for r in measured:
        segs = "  ".join(f"Q{s['quarter']} {s['mean']:.3f}/{s['min']:.3f}/{s['trend']:+.3f}" for s in r["segments"])
        lines.append(f"  {r['config']:<{w}}{segs}")
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> None:
    """Smoothed training-loss curves: the whole run (clipped at 1.2x uniform, so a diverging curve leaves the
    frame instead of flattening the others) beside its second half on a scale fitted to the finite curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uniform = math.log2(288)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    tails = []
    for r in results:
        ls = r["losses"]
        if not ls:
            continue
        k = max(1, len(ls) // 50)
        sm = [sum(ls[max(0, i - k + 1) : i + 1]) / len(ls[max(0, i - k + 1) : i + 1]) / LN2 for i in range(len(ls))]
        lab = f"{r['config']} (val {r['val_bpb']:.3f} bpb)" if r["val_bpb"] == r["val_bpb"] else r["config"]
        line = ax.plot(sm, label=lab)[0]
        half = len(sm) // 2
        if not r.get("diverged"):
            zoom.plot(range(half, len(sm)), sm[half:], color=line.get_color())
            tails.extend(v for v in sm[half:] if math.isfinite(v))
    ax.axhline(uniform, color="grey", ls=":", label=f"uniform ({uniform:.2f} bits)")
    ax.set_ylim(0, 1.2 * uniform)
    if tails:
        lo, hi = min(tails), max(tails)
        zoom.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    for a, t in ((ax, title), (zoom, "second half (configs that did not diverge)")):
        a.set_xlabel("step")
        a.set_ylabel("training loss (bits/byte, smoothed)")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_json(path: str, meta: dict, results: list[dict]) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        tmp.replace(p)
    except OSError as e:
        raise UsageError(f"cannot write --json {path}: {e.strerror or e}") from None


# --model_config fields that have their own flag, or that the byte data fixes
_MODEL_FLAG_FIELDS = {"ctx": "--ctx", "d_model": "--d_model", "n_layers": "--n_layers", "n_heads": "--n_heads"}
_MODEL_FIXED_FIELDS = {"vocab_size": "the byte vocabulary of the data fixes it"}


def model_config_overrides(model: str, items: list[str]) -> dict:
    """``--model_config`` items -> {field: value}, each a field of ``model``'s config of the field's type
    (UsageError naming the valid fields otherwise); the config's own checks run when the model is built."""
    from .models import _MODELS

    try:
        over = parse_overrides(items, "--model_config")
    except ValueError as e:
        raise UsageError(str(e)) from None
    fields = {f.name: f for f in dataclasses.fields(_MODELS[model][1])}
    settable = [k for k in fields if k not in _MODEL_FLAG_FIELDS and k not in _MODEL_FIXED_FIELDS]
    for k, v in over.items():
        if k in _MODEL_FLAG_FIELDS:
            raise UsageError(f"--model_config {k}=...: set it with {_MODEL_FLAG_FIELDS[k]}")
        if k in _MODEL_FIXED_FIELDS:
            raise UsageError(f"--model_config {k}=...: {_MODEL_FIXED_FIELDS[k]}")
        if k not in settable:
            raise UsageError(f"--model_config: model {model!r} has no field {k!r}; valid: {', '.join(settable)}")
        default = fields[k].default
        kind = type(default) if default is not None else {"float | None": float}.get(str(fields[k].type))
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {bool: isinstance(v, bool), int: number and isinstance(v, int),
              float: number and math.isfinite(v), str: isinstance(v, str)}.get(kind, True)
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
            raise UsageError(f"--model_config {k} must be {what}, got {v!r}")
        if kind is float:
            over[k] = float(v)
    return over


def check_lr(name: str, lr, where: str) -> None:
    """A config's peak learning rate: a finite number > 0, and only for configs that have one."""
    if name == "TrueTernary_Naive":
        raise UsageError(f"{where}: TrueTernary_Naive has no learning rate (its seed rule flips at a fixed "
                         "threshold, --accum_threshold)")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"{where}: the learning rate of {name} must be a finite number > 0, got {lr!r}")


def _check_int(args: argparse.Namespace, flag: str, low: int) -> None:
    v = getattr(args, flag)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise UsageError(f"--{flag} must be {what}, got {v!r}")


def _check_output(flag: str, path: str) -> None:
    """An output path that can be written: refuse it now, not after the whole benchmark ran."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag}: cannot create directory {p.parent}: {e.strerror or e}") from None
    if not os.access(p.parent, os.W_OK):
        raise UsageError(f"{flag}: directory {p.parent} is not writable")


def _check_plot_format(path: str) -> None:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    suffix = Path(path).suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UsageError(f"--plot {path}: unknown image format {suffix!r}; use one of .{', .'.join(sorted(formats))}")


MAX_THREADS = 1 << 10  # as train's --threads


def bench_threads(args: argparse.Namespace, device: torch.device) -> int:
    """Intra-op threads of the whole bench: ``--threads``, or by default train's choice on the CPU
    (flags.cpu_threads: one thread for models up to d_model 256) and torch's default beside a GPU (where train
    leaves them too). ``--jobs`` children share them out."""
    if device.type == "cpu":
        return cpu_threads(args.threads, args.d_model)
    return args.threads or torch.get_num_threads()


def _check_flags(args: argparse.Namespace) -> None:
    """Every flag that needs no parsing, with its bounds (UsageError, one line)."""
    for flag in ("steps", "batch", "ctx", "d_model", "n_layers", "n_heads", "eval_windows", "jobs"):
        _check_int(args, flag, 1)
    for flag in ("print_every", "seed", "scale_update_interval", "threads"):
        _check_int(args, flag, 0)
    if args.threads > MAX_THREADS:
        raise UsageError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    if args.group_size is not None:
        _check_int(args, "group_size", 1)
    t = args.job_timeout
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < math.inf):
        raise UsageError(f"--job_timeout must be a finite number of seconds >= 0 (0: never), got {t!r}")
    if not 0 <= args.warmup_frac < 1 or not 0 <= args.min_lr_frac <= 1:
        raise UsageError("--warmup_frac must be in [0, 1) and --min_lr_frac in [0, 1]")
    if args.model not in model_names():
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(model_names())}")
    if args.plot:
        _check_plot_format(args.plot)


def _with_overrides(hp: Hparams, name: str, over: dict) -> Hparams:
    """``hp`` with one ``--configs`` entry's brackets on top: ``lr``; the latent configs' ``quantizer``;
    BitNet_QAT's ``wd``; any FlipRule field for the ternary configs (UsageError for anything else)."""
    over = dict(over)
    lr = over.pop("lr", None)
    if lr is not None:
        check_lr(name, lr, f"--configs {name}[lr=...]")
    rule = hp.rule
    quantizer = over.pop("quantizer", hp.qat_quantizer) if name in LATENT_CONFIGS else hp.qat_quantizer
    if quantizer not in QUANTIZERS:
        raise UsageError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    weight_decay = hp.weight_decay
    if name == "BitNet_QAT":
        weight_decay = over.pop("wd", weight_decay)
        if not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < float("inf"):
            raise UsageError(f"wd must be a finite number >= 0, got {weight_decay!r}")
    if over:
        if name not in TERNARY_CONFIGS:
            extra = {"BitNet_QAT": ", quantizer=... and wd=...", "SignSGD_Old": " and quantizer=..."}
            raise UsageError(f"{name} takes only lr=...{extra.get(name, '')} in brackets, got {sorted(over)}")
        try:
            rule = FlipRule.from_dict({**rule.to_dict(), **over})
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    lrs = dict(hp.lr, **({name: lr} if lr is not None else {}))
    return dataclasses.replace(hp, rule=rule, lr=lrs, qat_quantizer=quantizer, weight_decay=weight_decay)


def hparams_from_args(args: argparse.Namespace) -> Hparams:
    """The hyper-parameters bench's flags give, built like ``train``'s (``Hparams.for_run``); UsageError for a
    bad ``--rule`` or ``--lr`` item. A ``--rule scale_update_interval=...`` wins over ``--scale_update_interval``;
    without ``--group_size`` the group size is the model family's (``settings.default_group_size``, as train)."""
    try:
        rule_over = parse_overrides(args.rule, "rule")
        rule_over.setdefault("scale_update_interval", args.scale_update_interval)
        group_size = default_group_size(args.model) if args.group_size is None else args.group_size
        return Hparams.for_run(args.steps, lr=parse_overrides(args.lr, "lr"), rule=rule_over,
                               accum_threshold=args.accum_threshold, group_size=group_size,
                               warmup_frac=args.warmup_frac, min_lr_frac=args.min_lr_frac,
                               batch_tokens=args.batch * args.ctx)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace, on_progress: Callable[[], None] | None = None) -> list[dict]:
    """The benchmark: validate every flag (UsageError), train each config, print the table, write the JSON
    and plot. Sets ``args._exit_code`` to EXIT_JOBS_FAILED when a config failed, crashed or timed out."""
    device = resolve_device(args.device)
    try:
        specs = parse_config_specs(args.configs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_flags(args)
    if args.jobs > 1 and len(specs) > 1 and not args.reuse_base:
        raise UsageError("--jobs needs --reuse_base (every job must start from the same base model)")
    hp = hparams_from_args(args)
    for k, v in hp.lr.items():
        if k not in CONFIG_NAMES:
            raise UsageError(f"--lr names unknown config {k!r}; choose from {', '.join(CONFIG_NAMES)}")
        check_lr(k, v, "--lr")
    hps = [_with_overrides(hp, name, over) for _, name, over in specs]  # bad brackets fail before any work
    for flag in ("json", "plot"):
        if getattr(args, flag):
            _check_output(f"--{flag}", getattr(args, flag))
    # before the model: a --ctx longer than the held-out text is refused without building rotary tables that long
    corpus = load_corpus(args.data)
    val_windows = eval_windows(corpus.val, args.ctx, args.eval_windows)
    train_windows = eval_windows(corpus.train, args.ctx, args.eval_windows)
    model_kw = dict(ctx=args.ctx, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
    model_kw.update(model_config_overrides(args.model, args.model_config))
    try:
        resolve_backend(args.update_backend)
        with meta_device():  # the config's own checks, without allocating its weights (any size passes here)
            build_model(args.model, seed=0, **model_kw)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if args.compile:
        try:
            check_compile_ops(args.model)
        except ValueError as e:
            raise UsageError(f"--compile: {e}") from None
    model_kw["compile_ops"] = args.compile
    threads = bench_threads(args, device)
    parallel = args.jobs > 1 and len(specs) > 1
    if not parallel:  # (the --jobs children set their share themselves)
        torch.set_num_threads(threads)
    print(f"bench: data {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} held-out bytes), "
          f"device {device} ({threads} thread{'s' if threads > 1 else ''}), model {args.model} d={args.d_model} "
          f"L={args.n_layers}, {args.steps} steps x batch {args.batch} x ctx {args.ctx}", flush=True)
    meta = {
        "args": {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "hparams": hp.to_dict(),
        "data": corpus.name,
        "threads": threads,
    }
    if parallel:
        meta["jobs"] = args.jobs
        results = _run_jobs(args, specs, meta, threads)
    else:
        results = _run_configs(args, specs, hps, model_kw, corpus, val_windows, train_windows, device, meta,
                               on_progress)
    print()
    print(format_table(results))
    if args.plot:
        plot(results, args.plot, f"{args.model} d={args.d_model} L={args.n_layers}, "
             f"batch {args.batch} x ctx {args.ctx}, {corpus.name[:40]}")
    failed = [r for r in results if r["status"] in FAILED_STATUSES]
    if failed:
        args._exit_code = EXIT_JOBS_FAILED
        sys.stderr.write(f"trueternary: error: {len(failed)} of {len(results)} configs did not finish ("
                         + ", ".join(f"{r['config']}: {r['status']}" for r in failed)
                         + "); the table" + (" and --json" if args.json else "") + " say why\n")
    return results


def _summary(r: dict, beside_jobs: bool = False) -> str:
    """One progress line for a finished config."""
    if r["status"] in FAILED_STATUSES:
        return f"   {r['config']}: {r['status'].upper()}: {r['error']}"
    return (f"   {r['config']}: val_bpb {r['val_bpb']:.4f}  train_bpb {r['train_bpb']:.4f}  "
            f"final loss {r['final_loss']:.4f}  {r['median_step_ms']:.2f} ms/step"
            + (" beside other jobs" if beside_jobs else "")
            + f"  peak {r['peak_memory_bytes'] / 2**20:.1f} MB"
            + (f"  DIVERGED ({r['diverged']})" if r["diverged"] else ""))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _run_configs(args, specs, hps, model_kw, corpus, val_windows, train_windows, device, meta, on_progress=None):
    """The configs one after another in this process. A config that raises (its base model's build included)
    is recorded as ``failed`` (its error in the table, its traceback in the JSON) and the next one runs."""
    results, shared_base = [], None
    for i, ((label, name, _), spec_hp) in enumerate(zip(specs, hps)):
        print(f"== {label}", flush=True)
        try:
            if not args.reuse_base:
                base = build_model(args.model, seed=args.seed + i, **model_kw)
            else:  # built once, by the first config that needs it
                if shared_base is None:
                    shared_base = build_model(args.model, seed=args.seed, **model_kw)
                base = shared_base
            r = run_config(label, name, base, spec_hp, corpus, val_windows, args, device, train_windows, on_progress)
        except Exception as e:  # any error of one config is that config's result
            r = failure_result(label, name, "failed", _one_line(e), traceback.format_exc())
            gc.collect()  # the traceback's frames held the config's tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(r)
        print(_summary(r), flush=True)
        if args.json:  # after every config, so a cut-off run keeps what it measured
            _write_json(args.json, meta, results)
    return results


@dataclasses.dataclass
class _Job:
    """One ``--jobs`` child process: its result pipe, its progress counter and when that last moved."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    progress: object  # a shared integer the child increments (multiprocessing RawValue)
    seen: int = 0
    last_progress: float = 0.0


def _run_jobs(args: argparse.Namespace, specs: list[tuple[str, str, dict]], meta: dict, threads: int) -> list[dict]:
    """Each config in its own spawned process (CUDA cannot be forked), ``--jobs`` at once; results in
    ``specs`` order. Every child builds the same base model (--reuse_base) and data, so the numbers are
    those of one process. Each child sends one JSON message on its own pipe; the parent waits on the pipes
    and on the processes' sentinels, so a child that dies is seen at once (``crashed``) and one without
    progress for ``--job_timeout`` seconds is killed (``timeout``). The JSON is rewritten as each job ends,
    so a cut-off run keeps what finished; an interrupt kills the children. ``threads``: the bench's intra-op
    threads (bench_threads), shared out equally."""
    spawn = multiprocessing.get_context("spawn")
    n_procs = min(args.jobs, len(specs))
    # an equal share of the intra-op threads: N children with every core's worth of OpenMP threads each
    # oversubscribe the CPU, and the host-side work (data, the latent configs' trit counts) then waits on
    # descheduled peer threads (docs/training.md measured such waits at ~10x)
    threads = max(1, threads // n_procs)
    meta["threads_per_job"] = threads
    child_base = {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")}
    pending = list(range(len(specs)))
    running: list[_Job] = []
    done: dict[int, dict] = {}

    def finish(job: _Job, result: dict) -> None:
        running.remove(job)
        job.conn.close()
        done[job.index] = result
        print(_summary(result, beside_jobs=True), flush=True)
        if args.json:
            _write_json(args.json, meta, [done[i] for i in range(len(specs)) if i in done])

    try:
        while pending or running:
            while pending and len(running) < n_procs:
                i = pending.pop(0)
                recv, send = spawn.Pipe(duplex=False)
                progress = spawn.RawValue("q", 0)
                child = dict(child_base, configs=specs[i][0], jobs=1, json=None, plot=None, threads=threads)
                proc = spawn.Process(target=_job_main, args=(child, send, progress, threads),
                                     name=f"bench-{specs[i][0]}")
                proc.start()
                send.close()  # the child holds the write end: EOF on recv means it is gone
                running.append(_Job(i, proc, recv, progress, last_progress=time.monotonic()))
            multiprocessing.connection.wait([j.conn for j in running] + [j.process.sentinel for j in running],
                                            timeout=0.5)
            now = time.monotonic()
            for job in list(running):
                label, name, _ = specs[job.index]
                if job.conn.poll():  # a message, or EOF from a dead child
                    try:
                        msg = json.loads(job.conn.recv_bytes())
                    except (EOFError, OSError, ValueError):
                        msg = None
                    job.process.join(timeout=30)
                    if job.process.is_alive():
                        job.process.kill()
                        job.process.join()
                    if msg is None:
                        finish(job, failure_result(label, name, "crashed", _exit_reason(job.process.exitcode)))
                    elif "error" in msg:
                        finish(job, failure_result(label, name, "failed", msg["error"], msg["traceback"]))
                    else:
                        finish(job, msg["result"])
                elif not job.process.is_alive():
                    job.process.join()
                    finish(job, failure_result(label, name, "crashed", _exit_reason(job.process.exitcode)))
                else:
                    count = job.progress.value
                    if count != job.seen:
                        job.seen, job.last_progress = count, now
                    elif args.job_timeout and now - job.last_progress > args.job_timeout:
                        job.process.kill()
                        job.process.join()
                        why = (f"no progress for {args.job_timeout:g} s (--job_timeout) after {count} progress "
                               "reports (start, steps, evaluations)" if count else
                               f"not started within {args.job_timeout:g} s (--job_timeout)")
                        finish(job, failure_result(label, name, "timeout", why + "; its process was killed"))
    finally:  # an interrupt or an unwritable --json: no child outlives the bench
        for job in running:
            job.process.kill()
        for job in running:
            job.process.join()
            job.conn.close()
    return [done[i] for i in range(len(specs))]


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    return f"its process died without a result ({how})"


def _job_main(child_args: dict, conn, progress, threads: int) -> None:
    """A ``--jobs`` child: one config with ``threads`` intra-op threads. Its Python output is silenced (the
    parent prints each job's line and the table), SIGINT is left to the parent (which kills the children).
    Sends ``{"result": ...}`` or ``{"error": ..., "traceback": ...}`` as JSON, never a pickle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)

    def tick() -> None:
        progress.value += 1

    try:
        tick()  # started: the imports are done
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = run(argparse.Namespace(**child_args), on_progress=tick)[0]
        payload = json.dumps({"result": result})
    except Exception as e:  # reported to the parent, which records the job as failed
        payload = json.dumps({"error": _one_line(e), "traceback": traceback.format_exc()})
    conn.send_bytes(payload.encode())
    conn.close()
