"""Frozen ViT and Whisper encoders (transformers, random weights, nothing downloaded) attached to a tiny MORPH:
shapes, frozen and unchanged through optimiser steps while the byte model learns, local-folder loading, the
one-line errors, and trueternary importing without transformers."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from trueternary import FlipOptimizer, ternarize
from trueternary.audit import audit
from trueternary.components import FrozenEncoder, ViTImageEncoder, WhisperAudioEncoder
from trueternary.errors import CheckpointError, DataError, UsageError
from trueternary.layers import TernaryLinear
from trueternary.models import build_model


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


def tiny_vit_config(tf):
    return tf.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                        intermediate_size=64)


def tiny_whisper_config(tf, **kw):
    return tf.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                            num_mel_bins=8, max_source_positions=6, decoder_layers=1, decoder_attention_heads=2,
                            decoder_ffn_dim=64, **kw)


def images(B=2, seed=0):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def mels(B=2, seed=0):
    return torch.randn(B, 8, 12, generator=torch.Generator().manual_seed(seed))


# (encoder builder, inputs, modality tokens it yields)
ENCODERS = {
    "vit": (lambda tf: ViTImageEncoder(tiny_vit_config(tf)), images, 17),  # [CLS] + 4 x 4 patches
    "whisper": (lambda tf: WhisperAudioEncoder(tiny_whisper_config(tf), pool=2), mels, 3),  # 12 mel frames -> 6 / 2
}


def tiny_morph():
    return ternarize(build_model("morph", 0, ctx=32, d_model=16, n_layers=1, n_heads=2, n_codes=8, code_dim=8,
                                 graph_window=3, graph_heads=2, n_experts=2, top_k=1), 8)


def ternary_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ENCODERS)
def test_attached_encoder_stays_frozen_while_the_byte_model_learns(tf, name):
    """A trivial task: the byte after the first depends only on the input (image / audio clip), then repeats.
    Six FlipOptimizer steps lower the loss (measured: 5.65 -> 5.30 nats for both); the encoder's weights do not
    move and get no gradient."""
    build, inputs, n_tokens = ENCODERS[name]
    enc = build(tf)
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    enc_state = copy.deepcopy(enc.state_dict())
    x = inputs()
    assert enc(x).shape == (2, n_tokens, 32)

    model = tiny_morph()
    fe = model.attach_encoder(enc, generator=torch.Generator().manual_seed(1))  # enc_dim from enc.out_dim
    assert fe.enc_dim == 32 and isinstance(fe.proj, TernaryLinear)
    # thresholds of 8 votes instead of 32: a trit can flip within the test's six steps
    opt = FlipOptimizer(model, lr=8.0, seed=0, accum_threshold=8, scale_threshold=8)
    idx = torch.tensor([[10] + [ord("a")] * 6, [10] + [ord("b")] * 6])
    model.train()
    before, losses = ternary_state(model), []
    for _ in range(6):
        logits = model(idx, x)
        assert logits.shape == (2, 7, 288)  # modality positions ([MOD] tokens [MOD_END]) are dropped
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 288), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not enc.training
    assert all(p.grad is None for p in enc.parameters())
    for k, v in enc.state_dict().items():
        assert torch.equal(v, enc_state[k]), k
    after = ternary_state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("modality.proj.") for k in changed), changed  # the projection voted
    assert any(k.startswith("head.") for k in changed), changed  # and so did the byte model
    assert losses[-1] < losses[0] - 0.25, losses
    report = audit(model)
    assert report["float_params"] == 0
    assert report["frozen_encoder_params"] == sum(p.numel() for p in enc.parameters())
    with torch.no_grad():  # the inputs matter
        model.eval()
        assert not torch.allclose(model(idx, inputs(seed=0)), model(idx, inputs(seed=1)))


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(tf):
    state = torch.random.get_rng_state()
    a, b = ViTImageEncoder(tiny_vit_config(tf), seed=3), ViTImageEncoder(tiny_vit_config(tf), seed=3)
    c = ViTImageEncoder(tiny_vit_config(tf), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_bfloat16_encoder_feeds_a_float_projection(tf):
    enc = ViTImageEncoder(tiny_vit_config(tf), dtype=torch.bfloat16)
    ref = ViTImageEncoder(tiny_vit_config(tf))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    assert enc(images()).dtype == torch.bfloat16  # float32 pixels are cast to the encoder's dtype
    assert FrozenEncoder(enc, 32, 16).frozen_bytes() * 2 == FrozenEncoder(ref, 32, 16).frozen_bytes()
    model = tiny_morph()
    model.attach_encoder(enc)
    assert model(torch.zeros(2, 4, dtype=torch.long), images()).dtype == torch.float32


def test_size_names_build_the_published_shapes_with_random_weights(tf):
    vit = ViTImageEncoder("vit-tiny")
    assert (vit.out_dim, vit.image_size, vit.n_tokens) == (192, 224, 197)
    # DeiT-Ti / ViT-Ti: 5.72M parameters with its 1000-class head (192 x 1000 + 1000), which is not built here
    assert sum(p.numel() for p in vit.parameters()) == 5_717_416 - 193_000
    whisper = WhisperAudioEncoder("whisper-tiny", pool=10)
    assert (whisper.out_dim, whisper.mel_bins, whisper.n_frames, whisper.n_tokens) == (384, 80, 3000, 150)


def test_vit_from_a_local_folder(tf, tmp_path, monkeypatch):
    torch.manual_seed(0)
    hf = tf.ViTModel(tiny_vit_config(tf))  # with its pooler, as a user's checkpoint would have
    hf.save_pretrained(tmp_path / "vit")
    enc = ViTImageEncoder(tmp_path / "vit")
    assert enc.out_dim == 32 and all(not p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        torch.testing.assert_close(enc(images()), hf.eval()(pixel_values=images()).last_hidden_state)
    assert ViTImageEncoder(str(tmp_path / "vit"), dtype=torch.bfloat16).vit.dtype == torch.bfloat16
    (tmp_path / "vit").rename(tmp_path / "vit-tiny")
    monkeypatch.chdir(tmp_path)
    assert ViTImageEncoder("vit-tiny").out_dim == 32  # an existing folder wins over the size name


def test_whisper_encoder_from_a_local_folder(tf, tmp_path):
    torch.manual_seed(0)
    hf = tf.WhisperForConditionalGeneration(tiny_whisper_config(tf, vocab_size=64, pad_token_id=0, bos_token_id=1,
                                                                eos_token_id=2, decoder_start_token_id=3))
    hf.save_pretrained(tmp_path / "whisper")
    enc = WhisperAudioEncoder(tmp_path / "whisper")
    assert not hasattr(enc, "decoder") and enc.n_tokens == 6
    with torch.no_grad():
        torch.testing.assert_close(enc(mels()), hf.model.encoder.eval()(mels()).last_hidden_state)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_sources_are_one_line_errors(tf, tmp_path):
    with pytest.raises(CheckpointError) as e:
        ViTImageEncoder(tmp_path / "missing")
    assert "nothing is downloaded" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        ViTImageEncoder("google/vit-base-patch16-224")  # a hub id is not fetched
    one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as e:
        ViTImageEncoder(tmp_path / "empty")
    one_line(e)
    tiny_vit_config(tf).save_pretrained(tmp_path / "config_only")
    with pytest.raises(CheckpointError) as e:
        ViTImageEncoder(tmp_path / "config_only")
    one_line(e)
    ViTImageEncoder(tiny_vit_config(tf)).vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError, match="ViTConfig") as e:
        WhisperAudioEncoder(tmp_path / "vit")
    one_line(e)
    weights = tmp_path / "vit" / "model.safetensors"  # a tensor short: refused, not silently re-initialised
    tensors = safetensors.torch.load_file(weights)
    del tensors["layernorm.weight"]
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks ViT weights: layernorm.weight") as e:
        ViTImageEncoder(tmp_path / "vit")
    one_line(e)
    with pytest.raises(UsageError) as e:
        ViTImageEncoder(tiny_whisper_config(tf))
    one_line(e)
    with pytest.raises(UsageError, match="dtype"):
        ViTImageEncoder(tiny_vit_config(tf), dtype=torch.int8)
    with pytest.raises(UsageError, match="pool"):
        WhisperAudioEncoder(tiny_whisper_config(tf), pool=4)  # 6 frames do not split in runs of 4


def test_bad_inputs_are_one_line_errors(tf):
    vit, whisper = ViTImageEncoder(tiny_vit_config(tf)), WhisperAudioEncoder(tiny_whisper_config(tf))
    for bad in (torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 32), torch.randn(3, 32, 32)):
        with pytest.raises(DataError, match=r"\(batch, 3, 32, 32\)") as e:
            vit(bad)
        one_line(e)
    for bad in (torch.randn(2, 8, 30), torch.randn(2, 80, 12), torch.randn(8, 12)):
        with pytest.raises(DataError, match=r"\(batch, 8, 12\)") as e:
            whisper(bad)
        one_line(e)
    model = tiny_morph()
    model.attach_encoder(vit)
    with pytest.raises(DataError):  # through the model too
        model(torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="enc_dim"):
        model.attach_encoder(torch.nn.Identity())  # a plain module has no out_dim


def test_without_transformers_the_encoders_are_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UsageError, match="pip install transformers") as e:
        ViTImageEncoder("vit-tiny")
    one_line(e)
    with pytest.raises(UsageError, match="pip install transformers"):
        WhisperAudioEncoder("whisper-tiny")


def test_importing_trueternary_does_not_import_transformers():
    code = ("import sys, trueternary, trueternary.models, trueternary.components, trueternary.audit; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this process's trueternary
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
