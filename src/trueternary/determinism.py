"""Deterministic mode: the same inputs give the same training step, bit for bit, on a GPU too.

A TrueTernary step is integer state moved by votes cast from float gradients; a vote whose value lies within
rounding of an integer boundary flips with the last bit of the gradient. The project's own kernels are
deterministic (no float atomics; fixed reduction orders), and so are cuBLAS's GEMMs for a fixed shape, but
PyTorch's default attention backward is not: on an H100 at the 151M shape (ctx 512) two eager steps from one
state differ in ~0.4% of T_accum after one step and ~1.1% after three, with the flash, cuDNN and (by default)
memory-efficient kernels alike, and a CUDA-graphed step differs from an eager one by exactly as much
(experiments/cuda_graph_exactness). With attention on a deterministic kernel the graphed step equals the eager
one bit for bit (0 of 347 state tensors differ after 3 steps).

:func:`enable` makes that so for the rest of the process:

* ``torch.use_deterministic_algorithms(True, warn_only=True)``: the memory-efficient attention backward and
  other ops switch to their deterministic algorithms (ops without one warn instead of failing);
* flash and cuDNN attention off (their backward has no deterministic mode here), so attention takes the
  memory-efficient kernel (or the math one);
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset (cuBLAS's documented condition for run-to-run
  reproducibility with several streams; read when cuBLAS starts, so call this before the first GEMM);
* the transformer keeps its attention op out of ``torch.compile`` (``models.transformer.shared_ops``):
  a compiled graph picks cuDNN attention whatever the flags say.
"""

from __future__ import annotations

import os

import torch


def enable() -> None:
    """Deterministic algorithms for the rest of the process (see the module docstring)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def enabled() -> bool:
    """Whether :func:`enable` (or ``torch.use_deterministic_algorithms``) is in force."""
    return torch.are_deterministic_algorithms_enabled()
