"""``trueternary project``: memory to train and to serve N ternary weights, projected and measured.

Formulas (bytes), for a weight matrix of ``rows x cols`` and ``group_size`` g:

    T_packed  ceil(rows*cols / 5)        5 trits per byte
    E         rows * ceil(cols / g)      int8 log2 scale per group
    E_accum   rows * ceil(cols / g)      int8 scale-vote accumulator
    T_accum   rows * cols                int8 vote accumulator per weight
    codes     Rb*Cb*2 + Rb*br*Cb + Rb*Cb*bc   the FlipOptimizer's vote-normaliser codes (default rule,
                                         norm_beta > 0): an int16 per b x b tile (b = norm_block, 128),
                                         an int8 per tile-row and tile-column; br, bc = min(b, rows),
                                         min(b, cols), Rb x Cb tiles. Not for the embedding (row votes).
    training state = all of the above;  inference = T_packed + E

For ``--params P`` the seed's table treats the model as P weights in groups of g: T_packed P/5,
E and E_accum P/g each, T_accum P, codes P * (2/b + 2/b**2) (the rounding of short groups, partial tiles
and the last packed byte of each matrix is left out there; the measured table includes it). This training
state is the count ``audit`` and ``bench`` report (trueternary.memory.training_state); the measured table
checks the formula against it.

Adam_FP32, the float baseline as this project runs it (recipes.py): fp32 weights (4 B/w), torch AdamW's
fp32 m and v (4 + 4); served in bf16 (2 B/w). The fp32 weight gradient (4 B/w, full size: every one exists
at the end of backward) and, under bf16 autocast, the bf16 copies of the linear layers' weights that autocast
casts once per forward and autograd saves for backward (2 B/w; not the embedding's, which is looked up in
fp32) are listed with the activations. AdamW's per-tensor ``step`` scalars are left out.

What the seed's table leaves out, for a stated model shape and batch:

    weight gradient    TrueTernary: the fp32 gradient of one matrix at a time (the largest),
                       formed in backward, turned into votes and dropped (dense-fallback backend;
                       the fused GPU backend never writes it). Adam_FP32: a full-size fp32 gradient.
    dequantised weight TrueTernary dense-fallback: one matrix ``T * 2**E`` in the compute dtype at a time.
    weight copies      Adam_FP32 under bf16 autocast: ``2 * (weights - V*d)``, the linear layers' bf16 casts
                       (torch caches the cast of a leaf fp32 tensor, on the CPU as on CUDA, until the
                       autocast region ends; the backward of the matmul that saved it frees it). Counted as
                       saved tensors with the blocks kept and the ops eager; with the blocks checkpointed
                       autograd saves none in forward, but the cache holds every copy until the forward's
                       autocast region ends (torch.autocast.__exit__ clears it), so the row is the same.
    attention copies   on CUDA, eager shared ops: the contiguous bf16 q, k, v each block's attention kernel keeps
                       (``6 * d`` bytes per token per block; :func:`cuda_attention_copy_bytes`), measured on a GPU
                       where everything else here is counted on the CPU.
    activations        what autograd saves for backward in one forward + loss, identical for both
                       (same architecture; Adam_FP32's autocast weight copies aside). Per token it is
                       ``n_layers*(a*d + b*h + c*H + e) + f*d + g*V + k`` plus ``n_layers * m * head_dim`` per
                       position (d = d_model, h = MLP width, H = heads, V = vocabulary); the coefficients
                       are *fitted* on small real models by counting saved tensors
                       (``torch.autograd.graph.saved_tensors_hooks``) and checked exactly on other shapes
                       before they are used. Two options of a run change them, each with its own fitted
                       formula (ActivationMode):
                       activation checkpointing (``--activation_checkpointing``): each block's float32
                       input, plus one block's saved tensors while backward recomputes it (counted by
                       running a block again on its kept input, as torch.utils.checkpoint does), plus
                       the embedding's, final norm's, head's and loss's: ``n_layers*4*d`` per token and
                       the block terms once; compiled shared ops (``--compile``): what AOTAutograd's
                       min-cut partition saves (Inductor's; it recomputes elementwise ops in backward),
                       counted through the ``aot_eager_decomp_partition`` backend, which partitions as
                       Inductor does without generating code.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import textwrap
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arguments import FLAG_BOUNDS, HEAD_DIM, MAX_PARAMS
from .arguments import project_arguments as add_arguments  # noqa: F401 (re-exported: defined torch-free for cli)
from .errors import UsageError
from .rule import FlipRule, norm_tiles, uses_norm_memory
from .vocab import VOCAB_SIZE
from .weight import DEFAULT_GROUP_SIZE

GIB = 2**30


# ------------------------------------------------------------------------------------ shapes
@dataclass
class Shape:
    """A ByteTransformer shape plus the batch the activations are stated for."""

    d_model: int
    n_layers: int
    n_heads: int
    ctx: int = 2048
    batch: int = 1
    vocab_size: int = VOCAB_SIZE
    mlp_ratio: float = 4.0

    @property
    def d_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    def matrices(self) -> list[tuple[int, int, int]]:
        """(rows, cols, count) of ByteTransformer's weight matrices: the embedding, the head, then the layers' four
        (counted, not listed: the formulas take time and memory independent of n_layers)."""
        d, h, V = self.d_model, self.d_hidden, self.vocab_size
        return [(V, d, 1), (V, d, 1), (3 * d, d, self.n_layers), (d, d, self.n_layers), (h, d, self.n_layers),
                (d, h, self.n_layers)]

    def voted_whole(self) -> list[tuple[int, int, int]]:
        """The matrices whose votes are normalised per tile (and so keep normaliser codes): all but the
        embedding, which votes by rows."""
        return self.matrices()[1:]

    def n_weights(self) -> int:
        return sum(r * c * n for r, c, n in self.matrices())

    def model_kwargs(self) -> dict:
        return dict(ctx=self.ctx, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    mlp_ratio=self.mlp_ratio, vocab_size=self.vocab_size)

    def describe(self) -> str:
        return (f"d_model {self.d_model}, {self.n_layers} layer{'s' if self.n_layers > 1 else ''}, "
                f"{self.n_heads} head{'s' if self.n_heads > 1 else ''}, MLP {self.d_hidden}, "
                f"vocab {self.vocab_size}; batch {self.batch} x ctx {self.ctx}")


def shape_for_params(params: float, ctx: int = 2048, batch: int = 1) -> Shape:
    """A plausible ByteTransformer shape of about ``params`` weights: 12*d**2 per layer, d ~ 128 * n_layers
    (GPT-3-like aspect ratio), d a multiple of 64, heads of 64 (at least 2 heads: with a single head
    q, k and v stay views of one tensor and the activation formula, fitted for n_heads >= 2, overcounts)."""
    d = max(64, 64 * round((params * 128 / 12) ** (1 / 3) / 64))
    n_layers = max(1, round((params - 2 * VOCAB_SIZE * d) / (12 * d * d)))
    return Shape(d_model=d, n_layers=n_layers, n_heads=max(2, d // HEAD_DIM), ctx=ctx, batch=batch)


# ------------------------------------------------------------------------------------ formulas
def norm_block(rule: FlipRule | None = None) -> int | None:
    """The tile edge of the normaliser codes a FlipOptimizer under ``rule`` (default: FlipRule()) keeps, or
    None when it keeps none (norm_beta=0)."""
    rule = rule or FlipRule()
    return rule.norm_block if uses_norm_memory(rule.to_dict()) else None


def norm_code_bytes(rows: int, cols: int, block: int) -> int:
    """The normaliser codes of one (rows, cols) matrix voted whole (module docstring; rule.empty_norm_codes)."""
    Rb, br, Cb, bc = norm_tiles((rows, cols), block)
    return 2 * Rb * Cb + Rb * br * Cb + Rb * Cb * bc


def ternary_state_bytes(matrices: list[tuple[int, int, int]], group_size: int, block: int | None = None,
                        voted_whole: list[tuple[int, int, int]] | None = None) -> dict[str, int]:
    """The formula for the training state of these (rows, cols, count) ternary matrices (module docstring): their
    TernaryScaleTensor buffers, and with a ``block`` the normaliser codes of those in ``voted_whole`` (default:
    all of them)."""
    t_packed = sum(n * -(-(r * c) // 5) for r, c, n in matrices)
    groups = sum(n * r * -(-c // group_size) for r, c, n in matrices)
    t_accum = sum(n * r * c for r, c, n in matrices)
    codes = sum(n * norm_code_bytes(r, c, block) for r, c, n in
                (matrices if voted_whole is None else voted_whole)) if block else 0
    return {"T_packed": t_packed, "E": groups, "E_accum": groups, "T_accum": t_accum, "norm_codes": codes,
            "training": t_packed + 2 * groups + t_accum + codes, "inference": t_packed + groups}


def ternary_state_bytes_for_params(params: float, group_size: int, block: int | None = None) -> dict[str, float]:
    """The seed's per-weight table: P weights in groups of ``group_size`` and, with a ``block``, whole
    normaliser tiles (no per-matrix terms)."""
    p = float(params)
    d = {"T_packed": p / 5, "E": p / group_size, "E_accum": p / group_size, "T_accum": p,
         "norm_codes": p * (2 / block + 2 / block**2) if block else 0.0}
    d["training"] = d["T_packed"] + d["E"] + d["E_accum"] + d["T_accum"] + d["norm_codes"]
    d["inference"] = d["T_packed"] + d["E"]
    return d


def adam_fp32_bytes(params: float) -> dict[str, float]:
    """Adam_FP32's training state (module docstring); its gradient is listed separately, as in the shape rows."""
    p = float(params)
    d = {"fp32 weights": 4 * p, "fp32 Adam m": 4 * p, "fp32 Adam v": 4 * p}
    d["training"] = sum(d.values())
    d["inference"] = 2 * p  # served in bf16
    d["gradient"] = 4 * p
    return d


def autocast_weight_copy_bytes(shape: Shape) -> int:
    """The bf16 copies of the linear layers' weights that a bf16-autocast forward of the float model keeps for
    backward: every matrix but the embedding (an ``F.embedding`` lookup, which autocast leaves in fp32)."""
    return 2 * (shape.n_weights() - shape.vocab_size * shape.d_model)


def cuda_attention_copy_bytes(shape: Shape, checkpointing: bool = False, compiled: bool = False) -> int:
    """What CUDA's attention kernels keep for backward beyond the CPU count, under bf16 autocast and eager shared
    ops: a contiguous bf16 copy of each block's q, k and v, ``6 * d`` bytes per token per block (one block under
    activation checkpointing, which recomputes one at a time). The CPU attention takes the strided q, k, v views
    the formulas count; the CUDA kernels (cuDNN, flash) save their own layout. Not a fitted count: measured, as
    activations beyond the eager formula, by ``python -m trueternary.scaling --device cuda`` (151M, 16 x 512 on
    an H100: 568 MiB against the 576 MiB this gives; docs/scaling.md). A compiled step's attention inputs are
    Inductor's own contiguous outputs, which the compiled formula counts already: 0 there."""
    if compiled:
        return 0
    return 6 * shape.d_model * shape.batch * shape.ctx * (1 if checkpointing else shape.n_layers)


def transient_bytes(shape: Shape, compute_bytes: int = 4) -> dict[str, int]:
    """Largest one-matrix transients of TrueTernary's backward (dense-fallback): fp32 gradient, dense weight."""
    d, V = shape.d_model, shape.vocab_size
    # the head and the layers' matrices (the embedding's gradient covers only its touched rows)
    biggest = max(r * c for r, c, _ in shape.matrices())
    emb_rows = min(V, shape.batch * shape.ctx)
    return {"gradient": 4 * max(biggest, emb_rows * d), "dense_weight": compute_bytes * biggest}


# ------------------------------------------------------------------------------------ activations
# The terms of the activation formulas, by whether the blocks are checkpointed: (per token, per position).
# Without checkpointing every block's saved tensors stay until backward; with it a block keeps only its input and
# backward recomputes one block at a time, so the block terms appear once (not n_layers times) beside the inputs.
ACTIVATION_TERMS = {
    False: (("n_layers*d", "n_layers*h", "n_layers*H", "n_layers", "d", "V", "1"), ("n_layers*head_dim",)),
    True: (("n_layers*d", "n_layers", "d", "h", "H", "V", "1"), ("head_dim",)),
}
# The torch.compile backend the compiled mode counts with: AOTAutograd's min-cut partition with Inductor's
# decompositions, which decides what Inductor's graphs save, without Inductor's code generation (seconds a
# shape instead of tens, and no C compiler needed).
COUNTING_BACKEND = "aot_eager_decomp_partition"


def _activation_features(s: Shape, checkpointing: bool) -> list[int]:
    tokens, L = s.batch * s.ctx, s.n_layers
    size = {"n_layers*d": L * s.d_model, "n_layers*h": L * s.d_hidden, "n_layers*H": L * s.n_heads, "n_layers": L,
            "d": s.d_model, "h": s.d_hidden, "H": s.n_heads, "V": s.vocab_size, "1": 1,
            "n_layers*head_dim": L * (s.d_model // s.n_heads), "head_dim": s.d_model // s.n_heads}
    per_token, per_position = ACTIVATION_TERMS[checkpointing]
    return [tokens * size[t] for t in per_token] + [s.ctx * size[t] for t in per_position] + [1]


@dataclass(frozen=True)
class ActivationMode:
    """How the model runs a training forward, as far as what it keeps for backward is concerned."""

    autocast: bool  # bf16 autocast (else float32)
    checkpointing: bool = False  # ByteTransformer.use_activation_checkpointing
    compiled: bool = False  # ByteTransformer.use_compiled_ops

    def how(self) -> str:
        """How the blocks run, in words (the dtype left out)."""
        return (f"{'blocks checkpointed' if self.checkpointing else 'no activation checkpointing'}, "
                f"shared ops {'compiled' if self.compiled else 'eager'}")

    def describe(self) -> str:
        return f"{'bf16 autocast' if self.autocast else 'fp32'}, {self.how()}"


@dataclass(frozen=True)
class ActivationFormula:
    """Integer bytes per term of ACTIVATION_TERMS[mode.checkpointing] (then one per forward), fitted on small real
    models (activation_formula)."""

    mode: ActivationMode
    coef: tuple[int, ...]

    def bytes(self, shape: Shape) -> int:
        return sum(c * f for c, f in zip(self.coef, _activation_features(shape, self.mode.checkpointing)))

    def __str__(self) -> str:
        per_token, per_position = ACTIVATION_TERMS[self.mode.checkpointing]
        n = len(per_token)
        tok = " + ".join(f"{c}*{t}" if t != "1" else str(c) for c, t in zip(self.coef[:n], per_token) if c)
        text = f"tokens * ({tok})"
        for c, t in zip(self.coef[n:-1], per_position):
            if c:
                text += f" + ctx * {c}*{t}"
        return text + (f" + {self.coef[-1]}" if self.coef[-1] else "")


def _ternary_model(shape: Shape, group_size: int, mode: ActivationMode | None = None):
    from .convert import ternarize
    from .models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ternarize(build_model("transformer", seed=0, **shape.model_kwargs()), group_size)
    if mode is not None:
        model.use_activation_checkpointing(mode.checkpointing)
        model.use_compiled_ops(mode.compiled, backend=COUNTING_BACKEND)
    return model


@contextlib.contextmanager
def _static_compiles(compiled: bool):
    """Compile every shape for itself, as a run (one shape) does: a fresh dynamo state, so no shape traces
    symbolically after a recompile or runs eagerly past the recompile limit."""
    if not compiled:
        yield
        return
    import torch._dynamo

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            yield
    finally:
        torch._dynamo.reset()


def _saved_bytes_counter(model, exclude: set[int]):
    """(pack hook, box): the hook adds the bytes of each distinct storage autograd saves to box['bytes'], except
    the model's parameters and buffers and the storages in ``exclude``."""
    seen = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())} | exclude
    box = {"bytes": 0}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            box["bytes"] += t.untyped_storage().nbytes()
        return t

    return pack, box


def measure_activation_bytes(shape: Shape, autocast: bool | ActivationMode, group_size: int = DEFAULT_GROUP_SIZE,
                             model=None) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward + loss (CPU). Under activation
    checkpointing, those of the forward (the blocks' inputs, and the embedding's, final norm's, head's and loss's
    tensors) plus those of one block's forward run again on its input, which is what backward's recomputation
    of a block saves while the inputs are still kept. ``model``: a ternary transformer of this shape, set to the
    mode (default: built)."""
    mode = autocast if isinstance(autocast, ActivationMode) else ActivationMode(autocast)
    model = _ternary_model(shape, group_size, mode) if model is None else model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (shape.batch, shape.ctx), generator=g)
    y = torch.randint(0, 256, (shape.batch, shape.ctx), generator=g)
    pack, box = _saved_bytes_counter(model, set())
    block_input = []
    capture = model.blocks[-1].register_forward_pre_hook(lambda _, args: block_input.append(args[0]))
    try:
        with _static_compiles(mode.compiled), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(x)
                F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            total = box["bytes"]
            if mode.checkpointing:
                # checkpoint's recomputation runs the block under the forward's autocast state on the kept input
                # (whose storage is counted already), and keeps what the block saves until its backward uses it
                from .models.transformer import shared_ops

                inp = block_input[0].detach().requires_grad_(True)
                pack, box = _saved_bytes_counter(model, {inp.untyped_storage().data_ptr()})
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    model.blocks[-1](inp, model.rope_cos, model.rope_sin, shared_ops(model.compile_backend))
                total += box["bytes"]
    finally:
        capture.remove()
    return total


_FIT_SHAPES = [Shape(d, nl, H, ctx=L, batch=B, vocab_size=V, mlp_ratio=mr)
               for (d, H), nl, L, B, V, mr in [
                   ((32, 2), 1, 4, 1, 288, 4.0), ((32, 4), 1, 4, 1, 288, 4.0), ((48, 2), 1, 4, 1, 288, 4.0),
                   ((32, 2), 2, 4, 1, 288, 4.0), ((32, 2), 1, 8, 1, 288, 4.0), ((32, 2), 1, 4, 3, 288, 4.0),
                   ((32, 2), 1, 4, 1, 300, 4.0), ((32, 2), 1, 4, 1, 288, 2.0), ((32, 2), 2, 8, 3, 300, 2.0),
                   ((64, 2), 2, 4, 2, 288, 4.0), ((32, 4), 3, 6, 1, 296, 3.0),
               ]]
_CHECK_SHAPES = [Shape(64, 3, 4, ctx=12, batch=2, vocab_size=288, mlp_ratio=4.0),
                 Shape(96, 2, 3, ctx=6, batch=5, vocab_size=290, mlp_ratio=3.0)]
_FITTED: dict[ActivationMode, ActivationFormula] = {}


def activation_formula(autocast: bool | ActivationMode, checkpointing: bool = False,
                       compiled: bool = False) -> ActivationFormula:
    """The activation formula of a mode, fitted on small real models by counting saved tensors and checked exactly
    on them and on others (RuntimeError where it does not fit); cached. A compiled mode compiles each small model
    from a fresh dynamo state (``torch._dynamo.reset()``, before and after: this process's compiled code goes)."""
    mode = autocast if isinstance(autocast, ActivationMode) else ActivationMode(autocast, checkpointing, compiled)
    if mode in _FITTED:
        return _FITTED[mode]
    measured = [(s, measure_activation_bytes(s, mode)) for s in _FIT_SHAPES + _CHECK_SHAPES]
    X = torch.tensor([_activation_features(s, mode.checkpointing) for s in _FIT_SHAPES], dtype=torch.float64)
    y = torch.tensor([want for _, want in measured[:len(_FIT_SHAPES)]], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    formula = ActivationFormula(mode, tuple(round(v) for v in coef))
    for s, want in measured:
        if formula.bytes(s) != want:
            raise RuntimeError(f"activation formula ({mode.describe()}) does not fit this torch ({s.describe()}: "
                               f"{formula.bytes(s)} != {want})")
    _FITTED[mode] = formula
    return formula


# ------------------------------------------------------------------------------------ measurements
@contextlib.contextmanager
def _record_max(obj, name: str, size_of):
    """Temporarily wrap ``obj.name`` to record the largest ``size_of(args, result)`` it sees."""
    orig = getattr(obj, name)
    box = {"max": 0}

    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        box["max"] = max(box["max"], size_of(args, out))
        return out

    setattr(obj, name, wrapper)
    try:
        yield box
    finally:
        if isinstance(obj, type):
            setattr(obj, name, orig)
        else:
            delattr(obj, name)  # back to the class's method


def measure(shape: Shape, group_size: int = DEFAULT_GROUP_SIZE, checkpointing: bool = False,
            compiled: bool = False) -> dict:
    """Every quantity of the tables, measured on real objects of this shape (CPU). The ternary training state is
    memory.training_state's count after a real step (the codes the FlipOptimizer then holds included); the
    activations are counted with the blocks checkpointed and the shared ops compiled as asked."""
    from .memory import training_state
    from .models import build_model
    from .optim import FlipOptimizer
    from .weight import TernaryScaleTensor, ternary_weights

    # --- TrueTernary: the buffers, then one training step's transients
    model = _ternary_model(shape, group_size)
    tw = ternary_weights(model)
    out: dict = {"weights": sum(w.numel() for w in tw)}
    for name in ("T_packed", "E", "E_accum", "T_accum"):
        out[name] = sum(getattr(w, name).numel() * getattr(w, name).element_size() for w in tw)
    out["inference"] = sum(w.inference_bytes() for w in tw)
    out["n_params_float"] = sum(p.numel() for p in model.parameters())
    opt = FlipOptimizer(model, backend="dense-fallback")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (shape.batch, shape.ctx), generator=g)
    with _record_max(opt, "cast_votes", lambda a, _: a[1].numel() * a[1].element_size()) as grad, \
            _record_max(TernaryScaleTensor, "dense", lambda _, w: w.numel() * w.element_size()) as dense:
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
        opt.step()
    out["norm_codes"] = opt.state_bytes()
    out["training"] = training_state(model, [opt])["total"]
    out["transient_gradient"] = grad["max"]
    out["transient_dense_weight"] = dense["max"]
    for autocast, key in ((False, "activations_fp32"), (True, "activations_bf16")):
        out[key] = measure_activation_bytes(shape, ActivationMode(autocast, checkpointing, compiled), group_size)
    del model, opt
    # --- Adam_FP32 as recipes.py builds it: one step of its loss (bf16 autocast), backward and AdamW
    from .recipes import Hparams, build_recipe

    adam = build_recipe("Adam_FP32", build_model("transformer", seed=0, **shape.model_kwargs()), Hparams())
    fp32 = adam.model
    out["fp32 weights"] = sum(p.numel() * p.element_size() for p in fp32.parameters())
    # the weight copies: what the float model's autocast forward saves beyond what the ternary model's saves
    # (the same architecture; both counted with every block's tensors kept and the shared ops eager)
    bf16_saved = out["activations_bf16"] if not (checkpointing or compiled) else \
        measure_activation_bytes(shape, True, group_size)
    out["autocast_weight_copies"] = measure_activation_bytes(shape, True, model=fp32) - bf16_saved
    adam.loss(x, x, autocast=True).backward()
    out["adam_fp32_gradient"] = sum(p.grad.numel() * p.grad.element_size() for p in fp32.parameters())
    for o in adam.optimizers:
        o.step()
    for key, name in (("exp_avg", "fp32 Adam m"), ("exp_avg_sq", "fp32 Adam v")):
        out[name] = sum(st[key].numel() * st[key].element_size() for o in adam.optimizers for st in o.state.values())
    out["adam_fp32_training"] = sum(out[k] for k in ("fp32 weights", "fp32 Adam m", "fp32 Adam v"))
    return out


def predict(shape: Shape, group_size: int = DEFAULT_GROUP_SIZE, checkpointing: bool = False,
            compiled: bool = False) -> dict:
    """The formulas for every quantity ``measure`` reports."""
    tern = ternary_state_bytes(shape.matrices(), group_size, norm_block(), shape.voted_whole())
    n = shape.n_weights()
    adam = adam_fp32_bytes(n)
    trans = transient_bytes(shape, compute_bytes=4)
    out = {"weights": n, **{k: tern[k] for k in ("T_packed", "E", "E_accum", "T_accum", "norm_codes")},
           "training": tern["training"], "inference": tern["inference"], "n_params_float": 0,
           "transient_gradient": trans["gradient"], "transient_dense_weight": trans["dense_weight"],
           "activations_fp32": activation_formula(False, checkpointing, compiled).bytes(shape),
           "activations_bf16": activation_formula(True, checkpointing, compiled).bytes(shape)}
    for k in ("fp32 weights", "fp32 Adam m", "fp32 Adam v"):
        out[k] = int(adam[k])
    out["adam_fp32_training"] = int(adam["training"])
    out["adam_fp32_gradient"] = int(adam["gradient"])
    out["autocast_weight_copies"] = autocast_weight_copy_bytes(shape)
    return out


# ------------------------------------------------------------------------------------ tables
def _gib(b: float) -> str:
    if b >= GIB / 10:
        return f"{b / GIB:,.2f} GiB"
    return f"{b / 2**20:,.1f} MiB" if b >= 2**20 / 10 else f"{b:,.0f} B"


def _activation_assumptions(checkpointing: bool, compiled: bool) -> list[str]:
    kept = ("each block's input (batch x ctx x d float32), one block's saved tensors while backward recomputes it, "
            "and the embedding's, final norm's, head's and loss's" if checkpointing
            else "every block's saved tensors, and the embedding's, final norm's, head's and loss's")
    text = f"Activations in bytes: what autograd keeps for backward, {kept}"
    if compiled:
        text += (f"; with the shared ops compiled, what AOTAutograd's min-cut partition saves (Inductor's; it "
                 f"recomputes cheap elementwise ops in backward), counted with backend {COUNTING_BACKEND} on the CPU, "
                 "where Inductor's graphs save the same (a CUDA compile is assumed to partition alike)")
    return textwrap.wrap(text + ":", 108, initial_indent="  ", subsequent_indent="  ")


def projection_table(params: float, group_size: int, shape: Shape, checkpointing: bool = False,
                     compiled: bool = False) -> str:
    """The projection for ``params`` weights, and for ``shape`` the rows it leaves out: gradients, dequantised
    weights and activations, with the blocks checkpointed and the shared ops compiled as asked."""
    block = norm_block()
    tern = ternary_state_bytes_for_params(params, group_size, block)
    adam = adam_fp32_bytes(params)
    copies = autocast_weight_copy_bytes(shape)
    trans_bf16 = transient_bytes(shape, compute_bytes=2)
    f32, f16 = (activation_formula(autocast, checkpointing, compiled) for autocast in (False, True))
    act32, act16 = f32.bytes(shape), f16.bytes(shape)
    attn = cuda_attention_copy_bytes(shape, checkpointing, compiled)
    tern_total = tern["training"] + trans_bf16["gradient"] + trans_bf16["dense_weight"] + act16 + attn
    P = float(params)
    w = 48

    def row(label, t=None, a=None):
        ts = f"{t / P:>9.4f} {_gib(t):>12}" if t is not None else f"{'-':>9} {'':>12}"
        as_ = f"{a / P:>9.4f} {_gib(a):>12}" if a is not None else f"{'-':>9} {'':>12}"
        return f"{label:<{w}}{ts}   {as_}"

    lines = [
        f"Projected memory for {P:.3g} weights, group_size {group_size}",
        f"{'':<{w}}{'TrueTernary':>22}   {'Adam_FP32 (AdamW fp32)':>22}",
        f"{'':<{w}}{'B/weight':>9} {'total':>12}   {'B/weight':>9} {'total':>12}",
        row("T_packed (5 trits per byte)", tern["T_packed"]),
        row(f"E (int8 per {group_size} weights)", tern["E"]),
        row(f"E_accum (int8 per {group_size} weights)", tern["E_accum"]),
        row("T_accum (int8 per weight)", tern["T_accum"]),
        row(f"normaliser codes (per {block}x{block} tile)" if block else "normaliser codes (norm_beta=0: none)",
            tern["norm_codes"]),
        row("fp32 weights", None, adam["fp32 weights"]),
        row("fp32 Adam m", None, adam["fp32 Adam m"]),
        row("fp32 Adam v", None, adam["fp32 Adam v"]),
        row("training state total", tern["training"], adam["training"]),
        row("inference total (T_packed + E | bf16 weights)", tern["inference"], adam["inference"]),
        "",
        f"Left out of the table above, for {shape.describe()}",
        f"  ({shape.n_weights():.3g} weights in this shape; {f16.mode.how()})",
        row("weight gradient (fp32, one matrix | all)", trans_bf16["gradient"], adam["gradient"]),
        row("dequantised weight (bf16, one matrix)", trans_bf16["dense_weight"]),
        row("bf16 weight copies autocast saves (linears)", None, copies),
        row("activations saved for backward, fp32", act32, act32),
        row("activations saved for backward, bf16 autocast", act16, act16),
        row("CUDA attention's q, k, v copies (bf16)", attn, attn),
        row("training total with these (bf16 autocast)", tern_total,
            adam["training"] + adam["gradient"] + copies + act16 + attn),
        # an eager AdamW step sets its gradients to None after each step and backward frees the saved activations
        # and weight copies as the gradients form: its peak is the larger of the two, not their sum
        row("... eager step (gradients freed between steps)", tern_total,
            adam["training"] + max(adam["gradient"], copies + act16 + attn)),
        "",
        f"Adam_FP32 / TrueTernary: training state {adam['training'] / tern['training']:.1f}x, "
        f"inference {adam['inference'] / tern['inference']:.1f}x",
        "Assumptions: Adam_FP32 (recipes.py) keeps fp32 weights and torch AdamW's fp32 m, v (12 B/weight), a",
        "full fp32 gradient (4 B/weight) and, under bf16 autocast, the bf16 copy of each linear layer's weight",
        "that autocast casts once and autograd saves for backward (2 B/weight; not the embedding); its column",
        "adds them all to the activations, as in a step that keeps its gradients allocated (a CUDA-graphed",
        "step); an eager step frees activations as its gradients form (the '... eager step' row: the larger of",
        "the two). A float model is served in bf16.",
        "TrueTernary's float gradient exists for one matrix at a time (dense-fallback backend; the fused GPU",
        "backend never writes it).",
        *_activation_assumptions(checkpointing, compiled),
        f"  fp32:          {f32}",
        f"  bf16 autocast: {f16}",
        "  (tokens = batch*ctx, d = d_model, h = MLP width, H = heads, V = vocabulary), fitted on small real",
        "  models by counting the tensors autograd saves (CPU) and checked exactly on other shapes; the same",
        "  architecture saves the same activations whatever its weight format (beside the weight copies above).",
        "  On a GPU, CUDA's attention kernels also keep a contiguous bf16 copy of q, k and v per block (6*d bytes",
        "  a token; measured, not counted; none with --compile, whose graphs hand attention contiguous inputs).",
        "  Recomputation (--activation_checkpointing) shrinks both activation rows, sharding or offloading the",
        f"  AdamW state; the ternary state stays {tern['training'] / P:.3f} B/weight.",
    ]
    return "\n".join(lines)


MEASURED_ROWS = [
    ("weights", "ternary weights (count)"), ("n_params_float", "float parameters (count)"),
    ("T_packed", "T_packed"), ("E", "E"), ("E_accum", "E_accum"), ("T_accum", "T_accum"),
    ("norm_codes", "normaliser codes"),
    ("training", "ternary training state"), ("inference", "ternary inference"),
    ("transient_gradient", "transient fp32 gradient (1 matrix)"),
    ("transient_dense_weight", "transient dense weight (fp32)"),
    ("fp32 weights", "Adam_FP32 fp32 weights"), ("fp32 Adam m", "Adam_FP32 fp32 Adam m"),
    ("fp32 Adam v", "Adam_FP32 fp32 Adam v"), ("adam_fp32_training", "Adam_FP32 training state"),
    ("adam_fp32_gradient", "Adam_FP32 fp32 gradient"), ("autocast_weight_copies", "Adam_FP32 bf16 weight copies"),
    ("activations_fp32", "activations fp32"), ("activations_bf16", "activations bf16 autocast"),
]


def measured_shapes(sizes: list[float], ctx: int = 64, batch: int = 1) -> list[Shape]:
    return [shape_for_params(s, ctx=ctx, batch=batch) for s in sizes]


def measured_table(shapes: list[Shape], group_size: int, checkpointing: bool = False,
                   compiled: bool = False) -> tuple[str, bool]:
    """Formula next to measurement for each shape; returns (table, every number equal)."""
    cols = [(predict(s, group_size, checkpointing, compiled), measure(s, group_size, checkpointing, compiled))
            for s in shapes]
    w = 36
    head = f"{'bytes':<{w}}" + "".join(f"{'formula':>13}{'measured':>13}" for _ in shapes)
    lines = [
        "Measured on real objects (CPU) next to the formulas, for "
        + "; ".join(f"[{i + 1}] {s.describe()}" for i, s in enumerate(shapes))
        + f" (activations: {ActivationMode(True, checkpointing, compiled).how()})",
        f"{'':<{w}}" + "".join(f"{f'[{i + 1}]':>26}" for i in range(len(shapes))),
        head,
    ]
    all_equal = True
    for key, label in MEASURED_ROWS:
        cells = ""
        for pred, meas in cols:
            ok = pred[key] == meas[key]
            all_equal &= ok
            cells += f"{pred[key]:>13,}{meas[key]:>12,}{' ' if ok else '!'}"
        lines.append(f"{label:<{w}}{cells}")
    lines.append("every formula equals its measurement" if all_equal else "'!' marks a formula that differs")
    return "\n".join(lines), all_equal


# ------------------------------------------------------------------------------------ command line
def _dynamo_supported() -> bool:
    import torch._dynamo

    return torch._dynamo.is_dynamo_supported()


def run(args: argparse.Namespace) -> dict:
    if not (1 <= args.params <= MAX_PARAMS):  # (NaN fails both)
        raise UsageError(f"--params must be a number in [1, {MAX_PARAMS:.0e}], got {args.params:g}")
    for name, hi in FLAG_BOUNDS.items():
        v = getattr(args, name)
        if v is not None and not 1 <= v <= hi:
            raise UsageError(f"--{name} must be an integer in [1, {hi}], got {v}")
    shape = shape_for_params(args.params, ctx=args.ctx, batch=args.batch)
    if args.d_model is not None or args.n_layers is not None or args.n_heads is not None:
        d = args.d_model or shape.d_model
        shape = Shape(d_model=d, n_layers=args.n_layers or shape.n_layers,
                      n_heads=args.n_heads or max(2, d // HEAD_DIM), ctx=args.ctx, batch=args.batch)
    if shape.d_model % shape.n_heads or (shape.d_model // shape.n_heads) % 2:
        raise UsageError(f"--d_model {shape.d_model} must split into --n_heads {shape.n_heads} heads of even size")
    try:
        sizes = [float(s) for s in args.measure.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--measure must be a comma list of numbers, got {args.measure!r}") from None
    if any(not 1e3 <= s <= 1e8 for s in sizes):
        raise UsageError("--measure sizes must be between 1e3 and 1e8 weights (they are built on this CPU)")
    if args.compile and not _dynamo_supported():
        raise UsageError("--compile counts what torch.compile's graphs save, and torch.compile does not run here")
    print(projection_table(args.params, args.group_size, shape, args.activation_checkpointing, args.compile))
    ok = True
    if sizes:
        table, ok = measured_table(measured_shapes(sizes), args.group_size, args.activation_checkpointing,
                                   args.compile)
        print()
        print(table)
    return {"ok": ok}
