#!/usr/bin/env python3
"""Which launch of each small library kernel is fastest at the 151M shapes: the vote passes over cuBLAS's gW, the
scale-vote kernel, the flip kernel and the dequant kernel, each at its default launch and at alternatives.

    python3 experiments/kernel_launches/run.py     # CUDA only; writes $OUT/kernel_launches.json (OUT: ./out)

Every row calls the library's own kernel (nothing is copied here; a row without a launch named runs the
library's default launch): median GPU time per call inside a CUDA graph (harness.kernel_ms(graph=True)), the
bytes it must move, and the fraction of 3.0 TB/s that is (the H100 figure the issue gives; an H200 has ~4.8).
16,384 tokens (the 151M model's batch), layers qkv / proj / up / down; ``--tokens`` and ``--shapes`` time others
(e.g. a Hugging Face Llama's: ``--tokens 4096 --shapes q=512x512,up=1408x512,down=512x1408``).
The answer and the measured numbers: README.md beside this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from harness import add_out_arg, env_info, kernel_ms, out_dir, require_cuda, write_json  # noqa: E402

M = 16384
SHAPES = {"qkv": (3072, 1024), "proj": (1024, 1024), "up": (4096, 1024), "down": (1024, 4096)}
HBM = 3.0e12
# launch overrides of the vote passes (impl 'gemm': statistics pass, then vote pass; default_votes_config)
VOTE_LAUNCHES = ({"CHUNK_R": 32}, {"chunk_warps": 8}, {"num_warps": 8}, {"STATS_CHUNK_R": 16},
                 {"STATS_CHUNK_R": 64, "num_warps": 8}, {"STATS_CHUNK_R": 128, "num_warps": 8})
# the flip kernel (bytes of T_packed per program, warps) and the dequant kernel beside their defaults
FLIP_LAUNCHES = ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8))
DEQUANT_LAUNCHES = ({"BLOCK_R": 32}, {"BLOCK_R": 32, "num_warps": 8}, {"BLOCK_R": 64, "num_warps": 8},
                    {"BLOCK_R": 8, "BLOCK_C": 256}, {"BLOCK_R": 16, "BLOCK_C": 256, "num_warps": 8},
                    {"BLOCK_R": 32, "BLOCK_C": 256, "num_warps": 8})


def layer_rows(name: str, R: int, C: int, M: int = M) -> list[dict]:
    from trueternary.ops.flip import apply_flips_
    from trueternary.ops.flip.triton import flip_triton_
    from trueternary.ops.ternary_matmul.triton import dequant_triton
    from trueternary.ops.votes.triton import matmul_votes_, scale_votes_
    from trueternary.rule import FlipRule, empty_norm_codes
    from trueternary.weight import TernaryScaleTensor

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(R * 7 + C)
    w = TernaryScaleTensor(R, C, 64, device=dev, init=False)
    w.set_trits(torch.randint(-1, 2, (R, C), generator=gen, device=dev))
    w.E.copy_(torch.randint(-8, -3, w.E.shape, generator=gen, device=dev, dtype=torch.int8))
    gy = torch.randn(M, R, generator=gen, device=dev).bfloat16()
    x = torch.randn(M, C, generator=gen, device=dev).bfloat16()
    gE = torch.zeros(R, w.n_groups, device=dev)
    flag = torch.zeros((), device=dev)
    step = torch.zeros((), dtype=torch.int64, device=dev)
    n = R * C
    rows = []

    def row(what: str, fn, nbytes: float) -> None:
        ms = kernel_ms(fn, device=dev, graph=True)
        rows.append({"layer": name, "what": what, "ms": ms, "bytes": nbytes,
                     "pct_of_hbm_3TBs": 100 * nbytes / HBM / (ms * 1e-3)})

    votes_bytes = 2.0 * M * (R + C) + 2.0 * n + 4.2 * n
    row("cuBLAS gW alone (bf16)", lambda: gy.t() @ x, 2.0 * M * (R + C) + 2.0 * n)
    rule = FlipRule()
    codes = empty_norm_codes((R, C), rule.norm_block, dev)
    common = dict(vote="stochastic", lr=4.0, vote_clip=8, norm_block=rule.norm_block, decay=0.0, key_base=1, call=0,
                  step=step, calls_per_step=49, gE=gE, flag=flag, impl="gemm")
    row("library kernel + cuBLAS gW, norm_beta=0", lambda: matmul_votes_(gy, x, w, **common), votes_bytes)
    row("library kernel + cuBLAS gW, default rule", lambda: matmul_votes_(
        gy, x, w, norm_codes=codes, norm_beta=rule.norm_beta, norm_key_base=2, **common), votes_bytes)
    for over in VOTE_LAUNCHES:
        row(f"library kernel + cuBLAS gW, default rule, {over}", lambda o=over: matmul_votes_(
            gy, x, w, norm_codes=codes, norm_beta=rule.norm_beta, norm_key_base=2, config=o, **common), votes_bytes)
    for warps in (4, 8, 16):
        row(f"scale votes (block_factored), {warps} warps", lambda nw=warps: scale_votes_(
            gE, w.E_accum, vote="stochastic", lr_e=0.2, vote_clip=8, normalize="block_factored", norm_block=128,
            key_base=3, call=1, step=step, calls_per_step=49, flag=flag, num_warps=nw), 5.0 * R * w.n_groups)
    counts = torch.zeros(2, dtype=torch.int32, device=dev)
    row("flip kernel", lambda: apply_flips_(w, 32, True, 32, counts), 2.4 * n)
    for block, warps in FLIP_LAUNCHES:
        row(f"flip kernel, block {block}, {warps} warps", lambda b=block, nw=warps: flip_triton_(
            w, 32, True, 32, counts, block=b, num_warps=nw), 2.4 * n)
    row("dequant bf16", lambda: dequant_triton(w), 2.2 * n)
    for over in DEQUANT_LAUNCHES:
        row(f"dequant bf16, {over}", lambda o=over: dequant_triton(w, config=o), 2.2 * n)
    row("dequant bf16, transposed out", lambda: dequant_triton(w, transpose_out=True), 2.2 * n)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_arg(p)
    p.add_argument("--tokens", type=int, default=M, help=f"tokens per call (default {M}, the 151M batch)")
    p.add_argument("--shapes", default=None, metavar="NAME=RxC,...",
                   help="weight shapes, e.g. q=512x512,up=1408x512 (default: the 151M layers)")
    args = p.parse_args()
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = {k: tuple(int(v) for v in rc.split("x")) for k, rc in
                      (item.split("=") for item in args.shapes.split(","))}
            if any(len(rc) != 2 or min(rc) < 1 for rc in shapes.values()):
                raise ValueError
        except ValueError:
            p.error(f"--shapes takes NAME=RxC,... with positive R and C, got {args.shapes!r}")
    if args.tokens < 1:
        p.error("--tokens must be >= 1")
    out = out_dir(p, args.out)
    require_cuda(p)
    res = {"env": {**env_info("cuda"), "tokens": args.tokens}, "rows": []}
    for name, (R, C) in shapes.items():
        res["rows"] += layer_rows(name, R, C, args.tokens)
        write_json(out / "kernel_launches.json", res)
    for r in res["rows"]:
        print(f"{r['layer']:5} {r['what']:55} {r['ms'] * 1e3:9.1f} us  {r['pct_of_hbm_3TBs']:6.1f}% of 3 TB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
