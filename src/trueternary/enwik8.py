"""enwik8: download, sha256 check, cache and the standard 90M/5M/5M split (``--data enwik8``).

enwik8 is the first 10**8 bytes of the English Wikipedia XML dump of 2006-03-03 (the Hutter Prize
file), the usual byte-level language-modelling benchmark. The archive ``ENWIK8_URL`` (36,445,475
bytes) holds one member, ``enwik8`` (100,000,000 bytes). The standard split (Transformer-XL and
the papers after it) is

    train       bytes [0, 90M)
    validation  bytes [90M, 95M)
    test        bytes [95M, 100M)

i.e. 90% / 5% / 5%; ``split_points`` applies the same fractions to any length, so the code path is
tested on a small archive the test builds itself.

Cache: ``<cache_dir>/enwik8.zip`` with ``cache_dir`` = ``--data_dir``, else ``$TRUETERNARY_CACHE``,
else ``~/.cache/trueternary``. A download goes to a temporary file in the cache directory, is
hashed while it streams, and is renamed into place only when its sha256 equals ``ENWIK8_SHA256``;
a cached archive is hashed again at every load, so a damaged cache is reported, never trained on.
The member is extracted once (zip's CRC checked) into the data cache (:mod:`trueternary.datafiles`,
``<cache_dir>/corpora/enwik8.zip-*.bytes``, keyed by the archive's sha256) and memory-mapped from there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from .datafiles import Corpus, cached_copy, copy_chunks, default_cache_dir, map_file
from .errors import DataError

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ARCHIVE_NAME = "enwik8.zip"
MEMBER_NAME = "enwik8"
TRAIN_FRACTION, VAL_FRACTION = 90, 5  # percent; the test split is the remaining 5%
_CHUNK = 1 << 20


def split_points(n: int) -> tuple[int, int]:
    """End of train and end of validation for ``n`` bytes: (90_000_000, 95_000_000) for enwik8."""
    return n * TRAIN_FRACTION // 100, n * (TRAIN_FRACTION + VAL_FRACTION) // 100


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str) -> None:
    """Stream ``url`` into ``dest`` atomically; nothing is left at ``dest`` unless the sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    while chunk := resp.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DataError(
                    f"cannot download {url}: {reason} (or place {dest.name} in {dest.parent} yourself)"
                ) from None
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != sha256:
            raise DataError(f"downloaded {url} has sha256 {got}, expected {sha256}; nothing was cached")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_archive(cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified archive in the cache, downloading it first when it is not there."""
    # Read the module globals at call time, so tests can point them at a local archive.
    url, sha256 = ENWIK8_URL, ENWIK8_SHA256
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / ARCHIVE_NAME
    if not path.exists():
        print(f"enwik8: downloading {url} to {path}", flush=True)
        download(url, path, sha256)
    try:
        got = sha256_file(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if got != sha256:
        raise DataError(f"{path} has sha256 {got}, expected {sha256}: delete it to download it again")
    return path


def load_enwik8(cache_dir: str | os.PathLike | None = None) -> Corpus:
    """enwik8 as a Corpus with the standard train / validation / test split, memory-mapped."""
    path = fetch_archive(cache_dir)

    def extract(out: BinaryIO) -> None:
        unreadable = (zipfile.BadZipFile, OSError, EOFError, zlib.error)
        try:
            zf = zipfile.ZipFile(path)
        except unreadable as e:
            raise DataError(f"{path} is not a readable zip archive ({e})") from None
        with zf:
            try:
                member = zf.open(MEMBER_NAME)
            except KeyError:
                raise DataError(f"{path} has no member {MEMBER_NAME!r}") from None
            except unreadable as e:
                raise DataError(f"{path} is not a readable zip archive ({e})") from None
            with member:
                copy_chunks(member.read, out, path, "is not a readable zip archive", unreadable)

    # The archive was just verified, so its sha256 names the extracted bytes.
    t = map_file(cached_copy(path, ["enwik8", ENWIK8_SHA256, MEMBER_NAME], extract, "extracting", cache_dir))
    if len(t) < 100:
        raise DataError(f"{path}: member {MEMBER_NAME!r} has only {len(t)} bytes")
    a, b = split_points(len(t))
    return Corpus(name="enwik8", train=t[:a], val=t[a:b], test=t[b:])
