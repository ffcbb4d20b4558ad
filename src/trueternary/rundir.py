"""The run directory ``<out_dir>/<run_name>/``: who holds it, what it holds, the metrics log and the plot.

    config.json          the run's TrainConfig, model config, hyper-parameters, data and device
    metrics.jsonl        one JSON object per logged step ({"step", "loss", "train_bpb", "lr", "flips",
                         "tokens_per_s", "elapsed_s"}, and "comm_*" bytes under data parallelism) and per
                         evaluation ({"step", "val_bpb", "peak_memory_bytes"}: this rank's CUDA allocator peak,
                         or the process RSS peak on CPU)
    plot.png             training loss and validation bits per byte against step
    checkpoints/         step_<NNNNNNN>.safetensors (see trueternary.checkpoint); the newest
                         ``keep_checkpoints`` are kept
    tensorboard/         event files, only when the optional ``tensorboard`` package is installed
    .lock                locked (flock) by the process that runs in the directory, and naming it
                         (:class:`RunDirectory`): one process per run directory
    replaced-<time>/     the files of an earlier run, moved here by ``--overwrite``

Every file is written atomically or appended line by line; a write that fails raises ``WriteError`` naming the
file (trueternary.checkpoint.write_error).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import socket
import time
from pathlib import Path

from . import checkpoint as ckpt_io
from . import distributed
from .errors import UsageError

LOCK_FILE = ".lock"
# What a run writes into its directory: finding any of these, a fresh run refuses to start (or, with
# --overwrite, moves them into REPLACED_PREFIX<time>/).
RUN_FILES = ("config.json", "metrics.jsonl", "plot.png", ckpt_io.CHECKPOINT_DIR, "tensorboard")
REPLACED_PREFIX = "replaced-"


class RunDirectory:
    """A run directory, held by one process for the run's life (rank 0 of a data-parallel run).

    ``<run_dir>/.lock`` is locked with ``flock`` and names its holder (pid, host, start time): a second
    process is refused with a one-line error naming it, before it writes anything. The kernel releases the
    lock when the holder exits, however it exits (SIGKILL included), so a killed run never blocks the next.
    If the run fails before writing anything, :meth:`abandon` removes the lock file and the directories
    this process created, so no empty run directory is left behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._created: list[Path] = []  # directories this process made, outermost first
        self._lock_fd: int | None = None
        self._lock_created = False

    @classmethod
    def claim(cls, out_dir: str, run_name: str | None, config_name: str) -> RunDirectory:
        """Create (if needed) and lock ``<out_dir>/<run_name>``; with no ``run_name``, a new directory
        ``<config>-<date>-<time>[-N]`` (created with ``mkdir``, which fails if another process took the name)."""
        if run_name is None:
            base = f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            self = cls(Path(out_dir) / base)
            self._make_dirs(self.path.parent)
            for i in itertools.count(1):
                self.path = Path(out_dir) / (base if i == 1 else f"{base}-{i}")
                try:
                    self.path.mkdir()
                except FileExistsError:
                    continue
                except OSError as e:
                    self.abandon()
                    raise ckpt_io.write_error(self.path, e, "create run directory") from None
                self._created.append(self.path)
                break
        else:
            self = cls(Path(out_dir) / run_name)
            self._make_dirs(self.path)
        try:
            self._lock()
        except BaseException:
            self.abandon()
            raise
        return self

    def _make_dirs(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._created = [d for d in reversed(missing) if d.is_dir()]
            self.abandon()
            raise ckpt_io.write_error(path, e, "create run directory") from None
        self._created += reversed(missing)

    def _lock(self) -> None:

        path = self.path / LOCK_FILE
        while True:
            existed = path.exists()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ckpt_io.write_error(path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise UsageError(f"{self.path} is in use by another training run ({holder}); wait for it "
                                 "to end, or choose another --run_name") from None
            except OSError as e:  # e.g. a file system without locks
                os.close(fd)
                raise ckpt_io.write_error(path, e, "lock") from None
            try:  # the file locked must still be the one at the path (abandon() of another run may remove it)
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd, self._lock_created = fd, not existed
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, "
                         f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError as e:
            raise ckpt_io.write_error(path, e) from None

    def run_files(self) -> list[str]:
        return [n for n in RUN_FILES if (self.path / n).exists()]

    def check_fresh(self, overwrite: bool) -> None:
        """A fresh run starts only in a directory without another run's files; ``overwrite`` moves them into
        ``replaced-<time>/`` (nothing is deleted)."""

        found = self.run_files()
        if not found:
            return
        ckpts = ckpt_io.list_checkpoints(self.path)
        held = ", ".join(n for n in found if n != ckpt_io.CHECKPOINT_DIR) or "checkpoints/"
        held += f"; {len(ckpts)} checkpoint(s), the newest {ckpts[-1].name}" if ckpts else "; no checkpoint"
        if not overwrite:
            raise UsageError(f"{self.path} already holds a run ({held}); continue it with --resume auto, "
                             "move its files aside with --overwrite, or choose another --run_name")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path / f"{REPLACED_PREFIX}{stamp}"
        i = 1
        while dest.exists():
            i += 1
            dest = self.path / f"{REPLACED_PREFIX}{stamp}-{i}"
        try:
            dest.mkdir()
            for n in found:
                os.rename(self.path / n, dest / n)
        except OSError as e:
            raise ckpt_io.write_error(dest, e, "move the previous run's files to") from None
        distributed.say(f"--overwrite: moved the previous run's files ({', '.join(found)}) to {dest}/")

    def check_resumed(self, step: int) -> None:
        """Resuming step ``step`` here must not go back behind a newer checkpoint of this directory."""

        newest = ckpt_io.latest_checkpoint(self.path)
        if newest is not None and ckpt_io.checkpoint_step(newest) > step:
            raise UsageError(f"{self.path} has a newer checkpoint ({newest.name}) than the one resumed "
                             f"(step {step}); resume into another --run_name to branch off")

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Held until the run ends; a run that fails gives it up with :meth:`abandon`."""
        if exc_type is not None:
            self.abandon()
        else:
            self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    def abandon(self) -> None:
        """After a failure: remove the lock file if this process created it, and the directories it created if
        they hold nothing else; then release the lock. A run that wrote nothing leaves nothing behind."""
        if self._lock_fd is not None and self._lock_created:
            ckpt_io._remove_quietly(self.path / LOCK_FILE)  # (while still locked: see the inode check in _lock)
            self._lock_created = False
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if empty
            except FileNotFoundError:
                continue
            except OSError:
                break
        self._created = []
        self.release()


class RunLog:
    """metrics.jsonl (and TensorBoard when installed) of one run directory."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.failed = False
        if self.path.exists():
            # Keep the rows up to the resumed step (none, for a fresh run): later ones are recomputed. A row
            # cut short by a kill or a full disk does not parse and is dropped with them; the file is rewritten
            # if its last line lacks its newline, so the next row starts on a line of its own.
            raw = self.path.read_bytes()
            rows = [ln for ln in raw.decode(errors="replace").splitlines() if ln.strip()]
            keep = [ln for ln in rows if start_step and 0 <= _row_step(ln) <= start_step]
            if len(keep) != len(rows) or (raw and not raw.endswith(b"\n")):
                ckpt_io.atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
        try:
            self.file = open(self.path, "a")
        except OSError as e:
            raise ckpt_io.write_error(self.path, e) from None
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except Exception:  # ImportError without tensorboard; anything else must not stop training
            self.tb = None

    def write(self, row: dict) -> None:
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            self.failed = True
            raise ckpt_io.write_error(self.path, e) from None
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            if not self.failed:  # (after a failed write, closing retries the same bytes: already reported)
                raise ckpt_io.write_error(self.path, e) from None
        if self.tb is not None:
            self.tb.close()



def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue  # a line cut by a crash
    return out


def plot_run(run_dir: str | os.PathLike, title: str = "") -> Path:
    """plot.png: training loss (bits/byte, raw and smoothed) and validation bpb against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["train_bpb"]) for r in rows if "train_bpb" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        xs, ys = zip(*train)
        k = max(1, len(ys) // 40)
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(xs, smooth, color="tab:blue", label="training loss (bits/byte, smoothed)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="tab:orange", label=f"validation (final {ys[-1]:.3f} bits/byte)")
    ax.axhline(math.log2(288), color="grey", ls=":", label="uniform over 288 tokens (8.17)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "plot.png"
    ckpt_io.atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out



def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON, written atomically."""
    ckpt_io.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))

