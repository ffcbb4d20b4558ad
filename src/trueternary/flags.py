"""What the sub-commands share with the command line: the argument parser that reports a bad flag in one line,
the ``--device`` flag, and ``key=value`` overrides (``--rule``, ``--lr``, ``--model-config``, bench's brackets).

``cli`` imports the sub-commands (lazily, when it builds its parser); they import this module, never ``cli``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse with its error in one line and exit code 2 (argparse's own usage text is left out)."""

    def error(self, message):
        sys.stderr.write(f"trueternary: error: {message}\n")
        sys.exit(2)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA where there is a device, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
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


def parse_overrides(items: list[str], what: str) -> dict:
    """``["a=1,b=x", "c=true"]`` -> ``{"a": 1, "b": "x", "c": True}`` (values: :func:`parse_value`); ValueError,
    naming ``what``, for a part without ``=``."""
    out = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"{what} override {part!r} must look like key=value")
            k, v = part.split("=", 1)
            out[k.strip()] = parse_value(v.strip())
    return out


def parse_value(v: str):
    """``true`` / ``false`` (any case) as a bool, else an int, else a float, else the text itself."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
