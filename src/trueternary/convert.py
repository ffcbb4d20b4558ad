"""``ternarize(model)``: turn any model's nn.Linear / nn.Embedding layers into ternary ones, in place.

A lazy model (``build_model(..., lazy=True)``, ``trueternary.init``) gets its whole ternary state first; then each
float weight is drawn, ternarised into its layer and dropped before the next: its float weights never exist at once.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .init import draw_weights, is_lazy, lazy_plan
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
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Embedding`` inside ``module`` (in place) and return it.

    Weights are absmean-ternarised per group of ``group_size`` input weights. With ``strict=True``
    every remaining ``nn.Parameter`` (norm gains, convolutions, ...) is frozen into a buffer, so the
    model has zero parameters; a warning names them. ``skip`` lists qualified child names to keep.
    ``scale_mode="float"`` gives the hybrid model (float log2 scales for AdamW). ``accum_threshold`` (the
    flip rule's, ``FlipRule.init_accum_threshold()``) starts each ``T_accum`` at its weight's rounding
    residual (``quant.residual_accum``) instead of 0. ``device``: where the ternary layers are built (each
    float weight is moved there and ternarised there, one layer at a time); default: where each weight is (a
    lazy model's: the CPU). Other parameters and buffers stay where they are: ``.to(device)`` moves them.
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
    if is_lazy(module):
        _ternarize_lazy(module, group_size, scale_mode, set(skip), accum_threshold, device)
    else:
        _replace(module, "", group_size, scale_mode, set(skip), accum_threshold, device)
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
             accum_threshold: int | None, device) -> None:
    for name, child in list(module.named_children()):
        qual = f"{prefix}{name}"
        if qual in skip:
            continue
        if isinstance(child, _OPAQUE):
            continue
        if isinstance(child, (nn.Linear, nn.Embedding)):
            _replace_child(module, name, group_size, scale_mode, accum_threshold, device)
        else:
            _replace(child, qual + ".", group_size, scale_mode, skip, accum_threshold, device)


def _replace_child(module: nn.Module, name: str, group_size: int, scale_mode: str, accum_threshold: int | None,
                   device) -> None:
    child = getattr(module, name)
    if isinstance(child, nn.Linear):
        setattr(module, name, TernaryLinear.from_linear(child, group_size, scale_mode, accum_threshold, device))
    elif isinstance(child, nn.Embedding):
        setattr(module, name, TernaryEmbedding.from_embedding(child, group_size, scale_mode, accum_threshold, device))


def _ternarize_lazy(module: nn.Module, group_size: int, scale_mode: str, skip: set[str], accum_threshold: int | None,
                    device) -> None:
    """Ternarise a lazy model (``trueternary.init``): allocate every ternary layer first (so no float weight lies
    between their buffers, to fragment memory), then draw each float weight and ternarise it into its layer."""
    device = "cpu" if device is None else device
    ternary = {}
    for name, _ in lazy_plan(module):
        layer = module.get_submodule(name)
        if not _converted(module, name, skip) or not isinstance(layer, (nn.Linear, nn.Embedding)):
            continue
        if getattr(layer, "bias", None) is not None:
            raise ValueError(f"layer {name!r} of the lazy model has a bias, which init_plan() does not draw")
        kind = TernaryLinear if isinstance(layer, nn.Linear) else TernaryEmbedding
        ternary[name] = kind.shaped_like(layer, group_size, scale_mode, device)
    for name, w in draw_weights(module):
        parent, _, child = name.rpartition(".")
        if name in ternary:
            layer = ternary.pop(name)
            layer.weight.load_float_(w, accum_threshold)
            setattr(module.get_submodule(parent), child, layer)
        else:  # kept float (skipped, or inside an opaque container)
            module.get_submodule(name).weight = nn.Parameter(w)
        del w


def _converted(module: nn.Module, qual: str, skip: set[str]) -> bool:
    """Whether :func:`_replace` would replace the layer ``qual``: neither it nor a container above it is skipped,
    and no container above it is opaque."""
    parts = qual.split(".")
    node = module
    for i, part in enumerate(parts):
        if ".".join(parts[: i + 1]) in skip:
            return False
        if i < len(parts) - 1:
            node = getattr(node, part)
            if isinstance(node, _OPAQUE):
                return False
    return True


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
