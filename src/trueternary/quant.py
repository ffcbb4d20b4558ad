"""Quantisers: float weights -> ternary levels and scales. Separate from the update rule.

absmean (BitNet b1.58):  s = mean|w|,  q = clamp(round(w / s), -1, 1),  w ~ q * s.
For TrueTernary the scale is a power of two per group: ``E = round(log2(s_group))``.
"""

from __future__ import annotations

import torch

from .rule import group_sum

E_MIN, E_MAX = -127, 127


def absmean_scale(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-tensor absmean scale (0-dim)."""
    return w.abs().mean().clamp_min(eps)


def ternary_levels(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(w / scale) clamped to {-1, 0, 1}, as int8 (scale broadcastable to w)."""
    return torch.clamp(torch.round(w / scale), -1, 1).to(torch.int8)


def absmean_ternary_ste(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BitNet's fake-quant forward with a straight-through gradient: w + (q*s - w).detach()."""
    s = w.abs().mean().clamp_min(eps)
    wq = torch.clamp(torch.round(w / s), -1, 1) * s
    return w + (wq - w).detach()


def group_pow2_ternary_ste(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """TrueTernary's quantiser as a fake-quant forward with a straight-through gradient: the trits of
    ``group_absmean_log2`` times ``2**E`` per group (the ``BitNet_QAT[quantizer=group_pow2]`` diagnostic:
    AdamW on latent weights behind exactly the weight format the flip engine trains). No host sync: an
    all-zero group gets any scale (its trits are 0 whatever it is)."""
    mean_abs = group_mean_abs(w.detach().float(), group_size).clamp_min(torch.finfo(torch.float32).tiny)
    E = torch.round(torch.log2(mean_abs)).clamp(E_MIN, E_MAX)
    T = ternary_levels(w.detach().float(), expand_groups(mean_abs, group_size, w.shape[1]))
    return w + (T.float() * expand_groups(torch.exp2(E), group_size, w.shape[1]) - w).detach().to(w.dtype)


def group_mean_abs(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean |w| of each group of ``group_size`` consecutive weights in a row: (rows, n_groups), ragged last group
    averaged over its real weights."""
    counts = group_sum(torch.ones(1, w.shape[1], device=w.device), group_size)  # (1, n_groups)
    return group_sum(w.abs(), group_size) / counts


def expand_groups(per_group: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """Broadcast a (rows, n_groups) tensor to (rows, cols)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :cols]


def group_absmean_log2(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarise a (rows, cols) float weight with one power-of-two scale per group.

    Returns (T int8 (rows, cols), E int8 (rows, n_groups)) with E = round(log2(mean|w| of group)).
    Groups that are all zero get the smallest scale in the tensor (their trits are all 0 anyway).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("cannot ternarise a weight with NaN or inf entries")
    w = w.detach().float()
    mean_abs = group_mean_abs(w, group_size)
    nz = mean_abs > 0
    floor = mean_abs[nz].min() if bool(nz.any()) else torch.tensor(1.0, device=w.device)
    mean_abs = torch.where(nz, mean_abs, floor)
    E = torch.round(torch.log2(mean_abs)).clamp(E_MIN, E_MAX)
    # Quantise against the group's absmean (not the rounded power of two) so the trit pattern is
    # exactly BitNet's; E then only carries the magnitude.
    T = ternary_levels(w, expand_groups(mean_abs, group_size, w.shape[1]))
    return T, E.to(torch.int8)


def check_accum_threshold(accum_threshold) -> None:
    if isinstance(accum_threshold, bool) or not isinstance(accum_threshold, int) or not 1 <= accum_threshold <= 127:
        raise ValueError(f"accum_threshold must be an integer in [1, 127], got {accum_threshold!r}")


def residual_accum(w: torch.Tensor, T: torch.Tensor, group_size: int, accum_threshold: int) -> torch.Tensor:
    """Where each weight sits inside its rounding interval, as a starting ``T_accum`` (int8).

    The absmean ternarisation above rounds ``w / s`` (s the group's mean |w|) to ``T``; the residual
    ``r = w / s - T`` lies in [-1/2, 1/2] (beyond it for clipped trits). A latent-weight method (BitNet QAT)
    keeps ``r``: a weight with ``r`` near +1/2 changes its trit after a small push. Mapping the rounding
    boundary ``r = +-1/2`` onto the flip threshold does the same for the flip rule:

        T_accum = clamp(round(2 * accum_threshold * r), -(accum_threshold - 1), accum_threshold - 1)

    (never at the threshold itself, so no trit moves before a vote). Zero accumulators instead put every
    weight in the middle of its hysteresis band: no trit can move until ``accum_threshold`` votes agree.
    """
    check_accum_threshold(accum_threshold)
    w = w.detach().float()
    scale = expand_groups(group_mean_abs(w, group_size), group_size, w.shape[1])
    # an all-zero group: w = 0 and T = 0, so r = 0 (any positive divisor gives that)
    r = w / scale.clamp_min(torch.finfo(torch.float32).tiny) - T.float()
    lim = accum_threshold - 1
    return torch.round(2 * accum_threshold * r).clamp(-lim, lim).to(torch.int8)
