"""Data-parallel scaling of ``trueternary train`` on 1 and 2 GPUs, same global batch; results to ``$OUT``.

    python3 benchmarks/multi_gpu_scaling.py --data PATH [--models d512,151M] [--configs TrueTernary,Adam_FP32]
                                            [--steps-d512 600] [--steps-151M 60] [--nprocs 1,2] [--out DIR]

For every model, config and number of processes it launches ``torchrun --standalone --nproc_per_node N -m
trueternary.cli train`` (NCCL, one GPU per rank; TrueTernary on the ``gpu`` update backend, its ranks voting as
one process on their exchanged gradients (docs/distributed.md); Adam_FP32 with bf16 autocast under PyTorch DDP,
fp32 gradient all-reduce) and reads what the run wrote:

    tokens/s       the global batch's tokens over the median step time, after the first 20% of steps (burn-in)
    peak memory    rank 0's CUDA allocator peak (torch.cuda.max_memory_allocated), from metrics.jsonl
    comm bytes     bytes rank 0 sent per step, counted at every collective (comm_bytes in metrics.jsonl)
    val bpb        validation bits per byte on the held-out split at the last step (rank 0)

Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU). Models: ``d512`` is the learning
benchmark's (6 layers, d 512, ctx 256, global batch 32), ``151M`` the performance benchmark's (12 layers,
d 1024, ctx 512, global batch 32). Writes ``multi_gpu_scaling.json`` (after every run) and each run's log to
``--out`` (default ``$OUT`` or ``./out``); ``--device cpu`` runs the same plan with gloo on the CPU (a dry run
of this script).
NVLink multicast stays off: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import add_out_arg, out_dir, summary, write_json  # noqa: E402

MODELS = {
    "d512": {"d_model": 512, "n_layers": 6, "n_heads": 8, "ctx": 256, "batch_size": 32},
    "151M": {"d_model": 1024, "n_layers": 12, "n_heads": 16, "ctx": 512, "batch_size": 32},
    "tiny": {"d_model": 32, "n_layers": 1, "n_heads": 2, "ctx": 16, "batch_size": 8},  # --device cpu dry run
}
LR = {"Adam_FP32": "1e-3"}  # tuned on the d512 model (docs/learning.md); TrueTernary: the LM recipe's default
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_one(model: str, config: str, nproc: int, steps: int, a, out: Path) -> dict:
    name = f"{model}_{config}_{nproc}gpu"
    m = MODELS[model]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trueternary.cli", "train", "--config", config, "--device", a.device, "--data", a.data,
           "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", "0", "--eval_windows",
           str(a.eval_windows), "--out_dir", str(out / "runs"), "--run_name", name, "--seed", "0"]
    for k, v in m.items():
        cmd += [f"--{k}", str(v)]
    if config in LR:
        cmd += ["--lr", LR[config]]
    if config.startswith("TrueTernary") and a.device != "cpu":
        cmd += ["--update_backend", "gpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **SAFE_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))  # this checkout
    if a.device == "cpu":
        env["TRUETERNARY_DIST_BACKEND"] = "gloo"
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    res = {"name": name, "model": model, "config": config, "gpus": nproc, "steps": steps, "rc": proc.returncode,
           "wall_s": time.perf_counter() - t0, "cmd": " ".join(cmd[1:])}
    (out / f"{name}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr, flush=True)
        return res
    run_dir = out / "runs" / name
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    cfg = json.loads((run_dir / "config.json").read_text())
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_bpb" in r]
    tokens = m["batch_size"] * m["ctx"]
    timed = summary([1e3 * tokens / r["tokens_per_s"] for r in train_rows[len(train_rows) // 5:]], tokens)
    res.update(median_step_ms=timed["median_ms"], tokens_per_s=timed["tokens_per_s"],
               val_bpb=evals[-1]["val_bpb"], peak_memory_bytes=evals[-1].get("peak_memory_bytes"),
               final_loss=train_rows[-1]["loss"], comm_bytes_per_step=train_rows[-1].get("comm_bytes"),
               comm_ternary_bytes_per_step=train_rows[-1].get("comm_ternary_bytes"),
               comm_float_bytes_per_step=train_rows[-1].get("comm_float_bytes"),
               distributed=cfg.get("distributed"))
    print(f"{name}: {res['median_step_ms']:.2f} ms/step, {res['tokens_per_s']:,.0f} tok/s, "
          f"val {res['val_bpb']:.4f} bpb, comm {res['comm_bytes_per_step']} B/step, "
          f"peak {res['peak_memory_bytes'] / 2**20:.1f} MiB", flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--models", default="d512,151M")
    p.add_argument("--configs", default="TrueTernary,Adam_FP32")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--steps-d512", type=int, default=600)
    p.add_argument("--steps-151M", type=int, default=60)
    p.add_argument("--steps-tiny", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    add_out_arg(p)
    a = p.parse_args()
    if a.data != "enwik8" and not Path(a.data).exists():
        p.error(f"--data {a.data}: no such file or directory")
    unknown = [m for m in a.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"unknown --models {','.join(unknown)}; choose from {', '.join(MODELS)}")
    out = out_dir(p, a.out)
    meta = {"argv": sys.argv[1:]}
    try:
        import torch

        meta.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    n_gpu=torch.cuda.device_count())
        import triton

        meta["triton"] = triton.__version__
    except Exception as e:  # the runs themselves report what is missing
        meta["probe_error"] = repr(e)
    results: list[dict] = []
    steps = {"d512": a.steps_d512, "151M": a.steps_151M, "tiny": a.steps_tiny}
    for model in a.models.split(","):
        for config in a.configs.split(","):
            for nproc in (int(n) for n in a.nprocs.split(",")):
                results.append(run_one(model, config, nproc, steps[model], a, out))
                for r in results:  # scaling efficiency vs the same model and config on 1 GPU
                    base = next((b for b in results if b["model"] == r["model"] and b["config"] == r["config"]
                                 and b["gpus"] == 1 and "tokens_per_s" in b), None)
                    if base and "tokens_per_s" in r:
                        r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"])
                        r["val_bpb_minus_1gpu"] = r["val_bpb"] - base["val_bpb"]
                write_json(out / "multi_gpu_scaling.json", {"meta": meta, "results": results})
    print(f"{'run':<28}{'ms/step':>9}{'tok/s':>11}{'eff':>6}{'val bpb':>9}{'comm B/step':>14}{'peak MiB':>10}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['name']:<28} FAILED (rc {r['rc']})")
            continue
        print(f"{r['name']:<28}{r['median_step_ms']:>9.2f}{r['tokens_per_s']:>11,.0f}"
              f"{r.get('scaling_efficiency', float('nan')):>6.2f}{r['val_bpb']:>9.4f}"
              f"{r['comm_bytes_per_step'] or 0:>14,}{r['peak_memory_bytes'] / 2**20:>10.1f}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
