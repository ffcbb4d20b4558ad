"""TileNormSGD: a diagnostic float optimiser, the flip rule's normalised step without the integers.

Kept for the diagnostic round of docs/learning.md ("How the previous rule's gap was diagnosed"), whose rows
``bench --configs "BitNet_QAT[optimizer=tile_sgd,...]"`` reproduces; no training configuration uses it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..rule import block_factored_stats, factored_ms, vote_multiplier
from .sign import PerParameterOptimizer, check_lr


class TileNormSGD(PerParameterOptimizer):
    """Normalised descent on float weights with the flip rule's normaliser (a diagnostic baseline):
    ``p -= lr * m / sqrt(ms)``, ``ms`` the rule's factored estimate of ``g**2`` (``rule.block_factored_ms``
    per ``norm_block`` tile for matrices, the mean for vectors) and ``m`` the gradient.

    With the defaults (``beta1 = beta2 = 0``) it is TrueTernary's vote without the integers: no stochastic
    rounding, no accumulator clip, no hysteresis, no history, zero optimiser state. ``beta2 > 0`` replaces
    the factored statistics of the current gradient by their exponential moving average over steps (state:
    per tile-row, tile-column and tile means, ~2/norm_block floats per weight: Adafactor's second moment,
    per tile); ``beta1 > 0`` makes ``m`` a moving average of the gradient (momentum, one float per weight),
    or with ``normalize_first`` a moving average of the normalised step ``g / sqrt(ms)``.
    Behind BitNet_QAT's ternary forward (``BitNet_QAT[optimizer=tile_sgd,beta1=..,beta2=..]`` in ``bench``)
    it says which part of AdamW's history TrueTernary's history-less vote lacks.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, norm_block: int = 64, beta1: float = 0.0,
                 beta2: float = 0.0, normalize_first: bool = False) -> None:
        check_lr(lr)
        if isinstance(norm_block, bool) or not isinstance(norm_block, int) or norm_block < 1:
            raise ValueError(f"norm_block must be a positive integer, got {norm_block!r}")
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        super().__init__(params, {"lr": lr, "norm_block": norm_block, "beta1": beta1, "beta2": beta2,
                                  "normalize_first": bool(normalize_first)})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p] if group["beta1"] or group["beta2"] else {}  # history-less: no state entry
        tile_norm_update_(p, grad, state, group["lr"], group["norm_block"], group["beta1"], group["beta2"],
                          group["normalize_first"])


def tile_norm_update_(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, norm_block: int,
                      beta1: float = 0.0, beta2: float = 0.0, normalize_first: bool = False) -> None:
    """The per-parameter TileNormSGD math (pure, in place on ``p`` and its ``state``; ``step()`` has checked
    that ``grad`` is finite). Moving averages start at the first step's value (no bias correction needed)."""
    g = grad.float()
    if p.dim() == 2:
        stats = block_factored_stats(g, norm_block)
    else:
        stats = (g.square().mean(),)
    if beta2:
        names = ("row_sq", "col_sq", "tile_sq")[: len(stats)]
        for name, t in zip(names, stats):
            if name not in state:
                state[name] = t.clone()
            state[name].lerp_(t, 1 - beta2)
        stats = tuple(state[name] for name in names)
    ms = factored_ms(*stats, g.shape) if p.dim() == 2 else stats[0]
    s = vote_multiplier(ms, lr)  # -lr / sqrt(ms + 1e-30), like the votes'
    if normalize_first:  # momentum of the normalised step (bounded however small a later ms is)
        g = g * s
        s = 1.0
    if beta1:
        if "exp_avg" not in state:
            state["exp_avg"] = g.clone()
        g = state["exp_avg"].lerp_(g, 1 - beta1)
    p.add_(g * s)
