#!/usr/bin/env python3
"""Is a CUDA-graphed TrueTernary step the same computation as the eager one? (issue 19)

For each scaled-dot-product-attention backend, from one model state and one batch: two eager runs of K steps
(eager vs eager: is the step itself deterministic?) and one graph-replayed run of K steps (graph vs eager).
Compares every tensor of the model's state (T_packed, T_accum, E, E_accum) and the optimiser's codes, and times
graph replays. CUDA only.

    python3 experiments/cuda_graph_exactness/run.py [--setting 151M|small] [--compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from trueternary import determinism  # noqa: E402
from trueternary.models import transformer as tmod  # noqa: E402
from trueternary.models.transformer import ByteTransformer, TransformerConfig  # noqa: E402
from trueternary.recipes import Hparams, build_recipe  # noqa: E402

SETTINGS = {"151M": (dict(ctx=512, d_model=1024, n_layers=12, n_heads=16), 32),
            "d1024-short": (dict(ctx=128, d_model=1024, n_layers=2, n_heads=16), 16),
            "d256-long": (dict(ctx=512, d_model=256, n_layers=2, n_heads=4), 32),
            "small": (dict(ctx=128, d_model=256, n_layers=4, n_heads=4), 16)}
BACKENDS = ("default", "math", "flash", "efficient", "cudnn")


def set_sdpa(name: str) -> None:
    if name == "default" and determinism.enabled():
        return  # determinism.enable() chose the kernels
    b = torch.backends.cuda
    on = {"default": ("flash", "efficient", "cudnn", "math"), "math": ("math",), "flash": ("flash",),
          "efficient": ("efficient",), "cudnn": ("cudnn",)}[name]
    b.enable_flash_sdp("flash" in on)
    b.enable_mem_efficient_sdp("efficient" in on)
    b.enable_cudnn_sdp("cudnn" in on)
    b.enable_math_sdp("math" in on)


def state(r) -> dict:
    s = {k: v.clone() for k, v in r.model.state_dict().items()}
    for i, st in r.flip.state_dict()["state"].items():
        for c, v in st.items():
            if torch.is_tensor(v):
                s[f"opt.{i}.{c}"] = v.clone()
    return s


def compare(a: dict, b: dict) -> dict:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    acc = [k for k in a if k.endswith("T_accum")]
    frac = sum(int((a[k] != b[k]).sum()) for k in acc) / max(1, sum(a[k].numel() for k in acc))
    return {"tensors": len(a), "tensors_differing": len(differ), "T_accum_mismatch_fraction": frac,
            "codes_differing": sum(k.startswith("opt.") for k in differ), "first_differing": differ[:5]}


def copies(setting: str, compile_ops: bool, update_backend: str, n: int):
    """(x, y, n TrueTernary recipes built from one base model): one batch and n identical starting points."""
    cfg, batch = SETTINGS[setting]
    torch._dynamo.reset()
    tmod._COMPILED_OPS.clear()
    base = ByteTransformer(TransformerConfig(**cfg), generator=torch.Generator().manual_seed(1234))
    base.use_compiled_ops(compile_ops)
    seq = torch.randint(0, 256, (batch, cfg["ctx"] + 1), generator=torch.Generator().manual_seed(99)).cuda()
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    rs = [build_recipe("TrueTernary", base, Hparams(steps=1000), device="cuda", backend=update_backend, seed=0)
          for _ in range(n)]
    return x, y, rs


def one(setting: str, backend: str, compile_ops: bool, k: int) -> dict:
    set_sdpa(backend)
    x, y, rs = copies(setting, compile_ops, "gpu", 3)
    for r in rs:
        r.flip.check_finite = False
        r.train_step(x, y, True)  # kernels compiled, device step counter exists (as bench_e2e does)
    start = [state(r) for r in rs]
    same_start = compare(start[0], start[1])["tensors_differing"] + compare(start[0], start[2])["tensors_differing"]
    g, e1, e2 = rs
    g.use_cuda_graph(x, y, True)
    for r in (e1, e2):
        r.flip.use_device_lr(torch.device("cuda"))
    for _ in range(k):
        g.train_step(x, y, True)
        e1.train_step(x, y, True)
        e2.train_step(x, y, True)
    sg, s1, s2 = state(g), state(e1), state(e2)
    ms = []
    for _ in range(3):
        g.train_step(x, y, True)
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.train_step(x, y, True)
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t) * 1e3)
    from trueternary.ops import votes
    out = {"setting": setting, "sdpa": backend, "compile": compile_ops, "steps": k,
           "fused_max_tokens": votes.VOTES_FUSED_MAX_TOKENS,
           "deterministic": torch.are_deterministic_algorithms_enabled(),
           "start_states_differing_after_first_eager_step": same_start,
           "eager_vs_eager": compare(s1, s2), "graph_vs_eager": compare(sg, s1),
           "graph_ms_median": statistics.median(ms)}
    del rs, g, e1, e2
    torch.cuda.empty_cache()
    return out


def localize(setting: str, compile_ops: bool, backend: str = "gpu") -> dict:
    """Two recipes from one state, one forward + backward each: where do they first differ? Block outputs in
    forward, block output gradients in backward, each layer's T_accum/E_accum after the backward's votes."""
    x, y, rs = copies(setting, compile_ops, backend, 2)
    rec = [{}, {}]
    for i, r in enumerate(rs):
        r.flip.check_finite = False
        for name, m in r.model.named_modules():
            if name.count(".") <= 1 and name:
                m.register_forward_hook(lambda mod, a, o, n=name, i=i: rec[i].__setitem__("fwd " + n, (
                    o[0] if isinstance(o, tuple) else o).detach().clone()))
                m.register_full_backward_hook(lambda mod, gi, go, n=name, i=i: rec[i].__setitem__(
                    "bwd " + n, go[0].detach().clone()) if go[0] is not None else None)
        loss = r.loss(x, y, True)
        rec[i]["loss"] = loss.detach().clone()
        loss.backward()
        torch.cuda.synchronize()
    a, b = rec
    report = {k: (torch.equal(a[k], b[k]) if k in b else "missing") for k in a}
    s1, s2 = rs[0].model.state_dict(), rs[1].model.state_dict()
    layers = {k: float((s1[k] != s2[k]).float().mean()) for k in s1 if k.endswith(("T_accum", "E_accum"))}
    first = [k for k, v in report.items() if v is not True][:1]
    return {"setting": setting, "compile": compile_ops, "backend": backend, "first_unequal": first,
            "accum_layers_differing": sum(1 for v in layers.values() if v),
            "accum_first": [k for k, v in layers.items() if v][:3]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--setting", default="151M", choices=SETTINGS)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fused-max-tokens", type=int, default=None,
                   help="votes from the fused kernel up to this many tokens (default: the library's)")
    p.add_argument("--deterministic", action="store_true",
                   help="trueternary.determinism.enable() (deterministic attention and algorithms)")
    p.add_argument("--micro", action="store_true", help="also: is cuBLAS's gW (gy.T @ x) at 151M shapes repeatable?")
    p.add_argument("--localize", action="store_true", help="only: where do two identical steps first differ?")
    p.add_argument("--update-backend", default="gpu")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.deterministic:
        determinism.enable()
    if a.localize:
        set_sdpa(a.backends.split(",")[0])
        r = localize(a.setting, a.compile, a.update_backend)
        r["sdpa"], r["deterministic"] = a.backends.split(",")[0], torch.are_deterministic_algorithms_enabled()
        print(json.dumps(r), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(r, indent=1))
        return 0
    if a.fused_max_tokens is not None:
        from trueternary.ops import votes
        votes.VOTES_FUSED_MAX_TOKENS = a.fused_max_tokens
    if a.micro and torch.cuda.is_available():
        g = torch.Generator(device="cuda").manual_seed(0)
        for rows, cols in ((3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)):
            gy = torch.randn(16384, rows, device="cuda", generator=g).bfloat16()
            x = torch.randn(16384, cols, device="cuda", generator=g).bfloat16()
            ref = gy.t() @ x
            same = all(torch.equal(ref, gy.t() @ x) for _ in range(20))
            print(json.dumps({"micro": "gW = gy.T @ x bf16", "rows": rows, "cols": cols, "tokens": 16384,
                              "repeatable_20x": same}), flush=True)
    if not torch.cuda.is_available():
        print("cuda_graph_exactness: error: needs a CUDA device", file=sys.stderr)
        return 2
    results = []
    for b in a.backends.split(","):
        try:
            r = one(a.setting, b, a.compile, a.steps)
        except Exception as e:  # a backend unsupported for the shape: record and go on
            r = {"setting": a.setting, "sdpa": b, "compile": a.compile, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(r), flush=True)
        results.append(r)
        if a.out:
            Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
