"""Frozen ViT and Whisper encoders from ``transformers``, ready for :class:`FrozenEncoder` / ``attach_encoder``.

    ViTImageEncoder       pixels (B, channels, image_size, image_size) -> ViTModel -> (B, 1 + patches, hidden)
    WhisperAudioEncoder   log-mel (B, mel_bins, 2 * max_source_positions) -> WhisperEncoder
                          -> (B, max_source_positions / pool, d_model)

Each is built from one of three sources:

* a ``transformers`` config object (``ViTConfig`` / ``WhisperConfig``): random weights, seeded;
* a local folder written by ``save_pretrained`` (``from_pretrained(local_files_only=True)``, safetensors only:
  nothing is downloaded and nothing is unpickled);
* a size name (``"vit-base"``, ``"whisper-tiny"``...; :data:`VIT_SIZES`, :data:`WHISPER_SIZES`): that
  architecture with random weights, for sizing and tests. An existing folder of that name is read instead.

The weights are kept in the dtype the user picks (float32, bfloat16, float16), frozen (``requires_grad=False``,
eval mode) and never trained; ``out_dim`` tells ``attach_encoder`` the width to project from.

``transformers`` stays optional: it is imported when an encoder is built, never when ``trueternary`` is, and its
absence is a one-line :class:`UsageError`. Bad inputs (an image of the wrong size, mel features of the wrong
shape) are one-line :class:`DataError`\\ s, raised before the model runs; a missing or unusable weights folder is a
:class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, DataError, UsageError
from .encoders import freeze

# Architecture sizes with random weights (the published models' shapes; the weights are not theirs).
VIT_SIZES: dict[str, dict] = {
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
WHISPER_SIZES: dict[str, dict] = {
    "whisper-tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536),
    "whisper-base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
    "whisper-small": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072),
    "whisper-medium": dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096),
    "whisper-large-v3": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                             num_mel_bins=128),
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise UsageError("the ViT / Whisper encoders need the 'transformers' package: pip install transformers") \
            from None


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"encoder dtype must be one of {', '.join(str(d) for d in DTYPES)}, got {dtype!r}")
    return dtype


@contextlib.contextmanager
def _quiet(tf):
    """transformers' load report and progress bars off while loading (the checks below say what went wrong)."""
    log = tf.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _random(build, seed: int) -> nn.Module:
    """``build()`` with transformers' weight init drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _resolve(source, config_cls, sizes: dict, kind: str):
    """``("config", config)`` for a config object or a size name, ``("folder", Path)`` for a local folder."""
    if isinstance(source, config_cls):
        return "config", source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():  # before the size names: a folder the user made must never be taken for random weights
            return "folder", path
        if isinstance(source, str) and source in sizes:
            return "config", config_cls(**sizes[source])
        raise CheckpointError(f"no {kind} weights folder at {path} (nothing is downloaded; random-weight sizes: "
                              f"{', '.join(sizes)})")
    raise UsageError(f"{kind} encoder source must be a {config_cls.__name__}, a local folder or one of "
                     f"{', '.join(sizes)}; got {type(source).__name__}")


def _load(tf, cls, path: Path, config_cls, kind: str, dtype: torch.dtype, **kwargs) -> tuple[nn.Module, dict]:
    """``cls.from_pretrained`` from a local folder (safetensors only), refusing a folder of another model or
    one that leaves encoder weights uninitialised."""
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / JSONDecodeError: say it in one line
        raise CheckpointError(f"cannot read a model config in {path}: {_first_line(e)}") from None
    if not isinstance(config, config_cls):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a {config_cls.__name__} ({kind})")
    try:
        with _quiet(tf):
            model, info = cls.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True,
                                              dtype=dtype, output_loading_info=True, **kwargs)
    except Exception as e:
        raise CheckpointError(f"cannot load {kind} weights from {path}: {_first_line(e)}") from None
    return model, info


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


class ViTImageEncoder(nn.Module):
    """A frozen ``transformers`` ViTModel: images -> ``[CLS]`` + one token per patch (its last hidden state).

    ``source``: a ``ViTConfig``, a local folder (a ViTModel or ViTForImageClassification ``save_pretrained``)
    or a :data:`VIT_SIZES` name. The pooler is not built (the tokens are the output).
    """

    def __init__(self, source, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        tf = _transformers()
        dtype = _check_dtype(dtype)
        how, what = _resolve(source, tf.ViTConfig, VIT_SIZES, "ViT")
        if how == "config":
            model = _random(lambda: tf.ViTModel(what, add_pooling_layer=False), seed).to(dtype)
        else:
            model, info = _load(tf, tf.ViTModel, what, tf.ViTConfig, "ViT", dtype, add_pooling_layer=False)
            if info["missing_keys"]:
                raise CheckpointError(f"{what} lacks ViT weights: {', '.join(sorted(info['missing_keys'])[:3])} ...")
        self.vit = model
        cfg = model.config
        self.image_size, self.channels = cfg.image_size, cfg.num_channels
        self.out_dim = cfg.hidden_size
        self.n_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        freeze(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        want = (self.channels, self.image_size, self.image_size)
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
            raise DataError(f"ViT encoder expects images of shape (batch, {want[0]}, {want[1]}, {want[2]}), "
                            f"got {_shape(pixels)}")
        dtype = next(self.vit.parameters()).dtype
        return self.vit(pixel_values=pixels.to(dtype)).last_hidden_state

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, tokens={self.n_tokens}, out_dim={self.out_dim}"


class WhisperAudioEncoder(nn.Module):
    """A frozen ``transformers`` Whisper encoder: log-mel features -> one token per encoder frame.

    ``source``: a ``WhisperConfig``, a local folder (a WhisperModel / WhisperForConditionalGeneration /
    WhisperForAudioClassification ``save_pretrained``; only the encoder is kept) or a :data:`WHISPER_SIZES` name.
    The input is what Whisper's feature extractor makes: (batch, mel bins, 2 * max_source_positions) frames, the
    fixed 30 s window (3000 frames -> 1500 tokens for the published models). ``pool`` averages each run of
    ``pool`` consecutive output tokens (1500 / 10 = 150 tokens), since a byte model's context rarely holds 1500.
    """

    def __init__(self, source, *, dtype: torch.dtype = torch.float32, seed: int = 0, pool: int = 1) -> None:
        super().__init__()
        tf = _transformers()
        dtype = _check_dtype(dtype)
        how, what = _resolve(source, tf.WhisperConfig, WHISPER_SIZES, "Whisper")
        whisper = importlib.import_module("transformers.models.whisper.modeling_whisper")
        if how == "config":
            model = _random(lambda: whisper.WhisperEncoder(what), seed).to(dtype)
        else:
            # WhisperForAudioClassification builds the encoder alone (no decoder in memory) and reads the encoder
            # weights of every Whisper checkpoint layout; its small head is dropped.
            full, info = _load(tf, tf.WhisperForAudioClassification, what, tf.WhisperConfig, "Whisper", dtype)
            missing = sorted(k for k in info["missing_keys"] if k.startswith("encoder."))
            if missing:
                raise CheckpointError(f"{what} lacks Whisper encoder weights: {', '.join(missing[:3])} ...")
            model = full.encoder
        cfg = model.config
        frames = cfg.max_source_positions
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or frames % pool:
            raise UsageError(f"pool must be a positive integer dividing the encoder's {frames} frames, got {pool!r}")
        self.encoder = model
        self.mel_bins, self.n_frames = cfg.num_mel_bins, 2 * frames  # two stride-1/stride-2 convolutions
        self.pool, self.out_dim, self.n_tokens = pool, cfg.d_model, frames // pool
        freeze(self)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or tuple(mel.shape[1:]) != (self.mel_bins,
                                                                                            self.n_frames):
            raise DataError(f"Whisper encoder expects log-mel features of shape (batch, {self.mel_bins}, "
                            f"{self.n_frames}), got {_shape(mel)}")
        dtype = next(self.encoder.parameters()).dtype
        h = self.encoder(mel.to(dtype)).last_hidden_state  # (B, frames, d)
        if self.pool > 1:
            B, M, d = h.shape
            h = h.view(B, M // self.pool, self.pool, d).mean(dim=2)
        return h

    def extra_repr(self) -> str:
        return f"mel=({self.mel_bins}, {self.n_frames}), tokens={self.n_tokens}, out_dim={self.out_dim}"
