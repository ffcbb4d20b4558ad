"""Tests of TernaryScaleTensor: buffers on ragged group sizes, dense view, absmean init, byte accounting,
releasing training state, and validation of constructor arguments and loaded state."""

from __future__ import annotations

import math

import pytest
import torch

from trueternary import DEFAULT_GROUP_SIZE, TernaryLinear, TernaryScaleTensor, ternary_weights
from trueternary.packing import packed_numel, unpack_trits

# (rows, cols, group_size): ragged groups (cols % group_size != 0), one group, group of 1, group > cols
SHAPES = [(4, 70, 64), (3, 5, 2), (1, 1, 1), (7, 130, 64), (5, 64, 64), (2, 9, 4), (6, 10, 16)]
SHAPE_IDS = [f"{r}x{c}-g{g}" for r, c, g in SHAPES]


def random_state(t: TernaryScaleTensor, seed: int = 0) -> None:
    """Fill every buffer with random valid values, so round trips cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    t.set_trits(torch.randint(-1, 2, (t.rows, t.cols), generator=g, dtype=torch.int8))
    t.E.copy_(torch.randint(-20, 5, t.E.shape, generator=g, dtype=torch.int8))
    t.E_accum.copy_(torch.randint(-127, 128, t.E_accum.shape, generator=g, dtype=torch.int8))
    t.T_accum.copy_(torch.randint(-127, 128, t.T_accum.shape, generator=g, dtype=torch.int8))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("rows,cols,gs", SHAPES, ids=SHAPE_IDS)
def test_buffers_dtypes_shapes(rows, cols, gs):
    t = TernaryScaleTensor(rows, cols, gs)
    n_groups = math.ceil(cols / gs)
    assert t.n_groups == n_groups
    expected = {
        "T_packed": (torch.uint8, (math.ceil(rows * cols / 5),)),
        "E": (torch.int8, (rows, n_groups)),
        "E_accum": (torch.int8, (rows, n_groups)),
        "T_accum": (torch.int8, (rows, cols)),
    }
    got = {k: (v.dtype, tuple(v.shape)) for k, v in t.state_dict().items()}
    assert got == expected
    assert dict(t.named_buffers()).keys() == expected.keys()
    assert list(t.parameters()) == []  # strict: integer buffers only
    assert t.shape == (rows, cols) and t.numel() == rows * cols
    assert (t.E_accum == 0).all() and (t.T_accum == 0).all()
    assert t.trits().shape == (rows, cols) and t.trits().dtype == torch.int8


@pytest.mark.parametrize("rows,cols,gs", SHAPES, ids=SHAPE_IDS)
def test_dense_equals_trits_times_pow2_per_group(rows, cols, gs, dense_reference):
    t = TernaryScaleTensor(rows, cols, gs, init=False)
    random_state(t)
    ref = dense_reference(t)
    # spelled out once more with an explicit loop over groups
    T = t.trits().double()
    loop = torch.empty(rows, cols, dtype=torch.float64)
    for gi in range(t.n_groups):
        sl = slice(gi * gs, min((gi + 1) * gs, cols))
        loop[:, sl] = T[:, sl] * (2.0 ** t.E[:, gi].double()).unsqueeze(1)
    assert torch.equal(ref, loop)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        d = t.dense(dtype)
        assert d.dtype == dtype and d.shape == (rows, cols)
        assert torch.equal(d.double(), ref), dtype  # powers of two times {-1,0,1}: exact


def test_dense_extreme_exponents_exact_in_float32():
    t = TernaryScaleTensor(2, 3, 2, init=False)
    t.set_trits(torch.tensor([[1, -1, 1], [-1, 0, 1]], dtype=torch.int8))
    t.E.copy_(torch.tensor([[127, -126], [-127, 0]], dtype=torch.int8))
    d = t.dense(torch.float32)
    assert torch.isfinite(d).all()
    assert d[0, 0].item() == 2.0**127 and d[0, 1].item() == -(2.0**127) and d[0, 2].item() == 2.0**-126
    assert d[1, 0].item() == -(2.0**-127) and d[1, 2].item() == 1.0


@pytest.mark.parametrize("rows,cols,gs", SHAPES, ids=SHAPE_IDS)
def test_from_float_absmean(rows, cols, gs):
    w = torch.randn(rows, cols, dtype=torch.float64) * 0.05
    t = TernaryScaleTensor.from_float(w, gs)
    # BitNet b1.58 round-clip against each group's absmean, and E = round(log2(group absmean))
    T_ref = torch.empty(rows, cols, dtype=torch.int8)
    E_ref = torch.empty(rows, t.n_groups, dtype=torch.int8)
    for gi in range(t.n_groups):
        sl = slice(gi * gs, min((gi + 1) * gs, cols))
        m = w[:, sl].abs().mean(dim=1, keepdim=True)
        T_ref[:, sl] = torch.clamp(torch.round(w[:, sl] / m), -1, 1).to(torch.int8)
        E_ref[:, gi] = torch.round(torch.log2(m.squeeze(1))).to(torch.int8)
    assert torch.equal(t.trits(), T_ref)
    assert torch.equal(t.E, E_ref)
    assert (t.T_accum == 0).all() and (t.E_accum == 0).all()


def test_from_float_all_zero_group_and_dtypes():
    w = torch.randn(3, 8)
    w[1, :4] = 0  # one all-zero group: trits 0, E finite (the smallest scale in the tensor)
    t = TernaryScaleTensor.from_float(w, 4)
    assert (t.trits()[1, :4] == 0).all()
    assert int(t.E[1, 0]) == int(t.E.min())
    zero = TernaryScaleTensor.from_float(torch.zeros(2, 5), 4)
    assert (zero.trits() == 0).all() and (zero.E == 0).all()
    # float16/bfloat16/float64 inputs give the same result as float32 when the values are representable
    w16 = torch.randn(4, 10).to(torch.bfloat16)
    a = TernaryScaleTensor.from_float(w16, 4)
    b = TernaryScaleTensor.from_float(w16.float(), 4)
    assert torch.equal(a.T_packed, b.T_packed) and torch.equal(a.E, b.E)


@pytest.mark.parametrize(
    "w",
    [torch.randn(6), torch.randn(2, 3, 4), torch.ones(3, 4, dtype=torch.int64), [[1.0, 2.0]]],
    ids=["1-D", "3-D", "int64", "list"],
)
def test_from_float_rejects_bad_input(w):
    with pytest.raises(ValueError):
        TernaryScaleTensor.from_float(w)


def test_from_float_rejects_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(3, 4)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            TernaryScaleTensor.from_float(w)


def test_random_init_is_a_sensible_ternarisation():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = TernaryScaleTensor(64, 256, 64, generator=g1)
    b = TernaryScaleTensor(64, 256, 64, generator=g2)
    assert torch.equal(a.T_packed, b.T_packed) and torch.equal(a.E, b.E)  # same generator, same weight
    T = a.trits()
    zeros = (T == 0).float().mean().item()
    # absmean of N(0, s^2) is s*sqrt(2/pi); |w| < absmean/2 <=> |z| < 0.399 -> about 31% zeros
    assert 0.25 < zeros < 0.37, zeros
    assert abs((T == 1).float().mean().item() - (T == -1).float().mean().item()) < 0.03
    expected_E = round(math.log2(math.sqrt(2 / math.pi) / math.sqrt(256)))  # default std 1/sqrt(cols)
    assert (a.E - expected_E).abs().max().item() <= 1
    c = TernaryScaleTensor(8, 64, 64, init_std=1.0)
    assert (c.E == 0).float().mean().item() > 0.5  # round(log2(0.8)) == 0


@pytest.mark.parametrize("rows,cols,gs", SHAPES, ids=SHAPE_IDS)
def test_training_and_inference_bytes_exact(rows, cols, gs):
    t = TernaryScaleTensor(rows, cols, gs)
    n_groups = math.ceil(cols / gs)
    packed = math.ceil(rows * cols / 5)
    # T_packed + E + E_accum + T_accum: integers only
    assert t.training_state_bytes() == packed + rows * n_groups + rows * n_groups + rows * cols
    assert t.inference_bytes() == packed + rows * n_groups


@pytest.mark.parametrize("gs", [16, 64, 128], ids=lambda g: f"g{g}")
def test_training_bytes_per_weight(gs):
    rows, cols = 64, 640
    t = TernaryScaleTensor(rows, cols, gs)
    per_weight = t.training_state_bytes() / (rows * cols)
    assert per_weight == pytest.approx(1 / 5 + 1 + 2 / gs, rel=1e-3)
    assert t.inference_bytes() / (rows * cols) == pytest.approx(1 / 5 + 1 / gs, rel=1e-3)
    assert DEFAULT_GROUP_SIZE == 64


def test_release_training_state_keeps_the_weight():
    lin = TernaryLinear(70, 5, group_size=64)
    w = lin.weight
    dense_before = w.dense().clone()
    x = torch.randn(3, 70)
    y_before = lin(x).detach()
    w.release_training_state()
    assert w.inference_only
    assert w.T_accum.numel() == w.E_accum.numel() == 0
    assert w.training_state_bytes() == w.inference_bytes() == packed_numel(350) + 5 * 2
    assert torch.equal(w.dense(), dense_before)
    assert torch.equal(lin(x).detach(), y_before)
    with torch.no_grad():
        assert torch.equal(lin(x), y_before)


# ------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("rows,cols,gs", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_state_dict_round_trip(rows, cols, gs):
    a = TernaryScaleTensor(rows, cols, gs, init=False)
    random_state(a, seed=1)
    b = TernaryScaleTensor(rows, cols, gs)
    b.load_state_dict(a.state_dict())
    assert_same_state(snapshot(a), snapshot(b))
    assert torch.equal(a.dense(), b.dense())


def _corrupt(sd: dict, key: str, value) -> dict:
    sd = dict(sd)
    sd[key] = value
    return sd


def bad_state_dicts(t: TernaryScaleTensor):
    sd = t.state_dict()
    packed = sd["T_packed"].clone()
    packed[1] = 243
    yield "byte243", _corrupt(sd, "T_packed", packed), "> 242"
    packed = sd["T_packed"].clone()
    packed[-1] = 255
    yield "byte255-last", _corrupt(sd, "T_packed", packed), "> 242"
    yield "packed-int8", _corrupt(sd, "T_packed", sd["T_packed"].to(torch.int8)), "uint8"
    yield "packed-short", _corrupt(sd, "T_packed", sd["T_packed"][:-1].clone()), "packed bytes"
    yield "E-int16", _corrupt(sd, "E", sd["E"].to(torch.int16)), "int8"
    yield "E-float", _corrupt(sd, "E", sd["E"].float()), "int8"
    yield "E_accum-int32", _corrupt(sd, "E_accum", sd["E_accum"].to(torch.int32)), "int8"
    yield "T_accum-uint8", _corrupt(sd, "T_accum", sd["T_accum"].to(torch.uint8)), "int8"
    yield "T_accum-transposed", _corrupt(sd, "T_accum", sd["T_accum"].t().contiguous()), "shape"
    yield "E-one-group-short", _corrupt(sd, "E", sd["E"][:, :1].clone()), "shape"


BAD_SD_IDS = [name for name, _, _ in bad_state_dicts(TernaryScaleTensor(3, 12, 8))]


@pytest.mark.parametrize("case", BAD_SD_IDS)
def test_load_state_dict_rejects_corrupt_state_and_keeps_good_state(case):
    src = TernaryScaleTensor(3, 12, 8, init=False)
    random_state(src, seed=2)
    dst = TernaryScaleTensor(3, 12, 8, init=False)
    random_state(dst, seed=3)
    before = snapshot(dst)
    sd, match = next((sd, m) for name, sd, m in bad_state_dicts(src) if name == case)
    with pytest.raises(ValueError, match=match):
        dst.load_state_dict(sd)
    assert_same_state(before, snapshot(dst))  # nothing was overwritten


def test_load_state_dict_through_a_parent_module():
    a, b = TernaryLinear(12, 3, group_size=8), TernaryLinear(12, 3, group_size=8)
    random_state(a.weight, seed=4)
    sd = a.state_dict()
    assert set(sd) == {f"weight.{k}" for k in ("T_packed", "E", "E_accum", "T_accum")}
    b.load_state_dict(sd)
    assert_same_state(snapshot(a), snapshot(b))
    sd["weight.T_packed"] = sd["weight.T_packed"].clone().fill_(250)
    with pytest.raises(ValueError, match="> 242"):
        b.load_state_dict(sd)


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rows=0, cols=4), dict(rows=-1, cols=4), dict(rows=2, cols=0), dict(rows=2.0, cols=4),
        dict(rows=True, cols=4), dict(rows="2", cols=4), dict(rows=2, cols=4, group_size=0),
        dict(rows=2, cols=4, group_size=-8), dict(rows=2, cols=4, group_size=1.5),
        dict(rows=2, cols=4, group_size=True), dict(rows=2, cols=4, scale_mode="fp8"),
    ],
    ids=["rows0", "rows-1", "cols0", "rows-float", "rows-bool", "rows-str", "g0", "g-8", "g1.5", "g-bool",
         "scale_mode"],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        TernaryScaleTensor(**kwargs)


def test_set_trits_and_load_float_validate():
    t = TernaryScaleTensor(2, 6, 4)
    with pytest.raises(ValueError, match="shape"):
        t.set_trits(torch.zeros(3, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match="values must be in"):
        t.set_trits(torch.full((2, 6), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="shape"):
        t.load_float_(torch.randn(6, 2))
    good = t.T_packed.clone()
    with pytest.raises(ValueError):
        t.set_trits(torch.full((2, 6), -5, dtype=torch.int8))
    assert torch.equal(t.T_packed, good)


def test_hybrid_scale_mode_float():
    w = torch.randn(4, 20)
    t = TernaryScaleTensor.from_float(w, 8, scale_mode="float")
    params = dict(t.named_parameters())
    assert list(params) == ["log2_scale"]
    assert params["log2_scale"].dtype == torch.float32 and params["log2_scale"].shape == (4, 3)
    assert torch.equal(t.log2_scale.detach(), t.E.float())
    with torch.no_grad():
        t.log2_scale.add_(0.5)  # the float scale, not E, defines the weight in hybrid mode
    T = unpack_trits(t.T_packed, 80).view(4, 20).float()
    expected = T * torch.exp2(t.log2_scale.detach()).repeat_interleave(8, dim=1)[:, :20]
    assert torch.allclose(t.dense(), expected)
    assert t.inference_bytes() == t.T_packed.numel() + 4 * 3 * 4


def test_ternary_weights_in_registration_order():
    model = torch.nn.Sequential(TernaryLinear(4, 5), torch.nn.ReLU(), TernaryLinear(5, 3))
    ws = ternary_weights(model)
    assert ws == [model[0].weight, model[2].weight]
    assert ternary_weights(model[0].weight) == [model[0].weight]
    assert ternary_weights(torch.nn.ReLU()) == []


# ------------------------------------------------------------------------------------ T_accum from the residual
def test_residual_accum_hand_built():
    # one group whose mean |w| is 1, so w is its own w / s: T = round(w) clamped, r = w - T,
    # T_accum = clamp(round(2 * 32 * r), -31, 31)
    w = torch.tensor([[1.4, -0.6, 0.2, -1.8, 0.9, -1.05, 0.0, 2.05]])
    t = TernaryScaleTensor.from_float(w, group_size=8, accum_threshold=32)
    assert t.trits().tolist() == [[1, -1, 0, -1, 1, -1, 0, 1]]
    assert t.T_accum.tolist() == [[26, 26, 13, -31, -6, -3, 0, 31]]
    assert not t.E_accum.any()
    assert not TernaryScaleTensor.from_float(w, group_size=8).T_accum.any()  # default: empty accumulators
    for bad in (0, 128, 2.5, True):
        with pytest.raises(ValueError, match="accum_threshold"):
            TernaryScaleTensor.from_float(w, group_size=8, accum_threshold=bad)
    # an all-zero group: residual 0 everywhere
    z = TernaryScaleTensor.from_float(torch.zeros(2, 8), group_size=4, accum_threshold=32)
    assert not z.T_accum.any()


@pytest.mark.parametrize("rows,cols,gs", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("theta", [1, 8, 32, 127])
def test_residual_accum_stays_inside_the_band_and_leans_toward_the_nearer_trit(rows, cols, gs, theta):
    from trueternary.quant import group_sum

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols + theta))
    t = TernaryScaleTensor.from_float(w, group_size=gs, accum_threshold=theta)
    A, T = t.T_accum.long(), t.trits().long()
    assert A.abs().max() <= theta - 1  # no trit can move before the first vote
    mean_abs = group_sum(w.abs(), gs) / group_sum(torch.ones(1, cols), gs)
    r = w / t.expand_groups(mean_abs) - T
    assert ((A > 0) <= (r > 0)).all() and ((A < 0) <= (r < 0)).all()  # leans up only from above, down from below


def test_residual_accum_flips_near_boundary_weights_first():
    """Weights next to a rounding boundary cross it after a vote or two; centred ones after ~theta votes."""
    from trueternary import rule

    w = torch.tensor([[0.49, 0.05, -0.49, 1.0, 1.5, -1.5, -1.5, -1.47]])  # mean |w| = 1
    t = TernaryScaleTensor.from_float(w, group_size=8, accum_threshold=32)
    T, A = t.trits(), t.T_accum
    assert T[0, :3].tolist() == [0, 0, 0] and A[0, :3].tolist() == [31, 3, -31]
    first_flip = torch.full(A.shape, -1)
    for k in range(1, 40):  # two votes toward +1 per step for every weight
        A = rule.accumulate(A, torch.full_like(A, 2))
        T2, A, _ = rule.apply_flips(T, A, 32, clip_at_bounds=True)
        first_flip[(T2 != T) & (first_flip < 0)] = k
        T = T2
    assert first_flip[0, :3].tolist() == [1, 15, 32]
