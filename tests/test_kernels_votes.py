"""Fused weight-gradient vote kernels (ops/votes) vs their references, and the gpu backends vs dense-fallback.

Bit-exactness is tested on inputs where the arithmetic is exact (small-integer gy/x, powers-of-two scales:
every partial sum of the gradient and of its squares is exact in float32, whatever the summation order);
random float inputs are tested statistically. Runs the Triton kernels on CUDA when present, else in the
CPU interpreter (TRITON_INTERPRET=1, set below before Triton is imported; falls back to a subprocess when
Triton was imported earlier without it).

PyTorch's CPU ``sqrt`` is not correctly rounded (about 1 in 6 float32 inputs is 1 ulp off); its CUDA
``sqrt`` and the kernels' ``sqrt_rn`` are. So on the CPU the reference's ``rule.vote_multiplier`` is run
with a correctly rounded square root (float64 sqrt of the float32 value, rounded once to float32: exact,
53 >= 2*24 + 2), op for op otherwise the same (fixture ``ieee_vote_multiplier``).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before `import triton`

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import trueternary.rule as rule  # noqa: E402
from _kernel_env import interpreter_fallback  # noqa: E402
from trueternary import rng  # noqa: E402
from trueternary.backends import UpdateBackend  # noqa: E402
from trueternary.layers import TernaryLinear, set_linear_kernel  # noqa: E402
from trueternary.ops.triton_utils import interpreter_ready  # noqa: E402
from trueternary.ops.votes import (  # noqa: E402
    VOTES_FUSED_MAX_TOKENS,
    VoteCache,
    cast_matmul_votes,
    encode_vote_cache,
    fused_votes_supported,
    matmul_votes_naive,
    resolve_votes_impl,
    scale_votes_naive,
)
from trueternary.ops.votes.triton import _device_key, _log2_code  # noqa: E402
from trueternary.optim import FlipOptimizer  # noqa: E402
from trueternary.rule import FlipRule, accumulate  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or interpreter_ready()
CALLS = 1024  # FlipOptimizer's RNG counter slots per step


_kernels_runnable, test_in_subprocess = interpreter_fallback(__file__, IN_PROCESS)


@pytest.fixture(autouse=True)
def ieee_vote_multiplier(monkeypatch):
    """On the CPU: rule.vote_multiplier with a correctly rounded sqrt, as CUDA and the kernels compute it."""
    if DEVICE != "cpu":
        return

    def vote_multiplier(ms, lr):
        root = torch.sqrt((ms.float() + rule.MS_EPS).double()).float()
        return (-lr / root).to(torch.float32)

    monkeypatch.setattr(rule, "vote_multiplier", vote_multiplier)


def kernels():
    from trueternary.ops.votes import triton as kt

    return kt


def random_weight(rows, cols, group_size, seed=0):
    w = TernaryScaleTensor(rows, cols, group_size, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    w.set_trits(torch.randint(-1, 2, (rows, cols), generator=g))
    w.T_accum.copy_(torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8))
    w.E_accum.copy_(torch.randint(-127, 128, w.E.shape, generator=g, dtype=torch.int8))
    return w


def int_inputs(M, rows, cols, seed=0, dtype=torch.float32):
    """Small-integer gy/x: every partial sum of gy.T @ x (and of its squares per tile) is an exact integer."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randint(-3, 4, (M, rows), generator=g).to(DEVICE, dtype)
    x = torch.randint(-3, 4, (M, cols), generator=g).to(DEVICE, dtype)
    return gy, x


def cfg(block_r, block_c, block_k=16):
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2}


def step_tensor(step):
    return torch.tensor(step, dtype=torch.int64, device=DEVICE)


def launch_votes(w, gy, x, *, vote="stochastic", lr=2.0, vote_clip=8, norm_block=16, decay=0.0, seed=3, stream=4,
                 step=5, call=2, config=None, **kw):
    kt = kernels()
    kt.matmul_votes_(gy, x, w, vote=vote, lr=lr, vote_clip=vote_clip, norm_block=norm_block, decay=decay,
                     key_base=kt.key_base(seed, stream), call=call, step=step_tensor(step), calls_per_step=CALLS,
                     config=config or cfg(16, 16), **kw)
    return rng.stream_key(seed, stream, step * CALLS + call).to(DEVICE)


@triton.jit(do_not_specialize=["call", "key_base"])  # as the kernels: 0 and 1 would become constants
def _key_kernel(out_ptr, step_ptr, call, key_base, CALLS_PER_STEP: tl.constexpr, K_STEP: tl.constexpr):
    tl.store(out_ptr, _device_key(step_ptr, call, key_base, CALLS_PER_STEP, K_STEP).to(tl.int64))


def test_device_key_matches_rng_stream_key():
    """Keys derived inside the kernels from the device step counter equal rng.stream_key's (incl. wrap-around)."""
    kt = kernels()
    cases = ((0, 0, 0, 0), (3, 7, 5, 2), (2**31 + 5, 2**20, 2**23 + 11, 1023), (1, 1, 2**40, 9))
    for seed, stream, step, call in cases:
        out = torch.zeros((), dtype=torch.int64, device=DEVICE)
        _key_kernel[(1,)](out, step_tensor(step), call, kt.key_base(seed, stream), CALLS_PER_STEP=CALLS,
                         K_STEP=rng._K_STEP)
        assert int(out) == int(rng.stream_key(seed, stream, step * CALLS + call)), (seed, stream, step, call)


# (rows, cols, group_size, M, norm_block, config): ragged edges, tiles of one normalisation block, of 2x2 and
# 1x2 blocks (sub-tile statistics), group sizes that tile-align (8, 16), straddle tiles (5: atomic gE) or
# exceed them (64)
CASES = [
    (20, 37, 8, 9, 16, cfg(16, 16)),
    (40, 70, 16, 9, 16, cfg(32, 32)),
    (33, 48, 5, 17, 16, cfg(16, 32)),
    (33, 40, 64, 5, 32, cfg(32, 32)),
    (3, 2, 1, 1, 16, cfg(16, 16)),
]
CASE_IDS = [f"{r}x{c}-g{g}-M{m}-nb{nb}-t{k['BLOCK_R']}x{k['BLOCK_C']}" for r, c, g, m, nb, k in CASES]
VOTE_MODES = [("stochastic", 0.0), ("stochastic", 0.375), ("sign", 0.0)]
VOTE_IDS = ["stoch", "stoch-decay", "sign"]


@pytest.mark.parametrize("impl", ["fused", "gemm"])
@pytest.mark.parametrize("rows,cols,gs,M,nb,config", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("vote,decay", VOTE_MODES, ids=VOTE_IDS)
def test_matmul_votes_bit_exact(rows, cols, gs, M, nb, config, vote, decay, impl):
    """Both sources of the gradient tiles: formed in the kernel ('fused') or read from cuBLAS's gW ('gemm')."""
    w = random_weight(rows, cols, gs)
    A0 = w.T_accum.clone()
    gy, x = int_inputs(M, rows, cols)
    gE = torch.zeros(rows, w.n_groups, device=DEVICE)
    flag = torch.zeros((), device=DEVICE)
    key = launch_votes(w, gy, x, vote=vote, vote_clip=3, norm_block=nb, decay=decay, config=config, gE=gE, flag=flag,
                       impl=impl)
    v, ref_gE, _ = matmul_votes_naive(gy, x, w, 2.0, key, vote=vote, vote_clip=3, norm_block=nb, decay=decay,
                                      scale_grad=True)
    assert torch.equal(w.T_accum, accumulate(A0, v))
    assert torch.equal(gE, ref_gE)
    assert flag.item() == 0
    assert (v != 0).any()


def test_matmul_votes_norm_block_128_and_64():
    """The production normalisation blocks: 128 (one block per tile) and 64 inside a 128 x 128 tile."""
    w = random_weight(130, 140, 64)
    gy, x = int_inputs(6, 130, 140, seed=4)
    for nb, config in ((128, cfg(128, 128, 16)), (64, cfg(128, 128, 16))):
        A0 = w.T_accum.clone()
        key = launch_votes(w, gy, x, norm_block=nb, config=config)
        v = matmul_votes_naive(gy, x, w, 2.0, key, vote="stochastic", vote_clip=8, norm_block=nb)[0]
        assert torch.equal(w.T_accum, accumulate(A0, v)), nb


@pytest.mark.parametrize("sms", [1, 10**6], ids=["many-tiles", "fewer-tiles-than-SMs"])
def test_gemm_votes_default_launch_by_tile_count(sms, monkeypatch):
    """impl 'gemm' with its default launch (default_votes_config): a matrix of fewer normalisation tiles than SMs
    reads each tile in one statistics block at 8 warps, others in 32-row blocks; both vote as the reference
    (norm_block 128, the default rule's moving averages)."""
    kt = kernels()
    monkeypatch.setattr(kt, "sm_count", lambda device: sms)
    nb, rows, cols = 128, 130, 140
    stats = kt.default_votes_config(6, rows, cols, torch.device(DEVICE), nb, gw_given=True)
    assert (stats["STATS_CHUNK_R"], stats["num_warps"]) == ((nb, 8) if sms > 4 else (32, 4))
    w = random_weight(rows, cols, 64)
    gy, x = int_inputs(6, rows, cols, seed=4)
    A0 = w.T_accum.clone()
    codes = {k: v.to(DEVICE) for k, v in rule.empty_norm_codes((rows, cols), nb, "cpu").items()}
    ref_codes = {k: v.clone() for k, v in codes.items()}
    kt.matmul_votes_(gy, x, w, vote="stochastic", lr=2.0, vote_clip=8, norm_block=nb, decay=0.0,
                     key_base=kt.key_base(3, 4), call=2, step=step_tensor(5), calls_per_step=CALLS, impl="gemm",
                     norm_codes=codes, norm_beta=0.9, norm_key_base=kt.key_base(77, 4))
    key, norm_key = rng.stream_key(3, 4, 5 * CALLS + 2), rng.stream_key(77, 4, 5 * CALLS + 2)
    ref_codes, v = reference_norm_memory_votes(w, gy, x, ref_codes, lr=2.0, nb=nb, beta=0.9, key=key.to(DEVICE),
                                               norm_key=norm_key)
    assert torch.equal(w.T_accum, accumulate(A0, v))
    assert all(torch.equal(codes[k].cpu(), ref_codes[k].cpu()) for k in codes)


def test_matmul_votes_aligned_scale_grad_writes_every_group():
    """With tile-aligned groups gE is written by plain stores: a NaN-poisoned buffer must be fully overwritten."""
    w = random_weight(20, 37, 8)
    gy, x = int_inputs(9, 20, 37)
    gE = torch.full((20, w.n_groups), float("nan"), device=DEVICE)
    key = launch_votes(w, gy, x, gE=gE, flag=torch.zeros((), device=DEVICE))
    ref_gE = matmul_votes_naive(gy, x, w, 2.0, key, vote="stochastic", vote_clip=8, norm_block=16, scale_grad=True)[1]
    assert torch.equal(gE, ref_gE)


@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_matmul_votes_strided_bf16_inputs(impl):
    """Non-contiguous gy (a transposed view) and bf16 operands give the same integer state."""
    w = random_weight(20, 24, 8)
    A0 = w.T_accum.clone()
    gy_t, x = int_inputs(19, 20, 24, dtype=torch.bfloat16)
    gy = gy_t.t().contiguous().t()  # (M, rows) with strides (1, M)
    assert not gy.is_contiguous()
    key = launch_votes(w, gy, x, lr=1.25, impl=impl)
    v = matmul_votes_naive(gy, x, w, 1.25, key, vote="stochastic", vote_clip=8, norm_block=16)[0]
    assert torch.equal(w.T_accum, accumulate(A0, v))


def test_matmul_votes_random_inputs_agree_statistically():
    """Float gradients: the kernel's fp32 sums run in another order than torch's, so a vote may differ by 1
    where g*s + u lies within rounding of an integer; everything else (and the mean vote) agrees."""
    w = random_weight(40, 45, 16)
    A0 = w.T_accum.clone()
    g = torch.Generator().manual_seed(3)
    gy = torch.randn(33, 40, generator=g).to(DEVICE)
    x = torch.randn(33, 45, generator=g).to(DEVICE)
    key = launch_votes(w, gy, x, lr=3.0, decay=0.1, config=cfg(32, 32))
    v = matmul_votes_naive(gy, x, w, 3.0, key, vote="stochastic", vote_clip=8, norm_block=16, decay=0.1)[0]
    diff = (w.T_accum.int() - accumulate(A0, v).int()).abs()
    assert diff.max() <= 1
    assert diff.float().mean() <= 0.01
    unsat = A0.abs() < 100
    kv = w.T_accum.int() - A0.int()
    assert abs(kv[unsat].float().mean() - v.int()[unsat].float().mean()) < 0.01
    assert v.abs().float().mean() > 0.5  # lr=3 on normalised gradients: the votes are not trivially 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_nonfinite_tiles_are_zeroed_and_the_layer_counted_once(impl):
    w = random_weight(40, 37, 8)
    A0 = w.T_accum.clone()
    gy, x = int_inputs(9, 40, 37)
    gy[4, 21] = float("nan")  # gW row 21: tile row 1 of 3 (16-row tiles), all 3 column tiles
    flag = torch.zeros((), device=DEVICE)
    nonfinite = torch.zeros((), dtype=torch.int32, device=DEVICE)
    gE = torch.zeros(40, w.n_groups, device=DEVICE)
    key = launch_votes(w, gy, x, decay=0.25, gE=gE, flag=flag, nonfinite=nonfinite, impl=impl)
    v, ref_gE, n_bad = matmul_votes_naive(gy, x, w, 2.0, key, vote="stochastic", vote_clip=8, norm_block=16,
                                          decay=0.25, scale_grad=True, tile=(16, 16))
    assert n_bad.item() == 3 and flag.item() == 3  # three tiles zeroed ...
    assert nonfinite.item() == 1  # ... one layer counted
    assert torch.equal(w.T_accum, accumulate(A0, v))
    assert torch.equal(gE, ref_gE) and torch.isfinite(gE).all()
    EA = w.E_accum.clone()  # a flagged call casts no scale votes
    kernels().scale_votes_(gE, w.E_accum, vote="stochastic", lr_e=1.0, vote_clip=8, normalize="block_factored",
                           norm_block=16, key_base=0, call=0, step=step_tensor(0), calls_per_step=CALLS, flag=flag)
    assert torch.equal(w.E_accum, EA)


def huge_row_inputs(M, rows, cols, seed=0):
    """Exact gradients near float32's limit: gW row 0 is 2**70 times small integers (its squares overflow float32,
    so do its tile's row, column and tile sums), row 5 is 2**40 times (squares fine); the rest small integers."""
    gy, x = int_inputs(M, rows, cols, seed)
    gy[:, 0] *= 2.0**70
    gy[:, 5] *= 2.0**40
    return gy, x


@pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning")  # no NaN is ever formed
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy squares
@pytest.mark.parametrize("impl", ["fused", "gemm"])
@pytest.mark.parametrize("norm_memory", [False, True], ids=["per-call", "norm-memory"])
def test_finite_gradients_near_float32_limit_are_not_flagged_and_vote_like_the_reference(impl, norm_memory):
    """Finite gradients whose squares overflow: the non-finite count (_count_nonfinite, by element) stays 0, the
    statistics saturate at FLOAT32_MAX as the reference's, so votes, gE and codes equal the reference bit for bit,
    and the huge row votes with its sign (clipped: its s is lr / sqrt(FLOAT32_MAX)), not NaN."""
    kt = kernels()
    w = random_weight(40, 37, 8)
    A0 = w.T_accum.clone()
    gy, x = huge_row_inputs(9, 40, 37)
    assert torch.isfinite(gy.t() @ x).all() and not torch.isfinite((gy.t() @ x).square()).all()
    flag = torch.zeros((), device=DEVICE)
    nonfinite = torch.zeros((), dtype=torch.int32, device=DEVICE)
    gE = torch.zeros(40, w.n_groups, device=DEVICE)
    norm = {}
    if norm_memory:
        codes = {k: v.to(DEVICE) for k, v in rule.empty_norm_codes((40, 37), 16, "cpu").items()}
        norm = dict(norm_codes=codes, norm_beta=0.9, norm_key_base=kt.key_base(77, 4))
    key = launch_votes(w, gy, x, decay=0.25, gE=gE, flag=flag, nonfinite=nonfinite, impl=impl, **norm)
    if norm_memory:
        norm_key = rng.stream_key(77, 4, 5 * CALLS + 2)
        ref_codes, v = reference_norm_memory_votes(w, gy, x, rule.empty_norm_codes((40, 37), 16, "cpu"), lr=2.0,
                                                   nb=16, beta=0.9, key=key, norm_key=norm_key, decay=0.25)
        for k in codes:
            assert torch.equal(codes[k].cpu(), ref_codes[k].cpu()), k
        assert int(codes["norm_tile"].max()) == 32767  # the overflowing tiles' codes top out
    else:
        v, ref_gE, _ = matmul_votes_naive(gy, x, w, 2.0, key, vote="stochastic", vote_clip=8, norm_block=16,
                                          decay=0.25, scale_grad=True, tile=(16, 16))
        assert torch.equal(gE, ref_gE) and torch.isfinite(gE).all()
    assert flag.item() == 0 and nonfinite.item() == 0
    assert torch.equal(w.T_accum, accumulate(A0, v))
    g0 = (gy.t() @ x)[0].cpu()
    # the saturated row: clipped descent votes, not garbage; the decay term alone (|v| <= 1) where g == 0 or, with
    # the codes' rounding up past FLOAT32_MAX, where ms overflowed (s = -0)
    v0, descent = v[0].float().cpu(), -8 * g0.sign()
    clipped = (v0 == descent) & (g0 != 0)
    assert (clipped | (v0.abs() <= 1)).all() and clipped.sum() >= 30


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("vote,normalize", [("stochastic", "block_factored"), ("stochastic", "tensor"),
                                            ("sign", "tensor")], ids=["stoch-block", "stoch-tensor", "sign"])
def test_scale_votes_saturate_overflowed_group_sums(vote, normalize):
    """gE sums that overflowed float32 (+-inf, and NaN from +inf + -inf partial sums) vote as the reference does
    on rule.saturate_sums(gE): +-FLOAT32_MAX and 0."""
    g = torch.Generator().manual_seed(5)
    gE = torch.randint(-40, 41, (37, 20), generator=g).float()
    gE[3, 4], gE[20, 7], gE[30, 19] = float("inf"), float("-inf"), float("nan")
    gE = gE.to(DEVICE)
    E_accum = torch.randint(-100, 101, (37, 20), generator=g, dtype=torch.int8).to(DEVICE)
    kt = kernels()
    key = rng.stream_key(1, 9, 6 * CALLS + 1).to(DEVICE)
    ref = scale_votes_naive(rule.saturate_sums(gE), E_accum, 0.8, key, vote=vote, vote_clip=4, normalize=normalize,
                            norm_block=16)
    got = E_accum.clone()
    kt.scale_votes_(gE, got, vote=vote, lr_e=0.8, vote_clip=4, normalize=normalize, norm_block=16,
                    key_base=kt.key_base(1, 9), call=1, step=step_tensor(6), calls_per_step=CALLS, block=128)
    assert torch.equal(got, ref)
    d = got.int() - E_accum.int()
    assert d[3, 4] < 0 and d[20, 7] > 0 and (vote == "sign") <= (d[30, 19] == 0)


@pytest.mark.parametrize("vote,vote_clip,cols,bits", [("sign", 1, 36, 2), ("stochastic", 5, 34, 4),
                                                      ("stochastic", 8, 37, 8)],
                         ids=["bits2", "bits4", "bits8-ragged"])
def test_vote_cache_layouts(vote, vote_clip, cols, bits):
    """gpu-signcache: votes go to the compact cache (poisoned first), T_accum is not touched."""
    w = random_weight(20, cols, 8)
    A0 = w.T_accum.clone()
    gy, x = int_inputs(9, 20, cols)
    cache = VoteCache.for_weight(w, vote, vote_clip)
    assert cache.bits == bits and cache.nbytes == 20 * cols * bits // 8
    cache.buf.fill_(0xFF)
    key = launch_votes(w, gy, x, vote=vote, vote_clip=vote_clip, cache=cache, config=cfg(16, 32 if bits == 2 else 16))
    v = matmul_votes_naive(gy, x, w, 2.0, key, vote=vote, vote_clip=vote_clip, norm_block=16)[0]
    assert torch.equal(cache.buf, encode_vote_cache(v, bits))
    assert torch.equal(w.T_accum, A0)


@pytest.mark.parametrize("vote,normalize,n_groups,nb", [
    ("stochastic", "block_factored", 20, 16), ("stochastic", "tensor", 20, 16), ("sign", "tensor", 20, 16),
    ("stochastic", "block_factored", 5, 16), ("stochastic", "block_factored", 12, 32)],
    ids=["stoch-block", "stoch-tensor", "sign", "stoch-block-5-groups-in-8-lanes", "stoch-block-12-groups-nb32"])
def test_scale_votes_bit_exact_and_interval(vote, normalize, n_groups, nb):
    """gE (37 rows: ragged blocks); fewer groups than norm_block: the kernel's narrower column block."""
    g = torch.Generator().manual_seed(5)
    gE = torch.randint(-40, 41, (37, n_groups), generator=g).float().to(DEVICE)
    E_accum = torch.randint(-127, 128, (37, n_groups), generator=g, dtype=torch.int8).to(DEVICE)
    kt = kernels()
    key = rng.stream_key(1, 9, 6 * CALLS + 1).to(DEVICE)
    ref = scale_votes_naive(gE, E_accum, 0.8, key, vote=vote, vote_clip=4, normalize=normalize, norm_block=nb)
    for step, interval in ((6, 3), (7, 3)):  # a scale step, and a step the interval skips
        got = E_accum.clone()
        kt.scale_votes_(gE, got, vote=vote, lr_e=0.8, vote_clip=4, normalize=normalize, norm_block=nb,
                        key_base=kt.key_base(1, 9), call=1, step=step_tensor(step), calls_per_step=CALLS,
                        interval=interval, block=128)
        assert torch.equal(got, ref if step % interval == 0 else E_accum), (step, interval)
    assert not torch.equal(ref, E_accum)


def test_fused_votes_supported():
    ok = [FlipRule(), FlipRule(norm_beta=0), FlipRule(norm_beta=0, norm_block=64), FlipRule.naive(),
          FlipRule(vote="sign", normalize="tensor"), FlipRule(vote="sign", scale_vote="sign", norm_block=7)]
    not_fused = [FlipRule(normalize="tensor", norm_beta=0), FlipRule(norm_block=8, norm_beta=0),
                 FlipRule(norm_block=48, norm_beta=0), FlipRule(vote="sign", norm_block=8), FlipRule(vote_power=0.5)]
    assert all(fused_votes_supported(r.to_dict()) for r in ok)
    assert not any(fused_votes_supported(r.to_dict()) for r in not_fused)
    w = random_weight(4, 6, 2)
    with pytest.raises(ValueError, match="do not implement"):
        cast_matmul_votes(w, *int_inputs(3, 4, 6), FlipRule(normalize="tensor").to_dict(), seed=0,
                          step=step_tensor(0), call=0, calls_per_step=CALLS)


def test_votes_impl_resolution():
    assert resolve_votes_impl("auto", VOTES_FUSED_MAX_TOKENS) == "fused"
    assert resolve_votes_impl("auto", VOTES_FUSED_MAX_TOKENS + 1) == "gemm"
    assert resolve_votes_impl("fused", 10**6) == "fused" and resolve_votes_impl("gemm", 1) == "gemm"
    with pytest.raises(ValueError, match="unknown votes impl"):
        resolve_votes_impl("cublas", 8)


def test_composite_empty_batch_is_noop():
    w = random_weight(20, 36, 8)
    before = copy.deepcopy(w)
    gy, x = int_inputs(5, 20, 36)
    cast_matmul_votes(w, gy[:0], x[:0], FlipRule(norm_block=16, norm_beta=0).to_dict(), seed=0, step=step_tensor(0),
                      call=0, calls_per_step=CALLS, nonfinite=torch.zeros((), dtype=torch.int32, device=DEVICE))
    for name in ("T_accum", "E_accum", "T_packed", "E"):
        assert torch.equal(getattr(w, name), getattr(before, name))


# ------------------------------------------------------------------ the gpu backends vs dense-fallback


class MLP(nn.Module):
    """Two ternary layers (ragged sizes, a bias, scales 2**-1 and 2**0): with inputs in {-1, 0, 1} every
    partial sum, including the per-tile sums of gW**2, is exact in float32 whatever the summation order."""

    def __init__(self):
        super().__init__()
        self.a = TernaryLinear(24, 40, bias=True, group_size=8, device=DEVICE)
        self.b = TernaryLinear(40, 18, group_size=16, device=DEVICE)
        g = torch.Generator().manual_seed(11)
        for w in (self.a.weight, self.b.weight):
            w.E.copy_(torch.randint(-1, 1, w.E.shape, generator=g, dtype=torch.int8))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def gpu_optimizer(model, backend, **kw):
    """A FlipOptimizer running ``backend``'s code path, the model's linear layers on the kernels that go with it
    (the Triton ones for a gpu backend, as recipes.build_recipe sets them). On a CPU-only machine the constructor
    refuses 'gpu' (it needs CUDA), so the backend is switched after construction: the kernels then run in
    Triton's interpreter."""
    set_linear_kernel(model, UpdateBackend(backend).linear_kernel)
    if DEVICE == "cuda":
        return FlipOptimizer(model, backend=backend, **kw)
    opt = FlipOptimizer(model, backend="dense-fallback", **kw)
    opt.backend = backend
    return opt


RULES = {
    "historyless-nb16": {"norm_block": 16, "norm_beta": 0.0, "lr": 3.0, "accum_threshold": 4},
    "decay-interval2-clip3": {"norm_block": 16, "norm_beta": 0.0, "decay": 0.25, "scale_update_interval": 2,
                              "vote_clip": 3, "accum_threshold": 5},
    "seed-naive": FlipRule.naive(accum_threshold=3).to_dict(),
    "sign-T-stochastic-E-tensor": {"vote": "sign", "normalize": "tensor", "scale_vote": "stochastic",
                                   "accum_threshold": 3, "scale_threshold": 3},
    "leak3-noclip-nb32": {"norm_block": 32, "norm_beta": 0.0, "leak": 3, "clip_at_bounds": False, "accum_threshold": 6},
    "flip-reset2": {"norm_block": 16, "norm_beta": 0.0, "lr": 3.0, "accum_threshold": 4, "flip_reset": 2},
    "norm-beta-nb16": {"norm_block": 16, "lr": 3.0, "accum_threshold": 4},  # the default rule's moving averages
    # not fused: the gpu path casts these votes on the dense path (its flips still run in the flip kernel)
    "dense-path-tensor-norm": {"normalize": "tensor", "accum_threshold": 4},
}


def train_pair(rule_kw: dict, backend: str | None, steps: int = 3, calls_per_step: int = 1, loss_scale: float = 1.0,
               check_finite: bool = False):
    """The MLP trained ``steps`` steps twice on the same exact data: dense-fallback and ``backend`` (None: the
    dense-fallback run alone; the kernel model and optimiser are then None)."""
    ref = MLP()
    o_ref = FlipOptimizer(ref, backend="dense-fallback", seed=3, check_finite=check_finite, **rule_kw)
    g = torch.Generator().manual_seed(1)
    if backend is None:
        for _ in range(steps):
            for _ in range(calls_per_step):
                x = torch.randint(-1, 2, (2, 5, 24), generator=g).float().to(DEVICE)
                c = torch.randint(-1, 2, (2, 5, 18), generator=g).float().to(DEVICE)
                ((ref(x) * c).sum() * loss_scale).backward()
            o_ref.step()
        return ref, o_ref, None, None
    ker = copy.deepcopy(ref)
    o_ker = gpu_optimizer(ker, backend, seed=3, check_finite=check_finite, **rule_kw)
    for step in range(steps):
        for _ in range(calls_per_step):
            x = torch.randint(-1, 2, (2, 5, 24), generator=g).float().to(DEVICE)
            c = torch.randint(-1, 2, (2, 5, 18), generator=g).float().to(DEVICE)
            xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yk = ref(xr), ker(xk)
            assert yk.grad_fn.impl is not None  # the kernel path ran
            assert yr.grad_fn.impl is None
            assert torch.equal(yr, yk)
            ((yr * c).sum() * loss_scale).backward()
            ((yk * c).sum() * loss_scale).backward()
            assert torch.equal(xr.grad, xk.grad)
        o_ref.step()
        o_ker.step()
        sr, sk = ref.state_dict(), ker.state_dict()
        assert [n for n in sr if not torch.equal(sr[n], sk[n])] == [], step
        assert int(o_ker.last_flips) == int(o_ref.last_flips)
        assert int(o_ker.last_scale_flips) == int(o_ref.last_scale_flips)
    return ref, o_ref, ker, o_ker


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_gpu_backend_trains_like_dense_fallback(rule, monkeypatch):
    """End to end (forward/backward-input kernels, fused votes, fused flips) for 3 steps: same integer state."""
    import trueternary.ops.flip as flip_ops

    flip_calls = []
    kernel_flips = flip_ops.apply_flips_
    monkeypatch.setattr(flip_ops, "apply_flips_", lambda *a, **k: flip_calls.append(1) or kernel_flips(*a, **k))
    ref, o_ref, ker, o_ker = train_pair(RULES[rule], "gpu")
    assert len(flip_calls) == 3 * 2  # step() ran the flip kernel for both weights every step
    moved = sum(int((w.T_accum != 0).sum()) for w in (ref.a.weight, ref.b.weight))
    assert moved > 0 or int(o_ref.last_flips) > 0  # the rule really moved state
    steps = o_ker._ctx.counters.device_steps
    if fused_votes_supported(o_ker.param_groups[0]):  # the kernels kept their own step counter in step
        assert steps and all(int(t) == 3 for t in steps.values())
    else:
        assert not steps


@pytest.mark.parametrize("backend", ["gpu", "gpu-signcache"])
@pytest.mark.parametrize("rule", ["historyless-nb16", "norm-beta-nb16"])
def test_gpu_backends_with_cublas_gradient_train_like_dense_fallback(rule, backend, monkeypatch):
    """Above VOTES_FUSED_MAX_TOKENS (here 0) cuBLAS forms gW and the vote kernel's epilogue reads it: the same
    integer state, flips and moving-average codes as dense-fallback, step for step."""
    import trueternary.ops.votes as votes
    import trueternary.ops.votes.triton as votes_triton

    impls = []
    launch = votes_triton.matmul_votes_
    monkeypatch.setattr(votes, "VOTES_FUSED_MAX_TOKENS", 0)
    monkeypatch.setattr(votes_triton, "matmul_votes_", lambda *a, **k: impls.append(k["impl"]) or launch(*a, **k))
    ref, o_ref, ker, o_ker = train_pair(RULES[rule], backend, steps=2)
    assert impls == ["gemm"] * (2 * 2)
    sr, sk = o_ref.state_dict()["state"], o_ker.state_dict()["state"]
    for k in sr:
        assert all(torch.equal(sr[k][n].cpu(), sk[k][n].cpu()) for n in sr[k]), k


@pytest.mark.parametrize("rule", ["historyless-nb16", "seed-naive", "flip-reset2"])
def test_gpu_signcache_trains_like_dense_fallback(rule):
    """gpu-signcache with two calls per step: the second call flushes the pending cache (sequential saturation)."""
    train_pair(RULES[rule], "gpu-signcache", steps=2, calls_per_step=2)


def test_signcache_state_dict_flushes_pending_votes_and_load_drops_them():
    ref, _, ker, o_ker = train_pair(RULES["historyless-nb16"], "gpu-signcache", steps=1)
    ref_opt = FlipOptimizer(ref, backend="dense-fallback", seed=3, check_finite=False, **RULES["historyless-nb16"])
    ref_opt._ctx.counters.step = o_ker.step_count
    x = torch.randint(-2, 3, (3, 24), generator=torch.Generator().manual_seed(7)).float().to(DEVICE)
    ref(x).sum().backward()
    ker(x).sum().backward()
    caches = [c for _, c in o_ker._votes.caches.values()]
    assert caches and all(c.pending for c in caches)
    sd = o_ker.state_dict()  # flushes: the model's T_accum now holds the votes, as on the dense path
    assert not any(c.pending for c in caches)
    for w_ref, w_ker in ((ref.a.weight, ker.a.weight), (ref.b.weight, ker.b.weight)):
        assert torch.equal(w_ref.T_accum, w_ker.T_accum)
    ker(x).sum().backward()
    o_ker.load_state_dict(sd)  # votes cast on the replaced state are dropped
    assert not any(c.pending for c in caches)
    assert all(int(t) == sd["trueternary"]["step"] for t in o_ker._ctx.counters.device_steps.values())


@pytest.mark.parametrize("norm_beta", [0.0, 0.95], ids=["historyless", "norm-memory-fused"])
def test_gpu_path_has_no_host_sync(no_host_reads, norm_beta):
    """With check_finite=False the gpu backend's backward and step() never read a tensor on the host (the
    CUDA-graph requirement): every way Python can do so raises here. With norm_beta, the moving averages kept
    in the vote kernel's epilogue too."""
    model = MLP()
    opt = gpu_optimizer(model, "gpu", seed=1, check_finite=False, norm_block=16, norm_beta=norm_beta)
    x = torch.randint(-2, 3, (4, 24), generator=torch.Generator().manual_seed(2)).float().to(DEVICE)
    model(x).sum().backward()  # warm-up: creates the device step counter
    opt.step()
    with no_host_reads("on the gpu path"):
        model(x).sum().backward()
        opt.step()
    assert int(opt._ctx.counters.device_steps[torch.device(DEVICE) if DEVICE == "cpu" else x.device]) == 2
    assert bool(opt.state) == (norm_beta > 0)  # the fused path kept the codes


@pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("rule", ["historyless-nb16", "norm-beta-nb16"])
def test_gpu_backend_large_finite_gradients_train_like_dense_fallback(rule):
    """loss * 2**63 (9.2e18: finite gradients whose squares overflow float32): with the NaN/inf check on, no layer
    is reported non-finite on either path and the state stays the dense path's; loss * 2**40 (no overflow)
    trains exactly as the unscaled loss (the votes are scale-invariant): the gpu run at 2**40, equal to the
    dense one at 2**40 step for step, ends where the dense path does without scaling."""
    ref, o_ref, _, _ = train_pair(RULES[rule], "gpu", steps=2, loss_scale=2.0**63, check_finite=True)
    assert o_ref.step_count == 2 and int(o_ref._ctx.finite.count) == 0
    assert any(bool((w.T_accum != 0).any()) for w in (ref.a.weight, ref.b.weight))
    torch.manual_seed(0)  # MLP() draws its trits from the global generator
    scaled = train_pair(RULES[rule], "gpu", steps=2, loss_scale=2.0**40, check_finite=True)[2].state_dict()
    torch.manual_seed(0)
    plain = train_pair(RULES[rule], None, steps=2)[0].state_dict()
    assert [n for n in plain if not torch.equal(plain[n], scaled[n])] == []


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_gpu_backend_counts_nonfinite_layers_and_raises():
    from trueternary.optim import NonFiniteGradientError

    model = MLP()
    opt = gpu_optimizer(model, "gpu", seed=1, norm_block=16, norm_beta=0.0)
    x = torch.randint(-2, 3, (4, 24), generator=torch.Generator().manual_seed(2)).float().to(DEVICE)
    x[1, 3] = float("inf")
    model(x).sum().backward()
    with pytest.raises(NonFiniteGradientError, match="2 layer gradient"):
        opt.step()
    assert opt.step_count == 1 and all(int(t) == 1 for t in opt._ctx.counters.device_steps.values())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_gpu_backend_deferred_finite_check_counts_without_a_host_read(no_host_reads):
    """defer_finite_check (a CUDA-graphed step): step() moves the count of non-finite layers to the device
    tensor last_step_nonfinite, zeroes the counter and reads nothing on the host; a clean step then reports 0."""
    model = MLP()
    opt = gpu_optimizer(model, "gpu", seed=1, norm_block=16, norm_beta=0.0)
    opt.defer_finite_check(DEVICE)
    x = torch.randint(-2, 3, (4, 24), generator=torch.Generator().manual_seed(2)).float().to(DEVICE)
    model(x).sum().backward()  # warm-up: creates the device step counter
    opt.step()
    bad = x.clone()
    bad[1, 3] = float("inf")
    with no_host_reads("on the gpu path"):
        model(bad).sum().backward()
        opt.step()
    assert int(opt.last_step_nonfinite) == 2 and int(opt._ctx.finite.count) == 0
    model(x).sum().backward()
    opt.step()
    assert int(opt.last_step_nonfinite) == 0 and opt.step_count == 3


@triton.jit
def _log2_code_kernel(x_ptr, u_ptr, out_ptr, lut_ptr, n, lo, hi, FRAC: tl.constexpr, STOCHASTIC: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _log2_code(x, u, lut_ptr, lo, hi, FRAC, STOCHASTIC), mask=mask)


@pytest.mark.parametrize("frac,lo,hi", [(8, rule.NORM_TILE_MIN, 32767), (3, -128, 127)], ids=["tile-codes", "ratios"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_log2_code_matches_the_reference_at_table_edges(frac, lo, hi, stochastic):
    """The kernel's log2 code (exponent bits, a binary search in the table, the remainder interpolated and
    rounded) equals rule.log2_code on every table entry, the floats either side of each, at several octaves, on
    0, subnormals, inf and random values: the entries' edges are where a search step could go wrong."""
    lut = rule.code_lut(frac)
    edges = torch.cat([lut, torch.nextafter(lut, torch.tensor(0.0)), torch.nextafter(lut, torch.tensor(3.0))])
    octaves = torch.tensor([2.0 ** k for k in (-40, -7, -1, 0, 1, 9, 60)])
    x = torch.cat([(edges[None, :] * octaves[:, None]).reshape(-1), torch.tensor([0.0, 1e-40, 1e-45, float("inf")]),
                   torch.rand(3000, generator=torch.Generator().manual_seed(frac)) * 1e4]).float()
    u = torch.rand(x.numel(), generator=torch.Generator().manual_seed(7)).float()
    out = torch.empty(x.numel(), dtype=torch.int32, device=DEVICE)
    _log2_code_kernel[(triton.cdiv(x.numel(), 256),)](x.to(DEVICE), u.to(DEVICE), out, rule.code_lut(frac, DEVICE),
                                                      x.numel(), lo, hi, FRAC=frac, STOCHASTIC=stochastic, BLOCK=256)
    ref = rule.log2_code(x, frac, lo, hi, u if stochastic else None)
    bad = (out.cpu() != ref).nonzero().flatten()
    assert bad.numel() == 0, [(float(x[i]), int(out[i]), int(ref[i])) for i in bad[:5]]


# ------------------------------------------------------------------ norm_beta: the moving averages in the epilogue
def reference_norm_memory_votes(w, gy, x, codes, *, lr, nb, beta, key, norm_key, decay=0.0):
    """One call of the dense path's norm_beta votes (optim.dense.DenseVotes._ema_scale + _votes): new codes, int8
    votes."""
    from trueternary.ops.votes import weight_grad

    g = weight_grad(gy, x).float()
    factors, new = rule.ema_block_factored_stats(rule.block_factored_stats(g, nb), codes, beta, norm_key)
    s = rule.vote_multiplier(rule.factored_ms(*factors, g.shape), lr)
    return new, rule.stochastic_votes(g, s, key, 8, w.trits(), decay)


# (rows, cols, norm_block, tile edge). 'gemm' takes no tile edge (its tiles are one normalisation block), so on it
# 2x2-subtiles-ragged would be one-subtile's case (ragged 16 x 16 tiles) again: it runs on 'fused' only.
NORM_MEMORY_CASES = {"one-subtile": (20, 36, 16, 16), "2x2-subtiles-ragged": (40, 50, 16, 32),
                     "smaller-than-a-subtile": (7, 9, 16, 16), "nb32-in-64": (64, 48, 32, 64),
                     "nb128": (130, 140, 128, 128)}


@pytest.mark.parametrize("impl,rows,cols,nb,block", [
    pytest.param(impl, *shape, id=f"{impl}-{name}") for impl in ("fused", "gemm")
    for name, shape in NORM_MEMORY_CASES.items() if (impl, name) != ("gemm", "2x2-subtiles-ragged")])
def test_norm_memory_epilogue_keeps_the_reference_codes(impl, rows, cols, nb, block):
    """The kernel's moving averages (norm_codes): over calls from empty codes (the first sets them, the next two
    average), the codes and the votes equal the reference's (rule.ema_block_factored_stats) bit for bit on exact
    gradients, incl. the codes' stochastic rounding; with another beta, the codes after the same two calls are
    the reference's at that beta and differ (the kernel really uses beta). Both gradient sources ('gemm': the
    statistics pass keeps the codes, the vote pass reads the means it stored)."""
    kt = kernels()

    def calls(n, beta, check_votes):
        """n calls from empty codes (the gradient's scale moving between calls): the codes after the second."""
        w = random_weight(rows, cols, 8)
        codes = {k: v.to(DEVICE) for k, v in rule.empty_norm_codes((rows, cols), nb, "cpu").items()}
        ref_codes = {k: v.clone() for k, v in codes.items()}
        for step in range(n):
            gy, x = int_inputs(6, rows, cols, seed=step)
            gy = gy * (step + 1)
            A0 = w.T_accum.clone()
            key = launch_votes(w, gy, x, norm_block=nb, step=step, config=cfg(block, block), norm_codes=codes,
                               norm_beta=beta, norm_key_base=kt.key_base(77, 4), impl=impl)
            norm_key = rng.stream_key(77, 4, step * CALLS + 2)
            ref_codes, v = reference_norm_memory_votes(w, gy, x, ref_codes, lr=2.0, nb=nb, beta=beta, key=key,
                                                       norm_key=norm_key)
            for k in codes:
                assert torch.equal(codes[k].cpu(), ref_codes[k].cpu()), (beta, step, k)
            if check_votes:
                assert torch.equal(w.T_accum, accumulate(A0, v)), step
            if step == 1:
                second = {k: c.clone() for k, c in codes.items()}
        assert (codes["norm_tile"] != rule.NORM_TILE_EMPTY).all() and (codes["norm_row"] != 0).any()
        return second

    at_09 = calls(3, 0.9, check_votes=True)
    at_05 = calls(2, 0.5, check_votes=False)
    assert not all(torch.equal(at_05[k], at_09[k]) for k in at_09)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_norm_memory_nonfinite_tile_keeps_its_codes(impl):
    """A tile whose gradient holds NaN keeps its codes; the other tiles move."""
    kt = kernels()
    w = random_weight(32, 32, 8)
    codes = {k: v.to(DEVICE) for k, v in rule.empty_norm_codes((32, 32), 16, "cpu").items()}
    gy, x = int_inputs(6, 32, 32, seed=1)
    launch_votes(w, gy, x, norm_block=16, config=cfg(16, 16), norm_codes=codes, norm_beta=0.9,
                 norm_key_base=kt.key_base(1, 0), impl=impl)
    before = {k: v.clone() for k, v in codes.items()}
    gy = gy * 2
    gy[0, 0] = float("nan")  # rows 0..15 of gW: the tiles (0, 0) and (0, 1)
    launch_votes(w, gy, x, norm_block=16, step=6, config=cfg(16, 16), norm_codes=codes, norm_beta=0.9,
                 norm_key_base=kt.key_base(1, 0), flag=torch.zeros((), device=DEVICE), impl=impl)
    assert torch.equal(codes["norm_tile"][0], before["norm_tile"][0])
    assert torch.equal(codes["norm_row"][0], before["norm_row"][0])
    assert not torch.equal(codes["norm_tile"][1], before["norm_tile"][1])


@pytest.mark.parametrize("backend", ["gpu", "gpu-signcache"])
def test_gpu_backend_with_fused_norm_memory_trains_like_dense_fallback(backend, monkeypatch):
    """The default rule's moving averages (norm_beta) in the vote kernel's epilogue, one launch per layer call:
    integer state, flips and the optimiser's codes equal dense-fallback's step for step."""
    import trueternary.ops.votes.triton as votes_triton

    launches = []
    launch = votes_triton.matmul_votes_
    monkeypatch.setattr(votes_triton, "matmul_votes_",
                        lambda *a, **k: launches.append(k.get("norm_codes") is not None) or launch(*a, **k))
    ref, o_ref, ker, o_ker = train_pair(RULES["norm-beta-nb16"], backend, steps=3)
    assert launches == [True] * (3 * 2)  # one fused launch per layer call, with the codes
    sr, sk = o_ref.state_dict()["state"], o_ker.state_dict()["state"]
    assert sr.keys() == sk.keys() and sr
    for k in sr:
        assert all(torch.equal(sr[k][n].cpu(), sk[k][n].cpu()) for n in sr[k]), k


def _run_steps(pairs, steps=3, lrs=(3.0, 1.5, 4.5), garbage_lr=None):
    """Train every (model, optimiser) of ``pairs`` on the same exact data; before each step each optimiser's
    groups get that step's lr (and, with a device lr, write it; ``garbage_lr`` then overwrites the groups'
    number so only the device copy is right)."""
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randint(-1, 2, (2, 5, 24), generator=g).float().to(DEVICE)
        c = torch.randint(-1, 2, (2, 5, 18), generator=g).float().to(DEVICE)
        for model, opt in pairs:
            for grp in opt.param_groups:
                grp["lr"] = lrs[step]
            if opt._lr_dev is not None:
                opt.write_device_lr()
                if garbage_lr is not None:
                    for grp in opt.param_groups:
                        grp["lr"] = garbage_lr
            (model(x.clone().requires_grad_()) * c).sum().backward()
            opt.step()
    return [m.state_dict() for m, _ in pairs]


@pytest.mark.parametrize("rule", ["historyless-nb16", "norm-beta-nb16"])
def test_device_lr_gpu_equals_dense_fallback(rule):
    """use_device_lr (CUDA-graphed steps): the kernels read the lr from the device, the dense path uses the same
    tensor: same integer state, moving-average codes included, while the schedule moves the lr."""
    ref = MLP()
    ker = copy.deepcopy(ref)
    o_ref = FlipOptimizer(ref, backend="dense-fallback", seed=3, check_finite=False, **RULES[rule])
    o_ker = gpu_optimizer(ker, "gpu", seed=3, check_finite=False, **RULES[rule])
    for o in (o_ref, o_ker):
        o.use_device_lr(DEVICE)
    sr, sk = _run_steps([(ref, o_ref), (ker, o_ker)])
    assert [n for n in sr if not torch.equal(sr[n], sk[n])] == []
    str_, stk = o_ref.state_dict()["state"], o_ker.state_dict()["state"]
    for k in str_:
        assert all(torch.equal(str_[k][n].cpu(), stk[k][n].cpu()) for n in str_[k]), k


def test_device_lr_is_the_lr_the_votes_use():
    """With a device lr, the groups' number is not read: a gpu run whose groups hold a wrong lr after
    write_device_lr equals a dense-fallback run with the right number (scale votes off: with them the
    float32 device product lr * scale_lr may differ from the host's in the last bit)."""
    kw = dict(RULES["historyless-nb16"], scale_update_interval=0)
    ref = MLP()
    ker = copy.deepcopy(ref)
    o_ref = FlipOptimizer(ref, backend="dense-fallback", seed=3, check_finite=False, **kw)
    o_ker = gpu_optimizer(ker, "gpu", seed=3, check_finite=False, **kw)
    o_ker.use_device_lr(DEVICE)
    before = copy.deepcopy(ref.state_dict())
    sk, = _run_steps([(ker, o_ker)], garbage_lr=1e6)
    sr, = _run_steps([(ref, o_ref)])
    assert [n for n in sr if not torch.equal(sr[n], sk[n])] == []
    assert any(not torch.equal(sr[n], before[n]) for n in sr if n.endswith("T_accum"))


def test_gpu_backend_compiled_trains_like_eager():
    """torch.compile (AOTAutograd, one graph) runs the layers as the trueternary:: ops on the same kernels (Triton
    matmuls, fused votes, the flip kernel): the same integer state as the eager kernel path after every step."""
    torch._dynamo.reset()
    eager = MLP()
    compiled = copy.deepcopy(eager)
    opts = [gpu_optimizer(m, "gpu", seed=3, **RULES["norm-beta-nb16"]) for m in (eager, compiled)]
    loss_of = (lambda m, x, c: (m(x) * c).sum())
    fns = (loss_of, torch.compile(loss_of, backend="aot_eager", fullgraph=True))
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randint(-1, 2, (2, 5, 24), generator=g).float().to(DEVICE)
        c = torch.randint(-1, 2, (2, 5, 18), generator=g).float().to(DEVICE)
        for m, opt, fn in zip((eager, compiled), opts, fns):
            fn(m, x, c).backward()
            opt.step()
        se, sc = eager.state_dict(), compiled.state_dict()
        assert [n for n in se if not torch.equal(se[n], sc[n])] == [], step
    assert int(opts[0].last_flips) == int(opts[1].last_flips)
    assert sum(int((m.weight.T_accum != 0).sum()) for m in (eager.a, eager.b)) > 0  # the rule moved state
