"""Torch-free settings that the library and the command line share: the flip rule's hyper-parameters
(:class:`FlipRule`, its modes), the default group sizes (the library's, and a run's by model family), the
learning-rate schedule's default shape, and the names flags choose from (training configurations, model families,
GGUF tensor types).

Nothing here imports torch, so ``trueternary <command> --help`` builds its parser without it. Each name is defined
here once; the modules that use it at run time re-export it (``rule.FlipRule``, ``weight.DEFAULT_GROUP_SIZE``,
``recipes.CONFIG_NAMES``, ``export.TYPES``). Three tuples stand for registries that need torch to read, and
tests/test_cli.py pins them to those: :data:`CONFIG_NAMES` (``recipes.RECIPES``), :data:`MODEL_NAMES` (the built-in
families of ``trueternary.models``) and :data:`GGUF_TYPES` (``export.tq`` and ``export.gguf_file``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# ------------------------------------------------------------------------------------ names flags choose from
# The training configurations, in recipes.RECIPES's order (train --config, bench --configs).
CONFIG_NAMES = ("Adam_FP32", "BitNet_QAT", "SignSGD_Old", "TrueTernary", "TrueTernary_Naive", "TrueTernary_Hybrid")
# The model families trueternary.models defines, as models.model_names() lists them (sorted; --model).
MODEL_NAMES = ("llama", "morph", "transformer")
# Tensor types of trueternary export (--type): the ternary ones of export.tq, then the dense ones.
GGUF_TYPES = ("tq1_0", "tq2_0", "f16", "f32")
DEFAULT_GGUF_TYPE = "tq2_0"

# ------------------------------------------------------------------------------------ defaults
DEFAULT_GROUP_SIZE = 64  # weights per int8 scale E: the library's, and a run's unless its family has its own below
# A run's group size when --group_size is not given, by model family (train, bench, audit): llama is the family meant
# for llama.cpp, whose TQ1_0 / TQ2_0 keep one fp16 scale per 256 weights, so its default run exports exactly, for a
# small cost in learning (measured: docs/export.md, "The group size").
FAMILY_GROUP_SIZES = {"llama": 256}


def default_group_size(model: str) -> int:
    """The group size of a run of model family ``model`` when none is given (:data:`FAMILY_GROUP_SIZES`, else
    :data:`DEFAULT_GROUP_SIZE`)."""
    return FAMILY_GROUP_SIZES.get(model, DEFAULT_GROUP_SIZE) if isinstance(model, str) else DEFAULT_GROUP_SIZE


# The defaults of --group_size as the help of train, bench and audit states them: "64; 256 for --model llama".
GROUP_SIZE_DEFAULTS = "; ".join([str(DEFAULT_GROUP_SIZE)]
                                + [f"{g} for --model {m}" for m, g in FAMILY_GROUP_SIZES.items()])
# The learning-rate schedule (recipes.lr_factor): linear warm-up over this fraction of the steps, then cosine decay
# to this fraction of the peak (recipes.Hparams; bench --warmup_frac, --min_lr_frac).
WARMUP_FRAC = 0.05
MIN_LR_FRAC = 0.1

# ------------------------------------------------------------------------------------ the flip rule
INT8_MAX = 127
VOTE_MODES = ("sign", "stochastic")
NORMALIZE_MODES = ("tensor", "block_factored")
ACCUM_INITS = ("residual", "zero")
NAIVE_ACCUM_THRESHOLD = 8  # the seed rule's threshold (FlipRule.naive; recipes.Hparams.naive_threshold)


@dataclass
class FlipRule:
    """Hyper-parameters of the flip rule. ``FlipRule.naive()`` is the seed's plain rule."""

    vote: str = "stochastic"
    normalize: str = "block_factored"
    norm_block: int = 128  # tile edge of normalize='block_factored'
    accum_threshold: int = 32
    lr: float = 4.0  # expected votes per call for a typical gradient (the learning-rate analogue)
    vote_clip: int = 8
    vote_power: float = 1.0  # expected vote ~ sign(g) * |g / sqrt(ms)|**vote_power (1: proportional)
    decay: float = 0.0  # votes toward 0 for non-zero trits per call (weight-decay analogue; docs/learning.md)
    leak: int = 0  # if > 0, T_accum loses |T_accum| >> leak each step (an integer EMA, like Bop's momentum)
    clip_at_bounds: bool = True
    flip_reset: int = 0  # T_accum after a flip points back by this many votes (0 <= flip_reset < accum_threshold)
    scale_vote: str = "stochastic"
    scale_threshold: int = 32
    scale_lr: float = 0.05  # scale-vote scale relative to ``lr`` (so schedules drive both); see for_run()
    scale_update_interval: int = 1  # 0 disables scale updates
    accum_init: str = "residual"  # T_accum when a float weight is ternarised: its rounding residual, or "zero"
    norm_beta: float = 0.95  # > 0: 'block_factored' statistics are moving averages over steps (0: this call's)
    # a weight summing more than width_ref inputs votes at lr * sqrt(width_ref / fan_in) (vote_width_scale); 0: off
    width_ref: int = 1024
    # ... and, when the run steps on fewer than tokens_ref tokens (batch_tokens: batch x ctx, set by the recipe;
    # 0: not known), times sqrt(batch_tokens / tokens_ref) (vote_width_scale); tokens_ref 0: off
    tokens_ref: int = 2048
    batch_tokens: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.vote not in VOTE_MODES:
            raise ValueError(f"vote must be one of {VOTE_MODES}, got {self.vote!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if isinstance(self.norm_block, bool) or not isinstance(self.norm_block, int) or self.norm_block < 1:
            raise ValueError(f"norm_block must be a positive integer, got {self.norm_block!r}")
        if isinstance(self.leak, bool) or not isinstance(self.leak, int) or not 0 <= self.leak <= 7:
            raise ValueError(f"leak must be an integer shift in [0, 7], got {self.leak!r}")
        if self.accum_init not in ACCUM_INITS:
            raise ValueError(f"accum_init must be one of {ACCUM_INITS}, got {self.accum_init!r}")
        if self.scale_vote not in VOTE_MODES:
            raise ValueError(f"scale_vote must be one of {VOTE_MODES}, got {self.scale_vote!r}")
        for name in ("accum_threshold", "scale_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= INT8_MAX:
                raise ValueError(f"{name} must be an integer in [1, {INT8_MAX}], got {v!r}")
        fr = self.flip_reset
        if isinstance(fr, bool) or not isinstance(fr, int) or not 0 <= fr < self.accum_threshold:
            raise ValueError(f"flip_reset must be an integer in [0, accum_threshold), got {fr!r}")
        if isinstance(self.vote_clip, bool) or not isinstance(self.vote_clip, int) or not (
            1 <= self.vote_clip <= INT8_MAX
        ):
            raise ValueError(f"vote_clip must be an integer in [1, {INT8_MAX}], got {self.vote_clip!r}")
        for name in ("width_ref", "tokens_ref", "batch_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        iv = self.scale_update_interval
        if isinstance(iv, bool) or not isinstance(iv, int) or iv < 0:
            raise ValueError(f"scale_update_interval must be an integer >= 0, got {iv!r}")
        if not isinstance(self.vote_power, (int, float)) or not 0 < self.vote_power <= 2:
            raise ValueError(f"vote_power must be in (0, 2], got {self.vote_power!r}")
        nb = self.norm_beta
        if not isinstance(nb, (int, float)) or not 0 <= nb < 1:
            raise ValueError(f"norm_beta must be in [0, 1), got {nb!r}")
        for name in ("lr", "scale_lr", "decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0 or v != v or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def for_run(cls, steps: int, **overrides) -> FlipRule:
        """The defaults for a run of ``steps`` optimiser steps: ``scale_lr = min(0.25, 75 / steps)``.

        Scale votes are normalised to a fixed rate, so noise alone moves a group's ``E`` after about
        ``(scale_threshold / (lr * scale_lr))**2`` steps while a consistent gradient needs the square root of
        that. Tying the rate to the run length keeps both right: the scales can move a few doublings over any
        run, and noise flips a group's scale of the order of ``50 / steps`` times. Measured (docs/learning.md):
        0.05 at 1500 steps beat 0.25 by 0.11 bits/byte on the d=512 model; 0.25 beat 0.05 on runs of 150-300
        steps.
        Fields in ``overrides`` win (an explicit ``scale_lr`` included).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return cls.from_dict({"scale_lr": min(0.25, 75.0 / steps), **overrides})

    @classmethod
    def naive(cls, accum_threshold: int = NAIVE_ACCUM_THRESHOLD, scale_update_interval: int = 1) -> FlipRule:
        """The seed's rule: one sign vote per weight per step, reset on flip, E voted the same way."""
        return cls(
            vote="sign",
            normalize="tensor",
            accum_threshold=accum_threshold,
            clip_at_bounds=False,
            scale_vote="sign",
            scale_threshold=accum_threshold,
            scale_update_interval=scale_update_interval,
            accum_init="zero",
            width_ref=0,
            tokens_ref=0,
        )

    def init_accum_threshold(self) -> int | None:
        """What ``ternarize(..., accum_threshold=)`` takes for this rule: ``accum_threshold`` when the
        accumulators start at the rounding residual (``accum_init='residual'``), else None (zeros)."""
        return self.accum_threshold if self.accum_init == "residual" else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlipRule:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FlipRule fields: {sorted(unknown)}")
        return cls(**d)
