"""Triton kernels of the fused weight-gradient votes (references in ``naive.py``).

``_matmul_votes_kernel``: one program owns a (BLOCK_R, BLOCK_C) tile of the weight. It forms the
weight-gradient tile ``g = gy[:, rows].T @ x[:, cols]`` in registers (tensor cores, fp32 accumulation,
reduction over the M tokens) and, in the epilogue, without ever writing ``g`` to memory:

    non-finite   a tile holding NaN/inf is zeroed and counted in ``bad`` (one atomic)
    sum g**2     one float32 atomic per program into ``sumsq`` (for the vote_ms running mean square;
                 atomics make the float sum order nondeterministic at the last bit: documented)
    trits        T decoded from ``T_packed`` only when needed (decay term, scale gradient)
    votes        'stochastic': v = clamp(floor(g*s - decay*T + u), -clip, clip), u = rng.uniform at the
                 element's flat index under ``key`` (s, key loaded from device pointers)
                 'sign':       v = -sign(g)
    accumulate   T_accum = clamp(T_accum + v, -127, 127)                   (CACHE_BITS == 0)
                 or the votes are written to a compact vote cache            (CACHE_BITS 2/4/8, gpu-signcache)
    scale grad   gE[r, group] += sum over the tile's columns of the group of g * T     (float32 buffer)

Kernels are launched with ``enable_fp_fusion=False`` so ``g*s - decay*T + u`` is rounded op by op like
PyTorch (no FMA contraction): for the same ``g`` the votes are bit-identical to rule.stochastic_votes.
``g`` itself is a tensor-core sum whose order differs from cuBLAS', so on arbitrary inputs votes agree
statistically (a vote differs only where ``g*s + u`` lies within rounding of an integer).

``_scale_votes_kernel`` turns the per-group ``gE`` into E votes into ``E_accum`` (same vote formula,
no decay), ``_vote_prep_kernel`` computes ``s`` for both slots from ``vote_ms`` (op for op like
rule.vote_multiplier: ``reciprocal(sqrt(ms + eps)) * -lr``, IEEE sqrt_rn/div_rn like PyTorch's CUDA
ops), and ``_ms_update_kernel`` folds the sums of squares into ``vote_ms`` (rule.update_grad_ms) and
reports a non-finite layer once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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

MODE_STOCHASTIC, MODE_SIGN = 0, 1
GE_NONE, GE_ALIGNED, GE_ATOMIC = 0, 1, 2


@triton.jit
def _votes_from_grad(g, flat, t, s_ptr, key_ptr, decay, vote_clip, MODE: tl.constexpr, USE_DECAY: tl.constexpr):
    """int32 votes of float32 gradients ``g`` at flat indices ``flat`` (t: trits, used for decay)."""
    if MODE == 0:
        s = tl.load(s_ptr)
        key = tl.load(key_ptr).to(tl.uint32)
        xv = g * s
        if USE_DECAY:
            xv = xv - decay * t.to(tl.float32)
        v = tl.floor(xv + uniform01(flat, key))
        v = tl.minimum(tl.maximum(v, -vote_clip), vote_clip).to(tl.int32)
    else:
        v = tl.where(g > 0, -1, tl.where(g < 0, 1, 0))
    return v


@triton.jit
def _matmul_votes_kernel(
    gy_ptr, x_ptr, packed_ptr, accum_ptr, cache_ptr, s_ptr, key_ptr, sumsq_ptr, gE_ptr, bad_ptr,
    M, R, C, n_groups, group_size, decay, vote_clip,
    stride_gm, stride_gr, stride_xm, stride_xc,
    MODE: tl.constexpr, USE_DECAY: tl.constexpr, SUMSQ: tl.constexpr, GE_MODE: tl.constexpr,
    GE_GROUP: tl.constexpr, CACHE_BITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
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
    mask = mask_r[:, None] & mask_c[None, :]
    n_bad = tl.sum(tl.sum(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32), axis=1), axis=0)
    g = tl.where(n_bad > 0, 0.0, acc)  # out-of-range lanes are 0 already (masked loads)
    tl.atomic_add(bad_ptr, 1.0, mask=n_bad > 0)
    if SUMSQ:
        tl.atomic_add(sumsq_ptr, tl.sum(tl.sum(g * g, axis=1), axis=0))
    flat = offs_r[:, None] * C + offs_c[None, :]
    if USE_DECAY or GE_MODE > 0:
        t = load_trits(packed_ptr, flat, mask)
    else:
        t = flat  # unused
    v = _votes_from_grad(g, flat, t, s_ptr, key_ptr, decay, vote_clip, MODE, USE_DECAY)

    if CACHE_BITS == 0:
        old = tl.load(accum_ptr + flat, mask=mask, other=0).to(tl.int32)
        tl.store(accum_ptr + flat, tl.minimum(tl.maximum(old + v, -127), 127).to(tl.int8), mask=mask)
    elif CACHE_BITS == 8:
        tl.store(cache_ptr + flat, v.to(tl.int8), mask=mask)
    else:
        # 8 // CACHE_BITS votes per byte, (v + bias) in CACHE_BITS bits, lowest bits = lowest flat index;
        # bias 1 for 2-bit fields (|v| <= 1), 8 for 4-bit fields (|v| <= 7). Needs C % (8 // CACHE_BITS) == 0.
        fields = tl.reshape(v + (1 if CACHE_BITS == 2 else 8), (BLOCK_R, BLOCK_C // (8 // CACHE_BITS), 8 // CACHE_BITS))
        shifts = tl.arange(0, 8 // CACHE_BITS) * CACHE_BITS
        packed_votes = tl.sum(fields << shifts[None, None, :], axis=2)
        offs_b = pid_c * (BLOCK_C // (8 // CACHE_BITS)) + tl.arange(0, BLOCK_C // (8 // CACHE_BITS))
        tl.store(cache_ptr + offs_r[:, None] * (C // (8 // CACHE_BITS)) + offs_b[None, :], packed_votes.to(tl.uint8),
                 mask=mask_r[:, None] & (offs_b * (8 // CACHE_BITS) < C)[None, :])

    if GE_MODE == 1:  # tile columns are whole groups (BLOCK_C % GE_GROUP == 0): one plain store per (row, group)
        gt = tl.reshape(g * t.to(tl.float32), (BLOCK_R, BLOCK_C // GE_GROUP, GE_GROUP))
        part = tl.sum(gt, axis=2)
        offs_g = pid_c * (BLOCK_C // GE_GROUP) + tl.arange(0, BLOCK_C // GE_GROUP)
        tl.store(gE_ptr + offs_r[:, None] * n_groups + offs_g[None, :], part,
                 mask=mask_r[:, None] & (offs_g < n_groups)[None, :])
    elif GE_MODE == 2:  # any group size: one atomic per (row, group overlapping the tile)
        gt = g * t.to(tl.float32)
        c_first = pid_c * BLOCK_C
        group_c = offs_c // group_size
        for gi in range(c_first // group_size, (tl.minimum(c_first + BLOCK_C, C) - 1) // group_size + 1):
            part = tl.sum(tl.where((group_c == gi)[None, :], gt, 0.0), axis=1)
            tl.atomic_add(gE_ptr + offs_r * n_groups + gi, part, mask=mask_r)


@triton.jit
def _scale_votes_kernel(gE_ptr, E_accum_ptr, s_ptr, key_ptr, sumsq_ptr, n, vote_clip,
                        MODE: tl.constexpr, SUMSQ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gE_ptr + offs, mask=mask, other=0.0)
    if SUMSQ:
        tl.atomic_add(sumsq_ptr, tl.sum(g * g, axis=0))
    v = _votes_from_grad(g, offs, offs, s_ptr, key_ptr, 0.0, vote_clip, MODE, False)
    old = tl.load(E_accum_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(E_accum_ptr + offs, tl.minimum(tl.maximum(old + v, -127), 127).to(tl.int8), mask=mask)


@triton.jit
def _vote_prep_kernel(ms_ptr, s_ptr, neg_lr_w, neg_lr_e, eps):
    """s[slot] = reciprocal(sqrt(ms[slot] + eps)) * -lr[slot]; 0 while ms <= 0 (no gradient seen yet)."""
    idx = tl.arange(0, 2)
    ms = tl.load(ms_ptr + idx)
    neg_lr = tl.where(idx == 0, neg_lr_w, neg_lr_e)
    s = tl.div_rn(tl.full((2,), 1.0, tl.float32), tl.sqrt_rn(ms + eps)) * neg_lr
    tl.store(s_ptr + idx, tl.where(ms <= 0, 0.0, s))


@triton.jit
def _ms_update_kernel(ms_ptr, scratch_ptr, nonfinite_ptr, numel_w, numel_e, beta, one_minus_beta,
                      UPDATE_W: tl.constexpr, UPDATE_E: tl.constexpr, HAS_NONFINITE: tl.constexpr):
    """rule.update_grad_ms with cur = sumsq[slot] / numel[slot]: ``ms <= 0 ? cur : ms*beta + cur*(1-beta)``,
    kept as is when cur is 0 / not finite or the layer had a non-finite tile (the reference zeroes it)."""
    idx = tl.arange(0, 2)
    ms = tl.load(ms_ptr + idx)
    bad = tl.load(scratch_ptr + 2)
    cur = tl.div_rn(tl.load(scratch_ptr + idx), tl.where(idx == 0, numel_w, numel_e).to(tl.float32))
    informative = (cur > 0) & (cur < float("inf"))
    new = tl.where(ms <= 0, cur, ms * beta + cur * one_minus_beta)
    new = tl.where(bad > 0, ms, tl.where(informative, new, ms))
    tl.store(ms_ptr + idx, new, mask=tl.where(idx == 0, UPDATE_W, UPDATE_E) != 0)
    if HAS_NONFINITE:
        tl.atomic_add(nonfinite_ptr, (bad > 0).to(tl.int32))


# ------------------------------------------------------------------------------------------------ launchers


def default_votes_config(M: int, R: int, C: int, device: torch.device) -> dict:
    """Largest tile that still gives every SM a tile (the reduction runs over the M tokens, no split-K:
    the epilogue needs the complete gradient tile)."""
    sms = sm_count(device)
    for br, bc in ((128, 128), (128, 64), (64, 64)):
        if triton.cdiv(R, br) * triton.cdiv(C, bc) >= sms:
            break
    big = M >= 1024
    return {"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_K": 64 if big else 32,
            "num_warps": 8 if br * bc >= 128 * 128 else 4, "num_stages": 3 if big else 2}


def matmul_votes_(gy: torch.Tensor, x: torch.Tensor, weight, s: torch.Tensor, key: torch.Tensor, *,
                  vote: str, vote_clip: int, decay: float = 0.0, sumsq: torch.Tensor | None = None,
                  gE: torch.Tensor | None = None, bad: torch.Tensor | None = None, cache=None,
                  config: dict | None = None) -> None:
    """Fused ``gW = gy.T @ x`` -> votes into ``weight.T_accum`` (or ``cache``), in place.

    ``s``: 0-dim float32 device tensor (unused for 'sign'); ``key``: 0-dim int64 device tensor;
    ``sumsq``: float32 scalar buffer that receives ``+= sum(gW**2)`` (or None); ``gE``: zeroed float32
    (rows, n_groups) buffer that receives ``sum_group(gW * T)`` (or None); ``bad``: float32 scalar that
    receives ``+1`` per non-finite tile (or None); ``cache``: a ``VoteCache`` to write instead of
    accumulating.
    """
    R, C = weight.rows, weight.cols
    M = gy.shape[0]
    assert gy.dim() == 2 and x.dim() == 2 and gy.shape == (M, R) and x.shape == (M, C), (
        f"expected gy (M, {R}) and x (M, {C}), got {tuple(gy.shape)} and {tuple(x.shape)}")
    assert vote in ("stochastic", "sign"), vote
    assert gy.dtype == x.dtype, f"gy and x must share a dtype, got {gy.dtype} and {x.dtype}"
    assert gy.device == x.device == weight.T_accum.device, "gy, x and the weight must be on one device"
    check_kernel_numel(R * C)
    check_kernel_offsets(gy, x)
    dev = gy.device
    cfg = dict(default_votes_config(M, R, C, dev), **(config or {}))
    gs = weight.group_size
    if gE is None:
        ge_mode, ge_group = GE_NONE, 1
    elif cfg["BLOCK_C"] % gs == 0 and gs & (gs - 1) == 0:
        ge_mode, ge_group = GE_ALIGNED, gs
    else:
        ge_mode, ge_group = GE_ATOMIC, 1
    cache_bits = 0 if cache is None else cache.bits
    if cache_bits in (2, 4):
        assert C % (8 // cache_bits) == 0 and cfg["BLOCK_C"] % (8 // cache_bits) == 0
    use_decay = vote == "stochastic" and decay != 0.0
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev) if None in (sumsq, gE, bad) else None
    grid = (triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    _matmul_votes_kernel[grid](
        gy, x, weight.T_packed, weight.T_accum,
        weight.T_accum if cache is None else (cache.buf.view(torch.int8) if cache_bits == 8 else cache.buf),
        s, key, dummy_f if sumsq is None else sumsq, dummy_f if gE is None else gE, dummy_f if bad is None else bad,
        M, R, C, weight.n_groups, gs, float(decay), float(vote_clip),
        gy.stride(0), gy.stride(1), x.stride(0), x.stride(1),
        MODE=MODE_SIGN if vote == "sign" else MODE_STOCHASTIC, USE_DECAY=use_decay, SUMSQ=sumsq is not None,
        GE_MODE=ge_mode, GE_GROUP=ge_group, CACHE_BITS=cache_bits, UPCAST=upcast_dot(gy),
        DOT_PRECISION=dot_precision(gy),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], GROUP=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
    )


def scale_votes_(gE: torch.Tensor, E_accum: torch.Tensor, s: torch.Tensor, key: torch.Tensor, *, vote: str,
                 vote_clip: int, sumsq: torch.Tensor | None = None, block: int = 1024) -> None:
    """Votes on the per-group scale gradient ``gE`` into ``E_accum`` (int8, same shape), in place."""
    assert gE.shape == E_accum.shape and gE.dtype == torch.float32 and E_accum.dtype == torch.int8
    assert gE.is_contiguous() and E_accum.is_contiguous()
    n = gE.numel()
    _scale_votes_kernel[(triton.cdiv(n, block),)](
        gE, E_accum, s, key, gE if sumsq is None else sumsq, n, float(vote_clip),
        MODE=MODE_SIGN if vote == "sign" else MODE_STOCHASTIC, SUMSQ=sumsq is not None, BLOCK=block,
        enable_fp_fusion=False,
    )


def vote_prep(vote_ms: torch.Tensor, lr_w: float, lr_e: float, eps: float) -> torch.Tensor:
    """float32 (2,) vote multipliers ``s`` for the weight (``lr_w``) and scale (``lr_e``) slots of ``vote_ms``."""
    s = torch.empty(2, dtype=torch.float32, device=vote_ms.device)
    _vote_prep_kernel[(1,)](vote_ms, s, -float(lr_w), -float(lr_e), float(eps), enable_fp_fusion=False)
    return s


def ms_update_(vote_ms: torch.Tensor, scratch: torch.Tensor, numel_w: int, numel_e: int, beta: float, *,
               update_w: bool, update_e: bool, nonfinite: torch.Tensor | None = None) -> None:
    """Fold ``scratch[0:2]`` (sums of squares) into ``vote_ms``; add 1 to ``nonfinite`` if ``scratch[2] > 0``
    (a non-finite tile: then ``vote_ms`` is left as is, as the reference's zeroed gradient leaves it)."""
    _ms_update_kernel[(1,)](
        vote_ms, scratch, scratch if nonfinite is None else nonfinite, numel_w, numel_e, float(beta),
        1.0 - float(beta), UPDATE_W=int(update_w), UPDATE_E=int(update_e), HAS_NONFINITE=nonfinite is not None,
        enable_fp_fusion=False,
    )
