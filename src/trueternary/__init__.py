"""trueternary: train neural networks whose weights are purely ternary {-1, 0, +1}.

Weights are packed trits with a power-of-two scale per group; learning is integer votes into
per-weight accumulators and trit flips (no float weights, no optimiser state).
"""

from .convert import ternarize
from .errors import NonFiniteGradientError
from .layers import IntegerBias, TernaryEmbedding, TernaryLinear
from .optim import FlipOptimizer, SignGSD, hybrid_optimizers
from .packing import pack_trits, unpack_trits
from .rule import FlipRule
from .weight import DEFAULT_GROUP_SIZE, TernaryScaleTensor, ternary_weights

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "FlipOptimizer",
    "FlipRule",
    "IntegerBias",
    "NonFiniteGradientError",
    "SignGSD",
    "TernaryEmbedding",
    "TernaryLinear",
    "TernaryScaleTensor",
    "hybrid_optimizers",
    "pack_trits",
    "ternarize",
    "ternary_weights",
    "unpack_trits",
    "__version__",
]
