"""A Llama-family network as llama.cpp reads it, and the GGUF file that holds it.

:class:`LlamaGraph` is what the exporters hand over: llama.cpp's architecture name (``llama`` or ``qwen3``),
the shape keys, and every tensor under its GGUF name, as ``torch`` (out, in) matrices, ternary ones as
:class:`Ternary` (trits and scales, never re-quantised from floats). q and k rows are in the rotate-halves
rotary convention (the project's and Hugging Face's); :func:`build_gguf_tensors` permutes them into llama.cpp's
adjacent-pair convention for ``llama`` (``qwen3`` rotates halves, as they are) and packs the blocks.

:func:`pad_to_blocks` makes any width exportable: a TQ row must hold a multiple of 256 weights, so a model
of width d (d_ff, heads x head_dim) not a multiple of 256 is widened with zero weights: extra residual
channels that stay 0, extra attention heads whose value and output weights are 0, extra MLP units with zero
weights. The RMSNorms over the widened residual stream get weights ``sqrt(d / d')`` and the file's epsilon
is ``eps * d / d'``, so they compute what the unpadded norms did; the per-head q/k norms (qwen3) see that
epsilon too (``1e-6 * d / d'`` instead of ``1e-6``: a change far below the float error of llama.cpp's 8-bit
activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..quant import expand_groups
from ..vocab import N_BYTES, SPECIAL, SPECIAL_NAMES, VOCAB_SIZE
from . import tq

ARCHS = ("llama", "qwen3")
FLOAT_TYPES = ("f16", "f32")
NORMS_OVER_D = ("attn_norm", "ffn_norm", "output_norm")  # the RMSNorms over the residual stream


@dataclass
class Ternary:
    """A ternary (rows, cols) matrix: int8 trits and one float32 scale per ``group_size`` weights of a row
    (``2**E``, exact); a NaN scale marks padding (no weight)."""

    T: torch.Tensor
    scale: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.T.shape)

    def scales(self) -> torch.Tensor:
        """The scale of every weight (rows, cols)."""
        return expand_groups(self.scale, self.group_size, self.T.shape[1])

    def dense(self) -> torch.Tensor:
        return torch.where(self.T != 0, self.T.float() * torch.nan_to_num(self.scales(), nan=0.0), 0.0)

    def rows_taken(self, index: torch.Tensor) -> Ternary:
        return Ternary(self.T[index], self.scale[index], self.group_size)

    def padded(self, rows: int, cols: int) -> Ternary:
        """Zero trits with NaN scales (padding) appended to (rows, cols); per-weight scales when cols grow."""
        r, c = self.shape
        if (rows, cols) == (r, c):
            return self
        T = torch.zeros(rows, cols, dtype=torch.int8)
        T[:r, :c] = self.T
        if cols == c:
            S = torch.full((rows, self.scale.shape[1]), math.nan)
            S[:r] = self.scale
            return Ternary(T, S, self.group_size)
        S = torch.full((rows, cols), math.nan)
        S[:r, :c] = self.scales()
        return Ternary(T, S, 1)


Weight = Ternary | torch.Tensor


@dataclass
class Vocab:
    """The tokenizer keys: llama.cpp's ``gpt2`` byte-level BPE (tokens are GPT-2's printable stand-ins of the
    bytes) or ``none`` (a vocabulary size only)."""

    model: str
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / pad / sep -> token id


def byte_stand_ins() -> list[str]:
    """GPT-2's map from each byte value to a printable character (byte-level BPE tokens are written in it):
    printable Latin-1 characters stand for themselves, the other 68 bytes for U+0100 upwards in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def byte_vocab() -> Vocab:
    """The project's vocabulary (trueternary.vocab): 256 byte tokens, then the 32 specials as control tokens."""
    from gguf import TokenType

    tokens = byte_stand_ins() + [f"<{name}>" for name in SPECIAL_NAMES]
    types = [TokenType.NORMAL] * N_BYTES + [TokenType.CONTROL] * len(SPECIAL_NAMES)
    assert len(tokens) == VOCAB_SIZE
    # GGUF cannot hold an empty array and llama.cpp's BPE loader wants merges: one that can never apply (byte-level
    # BPE symbols are single characters, never "<BOS>"), so every byte stays its own token.
    # No separator id: llama-cpp-python appends a model's separator token to every completion prompt (BERT style).
    return Vocab("gpt2", tokens, [int(t) for t in types], ["<BOS> <EOS>"],
                 {"bos": SPECIAL["BOS"], "eos": SPECIAL["EOS"], "pad": SPECIAL["PAD"]})


@dataclass
class LlamaGraph:
    arch: str
    vocab_size: int
    ctx: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    eps: float
    rope_theta: float
    tensors: dict[str, Weight]
    vocab: Vocab
    name: str = "trueternary"
    meta: dict = field(default_factory=dict)  # extra "trueternary.*" keys (str, int, float or bool values)



def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to_blocks(g: LlamaGraph) -> LlamaGraph:
    """``g`` with every matrix row a multiple of 256 long (see the module docstring); ``g`` itself if it is."""
    d2 = _round_up(g.d_model, tq.QK)
    heads2 = g.n_heads
    while (heads2 * g.head_dim) % tq.QK:
        heads2 += 1
    ff2 = _round_up(g.d_ff, tq.QK)
    if (d2, heads2, ff2) == (g.d_model, g.n_heads, g.d_ff):
        return g
    if heads2 != g.n_heads and g.n_kv_heads != g.n_heads:
        raise ValueError(f"widths not multiples of {tq.QK} need extra attention heads, which grouped-query "
                         f"attention ({g.n_heads} heads, {g.n_kv_heads} key/value heads) cannot take")
    qdim2 = heads2 * g.head_dim
    shapes = {"token_embd": (g.vocab_size, d2), "output": (g.vocab_size, d2), "attn_q": (qdim2, d2),
              "attn_k": (qdim2, d2), "attn_v": (qdim2, d2), "attn_output": (d2, qdim2), "ffn_gate": (ff2, d2),
              "ffn_up": (ff2, d2), "ffn_down": (d2, ff2)}
    norm_gain = math.sqrt(g.d_model / d2)
    out = {}
    for name, w in g.tensors.items():
        role = name.split(".")[-2]
        if role in shapes:
            rows, cols = shapes[role]
            if isinstance(w, Ternary):
                out[name] = w.padded(rows, cols)
            else:
                p = torch.zeros(rows, cols)
                p[: w.shape[0], : w.shape[1]] = w
                out[name] = p
        elif role in NORMS_OVER_D:
            p = torch.zeros(d2)
            p[: g.d_model] = w * norm_gain
            out[name] = p
        else:  # per-head q/k norms
            out[name] = w
    return replace(g, d_model=d2, n_heads=heads2, n_kv_heads=heads2, d_ff=ff2, eps=g.eps * g.d_model / d2,
                   tensors=out, meta={**g.meta, "padded_from": f"d_model {g.d_model}, heads {g.n_heads}, "
                                                             f"d_ff {g.d_ff}"})


def pair_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order turning rotate-halves rotary rows (pairs i, i + head_dim/2) into adjacent pairs (2i, 2i+1)."""
    half = head_dim // 2
    one = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return (one[None, :] + head_dim * torch.arange(n_heads)[:, None]).reshape(-1)


@dataclass
class BlockReport:
    """How the ternary matrices fitted llama.cpp's one scale per 256 weights."""

    blocks: int = 0
    exact_blocks: int = 0
    weights: int = 0
    changed_weights: int = 0
    sq_error: float = 0.0
    sq_norm: float = 0.0
    worst: str = ""  # the matrix with the most inexact blocks
    worst_inexact: int = 0

    @property
    def lossless(self) -> bool:
        return self.exact_blocks == self.blocks

    @property
    def changed_fraction(self) -> float:
        return self.changed_weights / max(self.weights, 1)

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.sq_error / self.sq_norm) if self.sq_norm else 0.0


def fit_ternary(t: Ternary, lossy: bool) -> tuple[np.ndarray, np.ndarray, int, float, float, int]:
    """(trits int8, d fp16, inexact blocks, squared error, squared norm, changed weights) of one matrix."""
    T, S = t.T, t.scales()
    d, exact = tq.block_scales(T, S)
    n_inexact = int((~exact).sum())
    W = t.dense()
    if n_inexact and lossy:
        rows = S.shape[0]
        live = (T != 0) & ~torch.isnan(S)
        Sb = torch.where(live, S, math.nan).view(rows, -1, tq.QK)
        e_lo = torch.floor(torch.log2(torch.nan_to_num(Sb, nan=math.inf).amin(dim=2)))
        e_hi = torch.ceil(torch.log2(torch.nan_to_num(Sb, nan=-math.inf).amax(dim=2).clamp_min(1e-38)))
        span = int(torch.nan_to_num((e_hi - e_lo)[~exact], nan=0.0).clamp(0, 8).max()) if n_inexact else 0
        base = torch.nan_to_num(e_lo, nan=0.0, posinf=0.0, neginf=0.0)
        cands = torch.exp2(base[..., None] + torch.arange(span + 1, dtype=torch.float32))
        T, d = tq.fit_blocks(T, S, d, exact, cands)
    W2 = T.float() * expand_groups(d, tq.QK, T.shape[1])
    return (T.numpy(), d.half().numpy(), n_inexact, float(((W2 - W) ** 2).sum()), float((W**2).sum()),
            int((W2 != W).sum()))


def _gguf_arrays(g: LlamaGraph, qtype: str, lossy: bool) -> tuple[dict[str, tuple[np.ndarray, object]], BlockReport]:
    """Every tensor as (numpy array, GGML type or None for plain float32) and the block report."""
    from gguf import GGMLQuantizationType as Q

    raw = {"tq1_0": Q.TQ1_0, "tq2_0": Q.TQ2_0}
    rep = BlockReport()
    out: dict[str, tuple[np.ndarray, object]] = {}
    perm = pair_rows(g.n_heads, g.head_dim) if g.arch == "llama" else None
    kv_perm = pair_rows(g.n_kv_heads, g.head_dim) if g.arch == "llama" else None
    inexact_by = {}
    for name, w in g.tensors.items():
        role = name.split(".")[-2]
        if perm is not None and role in ("attn_q", "attn_k"):
            index = perm if role == "attn_q" else kv_perm
            w = w.rows_taken(index) if isinstance(w, Ternary) else w[index]
        if not isinstance(w, Ternary) and w.dim() == 1:  # norm weights
            out[name] = (w.float().contiguous().numpy(), None)
            continue
        if qtype in FLOAT_TYPES:  # a matrix written dense: exact unless fp16 rounds it
            W = w.dense() if isinstance(w, Ternary) else w.float()
            W2 = W.half().float() if qtype == "f16" else W
            n_inexact = int((W2 != W).sum())
            if n_inexact and not lossy:
                raise LossyExport(name, f"{n_inexact:,} weights of {name} are not fp16 numbers")
            n_blocks, n_real, arr = W.numel(), W.numel(), (W2.half().numpy() if qtype == "f16" else W2.numpy(), None)
            sq_err, sq_norm, changed = float(((W2 - W) ** 2).sum()), float((W**2).sum()), n_inexact
        elif not isinstance(w, Ternary):
            raise ValueError(f"{name} holds float weights: ternarise the model (trueternary.ternarize) to write "
                             f"{qtype}, or export it as f16 / f32")
        else:
            n_real = int((~torch.isnan(w.scales())).sum())
            trits, d, n_inexact, sq_err, sq_norm, changed = fit_ternary(w, lossy)
            n_blocks, arr = d.size, (tq.pack_blocks(trits, d, qtype), raw[qtype])
        rep.blocks += n_blocks
        rep.exact_blocks += n_blocks - n_inexact
        rep.weights += n_real
        rep.changed_weights += changed
        rep.sq_error += sq_err
        rep.sq_norm += sq_norm
        inexact_by[name] = n_inexact
        out[name] = arr
    if inexact_by and max(inexact_by.values()):
        rep.worst = max(inexact_by, key=inexact_by.get)
        rep.worst_inexact = inexact_by[rep.worst]
    return out, rep


class LossyExport(ValueError):
    """The weights cannot be written exactly in the requested type (and the lossy path was not asked for)."""

    def __init__(self, tensor: str, what: str) -> None:
        super().__init__(what)
        self.tensor = tensor


def check_graph(g: LlamaGraph) -> None:
    if g.arch not in ARCHS:
        raise ValueError(f"unknown architecture {g.arch!r}")
    if g.head_dim % 2:
        raise ValueError("head dimension must be even (rotary embeddings)")


def build_gguf_tensors(g: LlamaGraph, qtype: str, lossy: bool) -> tuple[LlamaGraph, dict, BlockReport]:
    """(the padded graph, its tensors as GGUF arrays, the block report); LossyExport when not exact and not lossy."""
    check_graph(g)
    if qtype not in tq.TYPES + FLOAT_TYPES:
        raise ValueError(f"unknown --type {qtype!r}; choose from {', '.join(tq.TYPES + FLOAT_TYPES)}")
    if qtype in tq.TYPES:
        g = pad_to_blocks(g)
    arrays, rep = _gguf_arrays(g, qtype, lossy)
    if not rep.lossless and not lossy:
        raise LossyExport(rep.worst, f"{rep.blocks - rep.exact_blocks:,} of {rep.blocks:,} blocks of {tq.QK} weights "
                          f"hold differing scales or scales outside fp16 (most in {rep.worst}: {rep.worst_inexact:,})")
    return g, arrays, rep


def write_gguf(path: str, g: LlamaGraph, arrays: dict, qtype: str) -> None:
    """Write the GGUF file at ``path`` (the caller makes it atomic)."""
    import gguf

    file_type = {"tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
                 "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[qtype]
    w = gguf.GGUFWriter(path, g.arch)
    w.add_name(g.name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(g.vocab_size)
    w.add_context_length(g.ctx)
    w.add_embedding_length(g.d_model)
    w.add_block_count(g.n_layers)
    w.add_feed_forward_length(g.d_ff)
    w.add_head_count(g.n_heads)
    w.add_head_count_kv(g.n_kv_heads)
    w.add_key_length(g.head_dim)
    w.add_value_length(g.head_dim)
    w.add_rope_dimension_count(g.head_dim)
    w.add_rope_freq_base(g.rope_theta)
    w.add_layer_norm_rms_eps(g.eps)
    v = g.vocab
    w.add_tokenizer_model(v.model)
    if v.model != "none":
        w.add_tokenizer_pre("default")
        w.add_token_list(v.tokens)
        w.add_token_types(v.types)
        w.add_token_merges(v.merges)
        for key, tid in v.special.items():
            getattr(w, f"add_{key}_token_id")(tid)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
    for key, value in g.meta.items():
        name = f"trueternary.{key}"
        if isinstance(value, bool):
            w.add_bool(name, value)
        elif isinstance(value, int):
            w.add_int64(name, value)
        elif isinstance(value, float):
            w.add_float64(name, value)
        else:
            w.add_string(name, str(value))
    for name, (arr, raw) in arrays.items():
        if raw is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
