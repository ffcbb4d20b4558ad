"""Model families selectable by name (``--model``)."""

from __future__ import annotations

import torch

from ..init import can_be_lazy, lazy_model
from .llama import LlamaConfig, LlamaModel
from .morph import MorphConfig, MORPHTernaryModel
from .transformer import ByteTransformer, TransformerConfig

_MODELS = {"transformer": (ByteTransformer, TransformerConfig), "morph": (MORPHTernaryModel, MorphConfig),
           "llama": (LlamaModel, LlamaConfig)}


def model_names() -> list[str]:
    return sorted(_MODELS)


def register_model(name: str, cls, config_cls) -> None:
    _MODELS[name] = (cls, config_cls)


def build_model(name: str, seed: int = 0, compile_ops: bool = False, lazy: bool = False,
                activation_checkpointing: bool = False, **config) -> torch.nn.Module:
    """A freshly initialised float base model of family ``name`` (deterministic in ``seed``).

    ``compile_ops``: run the model's shared ops (everything between its linear layers) through
    ``torch.compile`` (the ``use_compiled_ops`` method of families that have one; ValueError otherwise).
    ``lazy``: build it without its weights where the family can (``trueternary.init``: they are drawn, the
    same numbers, when the model is ternarised or materialised; ``build_recipe`` does either); a family that
    cannot is built eagerly. ``activation_checkpointing``: recompute activations in backward instead of
    keeping them (the ``use_activation_checkpointing`` method of families that have one; ValueError otherwise)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    cls, cfg_cls = _MODELS[name]
    cfg = cfg_cls.from_dict(config)
    if compile_ops:
        check_compile_ops(name)
    if activation_checkpointing and not hasattr(cls, "use_activation_checkpointing"):
        raise ValueError(f"activation checkpointing is implemented for the transformer, not model {name!r}")
    if lazy and can_be_lazy(cls):
        model = lazy_model(cls, cfg, seed)
    else:
        model = cls(cfg, generator=torch.Generator().manual_seed(seed))
    if compile_ops:
        model.use_compiled_ops()  # a copy (build_recipe's) keeps the setting
    if activation_checkpointing:
        model.use_activation_checkpointing()
    return model


def check_compile_ops(name: str) -> None:
    """ValueError unless model family ``name`` can run its shared ops compiled (has ``use_compiled_ops``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    if not hasattr(_MODELS[name][0], "use_compiled_ops"):
        raise ValueError(f"compiled ops are implemented for the transformer, not model {name!r}")


__all__ = ["ByteTransformer", "LlamaConfig", "LlamaModel", "TransformerConfig", "build_model", "check_compile_ops",
           "model_names", "register_model"]
