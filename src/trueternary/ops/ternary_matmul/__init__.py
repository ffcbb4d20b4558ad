"""Packed ternary matmul for the ``gpu`` backends: forward ``x @ W.T`` and backward-input ``gy @ W``.

    ternary_matmul(x, weight, transposed=False, impl="auto")

``impl``:

    naive      the dense-fallback path: ``weight.dense(dtype)`` (unpack + scale) then ``torch.matmul``
    fused      Triton, W dequantised in registers from ``T_packed``/``E`` (bf16 tensor cores, fp32 accumulate)
    fused-fp8  the same with e4m3 operands (per-token activation scale; see naive.py for the exact math)
    dequant    one Triton pass writes the dense bf16 W (transient), then cuBLAS multiplies
    auto       CPU: naive. CUDA (and CPU under TRITON_INTERPRET=1, so tests run what a GPU runs): fused for
               M <= FUSED_MAX_TOKENS tokens, dequant above (large GEMMs are cuBLAS-bound; the crossover is
               measured by scripts/bench_kernels.py)

:class:`TernaryLinearKernelFunction` is ``ops.linear.TernaryLinearFunction`` with these kernels: the
backward computes ``gx`` with ``transposed=True`` and hands ``gy``/``x`` to the voter's
``cast_matmul_votes(weight, gy2, x2, T)`` with ``T=None`` for a kernel backend (its vote kernel decodes the
trits from ``T_packed`` itself), so the trits are never unpacked. Integer-scale weights only (the hybrid
float-scale mode needs the float weight gradient, which the reference path forms).
"""

from __future__ import annotations

import torch

from ..linear import KERNEL_BACKENDS, compute_dtype, grad_anchor, kernels_can_run
from .naive import quantize_rows_fp8, ternary_matmul_fp8_naive, ternary_matmul_naive

MATMUL_IMPLS = ("auto", "naive", "fused", "fused-fp8", "dequant")
FUSED_MAX_TOKENS = 2048  # auto: fused kernel up to this many tokens, dequant + cuBLAS above


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


class TernaryLinearKernelFunction(torch.autograd.Function):
    """``y = x @ (T * 2**E).T + b`` on the packed weight; votes in backward through ``weight._voter``."""

    @staticmethod
    def forward(ctx, x, anchor, bias_value, weight, bias_module, impl):
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, weight.cols).to(dtype)
        y = ternary_matmul(x2, weight, impl=impl)
        if bias_value is not None:
            y = y + bias_value.to(dtype)
        ctx.weight, ctx.bias_module, ctx.impl = weight, bias_module, impl
        ctx.save_for_backward(x2)
        return y.view(*x.shape[:-1], weight.rows)

    @staticmethod
    def backward(ctx, gy):
        (x2,) = ctx.saved_tensors
        weight = ctx.weight
        gy2 = gy.reshape(-1, weight.rows)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = ternary_matmul(gy2, weight, transposed=True, impl=ctx.impl).view(*gy.shape[:-1], weight.cols)
        empty = gy2.shape[0] == 0  # no tokens, no gradient information: no votes (as ops/linear.py)
        voter = None if empty else weight._voter
        if voter is not None:
            T = None if getattr(voter, "backend", None) in KERNEL_BACKENDS else weight.trits()
            voter.cast_matmul_votes(weight, gy2, x2.to(gy.dtype), T)
        bm = ctx.bias_module
        if bm is not None and bm._voter is not None and not empty:
            bm._voter.cast_bias_votes(bm, gy2.float().sum(0))
        return gx, None, None, None, None, None


def ternary_linear_kernel(x: torch.Tensor, weight, bias_module=None, impl: str = "auto") -> torch.Tensor:
    """Functional form of :class:`TernaryLinearKernelFunction` (same checks as ``ops.linear.ternary_linear``)."""
    if weight.scale_mode != "int":
        raise ValueError("the kernel linear path needs integer scales (scale_mode='int')")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != weight.cols:
        raise ValueError(f"input of shape {tuple(getattr(x, 'shape', ()))} does not end in the layer's "
                         f"{weight.cols} input features")
    if not x.is_floating_point():
        raise TypeError(f"ternary linear expects a floating-point input, got {x.dtype}")
    anchor = grad_anchor() if torch.is_grad_enabled() else None
    bias_value = bias_module.value() if bias_module is not None else None
    return TernaryLinearKernelFunction.apply(x, anchor, bias_value, weight, bias_module, impl)


__all__ = [
    "FUSED_MAX_TOKENS",
    "MATMUL_IMPLS",
    "TernaryLinearKernelFunction",
    "quantize_rows_fp8",
    "resolve_impl",
    "ternary_linear_kernel",
    "ternary_matmul",
    "ternary_matmul_fp8_naive",
    "ternary_matmul_naive",
]
