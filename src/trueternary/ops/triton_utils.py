"""Triton device helpers shared by the ternary kernels (matmul, votes, flips), and launch helpers.

Device functions (``@triton.jit``, inlined into the kernels that call them):

    trit_of(byte, digit)        the trit number ``digit`` (0..4) of a packed base-3 byte, as int32 in {-1, 0, 1}
    load_trits(packed, flat, m) the trits at flat row-major indices, read straight from ``T_packed``
    uniform01(flat, key)        rng.py's ``u(key, i) = (mix32(i XOR key) >> 8) * 2**-24``, bit-exact
    exp2_int(e)                 2**e as float32 for int32 e in [-127, 127], exact (no ex2.approx)
    ternary_fp32/bf16/fp8e4m3   t * 2**e from its bit pattern (integer ops only)

Decoding a trit needs ``byte // 3**digit % 3`` with a digit that varies per element (rows straddle bytes
when ``cols % 5 != 0``). Integer division by a variable costs tens of instructions on a GPU, so it is
done with the multiply-shift identity, checked exhaustively for every byte 0..242 and digit 0..4::

    byte // 3**d == (byte * M[d]) >> 16,   M = (65536, 21846, 7282, 2428, 810)
    q % 3        == q - 3 * ((q * 21846) >> 16)                           (q <= 242)

This module imports Triton at import time: import it only from ``ops/*/triton.py`` (which are imported
lazily), never from code that must run without Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Flat trit indices are int32 in every kernel: a matrix may hold at most this many weights.
MAX_KERNEL_NUMEL = 2**31 - 1


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


KERNEL_MODULES = (
    "trueternary.ops.triton_utils",
    "trueternary.ops.ternary_matmul.triton",
    "trueternary.ops.votes.triton",
    "trueternary.ops.flip.triton",
)


def interpreter_ready() -> bool:
    """True when the kernels of this package will run in Triton's CPU interpreter in this process.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when a function is *decorated*, i.e. when its module is
    imported; that includes Triton's own ``tl.sum``/``tl.cdiv`` (decorated when ``triton`` is first
    imported). So the variable must be set before the first ``import triton`` of the process; the tests
    set it at the top of their modules and fall back to a subprocess when that was too late.
    """
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    if not interpreting() or not isinstance(tl.standard.sum, InterpretedFunction):
        return False
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        jitted = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
        if not all(isinstance(v, InterpretedFunction) for v in jitted):
            return False
    return True


def upcast_dot(t: torch.Tensor) -> bool:
    """Whether kernels must feed ``tl.dot`` float32 operands instead of bf16/fp8.

    Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bit patterns (wrong), so on
    CPU tensors (which only run under the interpreter) the kernels upcast the already-rounded bf16/fp8
    values to float32 before the dot: the products are exact either way, so the result is what the
    tensor cores compute up to the order of the fp32 accumulation.
    """
    return t.device.type == "cpu"


def dot_precision(t: torch.Tensor) -> str:
    """``tl.dot`` input precision: 'ieee' for float32 operands (like torch.matmul, which does not use TF32
    by default), 'tf32' otherwise (ignored for bf16/fp16/fp8 operands)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def check_kernel_numel(numel: int, what: str = "weight") -> None:
    if numel > MAX_KERNEL_NUMEL:
        raise ValueError(f"{what} has {numel} elements; the Triton kernels index with int32 (max {MAX_KERNEL_NUMEL})")


def check_kernel_offsets(*tensors: torch.Tensor) -> None:
    """Address offsets inside the kernels are int32: every operand must span < 2**31 elements."""
    for t in tensors:
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)
        if span > MAX_KERNEL_NUMEL:
            raise ValueError(f"tensor of shape {tuple(t.shape)} spans {span} elements; the Triton kernels index "
                             f"with int32 (max {MAX_KERNEL_NUMEL}): split the batch")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (tile heuristics fill at least one wave); 1 on CPU."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def trit_of(byte, digit):
    """Trit ``digit`` (int32 tensor in 0..4) of packed bytes ``byte`` (int32 in 0..242): int32 in {-1, 0, 1}."""
    mult = tl.where(digit == 0, 65536, tl.where(digit == 1, 21846, tl.where(digit == 2, 7282,
                    tl.where(digit == 3, 2428, 810))))
    q = (byte * mult) >> 16  # byte // 3**digit
    return q - 3 * ((q * 21846) >> 16) - 1  # q % 3 - 1


@triton.jit
def load_trits(packed_ptr, flat, mask):
    """Trits (int32) at flat row-major indices ``flat`` (int32) of a ``T_packed`` buffer; 0 where masked."""
    byte_index = flat // 5
    # 121 = five 0-trits: masked lanes decode to 0 whatever their digit.
    byte = tl.load(packed_ptr + byte_index, mask=mask, other=121).to(tl.int32)
    return trit_of(byte, flat - byte_index * 5)


@triton.jit
def uniform01(flat, key):
    """float32 uniforms in [0, 1) for flat indices ``flat`` (int32 >= 0) under ``key`` (uint32): rng.uniform."""
    x = flat.to(tl.uint32) ^ key
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B  # wraps mod 2**32 like rng.mix32's "& MASK32"
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    x = x ^ (x >> 16)
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: exact


@triton.jit
def exp2_int(e):
    """2**e (float32) for int32 ``e`` in [-127, 127], built from the exponent bits (exact, no ex2.approx)."""
    # 2**-127 is the one subnormal in range: its bit pattern is 0x00400000.
    bits = tl.where(e > -127, (e + 127) << 23, 0x00400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def ternary_fp32(t, e):
    """``t * 2**e`` as float32 built from its bit pattern (t int32 in {-1,0,1}, e int32 in [-127, 127]): no float
    multiply, which the GPU may flush to zero for the subnormal 2**-127."""
    mag = tl.where(e > -127, (e + 127) << 23, 0x00400000)
    bits = tl.where(t == 0, 0, mag | tl.where(t < 0, -2147483648, 0))  # sign bit 0x80000000 as int32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def ternary_bf16(t, e):
    """``t * 2**e`` as bfloat16 built from its bit pattern (t int32 in {-1,0,1}, e int32 in [-127, 127]).

    bf16 = sign | 8-bit exponent (bias 127) | 7-bit mantissa: ``2**e`` is exponent field ``e + 127`` with a
    zero mantissa, and 2**-127 the subnormal 0x0040. Integer ops only: no int->float->bf16 conversions
    in the matmul's dequantisation (those run at a quarter of the integer rate).
    """
    mag = tl.where(e > -127, (e + 127) << 7, 0x0040)
    bits = tl.where(t == 0, 0, mag | tl.where(t < 0, 0x8000, 0))
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def ternary_fp8e4m3(t, rel):
    """``t * 2**rel`` as float8 e4m3 from its bit pattern, for rel <= 0 (int32); 0 below 2**-9.

    e4m3 = sign | 4-bit exponent (bias 7) | 3-bit mantissa: 2**rel is exponent field ``rel + 7`` for
    rel >= -6, and the subnormals 0x04, 0x02, 0x01 for rel = -7, -8, -9.
    """
    mag = tl.where(rel >= -6, (rel + 7) << 3, tl.where(rel >= -9, 1 << (tl.maximum(rel, -9) + 9), 0))
    bits = tl.where((t == 0) | (mag == 0), 0, mag | tl.where(t < 0, 0x80, 0))
    return bits.to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def swizzle_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Grouped tile order (Triton's matmul tutorial): ``GROUP`` row tiles share column tiles in L2."""
    width = GROUP * n_cols
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    pid_row = first + (pid % width) % size
    pid_col = (pid % width) // size
    return pid_row, pid_col
