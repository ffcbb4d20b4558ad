"""The learning benchmark of docs/learning.md in one go: tune every config's learning rate, then compare.

    python scripts/learning_benchmark.py --data PATH [--device cuda] [--steps 1500] [--tune-steps 600]

1. Tuning: each config's peak learning rate (vote scale for TrueTernary) is swept on a shorter run of the
   same model and batch (``--tune-steps``), all in one ``trueternary bench`` run (same batches, same base).
2. Final: every config at its best tuned learning rate for ``--steps``, side by side, plus the seed's
   plain rule (TrueTernary_Naive), with validation bits per byte on held-out text.
Both stages write ``bench`` JSON and PNG files to ``--out`` (default ``$OUT`` or ``./out``).
Every number it prints comes from ``trueternary bench``; the commands are printed before they run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from trueternary.cli import main as cli_main

GRID = {
    "Adam_FP32": ["1e-3", "2e-3", "4e-3"],
    "BitNet_QAT": ["2e-3", "4e-3", "8e-3"],
    "SignSGD_Old": ["3e-5", "1e-4", "3e-4"],
    "TrueTernary": ["3", "4", "6"],
}


def bench(argv: list[str]) -> None:
    print("$ trueternary bench " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = cli_main(["bench", *argv])
    if rc:
        sys.exit(rc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--tune-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--update-backend", default="auto")
    p.add_argument("--grid", default=None, help="JSON {config: [lr, ...]} replacing the default grid")
    p.add_argument("--skip-tune", action="store_true", help="use --lr values (CONFIG=LR) instead of tuning")
    p.add_argument("--lr", action="append", default=[])
    p.add_argument("--extra", default="", help="extra bench flags for both stages (one string)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", a.data, "--device", a.device, "--reuse-base", "--batch", str(a.batch), "--ctx", str(a.ctx),
              "--d-model", str(a.d_model), "--n-layers", str(a.n_layers), "--n-heads", str(a.n_heads),
              "--update-backend", a.update_backend, "--print-every", "0", *shlex.split(a.extra)]
    grid = json.loads(a.grid) if a.grid else GRID
    best = dict(item.split("=", 1) for item in a.lr)
    if not a.skip_tune:
        specs = [f"{name}[lr={lr}]" for name, lrs in grid.items() for lr in lrs]
        bench([*common, "--steps", str(a.tune_steps), "--configs", ",".join(specs),
               "--json", str(out / "tune.json"), "--plot", str(out / "tune.png")])
        results = json.loads((out / "tune.json").read_text())["results"]
        for name in grid:
            rows = [r for r in results if r["recipe"] == name and math.isfinite(r["val_bpb"]) and not r["diverged"]]
            if rows:
                best[name] = repr(min(rows, key=lambda r: r["val_bpb"])["lr"])
        print("tuned learning rates:", best, flush=True)
    final = [f"{name}[lr={best[name]}]" if name in best else name for name in grid] + ["TrueTernary_Naive"]
    bench([*common, "--steps", str(a.steps), "--configs", ",".join(final),
           "--json", str(out / "final.json"), "--plot", str(out / "final.png")])


if __name__ == "__main__":
    main()
