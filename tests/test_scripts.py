"""The benchmark scripts answer bad input with a one-line usage error (exit 2), before launching anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/corpus.txt"], "--data /no/such/corpus.txt: no such file or directory"),
    (["--data", "README.md", "--models", "d512,huge"], "unknown --models huge"),
    (["--data", "README.md", "--device", "tpu"], "invalid choice: 'tpu'"),
], ids=["missing-data", "unknown-model", "bad-device"])
def test_multi_gpu_scaling_bad_input(args, message):
    r = _run("multi_gpu_scaling.py", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_dp_step_profile_refuses_without_cuda():
    r = _run("dp_step_profile.py")
    assert r.returncode == 2 and "needs CUDA" in r.stderr and "Traceback" not in r.stderr, r.stderr
