"""Lazy models: a model family built without its weights, which are drawn one layer at a time later.

A float model of N weights holds 4N bytes; a ternary one trains in about 1.25N (``weight.py``). Building a
ternary model by ternarising a whole float model first (``ternarize`` on ``build_model``'s result) needs the
4N bytes anyway, and ``build_recipe``'s copy of it 4N more. A *lazy* model has its weight layers on the
``meta`` device (shapes, no storage) and remembers its seed; its other buffers are real. Then

    ``ternarize(model, device=...)``   allocates the whole ternary state on ``device``, then draws each weight,
                                       ternarises it into its layer's state and drops the float before drawing
                                       the next: peak memory is the ternary state plus one layer's float weight
                                       and the ternarisation's temporaries (a chunk's: ``weight.LOAD_CHUNK``);
    :func:`materialize`                draws every float weight (the float configs need them all).

Either gives exactly what the eager build gives (``build_model(lazy=False)``, then ``ternarize``), bit for
bit: the weights are drawn from the same generator, seeded the same, in the same order and shapes. The order
is the family's ``init_plan()``, a list of ``(layer name, std)`` whose ``reset_parameters`` is one
``weight.normal_(0, std, generator)`` per entry in turn; a family without ``init_plan`` is built eagerly.

:func:`meta_device` is the meta-device build itself (also bench's allocation-free check of a model's config).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_SEED = "_lazy_init_seed"  # attribute of a lazy model: the seed its weights will be drawn with


class _NoDrawsOnMeta(TorchFunctionMode):
    """A random draw into a meta tensor (``nn.init.*``, ``Tensor.normal_`` / ``uniform_``) returns the tensor as it
    is: there is nothing to fill. torch's own meta kernel for these does the same, but it is Python code whose
    first call imports ``torch._dynamo`` (about 2 s of every process that builds a model, compiled or not)."""

    _DRAWS = (torch.Tensor.normal_, torch.Tensor.uniform_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._DRAWS or getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``with torch.device("meta")``, without drawing random numbers into the meta tensors it creates."""
    with torch.device("meta"), _NoDrawsOnMeta():
        yield


def can_be_lazy(cls) -> bool:
    """Whether model family ``cls`` lists its initial weights in draw order (``init_plan``)."""
    return callable(getattr(cls, "init_plan", None))


def lazy_model(cls, cfg, seed: int) -> nn.Module:
    """``cls(cfg)`` with its layers on the meta device, to be drawn later from ``Generator().manual_seed(seed)``
    (the generator ``build_model`` gives the eager build)."""
    if not can_be_lazy(cls):
        raise ValueError(f"{cls.__name__} has no init_plan(): it cannot be built lazily")
    with meta_device():
        model = cls(cfg)
    setattr(model, _SEED, int(seed))
    return model


def is_lazy(model: nn.Module) -> bool:
    """Whether ``model`` still has weights to draw (any parameter or buffer on the meta device)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def lazy_plan(model: nn.Module) -> list[tuple[str, float]]:
    """``model.init_plan()`` of a lazy model; ValueError for a model with tensors on the meta device that was not
    built lazily (nothing says how to draw them)."""
    if getattr(model, _SEED, None) is None or not can_be_lazy(type(model)):
        raise ValueError("the model has tensors on the meta device but was not built lazily "
                         "(build_model(..., lazy=True)): its weights cannot be drawn")
    return model.init_plan()


def draw_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Draw the initial float weights of the lazy ``model`` on the CPU, one layer at a time in ``init_plan()``
    order, yielding ``(layer name, weight)``: the caller puts each where it belongs (a float parameter, a ternary
    layer's state) before the next is drawn. Afterwards nothing of the model may be left on the meta device."""
    plan = lazy_plan(model)
    generator = torch.Generator().manual_seed(getattr(model, _SEED))
    for name, std in plan:
        w = model.get_submodule(name).weight
        if not w.is_meta:
            raise ValueError(f"layer {name!r} of the lazy model already has its weight")
        # the draw of the eager build's ``weight.normal_(0, std, generator)``: same shape, dtype and device (CPU)
        yield name, torch.empty(w.shape, dtype=w.dtype).normal_(0.0, std, generator=generator)
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"init_plan() of {type(model).__name__} leaves {', '.join(left[:4])} undrawn")
    delattr(model, _SEED)


def materialize(model: nn.Module) -> nn.Module:
    """Draw every weight of a lazy ``model`` as a float parameter (in place; on the CPU) and return it; an eager
    model is returned as it is."""
    if is_lazy(model):
        for name, w in draw_weights(model):
            layer = model.get_submodule(name)
            layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    return model


def float_copy(base: nn.Module, device: torch.device | str) -> nn.Module:
    """A copy of ``base`` with float weights on ``device`` (a lazy base's drawn, on the CPU, then moved)."""
    return materialize(copy.deepcopy(base)).to(device)


__all__ = ["can_be_lazy", "draw_weights", "float_copy", "is_lazy", "lazy_model", "lazy_plan", "materialize",
           "meta_device"]
