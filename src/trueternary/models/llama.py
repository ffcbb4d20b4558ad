"""The Llama-style byte-level model (``--model llama``): a block llama.cpp runs, so it exports to GGUF.

    idx (B, L) -> Embedding(288, d)
      -> n_layers x [ x += Wo(attn(rope(q), rope(k), v))        q, k, v = Wq, Wk, Wv (rmsnorm(x)); q, k rms-normed
                                                                per head when qk_norm
                      x += Wdown(silu(Wgate(h)) * Wup(h))       h = rmsnorm(x) ]
      -> rmsnorm -> Wout (d -> 288) -> logits

It is the Llama block (SwiGLU MLP, rotary positions, pre-norm RMSNorm) with RMSNorms that have no
weights (llama.cpp gets weights of ones) and separate q / k / v projections. With ``qk_norm`` (the
default) q and k get a weightless RMSNorm per head before the rotation, as in Qwen3: llama.cpp's
``qwen3`` architecture is exactly this block, and without ``qk_norm`` its ``llama`` architecture is
(``trueternary.export``). The project's own transformer (``--model transformer``) has sub-layer norms
and an ungated squared-ReLU MLP, which no llama.cpp architecture computes.

Like the transformer it has no parameters besides its ``nn.Linear`` / ``nn.Embedding`` weights, so every
training configuration (float, QAT, strict ternary after ``ternarize``) uses the same definition. Rotary
positions rotate the two halves of each head (the transformer's ``apply_rotary``); the export permutes the
rows of Wq and Wk for llama.cpp's adjacent-pair convention where the architecture needs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..vocab import VOCAB_SIZE
from .transformer import apply_rotary, rms_norm, rotary_tables

RMS_EPS = 1e-6  # every RMSNorm of the model (the export writes it into the GGUF)
ROPE_THETA = 10000.0  # rotary base (rotary_tables' constant; the export writes it into the GGUF)


def default_d_ff(d_model: int) -> int:
    """8/3 d_model (a SwiGLU MLP of three matrices with the weights of the transformer's two 4 d_model ones)
    rounded to the nearest multiple of 256 when d_model is one (llama.cpp's ternary types store rows in blocks
    of 256: no padding in the export), else of 64. Within 13% of the transformer's MLP weights (d_model 256:
    768, 1.125x; 512: 1280, 0.94x; 128: 320, 0.94x)."""
    m = 256 if d_model % 256 == 0 else 64
    return max(m, m * round(8 * d_model / 3 / m))


@dataclass
class LlamaConfig:
    vocab_size: int = VOCAB_SIZE
    ctx: int = 256
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int | None = None  # MLP width; None: default_d_ff(d_model)
    qk_norm: bool = True
    # init std of q, k, v, gate and up (o and down: / sqrt(2 n_layers)); None: 1/sqrt(d_model), unit-variance outputs.
    # Without the transformer's sub-layer norms the residual branches' output scale is the product of the layers'
    # scales, which a ternary weight changes only by doubling through votes: the transformer's 0.02 left the MLP
    # nearly silent and cost 0.27 bits/byte on the README job (docs/export.md).
    init_std: float | None = None
    emb_std: float = 1.0
    head_std: float | None = None  # None: 1/sqrt(d_model), as the transformer (unit-variance initial logits)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "ctx", "d_model", "n_layers", "n_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_ff is not None and (isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ValueError(f"d_ff must be a positive integer or None, got {self.d_ff!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even (rotary embeddings)")

    @property
    def d_hidden(self) -> int:
        return self.d_ff if self.d_ff is not None else default_d_ff(self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.d_model, cfg.d_hidden
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, L, d = x.shape
        h = rms_norm(x, RMS_EPS)
        q, k, v = (lin(h).reshape(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if cfg.qk_norm:
            q, k = rms_norm(q, RMS_EPS), rms_norm(k, RMS_EPS)
        q, k = apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:L], sin[:L])
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
        x = x + self.o(a)
        h = rms_norm(x, RMS_EPS)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaModel(nn.Module):
    """A pre-norm Llama-style byte-level model with no parameters besides its weights."""

    def __init__(self, cfg: LlamaConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.ctx, cfg.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        std = cfg.d_model**-0.5 if cfg.init_std is None else cfg.init_std
        resid_std = std / math.sqrt(2 * cfg.n_layers)
        self.embed.weight.normal_(0.0, cfg.emb_std, generator=generator)
        for blk in self.blocks:
            for lin in (blk.q, blk.k, blk.v, blk.gate, blk.up):
                lin.weight.normal_(0.0, std, generator=generator)
            for lin in (blk.o, blk.down):  # the residual projections, as the transformer's
                lin.weight.normal_(0.0, resid_std, generator=generator)
        head_std = cfg.d_model**-0.5 if cfg.head_std is None else cfg.head_std
        self.head.weight.normal_(0.0, head_std, generator=generator)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.ctx:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's context {self.cfg.ctx}")
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin)
        return self.head(rms_norm(x, RMS_EPS))
