"""README.md stays true: its two set-up commands, the CI entry point that runs the test command verbatim,
and the ten-line example, which is executed here."""

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
