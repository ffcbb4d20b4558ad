"""Frozen encoders as modality tokens: any frozen ``nn.Module`` feeds embeddings into a byte model.

    inputs --encoder (frozen, no grad)--> e (B, M, enc_dim) or (B, enc_dim)
           --rms, proj: Linear(enc_dim, d_model) (ternary once ternarised)--> (B, M, d_model)
    model sequence:  [MOD]  tok_1 .. tok_M  [MOD_END]  byte_1 .. byte_L

``MOD`` / ``MOD_END`` are the special tokens of :mod:`trueternary.vocab`, embedded by the model's own
byte embedding (:func:`bracket_modality`).

The encoder is the user's (a local vision or audio network, a feature extractor...): nothing is
downloaded, it is never trained, and it is **not a registered submodule** of the adapter. That is
deliberate: ``ternarize`` would otherwise replace the encoder's own Linear layers and freeze its
parameters into buffers, ``state_dict`` would carry a copy of a model the user already has, and
parameter counts would mix it with the trainable model. Its parameters are frozen
(``requires_grad=False``), it is kept in eval mode, moved to the input's device on first use, and
reported separately (``frozen_parameters``; ``trueternary.audit``). Only ``proj`` is trained.

Ready-made frozen ViT and Whisper encoders (``transformers``, optional) are in :mod:`.hf_encoders`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TernaryLinear
from ..vocab import MOD, MOD_END
from ..weight import DEFAULT_GROUP_SIZE


def freeze(encoder: nn.Module) -> nn.Module:
    """No gradients for ``encoder``'s parameters, and eval mode (no dropout; BatchNorm statistics stay put)."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


class FrozenEncoder(nn.Module):
    """Wraps a frozen encoder and projects its output to ``d_model`` modality tokens."""

    def __init__(
        self,
        encoder: nn.Module,
        enc_dim: int,
        d_model: int,
        *,
        ternary: bool = False,
        group_size: int = DEFAULT_GROUP_SIZE,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        freeze(encoder)
        self._encoder = [encoder]  # a list: hidden from modules(), state_dict() and ternarize()
        self.enc_dim, self.d_model = enc_dim, d_model
        if ternary:
            self.proj = TernaryLinear(enc_dim, d_model, group_size=group_size, init_std=init_std, generator=generator)
        else:
            self.proj = nn.Linear(enc_dim, d_model, bias=False)
            with torch.no_grad():
                self.proj.weight.normal_(0.0, init_std, generator=generator)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def frozen_parameters(self) -> int:
        """Number of (frozen, float) parameters of the wrapped encoder."""
        return sum(p.numel() for p in self.encoder.parameters())

    def frozen_bytes(self) -> int:
        enc = self.encoder
        return sum(t.numel() * t.element_size() for t in (*enc.parameters(), *enc.buffers()))

    def train(self, mode: bool = True):  # the encoder stays in eval mode whatever the model does
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, inputs) -> torch.Tensor:
        enc = self.encoder
        dev = inputs.device if isinstance(inputs, torch.Tensor) else self.proj_device()
        first = next(iter(enc.parameters()), None)
        if first is not None and first.device != dev:
            enc.to(dev)
        with torch.no_grad():
            e = enc(inputs)
        if not isinstance(e, torch.Tensor):
            raise TypeError(f"encoder must return a tensor, got {type(e).__name__}")
        if e.dim() == 2:
            e = e[:, None, :]
        if e.dim() != 3 or e.shape[-1] != self.enc_dim:
            raise ValueError(f"encoder output must be (B, M, {self.enc_dim}) or (B, {self.enc_dim}), "
                             f"got {tuple(e.shape)}")
        e = e.detach().float()
        return self.proj(F.rms_norm(e, (self.enc_dim,), eps=1e-6))

    def proj_device(self) -> torch.device:
        return next(iter((*self.proj.parameters(), *self.proj.buffers()))).device

    def extra_repr(self) -> str:
        return f"encoder={type(self.encoder).__name__}, enc_dim={self.enc_dim}, d_model={self.d_model} (frozen)"


def bracket_modality(tokens: torch.Tensor, embed) -> torch.Tensor:
    """``[MOD] tokens [MOD_END]``: (B, M, d) -> (B, M + 2, d), specials embedded by ``embed`` (ids -> vectors)."""
    B, _, d = tokens.shape
    ids = torch.tensor([MOD, MOD_END], device=tokens.device)
    spec = embed(ids).to(tokens.dtype)  # (2, d)
    return torch.cat([spec[0].expand(B, 1, d), tokens, spec[1].expand(B, 1, d)], dim=1)
