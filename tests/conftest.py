"""Shared fixtures for the CPU test suite: a fixed seed, an independent dense reference of a ternary weight, and a
guard against host reads of tensors (what a CUDA-graphed step must not do)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from trueternary.packing import unpack_trits


def pytest_configure(config):
    # Test tensors are tiny: one intra-op thread avoids OpenMP hand-off overhead, which on a busy
    # 2-core machine measured 24 ms per 16x20 matmul with 2 threads versus 5 us with 1.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)


def _dense_reference(weight) -> torch.Tensor:
    """``T * 2**E`` in float64, rebuilt from the raw buffers (not via ``weight.dense()``).

    ``T`` is decoded with the validating ``unpack_trits``; column ``c`` uses the scale of group
    ``c // group_size``, so a short last group is handled by plain integer division.
    """
    T = unpack_trits(weight.T_packed, weight.rows * weight.cols).view(weight.rows, weight.cols)
    E = weight.log2_scales().detach().double()
    group_of_col = torch.arange(weight.cols) // weight.group_size
    return T.double() * torch.pow(2.0, E[:, group_of_col])


@pytest.fixture
def dense_reference():
    return _dense_reference


@contextlib.contextmanager
def _no_host_reads(where: str):
    """Inside: every way Python reads a tensor's value on the host raises (``where`` names the code under test)."""

    def no_sync(*args, **kwargs):
        raise AssertionError(f"host read of a tensor {where}")

    with pytest.MonkeyPatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, no_sync)
        yield


@pytest.fixture
def no_host_reads():
    return _no_host_reads
