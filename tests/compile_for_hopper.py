"""Compile every Triton kernel the gpu backends launch, for a Hopper GPU, on a machine without one.

    pip install triton==3.6.0      # the GPU machine's Triton; any version you want to check
    python tests/compile_for_hopper.py

Run by tests/test_kernels_compile.py in a subprocess of its own: it replaces Triton's kernel launch and the
library's device probes (below) for the whole process, which must not leak into other tests.

Why: the CPU tests run the kernels in Triton's interpreter, which does not type-check or lower them; a
kernel can pass every interpreted test and still fail to compile on the GPU's Triton (seen: a bare
``1e-38`` literal typed fp64 by Triton 3.6; one variable with two shapes across an if/else). This script
patches kernel launches to compile for ``GPUTarget("cuda", 90, 32)`` (sm_90, with the ptxas shipped in
the Triton wheel) instead of running, then drives a few training steps of small models through the
``gpu`` and ``gpu-signcache`` backends with several rules, so every specialisation the library launches
is compiled once. The launches are collected first and compiled afterwards in one worker process per CPU
core (each compile is single-threaded Python and LLVM: about 2 s, over a minute for all of them on one core).
Exit code 1 if any kernel fails to compile.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

# Compiled kernels, not the interpreter (an inherited TRITON_INTERPRET=1, e.g. from the kernel tests' process,
# would make every launch below run interpreted): must be unset before Triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
          torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
          torch.float64: "fp64", torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = {"num_warps", "num_stages", "enable_fp_fusion", "num_ctas", "maxnreg"}
launched: dict = {}  # one entry per specialisation launched: key -> (fn, signature, constexprs, options)


def signature_of(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    sig, consts = {}, {}
    for p in fn.params:
        if p.name not in values:
            continue
        v = values[p.name]
        if p.is_constexpr or v is None:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return sig, consts


def record_launch(fn: JITFunction, args: tuple, kwargs: dict) -> None:
    sig, consts = signature_of(fn, args, kwargs)
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
           tuple(sorted(options.items())))
    launched.setdefault(key, (fn, sig, consts, options))


def compile_one(i: int) -> tuple[int, str | None]:
    """Compile the i-th launched specialisation (in a worker: ``launched`` is inherited through fork);
    None, or the last line of the compiler's error."""
    fn, sig, consts, options = list(launched.values())[i]
    try:
        triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=options)
        return i, None
    except Exception as e:  # report every failing specialisation, keep going
        lines = str(e).strip().splitlines()
        return i, "\n".join(lines[-12:]) if lines else repr(e)


def compile_all() -> list[tuple[str, dict, str]]:
    """Compile every launched specialisation, one worker per core, the longest kernels first; print one line
    each, in launch order. (name, constexprs, error) of each failure."""
    specs = list(launched.values())
    order = sorted(range(len(specs)), key=lambda i: -len(specs[i][0].src))
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  len(specs)) or 1
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = dict(pool.imap_unordered(compile_one, order))
    else:
        results = dict(map(compile_one, order))
    errors = []
    for i, (fn, _, consts, _) in enumerate(specs):
        shown = {k: v for k, v in consts.items() if v is not None}
        if results[i] is None:
            print(f"ok    {fn.__name__} {shown}")
        else:
            errors.append((fn.__name__, shown, results[i].splitlines()[-1]))
            print(f"FAIL  {fn.__name__} {shown}\n      " + results[i].replace("\n", "\n      "))
    return errors


def patch() -> None:
    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: record_launch(self, a, k))
    torch.cuda.is_available = lambda: True  # let FlipOptimizer accept the gpu backends
    import trueternary.ops.linear as linear
    import trueternary.ops.triton_utils as tu

    linear.kernels_can_run = lambda t: True
    tu.sm_count = lambda device=None: 132
    for mod in list(sys.modules.values()):  # take the GPU code paths (bf16 tensor-core dots, no upcast)
        if getattr(mod, "__name__", "").startswith("trueternary") and hasattr(mod, "upcast_dot"):
            mod.upcast_dot = lambda t: False
        if getattr(mod, "__name__", "").startswith("trueternary") and hasattr(mod, "kernels_can_run"):
            mod.kernels_can_run = lambda t: True


def drive() -> None:
    import trueternary.ops.votes as votes
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe
    from trueternary.rule import FlipRule

    rules = [FlipRule(), FlipRule.naive(), FlipRule(norm_block=128, decay=0.01, leak=2), FlipRule(norm_block=32)]
    fused_max = votes.VOTES_FUSED_MAX_TOKENS
    for backend, votes_impl, device_lr in (("gpu", "fused", False), ("gpu-signcache", "fused", False),
                                           ("gpu", "gemm", False), ("gpu-signcache", "gemm", False),
                                           ("gpu", "fused", True), ("gpu", "gemm", True)):
        # 'gemm': the vote kernel reading cuBLAS's gW (the batch here is below the auto threshold);
        # device_lr: the lr read from the device (CUDA-graphed steps, Recipe.use_cuda_graph)
        votes.VOTES_FUSED_MAX_TOKENS = fused_max if votes_impl == "fused" else 0
        for rule in rules:
            for autocast in (False, True):
                base = build_model("transformer", seed=0, ctx=33, d_model=128, n_layers=1, n_heads=4)
                r = build_recipe("TrueTernary", base, Hparams(steps=4, rule=rule), backend=backend)
                r.flip.check_finite = False  # outputs are garbage here: kernels are compiled, not run
                if device_lr:
                    r.flip.use_device_lr("cpu")
                x = torch.randint(0, 256, (4, 33))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    for _ in range(2):
                        r.model(x).float().logsumexp(-1).mean().backward()
                        r.flip.step()


def main() -> int:
    torch.set_num_threads(1)  # the drive's tensors are tiny; and no OpenMP threads are running at the fork
    patch()
    drive()
    errors = compile_all()
    print(f"\ncompiled {len(launched)} kernel specialisations for sm_90 with Triton {triton.__version__}: "
          f"{len(errors)} failed")
    for name, consts, last in errors:
        print(f"  {name} {consts}: {last[:300]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
