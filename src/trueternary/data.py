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

Held-out text: the last ``val_fraction`` of the bytes (contiguous, never trained on); enwik8 uses
its standard split instead.

Training batches are random windows (``random_batch``). ``RandomWindows`` wraps the generator that
draws them so a run's *data position* (the generator state and the number of batches drawn) can be
saved in a checkpoint and restored: a resumed run then sees exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import sysconfig
import zlib
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
    if p.is_dir():
        try:
            files = sorted(q for q in p.rglob("*") if q.is_file())
        except OSError as e:
            raise DataError(f"cannot list {p}: {e.strerror or e}") from None
        if not files:
            raise DataError(f"data directory {p} has no files")
        return b"".join(_read_file(q) for q in files)
    return _read_file(p)


def _read_file(p: Path) -> bytes:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    if p.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{p} is not a valid gzip file ({e})") from None
    return raw


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # uint8
    val: torch.Tensor  # uint8
    test: torch.Tensor | None = None

    def fingerprint(self) -> str:
        """sha256 of the training then held-out bytes: recorded in checkpoints to detect a data change."""
        h = hashlib.sha256()
        for part in (self.train, self.val):
            h.update(part.numpy().tobytes())
        return h.hexdigest()


def load_corpus(spec: str | None = None, val_fraction: float = 0.05, min_bytes: int = 1024,
                cache_dir: str | None = None) -> Corpus:
    """Load a corpus by spec (see module docstring) and split off held-out text."""
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"data spec must be a path or a name, got {type(spec).__name__}")
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


class RandomWindows:
    """Random training batches from one seeded generator; its state is the run's data position.

    ``next()`` is :func:`random_batch` with this object's generator, so ``RandomWindows(data, b, c, seed)``
    yields the same batches as ``random_batch(data, b, c, torch.Generator().manual_seed(seed))`` in a loop.
    """

    def __init__(self, data: torch.Tensor, batch: int, ctx: int, seed: int) -> None:
        if len(data) <= ctx + 1:
            raise DataError(f"training data has {len(data)} bytes; a window needs ctx + 1 = {ctx + 1}")
        self.data, self.batch, self.ctx = data, batch, ctx
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        xy = random_batch(self.data, self.batch, self.ctx, self.generator, device)
        self.batches_drawn += 1
        return xy

    def state_dict(self) -> dict:
        """JSON-ready: the generator state (base64 of its bytes) and the number of batches drawn."""
        state = self.generator.get_state().numpy().tobytes()
        return {"generator": base64.b64encode(state).decode("ascii"), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        try:
            raw = base64.b64decode(state["generator"], validate=True)
            self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            self.batches_drawn = int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"bad data position in checkpoint: {e}") from None
