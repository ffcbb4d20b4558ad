#!/usr/bin/env python3
"""Per-kernel benchmark of the gpu backends' Triton kernels: packed ternary matmul (forward, backward-input; bf16
and fp8), weight-gradient votes, flips, and the gpu-signcache variant, against their floors and the dense path.

    python3 benchmarks/bench_kernels.py                  # on a CUDA machine, from the repo root (~4 min on an H100)
    python3 benchmarks/bench_kernels.py --smoke          # CPU: Triton interpreter, tiny shapes (checks the script)

Output: a compact table on stdout (last), ``$OUT/bench_kernels.json`` (``OUT`` defaults to ./out).

1. per-kernel median time (harness.kernel_ms: triton.testing.do_bench, L2 flushed between calls) vs its floor
   ``max(FLOPs / peak, bytes / HBM)`` with H100 peaks bf16 760 TFLOP/s, fp8 1270 TFLOP/s, HBM 3.0 TB/s,
   and vs the dense-fallback path (unpack + torch.matmul; gW matmul + FlipOptimizer votes; reference flips;
   the votes are timed through FlipOptimizer.cast_matmul_votes with backends gpu / gpu-signcache, and the vote
   kernels alone with the gradient formed in the kernel and by cuBLAS), at the linear layers of the 151M model
   (d=1024, 12 layers, 32x512 tokens) and the seed setting (d=512, 4 layers, 4x33 tokens); CUDA-graph replay
   times at the seed setting (launch-bound); per-step totals over the model's linear layers;
2. the fused matmul's accuracy at the real shapes, bf16 and fp8, against the exact fp32 product;
3. tile-config sweeps of the fused matmul and vote kernels (best config per shape).

Each section is recorded in the JSON ``errors`` if it fails; the rest still runs. The kernels' correctness
checks are the kernel tests (``pytest tests/test_kernels_matmul.py tests/test_kernels_votes.py
tests/test_kernels_flip.py``), which run the compiled kernels on a CUDA machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harness import Bench, add_out_arg, kernel_ms, out_dir, smoke_or_cuda, speedup  # noqa: E402

PEAK = {"bf16": 760e12, "fp8": 1270e12, "hbm": 3.0e12}
GROUP_SIZE = 64
SETTINGS = {  # name: (d_model, tokens per step, transformer blocks)
    "seed": (512, 4 * 33, 4),
    "151M": (1024, 32 * 512, 12),
}
VOCAB = 288  # rows of the vocabulary head
LAYERS = ("qkv", "proj", "up", "down", "head")


def layer_shapes(d: int) -> dict[str, tuple[int, int]]:
    """(rows, cols) = (out_features, in_features) of one block's linear maps, and the vocabulary head."""
    shapes = {"qkv": (3 * d, d), "proj": (d, d), "up": (4 * d, d), "down": (d, 4 * d), "head": (VOCAB, d)}
    return {name: shapes[name] for name in LAYERS}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run under the Triton interpreter with tiny shapes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds (default 210 on CUDA, unlimited with --smoke); later sections stop when exceeded")
    add_out_arg(p)
    p.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweeps")
    p.add_argument("--sweep-kernels", default="matmul,votes", help="comma-separated kernels to sweep: matmul, votes")
    p.add_argument("--skip-timings", action="store_true", help="skip the per-kernel timings (e.g. to sweep only)")
    p.add_argument("--skip-checks", action="store_true", help="skip the fp8-vs-bf16 accuracy section (timings only)")
    p.add_argument("--settings", default="151M,seed", help="comma-separated settings to time: 151M, seed")
    p.add_argument("--ops", default="matmul,votes,flips", help="comma-separated ops to time: matmul, votes, flips")
    args = p.parse_args()
    for flag, value, allowed in (("--ops", args.ops, ("matmul", "votes", "flips")),
                                 ("--settings", args.settings, tuple(SETTINGS)),
                                 ("--sweep-kernels", args.sweep_kernels, ("matmul", "votes"))):
        bad = sorted({v.strip() for v in value.split(",") if v.strip()} - set(allowed))
        if bad:
            p.error(f"unknown {flag} {', '.join(bad)} (choose from {', '.join(allowed)})")
    args.out = out_dir(p, args.out)
    return args


ARGS = parse_args()
smoke_or_cuda(ARGS.smoke, "bench_kernels")

import torch  # noqa: E402

from trueternary.ops.flip import apply_flips_, apply_flips_naive_  # noqa: E402
from trueternary.ops.flip.triton import flip_triton_  # noqa: E402
from trueternary.ops.ternary_matmul import ternary_matmul, ternary_matmul_naive  # noqa: E402
from trueternary.ops.ternary_matmul.naive import quantize_rows_fp8  # noqa: E402
from trueternary.ops.ternary_matmul.triton import (  # noqa: E402
    default_matmul_config,
    dequant_triton,
    ternary_matmul_triton,
)
from trueternary.ops.votes import VoteCache, encode_vote_cache  # noqa: E402
from trueternary.ops.votes.triton import default_votes_config, matmul_votes_  # noqa: E402
from trueternary.optim import FlipOptimizer  # noqa: E402
from trueternary.rule import FlipRule, empty_norm_codes  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
BF16 = torch.bfloat16
if ARGS.smoke:  # tiny stand-ins, ragged on purpose; a block's layer and the head (interpreted launches cost seconds)
    SETTINGS = {"seed": (24, 17, 1), "151M": (48, 70, 1)}
    GROUP_SIZE, VOCAB, LAYERS = 16, 40, ("qkv", "head")
CALLS = 1024  # FlipOptimizer's RNG counter slots per step
NORM_BLOCK = FlipRule().norm_block

B = Bench("bench_kernels", ARGS.out, ARGS.budget if ARGS.budget is not None else (1e9 if ARGS.smoke else 210.0), DEV)
B.res["recommendations"] = {}


# ------------------------------------------------------------------------------------------------ helpers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` in float64; inf when either has NaN/inf."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


_SEED = [1000]


def gen() -> torch.Generator:
    """A generator with a fresh seed: every tensor is drawn from its own stream."""
    _SEED[0] += 1
    return torch.Generator(device=DEV).manual_seed(_SEED[0])


def random_weight(rows: int, cols: int, gs: int = GROUP_SIZE, e_low: int = -8, e_high: int = -3) -> TernaryScaleTensor:
    w = TernaryScaleTensor(rows, cols, gs, device=DEV, init=False)
    g = gen()
    w.set_trits(torch.randint(-1, 2, (rows, cols), generator=g, device=DEV))
    w.E.copy_(torch.randint(e_low, e_high + 1, w.E.shape, generator=g, device=DEV, dtype=torch.int8))
    w.T_accum.copy_(torch.randint(-127, 128, (rows, cols), generator=g, device=DEV, dtype=torch.int8))
    w.E_accum.copy_(torch.randint(-127, 128, w.E.shape, generator=g, device=DEV, dtype=torch.int8))
    return w


def randn(*shape, dtype=BF16) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(), device=DEV).to(dtype)


# ------------------------------------------------------------------------------------------------ 1. timings


def floor_ms(flops: float, nbytes: float, peak: str = "bf16") -> float:
    return max(flops / PEAK[peak], nbytes / PEAK["hbm"]) * 1e3


def record(setting, layer, op, impl, fn, flops, nbytes, peak="bf16", graph=False, dense_ms=None):
    ms = kernel_ms(fn, device=DEV, graph=graph)
    fl = floor_ms(flops, nbytes, peak)
    row = {"setting": setting, "layer": layer, "op": op, "impl": impl + (" [graph]" if graph else ""), "ms": ms,
           "floor_ms": fl, "pct_of_floor": 100 * fl / ms if ms > 0 else 0.0,
           "tflops": flops / ms / 1e9 if ms > 0 else 0.0, "gbps": nbytes / ms / 1e6 if ms > 0 else 0.0,
           "speedup_vs_dense": speedup(dense_ms, ms) if dense_ms else None}
    B.add("timings", row)
    return ms


def fp8_scaled_mm(x: torch.Tensor, w: TernaryScaleTensor, transposed: bool) -> torch.Tensor:
    """fp8 alternative: per-token x_q, dequantised fp8 W_q (one Triton pass), cuBLAS torch._scaled_mm."""
    xq, a = quantize_rows_fp8(x)
    if transposed:  # gx = gy_q @ W_q: mat2 (rows, cols) column-major = (cols, rows) row-major, transposed view
        WqT, e_ref = dequant_triton(w, torch.float8_e4m3fn, transpose_out=True, fp8_transposed=True)
        scale_b = torch.exp2(e_ref.float()).repeat_interleave(w.group_size)[: w.cols]
        return torch._scaled_mm(xq, WqT.t(), scale_a=a[:, None], scale_b=scale_b[None, :], out_dtype=BF16)
    Wq, e_ref = dequant_triton(w, torch.float8_e4m3fn, fp8_transposed=False)
    return torch._scaled_mm(xq, Wq.t(), scale_a=a[:, None], scale_b=torch.exp2(e_ref.float())[None, :],
                            out_dtype=BF16)


def time_matmul(setting, layer, rows, cols, M, op_ms):
    w = random_weight(rows, cols)
    W = w.dense(BF16)
    for transposed in (False, True):
        op = "bwd-input" if transposed else "fwd"
        op_ms[(layer, op)] = time_matmul_direction(setting, layer, op, w, W, randn(M, rows if transposed else cols),
                                                   transposed)


def time_matmul_direction(setting, layer, op, w, W, a, transposed) -> dict:
    rows, cols = w.rows, w.cols
    M, K = a.shape
    N = cols if transposed else rows
    flops = 2.0 * M * rows * cols
    nbytes = 2.0 * M * (K + N) + rows * cols / 5 + rows * w.n_groups
    fp8_bytes = M * K * 5.0 + 2.0 * M * N + rows * cols / 5 + rows * w.n_groups  # x read, x_q written + read
    dense = record(setting, layer, op, "dense-fallback",
                   lambda: a @ (w.dense(BF16) if transposed else w.dense(BF16).t()), flops, nbytes)
    record(setting, layer, op, "cuBLAS bf16, W given", lambda: a @ (W if transposed else W.t()), flops,
           2.0 * M * (K + N) + 2.0 * rows * cols, dense_ms=dense)
    fused = record(setting, layer, op, "fused bf16", lambda: ternary_matmul_triton(a, w, transposed), flops, nbytes,
                   dense_ms=dense)
    deq = record(setting, layer, op, "dequant+cuBLAS", lambda: ternary_matmul(a, w, transposed, impl="dequant"),
                 flops, nbytes + 4.0 * rows * cols, dense_ms=dense)
    f8 = record(setting, layer, op, "fused fp8", lambda: ternary_matmul_triton(a, w, transposed, fp8=True), flops,
                fp8_bytes, peak="fp8", dense_ms=dense)
    if DEV.type == "cuda":
        try:
            record(setting, layer, op, "fp8 dequant+_scaled_mm", lambda: fp8_scaled_mm(a, w, transposed), flops,
                   fp8_bytes + 2.0 * rows * cols, peak="fp8", dense_ms=dense)
        except Exception as e:  # noqa: BLE001 - optional comparison (torch build dependent)
            B.error(f"_scaled_mm {setting} {layer} {op}", repr(e)[:300])
        if setting == "seed":
            record(setting, layer, op, "fused bf16", lambda: ternary_matmul_triton(a, w, transposed), flops, nbytes,
                   graph=True, dense_ms=dense)
    return {"dense": dense, "fused": fused, "dequant": deq, "fp8": f8}


def time_votes(setting, layer, rows, cols, M, op_ms):
    gy, x = randn(M, rows), randn(M, cols)
    flops = 2.0 * M * rows * cols
    # gy, x (bf16) read; T_accum read + write; T_packed read (decay / gE); gE written + read (fp32 per group)
    nbytes = 2.0 * M * (rows + cols) + 2.2 * rows * cols + 8.0 * rows * (cols // GROUP_SIZE + 1)
    wd = random_weight(rows, cols)
    opt_d = FlipOptimizer(wd, backend="dense-fallback", check_finite=False)
    dense = record(setting, layer, "votes", "dense-fallback", lambda: opt_d.cast_matmul_votes(wd, gy, x, None),
                   flops, nbytes)
    record(setting, layer, "votes", "cuBLAS gW only (bf16)", lambda: gy.t() @ x, flops,
           2.0 * M * (rows + cols) + 2.0 * rows * cols, dense_ms=dense)
    fused = {}
    for backend, vote in (("gpu", "stochastic"), ("gpu", "sign"), ("gpu-signcache", "stochastic"),
                          ("gpu-signcache", "sign")):
        w = random_weight(rows, cols)
        rule = FlipRule() if vote == "stochastic" else FlipRule.naive()
        opt = FlipOptimizer(w, backend="dense-fallback" if DEV.type == "cpu" else backend, rule=rule,
                            check_finite=False)
        opt.backend = backend

        def run(opt=opt, w=w):
            for _, cache in opt._votes.caches.values():
                cache.pending = False  # time the cast alone (a pending cache would be flushed first)
            opt.cast_matmul_votes(w, gy, x, None)

        run()
        cache = next(iter(opt._votes.caches.values()), (None, None))[1]
        cb = nbytes if cache is None else nbytes - 2.0 * rows * cols + cache.bits / 8 * rows * cols
        impl = f"{backend} {vote} (+E{'' if cache is None else f', {cache.bits}-bit cache'})"
        fused[(backend, vote)] = record(setting, layer, "votes", impl, run, flops, cb, dense_ms=dense)
        if DEV.type == "cuda" and setting == "seed" and (backend, vote) == ("gpu", "stochastic"):
            record(setting, layer, "votes", impl, run, flops, cb, graph=True, dense_ms=dense)
    # both sources of the gradient tiles (ops.votes.VOTES_FUSED_MAX_TOKENS picks one for the rows above): the vote
    # kernels called directly with the default rule's moving averages and E, on CUDA inside a CUDA graph (GPU time,
    # as in a graphed step: an eager call is host-bound at these sizes)
    rule = FlipRule()
    nb = rule.norm_block if not ARGS.smoke else 16
    for where, impl in (("in the kernel", "fused"), ("by cuBLAS", "gemm")):
        w1 = random_weight(rows, cols)
        codes = empty_norm_codes((rows, cols), nb, DEV)
        gE, flag = torch.zeros(rows, w1.n_groups, device=DEV), torch.zeros((), device=DEV)
        step = torch.zeros((), dtype=torch.int64, device=DEV)
        record(setting, layer, "votes", f"vote kernels (+gE), gW {where}",
               lambda w1=w1, codes=codes, gE=gE, flag=flag, step=step, impl=impl: matmul_votes_(
                   gy, x, w1, vote="stochastic", lr=4.0, vote_clip=8, norm_block=nb, decay=0.0, key_base=1, call=0,
                   step=step, calls_per_step=CALLS, gE=gE, flag=flag, norm_codes=codes, norm_beta=rule.norm_beta,
                   norm_key_base=2, impl=impl),
               flops, nbytes + (4.0 * rows * cols if impl == "gemm" else 0.0), dense_ms=dense,
               graph=DEV.type == "cuda")
    # what the default rule's moving averages (norm_beta, kept in the epilogue) cost: the history-less rule
    w0 = random_weight(rows, cols)
    opt0 = FlipOptimizer(w0, backend="dense-fallback" if DEV.type == "cpu" else "gpu",
                         rule=FlipRule(norm_beta=0.0), check_finite=False)
    opt0.backend = "gpu"
    record(setting, layer, "votes", "gpu stochastic, norm_beta=0 (+E)", lambda: opt0.cast_matmul_votes(w0, gy, x, None),
           flops, nbytes, dense_ms=dense)
    w = random_weight(rows, cols)
    step = torch.zeros((), dtype=torch.int64, device=DEV)
    record(setting, layer, "votes", "matmul_votes kernel only (stochastic, no E)", lambda: matmul_votes_(
        gy, x, w, vote="stochastic", lr=4.0, vote_clip=8, norm_block=NORM_BLOCK if not ARGS.smoke else 16, decay=0.0,
        key_base=1, call=0, step=step, calls_per_step=CALLS), flops, nbytes - 8.0 * rows * (cols // GROUP_SIZE + 1),
        dense_ms=dense)
    op_ms[(layer, "votes")] = {"dense": dense, "fused": fused[("gpu", "stochastic")],
                               "cache_sign": fused[("gpu-signcache", "sign")],
                               "cache_stochastic": fused[("gpu-signcache", "stochastic")]}


def time_flips(setting, layer, rows, cols, op_ms):
    w = random_weight(rows, cols)
    n = rows * cols
    nbytes = 2.4 * n + 4.0 * w.E.numel()
    wd = random_weight(rows, cols)
    dense = record(setting, layer, "flips", "dense-fallback", lambda: apply_flips_naive_(wd, 32, True, 32), 0, nbytes)
    counts = torch.zeros(2, dtype=torch.int32, device=DEV)
    fused = record(setting, layer, "flips", "fused", lambda: apply_flips_(w, 32, True, 32, counts), 0, nbytes,
                   dense_ms=dense)
    cache = VoteCache.for_weight(w, "sign", 1)
    cache.buf.copy_(encode_vote_cache(torch.randint(-1, 2, (rows, cols), device=DEV, dtype=torch.int8), cache.bits))
    c2 = record(setting, layer, "flips", f"signcache step (accumulate+flip, {cache.bits}-bit)",
                lambda: flip_triton_(w, 32, True, 32, counts, cache), 0, nbytes + n * cache.bits / 8, dense_ms=dense)
    if DEV.type == "cuda" and setting == "seed":
        record(setting, layer, "flips", "fused", lambda: apply_flips_(w, 32, True, 32, counts), 0, nbytes, graph=True,
               dense_ms=dense)
    op_ms[(layer, "flips")] = {"dense": dense, "fused": fused, "cache": c2}


def totals(setting, op_ms, n_layers):
    """Per training step, all linear layers of the model: forward + backward-input + votes + flips."""
    impls = ("dense-fallback", "gpu (fused matmul)", "gpu (best matmul impl)", "gpu-signcache (stochastic)",
             "gpu-signcache (sign votes, 2-bit)")
    per = dict.fromkeys(impls, 0.0)
    if not all(op in ARGS.ops.split(",") for op in ("matmul", "votes", "flips")):
        return  # --ops left some out: no totals
    for layer in layer_shapes(1):
        k = 1 if layer == "head" else n_layers
        mm = [op_ms.get((layer, op)) for op in ("fwd", "bwd-input")]
        v, f = op_ms.get((layer, "votes")), op_ms.get((layer, "flips"))
        if None in mm or v is None or f is None:
            continue
        per["dense-fallback"] += k * (mm[0]["dense"] + mm[1]["dense"] + v["dense"] + f["dense"])
        per["gpu (fused matmul)"] += k * (mm[0]["fused"] + mm[1]["fused"] + v["fused"] + f["fused"])
        best = sum(min(m["fused"], m["dequant"]) for m in mm)
        per["gpu (best matmul impl)"] += k * (best + v["fused"] + f["fused"])
        per["gpu-signcache (stochastic)"] += k * (best + v["cache_stochastic"] + f["cache"])
        per["gpu-signcache (sign votes, 2-bit)"] += k * (best + v["cache_sign"] + f["cache"])
    for impl, ms in per.items():
        B.add("totals", {"setting": setting, "impl": impl, "ms_per_step_linear_layers": ms})


def time_setting(setting, deadline: float):
    """Time every layer of ``setting``; stop (recorded as an error) once ``deadline`` seconds have elapsed."""
    d, M, n_layers = SETTINGS[setting]
    op_ms = {}
    for layer, (rows, cols) in layer_shapes(d).items():
        if B.elapsed() > deadline:
            B.error(f"timings {setting}", f"time budget reached before {layer}")
            break
        ops = ARGS.ops.split(",")
        if "matmul" in ops:
            with B.section(f"matmul {setting} {layer}") as go:
                if go:
                    time_matmul(setting, layer, rows, cols, M, op_ms)
        if "votes" in ops:
            with B.section(f"votes {setting} {layer}") as go:
                if go:
                    time_votes(setting, layer, rows, cols, M, op_ms)
        if "flips" in ops:
            with B.section(f"flips {setting} {layer}") as go:
                if go:
                    time_flips(setting, layer, rows, cols, op_ms)
    totals(setting, op_ms, n_layers)
    # auto dispatch advice: fused vs dequant+cuBLAS at this token count
    wins = [m["fused"] <= m["dequant"] for (_, op), m in op_ms.items() if op in ("fwd", "bwd-input")]
    if wins:
        B.res["recommendations"][f"fused_matmul_wins_at_{M}_tokens"] = f"{sum(wins)}/{len(wins)} shapes"


# ------------------------------------------------------------------------------------------------ 2. accuracy


def measure_accuracy(deadline: float):
    """fp8 vs bf16 accuracy of the fused kernel at the real shapes, against the exact fp32 product."""
    for setting, (d, tokens, _) in SETTINGS.items():
        for name, (rows, cols) in layer_shapes(d).items():
            if B.elapsed() > deadline:
                return
            w = random_weight(rows, cols)
            for transposed in (False, True):
                x = randn(tokens, rows if transposed else cols)
                exact = ternary_matmul_naive(x.float(), w, transposed)
                B.add("accuracy", {"setting": setting, "layer": name, "op": "bwd" if transposed else "fwd",
                                   "rel_err_bf16": rel_err(ternary_matmul_triton(x, w, transposed), exact),
                                   "rel_err_fp8": rel_err(ternary_matmul_triton(x, w, transposed, fp8=True), exact)})


# ------------------------------------------------------------------------------------------------ 3. sweeps


MATMUL_CONFIGS_BIG = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
                      (64, 128, 64, 4, 4)]
MATMUL_CONFIGS_SMALL = [(32, 64, 128, 4, 4), (64, 32, 128, 4, 4), (32, 16, 128, 4, 4), (64, 16, 64, 4, 3),
                        (128, 16, 64, 4, 3)]
VOTES_CONFIGS_BIG = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
                     (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 32, 8, 4),
                     (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (32, 32, 64, 4, 3)]
VOTES_CONFIGS_SMALL = [(64, 64, 32, 4, 2), (64, 128, 32, 4, 2), (128, 128, 32, 8, 2), (64, 64, 64, 4, 3),
                       (128, 64, 32, 4, 2), (32, 32, 64, 4, 2)]


def sweep_one(key: str, configs: list[dict], default: dict, run) -> None:
    """Time ``run(config)`` for each config; record all and the best under ``recommendations[key]``."""
    best = None
    for cfg in configs:
        if B.out_of_time(25):
            return
        try:
            ms = kernel_ms(lambda cfg=cfg: run(cfg), device=DEV)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this config
            ms, cfg = float("inf"), dict(cfg, error=repr(e)[:200])
        B.add("sweeps", {"kernel": key, "config": cfg, "ms": ms})
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best is not None:
        B.res["recommendations"][key] = {"best": best[1], "ms": best[0], "default": default}


def matmul_configs(big: bool) -> list[dict]:
    return [{"BLOCK_O": o, "BLOCK_M": m, "BLOCK_R": r, "num_warps": nw, "num_stages": ns}
            for o, m, r, nw, ns in (MATMUL_CONFIGS_BIG if big else MATMUL_CONFIGS_SMALL)]


def votes_configs(big: bool, norm_block: int) -> list[dict]:
    """Tile configs whose edges are multiples of ``norm_block`` (the epilogue's normalisation tiles)."""
    return [{"BLOCK_R": r, "BLOCK_C": c, "BLOCK_K": k, "num_warps": nw, "num_stages": ns}
            for r, c, k, nw, ns in (VOTES_CONFIGS_BIG if big else VOTES_CONFIGS_SMALL)
            if r % norm_block == 0 and c % norm_block == 0]


def sweep(setting):
    d, M, _ = SETTINGS[setting]
    big = M >= 1024
    kinds = {k.strip() for k in ARGS.sweep_kernels.split(",")}
    for layer, (rows, cols) in layer_shapes(d).items():
        if layer == "head" or B.out_of_time(25):
            continue
        w = random_weight(rows, cols)
        for transposed in (False, True) if "matmul" in kinds else ():
            a = randn(M, rows if transposed else cols)
            sweep_one(f"matmul {'bwd' if transposed else 'fwd'} {setting} {layer}", matmul_configs(big),
                      default_matmul_config(M, cols if transposed else rows, DEV),
                      lambda cfg, a=a, w=w, transposed=transposed: ternary_matmul_triton(a, w, transposed, config=cfg))
        gy, x = randn(M, rows), randn(M, cols)
        gE, flag = torch.zeros(rows, w.n_groups, device=DEV), torch.zeros((), device=DEV)
        step = torch.zeros((), dtype=torch.int64, device=DEV)
        nb = NORM_BLOCK if not ARGS.smoke else 16

        codes = empty_norm_codes((rows, cols), nb, DEV)  # the default rule: its moving averages in the epilogue

        def run_votes(cfg, gy=gy, x=x, w=w, gE=gE, flag=flag, step=step, nb=nb, codes=codes):
            matmul_votes_(gy, x, w, vote="stochastic", lr=4.0, vote_clip=8, norm_block=nb, decay=0.0, key_base=1,
                          call=0, step=step, calls_per_step=CALLS, gE=gE, flag=flag, config=cfg, norm_codes=codes,
                          norm_beta=FlipRule().norm_beta, norm_key_base=2)

        if "votes" not in kinds:
            continue
        sweep_one(f"votes {setting} {layer}", votes_configs(big, nb), default_votes_config(M, rows, cols, DEV, nb),
                  run_votes)


# ------------------------------------------------------------------------------------------------ main


def print_table():
    r = B.res
    env = r["env"]
    lines = [f"== bench_kernels: {env.get('gpu', env['device'])}  torch {env['torch']}  triton {env['triton']}  "
             f"({B.elapsed():.0f}s)"]
    if r.get("accuracy"):
        e16 = max(a["rel_err_bf16"] for a in r["accuracy"])
        e8 = max(a["rel_err_fp8"] for a in r["accuracy"])
        lines.append(f"accuracy vs exact fp32 (max over shapes): fused bf16 {e16:.2e}, fused fp8 {e8:.2e}")
    lines.append(f"{'setting':7} {'layer':5} {'op':9} {'impl':40} {'ms':>9} {'floor':>8} {'%floor':>6} "
                 f"{'TF/s':>7} {'GB/s':>7} {'x dense':>7}")
    for t in r.get("timings", []):
        sp = f"{t['speedup_vs_dense']:.1f}" if t["speedup_vs_dense"] else "-"
        lines.append(f"{t['setting']:7} {t['layer']:5} {t['op']:9} {t['impl'][:40]:40} {t['ms']:9.4f} "
                     f"{t['floor_ms']:8.4f} {t['pct_of_floor']:6.1f} {t['tflops']:7.1f} {t['gbps']:7.0f} {sp:>7}")
    for t in r.get("totals", []):
        lines.append(f"TOTAL {t['setting']:5} linear layers per step: {t['impl']:26} "
                     f"{t['ms_per_step_linear_layers']:9.3f} ms")
    for k, v in r["recommendations"].items():
        lines.append(f"recommend {k}: {v}")
    for e in r["errors"]:
        lines.append(f"ERROR {e['section']}: {e['error'][:200]}")
    print("\n".join(lines))


def main():
    B.res["env"].update(smoke=ARGS.smoke, peaks=PEAK, group_size=GROUP_SIZE, settings=SETTINGS)
    settings = [s.strip() for s in ARGS.settings.split(",") if s.strip()]
    # deadlines (fractions of --budget) keep some time for every section if compilation is slow
    for setting, frac in (("151M", 0.5), ("seed", 0.75)):
        if setting in settings and not ARGS.skip_timings:
            with B.section(f"timings {setting}") as go:
                if go:
                    time_setting(setting, frac * B.budget)
    if not ARGS.skip_checks:
        with B.section("accuracy fp8 vs bf16") as go:
            if go:
                measure_accuracy(0.85 * B.budget)
    if not ARGS.no_sweep:
        for setting in settings:
            with B.section(f"sweep {setting}") as go:
                if go:
                    sweep(setting)
    return B.finish(print_table)


if __name__ == "__main__":
    sys.exit(main())
