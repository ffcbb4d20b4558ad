"""What every benchmark shares: burn-in then timed repeats (median), throughput and ratios against a baseline,
sections that survive each other's failures under a time budget, and the results as one JSON file.

A benchmark script imports it by name (``from harness import ...``; the scripts in this folder find it beside
them, the ones under ``experiments/`` put this folder on ``sys.path`` first). In the style of nanoGPT's
bench.py: the first calls of a step are burn-in (kernel compilation, allocator growth, autotuning) and are not
timed; the reported number is the median over the timed calls, as ms per call and, for training steps,
tokens per second.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ command line


def add_out_arg(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the results go (default ``$OUT``, else ``./out``)."""
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT or ./out)")


def out_dir(parser: argparse.ArgumentParser, path: str) -> Path:
    """``path`` created if missing; a usage error (one line, exit 2) when it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create --out {path}: {e.strerror or e}")
    return out


def smoke_or_cuda(smoke: bool, name: str) -> None:
    """A script's ``--smoke`` runs its kernels in Triton's CPU interpreter (set before Triton is first imported:
    call this before importing trueternary's kernels); without it, no CUDA device is a one-line error, exit 2."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(f"{name}: error: no CUDA device (use --smoke for a CPU check of the script)", file=sys.stderr)
        sys.exit(2)


def require_cuda(parser: argparse.ArgumentParser, what: str = "it times GPU kernels") -> None:
    """A usage error (one line, exit 2) on a machine without a CUDA device."""
    if not torch.cuda.is_available():
        parser.error(f"needs a CUDA device ({what})")


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cleanup(device: torch.device | str) -> None:
    """Free what the previous measurement left (Python garbage, the allocator's cached blocks)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def step_ms(step: Callable[[], object], *, warmup: int, repeats: int, device: torch.device | str) -> list[float]:
    """Host milliseconds of each of ``repeats`` calls of ``step()`` after ``warmup`` untimed calls (burn-in).

    The device is synchronised before and after every call, so a call's time is what a training loop that
    reads its loss waits for: GPU time plus whatever host work the GPU waited on."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def event_ms(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device | str) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls, between two CUDA
    events recorded around the call (its stream's time, launch gaps included); host time on a CPU."""
    if torch.device(device).type != "cuda":
        return step_ms(fn, warmup=warmup, repeats=repeats, device=device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def kernel_ms(fn: Callable[[], object], *, device: torch.device | str, graph: bool = False) -> float:
    """Median GPU milliseconds of one call of ``fn()``: ``triton.testing.do_bench`` (L2 flushed between calls)
    or, with ``graph``, per replay of a CUDA graph of it (``do_bench_cudagraph``: launch cost removed). On a
    CPU (smoke runs, Triton's interpreter: nothing to warm up) one call timed: a number that only shows the
    script ran."""
    if torch.device(device).type != "cuda":
        return statistics.median(step_ms(fn, warmup=0, repeats=1, device=device))
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def summary(ms: list[float], tokens_per_call: int | None = None) -> dict:
    """Median and minimum of per-call times; calls/s and, given the tokens of one call, tokens/s (at the median)."""
    med = statistics.median(ms)
    row = {"median_ms": med, "min_ms": min(ms), "repeats": len(ms), "steps_per_s": 1e3 / med}
    if tokens_per_call is not None:
        row["tokens_per_s"] = tokens_per_call / med * 1e3
    return row


def speedup(baseline_ms: float, ms: float) -> float:
    """How many times faster than the baseline (its time over this one's): > 1 is faster."""
    return baseline_ms / ms


# Kernel classes of a profile, by kernel name (first match wins).
KERNEL_CLASSES = [
    ("ternary kernels (ours)", ("_ternary_matmul", "_matmul_votes", "_gw_stats", "_gw_votes", "_scale_votes", "_flip",
                                "_dequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    # torch.compile: Inductor's generated kernels (their names hold 'fused_', which the optimizer class below matches)
    ("compiled shared ops (inductor)", ("triton_poi_", "triton_red_", "triton_per_", "triton_tem_")),
    ("GEMM (cuBLAS)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "splitk")),
    ("optimizer (foreach/fused)", ("multi_tensor", "foreach", "adam", "fused_")),
    ("reductions", ("reduce", "norm")),
]


def profile_kernels(step: Callable[[], object], *, steps: int, device: torch.device | str, top: int = 25) -> dict:
    """GPU time per call of ``step()`` by kernel class (:data:`KERNEL_CLASSES`, torch.profiler over ``steps``
    calls; burn in first), the kernel launches per call and the ``top`` kernels: where a step's time goes. Eager
    calls only: a CUDA graph's replay hides its kernels from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = (time.perf_counter() - t) * 1e3 / steps
    per_kernel: dict[str, list] = {}
    for e in prof.events():
        # record_function ranges are mirrored on the GPU timeline as user annotations (Optimizer.step#AdamW.step,
        # trueternary.flips): spans over kernels counted on their own, not kernels
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False) and "#" not in e.name:
            k = per_kernel.setdefault(e.name, [0.0, 0])
            k[0] += e.time_range.elapsed_us() / 1e3 / steps
            k[1] += 1
    classes: dict[str, float] = {}
    for kname, (ms, _) in per_kernel.items():
        low = kname.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "elementwise and other")
        classes[cls] = classes.get(cls, 0.0) + ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"profiled_wall_ms_per_step": wall, "gpu_busy_ms_per_step": sum(classes.values()),
            "launches_per_step": sum(n for _, n in per_kernel.values()) / steps,
            "ms_per_step_by_class": classes,
            "top_kernels": [{"kernel": k[:120], "ms_per_step": v[0], "launches_per_step": v[1] / steps}
                            for k, v in ranked]}


def describe_profile(prof: dict) -> str:
    """One line of :func:`profile_kernels`' result: busy time of wall time, then each class, largest first."""
    classes = sorted(prof["ms_per_step_by_class"].items(), key=lambda kv: -kv[1])
    return (f"busy {prof['gpu_busy_ms_per_step']:.1f} ms of {prof['profiled_wall_ms_per_step']:.1f} ms/step, "
            f"{prof['launches_per_step']:.0f} kernels: "
            + ", ".join(f"{c} {v:.1f}" for c, v in classes))


# ------------------------------------------------------------------------------------------------ results


def env_info(device: torch.device | str) -> dict:
    """The software and the device a result was measured with."""
    info = {"torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
    return info


def write_json(path: Path, obj) -> Path:
    """``obj`` as indented JSON at ``path``, written to a temporary file first, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


class Bench:
    """A benchmark run: named sections under a time budget, their rows and errors, saved to ``out/<name>.json``.

    A section that raises is recorded in ``res["errors"]`` (with its traceback) and the next one still runs; a
    section that starts after the budget is spent is skipped and recorded as such. The JSON is rewritten after
    every section, so a killed run keeps what it measured."""

    def __init__(self, name: str, out: Path, budget: float, device: torch.device | str):
        self.name, self.out, self.budget, self.device = name, Path(out), budget, device
        self.t0 = time.time()
        self.res: dict = {"env": env_info(device), "errors": []}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def out_of_time(self, reserve: float = 0.0) -> bool:
        """Whether less than ``reserve`` seconds of the budget are left."""
        return self.elapsed() > self.budget - reserve

    def add(self, key: str, row: dict) -> dict:
        self.res.setdefault(key, []).append(row)
        return row

    def error(self, section: str, message: str) -> None:
        self.res["errors"].append({"section": section, "error": message})
        print(f"[{section}] {message}", file=sys.stderr)

    @contextmanager
    def section(self, name: str):
        """``with bench.section(name) as go: if go: ...``; ``go`` is False once the budget is spent."""
        t = time.time()
        if self.out_of_time():
            self.error(name, "skipped: time budget reached")
            yield False
            return
        try:
            yield True
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            self.res["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}"[:2000],
                                       "traceback": traceback.format_exc()[-3000:]})
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        finally:
            cleanup(self.device)
        print(f"[{name}] {time.time() - t:.1f}s (total {self.elapsed():.0f}s)", file=sys.stderr)
        self.save()

    def finish(self, print_table: Callable[[], None]) -> int:
        """Save the results, print the table and where they went; the exit status: 1 if a section failed, else 0."""
        path = self.save()
        print_table()
        print(f"wrote {path}", file=sys.stderr)
        return 1 if self.res["errors"] else 0

    def save(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return write_json(self.out / f"{self.name}.json", self.res)
