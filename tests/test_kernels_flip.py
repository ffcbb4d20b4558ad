"""Flip/update kernel (ops/flip) vs its reference rule.apply_flips + pack_trits: bit-exact integer state.

Runs the Triton kernel on CUDA when present, else in Triton's CPU interpreter (TRITON_INTERPRET=1, set
below before Triton is imported; if Triton was imported earlier in this process without it, the
kernel tests run in a subprocess instead: see ``test_in_subprocess``).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before `import triton`

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parent))

from _kernel_env import interpreter_fallback  # noqa: E402
from trueternary import packing  # noqa: E402
from trueternary.ops.flip import apply_flips_, apply_flips_naive_, flush_vote_cache_  # noqa: E402
from trueternary.ops.triton_utils import interpreter_ready  # noqa: E402
from trueternary.ops.votes import VoteCache, decode_vote_cache, encode_vote_cache  # noqa: E402
from trueternary.rule import accumulate  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or interpreter_ready()
STATE = ("T_packed", "T_accum", "E", "E_accum")


_kernels_runnable, test_in_subprocess = interpreter_fallback(__file__, IN_PROCESS)


def random_weight(rows, cols, group_size=8, accum_range=127, e_range=127):
    w = TernaryScaleTensor(rows, cols, group_size, device=DEVICE)
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w.set_trits(torch.randint(-1, 2, (rows, cols), generator=g))
    w.T_accum.copy_(torch.randint(-accum_range, accum_range + 1, (rows, cols), generator=g, dtype=torch.int8))
    w.E.copy_(torch.randint(-e_range, e_range + 1, w.E.shape, generator=g, dtype=torch.int8))
    w.E_accum.copy_(torch.randint(-127, 128, w.E.shape, generator=g, dtype=torch.int8))
    return w


def assert_same_state(a, b):
    for name in STATE:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


SHAPES = [(1, 1), (3, 5), (7, 11), (13, 17), (64, 64), (9, 301)]  # numel % 5 != 0, single byte, >1 program


@pytest.mark.parametrize("rows,cols", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("threshold,scale_threshold", [(20, 30), (1, 127), (127, None)],
                         ids=["thr20-s30", "thr1-s127", "thr127-noscale"])
def test_flips_bit_exact(rows, cols, clip, threshold, scale_threshold):
    w = random_weight(rows, cols)
    ref = copy.deepcopy(w)
    counts = apply_flips_(w, threshold, clip, scale_threshold)
    ref_counts = apply_flips_naive_(ref, threshold, clip, scale_threshold)
    assert_same_state(w, ref)
    assert counts.tolist() == ref_counts.tolist()
    if threshold == 1 and rows * cols > 10:  # most accumulators are past +-1: trits really move
        assert counts[0] > 0
    packing.check_packed(w.T_packed, rows * cols)  # no byte > 242, padding digits untouched


@pytest.mark.parametrize("leak", [1, 3, 7])
def test_leak_then_flip_bit_exact(leak):
    """rule.leak (A -= sign(A) * (|A| >> leak)) applied before the flips, as FlipOptimizer.step does."""
    w = random_weight(11, 13)
    ref = copy.deepcopy(w)
    counts = apply_flips_(w, 40, True, 30, leak=leak)
    ref_counts = apply_flips_naive_(ref, 40, True, 30, leak=leak)
    assert_same_state(w, ref)
    assert counts.tolist() == ref_counts.tolist()


@pytest.mark.parametrize("reset", [1, 8, 19])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_flip_reset_bit_exact(reset, clip):
    """rule.flip_reset: a moved trit's T_accum restarts at -reset (up) / +reset (down), kernel = reference."""
    w = random_weight(9, 301)
    ref, T0 = copy.deepcopy(w), w.trits().clone()
    counts = apply_flips_(w, 20, clip, 30, reset=reset)
    ref_counts = apply_flips_naive_(ref, 20, clip, 30, reset=reset)
    assert_same_state(w, ref)
    assert counts.tolist() == ref_counts.tolist() and counts[0] > 0
    T1 = w.trits()
    assert (w.T_accum[T1 > T0] == -reset).all() and (w.T_accum[T1 < T0] == reset).all()


def test_flips_at_bounds_and_counts_accumulate():
    """Saturated trits/scales do not move; counts add up across weights sharing one buffer."""
    w = random_weight(6, 10)
    w.set_trits(torch.ones(6, 10))
    w.T_accum.fill_(127)  # all want to go up, none can
    w.E.fill_(127)
    w.E_accum.fill_(100)
    w2 = random_weight(5, 7)
    ref, ref2 = copy.deepcopy(w), copy.deepcopy(w2)
    counts = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    apply_flips_(w, 32, True, 32, counts)
    apply_flips_(w2, 32, True, 32, counts)
    c1 = apply_flips_naive_(ref, 32, True, 32)
    c2 = apply_flips_naive_(ref2, 32, True, 32)
    assert_same_state(w, ref)
    assert_same_state(w2, ref2)
    assert c1.tolist() == [0, 0]
    assert counts.tolist() == (c1 + c2).tolist()
    assert torch.equal(w.T_accum, torch.full_like(w.T_accum, 32))  # clip_at_bounds


def test_padding_trits_untouched():
    """The last byte's padding digits (past numel) stay 0-trits even when T_accum beyond numel is garbage."""
    w = random_weight(3, 4)  # 12 trits: last byte holds 2 real + 3 padding digits
    apply_flips_(w, 1, False, None)
    last = int(w.T_packed[-1])
    assert last // 9 == 13  # digits 2..4 are 1 (0-trits): 1*9 + 1*27 + 1*81 = 117 = 13*9


@pytest.mark.parametrize("vote,vote_clip,cols,bits", [("sign", 1, 12, 2), ("stochastic", 7, 10, 4),
                                                      ("stochastic", 8, 12, 8), ("sign", 1, 11, 8)],
                         ids=["bits2", "bits4", "bits8", "bits8-odd-cols"])
def test_cache_accumulate_flip_bit_exact(vote, vote_clip, cols, bits):
    """gpu-signcache step: cached votes are added (saturating) then flipped, in one pass."""
    w = random_weight(9, cols, accum_range=126)
    w.T_accum[0, :4] = torch.tensor([127, -127, 120, -120], dtype=torch.int8)  # saturation
    cache = VoteCache.for_weight(w, vote, vote_clip)
    assert cache.bits == bits
    lim = 1 if vote == "sign" else vote_clip
    g = torch.Generator().manual_seed(cols)
    votes = torch.randint(-lim, lim + 1, (9, cols), generator=g, dtype=torch.int8).to(DEVICE)
    votes[0, :4] = torch.tensor([lim, -lim, lim, -lim], dtype=torch.int8)
    cache.buf.copy_(encode_vote_cache(votes, cache.bits))
    assert torch.equal(decode_vote_cache(cache.buf, cache.bits, cache.numel), votes.reshape(-1))
    cache.pending = True
    ref, ref_cache = copy.deepcopy(w), copy.deepcopy(cache)
    counts = apply_flips_(w, 20, True, 30, cache=cache)
    ref_counts = apply_flips_naive_(ref, 20, True, 30, cache=ref_cache)
    assert_same_state(w, ref)
    assert counts.tolist() == ref_counts.tolist()
    assert not cache.pending and not ref_cache.pending
    # a second step without new votes is a plain flip: the consumed cache is not applied again
    before = copy.deepcopy(w)
    apply_flips_(w, 20, True, 30, cache=cache)
    apply_flips_naive_(before, 20, True, 30)
    assert_same_state(w, before)


def test_flush_is_saturating_accumulate_only():
    w = random_weight(8, 12)
    cache = VoteCache.for_weight(w, "sign", 1)
    votes = torch.randint(-1, 2, (8, 12), dtype=torch.int8).to(DEVICE)
    cache.buf.copy_(encode_vote_cache(votes, cache.bits))
    cache.pending = True
    before = copy.deepcopy(w)
    flush_vote_cache_(w, cache)
    assert not cache.pending
    assert torch.equal(w.T_accum, accumulate(before.T_accum, votes))
    for name in ("T_packed", "E", "E_accum"):
        assert torch.equal(getattr(w, name), getattr(before, name)), name
