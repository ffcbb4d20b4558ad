"""Run the repository's scripts (benchmarks/, experiments/) as their documented command ``python3 <script>
<args>``: one in a process of its own (:func:`run_script`), or many, one after another, in one fresh process
(:func:`run_scripts`: the quick checks, such as usage errors, where starting Python and importing torch once per
check would cost more than the checks themselves).

In the shared process each script still runs as ``__main__`` with its own ``sys.argv``, ``sys.path[0]`` (its
folder), environment and captured stdout/stderr, and its exit status is the one the interpreter would give:
``sys.exit(n)`` is ``n``, an uncaught exception prints its traceback and is 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
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


_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback

cases, results = json.load(open(sys.argv[1])), []
for script, args, env in cases:
    saved_env, saved_path, saved_argv = dict(os.environ), list(sys.path), list(sys.argv)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    sys.argv, sys.path[0] = [script, *args], os.path.dirname(os.path.abspath(script))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # what the interpreter makes of it at exit
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    os.environ.clear()
    os.environ.update(saved_env)
    sys.path[:], sys.argv = saved_path, saved_argv
    results.append((code, out.getvalue(), err.getvalue()))
json.dump(results, open(sys.argv[2], "w"))
"""


def run_scripts(cases: list[tuple[str, list[str], dict]], timeout: int = 300) -> list[ScriptRun]:
    """Each ``(script, args, env)`` (env: variables to set, or to remove with None) run as ``__main__`` in one
    fresh Python process, in order; their outcomes, in the same order."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        spec.write_text(json.dumps([[script, list(args), env] for script, args, env in cases]))
        r = subprocess.run([sys.executable, "-c", _DRIVER, str(spec), str(out)], capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
        assert r.returncode == 0 and out.exists(), r.stdout[-2000:] + r.stderr[-2000:]
        return [ScriptRun(*row) for row in json.loads(out.read_text())]
