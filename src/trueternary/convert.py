"""``ternarize(model)``: turn a model's linear and embedding layers into ternary ones, in place.

What it converts is ``layermap``'s: ``nn.Linear``, ``nn.Embedding`` and transformers' ``Conv1D`` (GPT-2). Layers
that share one weight (tied input/output embeddings) end sharing ONE ternary weight. ``skip`` (qualified names) and
``filter_fn(layer, fqn)`` keep layers float. The plan (:func:`plan_ternarize`) is made before anything changes, so a
refused conversion leaves the model as it was. Every float parameter left afterwards is named, with the reason, in
one warning; in strict mode a float weight matrix of a layer kind ternarize does not know (a Conv2d, a bare
``nn.Parameter`` matrix) that ``skip`` does not keep, and a model with nothing to convert, are errors.

A lazy model (``build_model(..., lazy=True)``, ``trueternary.init``) gets its whole ternary state first; then each
float weight is drawn, ternarised into its layer and dropped before the next: its float weights never exist at once.

A transformers model (``PreTrainedModel``) stays a working one (``.device``, ``.dtype``, ``generate``,
``save_pretrained``/``from_pretrained``): ``trueternary.hf`` adopts it (docs/integrations.md).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .init import draw_weights, is_lazy, lazy_plan
from .layermap import freeze_parameters, layer_kind, shaped_ternary, ternarized
from .layers import IntegerBias, TernaryLinear
from .quant import check_accum_threshold
from .weight import DEFAULT_GROUP_SIZE, SCALE_MODES, TernaryScaleTensor, check_group_size

# Containers whose forward reads their child Linear's ``.weight`` tensor directly: replacing the
# child would break them, so they are left float (and frozen in strict mode).
_OPAQUE = (nn.MultiheadAttention,)
_SHOWN = 8  # names shown per reason in the warning / error

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class PlannedLayer:
    """One layer to convert: every place it is registered (parent, attribute, qualified name; a module registered
    twice is one ternary layer in both) and, when another planned layer converts its weight (tied weights), that
    layer's qualified name."""

    layer: nn.Module
    kind: str
    places: list[tuple[nn.Module, str, str]] = field(default_factory=list)
    tied_to: str | None = None

    @property
    def fqn(self) -> str:
        return self.places[0][2]


@dataclass
class TernarizePlan:
    """What :func:`ternarize` does to a model, worked out before anything is changed."""

    layers: list[PlannedLayer]
    float_left: dict[str, tuple[torch.Tensor, str]]  # parameter name -> (parameter, why it stays float)
    unasked_matrices: list[str]  # float weight matrices of layer kinds ternarize does not know, not kept on request
    total: int  # float weights of the model (numel; a shared parameter once)
    ternary: int  # of them, the ones that become ternary
    integer: int  # of them, the biases of converted layers (integer biases afterwards)

    def coverage(self) -> str:
        pct = 100.0 * self.ternary / self.total if self.total else 0.0
        return f"{self.ternary:,} of {self.total:,} weights ternary ({pct:.1f}%), {self.integer:,} integer biases"


def ternarize(
    module: nn.Module,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    strict: bool = True,
    scale_mode: str = "int",
    skip: tuple[str, ...] = (),
    filter_fn: FilterFn | None = None,
    accum_threshold: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear``, ``nn.Embedding`` and transformers ``Conv1D`` inside ``module`` (in place) and
    return it.

    Weights are absmean-ternarised per group of ``group_size`` input weights. Layers sharing one weight (tied
    embeddings) share one ternary weight afterwards. ``skip``: qualified names of layers or containers to keep float;
    ``filter_fn(layer, fqn) -> bool`` is asked about every other convertible layer: False keeps it float. With
    ``strict=True`` every remaining ``nn.Parameter`` (norm gains, biases, kept layers, ...) is frozen into a buffer,
    so the model has zero parameters; a float weight matrix of a layer kind ternarize does not know (a Conv2d, a bare
    ``nn.Parameter`` matrix) that ``skip`` does not keep, and a model with nothing to convert, are ValueErrors.
    Whatever stays float is named, with the reason, in one warning (``nn.MultiheadAttention``'s weights among them:
    its forward reads them as tensors).
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
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a tuple of qualified layer names, got {skip!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (layer, fqn) -> bool, got {type(filter_fn).__name__}")
    if layer_kind(module) is not None:
        raise TypeError("ternarize replaces layers inside a model; wrap a bare layer or use TernaryLinear.from_linear")
    unknown = sorted(set(skip) - {fqn for fqn, _ in module.named_modules(remove_duplicate=False)})
    if unknown:
        raise ValueError(f"ternarize: skip names no layer of {type(module).__name__}: {', '.join(unknown)}")
    plan = plan_ternarize(module, set(skip), filter_fn)
    if strict and not plan.layers:
        kept = " (skip / filter_fn kept them all)" if any(why.startswith("kept by") for _, why in
                                                          plan.float_left.values()) else ""
        raise ValueError(f"ternarize: {type(module).__name__} has no nn.Linear, nn.Embedding or Conv1D layer to "
                         f"convert{kept}")
    if strict and plan.unasked_matrices:
        names = plan.unasked_matrices
        raise ValueError(
            f"ternarize(strict=True): {len(names)} float weight matrix(es) of layers it cannot convert: "
            + "; ".join(f"{n} ({plan.float_left[n][1]})" for n in names[:_SHOWN])
            + (f"; ... (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")
            + "; keep them float (frozen) with skip=(...), or use strict=False")
    hf = _transformers_integration(module)  # (imported before any change: it may refuse the installed transformers)
    if is_lazy(module):
        _ternarize_lazy(module, plan, group_size, scale_mode, accum_threshold, device)
    else:
        _apply(plan, group_size, scale_mode, accum_threshold, device)
    _disable_fused_fastpaths(module)
    if strict:
        freeze_parameters(module, scale_mode)
    if plan.float_left:
        warnings.warn(_float_left_message(plan, strict), stacklevel=2)
    if hf is not None:
        hf.adopt_ternarized(module)
    return module


def _transformers_integration(module: nn.Module):
    """``trueternary.hf`` when ``module`` holds a transformers model, else None. A transformers model's class was
    loaded with transformers, so it is looked for only when transformers is imported: ternarize never imports it."""
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if pretrained is None or not any(isinstance(m, pretrained) for m in module.modules()):
        return None
    from . import hf

    return hf


def plan_ternarize(module: nn.Module, skip: set[str], filter_fn: FilterFn | None) -> TernarizePlan:
    """Which layers :func:`ternarize` converts, and which float parameters stay float and why (changes nothing)."""
    planned: dict[int, PlannedLayer] = {}  # id(layer) -> its plan
    kept: dict[int, str] = {}  # id(module kept float, with everything inside it) -> why

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            fqn = f"{prefix}{name}"
            if id(child) in planned:
                planned[id(child)].places.append((mod, name, fqn))
            elif fqn in skip:
                kept.setdefault(id(child), "kept by skip")
            elif isinstance(child, _OPAQUE):
                kept.setdefault(id(child), f"inside {type(child).__name__} (its forward reads its weights as tensors)")
            elif (kind := layer_kind(child)) is None:
                visit(child, fqn + ".")
            elif filter_fn is not None and not filter_fn(child, fqn):
                kept.setdefault(id(child), "kept by filter_fn")
            else:
                planned[id(child)] = PlannedLayer(child, kind, [(mod, name, fqn)])

    visit(module, "")
    layers = list(planned.values())
    owner: dict[int, PlannedLayer] = {}  # id(float weight) -> the first planned layer converting it
    for p in layers:
        first = owner.setdefault(id(p.layer.weight), p)
        if first is not p:
            if (first.kind == "conv1d") != (p.kind == "conv1d"):
                raise ValueError(f"ternarize: {p.fqn} and {first.fqn} share a weight, one of them transposed "
                                 "(Conv1D): they cannot share one ternary weight")
            p.tied_to = first.fqn
    consumed: dict[int, str] = {}  # id(float parameter a planned layer converts) -> that layer's name
    for p in layers:
        for prm in (p.layer.weight, getattr(p.layer, "bias", None)):
            if prm is not None:
                consumed.setdefault(id(prm), p.fqn)
    why_of: dict[str, str] = {}  # module name -> why it stays float ("" for none), inherited from its containers
    for fqn, mod in module.named_modules():
        why_of[fqn] = kept.get(id(mod)) or (why_of.get(fqn.rpartition(".")[0], "") if fqn else "")
        if id(mod) not in planned:  # a layer kept float that shares a parameter with a converted one loses the tie
            for pname, prm in mod.named_parameters(recurse=False):
                if id(prm) in consumed:
                    raise ValueError(f"ternarize: {fqn}.{pname} is tied to {consumed[id(prm)]}'s; convert both "
                                     "or keep both float (skip / filter_fn)")
    float_left: dict[str, tuple[torch.Tensor, str]] = {}
    unasked: list[str] = []
    total = 0
    for name, prm in module.named_parameters():
        if not prm.is_floating_point():
            continue
        total += prm.numel()
        owner_name = name.rpartition(".")[0]
        holder = module.get_submodule(owner_name)
        if id(prm) in consumed or isinstance(holder, TernaryScaleTensor):  # (a hybrid weight's log2_scale)
            continue
        why = why_of.get(owner_name, "")
        if not why:
            why = f"{type(holder).__name__} {'weight matrices' if prm.dim() >= 2 else 'vectors'} (no ternary form)"
            if prm.dim() >= 2:  # a weight matrix of a layer kind ternarize does not know
                unasked.append(name)
        float_left[name] = (prm, why)
    ternary = sum(p.layer.weight.numel() for p in layers if p.tied_to is None)
    integer = sum(b.numel() for p in layers if (b := getattr(p.layer, "bias", None)) is not None)
    return TernarizePlan(layers, float_left, unasked, total, ternary, integer)


def _float_left_message(plan: TernarizePlan, strict: bool) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, (_, why) in plan.float_left.items():
        by_reason.setdefault(why, []).append(name)
    n = sum(p.numel() for p, _ in plan.float_left.values())
    head = (f"ternarize(strict=True) froze {len(plan.float_left)} non-ternary parameter(s) ({n:,} weights) into "
            "buffers" if strict else f"ternarize left {len(plan.float_left)} parameter(s) ({n:,} weights) float and "
            "trainable")
    parts = [f"{why}: " + ", ".join(names[:_SHOWN]) + (f" ... (+{len(names) - _SHOWN} more)"
                                                       if len(names) > _SHOWN else "")
             for why, names in by_reason.items()]
    return f"{head}; {plan.coverage()}. Float: " + "; ".join(parts)


def _apply(plan: TernarizePlan, group_size: int, scale_mode: str, accum_threshold: int | None, device) -> None:
    built: dict[str, nn.Module] = {}
    for p in plan.layers:
        if p.tied_to is None:
            layer = ternarized(p.layer, p.kind, group_size, scale_mode, accum_threshold, device)
        else:
            layer = _tied(p.layer, p.kind, built[p.tied_to].weight, group_size, scale_mode)
        built[p.fqn] = layer
        for parent, attr, _ in p.places:
            setattr(parent, attr, layer)


def _tied(layer: nn.Module, kind: str, weight: TernaryScaleTensor, group_size: int, scale_mode: str) -> nn.Module:
    """The ternary layer for ``layer``, whose weight was tied to a layer already converted into ``weight``: built on
    the meta device (its own weight is never allocated), then given ``weight``; a bias stays its own."""
    m = shaped_ternary(layer, kind, group_size, scale_mode, "meta")
    m.weight = weight
    if getattr(m, "bias", None) is not None:
        m.bias = IntegerBias(m.out_features, device=weight.E.device)
        m.bias.load_float_(layer.bias.detach().to(weight.E.device))
    return m


def _ternarize_lazy(module: nn.Module, plan: TernarizePlan, group_size: int, scale_mode: str,
                    accum_threshold: int | None, device) -> None:
    """Ternarise a lazy model (``trueternary.init``): allocate every ternary layer first (so no float weight lies
    between their buffers, to fragment memory), then draw each float weight and ternarise it into its layer."""
    device = "cpu" if device is None else device
    converted = {p.fqn: p for p in plan.layers}
    if any(p.tied_to is not None or len(p.places) > 1 for p in plan.layers):
        raise ValueError("a lazy model's weights are drawn layer by layer: shared layers or weights are not supported")
    ternary = {}
    for name, _ in lazy_plan(module):
        p = converted.get(name)
        if p is None:
            continue
        if getattr(p.layer, "bias", None) is not None:
            raise ValueError(f"layer {name!r} of the lazy model has a bias, which init_plan() does not draw")
        ternary[name] = shaped_ternary(p.layer, p.kind, group_size, scale_mode, device)
    for name, w in draw_weights(module):
        parent, _, child = name.rpartition(".")
        if name in ternary:
            layer = ternary.pop(name)
            weight = w.t() if converted[name].kind == "conv1d" else w
            layer.weight.load_float_(weight, accum_threshold)
            setattr(module.get_submodule(parent), child, layer)
        else:  # kept float (skipped, filtered out, or inside an opaque container)
            module.get_submodule(name).weight = nn.Parameter(w)
        del w


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
