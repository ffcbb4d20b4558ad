"""The latent-weight baselines' fake quantisers (qat.py): BitNet's absmean and TrueTernary's weight format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trueternary import TernaryLinear
from trueternary.qat import QATLinear, fake_ternarize, forward_trits


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 70), nn.Linear(70, 9, bias=False))


@pytest.mark.parametrize("group_size", [8, 64, 128], ids=lambda g: f"g{g}")
def test_group_pow2_forward_is_the_ternary_weight_format(group_size):
    """fake_ternarize(quantizer='group_pow2') computes exactly what ternarising the same float weight gives."""
    m = _model()
    lin = m[1]
    tern = TernaryLinear.from_linear(lin, group_size)
    q = fake_ternarize(m, "group_pow2", group_size)
    assert isinstance(q[1], QATLinear) and q[1].quantizer == "group_pow2"
    x = torch.randn(5, 70)
    assert torch.equal(q[1](x), x @ tern.weight.dense().T)
    assert torch.equal(forward_trits(q)["1"], tern.weight.trits())


def test_quantizers_pass_the_gradient_straight_through():
    for quantizer in ("absmean", "group_pow2"):
        m = fake_ternarize(_model(), quantizer, 8)
        x = torch.randn(4, 70)
        m[1](x).sum().backward()
        # d/dW of sum(x @ Wq.T) with Wq = W + (q(W) - W).detach() is the float gradient itself
        assert torch.allclose(m[1].weight.grad, x.sum(0).expand(9, 70)), quantizer


def test_absmean_forward_trits_and_bad_quantizer():
    m = fake_ternarize(_model(), "absmean")
    w = m[1].weight.detach()
    assert torch.equal(forward_trits(m)["1"], torch.clamp(torch.round(w / w.abs().mean()), -1, 1).to(torch.int8))
    assert set(forward_trits(m)) == {"0", "1"}
    with pytest.raises(ValueError, match="quantizer"):
        fake_ternarize(_model(), "fp4")


def test_recipe_counts_forward_trit_changes_only_when_watched():
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe

    base = build_model("transformer", seed=0, ctx=16, d_model=32, n_layers=1, n_heads=2)
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    plain, watched = (build_recipe("BitNet_QAT", base, Hparams(steps=3, lr={"BitNet_QAT": 3e-2})) for _ in range(2))
    watched.watch_forward_trits()
    counts = []
    for r in (plain, watched):
        r.train_step(x, y, False)
        counts.append(r.flips_last_step())
    assert counts[0] == 0 and counts[1] > 0  # training loops pay nothing; the benchmark sees the changes
