"""The byte transformer's shared ops (everything between linear layers), eager and torch.compile'd."""

from __future__ import annotations

import copy

import pytest
import torch

from trueternary import ternarize
from trueternary.models import build_model
from trueternary.models.transformer import SHARED_OPS, ByteTransformer, TransformerConfig, shared_ops


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    """Compiles of these ops by earlier tests (test_train's, at other shapes) leave their frames marked dynamic:
    the compiles here would then trace symbolically, several times slower. They start from a clean state."""
    torch._dynamo.reset()


def tiny(seed=0):
    return ByteTransformer(TransformerConfig(ctx=24, d_model=32, n_layers=2, n_heads=4),
                           generator=torch.Generator().manual_seed(seed))


def fwd_bwd(model, idx):
    logits = model(idx)
    (logits.float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", ["float", "ternary"])
def test_compiled_shared_ops_match_eager(kind):
    """torch.compile'd shared ops (the aot_eager backend: dynamo + AOTAutograd, no code generation, fast on CPU)
    give the eager model's logits and gradients; the ternary model's linear layers (no float parameters) stay
    eager and get the same input gradients."""
    base = tiny()
    if kind == "ternary":
        ternarize(base)
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    emb = base.embed if kind == "float" else None
    eager = copy.deepcopy(base)
    comp = copy.deepcopy(base).use_compiled_ops(backend="aot_eager")
    assert comp.compile_backend == "aot_eager"
    le, ge = fwd_bwd(eager, idx)
    lc, gc = fwd_bwd(comp, idx)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    assert ge.keys() == gc.keys() and (kind == "ternary" or ge)
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)
    assert emb is None or not torch.equal(ge["embed.weight"], torch.zeros_like(ge["embed.weight"]))
    comp.use_compiled_ops(False)
    assert comp.compile_backend is None


def test_shared_ops_hand_the_next_layer_its_matmul_dtype():
    """Under bf16 autocast every shared op returns bf16 (the cast the linear layer would make), and the
    residual stream stays float32."""
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, h = SHARED_OPS["add_norm"](x, torch.randn(2, 5, 16, dtype=torch.bfloat16), torch.bfloat16)
    assert s.dtype == torch.float32 and h.dtype == torch.bfloat16
    assert SHARED_OPS["relu2"](torch.randn(2, 5, 8), True, torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(h.float().pow(2).mean(-1), torch.ones(2, 5), atol=2e-2, rtol=0)


def test_compiled_ops_are_cached_per_backend_and_refused_for_other_families():
    assert shared_ops(None) is SHARED_OPS
    assert shared_ops("aot_eager") is shared_ops("aot_eager")
    assert build_model("transformer", ctx=8, d_model=16, n_layers=1, n_heads=2, compile_ops=True
                       ).compile_backend == "inductor"
    with pytest.raises(ValueError, match="compiled ops are implemented for the transformer"):
        build_model("morph", compile_ops=True)
