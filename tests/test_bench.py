"""The benchmark CLI end to end on a tiny config, and its one-line errors."""

from __future__ import annotations

import json
import math

import pytest

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
    data = json.loads(js.read_text())
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
               "BitNet_QAT[optimizer=tile_sgd,quantizer=group_pow2,lr=5e-3]", "--reuse-base", "--json", str(js), *TINY])
    assert rc == 0
    res = json.loads(js.read_text())["results"]
    assert [r["quantizer"] for r in res] == ["group_pow2"] * 3
    assert [r["qat_optimizer"] for r in res] == ["adamw", None, "tile_sgd"]
    assert res[2]["optimizer_state_bytes"] == 0
    assert all(math.isfinite(r["val_bpb"]) for r in res)


def test_bench_qat_optimizer_options_and_jobs(tmp_path):
    """The diagnostic optimiser options reach the optimiser, and --jobs 2 (configs in child processes)
    gives the numbers of the sequential run: the same base model and batches in every job."""
    labels = ["BitNet_QAT[quantizer=group_pow2,beta1=0,wd=0]",
              "BitNet_QAT[optimizer=tile_sgd,beta1=0.9,beta2=0.95,norm_block=16,lr=1e-3]", "TrueTernary"]
    configs = ",".join(labels)
    seq, par = tmp_path / "seq.json", tmp_path / "par.json"
    assert main(["bench", "--configs", configs, "--reuse-base", "--json", str(seq), *TINY]) == 0
    assert main(["bench", "--configs", configs, "--reuse-base", "--jobs", "2", "--json", str(par), *TINY]) == 0
    a, b = json.loads(seq.read_text()), json.loads(par.read_text())
    assert b["meta"]["jobs"] == 2
    assert [r["config"] for r in a["results"]] == [r["config"] for r in b["results"]] == labels
    for ra, rb in zip(a["results"], b["results"]):
        assert ra["losses"] == rb["losses"] and ra["val_bpb"] == rb["val_bpb"], ra["config"]
    qat, ts, tt = a["results"]
    assert qat["qat_betas"] == [0.0, 0.95] and qat["weight_decay"] == 0
    assert ts["qat_betas"] == [0.9, 0.95] and ts["optimizer_state_bytes"] > 0  # momentum + averaged statistics
    assert tt["optimizer_state_bytes"] > 0  # the normaliser's codes


@pytest.mark.parametrize(
    "argv",
    [
        ["--configs", "Nope"],
        ["--configs", "BitNet_QAT[beta1=1.5]"],
        ["--configs", "BitNet_QAT[wd=-1]"],
        ["--configs", "BitNet_QAT[optimizer=tile_sgd,norm_block=0]"],
        ["--configs", "TrueTernary[norm_beta=1]"],
        ["--configs", "BitNet_QAT[optimizer=tile_sgd,normalize_first=banana]"],
        ["--configs", "BitNet_QAT[normalize_first=1]"],  # only with optimizer=tile_sgd
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
    ],
    ids=lambda a: "_".join(a).strip("-"),
)
def test_bench_bad_flags_one_line_error(argv, capsys):
    rc = main(["bench", *TINY, *argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2 and "== " not in captured.out  # refused before any config ran
    assert err.startswith("trueternary: error:") and "\n" not in err and "Traceback" not in err
