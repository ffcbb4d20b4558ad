"""``trueternary export``: a trained model as a GGUF file that llama.cpp runs, ternary weights kept exact.

Sources: a checkpoint of ``trueternary train --model llama`` (:func:`export_checkpoint`, the command), a
project :class:`~trueternary.models.llama.LlamaModel` (ternarised or float: :func:`export_model`) and a
Hugging Face Llama- or Qwen3-style causal LM, ternarised with ``trueternary.ternarize`` (:func:`export_hf`).
Each becomes a :class:`~.gguf_file.LlamaGraph` (llama.cpp's ``llama`` architecture, or ``qwen3`` with per-head
q/k norms) written by gguf-py's writer to a temporary file renamed over the target.

Types: ``tq2_0`` (default, 2.06 bits/weight) and ``tq1_0`` (1.69) hold the ternary matrices; ``f16`` / ``f32``
write the same weights dense (for comparison, and for float models). Norms are float32. The export is
lossless or refused: every block of 256 weights must have one scale (``trueternary.export.tq``), which
holds for models trained with ``--group_size 256``; otherwise ``lossy=True`` (``--lossy``) re-fits one
scale per block and reports the weights it changed. docs/export.md has the layouts and measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arguments import export_arguments as add_arguments  # noqa: F401 (re-exported: defined torch-free for cli)
from ..errors import ExportError
from ..settings import DEFAULT_GGUF_TYPE as DEFAULT_TYPE
from ..settings import GGUF_TYPES as TYPES  # tq.TYPES + gguf_file.FLOAT_TYPES (tests/test_cli.py checks it)
from . import tq
from .gguf_file import BlockReport, LlamaGraph, LossyExport, Ternary, Vocab, byte_vocab


@dataclass
class ExportReport:
    path: Path
    qtype: str
    arch: str
    weights: int  # the model's ternary (or float matrix) weights, padding excluded
    file_bytes: int
    blocks: BlockReport
    padded: str  # "" or what the widths were before padding to multiples of 256

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / max(self.weights, 1)

    def summary(self) -> str:
        b = self.blocks
        exact = ("lossless: every weight exact" if b.lossless else
                 f"LOSSY: {b.blocks - b.exact_blocks:,} of {b.blocks:,} blocks re-fitted, "
                 f"{b.changed_weights:,} of {b.weights:,} weights changed ({100 * b.changed_fraction:.2f}%), "
                 f"relative error {b.relative_error:.4f}")
        pad = f"; padded from {self.padded} to multiples of {tq.QK}" if self.padded else ""
        return (f"wrote {self.path} ({self.arch}, {self.qtype}): {self.file_bytes:,} bytes, {self.weights:,} weights, "
                f"{self.bits_per_weight:.3f} bits/weight{pad}; {exact}")


def _matrix(mod: nn.Module, name: str) -> Ternary | torch.Tensor:
    """A Linear / Embedding (float or ternary) as a Ternary or a float (out, in) tensor."""
    from ..layers import TernaryEmbedding, TernaryLinear

    if isinstance(mod, (TernaryLinear, TernaryEmbedding)):
        if getattr(mod, "bias", None) is not None:
            raise ExportError(f"{name} has a bias, which llama.cpp's llama architecture has no place for")
        w = mod.weight
        return Ternary(w.trits().cpu(), w.scale(torch.float32).detach().cpu(), w.group_size)
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        if getattr(mod, "bias", None) is not None:
            raise ExportError(f"{name} has a bias, which llama.cpp's llama architecture has no place for")
        return mod.weight.detach().float().cpu()
    raise ExportError(f"{name} is a {type(mod).__name__}, not a linear or embedding layer")


def _group_size(tensors: dict) -> int | None:
    sizes = {t.group_size for t in tensors.values() if isinstance(t, Ternary)}
    return sizes.pop() if len(sizes) == 1 else None


def graph_of_model(model: nn.Module) -> LlamaGraph:
    """The project's Llama-style model (``--model llama``) as llama.cpp's ``qwen3`` (with q/k norms) or ``llama``."""
    from ..models.llama import RMS_EPS, ROPE_THETA, LlamaModel

    if not isinstance(model, LlamaModel):
        raise ExportError(f"{type(model).__name__} has no llama.cpp architecture; export takes --model llama")
    cfg = model.cfg
    t: dict = {"token_embd.weight": _matrix(model.embed, "embed")}
    for i, blk in enumerate(model.blocks):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = torch.ones(cfg.d_model)
        for gg_name, mod in (("attn_q", blk.q), ("attn_k", blk.k), ("attn_v", blk.v), ("attn_output", blk.o)):
            t[p + gg_name + ".weight"] = _matrix(mod, f"blocks.{i}.{gg_name}")
        if cfg.qk_norm:
            t[p + "attn_q_norm.weight"] = torch.ones(cfg.head_dim)
            t[p + "attn_k_norm.weight"] = torch.ones(cfg.head_dim)
        t[p + "ffn_norm.weight"] = torch.ones(cfg.d_model)
        for gg_name, mod in (("ffn_gate", blk.gate), ("ffn_up", blk.up), ("ffn_down", blk.down)):
            t[p + gg_name + ".weight"] = _matrix(mod, f"blocks.{i}.{gg_name}")
    t["output_norm.weight"] = torch.ones(cfg.d_model)
    t["output.weight"] = _matrix(model.head, "head")
    meta = {"model": "llama", "config": json.dumps(cfg.to_dict())}
    if (g := _group_size(t)) is not None:
        meta["group_size"] = g
    return LlamaGraph("qwen3" if cfg.qk_norm else "llama", cfg.vocab_size, cfg.ctx, cfg.d_model, cfg.n_layers,
                      cfg.n_heads, cfg.n_heads, cfg.head_dim, cfg.d_hidden, RMS_EPS, ROPE_THETA, t, byte_vocab(),
                      meta=meta)


def graph_of_hf(model: nn.Module, vocab: Vocab | None = None, name: str = "trueternary") -> LlamaGraph:
    """A Hugging Face ``LlamaForCausalLM``-style model (``model.model.layers[i].self_attn.q_proj`` ..., norms with
    weights; ``q_norm`` / ``k_norm`` per head make it ``qwen3``), after ``trueternary.ternarize`` or float.

    ``vocab``: its tokenizer as GGUF keys; None writes a vocabulary size only (llama.cpp runs token ids)."""
    try:
        cfg = model.config
        body = model.model
        d, n_layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or d // n_heads)
        eps, theta = float(cfg.rms_norm_eps), float(getattr(cfg, "rope_theta", 10000.0))
        ctx, vocab_size, d_ff = int(cfg.max_position_embeddings), int(cfg.vocab_size), int(cfg.intermediate_size)
        layers = list(body.layers)
    except (AttributeError, TypeError, ValueError) as e:
        raise ExportError(f"not a Llama-style Hugging Face model ({e})") from None
    if getattr(cfg, "rope_scaling", None):
        raise ExportError("rope scaling is not exported (rope_scaling is set)")
    t: dict = {"token_embd.weight": _matrix(body.embed_tokens, "model.embed_tokens")}
    qk_norm = hasattr(layers[0].self_attn, "q_norm") if layers else False
    for i, layer in enumerate(layers):
        p, a, m = f"blk.{i}.", layer.self_attn, layer.mlp
        t[p + "attn_norm.weight"] = layer.input_layernorm.weight.detach().float().cpu()
        for gg_name, mod in (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj),
                             ("attn_output", a.o_proj)):
            t[p + gg_name + ".weight"] = _matrix(mod, f"model.layers.{i}.self_attn.{gg_name}")
        if qk_norm:
            t[p + "attn_q_norm.weight"] = a.q_norm.weight.detach().float().cpu()
            t[p + "attn_k_norm.weight"] = a.k_norm.weight.detach().float().cpu()
        t[p + "ffn_norm.weight"] = layer.post_attention_layernorm.weight.detach().float().cpu()
        for gg_name, mod in (("ffn_gate", m.gate_proj), ("ffn_up", m.up_proj), ("ffn_down", m.down_proj)):
            t[p + gg_name + ".weight"] = _matrix(mod, f"model.layers.{i}.mlp.{gg_name}")
    t["output_norm.weight"] = body.norm.weight.detach().float().cpu()
    head = getattr(model, "lm_head", None)
    if head is not None:
        t["output.weight"] = _matrix(head, "lm_head")
    meta = {"model": f"huggingface {type(model).__name__}"}
    if (g := _group_size(t)) is not None:
        meta["group_size"] = g
    return LlamaGraph("qwen3" if qk_norm else "llama", vocab_size, ctx, d, n_layers, n_heads, n_kv, head_dim, d_ff,
                      eps, theta, t, vocab or Vocab("none"), name=name, meta=meta)


def export_graph(g: LlamaGraph, out: str | os.PathLike, qtype: str = DEFAULT_TYPE, *, lossy: bool = False,
                 overwrite: bool = False) -> ExportReport:
    """Write ``g`` to ``out`` as GGUF, atomically; ExportError (one line) if it cannot be written as asked."""
    from ..checkpoint import atomic_write
    from .gguf_file import build_gguf_tensors, write_gguf

    if qtype not in TYPES:
        raise ExportError(f"unknown --type {qtype!r}; choose from {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --force to replace it")
    gs = g.meta.get("group_size")
    try:
        padded, arrays, rep = build_gguf_tensors(g, qtype, lossy)
    except LossyExport as e:
        hint = (f"; it was trained with --group_size {gs} and llama.cpp keeps one scale per {tq.QK} weights: train "
                f"with --group_size {tq.QK} for an exact export" if gs and gs < tq.QK and qtype in tq.TYPES else "")
        raise ExportError(f"cannot export exactly as {qtype}: {e}{hint}; pass --lossy to re-fit them "
                          "(docs/export.md)") from None
    except ValueError as e:
        raise ExportError(str(e)) from None
    padded.meta.update({"lossless": rep.lossless, "type": qtype})
    try:
        atomic_write(out, lambda tmp: write_gguf(tmp, padded, arrays, qtype))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    n_weights = rep.weights
    return ExportReport(out, qtype, padded.arch, n_weights, out.stat().st_size, rep,
                        str(padded.meta.get("padded_from", "")))


def export_model(model: nn.Module, out, qtype: str = DEFAULT_TYPE, *, lossy: bool = False,
                 overwrite: bool = False) -> ExportReport:
    """Export a project Llama-style model (``trueternary.models.llama.LlamaModel``, ternarised or float)."""
    return export_graph(graph_of_model(model), out, qtype, lossy=lossy, overwrite=overwrite)


def export_hf(model: nn.Module, out, qtype: str = DEFAULT_TYPE, *, vocab: Vocab | None = None, lossy: bool = False,
              overwrite: bool = False) -> ExportReport:
    """Export a ternarised (or float) Hugging Face Llama / Qwen3-style causal LM (see :func:`graph_of_hf`)."""
    return export_graph(graph_of_hf(model, vocab), out, qtype, lossy=lossy, overwrite=overwrite)


def export_checkpoint(ckpt: str | os.PathLike, out, qtype: str = DEFAULT_TYPE, *, lossy: bool = False,
                      overwrite: bool = False) -> ExportReport:
    """Export a checkpoint of ``trueternary train --model llama`` (reads only T_packed and the scales)."""
    from ..checkpoint import read_header
    from ..inference import load_checkpoint_for_inference
    from ..recipes import LATENT_CONFIGS, TERNARY_CONFIGS

    _, meta = read_header(ckpt)  # CheckpointError (one line) for a missing, foreign or damaged file
    model_name = (meta.get("model") or {}).get("name")
    if model_name != "llama":
        raise ExportError(f"{ckpt}: model {model_name!r} has no llama.cpp architecture (the transformer's sub-layer "
                          "norms and ungated squared-ReLU MLP are in none); train with --model llama to export")
    recipe = meta.get("recipe")
    if recipe in LATENT_CONFIGS:
        raise ExportError(f"{ckpt}: config {recipe} keeps latent float weights; export a ternary or float config")
    if recipe not in TERNARY_CONFIGS and qtype in tq.TYPES:
        raise ExportError(f"{ckpt}: config {recipe} has float weights; export it with --type f16 or f32")
    model, meta = load_checkpoint_for_inference(ckpt)
    g = graph_of_model(model)
    g.meta.update({"recipe": str(recipe), "step": int(meta.get("step", 0)), "checkpoint": Path(ckpt).name})
    return export_graph(g, out, qtype, lossy=lossy, overwrite=overwrite)


def load_gguf(path: str | os.PathLike):
    """(float LlamaModel in eval mode, the file's ``trueternary.*`` keys) from a file written by :func:`export_model`
    or the command: every matrix dequantised to float32, padding cut off, q/k rows back in the model's order."""
    from ..checkpoint import CheckpointError
    from ..models.llama import LlamaConfig, LlamaModel
    from .gguf_file import pair_rows

    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the gguf package: pip install 'trueternary[export]'") from None

    try:
        r = gguf.GGUFReader(str(path))
        keys = {k: f.contents() for k, f in r.fields.items() if k.startswith(("trueternary.", "general.", "llama.",
                                                                              "qwen3."))}
        cfg = LlamaConfig.from_dict(json.loads(keys["trueternary.config"]))
        arch = keys["general.architecture"]
        n_heads_file = int(keys[f"{arch}.attention.head_count"])
        tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
                   for t in r.tensors}
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a GGUF file written by trueternary export ({why})") from None
    model = LlamaModel(cfg)
    unpair = torch.argsort(pair_rows(n_heads_file, cfg.head_dim)) if arch == "llama" else None

    def put(mod: nn.Module, name: str) -> None:
        w = tensors[name]
        if unpair is not None and name.split(".")[-2] in ("attn_q", "attn_k"):
            w = w[unpair]
        rows, cols = mod.weight.shape
        with torch.no_grad():
            mod.weight.copy_(w[:rows, :cols])

    put(model.embed, "token_embd.weight")
    put(model.head, "output.weight")
    for i, b in enumerate(model.blocks):
        for gg_name, mod in (("attn_q", b.q), ("attn_k", b.k), ("attn_v", b.v), ("attn_output", b.o),
                             ("ffn_gate", b.gate), ("ffn_up", b.up), ("ffn_down", b.down)):
            put(mod, f"blk.{i}.{gg_name}.weight")
    return model.eval(), {k: v for k, v in keys.items() if k.startswith("trueternary.")}


# ------------------------------------------------------------------------------------ command line
def run(args: argparse.Namespace) -> ExportReport:
    from ..errors import UsageError

    if args.format != "gguf":
        raise UsageError(f"unknown --format {args.format!r}; only gguf is written")
    if args.qtype not in TYPES:
        raise UsageError(f"unknown --type {args.qtype!r}; choose from {', '.join(TYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError("export needs the gguf package: pip install 'trueternary[export]'") from None
    rep = export_checkpoint(args.ckpt, args.out, args.qtype, lossy=args.lossy, overwrite=args.force)
    print(rep.summary())
    sys.stdout.flush()
    return rep


__all__ = ["DEFAULT_TYPE", "ExportError", "ExportReport", "TYPES", "Vocab", "export_checkpoint", "export_graph",
           "export_hf", "export_model", "graph_of_hf", "graph_of_model", "load_gguf"]
