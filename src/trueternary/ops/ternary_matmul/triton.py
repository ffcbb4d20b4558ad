"""Triton kernels of the packed ternary matmul: forward ``x @ W.T`` and backward-input ``gy @ W``.

``W = T * 2**E`` is read from the canonical storage (flat row-major base-3 ``T_packed``, 5 trits per byte,
rows straddling bytes when ``cols % 5 != 0``, and int8 ``E`` per group of ``group_size`` columns) and
dequantised in registers; no dense copy of the weight is made.

One kernel serves both directions. Its program computes an output tile *transposed*,
``acc[o, m] = sum_r W'[o, r] * a[m, r]`` with

    forward         W' = W      (o = weight row,    r = weight column)    a = x  (M, cols)
    backward-input  W' = W.T    (o = weight column, r = weight row)       a = gy (M, rows)

so the dequantised ternary tile is always the left ``tl.dot`` operand (the one Hopper's wgmma may take
from registers), and a small token count M becomes the narrow side of the tile ("swap AB"), which is
what decode-sized batches need. The tile is stored transposed into ``out[m, o]``.

Dequantisation per element: flat index ``i = row * cols + col`` -> byte ``i // 5``, digit ``i % 5`` ->
trit (triton_utils.trit_of) -> ``t * 2**E`` (exact in bf16), assembled from its bit pattern with
integer ops (triton_utils.ternary_bf16 / ternary_fp8e4m3) rather than converted from float. When a
K-step of the tile lies inside one scale group (``group_size % BLOCK_R == 0`` forward,
``group_size % BLOCK_O == 0`` backward) the scale is a 1-D load per tile row instead of a 2-D gather
(``SCALE_1D``).

fp8 (e4m3) variant: activations arrive quantised per token (``x_q``, scale ``a[m]``, see naive.py); the
weight tile is ``T * 2**(E - E_ref[o])`` in e4m3 (exact for ternary T, 0 below 2**-9), and the epilogue
multiplies by ``a[m] * 2**E_ref[o]``. Accumulation is fp32 on the tensor cores in both variants.

Also here: ``dequant_triton``, a one-pass ``T_packed, E -> dense`` kernel (bf16/fp32, or the fp8 W_q with
its E_ref) so cuBLAS can do the multiply when that is faster (large token counts, see
docs/performance.md); the dense copy is transient (one layer at a time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    check_kernel_numel,
    check_kernel_offsets,
    dot_precision,
    exp2_int,
    load_trits,
    sm_count,
    swizzle_tile,
    ternary_bf16,
    ternary_fp8e4m3,
    ternary_fp32,
    upcast_dot,
)
from .naive import FP8_MAX, fp8_reference_exponent, quantize_rows_fp8

__all__ = ["FP8_MAX", "dequant_triton", "ternary_matmul_triton"]


@triton.jit
def _ternary_matmul_kernel(
    a_ptr, a_scale_ptr, packed_ptr, E_ptr, E_ref_ptr, out_ptr,
    M, OUT, RED, cols, n_groups, group_size,
    stride_am, stride_ar, stride_om, stride_oo,
    TRANSPOSED: tl.constexpr, FP8: tl.constexpr, SCALE_1D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
):
    pid_o, pid_m = swizzle_tile(tl.program_id(0), tl.cdiv(OUT, BLOCK_O), tl.cdiv(M, BLOCK_M), GROUP)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_o = offs_o < OUT
    mask_m = offs_m < M
    if TRANSPOSED:
        group_o = offs_o // group_size  # output column -> its scale group
    if FP8:
        if TRANSPOSED:
            e_ref = tl.load(E_ref_ptr + group_o, mask=mask_o, other=0)
        else:
            e_ref = tl.load(E_ref_ptr + offs_o, mask=mask_o, other=0)
    acc = tl.zeros((BLOCK_O, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, RED, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < RED
        w_mask = mask_o[:, None] & mask_r[None, :]
        if TRANSPOSED:  # W'[o, r] = W[r, o]
            flat = offs_r[None, :] * cols + offs_o[:, None]
            if SCALE_1D:  # the whole BLOCK_O strip lies in one group
                e = tl.load(E_ptr + offs_r * n_groups + (pid_o * BLOCK_O) // group_size, mask=mask_r, other=0)
                e = e.to(tl.int32)[None, :]
            else:
                e = tl.load(E_ptr + offs_r[None, :] * n_groups + group_o[:, None], mask=w_mask, other=0)
                e = e.to(tl.int32)
        else:  # W'[o, r] = W[o, r]
            flat = offs_o[:, None] * cols + offs_r[None, :]
            if SCALE_1D:  # the whole BLOCK_R step lies in one group
                e = tl.load(E_ptr + offs_o * n_groups + r0 // group_size, mask=mask_o, other=0)
                e = e.to(tl.int32)[:, None]
            else:
                e = tl.load(E_ptr + offs_o[:, None] * n_groups + (offs_r // group_size)[None, :], mask=w_mask,
                            other=0)
                e = e.to(tl.int32)
        t = load_trits(packed_ptr, flat, w_mask)
        a_tile = tl.load(a_ptr + offs_m[None, :] * stride_am + offs_r[:, None] * stride_ar,
                         mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_R, BLOCK_M)
        if FP8:
            w = ternary_fp8e4m3(t, e - e_ref[:, None])  # E_ref is indexed by the output element o
        elif a_ptr.dtype.element_ty == tl.bfloat16:
            w = ternary_bf16(t, e)  # bit construction: no int -> float conversions
        else:
            w = ternary_fp32(t, e).to(a_ptr.dtype.element_ty)
        if UPCAST:
            acc = tl.dot(w.to(tl.float32), a_tile.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(w, a_tile, acc, input_precision=DOT_PRECISION)
    if FP8:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        acc = acc * exp2_int(e_ref)[:, None] * a_scale[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_o[:, None] * stride_oo
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_m[None, :])


def default_matmul_config(M: int, OUT: int, device: torch.device) -> dict:
    """Tile sizes: wide tiles for many tokens; for few tokens, narrow M tiles and enough O tiles to fill the GPU."""
    if M >= 512:
        return {"BLOCK_O": 128, "BLOCK_M": 128, "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}
    block_m = max(16, min(64, triton.next_power_of_2(M)))
    block_o = 64 if triton.cdiv(OUT, 64) * triton.cdiv(M, block_m) >= sm_count(device) else 32
    return {"BLOCK_O": block_o, "BLOCK_M": block_m, "BLOCK_R": 128, "num_warps": 4, "num_stages": 4}


def ternary_matmul_triton(x: torch.Tensor, weight, transposed: bool = False, fp8: bool = False,
                          config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` if ``transposed``) for a 2-D ``x``, in x's dtype (fp32 accumulation).

    ``fp8=True`` quantises ``x`` per token to e4m3 first (naive.quantize_rows_fp8) and multiplies in fp8.
    ``out``: optional (M, OUT) output of x's dtype (any strides).
    """
    rows, cols, gs = weight.rows, weight.cols, weight.group_size
    RED, OUT = (rows, cols) if transposed else (cols, rows)
    assert x.dim() == 2 and x.shape[1] == RED, f"expected x of shape (M, {RED}), got {tuple(x.shape)}"
    assert x.device == weight.T_packed.device, "x and the weight must be on the same device"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}"
    check_kernel_numel(rows * cols)
    M = x.shape[0]
    if out is None:
        out = torch.empty(M, OUT, dtype=x.dtype, device=x.device)
    assert out.shape == (M, OUT) and out.dtype == x.dtype and out.device == x.device
    if M == 0:
        return out
    check_kernel_offsets(x, out)
    cfg = dict(default_matmul_config(M, OUT, x.device), **(config or {}))
    # Hopper's fp8 tensor-core instructions reduce over at least 32 elements (tl.dot refuses K < 32 on CUDA)
    assert not fp8 or cfg["BLOCK_R"] >= 32, f"fp8 needs BLOCK_R >= 32, got {cfg['BLOCK_R']}"
    if fp8:
        a, a_scale = quantize_rows_fp8(x)
        E_ref = fp8_reference_exponent(weight.E, transposed)
    else:
        a, a_scale, E_ref = x, x, weight.E  # unused pointers
    scale_1d = gs % (cfg["BLOCK_O"] if transposed else cfg["BLOCK_R"]) == 0
    grid = (triton.cdiv(OUT, cfg["BLOCK_O"]) * triton.cdiv(M, cfg["BLOCK_M"]),)
    _ternary_matmul_kernel[grid](
        a, a_scale, weight.T_packed, weight.E, E_ref, out,
        M, OUT, RED, cols, weight.n_groups, gs,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        TRANSPOSED=transposed, FP8=fp8, SCALE_1D=scale_1d, UPCAST=upcast_dot(x), DOT_PRECISION=dot_precision(a),
        BLOCK_O=cfg["BLOCK_O"], BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], GROUP=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ------------------------------------------------------------------------------------------------ dequant


@triton.jit
def _dequant_kernel(
    packed_ptr, E_ptr, E_ref_ptr, out_ptr, rows, cols, n_groups, group_size, stride_or, stride_oc,
    FP8: tl.constexpr, FP8_TRANSPOSED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < rows)[:, None] & (offs_c < cols)[None, :]
    t = load_trits(packed_ptr, offs_r[:, None] * cols + offs_c[None, :], mask)
    group = offs_c // group_size
    e = tl.load(E_ptr + offs_r[:, None] * n_groups + group[None, :], mask=mask, other=0).to(tl.int32)
    if FP8:
        if FP8_TRANSPOSED:
            e_ref = tl.load(E_ref_ptr + group, mask=offs_c < cols, other=0)[None, :]
        else:
            e_ref = tl.load(E_ref_ptr + offs_r, mask=offs_r < rows, other=0)[:, None]
        w = ternary_fp8e4m3(t, e - e_ref)
    elif out_ptr.dtype.element_ty == tl.bfloat16:
        w = ternary_bf16(t, e)
    else:
        w = ternary_fp32(t, e)
    ptrs = out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequant_triton(weight, dtype: torch.dtype = torch.bfloat16, transpose_out: bool = False,
                   fp8_transposed: bool | None = None, out: torch.Tensor | None = None, config: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense weight from the packed buffers in one pass: ``(W, E_ref)``.

    ``dtype`` bf16/fp16/fp32 gives ``W = T * 2**E`` (E_ref None). ``dtype=torch.float8_e4m3fn`` gives the
    fp8 kernel's ``W_q = T * 2**(E - E_ref)`` for the forward (``fp8_transposed=False``) or backward-input
    (``True``) direction, and E_ref (int32). ``transpose_out`` stores W.T (cols, rows) contiguous.
    ``out``: optional preallocated result of that shape and dtype. ``config``: overrides of the launch
    (BLOCK_R, BLOCK_C, num_warps; experiments/kernel_launches/run.py times alternatives).
    """
    rows, cols = weight.rows, weight.cols
    check_kernel_numel(rows * cols)
    fp8 = dtype == torch.float8_e4m3fn
    shape = (cols, rows) if transpose_out else (rows, cols)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=weight.T_packed.device)
    assert out.shape == shape and out.dtype == dtype
    E_ref = fp8_reference_exponent(weight.E, bool(fp8_transposed)) if fp8 else None
    s_r, s_c = (out.stride(1), out.stride(0)) if transpose_out else (out.stride(0), out.stride(1))
    cfg = {"BLOCK_R": 32, "BLOCK_C": 64} if transpose_out else {"BLOCK_R": 16, "BLOCK_C": 128}
    cfg = {**cfg, "num_warps": 4, **(config or {})}
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, cfg["BLOCK_C"]))
    _dequant_kernel[grid](
        weight.T_packed, weight.E, E_ref if fp8 else weight.E, out, rows, cols, weight.n_groups,
        weight.group_size, s_r, s_c, FP8=fp8, FP8_TRANSPOSED=bool(fp8_transposed), **cfg,
    )
    return out, E_ref
