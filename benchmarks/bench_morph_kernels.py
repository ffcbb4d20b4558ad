"""Time MORPH's kernels and model on the GPU: each Triton kernel vs its naive reference and vs its memory floor.

Usage (on the GPU machine, from the repo root):

    python3 benchmarks/bench_morph_kernels.py --out out/morph_kernels

Writes ``morph_kernels.json`` and ``morph_kernels.md`` to ``--out`` (default ``$OUT`` or ``./out``) and prints
the tables. Every Triton kernel's forward and backward is checked against the naive reference on the benchmark
shapes before it is timed (max abs error reported; a kernel beyond the tolerance is an error and is not timed);
then

1. **kernels** -- forward and forward+backward of gather-add, graph aggregation and MoE combine at
   MORPH's shapes (``--batch x --ctx`` positions, ``--d-model`` channels): median time of ``--reps``
   runs after 3 burn-in runs (CUDA events), the naive time, and the *memory floor* = bytes that must move /
   ``--hbm-gbps`` (every input read once, every output written once; FLOPs are listed too but these ops are
   memory-bound by 1-2 orders of magnitude);
2. **components** -- forward+backward time of each MORPH stage inside the ternarised model (LSTM,
   VQ + gather-add, graph, one attention/MoE block);
3. **model** -- one TrueTernary training step (FlipOptimizer, ``--update-backend``) of MORPH with naive
   and with Triton kernels, and of the transformer of the same d_model / n_layers, bf16 autocast.

``--quick`` shrinks every shape so the script can be smoke-tested on a CPU (with ``TRITON_INTERPRET=1``
for the Triton paths; timings are then meaningless).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from harness import Bench, add_out_arg, event_ms, out_dir  # noqa: E402

from trueternary.backends import DEFAULT_UPDATE_BACKEND  # noqa: E402
from trueternary.ops.gather_add import gather_add  # noqa: E402
from trueternary.ops.graph_aggregate import graph_aggregate  # noqa: E402
from trueternary.ops.moe_combine import moe_combine  # noqa: E402

SECTIONS = ("kernels", "components", "model")


def timer(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after 3 burn-in runs (CUDA events); on a CPU (Triton's
    interpreter: nothing to warm up, and each run costs seconds) without burn-in."""
    return statistics.median(event_ms(fn, warmup=3 if device.type == "cuda" else 0, repeats=reps, device=device))


def fwd_bwd(fn, inputs, grad_idx):
    """A closure running forward + backward of ``fn(*inputs)`` with a fixed output gradient."""
    xs = [t.detach().requires_grad_(i in grad_idx) if t.is_floating_point() else t for i, t in enumerate(inputs)]
    g = None

    def run():
        nonlocal g
        for i in grad_idx:
            xs[i].grad = None
        out = fn(*xs)
        if g is None:
            g = torch.randn_like(out)
        out.backward(g)
        return out, [xs[i].grad for i in grad_idx]

    return run


def check(name, fn, inputs, grad_idx, tol):
    """Max abs difference of the Triton forward and input gradients from the naive reference."""
    runs = []
    for backend in ("naive", "triton"):
        torch.manual_seed(0)  # the same random output gradient for both
        runs.append(fwd_bwd(lambda *a, b=backend: fn(*a, b), inputs, grad_idx)())
    (ref_out, ref_grads), (out, grads) = runs
    err = max([(out.float() - ref_out.float()).abs().max().item()]
              + [(a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref_grads)])
    if err > tol:
        raise AssertionError(f"{name}: triton differs from naive by {err:.3g} > {tol}")
    return err


def kernel_cases(args, device, dtype):
    """(name, fn(*inputs, backend), inputs, grad_idx, bytes_fwd, bytes_fwd_bwd, flops) at MORPH's shapes."""
    from trueternary.components.graph import causal_graph

    gen = torch.Generator(device="cpu").manual_seed(0)
    N, D = args.batch * args.ctx, args.d_model
    es = torch.tensor([], dtype=dtype).element_size()
    cases = []

    # gather-add: per_position = vq_output + node_features[codes]; U unique codes in the batch
    U = min(args.n_codes, N)
    a = torch.randn(N, D, generator=gen).to(device, dtype)
    table = torch.randn(U, D, generator=gen).to(device)
    idx = torch.randint(0, U, (N,), generator=gen).to(device)
    fwd = N * D * es + U * D * 4 + N * 8 + N * D * 4
    bwd = N * D * 4 + N * 8 + U * D * 4  # read grad, indices; write grad of the table (grad of a is grad_out)
    cases.append(("gather_add", lambda a, t, i, b: gather_add(a, t, i, b), (a, table, idx), [0, 1], fwd, fwd + bwd,
                  N * D))

    # graph aggregation over the causal window (+ same-code) graph
    codes = torch.randint(0, args.n_codes, (args.batch, args.ctx), generator=gen).to(device)
    graph, _ = causal_graph(args.batch, args.ctx, args.window, codes)
    E, H = graph.num_edges, args.graph_heads
    x = torch.randn(N, D, generator=gen).to(device, dtype)
    w = torch.randn(E, H, generator=gen).to(device)
    idx_bytes = (2 * E + 2 * (N + 1)) * 8
    fwd = N * D * es + E * H * 4 + idx_bytes + N * D * 4
    bwd = N * D * 4 + N * D * es + E * H * 4 + idx_bytes + N * D * es + E * H * 4
    cases.append(("graph_aggregate", lambda x, w, b: graph_aggregate(x, w, graph, b), (x, w), [0, 1], fwd,
                  fwd + bwd, 2 * E * D))

    # MoE combine: N tokens, top-k of the experts' outputs (expert order)
    k = args.top_k
    Y = torch.randn(N * k, D, generator=gen).to(device, dtype)
    wr = torch.rand(N, k, generator=gen).to(device)
    pos = torch.randperm(N * k, generator=gen).view(N, k).to(device)
    fwd = N * k * D * es + N * k * (4 + 8) + N * D * 4
    bwd = N * D * 4 + N * k * D * es + N * k * (4 + 8) + N * k * D * es + N * k * 4
    cases.append(("moe_combine", lambda y, w, p, b: moe_combine(y, w, p, b), (Y, wr, pos), [0, 1], fwd, fwd + bwd,
                  2 * N * k * D))
    return cases


def bench_kernels(args, device, results):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = results.setdefault("kernels", [])
    for name, fn, inputs, grad_idx, b_fwd, b_all, flops in kernel_cases(args, device, dtype):
        err = check(name, fn, inputs, grad_idx, tol=args.tol)
        row = {"kernel": name, "max_abs_err": err, "bytes_fwd": b_fwd, "bytes_fwd_bwd": b_all, "flops_fwd": flops}
        for backend in ("naive", "triton"):
            with torch.no_grad():
                row[f"{backend}_fwd_ms"] = timer(lambda b=backend, f=fn, i=inputs: f(*i, b), args.reps, device)
            row[f"{backend}_fwd_bwd_ms"] = timer(fwd_bwd(lambda *a, b=backend, f=fn: f(*a, b), inputs, grad_idx),
                                                 args.reps, device)
        row["floor_fwd_ms"] = b_fwd / (args.hbm_gbps * 1e9) * 1e3
        row["floor_fwd_bwd_ms"] = b_all / (args.hbm_gbps * 1e9) * 1e3
        rows.append(row)
        print(f"  {name}: triton fwd {row['triton_fwd_ms'] * 1e3:.1f} us (naive {row['naive_fwd_ms'] * 1e3:.1f}, "
              f"floor {row['floor_fwd_ms'] * 1e3:.1f}); fwd+bwd {row['triton_fwd_bwd_ms'] * 1e3:.1f} us (naive "
              f"{row['naive_fwd_bwd_ms'] * 1e3:.1f}, floor {row['floor_fwd_bwd_ms'] * 1e3:.1f}); max err {err:.2e}",
              flush=True)


def _morph(args, backend, device):
    from trueternary import ternarize
    from trueternary.models import build_model

    m = build_model("morph", 0, ctx=args.ctx, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                    n_codes=args.n_codes, graph_window=args.window, graph_heads=args.graph_heads, top_k=args.top_k,
                    kernel_backend=backend)
    return ternarize(m, args.group_size).to(device)


def bench_components(args, device, results):
    """Forward+backward time of each MORPH stage (ternarised, votes cast by a FlipOptimizer, no step)."""
    from trueternary import FlipOptimizer
    from trueternary.layers import set_linear_kernel
    from trueternary.models.transformer import rms_norm

    m = _morph(args, "auto", device)
    set_linear_kernel(m, FlipOptimizer(m, backend=args.update_backend).backend.linear_kernel)
    B, L, d = args.batch, args.ctx, args.d_model
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(B, L, d, generator=gen).to(device)
    idx = torch.randint(0, 256, (B, L), generator=gen).to(device)
    codes = torch.randint(0, args.n_codes, (B, L), generator=gen).to(device)
    ac = device.type == "cuda"

    def stage(f):
        def run():
            xi = x.detach().requires_grad_(True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ac):
                out = f(xi)
            out.float().sum().backward()
        return run

    def vq_path(xi):
        vq = m.vq(rms_norm(m.vq_in(rms_norm(xi))))
        uniq, inv = torch.unique(vq.indices.reshape(-1), return_inverse=True)
        return gather_add(m.vq_out(vq.q).reshape(B * L, d), m.code_nodes(uniq), inv, "auto")

    stages = {
        "lstm (local encoder)": lambda xi: m._local_encoder(rms_norm(xi)),
        "vq + gather_add": vq_path,
        "graph": lambda xi: m.graph(xi, codes),
        "attention + moe block": lambda xi: m.blocks[0](xi, m.rope_cos, m.rope_sin),
        "whole model": lambda xi: m(idx),
    }
    rows = []
    for name, f in stages.items():
        ms = timer(stage(f), args.reps, device)
        rows.append({"stage": name, "fwd_bwd_ms": ms})
        print(f"  {name}: {ms:.3f} ms fwd+bwd", flush=True)
    results["components"] = rows


def _train_step(rec, batches, autocast: bool):
    count = [0]

    def step():
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        return float(rec.train_step(x, y, autocast=autocast))  # float(): waits for the step to finish

    return step


def bench_model(args, device, results):
    from trueternary.data import random_batch
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe

    data = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    hp = Hparams(steps=1000, group_size=args.group_size)
    rows = []
    variants = [("morph", "naive"), ("morph", "triton"), ("transformer", None)]
    for family, backend in variants:
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        kw = dict(ctx=args.ctx, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
        if family == "morph":
            kw.update(n_codes=args.n_codes, graph_window=args.window, graph_heads=args.graph_heads,
                      top_k=args.top_k, kernel_backend=backend)
        base = build_model(family, 0, **kw)
        rec = build_recipe("TrueTernary", base, hp, device=device, backend=args.update_backend)
        gen = torch.Generator().manual_seed(0)
        batches = [random_batch(data, args.batch, args.ctx, gen, device) for _ in range(4)]
        ms = timer(_train_step(rec, batches, device.type == "cuda"), args.reps, device)
        n_w = rec.state_report()["ternary_weights"]
        label = f"{family}" + (f" ({backend} kernels)" if backend else "")
        rows.append({"model": label, "step_ms": ms, "tokens_per_s": args.batch * args.ctx / ms * 1e3,
                     "ternary_weights": n_w})
        print(f"  {label}: {ms:.2f} ms/step, {args.batch * args.ctx / ms * 1e3:,.0f} tok/s, {n_w:,} ternary weights",
              flush=True)
        del rec
    results["model"] = rows


def markdown(results) -> str:
    a, env = results["args"], results["env"]
    out = [f"MORPH kernels on {env.get('gpu', env['device'])} (torch {env['torch']}, triton {env['triton']}); "
           f"batch {a['batch']} x ctx {a['ctx']}, d_model {a['d_model']}, floor at {a['hbm_gbps']} GB/s", "",
           "| kernel | naive fwd us | triton fwd us | floor fwd us | naive fwd+bwd us | triton fwd+bwd us | "
           "floor fwd+bwd us | triton/floor (fwd+bwd) | max abs err |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results.get("kernels", []):
        us = {k: v * 1e3 for k, v in r.items() if k.endswith("_ms")}
        cells = [r["kernel"]] + [f"{us[k]:.1f}" for k in ("naive_fwd_ms", "triton_fwd_ms", "floor_fwd_ms",
                                                        "naive_fwd_bwd_ms", "triton_fwd_bwd_ms", "floor_fwd_bwd_ms")]
        cells += [f"{r['triton_fwd_bwd_ms'] / r['floor_fwd_bwd_ms']:.1f}x", f"{r['max_abs_err']:.1e}"]
        out.append("| " + " | ".join(cells) + " |")
    if results.get("components"):
        out += ["", "| MORPH stage (ternarised, fwd+bwd with votes) | ms |", "| --- | ---: |"]
        out += [f"| {r['stage']} | {r['fwd_bwd_ms']:.3f} |" for r in results["components"]]
    if results.get("model"):
        out += ["", "| model (TrueTernary training step) | ms/step | tokens/s | ternary weights |",
                "| --- | ---: | ---: | ---: |"]
        out += [f"| {r['model']} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | {r['ternary_weights']:,} |"
                for r in results["model"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-codes", type=int, default=256)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--graph-heads", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--hbm-gbps", type=float, default=3000.0, help="memory bandwidth of the floor (H100: ~3000)")
    p.add_argument("--tol", type=float, default=5e-2, help="max abs error allowed vs naive (bf16 inputs on GPU)")
    p.add_argument("--update-backend", default=DEFAULT_UPDATE_BACKEND.value)
    p.add_argument("--skip", default="", help="comma list of sections to skip: " + ",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a CPU smoke test")
    add_out_arg(p)
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        p.error(f"unknown --skip {', '.join(sorted(skip - set(SECTIONS)))} (choose from {', '.join(SECTIONS)})")
    if args.quick:
        args.batch, args.ctx, args.d_model, args.n_layers, args.n_heads = 2, 16, 32, 1, 2
        args.n_codes, args.window, args.graph_heads, args.reps, args.group_size = 8, 3, 2, 2, 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("no CUDA device: set TRITON_INTERPRET=1 (and --quick) to smoke-test on CPU")
    out = out_dir(p, args.out)
    bench = Bench("morph_kernels", out, float("inf"), device)
    bench.res["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    for name, fn in (("kernels", bench_kernels), ("components", bench_components), ("model", bench_model)):
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        with bench.section(name) as go:
            if go:
                fn(args, device, bench.res)
    md = markdown(bench.res)
    (out / "morph_kernels.md").write_text(md)
    print()
    print(md)
    for e in bench.res["errors"]:
        print(f"ERROR {e['section']}: {e['error'][:300]}", file=sys.stderr)
    return 1 if bench.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
