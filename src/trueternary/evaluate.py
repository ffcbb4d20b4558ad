"""Evaluation of a byte model: mean next-byte cross-entropy over fixed windows, in bits per byte.

``train`` evaluates with it every ``--eval_every`` steps, ``bench`` once per config at the end; the windows are
``data.eval_windows``.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


@torch.no_grad()
def validation_bpb(model, windows: torch.Tensor, device, autocast: bool, batch: int = 32) -> float:
    """Mean next-byte cross-entropy over the windows, in bits per byte."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(device)
        x, y = w[:, :-1], w[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += y.numel()
    model.train()
    return total / count / LN2
