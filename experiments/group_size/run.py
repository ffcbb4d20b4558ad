#!/usr/bin/env python3
"""How the group size trades state bytes for fidelity of the ternary weight (docs/learning.md, "Group size").

    python3 experiments/group_size/run.py      # any machine, a few seconds

For each group size: training-state and inference bytes per weight of a 512 x 2048 matrix (measured from a
real TernaryScaleTensor), and the relative error ||w - T * 2**E|| / ||w|| of ternarising float weights with
one power-of-two scale per group, for Gaussian weights and for weights whose rows and columns have
log-normally spread magnitudes (as trained layers do: some inputs and outputs matter more).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch  # noqa: E402

from trueternary.quant import group_absmean_log2  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

ROWS, COLS = 512, 2048


def rel_error(w: torch.Tensor, group_size: int) -> float:
    T, E = group_absmean_log2(w, group_size)
    scale = torch.exp2(E.float()).repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    return float((w - T.float() * scale).norm() / w.norm())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(ROWS, COLS, generator=g)
    row_scale = torch.exp(0.5 * torch.randn(ROWS, 1, generator=g))
    spread = gaussian * row_scale * torch.exp(0.5 * torch.randn(1, COLS, generator=g))
    print(f"{'group':>7} {'train B/w':>10} {'infer B/w':>10} {'err gauss':>10} {'err spread':>11}")
    for gs in (16, 32, 64, 128, 256, 2048):
        t = TernaryScaleTensor(ROWS, COLS, gs, init=False)
        n = ROWS * COLS
        print(f"{gs:>7} {t.training_state_bytes() / n:>10.4f} {t.inference_bytes() / n:>10.4f} "
              f"{rel_error(gaussian, gs):>10.4f} {rel_error(spread, gs):>11.4f}")


if __name__ == "__main__":
    main()
