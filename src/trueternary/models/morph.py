"""MORPH: a byte-level model built from MORPH's components (``--model morph``).

    idx (B, L) bytes/specials            [optional: [MOD] frozen-encoder tokens [MOD_END] prepended]
      e  = Embed(288, d)(idx)                                      byte embedding
      x  = e + LSTM(rms(e))                                        local recurrent encoder (one projection
                                                                   over [x, h]; optional chunking)
      z  = rms(W_vq rms(x.detach()))            (B, L, code_dim)   the VQ branch observes, never steers
      q, code = VQ(z)                                              nearest ternary code, STE, usage counters
      x += gather_add(W_q q, node[unique codes], inverse)          per_position = vq_output + node_features[code]
      x += Graph(x, code)                                          window edges t-d -> t (d < window) and a
                                                                   same-code edge from the last earlier
                                                                   occurrence of t's code; ternary edge attrs
      n_layers x [ x += Wo(subln(causal attention))                 as in the transformer (RoPE, qk-norm)
                   x += MoE(rms(x)) ]                              ternary router, top-k ternary MLP experts
      logits = head(rms(x))                     (B, L, 288)

Like ``ByteTransformer`` it is written with ``nn.Linear`` / ``nn.Embedding`` only (the LSTM projection,
the VQ codebook, the code-node table, the edge attributes included), so ``ternarize`` gives the strict
ternary model with zero parameters and ``fake_ternarize`` the BitNet baseline: every benchmark config
runs on the same architecture. The only state besides weights is integer (VQ usage / idle counters,
the MoE balance bias and token counts).

Every step is causal: the LSTM runs forward in time, VQ and MoE act per position, graph edges go from
the past to the present, attention is causal, and the statistics the VQ and MoE keep are updated after
the forward (they affect later batches only). ``tests/test_morph.py`` checks that changing a byte
never changes the logits of earlier positions. Data flow, costs and the role of each part:
``docs/morph.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..components.encoders import FrozenEncoder, bracket_modality
from ..components.graph import CausalGraphAggregation
from ..components.lstm import TernaryLSTMCell
from ..components.moe import TernaryMoE
from ..components.vq import TernaryVQCodebook
from ..ops.gather_add import KERNEL_BACKENDS, gather_add
from ..vocab import VOCAB_SIZE
from ..weight import TernaryScaleTensor
from .transformer import apply_rotary, rms_norm, rotary_tables


@dataclass
class MorphConfig:
    vocab_size: int = VOCAB_SIZE
    ctx: int = 256
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    qk_norm: bool = True
    lstm_chunk: int = 0  # 0: one recurrence over the whole sequence; P: restart every P positions (parallel)
    n_codes: int = 256
    code_dim: int = 64
    vq_beta: float = 0.25
    dead_code_steps: int = 64
    graph_window: int = 8
    graph_heads: int = 4
    match_edges: bool = True
    n_experts: int = 4
    top_k: int = 2
    mlp_ratio: float = 4.0  # active expert hidden width = mlp_ratio * d_model / top_k (same FLOPs as dense)
    moe_aux_coef: float = 0.01
    moe_balance_bias: bool = True
    init_std: float = 0.02
    emb_std: float = 1.0
    kernel_backend: str = "auto"
    # Ablation switches (each part can be dropped to measure what it earns; see docs/morph.md).
    # Without the VQ there are no codes, so the graph has window edges only.
    vq_detach: bool = True  # the VQ branch observes the stream without steering it (see forward)
    use_lstm: bool = True
    use_vq: bool = True
    use_graph: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "ctx", "d_model", "n_layers", "n_heads", "n_codes", "code_dim",
                     "graph_window", "graph_heads", "n_experts", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lstm_chunk", "dead_code_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even size")
        if self.d_model % self.graph_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by graph_heads ({self.graph_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")

    @property
    def expert_hidden(self) -> int:
        return max(1, int(round(self.mlp_ratio * self.d_model / self.top_k)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MorphConfig:
        """Known fields only: the benchmark passes ``ctx, d_model, n_layers, n_heads`` (and may pass more)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class MorphBlock(nn.Module):
    """Causal self-attention (as in ``ByteTransformer``) followed by a mixture of ternary experts."""

    def __init__(self, cfg: MorphConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe = TernaryMoE(d, cfg.n_experts, cfg.top_k, cfg.expert_hidden, ternary=False,
                              aux_coef=cfg.moe_aux_coef, balance_bias=cfg.moe_balance_bias,
                              backend=cfg.kernel_backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        H = self.cfg.n_heads
        q, k, v = self.qkv(rms_norm(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, L, H, d // H).transpose(1, 2) for t in (q, k, v))
        if self.cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        q, k = apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:L], sin[:L])
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
        x = x + self.proj(rms_norm(a))
        return x + self.moe(rms_norm(x))


class MORPHTernaryModel(nn.Module):
    """Byte embedding -> ternary LSTM -> VQ concepts -> code-node gather-add -> causal graph -> attention/MoE."""

    def __init__(self, cfg: MorphConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.lstm = TernaryLSTMCell(d, d, ternary=False) if cfg.use_lstm else None
        if cfg.use_vq:
            self.vq_in = nn.Linear(d, cfg.code_dim, bias=False)
            self.vq = TernaryVQCodebook(cfg.n_codes, cfg.code_dim, ternary=False, beta=cfg.vq_beta,
                                        dead_after=cfg.dead_code_steps)
            self.vq_out = nn.Linear(cfg.code_dim, d, bias=False)
            self.code_nodes = nn.Embedding(cfg.n_codes, d)
        else:
            self.vq = None
        self.graph = CausalGraphAggregation(
            d, cfg.graph_window, cfg.graph_heads, match_edges=cfg.match_edges and cfg.use_vq, ternary=False,
            backend=cfg.kernel_backend) if cfg.use_graph else None
        self.blocks = nn.ModuleList(MorphBlock(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.modality: FrozenEncoder | None = None
        cos, sin = rotary_tables(cfg.ctx, d // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.last_codes: torch.Tensor | None = None
        self.last_vq_commitment: torch.Tensor | None = None
        self.reset_parameters(generator)

    # Linear layers whose output is added to the residual stream get the smaller, depth-scaled init.
    _RESIDUAL_OUT = ("proj", "down", "out", "vq_out")

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        cfg = self.cfg
        resid_std = cfg.init_std / math.sqrt(2 * (cfg.n_layers + 1))
        for name, m in self.named_modules():  # registration order: deterministic in the generator
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(m, nn.Linear):
                std = resid_std if leaf in self._RESIDUAL_OUT else cfg.init_std
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, nn.Embedding):
                # byte embedding, VQ codebook (matches the unit-RMS z) and edge attributes: unit scale;
                # code-node features enter the residual stream: small.
                std = cfg.init_std if leaf == "code_nodes" else cfg.emb_std
                m.weight.normal_(0.0, std, generator=generator)

    # ------------------------------------------------------------------ modality tokens
    def attach_encoder(self, encoder: nn.Module, enc_dim: int | None = None,
                       generator: torch.Generator | None = None) -> FrozenEncoder:
        """Feed a frozen encoder's embeddings as ``[MOD] ... [MOD_END]`` tokens (see components/encoders.py).

        ``enc_dim``: the width of the encoder's output; by default its ``out_dim`` (the ViT / Whisper encoders of
        components/hf_encoders.py have one). On an already ternarised model the projection is created ternary;
        build the optimiser after.
        """
        if enc_dim is None:
            enc_dim = getattr(encoder, "out_dim", None)
            if not isinstance(enc_dim, int):
                raise ValueError(f"{type(encoder).__name__} has no out_dim: pass enc_dim (its output width)")
        ternary = any(isinstance(m, TernaryScaleTensor) for m in self.modules())
        dev = self.rope_cos.device
        self.modality = FrozenEncoder(encoder, enc_dim, self.cfg.d_model, ternary=ternary,
                                      init_std=self.cfg.init_std, generator=generator).to(dev)
        return self.modality

    # ------------------------------------------------------------------ forward
    def _local_encoder(self, u: torch.Tensor) -> torch.Tensor:
        B, L, d = u.shape
        P = self.cfg.lstm_chunk
        if P and L > P:
            pad = (-L) % P  # padding goes at the end (the future): earlier positions are unaffected
            chunks = F.pad(u, (0, 0, 0, pad)).reshape(B * (L + pad) // P, P, d)
            hs, _ = self.lstm.forward_sequence(chunks)
            return hs.reshape(B, L + pad, d)[:, :L]
        return self.lstm.forward_sequence(u)[0]

    def forward(self, idx: torch.Tensor, modality_inputs=None) -> torch.Tensor:
        """``idx`` (B, L) -> logits (B, L, vocab); ``modality_inputs`` go to the attached frozen encoder."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {tuple(idx.shape)}")
        cfg = self.cfg
        x = self.embed(idx)
        prefix = 0
        if modality_inputs is not None:
            if self.modality is None:
                raise ValueError("modality inputs given but no encoder attached (model.attach_encoder)")
            pre = bracket_modality(self.modality(modality_inputs).to(x.dtype), self.embed)
            if pre.shape[0] != x.shape[0]:
                raise ValueError(f"modality batch {pre.shape[0]} != token batch {x.shape[0]}")
            x = torch.cat([pre, x], dim=1)
            prefix = pre.shape[1]
        B, L, d = x.shape
        if L > cfg.ctx:
            raise ValueError(f"sequence length {L} (modality tokens included) exceeds the model's context {cfg.ctx}")
        x = x.float()
        if self.lstm is not None:
            x = x + self._local_encoder(rms_norm(x))
        codes = None
        if self.vq is not None:
            # The VQ branch reads a detached copy of the stream: its commitment gradient trains only vq_in
            # (and the codebook), it does not pull the embedding / LSTM toward the codes.
            vq = self.vq(rms_norm(self.vq_in(rms_norm(x.detach() if cfg.vq_detach else x))))
            codes = vq.indices
            self.last_codes, self.last_vq_commitment = codes.detach(), vq.commitment
            uniq, inv = torch.unique(codes.reshape(-1), return_inverse=True)
            nodes = self.code_nodes(uniq)  # only the codes in use: sparse votes on the code-node table
            p = gather_add(self.vq_out(vq.q).reshape(B * L, d), nodes, inv, cfg.kernel_backend)
            x = x + p.view(B, L, d)
        if self.graph is not None:
            x = x + self.graph(x, codes)
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin)
        logits = self.head(rms_norm(x))
        return logits[:, prefix:] if prefix else logits

    def aux_losses(self) -> dict:
        """Last forward's auxiliary signals (already trained through backward; for logging)."""
        return {
            "vq_commitment": None if self.last_vq_commitment is None else float(self.last_vq_commitment),
            "moe_aux": [float(b.moe.last_aux_loss) for b in self.blocks],
        }
