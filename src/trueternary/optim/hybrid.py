"""The non-strict hybrid: trits by votes (FlipOptimizer), float ``log2_scale`` parameters by AdamW."""

from __future__ import annotations

import torch
from torch import nn

from ..weight import ternary_weights
from .flip import FlipOptimizer

ADAMW_BETAS = (0.9, 0.95)  # every AdamW the package builds: the hybrid's scales, recipes' Adam_FP32 and BitNet_QAT
HYBRID_SCALE_LR = 1e-3  # the float log2 scales' AdamW learning rate (recipes.Hparams.hybrid_scale_lr)


def hybrid_optimizers(
    model: nn.Module, scale_lr: float = HYBRID_SCALE_LR, scale_weight_decay: float = 0.0, **flip_kwargs
) -> tuple[FlipOptimizer, torch.optim.AdamW]:
    """The non-strict hybrid: trits move by votes, float ``log2_scale`` parameters by AdamW.

    The model must have been ternarised with ``scale_mode="float"``.
    """
    scales = [w.log2_scale for w in ternary_weights(model) if w.log2_scale is not None]
    if not scales:
        raise ValueError("hybrid training needs weights with scale_mode='float' (ternarize(model, scale_mode='float'))")
    flip = FlipOptimizer(model, **flip_kwargs)
    adam = torch.optim.AdamW(scales, lr=scale_lr, betas=ADAMW_BETAS, weight_decay=scale_weight_decay)
    return flip, adam
