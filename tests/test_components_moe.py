"""TernaryMoE: routing, expert dispatch and combine against a brute-force per-token reference, the aux-loss
gradient injection, and the integer balance bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trueternary import FlipOptimizer, ternarize
from trueternary.components import AuxLossScaler, TernaryMoE, switch_aux_loss
from trueternary.components.moe import BALANCE_EXP
from trueternary.layers import TernaryLinear

TOL = dict(atol=1e-5, rtol=1e-5)


def _moe(**kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return TernaryMoE(8, n_experts=4, top_k=2, hidden=12, group_size=4, **kw)


def _dense(lin):
    return lin.weight.dense() if isinstance(lin, TernaryLinear) else lin.weight


def brute_force(moe, x):
    """Per token: route, run the chosen experts on that token alone, weight and sum."""
    logits = F.rms_norm(x @ _dense(moe.router).t(), (moe.n_experts,), eps=1e-6)
    probs = logits.softmax(-1)
    steer = logits + moe.balance_q.float() * 2.0**BALANCE_EXP
    out = []
    for t in range(x.shape[0]):
        choice = steer[t].topk(moe.top_k).indices
        w = probs[t, choice] / probs[t, choice].sum()
        acc = 0
        for j, e in enumerate(choice.tolist()):
            ex = moe.experts[e]
            h = F.relu(x[t] @ _dense(ex.up).t()).square()
            acc = acc + w[j] * (F.rms_norm(h, (h.shape[-1],), eps=1e-6) @ _dense(ex.down).t())
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "float"])
def test_forward_and_input_grad_match_brute_force(ternary):
    moe = _moe(ternary=ternary, aux_coef=0.0)
    moe.balance_q.copy_(torch.tensor([40, -40, 0, 7], dtype=torch.int32))  # the bias steers the choice
    moe.eval()
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = moe(xa), brute_force(moe, xb)
    torch.testing.assert_close(ya, yb, **TOL)
    g = torch.randn(11, 8, generator=torch.Generator().manual_seed(2))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


def test_each_expert_votes_once_from_its_own_tokens():
    moe = _moe()
    calls = []

    class Voter:
        def cast_votes(self, weight, g, T, rows=None):
            calls.append(weight)

        def cast_matmul_votes(self, weight, gy, x, T):
            self.cast_votes(weight, (gy.t() @ x).float(), T)

    for w in (m for m in moe.modules() if hasattr(m, "T_accum")):
        w._voter = Voter()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    y = moe(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert len(calls) == len(set(map(id, calls)))  # no weight voted twice
    assert moe.router.weight in calls
    routed = moe.tokens_routed > 0
    for e, ex in enumerate(moe.experts):  # an expert that got no token casts no votes
        assert (ex.up.weight in calls) == bool(routed[e])


def test_aux_loss_gradient_is_injected():
    """Training through AuxLossScaler == training on loss + coef * aux with the same choices."""
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(4))
    moe = _moe(ternary=False, aux_coef=0.5, balance_bias=False)
    moe(x).sum().backward()
    g_injected = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.aux_coef = 0.0
    y = moe(x)
    probs, choice, _ = moe.route(x)
    (y.sum() + 0.5 * switch_aux_loss(probs, choice, 4)).backward()
    torch.testing.assert_close(g_injected, moe.router.weight.grad, **TOL)


def test_switch_aux_loss_values():
    probs = torch.full((4, 4), 0.25)
    balanced = torch.tensor([[0], [1], [2], [3]])
    assert float(switch_aux_loss(probs, balanced, 4)) == pytest.approx(1.0)
    skewed = torch.zeros(4, 1, dtype=torch.long)
    probs_skewed = torch.tensor([[1.0, 0, 0, 0]] * 4)
    assert float(switch_aux_loss(probs_skewed, skewed, 4)) == pytest.approx(4.0)
    out, aux = torch.ones(3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    AuxLossScaler.apply(out, aux, 0.1).sum().backward()
    assert float(aux.grad) == pytest.approx(0.1) and torch.equal(out.grad, torch.ones(3))


def test_balance_bias_is_integer_and_moves_toward_balance():
    moe = _moe(aux_coef=0.0)
    assert moe.balance_q.dtype == torch.int32
    gen = torch.Generator().manual_seed(5)
    # tokens share a direction v that the router maps to expert 0: it is over-used at the start
    v = torch.randn(8, generator=gen)
    with torch.no_grad():
        T = moe.router.weight.trits().clone()
        T[0] = torch.sign(v).to(torch.int8)
        moe.router.weight.set_trits(T)
    x = 0.7 * torch.randn(64, 8, generator=gen) + v

    def imbalance():
        counts = torch.bincount(moe.route(x)[1].reshape(-1), minlength=4)
        return int(counts.max() - counts.min()), counts

    start, counts0 = imbalance()
    assert int(counts0.argmax()) == 0 and start > 16
    for _ in range(150):
        moe(x)
    end, _ = imbalance()
    assert int(moe.balance_q[0]) < 0 and int(moe.balance_q[0]) == int(moe.balance_q.min())
    assert end < start / 2, (start, end)


def test_float_moe_ternarizes_and_trains():
    holder = nn.Module()
    holder.moe = _moe(ternary=False)
    ternarize(holder, 4)
    assert sum(p.numel() for p in holder.parameters()) == 0
    opt = FlipOptimizer(holder, seed=0)
    holder.moe(torch.randn(6, 8)).square().mean().backward()
    opt.step()


def test_bad_configuration():
    with pytest.raises(ValueError, match="top_k"):
        TernaryMoE(8, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="n_experts"):
        TernaryMoE(8, n_experts=0)
