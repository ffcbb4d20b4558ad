"""Fused weight-gradient vote kernels (ops/votes) vs their references and vs FlipOptimizer's dense path.

Bit-exactness is tested on inputs where the arithmetic is exact (small-integer gy/x: the gradient is the
same integer whatever the summation order); random float inputs are tested statistically. Runs the Triton
kernels on CUDA when present, else in the CPU interpreter (TRITON_INTERPRET=1, set below before Triton is
imported; falls back to a subprocess when Triton was imported earlier without it).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before `import triton`

pytest.importorskip("triton")

from trueternary import rng  # noqa: E402
from trueternary.ops.flip import apply_flips_  # noqa: E402
from trueternary.ops.triton_utils import interpreter_ready  # noqa: E402
from trueternary.ops.votes import (  # noqa: E402
    VoteCache,
    cast_matmul_votes,
    encode_vote_cache,
    fused_votes_ready,
    matmul_votes_naive,
    ms_update_naive,
    scale_votes_naive,
    vote_keys,
    vote_prep_naive,
    weight_grad,
)
from trueternary.optim import FlipOptimizer  # noqa: E402
from trueternary.rule import FlipRule, accumulate  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or interpreter_ready()
SMALL = {"BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if request.node.name != "test_in_subprocess" and not IN_PROCESS:
        pytest.skip("Triton was imported before TRITON_INTERPRET was set: covered by test_in_subprocess")


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


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
    """Small-integer gy/x: every partial sum of gy.T @ x is an exact integer in fp32 (and bf16 inputs)."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randint(-3, 4, (M, rows), generator=g).to(DEVICE, dtype)
    x = torch.randint(-3, 4, (M, cols), generator=g).to(DEVICE, dtype)
    return gy, x


# (rows, cols, group_size, M, config): ragged tiles, group sizes that tile-align (8, 16), straddle tiles
# (5: general atomic path) and exceed the tile (64).
CASES = [
    (20, 37, 8, 9, SMALL),
    (33, 48, 16, 17, dict(SMALL, BLOCK_C=32)),
    (33, 48, 5, 17, SMALL),
    (17, 40, 64, 5, SMALL),
    (3, 2, 1, 1, SMALL),
]
CASE_IDS = [f"{r}x{c}-g{g}-M{m}" for r, c, g, m, _ in CASES]
VOTE_MODES = [("stochastic", 0.0), ("stochastic", 0.375), ("sign", 0.0)]
VOTE_IDS = ["stoch", "stoch-decay", "sign"]


@pytest.mark.parametrize("rows,cols,gs,M,cfg", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("vote,decay", VOTE_MODES, ids=VOTE_IDS)
def test_matmul_votes_bit_exact(rows, cols, gs, M, cfg, vote, decay):
    w = random_weight(rows, cols, gs)
    A0 = w.T_accum.clone()
    gy, x = int_inputs(M, rows, cols)
    s = torch.tensor(-0.3, device=DEVICE)  # any s: with an exact gradient every op rounds identically
    key = rng.stream_key(7, 3, 11).to(DEVICE)
    sumsq = torch.zeros((), device=DEVICE)
    bad = torch.zeros((), device=DEVICE)
    gE = torch.zeros(rows, w.n_groups, device=DEVICE)
    kernels().matmul_votes_(gy, x, w, s, key, vote=vote, vote_clip=3, decay=decay, sumsq=sumsq, gE=gE, bad=bad,
                            config=cfg)
    v, ref_sumsq, ref_gE, _ = matmul_votes_naive(gy, x, w, s, key, vote=vote, vote_clip=3, decay=decay,
                                                 scale_grad=True)
    assert torch.equal(w.T_accum, accumulate(A0, v))
    assert torch.equal(gE, ref_gE)
    assert sumsq.item() == ref_sumsq.item()
    assert bad.item() == 0
    assert (v != 0).any()


def test_matmul_votes_aligned_scale_grad_writes_every_group():
    """With tile-aligned groups gE is written by plain stores: a NaN-poisoned buffer must be fully overwritten."""
    w = random_weight(20, 37, 8)
    gy, x = int_inputs(9, 20, 37)
    gE = torch.full((20, w.n_groups), float("nan"), device=DEVICE)
    s, key = torch.tensor(0.5, device=DEVICE), rng.stream_key(1, 0, 0).to(DEVICE)
    kernels().matmul_votes_(gy, x, w, s, key, vote="stochastic", vote_clip=8, gE=gE, config=SMALL)
    assert torch.equal(gE, matmul_votes_naive(gy, x, w, s, key, vote="stochastic", vote_clip=8, scale_grad=True)[2])


def test_matmul_votes_strided_bf16_inputs():
    """Non-contiguous gy (a transposed view) and bf16 operands give the same integer state."""
    w = random_weight(20, 24, 8)
    A0 = w.T_accum.clone()
    gy_t, x = int_inputs(19, 20, 24, dtype=torch.bfloat16)
    gy = gy_t.t().contiguous().t()  # (M, rows) with strides (1, M)
    assert not gy.is_contiguous()
    s, key = torch.tensor(1.25, device=DEVICE), rng.stream_key(2, 4, 6).to(DEVICE)
    kernels().matmul_votes_(gy, x, w, s, key, vote="stochastic", vote_clip=8, config=SMALL)
    v = matmul_votes_naive(gy, x, w, s, key, vote="stochastic", vote_clip=8)[0]
    assert torch.equal(w.T_accum, accumulate(A0, v))


def test_matmul_votes_random_inputs_agree_statistically():
    """Float gradients: the kernel's fp32 sum order differs from torch's, so a vote may differ by 1 where
    g*s + u lies within rounding of an integer; everything else (and the histogram) agrees."""
    w = random_weight(40, 45, 16)
    A0 = w.T_accum.clone()
    g = torch.Generator().manual_seed(3)
    gy = torch.randn(33, 40, generator=g).to(DEVICE)
    x = torch.randn(33, 45, generator=g).to(DEVICE)
    s, key = torch.tensor(-0.7, device=DEVICE), rng.stream_key(0, 1, 2).to(DEVICE)
    kernels().matmul_votes_(gy, x, w, s, key, vote="stochastic", vote_clip=8, decay=0.1,
                            config=dict(SMALL, BLOCK_C=32))
    v = matmul_votes_naive(gy, x, w, s, key, vote="stochastic", vote_clip=8, decay=0.1)[0]
    diff = (w.T_accum.int() - accumulate(A0, v).int()).abs()
    assert diff.max() <= 1
    assert diff.float().mean() <= 0.01
    kv = w.T_accum.int() - A0.int()  # kernel votes (no saturation at this A0 for most entries)
    unsat = (A0.abs() < 100)
    assert abs(kv[unsat].float().mean() - v.int()[unsat].float().mean()) < 0.01
    # stochastic rounding is unbiased: E[v] = s*g - decay*T where |s*g| stays inside the clip
    gW = weight_grad(gy, x)
    target = (gW * s - 0.1 * w.trits().float())[unsat & (gW.abs() * 0.7 < 7)]
    assert abs(v.float()[unsat & (gW.abs() * 0.7 < 7)].mean() - target.mean()) < 0.1


def test_nonfinite_tiles_are_zeroed_and_counted():
    w = random_weight(40, 37, 8)
    A0 = w.T_accum.clone()
    gy, x = int_inputs(9, 40, 37)
    gy[4, 21] = float("nan")  # gW row 21: tile row 1 of 3 (16-row tiles), all 3 column tiles
    bad = torch.zeros((), device=DEVICE)
    sumsq = torch.zeros((), device=DEVICE)
    s, key = torch.tensor(0.5, device=DEVICE), rng.stream_key(0, 0, 1).to(DEVICE)
    kernels().matmul_votes_(gy, x, w, s, key, vote="stochastic", vote_clip=8, decay=0.25, sumsq=sumsq, bad=bad,
                            config=SMALL)
    v, ref_sumsq, _, n_bad = matmul_votes_naive(gy, x, w, s, key, vote="stochastic", vote_clip=8, decay=0.25,
                                                tile=(16, 16))
    assert bad.item() == n_bad.item() == 3
    assert torch.equal(w.T_accum, accumulate(A0, v))
    assert sumsq.item() == ref_sumsq.item() and torch.isfinite(sumsq)


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
    s, key = torch.tensor(0.5, device=DEVICE), rng.stream_key(0, 0, 3).to(DEVICE)
    kernels().matmul_votes_(gy, x, w, s, key, vote=vote, vote_clip=vote_clip, cache=cache,
                            config=dict(SMALL, BLOCK_C=32 if bits == 2 else 16))
    v = matmul_votes_naive(gy, x, w, s, key, vote=vote, vote_clip=vote_clip)[0]
    assert torch.equal(cache.buf, encode_vote_cache(v, bits))
    assert torch.equal(w.T_accum, A0)


@pytest.mark.parametrize("vote", ["stochastic", "sign"])
def test_scale_votes_bit_exact(vote):
    g = torch.Generator().manual_seed(5)
    gE = torch.randn(13, 7, generator=g).to(DEVICE) * 4
    E_accum = torch.randint(-127, 128, (13, 7), generator=g, dtype=torch.int8).to(DEVICE)
    ref_EA, ref_sumsq = scale_votes_naive(gE, E_accum, torch.tensor(0.8, device=DEVICE),
                                          rng.stream_key(0, 1, 5).to(DEVICE), vote=vote, vote_clip=4)
    sumsq = torch.zeros((), device=DEVICE)
    kernels().scale_votes_(gE, E_accum, torch.tensor(0.8, device=DEVICE), rng.stream_key(0, 1, 5).to(DEVICE),
                           vote=vote, vote_clip=4, sumsq=sumsq, block=32)
    assert torch.equal(E_accum, ref_EA)
    assert torch.allclose(sumsq, ref_sumsq, rtol=1e-6)


def ieee_vote_prep(ms: torch.Tensor, lr: float, scale_lr: float, eps: float) -> torch.Tensor:
    """rule.vote_multiplier's op sequence in correctly rounded float32 (numpy). PyTorch's CPU sqrt is not
    correctly rounded (1 ulp off on some inputs); its CUDA sqrt and the kernel's sqrt_rn are."""
    import numpy as np

    m = ms.cpu().numpy().astype(np.float32)
    with np.errstate(invalid="ignore"):
        r = np.float32(1.0) / np.sqrt(m + np.float32(eps))
    s = r * np.array([-lr, -scale_lr], dtype=np.float32)
    return torch.from_numpy(np.where(m <= 0, np.float32(0.0), s).astype(np.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
def test_vote_prep_and_ms_update_bit_exact():
    """s = reciprocal(sqrt(ms + eps)) * -lr as rule.vote_multiplier; ms update as rule.update_grad_ms."""
    g = torch.Generator().manual_seed(9)
    for ms_vals in ([3.7e-5, 0.91], [12345.6, 1e-30], [-1.0, 2.5], [0.0, -1.0], [0.5, 0.0]):
        ms = torch.tensor(ms_vals, device=DEVICE)
        for lr, scale_lr in ((0.37, 0.25), (3.0, 1e-3)):
            s = kernels().vote_prep(ms, lr, scale_lr, 1e-30)
            ref = (vote_prep_naive if DEVICE == "cuda" else ieee_vote_prep)(ms, lr, scale_lr, 1e-30)
            assert torch.equal(s, ref), (ms_vals, lr)
            assert torch.allclose(s, vote_prep_naive(ms, lr, scale_lr, 1e-30), rtol=1e-6, atol=0)
        sums = torch.rand(2, generator=g).to(DEVICE) * 1000
        scratch = torch.cat([sums, torch.zeros(2, device=DEVICE)])
        new = ms.clone()
        kernels().ms_update_(new, scratch, 1000, 37, 0.95, update_w=True, update_e=True)
        ref = torch.stack([ms_update_naive(ms[0], sums[0], 1000, 0.95), ms_update_naive(ms[1], sums[1], 37, 0.95)])
        assert torch.equal(new, ref), ms_vals
        only_w = ms.clone()
        kernels().ms_update_(only_w, scratch, 1000, 37, 0.95, update_w=True, update_e=False)
        assert torch.equal(only_w, torch.stack([ref[0], ms[1]]))


# ------------------------------------------------------------------ the composite vs FlipOptimizer


RULES = {
    "default": {},
    "decay-interval2-clip3": {"decay": 0.3, "scale_update_interval": 2, "vote_clip": 3, "lr": 2.0},
    "seed-naive": FlipRule.naive(accum_threshold=4).to_dict(),
    "sign-T-stochastic-E": {"vote": "sign", "scale_vote": "stochastic", "accum_threshold": 5},
    "leak3-noclip": {"leak": 3, "clip_at_bounds": False, "accum_threshold": 6},
}


def run_pair(rule: dict, rows=20, cols=36, gs=8, steps=3, calls_per_step=1, use_cache=False):
    """Train two copies of one weight for a few steps on the same integer gradients: ``ref`` through
    FlipOptimizer's dense-fallback path, ``w`` through the fused votes + flip kernels. Returns both."""
    ref = random_weight(rows, cols, gs, seed=1)
    w = copy.deepcopy(ref)
    opt = FlipOptimizer(ref, backend="dense-fallback", seed=5, **rule)
    group = opt.param_groups[0]
    cache = VoteCache.for_weight(w, group["vote"], group["vote_clip"]) if use_cache else None
    nonfinite = torch.zeros((), dtype=torch.int32, device=DEVICE)
    interval = group["scale_update_interval"]
    for step in range(steps):
        scale_step = bool(interval) and step % interval == 0
        for call in range(calls_per_step):
            gy, x = int_inputs(7, rows, cols, seed=100 * step + call)
            opt.cast_votes(ref, weight_grad(gy, x), ref.trits())
            if fused_votes_ready(w, group, scale_step):
                keys = vote_keys(opt.seed, w.stream, step * 1024 + call, DEVICE)
                cast_matmul_votes(w, gy, x, group, keys, scale_step=scale_step, nonfinite=nonfinite, cache=cache,
                                  config=SMALL)
            else:  # first gradient of a vote_ms slot: the dense path bootstraps the running mean square
                assert step == 0 and call == 0
                w_opt = FlipOptimizer(w, backend="dense-fallback", seed=5, **rule)
                w_opt.cast_votes(w, weight_grad(gy, x), w.trits())
        opt.step()
        scale_thr = group["scale_threshold"] if interval else None
        apply_flips_(w, group["accum_threshold"], group["clip_at_bounds"], scale_thr, cache=cache, leak=group["leak"])
        for name in ("T_packed", "T_accum", "E", "E_accum", "vote_ms"):
            assert torch.equal(getattr(w, name), getattr(ref, name)), (step, name)
    assert nonfinite.item() == 0
    return w, ref, opt


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_fused_training_steps_match_dense_fallback(rule):
    w, ref, opt = run_pair(RULES[rule])
    assert opt.last_flips.item() > 0 or (ref.T_accum != 0).any()  # the rule really moved state


@pytest.mark.parametrize("rule", ["default", "seed-naive"])
def test_signcache_matches_dense_fallback_with_two_calls_per_step(rule):
    """gpu-signcache: the second call of a step flushes the pending cache, so saturation is sequential."""
    run_pair(RULES[rule], calls_per_step=2, use_cache=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_composite_nonfinite_counts_once_and_empty_batch_is_noop():
    w = random_weight(20, 36, 8)
    opt = FlipOptimizer(copy.deepcopy(w), backend="dense-fallback")
    group = opt.param_groups[0]
    w.vote_ms.fill_(1.0)
    gy, x = int_inputs(5, 20, 36)
    gy[0, 3] = float("inf")
    nonfinite = torch.zeros((), dtype=torch.int32, device=DEVICE)
    cast_matmul_votes(w, gy, x, group, (1, 2), scale_step=True, nonfinite=nonfinite, config=SMALL)
    assert nonfinite.item() == 1
    assert torch.isfinite(w.vote_ms).all()
    before = copy.deepcopy(w)
    cast_matmul_votes(w, gy[:0], x[:0], group, (1, 2), scale_step=True, nonfinite=nonfinite, config=SMALL)
    for name in ("T_accum", "E_accum", "vote_ms"):
        assert torch.equal(getattr(w, name), getattr(before, name))


def test_fused_votes_ready():
    w = random_weight(4, 6, 2)
    w.vote_ms.fill_(1.0)
    assert not fused_votes_ready(w, FlipRule(normalize="factored").to_dict(), scale_step=True)
    with pytest.raises(ValueError, match="factored"):
        cast_matmul_votes(w, *int_inputs(3, 4, 6), FlipRule(normalize="factored").to_dict(), (0, 0), scale_step=True)
    w.vote_ms.fill_(-1.0)
    rule = FlipRule().to_dict()
    assert not fused_votes_ready(w, rule, scale_step=True)
    w.vote_ms[0] = 0.0  # <= 0: not seen yet
    assert not fused_votes_ready(w, rule, scale_step=False)
    w.vote_ms[0] = 1.0
    assert fused_votes_ready(w, rule, scale_step=False)
    assert not fused_votes_ready(w, rule, scale_step=True)
    assert fused_votes_ready(w, FlipRule.naive().to_dict(), scale_step=True)  # sign votes need no vote_ms
