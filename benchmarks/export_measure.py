"""What an exported GGUF file costs and how llama.cpp runs it (docs/export.md, "Measurements").

    python benchmarks/export_measure.py --ckpt runs/X/checkpoints/step_0000300.safetensors [--ckpt ...] \\
        [--shape d_model,n_layers,n_heads ...] --out export_measure

For each checkpoint of ``trueternary train --model llama``: every type (tq2_0, tq1_0, f16, f32; tq types with
``--lossy`` where the scales need it) is exported, and llama.cpp (llama-cpp-python) evaluates held-out windows of
the checkpoint's corpus: its bits/byte beside the project's forward on the same windows, the largest logit
difference (as a fraction of the std of the project's logits), top-1 agreement. For a lossy export, the
project's forward of the file's weights (``load_gguf``) gives the bits/byte the re-fit costs without llama.cpp's
8-bit activations. For each ``--shape`` an untrained ternary llama (groups of 256) is exported for size and speed
only. Speed: llama.cpp's own timers (``llama_perf_context``) for a prompt of ctx/2 tokens and for ctx/2 tokens
decoded one at a time; the files of a model take turns ``--repeats`` times and each keeps its best. One JSON file
per run in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import out_dir  # noqa: E402

TYPES = ("tq2_0", "tq1_0", "f16", "f32")


def llama_cpp():
    try:
        import llama_cpp as lc
    except ImportError:
        sys.stderr.write("export_measure.py: needs llama-cpp-python (pip install llama-cpp-python)\n")
        sys.exit(2)
    return lc


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))) / math.log(2)


def llama_cpp_logits(path: Path, windows: torch.Tensor) -> torch.Tensor:
    lc = llama_cpp()
    L = windows.shape[1]
    llm = lc.Llama(model_path=str(path), n_ctx=L, n_batch=L, logits_all=True, verbose=False, n_threads=1)
    out = []
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        out.append(torch.from_numpy(np.array(llm.scores[:L], dtype=np.float32)))
    return torch.stack(out)


def speeds(paths: dict[str, Path], ctx: int, threads: int, rounds: int) -> dict[str, dict]:
    """Tokens/s of llama.cpp's prompt processing (ctx/2 tokens in one batch) and of decoding ctx/2 tokens one at a
    time, from its own timers (Python's per-call overhead excluded). The files take turns, ``rounds`` times, and
    each keeps its best round: on a shared machine the other jobs' load then falls on every file alike."""
    lc = llama_cpp()
    llms = {k: lc.Llama(model_path=str(p), n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                        verbose=False) for k, p in paths.items()}
    half = max(ctx // 2, 1)
    prompt = [int(b) for b in (b"def f(x):\n    return x\n" * ctx)[:half]]
    best = {k: {"threads": threads, "prompt_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0} for k in paths}
    for _ in range(rounds + 1):  # the first round warms up
        for k, llm in llms.items():
            llm.reset()
            lc.llama_perf_context_reset(llm._ctx.ctx)
            llm.eval(prompt)
            lc.llama_synchronize(llm._ctx.ctx)  # llama.cpp adds a decode's time to its counters when synchronised
            for tok in prompt[: ctx - half]:
                llm.eval([tok])
                lc.llama_synchronize(llm._ctx.ctx)
            p = lc.llama_perf_context(llm._ctx.ctx)
            b = best[k]
            if p.n_p_eval and p.t_p_eval_ms > 0:
                b["prompt_tokens_per_s"] = round(max(b["prompt_tokens_per_s"], p.n_p_eval / (p.t_p_eval_ms / 1e3)), 1)
            if p.n_eval and p.t_eval_ms > 0:
                b["decode_tokens_per_s"] = round(max(b["decode_tokens_per_s"], p.n_eval / (p.t_eval_ms / 1e3)), 1)
    return best


def file_row(path: Path, rep) -> dict:
    return {"file": path.name, "type": rep.qtype, "arch": rep.arch, "bytes": rep.file_bytes, "weights": rep.weights,
            "bits_per_weight": round(rep.bits_per_weight, 4), "padded_from": rep.padded,
            "lossless": rep.blocks.lossless, "blocks": rep.blocks.blocks,
            "inexact_blocks": rep.blocks.blocks - rep.blocks.exact_blocks,
            "changed_weights": rep.blocks.changed_weights,
            "changed_fraction": round(rep.blocks.changed_fraction, 6),
            "relative_error": round(rep.blocks.relative_error, 6)}


def add_speeds(rows: list[dict], paths: dict[str, Path], ctx: int, args) -> None:
    for t in args.threads:
        for row, sp in zip(rows, speeds(paths, ctx, t, args.repeats).values()):
            row.setdefault("speed", []).append(sp)
    if not args.keep:
        for p in paths.values():
            p.unlink()
    for row in rows:
        print(json.dumps(row), flush=True)


def measure_checkpoint(ckpt: Path, out: Path, args) -> dict:
    from trueternary.data import eval_windows, load_corpus
    from trueternary.export import ExportError, export_checkpoint, load_gguf
    from trueternary.generate import load_for_inference

    model, meta = load_for_inference(ckpt)
    ctx = model.cfg.ctx
    data = (meta.get("data") or {}).get("name")
    corpus = load_corpus(None if data is None or data.startswith("default") else data)
    windows = eval_windows(corpus.val, ctx, args.windows)
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        want = model(x)
    result = {"checkpoint": str(ckpt), "model": meta["model"], "step": meta["step"], "recipe": meta["recipe"],
              "group_size": (meta.get("hparams") or {}).get("group_size"), "windows": int(x.shape[0]), "ctx": ctx,
              "project_bits_per_byte": round(bits_per_byte(want, y), 4), "files": []}
    paths = {}
    for qtype in TYPES:
        path = paths[qtype] = out / f"{ckpt.parent.parent.name}_{qtype}.gguf"
        try:
            rep = export_checkpoint(ckpt, path, qtype, overwrite=True)
        except ExportError as e:
            result.setdefault("refused", {})[qtype] = str(e)
            rep = export_checkpoint(ckpt, path, qtype, overwrite=True, lossy=True)
        row = file_row(path, rep)
        got = llama_cpp_logits(path, x)
        row["llama_cpp_bits_per_byte"] = round(bits_per_byte(got, y), 4)
        row["max_logit_diff_over_std"] = round(float((got - want).abs().max() / want.std()), 5)
        agree = got.argmax(-1) == want.argmax(-1)
        row["top1_agreement"] = round(float(agree.float().mean()), 5)
        top2 = want.float().topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]  # how decided the project's own top-1 is (logits: nats)
        row["top1_disagreements"] = int((~agree).sum())
        row["disagreements_with_project_margin_below_0.1"] = int((~agree & (margin < 0.1)).sum())
        if not rep.blocks.lossless:
            back, _ = load_gguf(path)
            with torch.no_grad():
                row["file_weights_project_bits_per_byte"] = round(bits_per_byte(back(x), y), 4)
        result["files"].append(row)
    add_speeds(result["files"], paths, ctx, args)
    return result


def measure_shape(shape: str, out: Path, args) -> dict:
    import trueternary as tt
    from trueternary.export import export_model
    from trueternary.models import build_model

    d, n_layers, n_heads = (int(v) for v in shape.split(","))
    model = build_model("llama", d_model=d, n_layers=n_layers, n_heads=n_heads, ctx=args.ctx)
    result = {"shape": {"d_model": d, "n_layers": n_layers, "n_heads": n_heads, "ctx": args.ctx,
                        "d_ff": model.cfg.d_hidden}, "untrained": True, "files": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt.ternarize(model, 256)
    paths = {}
    for qtype in TYPES:
        path = paths[qtype] = out / f"shape_{d}_{n_layers}_{qtype}.gguf"
        result["files"].append(file_row(path, export_model(model, path, qtype, overwrite=True)))
    add_speeds(result["files"], paths, args.ctx, args)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint of trueternary train --model llama")
    p.add_argument("--shape", action="append", default=[], metavar="D,LAYERS,HEADS",
                   help="an untrained ternary llama of this shape (size and speed only)")
    p.add_argument("--ctx", type=int, default=256, help="context of the --shape models")
    p.add_argument("--windows", type=int, default=64, help="held-out windows per checkpoint")
    p.add_argument("--threads", default="1", help="llama.cpp threads to time, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (each file's best is kept)")
    p.add_argument("--keep", action="store_true", help="keep the .gguf files")
    p.add_argument("--out", default="export_measure")
    args = p.parse_args()
    out = out_dir(p, args.out)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads must be integers, got {args.threads!r}")
    for c in args.ckpt:
        if not Path(c).is_file():
            p.error(f"--ckpt {c}: no such file")
    llama_cpp()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {"load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "llama_cpp_python": llama_cpp().__version__, "checkpoints": [], "shapes": []}
    for c in args.ckpt:
        results["checkpoints"].append(measure_checkpoint(Path(c), out, args))
    for s in args.shape:
        results["shapes"].append(measure_shape(s, out, args))
    results["load_average_after"] = os.getloadavg()
    path = out / f"export_measure_{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
