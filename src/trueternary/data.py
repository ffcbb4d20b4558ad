"""Byte corpora: loading, the embedded default corpus, train/validation splits and batches.

``load_corpus(spec)`` accepts
    None / "default"   the embedded default corpus: the Python standard library's own source files
                       (``Lib/*.py`` of the running interpreter, sorted by name, up to 8 MiB). Every
                       Python installation carries it, so it needs no network and no user file,
                       and it is byte-identical across runs on a machine.
    a text file        read as bytes
    a .gz file         decompressed
    a directory        every regular file under it, in sorted path order, concatenated
    "enwik8"           see :mod:`trueternary.enwik8` (download, sha256 check, cache, 90M/5M/5M split)

Held-out text: the last ``val_fraction`` of the bytes (contiguous, never trained on).
"""

from __future__ import annotations

import gzip
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS_BYTES = 8 << 20


class DataError(ValueError):
    """Bad, missing or empty training data (reported to the user in one line)."""


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """The Python standard library's top-level ``*.py`` sources, sorted by name, capped at ``max_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:
        raise DataError(f"no Python sources found under {stdlib} for the default corpus")
    out = bytearray()
    for p in files:
        out += p.read_bytes()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def read_path(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    try:
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            if not files:
                raise DataError(f"data directory {p} has no files")
            return b"".join(_read_file(q) for q in files)
        return _read_file(p)
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None


def _read_file(p: Path) -> bytes:
    if p.suffix == ".gz":
        try:
            with gzip.open(p, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{p} is not a valid gzip file ({e})") from None
    return p.read_bytes()


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # uint8
    val: torch.Tensor  # uint8
    test: torch.Tensor | None = None


def load_corpus(spec: str | None = None, val_fraction: float = 0.05, min_bytes: int = 1024,
                cache_dir: str | None = None) -> Corpus:
    """Load a corpus by spec (see module docstring) and split off held-out text."""
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    if spec in (None, "", "default"):
        data, name = default_corpus(), "default (python stdlib sources)"
    elif spec == "enwik8":
        from .enwik8 import load_enwik8

        return load_enwik8(cache_dir=cache_dir)
    else:
        data, name = read_path(spec), str(spec)
    if len(data) < min_bytes:
        raise DataError(f"data {name!r} has {len(data)} bytes; need at least {min_bytes}")
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_val = max(int(len(t) * val_fraction), min_bytes // 2)
    return Corpus(name=name, train=t[:-n_val].clone(), val=t[-n_val:].clone())


def random_batch(data: torch.Tensor, batch: int, ctx: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``ctx + 1`` bytes -> (inputs, next-byte targets), int64."""
    if len(data) <= ctx + 1:
        raise DataError(f"data has {len(data)} bytes; a window needs ctx + 1 = {ctx + 1}")
    start = torch.randint(0, len(data) - ctx - 1, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(ctx + 1)
    w = data[idx].to(torch.int64)
    return w[:, :-1].to(device), w[:, 1:].to(device)


def eval_windows(data: torch.Tensor, ctx: int, max_windows: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping (when room) windows of ``ctx + 1`` bytes for validation."""
    if len(data) <= ctx + 1:
        raise DataError(f"validation data has {len(data)} bytes; a window needs ctx + 1 = {ctx + 1}")
    n_possible = len(data) - ctx - 1
    n = min(max_windows, max(1, n_possible // (ctx + 1)) if n_possible >= ctx + 1 else 1)
    starts = torch.linspace(0, n_possible, n).long()
    return data[starts[:, None] + torch.arange(ctx + 1)].to(torch.int64)
