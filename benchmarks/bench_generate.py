#!/usr/bin/env python3
"""Generation throughput: bytes/s of ``trueternary generate``'s sampler with the key/value cache against the
cache-less path (the whole window rerun for every byte), per model.

    python3 benchmarks/bench_generate.py --model 128,2,64 --model 256,4,256          # CPU, a few minutes on 1 thread
    python3 benchmarks/bench_generate.py --ckpt runs/<run>/checkpoints/step_0000300.safetensors --device cuda

Each ``--ckpt`` is loaded as ``generate`` loads it (``load_for_inference``: T_packed and scales only); each
``--model D_MODEL,N_LAYERS,CTX[,N_HEADS]`` is a freshly initialised model of ``--config`` (default TrueTernary,
held the same way; the speed of a step does not depend on the trained values). For each model and path,
``generate.sample`` extends the prompt ``def `` by ``--new_bytes`` bytes (temperature 0.8, seed 0; what the
command runs, sampling, device-to-host copies and the window restarts included): ``--warmup`` untimed runs, then
the median of ``--repeats`` timed ones (``harness.step_ms``), the two paths alternating run by run (a machine
whose load changes slows both alike). ``same_bytes`` says whether the two paths produced
the same bytes (they agree up to float rounding, so sampling can in principle part ways at a near-tie).

Writes ``$OUT/generate.json`` (``OUT`` defaults to ./out) and prints a table. CPU runs use ``generate``'s thread
rule (``--threads``, default: 1 for d_model <= 256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import Bench, add_out_arg, out_dir, speedup, step_ms, summary  # noqa: E402

PROMPT = b"def "


def parse_model(p: argparse.ArgumentParser, text: str) -> dict:
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (3, 4) or min(parts) < 1:
        p.error(f"--model {text}: expected D_MODEL,N_LAYERS,CTX[,N_HEADS] (positive integers)")
    d, layers, ctx = parts[:3]
    heads = parts[3] if len(parts) == 4 else 4
    return dict(d_model=d, n_layers=layers, ctx=ctx, n_heads=heads)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", default=[], metavar="PATH", help="a checkpoint (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="D,L,CTX[,H]",
                   help="a freshly initialised model of --config (repeatable)")
    p.add_argument("--config", default="TrueTernary", help="weight representation of the --model models")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--new_bytes", type=int, default=300, help="bytes generated per timed run (default 300)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: generate's default for the model size)")
    p.add_argument("--budget", type=float, default=3600.0, help="seconds; models still to run are then skipped")
    add_out_arg(p)
    args = p.parse_args()
    args.models = [parse_model(p, m) for m in args.model]
    if not args.ckpt and not args.models:
        p.error("name at least one --ckpt or --model")
    for name in ("new_bytes", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    for path in args.ckpt:
        if not Path(path).is_file():
            p.error(f"--ckpt {path}: no such file")
    from trueternary.errors import UsageError
    from trueternary.flags import resolve_device
    from trueternary.recipes import CONFIG_NAMES

    if args.config not in CONFIG_NAMES:
        p.error(f"unknown --config {args.config!r}; choose from {', '.join(CONFIG_NAMES)}")
    try:
        args.device = resolve_device(args.device)
    except UsageError as e:
        p.error(str(e))
    args.out = out_dir(p, args.out)
    return args


def build(args, spec):
    """(model on the device, its model config) of a --ckpt path or a --model config."""
    from trueternary.generate import build_inference_model, load_for_inference
    from trueternary.weight import DEFAULT_GROUP_SIZE

    if isinstance(spec, str):
        model, meta = load_for_inference(spec, args.device)
        return model, meta["model"]["config"]
    model = build_inference_model(args.config, "transformer", spec, DEFAULT_GROUP_SIZE).to(args.device).eval()
    return model, model.cfg.to_dict()


def time_paths(model, args) -> dict:
    """Seconds and bytes/s of ``sample`` without and with the cache (alternating), and whether they agree."""
    from trueternary.generate import sample

    out, ms = {}, {"no_cache": [], "cache": []}

    def run(path):
        out[path] = sample(model, PROMPT, args.new_bytes, temperature=0.8, seed=0, device=args.device,
                           cache=path == "cache")
    for path in ms:
        step_ms(lambda path=path: run(path), warmup=args.warmup, repeats=0, device=args.device)
    for _ in range(args.repeats):  # the paths alternate: a change in the machine's load hits both
        for path in ms:
            ms[path] += step_ms(lambda path=path: run(path), warmup=0, repeats=1, device=args.device)
    row = {}
    for path, times in ms.items():
        s = summary(times, tokens_per_call=args.new_bytes)
        row[path] = {"median_s": s["median_ms"] / 1e3, "bytes_per_s": s["tokens_per_s"],
                     "runs_s": [round(t / 1e3, 3) for t in times]}
    row["same_bytes"] = out["cache"] == out["no_cache"]
    return row


def main() -> int:
    args = parse_args()
    import torch

    from trueternary.flags import cpu_threads
    from trueternary.generate import has_kv_cache

    bench = Bench("generate", args.out, args.budget, args.device)
    bench.res.update(new_bytes=args.new_bytes, prompt=PROMPT.decode(), warmup=args.warmup, repeats=args.repeats)
    specs = [(Path(p).name, p) for p in args.ckpt] + [
        (f"{args.config} d{c['d_model']} L{c['n_layers']} ctx{c['ctx']}", c) for c in args.models]
    for label, spec in specs:
        with bench.section(label) as go:
            if not go:
                continue
            model, cfg = build(args, spec)
            if args.device.type == "cpu":
                torch.set_num_threads(cpu_threads(args.threads, cfg["d_model"]))
            row = {"model": label, "config": cfg, "threads": torch.get_num_threads(),
                   "has_kv_cache": has_kv_cache(model)}
            row.update(time_paths(model, args))
            row["speedup"] = speedup(row["no_cache"]["median_s"], row["cache"]["median_s"])
            bench.add("results", row)
    rows = bench.res.get("results", [])
    print(f"{'model':<34} {'threads':>7} {'no cache B/s':>12} {'cache B/s':>10} {'speedup':>8} same")
    for r in rows:
        print(f"{r['model']:<34} {r['threads']:>7} {r['no_cache']['bytes_per_s']:>12.1f} "
              f"{r['cache']['bytes_per_s']:>10.1f} {r['speedup']:>7.2f}x {r['same_bytes']}")
    return 1 if bench.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
