"""Autograd function of the ternary linear map ``y = x @ (T * 2**E).T + b``.

Forward and input-gradient dequantise the packed weight and multiply; the weight gradient is
formed in backward only long enough to be handed to the weight's voter (the FlipOptimizer),
which turns it into integer votes, and is then dropped: no float weight gradient is ever stored
on a module, and at most one layer's float gradient exists at a time.

The ``anchor`` argument is a 0-dim leaf tensor that requires grad: it makes autograd call our
backward even when ``x`` needs no gradient (the first layer of a network), because the votes are
produced there. It never receives a gradient.

When the weight is trained by a ``gpu`` / ``gpu-signcache`` FlipOptimizer and the input lives where the
Triton kernels run, :func:`ternary_linear` dispatches to ``ops.ternary_matmul.TernaryLinearKernelFunction``
instead (packed-weight matmul kernels forward and backward-input, fused votes): same contract.
"""

from __future__ import annotations

import math

import torch

from ..rule import group_sum

LN2 = math.log(2.0)
_ANCHOR = torch.zeros((), requires_grad=True)
KERNEL_BACKENDS = ("gpu", "gpu-signcache")  # FlipOptimizer backends that run the Triton kernels
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # operand dtypes the kernels take (not float64)


def kernels_can_run(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return True
    if t.device.type != "cpu":
        return False
    from . import triton_available

    if not triton_available():
        return False
    from .triton_utils import interpreting

    return interpreting()


def uses_kernels(x: torch.Tensor, weight) -> bool:
    """Whether :func:`ternary_linear` runs on the Triton kernels for this input and weight: the weight is
    trained by a gpu backend, has integer scales (the hybrid float scale needs the dense weight gradient),
    and ``x`` is on a device the kernels run on, in a dtype they take (after autocast)."""
    return (getattr(weight._voter, "backend", None) in KERNEL_BACKENDS and weight.scale_mode == "int"
            and compute_dtype(x) in KERNEL_DTYPES and kernels_can_run(x))


def grad_anchor() -> torch.Tensor:
    return _ANCHOR


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device, otherwise x's own."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def scale_param_grad(g: torch.Tensor, T: torch.Tensor, log2_scale: torch.Tensor, group_size: int):
    """d loss / d log2_scale for W = T * 2**log2_scale:  ln2 * 2**ls * sum_group(g * T)."""
    return LN2 * torch.exp2(log2_scale.float()) * group_sum(g.float() * T.float(), group_size)


class TernaryLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, log2_scale, bias_value, weight, bias_module):
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        W = weight.dense(dtype)
        b = bias_value.to(dtype) if bias_value is not None else None
        y = torch.nn.functional.linear(xc, W, b)
        ctx.weight, ctx.bias_module = weight, bias_module
        ctx.save_for_backward(xc, log2_scale if log2_scale is not None else torch.empty(0))
        ctx.has_log2 = log2_scale is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, log2_scale = ctx.saved_tensors
        weight = ctx.weight
        out_f = gy.shape[-1]
        gy2 = gy.reshape(-1, out_f)
        T = weight.trits()
        gx = g_ls = None
        if ctx.needs_input_grad[0]:
            W = T.to(gy.dtype) * weight.expand_groups(weight.scale(gy.dtype))
            gx = (gy2 @ W).view(*gy.shape[:-1], weight.cols)
        # An empty batch carries no gradient information: cast no votes (a zero gradient would
        # otherwise reset the voter's running gradient scale).
        empty = gy2.shape[0] == 0
        voter = None if empty else weight._voter
        want_ls = ctx.has_log2 and ctx.needs_input_grad[2]
        x2 = xc.reshape(-1, weight.cols).to(gy.dtype)
        if want_ls:  # hybrid: the float scale needs the weight gradient itself
            gW = (gy2.t() @ x2).float()
            g_ls = scale_param_grad(gW, T, log2_scale, weight.group_size)
            if voter is not None:
                voter.cast_votes(weight, gW, T)
            del gW
        elif voter is not None:
            # gW = gy2.T @ x2, formed (or fused into the vote kernel) by the voter's backend
            voter.cast_matmul_votes(weight, gy2, x2, T)
        bm = ctx.bias_module
        if bm is not None and bm._voter is not None and not empty:
            bm._voter.cast_bias_votes(bm, gy2.float().sum(0))
        return gx, None, g_ls, None, None, None


def ternary_linear(x, weight, bias_module=None):
    """Functional form: ``x @ weight.dense().T (+ bias)`` with votes in backward."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ternary linear expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.cols:
        raise ValueError(f"input of shape {tuple(x.shape)} does not end in the layer's {weight.cols} input features")
    if not x.is_floating_point():
        raise TypeError(f"ternary linear expects a floating-point input, got {x.dtype}")
    if uses_kernels(x, weight):
        from .ternary_matmul import ternary_linear_kernel

        return ternary_linear_kernel(x, weight, bias_module)
    anchor = _ANCHOR if torch.is_grad_enabled() else None
    bias_value = bias_module.value() if bias_module is not None else None
    return TernaryLinearFunction.apply(x, anchor, weight.log2_scale, bias_value, weight, bias_module)
