"""The flip rule: how a weight gradient becomes integer votes, and votes become trit and scale moves.

This file is the plain-PyTorch *reference* of the learning rule; the Triton kernels in
``trueternary.ops`` must reproduce it bit-for-bit on integer state. Everything here is a pure
function of tensors (no module state), so it can be tested on hand-built cases.

State per weight matrix W (rows x cols), groups of ``group_size`` consecutive weights in a row:

    T        int8-valued trits in {-1, 0, +1}      (stored packed, 5 per byte)
    T_accum  int8 per weight, the vote accumulator  in [-127, 127]
    E        int8 per group, log2 scale: W = T * 2**E
    E_accum  int8 per group, the scale-vote accumulator
    vote_ms  float32[2], running mean of squared gradient (weights, scales) used to normalise votes

One step, for each call of the layer in backward (``cast_*``) and once per optimiser step
(``apply_*``):

    votes     v = clamp(floor(s * g - decay * T + u), -vote_clip, vote_clip)       'stochastic'
                  s = -lr / sqrt(vote_ms + eps),  u ~ U[0, 1) from trueternary.rng
              (vote_ms: running mean of g**2; ``normalize='factored'`` refines it per element)
              v = -sign(g)                                                         'sign' (the seed)
    accumulate  T_accum = clamp(T_accum + v, -127, 127)                  (saturating, never wraps)
    flip      T_accum >= +theta and T < +1:  T += 1, T_accum = 0
              T_accum <= -theta and T > -1:  T -= 1, T_accum = 0
              (clip_at_bounds) T_accum = clamp(T_accum, -theta, theta)  afterwards
    scale     gE = sum over the group of g * T   (dL/dE up to the positive factor 2**E ln 2)
              votes on gE as above (lr * scale_lr) into E_accum; |E_accum| >= scale_threshold moves E by one.
    leak      (optional) T_accum -= sign(T_accum) * (|T_accum| >> leak) once per step, before flips.

A positive gradient votes toward -1 (gradient descent). ``u`` makes the expected vote equal to
``s * g``: the vote carries the gradient's magnitude, not just its sign, while staying an integer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from . import rng

INT8_MAX = 127
VOTE_MODES = ("sign", "stochastic")
NORMALIZE_MODES = ("tensor", "factored", "factored_ema")


@dataclass
class FlipRule:
    """Hyper-parameters of the flip rule. ``FlipRule.naive()`` is the seed's plain rule."""

    vote: str = "stochastic"
    # 'tensor': one running RMS per matrix; 'factored': row x column RMS of the current gradient;
    # 'factored_ema': row x column running RMS (Adafactor's factored second moment)
    normalize: str = "tensor"
    leak: int = 0  # if > 0, T_accum loses |T_accum| >> leak each step (an integer EMA, like Bop's momentum)
    accum_threshold: int = 32
    lr: float = 1.0  # votes per unit of normalised gradient (the learning-rate analogue)
    vote_clip: int = 8
    decay: float = 0.0  # votes toward 0 for non-zero trits (weight-decay analogue)
    grad_beta: float = 0.95  # EMA factor of the mean squared gradient used to normalise votes
    eps: float = 1e-30
    clip_at_bounds: bool = True
    scale_vote: str = "stochastic"
    scale_threshold: int = 32
    scale_lr: float = 0.25  # scale-vote scale relative to ``lr`` (so schedules drive both)
    scale_update_interval: int = 1  # 0 disables scale updates

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.vote not in VOTE_MODES:
            raise ValueError(f"vote must be one of {VOTE_MODES}, got {self.vote!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if isinstance(self.leak, bool) or not isinstance(self.leak, int) or not 0 <= self.leak <= 7:
            raise ValueError(f"leak must be an integer shift in [0, 7], got {self.leak!r}")
        if self.scale_vote not in VOTE_MODES:
            raise ValueError(f"scale_vote must be one of {VOTE_MODES}, got {self.scale_vote!r}")
        for name in ("accum_threshold", "scale_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= INT8_MAX:
                raise ValueError(f"{name} must be an integer in [1, {INT8_MAX}], got {v!r}")
        if isinstance(self.vote_clip, bool) or not isinstance(self.vote_clip, int) or not (
            1 <= self.vote_clip <= INT8_MAX
        ):
            raise ValueError(f"vote_clip must be an integer in [1, {INT8_MAX}], got {self.vote_clip!r}")
        iv = self.scale_update_interval
        if isinstance(iv, bool) or not isinstance(iv, int) or iv < 0:
            raise ValueError(f"scale_update_interval must be an integer >= 0, got {iv!r}")
        for name in ("lr", "scale_lr", "decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0 or v != v or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < float("inf"):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if not 0.0 <= self.grad_beta < 1.0:
            raise ValueError(f"grad_beta must be in [0, 1), got {self.grad_beta!r}")

    @classmethod
    def naive(cls, accum_threshold: int = 8, scale_update_interval: int = 1) -> FlipRule:
        """The seed's rule: one sign vote per weight per step, reset on flip, E voted the same way."""
        return cls(
            vote="sign",
            accum_threshold=accum_threshold,
            clip_at_bounds=False,
            scale_vote="sign",
            scale_threshold=accum_threshold,
            scale_update_interval=scale_update_interval,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlipRule:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FlipRule fields: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# votes
# --------------------------------------------------------------------------------------------


def ema_ms(ms: torch.Tensor, cur: torch.Tensor, beta: float) -> torch.Tensor:
    """Running mean square, elementwise: ``beta * ms + (1 - beta) * cur``.

    ``ms <= 0`` means 'not seen a gradient yet': take ``cur``. A ``cur`` that is zero or not finite
    carries no scale information and leaves ``ms`` as is.
    """
    informative = torch.isfinite(cur) & (cur > 0)
    new = torch.where(ms <= 0, cur, ms * beta + cur * (1.0 - beta))
    return torch.where(informative, new, ms)


def update_grad_ms(ms: torch.Tensor, g: torch.Tensor, beta: float) -> torch.Tensor:
    """New running mean square of the whole gradient ``g`` (see :func:`ema_ms`)."""
    return ema_ms(ms, g.float().square().mean(), beta)


def factored_ema_ms(
    R: torch.Tensor, C: torch.Tensor, g: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adafactor-style per-element mean square from running row and column statistics.

    ``R`` (rows,) and ``C`` (cols,) are running means of ``g**2`` over each row / column. The estimate
    of ``E[g_ij**2]`` is ``R_i * C_j / mean(R)``, built from the statistics *before* this gradient
    (a row or column seen for the first time bootstraps from this one). Returns (ms (rows, cols), R', C').
    """
    g2 = g.float().square()
    r, c = g2.mean(dim=1), g2.mean(dim=0)
    R_use = torch.where(R <= 0, r, R)
    C_use = torch.where(C <= 0, c, C)
    ms = R_use[:, None] * C_use[None, :] / C_use.mean().clamp_min(1e-38)
    return ms, ema_ms(R, r, beta), ema_ms(C, c, beta)


def vote_multiplier(ms: torch.Tensor, lr: float | torch.Tensor, eps: float) -> torch.Tensor:
    """The float32 factor ``s = -lr / sqrt(ms + eps)`` that turns a gradient into expected votes."""
    return (-lr / torch.sqrt(ms.float() + eps)).to(torch.float32)


def stochastic_votes(
    g: torch.Tensor,
    s: torch.Tensor,
    key: torch.Tensor,
    vote_clip: int,
    T: torch.Tensor | None = None,
    decay: float = 0.0,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 votes ``clamp(floor(s*g - decay*T + u), -clip, clip)``; ``u`` hashed from element index.

    ``index`` gives each element's flat index in the full weight (for sparse row updates);
    by default elements are numbered 0..n-1 in row-major order.
    """
    x = g.float() * s
    if decay and T is not None:
        x = x - decay * T.float()
    u = rng.uniform(key, g.numel(), g.device) if index is None else rng.uniform_at(key, index)
    v = torch.floor(x.reshape(-1) + u.reshape(-1)).reshape(g.shape)
    return v.clamp_(-vote_clip, vote_clip).to(torch.int8 if vote_clip <= INT8_MAX else torch.int32)


def sign_votes(g: torch.Tensor) -> torch.Tensor:
    """The seed's votes: -sign(g) (gradient descent), 0 where the gradient is exactly 0."""
    return (-torch.sign(g)).to(torch.int8)


def factored_ms(g: torch.Tensor) -> torch.Tensor:
    """Row x column estimate of each element's mean square: ``R_i C_j / mean(g**2)`` (Adafactor's factoring)."""
    g2 = g.float().square()
    R, C = g2.mean(dim=1, keepdim=True), g2.mean(dim=0, keepdim=True)
    return R * C / g2.mean().clamp_min(1e-38)


def leak(accum: torch.Tensor, shift: int) -> torch.Tensor:
    """``accum - sign(accum) * (|accum| >> shift)``: decays toward 0 by ~2**-shift per step, never past it."""
    a = accum.to(torch.int16)
    return (a - torch.sign(a) * (a.abs() >> shift)).to(torch.int8)


def accumulate(accum: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """Saturating int8 add: ``clamp(accum + votes, -127, 127)`` computed in int16 so it never wraps."""
    return (accum.to(torch.int16) + votes.to(torch.int16)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


# --------------------------------------------------------------------------------------------
# flips
# --------------------------------------------------------------------------------------------


def apply_flips(
    T: torch.Tensor, accum: torch.Tensor, threshold: int, clip_at_bounds: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move trits one step where the accumulator reached +/-threshold; returns (T, accum, n_flips)."""
    up = (accum >= threshold) & (T < 1)
    down = (accum <= -threshold) & (T > -1)
    moved = up | down
    T = (T.to(torch.int16) + up.to(torch.int16) - down.to(torch.int16)).to(torch.int8)
    accum = torch.where(moved, torch.zeros_like(accum), accum)
    if clip_at_bounds:
        accum = accum.clamp(-threshold, threshold)
    return T, accum, moved.sum()


def apply_scale_flips(
    E: torch.Tensor, E_accum: torch.Tensor, threshold: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E moves +/-1 where |E_accum| reached the threshold (clamped to int8); returns (E, E_accum, n)."""
    up = (E_accum >= threshold) & (E < INT8_MAX)
    down = (E_accum <= -threshold) & (E > -INT8_MAX)
    moved = up | down
    E = (E.to(torch.int16) + up.to(torch.int16) - down.to(torch.int16)).to(torch.int8)
    E_accum = torch.where(moved, torch.zeros_like(E_accum), E_accum)
    return E, E_accum, moved.sum()


def group_sum(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum ``x`` (rows, cols) over groups of ``group_size`` consecutive columns (last may be short)."""
    rows, cols = x.shape
    n_groups = (cols + group_size - 1) // group_size
    pad = n_groups * group_size - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, n_groups, group_size).sum(dim=2)


def scale_gradient(g: torch.Tensor, T: torch.Tensor, group_size: int) -> torch.Tensor:
    """dL/dE per group, up to the positive factor 2**E ln 2: ``sum_group(g * T)`` in float32."""
    return group_sum(g.float() * T.float(), group_size)
