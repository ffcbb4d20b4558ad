"""Model families selectable by name (``--model``)."""

from __future__ import annotations

import torch

from .morph import MorphConfig, MORPHTernaryModel
from .transformer import ByteTransformer, TransformerConfig

_MODELS = {"transformer": (ByteTransformer, TransformerConfig), "morph": (MORPHTernaryModel, MorphConfig)}


def model_names() -> list[str]:
    return sorted(_MODELS)


def register_model(name: str, cls, config_cls) -> None:
    _MODELS[name] = (cls, config_cls)


def build_model(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """A freshly initialised float base model of family ``name`` (deterministic in ``seed``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    cls, cfg_cls = _MODELS[name]
    cfg = cfg_cls.from_dict(config)
    return cls(cfg, generator=torch.Generator().manual_seed(seed))


__all__ = ["ByteTransformer", "TransformerConfig", "build_model", "model_names", "register_model"]
