"""Run the repository's scripts (benchmarks/, experiments/) as their documented command ``python3 <script>
<args>``: in a process of its own (:func:`run_script`); many, one after another, in one fresh process
(:func:`run_scripts`: quick checks such as usage errors, where starting Python and importing torch once per
check would cost more than the checks themselves); or in this process (:func:`run_as_main`: a script that only
orchestrates processes of its own and `trueternary` calls, which this process has imported already).

Outside a process of its own a script still runs as ``__main__`` with its own ``sys.argv``, ``sys.path[0]`` (its
folder), environment and captured stdout/stderr, and its exit status is the one the interpreter would give:
``sys.exit(n)`` is ``n``, ``sys.exit("message")`` prints the message and is 1, an uncaught exception prints its
traceback and is 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str


def run_script(script: str, *args: str, timeout: int = 120, env: dict | None = None) -> ScriptRun:
    """``script`` (a path from the repo root) run as ``python3 <script> <args>`` in its own process."""
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=env)
    return ScriptRun(r.returncode, r.stdout, r.stderr)


def run_as_main(script: str, args: list[str], env: dict | None = None) -> ScriptRun:
    """``script`` (a path from the repo root) run as ``__main__`` in this process; ``env``: variables to set, or
    to remove with None, while it runs. The environment, ``sys.argv``, ``sys.path``, the working directory and
    torch's intra-op threads (which a benchmark may set) are restored after."""
    import torch

    saved_env, saved_path, saved_argv, saved_cwd = dict(os.environ), list(sys.path), list(sys.argv), os.getcwd()
    saved_threads = torch.get_num_threads()
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    path = str(ROOT / script)
    sys.argv, sys.path[0] = [path, *args], os.path.dirname(path)
    os.chdir(ROOT)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:  # what the interpreter makes of it at exit
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:], sys.argv = saved_path, saved_argv
    return ScriptRun(code, out.getvalue(), err.getvalue())


def _driver() -> None:
    """``python -c`` entry of :func:`run_scripts`: argv[1] holds the cases, argv[2] receives the outcomes."""
    spec, results = sys.argv[1], sys.argv[2]
    runs = [run_as_main(script, args, env) for script, args, env in json.loads(Path(spec).read_text())]
    Path(results).write_text(json.dumps([[r.returncode, r.stdout, r.stderr] for r in runs]))


def run_scripts(cases: list[tuple[str, list[str], dict]], timeout: int = 300) -> list[ScriptRun]:
    """Each ``(script, args, env)`` (env as in :func:`run_as_main`) run as ``__main__`` in one fresh Python
    process, in order; their outcomes, in the same order."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        spec.write_text(json.dumps([[script, list(args), env] for script, args, env in cases]))
        driver = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import _scripts; _scripts._driver()"
        r = subprocess.run([sys.executable, "-c", driver, str(spec), str(out)], capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
        assert r.returncode == 0 and out.exists(), r.stdout[-2000:] + r.stderr[-2000:]
        return [ScriptRun(*row) for row in json.loads(out.read_text())]
