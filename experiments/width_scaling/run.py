#!/usr/bin/env python3
"""Does TrueTernary's vote scale need to shrink with width? Early-step loss of wide models, per lr multiplier.

    python3 experiments/width_scaling/run.py --widths 1024,4096 --layers 4 --batch 8 --ctx 256 --steps 40

For each width and each *variant* (how a linear layer's vote scale ``lr`` is multiplied, from its fan-in k and
the model width d) it trains the byte transformer (lazy build, bf16 autocast, eager steps, the recipe's
warm-up + cosine schedule over ``--horizon`` steps) on the embedded corpus and prints the training loss of every
step and the validation bits/byte at the end. Variants:

    none          x1 everywhere (the rule's lr as is)
    fanin_sqrt    x min(1, sqrt(ref / k)) for every linear layer (ref = --ref, embeddings x1)
    fanin_sqrtR   the same with ref = R (e.g. fanin_sqrt256)
    fanin_lin     x min(1, ref / k) (fanin_linR: with ref = R)
    zero_init     x1, T_accum starting at zero instead of the rounding residual
    V+zero        variant V with T_accum starting at zero
    Adam_FP32, BitNet_QAT, Adam_FP32xF, BitNet_QATxF: those recipes at their default lr (times F)
    width_sqrt    x min(1, sqrt(ref / d)) for every linear layer
    head_sqrt     x min(1, sqrt(ref / d)) for the output layer only

Writes $OUT/width_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from trueternary.data import RandomWindows, eval_windows, load_corpus  # noqa: E402
from trueternary.evaluate import validation_bpb  # noqa: E402
from trueternary.layers import TernaryEmbedding  # noqa: E402
from trueternary.models import build_model  # noqa: E402
from trueternary.optim import FlipOptimizer  # noqa: E402
from trueternary.recipes import Hparams, build_recipe  # noqa: E402
from trueternary.scaling import model_shape  # noqa: E402
from trueternary.weight import TernaryScaleTensor, ternary_weights  # noqa: E402


def multiplier(variant: str, name: str, w: TernaryScaleTensor, d: int, ref: int, is_head: bool) -> float:
    k = w.cols
    if variant == "none":
        return 1.0
    if variant.startswith("fanin_sqrt"):
        ref = int(variant[len("fanin_sqrt"):] or ref)
        return min(1.0, math.sqrt(ref / k))
    if variant.startswith("fanin_lin"):
        ref = int(variant[len("fanin_lin"):] or ref)
        return min(1.0, ref / k)
    if variant == "zero_init":
        return 1.0
    if variant == "width_sqrt":
        return min(1.0, math.sqrt(ref / d))
    if variant == "head_sqrt":
        return min(1.0, math.sqrt(ref / d)) if is_head else 1.0
    raise ValueError(variant)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="1024,4096")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--horizon", type=int, default=300)
    p.add_argument("--ref", type=int, default=1024)
    p.add_argument("--variants", default="none,fanin_sqrt,width_sqrt,head_sqrt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    corpus = load_corpus(None)
    train, val = corpus.train, corpus.val
    windows = eval_windows(val, args.ctx, 64)
    results = []
    for d in [int(s) for s in args.widths.split(",")]:
        for variant in args.variants.split(","):
            t0 = time.time()
            base = build_model("transformer", seed=0, lazy=True, ctx=args.ctx, **model_shape(d, args.layers))
            if variant.split("x")[0] in ("Adam_FP32", "BitNet_QAT"):
                name, _, f = variant.partition("x")
                hp = Hparams.for_run(args.horizon)
                hp.lr[name] = hp.lr_for(name) * float(f or 1)
                r = build_recipe(name, base, hp, device=dev, seed=0)
                groups = {}
                data = RandomWindows(train, args.batch, args.ctx, seed=0)
                losses, flips = [], []
                for _ in range(args.steps):
                    x, y = data.next(dev)
                    losses.append(round(float(r.train_step(x, y, dev.type == "cuda")), 4))
                finish(results, out, r, windows, dev, d, args, variant, groups, losses, flips, t0)
                continue
            zero = variant == "zero_init" or variant.endswith("+zero")
            hp = Hparams.for_run(args.horizon, rule={"accum_init": "zero"} if zero else None)
            r = build_recipe("TrueTernary", base, hp, device=dev, backend="auto", seed=0)
            groups: dict[float, list] = {}
            for name, m in r.model.named_modules():
                if isinstance(m, TernaryScaleTensor):
                    owner = name.rsplit(".", 1)[0]
                    emb = isinstance(r.model.get_submodule(owner), TernaryEmbedding) if "." in name else False
                    mult = 1.0 if emb else multiplier(variant.removesuffix("+zero"), name, m, d, args.ref,
                                                      owner == "head")
                    groups.setdefault(mult, []).append(m)
            lr = hp.lr_for("TrueTernary")
            flip = FlipOptimizer([{"params": mods, "lr": lr * mult} for mult, mods in groups.items()], rule=hp.rule,
                                 backend=r.flip.backend, seed=0)
            r.optimizers, r.flip = [flip], flip
            r.base_lrs = [[g["lr"] for g in flip.param_groups]]
            data = RandomWindows(train, args.batch, args.ctx, seed=0)
            losses, flips = [], []
            for _ in range(args.steps):
                x, y = data.next(dev)
                losses.append(round(float(r.train_step(x, y, dev.type == "cuda")), 4))
                flips.append(int(r.flip.last_flips))
            finish(results, out, r, windows, dev, d, args, variant, groups, losses, flips, t0)
    return 0


def finish(results, out, r, windows, dev, d, args, variant, groups, losses, flips, t0) -> None:
    bpb = validation_bpb(r.model, windows, dev, dev.type == "cuda")
    n = sum(p.numel() for p in r.model.parameters()) or sum(w.numel() for w in ternary_weights(r.model))
    row = {"d_model": d, "layers": args.layers, "variant": variant, "groups": {str(k): len(v) for k, v in
           groups.items()}, "losses": losses, "flip_frac": [f / n for f in flips], "val_bpb": bpb,
           "seconds": time.time() - t0}
    results.append(row)
    print(f"d={d} {variant:13} val {bpb:.3f} max loss {max(losses):.2f} last {losses[-1]:.2f} "
          f"losses {losses[:10]} flips% {[round(100 * f / n, 2) for f in flips[:6]]}", flush=True)
    (out / "width_scaling.json").write_text(json.dumps(results, indent=1))
    del r
    if dev.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
