"""Causal graph construction (window + same-code edges) and the CausalGraphAggregation layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trueternary import FlipOptimizer, ternarize
from trueternary.components import CausalGraphAggregation, causal_graph, previous_same_code
from trueternary.layers import TernaryEmbedding


def test_previous_same_code_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (3, 11), generator=gen)
    prev = previous_same_code(codes)
    B, L = codes.shape
    for b in range(B):
        for t in range(L):
            earlier = [s for s in range(t) if codes[b, s] == codes[b, t]]
            assert int(prev[b * L + t]) == (b * L + earlier[-1] if earlier else -1)


@pytest.mark.parametrize("with_codes", [False, True], ids=["window-only", "window+match"])
def test_causal_graph_edges(with_codes):
    B, L, W = 2, 6, 3
    codes = torch.tensor([[0, 1, 0, 2, 1, 0], [3, 3, 3, 1, 1, 2]]) if with_codes else None
    graph, etype = causal_graph(B, L, W, codes)
    want = set()
    for b in range(B):
        for t in range(L):
            for d in range(min(W, t + 1)):
                want.add((b * L + t - d, b * L + t, d))
            if with_codes:
                earlier = [s for s in range(t) if codes[b, s] == codes[b, t]]
                if earlier:
                    want.add((b * L + earlier[-1], b * L + t, W))
    got = set(zip(graph.src.tolist(), graph.dst.tolist(), etype.tolist()))
    assert got == want and graph.num_edges == len(want)
    assert bool((graph.src <= graph.dst).all())  # causal: from the past (or self) only
    assert bool(((graph.src // L) == (graph.dst // L)).all())  # never across sequences
    assert bool((graph.dst[1:] >= graph.dst[:-1]).all())


def _layer(ternary, **kw):
    return CausalGraphAggregation(8, window=3, heads=2, ternary=ternary, group_size=4,
                                  generator=torch.Generator().manual_seed(1), **kw)


def test_layer_is_causal():
    layer = _layer(True)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(2))
    codes = torch.randint(0, 3, (2, 7), generator=torch.Generator().manual_seed(3))
    y = layer(x, codes)
    x2, codes2 = x.clone(), codes.clone()
    x2[:, 5:] += 1.0
    codes2[:, 5:] = (codes2[:, 5:] + 1) % 3
    y2 = layer(x2, codes2)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_edge_attributes_learn_by_sparse_votes():
    layer = _layer(True)
    assert isinstance(layer.edge_attr, TernaryEmbedding) and layer.edge_attr.weight.rows == 4
    opt = FlipOptimizer(layer, seed=0)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    before = layer.edge_attr.weight.T_accum.clone()
    layer(x, None).square().mean().backward()  # no codes: the match-edge type (row 3) is never used
    after = layer.edge_attr.weight.T_accum
    assert torch.equal(after[3], before[3])
    assert not torch.equal(after[:3], before[:3])
    opt.step()


def test_float_layer_ternarizes_to_zero_parameters():
    holder = nn.Module()
    holder.g = _layer(False)
    assert sum(p.numel() for p in holder.parameters()) > 0
    x = torch.randn(1, 4, 8)
    y_float = holder.g(x)
    ternarize(holder, 4)
    assert sum(p.numel() for p in holder.parameters()) == 0
    assert holder.g(x).shape == y_float.shape


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        CausalGraphAggregation(10, heads=3)
    with pytest.raises(ValueError, match="window"):
        CausalGraphAggregation(8, window=0)
