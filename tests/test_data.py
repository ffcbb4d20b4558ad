"""Corpora: files, .gz, directories, the data cache, memory maps at scale, refused specs, the default corpus,
evaluation windows, data positions, and enwik8 on a local archive."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import zipfile
from pathlib import Path

import pytest
import torch

from trueternary import cli, data, datafiles, enwik8
from trueternary.data import (
    DataError,
    RandomWindows,
    default_corpus,
    eval_window_starts,
    eval_windows,
    load_corpus,
    random_batch,
)

TEXT = b"".join(b"line %d of a small test corpus\n" % i for i in range(200))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The data cache of every test here is its own (never ~/.cache)."""
    monkeypatch.setenv("TRUETERNARY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / datafiles.CACHE_SUBDIR


@pytest.fixture
def no_hang():
    """Fails the test (instead of hanging the suite) if it blocks for 30 s, e.g. opening a FIFO."""
    if not hasattr(signal, "SIGALRM"):
        pytest.skip("needs SIGALRM")

    def hung(*_):
        pytest.fail("blocked for 30 s")  # not an OSError, so no handler under test can swallow it

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def corpus_bytes(c) -> bytes:
    return bytes(torch.cat([c.train, c.val]).numpy())


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_text_gz_and_directory(tmp_path, _cache_in_tmp):
    (tmp_path / "a.txt").write_bytes(TEXT)
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(TEXT[::-1])
    c = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.1)
    assert corpus_bytes(c) == TEXT  # contiguous split, nothing lost
    assert len(c.val) == max(int(len(TEXT) * 0.1), 512)
    assert cache_files(_cache_in_tmp) == []  # a plain file is mapped in place
    assert corpus_bytes(load_corpus(str(tmp_path / "b.txt.gz"))) == TEXT[::-1]
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_bytes(TEXT[:100])
    (d / "a.txt").write_bytes(TEXT[100:1100])
    with gzip.open(d / "sub" / "m.txt.gz", "wb") as f:
        f.write(TEXT[2000:3000])
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "pipe")  # not a regular file: skipped, and must not block the listing
    # sorted by path: a.txt, sub/m.txt.gz (decompressed), z.txt
    assert corpus_bytes(load_corpus(str(d))) == TEXT[100:1100] + TEXT[2000:3000] + TEXT[:100]
    assert len(cache_files(_cache_in_tmp)) == 2  # one decompressed copy per source, nothing partial


def test_gz_cache_is_reused_then_replaced_when_the_source_changes(tmp_path, _cache_in_tmp, monkeypatch):
    src = tmp_path / "corpus.txt.gz"
    with gzip.open(src, "wb") as f:
        f.write(TEXT)
    c = load_corpus(str(src))
    (first,) = cache_files(_cache_in_tmp)
    assert first.startswith("corpus.txt.gz-") and first.endswith(".bytes")
    assert (_cache_in_tmp / first).read_bytes() == TEXT == corpus_bytes(c)

    class NoDecompression:
        def __init__(self, *a, **k):
            raise AssertionError("decompressed again although the source is unchanged")

    with monkeypatch.context() as m:
        m.setattr(data.gzip, "GzipFile", NoDecompression)
        assert corpus_bytes(load_corpus(str(src))) == TEXT
    with gzip.open(src, "wb") as f:
        f.write(TEXT[::-1])
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, whatever the clock resolution
    assert corpus_bytes(load_corpus(str(src))) == TEXT[::-1]
    (second,) = cache_files(_cache_in_tmp)  # the older copy is gone
    assert second != first


def test_fingerprint_is_the_sha256_of_the_corpus_bytes_streamed(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(TEXT)
    monkeypatch.setattr(datafiles, "_CHUNK", 64)  # 1 KiB slices: several per split
    c = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.1)
    # The definition checkpoints recorded before memory maps: resumed runs must still match.
    assert c.fingerprint() == hashlib.sha256(TEXT).hexdigest()


def test_default_corpus_is_deterministic():
    a, b = default_corpus(1 << 16), default_corpus(1 << 16)
    assert a == b and len(a) == 1 << 16
    assert b"def " in a and b"import " in a  # Python sources


@pytest.mark.parametrize("case", ["missing", "empty_file", "empty_dir", "tiny", "bad_gz", "unreadable", "fifo"])
def test_bad_data_is_a_data_error(tmp_path, monkeypatch, no_hang, _cache_in_tmp, case):
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
        real_open = os.open

        def denied(path, *args, **kwargs):
            if Path(path) == p:
                raise PermissionError(13, "Permission denied")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)  # chmod does not stop root, so simulate it
    elif case == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(p)
    with pytest.raises(DataError) as e:
        load_corpus(str(p))
    assert "\n" not in str(e.value) and str(p.name) in str(e.value)
    if case == "fifo":
        assert "FIFO" in str(e.value)
    assert [f for f in cache_files(_cache_in_tmp) if not f.endswith(".bytes")] == []  # nothing partial left


def test_empty_spec_is_refused():
    with pytest.raises(DataError, match="empty"):
        load_corpus("")


@pytest.mark.parametrize("case", ["empty", "fifo"])
def test_cli_refuses_empty_spec_and_fifo_in_one_line(tmp_path, capsys, no_hang, case):
    if case == "empty":
        spec = ""
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        spec = str(tmp_path / "pipe")
        os.mkfifo(spec)
    code = cli.main(["train", "--data", spec, "--out_dir", str(tmp_path / "runs"), "--device", "cpu",
                     "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("trueternary: error:") and "Traceback" not in err
    assert ("empty" if case == "empty" else "FIFO") in err


# ------------------------------------------------------------------------------------ evaluation windows
@pytest.mark.parametrize("n_bytes,ctx,max_windows", [(1000, 8, 16), (419_430, 256, 128), (12_345, 64, 1000),
                                                      (70, 64, 8), (2**40 + 7, 255, 100)])
def test_eval_window_starts_are_exact_and_span_the_data(n_bytes, ctx, max_windows):
    starts = eval_window_starts(n_bytes, ctx, max_windows)
    last = n_bytes - ctx - 1
    n = len(starts)
    assert 1 <= n <= max_windows
    expected = [0] if n == 1 else [i * last // (n - 1) for i in range(n)]  # exact, in Python integers
    assert starts.tolist() == expected
    if n > 1:
        assert starts[-1] + ctx + 1 == n_bytes  # the last window ends at the last byte
        assert bool((starts.diff() >= ctx + 1).all()) == (last // (n - 1) >= ctx + 1)  # non-overlapping when room


def test_eval_windows_hold_the_bytes_at_their_starts():
    d = torch.arange(3000, dtype=torch.int64).remainder(251).to(torch.uint8)
    w = eval_windows(d, 16, 10)
    for s, row in zip(eval_window_starts(3000, 16, 10).tolist(), w):
        assert torch.equal(row, d[s:s + 17].long())


def _rss_anon() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def test_a_corpus_past_the_float32_limit_is_mapped_not_read(tmp_path):
    """~350 MB (a sparse file, next to no disk): more than 2**24 held-out bytes, where float32 window
    starts rounded past the end. Loading maps it; windows and batches read only what they use."""
    size = 21 << 24
    n_val = int(size * 0.05)
    ctx = next(c for c in range(64, 68) if (n_val - c - 1) % 4 == 3)
    last = n_val - ctx - 1
    assert n_val > 2**24 and float(torch.tensor(last, dtype=torch.float32)) > last  # float32 rounds past the end
    head, tail = bytes(range(256)) * 16, bytes(range(255, -1, -1)) * 16
    p = tmp_path / "big.txt"
    with open(p, "wb") as f:
        f.write(head)
        f.seek(size - len(tail))
        f.write(tail)
    anon_before = _rss_anon()
    c = load_corpus(str(p))
    w = eval_windows(c.val, ctx, 128)
    batches = RandomWindows(c.train, 8, ctx, seed=0)
    x, y = batches.next()
    anon_after = _rss_anon()
    if anon_before is not None:
        assert anon_after - anon_before < 64 << 20  # a copy of the corpus would be ~350 MB
    assert len(c.train) + len(c.val) == size and len(c.val) == n_val
    assert c.val.untyped_storage().data_ptr() == c.train.untyped_storage().data_ptr()  # the split is views
    assert bytes(c.train[:len(head)].numpy()) == head
    assert w.shape == (128, ctx + 1) and w.dtype == torch.int64
    assert bytes(w[-1].to(torch.uint8).numpy()) == tail[-(ctx + 1):]  # the last window ends at the end
    assert eval_window_starts(n_val, ctx, 128)[-1] == last
    assert x.shape == y.shape == (8, ctx) and torch.equal(x[:, 1:], y[:, :-1])
    assert batches.batches_drawn == 1


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
    assert cache_files(cache) == ["corpora", "enwik8.zip"]  # no partial download left
    (extracted,) = cache_files(cache / "corpora")  # the member, extracted once to be memory-mapped
    assert (cache / "corpora" / extracted).read_bytes() == CONTENT
    # a second load uses the cache: the source can be gone, and nothing is extracted again
    archive.unlink()
    monkeypatch.setattr(enwik8.zipfile, "ZipFile", None)
    c2 = enwik8.load_enwik8(cache)
    assert torch.equal(c2.train, c.train) and torch.equal(c2.test, c.test)


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
