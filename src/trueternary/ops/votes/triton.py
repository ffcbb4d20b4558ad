"""Triton kernels of the fused weight-gradient votes (references in ``naive.py``).

``_matmul_votes_kernel``: one program owns a (BLOCK_R, BLOCK_C) tile of the weight, a whole number of
``NB x NB`` normalisation tiles (``NB = norm_block``, tiles aligned at 0 like rule.block_factored_ms). It
forms the weight-gradient tile ``g = gy[:, rows].T @ x[:, cols]`` in registers (tensor cores, fp32
accumulation, reduction over the M tokens: no split-K, the epilogue needs the complete tile) and, in the
epilogue, without ever writing ``g`` to memory:

    non-finite   a tile holding a NaN/inf element (counted by element: finite values of any size pass) is
                 zeroed; the first such tile of the call sets ``flag`` and adds 1 to the optimiser's
                 ``nonfinite`` counter (so a layer counts once)
    normalise    per NB x NB sub-tile: r_i, c_j, m = means of g**2 over the sub-tile's part of row i, of
                 column j, and over the sub-tile (edge sub-tiles: over their real elements; a mean that
                 overflows float32 held at FLOAT32_MAX, rule.py's "Large gradients"), then
                 ms = r_i * (c_j / max(m, 1e-38))                                 (rule.block_factored_ms)
                 s  = reciprocal(sqrt(ms + 1e-30)) * -lr                          (rule.vote_multiplier)
    trits        T decoded from ``T_packed`` only when needed (decay term, scale gradient)
    votes        'stochastic': v = clamp(floor(g*s - decay*T + u), -clip, clip), u = rng.uniform at the
                 element's flat index under the key of this call (derived on the device, see below)
                 'sign':       v = -sign(g)                                        (no normalisation)
    accumulate   T_accum = clamp(T_accum + v, -127, 127)                   (CACHE_BITS == 0)
                 or the votes are written to a compact vote cache            (CACHE_BITS 2/4/8, gpu-signcache)
    scale grad   gE[r, group] (+)= sum over the tile's columns of the group of g * T     (float32 buffer;
                 _scale_votes_kernel reads overflowed sums as rule.saturate_sums does)

With ``NORM_MEMORY`` (rules with ``norm_beta > 0``, the default) the epilogue also keeps the normaliser's
moving averages (rule.ema_block_factored_stats): it loads the tile's integer codes (an int16 per NB x NB
sub-tile, an int8 per sub-tile row and column), moves them toward this call's sub-tile means, stores the new
codes and normalises by the means they stand for. The codes' arithmetic is exact float32 (a table, bit fields,
IEEE divide; rule.log2_code / rule.code_value), so the codes equal the reference's bit for bit for the same
statistics. A non-finite tile keeps its codes.

``_gw_stats_kernel`` + ``_gw_votes_kernel`` (impl 'gemm', above VOTES_FUSED_MAX_TOKENS: cuBLAS formed gW): the
same work in two passes over gW. The first, one program per NB x NB normalisation tile read in blocks of rows,
does the non-finite check and the statistics (moving averages and codes as above) and stores the means; the
second votes on blocks of rows from them, with the same epilogue code (``_cast_votes``). One program per tile
doing all of it held too much at once (registers spilled; one program per SM, waiting on the codes' table
loads): the two passes took a 151M step's vote time from 3.45 to 1.78 ms (H200, docs/performance.md).

``_scale_votes_kernel`` votes on gE (rows x n_groups, small, complete once the first kernel is done) into
``E_accum``, normalised like the weights' votes (rule.vote_scale with ``lr * scale_lr``): 'block_factored'
(one program per norm_block x norm_block tile of gE, the same epilogue statistics) or 'tensor' (one program:
``ms = mean(gE**2)`` in a first pass); it skips the votes when ``step % scale_update_interval != 0`` or the
layer had a non-finite tile.

Exactness. Kernels are launched with ``enable_fp_fusion=False`` (no FMA contraction), divisions and square
roots are IEEE (``div_rn``/``sqrt_rn``, like PyTorch's CUDA ``/``, ``reciprocal`` and ``sqrt``), and the op
order is rule.py's, so for the same gradient the votes are bit-identical to the dense-fallback path.
The float sums (row/column/tile sums of g**2, gE, sum of gE**2) are taken in a different order than
PyTorch's: exact for integer-valued gradients (every partial sum < 2**24), last-bit different otherwise,
so on arbitrary inputs votes agree statistically. ``mean(gE**2)`` is ``sum * float32(1/n)`` on CUDA (as
PyTorch's CUDA mean) and ``sum / n`` on the CPU (as PyTorch's CPU mean, interpreter runs).

RNG keys without the host: ``key = rng.stream_key(seed, stream, step * calls_per_step + call)`` is
``mix32((counter * K_STEP + key_base) mod 2**32)``; the kernels read ``step`` from a device int64 tensor
(the optimiser's step counter) and get ``key_base(seed, stream)`` and ``call`` as constant arguments, so a
captured CUDA graph replays with fresh keys every step.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ... import rng
from ...rule import FLOAT32_MAX, NORM_RATIO_FRAC, NORM_TILE_EMPTY, NORM_TILE_FRAC, NORM_TILE_MIN, code_lut, norm_tiles
from ..triton_utils import (
    check_kernel_numel,
    check_kernel_offsets,
    dot_precision,
    load_trits,
    sm_count,
    swizzle_tile,
    uniform01,
    upcast_dot,
)
from .naive import FUSED_NORM_BLOCKS

MODE_STOCHASTIC, MODE_SIGN = 0, 1
# the norm_beta codes' layout (rule.py), as constants the compiled kernels may read; the fractional bits are
# written as literals in the calls (8, 3): the interpreter cannot shift by a constexpr object
assert (NORM_TILE_FRAC, NORM_RATIO_FRAC) == (8, 3), "update the literals in _ema_means"
_TILE_EMPTY = tl.constexpr(NORM_TILE_EMPTY)
_TILE_MIN = tl.constexpr(NORM_TILE_MIN)
_F32_MAX = tl.constexpr(FLOAT32_MAX)  # (in float32's normal range: Triton types it float32)
GE_NONE, GE_ALIGNED, GE_ATOMIC = 0, 1, 2


def key_base(seed: int, stream: int) -> int:
    """``(seed*K_SEED + stream*K_STREAM + 1) mod 2**32`` of rng.stream_key, as a signed int32 bit pattern
    (so Triton always types the argument int32; the kernel bitcasts it back to uint32)."""
    base = (seed * rng._K_SEED + stream * rng._K_STREAM + 1) & rng.MASK32
    return base - (1 << 32) if base >= 1 << 31 else base


@triton.jit
def _mix32(x):
    """rng.mix32 on uint32 (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit
def _device_key(step_ptr, call, key_base, CALLS_PER_STEP: tl.constexpr, K_STEP: tl.constexpr):
    """uint32 ``rng.stream_key(seed, stream, step * CALLS_PER_STEP + call)`` with ``step`` read from the device."""
    counter = (tl.load(step_ptr) * CALLS_PER_STEP + call).to(tl.uint32)  # int64 -> uint32 keeps it mod 2**32
    return _mix32(counter * K_STEP + key_base.to(tl.uint32, bitcast=True))


@triton.jit
def _scale_from_full(r_full, c_full, m_full, neg_lr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``s = reciprocal(sqrt(r * (c / max(m, 1e-38)) + 1e-30)) * -lr`` elementwise (rule.factored_ms,
    rule.vote_multiplier)."""
    # rule: ms = r * (c / clamp_min(m, 1e-38)); m == 0 means an all-zero sub-tile (ms = 0 there either way, and
    # the where() keeps that true even if the 1e-38 subnormal were flushed to zero)
    # (1e-38 as an explicit float32 constant: Triton 3.6 types a bare 1e-38 literal as fp64)
    m_min = tl.full((BLOCK_R, BLOCK_C), 1e-38, tl.float32)
    ms = r_full * tl.where(m_full > 0, tl.div_rn(c_full, tl.maximum(m_full, m_min)), 0.0)
    return tl.div_rn(tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32), tl.sqrt_rn(ms + 1e-30)) * neg_lr


@triton.jit
def _sub_tile_means(g, r0, c0, R, C, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Means of g**2 per NB x NB sub-tile of a (BLOCK_R, BLOCK_C) tile at (r0, c0) (rule.block_factored_stats):
    rows (BLOCK_R, SC), columns (SR, BLOCK_C), sub-tiles (SR, SC); lanes outside the matrix hold g = 0 and edge
    sub-tiles average over their real elements. Only for SR * SC > 1 (one sub-tile: see _block_factored_scale)."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    g2 = g * g
    n_rows = tl.minimum(tl.maximum(R - (r0 + tl.arange(0, SR) * NB), 1), NB).to(tl.float32)  # (SR,)
    n_cols = tl.minimum(tl.maximum(C - (c0 + tl.arange(0, SC) * NB), 1), NB).to(tl.float32)  # (SC,)
    row_sum = tl.sum(tl.reshape(g2, (BLOCK_R, SC, NB)), axis=2)  # (BLOCK_R, SC): row i within sub-tile column
    col_sum = tl.sum(tl.reshape(g2, (SR, NB, BLOCK_C)), axis=1)  # (SR, BLOCK_C): column j within sub-tile row
    tile_sum = tl.sum(tl.reshape(col_sum, (SR, SC, NB)), axis=2)  # (SR, SC)
    r_mean = tl.div_rn(row_sum, tl.broadcast_to(n_cols[None, :], (BLOCK_R, SC)))
    c_mean = tl.div_rn(col_sum, tl.broadcast_to(n_rows[:, None], (SR, BLOCK_C)))
    m = tl.div_rn(tile_sum, n_rows[:, None] * n_cols[None, :])
    return _saturate(r_mean), _saturate(c_mean), _saturate(m)


@triton.jit
def _saturate(mean_sq):
    """rule._saturated: a mean of g**2 that overflowed float32 (inf) held at FLOAT32_MAX (never NaN: g is finite)."""
    return tl.minimum(mean_sq, _F32_MAX)


@triton.jit
def _saturate_sums(x):
    """rule.saturate_sums: +-inf -> +-FLOAT32_MAX, NaN (from +inf + -inf) -> 0 (NaN first: on the GPU
    min/max would return the other operand)."""
    return tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, -_F32_MAX), _F32_MAX))


@triton.jit
def _one_tile_means(g, r0, c0, R, C, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """_sub_tile_means for a (BLOCK_R, BLOCK_C) tile inside one NB x NB sub-tile (BLOCK_R/BLOCK_C < NB only where
    the matrix ends inside the block): rows (BLOCK_R,), columns (BLOCK_C,), the tile mean."""
    g2 = g * g
    return _means_from_sums(tl.sum(g2, axis=1), tl.sum(g2, axis=0), r0, c0, R, C, NB, BLOCK_R, BLOCK_C)


@triton.jit
def _means_from_sums(row_sum, col_sum, r0, c0, R, C, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The means of one sub-tile at (r0, c0) from its row sums (BLOCK_R,) and column sums (BLOCK_C,) of g**2."""
    n_rows = tl.minimum(tl.maximum(R - r0, 1), NB).to(tl.float32)  # real rows of the sub-tile (>= 1 as the
    n_cols = tl.minimum(tl.maximum(C - c0, 1), NB).to(tl.float32)  # reference's clamp_min(1))
    tile_sum = tl.sum(col_sum, axis=0)
    r_mean = tl.div_rn(row_sum, tl.full((BLOCK_R,), 1.0, tl.float32) * n_cols)
    c_mean = tl.div_rn(col_sum, tl.full((BLOCK_C,), 1.0, tl.float32) * n_rows)
    return _saturate(r_mean), _saturate(c_mean), _saturate(tl.div_rn(tile_sum, n_rows * n_cols))


@triton.jit
def _full_from_means(r_mean, c_mean, m, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-sub-tile means of _sub_tile_means broadcast back to (BLOCK_R, BLOCK_C) (row-major reshapes:
    (i, jb, k) -> (i, jb*NB + k) etc.)."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    r_full = tl.reshape(tl.broadcast_to(r_mean[:, :, None], (BLOCK_R, SC, NB)), (BLOCK_R, BLOCK_C))
    c_full = tl.reshape(tl.broadcast_to(c_mean[:, None, :], (SR, NB, BLOCK_C)), (BLOCK_R, BLOCK_C))
    m_cols = tl.reshape(tl.broadcast_to(m[:, :, None], (SR, SC, NB)), (SR, BLOCK_C))
    m_full = tl.reshape(tl.broadcast_to(m_cols[:, None, :], (SR, NB, BLOCK_C)), (BLOCK_R, BLOCK_C))
    return r_full, c_full, m_full


@triton.jit
def _block_factored_scale(g, r0, c0, R, C, neg_lr, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``s = reciprocal(sqrt(r_i * (c_j / m) + 1e-30)) * -lr`` for a (BLOCK_R, BLOCK_C) gradient tile at (r0, c0),
    statistics per NB x NB sub-tile (rule.block_factored_ms); lanes outside the matrix hold g = 0."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    if SR <= 1 and SC <= 1:  # (0: a block narrower than NB, where the matrix ends inside it)
        r_mean, c_mean, m = _one_tile_means(g, r0, c0, R, C, NB, BLOCK_R, BLOCK_C)
        r_full = tl.broadcast_to(r_mean[:, None], (BLOCK_R, BLOCK_C))
        c_full = tl.broadcast_to(c_mean[None, :], (BLOCK_R, BLOCK_C))
        m_full = tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32) * m
    else:
        r_mean, c_mean, m = _sub_tile_means(g, r0, c0, R, C, NB, BLOCK_R, BLOCK_C)
        r_full, c_full, m_full = _full_from_means(r_mean, c_mean, m, NB, BLOCK_R, BLOCK_C)
    return _scale_from_full(r_full, c_full, m_full, neg_lr, BLOCK_R, BLOCK_C)


@triton.jit
def _code_offsets(pid_r, pid_c, R, C, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and masks of a tile's codes in the buffers shaped like rule.block_factored_stats' outputs:
    rows (Rb, br, Cb) -> row i, sub-tile column cb at i * Cb + cb; columns (Rb, Cb, bc) -> sub-tile row rb,
    column j at rb * Cb * bc + j; tiles (Rb, Cb) at rb * Cb + cb (br, bc = min(NB, R), min(NB, C))."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    Rb = tl.cdiv(R, NB)
    Cb = tl.cdiv(C, NB)
    col_stride = Cb * tl.minimum(C, NB)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rb = pid_r * SR + tl.arange(0, SR)
    cb = pid_c * SC + tl.arange(0, SC)
    # the buffers' padding rows/columns (past R, C up to whole sub-tiles) are the reference's: g = 0 there
    row_off = offs_r[:, None] * Cb + cb[None, :]
    row_mask = (offs_r < Rb * tl.minimum(R, NB))[:, None] & (cb < Cb)[None, :]
    col_off = rb[:, None] * col_stride + offs_c[None, :]
    col_mask = (rb < Rb)[:, None] & (offs_c < col_stride)[None, :]
    tile_off = rb[:, None] * Cb + cb[None, :]
    tile_mask = (rb < Rb)[:, None] & (cb < Cb)[None, :]
    return row_off, row_mask, col_off, col_mask, tile_off, tile_mask


@triton.jit
def _code_value(code, lut_ptr, FRAC: tl.constexpr):
    """rule.code_value: ``lut[code mod 2**FRAC] * 2**(code >> FRAC)`` (float32, exact; int32 ``code``)."""
    k = tl.minimum(tl.maximum(code >> FRAC, -126), 127)
    return tl.load(lut_ptr + (code & ((1 << FRAC) - 1))) * ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _log2_code(x, u, lut_ptr, lo, hi, FRAC: tl.constexpr, STOCHASTIC: tl.constexpr):
    """rule.log2_code of float32 ``x >= 0`` as int32: octave from the exponent bits, the table entry below the
    mantissa by binary search, the remainder interpolated and rounded (``t >= 1/2``, or ``floor(t + u)``)."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    mant = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    j = tl.zeros_like(bits)
    for i in tl.static_range(FRAC):  # lut[j] <= mant < lut[j + 1] (lut[0] = 1 <= mant < 2 = lut[2**FRAC])
        step = 1 << (FRAC - 1 - i)
        j = tl.where(tl.load(lut_ptr + j + step) <= mant, j + step, j)
    lo_v = tl.load(lut_ptr + j)
    t = tl.div_rn(mant - lo_v, tl.load(lut_ptr + j + 1) - lo_v)
    if STOCHASTIC:
        inc = tl.floor(t + u).to(tl.int32)
    else:
        inc = (t >= 0.5).to(tl.int32)
    code = tl.where(e <= -127, lo, e * (1 << FRAC) + j + inc)
    return tl.minimum(tl.maximum(code, lo), hi)


@triton.jit
def _ema_means(r_mean, c_mean, m, n_bad, tile_code_ptr, row_code_ptr, col_code_ptr, lut_tile_ptr, lut_ratio_ptr,
               ema_w, key, pid_r, pid_c, R, C, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """rule.ema_block_factored_stats for the tile's sub-tiles: rows (BLOCK_R, SC), columns (SR, BLOCK_C), sub-tiles
    (SR, SC) of this call's means -> the new codes (stored unless the tile had ``n_bad`` non-finite elements) and
    the means they stand for."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    row_off, row_mask, col_off, col_mask, tile_off, tile_mask = _code_offsets(pid_r, pid_c, R, C, NB, BLOCK_R, BLOCK_C)
    tile_code = tl.load(tile_code_ptr + tile_off, mask=tile_mask, other=_TILE_EMPTY).to(tl.int32)
    row_code = tl.load(row_code_ptr + row_off, mask=row_mask, other=0).to(tl.int32)
    col_code = tl.load(col_code_ptr + col_off, mask=col_mask, other=0).to(tl.int32)
    empty = tile_code == _TILE_EMPTY  # no statistics yet: take this call's as they are
    m_old = _code_value(tile_code, lut_tile_ptr, 8)
    # (decoded means saturate like this call's: rule.ema_block_factored_stats)
    r_old = _saturate(_tile_to_rows(m_old, NB, BLOCK_R, BLOCK_C) * _code_value(row_code, lut_ratio_ptr, 3))
    c_old = _saturate(_tile_to_cols(m_old, NB, BLOCK_R, BLOCK_C) * _code_value(col_code, lut_ratio_ptr, 3))
    m_new = tl.where(empty, m, m_old + ema_w * (m - m_old))
    r_new = tl.where(_tile_to_rows(empty, NB, BLOCK_R, BLOCK_C), r_mean, r_old + ema_w * (r_mean - r_old))
    c_new = tl.where(_tile_to_cols(empty, NB, BLOCK_R, BLOCK_C), c_mean, c_old + ema_w * (c_mean - c_old))
    tile_code = _log2_code(m_new, m_new, lut_tile_ptr, _TILE_MIN, 32767, 8, False)
    mq = _code_value(tile_code, lut_tile_ptr, 8)
    den = tl.maximum(mq, tl.full((SR, SC), 1e-38, tl.float32))
    # u as rng.uniform(key, rows.numel() + cols.numel()): rows' codes first, then the columns'
    n_row_codes = tl.cdiv(R, NB) * tl.minimum(R, NB) * tl.cdiv(C, NB)
    u_row = uniform01(row_off, key)
    u_col = uniform01(n_row_codes + col_off, key)
    row_code = _log2_code(tl.div_rn(r_new, _tile_to_rows(den, NB, BLOCK_R, BLOCK_C)), u_row, lut_ratio_ptr, -128, 127,
                          3, True)
    col_code = _log2_code(tl.div_rn(c_new, _tile_to_cols(den, NB, BLOCK_R, BLOCK_C)), u_col, lut_ratio_ptr, -128, 127,
                          3, True)
    # (n_bad broadcast before the compare: a 0-d boolean in a mask is refused by the interpreter)
    tl.store(tile_code_ptr + tile_off, tile_code.to(tl.int16), mask=tile_mask & (tile_off * 0 + n_bad == 0))
    tl.store(row_code_ptr + row_off, row_code.to(tl.int8), mask=row_mask & (row_off * 0 + n_bad == 0))
    tl.store(col_code_ptr + col_off, col_code.to(tl.int8), mask=col_mask & (col_off * 0 + n_bad == 0))
    rq = _saturate(_tile_to_rows(mq, NB, BLOCK_R, BLOCK_C) * _code_value(row_code, lut_ratio_ptr, 3))
    cq = _saturate(_tile_to_cols(mq, NB, BLOCK_R, BLOCK_C) * _code_value(col_code, lut_ratio_ptr, 3))
    return rq, cq, mq


@triton.jit
def _tile_to_rows(t, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(SR, SC) per sub-tile -> (BLOCK_R, SC): each sub-tile's value on each of its rows."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    return tl.reshape(tl.broadcast_to(t[:, None, :], (SR, NB, SC)), (BLOCK_R, SC))


@triton.jit
def _tile_to_cols(t, NB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(SR, SC) per sub-tile -> (SR, BLOCK_C): each sub-tile's value on each of its columns."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    return tl.reshape(tl.broadcast_to(t[:, :, None], (SR, SC, NB)), (SR, BLOCK_C))


@triton.jit(do_not_specialize=["key_base", "call", "norm_key_base"])
def _matmul_votes_kernel(
    gy_ptr, x_ptr, packed_ptr, accum_ptr, cache_ptr, gE_ptr, flag_ptr, nonfinite_ptr, step_ptr, lr_ptr,
    tile_code_ptr, row_code_ptr, col_code_ptr, lut_tile_ptr, lut_ratio_ptr,
    M, R, C, n_groups, group_size, neg_lr, decay, vote_clip, key_base, call, ema_w, norm_key_base,
    stride_gm, stride_gr, stride_xm, stride_xc,
    MODE: tl.constexpr, NB: tl.constexpr, NORM_MEMORY: tl.constexpr, USE_DECAY: tl.constexpr,
    GE_MODE: tl.constexpr, GE_GROUP: tl.constexpr,
    CACHE_BITS: tl.constexpr, HAS_FLAG: tl.constexpr, HAS_NONFINITE: tl.constexpr,
    CALLS_PER_STEP: tl.constexpr, K_STEP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LR_PTR: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    if LR_PTR:  # the lr lives on the device (a CUDA-graphed step: written before each replay)
        neg_lr = -tl.load(lr_ptr)
    pid_r, pid_c = swizzle_tile(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.cdiv(C, BLOCK_C), GROUP)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < M
        a = tl.load(gy_ptr + offs_k[None, :] * stride_gm + offs_r[:, None] * stride_gr,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # gy.T tile (BLOCK_R, BLOCK_K)
        b = tl.load(x_ptr + offs_k[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)  # x tile (BLOCK_K, BLOCK_C)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- epilogue: the gradient tile never leaves registers
    n_bad = _count_nonfinite(acc)
    _flag_nonfinite(n_bad, flag_ptr, nonfinite_ptr, HAS_FLAG, HAS_NONFINITE)
    g = tl.where(n_bad > 0, 0.0, acc)  # a tile with NaN/inf votes as zero (out-of-range lanes are 0 already)
    if MODE == 0:
        if NORM_MEMORY:
            r_mean, c_mean, m = _ema_tile_means(g, n_bad, pid_r, pid_c, step_ptr, tile_code_ptr, row_code_ptr,
                                                col_code_ptr, lut_tile_ptr, lut_ratio_ptr, R, C, call, ema_w,
                                                norm_key_base, NB, CALLS_PER_STEP, K_STEP, BLOCK_R, BLOCK_C)
            r_full, c_full, m_full = _full_from_means(r_mean, c_mean, m, NB, BLOCK_R, BLOCK_C)
            s = _scale_from_full(r_full, c_full, m_full, neg_lr, BLOCK_R, BLOCK_C)
        else:
            s = _block_factored_scale(g, pid_r * BLOCK_R, pid_c * BLOCK_C, R, C, neg_lr, NB, BLOCK_R, BLOCK_C)
    else:
        s = g  # unused: sign votes
    _cast_votes(g, s, offs_r, offs_c, mask_r, mask_c, pid_c * BLOCK_C, packed_ptr, accum_ptr, cache_ptr, gE_ptr,
                step_ptr, C, n_groups, group_size, decay, vote_clip, key_base, call, MODE, USE_DECAY, GE_MODE,
                GE_GROUP, CACHE_BITS, CALLS_PER_STEP, K_STEP, BLOCK_R, BLOCK_C)


@triton.jit
def _count_nonfinite(g):
    """How many elements of a 2-D block are NaN or inf (int32 scalar)."""
    return tl.sum(tl.sum(((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32), axis=1), axis=0)


@triton.jit
def _flag_nonfinite(n_bad, flag_ptr, nonfinite_ptr, HAS_FLAG: tl.constexpr, HAS_NONFINITE: tl.constexpr):
    """A tile with ``n_bad`` > 0 adds 1 to ``flag``; the first such tile of the call counts the layer once."""
    if HAS_FLAG:
        old = tl.atomic_add(flag_ptr, 1.0, mask=n_bad > 0)
        if HAS_NONFINITE:
            tl.atomic_add(nonfinite_ptr, 1, mask=(n_bad > 0) & (old == 0.0))


@triton.jit
def _ema_tile_means(g, n_bad, pid_r, pid_c, step_ptr, tile_code_ptr, row_code_ptr, col_code_ptr, lut_tile_ptr,
                    lut_ratio_ptr, R, C, call, ema_w, norm_key_base, NB: tl.constexpr, CALLS_PER_STEP: tl.constexpr,
                    K_STEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The moving averages' means of a (BLOCK_R, BLOCK_C) gradient tile per NB x NB sub-tile, rows (BLOCK_R, SC),
    columns (SR, BLOCK_C), sub-tiles (SR, SC) (rule.ema_block_factored_stats; the codes are updated in place)."""
    SR: tl.constexpr = BLOCK_R // NB
    SC: tl.constexpr = BLOCK_C // NB
    r0 = pid_r * BLOCK_R
    c0 = pid_c * BLOCK_C
    if SR == 1 and SC == 1:
        r1, c1, m1 = _one_tile_means(g, r0, c0, R, C, NB, BLOCK_R, BLOCK_C)
        r_mean = r1[:, None]
        c_mean = c1[None, :]
        m = tl.full((1, 1), 1.0, tl.float32) * m1
    else:
        r_mean, c_mean, m = _sub_tile_means(g, r0, c0, R, C, NB, BLOCK_R, BLOCK_C)
    norm_key = _device_key(step_ptr, call, norm_key_base, CALLS_PER_STEP, K_STEP)
    return _ema_means(r_mean, c_mean, m, n_bad, tile_code_ptr, row_code_ptr, col_code_ptr, lut_tile_ptr,
                      lut_ratio_ptr, ema_w, norm_key, pid_r, pid_c, R, C, NB, BLOCK_R, BLOCK_C)


@triton.jit
def _cast_votes(g, s, offs_r, offs_c, mask_r, mask_c, c_start, packed_ptr, accum_ptr, cache_ptr, gE_ptr, step_ptr, C,
                n_groups, group_size, decay, vote_clip, key_base, call, MODE: tl.constexpr, USE_DECAY: tl.constexpr,
                GE_MODE: tl.constexpr, GE_GROUP: tl.constexpr, CACHE_BITS: tl.constexpr,
                CALLS_PER_STEP: tl.constexpr, K_STEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The votes of a (BLOCK_R, BLOCK_C) gradient block ``g`` (rows ``offs_r``, columns ``offs_c`` from
    ``c_start``) with multipliers ``s`` into T_accum (or the vote cache), and its share of gE."""
    mask = mask_r[:, None] & mask_c[None, :]
    flat = offs_r[:, None] * C + offs_c[None, :]
    if USE_DECAY or GE_MODE > 0:
        t = load_trits(packed_ptr, flat, mask)
    else:
        t = flat  # unused
    if MODE == 0:
        key = _device_key(step_ptr, call, key_base, CALLS_PER_STEP, K_STEP)
        xv = g * s
        if USE_DECAY:
            xv = xv - decay * t.to(tl.float32)
        v = tl.floor(xv + uniform01(flat, key))
        v = tl.minimum(tl.maximum(v, -vote_clip), vote_clip).to(tl.int32)
    else:
        v = tl.where(g > 0, -1, tl.where(g < 0, 1, 0))
    v = tl.where(mask, v, 0)

    if CACHE_BITS == 0:
        old_a = tl.load(accum_ptr + flat, mask=mask, other=0).to(tl.int32)
        tl.store(accum_ptr + flat, tl.minimum(tl.maximum(old_a + v, -127), 127).to(tl.int8), mask=mask)
    elif CACHE_BITS == 8:
        tl.store(cache_ptr + flat, v.to(tl.int8), mask=mask)
    else:
        # 8 // CACHE_BITS votes per byte, (v + bias) in CACHE_BITS bits, lowest bits = lowest flat index;
        # bias 1 for 2-bit fields (|v| <= 1), 8 for 4-bit fields (|v| <= 7). Needs C % (8 // CACHE_BITS) == 0.
        fields = tl.reshape(v + (1 if CACHE_BITS == 2 else 8), (BLOCK_R, BLOCK_C // (8 // CACHE_BITS), 8 // CACHE_BITS))
        shifts = tl.arange(0, 8 // CACHE_BITS) * CACHE_BITS
        packed_votes = tl.sum(fields << shifts[None, None, :], axis=2)
        offs_b = c_start // (8 // CACHE_BITS) + tl.arange(0, BLOCK_C // (8 // CACHE_BITS))
        tl.store(cache_ptr + offs_r[:, None] * (C // (8 // CACHE_BITS)) + offs_b[None, :], packed_votes.to(tl.uint8),
                 mask=mask_r[:, None] & (offs_b * (8 // CACHE_BITS) < C)[None, :])

    if GE_MODE == 1:  # tile columns are whole groups (BLOCK_C % GE_GROUP == 0): one plain store per (row, group)
        gt = tl.reshape(g * t.to(tl.float32), (BLOCK_R, BLOCK_C // GE_GROUP, GE_GROUP))
        part = tl.sum(gt, axis=2)
        offs_g = c_start // GE_GROUP + tl.arange(0, BLOCK_C // GE_GROUP)
        tl.store(gE_ptr + offs_r[:, None] * n_groups + offs_g[None, :], part,
                 mask=mask_r[:, None] & (offs_g < n_groups)[None, :])
    elif GE_MODE == 2:  # any group size: one atomic per (row, group overlapping the tile)
        gt = g * t.to(tl.float32)
        c_first = c_start
        group_c = offs_c // group_size
        for gi in range(c_first // group_size, (tl.minimum(c_first + BLOCK_C, C) - 1) // group_size + 1):
            part = tl.sum(tl.where((group_c == gi)[None, :], gt, 0.0), axis=1)
            tl.atomic_add(gE_ptr + offs_r * n_groups + gi, part, mask=mask_r)


@triton.jit(do_not_specialize=["call", "norm_key_base"])
def _gw_stats_kernel(
    gw_ptr, means_r_ptr, means_c_ptr, means_m_ptr, bad_ptr, flag_ptr, nonfinite_ptr, step_ptr,
    tile_code_ptr, row_code_ptr, col_code_ptr, lut_tile_ptr, lut_ratio_ptr,
    R, C, call, ema_w, norm_key_base, stride_wr, stride_wc,
    MODE: tl.constexpr, NB: tl.constexpr, NORM_MEMORY: tl.constexpr, HAS_FLAG: tl.constexpr,
    HAS_NONFINITE: tl.constexpr, CALLS_PER_STEP: tl.constexpr, K_STEP: tl.constexpr, CHUNK_R: tl.constexpr,
):
    """impl 'gemm', first pass: per NB x NB normalisation tile of cuBLAS's gW, the non-finite check (``bad[tile]``,
    flag, counter) and the normaliser's means (moving averages kept, codes updated), stored as float32 rows
    ``(R, Cb)``, columns ``(Rb, C)``, tiles ``(Rb, Cb)``.

    The tile is read in blocks of CHUNK_R rows (column sums accumulate; each row's sum is complete in its block
    and parked in the rows' buffer until the tile mean is known), so a program holds a block, not a tile: a
    whole tile in registers left one program per SM, waiting on the moving averages' table loads."""
    n_tc = tl.cdiv(C, NB)
    pid_r = tl.program_id(0) // n_tc
    pid_c = tl.program_id(0) % n_tc
    offs_c = pid_c * NB + tl.arange(0, NB)
    mask_c = offs_c < C
    col_sum = tl.zeros((NB,), dtype=tl.float32)
    n_bad = tl.sum(tl.zeros((CHUNK_R,), dtype=tl.int32), axis=0)
    for i in range(0, NB, CHUNK_R):
        offs_r = pid_r * NB + i + tl.arange(0, CHUNK_R)
        mask_r = offs_r < R
        g = tl.load(gw_ptr + offs_r[:, None] * stride_wr + offs_c[None, :] * stride_wc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        n_bad += _count_nonfinite(g)
        g2 = g * g
        col_sum += tl.sum(g2, axis=0)
        if MODE == 0:  # this row block's sums, until the whole tile is read
            tl.store(means_r_ptr + offs_r * n_tc + pid_c, tl.sum(g2, axis=1), mask=mask_r)
    tl.store(bad_ptr + tl.program_id(0), n_bad)
    _flag_nonfinite(n_bad, flag_ptr, nonfinite_ptr, HAS_FLAG, HAS_NONFINITE)
    if MODE == 0:
        tl.debug_barrier()  # the row sums stored above, by other threads of this program
        offs_r = pid_r * NB + tl.arange(0, NB)
        row_sum = tl.load(means_r_ptr + offs_r * n_tc + pid_c, mask=offs_r < R, other=0.0)
        # a tile with NaN/inf counts as all zero (as the one-pass kernel zeroes it): its statistics are 0
        row_sum = tl.where(n_bad > 0, 0.0, row_sum)
        col_sum = tl.where(n_bad > 0, 0.0, col_sum)
        r1, c1, m1 = _means_from_sums(row_sum, col_sum, pid_r * NB, pid_c * NB, R, C, NB, NB, NB)
        r_mean = r1[:, None]
        c_mean = c1[None, :]
        m = tl.full((1, 1), 1.0, tl.float32) * m1
        if NORM_MEMORY:
            norm_key = _device_key(step_ptr, call, norm_key_base, CALLS_PER_STEP, K_STEP)
            r_mean, c_mean, m = _ema_means(r_mean, c_mean, m, n_bad, tile_code_ptr, row_code_ptr, col_code_ptr,
                                           lut_tile_ptr, lut_ratio_ptr, ema_w, norm_key, pid_r, pid_c, R, C, NB,
                                           NB, NB)
        tl.debug_barrier()  # every row sum read before it is overwritten by its mean
        tl.store(means_r_ptr + offs_r[:, None] * n_tc + pid_c, r_mean, mask=(offs_r < R)[:, None])
        tl.store(means_c_ptr + pid_r * C + offs_c[None, :], c_mean, mask=mask_c[None, :])
        tl.store(means_m_ptr + pid_r * n_tc + pid_c + tl.zeros((1, 1), tl.int32), m)


@triton.jit(do_not_specialize=["key_base", "call"])
def _gw_votes_kernel(
    gw_ptr, means_r_ptr, means_c_ptr, means_m_ptr, bad_ptr, packed_ptr, accum_ptr, cache_ptr, gE_ptr, step_ptr,
    lr_ptr, R, C, n_groups, group_size, neg_lr, decay, vote_clip, key_base, call, stride_wr, stride_wc,
    MODE: tl.constexpr, NB: tl.constexpr, USE_DECAY: tl.constexpr, GE_MODE: tl.constexpr, GE_GROUP: tl.constexpr,
    CACHE_BITS: tl.constexpr, CALLS_PER_STEP: tl.constexpr, K_STEP: tl.constexpr, LR_PTR: tl.constexpr,
    CHUNK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """impl 'gemm', second pass: the votes of a (CHUNK_R, BLOCK_C) block of gW (BLOCK_C = NB, CHUNK_R divides NB:
    the block lies in one normalisation tile) from the means _gw_stats_kernel stored, zero where that tile held
    NaN/inf; the epilogue is the fused kernel's (``_cast_votes``)."""
    SC: tl.constexpr = BLOCK_C // NB
    if LR_PTR:
        neg_lr = -tl.load(lr_ptr)
    n_tc = tl.cdiv(C, BLOCK_C)
    pid_r = tl.program_id(0) // n_tc
    pid_c = tl.program_id(0) % n_tc
    r_start = pid_r * CHUNK_R
    c_start = pid_c * BLOCK_C
    offs_r = r_start + tl.arange(0, CHUNK_R)
    offs_c = c_start + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    g = tl.load(gw_ptr + offs_r[:, None] * stride_wr + offs_c[None, :] * stride_wc,
                mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    n_bad = tl.load(bad_ptr + (r_start // NB) * n_tc + pid_c)
    g = tl.where(n_bad > 0, 0.0, g)
    if MODE == 0:
        Cb = tl.cdiv(C, NB)
        cb = c_start // NB + tl.arange(0, SC)
        r_mean = tl.load(means_r_ptr + offs_r[:, None] * Cb + cb[None, :], mask=mask_r[:, None] & (cb < Cb)[None, :],
                         other=0.0)  # (CHUNK_R, SC)
        c_mean = tl.load(means_c_ptr + (r_start // NB) * C + offs_c, mask=mask_c, other=0.0)  # (BLOCK_C,)
        m = tl.load(means_m_ptr + (r_start // NB) * Cb + cb, mask=cb < Cb, other=0.0)  # (SC,)
        r_full = tl.reshape(tl.broadcast_to(r_mean[:, :, None], (CHUNK_R, SC, NB)), (CHUNK_R, BLOCK_C))
        c_full = tl.broadcast_to(c_mean[None, :], (CHUNK_R, BLOCK_C))
        m_row = tl.reshape(tl.broadcast_to(m[:, None], (SC, NB)), (BLOCK_C,))
        m_full = tl.broadcast_to(m_row[None, :], (CHUNK_R, BLOCK_C))
        s = _scale_from_full(r_full, c_full, m_full, neg_lr, CHUNK_R, BLOCK_C)
    else:
        s = g  # unused: sign votes
    _cast_votes(g, s, offs_r, offs_c, mask_r, mask_c, c_start, packed_ptr, accum_ptr, cache_ptr, gE_ptr, step_ptr, C,
                n_groups, group_size, decay, vote_clip, key_base, call, MODE, USE_DECAY, GE_MODE, GE_GROUP,
                CACHE_BITS, CALLS_PER_STEP, K_STEP, CHUNK_R, BLOCK_C)


@triton.jit(do_not_specialize=["rows", "n_groups", "interval", "key_base", "call"])
def _scale_votes_kernel(gE_ptr, E_accum_ptr, flag_ptr, step_ptr, lr_ptr, rows, n_groups, interval, neg_lr, inv_n,
                        vote_clip, key_base, call, MODE: tl.constexpr, BLOCK_NORM: tl.constexpr, NB: tl.constexpr,
                        MEAN_BY_RECIPROCAL: tl.constexpr, HAS_FLAG: tl.constexpr, CALLS_PER_STEP: tl.constexpr,
                        K_STEP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, LR_PTR: tl.constexpr):
    """Votes on gE (rows, n_groups) into E_accum. ``BLOCK_NORM``: one program per NB x NB tile of gE, 'block_factored'
    normalisation, its columns in blocks of BLOCK_G (NB, or the next power of two >= n_groups when that is
    smaller: gE has few columns, n_groups = cols / group_size, and a full NB-wide block would be mostly masked
    lanes); otherwise one program for all of gE: 'tensor' normalisation (ms = mean(gE**2), first pass) or sign
    votes. ``LR_PTR``: ``lr_e`` is read from the device (``lr_ptr``) instead of ``neg_lr``."""
    if LR_PTR:
        neg_lr = -tl.load(lr_ptr)
    active = (tl.load(step_ptr) % interval) == 0
    if HAS_FLAG:  # a non-finite tile in this call: its gE is not the layer's gradient, cast no scale votes
        active = active & (tl.load(flag_ptr) == 0.0)
    if BLOCK_NORM:
        pid = tl.program_id(0)
        n_col_tiles = tl.cdiv(n_groups, NB)
        offs_r = (pid // n_col_tiles) * NB + tl.arange(0, NB)
        offs_c = (pid % n_col_tiles) * NB + tl.arange(0, BLOCK_G)
        mask = (offs_r < rows)[:, None] & (offs_c < n_groups)[None, :]
        flat = offs_r[:, None] * n_groups + offs_c[None, :]
        g = _saturate_sums(tl.load(gE_ptr + flat, mask=mask, other=0.0))  # as rule.scale_gradient's
        s = _block_factored_scale(g, (pid // n_col_tiles) * NB, (pid % n_col_tiles) * NB, rows, n_groups, neg_lr,
                                  NB, NB, BLOCK_G)
        key = _device_key(step_ptr, call, key_base, CALLS_PER_STEP, K_STEP)
        v = tl.floor(g * s + uniform01(flat, key))
        v = tl.minimum(tl.maximum(v, -vote_clip), vote_clip).to(tl.int32)
        old = tl.load(E_accum_ptr + flat, mask=mask, other=0).to(tl.int32)
        new = tl.where(active, tl.minimum(tl.maximum(old + v, -127), 127), old)  # (a scalar store mask is
        tl.store(E_accum_ptr + flat, new.to(tl.int8), mask=mask)                  # not portable to the interpreter)
    else:
        n = rows * n_groups
        if MODE == 0:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for i0 in range(0, n, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                g = _saturate_sums(tl.load(gE_ptr + offs, mask=offs < n, other=0.0))
                acc += g * g
            total = tl.sum(acc, axis=0)
            if MEAN_BY_RECIPROCAL:  # PyTorch's CUDA mean: sum * float32(1 / n)
                ms = _saturate(total * inv_n)
            else:  # PyTorch's CPU mean: sum / n
                ms = _saturate(tl.div_rn(total, n.to(tl.float32)))
            s = tl.div_rn(tl.full([], 1.0, tl.float32), tl.sqrt_rn(ms + 1e-30)) * neg_lr
            key = _device_key(step_ptr, call, key_base, CALLS_PER_STEP, K_STEP)
        for i0 in range(0, n, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            mask = offs < n
            g = _saturate_sums(tl.load(gE_ptr + offs, mask=mask, other=0.0))
            if MODE == 0:
                v = tl.floor(g * s + uniform01(offs, key))
                v = tl.minimum(tl.maximum(v, -vote_clip), vote_clip).to(tl.int32)
            else:
                v = tl.where(g > 0, -1, tl.where(g < 0, 1, 0))
            old = tl.load(E_accum_ptr + offs, mask=mask, other=0).to(tl.int32)
            new = tl.where(active, tl.minimum(tl.maximum(old + v, -127), 127), old)
            tl.store(E_accum_ptr + offs, new.to(tl.int8), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


def lr_operand(lr: float | torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """A kernel's lr: ``(None, -lr)`` for a number (a constant of the launch, so of a captured graph), or
    ``(lr, 0.0)`` for a 0-dim float32 tensor on ``device``, which the kernel reads (FlipOptimizer.use_device_lr:
    a CUDA-graphed step whose lr schedule moves between replays)."""
    if isinstance(lr, torch.Tensor):
        assert lr.dim() == 0 and lr.dtype == torch.float32 and lr.device == device, (
            f"a device lr must be a 0-dim float32 tensor on {device}, got {lr.dtype} {tuple(lr.shape)} on {lr.device}")
        return lr, 0.0
    return None, -float(lr)


def default_votes_config(M: int, R: int, C: int, device: torch.device, norm_block: int | None = None,
                         gw_given: bool = False) -> dict:
    """Largest square tile that still gives every SM a tile and is a whole number of normalisation tiles.

    The reduction runs over the M tokens with no split-K (the epilogue needs the complete gradient tile).
    ``gw_given`` (impl 'gemm', two passes over cuBLAS's gW, norm_block x norm_block tiles): the statistics
    pass reads a tile in blocks of ``STATS_CHUNK_R`` rows (``num_warps``), the vote pass takes blocks of
    ``CHUNK_R`` rows (``chunk_warps``). H200, 151M, default rule (experiments/kernel_launches/run.py): with a first
    statistics pass, vote-pass blocks of 16 rows x 4 warps were the fastest of 16/32/64 rows x 2/4/8 warps (by
    1-4%); with the present one, 8 warps were 0.5-4% faster per call (the end-to-end figures are with 4). On a
    matrix of fewer normalisation tiles than SMs the statistics pass is latency-bound (one program per tile):
    reading the whole tile as one block at 8 warps took the two passes from 26.1 / 29.3 / 29.0 to 23.7 / 26.5 /
    26.4 us on an H100 at a small HF Llama's shapes (512 x 512, 1408 x 512, 512 x 1408: 16-44 tiles;
    experiments/kernel_launches); the 151M shapes with fewer tiles than SMs (1024 x 1024: 64) take it unmeasured.
    """
    if gw_given:
        nbk = norm_block or 32
        if triton.cdiv(R, nbk) * triton.cdiv(C, nbk) < sm_count(device):
            return {"STATS_CHUNK_R": nbk, "num_warps": 8, "CHUNK_R": min(16, nbk), "chunk_warps": 4}
        return {"STATS_CHUNK_R": min(32, nbk), "num_warps": 4, "CHUNK_R": min(16, nbk), "chunk_warps": 4}
    sms = sm_count(device)
    sizes = [b for b in (128, 64, 32) if norm_block is None or b % norm_block == 0]
    block = sizes[-1]
    for b in sizes:
        if triton.cdiv(R, b) * triton.cdiv(C, b) >= sms:
            block = b
            break
    big = M >= 1024
    if big and block == 128:
        # H200 sweep at the 151M shapes (benchmarks/bench_kernels.py --sweep-kernels votes; docs/performance.md):
        # with a tile per SM or more, 4 warps and 3 stages were 18-28% faster than 8 warps; with fewer tiles
        # than SMs (1024 x 1024), 8 warps and 4 stages were best
        many = triton.cdiv(R, 128) * triton.cdiv(C, 128) >= sms
        return {"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_K": 64, "num_warps": 4 if many else 8,
                "num_stages": 3 if many else 4}
    return {"BLOCK_R": block, "BLOCK_C": block, "BLOCK_K": 64 if big else 32,
            "num_warps": 8 if block >= 128 else 4, "num_stages": 3 if big else 2}


def matmul_votes_(gy: torch.Tensor, x: torch.Tensor, weight, *, vote: str, lr: float | torch.Tensor, vote_clip: int,
                  norm_block: int, decay: float, key_base: int, call: int, step: torch.Tensor, calls_per_step: int,
                  gE: torch.Tensor | None = None, flag: torch.Tensor | None = None,
                  nonfinite: torch.Tensor | None = None, cache=None, config: dict | None = None,
                  norm_codes: dict | None = None, norm_beta: float = 0.0, norm_key_base: int = 0,
                  impl: str = "fused") -> None:
    """``gW = gy.T @ x`` -> votes into ``weight.T_accum`` (or ``cache``), in place.

    ``impl``: 'fused' forms each gradient tile in the kernel (gW never reaches memory); 'gemm' forms gW
    with cuBLAS in the operands' dtype (the dense-fallback's own ``gy.T @ x``: a transient rows x cols
    tensor, freed on return) and votes in two passes over it, _gw_stats_kernel then _gw_votes_kernel (see
    VOTES_FUSED_MAX_TOKENS).

    ``norm_codes``: the moving averages' codes of a ``norm_beta`` rule (rule.empty_norm_codes' dict: int16
    ``norm_tile``, int8 ``norm_row``/``norm_col``), updated in place, their rounding keyed by
    ``norm_key_base`` (key_base of the optimiser's norm stream) and the step; None: per-call statistics.

    ``step``: 0-dim int64 device tensor, the optimiser's step counter (keys are derived from it on the
    device); ``key_base``/``call``: see :func:`key_base` and rng.stream_key; ``gE``: float32
    (rows, n_groups) buffer (zeroed) that receives ``sum_group(gW * T)``, or None; ``flag``: float32 scalar
    (zeroed) set > 0 when a tile was non-finite (required with ``gE`` or ``nonfinite``); ``nonfinite``:
    int32 counter that receives +1 if any tile was non-finite; ``cache``: a ``VoteCache`` to write instead
    of accumulating. ``norm_block`` must divide the tile edges (stochastic votes).
    """
    R, C = weight.rows, weight.cols
    M = gy.shape[0]
    assert gy.dim() == 2 and x.dim() == 2 and gy.shape == (M, R) and x.shape == (M, C), (
        f"expected gy (M, {R}) and x (M, {C}), got {tuple(gy.shape)} and {tuple(x.shape)}")
    assert vote in ("stochastic", "sign"), vote
    assert gy.dtype == x.dtype, f"gy and x must share a dtype, got {gy.dtype} and {x.dtype}"
    assert gy.device == x.device == weight.T_accum.device == step.device, "operands must be on one device"
    assert step.dtype == torch.int64 and step.numel() == 1
    assert (gE is None and nonfinite is None) or flag is not None, "gE / nonfinite need the flag scalar"
    assert impl in ("fused", "gemm"), impl
    check_kernel_numel(R * C)
    check_kernel_offsets(gy, x)
    dev = gy.device
    gw_given = impl == "gemm"
    nb = norm_block if vote == "stochastic" else None
    cfg = dict(default_votes_config(M, R, C, dev, nb, gw_given), **(config or {}))
    if gw_given:  # tiles of one normalisation block (sign votes: 32 x 32, only the non-finite check needs them)
        tile_r = tile_c = nb or 32
        assert tile_r % cfg["CHUNK_R"] == 0 and tile_r % cfg["STATS_CHUNK_R"] == 0, f"{cfg} must divide {tile_r}"
    else:
        tile_r, tile_c = cfg["BLOCK_R"], cfg["BLOCK_C"]
    if nb is not None:
        assert nb in FUSED_NORM_BLOCKS, f"norm_block {nb} is not fused (supported: {FUSED_NORM_BLOCKS})"
        assert tile_r % nb == 0 and tile_c % nb == 0, f"tile {cfg} is not a multiple of {nb}"
    gs = weight.group_size
    if gE is None:
        ge_mode, ge_group = GE_NONE, 1
    elif tile_c % gs == 0 and gs & (gs - 1) == 0:
        ge_mode, ge_group = GE_ALIGNED, gs
    else:
        ge_mode, ge_group = GE_ATOMIC, 1
    cache_bits = 0 if cache is None else cache.bits
    if cache_bits in (2, 4):
        assert C % (8 // cache_bits) == 0 and tile_c % (8 // cache_bits) == 0
    use_decay = vote == "stochastic" and decay != 0.0
    dummy = step  # any device pointer for unused arguments
    if norm_codes is not None:
        assert vote == "stochastic" and 0.0 < norm_beta < 1.0, "norm_beta codes are for stochastic votes"
        Rb, br, Cb, bc = norm_tiles((R, C), nb)
        want = {"norm_tile": ((Rb, Cb), torch.int16), "norm_row": ((Rb, br, Cb), torch.int8),
                "norm_col": ((Rb, Cb, bc), torch.int8)}
        for k, (shape, dtype) in want.items():
            t = norm_codes[k]
            assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous() and t.device == dev, (
                f"{k} must be contiguous {dtype} {shape} on {dev}")
        codes = (norm_codes["norm_tile"], norm_codes["norm_row"], norm_codes["norm_col"],
                 code_lut(NORM_TILE_FRAC, dev), code_lut(NORM_RATIO_FRAC, dev))
    else:
        codes = (dummy,) * 5
    n_tiles = triton.cdiv(R, tile_r) * triton.cdiv(C, tile_c)
    lr_ptr, neg_lr = lr_operand(lr, dev)
    mode = MODE_SIGN if vote == "sign" else MODE_STOCHASTIC
    accum_or_cache = (weight.T_accum if cache is None
                      else (cache.buf.view(torch.int8) if cache_bits == 8 else cache.buf))
    common = dict(CALLS_PER_STEP=int(calls_per_step), K_STEP=rng._K_STEP, enable_fp_fusion=False)
    if gw_given:
        # cuBLAS forms gW (R, C) in the operands' dtype; a statistics pass per tile, then the votes per row block
        gW = gy.t() @ x
        n_tc = triton.cdiv(C, tile_c)
        means_r = torch.empty(R, n_tc, dtype=torch.float32, device=dev)
        means_c = torch.empty(triton.cdiv(R, tile_r), C, dtype=torch.float32, device=dev)
        means_m = torch.empty(triton.cdiv(R, tile_r), n_tc, dtype=torch.float32, device=dev)
        bad = torch.empty(n_tiles, dtype=torch.int32, device=dev)
        _gw_stats_kernel[(n_tiles,)](
            gW, means_r, means_c, means_m, bad, dummy if flag is None else flag,
            dummy if nonfinite is None else nonfinite, step, *codes, R, C, int(call),
            float(np.float32(1.0 - norm_beta)), int(norm_key_base), gW.stride(0), gW.stride(1),
            MODE=mode, NB=tile_r, NORM_MEMORY=norm_codes is not None, HAS_FLAG=flag is not None,
            HAS_NONFINITE=nonfinite is not None, CHUNK_R=cfg["STATS_CHUNK_R"], num_warps=cfg["num_warps"], **common)
        _gw_votes_kernel[(triton.cdiv(R, cfg["CHUNK_R"]) * n_tc,)](
            gW, means_r, means_c, means_m, bad, weight.T_packed, weight.T_accum, accum_or_cache,
            dummy if gE is None else gE, step, step if lr_ptr is None else lr_ptr, R, C, weight.n_groups, gs, neg_lr,
            float(decay), float(vote_clip), int(key_base), int(call), gW.stride(0), gW.stride(1),
            MODE=mode, NB=tile_r, USE_DECAY=use_decay, GE_MODE=ge_mode, GE_GROUP=ge_group, CACHE_BITS=cache_bits,
            LR_PTR=lr_ptr is not None, CHUNK_R=cfg["CHUNK_R"], BLOCK_C=tile_c,
            num_warps=cfg["chunk_warps"], **common)
        return
    _matmul_votes_kernel[(n_tiles,)](
        gy, x, weight.T_packed, weight.T_accum, accum_or_cache,
        dummy if gE is None else gE, dummy if flag is None else flag, dummy if nonfinite is None else nonfinite, step,
        step if lr_ptr is None else lr_ptr, *codes, M, R, C, weight.n_groups, gs, neg_lr, float(decay),
        float(vote_clip), int(key_base), int(call),
        float(np.float32(1.0 - norm_beta)), int(norm_key_base), gy.stride(0), gy.stride(1), x.stride(0), x.stride(1),
        MODE=mode, NB=nb or 16, NORM_MEMORY=norm_codes is not None, USE_DECAY=use_decay,
        GE_MODE=ge_mode, GE_GROUP=ge_group, CACHE_BITS=cache_bits, HAS_FLAG=flag is not None,
        HAS_NONFINITE=nonfinite is not None, UPCAST=upcast_dot(gy), DOT_PRECISION=dot_precision(gy),
        LR_PTR=lr_ptr is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], GROUP=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common,
    )


def scale_votes_(gE: torch.Tensor, E_accum: torch.Tensor, *, vote: str, lr_e: float | torch.Tensor, vote_clip: int,
                 normalize: str, norm_block: int, key_base: int, call: int, step: torch.Tensor, calls_per_step: int,
                 interval: int = 1, flag: torch.Tensor | None = None, block: int = 1024,
                 num_warps: int | None = None) -> None:
    """Votes on the per-group scale gradient ``gE`` (rows, n_groups) into ``E_accum`` (int8, same shape), in
    place, normalised like rule.vote_scale(gE, lr_e, normalize, norm_block), on steps with
    ``step % interval == 0`` and unless ``flag`` (the layer had a non-finite tile) is set.

    ``num_warps`` (default: one warp per 128 elements of a program's tile, 4 to 16): gE is small, so the grid
    has few programs (8 for a 1024 x 64 gE in 128 x 64 tiles) and each program's per-element IEEE divisions
    and square roots are the time. H200, 151M shapes (experiments/kernel_launches/run.py): 4 / 8 / 16 warps took
    6.6 / 4.2 / 3.1 us on a 3072 x 16 gE and 24.2 / 12.5 / 8.4 us on a 1024 x 64 one."""
    assert gE.dim() == 2 and gE.shape == E_accum.shape and gE.dtype == torch.float32 and E_accum.dtype == torch.int8
    assert gE.is_contiguous() and E_accum.is_contiguous() and interval >= 1
    assert normalize in ("tensor", "block_factored"), normalize
    rows, ng = gE.shape
    block_norm = vote == "stochastic" and normalize == "block_factored"
    if block_norm:
        assert norm_block in FUSED_NORM_BLOCKS, f"norm_block {norm_block} is not fused (supported: {FUSED_NORM_BLOCKS})"
        grid = (triton.cdiv(rows, norm_block) * triton.cdiv(ng, norm_block),)
    else:
        grid = (1,)
    inv_n = float(np.float32(1.0) / np.float32(rows * ng))  # PyTorch's CUDA mean factor: float(1) / numel
    block_g = min(norm_block, triton.next_power_of_2(ng)) if block_norm else 1
    if num_warps is None:
        num_warps = max(4, min(16, norm_block * block_g // 128)) if block_norm else 4
    lr_ptr, neg_lr = lr_operand(lr_e, gE.device)
    _scale_votes_kernel[grid](
        gE, E_accum, step if flag is None else flag, step, step if lr_ptr is None else lr_ptr, rows, ng, int(interval),
        neg_lr, inv_n, float(vote_clip), int(key_base), int(call),
        MODE=MODE_SIGN if vote == "sign" else MODE_STOCHASTIC,
        BLOCK_NORM=block_norm, NB=norm_block if block_norm else 16, MEAN_BY_RECIPROCAL=gE.device.type == "cuda",
        HAS_FLAG=flag is not None, CALLS_PER_STEP=int(calls_per_step), K_STEP=rng._K_STEP, BLOCK=block,
        BLOCK_G=block_g, LR_PTR=lr_ptr is not None, num_warps=num_warps, enable_fp_fusion=False,
    )
