"""The command line: bad flags and data give one line and exit 2; the console script works in a new process."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_helpers import TINY, tiny_config, write_corpus
from trueternary import checkpoint as ckpt_io
from trueternary.cli import main
from trueternary.train import train


def _tiny_flags(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    flags = ["--data", str(corpus), "--out_dir", str(tmp_path / "runs")]
    for k, v in TINY.items():
        flags += [f"--{k}", str(v)]
    return flags


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:"), err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flags, msg", [
    (["--max_steps", "-5"], "--max_steps"),
    (["--max_steps", "0"], "--max_steps"),
    (["--batch_size", "0"], "--batch_size"),
    (["--ctx", "0"], "--ctx"),
    (["--eval_every", "-1"], "--eval_every"),
    (["--config", "Nope"], "unknown --config"),
    (["--model", "nope"], "unknown --model"),
    (["--device", "tpu"], "device"),
    (["--update_backend", "warp"], "--update_backend"),
    (["--lr", "-1"], "--lr"),
    (["--accum_threshold", "500"], "accum_threshold"),
    (["--d_model", "30", "--n_heads", "4"], "divisible"),
    (["--rule", "vote_clip"], "key=value"),
    (["--rule", "nonsense=1"], "unknown FlipRule fields"),
    (["--no-strict_ternary", "--config", "Adam_FP32"], "contradicts"),
    (["--strict_ternary", "--config", "TrueTernary_Hybrid"], "contradicts"),
    (["--max_steps", "abc"], "invalid int value"),
    (["--resume", "missing.safetensors"], "checkpoint not found"),
    (["--resume", "auto", "--run_name", "a/b"], "--run_name"),
    (["--compile", "--model", "morph"], "compiled ops are implemented for the transformer"),
    (["--cuda_graph", "--config", "Adam_FP32"], "--cuda_graph is for TrueTernary"),
    (["--cuda_graph", "--update_backend", "dense-fallback"], "--cuda_graph is for TrueTernary"),
    (["--cuda_graph"], "--cuda_graph needs a CUDA device"),
])
def test_bad_train_flags(tmp_path, capsys, flags, msg):
    assert main(["train", *_tiny_flags(tmp_path), *flags]) == 2
    assert msg in _one_line_error(capsys)
    assert not list(ckpt_io.list_checkpoints(tmp_path / "runs")) and not (tmp_path / "runs").exists()


def test_ctx_larger_than_the_model_allows(tmp_path, capsys):
    train(tiny_config(tmp_path, max_steps=2))  # a model of context 16
    run = str(tmp_path / "runs" / "run")
    assert main(["train", "--resume", run, "--ctx", "64", "--out_dir", str(tmp_path / "runs")]) == 2
    assert "exceeds the model's context 16" in _one_line_error(capsys)


@pytest.mark.parametrize("case", ["missing", "empty", "too_small_for_ctx"])
def test_bad_data(tmp_path, capsys, case):
    data = tmp_path / "data.txt"
    extra = []
    if case == "empty":
        data.write_bytes(b"")
    elif case == "too_small_for_ctx":
        data.write_bytes(b"x" * 1100)  # 550 held-out bytes: no room for a 1000-byte window
        extra = ["--ctx", "1000"]
    flags = _tiny_flags(tmp_path)
    flags[flags.index("--data") + 1] = str(data)
    assert main(["train", *flags, *extra]) == 2
    _one_line_error(capsys)


def test_unwritable_out_dir(tmp_path, capsys):
    flags = _tiny_flags(tmp_path)
    (tmp_path / "afile").write_text("x")
    flags[flags.index("--out_dir") + 1] = str(tmp_path / "afile")  # a file where a directory must go
    assert main(["train", *flags]) == 2
    assert "cannot create run directory" in _one_line_error(capsys)


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_user_errors_are_defined_once_and_keep_their_old_homes():
    import ast

    from trueternary import checkpoint, cli, data, errors, export, optim
    from trueternary import train as train_mod
    from trueternary.optim import context

    assert cli.UsageError is errors.UsageError and data.DataError is errors.DataError
    assert checkpoint.CheckpointError is errors.CheckpointError and checkpoint.WriteError is errors.WriteError
    assert train_mod.TrainingError is errors.TrainingError and export.ExportError is errors.ExportError
    assert optim.NonFiniteGradientError is context.NonFiniteGradientError is errors.NonFiniteGradientError
    assert set(errors.USAGE_ERRORS) == {errors.UsageError, errors.DataError, errors.CheckpointError,
                                        errors.WriteError, errors.ExportError}
    # no error class is defined anywhere else (RankError: another rank's undeclared failure, never reported as a
    # user error: it ends the rank with its traceback like the error it stands for)
    src = Path(errors.__file__).parent
    elsewhere = {f"{p.relative_to(src)}:{node.name}" for p in src.rglob("*.py") if p.name != "errors.py"
                 for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, ast.ClassDef) and node.name.endswith("Error")}
    assert elsewhere == {"distributed.py:RankError"}


def _console_script() -> str:
    exe = Path(sys.executable).with_name("trueternary")
    return str(exe) if exe.exists() else shutil.which("trueternary")


def test_console_script_bad_flag_is_one_line_exit_2():
    proc = subprocess.run([_console_script(), "train", "--batch_size", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "trueternary: error: --batch_size must be a positive integer, got 0\n"
    proc = subprocess.run([_console_script(), "info", "/nonexistent.safetensors"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    """Train 4 of 8 steps here, continue in a fresh process through the console script; compare to 8 straight."""
    straight = train(tiny_config(tmp_path, max_steps=8, run_name="straight"))
    train(tiny_config(tmp_path, max_steps=8, run_name="split", stop_at=4))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([_console_script(), "train", "--resume", "auto", "--run_name", "split",
                           "--out_dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step 4" in proc.stdout
    a = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(tmp_path / "runs" / "straight"))
    b = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(tmp_path / "runs" / "split"))
    assert a.step == b.step == 8
    assert a.meta["tensor_sha256"] == b.meta["tensor_sha256"]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert f"{straight['losses'][-1]:.3f}" in proc.stdout  # the last loss, printed by the new process


# ---- one flag style: both spellings, every default in the help, --version, a --help that loads no torch


def _subparsers():
    """{command: its parser, with its flags} for every sub-command."""
    from trueternary import cli

    out = {}
    for name in cli.COMMANDS:
        p = cli.build_parser(name)
        sub = next(a for a in p._actions if a.dest == "command")
        out[name] = sub.choices[name]
    return out


def test_every_flag_of_every_command_shows_its_default_in_the_help():
    missing = []
    for name, p in _subparsers().items():
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.required or action.dest == "help":
                continue
            if "default:" not in formatter._get_help_string(action):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    # and the defaults are the real ones (argparse's, or for train TrainConfig's)
    from trueternary.train import TrainConfig

    helps = {name: p.format_help() for name, p in _subparsers().items()}
    assert " ".join(helps["bench"].split()).count("(default: 200)") == 1  # --steps
    assert f"(default: {TrainConfig().max_steps})" in " ".join(helps["train"].split())
    assert "(default: 128, train's)" in " ".join(helps["audit"].split())  # audit's model flags are train's


def test_every_long_flag_has_both_spellings():
    for name, p in _subparsers().items():
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            for o in longs:  # (the --no-x of a --x / --no-x pair keeps its "no-")
                pair = isinstance(action, argparse.BooleanOptionalAction) and o.startswith("--no-")
                prefix = "--no-" if pair else "--"
                body = o[len(prefix):]
                other = prefix + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
                assert other in longs, (name, o)


@pytest.mark.parametrize("argv, dest, value", [
    (["bench", "--max_steps", "5"], "steps", 5),
    (["bench", "--max-steps", "5"], "steps", 5),
    (["bench", "--steps", "5"], "steps", 5),
    (["bench", "--batch_size", "3"], "batch", 3),
    (["bench", "--d_model", "64"], "d_model", 64),
    (["bench", "--d-model", "64"], "d_model", 64),
    (["bench", "--update_backend", "none"], "update_backend", "none"),
    (["audit", "--d_model", "16"], "d_model", 16),
    (["audit", "--d-model", "16"], "d_model", 16),
    (["audit", "--checkpoint", "x"], "ckpt", "x"),
    (["audit", "--resume", "x"], "ckpt", "x"),
    (["project", "--batch_size", "2"], "batch", 2),
    (["project", "--group-size", "32"], "group_size", 32),
    (["train", "--max-steps", "7"], "max_steps", 7),
    (["train", "--batch-size", "7"], "batch_size", 7),
    (["generate", "--ckpt", "x", "--max-new-tokens", "3"], "max_new_tokens", 3),
    (["generate", "--ckpt", "x", "--no-cache"], "no_cache", True),
    (["export", "--ckpt", "x", "--out", "y"], "qtype", "tq2_0"),
])
def test_flag_spellings_are_accepted_everywhere(argv, dest, value):
    from trueternary.cli import build_parser

    assert getattr(build_parser(argv[0]).parse_args(argv), dest) == value


def _run_python(code: str) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


HEAVY = ("torch", "triton", "numpy", "safetensors", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []], ids=["help", "version", "no-command"])
def test_top_level_help_and_version_load_no_torch(argv):
    """``trueternary --help`` / ``--version`` start in a fraction of a second: they import no torch (nor any other
    heavy module); the package's public names are imported when first used."""
    proc = _run_python(
        "import sys\n"
        "from trueternary.cli import main\n"
        f"code = main({argv!r})\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy, 'CODE', code)\n")
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] CODE" in proc.stdout, proc.stdout[-500:]
    if argv == ["--help"]:
        assert all(name in proc.stdout for name in ("train", "bench", "audit", "project", "generate", "info"))


def test_every_command_help_and_refused_flag_load_no_torch():
    """``trueternary <command> --help`` (and a flag argparse refuses, answered before the command runs) imports no
    torch nor any other heavy module: each command's flags are defined in torch-free modules. One process runs
    them all in turn, so the first command that loads torch is the one named."""
    argvs = [[name, "--help"] for name in ("train", "generate", "project", "info", "bench", "audit", "export")]
    argvs += [[name, "--no-such-flag"] for name in ("train", "bench", "generate", "project", "audit", "export")]
    argvs += [["train", "--max_steps", "abc"], ["generate"], ["export", "--ckpt", "x"]]  # a bad value; required ones
    proc = _run_python(
        "import contextlib, io, sys\n"
        "from trueternary.cli import COMMANDS, main\n"
        f"argvs = {argvs!r}\n"
        "assert sorted({a[0] for a in argvs if a[1:] == ['--help']}) == sorted(COMMANDS)\n"
        "for argv in argvs:\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        f"    heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})\n"
        "    print(argv, code, 'usage' in out.getvalue(), err.getvalue().startswith('trueternary: error:'), heavy)\n"
        "    if heavy:\n"
        "        break\n")
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()
    for argv, row in zip(argvs, rows):
        helped = argv[1:] == ["--help"]
        assert row == f"{argv!r} {0 if helped else 2} {helped} {not helped} []", row
    assert len(rows) == len(argvs), proc.stdout


def test_the_torch_free_names_are_the_registries():
    """The names the parsers show without torch (``settings``) are those the commands run with."""
    from trueternary import export, models, recipes, rule, settings, weight
    from trueternary.export import gguf_file, tq

    assert tuple(recipes.RECIPES) == settings.CONFIG_NAMES == recipes.CONFIG_NAMES
    built_in = sorted(n for n, (cls, _) in models._MODELS.items() if cls.__module__.startswith("trueternary."))
    assert list(settings.MODEL_NAMES) == built_in
    assert settings.GGUF_TYPES == export.TYPES == tq.TYPES + gguf_file.FLOAT_TYPES
    assert export.DEFAULT_TYPE in tq.TYPES
    # defined once, re-exported where they are used at run time
    assert rule.FlipRule is settings.FlipRule and weight.DEFAULT_GROUP_SIZE is settings.DEFAULT_GROUP_SIZE
    hp = recipes.Hparams()
    assert (hp.warmup_frac, hp.min_lr_frac) == (settings.WARMUP_FRAC, settings.MIN_LR_FRAC)


def test_version(capsys):
    import trueternary

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"trueternary {trueternary.__version__}\n"
    proc = subprocess.run([_console_script(), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"trueternary {trueternary.__version__}\n"
    # python -m trueternary: the same command line where the console script is not on the path
    proc = subprocess.run([sys.executable, "-m", "trueternary", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"trueternary {trueternary.__version__}\n", proc.stderr


def test_the_package_imports_its_public_names_on_first_use():
    proc = _run_python("import sys, trueternary\n"
                       "assert 'torch' not in sys.modules\n"
                       "from trueternary import FlipOptimizer, ternarize\n"
                       "import trueternary.optim\n"
                       "assert FlipOptimizer is trueternary.optim.FlipOptimizer and 'torch' in sys.modules\n"
                       "print(sorted(trueternary.__all__) == sorted([*trueternary._PUBLIC, '__version__']))\n"
                       "print(all(getattr(trueternary, n) is not None for n in trueternary.__all__))\n"
                       "try:\n    trueternary.nope\nexcept AttributeError:\n    print('AttributeError')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "AttributeError"]


def test_cpu_threads_is_trains_choice():
    """train, bench and generate take their CPU threads from flags.cpu_threads: --threads, else one thread
    up to d_model 256 and torch's default above."""
    from trueternary import flags, train

    assert flags.cpu_threads(0, flags.SMALL_MODEL_D) == 1
    assert flags.cpu_threads(0, flags.SMALL_MODEL_D + 1) == torch.get_num_threads()
    assert flags.cpu_threads(5, 64) == 5
    assert train.cpu_threads is flags.cpu_threads
