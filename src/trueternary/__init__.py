"""trueternary: train neural networks whose weights are purely ternary {-1, 0, +1}.

Weights are packed trits with a power-of-two scale per group; learning is integer votes into
per-weight accumulators and trit flips (no float weights, no optimiser state).

The public names below are imported on first use (PEP 562), so importing the package, or running
``trueternary --help``, does not load torch; ``from trueternary import FlipOptimizer`` works as ever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "DEFAULT_GROUP_SIZE": "settings",
    "FlipOptimizer": "optim",
    "FlipRule": "settings",
    "IntegerBias": "layers",
    "NonFiniteGradientError": "errors",
    "SignGSD": "optim",
    "TernaryEmbedding": "layers",
    "TernaryLinear": "layers",
    "TernaryScaleTensor": "weight",
    "hybrid_optimizers": "optim",
    "pack_trits": "packing",
    "ternarize": "convert",
    "ternary_weights": "weight",
    "unpack_trits": "packing",
}

__all__ = [  # _PUBLIC's names (tests/test_cli.py checks that they agree)
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

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports these
    from .convert import ternarize
    from .errors import NonFiniteGradientError
    from .layers import IntegerBias, TernaryEmbedding, TernaryLinear
    from .optim import FlipOptimizer, SignGSD, hybrid_optimizers
    from .packing import pack_trits, unpack_trits
    from .settings import DEFAULT_GROUP_SIZE, FlipRule
    from .weight import TernaryScaleTensor, ternary_weights


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
