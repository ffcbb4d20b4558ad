"""The non-strict hybrid: trits by votes (FlipOptimizer), float ``log2_scale`` parameters by AdamW."""

from __future__ import annotations

import torch
from torch import nn

from ..weight import ternary_weights
from .flip import FlipOptimizer


def hybrid_optimizers(
    model: nn.Module, scale_lr: float = 1e-3, scale_weight_decay: float = 0.0, **flip_kwargs
) -> tuple[FlipOptimizer, torch.optim.AdamW]:
    """The non-strict hybrid: trits move by votes, float ``log2_scale`` parameters by AdamW.

    The model must have been ternarised with ``scale_mode="float"``.
    """
    scales = [w.log2_scale for w in ternary_weights(model) if w.log2_scale is not None]
    if not scales:
        raise ValueError("hybrid training needs weights with scale_mode='float' (ternarize(model, scale_mode='float'))")
    flip = FlipOptimizer(model, **flip_kwargs)
    adam = torch.optim.AdamW(scales, lr=scale_lr, betas=(0.9, 0.95), weight_decay=scale_weight_decay)
    return flip, adam
