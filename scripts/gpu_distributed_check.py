"""Check data-parallel ``trueternary train`` on CUDA in one go; results go to ``$OUT`` (default ./out).

    python scripts/gpu_distributed_check.py [--steps 40]

Needs one GPU (more are used when present); it does not measure scaling (a later issue does).

1. NCCL, one rank (``torchrun --nproc_per_node 1``): TrueTernary and Adam_FP32 train on ``cuda:0``; the
   NCCL setup, CUDA step sync, DDP with ``device_ids`` and the replica check at the save all run.
2. gloo with CUDA tensors, two ranks sharing GPU 0 (``TRUETERNARY_DIST_BACKEND=gloo``): TrueTernary with the
   default (gpu) update backend and TrueTernary_Hybrid; the run fails if the ranks' ternary state ever
   differs (checked at every save), and the bytes counted per step must equal the model in config.json.
3. with two or more GPUs: NCCL, two ranks, TrueTernary, Adam_FP32 and TrueTernary_Hybrid (whose vote
   all-reduces interleave with DDP's bucket all-reduces on one communicator), the same checks (votes travel
   as int8 over NCCL).

Writes ``$OUT/gpu_distributed_check.json`` and every run's log, metrics and config under ``$OUT/runs/``.
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _run(name: str, nproc: int, config: str, steps: int, out: Path, env_extra: dict, device: str = "cuda") -> dict:
    runs = out / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trueternary.cli", "train", "--config", config, "--device", device, "--max_steps", str(steps),
           "--eval_every", str(steps // 2), "--save_every", str(steps // 2), "--out_dir", str(runs),
           "--run_name", name]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    (out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    res = {"cmd": " ".join(cmd), "env": env_extra, "rc": proc.returncode, "seconds": seconds}
    run_dir = runs / name
    if proc.returncode == 0:
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        cfg = json.loads((run_dir / "config.json").read_text())
        model = cfg["distributed"]["comm_model"]
        counted = sorted({r["comm_bytes"] for r in rows if "comm_bytes" in r})
        res.update(world_size=cfg["distributed"]["world_size"], backend=cfg["distributed"]["backend"],
                   vote_dtype=model["vote_dtype"], model_payload=model["payload"], counted_payload=counted,
                   bytes_match=counted == [model["payload"]], val_bpb=[r["val_bpb"] for r in rows if "val_bpb" in r],
                   final_loss=[r["loss"] for r in rows if "loss" in r][-1],
                   tokens_per_s=[r["tokens_per_s"] for r in rows if "loss" in r][-1])
    res["ok"] = proc.returncode == 0 and res.get("bytes_match", False)
    print(f"{name}: {'ok' if res['ok'] else 'FAILED'} (rc {proc.returncode}, {seconds:.0f}s)", flush=True)
    if not res["ok"]:
        print(proc.stderr[-3000:], file=sys.stderr)
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    n_gpu = torch.cuda.device_count()
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "n_gpu": n_gpu, "runs": {}}
    plan = [("nccl1_TrueTernary", 1, "TrueTernary", {}), ("nccl1_Adam_FP32", 1, "Adam_FP32", {}),
            ("gloo2_TrueTernary", 2, "TrueTernary", {"TRUETERNARY_DIST_BACKEND": "gloo"}),
            ("gloo2_TrueTernary_Hybrid", 2, "TrueTernary_Hybrid", {"TRUETERNARY_DIST_BACKEND": "gloo"})]
    if n_gpu >= 2:
        plan += [("nccl2_TrueTernary", 2, "TrueTernary", {}), ("nccl2_Adam_FP32", 2, "Adam_FP32", {}),
                 ("nccl2_TrueTernary_Hybrid", 2, "TrueTernary_Hybrid", {})]  # vote and DDP all-reduces interleave
    for name, nproc, config, env in plan:
        res["runs"][name] = _run(name, nproc, config, args.steps, out, env)
        (out / "gpu_distributed_check.json").write_text(json.dumps(res, indent=1))
    res["all_ok"] = all(r["ok"] for r in res["runs"].values())
    (out / "gpu_distributed_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: {kk: v[kk] for kk in ("ok", "rc", "seconds", "vote_dtype", "val_bpb") if kk in v}
                      for k, v in res["runs"].items()}, indent=1))
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
