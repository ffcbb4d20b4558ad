"""The benchmarks (benchmarks/) and the experiments (experiments/): their shared harness, their CPU paths, and
one-line usage errors (exit 2) for bad input, before anything is launched."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

from _scripts import run_as_main, run_script, run_scripts  # noqa: E402


def _usage_error(r, message: str) -> bool:
    return r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ usage errors
# Bad input to every script: one line, exit 2, before anything is launched; without CUDA, the GPU-only scripts
# refuse the same way. (case id: script, args ({tmp}: a fresh folder; {file}: a regular file in it), environment
# changes, the message.) All run in one process (tests/_scripts.py), each as its own __main__.
USAGE_ERRORS = {
    "multi-gpu-missing-data": ("benchmarks/multi_gpu_scaling.py", ["--data", "/no/such/corpus.txt"], {},
                               "--data /no/such/corpus.txt: no such file or directory"),
    "multi-gpu-unknown-model": ("benchmarks/multi_gpu_scaling.py", ["--data", "README.md", "--models", "d512,huge"],
                                {}, "unknown --models huge"),
    "multi-gpu-bad-device": ("benchmarks/multi_gpu_scaling.py", ["--data", "README.md", "--device", "tpu"], {},
                             "invalid choice: 'tpu'"),
    "learning-bad-json": ("benchmarks/learning_benchmark.py",
                          ["--data", "README.md", "--out", "{tmp}", "--grid", "{not json"], {}, "--grid:"),
    "learning-empty-grid": ("benchmarks/learning_benchmark.py",
                            ["--data", "README.md", "--out", "{tmp}", "--grid", '{"Adam_FP32": []}'], {},
                            "--grid: expected an object of non-empty lists"),
    "learning-parallel-0": ("benchmarks/learning_benchmark.py",
                            ["--data", "README.md", "--out", "{tmp}", "--parallel", "0"], {},
                            "--parallel must be >= 1"),
    "bench-kernels-settings": ("benchmarks/bench_kernels.py", ["--smoke", "--settings", "huge"], {},
                               "unknown --settings huge"),
    "bench-kernels-sweep-kernels": ("benchmarks/bench_kernels.py", ["--smoke", "--sweep-kernels", "gemm"], {},
                                    "unknown --sweep-kernels gemm"),
    "bench-kernels-ops": ("benchmarks/bench_kernels.py", ["--smoke", "--ops", "votes,gemm"], {}, "unknown --ops gemm"),
    "bench-e2e-settings": ("benchmarks/bench_e2e.py", ["--smoke", "--settings", "seed,huge"], {},
                           "unknown setting 'huge'"),
    "bench-scale-size": ("benchmarks/bench_scale.py", ["--smoke", "--sizes", "huge"], {}, "unknown size 'huge'"),
    "bench-scale-config": ("benchmarks/bench_scale.py", ["--smoke", "--configs", "Adam"], {}, "--configs: choose from"),
    "bench-scale-batch": ("benchmarks/bench_scale.py", ["--smoke", "--batch", "0"], {}, "--batch must be >= 1"),
    "bench-hf-variants": ("benchmarks/bench_hf.py", ["--smoke", "--variants", "eager,fast"], {},
                          "unknown --variants fast"),
    "bench-hf-model": ("benchmarks/bench_hf.py", ["--smoke", "--model", "100,2"], {}, "--model takes D,L"),
    "hf-fused-variants": ("experiments/hf_fused_projections/run.py", ["--smoke", "--variants", "graph,fast"], {},
                          "unknown --variants fast"),
    "hf-fused-model": ("experiments/hf_fused_projections/run.py", ["--smoke", "--model", "512"], {},
                       "--model takes D,L"),
    "kernel-launches-shapes": ("experiments/kernel_launches/run.py", ["--shapes", "q=512x", "--out", "{tmp}"], {},
                               "--shapes takes NAME=RxC"),
    "kernel-launches-tokens": ("experiments/kernel_launches/run.py", ["--tokens", "0", "--out", "{tmp}"], {},
                               "--tokens must be >= 1"),
    "bench-morph-kernels-skip": ("benchmarks/bench_morph_kernels.py", ["--skip", "kernels,everything"],
                                 {"TRITON_INTERPRET": "1"}, "unknown --skip everything"),
    "morph-ablation-variant": ("experiments/morph_ablation/run.py", ["--variants", "full,-everything", "--out",
                                                                      "{tmp}"], {}, "unknown variant(s) -everything"),
    **{f"bad-out-{script.split('/')[1]}": (script, ["--out", "{file}/out"], {}, "cannot create --out")
       for script in ("experiments/fp8_gemm_ceiling/run.py", "experiments/kernel_launches/run.py",
                      "experiments/morph_ablation/run.py")},
}
if not torch.cuda.is_available():  # the CPU-only refusals
    USAGE_ERRORS.update({
        "bench-morph-kernels-no-cuda": ("benchmarks/bench_morph_kernels.py", ["--quick"], {"TRITON_INTERPRET": None},
                                        "no CUDA device"),
        **{f"no-cuda-{script.split('/')[1]}": (script, [] if "exactness" in script else ["--out", "{tmp}/out"], {},
                                               "needs a CUDA device")
           for script in ("experiments/fp8_gemm_ceiling/run.py", "experiments/kernel_launches/run.py",
                          "experiments/cuda_graph_exactness/run.py")},
    })


@pytest.fixture(scope="module")
def usage_error_runs(tmp_path_factory) -> dict:
    """Every USAGE_ERRORS case run, and experiments/group_size (which prints a table): case id -> its outcome."""
    cases = {}
    for case, (script, args, env, _) in USAGE_ERRORS.items():
        tmp = tmp_path_factory.mktemp(case)
        (tmp / "file").write_text("x")
        cases[case] = (script, [a.replace("{tmp}", str(tmp)).replace("{file}", str(tmp / "file")) for a in args], env)
    cases["group-size"] = ("experiments/group_size/run.py", [], {})
    return dict(zip(cases, run_scripts(list(cases.values()))))


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_bad_input_is_one_line_exit_2(usage_error_runs, case):
    r = usage_error_runs[case]
    assert _usage_error(r, USAGE_ERRORS[case][3]), (r.returncode, r.stderr[-2000:])


def test_group_size_prints_every_group_size(usage_error_runs):
    r = usage_error_runs["group-size"]
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [int(row[0]) for row in rows] == [16, 32, 64, 128, 256, 2048]
    train_bytes = [float(row[1]) for row in rows]
    assert train_bytes == sorted(train_bytes, reverse=True)  # larger groups: fewer scale bytes per weight


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


def test_learning_benchmark_parallel_tuning_then_final(tmp_path):
    """The two stages on a tiny model: parallel tuning processes (a learning rate and a bracket override as grid
    entries) merged into tune.json, the best rate chosen (lowest validation bpb), then one final bench run with
    it and the seed's rule."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    r = run_as_main("benchmarks/learning_benchmark.py", [  # (here: it only launches processes and `bench`)
        "--data", str(corpus), "--device", "cpu", "--steps", "3", "--batch", "2", "--ctx", "16", "--d-model", "32",
        "--n-layers", "1", "--n-heads", "2", "--parallel", "2", "--grid", '{"Adam_FP32": ["1e-3", "lr=3e-3"]}',
        "--extra", "--eval-windows 4", "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-2000:]
    tune = json.loads((tmp_path / "out" / "tune.json").read_text())["results"]
    assert sorted(x["config"] for x in tune) == ["Adam_FP32[lr=1e-3]", "Adam_FP32[lr=3e-3]"]
    final = [x["config"] for x in json.loads((tmp_path / "out" / "final.json").read_text())["results"]]
    assert final == [min(tune, key=lambda x: x["val_bpb"])["config"], "TrueTernary_Naive"]


def test_learning_benchmark_reports_failed_tuning_runs(tmp_path):
    """A tuning process that fails (here: an unknown rule field) ends the script with a one-line error."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    r = run_as_main("benchmarks/learning_benchmark.py", [
        "--data", str(corpus), "--device", "cpu", "--steps", "2", "--batch", "2", "--ctx", "16", "--d-model", "32",
        "--n-layers", "1", "--n-heads", "2", "--parallel", "2", "--grid", '{"TrueTernary": ["4", "lr=4,bogus=1"]}',
        "--extra", "--eval-windows 4", "--out", str(tmp_path / "out")])
    assert r.returncode == 1 and "1 tuning run(s) failed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _smoke(script: str, tmp_path, *args: str) -> dict:
    r = run_script(f"benchmarks/{script}", "--smoke", "--out", str(tmp_path), *args, timeout=600)
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
    assert all(e["median_ms"] > 0 and e["tokens_per_s"] > 0 and e["repeats"] == 1 for e in eager.values())


@pytest.mark.slow  # ~10 s: three kernels, forward and backward, interpreted
def test_bench_morph_kernels_smoke_kernels(tmp_path):
    """MORPH's kernel benchmark on CPU (Triton interpreter, --quick shapes): each kernel checked, then timed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = run_script("benchmarks/bench_morph_kernels.py", "--quick", "--skip", "components,model", "--out",
                   str(tmp_path), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "morph_kernels.json").read_text())
    assert [k["kernel"] for k in res["kernels"]] == ["gather_add", "graph_aggregate", "moe_combine"]
    assert all(k["max_abs_err"] < 1e-3 for k in res["kernels"]) and not res["errors"]
    assert "| gather_add |" in (tmp_path / "morph_kernels.md").read_text()


@pytest.mark.slow  # ~30 s on a busy 2-core machine: dynamo traces both models, the ternary one in pieces
def test_bench_hf_smoke(tmp_path):
    """The Hugging Face benchmark on CPU, eager and compiled: a tiny transformers Llama, AdamW and TrueTernary
    (TrainStep) steps, the best of each and their ratio; compiled: dynamo traced, code generation left out, the
    ternarised model one graph like the float one (no graph break); --profile profiles each, --parts adds each
    optimiser without its update (kept out of the best-of summary)."""
    pytest.importorskip("transformers")
    variants = ("eager", "compiled")
    res = _smoke("bench_hf.py", tmp_path, "--batch", "2", "--variants", ",".join(variants), "--profile", "--parts")
    assert not res["errors"]
    assert all(r["profile"]["profiled_wall_ms_per_step"] > 0 for r in res["steps"])  # --profile: every variant
    steps = {(r["optimizer"], r["variant"]) for r in res["steps"]}
    optimizers = ("AdamW", "TrueTernary", "AdamW (no update)", "TrueTernary (no update)")  # --parts
    assert steps == {(o, v) for o in optimizers for v in variants}
    assert all(r["median_ms"] > 0 and r["repeats"] == 2 and not r["graphed"] for r in res["steps"])
    assert {r["graph_breaks"] for r in res["steps"] if r["variant"] == "compiled"} == {0}
    assert all(r["graph_breaks"] is None for r in res["steps"] if r["variant"] == "eager")
    best = res["summary"]["best"]
    assert res["summary"]["ratio"] == pytest.approx(best["TrueTernary"]["median_ms"] / best["AdamW"]["median_ms"])


@pytest.mark.slow  # ~30 s on a busy 2-core machine: dynamo traces four models, three in pieces
def test_hf_fused_projections_smoke(tmp_path):
    """The fused-projections experiment on CPU, eager and compiled: the fused Llama passes its check (same logits,
    same ternary weights, its ternary copy trains), then the four configurations run in each variant."""
    pytest.importorskip("transformers")
    variants = ("eager", "compiled")
    r = run_script("experiments/hf_fused_projections/run.py", "--smoke", "--batch", "2", "--out", str(tmp_path),
                   timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "hf_fused_projections.json").read_text())
    assert not res["errors"]
    check = res["check"]
    assert check["passed"] and check["logits_allclose"] and check["ternary_weights_equal"] and check["every_part_voted"]
    steps = {(row["optimizer"], row["model"], row["variant"]) for row in res["steps"]}
    assert steps == {(o, m, v) for o in ("AdamW", "TrueTernary") for m in ("stock", "fused") for v in variants}
    assert all(row["median_ms"] > 0 and row["repeats"] == 2 for row in res["steps"])
    ms = {(row["optimizer"], row["model"], row["variant"]): row["median_ms"] for row in res["steps"]}
    for v in variants:
        assert res["ratios"][v]["fused_vs_stock_adamw"] == pytest.approx(ms["TrueTernary", "fused", v]
                                                                         / ms["AdamW", "stock", v])
    assert "check: passed" in r.stdout and "fused_vs_stock_adamw" in r.stdout


def test_bench_scale_smoke_row_and_table(tmp_path):
    """The scale benchmark on CPU: one (size, config) row measured in its child process, and the table."""
    r = run_script("benchmarks/bench_scale.py", "--smoke", "--configs", "TrueTernary", "--out", str(tmp_path),
                   timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_scale.json").read_text())
    (row,) = res["rows"]
    assert row["config"] == "TrueTernary" and row["weights"] > 0 and row["tokens_per_s"] > 0 and row["finite"]
    assert row["repeats"] == 2 and "error" not in row
    assert "TrueTernary" in r.stdout and "ms/step" in r.stdout
