"""Memory: peak memory (the CUDA caching allocator's peak on GPU, the process's peak RSS on CPU), and the
training state of a model -- :func:`training_state`, the one count of it that ``audit``, ``bench`` (via
``Recipe.state_report``) and ``project``'s measured table report.

On Linux the RSS high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs``, so peaks of
several configurations measured in one process do not leak into each other.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .rule import FlipRule


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak(device: torch.device) -> int:
    """Peak bytes since the last reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_kind(device: torch.device) -> str:
    return "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"


# ------------------------------------------------------------------------------------ training state
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensor_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_nbytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def _norm_code_bytes(model: nn.Module, rule: dict) -> int:
    """Bytes of the normaliser codes a FlipOptimizer under ``rule`` (a FlipRule dict or a param group) keeps
    for ``model`` once it has voted (``optim.norm_codes_of``; none without ``norm_beta``)."""
    from .optim import norm_codes_of
    from .rule import uses_norm_memory

    if not uses_norm_memory(rule):
        return 0
    return sum(_nbytes(t) for codes in norm_codes_of(model, rule["norm_block"]) for t in codes.values())


def training_state(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (),
                   rule: FlipRule | None = None) -> dict[str, int]:
    """Every byte of state training keeps for ``model``, by kind, and their ``total``:

        ternary          the TernaryScaleTensor buffers (T_packed, E, E_accum, T_accum) and the IntegerBias
                         buffers (q, exp): what the FlipOptimizer trains
        optimizer        the tensors in the optimisers' state: AdamW's moments, the FlipOptimizer's normaliser
                         codes. A FlipOptimizer that has not voted yet is counted with the codes it keeps from its
                         first vote on; without ``optimizers``, a FlipOptimizer under ``rule`` (default:
                         ``FlipRule()``, train's default) is assumed
        other_integer    saved integer buffers elsewhere (VQ usage counters, MoE balance bias, ...)
        float_params     trainable float parameters (a hybrid's float scales included)
        float_grads      their gradients, as large, held from backward to the optimiser's step
    """
    from .layers import IntegerBias
    from .optim import FlipOptimizer
    from .weight import ternary_weights

    tw = ternary_weights(model)
    biases = [m for m in model.modules() if isinstance(m, IntegerBias)]
    owned = {id(b) for m in (*tw, *biases) for b in m.buffers(recurse=False)}
    ternary = sum(_nbytes(b) for m in (*tw, *biases) for b in m.buffers(recurse=False))
    other_integer = 0
    for mod in model.modules():
        unsaved = getattr(mod, "_non_persistent_buffers_set", set())
        other_integer += sum(_nbytes(b) for name, b in mod.named_buffers(recurse=False)
                             if b is not None and id(b) not in owned and not b.is_floating_point()
                             and name not in unsaved)
    float_params = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
    optimizers = list(optimizers)
    if optimizers:
        optimizer = 0
        for o in optimizers:
            if isinstance(o, FlipOptimizer) and not o.state:  # before its first vote
                optimizer += max((_norm_code_bytes(model, g) for g in o.param_groups), default=0)
            else:
                optimizer += _tensor_state_bytes(o)
    elif tw:
        from .rule import FlipRule

        optimizer = _norm_code_bytes(model, (rule or FlipRule()).to_dict())
    else:
        optimizer = 0
    out = {"ternary": ternary, "optimizer": optimizer, "other_integer": other_integer,
           "float_params": float_params, "float_grads": float_params}
    out["total"] = sum(out.values())
    return out
