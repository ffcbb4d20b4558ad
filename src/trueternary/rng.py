"""Counter-based random numbers shared bit-for-bit by the PyTorch reference and the Triton kernels.

Stochastic rounding of votes needs one uniform number per weight per step. Drawing them from
``torch.rand`` would tie the result to one backend's generator; instead every backend hashes
``(key, element index)`` with the same 32-bit integer mixer, so the dense-fallback path and a
fused kernel produce the *same* votes for the same gradient, and a resumed run replays the
same numbers from the step counter alone (no generator state to save).

    mix32(x):  x ^= x >> 16;  x *= 0x45d9f3b;  x ^= x >> 16;  x *= 0x45d9f3b;  x ^= x >> 16   (mod 2**32)
    key(seed, stream, step) = mix32((seed*0x9E3779B1 + stream*0x85EBCA77 + step*0xC2B2AE3D + 1) mod 2**32)
    u(key, i) = (mix32(i XOR key) >> 8) * 2**-24          in [0, 1), exact in float32

The multiplier 0x45d9f3b < 2**27 keeps every product below 2**63, so the reference can run in
int64 without overflow; Triton computes the same thing in wrapping uint32.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_MULT = 0x45D9F3B
_K_SEED, _K_STREAM, _K_STEP = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
INV_2_24 = 1.0 / (1 << 24)


def mix32_int(x: int) -> int:
    """mix32 on a Python int (host-side key derivation)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_MULT) & MASK32
    x ^= x >> 16
    x = (x * MIX_MULT) & MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """mix32 on an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULT) & MASK32
    x = x ^ (x >> 16)
    x = (x * MIX_MULT) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int, step: torch.Tensor | int) -> torch.Tensor:
    """The per-(seed, stream, step) key as a 0-dim int64 tensor.

    ``step`` may be a device tensor so the key can be computed inside a captured CUDA graph.
    """
    base = (seed * _K_SEED + stream * _K_STREAM + 1) & MASK32
    if isinstance(step, torch.Tensor):
        return mix32((step.to(torch.int64) * _K_STEP + base) & MASK32)
    return torch.tensor(mix32_int(base + step * _K_STEP), dtype=torch.int64)


def uniform(key: torch.Tensor, numel: int, device: torch.device | str) -> torch.Tensor:
    """``numel`` float32 uniforms in [0, 1) for element indices 0..numel-1 under ``key``."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    h = mix32(idx ^ key.to(device))
    return (h >> 8).to(torch.float32) * INV_2_24


def uniform_at(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniforms for arbitrary element indices (e.g. the rows an embedding batch touched)."""
    h = mix32(index.to(torch.int64) ^ key.to(index.device))
    return (h >> 8).to(torch.float32) * INV_2_24
