"""A corpus and the files beneath it: the :class:`Corpus` a loader returns, regular files opened without blocking,
read-only memory maps, and the data cache (:func:`cached_copy`; :mod:`trueternary.data`'s docstring says what
each is for). Both corpus loaders, ``data`` and ``enwik8``, build on this module, which imports neither.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import DataError

CACHE_SUBDIR = "corpora"
_CHUNK = 1 << 20
SPEC_HELP = "a regular file, a .gz file, a directory, 'default' or 'enwik8'"  # what --data takes


@dataclass
class Corpus:
    """A loaded corpus: its name and its byte splits (what ``data.load_corpus`` and ``enwik8.load_enwik8`` return)."""

    name: str
    train: torch.Tensor  # uint8, usually a view of a memory map
    val: torch.Tensor  # uint8
    test: torch.Tensor | None = None

    def fingerprint(self) -> str:
        """sha256 of the training then held-out bytes: recorded in checkpoints to detect a data change.

        Streamed in 16 MiB slices of the (mapped) tensors, so it needs no copy of the corpus; it reads
        every byte once: 0.2 s for 512 MiB in the page cache (a 2-core test VM), disk speed otherwise.
        """
        h = hashlib.sha256()
        for part in (self.train, self.val):
            for i in range(0, len(part), 16 * _CHUNK):
                h.update(part[i:i + 16 * _CHUNK].numpy())
        return h.hexdigest()


def default_cache_dir() -> Path:
    """``$TRUETERNARY_CACHE``, else ``~/.cache/trueternary``: downloads and the data cache."""
    env = os.environ.get("TRUETERNARY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "trueternary"


def file_kind(mode: int) -> str:
    """What a file that is not regular is, for an error message (``mode``: its ``st_mode``)."""
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading; anything but a regular file is a DataError.

    Opened non-blocking, so a FIFO that replaced the file after it was checked is refused instead
    of waiting for a writer (regular files ignore the flag).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(f"data path not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"data path {path} is a {file_kind(mode)}; data is {SPEC_HELP}")
    return os.fdopen(fd, "rb")


def map_file(path: Path) -> torch.Tensor:
    """The bytes of a regular file as a uint8 tensor on a read-only memory map: nothing is read until used."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            return torch.empty(0, dtype=torch.uint8)  # mmap refuses empty files
        try:
            # Read-only, not copy-on-write: a private writable map is charged in full against the
            # kernel's commit limit, which refuses corpora larger than RAM + swap.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot map {path}: {getattr(e, 'strerror', None) or e}") from None
    with warnings.catch_warnings():  # torch warns that the tensor could write to a read-only buffer; nothing does
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapped, dtype=torch.uint8)  # holds a reference to the map


def copy_chunks(read: Callable[[int], bytes], out: BinaryIO, source: Path, bad: str = "cannot be read",
                errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)) -> None:
    """Stream ``read`` into ``out`` in 1 MiB chunks. A failure to read (``errors``) is the source's: a
    DataError naming it, ``bad`` saying how; a failure to write is the cache's (OSError, passed on)."""
    while True:
        try:
            chunk = read(_CHUNK)
        except errors as e:
            raise DataError(f"{source} {bad} ({getattr(e, 'strerror', None) or e})") from None
        if not chunk:
            return
        out.write(chunk)


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def cached_copy(source: Path, identity: object, write: Callable[[BinaryIO], None], doing: str,
                cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file holding what ``write`` produces from ``source`` (see the module docstring).

    ``identity`` (JSON-ready) changes whenever the source does: the cache file is reused while it is
    the same, and written again (the older copy removed) when it is not.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / CACHE_SUBDIR
    resolved = source.resolve()  # "data" and "./data/" are one source
    stem = f"{re.sub(r'[^A-Za-z0-9._-]', '_', resolved.name) or 'root'}-{_hash_text(str(resolved))}"
    path = root / f"{stem}-{_hash_text(json.dumps(identity, sort_keys=True))}.bytes"
    if path.is_file():
        return path
    where = "(choose another cache with --data_dir or $TRUETERNARY_CACHE)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".part", dir=root)
    except OSError as e:
        raise DataError(f"cannot write the data cache {root}: {e.strerror or e} {where}") from None
    print(f"data: {doing} {source} into {path} (once; reused while the source is unchanged)", flush=True)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e} {where}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for older in root.glob(f"{stem}-*.bytes"):
        if older != path:
            try:
                older.unlink()  # a process still mapping it keeps its pages
            except OSError:
                pass
    return path
