#!/usr/bin/env python3
"""Does fp8 (e4m3, per-token scales) for the ternary layers' forward and backward-input products keep learning?

    python3 scripts/fp8_emulation_check.py                  # CPU, about 4 minutes; writes $OUT/fp8_emulation.json
    python3 scripts/fp8_emulation_check.py --steps 300 --seeds 0,1,2 [-- further `trueternary train` flags]

Issue 5 allows fp8 for those two products "where it keeps accuracy", and the 151M speed target leans on it
(docs/performance.md). Ternary weights are exact in e4m3 (up to 2**9 between a row's scales); the activations
and the output gradients are not. This trains the README's default job (`trueternary train`) once as it is
and once with every TernaryLinear's input rounded to e4m3 per token in forward (``quantize_rows_fp8``, the fp8
kernel's own quantisation) and the gradient arriving at its output rounded the same way in backward, per seed,
and reports validation bits-per-byte. The emulation is stricter than the fp8 kernels: there the votes see the
unrounded ``x`` and ``gy`` (only the products are fp8); here they see the rounded ones. Speed is not measured
(this runs the plain-PyTorch path on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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


def final_val_bpb(out_dir: Path, run: str, seed: int, steps: int, extra: list[str]) -> float:
    argv = ["train", "--max_steps", str(steps), "--seed", str(seed), "--out_dir", str(out_dir), "--run_name", run,
            "--save_every", "0", "--device", "cpu", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"trueternary {' '.join(argv)} exited with {rc}")
    rows = [json.loads(line) for line in (out_dir / run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_bpb"] for r in rows if "val_bpb" in r][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- train flags]")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300, the README job)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT or ./out)")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds or args.steps < 1:
        p.error("need at least one seed and --steps >= 1")
    out = out_dir(p, args.out)
    res = {"steps": args.steps, "seeds": seeds, "train_flags": extra, "plain": [], "fp8_emulated": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            res["plain"].append(final_val_bpb(Path(tmp), f"plain{seed}", seed, args.steps, extra))
            with fp8_emulation():
                res["fp8_emulated"].append(final_val_bpb(Path(tmp), f"fp8{seed}", seed, args.steps, extra))
            print(f"seed {seed}: val {res['plain'][-1]:.4f} plain, {res['fp8_emulated'][-1]:.4f} fp8-emulated",
                  flush=True)
    for k in ("plain", "fp8_emulated"):
        res[f"{k}_mean"] = statistics.fmean(res[k])
    print(f"mean val bits/byte over {len(seeds)} seeds: plain {res['plain_mean']:.4f}, "
          f"fp8-emulated {res['fp8_emulated_mean']:.4f}")
    (out / "fp8_emulation.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
