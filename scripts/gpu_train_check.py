"""Check and time ``trueternary train`` / ``generate`` on a GPU in one go; results go to ``$OUT`` (default ./out).

    python scripts/gpu_train_check.py [--device cuda] [--steps 300]

1. the default run (``trueternary train`` flags, on the GPU), timed;
2. the same run split in two (``--stop_at steps/2``, then ``--resume auto``): is the final checkpoint
   bit-identical to the uninterrupted one, and how far apart are the two loss curves?
3. a second uninterrupted run: are two GPU runs bit-identical to each other (the reference for 2)?
4. ``generate`` from the final checkpoint: inference bytes held and tokens/s;
5. a larger model for throughput (TrueTernary and Adam_FP32, d_model 512, 6 layers, batch 32 x ctx 256).

Writes ``$OUT/gpu_train_check.json`` and ``$OUT/runs/`` (metrics, plots, checkpoints of the small runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from trueternary.checkpoint import latest_checkpoint, load_checkpoint
from trueternary.generate import held_bytes, load_for_inference, sample
from trueternary.train import TrainConfig, train


def _max_abs_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=float("nan")) if len(a) == len(b) else float("inf")


def _tensors_equal(pa: Path, pb: Path) -> dict:
    a, b = load_checkpoint(pa), load_checkpoint(pb)
    differing = [k for k in a.tensors if k not in b.tensors or not torch.equal(a.tensors[k], b.tensors[k])]
    return {"sha_a": a.meta["tensor_sha256"], "sha_b": b.meta["tensor_sha256"],
            "identical": a.meta["tensor_sha256"] == b.meta["tensor_sha256"], "differing_tensors": differing[:20],
            "n_differing": len(differing)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--big_steps", type=int, default=100)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    out = Path(os.environ.get("OUT", "out"))
    runs = out / "runs"
    res: dict = {"device": args.device, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    common = dict(device=args.device, out_dir=str(runs), max_steps=args.steps)

    t0 = time.perf_counter()
    straight = train(TrainConfig(run_name="default", **common))
    res["default_run"] = {"wall_s": time.perf_counter() - t0, **{k: straight[k] for k in (
        "seconds", "tokens_per_s", "initial_val_bpb", "val_bpb", "final_loss")}}

    first = train(TrainConfig(run_name="split", stop_at=args.steps // 2, **common))
    second = train(TrainConfig(run_name="split", resume="auto", **common))
    res["resume"] = {"losses_max_abs_diff": _max_abs_diff(straight["losses"], first["losses"] + second["losses"]),
                     **_tensors_equal(latest_checkpoint(runs / "default"), latest_checkpoint(runs / "split"))}

    again = train(TrainConfig(run_name="again", **common))
    res["two_uninterrupted_runs"] = {"losses_max_abs_diff": _max_abs_diff(straight["losses"], again["losses"]),
                                     **_tensors_equal(latest_checkpoint(runs / "default"),
                                                      latest_checkpoint(runs / "again"))}

    model, _ = load_for_inference(latest_checkpoint(runs / "default"), args.device)
    t0 = time.perf_counter()
    text = sample(model, b"def ", 200, temperature=0.8, seed=0, device=args.device)
    dt = time.perf_counter() - t0
    res["generate"] = {"held": held_bytes(model), "tokens_per_s": 200 / dt, "text": text.decode("utf-8", "replace")}
    if torch.cuda.is_available():
        res["generate"]["cuda_memory_allocated"] = torch.cuda.memory_allocated()
    del model

    res["throughput"] = {}
    scratch = tempfile.mkdtemp()  # the big checkpoints stay out of $OUT
    for config in ("TrueTernary", "Adam_FP32"):
        big = train(TrainConfig(run_name=f"big-{config}", config=config, d_model=512, n_layers=6, n_heads=8,
                                batch_size=32, ctx=256, max_steps=args.big_steps, eval_every=0, save_every=0,
                                device=args.device, out_dir=scratch))
        losses = big["losses"]
        res["throughput"][config] = {"tokens_per_s_overall": big["tokens_per_s"], "seconds": big["seconds"],
                                     "first_loss": losses[0], "last_loss": losses[-1], "val_bpb": big["val_bpb"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_train_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
