"""README.md stays true: its two set-up commands, the CI entry point that runs the test command verbatim,
and the ten-line example, which is executed here; so do docs/training.md's transcripts of the quick start,
``trueternary --help`` / ``--version`` and ``trueternary audit``."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    nxt = README.find("\n## ", start + 1)
    return README[start:nxt if nxt != -1 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def test_exactly_two_setup_commands_main_job_then_tests():
    commands = _blocks(_section("Set-up"), "bash")
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    main, tests = commands
    assert main.startswith("python3 -m venv .venv && ") and main.endswith(".venv/bin/trueternary train")
    assert "torch==" not in main  # the package's torch requirement stays loose; only the test path pins the CPU wheel
    assert "pip install -q torch==2.13.0 " in tests and '".[test]"' in tests and tests.endswith("pytest -q")


def test_ci_runs_the_readme_test_command_verbatim():
    tests = _blocks(_section("Set-up"), "bash")[1]
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_ten_line_example_runs_and_learns():
    code = _blocks(_section("Ten-line example"), "python")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    m = re.fullmatch(r"loss (\d+\.\d+), (\d+) bytes to ship\n", out.getvalue())
    assert m, out.getvalue()
    assert float(m.group(1)) < 1.0  # from ln 10 = 2.30 (fits 256 random labels: the rule really learns)
    # 64*256 + 256*10 trits at 5 per byte, one int8 scale per 64 weights, int32 biases
    assert 0 < int(m.group(2)) < (64 * 256 + 256 * 10) // 4


def _quick_start_transcript() -> list[str]:
    """The output lines docs/training.md's quick start shows for ``trueternary train``."""
    doc = (ROOT / "docs" / "training.md").read_text()
    section = doc[doc.index("## Quick start"):doc.index("\n## ", doc.index("## Quick start") + 1)]
    block = next(body for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
                 if not lang and body.startswith("train: "))
    return [ln for ln in block.splitlines() if ln.strip()]


def _line_pattern(line: str) -> re.Pattern:
    """The transcript line with its numbers, run name and paths generalised (the values depend on the machine's
    standard library, the step count and the clock; the wording and the order of the fields may not)."""
    out = re.escape(line)
    out = re.sub(r"runs/TrueTernary\\-\d+\\-\d+", r"\\S+", out)
    out = re.sub(r"\d[\d,]*(\\\.\d+)?", r"[\\d,]+(?:\\.\\d+)?", out)
    out = re.sub(r"(\\ )+", r"\\s+", out)  # numbers are right-aligned: their padding varies
    return re.compile(out)


def test_quick_start_transcript_matches_what_train_prints(tmp_path, monkeypatch, capsys):
    """The quick start's transcript is what ``trueternary train`` prints: each line of a short run of the same
    command (defaults, fewer steps) matches the documented line with its numbers generalised."""
    from trueternary.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max_steps", "4", "--eval_every", "2", "--save_every", "0"]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    documented = _quick_start_transcript()
    assert len(printed) == len(documented) - 1, printed  # the doc shows 3 evaluations, the short run 2
    doc_lines = documented[:1] + documented[2:]
    for got, want in zip(printed, doc_lines):
        assert _line_pattern(want).fullmatch(got), (want, got)


def _transcript(command: str) -> list[str]:
    """The lines docs/training.md shows after ``$ <command>`` (up to the next ``$`` line or the block's end)."""
    doc = (ROOT / "docs" / "training.md").read_text()
    start = doc.index(f"$ {command}\n") + len(f"$ {command}\n")
    lines = []
    for line in doc[start:].splitlines():
        if line.startswith("$ ") or line.startswith("```"):
            break
        lines.append(line)
    return lines


def test_every_command_and_audit_transcripts_are_what_the_commands_print(monkeypatch, capsys):
    """docs/training.md's ``trueternary --help``, ``--version`` and ``trueternary audit`` (train's default model:
    deterministic) are the commands' output, line for line."""
    from trueternary.cli import main

    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps the help to the terminal's width
    for argv in (["--help"], ["--version"], ["audit"]):
        main(argv)
        assert capsys.readouterr().out.splitlines() == _transcript(" ".join(["trueternary", *argv])), argv
