"""TernaryVQCodebook: nearest-code vector quantisation against a ternary codebook.

State (all integer; the codebook is a :class:`TernaryEmbeddingTable`, i.e. packed trits + int8 E /
E_accum / T_accum):

    codebook.weight   (K, D)  ternary codes  c_k = T_k * 2**E_k
    usage             int32 (K,)  assignments seen in training (saturating)
    idle              int32 (K,)  training steps since the code was last assigned (saturating)
    steps             int64 ()    training forward calls (keys the re-seeding RNG)

Forward, for encoder outputs ``z`` (..., D):

    k(n) = argmin_k ||z_n - c_k||^2 = argmin_k (||c_k||^2 - 2 z_n . c_k)
    q_n  = c_k(n)   (value)          dq/dz = I   (straight-through estimator for the encoder)

Learning signals, injected in backward without any loss term the training loop must add
(``N`` = number of vectors, so they are per-position means like the cross-entropy):

    encoder   grad_z  = grad_q + beta * 2 (z - c) / N              (commitment loss beta ||z - sg(c)||^2)
    codebook  grad_c  = 2 (c - z) / N                               (codebook loss ||sg(z) - c||^2)

``grad_c`` flows into the codebook lookup ``codebook(k)``; for a ternary table that is
``TernaryEmbeddingFunction``, which sums it per code and hands it to
``weight._voter.cast_votes(weight, g, T, rows=order, n_rows=n)`` (the used codes first, ``n`` of them):
only codes the batch used receive votes (an online, integer k-means). For a float table (``nn.Embedding``,
Adam) or a BitNet ``QATEmbedding`` the same gradient lands in the weight's ``.grad``.

Dead codes: a code unassigned for ``dead_after`` training steps is re-seeded from a vector of the
current batch (positions picked by the counter-based RNG of :mod:`trueternary.rng`), ternarised by
the same absmean rule as ``TernaryScaleTensor.load_float_`` (its accumulators reset). Re-seeding runs
at the *end* of the forward, so it only changes later batches: no position ever sees a code seeded
from a later position of its own batch (the model stays causal in training too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import rng
from ..layers import TernaryEmbedding
from ..quant import group_absmean_log2
from ..weight import DEFAULT_GROUP_SIZE

INT32_MAX = 2**31 - 1
_RESEED_STREAM = 0x56510  # RNG stream of dead-code re-seeding (distinct from vote streams)


@dataclass
class VQOutput:
    q: torch.Tensor  # (..., D) quantised vectors (code values, straight-through to z)
    indices: torch.Tensor  # (...) int64 code per vector
    commitment: torch.Tensor  # () mean ||z - c||^2 per vector, detached (for logging)


class VQStraightThrough(torch.autograd.Function):
    """Value ``c``; gradients: STE + commitment into ``z``, codebook loss into ``c`` (see module doc)."""

    @staticmethod
    def forward(ctx, z, c, beta):
        ctx.save_for_backward(z, c)
        ctx.beta = beta
        return c.detach().clone().to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, c = ctx.saved_tensors
        diff = (z.float() - c.float()) * (2.0 / max(1, z.shape[0]))
        gz = (g.float() + ctx.beta * diff).to(z.dtype) if ctx.needs_input_grad[0] else None
        gc = (-diff).to(c.dtype) if ctx.needs_input_grad[1] else None
        return gz, gc, None


def nearest_code(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z_n - codes_k||^2 for z (N, D), codes (K, D), in float32 (ties: the lowest k)."""
    z, codes = z.float(), codes.float()
    dist = codes.square().sum(1)[None, :] - 2.0 * (z @ codes.t())
    return dist.argmin(1)


class TernaryVQCodebook(nn.Module):
    """Vector quantiser with a ternary (or, before ``ternarize``, float) codebook of ``n_codes`` x ``code_dim``."""

    def __init__(
        self,
        n_codes: int,
        code_dim: int,
        *,
        ternary: bool = True,
        beta: float = 0.25,
        dead_after: int = 64,
        group_size: int = DEFAULT_GROUP_SIZE,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("n_codes", n_codes), ("code_dim", code_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(dead_after, bool) or not isinstance(dead_after, int) or dead_after < 0:
            raise ValueError(f"dead_after must be an integer >= 0 (0 disables re-seeding), got {dead_after!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.n_codes, self.code_dim = n_codes, code_dim
        self.beta, self.dead_after, self.seed = float(beta), dead_after, seed
        if ternary:
            self.codebook = TernaryEmbedding(n_codes, code_dim, group_size=group_size, generator=generator)
        else:
            self.codebook = nn.Embedding(n_codes, code_dim)
            with torch.no_grad():
                self.codebook.weight.normal_(0.0, 1.0, generator=generator)
        self.register_buffer("usage", torch.zeros(n_codes, dtype=torch.int32))
        self.register_buffer("idle", torch.zeros(n_codes, dtype=torch.int32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("code_ids", torch.arange(n_codes), persistent=False)
        self.last_reseeded = 0

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The effective (K, D) code table as float32 (T * 2**E; float or fake-quantised weights otherwise)."""
        return self.codebook(self.code_ids).float()

    def forward(self, z: torch.Tensor) -> VQOutput:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"expected vectors of dim {self.code_dim}, got {tuple(z.shape)}")
        flat = z.reshape(-1, self.code_dim)
        with torch.no_grad():
            codes = self.codes()
            idx = nearest_code(flat, codes)
            commitment = (flat.float() - codes[idx]).square().sum(1).mean() if flat.shape[0] else flat.new_zeros(())
        c = self.codebook(idx)  # autograd: votes (ternary) / .grad (float) for the used codes only
        q = VQStraightThrough.apply(flat, c, self.beta)
        if self.training and torch.is_grad_enabled():
            self._update_usage(idx, flat.detach())
        return VQOutput(q.view(z.shape), idx.view(z.shape[:-1]), commitment)

    # ------------------------------------------------------------------ usage and dead codes
    @torch.no_grad()
    def _update_usage(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.n_codes)
        self.usage.copy_((self.usage.to(torch.int64) + counts).clamp_max(INT32_MAX).to(torch.int32))
        idle = (self.idle.to(torch.int64) + 1).clamp_max(INT32_MAX).to(torch.int32)
        self.idle.copy_(torch.where(counts > 0, torch.zeros_like(idle), idle))
        self.steps += 1
        self.last_reseeded = 0
        if self.dead_after and z.shape[0]:
            dead = (self.idle >= self.dead_after).nonzero().flatten()
            if dead.numel():
                key = rng.stream_key(self.seed, _RESEED_STREAM, int(self.steps))
                u = rng.uniform(key, dead.numel(), z.device)
                pick = (u * z.shape[0]).long().clamp_max(z.shape[0] - 1)
                self.set_codes_(dead, z[pick])
                self.idle[dead] = 0
                self.last_reseeded = int(dead.numel())

    @torch.no_grad()
    def set_codes_(self, rows: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite codes ``rows`` with ``vectors`` (ternarised for a ternary table; accumulators reset)."""
        if isinstance(self.codebook, TernaryEmbedding):
            w = self.codebook.weight
            T_new, E_new = group_absmean_log2(vectors.float(), w.group_size)
            T = w.trits().clone()
            T[rows] = T_new
            w.set_trits(T)
            w.E[rows] = E_new
            w.E_accum[rows] = 0
            w.T_accum[rows] = 0
            if w.log2_scale is not None:
                w.log2_scale[rows] = E_new.float()
        else:
            self.codebook.weight[rows] = vectors.to(self.codebook.weight.dtype)

    def extra_repr(self) -> str:
        return f"n_codes={self.n_codes}, code_dim={self.code_dim}, beta={self.beta}, dead_after={self.dead_after}"
