"""Shared fixtures for the CPU test suite: a fixed seed, an independent dense reference of a ternary weight, a
guard against host reads of tensors (what a CUDA-graphed step must not do), SIGINT that interrupts; one
speed-up of Triton's interpreter (its language patched once per launch); and how many xdist workers ``-n auto``
starts."""

from __future__ import annotations

import contextlib
import signal
import sys

import pytest
import torch

from trueternary.packing import unpack_trits


def pytest_configure(config):
    # Test tensors are tiny: one intra-op thread avoids OpenMP hand-off overhead, which on a busy
    # 2-core machine measured 24 ms per 16x20 matmul with 2 threads versus 5 us with 1. (Under xdist, one
    # worker per core: more threads would only oversubscribe the cores.)
    torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): no workers when the run names one test file, which ``--dist loadfile`` would
    give to one worker anyway (workers would only add their start-up); else xdist's count (one per core)."""
    files = {arg.split("::")[0] for arg in config.args}
    return 0 if len(files) == 1 and files.pop().endswith(".py") else None


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


@pytest.fixture
def sigint_interrupts():
    """SIGINT raises KeyboardInterrupt in this test, whatever the process started with: Python leaves SIGINT
    ignored when it starts ignored (pytest run as a background job of a non-interactive shell, as CI harnesses
    may). The previous handler comes back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)



def _language_patched_once_per_launch() -> None:
    """Triton's interpreter re-patches ``triton.language`` for the interpreter (``_patch_lang``: ``inspect.getmembers``
    over the language modules) on every call of a ``@triton.jit`` helper inside a kernel, although the launch
    around it patched the same modules already and keeps them patched until it returns: about a quarter of an
    interpreted test's time. Calls made while a launch runs, from functions that see no other language module,
    skip it; the launch itself patches and restores as before. Does nothing unless the interpreter is loaded
    and has the structure this relies on."""
    interp = sys.modules.get("triton.runtime.interpreter")
    if interp is None or not all(hasattr(interp, n) for n in ("_patch_lang", "GridExecutor", "_LangPatchScope")):
        return
    import triton.language as tl

    real_patch, real_launch = interp._patch_lang, interp.GridExecutor.__call__
    running: list = []  # per launch in progress: the ids of the language modules it patched (None: not yet)

    def langs(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_lang(fn):
        if running and running[-1] is not None and langs(fn) <= running[-1]:
            return interp._LangPatchScope()  # nothing to restore
        scope = real_patch(fn)
        if running and running[-1] is None:  # the launch's own patch
            running[-1] = langs(fn)
        return scope

    def launch(self, *args, **kwargs):
        running.append(None)
        try:
            return real_launch(self, *args, **kwargs)
        finally:
            running.pop()

    interp._patch_lang, interp.GridExecutor.__call__ = patch_lang, launch


def pytest_collection_finish(session):
    _language_patched_once_per_launch()  # the kernel test modules load the interpreter when they are collected
