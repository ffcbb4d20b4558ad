"""``audit(model)``: what a model holds, by kind -- ternary weights, integer training state, float parameters
and float buffers -- and a printable report (``trueternary audit``, see :func:`main`).

Categories (every registered tensor lands in exactly one):

    ternary weights        TernaryScaleTensor buffers (T_packed, E, E_accum, T_accum) and
                           IntegerBias buffers (q, exp): the state the FlipOptimizer trains
    optimiser state        not in the model: the codes FlipOptimizer keeps under the default rule
                           (the vote normaliser's moving averages), counted in the training state
    other integer state    integer buffers elsewhere (VQ usage/idle counters, MoE balance bias, ...)
    float parameters       trainable ``nn.Parameter`` (a strict ternary model has none)
    frozen parameters      registered parameters with ``requires_grad=False``
    float buffers          floating-point buffers outside the ternary state (e.g. rotary tables)
    frozen encoders        parameters of encoders attached with ``FrozenEncoder`` (not registered, not
                           trained, reported apart; the only float parameters MORPH allows)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .flags import Parser
from .layers import IntegerBias
from .optim import norm_codes_of
from .rule import FlipRule, uses_norm_memory
from .weight import ternary_weights


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def audit(model: nn.Module) -> dict:
    """Counts and bytes of every kind of state in ``model`` (see the module docstring)."""
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
    tern_train = sum(w.training_state_bytes() for w in tw) + sum(b.training_state_bytes() for b in biases)
    # what FlipOptimizer keeps beside the model under the default rule: the vote normaliser's codes
    rule = FlipRule()
    codes = norm_codes_of(model, rule.norm_block) if uses_norm_memory(rule.to_dict()) else []
    optim_bytes = sum(_nbytes(t) for c in codes for t in c.values())
    return {
        "ternary_matrices": len(tw),
        "ternary_weights": sum(w.numel() for w in tw),
        "ternary_inference_bytes": sum(w.inference_bytes() for w in tw) + sum(b.inference_bytes() for b in biases),
        "ternary_training_state_bytes": tern_train,
        "integer_biases": sum(b.n for b in biases),
        "other_integer_state_bytes": sum(e["bytes"] for e in int_state if e["persistent"]),
        "other_integer_state": int_state,
        "float_params": sum(p.numel() for _, p in float_params),
        "float_param_bytes": sum(_nbytes(p) for _, p in float_params),
        "float_param_names": [n for n, _ in float_params],
        "frozen_params": sum(p.numel() for _, p in frozen_params),
        "frozen_param_names": [n for n, _ in frozen_params],
        "float_buffers": sum(e["numel"] for e in float_buffers),
        "float_buffer_bytes": sum(e["bytes"] for e in float_buffers),
        "float_buffer_list": float_buffers,
        "frozen_encoder_params": sum(e.frozen_parameters() for e in encoders),
        "frozen_encoder_bytes": sum(e.frozen_bytes() for e in encoders),
        "optimizer_state_bytes": optim_bytes,
        "training_state_bytes": tern_train + optim_bytes + sum(e["bytes"] for e in int_state if e["persistent"])
        + sum(_nbytes(p) for _, p in float_params),
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
        f"  training-state bytes   {r['training_state_bytes']:>14,}  ({r['training_state_bytes'] * kb:,.1f} KiB:"
        f" ternary {r['ternary_training_state_bytes']:,}, FlipOptimizer's normaliser codes"
        f" {r['optimizer_state_bytes']:,}, other integer {r['other_integer_state_bytes']:,},"
        f" float params {r['float_param_bytes']:,})",
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
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .models import model_names

    p.add_argument("--model", default="morph", help="model family: " + ", ".join(model_names()))
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--float", action="store_true", help="audit the float base model (default: ternarised)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--require-zero-float", action="store_true",
                   help="exit 1 when the audited model has trainable float parameters")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")


def run(args: argparse.Namespace) -> dict:
    from .convert import ternarize
    from .models import build_model, model_names
    from .weight import DEFAULT_GROUP_SIZE

    if args.model not in model_names():
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(model_names())}")
    for flag in ("ctx", "d_model", "n_layers", "n_heads"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    gs = args.group_size if args.group_size is not None else DEFAULT_GROUP_SIZE
    if gs < 1:
        raise UsageError("--group-size must be >= 1")
    try:
        model = build_model(args.model, seed=args.seed, ctx=args.ctx, d_model=args.d_model,
                            n_layers=args.n_layers, n_heads=args.n_heads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.float:
        ternarize(model, gs)
    report = audit(model)
    title = (f"{args.model} d={args.d_model} L={args.n_layers} heads={args.n_heads} ctx={args.ctx}, "
             + ("float base model" if args.float else f"ternarised (group size {gs})"))
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
    p = Parser(prog="trueternary audit", description="What a model holds: ternary weights, integer state, "
                "float parameters and buffers.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        sys.stderr.write(f"trueternary: error: {e}\n")
        return 2
    return getattr(args, "_exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
