#!/usr/bin/env python3
"""Training speed and memory of big models on one GPU: TrueTernary against AdamW (and BitNet_QAT) per size.

    python3 benchmarks/bench_scale.py --sizes 151M,1.2B,3B --configs Adam_FP32,TrueTernary --batch 8 --ctx 256
    python3 benchmarks/bench_scale.py --sizes 6.4B,20B --configs TrueTernary --activation_checkpointing --ceiling
    python3 benchmarks/bench_scale.py --smoke      # CPU: a tiny size, Triton interpreter (checks the script only)

Each (size, config) runs in a fresh process (so one's peak memory or out-of-memory does not touch the next)
the way each is fastest on a GPU: the model built lazily on the device (``trueternary.init``), its shared ops
(norms, attention, activations) ``torch.compile``'d (``--no-compile`` to leave them eager), and the whole
training step captured in one CUDA graph (``--no-graph`` for eager steps): TrueTernary through
``Recipe.use_cuda_graph`` (what ``trueternary train`` runs), the AdamW configs with ``AdamW(capturable=True)``.
bf16 autocast, as training runs. Reported per row: median ms/step after burn-in, tokens/s, the ratio to
Adam_FP32's tokens/s at the same size, peak allocator memory over the whole process (build, capture, steps),
and model FLOPs utilisation ``MFU = 6 x weights x tokens/s / ceiling``.

``--ceiling`` measures the ceiling in the same run: cuBLAS bf16 matmul TFLOP/s (``torch.matmul``, median of
``triton.testing.do_bench``) at 8192 x 8192 x 8192 and at each size's largest training GEMM (tokens x d x 4d);
the larger is the MFU denominator. Without it MFU is left out. ``--profile`` adds GPU time per kernel class of
two eager steps of each config (harness.profile_kernels).

Writes ``$OUT/bench_scale.json`` (``OUT`` defaults to ./out) and prints a table last; exit 1 if a row failed for
another reason than running out of memory (out of memory is a result: the size does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import (  # noqa: E402
    Bench,
    add_out_arg,
    describe_profile,
    kernel_ms,
    out_dir,
    profile_kernels,
    smoke_or_cuda,
    speedup,
    step_ms,
    summary,
)

ONE = "--one"  # the child process's flag: one (size, config) as JSON


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run (Triton interpreter) with a tiny size")
    add_out_arg(p)
    p.add_argument("--sizes", default="151M,1.2B", help="comma list of named sizes (trueternary.scaling.SIZES: "
                   "151M, 1.2B, 3B, 6.4B, 13B, 20B) or DxL (d_model x n_layers) (default: 151M,1.2B)")
    p.add_argument("--configs", default="Adam_FP32,TrueTernary", help="comma list of training configurations "
                   "(default: Adam_FP32,TrueTernary)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--ctx", type=int, default=256, help="bytes per sequence (default 256)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed burn-in steps per row (default 3)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the shared ops (default: on)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="capture the whole step in a CUDA graph (default: on)")
    p.add_argument("--activation_checkpointing", "--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (default: off)")
    p.add_argument("--ceiling", action="store_true", help="measure the bf16 matmul ceiling and report MFU")
    p.add_argument("--profile", action="store_true", help="GPU time per kernel class of two eager steps per row")
    p.add_argument("--fused_max_tokens", "--fused-max-tokens", type=int, default=None,
                   help="tokens per call up to which the ternary matmuls and weight-gradient votes run the fused "
                        "Triton kernels, above which dequant/cuBLAS (default: the library's, ops.ternary_matmul."
                        "FUSED_MAX_TOKENS and ops.votes.VOTES_FUSED_MAX_TOKENS): measures the crossover")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row before it is stopped (default 900)")
    p.add_argument(ONE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "ctx", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.one is None:
        from trueternary.recipes import CONFIG_NAMES
        from trueternary.scaling import parse_size

        args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
        args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
        try:
            for s in args.size_list:
                parse_size(s)
        except ValueError as e:
            p.error(str(e))
        bad = [c for c in args.config_list if c not in CONFIG_NAMES]
        if bad or not args.config_list or not args.size_list:
            p.error(f"--configs: choose from {', '.join(CONFIG_NAMES)}" if bad else "--sizes/--configs are empty")
        if args.smoke:
            args.size_list, args.batch, args.ctx, args.steps, args.warmup = ["32x1"], 2, 8, 2, 1
            args.compile = False  # (Inductor on a CPU takes minutes; the smoke run checks the script)
        args.out = out_dir(p, args.out)
    return args


# ------------------------------------------------------------------------------------------------ one row (child)


def run_one(spec: dict) -> dict:
    """Build ``spec['config']`` at ``spec['size']`` on the device, make its fastest step, time it."""
    import torch
    import torch.nn.functional as F

    from trueternary.models import build_model
    from trueternary.optim.train_step import capture_cuda_graph
    from trueternary.recipes import TERNARY_CONFIGS, Hparams, build_recipe
    from trueternary.scaling import model_shape, parse_size
    from trueternary.vocab import VOCAB_SIZE

    dev = torch.device("cpu" if spec["smoke"] else "cuda")
    cuda = dev.type == "cuda"
    if spec.get("fused_max_tokens") is not None:
        import trueternary.ops.ternary_matmul as matmul_ops
        import trueternary.ops.votes as vote_ops

        matmul_ops.FUSED_MAX_TOKENS = vote_ops.VOTES_FUSED_MAX_TOKENS = spec["fused_max_tokens"]
    d, n_layers = parse_size(spec["size"])
    batch, ctx, config = spec["batch"], spec["ctx"], spec["config"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    base = build_model("transformer", seed=0, lazy=True, ctx=ctx,
                       activation_checkpointing=spec["activation_checkpointing"],
                       **(dict(d_model=d, n_layers=n_layers, n_heads=2) if spec["smoke"] else model_shape(d, n_layers)))
    if spec["compile"]:
        base.use_compiled_ops(True)
    recipe = build_recipe(config, base, Hparams(steps=1000), device=dev, backend="auto", seed=0)
    del base
    report = recipe.state_report()
    weights = report["ternary_weights"] or report["float_params"]
    row = {"size": spec["size"], "d_model": d, "n_layers": n_layers, "weights": weights, "config": config,
           "batch": batch, "ctx": ctx, "compiled": spec["compile"], "activation_checkpointing":
           spec["activation_checkpointing"], "build_s": time.perf_counter() - t0,
           "built_bytes": int(torch.cuda.memory_allocated()) if cuda else None}
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, VOCAB_SIZE, (batch, ctx + 1), generator=g).to(dev)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    losses: list[float] = []
    graphed = spec["graph"] and cuda
    if graphed and config not in TERNARY_CONFIGS:  # before any step: AdamW creates its step counters on the device
        for o in recipe.optimizers:
            for group in o.param_groups:
                group["capturable"] = True

    def eager() -> None:
        losses.append(float(recipe.train_step(x, y, cuda)))

    if spec["profile"] and cuda:
        for _ in range(2):
            eager()
        row["profile"] = profile_kernels(eager, steps=2, device=dev)
    t1 = time.perf_counter()
    step = eager  # (a TrueTernary recipe's train_step replays its graph once captured)
    if graphed and config in TERNARY_CONFIGS:
        recipe.use_cuda_graph(x, y, autocast=True)
    elif graphed:  # the AdamW configs: forward, backward, clip and AdamW(capturable=True) in one graph
        params = [p for p in recipe.model.parameters() if p.requires_grad]
        out: list = []

        def whole_step() -> None:
            for o in recipe.optimizers:
                o.zero_grad(set_to_none=False)  # captured as zero_(): each replay starts from zero gradients
            # the autocast weight-cast cache must be off inside CUDA graphs (torch.cuda.graphs docs)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                logits = recipe.model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.hp.grad_clip)
            for o in recipe.optimizers:
                o.step()
            out[:] = [loss.detach()]

        graph = capture_cuda_graph(whole_step, warm_up=lambda: [whole_step() for _ in range(3)])

        def step() -> None:
            graph.replay()
            losses.append(float(out[0]))
    row["graph"] = graphed
    row["fused_max_tokens"] = spec.get("fused_max_tokens")
    row["prepare_s"] = time.perf_counter() - t1  # compile and capture
    ms = step_ms(step, warmup=spec["warmup"], repeats=spec["steps"], device=dev)
    row.update(summary(ms, batch * ctx))
    row.update(first_loss=losses[0], last_loss=losses[-1], finite=all(v == v and abs(v) != float("inf")
                                                                      for v in losses))
    if cuda:
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        row["peak_bytes_per_weight"] = row["peak_bytes"] / weights
    return row


# ------------------------------------------------------------------------------------------------ parent


def ceiling_tflops(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """cuBLAS bf16 ``torch.matmul`` TFLOP/s at each (m, k, n)."""
    import torch

    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        ms = kernel_ms(lambda a=a, b=b: torch.matmul(a, b), device="cuda")
        rows.append({"m": m, "k": k, "n": n, "ms": ms, "tflops": 2 * m * k * n / ms / 1e9})
        del a, b
    return rows


def run_child(args, size: str, config: str) -> dict:
    spec = {"size": size, "config": config, "batch": args.batch, "ctx": args.ctx, "steps": args.steps,
            "warmup": args.warmup, "compile": args.compile, "graph": args.graph, "smoke": args.smoke,
            "activation_checkpointing": args.activation_checkpointing, "profile": args.profile,
            "fused_max_tokens": args.fused_max_tokens}
    cmd = [sys.executable, str(Path(__file__).resolve()), ONE, json.dumps(spec)]
    # expandable segments: big models' peaks are not inflated by the caching allocator's fragmentation
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"size": size, "config": config, "error": f"timed out after {args.timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [line for line in done.stderr.strip().splitlines() if line.strip()]
    message = err[-1][:300] if err else f"exit status {done.returncode}"
    return {"size": size, "config": config, "error": message,
            "out_of_memory": "out of memory" in done.stderr.lower()}


def table(res: dict) -> str:
    env = res["env"]
    lines = [f"== bench_scale: {env.get('gpu', env['device'])}  torch {env['torch']}  triton {env['triton']}"]
    ceiling = res.get("ceiling_tflops")
    if ceiling:
        lines.append(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s (MFU's denominator)")
    lines.append(f"{'size':6} {'weights':>8} {'config':12} {'batch x ctx':>11} {'ms/step':>9} {'tokens/s':>10} "
                 f"{'x Adam':>7} {'MFU':>6} {'peak GiB':>9} {'B/weight':>8}  loss first->last")
    adam = {r["size"]: r for r in res["rows"] if r.get("config") == "Adam_FP32" and "error" not in r}
    for r in res["rows"]:
        if "error" in r:
            why = "out of memory" if r.get("out_of_memory") else r["error"][:90]
            lines.append(f"{r['size']:6} {'':>8} {r['config']:12} {'':>11} {why}")
            continue
        a = adam.get(r["size"])
        ratio = f"{speedup(a['median_ms'], r['median_ms']):.2f}" if a else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
        per = f"{r['peak_bytes_per_weight']:.2f}" if r.get("peak_bytes") else "-"
        lines.append(f"{r['size']:6} {r['weights'] / 1e9:7.2f}B {r['config']:12} {r['batch']:>4} x {r['ctx']:<4} "
                     f"{r['median_ms']:9.1f} {r['tokens_per_s']:10,.0f} {ratio:>7} {mfu:>6} {peak:>9} {per:>8}  "
                     f"{r['first_loss']:.3f}->{r['last_loss']:.3f}")
        if r.get("profile"):
            lines.append("       profile: " + describe_profile(r["profile"]))
    for e in res["errors"]:
        lines.append(f"ERROR {e['section']}: {e['error'][:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:  # the child: one row, as JSON on the last line of stdout
        spec = json.loads(args.one)
        if spec["smoke"]:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        print(json.dumps(run_one(spec)))
        return 0
    smoke_or_cuda(args.smoke, "bench_scale")
    from trueternary.scaling import parse_size

    dev = "cpu" if args.smoke else "cuda"
    bench = Bench("bench_scale", args.out, 1e9, dev)
    res = bench.res
    res["env"].update({k: v for k, v in vars(args).items() if k not in ("out", "one")})
    res["rows"] = []
    if args.ceiling and not args.smoke:
        with bench.section("ceiling") as go:
            if go:
                shapes = [(8192, 8192, 8192)] + [(args.batch * args.ctx, parse_size(s)[0], 4 * parse_size(s)[0])
                                                 for s in args.size_list]
                res["ceiling"] = ceiling_tflops(shapes)
                res["ceiling_tflops"] = max(r["tflops"] for r in res["ceiling"])
    failed = False
    for size in args.size_list:
        for config in args.config_list:
            t = time.time()
            row = run_child(args, size, config)
            if "error" not in row and res.get("ceiling_tflops"):
                row["mfu"] = 6 * row["weights"] * row["tokens_per_s"] / (res["ceiling_tflops"] * 1e12)
            failed |= "error" in row and not row.get("out_of_memory")
            res["rows"].append(row)
            bench.save()
            print(f"[{size} {config}] {time.time() - t:.0f}s: "
                  + (row["error"] if "error" in row else f"{row['median_ms']:.1f} ms/step"), file=sys.stderr)
    path = bench.save()
    print(table(res))
    print(f"wrote {path}", file=sys.stderr)
    return 1 if failed or res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
