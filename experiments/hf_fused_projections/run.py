#!/usr/bin/env python3
"""What fusing the projections that share an input (q, k, v into one matrix; gate, up into one) would buy a
Hugging Face Llama's TrueTernary step, against AdamW on the same models: benchmarks/bench_hf.py's model and steps.

    python3 experiments/hf_fused_projections/run.py           # CUDA; writes $OUT/hf_fused_projections.json
    python3 experiments/hf_fused_projections/run.py --smoke   # CPU: tiny model, eager and compiled (a script check)

``fuse_projections`` stacks the weights and leaves transformers' forward code as it is: the parts standing where
q_proj ... were share one module that computes the fused product once per input and hands out its pieces.
Before timing: the fused float model's logits equal the stock model's, ternarising the fused matrix gives the
stacked stock matrices' trits and scales, and the ternarised fused model trains with a finite loss. The
answer and the measured numbers: README.md beside this file.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

from harness import Bench, add_out_arg, out_dir, smoke_or_cuda, step_ms, summary  # noqa: E402

VARIANTS = ("eager", "compiled", "graph", "compiled+graph")
CONFIGS = (("AdamW", "stock"), ("AdamW", "fused"), ("TrueTernary", "stock"), ("TrueTernary", "fused"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run with a tiny model (eager and compiled variants)")
    add_out_arg(p)
    p.add_argument("--budget", type=float, default=None, help="seconds (default 900 on CUDA)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default "
                   "graph,compiled+graph; --smoke: eager,compiled)")
    p.add_argument("--model", default="512,6", metavar="D,L", help="hidden size and layers (default 512,6)")
    args = p.parse_args()
    args.variants = [v.strip() for v in (args.variants or ("eager,compiled" if args.smoke else
                                                           "graph,compiled+graph")).split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown --variants {bad[0]} (choose from {', '.join(VARIANTS)})")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    try:
        args.model = tuple(int(v) for v in args.model.split(","))
        if len(args.model) != 2 or args.model[0] < 64 or args.model[0] % 64 or args.model[1] < 1:
            raise ValueError
    except ValueError:
        p.error(f"--model takes D,L with D a multiple of 64 and L >= 1, got {args.model!r}")
    args.out = out_dir(p, args.out)
    return args


ARGS = parse_args()
smoke_or_cuda(ARGS.smoke, "hf_fused_projections")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

try:
    import transformers  # noqa: E402
except ImportError:
    print("hf_fused_projections: error: needs transformers (pip install transformers)", file=sys.stderr)
    sys.exit(2)

from trueternary import ternarize  # noqa: E402
from trueternary.layers import set_linear_kernel  # noqa: E402
from trueternary.optim import ADAMW_BETAS, FlipOptimizer, TrainStep  # noqa: E402
from trueternary.optim.train_step import capture_cuda_graph  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
AUTOCAST = torch.bfloat16 if DEV.type == "cuda" else None
D, L = ARGS.model
MODEL = dict(hidden_size=D, intermediate_size=D * 11 // 4, num_hidden_layers=L, num_attention_heads=D // 64, ctx=256)
WARMUP, REPEATS = 5, 20
if ARGS.smoke:
    MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, ctx=16)
    WARMUP, REPEATS = 1, 2
    torch.set_num_threads(1)  # (tiny tensors: OpenMP hand-offs would dominate a busy CPU)
COMPILE = {"backend": "eager"} if ARGS.smoke else {}  # (as bench_hf: Inductor on a busy CPU takes minutes)
B = Bench("hf_fused_projections", ARGS.out, ARGS.budget if ARGS.budget is not None else
          (1e9 if ARGS.smoke else 900.0), DEV)


# ------------------------------------------------------------------------------------------------ the fusion


class FusedProjection(nn.Module):
    """One ``nn.Linear`` for several that read the same input: computed once per input, split into pieces. The
    split (not one product per part) makes autograd's SplitBackward join the pieces' gradients in one ``cat``."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        bias = linears[0].bias is not None
        self.linear = nn.Linear(linears[0].in_features, sum(self.sizes), bias=bias,
                                device=linears[0].weight.device, dtype=linears[0].weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([m.weight for m in linears]))
            if bias:
                self.linear.bias.copy_(torch.cat([m.bias for m in linears]))
        self._input, self._pieces, self._waiting = None, (), set()

    def piece(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input:  # (a strong reference, not id(x): a freed input's id can come back)
            self._input, self._pieces = x, self.linear(x).split(self.sizes, -1)
            self._waiting = set(range(len(self.sizes)))
        out = self._pieces[index]
        self._waiting.discard(index)
        if not self._waiting:  # every part has its piece: hold no activations (nor a deepcopy-hostile tensor)
            self._input, self._pieces = None, ()
        return out


class ProjectionPart(nn.Module):
    """Stands where one of the fused projections was (``q_proj`` ...): its piece of the fused product."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the fused Linear is in the tree once
        self.index = index

    @torch.compiler.disable  # (dynamo cannot trace the cache: a graph break, like the ternary layers')
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.piece(x, self.index)


FUSIONS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def fuse_projections(model: nn.Module) -> nn.Module:
    """In place, in every decoder layer: q/k/v_proj -> ``self_attn.qkv_proj``, gate/up_proj -> ``mlp.gate_up_proj``."""
    for layer in model.model.layers:
        for block, names, fused_name in FUSIONS:
            parent = getattr(layer, block)
            fused = FusedProjection([getattr(parent, n) for n in names])
            setattr(parent, fused_name, fused)
            for i, n in enumerate(names):
                setattr(parent, n, ProjectionPart(fused, i))
    return model


# ------------------------------------------------------------------------------------------------ bench_hf's steps


def register_causal_attention() -> None:
    """bench_hf's ``trueternary_causal``: sdpa with ``is_causal`` and no mask tensor (batches are unpadded)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("trueternary_causal", lambda module, q, k, v, attention_mask, **kw:
                                sdpa_attention_forward(module, q, k, v, None, **kw))
    AttentionMaskInterface.register("trueternary_causal", lambda *args, **kwargs: None)


def base_model() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
        num_hidden_layers=MODEL["num_hidden_layers"], num_attention_heads=MODEL["num_attention_heads"],
        num_key_value_heads=MODEL["num_attention_heads"], max_position_embeddings=MODEL["ctx"],
        tie_word_embeddings=False, use_cache=False, attn_implementation="trueternary_causal")
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(cfg)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 256, (ARGS.batch, MODEL["ctx"] + 1), generator=torch.Generator().manual_seed(99)).to(DEV)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def lm_loss(model, xy) -> torch.Tensor:
    x, y = xy
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def adamw_step(base, variant: str, xy):
    model = copy.deepcopy(base).to(DEV)
    graph = "graph" in variant and DEV.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=ADAMW_BETAS, weight_decay=0.1,
                            fused=DEV.type == "cuda", capturable=graph)
    loss_fn = torch.compile(lm_loss, **COMPILE) if "compiled" in variant else lm_loss

    def step():
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=AUTOCAST is not None, cache_enabled=False):
            loss = loss_fn(model, xy)
        loss.backward()
        opt.step()
        if not graph:
            opt.zero_grad(set_to_none=True)

    def warm_up():
        for _ in range(3):
            step()
        opt.zero_grad(set_to_none=True)  # (each replay's gradients then live in the graph's pool)

    return capture_cuda_graph(step, warm_up=warm_up).replay if graph else step


def ternary_model(base) -> nn.Module:
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the warning lists the frozen norm gains)
        ternarize(model, device=DEV)
    model.to(DEV)
    if DEV.type == "cuda":
        set_linear_kernel(model, "triton")
    return model


def flip_train_step(model, variant: str, xy) -> TrainStep:
    opt = FlipOptimizer(model, backend="gpu" if DEV.type == "cuda" else "dense-fallback", seed=0)
    return TrainStep(model, opt, lm_loss, xy, cuda_graph="graph" in variant and DEV.type == "cuda",
                     compile=(COMPILE or True) if "compiled" in variant else False, autocast=AUTOCAST)


def ternary_step(base, variant: str, xy):
    step = flip_train_step(ternary_model(base), variant, xy)
    return lambda: step(xy)


# ------------------------------------------------------------------------------------------------ main


def check(stock, fused, xy) -> dict:
    """The fused model is the stock one: float logits (fp32), ternary weights; and its ternary copy trains: finite
    losses, votes in every part's rows."""
    with torch.no_grad():
        a, b = (copy.deepcopy(m).to(DEV)(input_ids=xy[0], use_cache=False).logits for m in (stock, fused))
        ts, tf = ternary_model(stock), ternary_model(fused)
        same_ternary = all(torch.equal(getattr(getattr(lf, block), fused_name).linear.weight.dense(),
                                       torch.cat([getattr(getattr(ls, block), n).weight.dense() for n in names]))
                           for ls, lf in zip(ts.model.layers, tf.model.layers) for block, names, fused_name in FUSIONS)
    trained = ternary_model(fused)
    step = flip_train_step(trained, "eager", xy)
    losses = [float(step(xy)) for _ in range(3)]
    # votes reached every part's rows of every fused matrix (each part's gradient went through the split)
    voted = all(bool(acc.any()) for layer in trained.model.layers for block, _, fused_name in FUSIONS
                for acc in getattr(getattr(layer, block), fused_name).linear.weight.T_accum.split(
                    getattr(getattr(layer, block), fused_name).sizes))
    out = {"logits_max_abs_diff": float((a - b).abs().max()),
           "logits_allclose": torch.allclose(a, b, rtol=1e-4, atol=1e-5),
           "ternary_weights_equal": same_ternary, "ternary_fused_losses": losses,
           "ternary_fused_finite": all(math.isfinite(v) for v in losses), "every_part_voted": voted}
    out["passed"] = out["logits_allclose"] and same_ternary and out["ternary_fused_finite"] and voted
    return out


def ratios(rows: list[dict]) -> dict:
    """TrueTernary / AdamW per variant: stock vs stock, fused vs fused, fused TrueTernary vs stock AdamW."""
    ms = {(r["variant"], r["optimizer"], r["model"]): r["median_ms"] for r in rows}
    out = {}
    for v in ARGS.variants:
        pairs = {"stock": ("stock", "stock"), "fused": ("fused", "fused"), "fused_vs_stock_adamw": ("fused", "stock")}
        out[v] = {k: ms[v, "TrueTernary", t] / ms[v, "AdamW", a] for k, (t, a) in pairs.items()
                  if (v, "TrueTernary", t) in ms and (v, "AdamW", a) in ms}
    return out


def print_table() -> None:
    env, c = B.res["env"], B.res.get("check", {})
    lines = [f"== hf_fused_projections: {env.get('gpu', env['device'])}  torch {env['torch']}  transformers "
             f"{transformers.__version__}  d {MODEL['hidden_size']} x {MODEL['num_hidden_layers']} layers  batch "
             f"{ARGS.batch} x {MODEL['ctx']}  ({B.elapsed():.0f}s)",
             f"check: {'passed' if c.get('passed') else 'FAILED'}  (logits max |diff| "
             f"{c.get('logits_max_abs_diff', float('nan')):.2e}, ternary weights equal "
             f"{c.get('ternary_weights_equal')})",
             f"{'variant':15} {'optimizer':12} {'model':6} {'ms/step':>9} {'tokens/s':>12}"]
    for r in B.res.get("steps", []):
        lines.append(f"{r['variant']:15} {r['optimizer']:12} {r['model']:6} {r['median_ms']:9.2f} "
                     f"{r['tokens_per_s']:12,.0f}")
    for v, q in B.res.get("ratios", {}).items():
        lines.append(f"TrueTernary/AdamW {v:15} " + "  ".join(f"{k} {x:.2f}x" for k, x in q.items()))
    lines += [f"ERROR {e['section']}: {e['error'][:200]}" for e in B.res["errors"]]
    print("\n".join(lines))


def main() -> int:
    register_causal_attention()
    B.res["env"].update(smoke=ARGS.smoke, model=MODEL, batch=ARGS.batch, autocast=str(AUTOCAST), compile=COMPILE,
                        transformers=transformers.__version__, warmup=WARMUP, repeats=REPEATS)
    stock = base_model()
    models = {"stock": stock, "fused": fuse_projections(copy.deepcopy(stock))}
    xy = batch()
    with B.section("check") as go:
        if go:
            B.res["check"] = check(stock, models["fused"], xy)
            if not B.res["check"]["passed"]:
                raise AssertionError(f"the fused model failed its check: {B.res['check']}")
    if B.res.get("check", {}).get("passed"):  # (timings of a different function would answer nothing)
        for variant in sorted(ARGS.variants, key=lambda v: "graph" in v):  # graphs last, as bench_hf
            for opt, which in CONFIGS:
                with B.section(f"{opt} {which} {variant}") as go:
                    if go:
                        # each config compiles afresh: transformers' forwards share one deprecate_kwarg wrapper,
                        # whose frames (compiled apart at graph breaks) would otherwise reach dynamo's recompile
                        # limit over the configs and run the later ones eager
                        torch._dynamo.reset()
                        step = {"AdamW": adamw_step, "TrueTernary": ternary_step}[opt](models[which], variant, xy)
                        ms = step_ms(step, warmup=WARMUP, repeats=REPEATS, device=DEV)
                        B.add("steps", {"optimizer": opt, "model": which, "variant": variant,
                                        **summary(ms, ARGS.batch * MODEL["ctx"])})
                        B.res["ratios"] = ratios(B.res["steps"])
    return B.finish(print_table)


if __name__ == "__main__":
    sys.exit(main())
