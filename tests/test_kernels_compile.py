"""Every kernel specialisation the gpu backends launch compiles for a Hopper GPU (sm_90), checked on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_hopper(tmp_path):
    """tests/compile_for_hopper.py compiles every specialisation with the ptxas in Triton's wheel: the interpreter
    that runs the kernel tests does not lower kernels, so a kernel can pass them all and still fail to compile on
    the GPU (seen: a module-level constant read inside a kernel). Run with TRITON_INTERPRET=1 inherited, as after
    the kernel tests: the script must compile regardless."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_for_hopper.py"))], capture_output=True,
                       text=True, timeout=900, env=env)
    assert r.returncode == 0 and " 0 failed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
