"""Big models on one device: lazy models built without a float copy (trueternary.init), ternarisation in chunks,
activation checkpointing, and the memory report (trueternary.scaling). See docs/scaling.md."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import trueternary.weight as weight_mod
from trueternary import packing
from trueternary.convert import ternarize
from trueternary.init import is_lazy, materialize
from trueternary.layers import TernaryEmbedding, TernaryLinear
from trueternary.models import build_model
from trueternary.quant import group_absmean_log2, residual_accum
from trueternary.recipes import Hparams, build_recipe
from trueternary.scaling import main as scaling_main
from trueternary.scaling import measure_in_subprocess, parse_size
from trueternary.weight import TernaryScaleTensor, ternary_weights

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = dict(ctx=16, d_model=48, n_layers=2, n_heads=4)


def reference_state(w: torch.Tensor, group_size: int, accum_threshold: int | None):
    """The ternary state of float ``w`` by the whole-matrix reference quantiser (quant.py), not load_float_."""
    T, E = group_absmean_log2(w, group_size)
    accum = residual_accum(w, T, group_size, accum_threshold) if accum_threshold else torch.zeros_like(T)
    return packing.pack_trits(T), E, accum


# ------------------------------------------------------------------------------------ ternarisation in chunks
@pytest.mark.parametrize("rows,cols,group_size", [(7, 13, 4), (33, 64, 64), (50, 7, 3), (3, 3, 2)])
@pytest.mark.parametrize("zeros", ["none", "some groups", "all"])
def test_load_float_in_chunks_equals_the_whole_matrix_reference(monkeypatch, rows, cols, group_size, zeros):
    """load_float_ ternarises a few rows at a time (LOAD_CHUNK weights): trits, scales and starting accumulators
    equal the whole-matrix reference bit for bit, including an all-zero group's scale (the matrix's smallest,
    which a chunk alone does not know)."""
    monkeypatch.setattr(weight_mod, "LOAD_CHUNK", 37)  # several chunks per matrix
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    if zeros == "some groups":
        w[1:3, :group_size] = 0  # all-zero groups in the first chunk; the smallest scale lies in another
        w[-1, -1] = 0
    elif zeros == "all":
        w.zero_()
    for threshold in (None, 8):
        t = TernaryScaleTensor(rows, cols, group_size, init=False)
        t.load_float_(w, threshold)
        packed, E, accum = reference_state(w, group_size, threshold)
        assert torch.equal(t.T_packed, packed) and torch.equal(t.E, E) and torch.equal(t.T_accum, accum)
        assert not t.E_accum.any()


def test_load_float_refuses_non_finite_weights_before_writing():
    t = TernaryScaleTensor(20, 8, 4, init=False)
    t.load_float_(torch.randn(20, 8))
    before = {k: v.clone() for k, v in t.state_dict().items()}
    w = torch.randn(20, 8)
    w[-1, -1] = float("nan")  # in the last chunk: nothing may have been written when it is found
    with pytest.raises(ValueError, match="NaN or inf"):
        t.load_float_(w)
    with pytest.raises(ValueError, match="accum_threshold"):
        t.load_float_(torch.randn(20, 8), accum_threshold=0)
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


# ------------------------------------------------------------------------------------ lazy models
def test_lazy_model_holds_no_weights_and_materializes_to_the_eager_model():
    lazy = build_model("transformer", seed=5, lazy=True, **SMALL)
    assert is_lazy(lazy) and all(p.is_meta for p in lazy.parameters())
    assert not lazy.rope_cos.is_meta  # derived buffers are real
    eager = build_model("transformer", seed=5, **SMALL)
    torch.testing.assert_close(lazy.rope_cos, eager.rope_cos, rtol=0, atol=0)
    materialize(lazy)
    assert not is_lazy(lazy)
    got, want = lazy.state_dict(), eager.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not is_lazy(build_model("morph", lazy=True))  # a family without init_plan() is built eagerly


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Naive", "TrueTernary_Hybrid", "Adam_FP32",
                                    "BitNet_QAT"])
def test_recipe_from_a_lazy_base_equals_the_eager_one(monkeypatch, config):
    """Every config built from a lazy base has exactly the state it has from the eager float base, and the lazy
    base stays lazy (build_recipe works on a copy)."""
    monkeypatch.setattr(weight_mod, "LOAD_CHUNK", 100)
    hp = Hparams(steps=4, group_size=24)  # d_model 48: two groups per row; d_hidden 192: eight
    lazy = build_model("transformer", seed=3, lazy=True, **SMALL)
    got = build_recipe(config, lazy, hp).model.state_dict()
    want = build_recipe(config, build_model("transformer", seed=3, **SMALL), hp).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert is_lazy(lazy)


def test_lazy_ternary_state_equals_the_reference_ternarisation_of_the_float_init(monkeypatch):
    """The float-then-ternarise semantics, checked against the reference quantiser directly: each layer's trits,
    scales and starting accumulators (the rounding residual of its float init) are those of the eager float model's
    weight; the skipped head keeps exactly the float weight."""
    monkeypatch.setattr(weight_mod, "LOAD_CHUNK", 100)
    eager = build_model("transformer", seed=11, **SMALL)
    lazy = build_model("transformer", seed=11, lazy=True, **SMALL)
    with pytest.warns(UserWarning, match="froze 1 non-ternary"):
        ternarize(lazy, 16, accum_threshold=6, skip=("head",))
    assert not is_lazy(lazy)
    for name, _ in eager.init_plan():
        layer = lazy.get_submodule(name)
        w = eager.get_submodule(name).weight.detach()
        if name == "head":
            assert isinstance(layer, nn.Linear) and torch.equal(layer.weight, w)
            continue
        assert isinstance(layer, TernaryEmbedding if name == "embed" else TernaryLinear)
        packed, E, accum = reference_state(w, 16, 6)
        assert torch.equal(layer.weight.T_packed, packed), name
        assert torch.equal(layer.weight.E, E) and torch.equal(layer.weight.T_accum, accum), name


def test_lazy_model_refusals():
    lazy = build_model("transformer", seed=0, lazy=True, **SMALL)
    lazy.head = nn.Linear(48, 288, bias=True, device="meta")
    with pytest.raises(ValueError, match="has a bias"):
        ternarize(lazy)
    with torch.device("meta"):
        hand_made = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not built lazily"):
        ternarize(hand_made)


BUILD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from trueternary.convert import ternarize
    from trueternary.models import build_model
    from trueternary.weight import ternary_weights

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    d, layers = int(sys.argv[1]), int(sys.argv[2])
    warm = build_model("transformer", seed=0, lazy=True, d_model=d, n_layers=1, n_heads=8, ctx=8)
    ternarize(warm, accum_threshold=8)  # the code paths once (and the allocator's first blocks)
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS:")
    t = time.time()
    model = build_model("transformer", seed=0, lazy=True, d_model=d, n_layers=layers, n_heads=8, ctx=8)
    ternarize(model, accum_threshold=8)
    tw = ternary_weights(model)
    print(json.dumps({"growth": status("VmHWM:") - before, "weights": sum(w.numel() for w in tw),
                      "state": sum(w.training_state_bytes() for w in tw), "seconds": time.time() - t,
                      "dynamo": "torch._dynamo" in sys.modules}))
""")


def test_building_300M_weights_needs_little_more_than_their_ternary_state():
    """A 302M-weight transformer built lazily on the CPU: the process's peak resident memory grows by its ternary
    training state (1.23 B/weight) and a few of its largest layer's floats at most, not by the float model
    (4 B/weight, 8 with build_recipe's copy, as the float-then-ternarise path needed)."""
    d, layers = 1024, 24
    done = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(d), str(layers)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    largest_float_layer = 4 * 4 * d * d  # up / down: 4d x d float32
    assert r["weights"] > 300e6
    assert r["state"] / r["weights"] < 1.25
    assert r["growth"] < r["state"] + 4 * largest_float_layer + 32 * 2**20, r
    assert r["growth"] < 1.6 * r["weights"], r
    assert not r["dynamo"]  # the meta build draws nothing (init.meta_device): no 2 s import of torch._dynamo


# ------------------------------------------------------------------------------------ activation checkpointing
def run_steps(config: str, checkpointing: bool, steps: int = 3):
    base = build_model("transformer", seed=2, lazy=True, activation_checkpointing=checkpointing, **SMALL)
    recipe = build_recipe(config, base, Hparams(steps=steps), backend="dense-fallback", seed=4)
    assert recipe.model.activation_checkpointing is checkpointing
    g = torch.Generator().manual_seed(9)
    initial = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    losses = []
    for _ in range(steps):
        x, y = torch.randint(0, 256, (4, 16), generator=g), torch.randint(0, 256, (4, 16), generator=g)
        losses.append(recipe.train_step(x, y))
    return initial, losses, recipe


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"])
def test_activation_checkpointing_gives_the_same_steps_bit_for_bit(config):
    """Recomputing each block in backward casts the same votes with the same keys (votes are cast in backward only,
    once per layer): after three steps every trit, scale, accumulator, float weight, optimiser state and loss equals
    the run without checkpointing."""
    initial, losses_off, off = run_steps(config, False)
    _, losses_on, on = run_steps(config, True)
    assert all(torch.equal(a, b) for a, b in zip(losses_off, losses_on))
    got, want = on.model.state_dict(), off.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(initial[k], want[k]) for k in want)  # the steps did train
    if config != "Adam_FP32":
        tw_off, tw_on = ternary_weights(off.model), ternary_weights(on.model)
        assert any(not torch.equal(initial[k], want[k]) for k in want if k.endswith("T_packed"))  # trits flipped
        assert all(torch.equal(a.T_accum, b.T_accum) and torch.equal(a.E_accum, b.E_accum)
                   for a, b in zip(tw_off, tw_on))
    for o_off, o_on in zip(off.optimizers, on.optimizers):
        s_off, s_on = o_off.state_dict()["state"], o_on.state_dict()["state"]
        assert s_off.keys() == s_on.keys()
        for k in s_off:
            for name, v in s_off[k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(s_on[k][name])), (k, name)


def test_activation_checkpointing_recomputes_each_block_and_keeps_less():
    """With checkpointing a training step runs every block's forward twice and autograd keeps far fewer bytes;
    without grad (evaluation) nothing is recomputed."""
    def forward_counts_and_saved_bytes(checkpointing: bool):
        model = ternarize(build_model("transformer", seed=0, activation_checkpointing=checkpointing, **SMALL))
        calls = []
        for blk in model.blocks:
            blk.register_forward_pre_hook(lambda *_: calls.append(1))  # (a recompute may stop early)
        saved = []
        x = torch.randint(0, 256, (4, 16))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(x).float().square().mean()
        loss.backward()
        training_calls = len(calls)
        with torch.no_grad():
            model(x)
        return training_calls, len(calls) - training_calls, sum(saved)

    plain = forward_counts_and_saved_bytes(False)
    ckpt = forward_counts_and_saved_bytes(True)
    assert plain[:2] == (2, 2) and ckpt[:2] == (4, 2)
    assert ckpt[2] < plain[2] / 2
    with pytest.raises(ValueError, match="activation checkpointing is implemented for the transformer"):
        build_model("morph", activation_checkpointing=True)


# ------------------------------------------------------------------------------------ memory report
@pytest.mark.slow  # two fresh Python processes with torch (~20 s on a busy 2-core machine)
def test_memory_report_splits_the_step_and_checkpointing_shrinks_activations():
    """trueternary.scaling on the CPU (fresh processes, at the same time: each measures its own peak): the state
    is the ternary state plus a little, and checkpointing takes the activations of an activation-bound model down
    several times."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda c: measure_in_subprocess(96, 6, 8, 128, threads=1, activation_checkpointing=c,
                                                             timeout=240), (False, True)))
    for r in rows:
        assert "error" not in r, r
        assert r["step_peak"] >= r["state"] + r["activations"]
        assert r["state_formula"] <= r["state"] < r["state_formula"] + 8 * 2**20
    off, on = rows
    assert on["activations"] * 4 < off["activations"]


def test_memory_report_usage_errors_are_one_line(capsys):
    assert parse_size("6.4B") == (4096, 32) and parse_size("d512x8") == (512, 8)
    for argv in (["--sizes", "huge"], ["--sizes", "128x0"], ["--sizes", "1000x2"], ["--batch", "0"],
                 ["--device", "tpu"], ["--update_backend", "nope"]):
        assert scaling_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err, err
