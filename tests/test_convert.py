"""Tests of ``ternarize``: a foreign model built from torch.nn pieces (Embedding, TransformerEncoderLayer,
LayerNorm, Linear) ends with zero nn.Parameters, computes exactly what the float model computes with its
weights replaced by ``T * 2**E``, trains by votes, runs in eval mode (torch's fused encoder fast path is
kept away from ternary layers), and leaves MultiheadAttention internals float but frozen."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trueternary import FlipOptimizer, TernaryEmbedding, TernaryLinear, ternarize, ternary_weights


class Foreign(nn.Module):
    """A small transformer classifier made only of torch.nn parts."""

    def __init__(self, vocab=30, dim=16, classes=5):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, classes, bias=False))

    def forward(self, idx):
        return self.head(self.norm(self.encoder(self.tok(idx)))).mean(1)


def ternarize_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ternarize(model, **kwargs)


def float_twin(original: nn.Module, ternary: nn.Module) -> nn.Module:
    """The original float model with every replaced weight set to the ternary ``T * 2**E`` (bias: q * 2**exp)."""
    twin = copy.deepcopy(original)
    t_mods = dict(ternary.named_modules())
    with torch.no_grad():
        for name, m in twin.named_modules():
            t = t_mods.get(name)
            if isinstance(t, (TernaryLinear, TernaryEmbedding)):
                m.weight.copy_(t.weight.dense())
                if isinstance(t, TernaryLinear) and t.bias is not None:
                    m.bias.copy_(t.bias.value())
    return twin


IDX = torch.tensor([[3, 7, 0, 12, 29], [1, 1, 5, 0, 0]])


def test_foreign_model_has_zero_parameters_and_warns_what_it_froze():
    model = Foreign()
    assert len(list(model.parameters())) > 0
    with pytest.warns(UserWarning, match="froze") as rec:
        out = ternarize(model, group_size=8)
    assert out is model  # in place
    assert list(model.parameters()) == []
    msg = str(rec[0].message)
    assert "encoder.self_attn.in_proj_weight" in msg and "norm1.weight" in msg
    assert isinstance(model.tok, TernaryEmbedding) and model.tok.padding_idx == 0
    for lin in (model.encoder.linear1, model.encoder.linear2, model.head[0], model.head[2]):
        assert isinstance(lin, TernaryLinear)
    assert model.head[0].bias is not None and model.head[2].bias is None
    assert len(ternary_weights(model)) == 5


def test_mha_internals_left_float_and_frozen():
    model = Foreign()
    mha_before = copy.deepcopy(model.encoder.self_attn)
    ternarize_quietly(model, group_size=8)
    mha = model.encoder.self_attn
    assert type(mha) is nn.MultiheadAttention
    assert type(mha.out_proj) is type(mha_before.out_proj)  # its out_proj Linear is not replaced
    buffers = dict(mha.named_buffers())
    for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        assert name in buffers, name
        torch.testing.assert_close(buffers[name], dict(mha_before.named_parameters())[name], rtol=0, atol=0)
    x = torch.randn(2, 4, 16)
    # same weights; SDPA may pick another CPU kernel when no input requires grad, hence a tolerance
    torch.testing.assert_close(mha(x, x, x)[0], mha_before(x, x, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_foreign_model_computes_its_float_twin(mode):
    original = Foreign()
    model = ternarize_quietly(copy.deepcopy(original), group_size=8)
    twin = float_twin(original, model)
    getattr(model, mode)()
    getattr(twin, mode)()
    with torch.no_grad():  # no_grad + eval is exactly when torch's fused encoder fast path would trigger
        torch.testing.assert_close(model(IDX), twin(IDX), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(IDX), twin(IDX), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # raised by the float twin's fast path
def test_transformer_encoder_stack_in_eval_with_padding_mask():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    original = copy.deepcopy(enc)
    ternarize_quietly(enc, group_size=8)
    twin = float_twin(original, enc)
    enc.eval()
    twin.eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        y, y_twin = enc(x, src_key_padding_mask=mask), twin(x, src_key_padding_mask=mask)
    assert y.shape == (2, 5, 16)
    # the twin may take torch's nested-tensor fast path (zeros at padded positions); compare real tokens
    torch.testing.assert_close(y[~mask], y_twin[~mask], rtol=1e-4, atol=1e-4)


def test_foreign_model_trains_by_votes():
    model = ternarize_quietly(Foreign(), group_size=8)
    opt = FlipOptimizer(model, accum_threshold=2)
    T0 = [w.trits().clone() for w in ternary_weights(model)]
    frozen0 = {k: v.clone() for k, v in model.state_dict().items() if "norm" in k or "self_attn" in k}
    y = torch.tensor([1, 3])
    for _ in range(3):
        F.cross_entropy(model(IDX), y).backward()
        opt.step()
    for w, T in zip(ternary_weights(model), T0):
        assert not torch.equal(w.trits(), T)
    for k, v in model.state_dict().items():  # frozen float pieces really are frozen
        if k in frozen0:
            assert torch.equal(v, frozen0[k]), k


def test_outputs_close_to_the_original_float_model():
    """Absmean ternarisation with power-of-two group scales approximates the float layer (measured:
    cosine ~0.94 for one nn.Linear(64, 64), ~0.82-0.86 for a 2-layer MLP, ~0.89 for an N(0, 1) embedding;
    the bars below leave margin)."""
    x = torch.randn(256, 64)
    lin = nn.Linear(64, 64)
    t = TernaryLinear.from_linear(lin)
    assert F.cosine_similarity(lin(x).flatten(), t(x).flatten(), dim=0) > 0.9
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    tmlp = ternarize(copy.deepcopy(mlp))  # no LayerNorm etc.: nothing to freeze, no warning
    assert F.cosine_similarity(mlp(x).flatten(), tmlp(x).flatten(), dim=0) > 0.75
    emb = nn.Embedding(10, 64)
    temb = TernaryEmbedding.from_embedding(emb)
    idx = torch.arange(10)
    assert F.cosine_similarity(emb(idx).flatten(), temb(idx).flatten(), dim=0) > 0.85


def test_scale_mode_float_keeps_only_log2_scales():
    model = ternarize_quietly(Foreign(), group_size=8, scale_mode="float")
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.endswith("weight.log2_scale") for n in names)
    assert len(names) == len(ternary_weights(model)) == 5


def test_non_strict_keeps_other_parameters_and_skip():
    model = Foreign()
    with pytest.warns(UserWarning, match="left .* float") as rec:  # nothing frozen; what stays float is still named
        ternarize(model, group_size=8, strict=False, skip=("head.2",))
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "kept by skip: head.2.weight" in msg and "norm.weight" in msg and "encoder.self_attn.in_proj_weight" in msg
    names = {n for n, _ in model.named_parameters()}
    assert "norm.weight" in names and "encoder.self_attn.in_proj_weight" in names
    assert "head.2.weight" in names and type(model.head[2]) is nn.Linear  # skipped
    assert isinstance(model.head[0], TernaryLinear)


def test_linear_subclass_from_another_library_is_replaced():
    class LoRALikeLinear(nn.Linear):
        pass

    model = nn.Sequential(LoRALikeLinear(8, 4))
    ternarize(model)
    assert isinstance(model[0], TernaryLinear)


def test_ternarized_state_dict_round_trip():
    a = ternarize_quietly(Foreign(), group_size=8)
    b = ternarize_quietly(Foreign(), group_size=8)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(IDX), b(IDX))


def test_accum_threshold_starts_every_layer_at_its_residual():
    """``ternarize(..., accum_threshold=)`` (what the recipes pass for the default rule) fills T_accum in every
    replaced layer from that layer's own float weight; without it the accumulators are empty."""
    from trueternary.quant import residual_accum
    from trueternary.recipes import Hparams, build_recipe
    from trueternary.rule import FlipRule

    original = Foreign()
    tern = ternarize_quietly(copy.deepcopy(original), group_size=8, accum_threshold=16)
    floats = {n: m.weight for n, m in original.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    layers = {n: m for n, m in tern.named_modules() if isinstance(m, (TernaryLinear, TernaryEmbedding))}
    assert set(layers) <= set(floats) and len(layers) == 5
    for n, m in layers.items():
        assert torch.equal(m.weight.T_accum, residual_accum(floats[n], m.weight.trits(), 8, 16)), n
        assert m.weight.T_accum.any() and m.weight.T_accum.abs().max() <= 15
    plain = ternarize_quietly(copy.deepcopy(original), group_size=8)
    assert not any(w.T_accum.any() for w in ternary_weights(plain))
    # the recipes: TrueTernary starts from the residual, the seed's rule and accum_init='zero' from empty ones
    hp = Hparams(steps=10, group_size=8)
    tt = build_recipe("TrueTernary", nn.Sequential(nn.Linear(16, 8)), hp)
    assert all(w.T_accum.any() for w in ternary_weights(tt.model))
    for name, rule in (("TrueTernary_Naive", hp.rule), ("TrueTernary", FlipRule(accum_init="zero"))):
        r = build_recipe(name, nn.Sequential(nn.Linear(16, 8)), Hparams(steps=10, group_size=8, rule=rule))
        assert not any(w.T_accum.any() for w in ternary_weights(r.model)), name


@pytest.mark.parametrize(
    "args,kwargs,err",
    [
        ((torch.zeros(3),), {}, TypeError),
        ((nn.Linear(4, 3),), {}, TypeError),
        ((nn.Embedding(4, 3),), {}, TypeError),
        ((nn.Sequential(nn.Linear(4, 3)),), dict(group_size=0), ValueError),
        ((nn.Sequential(nn.ReLU()),), dict(scale_mode="half"), ValueError),
        ((nn.Sequential(nn.Linear(4, 3)),), dict(scale_mode="half"), ValueError),
        ((nn.Sequential(nn.Linear(4, 3)),), dict(accum_threshold=0), ValueError),
        ((nn.Sequential(nn.Linear(4, 3)),), dict(accum_threshold=1.5), ValueError),
    ],
    ids=["tensor", "bare-linear", "bare-embedding", "group0", "scale-mode-no-layers", "scale-mode", "accum-threshold0",
         "accum-threshold-float"],
)
def test_bad_arguments(args, kwargs, err):
    with pytest.raises(err):
        ternarize(*args, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(scale_mode="bf16"), dict(accum_threshold=300)], ids=["scale", "threshold"])
def test_bad_arguments_leave_model_untouched(kwargs):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError):
        ternarize(model, **kwargs)
    assert type(model[0]) is nn.Linear and len(list(model.parameters())) == 4
