"""Packed ternary matmul for the ``gpu`` backends: forward ``x @ W.T`` and backward-input ``gy @ W``.

    ternary_matmul(x, weight, transposed=False, impl="auto")

``impl``:

    naive      the dense-fallback path: ``weight.dense(dtype)`` (unpack + scale) then ``torch.matmul``
    fused      Triton, W dequantised in registers from ``T_packed``/``E`` (bf16 tensor cores, fp32 accumulate)
    fused-fp8  the same with e4m3 operands (per-token activation scale; see naive.py for the exact math)
    dequant    one Triton pass writes the dense bf16 W (transient), then cuBLAS multiplies
    auto       CPU: naive. CUDA (and CPU under TRITON_INTERPRET=1, so tests run what a GPU runs): fused for
               M <= FUSED_MAX_TOKENS tokens, dequant above (a training step's GEMMs are compute-bound, where the
               fused kernel's mainloop runs at a fraction of cuBLAS's speed; docs/performance.md, "Crossover")

``ops.linear.TernaryLinearFunction`` runs these kernels for a layer whose kernel is ``LinearKernel.TRITON``
(forward with ``transposed=False``, input gradient with ``transposed=True``); ``ops.linear.ternary_linear_kernel``
is that path asked for explicitly. Integer-scale weights only (the hybrid float-scale mode needs the float
weight gradient, which the reference path forms). This module imports nothing of ``ops.linear``, which calls it.
"""

from __future__ import annotations

import torch

from .. import kernels_can_run
from .naive import quantize_rows_fp8, ternary_matmul_fp8_naive, ternary_matmul_naive

MATMUL_IMPLS = ("auto", "naive", "fused", "fused-fp8", "dequant")
# auto: fused kernel up to this many tokens, dequant + cuBLAS above. Whole graphed training steps measured with
# benchmarks/bench_scale.py --fused_max_tokens (docs/performance.md, "Crossover"): dequant + cuBLAS was 3.9x faster
# at 2048 tokens per call (1.2B, H200), 1.18x at 256 (1.2B, H100) and 1.5x at 132 (the seed setting, H100); the
# fused kernel keeps the smaller calls (generation, tiny batches), where reading the packed weight once counts.
FUSED_MAX_TOKENS = 128


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"unknown matmul impl {impl!r}; choose one of {', '.join(MATMUL_IMPLS)}")
    if impl == "auto":
        if not kernels_can_run(x):
            return "naive"
        return "fused" if x.shape[0] <= FUSED_MAX_TOKENS else "dequant"
    return impl


def ternary_matmul(x: torch.Tensor, weight, transposed: bool = False, impl: str = "auto",
                   config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` if ``transposed``) for a 2-D ``x``, in x's dtype."""
    impl = resolve_impl(impl, x)
    if impl == "naive":
        return ternary_matmul_naive(x, weight, transposed)
    from .triton import dequant_triton, ternary_matmul_triton

    if impl == "dequant":
        W, _ = dequant_triton(weight, x.dtype)
        return x @ (W if transposed else W.t())
    return ternary_matmul_triton(x, weight, transposed, fp8=impl == "fused-fp8", config=config)


__all__ = [
    "FUSED_MAX_TOKENS",
    "MATMUL_IMPLS",
    "quantize_rows_fp8",
    "resolve_impl",
    "ternary_matmul",
    "ternary_matmul_fp8_naive",
    "ternary_matmul_naive",
]
