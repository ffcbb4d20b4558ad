"""The benchmarks (benchmarks/) and the experiments (experiments/): their shared harness, their CPU paths, and
one-line usage errors (exit 2) for bad input, before anything is launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")


def _run(script: str, *args: str, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``script`` (a path from the repo root) run as its documented command: ``python3 <script> <args>``."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _usage_error(r: subprocess.CompletedProcess, message: str) -> bool:
    return r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ the harness


def test_step_ms_times_only_the_calls_after_burn_in():
    calls = []
    ms = harness.step_ms(lambda: calls.append(1), warmup=3, repeats=5, device="cpu")
    assert len(calls) == 8 and len(ms) == 5 and all(t >= 0 for t in ms)


def test_summary_median_throughput_and_speedup():
    row = harness.summary([4.0, 1.0, 2.0], tokens_per_call=100)
    assert row == {"median_ms": 2.0, "min_ms": 1.0, "repeats": 3, "steps_per_s": 500.0, "tokens_per_s": 50_000.0}
    assert "tokens_per_s" not in harness.summary([1.0])
    assert harness.speedup(30.0, 20.0) == 1.5  # baseline 30 ms, this 20 ms: 1.5x as fast


def test_bench_sections_keep_going_record_errors_and_respect_the_budget(tmp_path):
    b = harness.Bench("demo", tmp_path, budget=60.0, device="cpu")
    with b.section("works") as go:
        assert go
        b.add("rows", {"x": 1})
    with b.section("fails") as go:
        raise ValueError("boom")
    saved = json.loads((tmp_path / "demo.json").read_text())  # written after every section
    assert saved["rows"] == [{"x": 1}] and saved["env"]["device"] == "cpu"
    assert [(e["section"], e["error"]) for e in saved["errors"]] == [("fails", "ValueError: boom")]
    b.budget = 0.0
    with b.section("late") as go:
        assert not go
    assert b.res["errors"][-1] == {"section": "late", "error": "skipped: time budget reached"}


def test_out_dir_that_cannot_be_created_is_a_usage_error(tmp_path):
    import argparse

    (tmp_path / "file").write_text("x")
    p = argparse.ArgumentParser(prog="demo")
    with pytest.raises(SystemExit) as e:
        harness.out_dir(p, str(tmp_path / "file" / "out"))
    assert e.value.code == 2
    assert harness.out_dir(p, str(tmp_path / "a" / "b")).is_dir()


# ------------------------------------------------------------------------------------------------ benchmarks


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/corpus.txt"], "--data /no/such/corpus.txt: no such file or directory"),
    (["--data", "README.md", "--models", "d512,huge"], "unknown --models huge"),
    (["--data", "README.md", "--device", "tpu"], "invalid choice: 'tpu'"),
], ids=["missing-data", "unknown-model", "bad-device"])
def test_multi_gpu_scaling_bad_input(args, message):
    assert _usage_error(_run("benchmarks/multi_gpu_scaling.py", *args), message)


def test_learning_benchmark_parallel_tuning_then_final(tmp_path):
    """The two stages on a tiny model: parallel tuning processes merged into tune.json, best rates chosen
    per config (lowest validation bpb), then one final bench run with those rates and the seed's rule."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    grid = '{"Adam_FP32": ["1e-3", "3e-3"], "TrueTernary": ["4", "lr=4,decay=0.2"]}'
    r = _run("benchmarks/learning_benchmark.py", "--data", str(corpus), "--device", "cpu", "--steps", "3",
             "--batch", "2", "--ctx", "16", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--parallel", "2",
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
    assert _usage_error(_run("benchmarks/learning_benchmark.py", "--data", "README.md", "--out", str(tmp_path), *args),
                        message)


def test_learning_benchmark_reports_failed_tuning_runs(tmp_path):
    """A tuning process that fails (here: an unknown rule field) ends the script with a one-line error."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    r = _run("benchmarks/learning_benchmark.py", "--data", str(corpus), "--device", "cpu", "--steps", "2",
             "--batch", "2", "--ctx", "16", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--parallel", "2",
             "--grid", '{"TrueTernary": ["4", "lr=4,bogus=1"]}', "--extra", "--eval-windows 4",
             "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "1 tuning run(s) failed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _smoke(script: str, tmp_path, *args: str) -> dict:
    r = _run(f"benchmarks/{script}", "--smoke", "--out", str(tmp_path), *args, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp_path / script.replace(".py", ".json")).read_text())


def test_bench_kernels_smoke_timings_only(tmp_path):
    """The kernel benchmark's timing path on CPU (Triton interpreter, tiny shapes), accuracy section skipped."""
    res = _smoke("bench_kernels.py", tmp_path, "--skip-checks", "--settings", "seed", "--no-sweep")
    assert not res["errors"] and "accuracy" not in res
    ops = {(t["layer"], t["op"]) for t in res["timings"]}
    assert {"fwd", "bwd-input", "votes", "flips"} <= {op for _, op in ops}
    assert [t["setting"] for t in res["totals"]] and all(t["setting"] == "seed" for t in res["totals"])
    # both sources of the vote gradient are timed
    impls = {t["impl"] for t in res["timings"] if t["op"] == "votes"}
    assert {"vote kernels (+gE), gW in the kernel", "vote kernels (+gE), gW by cuBLAS"} <= impls


@pytest.mark.parametrize("args,message", [
    (["--settings", "huge"], "unknown --settings huge"),
    (["--sweep-kernels", "gemm"], "unknown --sweep-kernels gemm"),
    (["--ops", "votes,gemm"], "unknown --ops gemm"),
], ids=["settings", "sweep-kernels", "ops"])
def test_bench_kernels_bad_input(args, message):
    assert _usage_error(_run("benchmarks/bench_kernels.py", "--smoke", *args), message)


def test_bench_e2e_smoke_with_profile_and_graph_memory(tmp_path):
    """The end-to-end benchmark on CPU: every config, the profile section, the graphed steps (eager on CPU) and
    their memory timeline (readings are None without CUDA)."""
    res = _smoke("bench_e2e.py", tmp_path, "--settings", "seed", "--profile")
    assert not res["errors"]
    assert {p["config"] for p in res["profiles"]} == {"Adam_FP32", "TrueTernary[gpu]"}
    graphed = {g["config"]: g for g in res["graphs"]}
    assert set(graphed) == {"TrueTernary[gpu] [CUDA graph]", "Adam_FP32 [CUDA graph]"}
    assert "memory_timeline_bytes" in graphed["TrueTernary[gpu] [CUDA graph]"]
    eager = {e["config"]: e for e in res["eager"]}
    assert set(eager) >= {"Adam_FP32", "TrueTernary[gpu]", "TrueTernary[norm_beta=0][gpu]"}
    assert all(e["median_ms"] > 0 and e["tokens_per_s"] > 0 and e["repeats"] == 2 for e in eager.values())


def test_bench_e2e_bad_input():
    assert _usage_error(_run("benchmarks/bench_e2e.py", "--smoke", "--settings", "seed,huge"),
                        "unknown setting 'huge'")


def _bench_hf_smoke(tmp_path, variants: tuple[str, ...]) -> dict:
    pytest.importorskip("transformers")
    res = _smoke("bench_hf.py", tmp_path, "--batch", "2", "--variants", ",".join(variants))
    assert not res["errors"]
    steps = {(r["optimizer"], r["variant"]) for r in res["steps"]}
    assert steps == {(o, v) for o in ("AdamW", "TrueTernary") for v in variants}
    assert all(r["median_ms"] > 0 and r["repeats"] == 2 and not r["graphed"] for r in res["steps"])
    best = res["summary"]["best"]
    assert res["summary"]["ratio"] == pytest.approx(best["TrueTernary"]["median_ms"] / best["AdamW"]["median_ms"])
    return res


def test_bench_hf_smoke(tmp_path):
    """The Hugging Face benchmark on CPU: a tiny transformers Llama, AdamW and TrueTernary (TrainStep) eager
    steps, the best of each and their ratio."""
    _bench_hf_smoke(tmp_path, ("eager",))


@pytest.mark.slow  # ~30 s on a busy 2-core machine: dynamo traces both models, the ternary one in pieces
def test_bench_hf_smoke_compiled(tmp_path):
    """The compiled variants too (dynamo traced, code generation left out): TrainStep's compile path, the ternary
    layers left eager."""
    _bench_hf_smoke(tmp_path, ("eager", "compiled"))


def test_bench_hf_bad_input():
    pytest.importorskip("transformers")
    assert _usage_error(_run("benchmarks/bench_hf.py", "--smoke", "--variants", "eager,fast"),
                        "unknown --variants fast")


@pytest.mark.slow  # ~30 s: three kernels, forward and backward, interpreted
def test_bench_morph_kernels_smoke_kernels(tmp_path):
    """MORPH's kernel benchmark on CPU (Triton interpreter, --quick shapes): each kernel checked, then timed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = _run("benchmarks/bench_morph_kernels.py", "--quick", "--skip", "components,model", "--out", str(tmp_path),
             env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "morph_kernels.json").read_text())
    assert [k["kernel"] for k in res["kernels"]] == ["gather_add", "graph_aggregate", "moe_combine"]
    assert all(k["max_abs_err"] < 1e-3 for k in res["kernels"]) and not res["errors"]
    assert "| gather_add |" in (tmp_path / "morph_kernels.md").read_text()


def test_bench_morph_kernels_bad_input(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    assert _usage_error(_run("benchmarks/bench_morph_kernels.py", "--skip", "kernels,everything", env=env),
                        "unknown --skip everything")
    if not torch.cuda.is_available():
        env.pop("TRITON_INTERPRET")
        assert _usage_error(_run("benchmarks/bench_morph_kernels.py", "--quick", env=env), "no CUDA device")


# ------------------------------------------------------------------------------------------------ experiments


@NO_CUDA
@pytest.mark.parametrize("script", ["experiments/fp8_gemm_ceiling/run.py", "experiments/kernel_launches/run.py",
                                    "experiments/cuda_graph_exactness/run.py"])
def test_gpu_experiments_refuse_without_cuda(script, tmp_path):
    args = [] if "exactness" in script else ["--out", str(tmp_path / "out")]
    assert _usage_error(_run(script, *args), "needs a CUDA device")


@pytest.mark.parametrize("script", ["experiments/fp8_gemm_ceiling/run.py", "experiments/kernel_launches/run.py",
                                    "experiments/morph_ablation/run.py"])
def test_experiments_bad_out_dir(script, tmp_path):
    (tmp_path / "file").write_text("x")
    assert _usage_error(_run(script, "--out", str(tmp_path / "file" / "out")), "cannot create --out")


def test_group_size_prints_every_group_size():
    r = _run("experiments/group_size/run.py")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [int(row[0]) for row in rows] == [16, 32, 64, 128, 256, 2048]
    train_bytes = [float(row[1]) for row in rows]
    assert train_bytes == sorted(train_bytes, reverse=True)  # larger groups: fewer scale bytes per weight


def test_morph_ablation_bad_variant(tmp_path):
    assert _usage_error(_run("experiments/morph_ablation/run.py", "--variants", "full,-everything",
                             "--out", str(tmp_path)), "unknown variant(s) -everything")


def test_bench_scale_smoke_row_and_table(tmp_path):
    """The scale benchmark on CPU: one (size, config) row measured in its child process, and the table."""
    r = _run("benchmarks/bench_scale.py", "--smoke", "--configs", "TrueTernary", "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_scale.json").read_text())
    (row,) = res["rows"]
    assert row["config"] == "TrueTernary" and row["weights"] > 0 and row["tokens_per_s"] > 0 and row["finite"]
    assert row["repeats"] == 2 and "error" not in row
    assert "TrueTernary" in r.stdout and "ms/step" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--sizes", "huge"], "unknown size 'huge'"),
    (["--configs", "Adam"], "--configs: choose from"),
    (["--batch", "0"], "--batch must be >= 1"),
], ids=["size", "config", "batch"])
def test_bench_scale_bad_input(args, message):
    assert _usage_error(_run("benchmarks/bench_scale.py", "--smoke", *args), message)
