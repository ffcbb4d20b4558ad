"""The names of the update backends and of the linear op's kernels: defined here once, compared as members.

Two independent choices, both made by whoever builds the model and its optimiser (``recipes.build_recipe``):

    UpdateBackend   how ``FlipOptimizer`` casts votes and applies flips (``FlipOptimizer(backend=...)``,
                    ``--update_backend``)
    LinearKernel    which kernels run a ``TernaryLinear`` forward and input gradient (``TernaryLinear.kernel``,
                    ``layers.set_linear_kernel``): the dense reference, or the packed-weight Triton kernels

A recipe on a kernel backend runs the linear layers on the kernels as well (:attr:`UpdateBackend.linear_kernel`),
so the trits are never unpacked; the two are still separate settings (the op never asks the optimiser).

Both enums subclass ``str``: a member equals its name (``UpdateBackend.GPU == "gpu"``) and is written as it.
"""

from __future__ import annotations

from enum import Enum


class UpdateBackend(str, Enum):
    """How a FlipOptimizer turns gradients into votes and votes into flips."""

    AUTO = "auto"  # GPU where CUDA and Triton are there, else DENSE
    DENSE = "dense-fallback"  # plain PyTorch (rule.py), any device
    NONE = "none"  # forward and backward only: no votes, no flips
    GPU = "gpu"  # Triton kernels: fused votes in backward, fused flips in step()
    GPU_SIGNCACHE = "gpu-signcache"  # GPU with a compact per-layer vote cache applied by the flip kernel

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | UpdateBackend) -> UpdateBackend:
        """The member named ``name``; ValueError (naming the choices) for anything else."""
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown update backend {name!r}; choose one of {', '.join(UPDATE_BACKENDS)}") from None

    @property
    def runs_kernels(self) -> bool:
        """Whether votes and flips run on the Triton kernels (where the tensors are on a device they run on)."""
        return self in (UpdateBackend.GPU, UpdateBackend.GPU_SIGNCACHE)

    @property
    def linear_kernel(self) -> LinearKernel:
        """The linear op's kernels that go with this backend: the Triton ones for a kernel backend."""
        return LinearKernel.TRITON if self.runs_kernels else LinearKernel.DENSE


class LinearKernel(str, Enum):
    """Which kernels run the ternary linear op (``ops.linear.ternary_linear``)."""

    DENSE = "dense"  # weight.dense() and torch matmuls: the reference, any device and dtype, hybrid float scales
    TRITON = "triton"  # packed-weight Triton matmuls (ops.ternary_matmul) where they run, else DENSE

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | LinearKernel) -> LinearKernel:
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(k.value for k in cls)
            raise ValueError(f"unknown linear kernel {name!r}; choose one of {choices}") from None


UPDATE_BACKENDS = tuple(b.value for b in UpdateBackend)
# The library's default (FlipOptimizer, build_recipe, ``bench --update-backend``); ``train`` resolves ``auto``.
DEFAULT_UPDATE_BACKEND = UpdateBackend.DENSE


def resolve_backend(name: str | UpdateBackend) -> UpdateBackend:
    """``name`` as a concrete backend: ``auto`` becomes GPU where CUDA and Triton are there, else DENSE; the
    kernel backends need both (ValueError, saying which is missing)."""
    backend = UpdateBackend.parse(name)
    if backend is UpdateBackend.AUTO:
        import torch

        from .ops import triton_available

        return UpdateBackend.GPU if torch.cuda.is_available() and triton_available() else UpdateBackend.DENSE
    if backend.runs_kernels:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"update backend {backend.value!r} needs a CUDA device; use 'dense-fallback' on CPU")
        from .ops import triton_available

        if not triton_available():
            raise ValueError(f"update backend {backend.value!r} needs Triton (pip install triton)")
    return backend
