#!/usr/bin/env python3
"""Training-step benchmark of a Hugging Face transformers Llama: ternarised and trained by FlipOptimizer
(``trueternary.optim.TrainStep``) against the float model trained by AdamW, each in its fastest setting.

    python3 benchmarks/bench_hf.py            # on a CUDA machine, from the repo root (a few minutes, compiles)
    python3 benchmarks/bench_hf.py --smoke    # CPU: tiny model, eager and compiled steps (checks the script only)

The model: ``LlamaForCausalLM`` from a config (random weights): by default 6 layers, d 512, MLP 1408, 8 heads
(``--model D,L``: MLP 2.75 x D, heads of 64), byte vocabulary (256), context 256, untied embeddings; batch 16
(``--batch``), bf16 autocast on CUDA, float32 weights. Attention
is causal sdpa without a mask tensor (batches are unpadded; ``--attention sdpa`` keeps transformers' default,
which builds a mask inside a CUDA graph), the same for both optimisers.

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
                   compiled (float ops between ternary layers) | CUDA graph | compiled + CUDA graph.

No gradient clipping (TrueTernary has no float gradient to clip). The summary is the best variant of each and
the ratio of their step times (goal: TrueTernary <= 1.1x AdamW). Writes ``$OUT/bench_hf.json`` (``--out``); a
variant that fails is recorded in ``errors`` and the others still run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import (  # noqa: E402
    Bench,
    add_out_arg,
    describe_profile,
    out_dir,
    profile_kernels,
    smoke_or_cuda,
    step_ms,
    summary,
)

VARIANTS = ("eager", "compiled", "graph", "compiled+graph")
GOAL = 1.1  # TrueTernary's best step time at most this many times AdamW's best


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run with a tiny model (eager and compiled variants)")
    add_out_arg(p)
    p.add_argument("--budget", type=float, default=None, help="seconds (default 900 on CUDA); later variants are "
                   "skipped once it is spent")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: all; "
                   "--smoke: eager,compiled, since a CPU has no graphs)")
    p.add_argument("--model", default="512,6", metavar="D,L",
                   help="hidden size and layers of the Llama (MLP 2.75 x D, heads of 64; default 512,6: 19M weights)")
    p.add_argument("--parts", action="store_true",
                   help="also time each optimiser's step without its update (forward and backward only)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each variant without a graph: GPU time per kernel class and the top kernels")
    p.add_argument("--attention", choices=("causal", "sdpa"), default="causal",
                   help="causal: sdpa with is_causal and no mask tensor (default); sdpa: transformers' default")
    args = p.parse_args()
    if args.variants is None:
        args.variants = "eager,compiled" if args.smoke else ",".join(VARIANTS)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown --variants {bad[0]} (choose from {', '.join(VARIANTS)})")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    try:
        model = tuple(int(v) for v in args.model.split(","))
        if len(model) != 2 or model[0] < 64 or model[0] % 64 or model[1] < 1:
            raise ValueError
    except ValueError:
        p.error(f"--model takes D,L with D a multiple of 64 and L >= 1, got {args.model!r}")
    args.model = model
    args.out = out_dir(p, args.out)
    return args


ARGS = parse_args()
smoke_or_cuda(ARGS.smoke, "bench_hf")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import transformers  # noqa: E402
except ImportError:
    print("bench_hf: error: needs transformers (pip install transformers)", file=sys.stderr)
    sys.exit(2)

from trueternary import ternarize  # noqa: E402
from trueternary.layers import set_linear_kernel  # noqa: E402
from trueternary.optim import ADAMW_BETAS, FlipOptimizer, TrainStep  # noqa: E402
from trueternary.optim.train_step import capture_cuda_graph  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
AUTOCAST = torch.bfloat16 if DEV.type == "cuda" else None
D, L = ARGS.model
MODEL = dict(hidden_size=D, intermediate_size=D * 11 // 4, num_hidden_layers=L, num_attention_heads=D // 64,
             num_key_value_heads=D // 64, ctx=256)
WARMUP, REPEATS = 5, 20
if ARGS.smoke:
    MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, ctx=16)
    WARMUP, REPEATS = 1, 2
    torch.set_num_threads(1)  # (tiny tensors: OpenMP hand-offs would dominate a busy CPU)
# the smoke run traces with dynamo but leaves code generation out (Inductor on a busy CPU takes minutes)
COMPILE = {"backend": "eager"} if ARGS.smoke else {}
ATTENTION = "trueternary_causal" if ARGS.attention == "causal" else "sdpa"
B = Bench("bench_hf", ARGS.out, ARGS.budget if ARGS.budget is not None else (1e9 if ARGS.smoke else 900.0), DEV)


def register_causal_attention() -> None:
    """``attn_implementation="trueternary_causal"``: sdpa with ``is_causal`` and no mask tensor (flash / cuDNN
    kernels), for batches without padding. (transformers' own sdpa path builds a mask tensor whenever it cannot
    inspect the positions on the host, as inside a CUDA graph.)"""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("trueternary_causal", attention)
    AttentionMaskInterface.register("trueternary_causal", lambda *args, **kwargs: None)


def base_model() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
        num_hidden_layers=MODEL["num_hidden_layers"], num_attention_heads=MODEL["num_attention_heads"],
        num_key_value_heads=MODEL["num_key_value_heads"], max_position_embeddings=MODEL["ctx"],
        tie_word_embeddings=False, use_cache=False, attn_implementation=ATTENTION)
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(cfg)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    seq = torch.randint(0, 256, (ARGS.batch, MODEL["ctx"] + 1), generator=g).to(DEV)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def lm_loss(model, xy) -> torch.Tensor:
    """Next-byte cross-entropy (the loss both optimisers train on)."""
    x, y = xy
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def autocast():
    # (the autocast weight-cast cache must be off inside CUDA graphs)
    return torch.autocast(DEV.type, dtype=AUTOCAST or torch.bfloat16, enabled=AUTOCAST is not None,
                          cache_enabled=False)


# ------------------------------------------------------------------------------------------------ the variants


def adamw_step(base, variant: str, xy, update: bool = True):
    """(step function, facts) of AdamW on a float copy of ``base`` in ``variant``; ``update=False``: forward and
    backward only (the gradients form, AdamW does not step)."""
    model = copy.deepcopy(base).to(DEV)
    graph = "graph" in variant and DEV.type == "cuda"
    cuda = DEV.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=ADAMW_BETAS, weight_decay=0.1, fused=cuda,
                            capturable=graph)
    loss_fn = torch.compile(lm_loss, **COMPILE) if "compiled" in variant else lm_loss
    out: list[torch.Tensor] = []

    def step():
        with autocast():
            loss = loss_fn(model, xy)
        loss.backward()
        if update:
            opt.step()
        if not graph:
            opt.zero_grad(set_to_none=True)
        out[:] = [loss.detach()]

    if not graph:
        return step, {"graphed": False}

    def warm_up():
        for _ in range(3):
            step()
        # backward in the capture then creates every .grad in the graph's pool: each replay's fresh gradient
        opt.zero_grad(set_to_none=True)

    replay = capture_cuda_graph(step, warm_up=warm_up).replay
    return replay, {"graphed": True}


def ternary_step(base, variant: str, xy, update: bool = True):
    """(step function, facts) of FlipOptimizer on a ternarised copy of ``base`` in ``variant``: a TrainStep;
    ``update=False``: the ``none`` backend (forward and input gradients only: no votes, no flips)."""
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the warning lists the frozen norm gains)
        ternarize(model, device=DEV)
    model.to(DEV)
    if DEV.type == "cuda":
        set_linear_kernel(model, "triton")
    backend = ("gpu" if DEV.type == "cuda" else "dense-fallback") if update else "none"
    opt = FlipOptimizer(model, backend=backend, seed=0)
    compile_args = (COMPILE or True) if "compiled" in variant else False
    step = TrainStep(model, opt, lm_loss, xy, cuda_graph="graph" in variant and DEV.type == "cuda",
                     compile=compile_args, autocast=AUTOCAST)
    return (lambda: step(xy)), {"graphed": step.graphed, "eager_reason": step.eager_reason}


BUILDERS = {"AdamW": adamw_step, "TrueTernary": ternary_step}
NO_UPDATE = " (no update)"  # --parts: an optimiser's rows without its update, e.g. "AdamW (no update)"


def run_variant(base, optimizer: str, variant: str) -> dict:
    xy = batch()
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    name, update = (optimizer[:-len(NO_UPDATE)], False) if optimizer.endswith(NO_UPDATE) else (optimizer, True)
    step, facts = BUILDERS[name](base, variant, xy, update)
    ms = step_ms(step, warmup=WARMUP, repeats=REPEATS, device=DEV)
    row = {"optimizer": optimizer, "variant": variant, **facts, **summary(ms, ARGS.batch * MODEL["ctx"]),
           "peak_bytes": int(torch.cuda.max_memory_allocated()) if DEV.type == "cuda" else None}
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
             f"{transformers.__version__}  d {MODEL['hidden_size']} x {MODEL['num_hidden_layers']} layers  "
             f"batch {ARGS.batch} x {MODEL['ctx']}  ({B.elapsed():.0f}s)",
             f"{'optimizer':24} {'variant':15} {'ms/step':>9} {'tokens/s':>12} {'peak MiB':>9}"]
    for row in r.get("steps", []):
        pk = f"{row['peak_bytes'] / 2**20:.0f}" if row.get("peak_bytes") else "-"
        lines.append(f"{row['optimizer']:24} {row['variant']:15} {row['median_ms']:9.2f} {row['tokens_per_s']:12,.0f} "
                     f"{pk:>9}")
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
    B.res["env"].update(smoke=ARGS.smoke, model=MODEL, batch=ARGS.batch, attention=ARGS.attention,
                        autocast=str(AUTOCAST), transformers=transformers.__version__, compile=COMPILE,
                        warmup=WARMUP, repeats=REPEATS)
    base = base_model()
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
