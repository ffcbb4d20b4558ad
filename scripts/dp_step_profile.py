"""Where a data-parallel TrueTernary step spends its time: step time with and without the vote all-reduce,
and a torch.profiler table of rank 0's step. Launch with torchrun; results to ``$OUT`` (default ./out).

    torchrun --standalone --nproc_per_node 2 scripts/dp_step_profile.py [--d-model 512 --n-layers 6 --n-heads 8
        --ctx 256 --batch 32 --config TrueTernary --backend gpu --steps 30]

``--batch`` is the global batch (split over the ranks). Variants, each timed over ``--steps`` steps after
warm-up (median of per-step times, every step ends with a device synchronisation):

    full        the data-parallel step as ``trueternary train`` runs it (votes all-reduced inside backward)
    no_reduce   the same with ``sum_votes`` replaced by a local copy: the cost of the all-reduces themselves
Writes ``$OUT/dp_<config>_d<d_model>_w<N>.json`` and ``..._rank0.txt`` (profiler tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from trueternary import distributed
from trueternary.data import RandomWindows, load_corpus
from trueternary.models import build_model
from trueternary.recipes import Hparams, build_recipe


def timed_steps(recipe, batches, device, n: int) -> list[float]:
    times = []
    for _ in range(n):
        x, y = batches.next(device)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        recipe.train_step(x, y, True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None)
    p.add_argument("--config", default="TrueTernary")
    p.add_argument("--backend", default="gpu")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs CUDA (it times GPU steps under torchrun)")
    if a.batch % int(os.environ.get("WORLD_SIZE", "1")):
        p.error(f"--batch {a.batch} does not split evenly over {os.environ['WORLD_SIZE']} ranks")
    try:
        ctx = distributed.setup("cuda")
    except ValueError as e:
        p.error(str(e))
    dev = ctx.device
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(a.data)
    base = build_model("transformer", seed=0, ctx=a.ctx, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads)
    hp = Hparams(steps=10_000)
    recipe = build_recipe(a.config, base, hp, device=dev, backend=a.backend, seed=0)
    meter = distributed.prepare_recipe(recipe, ctx)
    batches = RandomWindows(corpus.train, a.batch // ctx.world_size, a.ctx,
                            seed=distributed.rank_data_seed(0, ctx.rank))
    res = {"world_size": ctx.world_size, "args": vars(a), "gpu": torch.cuda.get_device_name(dev),
           "torch": torch.__version__}
    timed_steps(recipe, batches, dev, 10)  # warm-up: kernel compilation, allocator
    res["full_ms"] = 1e3 * statistics.median(timed_steps(recipe, batches, dev, a.steps))
    comms = meter.votes
    if comms:
        originals = [c.sum_votes for c in comms]
        for c in comms:
            c.sum_votes = lambda v: v.to(torch.int32) if v.dtype != torch.int8 else v.clone()
        res["no_reduce_ms"] = 1e3 * statistics.median(timed_steps(recipe, batches, dev, a.steps))
        for c, f in zip(comms, originals):
            c.sum_votes = f
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(recipe, batches, dev, 3)
    if ctx.rank == 0:
        ka = prof.key_averages()
        text = ("== by self CUDA time ==\n" + ka.table(sort_by="self_cuda_time_total", row_limit=30)
                + "\n== by CPU time ==\n" + ka.table(sort_by="cpu_time_total", row_limit=30))
        tag = f"dp_{a.config}_d{a.d_model}_w{ctx.world_size}"
        (out / f"{tag}_rank0.txt").write_text(text)
        (out / f"{tag}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res), flush=True)
    ctx.close()


if __name__ == "__main__":
    main()
