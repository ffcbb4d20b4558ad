"""Shared by the Triton kernel test modules: run in this process when the kernels can, else in a subprocess.

``TRITON_INTERPRET`` must be set before Triton is first imported (see ops.triton_utils.interpreter_ready). A
module that was imported too late (Triton already loaded without it) skips its tests and runs itself once in
a fresh interpreter instead::

    _kernels_runnable, test_in_subprocess = interpreter_fallback(__file__, IN_PROCESS)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def interpreter_fallback(module_file: str, in_process: bool):
    """(autouse fixture, test function) for a kernel test module; assign both at module level."""

    @pytest.fixture(autouse=True)
    def _kernels_runnable(request):
        if request.node.name != "test_in_subprocess" and not in_process:
            pytest.skip("Triton was imported before TRITON_INTERPRET was set: covered by test_in_subprocess")

    @pytest.mark.skipif(in_process, reason="the kernels run in this process")
    def test_in_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

    return _kernels_runnable, test_in_subprocess
