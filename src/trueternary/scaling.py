"""Memory of training one model size, measured: peak memory split into state, activations and transients.

    python -m trueternary.scaling --sizes 151M,1.2B,6.4B --batch 8 --ctx 2048 --device cuda \\
        [--config TrueTernary] [--activation_checkpointing] [--update_backend auto] [--json FILE]

Each size is measured in a fresh process, so that no peak of one size leaks into the next:

    build        the peak while the recipe is built (a lazy model, ternarised layer by layer on the device:
                 trueternary.init), and the host's peak resident memory meanwhile
    state        what stays allocated after a training step: the model's state, the optimiser's, and whatever
                 else persists between steps
    activations  what a training forward and its loss add to that: what autograd keeps for backward
    transients   the rest of the step's peak (peak = state + activations + transients): backward's
                 temporaries (one layer's weight gradient and dequantised weight, its votes, a recomputed
                 block under activation checkpointing) and the forward's

The steps are eager (``Recipe.train_step``; no CUDA graph, which keeps a step's memory allocated between steps),
with bf16 autocast on CUDA as ``trueternary train`` runs them. On CUDA the numbers are the caching allocator's
(``torch.cuda.memory_allocated`` / ``max_memory_allocated``): bytes of live tensors. On the CPU they are the
process's resident memory (VmRSS, VmHWM), with glibc told to return every allocation of 64 KiB or more at
once (``MALLOC_MMAP_THRESHOLD_``), so that resident memory follows the live tensors to within a few MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys

import torch

from . import memory

# Named sizes: (d_model, n_layers); heads of 128. Weights: 12 * d**2 per block plus 2 * 288 * d.
SIZES = {
    "151M": (1024, 12), "1.2B": (2048, 24), "3B": (2816, 32), "6.4B": (4096, 32), "13B": (5120, 40),
    "20B": (6144, 44),
}
HEAD_DIM = 128
_SHAPE = re.compile(r"^d?(\d+)x(\d+)$")  # a custom size: D x L, e.g. 1024x12 or d1024x12
MMAP_THRESHOLD = 65536  # bytes: the CPU measurements' glibc MALLOC_MMAP_THRESHOLD_


def parse_size(name: str) -> tuple[int, int]:
    """(d_model, n_layers) of a named size (:data:`SIZES`) or of ``DxL``; ValueError otherwise."""
    if name in SIZES:
        return SIZES[name]
    m = _SHAPE.match(name)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"unknown size {name!r}: one of {', '.join(SIZES)}, or d_model x n_layers like 1024x12")
    return int(m.group(1)), int(m.group(2))


def model_shape(d_model: int, n_layers: int) -> dict:
    """The transformer shape of a size: heads of :data:`HEAD_DIM` (one head below that width)."""
    return dict(d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // HEAD_DIM))


def _resident(device: torch.device) -> int:
    """Bytes held now: the allocator's live tensors on CUDA, the process's resident memory on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmRSS (the CPU measurements need Linux)")


def measure(d_model: int, n_layers: int, batch: int, ctx: int, device: torch.device | str = "cpu",
            config: str = "TrueTernary", activation_checkpointing: bool = False, update_backend: str = "auto",
            seed: int = 0, threads: int = 0, lazy: bool = True, build_only: bool = False) -> dict:
    """Build ``config`` for the transformer of this size on ``device`` and run two training steps on random
    bytes, in this process; return the build's peaks and the second step's split (module docstring), in bytes.
    Everything this process allocated before counts in the CPU's peaks: measure in a fresh process.
    ``threads``: CPU threads (0: torch's default; 1 on a busy machine, where OpenMP threads wait for each other).
    ``lazy=False`` builds the float model first (the path without trueternary.init), for comparison;
    ``build_only`` stops after the build (no steps)."""
    from .models import build_model
    from .recipes import Hparams, build_recipe
    from .vocab import VOCAB_SIZE

    device = torch.device(device)
    cpu = torch.device("cpu")
    autocast = device.type == "cuda"
    if threads:
        torch.set_num_threads(threads)
    # A tiny model through the same code first: what loads on first use (modules, kernels, the allocator's
    # first blocks) is then not counted as this size's
    warm = build_recipe(config, build_model("transformer", seed=seed, lazy=True, ctx=8, d_model=64, n_layers=1,
                                            n_heads=1, activation_checkpointing=activation_checkpointing),
                        Hparams(steps=10), device=device, backend=update_backend, seed=seed)
    for _ in range(2):
        warm.train_step(torch.zeros(2, 8, dtype=torch.long, device=device),
                        torch.zeros(2, 8, dtype=torch.long, device=device), autocast)
    del warm
    gc.collect()
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, VOCAB_SIZE, (batch, ctx), generator=g).to(device) for _ in range(2))
    start, start_host = _resident(device), _resident(cpu)
    memory.reset_peak(device)
    memory.reset_peak(cpu)
    base = build_model("transformer", seed=seed, lazy=lazy, activation_checkpointing=activation_checkpointing,
                       ctx=ctx, **model_shape(d_model, n_layers))
    recipe = build_recipe(config, base, Hparams(steps=10), device=device, backend=update_backend, seed=seed)
    del base
    out = {"d_model": d_model, "n_layers": n_layers, "batch": batch, "ctx": ctx, "config": config,
           "device": str(device), "activation_checkpointing": activation_checkpointing, "lazy": lazy,
           "build_peak": memory.peak(device) - start, "build_host_peak": memory.peak(cpu) - start_host}
    report = recipe.state_report()
    out["weights"] = report["ternary_weights"] or report["float_params"]
    out["state_formula"] = report["training_state_bytes"]
    out["built"] = _resident(device) - start
    if build_only:
        return out

    recipe.train_step(x, y, autocast)  # the first step: the optimiser's state appears, kernels compile
    before = _resident(device)
    after_forward = []
    loss = recipe.loss

    def loss_then_measure(*args, **kwargs):
        value = loss(*args, **kwargs)
        after_forward.append(_resident(device))
        return value

    recipe.loss = loss_then_measure
    memory.reset_peak(device)
    recipe.train_step(x, y, autocast)
    peak = memory.peak(device)
    out["state"] = before - start
    out["activations"] = after_forward[0] - before
    out["transients"] = peak - after_forward[0]
    out["step_peak"] = peak - start
    return out


def measure_in_subprocess(d_model: int, n_layers: int, batch: int, ctx: int, device: str = "cpu",
                          config: str = "TrueTernary", activation_checkpointing: bool = False,
                          update_backend: str = "auto", seed: int = 0, threads: int = 0, lazy: bool = True,
                          build_only: bool = False, timeout: float | None = None) -> dict:
    """:func:`measure` in a fresh Python process (the CPU's with glibc's mmap threshold set: module docstring);
    a failure there (out of memory, say) comes back as ``{"error": "..."}``."""
    args = dict(d_model=d_model, n_layers=n_layers, batch=batch, ctx=ctx, device=device, config=config,
                activation_checkpointing=activation_checkpointing, update_backend=update_backend, seed=seed,
                threads=threads, lazy=lazy, build_only=build_only)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, "-m", "trueternary.scaling", "--in_process", json.dumps(args)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**args, "error": f"timed out after {timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = done.stderr.strip().splitlines()
    return {**args, "error": err[-1][:300] if err else f"exit status {done.returncode}"}


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB" if b < 10 * 2**30 else f"{b / 2**30:,.1f} GiB"


def table(rows: list[dict]) -> str:
    """Markdown table of :func:`measure` results."""
    head = ("| size (d x layers) | weights | config | batch x ctx | checkpointing | build peak | build host peak "
            "| state (B/weight) | activations | transients | step peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        size = f"{r['d_model']} x {r['n_layers']}" + ("" if r.get("lazy", True) else " (eager build)")
        common = f"| {size} | {{w}} | {r['config']} | {r['batch']} x {r['ctx']} | " \
                 f"{'on' if r['activation_checkpointing'] else 'off'} |"
        if "error" in r:
            lines.append(common.format(w="") + f" {r['error']} | | | | | |")
            continue
        weights = f"{r['weights'] / 1e9:.3g}B" if r["weights"] >= 1e9 else f"{r['weights'] / 1e6:.3g}M"
        built = f" {_mib(r['build_peak'])} | {_mib(r['build_host_peak'])} |"
        if "state" not in r:  # build only: the built model's state instead of a step's
            lines.append(common.format(w=weights) + built + f" {_mib(r['built'])} ({r['built'] / r['weights']:.2f}) "
                         "| | | |")
            continue
        lines.append(common.format(w=weights) + built + f" {_mib(r['state'])} ({r['state'] / r['weights']:.2f}) | "
                     f"{_mib(r['activations'])} | {_mib(r['transients'])} | {_mib(r['step_peak'])} |")
    return "\n".join(lines)


EXIT_SIZES_FAILED = 3  # a size failed (out of memory, say); the others are reported


def main(argv: list[str] | None = None) -> int:
    from .backends import resolve_backend
    from .errors import UsageError
    from .flags import Parser, resolve_device
    from .models import TransformerConfig
    from .recipes import CONFIG_NAMES

    p = Parser(prog="python -m trueternary.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="151M", help=f"comma list: {', '.join(SIZES)}, or DxL (d_model x n_layers)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="bytes per sequence (default 512)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--config", default="TrueTernary", choices=CONFIG_NAMES, help="training configuration")
    p.add_argument("--activation_checkpointing", "--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward")
    p.add_argument("--update_backend", "--update-backend", default="auto", help="vote/flip backend (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's; 1 on a busy machine)")
    p.add_argument("--eager_build", "--eager-build", action="store_true",
                   help="build the float model first, then the recipe from it (the path without lazy models), "
                        "for comparison")
    p.add_argument("--build_only", "--build-only", action="store_true", help="measure the build only (no steps)")
    p.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    p.add_argument("--in_process", metavar="ARGS", help=argparse.SUPPRESS)  # one measure(**json) here
    args = p.parse_args(argv)
    if args.in_process is not None:
        print(json.dumps(measure(**json.loads(args.in_process))))
        return 0
    try:
        try:
            sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
        except ValueError as e:
            raise UsageError(str(e)) from None
        if not sizes:
            raise UsageError("--sizes is empty")
        if args.threads < 0:
            raise UsageError(f"--threads must be an integer >= 0, got {args.threads}")
        for name in ("batch", "ctx"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
        resolve_device(args.device)
        try:
            resolve_backend(args.update_backend)
            for d, n in sizes:
                TransformerConfig(ctx=args.ctx, **model_shape(d, n))
        except ValueError as e:
            raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"trueternary.scaling: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for d, n in sizes:
        rows.append(measure_in_subprocess(d, n, args.batch, args.ctx, args.device, args.config,
                                          args.activation_checkpointing, args.update_backend, args.seed,
                                          args.threads, not args.eager_build, args.build_only))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # progress: one row per size
    print(table(rows))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        except OSError as e:
            print(f"trueternary.scaling: error: cannot write {args.json}: {e.strerror}", file=sys.stderr)
            return 2
    return 0 if all("error" not in r for r in rows) else EXIT_SIZES_FAILED


if __name__ == "__main__":
    sys.exit(main())
