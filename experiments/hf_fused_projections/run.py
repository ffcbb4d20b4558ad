#!/usr/bin/env python3
"""What fusing the projections that share an input (q, k, v into one matrix; gate, up into one) would buy a
Hugging Face Llama's TrueTernary step, against AdamW on the same models: bench_hf's model and steps
(benchmarks/hf_llama.py).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

from harness import Bench, smoke_or_cuda, step_ms, summary  # noqa: E402

CONFIGS = (("AdamW", "stock"), ("AdamW", "fused"), ("TrueTernary", "stock"), ("TrueTernary", "fused"))


def parse_args():
    from hf_llama import add_args, finish_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p, variants="graph,compiled+graph")
    return finish_args(p, p.parse_args())


ARGS = parse_args()
smoke_or_cuda(ARGS.smoke, "hf_fused_projections")

from hf_llama import require_transformers  # noqa: E402

require_transformers("hf_fused_projections")

import torch  # noqa: E402
import transformers  # noqa: E402
from hf_llama import BUILDERS, Setup, base_model, batch, flip_train_step, register_causal_attention  # noqa: E402
from hf_llama import ternary_model as _ternary_model  # noqa: E402
from torch import nn  # noqa: E402

S = Setup(ARGS.smoke, *ARGS.model, batch=ARGS.batch)
DEV = S.device
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


def ternary_model(base) -> nn.Module:
    return _ternary_model(S, base)


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
    step = flip_train_step(S, trained, "eager", xy)
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
             f"{transformers.__version__}  d {S.model['hidden_size']} x {S.model['num_hidden_layers']} layers  batch "
             f"{ARGS.batch} x {S.model['ctx']}  ({B.elapsed():.0f}s)",
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
    B.res["env"].update(S.env())
    stock = base_model(S)
    models = {"stock": stock, "fused": fuse_projections(copy.deepcopy(stock))}
    xy = batch(S)
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
                        step, _ = BUILDERS[opt](S, models[which], variant, xy)  # (each compiles afresh)
                        warmup, repeats = S.warmup_repeats
                        ms = step_ms(step, warmup=warmup, repeats=repeats, device=DEV)
                        B.add("steps", {"optimizer": opt, "model": which, "variant": variant,
                                        **summary(ms, S.tokens)})
                        B.res["ratios"] = ratios(B.res["steps"])
    return B.finish(print_table)


if __name__ == "__main__":
    sys.exit(main())
