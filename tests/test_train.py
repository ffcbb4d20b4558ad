"""``trueternary.train``: resume bit-identity, the run directory, refusal to overwrite, divergence."""

from __future__ import annotations

import json

import pytest
import torch

from _train_helpers import TINY, tiny_config
from trueternary import checkpoint as ckpt_io
from trueternary.cli import UsageError, main
from trueternary.recipes import Recipe
from trueternary.train import TrainingError, read_metrics, train

TIMING_KEYS = ("tokens_per_s", "elapsed_s", "peak_memory_bytes")  # measured, not computed: differ run to run


def _final_tensors(run_dir):
    return ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run_dir)).tensors


def _metric_rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir)]


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"])
def test_resume_is_bit_identical(tmp_path, config):
    """8 steps straight == 4 steps, save, fresh objects from the checkpoint, 4 more steps: every tensor,
    every loss and every metrics row identical (float configs included: AdamW state is in the file)."""
    straight = train(tiny_config(tmp_path, config=config, max_steps=8, run_name="straight", eval_every=2))
    first = train(tiny_config(tmp_path, config=config, max_steps=8, run_name="split", eval_every=2, stop_at=4))
    assert first["end_step"] == 4 and len(first["losses"]) == 4
    second = train(tiny_config(tmp_path, config=config, max_steps=8, run_name="split", eval_every=2, resume="auto"))
    assert second["start_step"] == 4 and len(second["losses"]) == 4
    assert first["losses"] + second["losses"] == straight["losses"]

    a, b = _final_tensors(tmp_path / "runs" / "straight"), _final_tensors(tmp_path / "runs" / "split")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if config == "Adam_FP32":
        assert any(n.startswith("optim/0/") and n.endswith("exp_avg_sq") for n in a)
    assert _metric_rows(tmp_path / "runs" / "straight") == _metric_rows(tmp_path / "runs" / "split")


def test_group_size_default_is_the_model_familys():
    """Without --group_size a llama run takes groups of 256 (llama.cpp's block: its default run exports exactly)
    and every other family 64, as the help says; a group size given always wins, and a family's default is not a
    flag given (explicit_fields: what train() compares with a resumed checkpoint)."""
    from trueternary.cli import build_parser
    from trueternary.trainconfig import TrainConfig, config_from_args, explicit_fields, hparams_for

    def parsed(*flags):
        return config_from_args(build_parser("train").parse_args(["train", *flags]))

    for model, want in (("transformer", 64), ("morph", 64), ("llama", 256)):
        cfg, given = parsed("--model", model)
        assert cfg.group_size == TrainConfig(model=model).group_size == hparams_for(cfg).group_size == want, model
        assert "group_size" not in given and "group_size" not in explicit_fields(cfg)
        for g in (64, 256):
            cfg, given = parsed("--model", model, "--group_size", str(g))
            assert cfg.group_size == TrainConfig(model=model, group_size=g).group_size == g and "group_size" in given
            assert ("group_size" in explicit_fields(cfg)) == (g != want)
    assert TrainConfig().group_size == 64
    train_parser = next(a for a in build_parser("train")._actions if a.dest == "command").choices["train"]
    assert "GROUP_SIZE weights per int8 scale E (default: 64; 256 for --model llama)" in \
        " ".join(train_parser.format_help().split())


def test_llama_run_of_groups_of_64_resumes_without_the_flag(tmp_path, capsys):
    """A llama checkpoint with groups of 64 (every llama run's before 256 became the family's default) continues
    without a group size given, from train() (TrainConfig(model="llama")) and from ``train --resume``,
    bit-identically to a straight run; --group_size 256 is refused."""
    straight = tmp_path / "runs" / "straight"
    train(tiny_config(tmp_path, model="llama", group_size=64, run_name="straight", eval_every=2))
    train(tiny_config(tmp_path, model="llama", group_size=64, run_name="split", eval_every=2, stop_at=2))
    train(tiny_config(tmp_path, model="llama", run_name="split", eval_every=2, stop_at=4, resume="auto"))
    resume = ["train", "--resume", "auto", "--run_name", "split", "--out_dir", str(tmp_path / "runs"), "--model",
              "llama"]
    assert main([*resume, "--group_size", "256"]) == 2
    assert "--group_size 256 (checkpoint: 64)" in capsys.readouterr().err
    assert main(resume) == 0
    split = tmp_path / "runs" / "split"
    meta = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(split)).meta
    assert meta["step"] == TINY["max_steps"] and meta["hparams"]["group_size"] == 64
    assert meta["train_config"]["group_size"] == 64
    a, b = _final_tensors(straight), _final_tensors(split)
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    assert _metric_rows(straight) == _metric_rows(split)


def test_run_directory_layout(tmp_path):
    res = train(tiny_config(tmp_path, max_steps=6, save_every=2, eval_every=3, keep_checkpoints=2))
    run = tmp_path / "runs" / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["model"]["config"]["d_model"] == 32
    assert cfg["hparams"]["rule"]["accum_threshold"] >= 1 and cfg["data"]["train_bytes"] > 0
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "train_bpb", "lr", "flips", "tokens_per_s", "elapsed_s"} <= set(steps[0])
    assert [r["step"] for r in rows if "val_bpb" in r] == [0, 3, 6]
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [p.name for p in ckpt_io.list_checkpoints(run)]
    assert names == ["step_0000004.safetensors", "step_0000006.safetensors"]  # keep_checkpoints=2
    assert res["checkpoint"].endswith("step_0000006.safetensors")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (run / "tensorboard").exists()  # optional dependency: skipped silently


def test_fresh_run_never_overwrites_checkpoints(tmp_path):
    train(tiny_config(tmp_path, max_steps=2))
    before = ckpt_io.latest_checkpoint(tmp_path / "runs" / "run").read_bytes()
    with pytest.raises(UsageError, match=r"already holds a run \(config.json, metrics.jsonl, plot.png; 1 checkpoint"):
        train(tiny_config(tmp_path, max_steps=2))
    assert ckpt_io.latest_checkpoint(tmp_path / "runs" / "run").read_bytes() == before


def test_resume_rejects_changed_run_defining_flags(tmp_path):
    train(tiny_config(tmp_path, max_steps=4, stop_at=2))
    with pytest.raises(UsageError, match="batch_size"):
        train(tiny_config(tmp_path, max_steps=4, batch_size=8, resume="auto"))
    with pytest.raises(UsageError, match="exceeds the model's context 16"):
        train(tiny_config(tmp_path, max_steps=4, ctx=32, resume="auto"))


def test_resume_from_older_checkpoint_into_same_run_is_refused(tmp_path):
    train(tiny_config(tmp_path, max_steps=4, save_every=2, keep_checkpoints=0))
    older = ckpt_io.checkpoint_path(tmp_path / "runs" / "run", 2)
    with pytest.raises(UsageError, match="newer checkpoint"):
        train(tiny_config(tmp_path, max_steps=4, resume=str(older)))
    # branching off into another run directory is fine, and continues the same way
    res = train(tiny_config(tmp_path, max_steps=4, resume=str(older), run_name="branch"))
    assert res["start_step"] == 2 and res["end_step"] == 4


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, capsys):
    res = train(tiny_config(tmp_path, max_steps=2, resume="auto"))
    assert res["start_step"] == 0 and res["end_step"] == 2
    assert "starting a fresh run" in capsys.readouterr().out


def test_resume_needs_run_name_for_auto(tmp_path):
    with pytest.raises(UsageError, match="--run_name"):
        train(tiny_config(tmp_path, run_name=None, resume="auto"))


def test_divergence_is_a_one_line_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, max_steps=4, stop_at=2))
    good = ckpt_io.latest_checkpoint(tmp_path / "runs" / "run")
    monkeypatch.setattr(Recipe, "train_step", lambda self, x, y, autocast=False: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match="diverged at step 3"):
        train(tiny_config(tmp_path, max_steps=4, resume="auto"))
    assert ckpt_io.latest_checkpoint(tmp_path / "runs" / "run") == good
    ckpt_io.load_checkpoint(good)


def test_training_lowers_validation_bpb(tmp_path):
    """A sanity check that the loop trains (not a learning-quality test): 40 steps on repetitive text."""
    res = train(tiny_config(tmp_path, max_steps=40, batch_size=8, eval_every=0))
    assert res["val_bpb"] < res["initial_val_bpb"] - 0.5


def test_compile_trains_like_eager(tmp_path):
    """--compile (inductor on the CPU: it builds C++ extensions, so a C++ compiler and Python's headers are
    needed; skipped without them) runs the same loop; its float rounding differs from eager's, so the runs
    agree closely, not bit for bit."""
    import shutil
    import sysconfig
    from pathlib import Path

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("torch.compile's CPU backend needs Python's C headers")
    eager = train(tiny_config(tmp_path, max_steps=8, config="Adam_FP32", run_name="eager"))
    comp = train(tiny_config(tmp_path, max_steps=8, config="Adam_FP32", compile=True, run_name="compiled"))
    assert comp["val_bpb"] == pytest.approx(eager["val_bpb"], abs=2e-3)
    meta = json.loads((tmp_path / "runs" / "compiled" / "config.json").read_text())
    assert meta["train"]["compile"] is True


def test_cuda_graph_refuses_what_it_cannot_capture():
    """Recipe.use_cuda_graph: TrueTernary on the gpu backend on CUDA only (the capture itself runs on the GPU:
    tests/test_gpu.py checks replays against eager steps there)."""
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe
    from trueternary.rule import FlipRule

    base = build_model("transformer", ctx=8, d_model=16, n_layers=1, n_heads=2)
    x = torch.zeros(2, 8, dtype=torch.long)
    for name in ("TrueTernary", "Adam_FP32"):
        r = build_recipe(name, base, Hparams(steps=4))
        with pytest.raises(ValueError, match="needs a TrueTernary config"):
            r.use_cuda_graph(x, x, False)
    r = build_recipe("TrueTernary", base, Hparams(steps=4))
    r.flip.backend = "gpu"  # (refused by the constructor without CUDA)
    with pytest.raises(ValueError, match="runs on a CUDA device"):
        r.use_cuda_graph(x, x, False)
    r = build_recipe("TrueTernary", base, Hparams(steps=4, rule=FlipRule(normalize="tensor", norm_beta=0)))
    r.flip.backend = "gpu"
    with pytest.raises(ValueError, match="every vote on the fused kernels"):
        r.use_cuda_graph(x, x, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
def test_graphed_step_reports_nonfinite_gradients_as_a_nan_loss():
    """A CUDA-graphed step keeps the NaN/inf gradient check on the device: a step whose gradients are not finite
    returns a NaN loss and nonfinite_layers_last_step() counts the layers; the next clean replay reports 0."""
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe

    dev = torch.device("cuda")
    r = build_recipe("TrueTernary", build_model("transformer", ctx=8, d_model=32, n_layers=1, n_heads=2),
                     Hparams(steps=20), device=dev, backend="gpu")
    poison = torch.ones((), device=dev)
    forward = r.forward_model
    r.forward_model = lambda x: forward(x) * poison  # (captured: the graph reads poison at every replay)
    x = torch.randint(0, 256, (2, 8), device=dev)
    r.use_cuda_graph(x, x, True)
    assert torch.isfinite(r.train_step(x, x, True)) and r.nonfinite_layers_last_step() == 0
    poison.fill_(float("nan"))
    assert torch.isnan(r.train_step(x, x, True)) and r.nonfinite_layers_last_step() > 0
    poison.fill_(1.0)
    assert torch.isfinite(r.train_step(x, x, True)) and r.nonfinite_layers_last_step() == 0


def test_train_names_nonfinite_gradients_of_a_graphed_step(tmp_path, monkeypatch):
    """trueternary train turns a graphed step's NaN loss with non-finite layer gradients into the eager step's
    message (the graph cannot raise), and a plain NaN loss into 'loss nan'."""
    monkeypatch.setattr(Recipe, "train_step", lambda self, x, y, autocast=False: torch.tensor(float("nan")))
    monkeypatch.setattr(Recipe, "nonfinite_layers_last_step", lambda self: 2)
    with pytest.raises(TrainingError, match="at step 1: 2 layer gradient\\(s\\) had NaN/inf"):
        train(tiny_config(tmp_path, max_steps=3))
    monkeypatch.setattr(Recipe, "nonfinite_layers_last_step", lambda self: 0)
    with pytest.raises(TrainingError, match="at step 1: loss nan"):
        train(tiny_config(tmp_path, max_steps=3, run_name="plain"))


def test_cuda_graph_setting_is_true_false_or_auto(tmp_path, capsys):
    """cuda_graph: 'auto' (the default) trains eagerly where no graph can run (here: the CPU) and says nothing
    about it; anything but true/false/'auto' is a usage error."""
    s = train(tiny_config(tmp_path, max_steps=2))
    assert s["val_bpb"] is not None and "step:" not in capsys.readouterr().out
    meta = json.loads((tmp_path / "runs" / "run" / "config.json").read_text())
    assert meta["train"]["cuda_graph"] == "auto"
    with pytest.raises(UsageError, match="cuda_graph must be true, false or 'auto'"):
        train(tiny_config(tmp_path, cuda_graph="yes", run_name="bad"))


def test_train_step_keeps_the_device_lr_on_the_schedule():
    """With a device lr (what a graphed step reads), every train_step writes the schedule's lr into it."""
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe

    r = build_recipe("TrueTernary", build_model("transformer", ctx=8, d_model=16, n_layers=1, n_heads=2),
                     Hparams(steps=20, warmup_frac=0.5))
    r.flip.use_device_lr("cpu")
    x = torch.randint(0, 256, (2, 8))
    seen = []
    for _ in range(4):
        r.train_step(x, x, False)
        assert [float(t) for t in r.flip._lr_dev] == [float(torch.tensor(g["lr"])) for g in r.flip.param_groups]
        seen.append(float(r.flip._lr_dev[0]))
    assert len(set(seen)) == 4  # the warm-up moved it every step


def test_cuda_graph_warm_up_leaves_no_trace():
    """optim.train_step.warm_up_and_restore (run before a CUDA graph is captured): after its steps, the next real
    step is the one a fresh recipe takes, bit for bit, the moving averages' codes included; and the codes already
    exist before the warm-up (created inside a capture, every replay would start them afresh)."""
    from trueternary.models import build_model
    from trueternary.optim.train_step import warm_up_and_restore
    from trueternary.recipes import Hparams, build_recipe

    base = build_model("transformer", ctx=8, d_model=16, n_layers=1, n_heads=2)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    warmed, fresh = (build_recipe("TrueTernary", base, Hparams(steps=10), seed=1) for _ in range(2))
    assert not warmed.flip.state

    def whole_step():
        warmed.loss(x, x, False).backward()
        warmed.flip.step()

    warm_up_and_restore(warmed.model, warmed.flip, whole_step, 2, x.device)
    linear_weights = [m.weight for m in warmed.model.modules() if type(m).__name__ == "TernaryLinear"]
    assert len(warmed.flip.state) == len(linear_weights) and all(
        "norm_tile" in st for st in warmed.flip.state.values())  # codes for the linear layers, none for the embedding
    for r in (warmed, fresh):
        r.train_step(x, x, False)
    sw, sf = warmed.model.state_dict(), fresh.model.state_dict()
    assert [k for k in sw if not torch.equal(sw[k], sf[k])] == []
    cw, cf = warmed.flip.state_dict()["state"], fresh.flip.state_dict()["state"]
    assert cw.keys() == cf.keys() and all(torch.equal(cw[i][k], cf[i][k]) for i in cw for k in cw[i])
