#!/usr/bin/env python3
"""What each MORPH part earns: train MORPH with one part removed at a time, beside the transformer.

Usage (GPU, from the repo root; CPU works too with small sizes):

    python3 experiments/morph_ablation/run.py --steps 2000 --batch 32 --ctx 256 --d-model 512 --out out/morph_ablation

Every variant is trained with the same recipe (``--config``, default TrueTernary), the same batches in the
same order and the same step budget; reported per variant: ternary weights, median ms/step, mean training
loss of the last 10% of steps, validation bits per byte on held-out text. Writes ``morph_ablation.json`` and
``.md`` to ``--out`` (default ``$OUT`` or ``./out``). What it found so far: README.md beside this file.

Variants: ``full``; ``-lstm`` (no local recurrent encoder); ``-vq`` (no VQ, no code nodes, no same-code
edges); ``-graph`` (no graph aggregation); ``-match`` (graph without same-code edges); ``dense-ffn``
(one expert, top-1: the MoE becomes a dense FFN of the same active width); ``transformer``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from harness import add_out_arg, out_dir, write_json  # noqa: E402

from trueternary.backends import DEFAULT_UPDATE_BACKEND  # noqa: E402
from trueternary.bench import validation_bpb  # noqa: E402
from trueternary.data import eval_windows, load_corpus, random_batch  # noqa: E402
from trueternary.models import build_model  # noqa: E402
from trueternary.recipes import CONFIG_NAMES, Hparams, build_recipe  # noqa: E402

VARIANTS = {
    "full": {},
    "-lstm": {"use_lstm": False},
    "-vq": {"use_vq": False},
    "-graph": {"use_graph": False},
    "-match": {"match_edges": False},
    "dense-ffn": {"n_experts": 1, "top_k": 1},
    "transformer": None,
}


def run_variant(name, extra, args, corpus, val, device):
    kw = dict(ctx=args.ctx, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
    base = build_model("transformer", args.seed, **kw) if extra is None else build_model(
        "morph", args.seed, **kw, **extra)
    rec = build_recipe(args.config, base, Hparams(steps=args.steps, group_size=args.group_size), device=device,
                       backend=args.update_backend, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # identical batches for every variant
    autocast = device.type == "cuda"
    losses, times = [], []
    for step in range(args.steps):
        x, y = random_batch(corpus.train, args.batch, args.ctx, gen, device)
        t0 = time.perf_counter()
        losses.append(float(rec.train_step(x, y, autocast)))
        times.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]):
            break
        if args.print_every and step % args.print_every == 0:
            print(f"  [{name}] step {step} loss {losses[-1]:.4f}", flush=True)
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "variant": name,
        "ternary_weights": rec.state_report()["ternary_weights"],
        "float_params": rec.state_report()["float_params"],
        "median_step_ms": statistics.median(times[len(times) // 10:] or times) * 1e3,
        "final_loss": sum(tail) / len(tail),
        "val_bpb": validation_bpb(rec.model, val, device, autocast),
        "losses": losses,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--config", default="TrueTernary", choices=CONFIG_NAMES)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--update-backend", default=DEFAULT_UPDATE_BACKEND.value)
    p.add_argument("--data", default=None)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=0)
    add_out_arg(p)
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    out = out_dir(p, args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU models: thread hand-off costs more than it gains
    corpus = load_corpus(args.data)
    val = eval_windows(corpus.val, args.ctx, args.eval_windows)
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        results.append(run_variant(name, VARIANTS[name], args, corpus, val, device))
        r = results[-1]
        print(f"  {name}: {r['ternary_weights']:,} ternary weights, {r['median_step_ms']:.1f} ms/step, "
              f"final loss {r['final_loss']:.4f}, val {r['val_bpb']:.4f} bpb", flush=True)
    meta = {"args": {k: v for k, v in vars(args).items() if k != "out"},
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "data": corpus.name}
    write_json(out / "morph_ablation.json", {"meta": meta, "results": results})
    lines = [f"{args.config}, {args.steps} steps x batch {args.batch} x ctx {args.ctx}, d={args.d_model} "
             f"L={args.n_layers}, {meta['device']}, data {corpus.name}", "",
             "| variant | ternary weights | ms/step | final loss (nats) | val bpb |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['ternary_weights']:,} | {r['median_step_ms']:.1f} | {r['final_loss']:.4f} | "
              f"{r['val_bpb']:.4f} |" for r in results]
    md = "\n".join(lines) + "\n"
    (out / "morph_ablation.md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
