"""``trueternary project``: the formulas equal bytes measured on real objects at small sizes."""

from __future__ import annotations

import re

import pytest

from trueternary.cli import main
from trueternary.project import (
    MEASURED_ROWS,
    ActivationMode,
    Shape,
    activation_formula,
    adam_fp32_bytes,
    autocast_weight_copy_bytes,
    cuda_attention_copy_bytes,
    measure,
    measure_activation_bytes,
    norm_block,
    norm_code_bytes,
    predict,
    shape_for_params,
    ternary_state_bytes_for_params,
)


@pytest.mark.parametrize("shape, group_size", [
    (Shape(32, 1, 2, ctx=8, batch=2), 64),
    (Shape(64, 2, 4, ctx=16, batch=1, mlp_ratio=3.0), 24),  # 64 % 24 != 0: short last groups
], ids=["d32-g64", "d64-g24-ragged"])
def test_formulas_equal_measured_bytes(shape, group_size):
    predicted, measured = predict(shape, group_size), measure(shape, group_size)
    assert set(key for key, _ in MEASURED_ROWS) <= set(measured)
    for key, label in MEASURED_ROWS:
        assert predicted[key] == measured[key], label
    assert measured["n_params_float"] == 0  # strict ternary: no nn.Parameter at all


def test_formulas_equal_measured_bytes_with_checkpointed_blocks():
    shape = Shape(64, 2, 4, ctx=16, batch=1, mlp_ratio=3.0)
    predicted, measured = predict(shape, 64, checkpointing=True), measure(shape, 64, checkpointing=True)
    for key in ("activations_fp32", "activations_bf16"):
        assert predicted[key] == measured[key], key
    assert measured["activations_bf16"] < measure_activation_bytes(shape, True, 64)


# shapes the formulas were not fitted on (nor checked on while fitting): odd heads, MLP ratio and vocabulary
UNFITTED = [Shape(80, 3, 5, ctx=10, batch=3, vocab_size=292, mlp_ratio=2.5),
            Shape(48, 4, 2, ctx=7, batch=2, vocab_size=288, mlp_ratio=4.0)]


def test_autocast_keeps_one_bf16_copy_of_each_linear_weight_for_backward():
    """Under bf16 autocast (the CPU's as CUDA's) the float model saves exactly the ternary model's activations
    plus one bf16 copy of each linear layer's weight (autocast caches the cast of a leaf fp32 weight; the matmul
    saves it); in fp32 it saves exactly what the ternary model saves."""
    from trueternary.models import build_model

    shape = UNFITTED[0]
    model = build_model("transformer", seed=0, **shape.model_kwargs())
    linear = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed"))
    assert autocast_weight_copy_bytes(shape) == 2 * linear
    assert measure_activation_bytes(shape, False, model=model) == measure_activation_bytes(shape, False)
    assert measure_activation_bytes(shape, True, model=model) == measure_activation_bytes(shape, True) + 2 * linear


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", UNFITTED, ids=["d80", "d48"])
def test_checkpointing_formula_equals_the_counted_saved_tensors_on_an_unfitted_shape(shape, autocast):
    mode = ActivationMode(autocast, checkpointing=True)
    assert activation_formula(mode).bytes(shape) == measure_activation_bytes(shape, mode)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_checkpointed_blocks_keep_their_float32_input_and_recompute_one_block(autocast):
    """Under checkpointing a forward keeps each block's input (float32 residual stream: 4 bytes per token and
    channel) and backward's recomputation holds one block's saved tensors besides: an L-layer model keeps what a
    1-layer model keeps without checkpointing, plus L - 1 more block inputs."""
    shape = UNFITTED[0]
    one_layer = Shape(shape.d_model, 1, shape.n_heads, shape.ctx, shape.batch, shape.vocab_size, shape.mlp_ratio)
    tokens = shape.batch * shape.ctx
    checkpointed = measure_activation_bytes(shape, ActivationMode(autocast, checkpointing=True))
    more_inputs = (shape.n_layers - 1) * tokens * 4 * shape.d_model
    assert checkpointed == measure_activation_bytes(one_layer, autocast) + more_inputs


@pytest.mark.slow  # ~40 s on a busy 2-core machine: the fit compiles 13 small models, the check 2 more
def test_compiled_formula_equals_the_counted_saved_tensors_on_an_unfitted_shape():
    mode = ActivationMode(True, compiled=True)
    for shape in UNFITTED:
        compiled = measure_activation_bytes(shape, mode)
        assert activation_formula(mode).bytes(shape) == compiled
        # the partitioner recomputes elementwise ops (norms, activations, casts) in backward instead of saving them
        assert compiled < 0.8 * measure_activation_bytes(shape, True)


def test_per_weight_numbers_of_the_seed_table():
    t = ternary_state_bytes_for_params(3e9, 64, 128)
    assert t["T_packed"] / 3e9 == pytest.approx(0.2)
    assert t["E"] / 3e9 == t["E_accum"] / 3e9 == pytest.approx(1 / 64)
    assert t["T_accum"] / 3e9 == 1.0
    assert t["norm_codes"] / 3e9 == pytest.approx(2 / 128 + 2 / 128**2)  # an int16 per tile, int8 per tile row/col
    assert t["training"] / 3e9 == pytest.approx(1 + 0.2 + 2 / 64 + 2 / 128 + 2 / 128**2)
    assert ternary_state_bytes_for_params(3e9, 64)["training"] / 3e9 == pytest.approx(1 + 0.2 + 2 / 64)
    assert t["inference"] / 3e9 == pytest.approx(0.2 + 1 / 64)
    a = adam_fp32_bytes(3e9)  # fp32 weights, m and v; an fp32 gradient; served in bf16
    assert a["training"] / 3e9 == 12 and a["inference"] / 3e9 == 2 and a["gradient"] / 3e9 == 4


def test_the_default_rule_keeps_codes_of_tile_128_and_norm_beta_0_none():
    from trueternary import FlipRule

    assert norm_block() == FlipRule().norm_block == 128
    assert norm_block(FlipRule(norm_beta=0)) is None


@pytest.mark.parametrize("rows, cols, block", [(128, 128, 128), (288, 128, 128), (300, 70, 64), (5, 7, 128),
                                               (256, 512, 16)])
def test_norm_code_formula_equals_the_codes_the_optimiser_creates(rows, cols, block):
    from trueternary.rule import empty_norm_codes

    codes = empty_norm_codes((rows, cols), block, "meta")
    assert norm_code_bytes(rows, cols, block) == sum(t.numel() * t.element_size() for t in codes.values())


def test_shape_for_params_is_close():
    for p in (1e6, 1e8, 3e9, 7e10):
        s = shape_for_params(p)
        assert 0.7 < s.n_weights() / p < 1.4 and s.d_model % s.n_heads == 0


def test_project_cli(capsys):
    assert main(["project", "--params", "3e9", "--group-size", "64", "--batch_size", "1", "--measure", "2e4"]) == 0
    out = capsys.readouterr().out
    assert "T_packed (5 trits per byte)" in out and "0.2000" in out
    # the training state the README and audit state: trits, accumulators, scales and the normaliser's codes
    assert "normaliser codes (per 128x128 tile)" in out and "0.0157" in out
    assert "training state total                               1.2470" in out and "12.0000" in out
    assert "Adam_FP32 (AdamW fp32)" in out and "bf16 weight copies autocast saves" in out
    assert "the ternary state stays 1.247 B/weight" in out
    assert "activations saved for backward" in out and "weight gradient" in out
    assert "every formula equals its measurement" in out

    def gib(label: str) -> list[float]:  # a row's totals (TrueTernary and/or Adam_FP32), in GiB
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        return [float(v) / (1024 if unit == "MiB" else 1) for v, unit in re.findall(r"([0-9.]+) (GiB|MiB)", line)]

    # an eager AdamW step holds the larger of (activations + weight copies) and the gradient, not their sum
    state, grad = gib("training state total")[1], gib("weight gradient")[1]
    (copies,), act = gib("bf16 weight copies"), gib("activations saved for backward, bf16")[1]
    attn = gib("CUDA attention's q, k, v copies")
    assert attn[0] == attn[1] > 0  # the same architecture keeps the same copies, whatever its weights
    act += attn[1]
    assert gib("training total with these")[1] == pytest.approx(state + grad + copies + act, abs=0.02)
    assert gib("... eager step")[1] == pytest.approx(state + max(grad, copies + act), abs=0.02)
    assert gib("... eager step")[0] == gib("training total with these")[0]


def test_cuda_attention_copies_are_q_k_v_in_bf16_per_block_and_none_when_compiled():
    """6 bytes per token per d per block (bf16 q, k, v), one block under checkpointing, none compiled; the 151M
    shape of docs/scaling.md gives the 576 MiB its measured 568 MiB is checked against there."""
    s = Shape(1024, 12, 16, ctx=512, batch=16)
    assert cuda_attention_copy_bytes(s) == 576 * 2**20 == 3 * 2 * 1024 * 16 * 512 * 12
    assert cuda_attention_copy_bytes(s, checkpointing=True) * 12 == cuda_attention_copy_bytes(s)
    assert cuda_attention_copy_bytes(s, compiled=True) == cuda_attention_copy_bytes(s, True, True) == 0


def test_project_cli_with_checkpointing(capsys):
    assert main(["project", "--params", "2e7", "--d_model", "256", "--n_layers", "4", "--batch", "2", "--ctx", "64",
                 "--activation_checkpointing", "--measure", "2e4"]) == 0
    out = capsys.readouterr().out
    assert "blocks checkpointed, shared ops eager" in out and "each block's input" in out
    assert "tokens * (4*n_layers*d + " in out  # the float32 block inputs, once per layer
    assert "every formula equals its measurement" in out


def test_project_flags():
    import argparse

    from trueternary.arguments import project_arguments

    p = argparse.ArgumentParser()
    project_arguments(p)
    args = p.parse_args([])
    assert args.activation_checkpointing is False and args.compile is False
    args = p.parse_args(["--activation_checkpointing", "--compile"])
    assert args.activation_checkpointing is True and args.compile is True


@pytest.mark.parametrize("flags", [["--params", "0"], ["--group_size", "0"], ["--batch", "0"],
                                   ["--measure", "abc"], ["--measure", "1e12"],
                                   ["--d_model", "100", "--n_heads", "3"], ["--params", "1e30"], ["--params", "nan"],
                                   ["--params", "inf"], ["--n_heads", "0"], ["--n_layers", "-1"],
                                   ["--ctx", str(2**24 + 1)], ["--d_model", str(2**21)], ["--batch", str(2**40)],
                                   ["--activation_checkpointing=yes"], ["--compile", "1"],
                                   ["--activation_checkpointing", "--d_model", "100", "--n_heads", "3"]])
def test_project_bad_flags(capsys, flags):
    assert main(["project", "--measure", "", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:") and err.count("\n") == 1


def test_project_params_bound_is_stated(capsys):
    assert main(["project", "--measure", "", "--params", "1e30"]) == 2
    assert "--params must be a number in [1, 1e+15], got 1e+30" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--params", "1e15"],
                                   ["--params", "1e15", "--d_model", str(2**20), "--n_layers", str(2**20),
                                    "--n_heads", "2", "--ctx", str(2**24), "--batch", str(2**20)]],
                         ids=["params-max", "every-shape-flag-max"])
def test_project_answers_in_little_memory_at_the_bounds(capsys, flags):
    """The tables are closed formulas: at the largest accepted values (a million layers) the command allocates
    no more than at the default (it used to list every layer's matrices: 23.5 GB for --params 1e30)."""
    import tracemalloc

    activation_formula(False), activation_formula(True)  # the fit on small models, cached
    tracemalloc.start()
    try:
        assert main(["project", "--measure", "", *flags]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out = capsys.readouterr().out
    assert "Projected memory for 1e+15 weights" in out and peak < 5 * 2**20
