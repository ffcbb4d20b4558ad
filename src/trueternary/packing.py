"""Base-3 packing of ternary weights: 5 trits per byte.

Layout (fixed; checkpoints and kernels depend on it):

    trits are taken in row-major (flat) order, five at a time;
    byte = sum((t[i] + 1) * 3**i for i in 0..4),  t[0] the first trit of the five
    a tail shorter than five is padded with 0-trits (digit 1)

So ``[-1, 0, 1, 1, -1] -> 0*1 + 1*3 + 2*9 + 2*27 + 0*81 = 75`` and ``[1, 1, 1, 1, 1] -> 242``.
Bytes 243..255 are never produced and are rejected when unpacking. 3**5 = 243 <= 256, so
this stores log2(3) = 1.585 bits of information in 1.6 bits: 99.1% efficient.
"""

from __future__ import annotations

import torch

TRITS_PER_BYTE = 5
MAX_PACKED_BYTE = 242  # 3**5 - 1
ZERO_BYTE = 121  # five 0-trits: 1 + 3 + 9 + 27 + 81
_POW3 = (1, 3, 9, 27, 81)

_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def packed_numel(numel: int) -> int:
    """Bytes needed to pack ``numel`` trits."""
    return (numel + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def unpack_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """The (243, 5) int8 table mapping a packed byte to its five trits."""
    device = torch.device(device)
    lut = _LUT_CACHE.get(device)
    if lut is None:
        codes = torch.arange(243, dtype=torch.int32)
        digits = torch.stack([(codes // p) % 3 for p in _POW3], dim=1)
        lut = (digits - 1).to(torch.int8).to(device)
        _LUT_CACHE[device] = lut
    return lut


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of values in {-1, 0, 1} (any shape, any integer or float dtype) into flat uint8."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pack_trits expects a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"pack_trits expects values in {{-1, 0, 1}}, got dtype {t.dtype}")
    flat = t.reshape(-1)
    if flat.dtype == torch.uint8:
        flat = flat.to(torch.int16)  # in uint8, 255 == -1 compares true and 255 would pack as garbage
    elif not flat.is_floating_point() and not flat.dtype.is_signed:
        raise ValueError(f"pack_trits expects a signed integer, uint8 or float tensor, got {t.dtype}")
    if flat.numel() and not bool(((flat == -1) | (flat == 0) | (flat == 1)).all()):
        bad = flat[~((flat == -1) | (flat == 0) | (flat == 1))][0].item()
        raise ValueError(f"pack_trits: values must be in {{-1, 0, 1}}, found {bad}")
    return pack_trits_unchecked(flat)


def pack_trits_unchecked(t: torch.Tensor) -> torch.Tensor:
    """:func:`pack_trits` without validation (no device sync), for state we produced ourselves."""
    flat = t.reshape(-1)
    n = flat.numel()
    nbytes = packed_numel(n)
    digits = torch.ones(nbytes * TRITS_PER_BYTE, dtype=torch.int32, device=flat.device)
    digits[:n] = flat.to(torch.int32) + 1
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=flat.device)
    return (digits.view(nbytes, TRITS_PER_BYTE) * pow3).sum(dim=1).to(torch.uint8)


def check_packed(packed: torch.Tensor, numel: int | None = None) -> None:
    """Raise ValueError unless ``packed`` is a valid flat uint8 packing (of ``numel`` trits)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed trits must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed trits must be uint8, got {packed.dtype}")
    if packed.dim() != 1:
        raise ValueError(f"packed trits must be 1-D, got shape {tuple(packed.shape)}")
    if numel is not None:
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if packed.numel() != packed_numel(numel):
            raise ValueError(
                f"{numel} trits need {packed_numel(numel)} packed bytes, got {packed.numel()}"
            )
    if packed.numel() and int(packed.max()) > MAX_PACKED_BYTE:
        raise ValueError(
            f"packed byte {int(packed.max())} > {MAX_PACKED_BYTE}: not a base-3 trit packing"
        )


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: a flat int8 tensor of ``numel`` trits."""
    check_packed(packed, numel)
    lut = unpack_lut(packed.device)
    return lut[packed.long()].reshape(-1)[:numel]


def unpack_trits_unchecked(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`unpack_trits` without validation, for hot paths on state we wrote ourselves."""
    return unpack_lut(packed.device)[packed.long()].reshape(-1)[:numel]


def gather_trits(packed: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Trits at the given flat positions (any shape), read straight from the packed bytes.

    Used for embedding lookups: only the rows a batch needs are decoded.
    """
    byte = packed[flat_index // TRITS_PER_BYTE].long()
    digit = flat_index % TRITS_PER_BYTE
    return unpack_lut(packed.device)[byte, digit]
