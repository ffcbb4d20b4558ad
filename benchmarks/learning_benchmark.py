"""The learning benchmark of docs/learning.md in one go: tune every config's learning rate, then compare.

    python3 benchmarks/learning_benchmark.py --data PATH [--device cuda] [--steps 1500] [--parallel 8]

1. Tuning: each config's peak learning rate (vote scale for TrueTernary) is swept on a run of the same
   model and batch (``--tune-steps``, default ``--steps``: the optimum moves with the run length), all in
   one ``trueternary bench`` run (same batches, same base). With ``--parallel N`` every grid entry runs as
   its own ``trueternary bench`` process, N at a time, with the same flags and seed (hence the same base
   model and batches); their results are merged into one JSON. Their step times then measure a shared
   device and are not comparable; the final stage stays one sequential run.
2. Final: every config at its best tuned learning rate for ``--steps``, side by side, plus the seed's
   plain rule (TrueTernary_Naive), with validation bits per byte on held-out text.
Both stages write ``bench`` JSON and PNG files to ``--out`` (default ``$OUT`` or ``./out``).
Every number it prints comes from ``trueternary bench``; the commands are printed before they run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import add_out_arg, out_dir  # noqa: E402

from trueternary.cli import main as cli_main  # noqa: E402

GRID = {  # each bracketed its optimum at 1500 steps on the development corpus (docs/learning.md)
    "Adam_FP32": ["2.5e-4", "5e-4", "1e-3", "2e-3"],
    "BitNet_QAT": ["5e-4", "1e-3", "2e-3", "4e-3"],
    "SignSGD_Old": ["1e-4", "3e-4", "1e-3", "3e-3"],
    "TrueTernary": ["3", "4", "5", "6"],
}


def bench(argv: list[str]) -> None:
    print("$ trueternary bench " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = cli_main(["bench", *argv])
    if rc:
        sys.exit(rc)


# the tuning processes import the same trueternary as this script (src/ first, as above)
CLI = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from trueternary.cli import main; "
       "sys.exit(main(sys.argv[1:]))")


def entry_spec(name: str, entry: str) -> str:
    """A grid entry is a learning rate ("1e-3") or bracket overrides ("lr=4,decay=0.2")."""
    return f"{name}[{entry if '=' in entry else 'lr=' + entry}]"


def bench_parallel(common: list[str], specs: list[str], out: Path, n_parallel: int) -> list[dict]:
    """Run each config spec as its own ``trueternary bench`` process, ``n_parallel`` at a time."""
    pending = list(enumerate(specs))
    running: list[tuple[subprocess.Popen, Path, object]] = []
    files, failed = [], []
    while pending or running:
        while pending and len(running) < n_parallel:
            i, spec = pending.pop(0)
            path = out / f"tune_{i:02d}.json"
            argv = ["bench", *common, "--configs", spec, "--json", str(path)]
            print("$ trueternary " + " ".join(shlex.quote(a) for a in argv), flush=True)
            log = open(out / f"tune_{i:02d}.log", "w")
            proc = subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, path, log))
            files.append(path)
        time.sleep(1.0)
        for item in list(running):
            proc, path, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"  done ({proc.returncode}): {path.name}", flush=True)
                if proc.returncode:
                    failed.append(path.with_suffix(".log").name)
    results, meta = [], None
    for path in files:
        if path.exists():
            d = json.loads(path.read_text())
            meta = meta or d["meta"]
            results.extend(d["results"])
    (out / "tune.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if failed:
        sys.exit(f"learning_benchmark: {len(failed)} tuning run(s) failed, see {', '.join(failed)} in {out}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--tune-steps", type=int, default=None, help="steps of the tuning runs (default: --steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--update-backend", default="auto")
    p.add_argument("--grid", default=None,
                   help='JSON {config: [entry, ...]} replacing the default grid; an entry is a learning rate '
                        'or bracket overrides, e.g. {"TrueTernary": ["4", "lr=4,decay=0.2"]}')
    p.add_argument("--parallel", type=int, default=1, help="tuning runs at once, each its own process")
    p.add_argument("--skip-tune", action="store_true", help="use --lr values (CONFIG=LR) instead of tuning")
    p.add_argument("--lr", action="append", default=[])
    p.add_argument("--tune-only", action="store_true", help="stop after the tuning stage")
    p.add_argument("--extra", default="", help="extra bench flags for both stages (one string)")
    add_out_arg(p)
    a = p.parse_args()
    out = out_dir(p, a.out)
    common = ["--data", a.data, "--device", a.device, "--reuse-base", "--batch", str(a.batch), "--ctx", str(a.ctx),
              "--d-model", str(a.d_model), "--n-layers", str(a.n_layers), "--n-heads", str(a.n_heads),
              "--update-backend", a.update_backend, "--print-every", "0", *shlex.split(a.extra)]
    try:
        grid = json.loads(a.grid) if a.grid else GRID
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ValueError("expected an object of non-empty lists")
    except ValueError as e:
        p.error(f"--grid: {e}")
    if a.parallel < 1:
        p.error("--parallel must be >= 1")
    best = {}  # config name -> its final spec, e.g. "Adam_FP32[lr=1e-3]"
    for item in a.lr:
        name, lr = item.split("=", 1)
        best[name] = f"{name}[lr={lr}]"
    if not a.skip_tune:
        specs = [entry_spec(name, e) for name, entries in grid.items() for e in entries]
        tune = [*common, "--steps", str(a.tune_steps or a.steps)]
        if a.parallel > 1:
            results = bench_parallel(tune, specs, out, a.parallel)
        else:
            bench([*tune, "--configs", ",".join(specs), "--json", str(out / "tune.json"),
                   "--plot", str(out / "tune.png")])
            results = json.loads((out / "tune.json").read_text())["results"]
        for name in grid:
            rows = [r for r in results if r["recipe"] == name and math.isfinite(r["val_bpb"]) and not r["diverged"]]
            if rows:
                best[name] = min(rows, key=lambda r: r["val_bpb"])["config"]
        print("tuned:", best, flush=True)
        if a.tune_only:
            return
    final = [best.get(name, name) for name in grid] + ["TrueTernary_Naive"]
    bench([*common, "--steps", str(a.steps), "--configs", ",".join(final),
           "--json", str(out / "final.json"), "--plot", str(out / "final.png")])


if __name__ == "__main__":
    main()
