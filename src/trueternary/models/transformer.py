"""The byte-level transformer used by ``train`` and ``bench`` (all four weight representations).

It is written with plain ``nn.Linear`` / ``nn.Embedding`` layers and *no* other parameters, so the
same definition serves every configuration: float (as is), BitNet-style QAT (layers swapped for
fake-quant ones), and strict ternary (``trueternary.ternarize``, after which it has zero
parameters). Only the weight representation and the update rule differ between configs.

    idx (B, L) bytes/specials -> Embedding(288, d)
      -> n_layers x [ x += Wo(subln(attn(rope(q), rope(k), v)))   q,k,v = Wqkv(rmsnorm(x)), q,k rms-normed
                      x += Wdown(subln(relu(Wup(rmsnorm(x)))**2)) ]
      -> rmsnorm -> Wout (d -> 288) -> logits

All norms are RMSNorm without gain (parameter-free). ``subln`` puts one more RMSNorm on the inputs
of the two residual projections (as BitNet's SubLN), which makes every ternary linear see unit-RMS
input: the network is insensitive to the absolute scale of its weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..vocab import VOCAB_SIZE


@dataclass
class TransformerConfig:
    vocab_size: int = VOCAB_SIZE
    ctx: int = 256
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    mlp_ratio: float = 4.0
    subln: bool = True
    qk_norm: bool = True
    init_std: float = 0.02
    emb_std: float = 1.0
    # init std of the output layer; None: 1/sqrt(d_model), so the initial logits have unit variance.
    # Measured better for every config than init_std (docs/learning.md): a ternary head's scale E can only
    # grow by doubling through votes, so starting it 20x too small costs TrueTernary most.
    head_std: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "ctx", "d_model", "n_layers", "n_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even (rotary embeddings)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def d_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def rotary_tables(ctx: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(ctx, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, L, D); rotate pairs (x[..., :D/2], x[..., D/2:])
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, cfg.d_hidden, bias=False)
        self.down = nn.Linear(cfg.d_hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, L, d = x.shape
        H = cfg.n_heads
        q, k, v = self.qkv(rms_norm(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, L, H, d // H).transpose(1, 2) for t in (q, k, v))
        if cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        q, k = apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:L], sin[:L])
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(B, L, d)
        x = x + self.proj(rms_norm(a) if cfg.subln else a)
        h = F.relu(self.up(rms_norm(x))).square()
        return x + self.down(rms_norm(h) if cfg.subln else h)


class ByteTransformer(nn.Module):
    """A pre-norm byte-level transformer with rotary positions and no parameters besides its weights."""

    def __init__(self, cfg: TransformerConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.ctx, cfg.d_model // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.embed.weight.normal_(0.0, cfg.emb_std, generator=generator)
        for blk in self.blocks:
            blk.qkv.weight.normal_(0.0, cfg.init_std, generator=generator)
            blk.up.weight.normal_(0.0, cfg.init_std, generator=generator)
            blk.proj.weight.normal_(0.0, resid_std, generator=generator)
            blk.down.weight.normal_(0.0, resid_std, generator=generator)
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
        return self.head(rms_norm(x))
