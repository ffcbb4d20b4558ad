"""``ternarize(model)``: turn any model's nn.Linear / nn.Embedding layers into ternary ones, in place."""

from __future__ import annotations

import warnings

from torch import nn

from .layers import TernaryEmbedding, TernaryLinear
from .quant import check_accum_threshold
from .weight import DEFAULT_GROUP_SIZE, SCALE_MODES, check_group_size

# Containers whose forward reads their child Linear's ``.weight`` tensor directly: replacing the
# child would break them, so they are left float (and frozen in strict mode).
_OPAQUE = (nn.MultiheadAttention,)


def ternarize(
    module: nn.Module,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    strict: bool = True,
    scale_mode: str = "int",
    skip: tuple[str, ...] = (),
    accum_threshold: int | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Embedding`` inside ``module`` (in place) and return it.

    Weights are absmean-ternarised per group of ``group_size`` input weights. With ``strict=True``
    every remaining ``nn.Parameter`` (norm gains, convolutions, ...) is frozen into a buffer, so the
    model has zero parameters; a warning names them. ``skip`` lists qualified child names to keep.
    ``scale_mode="float"`` gives the hybrid model (float log2 scales for AdamW). ``accum_threshold`` (the
    flip rule's, ``FlipRule.init_accum_threshold()``) starts each ``T_accum`` at its weight's rounding
    residual (``quant.residual_accum``) instead of 0.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"ternarize expects an nn.Module, got {type(module).__name__}")
    check_group_size(group_size)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if accum_threshold is not None:
        check_accum_threshold(accum_threshold)  # before any layer is replaced
    if isinstance(module, (nn.Linear, nn.Embedding)):
        raise TypeError("ternarize replaces layers inside a model; wrap a bare layer or use TernaryLinear.from_linear")
    _replace(module, "", group_size, scale_mode, set(skip), accum_threshold)
    _disable_fused_fastpaths(module)
    if strict:
        frozen = _freeze_parameters(module, scale_mode)
        if frozen:
            shown = ", ".join(frozen[:8]) + (" ..." if len(frozen) > 8 else "")
            warnings.warn(
                f"ternarize(strict=True) froze {len(frozen)} non-ternary parameter(s) into buffers: {shown}",
                stacklevel=2,
            )
    return module


def _replace(module: nn.Module, prefix: str, group_size: int, scale_mode: str, skip: set[str],
             accum_threshold: int | None) -> None:
    for name, child in list(module.named_children()):
        qual = f"{prefix}{name}"
        if qual in skip:
            continue
        if isinstance(child, _OPAQUE):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, TernaryLinear.from_linear(child, group_size, scale_mode, accum_threshold))
        elif isinstance(child, nn.Embedding):
            setattr(module, name, TernaryEmbedding.from_embedding(child, group_size, scale_mode, accum_threshold))
        else:
            _replace(child, qual + ".", group_size, scale_mode, skip, accum_threshold)


def _disable_fused_fastpaths(module: nn.Module) -> None:
    """Keep torch's fused inference kernels away from ternary layers.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``, via nested tensors)
    may call ``torch._transformer_encoder_layer_fwd``, which reads ``linear1.weight`` /
    ``linear2.weight`` as float tensors; after ternarize those are ``TernaryScaleTensor`` modules and
    the fast path would crash. ``activation_relu_or_gelu`` is only consulted by that fast path (the
    regular forward uses ``self.activation``), so zeroing it selects the regular forward, which
    calls our layers.
    """
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and not (
            isinstance(m.linear1, nn.Linear) and isinstance(m.linear2, nn.Linear)
        ):
            m.activation_relu_or_gelu = 0
        elif isinstance(m, nn.TransformerEncoder) and any(isinstance(c, TernaryLinear) for c in m.modules()):
            m.use_nested_tensor = False


def _freeze_parameters(module: nn.Module, scale_mode: str) -> list[str]:
    frozen = []
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if scale_mode == "float" and pname == "log2_scale":
                continue
            delattr(mod, pname)
            mod.register_buffer(pname, p.detach().clone())
            frozen.append(f"{mod_name}.{pname}" if mod_name else pname)
    return frozen
