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

Everything between two linear layers is one of four pure functions (:data:`SHARED_OPS`: ``norm``,
``attention``, ``add_norm``, ``relu2``) that hands the next linear layer its input already in the matmul
dtype (autocast's, else the input's: the cast the layer would do). ``ByteTransformer.use_compiled_ops()``
swaps them for ``torch.compile``'d versions (fused elementwise, norm and cast kernels; the linear layers,
ternary or float, stay eager): on a GPU the eager versions spend most of a step in separate elementwise,
norm and cast kernels (docs/performance.md). Compiled results equal the eager ones up to float rounding.

Incremental decoding (``generate``) is a second entry point beside ``forward``: ``new_cache()`` and
``forward_cached(idx, cache)``, which appends the keys and values of ``idx`` to a :class:`KVCache` and attends
over everything cached (:func:`cached_attention_op`, the same ops as ``attention_op``). From an empty cache it is
the training forward, bit for bit; one-byte steps after it equal the full forward up to float rounding.

``ByteTransformer.use_activation_checkpointing()`` runs each block under ``torch.utils.checkpoint``: its
activations are recomputed in backward instead of kept, so a forward keeps one (B, L, d) input per block
(docs/scaling.md). Votes are cast only in backward, once per layer, so a step casts the same votes with the
same random keys either way: the results are bit for bit the same where the arithmetic is deterministic.

:meth:`ByteTransformer.init_plan` lists every weight in the order the initialisation draws it from its
generator; ``trueternary.init`` builds a *lazy* model from it (weights on the ``meta`` device, drawn one
layer at a time when the model is ternarised or materialised: the same numbers as an eager build).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.linear import compute_dtype
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


# ---- the shared ops: everything between two linear layers (pure functions of their inputs)
def norm_op(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return rms_norm(x).to(dtype)


def attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, qk_norm: bool, subln: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """(B, L, 3d) projections -> causal attention with rotary positions -> (B, L, d) input of the output projection."""
    B, L, d3 = qkv.shape
    d = d3 // 3
    q, k, v = (t.reshape(B, L, n_heads, d // n_heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    if qk_norm:
        q, k = rms_norm(q), rms_norm(k)
    q, k = apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:L], sin[:L])
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
    return (rms_norm(a) if subln else a).to(dtype)


def add_norm_op(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, and the normalised sum (the next linear layer's input)."""
    s = x + y
    return s, rms_norm(s).to(dtype)


def relu2_op(u: torch.Tensor, subln: bool, dtype: torch.dtype) -> torch.Tensor:
    h = F.relu(u).square()
    return (rms_norm(h) if subln else h).to(dtype)


SHARED_OPS = {"norm": norm_op, "attention": attention_op, "add_norm": add_norm_op, "relu2": relu2_op}
# (torch.compile backend, deterministic) -> compiled SHARED_OPS (built on first use)
_COMPILED_OPS: dict[tuple[str, bool], dict] = {}


def shared_ops(compile_backend: str | None) -> dict:
    """SHARED_OPS, eager (None) or compiled with ``torch.compile(backend=compile_backend, fullgraph=True)``.
    In deterministic mode (trueternary.determinism) attention stays eager: a compiled graph takes cuDNN
    attention, whose backward is not deterministic, whatever the SDPA flags say."""
    if compile_backend is None:
        return SHARED_OPS
    deterministic = torch.are_deterministic_algorithms_enabled()
    ops = _COMPILED_OPS.get((compile_backend, deterministic))
    if ops is None:
        ops = _COMPILED_OPS[(compile_backend, deterministic)] = {
            k: f if deterministic and k == "attention" else torch.compile(f, backend=compile_backend, fullgraph=True)
            for k, f in SHARED_OPS.items()}
    return ops


@dataclass
class KVCache:
    """Keys (rotary applied) and values of every layer at the positions decoded so far, for ``forward_cached``.

    ``keys[i]`` / ``values[i]``: layer ``i``'s (B, H, ctx, head_dim) buffers, allocated on the first call (in the
    dtype and on the device the layer computes in); positions ``[0, length)`` hold data."""

    ctx: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0


def cached_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, qk_norm: bool,
                        subln: bool, dtype: torch.dtype, cache: KVCache, layer: int) -> torch.Tensor:
    """``attention_op`` for positions ``[cache.length, cache.length + L)`` that also attend to the cached ones:
    the new keys and values are written into ``cache`` (its ``length`` is advanced by the caller, once every
    layer has written)."""
    B, L, d3 = qkv.shape
    d = d3 // 3
    q, k, v = (t.reshape(B, L, n_heads, d // n_heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    if qk_norm:
        q, k = rms_norm(q), rms_norm(k)
    start, end = cache.length, cache.length + L
    q, k = apply_rotary(q, cos[start:end], sin[start:end]), apply_rotary(k, cos[start:end], sin[start:end])
    if layer == len(cache.keys):
        cache.keys.append(k.new_empty(B, n_heads, cache.ctx, d // n_heads))
        cache.values.append(v.new_empty(B, n_heads, cache.ctx, d // n_heads))
    cache.keys[layer][:, :, start:end] = k
    cache.values[layer][:, :, start:end] = v
    if start == 0:  # a prefill: exactly attention_op's call (the fresh tensors, not views of the cache)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        keys, values = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
        # is_causal aligns the mask top-left; new position start + i sees keys [0, start + i]
        mask = None if L == 1 else torch.ones(L, end, dtype=torch.bool, device=q.device).tril(start)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    a = a.transpose(1, 2).reshape(B, L, d)
    return (rms_norm(a) if subln else a).to(dtype)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, cfg.d_hidden, bias=False)
        self.down = nn.Linear(cfg.d_hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: dict = SHARED_OPS) -> torch.Tensor:
        cfg, dt = self.cfg, compute_dtype(x)
        a = ops["attention"](self.qkv(ops["norm"](x, dt)), cos, sin, cfg.n_heads, cfg.qk_norm, cfg.subln, dt)
        x, h = ops["add_norm"](x, self.proj(a), dt)
        return x + self.down(ops["relu2"](self.up(h), cfg.subln, dt))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
                       ops: dict = SHARED_OPS) -> torch.Tensor:
        """``forward`` for positions after the ``cache.length`` cached ones (see ``cached_attention_op``)."""
        cfg, dt = self.cfg, compute_dtype(x)
        a = cached_attention_op(self.qkv(ops["norm"](x, dt)), cos, sin, cfg.n_heads, cfg.qk_norm, cfg.subln, dt,
                                cache, layer)
        x, h = ops["add_norm"](x, self.proj(a), dt)
        return x + self.down(ops["relu2"](self.up(h), cfg.subln, dt))


class ByteTransformer(nn.Module):
    """A pre-norm byte-level transformer with rotary positions and no parameters besides its weights."""

    def __init__(self, cfg: TransformerConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # The rotary tables are derived from the config, not weights: built for real even when the layers
        # are built on the meta device (a lazy model, trueternary.init).
        on_meta = torch.empty(0).is_meta
        cos, sin = rotary_tables(cfg.ctx, cfg.d_model // cfg.n_heads, device="cpu" if on_meta else None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.compile_backend: str | None = None  # use_compiled_ops: the shared ops' torch.compile backend
        self.activation_checkpointing = False  # use_activation_checkpointing
        self.reset_parameters(generator)

    def init_plan(self) -> list[tuple[str, float]]:
        """(layer name, std) of every weight, in the order :meth:`reset_parameters` draws them from its
        generator: each weight is one ``normal_(0, std)`` draw of its full shape."""
        cfg = self.cfg
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        plan = [("embed", cfg.emb_std)]
        for i in range(cfg.n_layers):
            plan += [(f"blocks.{i}.qkv", cfg.init_std), (f"blocks.{i}.up", cfg.init_std),
                     (f"blocks.{i}.proj", resid_std), (f"blocks.{i}.down", resid_std)]
        plan.append(("head", cfg.d_model**-0.5 if cfg.head_std is None else cfg.head_std))
        return plan

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for name, std in self.init_plan():
            self.get_submodule(name).weight.normal_(0.0, std, generator=generator)

    def use_compiled_ops(self, enabled: bool = True, backend: str = "inductor") -> ByteTransformer:
        """Run the shared ops (everything between linear layers) compiled by ``torch.compile(backend=...)``
        or, with ``enabled=False``, eagerly again. Compilation happens on the first forward (seconds to a
        minute); a new input shape recompiles. Returns the model."""
        self.compile_backend = backend if enabled else None
        return self

    def use_activation_checkpointing(self, enabled: bool = True) -> ByteTransformer:
        """Recompute each block's activations in backward instead of keeping them (``torch.utils.checkpoint``,
        non-reentrant), or, with ``enabled=False``, keep them again. A training forward then keeps one
        (batch, length, d_model) input per block, and backward adds one block's forward. Returns the model."""
        self.activation_checkpointing = bool(enabled)
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.ctx:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's context {self.cfg.ctx}")
        ops = shared_ops(self.compile_backend)
        x = self.embed(idx)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            if recompute:
                # preserve_rng_state=False: a block draws no random numbers (the votes' keys are counters,
                # cast in backward only), and saving the RNG state would read it inside a CUDA graph capture
                x = checkpoint(blk, x, self.rope_cos, self.rope_sin, ops, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = blk(x, self.rope_cos, self.rope_sin, ops)
        return self.head(ops["norm"](x, compute_dtype(x)))

    # ------------------------------------------------------------------ incremental decoding (generate)
    def new_cache(self) -> KVCache:
        """An empty key/value cache for ``forward_cached`` (room for ``cfg.ctx`` positions)."""
        return KVCache(self.cfg.ctx)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of ``idx`` (B, L) as the continuation of the ``cache.length`` positions in ``cache``, whose keys
        and values it appends. From an empty cache this is ``forward(idx)`` (same ops, same numerics); a one-byte
        step after it equals ``forward`` over the whole sequence up to float rounding
        (``tests/test_generate.py``)."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {tuple(idx.shape)}")
        if cache.length + idx.shape[1] > self.cfg.ctx:
            raise ValueError(f"{cache.length} cached + {idx.shape[1]} new positions exceed the model's context "
                             f"{self.cfg.ctx}")
        ops = shared_ops(self.compile_backend)
        x = self.embed(idx)
        for i, blk in enumerate(self.blocks):
            x = blk.forward_cached(x, self.rope_cos, self.rope_sin, cache, i, ops)
        cache.length += idx.shape[1]
        return self.head(ops["norm"](x, compute_dtype(x)))
