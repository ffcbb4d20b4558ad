#!/usr/bin/env python3
"""GPU check and benchmark of the issue-5 Triton kernels: packed ternary matmul (forward, backward-input;
bf16 and fp8), fused weight-gradient votes, fused flips, and the gpu-signcache variant.

    python3 scripts/bench_kernels.py                  # on a CUDA machine, from the repo root (~4 min on an H100)
    python3 scripts/bench_kernels.py --smoke          # CPU: Triton interpreter, tiny shapes (checks the script)

Output: a compact table on stdout (last), ``$OUT/bench_kernels.json`` (``OUT`` defaults to ./out).

1. correctness on the GPU against the plain-PyTorch references, random data drawn fresh for every check,
   NaN/inf never passes: integer state bit-exact (small-integer inputs make the gradient and its per-tile
   sums of squares exact), float outputs within stated relative-L2 tolerances; the vote kernel with the
   block_factored epilogue (norm_block 16/64/128, sub-tiled), the scale-vote kernel ('tensor' and
   'block_factored'), and a two-layer model trained 3 steps through FlipOptimizer with backends gpu /
   gpu-signcache against dense-fallback (integer state bit-identical); fp8 vs bf16 accuracy at the real shapes;
2. per-kernel median time (triton.testing.do_bench, L2 flushed between runs) vs its floor
   ``max(FLOPs / peak, bytes / HBM)`` with H100 peaks bf16 760 TFLOP/s, fp8 1270 TFLOP/s, HBM 3.0 TB/s,
   and vs the dense-fallback path (unpack + torch.matmul; gW matmul + FlipOptimizer votes; reference flips;
   the fused votes are timed through FlipOptimizer.cast_matmul_votes with backends gpu / gpu-signcache),
   at the linear layers of the 151M model (d=1024, 12 layers, 32x512 tokens) and the seed setting
   (d=512, 4 layers, 4x33 tokens); CUDA-graph replay times at the seed setting (launch-bound);
3. tile-config sweeps of the fused matmul and vote kernels (best config per shape).

Every section runs in try/except: a failure is recorded (JSON ``errors``) and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PEAK = {"bf16": 760e12, "fp8": 1270e12, "hbm": 3.0e12}
GROUP_SIZE = 64
SETTINGS = {  # name: (d_model, tokens per step, transformer blocks)
    "seed": (512, 4 * 33, 4),
    "151M": (1024, 32 * 512, 12),
}


def layer_shapes(d: int) -> dict[str, tuple[int, int]]:
    """(rows, cols) = (out_features, in_features) of one block's linear maps, and the vocabulary head."""
    return {"qkv": (3 * d, d), "proj": (d, d), "up": (4 * d, d), "down": (d, 4 * d), "head": (288, d)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU run under the Triton interpreter with tiny shapes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds (default 210 on CUDA, unlimited with --smoke); later sections stop when exceeded")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT or ./out)")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweeps")
    p.add_argument("--sweep-kernels", default="matmul,votes", help="comma-separated kernels to sweep: matmul, votes")
    p.add_argument("--skip-timings", action="store_true", help="skip the per-kernel timings (e.g. to sweep only)")
    p.add_argument("--skip-checks", action="store_true",
                   help="skip the GPU correctness checks and the fp8 accuracy section (timings only)")
    p.add_argument("--settings", default="151M,seed", help="comma-separated settings to time: 151M, seed")
    p.add_argument("--ops", default="matmul,votes,flips", help="comma-separated ops to time: matmul, votes, flips")
    args = p.parse_args()
    bad = sorted(set(args.ops.split(",")) - {"matmul", "votes", "flips"})
    if bad:
        p.error(f"unknown --ops {', '.join(bad)} (choose from matmul, votes, flips)")
    return args


ARGS = parse_args()
if ARGS.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402

if not ARGS.smoke and not torch.cuda.is_available():
    print("bench_kernels: error: no CUDA device (use --smoke for a CPU check of the script)", file=sys.stderr)
    sys.exit(2)

import triton  # noqa: E402
import triton.testing  # noqa: E402

import trueternary.ops.votes as votes_ops  # noqa: E402
from trueternary import rng  # noqa: E402
from trueternary.layers import TernaryLinear, set_linear_kernel  # noqa: E402
from trueternary.ops.flip import apply_flips_, apply_flips_naive_  # noqa: E402
from trueternary.ops.flip.triton import flip_triton_  # noqa: E402
from trueternary.ops.ternary_matmul import ternary_matmul, ternary_matmul_naive  # noqa: E402
from trueternary.ops.ternary_matmul.naive import quantize_rows_fp8, ternary_matmul_fp8_naive  # noqa: E402
from trueternary.ops.ternary_matmul.triton import (  # noqa: E402
    default_matmul_config,
    dequant_triton,
    ternary_matmul_triton,
)
from trueternary.ops.votes import VoteCache, encode_vote_cache, matmul_votes_naive, scale_votes_naive  # noqa: E402
from trueternary.ops.votes.triton import default_votes_config, key_base, matmul_votes_, scale_votes_  # noqa: E402
from trueternary.optim import FlipOptimizer  # noqa: E402
from trueternary.rule import FlipRule, accumulate, empty_norm_codes  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
BF16 = torch.bfloat16
if ARGS.smoke:  # tiny stand-ins with the same structure (ragged on purpose)
    SETTINGS = {"seed": (40, 33, 1), "151M": (48, 70, 1)}
    GROUP_SIZE = 16


class Bench:
    def __init__(self, budget: float):
        self.t0 = time.time()
        self.budget = budget
        self.res: dict = {"env": {}, "correctness": [], "accuracy": [], "timings": [], "sweeps": [], "totals": [],
                          "recommendations": {}, "errors": []}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def out_of_time(self, reserve: float = 0.0) -> bool:
        return self.elapsed() > self.budget - reserve

    @contextmanager
    def section(self, name: str):
        t = time.time()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            self.res["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()[-3000:]})
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        print(f"[{name}] {time.time() - t:.1f}s (total {self.elapsed():.0f}s)", file=sys.stderr)
        self.save()  # partial results survive a kill

    def save(self) -> Path:
        out = Path(ARGS.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "bench_kernels.json"
        path.write_text(json.dumps(self.res, indent=1, default=str))
        return path

    def check(self, name: str, ok: bool, **detail):
        self.res["correctness"].append({"check": name, "ok": bool(ok), **detail})
        if not ok:
            print(f"  CHECK FAILED {name}: {detail}", file=sys.stderr)


B = Bench(ARGS.budget if ARGS.budget is not None else (1e9 if ARGS.smoke else 210.0))


# ------------------------------------------------------------------------------------------------ helpers


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, graph: bool = False) -> float:
    """Median milliseconds per call (CUDA events; L2 flushed between calls) or per CUDA-graph replay."""
    if DEV.type != "cuda":
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` in float64; inf when either has NaN/inf, so a NaN never passes ``err <= tol``."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


_SEED = [1000]


def fresh_seed() -> int:
    _SEED[0] += 1
    return _SEED[0]


def random_weight(rows: int, cols: int, gs: int = GROUP_SIZE, e_low: int = -8, e_high: int = -3) -> TernaryScaleTensor:
    w = TernaryScaleTensor(rows, cols, gs, device=DEV, init=False)
    g = gen(fresh_seed())
    w.set_trits(torch.randint(-1, 2, (rows, cols), generator=g, device=DEV))
    w.E.copy_(torch.randint(e_low, e_high + 1, w.E.shape, generator=g, device=DEV, dtype=torch.int8))
    w.T_accum.copy_(torch.randint(-127, 128, (rows, cols), generator=g, device=DEV, dtype=torch.int8))
    w.E_accum.copy_(torch.randint(-127, 128, w.E.shape, generator=g, device=DEV, dtype=torch.int8))
    return w


def randn(*shape, dtype=BF16) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(fresh_seed()), device=DEV).to(dtype)


def small_ints(*shape, dtype=BF16) -> torch.Tensor:
    return torch.randint(-3, 4, shape, generator=gen(fresh_seed()), device=DEV).to(dtype)


def state_equal(a: TernaryScaleTensor, b: TernaryScaleTensor, names=("T_packed", "T_accum", "E", "E_accum")):
    return {n: bool(torch.equal(getattr(a, n), getattr(b, n))) for n in names}


def rule_group(**overrides) -> dict:
    return FlipRule(**overrides).to_dict()


# ------------------------------------------------------------------------------------------------ 1. correctness


def check_matmul():
    for rows, cols, M in ((100, 203, 77), (37, 64, 5)):
        w = random_weight(rows, cols)
        W, _ = dequant_triton(w, BF16)
        B.check(f"dequant bf16 {rows}x{cols}", torch.equal(W, w.dense(BF16)))
        for transposed in (False, True):
            x = randn(M, rows if transposed else cols)
            exact = ternary_matmul_naive(x.float(), w, transposed)
            err = rel_err(ternary_matmul_triton(x, w, transposed), exact)
            op = "bwd" if transposed else "fwd"
            B.check(f"fused bf16 {op} {rows}x{cols} M{M}", err <= 1e-2, rel_err=err, tol=1e-2)
            model = ternary_matmul_fp8_naive(x.float(), w, transposed)
            err8 = rel_err(ternary_matmul_triton(x, w, transposed, fp8=True), model)
            B.check(f"fused fp8 vs its model {op} {rows}x{cols} M{M}", err8 <= 1e-2, rel_err=err8, tol=1e-2)
            errd = rel_err(ternary_matmul(x, w, transposed, impl="dequant"), exact)
            B.check(f"dequant+cublas {'bwd' if transposed else 'fwd'} {rows}x{cols} M{M}", errd <= 1e-2, rel_err=errd)


def check_accuracy(deadline: float):
    """fp8 vs bf16 accuracy of the fused kernel at the real shapes, against the exact fp32 product."""
    for setting, (d, tokens, _) in SETTINGS.items():
        for name, (rows, cols) in layer_shapes(d).items():
            if B.elapsed() > deadline:
                return
            w = random_weight(rows, cols)
            for transposed in (False, True):
                x = randn(tokens, rows if transposed else cols)
                exact = ternary_matmul_naive(x.float(), w, transposed)
                e16 = rel_err(ternary_matmul_triton(x, w, transposed), exact)
                e8 = rel_err(ternary_matmul_triton(x, w, transposed, fp8=True), exact)
                B.res["accuracy"].append({"setting": setting, "layer": name, "op": "bwd" if transposed else "fwd",
                                          "rel_err_bf16": e16, "rel_err_fp8": e8})
                B.check(f"accuracy {setting} {name} {'bwd' if transposed else 'fwd'}", e16 <= 1e-2 and e8 <= 0.08,
                        rel_err_bf16=e16, rel_err_fp8=e8)


CALLS = 1024  # FlipOptimizer's RNG counter slots per step
NORM_BLOCK = FlipRule().norm_block


def launch_votes(w, gy, x, *, vote="stochastic", lr=2.0, vote_clip=8, norm_block=NORM_BLOCK, decay=0.0, step=5,
                 call=2, **kw) -> torch.Tensor:
    """matmul_votes_ with keys of (seed 3, stream 1, step, call); returns the key the reference must use."""
    matmul_votes_(gy, x, w, vote=vote, lr=lr, vote_clip=vote_clip, norm_block=norm_block, decay=decay,
                  key_base=key_base(3, 1), call=call, step=torch.tensor(step, device=DEV), calls_per_step=CALLS, **kw)
    return rng.stream_key(3, 1, step * CALLS + call).to(DEV)


def ternary_ints(*shape, dtype=BF16) -> torch.Tensor:
    """Values in {-1, 0, 1}: gW and every per-tile sum of gW**2 stay exact integers in fp32 (< 2**24)."""
    return torch.randint(-1, 2, shape, generator=gen(fresh_seed()), device=DEV).to(dtype)


def check_votes_kernel():
    # (rows, cols, M, group size, norm_block, tile): ragged edges, sub-tile statistics (64 in 128), 128, 16
    cases = [(100, 203, 77, 64, 64, None), (300, 260, 40, 5, 64, {"BLOCK_R": 128, "BLOCK_C": 128}),
             (64, 96, 33, 128, 16, None), (200, 300, 20, 64, 128, None), (3, 2, 1, 1, 64, None)]
    if ARGS.smoke:
        cases = [(20, 37, 9, 8, 16, {"BLOCK_R": 16, "BLOCK_C": 16}), (40, 70, 9, 5, 16, {"BLOCK_R": 32, "BLOCK_C": 32})]
    for rows, cols, M, gs, nb, config in cases:
        for vote, decay in (("stochastic", 0.25), ("sign", 0.0)):
            w = random_weight(rows, cols, gs)
            A0 = w.T_accum.clone()
            gy, x = ternary_ints(M, rows), ternary_ints(M, cols)
            gE = torch.zeros(rows, w.n_groups, device=DEV)
            flag = torch.zeros((), device=DEV)
            key = launch_votes(w, gy, x, vote=vote, decay=decay, norm_block=nb, gE=gE, flag=flag, config=config)
            v, ref_gE, _ = matmul_votes_naive(gy, x, w, 2.0, key, vote=vote, vote_clip=8, norm_block=nb, decay=decay,
                                              scale_grad=True)
            ok = torch.equal(w.T_accum, accumulate(A0, v)) and torch.equal(gE, ref_gE) and float(flag) == 0
            B.check(f"votes kernel exact {vote} {rows}x{cols} M{M} g{gs} nb{nb} tile {config or 'default'}", ok,
                    differing=int((w.T_accum != accumulate(A0, v)).sum()))
    # random float inputs: agreement up to summation order
    rows, cols, M = (256, 320, 500) if not ARGS.smoke else (40, 45, 33)
    w = random_weight(rows, cols)
    A0 = w.T_accum.clone()
    gy, x = randn(M, rows), randn(M, cols)
    nb = NORM_BLOCK if not ARGS.smoke else 16
    key = launch_votes(w, gy, x, lr=4.0, decay=0.1, norm_block=nb,
                       config=None if not ARGS.smoke else {"BLOCK_R": 16, "BLOCK_C": 16})
    v = matmul_votes_naive(gy, x, w, 4.0, key, vote="stochastic", vote_clip=8, norm_block=nb, decay=0.1)[0]
    diff = (w.T_accum.int() - accumulate(A0, v).int()).abs()
    frac = float((diff > 0).float().mean())
    B.check("votes kernel random bf16 inputs (fraction of differing votes)", int(diff.max()) <= 1 and frac <= 1e-3,
            mismatch_fraction=frac, max_abs_diff=int(diff.max()))


def check_scale_votes():
    """E votes: 'tensor' (mean(gE**2): on CUDA PyTorch computes sum * float32(1/n), the kernel too) and
    'block_factored' normalisation, bit-exact on integer gE."""
    for normalize in ("tensor", "block_factored"):
        for rows, ng in ((3072, 16), (300, 7), (1, 1)):
            gE = torch.randint(-300, 301, (rows, ng), generator=gen(fresh_seed()), device=DEV).float()
            EA = torch.randint(-127, 128, (rows, ng), generator=gen(fresh_seed()), device=DEV, dtype=torch.int8)
            ref = scale_votes_naive(gE, EA, 1.0, rng.stream_key(3, 2, 7), vote="stochastic", vote_clip=8,
                                    normalize=normalize, norm_block=16 if ARGS.smoke else NORM_BLOCK)
            scale_votes_(gE, EA, vote="stochastic", lr_e=1.0, vote_clip=8, normalize=normalize,
                         norm_block=16 if ARGS.smoke else NORM_BLOCK, key_base=key_base(3, 2), call=7,
                         step=torch.tensor(0, device=DEV), calls_per_step=CALLS)
            B.check(f"scale votes exact {normalize} {rows}x{ng}", torch.equal(EA, ref),
                    differing=int((EA != ref).sum()))


class MLP(torch.nn.Module):
    """Two ternary layers, ragged sizes, a bias, unit scales: with inputs in {-1, 0, 1} the gradients are small
    integers, so every partial sum (gW, the per-tile sums of gW**2) is exact in float32 in any order."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.a = TernaryLinear(d_in, d_hidden, bias=True, group_size=GROUP_SIZE, device=DEV)
        self.b = TernaryLinear(d_hidden, d_out, group_size=GROUP_SIZE, device=DEV)
        for w in (self.a.weight, self.b.weight):
            w.E.zero_()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def run_training_pair(rule: dict, backend: str, steps=3, calls=1) -> dict:
    """The MLP trained through FlipOptimizer: dense-fallback vs ``backend`` (kernels: forward and backward-input
    matmul, fused votes, fused flips) on the same exact data; returns the names of differing state entries."""
    dims = (130, 200, 70) if not ARGS.smoke else (24, 40, 18)
    ref = MLP(*dims)
    ker = MLP(*dims)
    ker.load_state_dict(ref.state_dict())
    o_ref = FlipOptimizer(ref, backend="dense-fallback", seed=5, check_finite=False, **rule)
    o_ker = FlipOptimizer(ker, backend="dense-fallback" if DEV.type == "cpu" else backend, seed=5, check_finite=False,
                          **rule)
    o_ker.backend = backend  # (on CPU, --smoke: the constructor refuses gpu backends; the interpreter runs them)
    set_linear_kernel(ker, o_ker.backend.linear_kernel)
    for step in range(steps):
        for _ in range(calls):
            x = torch.randint(-1, 2, (3, 7, dims[0]), generator=gen(fresh_seed()), device=DEV).float()
            c = torch.randint(-1, 2, (3, 7, dims[2]), generator=gen(fresh_seed()), device=DEV).float()
            (ref(x) * c).sum().backward()
            (ker(x) * c).sum().backward()
        o_ref.step()
        o_ker.step()
        sr, sk = ref.state_dict(), ker.state_dict()
        bad = [n for n in sr if not torch.equal(sr[n], sk[n])]
        if bad or int(o_ref.last_flips) != int(o_ker.last_flips):
            return {"step": step, "differing": bad, "flips": [int(o_ref.last_flips), int(o_ker.last_flips)]}
    return {"differing": [], "flips_last_step": int(o_ref.last_flips)}


def check_training_pairs():
    nb = {"norm_block": 16} if ARGS.smoke else {}
    rules = {"default": dict(nb, accum_threshold=4), "decay-interval2-clip3": dict(nb, decay=0.3, vote_clip=3,
                                                                                    scale_update_interval=2),
             "seed-naive": FlipRule.naive(accum_threshold=4).to_dict(), "leak3": dict(nb, leak=3, accum_threshold=6),
             "sign-T-stochastic-E-tensor": {"vote": "sign", "normalize": "tensor", "accum_threshold": 3}}
    for name, rule in rules.items():
        r = run_training_pair(rule, "gpu")
        B.check(f"gpu backend training steps == dense-fallback ({name})", not r["differing"], **r)
    for name in ("default", "seed-naive"):
        r = run_training_pair(rules[name], "gpu-signcache", steps=2, calls=2)
        B.check(f"gpu-signcache training steps == dense-fallback ({name}, 2 calls/step)", not r["differing"], **r)


def check_flips():
    for rows, cols in ((101, 203), (3072, 1024) if not ARGS.smoke else (30, 40)):
        for clip, thr, sthr in ((True, 20, 30), (False, 1, None)):
            w = random_weight(rows, cols)
            ref = TernaryScaleTensor(rows, cols, GROUP_SIZE, device=DEV, init=False)
            ref.load_state_dict(w.state_dict())
            c = apply_flips_(w, thr, clip, sthr)
            rc = apply_flips_naive_(ref, thr, clip, sthr)
            eq = state_equal(w, ref)
            B.check(f"flips exact {rows}x{cols} thr{thr} clip{clip}", all(eq.values()) and c.tolist() == rc.tolist(),
                    counts=c.tolist(), ref_counts=rc.tolist(), **eq)
    for vote, clip_v in (("sign", 1), ("stochastic", 8)):
        w = random_weight(64, 96)
        cache = VoteCache.for_weight(w, vote, clip_v)
        lim = 1 if vote == "sign" else clip_v
        votes = torch.randint(-lim, lim + 1, (64, 96), generator=gen(fresh_seed()), device=DEV, dtype=torch.int8)
        cache.buf.copy_(encode_vote_cache(votes, cache.bits))
        ref = TernaryScaleTensor(64, 96, GROUP_SIZE, device=DEV, init=False)
        ref.load_state_dict(w.state_dict())
        ref_cache = VoteCache(cache.buf.clone(), cache.bits, cache.numel, True)
        cache.pending = True
        apply_flips_(w, 20, True, 30, cache=cache)
        apply_flips_naive_(ref, 20, True, 30, cache=ref_cache)
        B.check(f"signcache step exact bits{cache.bits}", all(state_equal(w, ref).values()))


# ------------------------------------------------------------------------------------------------ 2. timings


def floor_ms(flops: float, nbytes: float, peak: str = "bf16") -> float:
    return max(flops / PEAK[peak], nbytes / PEAK["hbm"]) * 1e3


def record(setting, layer, op, impl, fn, flops, nbytes, peak="bf16", graph=False, dense_ms=None):
    ms = bench_ms(fn, graph=graph)
    fl = floor_ms(flops, nbytes, peak)
    row = {"setting": setting, "layer": layer, "op": op, "impl": impl + (" [graph]" if graph else ""), "ms": ms,
           "floor_ms": fl, "pct_of_floor": 100 * fl / ms if ms > 0 else 0.0,
           "tflops": flops / ms / 1e9 if ms > 0 else 0.0, "gbps": nbytes / ms / 1e6 if ms > 0 else 0.0,
           "speedup_vs_dense": (dense_ms / ms) if dense_ms else None}
    B.res["timings"].append(row)
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
            B.res["errors"].append({"section": f"_scaled_mm {setting} {layer} {op}", "error": repr(e)[:300]})
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
    # both sources of the gradient tiles (ops.votes.VOTES_FUSED_MAX_TOKENS picks one; the rows above ran it),
    # on CUDA inside a CUDA graph (GPU time, as in a graphed step: the eager call is host-bound at these sizes)
    w1 = random_weight(rows, cols)
    opt1 = FlipOptimizer(w1, backend="dense-fallback" if DEV.type == "cpu" else "gpu", check_finite=False)
    opt1.backend = "gpu"
    saved = votes_ops.VOTES_FUSED_MAX_TOKENS
    for where, limit in (("in the kernel", M), ("by cuBLAS", M - 1)):
        votes_ops.VOTES_FUSED_MAX_TOKENS = limit
        try:
            record(setting, layer, "votes", f"gpu stochastic (+E), gW {where}",
                   lambda: (opt1.cast_matmul_votes(w1, gy, x, None), opt1.zero_grad()), flops, nbytes,
                   dense_ms=dense, graph=DEV.type == "cuda")
        finally:
            votes_ops.VOTES_FUSED_MAX_TOKENS = saved
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
        B.res["totals"].append({"setting": setting, "impl": impl, "ms_per_step_linear_layers": ms})


def time_setting(setting, deadline: float):
    """Time every layer of ``setting``; stop (recorded as an error) once ``deadline`` seconds have elapsed."""
    d, M, n_layers = SETTINGS[setting]
    op_ms = {}
    for layer, (rows, cols) in layer_shapes(d).items():
        if B.elapsed() > deadline:
            B.res["errors"].append({"section": f"timings {setting}", "error": f"time budget reached before {layer}"})
            break
        ops = ARGS.ops.split(",")
        if "matmul" in ops:
            with B.section(f"matmul {setting} {layer}"):
                time_matmul(setting, layer, rows, cols, M, op_ms)
        if "votes" in ops:
            with B.section(f"votes {setting} {layer}"):
                time_votes(setting, layer, rows, cols, M, op_ms)
        if "flips" in ops:
            with B.section(f"flips {setting} {layer}"):
                time_flips(setting, layer, rows, cols, op_ms)
    totals(setting, op_ms, n_layers)
    # auto dispatch advice: fused vs dequant+cuBLAS at this token count
    wins = [m["fused"] <= m["dequant"] for (_, op), m in op_ms.items() if op in ("fwd", "bwd-input")]
    if wins:
        B.res["recommendations"][f"fused_matmul_wins_at_{M}_tokens"] = f"{sum(wins)}/{len(wins)} shapes"


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
            ms = bench_ms(lambda cfg=cfg: run(cfg))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this config
            ms, cfg = float("inf"), dict(cfg, error=repr(e)[:200])
        B.res["sweeps"].append({"kernel": key, "config": cfg, "ms": ms})
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


def env_info():
    info = {"torch": torch.__version__, "triton": triton.__version__, "device": str(DEV), "smoke": ARGS.smoke,
            "peaks": PEAK, "group_size": GROUP_SIZE, "settings": SETTINGS}
    if DEV.type == "cuda":
        p = torch.cuda.get_device_properties(DEV)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
    B.res["env"] = info


def print_table():
    r = B.res
    lines = []
    ok = sum(c["ok"] for c in r["correctness"])
    lines.append(f"== bench_kernels: {r['env'].get('gpu', r['env']['device'])}  torch {r['env']['torch']}  "
                 f"triton {r['env']['triton']}  ({B.elapsed():.0f}s)")
    lines.append(f"correctness: {ok}/{len(r['correctness'])} checks passed"
                 + "".join(f"\n  FAILED {c['check']}: {({k: v for k, v in c.items() if k not in ('check', 'ok')})}"
                           for c in r["correctness"] if not c["ok"]))
    if r["accuracy"]:
        e16 = max(a["rel_err_bf16"] for a in r["accuracy"])
        e8 = max(a["rel_err_fp8"] for a in r["accuracy"])
        lines.append(f"accuracy vs exact fp32 (max over shapes): fused bf16 {e16:.2e}, fused fp8 {e8:.2e}")
    lines.append(f"{'setting':7} {'layer':5} {'op':9} {'impl':40} {'ms':>9} {'floor':>8} {'%floor':>6} "
                 f"{'TF/s':>7} {'GB/s':>7} {'x dense':>7}")
    for t in r["timings"]:
        sp = f"{t['speedup_vs_dense']:.1f}" if t["speedup_vs_dense"] else "-"
        lines.append(f"{t['setting']:7} {t['layer']:5} {t['op']:9} {t['impl'][:40]:40} {t['ms']:9.4f} "
                     f"{t['floor_ms']:8.4f} {t['pct_of_floor']:6.1f} {t['tflops']:7.1f} {t['gbps']:7.0f} {sp:>7}")
    for t in r["totals"]:
        lines.append(f"TOTAL {t['setting']:5} linear layers per step: {t['impl']:26} "
                     f"{t['ms_per_step_linear_layers']:9.3f} ms")
    for k, v in r["recommendations"].items():
        lines.append(f"recommend {k}: {v}")
    for e in r["errors"]:
        lines.append(f"ERROR {e['section']}: {e['error'][:200]}")
    print("\n".join(lines))


def main():
    env_info()
    settings = [s.strip() for s in ARGS.settings.split(",") if s.strip()]
    if any(s not in SETTINGS for s in settings):
        print(f"bench_kernels: error: --settings takes {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    if not {k.strip() for k in ARGS.sweep_kernels.split(",") if k.strip()} <= {"matmul", "votes"}:
        print("bench_kernels: error: --sweep-kernels takes matmul, votes", file=sys.stderr)
        return 2
    if not ARGS.skip_checks:
        with B.section("correctness: matmul"):
            check_matmul()
        with B.section("correctness: votes kernel"):
            check_votes_kernel()
        with B.section("correctness: scale votes"):
            check_scale_votes()
        with B.section("correctness: training steps vs dense-fallback"):
            check_training_pairs()
        with B.section("correctness: flips"):
            check_flips()
    # deadlines (fractions of --budget) keep some time for every section if compilation is slow
    for setting, frac in (("151M", 0.5), ("seed", 0.75)):
        if setting in settings and not ARGS.skip_timings:
            with B.section(f"timings {setting}"):
                time_setting(setting, frac * B.budget)
    if not ARGS.skip_checks:
        with B.section("accuracy fp8 vs bf16"):
            check_accuracy(0.85 * B.budget)
    if not ARGS.no_sweep:
        for setting in settings:
            with B.section(f"sweep {setting}"):
                sweep(setting)
    path = B.save()
    print_table()
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all(c["ok"] for c in B.res["correctness"]) and not B.res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
