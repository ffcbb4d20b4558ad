"""The ``trueternary`` command line: one sub-command per job, one-line errors, non-zero exit codes.

    train     train one model (trueternary.train)          generate  sample from a checkpoint
    project   memory projection, checked by measurement     info      what a checkpoint holds
    bench     compare training configurations              audit     what a model holds (float or integer)
    export    a --model llama checkpoint as GGUF

Exit codes: 0 success (also a training run stopped by SIGTERM after saving); 2 bad flags, data or
checkpoint, or a file that cannot be written (trueternary.errors.USAGE_ERRORS: UsageError, DataError,
CheckpointError, WriteError; any other OSError naming a file); 1 training diverged (TrainingError); 3 bench: some
configs failed, crashed or timed out; 130 interrupted.

Only the sub-command that runs is imported (with it torch): its flags are defined in torch-free modules
(``trainconfig``, ``arguments``), so ``trueternary --help``, ``--version``, every ``trueternary <command> --help``
and a refused flag load no torch. The sub-commands import ``flags`` and ``errors``, never this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import USAGE_ERRORS, TrainingError, UsageError  # noqa: F401 (UsageError: its old home, kept)
from .flags import Parser

Handler = Callable[[argparse.Namespace], object]


# Each loader returns its sub-command's (add_arguments, run). The flags come from torch-free modules (trainconfig,
# arguments), so `trueternary <command> --help`, and a flag argparse refuses, load no torch; run imports the
# command's module (with it torch) when the command runs. Separate functions, with the imports written out, so that
# tests/test_imports.py sees every edge.
def _train():
    from .trainconfig import add_arguments

    def run(args: argparse.Namespace):
        from . import train

        return train.run(args)

    return add_arguments, run


def _generate():
    from .arguments import generate_arguments

    def run(args: argparse.Namespace):
        from . import generate

        return generate.run(args)

    return generate_arguments, run


def _project():
    from .arguments import project_arguments

    def run(args: argparse.Namespace):
        from . import project

        return project.run(args)

    return project_arguments, run


def _info():
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", help="checkpoint file")

    def run(args: argparse.Namespace) -> None:
        from .checkpoint import describe

        print(describe(args.path))

    return add_arguments, run


def _bench():
    from .arguments import bench_arguments

    def run(args: argparse.Namespace):
        from . import bench

        return bench.run(args)

    return bench_arguments, run


def _audit():
    from .arguments import audit_arguments

    def run(args: argparse.Namespace):
        from . import audit

        return audit.run(args)

    return audit_arguments, run


def _export():
    from .arguments import export_arguments

    def run(args: argparse.Namespace):
        from . import export

        return export.run(args)

    return export_arguments, run


# name: (loader, one-line help, description of its --help)
COMMANDS: dict[str, tuple[Callable[[], tuple[Callable, Handler]], str, str]] = {
    "train": (_train, "train a model (default: TrueTernary on the embedded corpus)",
              "Train one model; everything goes to <out_dir>/<run_name>/ (see docs/training.md)."),
    "generate": (_generate, "sample text from a checkpoint (loads T_packed and E only)",
                 "Continue a prompt byte by byte from a checkpoint or a GGUF file (see docs/training.md)."),
    "project": (_project, "memory to train and serve N weights, projected and measured",
                "Memory to train and to serve N ternary weights against Adam_FP32 (AdamW fp32): closed formulas, each "
                "checked against real objects (see docs/training.md)."),
    "info": (_info, "what a checkpoint holds", "Verify a checkpoint and list what it holds."),
    "bench": (_bench, "compare training configurations side by side",
              "Train several configurations on the same data and batches and compare them (docs/learning.md)."),
    "audit": (_audit, "what a model holds: ternary weights, integer state, float params/buffers",
              "What a model holds, by kind: by default the model `trueternary train` builds with its defaults, "
              "or a checkpoint's (--ckpt)."),
    "export": (_export, "write a --model llama checkpoint as GGUF (TQ2_0 / TQ1_0) for llama.cpp",
               "Write a --model llama checkpoint as a GGUF file for llama.cpp (see docs/export.md)."),
}


def _version() -> str:
    from . import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``trueternary``. Only ``command``'s flags are defined (and its module imported); the others
    are listed with their one-line help, which is all ``trueternary --help`` shows."""
    p = Parser(prog="trueternary", description="Train and ship purely ternary neural networks.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for name, (load, help_line, description) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_line, description=description)
        if name == command:
            add_arguments, run = load()
            add_arguments(sp)
            sp.set_defaults(func=run)
    return p


def _command(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names: its first word that is not a flag (the top level's flags take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
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
