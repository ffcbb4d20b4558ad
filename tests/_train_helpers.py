"""Tiny runs shared by the train / checkpoint / generate / cli tests (d_model 32, one layer, ctx 16)."""

from __future__ import annotations

from pathlib import Path

from trueternary.train import TrainConfig

TINY = dict(d_model=32, n_layers=1, n_heads=2, ctx=16, batch_size=4, max_steps=6, eval_every=0, save_every=0,
            eval_windows=8, device="cpu")


def write_corpus(path: Path, n_bytes: int = 16_000) -> Path:
    """Deterministic, learnable text (repeating sentences with a counter) of about ``n_bytes``."""
    lines, i = [], 0
    while sum(len(s) for s in lines) < n_bytes:
        lines.append(f"the quick brown fox {i % 7} jumps over the lazy dog {i % 3}.\n")
        i += 1
    path.write_text("".join(lines))
    return path


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    kw = dict(TINY, data=str(corpus), out_dir=str(tmp_path / "runs"), run_name="run")
    kw.update(overrides)
    return TrainConfig(**kw)
