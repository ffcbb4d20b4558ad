#!/usr/bin/env python3
"""Is a TrueTernary `gpu` training step deterministic at the 151M shape? Two identical runs of two eager steps
from the same state, compared on every T_accum, with PyTorch's default SDPA backend and with the math backend.

    python3 experiments/sdpa_determinism/run.py    # CUDA only; prints the fraction of T_accum entries that differ

Why: a CUDA-graphed step checked against eager steps, or a resumed GPU run against an uninterrupted one, can
agree bit for bit only if the backward is deterministic. The answer: README.md beside this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from harness import require_cuda  # noqa: E402

from trueternary.models.transformer import ByteTransformer, TransformerConfig  # noqa: E402
from trueternary.recipes import Hparams, build_recipe  # noqa: E402

CFG = TransformerConfig(ctx=512, d_model=1024, n_layers=12, n_heads=16)


def mismatch(x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> float:
    runs = []
    for _ in range(2):
        base = ByteTransformer(CFG, generator=torch.Generator().manual_seed(1234))
        r = build_recipe("TrueTernary", base, Hparams(steps=1000), device="cuda", backend="gpu", seed=0)
        r.flip.check_finite = False
        for _ in range(steps):
            r.train_step(x, y, True)
        runs.append({k: v.clone() for k, v in r.model.state_dict().items() if k.endswith("T_accum")})
    a, b = runs
    return sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args()
    require_cuda(p, "it runs training steps on the GPU")
    seq = torch.randint(0, 256, (32, CFG.ctx + 1), generator=torch.Generator().manual_seed(99)).cuda()
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    print("default SDPA: T_accum mismatch between two identical runs:", mismatch(x, y), flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    print("math SDPA:    T_accum mismatch between two identical runs:", mismatch(x, y), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
