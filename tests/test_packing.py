"""Tests of the base-3 packing (5 trits per byte): golden bytes, tail padding, round trips, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trueternary.packing import (
    MAX_PACKED_BYTE,
    ZERO_BYTE,
    gather_trits,
    pack_trits,
    packed_numel,
    unpack_lut,
    unpack_trits,
)


def byte_of(trits: list[int]) -> int:
    """The documented layout, written out independently: sum((t[i] + 1) * 3**i), tail padded with 0-trits."""
    trits = list(trits) + [0] * (5 - len(trits))
    return sum((t + 1) * 3**i for i, t in enumerate(trits))


GOLDEN = [
    ([-1, 0, 1, 1, -1], 75),
    ([1, 1, 1, 1, 1], 242),
    ([-1] * 5, 0),
    ([0] * 5, 121),
    ([1, -1, -1, -1, -1], 2),
    ([-1, -1, -1, -1, 1], 162),
    # short tails are padded with 0-trits (digit 1)
    ([1], 2 + 3 + 9 + 27 + 81),
    ([-1], 0 + 3 + 9 + 27 + 81),
    ([-1, -1], 0 + 0 + 9 + 27 + 81),
    ([1, 1, 1, 1], 2 + 6 + 18 + 54 + 81),
]


@pytest.mark.parametrize("trits,byte", GOLDEN, ids=[f"{t}->{b}" for t, b in GOLDEN])
def test_golden_bytes(trits, byte):
    assert byte == byte_of(trits)  # the table above agrees with the documented formula
    packed = pack_trits(torch.tensor(trits, dtype=torch.int8))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [byte]
    assert unpack_trits(packed, len(trits)).tolist() == trits


def test_multi_byte_order_and_tail():
    # 12 trits -> 3 bytes: two full bytes in order, then a 2-trit tail padded with 0-trits
    t = [-1, 0, 1, 1, -1, 1, 1, 1, 1, 1, 1, -1]
    packed = pack_trits(torch.tensor(t, dtype=torch.int8))
    assert packed.tolist() == [75, 242, byte_of([1, -1])]
    assert packed_numel(12) == 3


def test_constants():
    assert MAX_PACKED_BYTE == 242 == 3**5 - 1
    assert ZERO_BYTE == byte_of([0] * 5) == 121


def test_row_major_order_of_2d_input():
    t = torch.tensor([[-1, 0, 1], [1, -1, 0]], dtype=torch.int8)
    assert torch.equal(pack_trits(t), pack_trits(t.reshape(-1)))
    assert torch.equal(pack_trits(t.t()), pack_trits(t.t().contiguous().reshape(-1)))  # non-contiguous input


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64])
def test_any_integer_or_float_dtype(dtype):
    t = torch.tensor([-1, 0, 1, 1, -1, 0, 1], dtype=dtype)
    assert pack_trits(t).tolist() == [75, byte_of([0, 1])]


def test_empty():
    packed = pack_trits(torch.zeros(0, dtype=torch.int8))
    assert packed.dtype == torch.uint8 and packed.numel() == 0
    out = unpack_trits(packed, 0)
    assert out.dtype == torch.int8 and out.shape == (0,)
    assert pack_trits(torch.zeros(3, 0, dtype=torch.int8)).numel() == 0


def test_every_byte_round_trips_and_lut_matches_layout():
    lut = unpack_lut()
    assert lut.shape == (243, 5) and lut.dtype == torch.int8
    for b in range(243):
        assert byte_of(lut[b].tolist()) == b
    all_bytes = torch.arange(243, dtype=torch.uint8)
    trits = unpack_trits(all_bytes, 243 * 5)
    assert torch.equal(pack_trits(trits), all_bytes)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_random_shapes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    packed = pack_trits(t)
    n = t.numel()
    assert packed.shape == (packed_numel(n),) == ((n + 4) // 5,)
    assert int(packed.max()) <= MAX_PACKED_BYTE if n else True
    out = unpack_trits(packed, n)
    assert out.dtype == torch.int8
    assert torch.equal(out, t.reshape(-1))
    assert torch.equal(out.view(shape), t)
    if n % 5:  # the padding of the last byte decodes to 0-trits
        assert (unpack_lut()[packed[-1].long()][n % 5 :] == 0).all()


@pytest.mark.parametrize("numel", [1, 4, 5, 6, 11, 64, 70, 123], ids=lambda n: f"n{n}")
def test_round_trip_numel_not_multiple_of_5(numel):
    t = torch.randint(-1, 2, (numel,), dtype=torch.int8)
    assert torch.equal(unpack_trits(pack_trits(t), numel), t)


@pytest.mark.parametrize("numel", [1, 7, 70, 333], ids=lambda n: f"n{n}")
def test_gather_trits_agrees_with_unpack(numel):
    t = torch.randint(-1, 2, (numel,), dtype=torch.int8)
    packed = pack_trits(t)
    full = unpack_trits(packed, numel)
    idx = torch.randint(0, numel, (3, 17))
    got = gather_trits(packed, idx)
    assert got.shape == idx.shape and got.dtype == torch.int8
    assert torch.equal(got, full[idx])
    assert torch.equal(gather_trits(packed, torch.arange(numel)), t)  # every position, tail included


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "values",
    [[2], [-2], [0, 1, 3], [0.5], [float("nan")], [float("inf")], [127]],
    ids=["2", "-2", "3-after-good", "0.5", "nan", "inf", "127"],
)
def test_pack_rejects_values_outside_ternary(values):
    dtype = torch.float32 if any(isinstance(v, float) for v in values) else torch.int64
    with pytest.raises(ValueError, match="values must be in"):
        pack_trits(torch.tensor(values, dtype=dtype))


def test_pack_rejects_uint8_255_and_bool_and_non_tensor():
    with pytest.raises(ValueError):
        pack_trits(torch.tensor([255], dtype=torch.uint8))  # not -1 in disguise (255 == -1 in uint8 compares)
    assert pack_trits(torch.tensor([0, 1, 0, 1, 1], dtype=torch.uint8)).tolist() == [byte_of([0, 1, 0, 1, 1])]
    with pytest.raises(ValueError, match="signed"):
        pack_trits(torch.tensor([0, 1], dtype=torch.uint16))
    with pytest.raises(ValueError):
        pack_trits(torch.tensor([True, False]))
    with pytest.raises(TypeError):
        pack_trits([1, 0, -1])


@pytest.mark.parametrize("bad", [243, 250, 255], ids=lambda b: f"byte{b}")
def test_unpack_rejects_bytes_above_242(bad):
    packed = torch.tensor([75, bad, 121], dtype=torch.uint8)
    with pytest.raises(ValueError, match="> 242"):
        unpack_trits(packed, 15)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.float32])
def test_unpack_rejects_wrong_dtype(dtype):
    with pytest.raises(ValueError, match="uint8"):
        unpack_trits(torch.tensor([75], dtype=dtype), 5)


@pytest.mark.parametrize("numel", [0, 4, 11, 15], ids=lambda n: f"numel{n}")
def test_unpack_rejects_wrong_length(numel):
    packed = torch.tensor([75, 242], dtype=torch.uint8)  # holds 6..10 trits
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_trits(packed, numel)


def test_unpack_rejects_2d_negative_numel_and_non_tensor():
    with pytest.raises(ValueError, match="1-D"):
        unpack_trits(torch.tensor([[75, 242]], dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match=">= 0"):
        unpack_trits(torch.zeros(0, dtype=torch.uint8), -1)
    with pytest.raises(TypeError):
        unpack_trits([75], 5)
