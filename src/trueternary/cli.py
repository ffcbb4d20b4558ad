"""The ``trueternary`` command line: one sub-command per job, one-line errors, non-zero exit codes.

    train     train one model (trueternary.train)          generate  sample from a checkpoint
    project   memory projection, checked by measurement     info      what a checkpoint holds
    bench     compare training configurations              audit     what a model holds (float or integer)

Exit codes: 0 success (also a training run stopped by SIGTERM after saving); 2 bad flags, data or
checkpoint, or a file that cannot be written (trueternary.errors.USAGE_ERRORS: UsageError, DataError,
CheckpointError, WriteError; any other OSError naming a file); 1 training diverged (TrainingError); 3 bench: some
configs failed, crashed or timed out; 130 interrupted.

The sub-commands are imported when the parser is built; they import ``flags`` and ``errors``, never this module.
"""

from __future__ import annotations

import argparse
import sys

from .errors import USAGE_ERRORS, TrainingError, UsageError  # noqa: F401 (UsageError: its old home, kept)
from .flags import Parser


def _info(args: argparse.Namespace) -> None:
    from .checkpoint import describe

    print(describe(args.path))


def build_parser() -> argparse.ArgumentParser:
    from . import audit, bench, generate, project, train

    p = Parser(prog="trueternary", description="Train and ship purely ternary neural networks.")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    t = sub.add_parser("train", help="train a model (default: TrueTernary on the embedded corpus)",
                       description="Train one model; everything goes to <out_dir>/<run_name>/ (see docs/training.md).")
    train.add_arguments(t)
    t.set_defaults(func=train.run)
    g = sub.add_parser("generate", help="sample text from a checkpoint (loads T_packed and E only)")
    generate.add_arguments(g)
    g.set_defaults(func=generate.run)
    pr = sub.add_parser("project", help="memory to train and serve N weights, projected and measured")
    project.add_arguments(pr)
    pr.set_defaults(func=project.run)
    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("path", help="checkpoint file")
    i.set_defaults(func=_info)
    b = sub.add_parser("bench", help="compare training configurations side by side")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    a = sub.add_parser("audit", help="what a model holds: ternary weights, integer state, float params/buffers")
    audit.add_arguments(a)
    a.set_defaults(func=audit.run)
    from . import export

    x = sub.add_parser("export", help="write a --model llama checkpoint as GGUF (TQ2_0 / TQ1_0) for llama.cpp")
    export.add_arguments(x)
    x.set_defaults(func=export.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already wrote its one-line error (or the help)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except USAGE_ERRORS as e:
        sys.stderr.write(f"trueternary: error: {e}\n")
        return 2
    except OSError as e:  # an I/O failure no caller turned into one of the errors above: still one line
        if e.filename is None:
            raise
        sys.stderr.write(f"trueternary: error: {e.filename}: {e.strerror or e}\n")
        return 2
    except TrainingError as e:
        sys.stderr.write(f"trueternary: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("trueternary: interrupted\n")
        return 130
    return getattr(args, "_exit_code", 0)


if __name__ == "__main__":  # python -m trueternary.cli
    sys.exit(main())
