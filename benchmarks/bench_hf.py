#!/usr/bin/env python3
"""Training-step benchmark of a Hugging Face transformers Llama: ternarised and trained by FlipOptimizer
(``trueternary.optim.TrainStep``) against the float model trained by AdamW, each in its fastest setting.

    python3 benchmarks/bench_hf.py            # on a CUDA machine, from the repo root (a few minutes, compiles)
    python3 benchmarks/bench_hf.py --smoke    # CPU: tiny model, eager and compiled steps (checks the script only)

The model and the steps are ``benchmarks/hf_llama.py``'s: ``LlamaForCausalLM`` from a config, by default 6
layers, d 512 (``--model D,L``), batch 16 x 256 (``--batch``), bf16 autocast on CUDA; attention is causal sdpa
without a mask tensor (``--attention sdpa``: transformers' default, which builds a mask inside a CUDA graph).

``--parts`` adds each optimiser without its update ("AdamW (no update)": no ``opt.step()``; "TrueTernary (no
update)": the ``none`` backend, no votes and no flips), so that the update's share of a step is the difference.
``--profile`` adds, for each variant without a graph, the GPU time per step by kernel class and the top kernels
(``harness.profile_kernels``; a graphed variant runs the same kernels as its ungraphed twin).

Variants, each a fresh copy of the same model, median ms per step over timed steps after burn-in
(``harness.step_ms``: host time, synchronised):

    AdamW          eager | compiled (``torch.compile`` of the loss, whole model) | CUDA graph (the whole step,
                   ``AdamW(fused=True, capturable=True)``) | compiled + CUDA graph.  Eager steps use fused AdamW.
    TrueTernary    ``ternarize`` (strict: every float parameter frozen), ``FlipOptimizer`` on the ``gpu`` backend,
                   linear layers on the Triton kernels, the default rule; stepped by ``TrainStep``: eager |
                   compiled (whole model: the ternary layers are torch.library ops) | CUDA graph | compiled + CUDA
                   graph.

The table's ``breaks`` column counts the graph breaks dynamo met compiling each compiled variant (0: one graph).
No gradient clipping (TrueTernary has no float gradient to clip). The summary is the best variant of each and
the ratio of their step times (goal: TrueTernary <= 1.1x AdamW). Writes ``$OUT/bench_hf.json`` (``--out``); a
variant that fails is recorded in ``errors`` and the others still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import (  # noqa: E402
    Bench,
    describe_profile,
    profile_kernels,
    smoke_or_cuda,
    step_ms,
    summary,
)

GOAL = 1.1  # TrueTernary's best step time at most this many times AdamW's best


def parse_args():
    from hf_llama import add_args, finish_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p, variants="eager,compiled,graph,compiled+graph")
    p.add_argument("--parts", action="store_true",
                   help="also time each optimiser's step without its update (forward and backward only)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each variant without a graph: GPU time per kernel class and the top kernels")
    p.add_argument("--attention", choices=("causal", "sdpa"), default="causal",
                   help="causal: sdpa with is_causal and no mask tensor (default); sdpa: transformers' default")
    return finish_args(p, p.parse_args())


ARGS = parse_args()
smoke_or_cuda(ARGS.smoke, "bench_hf")

from hf_llama import require_transformers  # noqa: E402

require_transformers("bench_hf")

import torch  # noqa: E402
import transformers  # noqa: E402
from hf_llama import BUILDERS, Setup, base_model, batch, register_causal_attention  # noqa: E402

S = Setup(ARGS.smoke, *ARGS.model, batch=ARGS.batch,
          attention="trueternary_causal" if ARGS.attention == "causal" else "sdpa")
DEV = S.device
B = Bench("bench_hf", ARGS.out, ARGS.budget if ARGS.budget is not None else (1e9 if ARGS.smoke else 900.0), DEV)
NO_UPDATE = " (no update)"  # --parts: an optimiser's rows without its update, e.g. "AdamW (no update)"


def run_variant(base, optimizer: str, variant: str) -> dict:
    xy = batch(S)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    name, update = (optimizer[:-len(NO_UPDATE)], False) if optimizer.endswith(NO_UPDATE) else (optimizer, True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    step, facts = BUILDERS[name](S, base, variant, xy, update)
    warmup, repeats = S.warmup_repeats
    ms = step_ms(step, warmup=warmup, repeats=repeats, device=DEV)
    # graph breaks dynamo met compiling the loss (a compiled model that stops and restarts loses fusions)
    breaks = sum(counters["graph_break"].values()) if "compiled" in variant else None
    row = {"optimizer": optimizer, "variant": variant, **facts, **summary(ms, S.tokens),
           "peak_bytes": int(torch.cuda.max_memory_allocated()) if DEV.type == "cuda" else None,
           "graph_breaks": breaks}
    print(f"  {optimizer:24} {variant:15} {row['median_ms']:9.2f} ms/step  {row['tokens_per_s']:12,.0f} tok/s",
          file=sys.stderr)
    if ARGS.profile and "graph" not in variant:  # (a graph's replay hides its kernels from the profiler)
        row["profile"] = profile_kernels(step, steps=3, device=DEV)
        print(f"  {'':24} {'':15} {describe_profile(row['profile'])}", file=sys.stderr)
    return row


# ------------------------------------------------------------------------------------------------ main


def best_and_ratio(rows: list[dict]) -> dict:
    best = {}
    for opt in BUILDERS:
        mine = [r for r in rows if r["optimizer"] == opt]
        if mine:
            best[opt] = min(mine, key=lambda r: r["median_ms"])
    out = {"best": {k: {"variant": r["variant"], "median_ms": r["median_ms"]} for k, r in best.items()}}
    if len(best) == 2:
        ratio = best["TrueTernary"]["median_ms"] / best["AdamW"]["median_ms"]
        out.update(ratio=ratio, goal=GOAL, met=ratio <= GOAL)
    return out


def print_table() -> None:
    r = B.res
    env = r["env"]
    lines = [f"== bench_hf: {env.get('gpu', env['device'])}  torch {env['torch']}  transformers "
             f"{transformers.__version__}  d {S.model['hidden_size']} x {S.model['num_hidden_layers']} layers  "
             f"batch {ARGS.batch} x {S.model['ctx']}  ({B.elapsed():.0f}s)",
             f"{'optimizer':24} {'variant':15} {'ms/step':>9} {'tokens/s':>12} {'peak MiB':>9} {'breaks':>6}"]
    for row in r.get("steps", []):
        pk = f"{row['peak_bytes'] / 2**20:.0f}" if row.get("peak_bytes") else "-"
        breaks = "-" if row.get("graph_breaks") is None else str(row["graph_breaks"])
        lines.append(f"{row['optimizer']:24} {row['variant']:15} {row['median_ms']:9.2f} {row['tokens_per_s']:12,.0f} "
                     f"{pk:>9} {breaks:>6}")
    s = r.get("summary", {})
    if "ratio" in s:
        b = s["best"]
        lines.append(f"best: TrueTernary {b['TrueTernary']['median_ms']:.2f} ms ({b['TrueTernary']['variant']}) vs "
                     f"AdamW {b['AdamW']['median_ms']:.2f} ms ({b['AdamW']['variant']}): {s['ratio']:.2f}x "
                     f"(goal <= {GOAL}x: {'met' if s['met'] else 'not met'})")
    for e in r["errors"]:
        lines.append(f"ERROR {e['section']}: {e['error'][:200]}")
    print("\n".join(lines))


def main() -> int:
    if ARGS.attention == "causal":
        register_causal_attention()
    B.res["env"].update(S.env())
    base = base_model(S)
    # graphs last: a failed capture can leave the device unusable, and everything before it is saved by then
    order = sorted(ARGS.variants, key=lambda v: "graph" in v)
    optimizers = [*BUILDERS, *(f"{o}{NO_UPDATE}" for o in BUILDERS if ARGS.parts)]
    for variant in order:
        for opt in optimizers:
            with B.section(f"{opt} {variant}") as go:
                if go:
                    B.add("steps", run_variant(base, opt, variant))
                    B.res["summary"] = best_and_ratio(B.res["steps"])
    return B.finish(print_table)


if __name__ == "__main__":
    sys.exit(main())
