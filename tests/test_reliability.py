"""What ``trueternary train`` guarantees when things go wrong (docs/training.md, "Reliability"): kills at any
moment, a full disk, a read-only folder, two processes on one run directory, SIGTERM from a job scheduler, a
folder left by a run killed before its first checkpoint, and out-of-bounds flags.

Real ``python -m trueternary.cli train`` subprocesses where the kernel's behaviour is the point (SIGKILL,
SIGTERM, flock, a real full tmpfs in a private mount namespace); in-process fault injection elsewhere, below
the code under test (file opens, mkdir, the safetensors writer), because the tests run as root, which file
permissions do not stop. Every run here is the tiny model of tests/_train_helpers.py for STEPS steps, and
every continued run is compared with one uninterrupted run (module fixture ``straight``): final checkpoint
tensors and metrics rows bit for bit.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
from safetensors import SafetensorError

import trueternary
from _train_helpers import TINY, tiny_config, write_corpus
from trueternary import checkpoint as ckpt_io
from trueternary.cli import main
from trueternary.recipes import Recipe
from trueternary.train import LOCK_FILE, RunDirectory, machine_memory, read_metrics, train

STEPS = 12
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "peak_memory_bytes")  # measured, not computed: differ run to run
TEMPORARY = re.compile(r"\..+\.tmp-\d+|\.tmp[A-Za-z0-9]{6}")  # ours, and safetensors' own


# ------------------------------------------------------------------------------------ helpers
def _flags(tmp_path: Path, out_dir: Path | None = None, **over) -> list[str]:
    """``train`` flags of the tiny run on tmp_path's corpus (``None`` drops a flag, ``True`` is a switch)."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    kw = dict(TINY, data=str(corpus), out_dir=str(out_dir or tmp_path / "runs"), run_name="run", max_steps=STEPS)
    kw.update(over)
    flags = ["train"]
    for k, v in kw.items():
        if v is True:
            flags.append(f"--{k}")
        elif v is not None:
            flags += [f"--{k}", str(v)]
    return flags


def _env() -> dict:
    src = str(Path(trueternary.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


@pytest.fixture
def spawn():
    """``spawn(flags, script=None, **popen_kw)``: ``python -m trueternary.cli <flags>`` (or ``python -c script
    <flags>``) in a new process; any still running when the test ends (a failed assertion) is killed."""
    procs = []

    def start(flags: list[str], script: str | None = None, **kw) -> subprocess.Popen:
        head = ["-m", "trueternary.cli"] if script is None else ["-c", script]
        procs.append(subprocess.Popen([sys.executable, *head, *flags], env=_env(), text=True, **kw))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.02)


def _newest_step(run: Path) -> int:
    newest = ckpt_io.latest_checkpoint(run)
    return ckpt_io.checkpoint_step(newest) if newest else 0


def _last_logged_step(run: Path) -> int:
    return max([r["step"] for r in read_metrics(run) if "loss" in r], default=0)


def _one_line(err: str) -> str:
    assert err.startswith("trueternary: error: ") and err.count("\n") == 1, err
    return err


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMPORARY.fullmatch(p.name)]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but lock files (which each process that takes the lock rewrites with its pid)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _assert_intact(run: Path) -> None:
    """No temporaries left, every checkpoint verifies, and no run directory that holds nothing."""
    assert _temporaries(run.parent) == []
    for p in ckpt_io.list_checkpoints(run):
        ckpt_io.load_checkpoint(p)
    if run.exists():
        assert [p.name for p in run.iterdir() if p.name != LOCK_FILE], f"{run} was left empty"


def _assert_same_run(run: Path, straight: Path) -> None:
    """``run`` ended exactly where the uninterrupted run did: final tensors and every metrics row."""
    a = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run))
    b = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(straight))
    assert a.step == b.step == STEPS
    assert a.meta["tensor_sha256"] == b.meta["tensor_sha256"]
    assert _rows(run) == _rows(straight)
    _assert_intact(run)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every continued run must equal."""
    tmp = tmp_path_factory.mktemp("straight")
    train(tiny_config(tmp, max_steps=STEPS))
    return tmp / "runs" / "run"


# ------------------------------------------------------------------------------------ kills and SIGTERM
# Dies inside safetensors' own write: the library writes <dir>/.tmpXXXXXX and renames it to our temporary.
_KILLED_IN_SERIALIZER = """
import os, signal, sys
import safetensors.torch as st

def killed_mid_write(tensors, filename, metadata=None):
    data = st.save(tensors, metadata=metadata)
    with open(os.path.join(os.path.dirname(filename), ".tmpKi11ed"), "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

st.save_file = killed_mid_write
from trueternary.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_loop_continues_bit_identically(tmp_path, straight, spawn, capsys):
    """SIGKILL the run at random moments, and once inside the checkpoint writer, restarting it each time with
    ``--resume auto`` (a job's restart loop). A checkpoint and a plot are written every second step, so kills
    land in writes too. While one process runs, a second on the same run directory is refused in one line
    naming it. The run ends bit-identical to the uninterrupted one, with no temporary left behind.
    TRUETERNARY_CRASH_SEED picks other kill moments."""
    seed = int(os.environ.get("TRUETERNARY_CRASH_SEED", "0"))
    rng = random.Random(seed)
    flags = _flags(tmp_path, save_every=2, keep_checkpoints=2, resume="auto")
    run = tmp_path / "runs" / "run"

    log = open(tmp_path / "stderr.txt", "w")
    proc = spawn(flags, _KILLED_IN_SERIALIZER, stdout=subprocess.DEVNULL, stderr=log)
    assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    assert [p.name for p in (run / "checkpoints").iterdir()] == [".tmpKi11ed"]  # died before its first save

    kills = []
    for i in range(2):
        before = _newest_step(run)
        proc = spawn(flags, stdout=subprocess.DEVNULL, stderr=log)
        _wait_for(lambda before=before: _newest_step(run) > before, proc)  # (every process moves the run on)
        if i == 0:  # a second process on the same run directory: refused, naming the holder
            assert main(flags) == 2
            assert f"is in use by another training run (pid {proc.pid} on" in _one_line(capsys.readouterr().err)
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        kills.append((round(delay, 3), _newest_step(run)))
        if proc.returncode == 0:  # finished before the kill: nothing left to interrupt
            break
    log.close()
    assert main(flags) == 0, f"seed {seed}, kills (delay, newest checkpoint) {kills}: {capsys.readouterr().err}"
    _assert_same_run(run, straight)


def test_sigterm_saves_and_the_run_continues_bit_identically(tmp_path, straight, spawn):
    """SIGTERM (what a job scheduler sends before its kill) with no checkpoint due (--save_every 0): the run
    saves after its current step, says how to continue, and exits 0; resuming ends like the uninterrupted run."""
    run = tmp_path / "runs" / "run"
    proc = spawn(_flags(tmp_path, save_every=0), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: _last_logged_step(run) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    m = re.search(rf"stopped on SIGTERM after step (\d+) of {STEPS} \(checkpoint saved\); continue with: "
                  rf"trueternary train --resume auto --run_name run --out_dir {re.escape(str(run.parent))}\n", out)
    assert m, out
    stopped = int(m.group(1))
    assert 2 <= stopped < STEPS and _newest_step(run) == stopped == _last_logged_step(run)
    assert main(_flags(tmp_path, resume="auto")) == 0
    _assert_same_run(run, straight)


def test_signals_during_the_sigterm_save(tmp_path, straight, monkeypatch, capsys, sigint_interrupts):
    """A second SIGTERM while the SIGTERM checkpoint is written: the save completes (exit 0). SIGINT in the
    middle of a save: exit 130, the previous checkpoint stays the newest and intact, no temporary is left.
    The run then still continues bit-identically."""
    run = tmp_path / "runs" / "run"
    calls, sigterm_after = [0], []
    real_step, real_save_file = Recipe.train_step, safetensors.torch.save_file

    def step(self, x, y, autocast=False):
        loss = real_step(self, x, y, autocast)
        calls[0] += 1
        if calls[0] in sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    during_save = []

    def save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            if during_save:
                os.kill(os.getpid(), during_save.pop())
            f.write(data[len(data) // 2:])

    monkeypatch.setattr(Recipe, "train_step", step)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    sigterm_after[:], during_save[:] = [3], [signal.SIGTERM]
    assert main(_flags(tmp_path, save_every=0)) == 0
    assert "stopped on SIGTERM after step 3 of 12" in capsys.readouterr().out and not during_save
    assert _newest_step(run) == 3
    ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run))

    calls[0], sigterm_after[:], during_save[:] = 0, [2], [signal.SIGINT]  # SIGTERM after step 5, SIGINT in its save
    assert main(_flags(tmp_path, save_every=0, resume="auto")) == 130
    assert capsys.readouterr().err == "trueternary: interrupted\n" and not during_save
    assert _newest_step(run) == 3 and _temporaries(run) == []
    ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run))

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    sigterm_after[:] = []
    assert main(_flags(tmp_path, save_every=0, resume="auto")) == 0
    _assert_same_run(run, straight)


# ------------------------------------------------------------------------------------ the run directory
def test_second_process_is_refused_and_writes_nothing(tmp_path, capsys):
    """A run directory held by a process (here this one, through RunDirectory): another run on it gets one line
    naming the holder, exit 2, and no file changes. Once released, it continues."""
    train(tiny_config(tmp_path, max_steps=STEPS, stop_at=4))
    run = tmp_path / "runs" / "run"
    holder = RunDirectory.claim(str(tmp_path / "runs"), "run", "TrueTernary")
    before = {**_files(run), LOCK_FILE: (run / LOCK_FILE).read_bytes()}
    try:
        for flags in (_flags(tmp_path, resume="auto"), _flags(tmp_path, overwrite=True)):
            assert main(flags) == 2
            assert f"is in use by another training run (pid {os.getpid()} on" in _one_line(capsys.readouterr().err)
        assert {**_files(run), LOCK_FILE: (run / LOCK_FILE).read_bytes()} == before
    finally:
        holder.release()
    assert main(_flags(tmp_path, resume="auto")) == 0


def test_run_killed_before_its_first_checkpoint_is_not_overwritten(tmp_path, straight, monkeypatch, capsys):
    """A run stopped before its first save leaves config.json and metrics.jsonl but no checkpoint. The same
    command again is refused without changing a byte; --overwrite moves the old files into replaced-<time>/
    and trains afresh."""
    real_step = Recipe.train_step
    calls = [0]

    def interrupted(self, x, y, autocast=False):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real_step(self, x, y, autocast)

    monkeypatch.setattr(Recipe, "train_step", interrupted)
    assert main(_flags(tmp_path, save_every=0)) == 130
    monkeypatch.setattr(Recipe, "train_step", real_step)
    run = tmp_path / "runs" / "run"
    old = _files(run)
    assert {"config.json", "metrics.jsonl"} <= set(old) and _last_logged_step(run) == 4
    capsys.readouterr()

    assert main(_flags(tmp_path)) == 2
    assert "already holds a run (config.json, metrics.jsonl; no checkpoint); continue it with --resume auto, " \
           "move its files aside with --overwrite" in _one_line(capsys.readouterr().err)
    assert _files(run) == old

    assert main(_flags(tmp_path, overwrite=True)) == 0
    (replaced,) = run.glob("replaced-*")
    assert f"moved the previous run's files (config.json, metrics.jsonl) to {replaced}/" in capsys.readouterr().out
    assert _files(replaced) == old
    _assert_same_run(run, straight)


def test_failure_after_creating_the_run_directory_leaves_none(tmp_path, monkeypatch, capsys):
    """A model that cannot be allocated: one line, exit 2, and neither the run directory nor the --out_dir this
    run created remains (an --out_dir that existed stays)."""
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4398046511104 bytes.")

    monkeypatch.setattr("trueternary.train.build_model", no_memory)
    assert main(_flags(tmp_path)) == 2
    assert "not enough memory for --d_model 32 --n_layers 1 on cpu" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    assert main(_flags(tmp_path)) == 2
    assert list((tmp_path / "runs").iterdir()) == []


def test_out_of_memory_during_a_step_is_one_line(tmp_path, monkeypatch, capsys):
    """An allocation failure in a training step (a batch or context too large for the device) ends the run in
    one line, exit 2, naming the flags to lower; the run directory and its checkpoints stay."""
    import torch

    def out_of_memory(self, x, y, autocast=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    train(tiny_config(tmp_path, max_steps=STEPS, stop_at=2))
    monkeypatch.setattr(Recipe, "train_step", out_of_memory)
    assert main(_flags(tmp_path, resume="auto")) == 2
    assert "out of memory at step 3 on cpu (CUDA out of memory. Tried to allocate 80.00 GiB); lower --batch_size" \
        in _one_line(capsys.readouterr().err)
    _assert_intact(tmp_path / "runs" / "run")
    assert _newest_step(tmp_path / "runs" / "run") == 2


# ------------------------------------------------------------------------------------ write failures
class FakeDisk:
    """Fault injection below the code under test, for files under ``root``: every write draws on ``free``
    bytes (None: unlimited) and, when they run out, stores what fits and fails with ENOSPC (mkdir too, with
    nothing free); or, with ``error`` set (EROFS, EACCES), every write, file creation and mkdir fails at once.
    Covers Python's open (io.open for pathlib, builtins.open for everything else, PIL included), os.open,
    os.mkdir and safetensors' writer (which reports I/O errors as its own exception type, as here)."""

    def __init__(self, monkeypatch) -> None:
        self.root: Path | None = None
        self.free: int | None = None
        self.error: int | None = None
        self.writes: list[tuple[str, int]] = []  # (path, bytes asked) of every metered write, in order
        real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
        real_save_file = safetensors.torch.save_file

        def fail(path, err: int):
            raise OSError(err, os.strerror(err), str(path))

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and self._mine(file):
                if self.error:
                    fail(file, self.error)
                return _Metered(real_open(file, mode, *args, **kwargs), self, str(file))
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, mode=0o777, **kwargs):
            if self.error and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and self._mine(path):
                fail(path, self.error)
            return real_os_open(path, flags, mode, **kwargs)

        def fake_mkdir(path, mode=0o777, **kwargs):
            if self._mine(path) and not os.path.exists(path) and (self.error or self.free == 0):
                fail(path, self.error or errno.ENOSPC)
            return real_mkdir(path, mode, **kwargs)

        def fake_save_file(tensors, filename, metadata=None):
            if self._mine(filename):
                err = self.error
                if not err and self.take(filename, len(safetensors.torch.save(tensors, metadata=metadata))) is not None:
                    err = errno.ENOSPC  # (safetensors removes its partial file itself)
                if err:
                    raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")
            return real_save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(safetensors.torch, "save_file", fake_save_file)

    def reset(self, root: Path, free: int | None = None, error: int | None = None) -> FakeDisk:
        self.root, self.free, self.error, self.writes = root, free, error, []
        return self

    def _mine(self, path) -> bool:
        return self.root is not None and Path(os.path.abspath(path)).is_relative_to(self.root)

    def take(self, path: str, n: int) -> int | None:
        """Draw ``n`` bytes: None if they fit, else how many did (the disk is then full)."""
        self.writes.append((path, n))
        if self.free is None or n <= self.free:
            self.free = None if self.free is None else self.free - n
            return None
        fit, self.free = self.free, 0
        return fit


class _Metered:
    def __init__(self, f, disk: FakeDisk, path: str) -> None:
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        fit = self._disk.take(self._path, len(data))
        if fit is not None:
            self._f.write(data[:fit])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def disk(monkeypatch) -> FakeDisk:
    return FakeDisk(monkeypatch)


def _write_points(writes: list[tuple[str, int]]) -> list[tuple[int, str]]:
    """(free bytes that run out half-way through it, its file) for each run of consecutive writes to one file,
    and for the first row of each run of metrics rows (a row cut short right after a checkpoint, which the
    next process must not append to)."""
    points, offset, i = [], 0, 0
    while i < len(writes):
        j, size = i, 0
        while j < len(writes) and writes[j][0] == writes[i][0]:
            size += writes[j][1]
            j += 1
        name = Path(writes[i][0]).name
        if name == "metrics.jsonl" and j - i > 1:
            points.append((offset + writes[i][1] // 2, name))
        points.append((offset + size // 2, name))
        offset, i = offset + size, j
    return points


def test_disk_full_at_every_write_is_one_line_and_resumes(tmp_path, straight, disk, capsys):
    """Record every write of a run (config.json, metrics rows, two checkpoints, two plots), then fill the disk
    half-way through each (and before the first; :func:`_write_points`): one line naming the path, exit 2,
    every checkpoint written before intact, no temporary, no empty run directory. With space again,
    --resume auto ends each run that left a directory bit-identical to the uninterrupted one."""
    assert main(_flags(tmp_path, out_dir=disk.reset(tmp_path / "probe").root, save_every=6)) == 0
    points = [(0, "(run directory)")] + _write_points(disk.writes)
    names = [re.sub(r"^\.|\.tmp-\d+$", "", n) for _, n in points]
    assert names[1:] == ["config.json", "metrics.jsonl", "metrics.jsonl", "step_0000006.safetensors", "plot.png",
                         "metrics.jsonl", "metrics.jsonl", "step_0000012.safetensors", "plot.png"], points
    capsys.readouterr()
    for (free, _), name in zip(points, names):
        out = tmp_path / f"full-{free}"
        disk.reset(out, free=free)
        assert main(_flags(tmp_path, out_dir=out, save_every=6)) == 2, (free, name)
        err = _one_line(capsys.readouterr().err)
        assert re.match(rf"trueternary: error: cannot (write|write checkpoint|create run directory) {out}/", err), err
        assert err.endswith(": No space left on device\n"), err
        _assert_intact(out / "run")
        if not (out / "run").exists():  # failed before writing anything: nothing to continue
            assert name in ("(run directory)", "config.json"), (free, name)
            continue
        disk.free = None
        assert main(_flags(tmp_path, out_dir=out, save_every=6, resume="auto")) == 0, capsys.readouterr().err
        _assert_same_run(out / "run", straight)


def test_read_only_and_permission_denied(tmp_path, disk, capsys):
    """A read-only run folder (injected: root ignores chmod): resuming is one line naming the path, exit 2,
    every file unchanged; a fresh run under a read-only --out_dir creates nothing. No permission on
    checkpoints/ only: the save fails in one line and the previous checkpoint stays the newest, intact."""
    train(tiny_config(tmp_path, max_steps=STEPS, stop_at=6))
    run = tmp_path / "runs" / "run"
    before = _files(tmp_path / "runs")
    disk.reset(tmp_path / "runs", error=errno.EROFS)
    assert main(_flags(tmp_path, resume="auto")) == 2
    assert _one_line(capsys.readouterr().err) == \
        f"trueternary: error: cannot write {run / LOCK_FILE}: Read-only file system\n"
    assert main(_flags(tmp_path, run_name="other")) == 2
    assert _one_line(capsys.readouterr().err) == f"trueternary: error: cannot create run directory " \
                                                 f"{tmp_path / 'runs' / 'other'}: Read-only file system\n"
    assert _files(tmp_path / "runs") == before

    disk.reset(run / "checkpoints", error=errno.EACCES)
    assert main(_flags(tmp_path, resume="auto", save_every=3)) == 2
    assert _one_line(capsys.readouterr().err) == f"trueternary: error: cannot write checkpoint " \
                                                 f"{ckpt_io.checkpoint_path(run, 9)}: Permission denied\n"
    assert _newest_step(run) == 6
    _assert_intact(run)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions "
                    "(test_read_only_and_permission_denied injects the same failures)")
def test_unwritable_run_folder_by_permissions(tmp_path, capsys):
    train(tiny_config(tmp_path, max_steps=STEPS, stop_at=6))
    run = tmp_path / "runs" / "run"
    before = _files(run)
    for d in (run / "checkpoints", run):
        d.chmod(0o555)
    try:
        assert main(_flags(tmp_path, resume="auto")) == 2
        assert "Permission denied" in _one_line(capsys.readouterr().err)
    finally:
        for d in (run, run / "checkpoints"):
            d.chmod(0o755)
    assert _files(run) == before


def _private_tmpfs_works() -> bool:
    """``unshare --user --map-root-user --mount``: a private mount namespace without privileges, where a small
    tmpfs can be mounted and disappears with the process. Not every kernel or container allows it."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k none /tmp && test -w /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="no unprivileged mount namespace for a small tmpfs")
def test_real_full_tmpfs_and_read_only_remount(tmp_path):
    """The kernel's own ENOSPC and EROFS, from a small tmpfs in a private mount namespace: 12 KiB fills up at
    the first checkpoint (safetensors' own error type, turned into the documented one line, exit 2), leaving
    no temporary; the folder remounted read-only is refused in one line. test_disk_full_at_every_write_...
    covers every other write, by injection."""
    mnt, keep = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    keep.mkdir()
    run_cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "trueternary.cli",
                                          *_flags(tmp_path, out_dir=mnt, save_every=6)])
    sizes = ("12k",)
    steps = [f"mount -t tmpfs -o size={size} none {mnt}; {run_cmd} > {keep}/{size}.out 2> {keep}/{size}.err; "
             f"echo $? > {keep}/{size}.rc; cp -a {mnt} {keep}/{size}" + ("" if size == sizes[-1] else f"; umount {mnt}")
             for size in sizes]
    steps.append(f"mount -o remount,ro {mnt}; {run_cmd} --resume auto > {keep}/ro.out 2> {keep}/ro.err; "
                 f"echo $? > {keep}/ro.rc")
    script = "; ".join(steps)
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=_env(), timeout=300)
    outcomes = {}
    for size in sizes:
        rc, err = int((keep / f"{size}.rc").read_text()), (keep / f"{size}.err").read_text()
        outcomes[size] = (rc, err)
        assert rc == 0 or (rc == 2 and err.endswith(": No space left on device\n")), outcomes
        if rc == 2:
            assert re.match(rf"trueternary: error: cannot (write|write checkpoint|create run directory) {mnt}/",
                            _one_line(err)), err
        _assert_intact(keep / size / "run")
    assert outcomes["12k"][0] == 2 and "cannot write checkpoint" in outcomes["12k"][1], outcomes
    assert int((keep / "ro.rc").read_text()) == 2
    assert _one_line((keep / "ro.err").read_text()) == \
        f"trueternary: error: cannot write {mnt / 'run' / LOCK_FILE}: Read-only file system\n"


# ------------------------------------------------------------------------------------ flag bounds
@pytest.mark.parametrize("flags, message", [
    (["--seed", str(10**20)], "--seed must be at most 18446744073709551615, got 100000000000000000000"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--d_model", "1000000000"], "--d_model must be at most 65536"),
    (["--d_model", "65536", "--n_layers", "64"], "the run needs at least 1,244.8 GiB of memory"),
    (["--n_layers", "1000000"], "--n_layers must be at most 4096"),
    (["--n_heads", "8192"], "--n_heads must be at most 4096"),
    (["--ctx", "10000000"], "--ctx must be at most 1048576"),
    (["--batch_size", "10000000"], "--batch_size must be at most 1048576"),
    (["--group_size", "10000000"], "--group_size must be at most 1048576"),
    (["--eval_windows", "10000000"], "--eval_windows must be at most 1048576"),
    (["--max_steps", str(10**20)], "--max_steps must be at most 2147483647"),
    (["--stop_at", "0"], "--stop_at must be a positive integer"),
    (["--stop_at", str(2**31)], "--stop_at must be at most 2147483647"),
    (["--save_every", str(2**40)], "--save_every must be at most 2147483647"),
    (["--keep_checkpoints", str(2**40)], "--keep_checkpoints must be at most 2147483647"),
    (["--scale_update_interval", str(2**40)], "--scale_update_interval must be at most 2147483647"),
    (["--threads", "100000"], "--threads must be at most 1024"),
    (["--overwrite", "--resume", "auto"], "--overwrite starts a fresh run and --resume continues one"),
])
def test_out_of_bounds_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    if "60000" in flags and (machine_memory() or 0) > 108 * 2**30:
        pytest.skip("this machine has the memory for that model")
    assert main([*_flags(tmp_path), *flags]) == 2
    assert message in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_gpu_backend_without_cuda_is_refused_before_anything_is_written(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the gpu backend is valid here")
    assert main([*_flags(tmp_path), "--update_backend", "gpu"]) == 2
    assert "update backend 'gpu' needs a CUDA device" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_largest_seed_trains(tmp_path):
    """The seed's upper bound is what torch.manual_seed takes, and the whole run accepts it."""
    assert main([*_flags(tmp_path, max_steps=1), "--seed", str(2**64 - 1)]) == 0
