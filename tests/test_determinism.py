"""Deterministic mode (trueternary.determinism) and the CUDA-graph exactness it guarantees.

On the GPU (``gpu``-marked, skipped on the CPU): from one state and batch, K graph-replayed TrueTernary steps
equal K eager steps bit for bit, and two eager runs equal each other, every state tensor and every moving-average
code compared. experiments/cuda_graph_exactness has the 151M-shape measurement this test scales down.
"""

from __future__ import annotations

import pytest
import torch

from trueternary import determinism
from trueternary.models import transformer as tmod
from trueternary.models.transformer import ByteTransformer, TransformerConfig
from trueternary.recipes import Hparams, build_recipe


@pytest.fixture
def deterministic_mode():
    """determinism.enable() for one test, then the process's previous settings back."""
    b = torch.backends.cuda
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.mem_efficient_sdp_enabled())
    determinism.enable()
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    b.enable_flash_sdp(saved[2])
    b.enable_cudnn_sdp(saved[3])
    b.enable_mem_efficient_sdp(saved[4])


def test_enable_picks_deterministic_algorithms_and_math_attention(deterministic_mode):
    assert determinism.enabled()
    b = torch.backends.cuda
    assert not (b.flash_sdp_enabled() or b.cudnn_sdp_enabled() or b.mem_efficient_sdp_enabled())
    assert b.math_sdp_enabled()


def test_compiled_shared_ops_keep_attention_eager_in_deterministic_mode(deterministic_mode):
    ops = tmod.shared_ops("eager")  # torch.compile wraps lazily: nothing is compiled here
    assert ops["attention"] is tmod.attention_op
    assert ops["norm"] is not tmod.norm_op
    torch.use_deterministic_algorithms(False)
    assert tmod.shared_ops("eager")["attention"] is not tmod.attention_op


def _state(recipe) -> dict:
    s = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    for i, st in recipe.flip.state_dict()["state"].items():
        s.update({f"opt.{i}.{c}": v.clone() for c, v in st.items() if torch.is_tensor(v)})
    return s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_ops", [False, True], ids=["eager-ops", "compiled-ops"])
def test_graphed_step_equals_eager_step_bit_for_bit(deterministic_mode, compile_ops):
    cfg = TransformerConfig(ctx=512, d_model=256, n_layers=2, n_heads=4)  # ctx 512: long enough for SDPA to matter
    base = ByteTransformer(cfg, generator=torch.Generator().manual_seed(1234)).use_compiled_ops(compile_ops)
    seq = torch.randint(0, 256, (8, cfg.ctx + 1), generator=torch.Generator().manual_seed(99)).cuda()
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    graphed, eager, eager2 = (build_recipe("TrueTernary", base, Hparams(steps=100), device="cuda", backend="gpu")
                              for _ in range(3))
    for r in (graphed, eager, eager2):
        r.train_step(x, y, True)  # kernels compiled, device step counter created
    graphed.use_cuda_graph(x, y, True)
    for r in (eager, eager2):
        r.flip.use_device_lr(torch.device("cuda"))  # the graphed step's lr arithmetic
    for _ in range(3):
        for r in (graphed, eager, eager2):
            r.train_step(x, y, True)
    sg, se, se2 = _state(graphed), _state(eager), _state(eager2)
    assert [k for k in se if not torch.equal(se[k], se2[k])] == []
    assert [k for k in se if not torch.equal(sg[k], se[k])] == []
    assert any(k.startswith("opt.") for k in se)  # the moving averages' codes were compared too


def test_train_deterministic_flag_turns_the_mode_on(tmp_path, monkeypatch):
    """``trueternary train --deterministic`` enables the mode before the model is built (CPU: the run is
    deterministic anyway; the flag must still reach determinism.enable)."""
    from trueternary import train as train_mod

    calls = []
    monkeypatch.setattr(train_mod.determinism, "enable", lambda: calls.append(True))
    cfg, explicit = train_mod.config_from_args(_train_args(tmp_path, "--deterministic"))
    assert cfg.deterministic is True
    train_mod.train(cfg, explicit)
    assert calls == [True]
    cfg, _ = train_mod.config_from_args(_train_args(tmp_path, "--run_name", "b"))
    assert cfg.deterministic is False


def _train_args(tmp_path, *extra):
    import argparse

    from trueternary import train as train_mod

    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    return p.parse_args(["--out_dir", str(tmp_path), "--max_steps", "2", "--eval_every", "0", "--save_every", "0",
                         "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--ctx", "16", "--batch_size", "2",
                         *extra])
