"""Corpora: files, .gz, directories, the default corpus, data positions, and enwik8 on a local archive."""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from trueternary import enwik8
from trueternary.data import DataError, RandomWindows, default_corpus, load_corpus, random_batch, read_path

TEXT = b"".join(b"line %d of a small test corpus\n" % i for i in range(200))


def test_text_gz_and_directory(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT)
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(TEXT[::-1])
    assert read_path(tmp_path / "a.txt") == TEXT
    assert read_path(tmp_path / "b.txt.gz") == TEXT[::-1]
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_bytes(b"zzz")
    (d / "a.txt").write_bytes(b"aaa")
    (d / "sub" / "m.txt").write_bytes(b"mmm")
    assert read_path(d) == b"aaa" + b"mmm" + b"zzz"  # sorted by path: a.txt, sub/m.txt, z.txt
    c = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.1)
    assert bytes(torch.cat([c.train, c.val]).tolist()) == TEXT  # contiguous split, nothing lost
    assert len(c.val) == max(int(len(TEXT) * 0.1), 512)


def test_default_corpus_is_deterministic():
    a, b = default_corpus(1 << 16), default_corpus(1 << 16)
    assert a == b and len(a) == 1 << 16
    assert b"def " in a and b"import " in a  # Python sources


@pytest.mark.parametrize("case", ["missing", "empty_file", "empty_dir", "tiny", "bad_gz", "unreadable"])
def test_bad_data_is_a_data_error(tmp_path, monkeypatch, case):
    p = tmp_path / "data"
    if case == "empty_file":
        p.write_bytes(b"")
    elif case == "empty_dir":
        p.mkdir()
    elif case == "tiny":
        p.write_bytes(b"abc")
    elif case == "bad_gz":
        p = tmp_path / "data.gz"
        p.write_bytes(b"not gzip at all")
    elif case == "unreadable":
        p.write_bytes(TEXT)

        def denied(self):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "read_bytes", denied)  # chmod does not stop root, so simulate it
    with pytest.raises(DataError) as e:
        load_corpus(str(p))
    assert "\n" not in str(e.value) and str(p.name) in str(e.value)


def test_random_windows_match_random_batch_and_resume():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    w = RandomWindows(data, batch=3, ctx=8, seed=5)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = w.next()
        rx, ry = random_batch(data, 3, 8, g)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    state = w.state_dict()
    expected = [w.next() for _ in range(4)]
    w2 = RandomWindows(data, batch=3, ctx=8, seed=123)
    w2.load_state_dict(state)
    assert w2.batches_drawn == 3
    for ex, got in zip(expected, [w2.next() for _ in range(4)]):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])
    with pytest.raises(ValueError, match="data position"):
        w2.load_state_dict({"generator": "!!", "batches_drawn": 1})


# ------------------------------------------------------------------------------------ enwik8
def _archive(tmp_path: Path, content: bytes, member: str = "enwik8") -> tuple[Path, str]:
    path = tmp_path / "src" / "enwik8.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, content)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


CONTENT = bytes((i * 7 + i // 13) % 251 for i in range(20_000))


def test_enwik8_constants_and_split():
    assert enwik8.ENWIK8_URL == "http://mattmahoney.net/dc/enwik8.zip"
    assert len(enwik8.ENWIK8_SHA256) == 64
    assert enwik8.split_points(100_000_000) == (90_000_000, 95_000_000)


def test_enwik8_download_verify_cache_and_split(tmp_path, monkeypatch):
    archive, sha = _archive(tmp_path, CONTENT)
    monkeypatch.setattr(enwik8, "ENWIK8_URL", archive.as_uri())  # file:// URL: the real download code path
    monkeypatch.setattr(enwik8, "ENWIK8_SHA256", sha)
    cache = tmp_path / "cache"
    c = load_corpus("enwik8", cache_dir=str(cache))
    assert c.name == "enwik8"
    assert (len(c.train), len(c.val), len(c.test)) == (18_000, 1_000, 1_000)  # 90% / 5% / 5%
    assert bytes(torch.cat([c.train, c.val, c.test]).tolist()) == CONTENT
    assert (cache / "enwik8.zip").read_bytes() == archive.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["enwik8.zip"]  # no partial download left
    # a second load uses the cache: the source can be gone
    archive.unlink()
    c2 = enwik8.load_enwik8(cache)
    assert torch.equal(c2.train, c.train)


def test_enwik8_wrong_checksum_caches_nothing(tmp_path, monkeypatch):
    archive, sha = _archive(tmp_path, CONTENT)
    monkeypatch.setattr(enwik8, "ENWIK8_URL", archive.as_uri())
    monkeypatch.setattr(enwik8, "ENWIK8_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256"):
        enwik8.load_enwik8(cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_enwik8_damaged_cache_and_unreachable_url(tmp_path, monkeypatch):
    archive, sha = _archive(tmp_path, CONTENT)
    monkeypatch.setattr(enwik8, "ENWIK8_SHA256", sha)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "enwik8.zip").write_bytes(archive.read_bytes()[:-5])  # e.g. an interrupted copy
    with pytest.raises(DataError, match="delete it"):
        enwik8.load_enwik8(cache)
    (cache / "enwik8.zip").unlink()
    monkeypatch.setattr(enwik8, "ENWIK8_URL", (tmp_path / "nowhere.zip").as_uri())
    with pytest.raises(DataError, match="cannot download"):
        enwik8.load_enwik8(cache)


def test_enwik8_archive_without_member(tmp_path, monkeypatch):
    archive, sha = _archive(tmp_path, CONTENT, member="other")
    monkeypatch.setattr(enwik8, "ENWIK8_URL", archive.as_uri())
    monkeypatch.setattr(enwik8, "ENWIK8_SHA256", sha)
    with pytest.raises(DataError, match="no member 'enwik8'"):
        enwik8.load_enwik8(tmp_path / "cache")


def test_enwik8_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUETERNARY_CACHE", str(tmp_path / "envcache"))
    assert enwik8.default_cache_dir() == tmp_path / "envcache"
