"""Optimisers: the FlipOptimizer (votes and flips on ternary state), SignGSD, and the hybrid helper.

    flip.py           FlipOptimizer: param groups, step(), state dict, the CUDA-graph methods
    accumulate.py     its gradient accumulation (grad_accumulation=True): one vote per step on the summed gradient
    mixed.py          for_model / MixedOptimizer: ternary weights by votes, float parameters by AdamW, one object
    train_step.py     TrainStep: any model's step (forward, backward, step) as one CUDA graph, compiled, or eager
    backend.py        the vote-backend interface FlipOptimizer calls for votes and flips, and the ``none`` backend
    dense.py          the dense backend (rule.py in plain PyTorch: the reference)
    kernel.py         the kernel backends ``gpu`` / ``gpu-signcache`` (Triton: ops.votes, ops.flip)
    data_parallel.py  both under data parallelism (votes summed over ranks; the kernels' vote bucket)
    context.py        what every vote shares: RNG seed and step counters, the NaN/inf check
    sign.py           SignGSD (the seed's latent baseline), hybrid.py the hybrid's optimiser pair

Backend names are :class:`trueternary.backends.UpdateBackend`.
"""

from __future__ import annotations

from ..backends import UPDATE_BACKENDS as BACKENDS
from ..backends import UpdateBackend, resolve_backend
from ..errors import NonFiniteGradientError
from .context import BIAS_VOTE_CLIP, CALLS_PER_STEP
from .flip import FlipOptimizer, norm_codes_of
from .hybrid import ADAMW_BETAS, HYBRID_SCALE_LR, hybrid_optimizers
from .mixed import MixedOptimizer, for_model
from .sign import SignGSD, signgsd_update_
from .train_step import TrainStep

__all__ = [
    "ADAMW_BETAS",
    "BACKENDS",
    "BIAS_VOTE_CLIP",
    "CALLS_PER_STEP",
    "FlipOptimizer",
    "HYBRID_SCALE_LR",
    "MixedOptimizer",
    "NonFiniteGradientError",
    "SignGSD",
    "TrainStep",
    "UpdateBackend",
    "for_model",
    "hybrid_optimizers",
    "norm_codes_of",
    "resolve_backend",
    "signgsd_update_",
]
