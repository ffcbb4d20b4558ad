"""The Hugging Face Llama that bench_hf.py and experiments/hf_fused_projections time, and its training steps:
AdamW on the float model against FlipOptimizer on its ternarised copy, each eager, compiled or CUDA-graphed.

The model: ``LlamaForCausalLM`` from a config (random weights, ``torch.manual_seed(1234)``): hidden size D, L
layers, MLP 2.75 x D, heads of 64, byte vocabulary (256), context 256, untied embeddings; float32 weights, bf16
autocast on CUDA. A smoke run (CPU) takes a tiny model. The batch is random bytes, the same for every step.

Attention is sdpa with ``is_causal`` and no mask tensor (``trueternary_causal``, registered by
:func:`register_causal_attention`; batches are unpadded), or transformers' default ``sdpa``, which builds a mask
tensor whenever it cannot inspect the positions on the host, as inside a CUDA graph.

It imports transformers only where a function needs it, so that a script can parse its command line
(:func:`add_args`, :func:`finish_args`) and answer a missing transformers with one line
(:func:`require_transformers`) first.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from harness import add_out_arg, out_dir

from trueternary import ternarize
from trueternary.layers import set_linear_kernel
from trueternary.optim import ADAMW_BETAS, FlipOptimizer, TrainStep
from trueternary.optim.train_step import capture_cuda_graph

VARIANTS = ("eager", "compiled", "graph", "compiled+graph")
CTX = 256
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, ctx=16)


def add_args(p: argparse.ArgumentParser, variants: str) -> None:
    """The command line every HF-Llama script shares: --smoke, --out, --budget, --batch, --variants (default
    ``variants``; --smoke: eager,compiled, since a CPU has no graphs), --model D,L."""
    p.add_argument("--smoke", action="store_true", help="CPU run with a tiny model (eager and compiled variants)")
    add_out_arg(p)
    p.add_argument("--budget", type=float, default=None, help="seconds (default 900 on CUDA); later variants are "
                   "skipped once it is spent")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: "
                   f"{variants}; --smoke: eager,compiled)")
    p.add_argument("--model", default="512,6", metavar="D,L",
                   help="hidden size and layers of the Llama (MLP 2.75 x D, heads of 64; default 512,6: 19M weights)")
    p.set_defaults(default_variants=variants)


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """:func:`add_args`' values checked (one-line usage errors) and converted: variants a list, model (D, L), out
    a created folder."""
    text = args.variants or ("eager,compiled" if args.smoke else args.default_variants)
    args.variants = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown --variants {bad[0]} (choose from {', '.join(VARIANTS)})")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    try:
        model = tuple(int(v) for v in args.model.split(","))
        if len(model) != 2 or model[0] < 64 or model[0] % 64 or model[1] < 1:
            raise ValueError
    except ValueError:
        p.error(f"--model takes D,L with D a multiple of 64 and L >= 1, got {args.model!r}")
    args.model = model
    args.out = out_dir(p, args.out)
    return args


def require_transformers(script: str) -> None:
    """One line and exit 2 where transformers is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(f"{script}: error: needs transformers (pip install transformers)", file=sys.stderr)
        sys.exit(2)


@dataclass
class Setup:
    """What every step of one run shares: device, model shape, batch, compile options, attention."""

    smoke: bool
    d_model: int = 512
    n_layers: int = 6
    batch: int = 16
    attention: str = "trueternary_causal"
    model: dict = field(init=False)

    def __post_init__(self) -> None:
        self.model = (dict(SMOKE_MODEL) if self.smoke else
                      dict(hidden_size=self.d_model, intermediate_size=self.d_model * 11 // 4,
                           num_hidden_layers=self.n_layers, num_attention_heads=self.d_model // 64, ctx=CTX))
        if self.smoke:
            torch.set_num_threads(1)  # (tiny tensors: OpenMP hand-offs would dominate a busy CPU)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.smoke else "cuda")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None

    @property
    def compile_args(self) -> dict:
        # a smoke run traces with dynamo but leaves code generation out (Inductor on a busy CPU takes minutes)
        return {"backend": "eager"} if self.smoke else {}

    @property
    def warmup_repeats(self) -> tuple[int, int]:
        return (1, 2) if self.smoke else (5, 20)

    @property
    def tokens(self) -> int:
        return self.batch * self.model["ctx"]

    def env(self) -> dict:
        """The facts a result file records about this setup."""
        import transformers

        warmup, repeats = self.warmup_repeats
        return dict(smoke=self.smoke, model=self.model, batch=self.batch, attention=self.attention,
                    autocast=str(self.autocast_dtype), transformers=transformers.__version__,
                    compile=self.compile_args, warmup=warmup, repeats=repeats)

    def autocast(self):
        # (the autocast weight-cast cache must be off inside CUDA graphs)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None, cache_enabled=False)


def register_causal_attention() -> None:
    """``attn_implementation="trueternary_causal"``: sdpa with ``is_causal`` and no mask tensor (flash / cuDNN
    kernels), for batches without padding."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("trueternary_causal", attention)
    AttentionMaskInterface.register("trueternary_causal", lambda *args, **kwargs: None)


def base_model(s: Setup) -> torch.nn.Module:
    import transformers

    m = s.model
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_attention_heads"], max_position_embeddings=m["ctx"],
        tie_word_embeddings=False, use_cache=False, attn_implementation=s.attention)
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(cfg)


def batch(s: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    seq = torch.randint(0, 256, (s.batch, s.model["ctx"] + 1), generator=g).to(s.device)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def lm_loss(model, xy) -> torch.Tensor:
    """Next-byte cross-entropy (the loss both optimisers train on)."""
    x, y = xy
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def adamw_step(s: Setup, base, variant: str, xy, update: bool = True):
    """(step function, facts) of AdamW on a float copy of ``base`` in ``variant``; ``update=False``: forward and
    backward only (the gradients form, AdamW does not step). Eager steps use fused AdamW; graphed ones
    ``AdamW(fused=True, capturable=True)``."""
    # each build compiles afresh: transformers' forwards share one deprecate_kwarg wrapper, whose frames (compiled
    # apart at graph breaks) would otherwise reach dynamo's recompile limit over several builds and run eager
    torch._dynamo.reset()
    model = copy.deepcopy(base).to(s.device)
    cuda = s.device.type == "cuda"
    graph = "graph" in variant and cuda
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=ADAMW_BETAS, weight_decay=0.1, fused=cuda,
                            capturable=graph)
    loss_fn = torch.compile(lm_loss, **s.compile_args) if "compiled" in variant else lm_loss
    out: list[torch.Tensor] = []

    def step():
        with s.autocast():
            loss = loss_fn(model, xy)
        loss.backward()
        if update:
            opt.step()
        if not graph:
            opt.zero_grad(set_to_none=True)
        out[:] = [loss.detach()]

    if not graph:
        return step, {"graphed": False}

    def warm_up():
        for _ in range(3):
            step()
        # backward in the capture then creates every .grad in the graph's pool: each replay's fresh gradient
        opt.zero_grad(set_to_none=True)

    return capture_cuda_graph(step, warm_up=warm_up).replay, {"graphed": True}


def ternary_model(s: Setup, base) -> torch.nn.Module:
    """A ternarised copy of ``base`` on the device (strict: every float parameter frozen), its linear layers on
    the Triton kernels on CUDA."""
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the warning lists the frozen norm gains)
        ternarize(model, device=s.device)
    model.to(s.device)
    if s.device.type == "cuda":
        set_linear_kernel(model, "triton")
    return model


def flip_train_step(s: Setup, model, variant: str, xy, update: bool = True) -> TrainStep:
    """A TrainStep of FlipOptimizer (``gpu`` backend on CUDA, the default rule) over ``model`` in ``variant``;
    ``update=False``: the ``none`` backend (forward and input gradients only: no votes, no flips)."""
    torch._dynamo.reset()  # (as adamw_step)
    backend = ("gpu" if s.device.type == "cuda" else "dense-fallback") if update else "none"
    opt = FlipOptimizer(model, backend=backend, seed=0)
    compile_args = (s.compile_args or True) if "compiled" in variant else False
    return TrainStep(model, opt, lm_loss, xy, cuda_graph="graph" in variant and s.device.type == "cuda",
                     compile=compile_args, autocast=s.autocast_dtype)


def ternary_step(s: Setup, base, variant: str, xy, update: bool = True):
    """(step function, facts) of FlipOptimizer on a ternarised copy of ``base`` in ``variant``: a TrainStep;
    ``update=False`` in a graph variant: forward and backward (no voter) captured here, as TrainStep captures
    only the ``gpu`` backend."""
    model = ternary_model(s, base)
    if update or not ("graph" in variant and s.device.type == "cuda"):
        step = flip_train_step(s, model, variant, xy, update)
        return (lambda: step(xy)), {"graphed": step.graphed, "eager_reason": step.eager_reason}
    torch._dynamo.reset()  # (as adamw_step)
    FlipOptimizer(model, backend="none", seed=0)
    loss_fn = torch.compile(lm_loss, **s.compile_args) if "compiled" in variant else lm_loss

    def step():
        with s.autocast():
            loss = loss_fn(model, xy)
        loss.backward()

    return capture_cuda_graph(step, warm_up=lambda: [step() for _ in range(3)]).replay, {"graphed": True}


BUILDERS = {"AdamW": adamw_step, "TrueTernary": ternary_step}
