"""Frozen encoders as modality tokens: a tiny locally built conv net on random images feeds MORPH through a
ternary projection, bracketed by MOD / MOD_END; the encoder stays frozen, float and out of the audit's
float-parameter count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trueternary import FlipOptimizer, ternarize
from trueternary.audit import audit
from trueternary.components import FrozenEncoder, bracket_modality
from trueternary.layers import TernaryLinear
from trueternary.models import build_model
from trueternary.vocab import MOD, MOD_END


class TinyConvEncoder(nn.Module):
    """3x16x16 image -> 4 patch embeddings of dim 12 (a stand-in for a user's vision encoder)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, kernel_size=4, stride=4)
        self.bn = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.lin = nn.Linear(12, 12)  # a Linear inside the encoder must survive ternarize() untouched

    def forward(self, img):
        h = self.pool(torch.relu(self.bn(self.conv(img))))  # (B, 12, 2, 2)
        return self.lin(h.flatten(2).transpose(1, 2))  # (B, 4, 12)


def _model():
    return build_model("morph", 0, ctx=24, d_model=16, n_layers=1, n_heads=2, n_codes=8, code_dim=8,
                       graph_window=3, graph_heads=2, n_experts=2, top_k=1)


def _images(B=2, seed=0):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_encoder_is_frozen_and_hidden_from_the_module_tree():
    enc = TinyConvEncoder()
    fe = FrozenEncoder(enc, 12, 16)
    assert all(not p.requires_grad for p in enc.parameters())
    assert not enc.training
    names = [n for n, _ in fe.named_parameters()]
    assert names == ["proj.weight"]  # the encoder is not a registered submodule
    assert not any(k.startswith("encoder") for k in fe.state_dict())
    fe.train()
    assert not enc.training  # stays in eval mode (BatchNorm statistics do not move)
    assert fe.frozen_parameters() == sum(p.numel() for p in enc.parameters())


def test_bracket_modality_uses_the_special_tokens():
    emb = nn.Embedding(288, 5)
    tokens = torch.randn(3, 4, 5)
    out = bracket_modality(tokens, emb)
    assert out.shape == (3, 6, 5)
    torch.testing.assert_close(out[:, 0], emb.weight[MOD].expand(3, 5))
    torch.testing.assert_close(out[:, -1], emb.weight[MOD_END].expand(3, 5))
    torch.testing.assert_close(out[:, 1:5], tokens)


def test_morph_with_a_frozen_image_encoder_trains_only_the_projection():
    model = ternarize(_model(), 8)
    enc = TinyConvEncoder()
    enc_state = copy.deepcopy(enc.state_dict())
    model.attach_encoder(enc, 12, generator=torch.Generator().manual_seed(1))
    assert isinstance(model.modality.proj, TernaryLinear)
    opt = FlipOptimizer(model, seed=0)
    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    logits = model(idx, _images())
    assert logits.shape == (2, 10, 288)  # only the byte positions are returned
    before = model.modality.proj.weight.T_accum.clone()
    torch.nn.functional.cross_entropy(logits.reshape(-1, 288), idx.roll(-1, 1).reshape(-1)).backward()
    opt.step()
    assert not torch.equal(model.modality.proj.weight.T_accum, before)  # the projection learned
    for k, v in enc.state_dict().items():
        assert torch.equal(v, enc_state[k]), k  # the encoder did not (BatchNorm stats included)
    assert all(p.grad is None for p in enc.parameters())
    # the images matter: different images give different byte logits
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(idx, _images(seed=0)), model(idx, _images(seed=5)))
    report = audit(model)
    assert report["float_params"] == 0
    assert report["frozen_encoder_params"] == sum(p.numel() for p in enc.parameters())


def test_ternarize_after_attach_leaves_the_encoder_float():
    model = _model()
    enc = TinyConvEncoder()
    model.attach_encoder(enc, 12)
    assert type(model.modality.proj) is nn.Linear
    ternarize(model, 8)
    assert isinstance(model.modality.proj, TernaryLinear)
    assert type(enc.lin) is nn.Linear and isinstance(enc.conv.weight, nn.Parameter)
    assert sum(p.numel() for p in model.parameters()) == 0


def test_bad_modality_inputs():
    model = _model()
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="no encoder attached"):
        model(idx, _images())
    model.attach_encoder(TinyConvEncoder(), 10)  # wrong declared width
    with pytest.raises(ValueError, match="encoder output"):
        model(idx, _images())
    model.attach_encoder(TinyConvEncoder(), 12)
    with pytest.raises(ValueError, match="batch"):
        model(idx, _images(B=3))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(2, 20, dtype=torch.long), _images())  # 20 + 4 + 2 > ctx 24
    with pytest.raises(TypeError):
        FrozenEncoder("not a module", 3, 4)
