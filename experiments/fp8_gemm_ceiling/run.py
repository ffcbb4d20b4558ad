#!/usr/bin/env python3
"""What tensor-core GEMMs alone allow at the 151M step (issue 5's 1.3x question): bf16 cuBLAS vs fp8 (e4m3)
``torch._scaled_mm`` for the three GEMMs of every linear layer, 16,384 tokens.

    python3 experiments/fp8_gemm_ceiling/run.py    # CUDA only; writes $OUT/gemm_ceiling.json (OUT defaults to ./out)

Per layer (qkv, proj, up, down, head): forward ``x @ W.T``, backward-input ``gy @ W``, weight gradient
``gy.T @ x``, each in bf16 and in fp8 with row-wise scales (per token for x / gy; the weight-gradient form
needs K-major copies, here ``gy.T`` and ``x.T`` made contiguous beforehand, untimed) and tensor-wise scales;
plus what feeding fp8 costs: a per-row quantisation in plain PyTorch, a bare cast, a transposed cast.
Median of 30 CUDA-event timings after 5 burn-in calls (harness.event_ms). Ternary values are exact in e4m3, so
an fp8 weight operand loses nothing; the activations and gradients do (per-token scales). The answer and the
measured numbers: README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks")]

import torch  # noqa: E402
from harness import add_out_arg, env_info, event_ms, out_dir, require_cuda, write_json  # noqa: E402

F8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
M = 16384
SHAPES = {"qkv": (3072, 1024), "proj": (1024, 1024), "up": (4096, 1024), "down": (1024, 4096), "head": (288, 1024)}


def bench(fn) -> float:
    return statistics.median(event_ms(fn, warmup=5, repeats=30, device="cuda"))


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3: x / (amax / 448), the scale as a (rows, 1) float32 column."""
    a = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
    return (x.float() / a).to(F8), a


def layer_row(name: str, N: int, K: int) -> dict:
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=BF16)
    W = torch.randn(N, K, device=dev, dtype=BF16) * 0.02
    gy = torch.randn(M, N, device=dev, dtype=BF16)
    row = {"layer": name, "rows": N, "cols": K, "tokens": M,
           "bf16_fwd": bench(lambda: x @ W.t()), "bf16_bwd_input": bench(lambda: gy @ W),
           "bf16_weight_grad": bench(lambda: gy.t() @ x)}
    xq, sx = quant_rows(x)
    gq, sg = quant_rows(gy)
    Wq, WqT = W.to(F8), W.t().contiguous().to(F8)
    one = torch.ones((), device=dev)
    row["fp8_fwd_rowwise"] = bench(lambda: torch._scaled_mm(xq, Wq.t(), scale_a=sx,
                                                          scale_b=torch.ones(1, N, device=dev), out_dtype=BF16))
    row["fp8_fwd_tensorwise"] = bench(lambda: torch._scaled_mm(xq, Wq.t(), scale_a=one, scale_b=one, out_dtype=BF16))
    row["fp8_bwd_input_rowwise"] = bench(lambda: torch._scaled_mm(gq, WqT.t(), scale_a=sg,
                                                                 scale_b=torch.ones(1, K, device=dev), out_dtype=BF16))
    gT, xT = gy.t().contiguous().to(F8), x.t().contiguous().to(F8)
    row["fp8_weight_grad_rowwise"] = bench(lambda: torch._scaled_mm(
        gT, xT.t(), scale_a=torch.ones(N, 1, device=dev), scale_b=torch.ones(1, K, device=dev), out_dtype=BF16))
    row["fp8_weight_grad_tensorwise_fp32_out"] = bench(lambda: torch._scaled_mm(gT, xT.t(), scale_a=one, scale_b=one,
                                                                               out_dtype=torch.float32))
    row["quant_rows_torch"] = bench(lambda: quant_rows(x))
    row["cast_fp8"] = bench(lambda: x.to(F8))
    row["transpose_cast_fp8"] = bench(lambda: x.t().contiguous().to(F8))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_arg(p)
    args = p.parse_args()
    out = out_dir(p, args.out)
    require_cuda(p, "it times cuBLAS GEMMs")
    rows = []
    for name, (N, K) in SHAPES.items():
        rows.append(layer_row(name, N, K))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    write_json(out / "gemm_ceiling.json", {"env": env_info("cuda"), "layers": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
