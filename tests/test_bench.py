"""The benchmark CLI end to end on a tiny config, its --jobs runner when jobs fail, and its one-line errors."""

from __future__ import annotations

import json
import math
import time

import pytest

import _bench_faults
from trueternary import bench
from trueternary.cli import main

TINY = ["--steps", "6", "--batch", "2", "--ctx", "16", "--d-model", "64", "--n-layers", "1", "--n-heads", "2",
        "--print-every", "0", "--eval-windows", "4", "--device", "cpu"]


def test_bench_all_configs_end_to_end(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    configs = "Adam_FP32,BitNet_QAT,SignSGD_Old,TrueTernary,TrueTernary_Naive,TrueTernary_Hybrid"
    rc = main(["bench", "--configs", configs, "--reuse-base", "--json", str(js), "--plot", str(png), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "loss segments" in out and "val bpb" in out
    assert "device cpu (1 thread)" in out  # train's choice for a model of d_model 64
    data = json.loads(js.read_text())
    assert data["meta"]["threads"] == 1
    res = {r["config"]: r for r in data["results"]}
    assert set(res) == set(configs.split(","))
    for name, r in res.items():
        assert len(r["losses"]) == 6, name
        assert math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0, name
        assert r["median_step_ms"] > 0 and r["tokens_per_s"] > 0
        assert len(r["segments"]) == 4
        assert r["peak_memory_bytes"] > 0
    # strict ternary: zero float parameters, integer state only, <= 1.25 bytes/weight of training state
    tt = res["TrueTernary"]
    assert tt["float_params"] == 0 and tt["ternary_weights"] > 0
    # the optimiser's state is the normaliser's integer codes: 2 / 128 + 2 / 128**2 bytes per weight on matrices
    # of 128 x 128 and more (docs/learning.md), more on this tiny model's 64-wide ones
    codes = tt["optimizer_state_bytes"]
    assert 0 < codes <= 0.04 * tt["ternary_weights"]
    assert (tt["training_state_bytes"] - codes) / tt["ternary_weights"] <= 1.232
    assert tt["training_state_bytes_per_weight"] <= 1.25 + 0.04
    assert res["Adam_FP32"]["training_state_bytes_per_weight"] == pytest.approx(16.0, rel=1e-3)  # + AdamW step counters
    assert res["SignSGD_Old"]["optimizer_state_bytes"] == 0
    assert res["TrueTernary_Hybrid"]["float_params"] > 0
    assert png.stat().st_size > 1000
    # trit changes per step for every ternary-forward config (latent configs: their forward trits), none for Adam
    for name in ("BitNet_QAT", "SignSGD_Old", "TrueTernary"):
        assert len(res[name]["flips"]) == 6 and sum(res[name]["flips"]) > 0, name
        assert 0 < res[name]["zero_trit_fraction"] < 1, name
    assert not any(res["Adam_FP32"]["flips"]) and res["Adam_FP32"]["zero_trit_fraction"] is None
    assert res["BitNet_QAT"]["quantizer"] == "absmean" and res["TrueTernary"]["quantizer"] is None


def test_bench_latent_config_with_the_ternary_weight_format(tmp_path):
    """BitNet_QAT[quantizer=group_pow2]: AdamW behind TrueTernary's weight format (per-group trits x 2**E)."""
    js = tmp_path / "b.json"
    rc = main(["bench", "--configs", "BitNet_QAT[quantizer=group_pow2,lr=3e-3],SignSGD_Old[quantizer=group_pow2],"
               "BitNet_QAT", "--reuse-base", "--json", str(js), *TINY])
    assert rc == 0
    res = json.loads(js.read_text())["results"]
    assert [r["quantizer"] for r in res] == ["group_pow2", "group_pow2", "absmean"]
    assert [r["lr"] for r in res] == [3e-3, 1e-4, 3e-3]
    assert res[0]["losses"] != res[2]["losses"]  # the quantizer reached the forward
    assert all(math.isfinite(r["val_bpb"]) for r in res)


def test_bench_bracket_options_reach_their_config(tmp_path):
    """Bracket options reach their config and no other (--jobs children parse the same labels: the faults test
    below runs a bracketed config in a child)."""
    labels = ["BitNet_QAT[quantizer=group_pow2,wd=0]", "TrueTernary[norm_block=16,lr=3]", "TrueTernary"]
    js = tmp_path / "b.json"
    assert main(["bench", "--configs", ",".join(labels), "--reuse-base", "--json", str(js), *TINY]) == 0
    res = json.loads(js.read_text())["results"]
    assert [r["config"] for r in res] == labels
    qat, tuned, tt = res
    assert qat["weight_decay"] == 0 and qat["quantizer"] == "group_pow2"
    assert tuned["rule"]["norm_block"] == 16 and tuned["lr"] == 3 and tt["rule"]["norm_block"] == 128
    assert tuned["optimizer_state_bytes"] > tt["optimizer_state_bytes"] > 0  # the normaliser's codes, per tile


@pytest.mark.parametrize(
    "argv",
    [
        ["--configs", "Nope"],
        ["--configs", "BitNet_QAT[beta1=0.9]"],  # the diagnostic optimiser options are gone
        ["--configs", "BitNet_QAT[optimizer=tile_sgd]"],
        ["--configs", "BitNet_QAT[wd=-1]"],
        ["--configs", "TrueTernary[norm_block=0]"],
        ["--configs", "TrueTernary[norm_beta=1]"],
        ["--configs", "TrueTernary,BitNet_QAT", "--jobs", "2"],  # --jobs needs --reuse-base
        ["--jobs", "0"],
        ["--steps", "0"],
        ["--batch", "-1"],
        ["--accum-threshold", "0"],
        ["--accum-threshold", "300"],
        ["--rule", "vote=banana"],
        ["--rule", "nonsense"],
        ["--lr", "Nope=1"],
        ["--device", "tpu"],
        ["--data", "/definitely/not/here.txt"],
        ["--update-backend", "warp-drive"],
        ["--model", "nope"],
        ["--configs", "BitNet_QAT[quantizer=fp4]"],
        ["--configs", "BitNet_QAT[optimizer=lion]"],
        ["--configs", "SignSGD_Old[optimizer=tile_sgd]"],
        ["--configs", "Adam_FP32[quantizer=group_pow2]"],
        ["--configs", "TrueTernary[flip_reset=40]"],
        ["--configs", "TrueTernary[accum_init=random]"],
        ["--compile", "--model", "morph"],
        ["--lr", "TrueTernary=nan"],
        ["--lr", "Adam_FP32=-1e-3"],
        ["--lr", "Adam_FP32=inf"],
        ["--lr", "Adam_FP32=fast"],
        ["--lr", "TrueTernary_Naive=2"],  # the seed rule has no learning rate
        ["--configs", "TrueTernary[lr=nan]"],
        ["--configs", "Adam_FP32[lr=0]"],
        ["--model-config", "bogus=1"],
        ["--model-config", "d_model=32"],  # has its own flag
        ["--model-config", "vocab_size=10"],  # fixed by the byte data
        ["--model-config", "head_std=nan"],
        ["--model-config", "subln=3"],
        ["--model-config", "mlp_ratio=0"],
        ["--model-config", "mlp_ratio"],
        ["--model", "morph", "--model-config", "top_k=9"],
        ["--d-model", "0"],
        ["--n-layers", "0"],
        ["--n-heads", "3"],
        ["--eval-windows", "0"],
        ["--print-every", "-1"],
        ["--seed", "-1"],
        ["--scale-update-interval", "-1"],
        ["--group-size", "0"],
        ["--ctx", "100000000"],  # longer than the held-out text (refused before any model is built)
        ["--warmup-frac", "nan"],
        ["--min-lr-frac", "1.5"],
        ["--job-timeout", "-1"],
        ["--job-timeout", "nan"],
        ["--job-timeout", "inf"],
        ["--threads", "-1"],
        ["--threads", "2000"],
        ["--json", "."],  # a directory
        ["--plot", "curves.nope"],
    ],
    ids=lambda a: "_".join(a).strip("-"),
)
def test_bench_bad_flags_one_line_error(argv, capsys):
    rc = main(["bench", *TINY, *argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2 and "== " not in captured.out  # refused before any config ran
    assert err.startswith("trueternary: error:") and "\n" not in err and "Traceback" not in err


# ---- --jobs when jobs break: _bench_faults.job_main stands in for bench._job_main (the runner looks it up when
# it starts a job; each spawned child imports _bench_faults by name) and breaks the jobs its FAULTS names


def test_bench_jobs_report_failed_and_crashed_jobs_and_keep_the_others(tmp_path, capsys, monkeypatch):
    """A job that raises and one whose process is killed: the bench finishes, the table and the JSON say which
    and why, the valid job's result is there (its numbers, bracket options included, those of the same config
    run sequentially in this process: the same base model and batches in every job), exit code 3. --jobs 2 with
    three configs: the valid job starts in the slot a broken one left."""
    monkeypatch.setattr(bench, "_job_main", _bench_faults.job_main)
    js, ref = tmp_path / "b.json", tmp_path / "ref.json"
    labels = ["Adam_FP32[lr=0.00123]", "SignSGD_Old[lr=0.000123]", "TrueTernary[norm_block=16,lr=3]"]
    rc = main(["bench", "--configs", ",".join(labels), "--reuse-base", "--jobs", "2", "--json", str(js), *TINY])
    captured = capsys.readouterr()
    assert rc == bench.EXIT_JOBS_FAILED == 3
    data = json.loads(js.read_text())
    assert data["meta"]["jobs"] == 2
    res = data["results"]
    assert [r["config"] for r in res] == labels
    assert [r["status"] for r in res] == ["failed", "crashed", "ok"]
    failed, crashed = res[0], res[1]
    assert failed["error"] == "RuntimeError: injected fault" and "broken_run_config" in failed["traceback"]
    assert "SIGKILL" in crashed["error"]
    table = captured.out[captured.out.index("config "):]
    assert "failed   RuntimeError: injected fault" in table and "crashed  " in table and "SIGKILL" in table
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("trueternary: error: 2 of 3 configs did not finish") and "Traceback" not in captured.err
    assert main(["bench", "--configs", labels[2], "--json", str(ref), *TINY]) == 0
    want = json.loads(ref.read_text())["results"][0]
    assert res[2]["rule"]["norm_block"] == 16 and res[2]["lr"] == 3
    assert res[2]["losses"] == want["losses"] and res[2]["val_bpb"] == want["val_bpb"]


def test_bench_jobs_stop_a_job_without_progress(tmp_path, capsys, monkeypatch):
    """Jobs that report progress for 2 s and then stop are killed --job-timeout (1) seconds after their last
    progress, not after 1 s of running, and reported as timed out; the bench ends (exit 3) instead of waiting
    the 600 s they would sleep."""
    monkeypatch.setattr(bench, "_job_main", _bench_faults.job_main)
    js = tmp_path / "b.json"
    t0 = time.monotonic()
    rc = main(["bench", "--configs", "TrueTernary[lr=3.5],TrueTernary[lr=4.5]", "--reuse-base", "--jobs", "2",
               "--job-timeout", "1", "--json", str(js), *TINY])
    assert 3 < time.monotonic() - t0 < 60
    assert rc == 3
    res = json.loads(js.read_text())["results"]
    assert [r["status"] for r in res] == ["timeout", "timeout"]
    assert all(r["error"].startswith(f"no progress for 1 s (--job_timeout) after {_bench_faults.STALL_TICKS} progress")
               and math.isnan(r["val_bpb"]) for r in res)
    assert "timeout  no progress for 1 s" in capsys.readouterr().out


def test_bench_sequential_config_that_raises_is_reported(tmp_path, capsys, monkeypatch):
    """Without --jobs a config that raises is recorded the same way and the next config still runs."""
    real = bench.run_config

    def run_config(label, *args, **kwargs):
        if label == "Adam_FP32":
            raise MemoryError("injected")
        return real(label, *args, **kwargs)

    monkeypatch.setattr(bench, "run_config", run_config)
    js = tmp_path / "b.json"
    assert main(["bench", "--configs", "Adam_FP32,TrueTernary", "--reuse-base", "--json", str(js), *TINY]) == 3
    res = json.loads(js.read_text())["results"]
    assert [(r["status"], r.get("error")) for r in res] == [("failed", "MemoryError: injected"), ("ok", None)]
    assert len(res[1]["losses"]) == 6


def test_bench_model_config_error_names_the_valid_fields(capsys):
    assert main(["bench", *TINY, "--model-config", "bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'bogus'" in err and "mlp_ratio" in err and "head_std" in err


def test_bench_model_config_reaches_the_model(tmp_path):
    js = tmp_path / "b.json"
    assert main(["bench", *TINY, "--configs", "TrueTernary", "--model-config", "mlp_ratio=2,subln=false",
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())["results"][0]
    # d_model 64, 1 layer: qkv 64x192 + out 64x64 + mlp 2 x 64x128 + embedding/head 288x64 each
    assert r["ternary_weights"] == 64 * 192 + 64 * 64 + 2 * 64 * 128 + 2 * 288 * 64


def test_bench_takes_trains_flag_names_and_both_spellings(tmp_path, capsys):
    """train's names for the same things (--max_steps, --batch_size) and either spelling of every flag."""
    js = tmp_path / "b.json"
    argv = ["bench", "--configs", "TrueTernary", "--max_steps", "3", "--batch_size", "2", "--ctx", "16",
            "--d_model", "32", "--n-layers", "1", "--n_heads", "2", "--print_every", "0", "--eval_windows", "4",
            "--device", "cpu", "--threads", "1", "--json", str(js)]
    assert main(argv) == 0
    data = json.loads(js.read_text())
    args = data["meta"]["args"]
    assert (args["steps"], args["batch"], args["d_model"], args["n_layers"], args["threads"]) == (3, 2, 32, 1, 1)
    assert len(data["results"][0]["losses"]) == 3
    # no BitNet_QAT in the run: its "vs QAT" column says so instead of printing nan
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("TrueTernary "))
    assert "nan" not in row and "      - " in row


def test_bench_threads_are_trains_choice():
    """One function chooses the CPU threads of train, bench and generate (flags.cpu_threads); beside a GPU bench
    leaves torch's default, as train does."""
    import argparse

    import torch

    from trueternary.flags import cpu_threads

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = argparse.Namespace(threads=0, d_model=256), argparse.Namespace(threads=0, d_model=512)
    assert bench.bench_threads(small, cpu) == cpu_threads(0, 256) == 1
    assert bench.bench_threads(large, cpu) == cpu_threads(0, 512) == torch.get_num_threads()
    assert bench.bench_threads(argparse.Namespace(threads=3, d_model=64), cpu) == cpu_threads(3, 64) == 3
    assert bench.bench_threads(small, cuda) == torch.get_num_threads()


def test_bench_group_size_default_is_the_model_familys():
    """As train: without --group_size llama's configs take groups of 256 (exported exactly) and the other families
    64; --group_size wins."""
    from trueternary.cli import build_parser

    def group_size(*flags):
        return bench.hparams_from_args(build_parser("bench").parse_args(["bench", *TINY, *flags])).group_size

    assert (group_size(), group_size("--model", "morph"), group_size("--model", "llama")) == (64, 64, 256)
    assert group_size("--model", "llama", "--group_size", "64") == 64
    assert group_size("--model", "transformer", "--group-size", "256") == 256
