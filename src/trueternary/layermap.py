"""Which float layers ``ternarize`` converts, and the ternary layer each one becomes.

    nn.Linear (and subclasses)   -> TernaryLinear      weight [out, in]
    nn.Embedding                 -> TernaryEmbedding   weight [num, dim]
    transformers' Conv1D         -> TernaryLinear      weight stored transposed, [in, out] (GPT-2); always a bias

Shared by ``convert`` (ternarising a float model) and ``hf`` (rebuilding a saved ternary transformers model before
its tensors are loaded). transformers' ``Conv1D`` is recognised without importing transformers.
"""

from __future__ import annotations

import sys

from torch import nn

from .layers import TernaryEmbedding, TernaryLinear


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` class if transformers is imported (a model holding one has imported it), else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def layer_kind(layer: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"embedding"`` for a layer ternarize converts, else None."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(layer, conv1d):
        return "conv1d"
    return None


def shaped_ternary(layer: nn.Module, kind: str, group_size: int, scale_mode: str, device) -> nn.Module:
    """The ternary layer for float ``layer`` of ``kind``, all trits 0, on ``device`` (``layer``'s weight is not
    read, so it may be on the meta device); fill it with ``weight.load_float_`` or a state dict."""
    if kind == "linear":
        return TernaryLinear.shaped_like(layer, group_size, scale_mode, device)
    if kind == "embedding":
        return TernaryEmbedding.shaped_like(layer, group_size, scale_mode, device)
    n_in, n_out = layer.weight.shape  # Conv1D: y = x @ W + b, W [in, out]
    return TernaryLinear(n_in, n_out, bias=layer.bias is not None, group_size=group_size, scale_mode=scale_mode,
                         device=device, init=False)


def ternarized(layer: nn.Module, kind: str, group_size: int, scale_mode: str, accum_threshold: int | None,
               device) -> nn.Module:
    """``layer`` ternarised (absmean per group; bias rounded to the integer grid) on ``device`` (default: where its
    weight is)."""
    if kind == "linear":
        return TernaryLinear.from_linear(layer, group_size, scale_mode, accum_threshold, device)
    if kind == "embedding":
        return TernaryEmbedding.from_embedding(layer, group_size, scale_mode, accum_threshold, device)
    m = shaped_ternary(layer, kind, group_size, scale_mode, layer.weight.device if device is None else device)
    m.weight.load_float_(layer.weight.t(), accum_threshold)  # the Linear weight of the same map: W.T
    if layer.bias is not None:
        m.bias.load_float_(layer.bias.detach().to(m.bias.q.device))
    return m


def freeze_parameters(module: nn.Module, scale_mode: str) -> list[str]:
    """Turn every float parameter of ``module`` but a hybrid weight's ``log2_scale`` into a buffer of the same name
    (strict mode: zero parameters; a parameter registered twice stays one tensor); returns their names."""
    frozen, buffers = [], {}
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if scale_mode == "float" and pname == "log2_scale":
                continue
            delattr(mod, pname)
            if id(p) not in buffers:
                buffers[id(p)] = p.detach().clone()
                frozen.append(f"{mod_name}.{pname}" if mod_name else pname)
            mod.register_buffer(pname, buffers[id(p)])
    return frozen

