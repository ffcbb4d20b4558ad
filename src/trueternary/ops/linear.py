"""The ternary linear map ``y = x @ (T * 2**E).T + b``: its one autograd function and the kernel dispatch.

Forward and input-gradient multiply by the packed weight; the weight gradient is formed in backward only
long enough to be handed to the weight's voter (the FlipOptimizer), which turns it into integer votes, and
is then dropped: no float weight gradient is ever stored on a module, and at most one layer's float
gradient exists at a time.

Which kernels multiply is the caller's explicit choice (:class:`~trueternary.backends.LinearKernel`, the
``kernel`` argument of :func:`ternary_linear`; ``TernaryLinear.kernel`` for a layer):

    DENSE   ``weight.dense(dtype)`` (unpack + scale) and torch matmuls: the reference
    TRITON  the packed-weight matmul kernels of ``ops.ternary_matmul`` (forward ``x @ W.T``, input gradient
            ``gy @ W``), and the voter gets ``T=None`` (a kernel voter decodes the trits itself), so the trits
            are never unpacked. Where they cannot run (:func:`kernels_apply`: a float-scale hybrid weight,
            float64, a device without them) the layer runs DENSE.

The ``anchor`` argument is a 0-dim leaf tensor that requires grad: it makes autograd call our
backward even when ``x`` needs no gradient (the first layer of a network), because the votes are
produced there. It never receives a gradient.
"""

from __future__ import annotations

import math

import torch

from ..backends import LinearKernel
from ..rule import group_sum
from . import kernels_can_run
from .handles import module_of

LN2 = math.log(2.0)
_ANCHOR = torch.zeros((), requires_grad=True)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # operand dtypes the kernels take (not float64)


def kernels_apply(x: torch.Tensor, weight) -> bool:
    """Whether the Triton kernels can run this input and weight: integer scales (the hybrid float scale needs
    the dense weight gradient), ``x`` in a dtype they take (after autocast), on a device they run on."""
    return weight.scale_mode == "int" and compute_dtype(x) in KERNEL_DTYPES and kernels_can_run(x)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device, otherwise x's own."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def scale_param_grad(g: torch.Tensor, T: torch.Tensor, log2_scale: torch.Tensor, group_size: int):
    """d loss / d log2_scale for W = T * 2**log2_scale:  ln2 * 2**ls * sum_group(g * T)."""
    return LN2 * torch.exp2(log2_scale.float()) * group_sum(g.float() * T.float(), group_size)


def linear_forward(xc: torch.Tensor, weight, bias_value: torch.Tensor | None, impl: str | None) -> torch.Tensor:
    """``xc @ W.T + b`` with ``xc`` already in the matmul dtype (:func:`compute_dtype`); ``impl``: None for the
    dense reference, else the ``ops.ternary_matmul`` impl of the Triton kernels."""
    b = bias_value.to(xc.dtype) if bias_value is not None else None
    if impl is None:
        return torch.nn.functional.linear(xc, weight.dense(xc.dtype), b)
    from .ternary_matmul import ternary_matmul

    y = ternary_matmul(xc.reshape(-1, weight.cols), weight, impl=impl)
    if b is not None:
        y = y + b
    return y.view(*xc.shape[:-1], weight.rows)


def linear_backward(gy: torch.Tensor, xc: torch.Tensor, log2_scale: torch.Tensor | None, weight, bias_module,
                    impl: str | None, need_gx: bool, need_ls: bool):
    """``(gx, g_log2_scale)`` of :func:`linear_forward` (None where not needed), and the votes: the weight
    gradient goes to ``weight._voter`` (the FlipOptimizer), the bias gradient to ``bias_module._voter``."""
    gy2 = gy.reshape(-1, weight.rows)
    # the kernels never unpack the trits; the reference needs them for gx and the votes
    T = weight.trits() if impl is None else None
    gx = g_ls = None
    if need_gx:
        if impl is None:
            W = T.to(gy.dtype) * weight.expand_groups(weight.scale(gy.dtype))
            gx = gy2 @ W
        else:
            from .ternary_matmul import ternary_matmul

            gx = ternary_matmul(gy2, weight, transposed=True, impl=impl)
        gx = gx.view(*gy.shape[:-1], weight.cols)
    # An empty batch carries no gradient information: cast no votes (a zero gradient would
    # otherwise reset the voter's running gradient scale).
    empty = gy2.shape[0] == 0
    voter = None if empty else weight._voter
    want_ls = log2_scale is not None and need_ls  # (hybrid weights: the dense reference only)
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
    bm = bias_module
    if bm is not None and bm._voter is not None and not empty:
        bm._voter.cast_bias_votes(bm, gy2.float().sum(0))
    return gx, g_ls


class TernaryLinearFunction(torch.autograd.Function):
    """``y = x @ (T * 2**E).T + b``; votes in backward through ``weight._voter`` (eager code; compiled code
    runs the same two functions as the ``trueternary::linear`` op).

    ``impl``: None for the dense reference, else the ``ops.ternary_matmul`` impl of the Triton kernels (kept on
    ``ctx.impl``, so ``y.grad_fn.impl`` says which ran)."""

    @staticmethod
    def forward(ctx, x, anchor, log2_scale, bias_value, weight, bias_module, impl):
        xc = x.to(compute_dtype(x))
        ctx.weight, ctx.bias_module, ctx.impl = weight, bias_module, impl
        ctx.save_for_backward(xc, log2_scale if log2_scale is not None else torch.empty(0))
        ctx.has_log2 = log2_scale is not None
        return linear_forward(xc, weight, bias_value, impl)

    @staticmethod
    def backward(ctx, gy):
        xc, log2_scale = ctx.saved_tensors
        gx, g_ls = linear_backward(gy, xc, log2_scale if ctx.has_log2 else None, ctx.weight, ctx.bias_module,
                                   ctx.impl, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return gx, None, g_ls, None, None, None, None


# ------------------------------------------------------------------ the same, as one op for torch.compile
# torch.compile traces through a torch.library op (no graph break: the float code around every ternary layer of a
# model compiles as one graph) but not through an autograd.Function that calls the optimiser from backward. The op
# takes the weight and bias as integer handles (ops.handles). Its backward op has effects compile cannot see (the
# votes), so it is marked side-effectful: never dropped or merged, even where its input gradient goes unused; and
# cudagraph-unsafe, so that torch.compile's own CUDA graphs (mode="reduce-overhead") run it outside their replays,
# as it may read the host (TrainStep's one graph of the whole step is where the votes are captured, on the gpu
# backend's kernels).
_VOTING_OP_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def voting_backward_op(name: str):
    """Decorator: ``fn`` as the custom op ``trueternary::<name>`` that casts votes (side-effectful, cudagraph-unsafe:
    see above)."""

    def register(fn):
        op = torch.library.custom_op(f"trueternary::{name}", mutates_args=(), tags=_VOTING_OP_TAGS)(fn)
        torch.fx.node.has_side_effect(getattr(torch.ops.trueternary, name).default)
        return op

    return register


@torch.library.custom_op("trueternary::linear", mutates_args=())
def _linear_op(xc: torch.Tensor, anchor: torch.Tensor | None, log2_scale: torch.Tensor | None,
               bias_value: torch.Tensor | None, weight_handle: int, bias_handle: int, impl: str | None) -> torch.Tensor:
    return linear_forward(xc, module_of(weight_handle), bias_value, impl)


@_linear_op.register_fake
def _(xc, anchor, log2_scale, bias_value, weight_handle, bias_handle, impl):
    return xc.new_empty(*xc.shape[:-1], module_of(weight_handle).rows)


@voting_backward_op("linear_backward")
def _linear_backward_op(gy: torch.Tensor, xc: torch.Tensor, log2_scale: torch.Tensor | None, weight_handle: int,
                        bias_handle: int, impl: str | None, need_gx: bool,
                        need_ls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gx, g_ls = linear_backward(gy, xc, log2_scale, module_of(weight_handle), module_of(bias_handle), impl,
                               need_gx, need_ls)
    # (an op returns tensors: empty ones stand for "not needed")
    return (gx if gx is not None else gy.new_empty(0)), (g_ls if g_ls is not None else gy.new_empty(0))


@_linear_backward_op.register_fake
def _(gy, xc, log2_scale, weight_handle, bias_handle, impl, need_gx, need_ls):
    gx = gy.new_empty(*gy.shape[:-1], module_of(weight_handle).cols) if need_gx else gy.new_empty(0)
    g_ls = log2_scale.new_empty(log2_scale.shape, dtype=torch.float32) if need_ls and log2_scale is not None \
        else gy.new_empty(0)
    return gx, g_ls


def _setup_linear_op(ctx, inputs, output) -> None:
    xc, _anchor, log2_scale, _bias_value, weight_handle, bias_handle, impl = inputs
    ctx.save_for_backward(xc, log2_scale)
    ctx.handles, ctx.impl = (weight_handle, bias_handle), impl


def _linear_op_backward(ctx, gy):
    xc, log2_scale = ctx.saved_tensors
    need_gx, need_ls = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    gx, g_ls = torch.ops.trueternary.linear_backward(gy, xc, log2_scale, *ctx.handles, ctx.impl, need_gx, need_ls)
    return (gx if need_gx else None), None, (g_ls if need_ls else None), None, None, None, None


_linear_op.register_autograd(_linear_op_backward, setup_context=_setup_linear_op)


def check_input(x, weight) -> None:
    """The linear op's checks of its input: a floating-point tensor ending in the weight's ``cols`` features."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ternary linear expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.cols:
        raise ValueError(f"input of shape {tuple(x.shape)} does not end in the layer's {weight.cols} input features")
    if not x.is_floating_point():
        raise TypeError(f"ternary linear expects a floating-point input, got {x.dtype}")


def apply_linear(x, weight, bias_module, impl: str | None):
    """:class:`TernaryLinearFunction` on a checked input (``impl``: see there)."""
    anchor = _ANCHOR if torch.is_grad_enabled() else None
    bias_value = bias_module.value() if bias_module is not None else None
    if torch.compiler.is_compiling():
        bias_handle = bias_module.op_handle if bias_module is not None else -1
        return _linear_op(x.to(compute_dtype(x)), anchor, weight.log2_scale, bias_value, weight.op_handle,
                          bias_handle, impl)
    return TernaryLinearFunction.apply(x, anchor, weight.log2_scale, bias_value, weight, bias_module, impl)


def ternary_linear_kernel(x: torch.Tensor, weight, bias_module=None, impl: str = "auto") -> torch.Tensor:
    """:func:`ternary_linear` on the Triton kernels, asked for explicitly: matmul ``impl`` whatever the input's
    device (``auto`` resolves per call, ``ops.ternary_matmul.resolve_impl``); ValueError for float-scale weights."""
    if weight.scale_mode != "int":
        raise ValueError("the kernel linear path needs integer scales (scale_mode='int')")
    check_input(x, weight)
    return apply_linear(x, weight, bias_module, impl)


def ternary_linear(x, weight, bias_module=None, kernel: LinearKernel | str = LinearKernel.DENSE,
                   impl: str = "auto"):
    """``x @ weight.dense().T (+ bias)`` with votes in backward, on ``kernel``'s kernels where they apply
    (:func:`kernels_apply`; else the dense reference). ``impl``: the Triton matmul impl (ops.ternary_matmul)."""
    check_input(x, weight)
    triton = LinearKernel.parse(kernel) is LinearKernel.TRITON and kernels_apply(x, weight)
    return apply_linear(x, weight, bias_module, impl if triton else None)
