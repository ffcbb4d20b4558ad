"""The ``trueternary`` command line: one sub-command per job, one-line errors, non-zero exit codes."""

from __future__ import annotations

import argparse
import sys

import torch


class UsageError(ValueError):
    """A bad flag value or combination: reported in one line, exit code 2."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or auto)")
    return dev


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"trueternary: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    p = _Parser(prog="trueternary", description="Train and ship purely ternary neural networks.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    b = sub.add_parser("bench", help="compare training configurations side by side")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (UsageError, DataError) as e:
        sys.stderr.write(f"trueternary: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("trueternary: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
