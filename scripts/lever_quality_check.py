#!/usr/bin/env python3
"""Do the levers that would make a TrueTernary step cheaper keep learning? Validation bits-per-byte, side by side.

    python3 scripts/lever_quality_check.py              # CPU, the README job, fp8; writes $OUT/lever_quality.json
    python3 scripts/lever_quality_check.py --levers fp8,vote_tokens=0.5 --steps 300 --seeds 0,1,2 [-- train flags]

Each seed trains `trueternary train` once as it is ("plain") and once per lever, same flags, and reports the final
validation bits-per-byte on held-out text. The levers are emulated (same arithmetic on any device; speed is not
measured here, see docs/performance.md):

    fp8             every TernaryLinear's input rounded to e4m3 per token in forward (``quantize_rows_fp8``, the
                    fp8 kernel's own quantisation) and the gradient arriving at its output rounded the same way in
                    backward. Ternary weights are exact in e4m3 (up to 2**9 between a row's scales). Stricter than
                    the fp8 kernels: there the votes see the unrounded ``x`` and ``gy`` (only the products are
                    fp8); here they see the rounded ones.
    vote_tokens=F   a learning-rule change: every TernaryLinear's votes come from the first ceil(F * M) of the
                    step's M tokens (the weight gradient ``gy.T @ x`` over fewer rows: F times its FLOPs); the
                    forward and the input gradients still use every token.

Issue 5's 151M speed target needs fewer FLOPs than a tuned AdamW step runs (docs/performance.md): these are the two
ways to get them, and this measures what each costs in learning. Results are written after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from script_args import out_dir  # noqa: E402

from trueternary import cli  # noqa: E402
from trueternary.layers import TernaryLinear  # noqa: E402
from trueternary.ops.ternary_matmul import quantize_rows_fp8  # noqa: E402
from trueternary.optim import FlipOptimizer  # noqa: E402


def fp8_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to e4m3 per row (last dimension), back in t's dtype."""
    t2 = t.reshape(-1, t.shape[-1])
    q, a = quantize_rows_fp8(t2)
    return (q.float() * a[:, None]).to(t.dtype).view(t.shape)


class Fp8Input(torch.autograd.Function):
    """Forward: the input rounded to e4m3 per token. Backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x):
        return fp8_rows(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Fp8OutputGrad(torch.autograd.Function):
    """Forward: unchanged. Backward: the output gradient rounded to e4m3 per token."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return fp8_rows(g)


@contextlib.contextmanager
def fp8_emulation():
    original = TernaryLinear.forward

    def forward(self, x):
        return Fp8OutputGrad.apply(original(self, Fp8Input.apply(x)))

    TernaryLinear.forward = forward
    try:
        yield
    finally:
        TernaryLinear.forward = original


@contextlib.contextmanager
def vote_tokens(fraction: float):
    """Votes of every linear map from the first ``ceil(fraction * M)`` token rows of its ``gy`` and ``x``."""
    original = FlipOptimizer.cast_matmul_votes

    def cast_matmul_votes(self, weight, gy, x, T):
        m = math.ceil(fraction * gy.shape[0])
        return original(self, weight, gy[:m], x[:m], T)

    FlipOptimizer.cast_matmul_votes = cast_matmul_votes
    try:
        yield
    finally:
        FlipOptimizer.cast_matmul_votes = original


def parse_levers(text: str) -> dict:
    """``"fp8,vote_tokens=0.5"`` -> {name: context-manager factory}; ValueError on anything else."""
    levers = {}
    for name in (s.strip() for s in text.split(",")):
        if name == "fp8":
            levers[name] = fp8_emulation
        elif name.startswith("vote_tokens="):
            try:
                f = float(name.split("=", 1)[1])
            except ValueError:
                f = float("nan")
            if not 0 < f <= 1:
                raise ValueError(f"{name}: the fraction must be in (0, 1]")
            levers[name] = lambda f=f: vote_tokens(f)
        else:
            raise ValueError(f"unknown lever {name!r} (fp8, vote_tokens=F)")
    return levers


def final_val_bpb(out_dir: Path, run: str, seed: int, steps: int, extra: list[str]) -> float:
    argv = ["train", "--max_steps", str(steps), "--seed", str(seed), "--out_dir", str(out_dir), "--run_name", run,
            "--save_every", "0", "--device", "cpu", *extra]  # a later --device in extra wins
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"trueternary {' '.join(argv)} exited with {rc}")
    rows = [json.loads(line) for line in (out_dir / run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_bpb"] for r in rows if "val_bpb" in r][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- train flags]")
    p.add_argument("--levers", default="fp8", help="comma-separated: fp8, vote_tokens=F (default fp8)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300, the README job)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT or ./out)")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    try:
        levers = parse_levers(args.levers)
    except ValueError as e:
        p.error(f"--levers: {e}")
    if not seeds or args.steps < 1:
        p.error("need at least one seed and --steps >= 1")
    out = out_dir(p, args.out)
    names = ["plain", *levers]
    res = {"steps": args.steps, "seeds": seeds, "train_flags": extra, **{k: [] for k in names}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in names:
                with levers[name]() if name in levers else contextlib.nullcontext():
                    res[name].append(final_val_bpb(Path(tmp), f"{name}-{seed}".replace("=", "_"), seed, args.steps,
                                                   extra))
                res[f"{name}_mean"] = statistics.fmean(res[name])
                (out / "lever_quality.json").write_text(json.dumps(res, indent=1))
            print(f"seed {seed}: val " + ", ".join(f"{k} {res[k][-1]:.4f}" for k in names), flush=True)
    print(f"mean val bits/byte over {len(seeds)} seeds: " + ", ".join(f"{k} {res[k + '_mean']:.4f}" for k in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
