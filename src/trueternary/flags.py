"""What the sub-commands share with the command line: the argument parser (one-line errors, both spellings of
every flag, every default in the help), the ``--device`` and ``--threads`` choices, and ``key=value`` overrides
(``--rule``, ``--lr``, ``--model-config``, bench's brackets).

``cli`` imports the sub-commands (only the one that runs); they import this module, never ``cli``. It imports
no torch at module level: ``trueternary --help`` builds its parser from here without loading torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch


def spellings(names: tuple[str, ...]) -> list[str]:
    """Every long option in both spellings, the underscore one first (``--d-model`` -> ``--d_model``,
    ``--d-model``); short options as given. The first name gives the flag's ``dest``, so both spellings of one
    flag always land in the same place."""
    out: list[str] = []
    for name in names:
        if name.startswith("--") and len(name) > 2:
            body = name[2:]
            forms = [f"--{body.replace('-', '_')}", f"--{body.replace('_', '-')}"]
        else:
            forms = [name]
        for form in forms:
            if form not in out:
                out.append(form)
    return out


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default (unless the help already says ``default: ...``); a flag's
    spellings are listed once with one metavar (``--d_model, --d-model D_MODEL``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or default is argparse.SUPPRESS or default is None
                or "default:" in text):
            return text
        if action.nargs == 0 and isinstance(default, bool):
            shown = "on" if default else "off"
        elif default == []:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {args}"


class Parser(argparse.ArgumentParser):
    """argparse with its error in one line and exit code 2 (argparse's own usage text is left out), every long
    flag in both spellings (:func:`spellings`) and every default in the help (:class:`HelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*spellings(names), **kwargs)

    def error(self, message):
        sys.stderr.write(f"trueternary: error: {message}\n")
        sys.exit(2)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA where there is a device, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

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


SMALL_MODEL_D = 256
THREADS_HELP = f"CPU threads; 0: 1 for models up to d_model {SMALL_MODEL_D}, else torch's default"


def cpu_threads(requested: int, d_model: int) -> int:
    """Intra-op threads on the CPU (``--threads`` of train, bench and generate): ``requested``, or by default one
    for small models. Their matrices are small, and whether a second thread helps depends on what else runs on
    the cores (measured in docs/training.md: from ~1.4x faster on a quiet machine to ~10x slower on a busy one,
    where OpenMP threads wait for descheduled peers). One thread bounds the worst case; larger models
    (d_model above SMALL_MODEL_D) take torch's default."""
    import torch

    if requested:
        return requested
    return 1 if d_model <= SMALL_MODEL_D else torch.get_num_threads()


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
