"""The benchmark scripts answer bad input with a one-line usage error (exit 2), before launching anything."""

from __future__ import annotations

import os
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gemm_ceiling_refuses_without_cuda(tmp_path):
    r = _run("gemm_ceiling.py", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_sdpa_determinism_refuses_without_cuda():
    r = _run("sdpa_determinism.py")
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_gemm_ceiling_bad_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _run("gemm_ceiling.py", "--out", str(tmp_path / "file" / "out"))
    assert r.returncode == 2 and "cannot create --out" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_votes_ablation_refuses_without_cuda(tmp_path):
    r = _run("votes_ablation.py", "--no-stages", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_votes_ablation_bad_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _run("votes_ablation.py", "--out", str(tmp_path / "file" / "out"))
    assert r.returncode == 2 and "cannot create --out" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_learning_benchmark_parallel_tuning_then_final(tmp_path):
    """The two stages on a tiny model: parallel tuning processes merged into tune.json, best rates chosen
    per config (lowest validation bpb), then one final bench run with those rates and the seed's rule."""
    import json

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    grid = '{"Adam_FP32": ["1e-3", "3e-3"], "TrueTernary": ["4", "lr=4,decay=0.2"]}'
    r = _run("learning_benchmark.py", "--data", str(corpus), "--device", "cpu", "--steps", "3", "--batch", "2",
             "--ctx", "16", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--parallel", "2",
             "--grid", grid, "--extra", "--eval-windows 4", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    tune = json.loads((tmp_path / "out" / "tune.json").read_text())["results"]
    assert sorted(x["config"] for x in tune) == sorted(
        ["Adam_FP32[lr=1e-3]", "Adam_FP32[lr=3e-3]", "TrueTernary[lr=4]", "TrueTernary[lr=4,decay=0.2]"])
    final = [x["config"] for x in json.loads((tmp_path / "out" / "final.json").read_text())["results"]]
    best = {name: min((x for x in tune if x["recipe"] == name), key=lambda x: x["val_bpb"])["config"]
            for name in ("Adam_FP32", "TrueTernary")}
    assert final == [best["Adam_FP32"], best["TrueTernary"], "TrueTernary_Naive"]


@pytest.mark.parametrize("args,message", [
    (["--grid", "{not json"], "--grid:"),
    (["--grid", '{"Adam_FP32": []}'], "--grid: expected an object of non-empty lists"),
    (["--parallel", "0"], "--parallel must be >= 1"),
], ids=["bad-json", "empty-grid", "parallel-0"])
def test_learning_benchmark_bad_input(tmp_path, args, message):
    r = _run("learning_benchmark.py", "--data", "README.md", "--out", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_learning_benchmark_reports_failed_tuning_runs(tmp_path):
    """A tuning process that fails (here: an unknown rule field) ends the script with a one-line error."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    r = _run("learning_benchmark.py", "--data", str(corpus), "--device", "cpu", "--steps", "2", "--batch", "2",
             "--ctx", "16", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--parallel", "2",
             "--grid", '{"TrueTernary": ["4", "lr=4,bogus=1"]}', "--extra", "--eval-windows 4",
             "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "1 tuning run(s) failed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _smoke(script: str, tmp_path, *args: str) -> dict:
    import json

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--smoke", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp_path / script.replace(".py", ".json")).read_text())


def test_bench_kernels_smoke_timings_only(tmp_path):
    """The kernel benchmark's timing path on CPU (Triton interpreter, tiny shapes), checks skipped."""
    res = _smoke("bench_kernels.py", tmp_path, "--skip-checks", "--settings", "seed", "--no-sweep")
    assert not res["correctness"] and not res["errors"]
    ops = {(t["layer"], t["op"]) for t in res["timings"]}
    assert {"fwd", "bwd-input", "votes", "flips"} <= {op for _, op in ops}
    assert [t["setting"] for t in res["totals"]] and all(t["setting"] == "seed" for t in res["totals"])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--smoke", "--settings", "huge"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--settings" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--smoke", "--sweep-kernels",
                        "gemm"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--sweep-kernels" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--smoke", "--ops", "votes,gemm"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "unknown --ops gemm" in r.stderr and "Traceback" not in r.stderr
    # both sources of the vote gradient are timed
    impls = {t["impl"] for t in res["timings"] if t["op"] == "votes"}
    assert {"gpu stochastic (+E), gW in the kernel", "gpu stochastic (+E), gW by cuBLAS"} <= impls


def test_bench_e2e_smoke_with_profile_and_graph_memory(tmp_path):
    """The end-to-end benchmark on CPU: every config, the profile section, the graphed steps and their
    memory timeline (readings are None without CUDA), the checks."""
    res = _smoke("bench_e2e.py", tmp_path, "--settings", "seed", "--profile")
    assert not res["errors"] and all(c["ok"] for c in res["checks"])
    assert {p["config"] for p in res["profiles"]} == {"Adam_FP32", "TrueTernary[gpu]"}
    graphed = {g["config"]: g for g in res["graphs"]}
    assert "memory_timeline_bytes" in graphed["TrueTernary[gpu] [CUDA graph]"]
    assert {e["config"] for e in res["eager"]} >= {"TrueTernary[gpu]", "TrueTernary[norm_beta=0][gpu]"}


def test_kernels_compile_for_hopper(tmp_path):
    """Every kernel specialisation the gpu backends launch compiles for sm_90 (scripts/compile_check.py, with the
    ptxas in Triton's wheel): the interpreter that runs the kernel tests does not lower kernels, so a kernel can
    pass them all and still fail to compile on the GPU (seen: a module-level constant read inside a kernel).
    Run with TRITON_INTERPRET=1 inherited, as after the kernel tests: the script must compile regardless."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py")], capture_output=True, text=True,
                       timeout=900, cwd=ROOT, env=env)
    assert r.returncode == 0 and " 0 failed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--seeds", "a,b"], "--seeds takes comma-separated integers"),
    (["--steps", "0"], "--steps >= 1"),
    (["--levers", "fp16"], "unknown lever 'fp16'"),
    (["--levers", "vote_tokens=0"], "the fraction must be in (0, 1]"),
    (["--levers", "vote_tokens=half"], "the fraction must be in (0, 1]"),
], ids=["bad-seeds", "zero-steps", "unknown-lever", "zero-fraction", "non-numeric-fraction"])
def test_lever_quality_check_bad_input(args, message, tmp_path):
    r = _run("lever_quality_check.py", *args, "--out", str(tmp_path))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_lever_quality_check_bad_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _run("lever_quality_check.py", "--out", str(tmp_path / "file" / "out"))
    assert r.returncode == 2 and "cannot create --out" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _lever_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import lever_quality_check

    return lever_quality_check


def test_lever_fp8_rounds_and_restores():
    """The fp8 lever rounds every TernaryLinear's input in forward and its output gradient in backward to e4m3
    per row, and the layer is itself again afterwards."""
    lq = _lever_module()
    from trueternary.layers import TernaryLinear

    torch.manual_seed(0)
    layer = TernaryLinear(16, 8, group_size=8)
    x = torch.randn(5, 16, requires_grad=True)
    gy = torch.randn(5, 8)
    plain_y = layer(x)
    with lq.fp8_emulation():
        y = layer(x)
        y.backward(gy)
    assert torch.equal(y, layer(lq.fp8_rows(x)))  # forward: the rounded input (the plain layer again here)
    assert not torch.equal(y, plain_y) and torch.equal(layer(x), plain_y)
    W = layer.weight.dense(torch.float32)
    torch.testing.assert_close(x.grad, lq.fp8_rows(gy) @ W)  # backward: the rounded output gradient


@pytest.mark.parametrize("fraction,rows", [(0.5, 3), (0.25, 2), (1.0, 5), (0.01, 1)],
                         ids=["half", "quarter", "all", "tiny"])
def test_lever_vote_tokens_passes_the_first_rows(monkeypatch, fraction, rows):
    """vote_tokens=F hands the voter the first ceil(F * M) token rows of gy and x, and restores the method."""
    lq = _lever_module()
    from trueternary.optim import FlipOptimizer

    seen = []
    monkeypatch.setattr(FlipOptimizer, "cast_matmul_votes", lambda self, w, gy, x, T: seen.append((gy, x)))
    recorder = FlipOptimizer.cast_matmul_votes
    gy, x = torch.randn(5, 3), torch.randn(5, 4)
    with lq.vote_tokens(fraction):
        FlipOptimizer.cast_matmul_votes(None, None, gy, x, None)
    assert FlipOptimizer.cast_matmul_votes is recorder
    (g2, x2), = seen
    assert torch.equal(g2, gy[:rows]) and torch.equal(x2, x[:rows])


def test_lever_quality_check_writes_every_run(tmp_path):
    out = tmp_path / "out"
    r = _run("lever_quality_check.py", "--levers", "fp8,vote_tokens=0.5", "--steps", "3", "--seeds", "0",
             "--out", str(out), "--", "--eval_every", "3")
    assert r.returncode == 0, r.stderr
    import json

    res = json.loads((out / "lever_quality.json").read_text())
    assert len(res["plain"]) == len(res["fp8"]) == len(res["vote_tokens=0.5"]) == 1 and res["steps"] == 3
    assert res["plain"][0] != res["vote_tokens=0.5"][0]  # fewer tokens' votes: a different run
