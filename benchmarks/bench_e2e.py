#!/usr/bin/env python3
"""End-to-end training-step benchmark of the byte transformer: Adam_FP32 vs BitNet_QAT vs TrueTernary (each
update backend), same model and batch, in one run.

    python3 benchmarks/bench_e2e.py            # on a CUDA machine, from the repo root (~5 min on an H200)
    python3 benchmarks/bench_e2e.py --smoke    # CPU: tiny model, Triton interpreter (checks the script only)

Sections (each recorded in the JSON ``errors`` if it fails; the rest still runs):

1. eager steps, ``recipes.build_recipe`` + ``Recipe.train_step`` (bf16 autocast on CUDA, the recipe's lr
   schedule) for Adam_FP32, BitNet_QAT and TrueTernary with backends dense-fallback / gpu / gpu-signcache, and
   TrueTernary[norm_beta=0] (the history-less normaliser, to show what the moving averages cost), at
   (a) the 151M model (d=1024, 12 layers, ctx 512, batch 32) and (b) the seed setting (d=512, 4 layers,
   ctx 33, batch 4): median ms/step after burn-in (host time per step, synchronised), tokens/s, peak
   allocator memory (``torch.cuda.max_memory_allocated``, reset after each config's model is built, so it
   counts weights, training state, activations and transients of the steps), training-state bytes per weight;
2. CUDA graphs at each setting, each config's whole step (forward, backward, optimiser) in one graph:
   Adam_FP32 with ``AdamW(capturable=True)``, and TrueTernary ``gpu`` with the default rule through
   ``Recipe.use_cuda_graph`` (what ``trueternary train`` runs on a GPU), with its allocator readings at each
   stage (``memory_timeline_bytes``).

``--profile`` adds torch.profiler GPU time per kernel class for Adam_FP32 and TrueTernary ``gpu`` at each
setting; ``--compile`` runs every config's shared ops (norms, attention, activations, casts) compiled by
``torch.compile`` (``ByteTransformer.use_compiled_ops``; the linear layers, float or ternary, stay eager).

Writes ``$OUT/bench_e2e.json`` (``OUT`` defaults to ./out) and prints a compact table last. The CUDA context
(outside the allocator, not in the peaks) is reported separately. The correctness checks of these steps
(graph replays against eager steps, gpu against dense-fallback) are GPU tests: ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import (  # noqa: E402
    Bench,
    add_out_arg,
    cleanup,
    describe_profile,
    out_dir,
    profile_kernels,
    smoke_or_cuda,
    speedup,
    step_ms,
    summary,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run (Triton interpreter) with a tiny model")
    add_out_arg(p)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds (default 270 on CUDA); sections still to run are skipped once exceeded")
    p.add_argument("--settings", default="seed,151M", help="comma-separated: seed, 151M")
    p.add_argument("--profile", action="store_true",
                   help="also profile Adam_FP32 and TrueTernary[gpu] at each setting: GPU time per kernel class")
    p.add_argument("--compile", action="store_true",
                   help="every config's model runs its shared ops (norms, attention, activations) torch.compile'd "
                        "(ByteTransformer.use_compiled_ops; the linear layers stay eager)")
    args = p.parse_args()
    bad = [s for s in args.settings.split(",") if s.strip() and s.strip() not in ("seed", "151M")]
    if bad:
        p.error(f"unknown setting {bad[0]!r} (choose from seed, 151M)")
    args.out = out_dir(p, args.out)
    return args


ARGS = parse_args()
smoke_or_cuda(ARGS.smoke, "bench_e2e")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trueternary.backends import UpdateBackend  # noqa: E402
from trueternary.layers import set_linear_kernel  # noqa: E402
from trueternary.models.transformer import ByteTransformer, TransformerConfig  # noqa: E402
from trueternary.optim.train_step import capture_cuda_graph  # noqa: E402
from trueternary.recipes import Hparams, build_recipe  # noqa: E402
from trueternary.rule import FlipRule  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
AUTOCAST = DEV.type == "cuda"
# name: (model config, batch, burn-in steps, timed steps)
SETTINGS = {
    "151M": (dict(d_model=1024, n_layers=12, ctx=512), 32, 3, 8),
    "seed": (dict(d_model=512, n_layers=4, ctx=33), 4, 10, 40),
}
if ARGS.smoke:  # one step, no burn-in: an interpreted step of the gpu backends costs seconds, nothing to warm
    SETTINGS = {"151M": (dict(d_model=32, n_layers=1, ctx=12, n_heads=2), 2, 0, 1),
                "seed": (dict(d_model=16, n_layers=1, ctx=9, n_heads=2), 2, 0, 1)}
# TrueTernary runs the default rule (its moving averages of the vote normaliser's statistics, norm_beta, fused
# in the vote kernels); HISTORYLESS_TT, the rule without them, is timed beside it to show what they cost.
HISTORYLESS_TT = "TrueTernary[norm_beta=0]"
CONFIGS = [("Adam_FP32", None), ("BitNet_QAT", None), ("TrueTernary", "dense-fallback"), ("TrueTernary", "gpu"),
           ("TrueTernary", "gpu-signcache"), (HISTORYLESS_TT, "gpu")]

B = Bench("bench_e2e", ARGS.out, ARGS.budget if ARGS.budget is not None else (1e9 if ARGS.smoke else 270.0), DEV)


# ------------------------------------------------------------------------------------------------ helpers


def reset_peak():
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if DEV.type == "cuda" else None


def allocated_bytes() -> int | None:
    return int(torch.cuda.memory_allocated()) if DEV.type == "cuda" else None


def model_config(setting: str) -> TransformerConfig:
    return TransformerConfig(**SETTINGS[setting][0])


@functools.lru_cache(maxsize=2)
def base_model(setting: str) -> ByteTransformer:
    """The same float model (CPU) for every config of a setting; build_recipe copies it to the device."""
    model = ByteTransformer(model_config(setting), generator=torch.Generator().manual_seed(1234))
    return model.use_compiled_ops(ARGS.compile)


def batch(setting: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, B_, _, _ = SETTINGS[setting]
    g = torch.Generator().manual_seed(99)
    seq = torch.randint(0, 256, (B_, cfg["ctx"] + 1), generator=g).to(DEV)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def tokens(setting: str) -> int:
    cfg, B_, _, _ = SETTINGS[setting]
    return B_ * cfg["ctx"]


def hparams() -> Hparams:
    return Hparams(steps=1000)  # the lr schedule's horizon: warm-up then cosine, as in training


def make_recipe(setting: str, name: str, backend: str | None):
    """``build_recipe`` on the device. On CPU (--smoke) the gpu backends are refused by the constructor (they
    need CUDA), so the optimiser is built dense and switched, and the linear layers set to the kernels that go
    with it: the kernels then run in Triton's interpreter.
    ``TrueTernary[norm_beta=0]``: the rule with history-less normalisation."""
    gpu_on_cpu = DEV.type == "cpu" and backend is not None and UpdateBackend(backend).runs_kernels
    hp = hparams()
    if name == HISTORYLESS_TT:
        name, hp.rule = "TrueTernary", FlipRule.for_run(hp.steps, norm_beta=0.0)
    r = build_recipe(name, base_model(setting), hp, device=DEV,
                     backend="dense-fallback" if gpu_on_cpu or backend is None else backend, seed=0)
    if gpu_on_cpu:
        r.flip.backend = backend
        set_linear_kernel(r.model, r.flip.backend.linear_kernel)
    return r


def label(name: str, backend: str | None) -> str:
    return name if backend is None else f"{name}[{backend}]"


def context_bytes() -> dict:
    """CUDA context and other non-allocator device memory: used (driver view) minus the allocator's reserve."""
    if DEV.type != "cuda":
        return {}
    torch.zeros(1, device=DEV)
    free, total = torch.cuda.mem_get_info()
    return {"device_used_bytes": total - free, "allocator_reserved_bytes": torch.cuda.memory_reserved(),
            "context_and_other_bytes": total - free - torch.cuda.memory_reserved()}


# ------------------------------------------------------------------------------------------------ 1. eager


def run_eager(setting: str, name: str, backend: str | None) -> dict:
    _, _, warm, n = SETTINGS[setting]
    x, y = batch(setting)
    r = make_recipe(setting, name, backend)
    static_bytes = allocated_bytes()
    reset_peak()
    losses = []

    def step():
        losses.append(float(r.train_step(x, y, AUTOCAST)))  # float(): the loss is read, as a training loop does

    row = {"setting": setting, "config": label(name, backend),
           **summary(step_ms(step, warmup=warm, repeats=n, device=DEV), tokens(setting))}
    rep = r.state_report()
    row.update(peak_bytes=peak_bytes(), static_bytes=static_bytes,
               state_bytes_per_weight=rep["training_state_bytes_per_weight"],
               training_state_bytes=rep["training_state_bytes"], first_loss=losses[0], last_loss=losses[-1],
               steps=len(losses))
    if r.flip is not None:
        row["vote_cache_bytes"] = sum(c.nbytes for _, c in getattr(r.flip._votes, "caches", {}).values())
    B.add("eager", row)
    print(f"  {setting:5} {row['config']:30} {row['median_ms']:9.2f} ms/step  {row['tokens_per_s']:12,.0f} tok/s  "
          f"peak {row['peak_bytes'] or 0:,} B", file=sys.stderr)
    return row


def profile_step(setting: str, name: str, backend: str | None, steps: int = 2) -> dict:
    """GPU time per step by kernel class (harness.profile_kernels, after burn-in): where a step's time goes."""
    _, _, warm, _ = SETTINGS[setting]
    x, y = batch(setting)
    r = make_recipe(setting, name, backend)
    for _ in range(warm):
        float(r.train_step(x, y, AUTOCAST))
    prof = profile_kernels(lambda: float(r.train_step(x, y, AUTOCAST)), steps=steps, device=DEV)
    row = B.add("profiles", {"setting": setting, "config": label(name, backend), **prof})
    print(f"  profile {setting} {row['config']}: " + describe_profile(prof), file=sys.stderr)
    return row


# ------------------------------------------------------------------------------------------------ 2. graphs


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def autocast():
    # the autocast weight-cast cache must be off inside CUDA graphs (torch.cuda.graphs docs)
    return torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=AUTOCAST, cache_enabled=False)


def capture(fn, warm_on_side_stream: int = 3):
    """``fn``'s replay: a CUDA graph of ``fn()`` after warm-up calls (recipes.capture_cuda_graph); on CPU
    (--smoke) ``fn`` itself, run eagerly."""
    if DEV.type != "cuda":
        return fn
    return capture_cuda_graph(fn, warm_up=lambda: [fn() for _ in range(warm_on_side_stream)]).replay


def graph_adam(setting: str) -> dict:
    """Adam_FP32's whole step (forward, backward, grad clip, AdamW(capturable=True)) in one CUDA graph."""
    _, _, warm, n = SETTINGS[setting]
    x, y = batch(setting)
    hp = hparams()
    model = copy.deepcopy(base_model(setting)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr_for("Adam_FP32"), betas=(0.9, 0.95),
                            weight_decay=hp.weight_decay, capturable=DEV.type == "cuda")
    cleanup(DEV)
    start = allocated_bytes()
    reset_peak()
    params = list(model.parameters())

    def step():
        opt.zero_grad(set_to_none=False)  # captured as zero_(): each replay starts from zero gradients
        with autocast():
            logits = model(x)
        loss_of(logits, y).backward()
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        opt.step()

    replay = capture(step)
    row = {"setting": setting, "config": "Adam_FP32 [CUDA graph]",
           **summary(step_ms(replay, warmup=warm, repeats=n, device=DEV), tokens(setting))}
    row.update(peak_bytes=peak_bytes(), memory_timeline_bytes={"after the model and optimiser are built": start})
    return row


def graph_ternary(setting: str) -> dict:
    """TrueTernary ``gpu``'s whole step in one CUDA graph (Recipe.use_cuda_graph), with the allocator's readings
    at each stage."""
    _, _, warm, n = SETTINGS[setting]
    cleanup(DEV)
    mem = {"section start (earlier sections' leftovers, cuBLAS workspaces)": allocated_bytes()}
    x, y = batch(setting)
    r = make_recipe(setting, "TrueTernary", "gpu")
    mem["before capture"] = allocated_bytes()
    if DEV.type == "cuda":  # Recipe.use_cuda_graph: what `trueternary train` runs on a GPU
        r.use_cuda_graph(x, y, AUTOCAST)
    mem["after capture"] = allocated_bytes()
    cleanup(DEV)
    reset_peak()  # from here: the graphed model alone (its graph pool included)
    mem["at peak reset"] = allocated_bytes()

    def step():
        r.train_step(x, y, AUTOCAST)

    ms = step_ms(step, warmup=warm, repeats=n, device=DEV)
    mem["peak over the burn-in and timed steps"] = peak_bytes()
    return {"setting": setting, "config": "TrueTernary[gpu] [CUDA graph]", **summary(ms, tokens(setting)),
            "peak_bytes": peak_bytes(), "memory_timeline_bytes": mem}


# ------------------------------------------------------------------------------------------------ main


def print_table():
    r = B.res
    env = r["env"]
    lines = [f"== bench_e2e: {env.get('gpu', env['device'])}  torch {env['torch']}  ({B.elapsed():.0f}s)"
             + ("  shared ops torch.compile'd" if ARGS.compile else "  eager model")]
    if env.get("context"):
        lines.append(f"CUDA context + non-allocator memory: {env['context']['context_and_other_bytes'] / 2**20:.0f} MiB"
                     " (not in the peaks below)")
    rows = r.get("eager", []) + r.get("graphs", [])
    base = {row["setting"]: row for row in rows if row["config"] == "Adam_FP32"}
    lines.append(f"{'setting':7} {'config':46} {'ms/step':>9} {'tokens/s':>11} {'x Adam':>7} {'peak MiB':>9} "
                 f"{'state B/w':>9}")
    for row in rows:
        a = base.get(row["setting"])
        sp = f"{speedup(a['median_ms'], row['median_ms']):.2f}" if a else "-"
        pk = f"{row['peak_bytes'] / 2**20:.1f}" if row.get("peak_bytes") else "-"
        st = f"{row['state_bytes_per_weight']:.2f}" if row.get("state_bytes_per_weight") is not None else "-"
        lines.append(f"{row['setting']:7} {row['config'][:46]:46} {row['median_ms']:9.2f} {row['tokens_per_s']:11,.0f} "
                     f"{sp:>7} {pk:>9} {st:>9}")
    for s in sorted({row["setting"] for row in r.get("graphs", [])}):
        g = {row["config"]: row for row in rows if row["setting"] == s}
        tt = g.get("TrueTernary[gpu] [CUDA graph]")
        if tt and "Adam_FP32" in g:
            ag = g.get("Adam_FP32 [CUDA graph]")
            vs_graph = f", {speedup(ag['median_ms'], tt['median_ms']):.2f}x Adam_FP32 graphed" if ag else ""
            lines.append(f"{s}: graphed TrueTernary[gpu] steps/s = "
                         f"{speedup(g['Adam_FP32']['median_ms'], tt['median_ms']):.2f}x Adam_FP32 eager{vs_graph}")
    for e in r["errors"]:
        lines.append(f"ERROR {e['section']}: {e['error'][:200]}")
    print("\n".join(lines))


def main() -> int:
    B.res["env"].update(smoke=ARGS.smoke, settings=SETTINGS, autocast_bf16=AUTOCAST, compiled_ops=ARGS.compile,
                        context=context_bytes())
    settings = [s.strip() for s in ARGS.settings.split(",") if s.strip()]
    for s in sorted(settings, key=lambda s: s != "seed"):  # the seed setting first (fast), then 151M
        for name, backend in CONFIGS:
            with B.section(f"eager {s} {label(name, backend)}") as go:
                if go:
                    run_eager(s, name, backend)
        if ARGS.profile:
            for name, backend in (("Adam_FP32", None), ("TrueTernary", "gpu")):
                with B.section(f"profile {s} {label(name, backend)}") as go:
                    if go:
                        profile_step(s, name, backend, steps=1 if ARGS.smoke else 2)
        # TrueTernary's graph first: memory the Adam graph section leaves allocated (measured: ~134 MB that
        # outlive the section and a gc.collect, not traced) would otherwise count in TrueTernary's peak
        B.save()  # a failed capture can leave the device unusable: keep everything measured so far
        with B.section(f"graph {s} TrueTernary[gpu]") as go:
            if go:
                B.add("graphs", graph_ternary(s))
        with B.section(f"graph {s} Adam_FP32") as go:
            if go:
                B.add("graphs", graph_adam(s))
    return B.finish(print_table)


if __name__ == "__main__":
    sys.exit(main())
