"""gather-add: ``out[n] = a[n] + table[idx[n]]`` (MORPH's ``per_position = vq_output + node_features[codes]``).

``naive.py`` is the plain-PyTorch reference (autograd does the backward); ``triton.py`` is the fused
kernel with its own backward (gradient of ``a`` is the output gradient; gradient of ``table`` is a
deterministic segment sum over the positions that gathered each row, no atomics).

This package also holds :func:`select_backend`, the one rule every MORPH kernel op uses to pick
``naive`` or ``triton``.
"""

from __future__ import annotations

import torch

from .. import triton_available
from .naive import gather_add_naive

KERNEL_BACKENDS = ("auto", "naive", "triton")


def select_backend(backend: str, x: torch.Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA tensors when Triton is installed, else ``naive``.

    ``triton`` on CPU tensors runs only under ``TRITON_INTERPRET=1`` (the tests use that).
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(KERNEL_BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "naive"
    if backend == "triton" and not triton_available():
        raise ValueError("kernel backend 'triton' needs Triton (pip install triton)")
    return backend


def check_gather_add(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> None:
    if a.dim() != 2 or table.dim() != 2 or a.shape[1] != table.shape[1]:
        raise ValueError(f"gather_add expects a (N, D) and table (R, D), got {tuple(a.shape)} and {tuple(table.shape)}")
    if idx.shape != (a.shape[0],) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_add expects int32/int64 indices of shape ({a.shape[0]},), got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    if not a.is_floating_point() or not table.is_floating_point():
        raise TypeError("gather_add expects floating-point a and table")


def gather_add(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``a + table[idx]`` with gradients for ``a`` and ``table``. Indices must lie in ``[0, R)``."""
    check_gather_add(a, table, idx)
    if select_backend(backend, a) == "triton":
        # Imported here, not at module import: TRITON_INTERPRET is read when the kernels are decorated.
        from .triton import gather_add_triton

        return gather_add_triton(a, table, idx)
    return gather_add_naive(a, table, idx)


__all__ = ["KERNEL_BACKENDS", "gather_add", "gather_add_naive", "select_backend"]
