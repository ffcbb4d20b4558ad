"""Triton flip/update kernel on packed bytes (reference: ``naive.py`` = rule.apply_flips + pack_trits).

Programs ``0 .. n_t_progs-1`` each take BLOCK bytes of ``T_packed``; for every byte they decode its five
trits (digit d of byte b is ``b // 3**d % 3 - 1``; flat index ``5*j + d``), load the five ``T_accum``,
optionally add pending votes from a vote cache (gpu-signcache, saturating), optionally leak
(rule.leak: ``A -= sign(A) * (|A| >> leak)``), apply the flip rule

    up   = A >= +theta and T < +1          T += 1, A = -reset
    down = A <= -theta and T > -1          T -= 1, A = +reset
    (clip_at_bounds)  A = clamp(A, -theta, theta)

store ``T_accum`` and the repacked byte, and add their flip count to ``counts[0]`` (one atomic per
program). Programs from ``n_t_progs`` on apply rule.apply_scale_flips to BLOCK_E groups of ``E`` /
``E_accum`` and add to ``counts[1]``. Trits past ``numel`` in the last byte are padding (digit 1 = 0) and
are never touched. ``FLIP=False`` only accumulates a vote cache into ``T_accum`` (the flush).

Memory traffic per weight: ``T_packed`` 0.2 B read + 0.2 B write, ``T_accum`` 1 B read + 1 B write, plus
the vote cache (bits/8 B read) in the gpu-signcache variant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import packing
from ..triton_utils import check_kernel_numel


@triton.jit
def _flip_digit(accum_ptr, cache_ptr, t, i, m, threshold, leak, reset,
                FLIP: tl.constexpr, CLIP: tl.constexpr, CACHE_BITS: tl.constexpr, LEAK: tl.constexpr):
    """One trit per lane (flat index ``i``): add cached votes, leak, flip, store T_accum; returns (t, moved)."""
    a = tl.load(accum_ptr + i, mask=m, other=0).to(tl.int32)
    if CACHE_BITS == 8:
        a = a + tl.load(cache_ptr + i, mask=m, other=0).to(tl.int32)
    elif CACHE_BITS == 4:  # (v + 8) in nibble i % 2 of byte i // 2
        a = a + ((tl.load(cache_ptr + i // 2, mask=m, other=0x88).to(tl.int32) >> ((i % 2) * 4)) & 15) - 8
    elif CACHE_BITS == 2:  # (v + 1) in bits 2*(i % 4) of byte i // 4
        a = a + ((tl.load(cache_ptr + i // 4, mask=m, other=0x55).to(tl.int32) >> ((i % 4) * 2)) & 3) - 1
    if CACHE_BITS > 0:
        a = tl.minimum(tl.maximum(a, -127), 127)
    moved = tl.zeros_like(a)
    if FLIP:
        if LEAK:  # rule.leak: A -= sign(A) * (|A| >> leak)
            a = a - tl.where(a > 0, 1, tl.where(a < 0, -1, 0)) * (tl.abs(a) >> leak)
        up = (a >= threshold) & (t < 1)
        down = (a <= -threshold) & (t > -1)
        t = t + up.to(tl.int32) - down.to(tl.int32)
        moved = (up | down).to(tl.int32)
        a = tl.where(up, -reset, tl.where(down, reset, a))
        if CLIP:
            a = tl.minimum(tl.maximum(a, -threshold), threshold)
    tl.store(accum_ptr + i, a.to(tl.int8), mask=m)
    return t, moved


@triton.jit
def _flip_kernel(
    packed_ptr, accum_ptr, E_ptr, E_accum_ptr, cache_ptr, counts_ptr,
    numel, n_bytes, n_e, n_t_progs, threshold, scale_threshold, leak, reset,
    FLIP: tl.constexpr, CLIP: tl.constexpr, DO_E: tl.constexpr, CACHE_BITS: tl.constexpr, LEAK: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_t_progs:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        byte_mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=byte_mask, other=121).to(tl.int32)
        i = offs * 5  # flat index of digit 0
        t0, m0 = _flip_digit(accum_ptr, cache_ptr, b % 3 - 1, i, byte_mask & (i < numel),
                             threshold, leak, reset, FLIP, CLIP, CACHE_BITS, LEAK)
        t1, m1 = _flip_digit(accum_ptr, cache_ptr, b // 3 % 3 - 1, i + 1, byte_mask & (i + 1 < numel),
                             threshold, leak, reset, FLIP, CLIP, CACHE_BITS, LEAK)
        t2, m2 = _flip_digit(accum_ptr, cache_ptr, b // 9 % 3 - 1, i + 2, byte_mask & (i + 2 < numel),
                             threshold, leak, reset, FLIP, CLIP, CACHE_BITS, LEAK)
        t3, m3 = _flip_digit(accum_ptr, cache_ptr, b // 27 % 3 - 1, i + 3, byte_mask & (i + 3 < numel),
                             threshold, leak, reset, FLIP, CLIP, CACHE_BITS, LEAK)
        t4, m4 = _flip_digit(accum_ptr, cache_ptr, b // 81 - 1, i + 4, byte_mask & (i + 4 < numel),
                             threshold, leak, reset, FLIP, CLIP, CACHE_BITS, LEAK)
        if FLIP:
            new_byte = (t0 + 1) + 3 * (t1 + 1) + 9 * (t2 + 1) + 27 * (t3 + 1) + 81 * (t4 + 1)
            tl.store(packed_ptr + offs, new_byte.to(tl.uint8), mask=byte_mask)
            tl.atomic_add(counts_ptr, tl.sum(m0 + m1 + m2 + m3 + m4, axis=0))
    elif DO_E:
        # (names differ from the branch above: Triton 3.6 rejects one name with two shapes across an if/else)
        offs_e = (pid - n_t_progs) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask = offs_e < n_e
        E = tl.load(E_ptr + offs_e, mask=mask, other=0).to(tl.int32)
        EA = tl.load(E_accum_ptr + offs_e, mask=mask, other=0).to(tl.int32)
        up = (EA >= scale_threshold) & (E < 127)
        down = (EA <= -scale_threshold) & (E > -127)
        moved = up | down
        tl.store(E_ptr + offs_e, (E + up.to(tl.int32) - down.to(tl.int32)).to(tl.int8), mask=mask)
        tl.store(E_accum_ptr + offs_e, tl.where(moved, 0, EA).to(tl.int8), mask=mask)
        tl.atomic_add(counts_ptr + 1, tl.sum(moved.to(tl.int32), axis=0))


def flip_triton_(weight, threshold: int, clip_at_bounds: bool, scale_threshold: int | None = None,
                 counts: torch.Tensor | None = None, cache=None, flip: bool = True, leak: int = 0,
                 reset: int = 0, block: int = 256, block_e: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """Apply one step's flips to ``weight`` in place (after adding a pending vote ``cache``, if given).

    ``leak`` > 0 first applies rule.leak (``A -= sign(A) * (|A| >> leak)``) to ``T_accum``; a moved trit's
    ``T_accum`` restarts at ``-reset`` (moved up) or ``+reset`` (moved down).
    ``counts``: int32 (2,) device buffer that receives ``+= (trit flips, scale flips)`` (allocated zeroed
    when None); returned. ``flip=False`` only adds the cache into ``T_accum`` (no flips, no E). ``block`` (bytes
    of T_packed per program), ``block_e`` and ``num_warps``: the launch (experiments/kernel_launches/run.py times them;
    256 bytes at 4 warps was 3-9% faster than 512 at the 151M shapes on an H200, larger blocks slower).
    """
    numel = weight.rows * weight.cols
    check_kernel_numel(numel)
    dev = weight.T_packed.device
    if counts is None:
        counts = torch.zeros(2, dtype=torch.int32, device=dev)
    assert counts.dtype == torch.int32 and counts.numel() >= 2
    n_bytes = packing.packed_numel(numel)
    do_e = flip and scale_threshold is not None
    n_e = weight.E.numel() if do_e else 0
    n_t_progs = triton.cdiv(n_bytes, block)
    grid = (n_t_progs + (triton.cdiv(n_e, block_e) if do_e else 0),)
    cache_bits = 0 if cache is None else cache.bits
    cache_buf = weight.T_packed if cache is None else (cache.buf.view(torch.int8) if cache_bits == 8 else cache.buf)
    _flip_kernel[grid](
        weight.T_packed, weight.T_accum, weight.E, weight.E_accum, cache_buf, counts,
        numel, n_bytes, n_e, n_t_progs, int(threshold), int(scale_threshold or 0), int(leak), int(reset),
        FLIP=flip, CLIP=bool(clip_at_bounds), DO_E=do_e, CACHE_BITS=cache_bits, LEAK=flip and leak > 0,
        BLOCK=block, BLOCK_E=block_e, num_warps=num_warps,
    )
    return counts
