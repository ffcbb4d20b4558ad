"""audit(model) and its command-line entry point (audit.main)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trueternary import FlipRule, ternarize
from trueternary.audit import audit, format_audit, main
from trueternary.layers import TernaryLinear
from trueternary.models import build_model

KW = dict(ctx=8, d_model=16, n_layers=1, n_heads=2)


def test_ternarised_transformer_has_zero_float_params():
    m = ternarize(build_model("transformer", 0, **KW), 8)
    r = audit(m)
    assert r["float_params"] == 0 and r["float_param_bytes"] == 0
    # embed 288x16, qkv 48x16, proj 16x16, up 64x16, down 16x64, head 288x16
    assert r["ternary_weights"] == 288 * 16 * 2 + 48 * 16 + 16 * 16 + 64 * 16 * 2
    assert r["ternary_matrices"] == 6
    assert r["ternary_training_state_bytes"] == sum(
        b.numel() * b.element_size() for n, b in m.named_buffers() if n.startswith(("embed", "blocks", "head")))
    assert r["float_buffers"] == m.rope_cos.numel() * 2
    text = format_audit(r, "transformer")
    assert "float params" in text and "rope_cos" in text


def test_float_model_and_mixed_states_are_counted():
    m = build_model("transformer", 0, **KW)
    r = audit(m)
    assert r["float_params"] == sum(p.numel() for p in m.parameters()) and r["ternary_weights"] == 0
    holder = nn.Module()
    holder.t = TernaryLinear(4, 3, bias=True)
    holder.norm = nn.LayerNorm(3)
    holder.norm.weight.requires_grad_(False)
    holder.register_buffer("scale", torch.ones(5))
    r = audit(holder)
    assert r["integer_biases"] == 3
    assert r["float_params"] == 3 and r["float_param_names"] == ["norm.bias"]
    assert r["frozen_params"] == 3 and r["frozen_param_names"] == ["norm.weight"]
    assert r["float_buffers"] == 5 and r["float_buffer_list"][0]["name"] == "scale"
    with pytest.raises(TypeError):
        audit("model")


def test_cli_prints_report_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "audit.json"
    rc = main(["--model", "morph", "--ctx", "8", "--d-model", "16", "--n_layers", "1", "--n-heads", "2",
               "--group_size", "8", "--json", str(out), "--require-zero-float"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "TrueTernary as trueternary train builds it (group size 8)" in text
    assert "float params                        0" in text
    data = json.loads(out.read_text())
    assert data["float_params"] == 0 and data["ternary_weights"] > 0


def test_cli_float_model_with_require_zero_float_exits_1(capsys):
    rc = main(["--model", "transformer", "--float", "--ctx", "8", "--d-model", "16", "--n-layers", "1",
               "--n-heads", "2", "--require_zero_float"])
    assert rc == 1
    assert "float base model" in capsys.readouterr().out


def test_cli_default_is_what_train_builds_by_default(capsys):
    """No flags: the model ``trueternary train`` builds with its defaults (TrueTernary, transformer d=128 L=2,
    466,944 weights: the README's), with the state its FlipOptimizer keeps once it has voted."""
    from trueternary.memory import training_state
    from trueternary.train import TrainConfig, build_training_recipe, hparams_for, model_config

    assert main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("audit: transformer d=128 L=2 heads=4 ctx=64, TrueTernary as trueternary train builds it")
    cfg = TrainConfig(update_backend="dense-fallback")
    recipe = build_training_recipe(cfg, hparams_for(cfg), model_config(cfg), torch.device("cpu"))
    state = training_state(recipe.model, recipe.optimizers)
    assert f"ternary weights               {466_944:,}" in text
    assert f"training-state bytes          {state['total']:,}" in text
    assert state["optimizer"] > 0 and state["float_params"] == 0


def test_cli_checkpoint_is_audited_as_saved(tmp_path, capsys):
    """--ckpt (or --checkpoint / --resume, a file or a run directory): the model and optimiser state of a
    checkpoint; its training state is every tensor in the file (what ``info`` counts), and equals the state of
    the model the same flags build once it has stepped."""
    from _train_helpers import tiny_config
    from trueternary import checkpoint as ckpt_io
    from trueternary.train import train

    cfg = tiny_config(tmp_path, max_steps=2)
    train(cfg)
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "run"
    path = ckpt_io.latest_checkpoint(run_dir)
    js = tmp_path / "a.json"
    assert main(["--ckpt", str(path), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"audit: {path}: TrueTernary at step 2, transformer d=32 L=1")
    saved = json.loads(js.read_text())
    ckpt = ckpt_io.load_checkpoint(path)
    assert saved["training_state_bytes"] == sum(t.numel() * t.element_size() for t in ckpt.tensors.values())
    for flag in ("--checkpoint", "--resume"):
        assert main([flag, str(run_dir), "--json", str(js)]) == 0
        assert json.loads(js.read_text()) == saved
    built = tmp_path / "b.json"
    assert main(["--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--ctx", "16", "--json", str(built)]) == 0
    built = json.loads(built.read_text())
    for key in ("ternary_weights", "ternary_inference_bytes", "optimizer_state_bytes", "training_state_bytes"):
        assert built[key] == saved[key], key


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nope"], "unknown --model"),
    (["--d-model", "0"], "--d_model must be a positive integer"),
    (["--d_model", "30", "--n_heads", "4"], "n_heads"),
    (["--group-size", "0"], "--group_size"),
    (["--bogus"], "unrecognized arguments"),
    (["--ckpt", "/nonexistent/step_0000001.safetensors"], "checkpoint not found"),
    (["--ckpt", "x.safetensors", "--d_model", "64"], "--d_model cannot change it"),
], ids=["model", "d-model", "heads", "group-size", "flag", "missing-ckpt", "ckpt-and-shape"])
def test_cli_bad_input_is_one_line_exit_2(argv, msg, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit from the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:") and msg in err and err.count("\n") == 1, err


def test_cli_unwritable_json_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["--model", "transformer", "--ctx", "8", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
               "--json", str(blocker / "audit.json")])
    assert rc == 2 and "cannot write" in capsys.readouterr().err


def test_audit_counts_the_codes_flip_optimizer_keeps():
    """The optimiser-state line is what a FlipOptimizer with the default rule really holds after a step."""
    from trueternary import FlipOptimizer

    m = ternarize(build_model("transformer", 0, ctx=8, d_model=32, n_layers=1, n_heads=2), 8)
    r = audit(m)
    opt = FlipOptimizer(m)
    before = audit(m, [opt])  # counted before its first vote too: the state a run holds from step 1 on
    idx = torch.randint(0, 256, (2, 8))
    torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    assert r["optimizer_state_bytes"] == before["optimizer_state_bytes"] == opt.state_bytes() > 0
    assert audit(m, [opt])["training_state_bytes"] == r["training_state_bytes"] == before["training_state_bytes"]
    assert r["training_state_bytes"] == r["ternary_training_state_bytes"] + r["optimizer_state_bytes"]
    assert audit(m, rule=FlipRule(norm_beta=0))["optimizer_state_bytes"] == 0  # the history-less rule keeps none
