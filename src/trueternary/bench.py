"""``trueternary bench``: train several configurations side by side on the same data and compare.

Every config sees the same batches in the same order (one data generator seeded by ``--seed``);
with ``--reuse-base`` they also start from the same base model (float configs from its float
weights, ternary configs from its absmean ternarisation). Reported per config: parameter and state
bytes, peak memory, median step time after warm-up, tokens/s, training loss (final, min, per-quarter
segments), validation bits per byte on held-out text and the same measure on training text (the
generalisation gap), flips per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch

from . import memory
from .backends import DEFAULT_UPDATE_BACKEND, resolve_backend
from .cli import UsageError, resolve_device
from .data import eval_windows, load_corpus, random_batch
from .models import build_model, check_compile_ops, model_names
from .optim import NonFiniteGradientError
from .qat import QUANTIZERS, forward_trits
from .recipes import CONFIG_NAMES, LATENT_CONFIGS, QAT_OPTIMIZERS, TERNARY_CONFIGS, Hparams, build_recipe
from .rule import FlipRule
from .weight import ternary_weights

LN2 = math.log(2.0)


@torch.no_grad()
def validation_bpb(model, windows: torch.Tensor, device, autocast: bool, batch: int = 32) -> float:
    """Mean next-byte cross-entropy over the windows, in bits per byte."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(device)
        x, y = w[:, :-1], w[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += y.numel()
    model.train()
    return total / count / LN2


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

    Overrides in brackets apply to that entry only: ``lr`` (its peak learning rate / vote scale) and,
    for ternary configs, any FlipRule field. One run can so compare rule variants side by side.
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


def parse_overrides(items: list[str], what: str) -> dict:
    out = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"{what} override {part!r} must look like key=value")
            k, v = part.split("=", 1)
            out[k.strip()] = _parse_value(v.strip())
    return out


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


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
               train_windows: torch.Tensor | None = None) -> dict:
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
        if not math.isfinite(lv) or lv > 4 * math.log(base.cfg.vocab_size):
            diverged = f"loss {lv:.3g} at step {step}"
            break
        if args.print_every and (step % args.print_every == 0 or step == args.steps - 1):
            print(f"  [{label}] step {step:5d}  loss {lv:.4f}  flips {flips[-1]}", flush=True)
    timed = step_s[burn_in:] or step_s
    med = statistics.median(timed) if timed else float("nan")
    bpb = validation_bpb(recipe.model, val_windows, device, autocast) if not diverged else float("nan")
    # the same measure on training text (mostly seen): val_bpb - train_bpb is the generalisation gap
    train_bpb = (validation_bpb(recipe.model, train_windows, device, autocast)
                 if train_windows is not None and not diverged else float("nan"))
    res = {
        "config": label,
        "recipe": name,
        "lr": hp.lr_for(name) if name != "TrueTernary_Naive" else None,
        "rule": hp.rule.to_dict() if name in TERNARY_CONFIGS else None,
        "quantizer": hp.qat_quantizer if name in LATENT_CONFIGS else None,
        "qat_optimizer": hp.qat_optimizer if name == "BitNet_QAT" else None,
        "qat_betas": list(hp.qat_betas) if name == "BitNet_QAT" and hp.qat_betas else None,
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


def format_table(results: list[dict]) -> str:
    ref = next((r for r in results if r["recipe"] == "BitNet_QAT"), None)
    w = max(19, max(len(r["config"]) for r in results) + 1)
    hdr = (f"{'config':<{w}}{'float params':>13}{'ternary w':>11}{'weights MB':>11}{'opt MB':>8}"
           f"{'train MB':>9}{'B/w':>6}{'peak MB':>9}{'ms/step':>9}{'tok/s':>10}{'final':>8}{'min':>8}"
           f"{'val bpb':>9}{'vs QAT':>8}{'flips/step':>11}")
    lines = [hdr, "-" * len(hdr)]
    mb = 1 / 2**20
    for r in results:
        rel = r["val_bpb"] / ref["val_bpb"] if ref and ref["val_bpb"] == ref["val_bpb"] else float("nan")
        lines.append(
            f"{r['config']:<{w}}{r['float_params']:>13,}{r['ternary_weights']:>11,}"
            f"{r['model_weight_bytes'] * mb:>11.2f}{r['optimizer_state_bytes'] * mb:>8.2f}"
            f"{r['training_state_bytes'] * mb:>9.2f}{r['training_state_bytes_per_weight']:>6.2f}"
            f"{r['peak_memory_bytes'] * mb:>9.1f}{r['median_step_ms']:>9.2f}{r['tokens_per_s']:>10.0f}"
            f"{r['final_loss']:>8.4f}{r['min_loss']:>8.4f}{r['val_bpb']:>9.4f}{rel:>8.3f}"
            f"{r['flips_per_step']:>11.1f}" + (f"   DIVERGED: {r['diverged']}" if r["diverged"] else "")
        )
    lines.append("")
    lines.append("loss segments (mean / min / trend per quarter of the run)")
    for r in results:
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
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    tmp.replace(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default="Adam_FP32,BitNet_QAT,SignSGD_Old,TrueTernary",
                   help=f"comma list of {', '.join(CONFIG_NAMES)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=33)
    p.add_argument("--update-backend", default=DEFAULT_UPDATE_BACKEND.value)
    p.add_argument("--scale-update-interval", type=int, default=1)
    p.add_argument("--accum-threshold", type=int, default=None)
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--reuse-base", action="store_true")
    p.add_argument("--data", default=None, help="text file, .gz, directory, 'enwik8'; default: embedded corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="transformer", help="model family: " + ", ".join(model_names()))
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--model-config", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra model config fields, e.g. head_std=0.088,mlp_ratio=3")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's norms, attention and activations for every config (transformer)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--lr", action="append", default=[], metavar="CONFIG=LR",
                   help="peak learning rate (vote scale for TrueTernary) of a config, e.g. Adam_FP32=1e-3")
    p.add_argument("--rule", action="append", default=[], metavar="FIELD=VALUE",
                   help="FlipRule field overrides for TrueTernary configs, e.g. vote_clip=4,decay=0.01")
    p.add_argument("--eval-windows", type=int, default=256,
                   help="windows for validation bpb (and as many training windows for train_bpb)")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="linear warm-up, fraction of --steps")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay ends at this fraction of the peak")
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many configs at once, each in its own process on --device (needs --reuse-base; "
                        "step times and peak memory are then measured beside the other jobs)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH")


def _with_overrides(hp: Hparams, name: str, over: dict) -> Hparams:
    over = dict(over)
    lr = over.pop("lr", None)
    rule = hp.rule
    quantizer = over.pop("quantizer", hp.qat_quantizer) if name in LATENT_CONFIGS else hp.qat_quantizer
    if quantizer not in QUANTIZERS:
        raise UsageError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    qat_optimizer = over.pop("optimizer", hp.qat_optimizer) if name == "BitNet_QAT" else hp.qat_optimizer
    if qat_optimizer not in QAT_OPTIMIZERS:
        raise UsageError(f"optimizer must be one of {', '.join(QAT_OPTIMIZERS)}, got {qat_optimizer!r}")
    qat_betas, weight_decay = hp.qat_betas, hp.weight_decay
    if name == "BitNet_QAT":
        default = (0.0, 0.0) if qat_optimizer == "tile_sgd" else (0.9, 0.95)
        betas = [over.pop(k, d) for k, d in zip(("beta1", "beta2"), hp.qat_betas or default)]
        if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise UsageError(f"beta1 and beta2 must be numbers in [0, 1), got {betas}")
        qat_betas = tuple(float(b) for b in betas)
        weight_decay = over.pop("wd", weight_decay)
        normalize_first = over.pop("normalize_first", hp.qat_normalize_first)
        if normalize_first not in (0, 1) or (normalize_first and qat_optimizer != "tile_sgd"):
            raise UsageError(f"normalize_first must be 0 or 1, and only with optimizer=tile_sgd, "
                             f"got {normalize_first!r}")
        normalize_first = bool(normalize_first)
        if qat_optimizer == "tile_sgd" and "norm_block" in over:  # TileNormSGD normalises like the rule
            try:
                rule = FlipRule.from_dict({**rule.to_dict(), "norm_block": over.pop("norm_block")})
            except (ValueError, TypeError) as e:
                raise UsageError(str(e)) from None
        if not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < float("inf"):
            raise UsageError(f"wd must be a finite number >= 0, got {weight_decay!r}")
    if over:
        if name not in TERNARY_CONFIGS:
            extra = {"BitNet_QAT": ", quantizer=..., optimizer=..., beta1=..., beta2=..., wd=... (and norm_block=... "
                                   "with optimizer=tile_sgd)",
                     "SignSGD_Old": " and quantizer=..."}
            raise UsageError(f"{name} takes only lr=...{extra.get(name, '')} in brackets, got {sorted(over)}")
        try:
            rule = FlipRule.from_dict({**rule.to_dict(), **over})
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    lrs = dict(hp.lr, **({name: lr} if lr is not None else {}))
    return dataclasses.replace(hp, rule=rule, lr=lrs, qat_quantizer=quantizer, qat_optimizer=qat_optimizer,
                               qat_betas=qat_betas, weight_decay=weight_decay,
                               qat_normalize_first=normalize_first if name == "BitNet_QAT" else hp.qat_normalize_first)


def run(args: argparse.Namespace) -> list[dict]:
    from .cli import UsageError

    device = resolve_device(args.device)
    try:
        specs = parse_config_specs(args.configs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for flag in ("steps", "batch", "ctx"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    if args.scale_update_interval < 0:
        raise UsageError("--scale-update-interval must be >= 0")
    if getattr(args, "jobs", 1) < 1:
        raise UsageError("--jobs must be >= 1")
    if getattr(args, "jobs", 1) > 1 and len(specs) > 1 and not args.reuse_base:
        raise UsageError("--jobs needs --reuse-base (every job must start from the same base model)")
    try:
        rule_over = parse_overrides(args.rule, "rule")
        lr_over = parse_overrides(args.lr, "lr")
        rule_over.setdefault("scale_update_interval", args.scale_update_interval)
        if args.accum_threshold is not None:
            rule_over["accum_threshold"] = args.accum_threshold
        rule = FlipRule.for_run(args.steps, **rule_over)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    for k in lr_over:
        if k not in CONFIG_NAMES:
            raise UsageError(f"--lr names unknown config {k!r}")
    try:
        resolve_backend(args.update_backend)
        build_model(args.model, seed=0, ctx=args.ctx, d_model=args.d_model, n_layers=1, n_heads=args.n_heads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 <= args.warmup_frac < 1 or not 0 <= args.min_lr_frac <= 1:
        raise UsageError("--warmup-frac must be in [0, 1) and --min-lr-frac in [0, 1]")
    hp = Hparams(steps=args.steps, rule=rule, lr=lr_over, warmup_frac=args.warmup_frac, min_lr_frac=args.min_lr_frac,
                 naive_threshold=args.accum_threshold if args.accum_threshold is not None else 8)
    if args.group_size is not None:
        if args.group_size < 1:
            raise UsageError("--group-size must be >= 1")
        hp.group_size = args.group_size
    hps = [_with_overrides(hp, name, over) for _, name, over in specs]  # bad brackets fail before any work
    corpus = load_corpus(args.data)
    val_windows = eval_windows(corpus.val, args.ctx, args.eval_windows)
    train_windows = eval_windows(corpus.train, args.ctx, args.eval_windows)
    print(f"bench: data {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} held-out bytes), "
          f"device {device}, model {args.model} d={args.d_model} L={args.n_layers}, "
          f"{args.steps} steps x batch {args.batch} x ctx {args.ctx}", flush=True)
    model_kw = dict(ctx=args.ctx, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
    try:
        model_kw.update(parse_overrides(args.model_config, "model config"))
        build_model(args.model, seed=0, **dict(model_kw, n_layers=1))
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad --model-config: {e}") from None
    compile_ops = getattr(args, "compile", False)
    if compile_ops:
        try:
            check_compile_ops(args.model)
        except ValueError as e:
            raise UsageError(f"--compile: {e}") from None
    model_kw["compile_ops"] = compile_ops
    shared_base = build_model(args.model, seed=args.seed, **model_kw) if args.reuse_base else None
    meta = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "hparams": hp.to_dict(),
        "data": corpus.name,
    }
    jobs = getattr(args, "jobs", 1)
    if jobs > 1 and len(specs) > 1:
        meta["jobs"] = jobs
        results = _run_jobs(args, [label for label, _, _ in specs], jobs, meta)
    else:
        results = _run_configs(args, specs, hps, shared_base, model_kw, corpus, val_windows, train_windows, device,
                               meta)
    print()
    print(format_table(results))
    if args.plot:
        plot(results, args.plot, f"{args.model} d={args.d_model} L={args.n_layers}, "
             f"batch {args.batch} x ctx {args.ctx}, {corpus.name[:40]}")
    return results


def _run_jobs(args: argparse.Namespace, labels: list[str], jobs: int, meta: dict) -> list[dict]:
    """Each config in a child process (spawned: CUDA cannot fork), ``jobs`` at once; results in ``labels`` order.
    Every child builds the same base model (--reuse-base) and data, so the runs are those of one process.
    The JSON is rewritten as each job ends, so a cut-off run keeps what finished."""
    import multiprocessing

    children = [dict(vars(args), configs=label, jobs=1, json=None, plot=None) for label in labels]
    done: dict[str, dict] = {}
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(labels))) as pool:
        for out in pool.imap_unordered(_run_job, children):
            done[out[0]["config"]] = out[0]
            if args.json:
                _write_json(args.json, meta, [done[k] for k in labels if k in done])
    return [done[k] for k in labels]


def _run_job(child_args: dict) -> list[dict]:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the parent prints the table; children stay quiet
        results = run(argparse.Namespace(**child_args))
    r = results[0]
    print(f"   {r['config']}: val_bpb {r['val_bpb']:.4f}  ({r['median_step_ms']:.2f} ms/step beside other jobs)",
          flush=True)
    return results


def _run_configs(args, specs, hps, shared_base, model_kw, corpus, val_windows, train_windows, device, meta):
    results = []
    for i, ((label, name, _), spec_hp) in enumerate(zip(specs, hps)):
        base = shared_base if shared_base is not None else build_model(args.model, seed=args.seed + i, **model_kw)
        print(f"== {label}", flush=True)
        r = run_config(label, name, base, spec_hp, corpus, val_windows, args, device, train_windows)
        results.append(r)
        print(f"   {label}: val_bpb {r['val_bpb']:.4f}  train_bpb {r['train_bpb']:.4f}  "
              f"final loss {r['final_loss']:.4f}  {r['median_step_ms']:.2f} ms/step  "
              f"peak {r['peak_memory_bytes'] / 2**20:.1f} MB"
              + (f"  DIVERGED ({r['diverged']})" if r["diverged"] else ""), flush=True)
        if args.json:  # after every config, so a cut-off run keeps what it measured
            _write_json(args.json, meta, results)
    return results
