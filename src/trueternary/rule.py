"""The flip rule: how a weight gradient becomes integer votes, and votes become trit and scale moves.

This file is the plain-PyTorch *reference* of the learning rule; the Triton kernels in
``trueternary.ops`` must reproduce it bit-for-bit on integer state. Everything here is a pure
function of tensors (no module state), so it can be tested on hand-built cases. Its hyper-parameters are
:class:`FlipRule`, defined in the torch-free ``settings`` (so the command line's parsers read its defaults without
torch) and re-exported here.

State per weight matrix W (rows x cols), groups of ``group_size`` consecutive weights in a row:

    T        trits in {-1, 0, +1}                   (stored packed, 5 per byte)
    T_accum  int8 per weight, the vote accumulator  in [-127, 127]
    E        int8 per group, log2 scale: W = T * 2**E
    E_accum  int8 per group, the scale-vote accumulator

and, with ``norm_beta > 0`` (the default), the normaliser's moving averages as integer log2 codes per
``norm_block`` tile (an int16 per tile, an int8 per tile-row and tile-column; ``ema_block_factored_stats``), held
by the optimiser. No float survives a step.

For each call of a layer in backward (``stochastic_votes`` ...) and once per optimiser step
(``apply_*``), with g the weight gradient of that call:

    normalise  ms_ij = r_i * (c_j / m)    'block_factored' (default): r_i, c_j, m the mean of g**2
                                          over row i, column j and all of the norm_block x norm_block
                                          tile holding (i, j) (Adafactor's factored second moment,
                                          per tile and per call)
               with norm_beta > 0, r, c and m are moving averages over calls (a += (1 - norm_beta) *
               (stat - a)) stored as codes, and ms comes from the codes
               ms_ij = mean(g**2)         'tensor'
    votes      v = clamp(floor(s * g - decay * T + u), -vote_clip, vote_clip)        'stochastic'
                   s = -lr / sqrt(ms + 1e-30),  u ~ U[0, 1) from trueternary.rng
               v = -sign(g)                                                          'sign' (the seed)
    accumulate T_accum = clamp(T_accum + v, -127, 127)                (saturating, never wraps)
    leak       (optional) T_accum -= sign(T_accum) * (|T_accum| >> leak)   once per step, before flips
    flip       T_accum >= +theta and T < +1:  T += 1, T_accum = -flip_reset
               T_accum <= -theta and T > -1:  T -= 1, T_accum = +flip_reset
               (flip_reset 0: the middle of the new trit's band; > 0: that many votes back toward the
               trit it left, a narrower hysteresis)
               (clip_at_bounds) T_accum = clamp(T_accum, -theta, theta)  afterwards
    scale      gE = sum over the group of g * T   (dL/dE up to the positive factor 2**E ln 2), a
               (rows, n_groups) matrix voted like the weights (normalised per call, lr * scale_lr) into E_accum,
               on steps that are multiples of scale_update_interval; |E_accum| >= scale_threshold moves E by one.

Large gradients. A weight gradient is non-finite iff an element is NaN/inf (the optimiser's check, by element).
Votes are scale-invariant: a gradient scaled by a power of two casts the same votes bit for bit (``c_j / m`` is
scale-free, ``r_i`` and ``s`` scale exactly) while every mean of ``g**2`` stays below float32's largest finite
value ``FLOAT32_MAX`` (3.4e38: elements up to about 1.6e18 in a full 128-wide row, 1.8e19 alone) and every
``ms_ij`` above 2**-75 (where ``+ 1e-30`` stops mattering). Beyond, a mean that overflows saturates at
``FLOAT32_MAX`` (never inf, whose ratio inf / inf would be NaN): the elements it normalises get a smaller ``s``
(or -0 where ``ms`` itself overflows), so they cast fewer or no gradient votes, never NaN ones; with
``norm_beta`` the codes top out near 2**128 and relax back at the moving average's rate. A group sum ``gE``
that overflows saturates at +-FLOAT32_MAX (NaN, from +inf and -inf partial sums, counts as 0).

A positive gradient votes toward -1 (gradient descent). ``u`` makes the expected vote equal to
``s * g``: the vote carries the gradient's magnitude, not just its sign, while staying an integer.
Normalising each call's gradient makes ``lr`` the expected number of votes per weight per call for a
weight whose gradient is typical of its row and column: the learning-rate analogue, scheduled like one.
"""

from __future__ import annotations

import math

import torch

from . import rng
from .settings import INT8_MAX, NAIVE_ACCUM_THRESHOLD, FlipRule  # noqa: F401 (re-exported)

MS_EPS = 1e-30  # keeps s finite for an all-zero gradient (whose votes are then 0)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # where the statistics of g**2 saturate (module docstring)
# The integer state's ranges: what training keeps, and what loading a state must satisfy (check_state_range).
STATE_BOUNDS = {"T_accum": (-INT8_MAX, INT8_MAX), "E": (-INT8_MAX, INT8_MAX), "E_accum": (-INT8_MAX, INT8_MAX)}


def vote_width_scale(width_ref: int, fan_in: int | None, batch_tokens: int = 0, tokens_ref: int = 0) -> float:
    """The factor on ``lr`` (and on the initial residual accumulators) of a weight that sums ``fan_in`` inputs:
    ``sqrt(width_ref / fan_in)`` above ``width_ref``, else 1 (and 1 for ``width_ref`` 0 or no fan-in: an
    embedding's rows are looked up, not summed). A weight above ``width_ref`` in a run that steps on
    ``batch_tokens < tokens_ref`` tokens gets ``sqrt(batch_tokens / tokens_ref)`` on top (none where either is 0).

    Why the width: a step flips about the same *fraction* of a layer's trits whatever its width, and flips that
    follow one gradient move an output by about ``fraction * sqrt(fan_in)`` of its size, so the same lr is a
    larger step in a wider layer (the argument behind muP's width-scaled learning rates). Measured
    (docs/learning.md, "Width"): at d_model 4096 the unscaled rule's loss jumped from 5.9 to 16.6 in the first 3
    steps (AdamW and BitNet QAT at their default lr jumped as well); with this factor and the residual
    accumulators scaled alike, it fell from the first flips on. Layers up to ``width_ref`` inputs (every layer of
    the d_model <= 256 models, all but the MLP's down projection up to d_model 1024) are unchanged.

    Why the batch: the votes are normalised, so a step casts as many of them on a small, noisy batch as on a large
    one, and fewer of them follow the true gradient; the square-root rule of adaptive optimisers (lr ~ sqrt(batch))
    keeps the drift of the noise flips alike. It applies to the wide layers only, where that drift is what
    diverged: 6.4B weights (d_model 4096, 32 layers) learned at 8 x 256 tokens a step and diverged at 1 x 256.
    """
    if not width_ref or fan_in is None or fan_in <= width_ref:
        return 1.0
    scale = math.sqrt(width_ref / fan_in)
    if tokens_ref and 0 < batch_tokens < tokens_ref:
        scale *= math.sqrt(batch_tokens / tokens_ref)
    return scale


# --------------------------------------------------------------------------------------------
# votes
# --------------------------------------------------------------------------------------------


def real_rows(n_rows: torch.Tensor, R: int, device) -> torch.Tensor:
    """bool (R,): which rows of a (R, C) gradient are real when only its first ``n_rows`` (a 0-dim integer
    tensor, never read on the host) are: the static-shape compaction of an embedding's touched rows."""
    return torch.arange(R, device=device) < n_rows.to(device)


def tensor_ms(g: torch.Tensor, n_rows: torch.Tensor | None = None) -> torch.Tensor:
    """'tensor' normalisation: one mean square for the whole gradient (0-dim).

    ``n_rows`` (0-dim tensor): only the first ``n_rows`` rows of ``g`` are real; the mean is over them,
    ``sum(g[:n]**2) / (n * C)`` (the divisor at least 1, so an empty gradient gives 0).
    """
    if n_rows is None:
        return g.float().square().mean().clamp_max(FLOAT32_MAX)
    g2 = g.float().square().reshape(g.shape[0], -1)
    g2 = torch.where(real_rows(n_rows, g2.shape[0], g2.device)[:, None], g2, 0.0)
    count = (n_rows.to(g2.device) * g2.shape[1]).clamp_min(1).to(torch.float32)
    return (g2.sum() / count).clamp_max(FLOAT32_MAX)


def vote_multiplier(ms: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """The float32 factor ``s = -lr / sqrt(ms + 1e-30)`` that turns a gradient into expected votes.

    (PyTorch computes ``scalar / t`` as ``reciprocal(t) * scalar``; the kernels do the same.)
    """
    return (-lr / torch.sqrt(ms.float() + MS_EPS)).to(torch.float32)


def vote_scale(g: torch.Tensor, lr: float | torch.Tensor, normalize: str, norm_block: int,
               n_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``s`` for the gradient ``g`` under the given normalisation (0-dim for 'tensor', else like ``g``).

    ``n_rows`` (0-dim tensor): only the first ``n_rows`` rows of ``g`` are real (the rest zero padding of a
    static shape); the statistics average over them only (``tensor_ms``, ``block_factored_stats``).
    """
    if normalize == "block_factored" and g.dim() == 2:
        return vote_multiplier(block_factored_ms(g, norm_block, n_rows), lr)
    return vote_multiplier(tensor_ms(g, n_rows), lr)


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


def block_factored_ms(g: torch.Tensor, block: int, n_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element mean-square estimate from each ``block`` x ``block`` tile's own row/column statistics.

    For the tile holding (i, j): ``r_i (c_j / m)`` with r, c, m the mean of ``g**2`` over the tile's part of
    row i, of column j, and over the whole tile (edge tiles average over their real elements only).
    Computable in the epilogue of a tiled weight-gradient kernel: no statistic of the whole matrix needed.
    ``n_rows``: as in ``block_factored_stats``.
    """
    return factored_ms(*block_factored_stats(g, block, n_rows), g.shape)


def norm_tiles(shape: tuple[int, int], block: int) -> tuple[int, int, int, int]:
    """``(Rb, br, Cb, bc)``: the 'block_factored' tiling of a (R, C) matrix, tiles of ``br x bc`` with
    ``br, bc = min(block, R), min(block, C)`` (a matrix no larger than one tile along an axis is one partial
    tile there), ``Rb x Cb`` of them, aligned at 0."""
    R, C = shape
    br, bc = min(block, R), min(block, C)
    return -(-R // br), br, -(-C // bc), bc


def block_factored_stats(g: torch.Tensor, block: int, n_rows: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three means behind ``block_factored_ms``: of ``g**2`` over each tile's part of every row
    (Rb, br, Cb), of every column (Rb, Cb, bc), and over each whole tile (Rb, Cb); ``br, bc = min(block, R),
    min(block, C)``, ``Rb, Cb`` the tile counts (edge tiles average over their real elements only).

    ``n_rows`` (0-dim integer tensor, never read on the host): only the first ``n_rows`` rows are real, the
    rest zero padding of a static shape (an embedding's compacted touched rows, ``ops.embedding``). The tiling
    stays that of the (R, C) matrix; every mean divides by its count of real elements (a mean with none is 0).
    The n x C matrix of the real rows alone has the same statistics for them: with n >= block both tile at
    ``br = block``; with n < block all real rows lie in row-tile 0 either way (there ``br = n``)."""
    g2 = g.float().square()
    R, C = g2.shape
    Rb, br, Cb, bc = norm_tiles((R, C), block)
    pads = (0, Cb * bc - C, 0, Rb * br - R)
    if n_rows is None and not any(pads):  # whole tiles: no padding, constant counts (the same sums and quotients)
        t = g2.view(Rb, br, Cb, bc)
        # counts as device tensors: PyTorch's CUDA division by a Python number multiplies by its reciprocal,
        # which is not the IEEE quotient the padded path (and the vote kernel) compute
        # (new_full: a fill on the device, no host copy, so a captured CUDA graph may hold it)
        return _saturated((t.sum(3) / g2.new_full((), bc), t.sum(1) / g2.new_full((), br),
                           t.sum((1, 3)) / g2.new_full((), br * bc)))
    if n_rows is None:
        real = torch.ones_like(g2)
    else:  # 1 on the real rows' elements, 0 elsewhere (rows from n_rows on count as padding)
        mask = real_rows(n_rows, R, g2.device)[:, None].expand(R, C)
        real, g2 = mask.to(g2.dtype), torch.where(mask, g2, 0.0)
    pad = torch.nn.functional.pad(g2, pads).view(Rb, br, Cb, bc)
    ones = torch.nn.functional.pad(real, pads).view(Rb, br, Cb, bc)
    row = pad.sum(3) / ones.sum(3).clamp_min(1)  # (Rb, br, Cb)
    col = pad.sum(1) / ones.sum(1).clamp_min(1)  # (Rb, Cb, bc)
    tile = pad.sum((1, 3)) / ones.sum((1, 3)).clamp_min(1)  # (Rb, Cb)
    return _saturated((row, col, tile))


def _saturated(means: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Means of g**2 that overflowed float32 held at FLOAT32_MAX (finite ones unchanged): c / m is then never
    inf / inf (module docstring)."""
    return tuple(m.clamp_max(FLOAT32_MAX) for m in means)


def factored_ms(row: torch.Tensor, col: torch.Tensor, tile: torch.Tensor, shape) -> torch.Tensor:
    """``r_i * (c_j / m)`` per element of a ``shape`` matrix from ``block_factored_stats``' three means.

    The quotient first: ``r_i * c_j`` is of order g**4 and would overflow float32 for gradients near 4e9, while
    ``c_j / m`` is scale-free (module docstring)."""
    Rb, br, Cb = row.shape
    bc = col.shape[2]
    ms = row[:, :, :, None] * (col / tile[:, :, None].clamp_min(1e-38))[:, None, :, :]
    return ms.reshape(Rb * br, Cb * bc)[: shape[0], : shape[1]]


# The moving averages of 'block_factored' statistics (norm_beta > 0) are integer state, log2 fixed point:
#   tile code   int16 per tile        m = 2**(code / 256)          (NORM_TILE_EMPTY: no statistics yet)
#   row code    int8 per tile-row     r = m * 2**(code / 8)        (the ratio r / m in [2**-16, 2**15.9])
#   col code    int8 per tile-column  c = m * 2**(code / 8)
# A row's mean square is at most `block` times its tile's (log2 128 = 7), so the ratios fit; a row below
# 2**-16 of its tile (a zero row) is held as 2**-16. Codes shaped like block_factored_stats' outputs:
# tile (Rb, Cb), row (Rb, br, Cb), col (Rb, Cb, bc): 2 / block + 2 / block**2 bytes per weight (0.0157 at block 128).
# Tile codes stop at NORM_TILE_MIN (2**-126, float32's smallest normal: below it is an all-zero tile).
NORM_TILE_FRAC = 8
NORM_RATIO_FRAC = 3
NORM_TILE_EMPTY = -32768
NORM_TILE_MIN = -126 << NORM_TILE_FRAC
_INT16_MAX = 32767


def uses_norm_memory(group) -> bool:
    """Whether a rule (a FlipRule's dict, or a param group) normalises votes by moving averages (norm_beta)."""
    return bool(group.get("norm_beta", 0)) and group["vote"] == "stochastic" and (
        group["normalize"] == "block_factored" and group.get("vote_power", 1) == 1)


# The codes are encoded and decoded with exact float32 arithmetic only (bit fields, a table, compare, subtract,
# IEEE divide): no log2/exp2, whose last bits differ between PyTorch's CPU and CUDA libraries and Triton, so the
# vote kernel's epilogue (ops/votes/triton.py: _log2_code, _code_value) keeps the same codes bit for bit.
#   code_value(k * 2**frac + f) = lut[f] * 2**k           lut[f] = float32(2**(f / 2**frac)), f in [0, 2**frac]
#   log2_code(x = 2**e * mant):  j with lut[j] <= mant < lut[j+1] (mant in [1, 2)), t = (mant - lut[j]) /
#                                (lut[j+1] - lut[j]) in [0, 1), code = e * 2**frac + j + (t >= 1/2 | floor(t + u))
# i.e. log2 interpolated linearly within each 2**-frac octave: the stochastic rounding is unbiased in value
# (E[code_value] = x up to the last bit), which is what a moving average of mean squares needs.
_CODE_LUTS: dict[tuple[int, str], torch.Tensor] = {}


def code_lut(frac: int, device=None) -> torch.Tensor:
    """``float32(2**(f / 2**frac))`` for f = 0 .. 2**frac (1.0 .. 2.0), cached per device (kernels read it too)."""
    dev = torch.device(device if device is not None else "cpu")
    key = (frac, str(dev))
    t = _CODE_LUTS.get(key)
    if t is None:
        t = _CODE_LUTS[key] = torch.tensor([2.0 ** (f / (1 << frac)) for f in range((1 << frac) + 1)],
                                           dtype=torch.float32, device=dev)
    return t


def pow2_int(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32 for integer e in [-127, 127], from its bit pattern (exact, 2**-127 the one subnormal;
    CUDA's exp2 is 1 ulp off there). The kernels build the same bits (ops/triton_utils.exp2_int)."""
    e = e.to(torch.int32)
    return torch.where(e > -127, (e + 127) << 23, 0x00400000).view(torch.float32)


def log2_code(x: torch.Tensor, frac: int, lo: int, hi: int, u: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(round(2**frac * log2(x)), lo, hi)`` for ``x >= 0`` as int32 (0 and subnormals -> lo), log2
    interpolated within each 2**-frac octave (see above); stochastic ``floor(. + u)`` with ``u``."""
    bits = x.float().contiguous().view(torch.int32)
    e = (bits >> 23) - 127  # x >= 0: no sign bit; 0 and subnormals give -127
    mant = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # x / 2**e in [1, 2), exact
    lut = code_lut(frac, x.device)
    j = torch.searchsorted(lut[1:-1], mant, right=True)  # lut[j] <= mant < lut[j + 1]
    lo_v, hi_v = lut[j], lut[j + 1]
    t = (mant - lo_v) / (hi_v - lo_v)  # both differences are exact (Sterbenz), the quotient IEEE-rounded
    inc = (t >= 0.5) if u is None else torch.floor(t + u)
    code = e * (1 << frac) + j.to(torch.int32) + inc.to(torch.int32)
    return torch.where(e <= -127, lo, code).clamp_(lo, hi)


def code_value(code: torch.Tensor, frac: int) -> torch.Tensor:
    """The float32 value ``2**(code / 2**frac)`` of a log2 fixed-point code (exact table * power of two)."""
    c = code.to(torch.int32)
    return code_lut(frac, c.device)[c & ((1 << frac) - 1)] * pow2_int((c >> frac).clamp(-126, 127))


def empty_norm_codes(shape: tuple[int, int], block: int, device) -> dict[str, torch.Tensor]:
    """The norm_beta state of a (R, C) weight before its first gradient: every tile empty."""
    Rb, br, Cb, bc = norm_tiles(shape, block)
    return {
        "norm_tile": torch.full((Rb, Cb), NORM_TILE_EMPTY, dtype=torch.int16, device=device),
        "norm_row": torch.zeros((Rb, br, Cb), dtype=torch.int8, device=device),
        "norm_col": torch.zeros((Rb, Cb, bc), dtype=torch.int8, device=device),
    }


def ema_block_factored_stats(
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    codes: dict[str, torch.Tensor],
    beta: float,
    key: torch.Tensor,
    tile_rows: tuple[int, int] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """The moving averages' step: new codes, and the (row, col, tile) means they stand for.

    ``stats``: this call's (row, col, tile) means of g**2 (``block_factored_stats``). Each average moves
    ``a += (1 - beta) * (stat - a)`` (an empty tile takes the statistics as they are), then is stored as a
    code: the tile mean rounded to 1/256 octave, the row and column ratios stochastically rounded to 1/8
    octave (``u`` from ``key``; unbiased in log2, so small moves are not lost). The returned means are decoded
    from the stored codes, so a step taken from restored state repeats exactly (and the fused vote kernel
    normalises by exactly these numbers).

    ``tile_rows=(t0, Rb)``: ``stats`` and ``codes`` are the row-tiles ``t0 ..`` of a weight that has ``Rb`` of them (a
    data-parallel rank's share, optim/data_parallel.py); the rounding draws the random numbers the whole weight's step
    draws for those tiles, so the shares' codes are the whole weight's.
    """
    row, col, tile = (t.float() for t in stats)
    empty = codes["norm_tile"] == NORM_TILE_EMPTY
    m_old = code_value(codes["norm_tile"], NORM_TILE_FRAC)
    # means decoded from the codes saturate like this call's (a top tile code times a ratio above 1 would be inf,
    # and inf - inf NaN in the moving average)
    r_old, c_old = _saturated((m_old[:, None, :] * code_value(codes["norm_row"], NORM_RATIO_FRAC),
                               m_old[:, :, None] * code_value(codes["norm_col"], NORM_RATIO_FRAC)))
    w = 1.0 - beta
    m = torch.where(empty, tile, m_old + w * (tile - m_old))
    r = torch.where(empty[:, None, :], row, r_old + w * (row - r_old))
    c = torch.where(empty[:, :, None], col, c_old + w * (col - c_old))
    tile_code = log2_code(m, NORM_TILE_FRAC, NORM_TILE_MIN, _INT16_MAX).to(torch.int16)
    mq = code_value(tile_code, NORM_TILE_FRAC)
    den = mq.clamp_min(1e-38)
    if tile_rows is None:
        u = rng.uniform(key, r.numel() + c.numel(), r.device)
        u_row, u_col = u[: r.numel()], u[r.numel():]
    else:  # the whole weight's numbers: all row ratios (Rb tiles of them) first, then the column ratios
        (t0, n_tiles), per_row, per_col = tile_rows, r[0].numel(), c[0].numel()
        at = torch.arange(max(r.numel(), c.numel()), dtype=torch.int64, device=r.device)
        u_row = rng.uniform_at(key, t0 * per_row + at[: r.numel()])
        u_col = rng.uniform_at(key, n_tiles * per_row + t0 * per_col + at[: c.numel()])
    row_code = log2_code(r / den[:, None, :], NORM_RATIO_FRAC, -128, 127, u_row.view(r.shape))
    col_code = log2_code(c / den[:, :, None], NORM_RATIO_FRAC, -128, 127, u_col.view(c.shape))
    row_code, col_code = row_code.to(torch.int8), col_code.to(torch.int8)
    rq, cq = _saturated((mq[:, None, :] * code_value(row_code, NORM_RATIO_FRAC),
                         mq[:, :, None] * code_value(col_code, NORM_RATIO_FRAC)))
    return (rq, cq, mq), {"norm_tile": tile_code, "norm_row": row_code, "norm_col": col_code}


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
    T: torch.Tensor, accum: torch.Tensor, threshold: int, clip_at_bounds: bool, reset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move trits one step where the accumulator reached +/-threshold; returns (T, accum, n_flips).

    A moved trit's accumulator restarts at ``-reset`` after a move up, ``+reset`` after a move down."""
    up = (accum >= threshold) & (T < 1)
    down = (accum <= -threshold) & (T > -1)
    moved = up | down
    T = (T.to(torch.int16) + up.to(torch.int16) - down.to(torch.int16)).to(torch.int8)
    accum = torch.where(up, torch.full_like(accum, -reset), torch.where(down, torch.full_like(accum, reset), accum))
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
    """dL/dE per group, up to the positive factor 2**E ln 2: ``sum_group(g * T)`` in float32, a sum that
    overflowed saturated at +-FLOAT32_MAX (NaN, from +inf and -inf partial sums, as 0; ``saturate_sums``)."""
    return saturate_sums(group_sum(g.float() * T.float(), group_size))


def saturate_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums of finite numbers that overflowed float32: +-inf -> +-FLOAT32_MAX, NaN (inf - inf) -> 0."""
    return torch.nan_to_num(x, nan=0.0, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)


# --------------------------------------------------------------------------------------------
# checks of loaded state
# --------------------------------------------------------------------------------------------


def check_state_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """ValueError unless every element of the integer tensor ``t`` lies in [lo, hi] (reads ``t`` on the host)."""
    if t.numel():
        mn, mx = int(t.min()), int(t.max())
        if mn < lo or mx > hi:
            raise ValueError(f"{name} holds {mn if mn < lo else mx}, outside [{lo}, {hi}]")


def check_norm_codes(name: str, codes: dict, shape: tuple[int, int], block: int) -> None:
    """ValueError unless ``codes`` are a (R, C) weight's moving-average codes for ``norm_block`` ``block``: the keys,
    dtypes and shapes of ``empty_norm_codes``, tile codes NORM_TILE_EMPTY or in [NORM_TILE_MIN, 32767] (every
    int8 ratio code is valid)."""
    Rb, br, Cb, bc = norm_tiles(shape, block)
    want = {"norm_tile": (torch.int16, (Rb, Cb)), "norm_row": (torch.int8, (Rb, br, Cb)),
            "norm_col": (torch.int8, (Rb, Cb, bc))}  # as empty_norm_codes makes them
    if set(codes) != set(want):
        raise ValueError(f"{name}: moving-average codes must be {sorted(want)}, got {sorted(codes)}")
    for k, (dtype, shp) in want.items():
        t = codes[k]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shp:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {k} must be {dtype} {shp}, got {got}")
    tile = codes["norm_tile"]
    check_state_range(f"{name}: norm_tile", tile[tile != NORM_TILE_EMPTY], NORM_TILE_MIN, _INT16_MAX)
