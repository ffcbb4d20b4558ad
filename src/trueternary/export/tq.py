"""llama.cpp's ternary tensor types TQ1_0 and TQ2_0, from trits and scales (no llama.cpp code needed).

Both types cut each row into blocks of ``QK = 256`` consecutive weights (so a row's length must be a multiple
of 256) and store one fp16 scale ``d`` per block: weight ``i`` of a block is ``(u_i - 1) * d`` with the digit
``u_i = t_i + 1`` in {0, 1, 2}. The project stores ``W = T * 2**E`` with one int8 ``E`` per ``group_size``
weights of a row, so a block holds the project's weights exactly when every nonzero trit in it has the same
scale and that scale is an fp16 number (``-24 <= E <= 15``): always with ``group_size`` 256 (or a multiple),
and for smaller groups only where the groups of a block happen to agree.

Block layouts (byte offsets inside one block; ``x[k]`` is the digit of the block's k-th weight):

    TQ2_0, 66 bytes (2.0625 bits/weight)
        qs[64]  byte 32 c + m holds x[128 c + 32 n + m] in bits 2n..2n+1, for c in 0..1, n in 0..3, m in 0..31
        d       fp16, little-endian
    TQ1_0, 54 bytes (1.6875 bits/weight)
        qs[48]  bytes 0..31: byte m holds x[m + 32 n], n = 0..4;  bytes 32..47: byte 32 + m holds x[160 + m + 16 n],
                n = 0..4; each as q = sum_n x[..n..] * 3**(4 - n), stored as ceil(q * 256 / 243)
        qh[4]   byte j holds x[240 + j + 4 n], n = 0..3, as q = sum_n x[..n..] * 3**(4 - n) (the lowest trit 0),
                stored as ceil(q * 256 / 243)
        d       fp16, little-endian

The ``ceil(q * 256 / 243)`` form lets a reader take the n-th trit as ``((byte * 3**n) mod 256) * 3 >> 8``
(a fixed-point fraction of 3**5), no division. The project's own packing (``trueternary.packing``) is
different: 5 trits per byte with the first trit least significant, along the whole flattened matrix.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 256  # weights per TQ block
BLOCK_BYTES = {"tq1_0": 54, "tq2_0": 66}
TYPES = tuple(BLOCK_BYTES)
FP16_EXP_MIN, FP16_EXP_MAX = -24, 15  # 2**E is an fp16 number (subnormal below -14) exactly in this range


def pack_blocks(trits: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """Blocks of ``qtype`` from trits (rows, cols) in {-1, 0, 1} and fp16 scales (rows, cols // 256):
    uint8 (rows, cols // 256 * BLOCK_BYTES[qtype])."""
    rows, cols = trits.shape
    if cols % QK:
        raise ValueError(f"a {qtype} row needs a multiple of {QK} weights, got {cols}")
    nb = cols // QK
    x = (trits.astype(np.int16) + 1).reshape(rows * nb, QK)  # digits 0..2
    dbytes = np.ascontiguousarray(d.astype("<f2").reshape(rows * nb)).view(np.uint8).reshape(rows * nb, 2)
    if qtype == "tq2_0":
        parts = x.reshape(-1, 2, 4, 32)  # [block, c, n, m]
        qs = (parts << (2 * np.arange(4, dtype=np.int16))[None, None, :, None]).sum(axis=2)  # (block, c, m)
        out = np.concatenate([qs.reshape(-1, 64).astype(np.uint8), dbytes], axis=1)
    elif qtype == "tq1_0":
        pow5 = np.array([81, 27, 9, 3, 1], dtype=np.int32)
        a = (x[:, :160].reshape(-1, 5, 32) * pow5[None, :, None]).sum(axis=1)  # (block, 32)
        b = (x[:, 160:240].reshape(-1, 5, 16) * pow5[None, :, None]).sum(axis=1)  # (block, 16)
        h = (x[:, 240:].reshape(-1, 4, 4) * pow5[None, :4, None]).sum(axis=1)  # (block, 4); 4 trits, lowest 0
        q = np.concatenate([a, b, h], axis=1)
        q = (q * 256 + 242) // 243  # ceil(q * 256 / 243)
        out = np.concatenate([q.astype(np.uint8), dbytes], axis=1)
    else:
        raise ValueError(f"unknown ternary type {qtype!r}; choose from {', '.join(TYPES)}")
    return out.reshape(rows, nb * BLOCK_BYTES[qtype])


def unpack_blocks(data: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_blocks`: (trits int8 (rows, cols), scales float16 (rows, cols // 256))."""
    rows = data.shape[0]
    bb = BLOCK_BYTES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, bb)
    d = blocks[:, bb - 2:].copy().view("<f2").reshape(rows, -1)
    if qtype == "tq2_0":
        qs = blocks[:, :64].reshape(-1, 2, 1, 32).astype(np.int16)
        x = (qs >> (2 * np.arange(4, dtype=np.int16))[None, None, :, None]) & 3  # (block, c, n, m)
        x = x.reshape(-1, QK)
    else:
        pow3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)

        def trits_of(q: np.ndarray, n: int) -> np.ndarray:  # (block, k) bytes -> (block, n, k) digits
            return ((q[:, None, :].astype(np.int32) * pow3[None, :n, None]) % 256 * 3) >> 8

        x = np.concatenate([trits_of(blocks[:, :32], 5).reshape(-1, 160), trits_of(blocks[:, 32:48], 5).reshape(-1, 80),
                            trits_of(blocks[:, 48:52], 4).reshape(-1, 16)], axis=1)
    return (x - 1).astype(np.int8).reshape(rows, -1), d


# ------------------------------------------------------------------------------------ one scale per block
def block_scales(T: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one scale per 256-weight block that reproduces ``W = T * S`` exactly, where it exists.

    ``T`` int8 (rows, cols), ``S`` float32 (rows, cols): each weight's scale, NaN for padding (no weight).
    Returns (d float32 (rows, nb), exact bool (rows, nb)). A block is exact when all its nonzero trits share one
    scale and that scale is an fp16 number; a block of zero trits takes the scale of its first weight (so with
    ``group_size`` 256 every scale round-trips), a block of padding 0.
    """
    rows, cols = T.shape
    Tb, Sb = T.view(rows, -1, QK), S.view(rows, -1, QK)
    live = (Tb != 0) & ~torch.isnan(Sb)
    hi = torch.where(live, Sb, torch.full_like(Sb, -torch.inf)).amax(dim=2)
    lo = torch.where(live, Sb, torch.full_like(Sb, torch.inf)).amin(dim=2)
    any_live = live.any(dim=2)
    first = Sb[:, :, 0]
    d = torch.where(any_live, hi, torch.where(torch.isnan(first), torch.zeros_like(first), first))
    exact = (~any_live | (hi == lo)) & (d.half().float() == d)
    return d, exact


def fit_blocks(T: torch.Tensor, S: torch.Tensor, d: torch.Tensor, exact: torch.Tensor,
               candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossy path: re-ternarise the blocks that are not exact with one fp16 scale each.

    ``candidates`` float32 (rows, nb, k): scales to try for each block (its groups' scales). Each block takes
    the candidate ``c`` (as fp16) with the least squared error of ``clamp(round(W / c), -1, 1) * c`` against
    ``W = T * S``, then one least-squares step (``c = mean |W|`` over its nonzero new trits) where that is
    better. Exact blocks are left as they are. Returns (trits int8 (rows, cols), d float32 (rows, nb)).
    """
    rows, cols = T.shape
    W = torch.where(T != 0, T.float() * torch.nan_to_num(S, nan=0.0), torch.zeros_like(S)).view(rows, -1, QK)
    cand = candidates.clamp(2.0**FP16_EXP_MIN, 65504.0).half().float()  # (rows, nb, k)

    def fit(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # c (rows, nb) -> (trits, squared error)
        t = torch.clamp(torch.round(W / c[..., None]), -1, 1)
        return t, ((W - t * c[..., None]) ** 2).sum(dim=2)

    best_t, best_err = fit(cand[..., 0])
    best_c = cand[..., 0]
    for i in range(1, cand.shape[2]):
        t, err = fit(cand[..., i])
        better = err < best_err
        best_t, best_err, best_c = (torch.where(better[..., None], t, best_t), torch.where(better, err, best_err),
                                    torch.where(better, cand[..., i], best_c))
    nz = (best_t != 0).sum(dim=2)
    ls = torch.where(nz > 0, (W.abs() * (best_t != 0)).sum(dim=2) / nz.clamp_min(1), best_c)
    ls = ls.clamp(2.0**FP16_EXP_MIN, 65504.0).half().float()
    t2, err2 = fit(ls)
    better = err2 < best_err
    best_t, best_c = torch.where(better[..., None], t2, best_t), torch.where(better, ls, best_c)
    keep = exact[..., None]
    trits = torch.where(keep, T.view(rows, -1, QK).float(), best_t).to(torch.int8).view(rows, cols)
    return trits, torch.where(exact, d, best_c)
