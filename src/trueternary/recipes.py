"""Training configurations ("recipes") shared by ``trueternary train`` and ``trueternary bench``.

A recipe turns one *base* float model into a trainable configuration: which weight representation,
which update rule, which learning-rate (or vote-scale) schedule. All recipes use the same schedule
shape (linear warm-up, cosine decay to ``min_lr_frac``), so only the representation and the rule
differ.

    Adam_FP32           float weights, AdamW (bf16 autocast on GPU)
    BitNet_QAT          fp32 latent weights, absmean-STE ternary forward, AdamW      (state of the art)
    SignSGD_Old         fp32 latent weights, absmean-STE ternary forward, SignGSD     (the seed's latent baseline)
    TrueTernary         strict: packed trits + int8 accumulators, FlipOptimizer, zero float parameters
    TrueTernary_Naive   strict, the seed's plain sign-vote rule (kept to show why it fails)
    TrueTernary_Hybrid  trits by votes, float log2 scales by AdamW (non-strict)

Each is a builder function registered with ``@recipe(name, weights, default_lr)`` in :data:`RECIPES`;
``TERNARY_CONFIGS`` and ``LATENT_CONFIGS`` are read from the registry, ``CONFIG_NAMES`` (its names, in order) is
the torch-free ``settings.CONFIG_NAMES`` that the command line shows (tests/test_cli.py pins the two together), and
``build_recipe`` looks the name up in the registry. ``Hparams.for_run`` is the one way ``train`` and ``bench``
build the hyper-parameters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .backends import DEFAULT_UPDATE_BACKEND, UpdateBackend, resolve_backend
from .convert import ternarize
from .init import float_copy
from .layers import IntegerBias, set_linear_kernel
from .optim import ADAMW_BETAS, HYBRID_SCALE_LR, FlipOptimizer, SignGSD, hybrid_optimizers
from .optim.train_step import capture_cuda_graph, warm_up_and_restore
from .qat import fake_ternarize, forward_trits
from .rule import NAIVE_ACCUM_THRESHOLD, FlipRule, vote_width_scale
from .settings import CONFIG_NAMES, MIN_LR_FRAC, WARMUP_FRAC
from .weight import DEFAULT_GROUP_SIZE, ternary_weights


@dataclass
class Hparams:
    """A run's hyper-parameters (all configs'); build them with :meth:`for_run`, as ``train`` and ``bench`` do."""

    steps: int = 200
    warmup_frac: float = WARMUP_FRAC
    min_lr_frac: float = MIN_LR_FRAC
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    group_size: int = DEFAULT_GROUP_SIZE
    lr: dict = field(default_factory=dict)  # per-config overrides
    rule: FlipRule | None = None  # None: FlipRule.for_run(steps)
    naive_threshold: int = NAIVE_ACCUM_THRESHOLD
    qat_quantizer: str = "absmean"  # the latent configs' forward: BitNet's, or "group_pow2" (TrueTernary's format)
    hybrid_scale_lr: float = HYBRID_SCALE_LR

    def __post_init__(self) -> None:
        if self.rule is None:
            self.rule = FlipRule.for_run(self.steps)

    @classmethod
    def for_run(cls, steps: int, *, lr: dict | None = None, rule: dict | None = None,
                accum_threshold: int | None = None, scale_update_interval: int | None = None,
                group_size: int | None = None, warmup_frac: float | None = None,
                min_lr_frac: float | None = None, batch_tokens: int | None = None) -> Hparams:
        """The hyper-parameters of a run of ``steps`` optimiser steps: these defaults and
        ``FlipRule.for_run(steps)``'s, with every argument that is not None on top. ``lr``: peak learning rates by
        config name; ``rule``: FlipRule field overrides, under ``scale_update_interval``, ``accum_threshold``
        (which is the naive rule's threshold too) and ``batch_tokens`` (tokens per optimiser step, batch x ctx:
        ``rule.vote_width_scale``). ValueError / TypeError for a bad rule field."""
        over = dict(rule or {})
        if batch_tokens is not None:
            over.setdefault("batch_tokens", batch_tokens)
        if scale_update_interval is not None:
            over["scale_update_interval"] = scale_update_interval
        if accum_threshold is not None:
            over["accum_threshold"] = accum_threshold
        given = {"group_size": group_size, "warmup_frac": warmup_frac, "min_lr_frac": min_lr_frac,
                 "naive_threshold": accum_threshold}
        return cls(steps=steps, rule=FlipRule.for_run(steps, **over), lr=dict(lr or {}),
                   **{k: v for k, v in given.items() if v is not None})

    def lr_for(self, name: str) -> float:
        if name in self.lr:
            return float(self.lr[name])
        v = RECIPES[name].default_lr
        return float(self.rule.lr if v is None else v)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rule"] = self.rule.to_dict()
        return d


def lr_factor(step: int, steps: int, warmup_frac: float, min_frac: float) -> float:
    """Linear warm-up over ``warmup_frac * steps`` then cosine decay to ``min_frac`` at ``steps``."""
    warm = max(1, int(round(warmup_frac * steps)))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, steps - warm))
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


class Recipe:
    """A model plus the optimisers that train it, with one method per training step."""

    def __init__(self, name: str, model: nn.Module, optimizers: list, hp: Hparams,
                 flip: FlipOptimizer | None = None, float_clip: bool = True) -> None:
        self.name, self.model, self.optimizers, self.hp, self.flip = name, model, optimizers, hp, flip
        # The module train_step calls: the model, or its DistributedDataParallel wrapper under data
        # parallelism (trueternary.distributed.prepare_recipe); state and evaluation always use ``model``.
        self.forward_model: nn.Module = model
        self.float_clip = float_clip
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in optimizers]
        self.step_count = 0
        self._trits: dict | None = None  # latent configs, after watch_forward_trits(): the last snapshot
        self._graph = None  # use_cuda_graph(): (CUDA graph of the whole step, its static x, y, loss)

    def set_lr(self, step: int) -> float:
        f = lr_factor(step, self.hp.steps, self.hp.warmup_frac, self.hp.min_lr_frac)
        for o, lrs in zip(self.optimizers, self.base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * f
        return f

    def loss(self, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = self.forward_model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def train_step(self, x: torch.Tensor, y: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        self.set_lr(self.step_count)
        if self.flip is not None:
            self.flip.write_device_lr()  # (a no-op unless use_device_lr)
        if self._graph is not None:
            return self._replay(x, y)
        # (the phases --profile_steps reports: trueternary.stepprofile)
        with record_function("trueternary.forward"):
            loss = self.loss(x, y, autocast)
        with record_function("trueternary.backward"):
            loss.backward()
        with record_function("trueternary.optimizer_step"):
            params = [p for p in self.model.parameters() if p.grad is not None]
            if params and self.float_clip and self.hp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.hp.grad_clip)
            for o in self.optimizers:
                o.step()
            for o in self.optimizers:
                o.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss.detach()

    # ------------------------------------------------------------------ CUDA graph of the whole step
    def use_cuda_graph(self, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> None:
        """Capture the whole training step (forward, backward with every vote, ``FlipOptimizer.step``) in one
        CUDA graph; every later :meth:`train_step` copies its batch into the graph's inputs and replays it.

        For TrueTernary configs on the ``gpu`` backend (their step does no host sync: docs/performance.md,
        "CUDA graphs"), in one process or data-parallel over NCCL (the graph holds the gradient exchange's
        collectives; docs/distributed.md), batches of ``x``'s shape. The lr moves through a device tensor
        (``FlipOptimizer.use_device_lr``). The NaN/inf gradient check stays on the device
        (``FlipOptimizer.defer_finite_check``): a step whose layer gradients had NaN/inf returns a NaN loss instead
        of raising, so callers check the loss (``trueternary train`` does, every step, and then reads
        :meth:`nonfinite_layers_last_step`); that step's flips are applied. Capturing runs a few warm-up
        steps on a side stream (kernels compile, device buffers appear) and then restores the model and
        optimiser state they changed, so the run continues exactly from where it was."""
        from .ops.votes import fused_votes_supported

        flip = self.flip
        if flip is None or self.optimizers != [flip] or flip.backend is not UpdateBackend.GPU:
            raise ValueError("a CUDA-graphed step needs a TrueTernary config (no float parameters) on the 'gpu' "
                             "backend and a CUDA device")
        # one process: votes on the dense path key their random numbers from the host step, which a graph would
        # freeze (data parallel: every vote is cast in step(), from the device step: optim/data_parallel.py)
        if flip.world_size == 1 and (not all(fused_votes_supported(g) for g in flip.param_groups) or any(
                isinstance(m, IntegerBias) for m in self.model.modules())):
            raise ValueError("a CUDA-graphed step needs every vote on the fused kernels: this rule (or an integer "
                             "bias) takes the dense path, whose random keys come from the host step")
        if x.device.type != "cuda":
            raise ValueError("a CUDA-graphed step runs on a CUDA device")
        if flip.world_size > 1 and not flip.comm.capturable:
            raise ValueError("a CUDA-graphed data-parallel step needs the NCCL backend (a graph can hold NCCL's "
                             "collectives, not gloo's)")
        flip.defer_finite_check(x.device)
        flip.use_device_lr(x.device)
        sx, sy = x.clone(), y.clone()
        out: list[torch.Tensor] = []

        def whole_step() -> None:
            loss = self.loss(sx, sy, autocast)
            loss.backward()
            flip.step()
            # NaN/inf in a layer's gradient: a NaN loss (the host reads the loss, not the count)
            out[:] = [loss.detach().masked_fill(flip.last_step_nonfinite > 0, float("nan"))]

        graph = capture_cuda_graph(whole_step, warm_up=lambda: warm_up_and_restore(self.model, flip, whole_step, 3,
                                                                                     x.device))
        flip.after_graph_capture()
        self._graph = (graph, sx, sy, out[0])

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        graph, sx, sy, loss = self._graph
        if x.shape != sx.shape or y.shape != sy.shape:
            raise ValueError(f"a CUDA-graphed step takes batches of shape {tuple(sx.shape)}, got {tuple(x.shape)}")
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
        self.flip.after_graph_replay()
        self.step_count += 1
        return loss.clone()

    def nonfinite_layers_last_step(self) -> int:
        """Layer gradients with NaN/inf in the last CUDA-graphed step (a host read; 0 for an eager step, whose
        optimiser raises ``NonFiniteGradientError`` instead)."""
        count = self.flip.last_step_nonfinite if self.flip is not None and self._graph is not None else None
        return 0 if count is None else int(count)

    def watch_forward_trits(self) -> None:
        """Make ``flips_last_step`` count a latent config's forward-trit changes (a benchmark diagnostic: it
        snapshots every forward trit to the host once per step, so training loops leave it off)."""
        if self.name in LATENT_CONFIGS:
            self._trits = forward_trits(self.model)

    def flips_last_step(self) -> int:
        """Trits that changed in the last step: the flip engine's count; for a latent-weight config watched
        with ``watch_forward_trits`` the forward trits that differ from the previous call's; else 0."""
        if self.flip is not None:
            return int(self.flip.last_flips)
        if self._trits is None:
            return 0
        now = forward_trits(self.model)
        n = sum(int((now[k] != self._trits[k]).sum()) for k in now)
        self._trits = now
        return n

    # ------------------------------------------------------------------ memory accounting
    def state_report(self) -> dict:
        """Every byte of training state (memory.training_state: measured from the tensors that exist, a
        FlipOptimizer's normaliser codes counted from its first vote's on), weights and the bytes to ship."""
        from .memory import training_state

        m = self.model
        n_float = sum(p.numel() for p in m.parameters())
        tw = ternary_weights(m)
        n_tern = sum(w.numel() for w in tw)
        state = training_state(m, self.optimizers)
        if tw:
            weight_bytes = sum(w.inference_bytes() for w in tw) + sum(
                b.inference_bytes() for b in m.modules() if isinstance(b, IntegerBias)
            )
        else:
            weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
        n_weights = n_tern if tw else n_float
        return {
            "float_params": n_float,
            "ternary_weights": n_tern,
            "model_weight_bytes": weight_bytes,
            "optimizer_state_bytes": state["optimizer"],
            "training_state_bytes": state["total"],
            "training_state_bytes_per_weight": state["total"] / max(1, n_weights),
        }


# ------------------------------------------------------------------------------------ the registry
# (config name, model: a float copy of the base on the run's device, or for ternary configs a deep copy of the base
# that the builder ternarises onto the device, hp, peak lr (Hparams.lr_for), update backend (resolved for ternary
# configs), seed, device) -> Recipe
Builder = Callable[[str, nn.Module, Hparams, float, UpdateBackend, int, torch.device | str], Recipe]


@dataclass(frozen=True)
class RecipeEntry:
    """A training configuration: how it is built and what its weights are."""

    build: Builder
    weights: str  # "float", "latent" (float latent weights behind a ternary forward) or "ternary"
    default_lr: float | None  # peak learning rate (vote scale); None: the rule's (FlipRule.lr)


RECIPES: dict[str, RecipeEntry] = {}  # by config name, in the order they are listed to users


def recipe(name: str, weights: str, default_lr: float | None = None) -> Callable[[Builder], Builder]:
    """Register the decorated builder as config ``name`` (see :class:`RecipeEntry`)."""
    if weights not in ("float", "latent", "ternary"):
        raise ValueError(f"weights must be 'float', 'latent' or 'ternary', got {weights!r}")

    def register(build: Builder) -> Builder:
        if name in RECIPES:
            raise ValueError(f"config {name!r} is registered twice")
        RECIPES[name] = RecipeEntry(build, weights, default_lr)
        return build

    return register


# Peak learning rates (vote scale for TrueTernary), tuned on the development corpus; see docs/learning.md.
@recipe("Adam_FP32", "float", default_lr=2e-3)
def _adam_fp32(name, model, hp, lr, backend, seed, device) -> Recipe:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=hp.weight_decay)
    return Recipe(name, model, [opt], hp)


@recipe("BitNet_QAT", "latent", default_lr=3e-3)
def _bitnet_qat(name, model, hp, lr, backend, seed, device) -> Recipe:
    fake_ternarize(model, hp.qat_quantizer, hp.group_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=hp.weight_decay)
    return Recipe(name, model, [opt], hp)


@recipe("SignSGD_Old", "latent", default_lr=1e-4)
def _signsgd_old(name, model, hp, lr, backend, seed, device) -> Recipe:
    fake_ternarize(model, hp.qat_quantizer, hp.group_size)
    opt = SignGSD(model.parameters(), lr=lr, weight_decay=0.0)
    return Recipe(name, model, [opt], hp, float_clip=False)


@torch.no_grad()
def scale_residual_accumulators(model: nn.Module, rule: FlipRule) -> None:
    """Scale each ternary weight's initial ``T_accum`` (its rounding residual, ``accum_init='residual'``) by the
    factor its votes get, ``rule.vote_width_scale``: the residual stands for votes already cast, and a wider layer
    casts proportionally fewer. Without it the trits that start next to the threshold flip together in the first
    steps, at any lr, which is what made wide models' loss jump (docs/learning.md, "Width"). Rounds to the
    nearest integer (ties to even), the same on every device; weights at or below ``width_ref`` are untouched."""
    if rule.init_accum_threshold() is None:
        return
    for w in ternary_weights(model):
        s = vote_width_scale(rule.width_ref, w.vote_fan_in, rule.batch_tokens, rule.tokens_ref)
        if s != 1.0:
            w.T_accum.copy_(torch.round(w.T_accum.float() * s).to(torch.int8))


@recipe("TrueTernary", "ternary")
def _true_ternary(name, model, hp, lr, backend, seed, device) -> Recipe:
    ternarize(model, hp.group_size, accum_threshold=hp.rule.init_accum_threshold(), device=device).to(device)
    scale_residual_accumulators(model, hp.rule)
    set_linear_kernel(model, backend.linear_kernel)
    flip = FlipOptimizer(model, lr=lr, rule=hp.rule, backend=backend, seed=seed)
    return Recipe(name, model, [flip], hp, flip=flip)


@recipe("TrueTernary_Naive", "ternary")
def _true_ternary_naive(name, model, hp, lr, backend, seed, device) -> Recipe:
    ternarize(model, hp.group_size, device=device).to(device)
    set_linear_kernel(model, backend.linear_kernel)
    rule = FlipRule.naive(hp.naive_threshold, hp.rule.scale_update_interval)
    flip = FlipOptimizer(model, rule=rule, backend=backend, seed=seed)  # (the seed rule has no lr)
    return Recipe(name, model, [flip], hp, flip=flip)


@recipe("TrueTernary_Hybrid", "ternary")
def _true_ternary_hybrid(name, model, hp, lr, backend, seed, device) -> Recipe:
    # float log2 scales: its linear layers run dense whatever their kernel
    ternarize(model, hp.group_size, scale_mode="float", accum_threshold=hp.rule.init_accum_threshold(),
              device=device).to(device)
    scale_residual_accumulators(model, hp.rule)
    set_linear_kernel(model, backend.linear_kernel)
    flip, adam = hybrid_optimizers(model, scale_lr=hp.hybrid_scale_lr, lr=lr, rule=hp.rule, backend=backend,
                                   seed=seed)
    return Recipe(name, model, [flip, adam], hp, flip=flip)


TERNARY_CONFIGS = tuple(n for n, e in RECIPES.items() if e.weights == "ternary")
LATENT_CONFIGS = tuple(n for n, e in RECIPES.items() if e.weights == "latent")


def build_recipe(name: str, base_model: nn.Module, hp: Hparams, device: torch.device | str = "cpu",
                 backend: UpdateBackend | str = DEFAULT_UPDATE_BACKEND, seed: int = 0) -> Recipe:
    """Make config ``name`` from a deep copy of ``base_model`` (the base is left untouched). A ternary config's
    linear layers run on the kernels that go with its update ``backend`` (``UpdateBackend.linear_kernel``).

    A ternary config is built on ``device`` one layer at a time (``ternarize(device=)``), never holding the float
    model there; from a lazy base (``build_model(lazy=True)``) it never holds the float model anywhere."""
    if name not in RECIPES:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIG_NAMES)}")
    entry = RECIPES[name]
    lr = hp.lr_for(name)
    if entry.weights == "ternary":  # (the others have no update backend)
        model = copy.deepcopy(base_model)  # ternarised onto the device by the builder, layer by layer
        return entry.build(name, model, hp, lr, resolve_backend(backend), seed, device)
    return entry.build(name, float_copy(base_model, device), hp, lr, backend, seed, device)
