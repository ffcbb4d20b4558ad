"""Byte corpora: loading, the embedded default corpus, train/validation splits and batches.

``load_corpus(spec)`` accepts
    None / "default"   the embedded default corpus: the Python standard library's own source files
                       (``Lib/*.py`` of the running interpreter, sorted by name, up to 8 MiB). Every
                       Python installation carries it, so it needs no network and no user file,
                       and it is byte-identical across runs on a machine.
    a regular file     its bytes, memory-mapped
    a .gz file         decompressed once into the data cache, then memory-mapped
    a directory        every regular file under it (``.gz`` ones decompressed), in sorted path order,
                       concatenated once into the data cache, then memory-mapped
    "enwik8"           see :mod:`trueternary.enwik8` (download, sha256 check, cache, 90M/5M/5M split)
Anything else (an empty spec, a FIFO, a socket, a device) is a DataError: reading a pipe would hang
or consume someone else's stream, and a corpus must be readable twice (resume, other ranks).

Memory: a corpus is never read into RAM as a whole. Its bytes are a read-only memory map of one
regular file, so the kernel pages in only the windows a run reads and can drop them again under memory
pressure; the train/validation split and every batch are views or small gathers of that map (nothing
writes to corpus tensors; a write would fault). Only the default corpus (8 MiB) lives in RAM.

Data cache (what cannot be mapped in place): ``<cache_dir>/corpora/<name>-<path hash>-<source hash>.bytes``
with ``cache_dir`` = ``--data_dir``, else ``$TRUETERNARY_CACHE``, else ``~/.cache/trueternary``. The
source hash covers each source file's size and mtime (enwik8: the archive's sha256), so an unchanged
source reuses its cache and a changed one is decompressed again, replacing the older copy. A cache file
is streamed in 1 MiB chunks to a temporary file in the same directory and renamed into place when
complete, so an interrupted or failed decompression leaves nothing that a later load would use.
:class:`Corpus`, the reading of files and the cache are :mod:`trueternary.datafiles`' (enwik8 uses them too).

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
import os
import stat
import sysconfig
from pathlib import Path
from typing import BinaryIO

import torch

from .datafiles import SPEC_HELP, Corpus, cached_copy, copy_chunks, file_kind, map_file, open_regular
from .errors import DataError

DEFAULT_CORPUS_BYTES = 8 << 20


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


def _copy_source_file(p: Path, out: BinaryIO) -> None:
    """One file into the cache, decompressed when its name ends in ``.gz``."""
    with open_regular(p) as f:
        if p.suffix == ".gz":
            copy_chunks(gzip.GzipFile(fileobj=f, mode="rb").read, out, p, "is not a valid gzip file")
        else:
            copy_chunks(f.read, out, p)


def _source_bytes(p: Path, cache_dir: str | os.PathLike | None) -> torch.Tensor:
    """The corpus bytes of a path spec, mapped (a cache copy for .gz files and directories)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"data path not found: {p}") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            files = sorted(q for q in p.rglob("*") if q.is_file())
            stats = [q.stat() for q in files]
            identity = [[q.relative_to(p).as_posix(), s.st_size, s.st_mtime_ns] for q, s in zip(files, stats)]
        except OSError as e:
            raise DataError(f"cannot list {p}: {e.strerror or e}") from None
        if not files:
            raise DataError(f"data directory {p} has no files")

        def write(out: BinaryIO) -> None:
            for q in files:
                _copy_source_file(q, out)

        return map_file(cached_copy(p, identity, write, "concatenating the files of", cache_dir))
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"data path {p} is a {file_kind(st.st_mode)}; data is {SPEC_HELP}")
    if p.suffix == ".gz":
        identity = [st.st_size, st.st_mtime_ns]
        return map_file(cached_copy(p, identity, lambda out: _copy_source_file(p, out), "decompressing", cache_dir))
    return map_file(p)


def load_corpus(spec: str | os.PathLike | None = None, val_fraction: float = 0.05, min_bytes: int = 1024,
                cache_dir: str | os.PathLike | None = None) -> Corpus:
    """Load a corpus by spec (see module docstring) and split off held-out text.

    ``cache_dir``: where enwik8 is downloaded and .gz files and directories are decompressed
    (default: :func:`trueternary.datafiles.default_cache_dir`).
    """
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"data spec must be a path or a name, got {type(spec).__name__}")
    if spec == "":
        raise DataError(f"the data spec is empty; give {SPEC_HELP}")
    if spec in (None, "default"):
        data, name = torch.frombuffer(bytearray(default_corpus()), dtype=torch.uint8), "default (python stdlib sources)"
    elif spec == "enwik8":
        from .enwik8 import load_enwik8

        return load_enwik8(cache_dir=cache_dir)
    else:
        data, name = _source_bytes(Path(spec), cache_dir), str(spec)
    if len(data) < min_bytes:
        raise DataError(f"data {name!r} has {len(data)} bytes; need at least {min_bytes}")
    n_val = max(int(len(data) * val_fraction), min_bytes // 2)
    return Corpus(name=name, train=data[:-n_val], val=data[-n_val:])


# ------------------------------------------------------------------------------------ windows
def random_batch(data: torch.Tensor, batch: int, ctx: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", part: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``ctx + 1`` bytes -> (inputs, next-byte targets), int64; with ``part``, only
    those windows of the ``batch`` drawn (a data-parallel rank's share)."""
    if len(data) <= ctx + 1:
        raise DataError(f"data has {len(data)} bytes; a window needs ctx + 1 = {ctx + 1}")
    start = torch.randint(0, len(data) - ctx - 1, (batch,), generator=generator)
    if part is not None:
        start = start[part]
    idx = start[:, None] + torch.arange(ctx + 1)
    w = data[idx].to(torch.int64)
    return w[:, :-1].to(device), w[:, 1:].to(device)


def eval_window_starts(n_bytes: int, ctx: int, max_windows: int) -> torch.Tensor:
    """Starts of evenly spaced, non-overlapping (when room) windows of ``ctx + 1`` bytes in ``n_bytes``.

    Window ``i`` of ``n`` starts at ``floor(i * last / (n - 1))`` with ``last = n_bytes - ctx - 1``, so the
    first window starts at 0 and the last ends at the last byte. Computed as ``i * q + i * r // (n - 1)``
    with ``q, r = divmod(last, n - 1)``: exact integers that cannot overflow int64 for any length.
    """
    if n_bytes <= ctx + 1:
        raise DataError(f"validation data has {n_bytes} bytes; a window needs ctx + 1 = {ctx + 1}")
    last = n_bytes - ctx - 1
    n = min(max_windows, max(1, last // (ctx + 1)) if last >= ctx + 1 else 1)
    i = torch.arange(n, dtype=torch.int64)
    if n == 1:
        return i
    q, r = divmod(last, n - 1)
    return i * q + i * r // (n - 1)


def eval_windows(data: torch.Tensor, ctx: int, max_windows: int) -> torch.Tensor:
    """The validation windows (:func:`eval_window_starts`) of ``data``: (n, ctx + 1) int64."""
    starts = eval_window_starts(len(data), ctx, max_windows)
    return data[starts[:, None] + torch.arange(ctx + 1)].to(torch.int64)


class RandomWindows:
    """Random training batches from one seeded generator; its state is the run's data position.

    ``next()`` is :func:`random_batch` with this object's generator, so ``RandomWindows(data, b, c, seed)``
    yields the same batches as ``random_batch(data, b, c, torch.Generator().manual_seed(seed))`` in a loop.
    Data-parallel rank ``rank`` of ``world_size`` draws the same global batches and keeps its share, the
    ``rank``-th ``batch / world_size`` windows of each (``share`` of them): the batches and the data position
    are the same whatever the number of ranks.
    """

    def __init__(self, data: torch.Tensor, batch: int, ctx: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(data) <= ctx + 1:
            raise DataError(f"training data has {len(data)} bytes; a window needs ctx + 1 = {ctx + 1}")
        if batch % world_size:
            raise DataError(f"a batch of {batch} windows does not divide into {world_size} equal shares")
        self.data, self.batch, self.ctx = data, batch, ctx
        self.share = batch // world_size
        self._part = slice(rank * self.share, (rank + 1) * self.share) if world_size > 1 else None
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        xy = random_batch(self.data, self.batch, self.ctx, self.generator, device, self._part)
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
