"""Kernels and autograd functions. Each op has a plain-PyTorch path; Triton kernels sit beside it."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def kernels_can_run(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return True
    if t.device.type != "cpu" or not triton_available():
        return False
    from .triton_utils import interpreting

    return interpreting()
