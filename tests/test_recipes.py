"""The recipe registry and the one way hyper-parameters are built (``Hparams.for_run``, shared by train and bench)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from trueternary import bench, recipes, train
from trueternary.flags import Parser
from trueternary.recipes import CONFIG_NAMES, LATENT_CONFIGS, RECIPES, TERNARY_CONFIGS, Hparams, build_recipe
from trueternary.rule import FlipRule


def test_config_names_are_the_registry():
    assert CONFIG_NAMES == tuple(RECIPES) == ("Adam_FP32", "BitNet_QAT", "SignSGD_Old", "TrueTernary",
                                              "TrueTernary_Naive", "TrueTernary_Hybrid")
    assert TERNARY_CONFIGS == ("TrueTernary", "TrueTernary_Naive", "TrueTernary_Hybrid")
    assert LATENT_CONFIGS == ("BitNet_QAT", "SignSGD_Old")
    hp = Hparams(steps=10)
    assert [hp.lr_for(n) for n in CONFIG_NAMES] == [2e-3, 3e-3, 1e-4, 4.0, 4.0, 4.0]  # None: the rule's lr


def test_a_registered_recipe_is_built_by_name(monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES", dict(RECIPES))  # the registration is undone after the test
    seen = {}

    @recipes.recipe("Plain_SGD", "float", default_lr=0.5)
    def _plain_sgd(name, model, hp, lr, backend, seed, device):
        seen.update(name=name, lr=lr, backend=backend, seed=seed)
        return recipes.Recipe(name, model, [torch.optim.SGD(model.parameters(), lr=lr)], hp)

    base = nn.Linear(4, 3)
    r = build_recipe("Plain_SGD", base, Hparams(steps=5), backend="not a backend", seed=7)
    assert r.name == "Plain_SGD" and r.model is not base and seen == dict(name="Plain_SGD", lr=0.5,
                                                                          backend="not a backend", seed=7)
    with pytest.raises(ValueError, match="registered twice"):
        recipes.recipe("Plain_SGD", "float")(_plain_sgd)
    with pytest.raises(ValueError, match="weights must be"):
        recipes.recipe("Other", "quantum")
    with pytest.raises(ValueError, match="unknown config 'Nope'"):
        build_recipe("Nope", base, Hparams(steps=5))


def test_for_run_is_the_defaults_with_what_is_given_on_top():
    assert Hparams.for_run(300) == Hparams(steps=300)
    assert Hparams.for_run(300).rule == FlipRule.for_run(300)
    hp = Hparams.for_run(300, lr={"TrueTernary": 3}, rule={"vote_clip": 4, "scale_update_interval": 5},
                         accum_threshold=20, scale_update_interval=2, group_size=32, warmup_frac=0.1, min_lr_frac=0.2)
    assert hp.rule == FlipRule.for_run(300, vote_clip=4, scale_update_interval=2, accum_threshold=20)
    assert (hp.steps, hp.lr, hp.naive_threshold, hp.group_size, hp.warmup_frac, hp.min_lr_frac) == (
        300, {"TrueTernary": 3}, 20, 32, 0.1, 0.2)
    untouched = {"weight_decay", "grad_clip", "qat_quantizer", "hybrid_scale_lr"}
    assert {f.name for f in dataclasses.fields(Hparams)} - untouched == {
        "steps", "lr", "rule", "naive_threshold", "group_size", "warmup_frac", "min_lr_frac"}
    assert all(getattr(hp, k) == getattr(Hparams(steps=300), k) for k in untouched)
    with pytest.raises(ValueError, match="vote_clip"):
        Hparams.for_run(300, rule={"vote_clip": 0})


@pytest.mark.parametrize("flags", [
    dict(),
    dict(accum_threshold=12, group_size=32, lr=5.0, rule="vote_clip=4,decay=0.01", scale_update_interval=3),
    dict(accum_threshold=9, steps=40),
])
def test_train_and_bench_build_the_same_hparams_from_the_same_flags(flags):
    """Both commands' flag parsing ends in the same Hparams (train's --max_steps is bench's --steps; train's --lr
    is its config's, bench's --lr names the config; both give the rule the run's tokens per step)."""
    steps = flags.get("steps", 200)
    t_argv = ["--max_steps", str(steps), "--batch_size", "4", "--ctx", "33"]
    b_argv = ["--steps", str(steps), "--batch", "4", "--ctx", "33"]
    for k, v in flags.items():
        if k == "steps":
            continue
        t_argv += [f"--{k}", str(v)]
        b_argv += [f"--{k.replace('_', '-')}", f"TrueTernary={v}" if k == "lr" else str(v)]
    tp, bp = Parser(), Parser()
    train.add_arguments(tp)
    bench.add_arguments(bp)
    from_train = train.hparams_for(train.config_from_args(tp.parse_args(t_argv))[0])
    from_bench = bench.hparams_from_args(bp.parse_args(b_argv))
    assert from_train == from_bench
    assert from_train.rule.batch_tokens == 4 * 33
    if "accum_threshold" in flags:
        assert from_train.rule.accum_threshold == from_train.naive_threshold == flags["accum_threshold"]


def test_trueternary_scales_the_residual_accumulators_of_wide_layers_only():
    """The recipe starts a layer wider than width_ref with its rounding residual times vote_width_scale (rounded),
    and leaves the others (and the embedding) as ternarize made them."""
    from trueternary.models import build_model
    from trueternary.rule import vote_width_scale

    def built(width_ref: int):
        base = build_model("transformer", seed=0, ctx=8, d_model=32, n_layers=1, n_heads=2)
        hp = Hparams.for_run(10, rule={"width_ref": width_ref})
        return build_recipe("TrueTernary", base, hp, seed=0).model

    plain, scaled = built(0), built(64)  # the MLP's down projection sums 128 inputs: scaled by sqrt(1/2)
    for (name, a), (_, b) in zip(plain.named_modules(), scaled.named_modules()):
        if not hasattr(a, "T_accum"):
            continue
        s = vote_width_scale(64, a.vote_fan_in)
        if name == "blocks.0.down.weight":
            assert s < 1 and int(a.T_accum.abs().max()) > int(b.T_accum.abs().max())
        assert torch.equal(b.T_accum, torch.round(a.T_accum.float() * s).to(torch.int8)), name
        assert torch.equal(a.T_packed, b.T_packed) and torch.equal(a.E, b.E), name
