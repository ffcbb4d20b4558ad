"""What the measurement scripts share about their command line: the output folder they write to."""

from __future__ import annotations

import argparse
from pathlib import Path


def out_dir(parser: argparse.ArgumentParser, path: str) -> Path:
    """``path`` created if missing; a usage error (one line, exit 2) when it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create --out {path}: {e.strerror or e}")
    return out
