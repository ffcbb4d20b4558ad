"""Tests of the flip rule (rule.py, rng.py) on hand-built cases: saturating accumulation, flips at exactly
+/-threshold one step at a time, resets, clip_at_bounds, vote direction, stochastic votes (expectation,
reproducibility, clip, decay, sparse index), scale flips, FlipRule validation; and the vote direction
through the whole stack (a TernaryLinear with a positive weight gradient walks its trits to -1)."""

from __future__ import annotations

import pytest
import torch

from trueternary import FlipOptimizer, FlipRule, TernaryLinear, rng
from trueternary.rule import (
    FLOAT32_MAX,
    accumulate,
    apply_flips,
    apply_scale_flips,
    block_factored_ms,
    group_sum,
    saturate_sums,
    scale_gradient,
    sign_votes,
    stochastic_votes,
    tensor_ms,
    vote_multiplier,
    vote_scale,
)


def i8(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int8)


# ------------------------------------------------------------------------------------ accumulate
def test_accumulate_saturates_never_wraps():
    assert accumulate(i8(127), i8(5)).tolist() == [127]
    assert accumulate(i8(-127), i8(-5)).tolist() == [-127]
    assert accumulate(i8(100, -100, 120), i8(100, -100, -8)).tolist() == [127, -127, 112]
    assert accumulate(i8(127), i8(127)).tolist() == [127]
    assert accumulate(i8(-127), i8(-127)).tolist() == [-127]
    assert accumulate(i8(0), i8(0)).dtype == torch.int8


def test_accumulate_exhaustive_against_int64_clamp():
    a = torch.arange(-127, 128, dtype=torch.int8).repeat_interleave(255)
    v = torch.arange(-127, 128, dtype=torch.int8).repeat(255)
    expected = (a.long() + v.long()).clamp(-127, 127)
    got = accumulate(a, v)
    assert got.dtype == torch.int8
    assert torch.equal(got.long(), expected)


# ------------------------------------------------------------------------------------ flips
def test_flip_exactly_at_threshold_and_reset():
    theta = 5
    T = i8(-1, 0, 1, -1, 0, 1, 0, 0)
    A = i8(5, 5, -5, 4, -4, 6, -6, 3)
    T2, A2, n = apply_flips(T, A, theta, clip_at_bounds=False)
    assert T2.tolist() == [0, 1, 0, -1, 0, 1, -1, 0]
    # moved trits reset to 0; unmoved keep their count; +1 with +6 is clamped (cannot go above +1)
    assert A2.tolist() == [0, 0, 0, 4, -4, 6, 0, 3]
    assert int(n) == 4
    assert T2.dtype == A2.dtype == torch.int8


def test_flip_clamped_at_ends_and_clip_at_bounds():
    theta = 4
    T = i8(1, -1, 1, -1)
    A = i8(100, -100, -100, 100)
    T_noclip, A_noclip, n = apply_flips(T, A, theta, clip_at_bounds=False)
    assert T_noclip.tolist() == [1, -1, 0, 0] and int(n) == 2
    assert A_noclip.tolist() == [100, -100, 0, 0]  # saturated trits keep their accumulator ...
    T_clip, A_clip, n = apply_flips(T, A, theta, clip_at_bounds=True)
    assert T_clip.tolist() == [1, -1, 0, 0] and int(n) == 2
    assert A_clip.tolist() == [4, -4, 0, 0]  # ... unless clipped to +/-theta
    # clip also bounds accumulators of trits that did not move
    _, A3, _ = apply_flips(i8(0), i8(3), 2, clip_at_bounds=True)  # flips, resets
    assert A3.tolist() == [0]
    _, A4, n4 = apply_flips(i8(1, 0), i8(50, 1), 2, clip_at_bounds=True)
    assert A4.tolist() == [2, 1] and int(n4) == 0


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_walk_minus1_to_plus1_one_step_at_a_time(clip):
    theta = 3
    T, A = i8(-1), i8(0)
    history = []
    for _ in range(10):  # one +1 vote per step
        A = accumulate(A, i8(1))
        T, A, _ = apply_flips(T, A, theta, clip)
        history.append((int(T), int(A)))
    assert [t for t, _ in history] == [-1, -1, 0, 0, 0, 1, 1, 1, 1, 1]
    assert history[2] == (0, 0) and history[5] == (1, 0)  # reset after each flip
    final_A = history[-1][1]
    assert final_A == (3 if clip else 4)
    # and back down: the accumulator must first cross from final_A to -theta, then -theta again from 0
    steps_down = 0
    while int(T) > -1:
        A = accumulate(A, i8(-1))
        T, A, _ = apply_flips(T, A, theta, clip)
        steps_down += 1
    expected = (final_A + theta) + theta  # 9 steps with clip, 10 without
    assert steps_down == expected


def test_flip_reset_points_the_accumulator_back():
    T = torch.tensor([0, 0, 1, -1, 0], dtype=torch.int8)
    A = torch.tensor([32, -40, -32, 33, 5], dtype=torch.int8)
    T2, A2, n = apply_flips(T, A, 32, clip_at_bounds=True, reset=8)
    assert T2.tolist() == [1, -1, 0, 0, 0] and A2.tolist() == [-8, 8, 8, -8, 5] and int(n) == 4
    # reset 0 is the plain rule
    assert apply_flips(T, A, 32, True, 0)[1].tolist() == [0, 0, 0, 0, 5]


def test_big_accumulator_moves_only_one_step_per_flip():
    T, A, n = apply_flips(i8(-1), i8(127), 1, clip_at_bounds=False)
    assert T.tolist() == [0] and A.tolist() == [0] and int(n) == 1


def test_scale_flips():
    E = i8(0, 0, 5, -3, 127, -127, 2)
    EA = i8(4, -4, 3, -3, 10, -10, 5)
    E2, EA2, n = apply_scale_flips(E, EA, 4)
    assert E2.tolist() == [1, -1, 5, -3, 127, -127, 3]  # clamped at +/-127
    assert EA2.tolist() == [0, 0, 3, -3, 10, -10, 0]
    assert int(n) == 3


# ------------------------------------------------------------------------------------ votes
def test_sign_votes_direction():
    g = torch.tensor([2.5, -0.1, 0.0, 1e-30, -1e30])
    v = sign_votes(g)
    assert v.dtype == torch.int8
    assert v.tolist() == [-1, 1, 0, -1, 1]  # gradient descent: positive gradient votes toward -1


def test_vote_multiplier_and_normalisers():
    s = vote_multiplier(torch.tensor(4.0), 2.0)
    assert s.dtype == torch.float32 and s.item() == -1.0  # -lr / sqrt(ms)
    assert torch.isfinite(vote_multiplier(torch.tensor(0.0), 2.0))  # an all-zero gradient: finite s
    g = torch.tensor([[3.0, -4.0]])
    assert tensor_ms(g).item() == pytest.approx(12.5)
    assert vote_scale(g, 1.0, "tensor", 64).item() == pytest.approx(-1 / 12.5**0.5)


def test_block_factored_ms_hand_built():
    # one 2x2 tile: g**2 = [[1, 4], [9, 16]]: rows 2.5, 12.5; cols 5, 10; tile 7.5
    g = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    ms = block_factored_ms(g, 2)
    assert torch.allclose(ms, torch.tensor([[2.5 * 5, 2.5 * 10], [12.5 * 5, 12.5 * 10]]) / 7.5)
    # tiles are independent: scaling one tile's gradient leaves the other tile's normaliser unchanged
    g = torch.randn(4, 6)
    ms = block_factored_ms(g, 2)
    g2 = g.clone()
    g2[:2, :2] *= 100
    ms2 = block_factored_ms(g2, 2)
    assert torch.equal(ms[2:], ms2[2:]) and torch.equal(ms[:, 2:], ms2[:, 2:])
    assert torch.allclose(ms2[:2, :2], ms[:2, :2] * 1e4, rtol=1e-5)
    # a block at least as large as the matrix is the Adafactor factoring of the whole gradient
    g2 = g.square()
    full = g2.mean(1, keepdim=True) * g2.mean(0, keepdim=True) / g2.mean()
    assert torch.allclose(block_factored_ms(g, 64), full, rtol=1e-6)
    # ragged edge tiles average over their real elements only
    g = torch.randn(5, 3)
    ms = block_factored_ms(g, 4)
    edge = g[4:, :3].square()  # the last row alone forms the edge tile (1 x 3)
    assert torch.allclose(ms[4:], edge.mean(1, keepdim=True) * edge.mean(0, keepdim=True) / edge.mean(), rtol=1e-6)
    # block 1: every element is its own tile -> normalised by its own magnitude (stochastic sign)
    assert torch.allclose(block_factored_ms(g, 1), g.square(), rtol=1e-6)


def test_normalised_votes_are_scale_invariant_per_tile():
    g = torch.randn(70, 130)
    key = rng.stream_key(0, 0, 5)
    a = stochastic_votes(g, vote_scale(g, 4.0, "block_factored", 64), key, 8)
    b = stochastic_votes(g * 1e-3, vote_scale(g * 1e-3, 4.0, "block_factored", 64), key, 8)
    assert (a.int() - b.int()).abs().max() <= 1  # only rounding at integer boundaries can differ


@pytest.mark.parametrize("normalize", ["block_factored", "tensor"])
def test_votes_near_float32_limit_are_scale_invariant_then_saturate_without_nan(normalize):
    """Power-of-two scales up to 2**50 (mean squares near 1e30; r_i * c_j alone would overflow from about 4e9)
    cast the same votes bit for bit; at 2**70 the squares overflow: the means saturate at FLOAT32_MAX, the
    multipliers stay finite and the votes keep the gradient's sign (clipped) or are 0, never NaN."""
    g = torch.randn(70, 130, generator=torch.Generator().manual_seed(0))
    key = rng.stream_key(0, 0, 5)

    def votes(x):
        return stochastic_votes(x, vote_scale(x, 4.0, normalize, 64), key, 8)

    for k in (10, 32, 50):
        assert torch.equal(votes(g * 2.0**k), votes(g)), k
    s = vote_scale(g * 2.0**70, 4.0, normalize, 64)
    assert torch.isfinite(s).all() and (s <= 0).all()
    v = votes(g * 2.0**70)
    assert (v.int() * g.sign().int() <= 0).all() and (v != 0).any()
    ms = block_factored_ms(g * 2.0**70, 64) if normalize == "block_factored" else tensor_ms(g * 2.0**70)
    assert not torch.isnan(ms).any() and (ms <= FLOAT32_MAX).any()


def test_scale_gradient_saturates_overflowed_sums():
    g = torch.tensor([[3e38, 3e38, 1.0, 2.0], [3e38, -3e38, 3e38, -3e38]])
    T = torch.ones(2, 4, dtype=torch.int8)
    assert scale_gradient(g, T, 2).tolist() == [[FLOAT32_MAX, 3.0], [0.0, 0.0]]
    assert scale_gradient(-g, T, 4).tolist()[0] == [-FLOAT32_MAX]
    inf = float("inf")
    assert saturate_sums(torch.tensor([inf, -inf, float("nan"), -1.5])).tolist() == [FLOAT32_MAX, -FLOAT32_MAX, 0, -1.5]


def test_stochastic_votes_bit_reproducible_and_key_dependent():
    g = torch.randn(7, 13)
    s = torch.tensor(-1.7)
    k = rng.stream_key(3, 1, 42)
    a = stochastic_votes(g, s, k, 8)
    b = stochastic_votes(g.clone(), s, rng.stream_key(3, 1, 42), 8)
    assert a.dtype == torch.int8 and a.shape == g.shape
    assert torch.equal(a, b)
    others = [stochastic_votes(g, s, rng.stream_key(*key), 8) for key in ((3, 1, 43), (4, 1, 42), (3, 2, 42))]
    assert all(not torch.equal(a, o) for o in others)


def test_stochastic_votes_are_floor_or_ceil_of_s_times_g():
    g = torch.randn(4000) * 3
    s = torch.tensor(0.7)
    v = stochastic_votes(g, s, rng.stream_key(0, 0, 0), 127).long()
    x = (g * s).double()
    assert ((v == torch.floor(x)) | (v == torch.floor(x) + 1)).all()


@pytest.mark.parametrize("s", [1.0, -1.0, 0.37], ids=["s+1", "s-1", "s0.37"])
def test_stochastic_votes_expectation(s):
    g = torch.tensor([-3.7, -1.25, -0.3, 0.0, 0.25, 0.5, 1.5, 2.9])
    st = torch.tensor(s)
    # over many keys (steps) for each element
    votes = torch.stack([stochastic_votes(g, st, rng.stream_key(11, 0, step), 8) for step in range(3000)]).float()
    torch.testing.assert_close(votes.mean(0), (st * g), atol=0.04, rtol=0)
    # over many elements under one key
    big = g.repeat(5000)
    v1 = stochastic_votes(big, st, rng.stream_key(5, 0, 0), 8).float().view(5000, -1)
    torch.testing.assert_close(v1.mean(0), st * g, atol=0.03, rtol=0)
    assert (stochastic_votes(torch.zeros(100), st, rng.stream_key(0, 0, 0), 8) == 0).all()  # u < 1


def test_stochastic_votes_clip_and_decay():
    g = torch.tensor([100.0, -100.0, 3.0, 0.0, 0.0])
    s = torch.tensor(1.0)
    key = rng.stream_key(0, 0, 0)
    v = stochastic_votes(g, s, key, 2)
    assert v[:2].tolist() == [2, -2]  # vote_clip
    assert v[2].item() == 2
    T = torch.tensor([0, 0, 0, 1, -1], dtype=torch.int8)
    # decay pulls non-zero trits toward 0: x = s*g - decay*T
    vd = stochastic_votes(g, s, key, 8, T=T, decay=3.0)
    assert vd[3].item() == -3 and vd[4].item() == 3
    assert torch.equal(vd[:3], stochastic_votes(g[:3], s, key, 8))


def test_stochastic_votes_sparse_index_matches_dense_positions():
    g = torch.randn(6, 10)
    s = torch.tensor(-2.3)
    key = rng.stream_key(9, 4, 17)
    dense = stochastic_votes(g, s, key, 8)
    rows = torch.tensor([1, 4, 5])
    index = (rows.view(-1, 1) * 10 + torch.arange(10)).reshape(-1)
    sparse = stochastic_votes(g[rows], s, key, 8, index=index)
    assert torch.equal(sparse, dense[rows])


def test_rng_matches_the_documented_formula():
    M = 0xFFFFFFFF

    def mix(x):  # from the rng.py docstring, in plain Python
        x &= M
        x ^= x >> 16
        x = (x * 0x45D9F3B) & M
        x ^= x >> 16
        x = (x * 0x45D9F3B) & M
        return x ^ (x >> 16)

    seed, stream, step = 12345, 6, 789
    key = mix(seed * 0x9E3779B1 + stream * 0x85EBCA77 + step * 0xC2B2AE3D + 1)
    assert rng.stream_key(seed, stream, step).item() == key
    assert rng.stream_key(seed, stream, torch.tensor(step)).item() == key  # device-tensor step, same key
    u = rng.uniform(torch.tensor(key), 50, "cpu")
    expected = torch.tensor([(mix(i ^ key) >> 8) / 2**24 for i in range(50)], dtype=torch.float32)
    assert torch.equal(u, expected)
    assert (u >= 0).all() and (u < 1).all()
    idx = torch.tensor([[3, 49], [0, 7]])
    assert torch.equal(rng.uniform_at(torch.tensor(key), idx), expected[idx])


def test_group_sum_and_scale_gradient_ragged():
    x = torch.arange(14, dtype=torch.float32).view(2, 7)
    assert group_sum(x, 3).tolist() == [[3, 12, 6], [24, 33, 13]]
    assert group_sum(x, 7).tolist() == [[21], [70]]
    assert group_sum(x, 10).tolist() == [[21], [70]]
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    T = torch.tensor([[1, -1, 0], [1, 1, -1]], dtype=torch.int8)
    assert scale_gradient(g, T, 2).tolist() == [[-1.0, 0.0], [-0.5, -4.0]]


# ------------------------------------------------------------------------------------ FlipRule
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vote="bogus"), dict(scale_vote="x"), dict(accum_threshold=0), dict(accum_threshold=128),
        dict(accum_threshold=1.5), dict(accum_threshold=True), dict(scale_threshold=0), dict(vote_clip=0),
        dict(vote_clip=128), dict(scale_update_interval=-1), dict(lr=-1.0), dict(lr=float("nan")),
        dict(lr=float("inf")), dict(scale_lr=-0.1), dict(decay=-1.0), dict(normalize="bogus"), dict(norm_block=0),
        dict(accum_init="latent"), dict(flip_reset=-1), dict(flip_reset=32), dict(flip_reset=4, accum_threshold=4),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_flip_rule_validation(kwargs):
    with pytest.raises(ValueError):
        FlipRule(**kwargs)


def test_flip_rule_dict_round_trip_and_naive():
    r = FlipRule(accum_threshold=12, vote="sign", lr=0.5)
    assert FlipRule.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="unknown"):
        FlipRule.from_dict({**r.to_dict(), "momentum": 0.9})
    n = FlipRule.naive(accum_threshold=8)
    assert n.vote == "sign" and n.scale_vote == "sign" and n.accum_threshold == 8 and not n.clip_at_bounds
    # the seed's rule starts from empty accumulators; the default from the rounding residual
    assert n.init_accum_threshold() is None
    assert FlipRule(accum_threshold=12).init_accum_threshold() == 12
    assert FlipRule(accum_init="zero").init_accum_threshold() is None


# ------------------------------------------------------------------------------------ whole stack
@pytest.mark.parametrize("rule", [FlipRule(), FlipRule.naive()], ids=["default", "naive"])
def test_positive_weight_gradient_walks_trits_to_minus_one(rule):
    """Loss = sum(y) with x > 0 gives dL/dW = sum_b x[b] > 0 for every weight: descent must reach T = -1."""
    lin = TernaryLinear(20, 6, group_size=8)
    T0 = lin.weight.trits().clone()
    assert (T0 == 1).any() and (T0 == 0).any()
    opt = FlipOptimizer(lin, rule=rule, accum_threshold=4, scale_update_interval=0)
    x = torch.rand(16, 20) + 0.1
    for _ in range(40):
        lin(x).sum().backward()
        opt.step()
        T = lin.weight.trits()
        assert (T <= T0).all()  # never moves up
        T0 = T.clone()
    assert (lin.weight.trits() == -1).all()


def test_for_run_ties_the_scale_rate_to_the_run_length():
    # scale_lr = min(0.25, 75 / steps): short runs keep fast scales, long runs slow ones (docs/learning.md)
    assert FlipRule.for_run(150).scale_lr == 0.25
    assert FlipRule.for_run(300).scale_lr == 0.25
    assert FlipRule.for_run(1500).scale_lr == 0.05
    assert FlipRule.for_run(7500).scale_lr == 0.01
    r = FlipRule.for_run(1500, scale_lr=0.3, lr=5.0)  # explicit fields win
    assert (r.scale_lr, r.lr) == (0.3, 5.0)
    assert FlipRule.for_run(1500, decay=0.1).to_dict() == {**FlipRule().to_dict(), "decay": 0.1}
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            FlipRule.for_run(bad)
    with pytest.raises(ValueError, match="unknown"):
        FlipRule.for_run(100, bogus=1)


def test_recipe_hparams_use_the_rule_for_their_run_length():
    from trueternary.recipes import Hparams

    assert Hparams(steps=200).rule == FlipRule.for_run(200)
    assert Hparams(steps=3000).rule.scale_lr == 0.025
    assert Hparams(steps=3000, rule=FlipRule()).rule == FlipRule()  # an explicit rule is kept


# ------------------------------------------------------------------------------------ norm_beta codes
def test_log2_codes_round_trip_and_clamp():
    from trueternary.rule import code_value, log2_code

    x = torch.tensor([1.0, 2.0**1.5, 2.0**-20, 0.0, 3.0])
    c = log2_code(x, 8, -32767, 32767)
    assert c.tolist() == [0, 384, -5120, -32767, round(256 * 1.584962500721156)]
    torch.testing.assert_close(code_value(c[:3], 8), x[:3])
    assert log2_code(torch.tensor([2.0**9, 2.0**-9]), 4, -128, 127).tolist() == [127, -128]
    # stochastic rounding: floor(y + u)
    y = torch.full((4,), 2.0 ** (1 / 32))  # log2 code 0.5 at 1/16 octave
    assert log2_code(y, 4, -128, 127, torch.tensor([0.0, 0.49, 0.51, 0.99])).tolist() == [0, 0, 1, 1]


def _codes_after(stats_seq, beta, shape, block):
    from trueternary.rule import block_factored_stats, ema_block_factored_stats, empty_norm_codes, factored_ms

    codes = empty_norm_codes(shape, block, "cpu")
    out = []
    for i, g in enumerate(stats_seq):
        factors, codes = ema_block_factored_stats(block_factored_stats(g, block), codes, beta, rng.stream_key(3, 0, i))
        out.append(factored_ms(*factors, shape))
    return out, codes


@pytest.mark.parametrize("shape", [(70, 130), (5, 3), (128, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_ema_norm_first_call_is_block_factored_to_code_precision(shape):
    """An empty tile takes the call's statistics: ms = block_factored_ms up to the codes' rounding (tile mean
    1/512 octave, each ratio 1/8 octave with stochastic rounding)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen) * (torch.rand(shape[0], 1, generator=gen) + 0.01) * 1e-3
    (ms,), codes = _codes_after([g], 0.95, shape, 64)
    ref = block_factored_ms(g, 64)
    ratio = torch.log2(ms / ref).abs()
    assert ratio.max() <= 2 / 8 + 1 / 512 + 1e-4
    assert ratio.mean() < 0.1  # stochastic rounding: most codes land near the value
    assert codes["norm_tile"].dtype == torch.int16 and codes["norm_row"].dtype == torch.int8
    assert codes["norm_col"].dtype == torch.int8


def test_ema_norm_moves_one_minus_beta_of_the_way():
    """Constant statistics stay put; a gradient 4x larger (mean square 16x) moves the tile mean by
    (1 - beta) of the difference: m = 1 + 0.1 * 15 = 2.5 times the old one, ratios unchanged."""
    from trueternary.rule import NORM_TILE_EMPTY

    g = torch.ones(8, 8)
    (ms0, ms1, ms2), codes = _codes_after([g, g, 4 * g], 0.9, (8, 8), 8)
    torch.testing.assert_close(ms0, torch.ones(8, 8))
    torch.testing.assert_close(ms1, torch.ones(8, 8))
    torch.testing.assert_close(ms2, torch.full((8, 8), 2.5), rtol=2e-3, atol=0)
    assert (codes["norm_tile"] != NORM_TILE_EMPTY).all()
    assert (codes["norm_row"] == 0).all() and (codes["norm_col"] == 0).all()  # ratios 1: code 0


def test_ema_norm_zero_gradient_is_finite():
    (ms0, ms1), codes = _codes_after([torch.zeros(4, 6), torch.ones(4, 6)], 0.5, (4, 6), 64)
    assert torch.isfinite(ms0).all() and (ms0 >= 0).all()
    torch.testing.assert_close(ms1, torch.full((4, 6), 0.5), rtol=3e-3, atol=0)


def test_norm_beta_validation_and_state_budget():
    from trueternary.rule import empty_norm_codes

    for bad in (-0.1, 1.0, float("nan"), "0.9"):
        with pytest.raises(ValueError, match="norm_beta"):
            FlipRule(norm_beta=bad)
    codes = empty_norm_codes((512, 2048), 128, "cpu")
    per_weight = sum(t.numel() * t.element_size() for t in codes.values()) / (512 * 2048)
    assert per_weight == pytest.approx(2 / 128 + 2 / 128**2)


def test_block_factored_stats_whole_tiles_equal_the_padded_path():
    """Whole tiles skip the padding (constant counts); the values are the padded computation's, bit for bit."""
    from trueternary.rule import block_factored_stats

    g = torch.randn(96, 64, generator=torch.Generator().manual_seed(4))
    fast = block_factored_stats(g, 32)
    padded = block_factored_stats(torch.nn.functional.pad(g, (0, 1)), 32)  # one ragged column: padded path
    ref_row = g.square().view(3, 32, 2, 32).sum(3) / 32.0
    assert torch.equal(fast[0], ref_row)
    assert torch.equal(fast[1], padded[1][:, :2, :])  # the padded path's means of the same columns
    assert torch.equal(fast[2], g.square().view(3, 32, 2, 32).sum((1, 3)) / 1024.0)


def test_vote_width_scale():
    from trueternary.rule import vote_width_scale

    assert vote_width_scale(1024, 512) == 1.0 and vote_width_scale(1024, 1024) == 1.0
    assert vote_width_scale(1024, 4096) == 0.5 and vote_width_scale(1024, 16384) == 0.25
    assert vote_width_scale(0, 16384) == 1.0 and vote_width_scale(1024, None) == 1.0
    assert FlipRule().width_ref == 1024 and FlipRule.naive().width_ref == 0  # the seed's rule stays the seed's
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="width_ref"):
            FlipRule(width_ref=bad)


def test_vote_width_scale_on_small_batches():
    """A wide layer in a run of fewer than tokens_ref tokens a step votes at sqrt(batch_tokens / tokens_ref) more;
    a narrow one, a run at or above tokens_ref, or an unknown batch (0) get nothing extra."""
    from trueternary.rule import vote_width_scale

    assert vote_width_scale(1024, 4096, 512, 2048) == 0.25  # sqrt(1/4) width x sqrt(1/4) batch
    assert vote_width_scale(1024, 4096, 2048, 2048) == 0.5 and vote_width_scale(1024, 4096, 8192, 2048) == 0.5
    assert vote_width_scale(1024, 4096, 0, 2048) == 0.5 and vote_width_scale(1024, 4096, 512, 0) == 0.5
    assert vote_width_scale(1024, 1024, 1, 2048) == 1.0 and vote_width_scale(1024, None, 1, 2048) == 1.0
    assert (FlipRule().tokens_ref, FlipRule().batch_tokens, FlipRule.naive().tokens_ref) == (2048, 0, 0)
    for name in ("tokens_ref", "batch_tokens"):
        for bad in (-1, 2.0, True):
            with pytest.raises(ValueError, match=name):
                FlipRule(**{name: bad})
