"""``audit(model)``: what a model holds, by kind -- ternary weights, integer training state, float parameters
and float buffers -- and a printable report. ``trueternary audit`` (:func:`run`) audits the model ``trueternary
train`` builds from its flags (by default train's default: TrueTernary, transformer d_model 128, 2 layers), or the
model and optimiser state of a checkpoint (``--ckpt``).

Categories (every registered tensor lands in exactly one):

    ternary weights        TernaryScaleTensor buffers (T_packed, E, E_accum, T_accum) and
                           IntegerBias buffers (q, exp): the state the FlipOptimizer trains
    optimiser state        not in the model: the tensors the optimisers keep, e.g. the FlipOptimizer's
                           vote-normaliser codes (norm_beta), counted in the training state
    other integer state    integer buffers elsewhere (VQ usage/idle counters, MoE balance bias, ...)
    float parameters       trainable ``nn.Parameter`` (a strict ternary model has none)
    frozen parameters      registered parameters with ``requires_grad=False``
    float buffers          floating-point buffers outside the ternary state (e.g. rotary tables)
    frozen encoders        parameters of encoders attached with ``FrozenEncoder`` (not registered, not
                           trained, reported apart; the only float parameters MORPH allows)

The training-state bytes are :func:`trueternary.memory.training_state`'s, the count ``bench`` and ``project``
report too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .arguments import audit_arguments as add_arguments
from .errors import UsageError
from .flags import Parser
from .layers import IntegerBias
from .memory import training_state
from .rule import FlipRule
from .weight import ternary_weights


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def audit(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), rule: FlipRule | None = None) -> dict:
    """Counts and bytes of every kind of state in ``model`` (see the module docstring). The optimiser state is
    that of ``optimizers``, or without them of a FlipOptimizer under ``rule`` (memory.training_state)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit expects an nn.Module, got {type(model).__name__}")
    from .components.encoders import FrozenEncoder

    tw = ternary_weights(model)
    biases = [m for m in model.modules() if isinstance(m, IntegerBias)]
    owned = {id(t) for m in (*tw, *biases) for t in m.buffers(recurse=False)}
    float_params, frozen_params = [], []
    for name, p in model.named_parameters():
        (float_params if p.requires_grad else frozen_params).append((name, p))
    float_buffers, int_state = [], []
    for mod_name, mod in model.named_modules():
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, b in mod.named_buffers(recurse=False):
            if b is None or id(b) in owned:
                continue
            full = f"{mod_name}.{bname}" if mod_name else bname
            entry = {"name": full, "shape": list(b.shape), "dtype": str(b.dtype).replace("torch.", ""),
                     "numel": b.numel(), "bytes": _nbytes(b), "persistent": bname not in non_persistent}
            (float_buffers if b.is_floating_point() else int_state).append(entry)
    encoders = [m for m in model.modules() if isinstance(m, FrozenEncoder)]
    state = training_state(model, optimizers, rule)
    return {
        "ternary_matrices": len(tw),
        "ternary_weights": sum(w.numel() for w in tw),
        "ternary_inference_bytes": sum(w.inference_bytes() for w in tw) + sum(b.inference_bytes() for b in biases),
        "ternary_training_state_bytes": state["ternary"],
        "integer_biases": sum(b.n for b in biases),
        "other_integer_state_bytes": state["other_integer"],
        "other_integer_state": int_state,
        "float_params": sum(p.numel() for _, p in float_params),
        "float_param_bytes": state["float_params"],
        "float_grad_bytes": state["float_grads"],
        "float_param_names": [n for n, _ in float_params],
        "frozen_params": sum(p.numel() for _, p in frozen_params),
        "frozen_param_names": [n for n, _ in frozen_params],
        "float_buffers": sum(e["numel"] for e in float_buffers),
        "float_buffer_bytes": sum(e["bytes"] for e in float_buffers),
        "float_buffer_list": float_buffers,
        "frozen_encoder_params": sum(e.frozen_parameters() for e in encoders),
        "frozen_encoder_bytes": sum(e.frozen_bytes() for e in encoders),
        "optimizer_state_bytes": state["optimizer"],
        "training_state_bytes": state["total"],
        "training_state_bytes_per_weight": state["total"] / max(1, sum(w.numel() for w in tw)
                                                                 or sum(p.numel() for _, p in float_params)),
    }


def _names(names: list[str], shown: int = 6) -> str:
    if not names:
        return ""
    return f"  ({', '.join(names[:shown])}{' ...' if len(names) > shown else ''})"


def format_audit(report: dict, title: str = "model") -> str:
    """A human-readable table of :func:`audit`'s result."""
    kb = 1 / 1024
    r = report
    lines = [
        f"audit: {title}",
        f"  ternary weights        {r['ternary_weights']:>14,}  in {r['ternary_matrices']} matrices"
        f"   (+{r['integer_biases']:,} integer bias values)",
        f"  inference bytes        {r['ternary_inference_bytes']:>14,}  ({r['ternary_inference_bytes'] * kb:,.1f} KiB:"
        " packed trits + scales)",
        f"  training-state bytes   {r['training_state_bytes']:>14,}  ({r['training_state_bytes'] * kb:,.1f} KiB,"
        f" {r['training_state_bytes_per_weight']:.3f} B/weight: ternary {r['ternary_training_state_bytes']:,},"
        f" optimiser state {r['optimizer_state_bytes']:,}, other integer {r['other_integer_state_bytes']:,},"
        f" float params {r['float_param_bytes']:,} and their gradients {r['float_grad_bytes']:,})",
        f"  float params           {r['float_params']:>14,}{_names(r['float_param_names'])}",
        f"  frozen params          {r['frozen_params']:>14,}",
        f"  frozen encoder params  {r['frozen_encoder_params']:>14,}  (attached frozen encoders, not trained)",
        f"  float buffers          {r['float_buffers']:>14,}  ({r['float_buffer_bytes']:,} bytes)",
    ]
    for e in r["float_buffer_list"]:
        kind = "" if e["persistent"] else ", not saved"
        lines.append(f"      {e['name']:<40} {e['dtype']:>8} {str(tuple(e['shape'])):>14}{kind}")
    if r["other_integer_state"]:
        lines.append("  other integer state")
        for e in r["other_integer_state"]:
            kind = "" if e["persistent"] else ", not saved"
            lines.append(f"      {e['name']:<40} {e['dtype']:>8} {str(tuple(e['shape'])):>14}{kind}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
_MODEL_FLAGS = ("model", "d_model", "n_layers", "n_heads", "ctx", "group_size", "seed")


def _built(args: argparse.Namespace) -> tuple[nn.Module, list, FlipRule | None, str]:
    """(model, optimisers, rule, title) of what ``trueternary train`` builds from these flags (its default
    config, on the CPU), or with ``--float`` its float base model."""
    from .models import build_model
    from .train import build_training_recipe
    from .trainconfig import TrainConfig, model_config, validate

    given = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    cfg = TrainConfig(**given, device="cpu", update_backend="dense-fallback")  # (the backend does not change the state)
    hp = validate(cfg)
    shape = f"{cfg.model} d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads} ctx={cfg.ctx}"
    if args.float:
        try:
            model = build_model(cfg.model, seed=cfg.seed, **model_config(cfg))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return model, [], None, f"{shape}, float base model"
    recipe = build_training_recipe(cfg, hp, model_config(cfg), torch.device("cpu"))
    return (recipe.model, recipe.optimizers, hp.rule,
            f"{shape}, {cfg.config} as trueternary train builds it (group size {cfg.group_size})")


def _checkpoint(path: str) -> tuple[nn.Module, list, FlipRule | None, str]:
    """(model, optimisers, rule, title) of a checkpoint: the model and optimisers train would resume, with the
    checkpoint's state in them."""
    from . import checkpoint as ckpt_io
    from .train import build_training_recipe, resume_source
    from .trainconfig import TrainConfig, merge_resumed, validate

    source = resume_source(TrainConfig(resume=path))
    ckpt = ckpt_io.load_checkpoint(source)
    cfg = merge_resumed(ckpt, TrainConfig(), set())
    cfg.device, cfg.update_backend = "cpu", "dense-fallback"
    hp = validate(cfg)
    recipe = build_training_recipe(cfg, hp, ckpt.meta["model"]["config"], torch.device("cpu"))
    ckpt_io.restore_recipe(recipe, ckpt)
    title = (f"{ckpt.path}: {cfg.config} at step {ckpt.step}, {cfg.model} d={cfg.d_model} L={cfg.n_layers} "
             f"heads={cfg.n_heads} ctx={cfg.ctx}")
    return recipe.model, recipe.optimizers, hp.rule, title


def run(args: argparse.Namespace) -> dict:
    if args.ckpt is not None:
        given = [f"--{k}" for k in _MODEL_FLAGS if getattr(args, k) is not None] + (["--float"] * args.float)
        if given:
            raise UsageError(f"--ckpt audits the checkpoint's own model; {', '.join(given)} cannot change it")
        model, optimizers, rule, title = _checkpoint(args.ckpt)
    else:
        model, optimizers, rule, title = _built(args)
    report = audit(model, optimizers, rule)
    print(format_audit(report, title))
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1))
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    if args.require_zero_float and report["float_params"]:
        args._exit_code = 1
    return report


def main(argv: list[str] | None = None) -> int:
    """``trueternary audit`` as a standalone entry point: one-line errors, exit 2 on bad input."""
    from .errors import USAGE_ERRORS

    p = Parser(prog="trueternary audit", description="What a model holds: ternary weights, integer state, "
                "float parameters and buffers.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except USAGE_ERRORS as e:
        sys.stderr.write(f"trueternary: error: {e}\n")
        return 2
    return getattr(args, "_exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
