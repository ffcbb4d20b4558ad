"""The flags of ``trueternary bench``, ``generate``, ``project``, ``audit`` and ``export`` (``train``'s are
``trainconfig.add_arguments``, beside ``TrainConfig``), and the bounds ``project`` checks its flags against.

Torch-free, like every module it imports (``flags``, ``settings``, ``backends``, ``trainconfig``): ``trueternary
<command> --help``, and a flag that argparse refuses, are answered from here without loading torch; ``cli`` imports
the command's own module, and with it torch, only to run it. Each command module re-exports its function here as
``add_arguments``.
"""

from __future__ import annotations

import argparse

from .backends import DEFAULT_UPDATE_BACKEND, UPDATE_BACKENDS
from .flags import THREADS_HELP
from .settings import (
    CONFIG_NAMES,
    DEFAULT_GGUF_TYPE,
    DEFAULT_GROUP_SIZE,
    GGUF_TYPES,
    GROUP_SIZE_DEFAULTS,
    MIN_LR_FRAC,
    MODEL_NAMES,
    WARMUP_FRAC,
    FlipRule,
)
from .trainconfig import TrainConfig

# project: the shapes it derives from --params have heads of HEAD_DIM (project.shape_for_params; the default of
# --n_heads). The tables are closed formulas (time and memory independent of the sizes); the bounds keep them
# meaningful: 1e15 weights is a thousand times the largest models trained, and the shape flags stay within what
# such a model could use (2**24 positions: float32 counts them exactly).
HEAD_DIM = 64
MAX_PARAMS = 1e15
FLAG_BOUNDS = {"group_size": 1 << 20, "batch": 1 << 20, "ctx": 1 << 24, "d_model": 1 << 20, "n_layers": 1 << 20,
               "n_heads": 1 << 20}


def bench_arguments(p: argparse.ArgumentParser) -> None:
    """``trueternary bench`` flags. Where train has a flag for the same thing bench takes train's name too
    (``--steps`` / ``--max_steps``, ``--batch`` / ``--batch_size``); on a ``flags.Parser`` every flag has both
    spellings (``--d_model`` / ``--d-model``)."""
    p.add_argument("--configs", default="Adam_FP32,BitNet_QAT,SignSGD_Old,TrueTernary",
                   help=f"comma list of {', '.join(CONFIG_NAMES)}; an entry may carry overrides in brackets, e.g. "
                        "TrueTernary[lr=4,vote_clip=4]")
    p.add_argument("--steps", "--max_steps", dest="steps", type=int, default=200, metavar="N",
                   help="optimiser steps per config (also the length of the lr schedule)")
    p.add_argument("--batch", "--batch_size", dest="batch", type=int, default=4, metavar="N",
                   help="sequences per step")
    p.add_argument("--ctx", type=int, default=33, help="bytes per sequence (the model's context)")
    p.add_argument("--update_backend", default=DEFAULT_UPDATE_BACKEND.value,
                   help="vote/flip backend of the ternary configs: " + ", ".join(UPDATE_BACKENDS))
    p.add_argument("--scale_update_interval", type=int, default=FlipRule.scale_update_interval,
                   help="steps between scale votes; 0 freezes E")
    p.add_argument("--accum_threshold", type=int, default=None,
                   help="votes a trit needs to flip (default: FlipRule's)")
    p.add_argument("--print_every", type=int, default=50, metavar="N", help="print the loss every N steps (0: never)")
    p.add_argument("--reuse_base", action="store_true",
                   help="start every config from the same base model (float configs from its float weights, "
                        "ternary ones from its absmean ternarisation)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="text file, .gz file, directory or 'enwik8' (default: the embedded corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model, the batches and the vote RNG")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP + "; --jobs share them out")
    p.add_argument("--model", default="transformer", help="model family: " + ", ".join(MODEL_NAMES))
    p.add_argument("--d_model", type=int, default=512, help="model width")
    p.add_argument("--n_layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--n_heads", type=int, default=8, help="attention heads")
    p.add_argument("--model_config", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra model config fields, e.g. head_std=0.088,mlp_ratio=3")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's norms, attention and activations for every config (transformer)")
    p.add_argument("--group_size", type=int, default=None,
                   help=f"weights per int8 scale E (default: {GROUP_SIZE_DEFAULTS}, as train)")
    p.add_argument("--lr", action="append", default=[], metavar="CONFIG=LR",
                   help="peak learning rate (vote scale for TrueTernary) of a config, e.g. Adam_FP32=1e-3 "
                        "(default: each recipe's)")
    p.add_argument("--rule", action="append", default=[], metavar="FIELD=VALUE",
                   help="FlipRule field overrides for TrueTernary configs, e.g. vote_clip=4,decay=0.01")
    # On purpose twice train's --eval_windows: bench evaluates each config once, at the end, where train evaluates
    # every --eval_every steps.
    p.add_argument("--eval_windows", type=int, default=256,
                   help="windows for validation bpb (and as many training windows for train_bpb)")
    p.add_argument("--warmup_frac", type=float, default=WARMUP_FRAC,
                   help="linear warm-up, fraction of --steps")
    p.add_argument("--min_lr_frac", type=float, default=MIN_LR_FRAC,
                   help="cosine decay ends at this fraction of the peak")
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many configs at once, each in its own spawned process on --device (needs "
                        "--reuse_base; step times and peak memory are then measured beside the other jobs; each "
                        "job gets an equal share of the CPU threads)")
    p.add_argument("--job_timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with --jobs: stop a job that has gone this long without progress (a finished step or "
                        "evaluation; its process start counts), report it as 'timeout'; 0: never")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write every config's results here, after each config (default: none)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="draw the training-loss curves into this image (default: none)")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="checkpoint file (runs/<run>/checkpoints/...) or a .gguf file of trueternary export")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=200, metavar="N", help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 samples greedily")
    p.add_argument("--top_k", type=int, default=0, metavar="K", help="keep the k likeliest bytes (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP + " (as train)")
    p.add_argument("--no_cache", action="store_true",
                   help="rerun the whole window for every byte instead of using the key/value cache")


def project_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=float, default=3e9, help=f"weights to project (at most {MAX_PARAMS:.0e})")
    p.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE, help="weights per int8 scale E")
    p.add_argument("--batch", "--batch_size", dest="batch", type=int, default=1,
                   help="sequences, for the activation rows")
    p.add_argument("--ctx", type=int, default=2048, help="bytes per sequence, for the activation rows")
    p.add_argument("--d_model", type=int, default=None,
                   help="model width for the gradient/activation rows (default: derived from --params)")
    p.add_argument("--n_layers", type=int, default=None, help="transformer blocks (default: derived from --params)")
    p.add_argument("--n_heads", type=int, default=None,
                   help=f"attention heads (default: heads of {HEAD_DIM}, at least 2)")
    p.add_argument("--measure", default="1e5,1e6,1e7", metavar="SIZES",
                   help="comma list of weight counts to measure on real objects ('' skips)")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="activations of a run with the blocks checkpointed (train --activation_checkpointing): "
                        "the blocks' inputs and one recomputed block's")
    p.add_argument("--compile", action="store_true",
                   help="activations of a run with the shared ops compiled (train --compile, bench_scale's "
                        "default): fewer saved (fitting them compiles small models: about a minute)")


def audit_arguments(p: argparse.ArgumentParser) -> None:
    """train's flags for the model (names and defaults), ``--float`` and ``--ckpt``."""
    d = TrainConfig()
    p.add_argument("--ckpt", "--checkpoint", "--resume", dest="ckpt", default=None, metavar="PATH",
                   help="audit this checkpoint (a file, or a run directory: its newest checkpoint): its model and "
                        "optimiser state as saved; the model flags are then the checkpoint's (default: the model "
                        "train builds from the flags below)")
    # default None: run() tells the flags given (which --ckpt refuses) from those left at train's defaults
    for name, kw in (("model", dict(help="model family: " + ", ".join(MODEL_NAMES))),
                     ("d_model", dict(type=int, help="model width")),
                     ("n_layers", dict(type=int, help="transformer blocks")),
                     ("n_heads", dict(type=int, help="attention heads")),
                     ("ctx", dict(type=int, help="bytes per sequence (the model's context)")),
                     ("group_size", dict(type=int, help="weights per int8 scale E")),
                     ("seed", dict(type=int, help="seed of the model init"))):
        kw["help"] += f" (default: {GROUP_SIZE_DEFAULTS if name == 'group_size' else getattr(d, name)}, train's)"
        p.add_argument(f"--{name}", default=None, **kw)
    p.add_argument("--float", action="store_true",
                   help=f"audit the float base model (default: off, the {d.config} model train builds from it)")
    p.add_argument("--require_zero_float", action="store_true",
                   help="exit 1 when the audited model has trainable float parameters")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON (default: none)")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint of trueternary train --model llama")
    p.add_argument("--out", required=True, metavar="PATH", help="GGUF file to write")
    p.add_argument("--format", default="gguf", help="output format (gguf, the only one)")
    p.add_argument("--type", dest="qtype", default=DEFAULT_GGUF_TYPE,
                   help=f"tensor type of the weight matrices: {', '.join(GGUF_TYPES)} (default: {DEFAULT_GGUF_TYPE})")
    p.add_argument("--lossy", action="store_true",
                   help="allow re-fitting blocks of 256 weights whose scales differ (reports what changed)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
