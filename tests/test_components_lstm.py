"""TernaryLSTMCell: one ternary projection over [x, h]; forward and gradients against the plain-PyTorch
reference run on the dense float weight ``T * 2**E`` (tolerance 1e-5, float32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trueternary import FlipOptimizer, ternarize
from trueternary.components import TernaryLSTMCell, lstm_sequence_reference
from trueternary.layers import TernaryLinear
from trueternary.qat import QATLinear, fake_ternarize
from trueternary.quant import absmean_ternary_ste

TOL = dict(atol=1e-5, rtol=1e-5)


class RecordingVoter:
    """Stands in for the FlipOptimizer: records every weight gradient handed to ``cast_votes``."""

    def __init__(self):
        self.calls = []

    def cast_votes(self, weight, g, T, rows=None):
        self.calls.append((weight, g.clone(), T.clone(), rows))

    def cast_matmul_votes(self, weight, gy, x, T):  # linear layers hand over the factors of gy.T @ x
        self.cast_votes(weight, (gy.t() @ x).float(), T)


def _inputs(B, L, n_in, H, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, n_in, generator=gen)
    h0 = torch.randn(B, H, generator=gen) * 0.5
    c0 = torch.randn(B, H, generator=gen)
    return x, h0, c0


def test_one_ternary_projection_over_x_and_h():
    cell = TernaryLSTMCell(5, 7, generator=torch.Generator().manual_seed(0))
    assert isinstance(cell.gates, TernaryLinear)
    assert (cell.gates.in_features, cell.gates.out_features) == (5 + 7, 4 * 7)
    assert sum(p.numel() for p in cell.parameters()) == 0


@pytest.mark.parametrize("B,L,n_in,H", [(1, 1, 1, 1), (3, 7, 5, 6), (2, 4, 9, 65)],
                         ids=["tiny", "ragged", "hidden-over-group"])
def test_sequence_matches_reference_forward_and_grads(B, L, n_in, H):
    cell = TernaryLSTMCell(n_in, H, group_size=8, generator=torch.Generator().manual_seed(1))
    voter = RecordingVoter()
    cell.gates.weight._voter = voter
    x, h0, c0 = _inputs(B, L, n_in, H)
    xs, h0s, c0s = (t.clone().requires_grad_(True) for t in (x, h0, c0))
    hs, (h, c) = cell.forward_sequence(xs, (h0s, c0s))
    gen = torch.Generator().manual_seed(2)
    g_hs, g_h, g_c = torch.randn(hs.shape, generator=gen), torch.randn(h.shape, generator=gen), torch.randn(
        c.shape, generator=gen)
    ((hs * g_hs).sum() + (h * g_h).sum() + (c * g_c).sum()).backward()

    W = cell.reference_weight().requires_grad_(True)
    xr, h0r, c0r = (t.clone().requires_grad_(True) for t in (x, h0, c0))
    hs_r, h_r, c_r = lstm_sequence_reference(xr, h0r, c0r, W)
    ((hs_r * g_hs).sum() + (h_r * g_h).sum() + (c_r * g_c).sum()).backward()

    for a, b in ((hs, hs_r), (h, h_r), (c, c_r), (xs.grad, xr.grad), (h0s.grad, h0r.grad), (c0s.grad, c0r.grad)):
        torch.testing.assert_close(a, b, **TOL)
    # the weight gradient reaches the voter exactly once per sequence, equal to the reference's dL/dW
    assert len(voter.calls) == 1
    weight, gW, T, rows = voter.calls[0]
    assert weight is cell.gates.weight and rows is None
    torch.testing.assert_close(gW, W.grad, **TOL)
    assert torch.equal(T, cell.gates.weight.trits())


def test_single_step_cell_equals_sequence_and_reference():
    cell = TernaryLSTMCell(4, 6, group_size=4, generator=torch.Generator().manual_seed(3))
    x, h0, c0 = _inputs(2, 5, 4, 6)
    state = (h0, c0)
    steps = []
    for t in range(5):
        state = cell(x[:, t], state)
        steps.append(state[0])
    hs, (h, c) = cell.forward_sequence(x, (h0, c0))
    torch.testing.assert_close(torch.stack(steps, 1), hs, **TOL)
    torch.testing.assert_close(state[1], c, **TOL)
    hs_r, _, _ = lstm_sequence_reference(x, h0, c0, cell.reference_weight())
    torch.testing.assert_close(hs, hs_r, **TOL)


def test_single_step_input_gradients_match_reference():
    cell = TernaryLSTMCell(3, 5, group_size=4, generator=torch.Generator().manual_seed(4))
    x, h0, c0 = _inputs(2, 1, 3, 5)
    xs, hs0, cs0 = (t.clone().requires_grad_(True) for t in (x[:, 0], h0, c0))
    h, c = cell(xs, (hs0, cs0))
    (h.sum() + 0.5 * c.sum()).backward()
    xr, hr0, cr0 = (t.clone().requires_grad_(True) for t in (x, h0, c0))
    _, h_r, c_r = lstm_sequence_reference(xr, hr0, cr0, cell.reference_weight())
    (h_r.sum() + 0.5 * c_r.sum()).backward()
    torch.testing.assert_close(xs.grad, xr.grad[:, 0], **TOL)
    torch.testing.assert_close(hs0.grad, hr0.grad, **TOL)
    torch.testing.assert_close(cs0.grad, cr0.grad, **TOL)


def test_scale_invariance_of_normalised_gates():
    """Gate pre-activations are RMS-normed: doubling every scale (E += 1) leaves the outputs unchanged."""
    cell = TernaryLSTMCell(4, 6, group_size=4, generator=torch.Generator().manual_seed(5))
    x, h0, c0 = _inputs(2, 6, 4, 6)
    hs, _ = cell.forward_sequence(x, (h0, c0))
    cell.gates.weight.E += 1
    hs2, _ = cell.forward_sequence(x, (h0, c0))
    torch.testing.assert_close(hs, hs2, atol=1e-5, rtol=1e-4)


def test_float_and_qat_twins_follow_the_same_reference():
    gen = torch.Generator().manual_seed(6)
    cell = TernaryLSTMCell(3, 4, ternary=False, generator=gen)
    assert type(cell.gates) is nn.Linear
    x, h0, c0 = _inputs(2, 3, 3, 4)
    hs, _ = cell.forward_sequence(x, (h0, c0))
    torch.testing.assert_close(hs, lstm_sequence_reference(x, h0, c0, cell.gates.weight)[0], **TOL)
    hs.sum().backward()
    assert cell.gates.weight.grad is not None

    wrapper = nn.Module()
    wrapper.cell = TernaryLSTMCell(3, 4, ternary=False, generator=gen)
    fake_ternarize(wrapper)
    assert isinstance(wrapper.cell.gates, QATLinear)
    hq, _ = wrapper.cell.forward_sequence(x, (h0, c0))
    ref = lstm_sequence_reference(x, h0, c0, absmean_ternary_ste(wrapper.cell.gates.weight))[0]
    torch.testing.assert_close(hq, ref, **TOL)


def test_ternarize_converts_the_float_cell_and_flip_optimizer_trains_it():
    wrapper = nn.Module()
    wrapper.cell = TernaryLSTMCell(4, 8, ternary=False, generator=torch.Generator().manual_seed(7))
    ternarize(wrapper, 8)
    assert isinstance(wrapper.cell.gates, TernaryLinear)
    opt = FlipOptimizer(wrapper, seed=0)
    x, _, _ = _inputs(3, 5, 4, 8)
    before = wrapper.cell.gates.weight.T_accum.clone()
    hs, _ = wrapper.cell.forward_sequence(x)
    hs.square().mean().backward()
    assert not torch.equal(wrapper.cell.gates.weight.T_accum, before)  # votes were cast
    opt.step()


def test_hybrid_scale_gets_a_gradient():
    wrapper = nn.Module()
    wrapper.cell = TernaryLSTMCell(3, 4, ternary=False, generator=torch.Generator().manual_seed(8))
    ternarize(wrapper, 4, scale_mode="float")
    x, h0, c0 = _inputs(2, 3, 3, 4)
    hs, _ = wrapper.cell.forward_sequence(x, (h0, c0))
    hs.sum().backward()
    ls = wrapper.cell.gates.weight.log2_scale
    assert ls.grad is not None and ls.grad.shape == ls.shape and torch.isfinite(ls.grad).all()


def test_bad_input_shapes():
    cell = TernaryLSTMCell(3, 4)
    with pytest.raises(ValueError, match="features"):
        cell.forward_sequence(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="features"):
        cell(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="positive integer"):
        TernaryLSTMCell(0, 4)


def test_other_projection_modules_run_step_by_step():
    """A projection the fused paths do not know (here a Linear with a bias) is called once per step."""
    cell = TernaryLSTMCell(3, 4, ternary=False, generator=torch.Generator().manual_seed(9))
    cell.gates = nn.Linear(7, 16, bias=True)
    x, h0, c0 = _inputs(2, 4, 3, 4)
    hs, (h, c) = cell.forward_sequence(x, (h0, c0))
    state = (h0, c0)
    for t in range(4):
        state = cell(x[:, t], state)
        torch.testing.assert_close(hs[:, t], state[0], **TOL)
    torch.testing.assert_close(c, state[1], **TOL)
