"""``trueternary generate``: inference from T_packed + E only, equal to the trained model, bytes reported."""

from __future__ import annotations

import pytest
import torch

from _train_helpers import tiny_config
from trueternary import checkpoint as ckpt_io
from trueternary.cli import main
from trueternary.generate import held_bytes, load_for_inference, sample
from trueternary.models import build_model
from trueternary.recipes import build_recipe
from trueternary.train import hparams_for, train
from trueternary.weight import ternary_weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny checkpoints of a strict, a hybrid and a float config."""
    tmp = tmp_path_factory.mktemp("gen")
    out = {}
    for config in ("TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"):
        train(tiny_config(tmp, config=config, max_steps=4, run_name=config))
        out[config] = ckpt_io.latest_checkpoint(tmp / "runs" / config)
    return out


def _full_model(path):
    """The checkpoint restored the training way: a full recipe with every buffer."""
    ck = ckpt_io.load_checkpoint(path)
    cfg = tiny_config(path.parent, config=ck.recipe)
    base = build_model("transformer", **ck.meta["model"]["config"])
    recipe = build_recipe(ck.recipe, base, hparams_for(cfg))
    ckpt_io.restore_recipe(recipe, ck)
    return recipe.model.eval()


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"])
def test_inference_model_equals_trained_model(runs, config):
    model, meta = load_for_inference(runs[config])
    assert meta["recipe"] == config
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), _full_model(runs[config])(x))


def test_strict_inference_holds_only_T_packed_and_E(runs):
    model, _ = load_for_inference(runs["TrueTernary"])
    tw = ternary_weights(model)
    assert tw and all(w.inference_only for w in tw)
    for w in tw:
        assert w.T_accum.numel() == w.E_accum.numel() == 0
    held = held_bytes(model)
    assert held["training_state"] == 0
    assert held["ternary_inference"] == sum(w.T_packed.numel() + w.E.numel() for w in tw)
    assert not list(model.parameters())
    # everything else the model holds is the two rotary tables (not loaded, recomputed)
    rope = model.rope_cos.numel() * 4 + model.rope_sin.numel() * 4
    assert held["total"] == held["ternary_inference"] + rope


def test_sampling_is_seeded_and_greedy_is_deterministic(runs):
    model, _ = load_for_inference(runs["TrueTernary"])
    a = sample(model, b"the quick", 20, temperature=1.0, top_k=5, seed=3)
    b = sample(model, b"the quick", 20, temperature=1.0, top_k=5, seed=3)
    assert a == b and len(a) == 20
    g1 = sample(model, b"x" * 40, 10, temperature=0)  # prompt longer than ctx 16 is cropped
    assert g1 == sample(model, b"x" * 40, 10, temperature=0, seed=9)
    assert sample(model, b"", 3, temperature=0.5, top_k=1) == sample(model, b"\n", 3, temperature=0)


def test_generate_cli_prints_text_and_inference_bytes(runs, capsys):
    path = runs["TrueTernary"]
    assert main(["generate", "--ckpt", str(path), "--prompt", "the ", "--max_new_tokens", "12", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the ")
    model, _ = load_for_inference(path)
    n = sum(w.inference_bytes() for w in ternary_weights(model))
    assert f"inference state held: {n:,} bytes of ternary weights" in err
    assert "training state held: 0 bytes" in err


def test_generate_float_checkpoint(runs, capsys):
    assert main(["generate", "--ckpt", str(runs["Adam_FP32"]), "--max_new_tokens", "5"]) == 0
    assert "float weights" in capsys.readouterr().err


@pytest.mark.parametrize("flags, msg", [
    (["--max_new_tokens", "-1"], "--max_new_tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top_k", "-2"], "--top_k"),
    (["--device", "tpu"], "device"),
])
def test_generate_bad_flags(runs, capsys, flags, msg):
    assert main(["generate", "--ckpt", str(runs["TrueTernary"]), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:") and msg in err and err.count("\n") == 1


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _with_scales(src, dst, edit):
    ck = ckpt_io.load_checkpoint(src)
    tensors = {k: v.clone() for k, v in ck.tensors.items()}
    edit(tensors)
    return ckpt_io.save_checkpoint(dst, tensors, {k: v for k, v in ck.meta.items() if k != "tensor_sha256"})


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Hybrid"])
def test_scales_that_overflow_the_logits_are_a_one_line_error(runs, tmp_path, capsys, config):
    """Scales within their bounds (E <= 127; a finite float log2_scale) whose products overflow float32: the
    logits are inf/NaN, which softmax would turn into NaN probabilities (a traceback): one line, exit 2."""
    def huge(tensors):  # the output layer's scales (earlier ones would be normalised away)
        for k, v in tensors.items():
            if k == "model/head.weight.E":
                v.fill_(127)
            elif k == "model/head.weight.log2_scale":
                v.fill_(200.0)

    bad = _with_scales(runs[config], tmp_path / "big.safetensors", huge)
    for temperature in ("0", "0.8"):
        assert main(["generate", "--ckpt", str(bad), "--max_new_tokens", "3", "--temperature", temperature]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("trueternary: error:") and err.count("\n") == 1 and out == ""
        assert str(bad) in err and "logits are not finite" in err
    model, _ = load_for_inference(runs[config])
    assert len(sample(model, b"a", 3)) == 3  # the check passes finite logits
