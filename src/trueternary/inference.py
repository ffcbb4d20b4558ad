"""Loading a checkpoint of ``trueternary train`` for inference: the model rebuilt from its config with only the
tensors inference needs (``T_packed`` and the scales for ternary weights; no accumulators), and what it holds.

Used by ``generate`` and ``export``.
"""

from __future__ import annotations

import warnings

import torch

from .checkpoint import MODEL_PREFIX, TERNARY_INFERENCE, inference_tensor_names, load_checkpoint, read_header
from .errors import CheckpointError
from .weight import DEFAULT_GROUP_SIZE, ternary_weights


def build_inference_model(recipe: str, model_name: str, model_config: dict, group_size: int):
    """The model of ``recipe`` with its weight representation, ready for ``load_state_dict``.

    Mirrors the representations of ``recipes.build_recipe`` (without its optimisers).
    """
    from .convert import ternarize
    from .models import build_model
    from .qat import fake_ternarize
    from .recipes import CONFIG_NAMES, LATENT_CONFIGS, TERNARY_CONFIGS

    if recipe not in CONFIG_NAMES:
        raise CheckpointError(f"checkpoint holds unknown config {recipe!r}")
    model = build_model(model_name, seed=0, **model_config)
    if recipe in TERNARY_CONFIGS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strict mode names frozen parameters; the checkpoint restores them
            ternarize(model, group_size, scale_mode="float" if recipe == "TrueTernary_Hybrid" else "int")
        for w in ternary_weights(model):
            w.release_training_state()
    elif recipe in LATENT_CONFIGS:
        fake_ternarize(model)
    return model


def load_checkpoint_for_inference(path, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, checkpoint meta) holding only the inference tensors of checkpoint ``path``."""
    index, _ = read_header(path)
    wanted = inference_tensor_names(index)
    ckpt = load_checkpoint(path, keep=lambda name: name in wanted)
    meta = ckpt.meta
    try:
        group_size = int((meta.get("hparams") or {}).get("group_size", DEFAULT_GROUP_SIZE))
        model = build_inference_model(ckpt.recipe, meta["model"]["name"], meta["model"]["config"], group_size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: cannot rebuild the model ({e})") from None
    sd = ckpt.model_state_dict()
    del ckpt
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit its model config ({' '.join(str(e).split())[:300]})") from None
    needed = inference_tensor_names(MODEL_PREFIX + k for k in model.state_dict())
    missing = [k for k in missing if MODEL_PREFIX + k in needed]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model.to(device).eval(), meta


def held_bytes(model) -> dict[str, int]:
    """Bytes of every tensor the model holds, split into ternary inference state and the rest."""
    tw = ternary_weights(model)
    ternary = sum(w.inference_bytes() for w in tw)
    everything = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    training = sum(b.numel() * b.element_size() for w in tw for name, b in w.named_buffers(recurse=False)
                   if name not in TERNARY_INFERENCE)
    return {"ternary_inference": ternary, "T_packed": sum(w.T_packed.numel() for w in tw),
            "scales": ternary - sum(w.T_packed.numel() for w in tw), "total": everything,
            "training_state": training}
