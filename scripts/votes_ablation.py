#!/usr/bin/env python3
"""Where the vote epilogue's time goes at the 151M shapes: stripped-down copies of its stages, timed in CUDA graphs.

    python3 scripts/votes_ablation.py        # CUDA only; writes $OUT/votes_ablation.json (OUT defaults to ./out)

The library's votes from cuBLAS's gW (impl 'gemm') are timed beside kernels of this script that do a growing part
of the old one-pass epilogue's work on the same bf16 gW, one 128 x 128 tile per program (norm_block 128, the
default rule's tile), so the differences say what each stage costs:

    copy      load gW and T_accum, store T_accum + sign vote                     (the bandwidth floor)
    stats     + row, column and tile sums of g**2 and s = -lr / sqrt(r c / m + eps) per element (IEEE div/sqrt)
    factored  the same statistics, s as a product of a per-row and a per-column factor (two IEEE ops per row/col)
    rng       stats + the stochastic rounding's uniform (rng.uniform's hash) and the clip
    trits     rng + the trits decoded from T_packed and gE (sum over each group of g * T, plain stores), as the
              library forms it; the trits alone; gE by one masked row sum per group; gE without the trits

plus the library's votes (cuBLAS's gW, statistics pass, vote pass) with history-less statistics (norm_beta=0),
with the moving averages (the default rule) at its default and four other block configurations, the scale-vote
kernel on gE (4, 8, 16 warps), the flip kernel and the dequant kernel (each at its default launch and
several others), and cuBLAS's gW alone (``--no-stages``:
these only). Each row: median GPU time per call inside a CUDA graph (triton.testing.do_bench_cudagraph), the
bytes it must move, and the fraction of HBM bandwidth that is (3.0 TB/s, the H100 figure the issue gives; H200
~4.8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from script_args import out_dir  # noqa: E402

from trueternary.ops.triton_utils import load_trits, uniform01  # noqa: E402

M = 16384
SHAPES = {"qkv": (3072, 1024), "proj": (1024, 1024), "up": (4096, 1024), "down": (1024, 4096)}
HBM = 3.0e12
# (stage, label, s as a product of row and column factors): what _stage_kernel does, growing
STAGES = ((0, "copy", False), (1, "stats", False), (1, "factored", True), (2, "rng", False),
          (3, "trits + gE (reshape)", False), (4, "trits alone", False), (5, "trits + gE (masked row sums)", False),
          (6, "gE of |g| (no trits)", False))
# launches of the flip kernel (bytes of T_packed per program, warps) and the dequant kernel beside their defaults
FLIP_LAUNCHES = ((256, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8))
DEQUANT_LAUNCHES = ({"BLOCK_R": 32}, {"BLOCK_R": 32, "num_warps": 8}, {"BLOCK_R": 64, "num_warps": 8},
                    {"BLOCK_R": 8, "BLOCK_C": 256}, {"BLOCK_R": 16, "BLOCK_C": 256, "num_warps": 8},
                    {"BLOCK_R": 32, "BLOCK_C": 256, "num_warps": 8})


@triton.jit
def _stage_kernel(gw_ptr, accum_ptr, packed_ptr, gE_ptr, R, C, n_groups, neg_lr, key,
                  STAGE: tl.constexpr, FACTORED: tl.constexpr, GS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    offs_r = (pid // n_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    flat = offs_r[:, None] * C + offs_c[None, :]
    g = tl.load(gw_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    if STAGE == 0:
        v = tl.where(g > 0, -1, tl.where(g < 0, 1, 0))
    else:
        g2 = g * g
        r = tl.sum(g2, axis=1) / BLOCK_C
        c = tl.sum(g2, axis=0) / BLOCK_R
        m = tl.sum(r, axis=0) / BLOCK_R
        if FACTORED:
            a = tl.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), tl.sqrt_rn(r + 1e-30)) * neg_lr
            b = tl.sqrt_rn(m + 1e-30) * tl.div_rn(tl.full((BLOCK_C,), 1.0, tl.float32), tl.sqrt_rn(c + 1e-30))
            s = a[:, None] * b[None, :]
        else:
            ms = tl.div_rn(r[:, None] * c[None, :], tl.maximum(m, 1e-30))
            s = tl.div_rn(tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32), tl.sqrt_rn(ms + 1e-30)) * neg_lr
        xv = g * s
        if STAGE >= 2:
            xv = xv + uniform01(flat, key)
        else:
            xv = xv + 0.5
        v = tl.minimum(tl.maximum(tl.floor(xv), -8.0), 8.0).to(tl.int32)
        if STAGE == 3:  # trits and gE as the library kernel forms them (a (rows, groups, GS) reshape)
            t = load_trits(packed_ptr, flat, mask)
            part = tl.sum(tl.reshape(g * t.to(tl.float32), (BLOCK_R, BLOCK_C // GS, GS)), axis=2)
            offs_g = (pid % n_c) * (BLOCK_C // GS) + tl.arange(0, BLOCK_C // GS)
            tl.store(gE_ptr + offs_r[:, None] * n_groups + offs_g[None, :], part,
                     mask=(offs_r < R)[:, None] & (offs_g < n_groups)[None, :])
        if STAGE == 4:  # the trits alone (a decay term), no gE
            t = load_trits(packed_ptr, flat, mask)
            v = v - (t > 0).to(tl.int32)
        if STAGE == 5:  # trits, gE as one masked row sum per group (no reshape)
            t = load_trits(packed_ptr, flat, mask)
            gt = g * t.to(tl.float32)
            for k in tl.static_range(BLOCK_C // GS):
                part = tl.sum(tl.where((offs_c // GS == (pid % n_c) * (BLOCK_C // GS) + k)[None, :], gt, 0.0), axis=1)
                tl.store(gE_ptr + offs_r * n_groups + (pid % n_c) * (BLOCK_C // GS) + k, part, mask=offs_r < R)
        if STAGE == 6:  # gE from sign(g) instead of the trits (what the byte gathers cost)
            gt = tl.abs(g)
            for k in tl.static_range(BLOCK_C // GS):
                part = tl.sum(tl.where((offs_c // GS == (pid % n_c) * (BLOCK_C // GS) + k)[None, :], gt, 0.0), axis=1)
                tl.store(gE_ptr + offs_r * n_groups + (pid % n_c) * (BLOCK_C // GS) + k, part, mask=offs_r < R)
    old = tl.load(accum_ptr + flat, mask=mask, other=0).to(tl.int32)
    tl.store(accum_ptr + flat, tl.minimum(tl.maximum(old + v, -127), 127).to(tl.int8), mask=mask)


def graph_ms(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))


def layer_rows(name: str, R: int, C: int, stages: bool) -> list[dict]:
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
    gW = gy.t() @ x
    gE = torch.zeros(R, w.n_groups, device=dev)
    flag = torch.zeros((), device=dev)
    step = torch.zeros((), dtype=torch.int64, device=dev)
    n = R * C
    rows = []

    def row(what: str, fn, nbytes: float) -> None:
        ms = graph_ms(fn)
        rows.append({"layer": name, "what": what, "ms": ms, "bytes": nbytes,
                     "pct_of_hbm_3TBs": 100 * nbytes / HBM / (ms * 1e-3)})

    row("cuBLAS gW alone (bf16)", lambda: gy.t() @ x, 2.0 * M * (R + C) + 2.0 * n)
    grid = (triton.cdiv(R, 128) * triton.cdiv(C, 128),)
    for stage, label, factored in STAGES if stages else ():
        for warps in (4, 8, 16) if stage < 3 else (8, 16):
            row(f"stage {label}, {warps} warps", lambda s=stage, f=factored, nw=warps: _stage_kernel[grid](
                gW, w.T_accum, w.T_packed, gE, R, C, w.n_groups, -4.0, 12345, STAGE=s, FACTORED=f, GS=64,
                BLOCK_R=128, BLOCK_C=128, num_warps=nw, enable_fp_fusion=False),
                4.0 * n + (0.2 * n + 4.0 * R * w.n_groups if stage >= 3 else 0.0))
    rule = FlipRule()
    codes = empty_norm_codes((R, C), rule.norm_block, dev)
    common = dict(vote="stochastic", lr=4.0, vote_clip=8, norm_block=rule.norm_block, decay=0.0, key_base=1, call=0,
                  step=step, calls_per_step=49, gE=gE, flag=flag, impl="gemm")
    row("library kernel + cuBLAS gW, norm_beta=0", lambda: matmul_votes_(gy, x, w, **common),
        2.0 * M * (R + C) + 2.0 * n + 4.2 * n)
    row("library kernel + cuBLAS gW, default rule", lambda: matmul_votes_(
        gy, x, w, norm_codes=codes, norm_beta=rule.norm_beta, norm_key_base=2, **common),
        2.0 * M * (R + C) + 2.0 * n + 4.2 * n)
    for over in ({"CHUNK_R": 32}, {"chunk_warps": 8}, {"num_warps": 8}, {"STATS_CHUNK_R": 16}):
        row(f"library kernel + cuBLAS gW, default rule, {over}", lambda o=over: matmul_votes_(
            gy, x, w, norm_codes=codes, norm_beta=rule.norm_beta, norm_key_base=2, config=o, **common),
            2.0 * M * (R + C) + 2.0 * n + 4.2 * n)
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
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT or ./out)")
    p.add_argument("--no-stages", action="store_true", help="time the library's kernels only (not the stage copies)")
    args = p.parse_args()
    out = out_dir(p, args.out)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (it times GPU kernels)")
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "tokens": M}, "rows": []}
    for name, (R, C) in SHAPES.items():
        res["rows"] += layer_rows(name, R, C, not args.no_stages)
    for r in res["rows"]:
        print(f"{r['layer']:5} {r['what']:45} {r['ms'] * 1e3:9.1f} us  {r['pct_of_hbm_3TBs']:6.1f}% of 3 TB/s")
    (out / "votes_ablation.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
