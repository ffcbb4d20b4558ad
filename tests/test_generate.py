"""``trueternary generate``: inference from T_packed + E only, equal to the trained model, bytes reported; the
key/value cache equal to rerunning the window; output streamed byte by byte; Ctrl-C; the throughput benchmark."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _scripts import run_as_main
from _train_helpers import tiny_config
from trueternary import checkpoint as ckpt_io
from trueternary.cli import main
from trueternary.generate import build_inference_model, byte_stream, held_bytes, load_for_inference, sample, window_keep
from trueternary.models import build_model
from trueternary.recipes import build_recipe
from trueternary.train import hparams_for, train
from trueternary.weight import DEFAULT_GROUP_SIZE, ternary_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny checkpoints of a strict, a hybrid and a float config."""
    tmp = tmp_path_factory.mktemp("gen")
    out = {}
    for config in ("TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"):
        train(tiny_config(tmp, config=config, max_steps=4, run_name=config))
        out[config] = ckpt_io.latest_checkpoint(tmp / "runs" / config)
    return out


def _full_model(path):
    """The checkpoint restored the training way: a full recipe with every buffer."""
    ck = ckpt_io.load_checkpoint(path)
    cfg = tiny_config(path.parent, config=ck.recipe)
    base = build_model("transformer", **ck.meta["model"]["config"])
    recipe = build_recipe(ck.recipe, base, hparams_for(cfg))
    ckpt_io.restore_recipe(recipe, ck)
    return recipe.model.eval()


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"])
def test_inference_model_equals_trained_model(runs, config):
    model, meta = load_for_inference(runs[config])
    assert meta["recipe"] == config
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), _full_model(runs[config])(x))


def test_strict_inference_holds_only_T_packed_and_E(runs):
    model, _ = load_for_inference(runs["TrueTernary"])
    tw = ternary_weights(model)
    assert tw and all(w.inference_only for w in tw)
    for w in tw:
        assert w.T_accum.numel() == w.E_accum.numel() == 0
    held = held_bytes(model)
    assert held["training_state"] == 0
    assert held["ternary_inference"] == sum(w.T_packed.numel() + w.E.numel() for w in tw)
    assert not list(model.parameters())
    # everything else the model holds is the two rotary tables (not loaded, recomputed)
    rope = model.rope_cos.numel() * 4 + model.rope_sin.numel() * 4
    assert held["total"] == held["ternary_inference"] + rope


def test_sampling_is_seeded_and_greedy_is_deterministic(runs):
    model, _ = load_for_inference(runs["TrueTernary"])
    a = sample(model, b"the quick", 20, temperature=1.0, top_k=5, seed=3)
    b = sample(model, b"the quick", 20, temperature=1.0, top_k=5, seed=3)
    assert a == b and len(a) == 20
    g1 = sample(model, b"x" * 40, 10, temperature=0)  # prompt longer than ctx 16 is cropped
    assert g1 == sample(model, b"x" * 40, 10, temperature=0, seed=9)
    assert sample(model, b"", 3, temperature=0.5, top_k=1) == sample(model, b"\n", 3, temperature=0)


def test_generate_cli_prints_text_and_inference_bytes(runs, capsysbinary):
    """stdout: the prompt and the sampled bytes, raw (a 4-step model emits invalid UTF-8: nothing is replaced)."""
    path = runs["TrueTernary"]
    assert main(["generate", "--ckpt", str(path), "--prompt", "the ", "--max_new_tokens", "12", "--seed", "1"]) == 0
    out, err = capsysbinary.readouterr()
    model, _ = load_for_inference(path)
    assert out == b"the " + sample(model, b"the ", 12, temperature=0.8, seed=1) + b"\n"
    n = sum(w.inference_bytes() for w in ternary_weights(model))
    assert f"inference state held: {n:,} bytes of ternary weights".encode() in err
    assert b"training state held: 0 bytes" in err
    assert main(["generate", "--ckpt", str(path), "--prompt", "the ", "--max_new_tokens", "0"]) == 0
    assert capsysbinary.readouterr().out == b"the \n"


def test_generate_float_checkpoint(runs, capsysbinary):
    assert main(["generate", "--ckpt", str(runs["Adam_FP32"]), "--max_new_tokens", "5"]) == 0
    assert b"float weights" in capsysbinary.readouterr().err


@pytest.mark.parametrize("flags, msg", [
    (["--max_new_tokens", "-1"], "--max_new_tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top_k", "-2"], "--top_k"),
    (["--device", "tpu"], "device"),
    (["--threads", "-1"], "--threads"),
])
def test_generate_bad_flags(runs, capsys, flags, msg):
    assert main(["generate", "--ckpt", str(runs["TrueTernary"]), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:") and msg in err and err.count("\n") == 1


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _with_scales(src, dst, edit):
    ck = ckpt_io.load_checkpoint(src)
    tensors = {k: v.clone() for k, v in ck.tensors.items()}
    edit(tensors)
    return ckpt_io.save_checkpoint(dst, tensors, {k: v for k, v in ck.meta.items() if k != "tensor_sha256"})


@pytest.mark.parametrize("config", ["TrueTernary", "TrueTernary_Hybrid"])
def test_scales_that_overflow_the_logits_are_a_one_line_error(runs, tmp_path, capsysbinary, config):
    """Scales within their bounds (E <= 127; a finite float log2_scale) whose products overflow float32: the
    logits are inf/NaN, which softmax would turn into NaN probabilities (a traceback): one line, exit 2."""
    def huge(tensors):  # the output layer's scales (earlier ones would be normalised away)
        for k, v in tensors.items():
            if k == "model/head.weight.E":
                v.fill_(127)
            elif k == "model/head.weight.log2_scale":
                v.fill_(200.0)

    bad = _with_scales(runs[config], tmp_path / "big.safetensors", huge)
    for temperature in ("0", "0.8"):
        assert main(["generate", "--ckpt", str(bad), "--max_new_tokens", "3", "--temperature", temperature]) == 2
        out, err = capsysbinary.readouterr()
        err = err.decode()
        assert err.startswith("trueternary: error:") and err.count("\n") == 1 and out == b""  # not even the prompt
        assert str(bad) in err and "logits are not finite" in err
    model, _ = load_for_inference(runs[config])
    assert len(sample(model, b"a", 3)) == 3  # the check passes finite logits


# ------------------------------------------------------------------------------------------------ key/value cache

SMALL = dict(ctx=16, d_model=32, n_layers=2, n_heads=2)


def _random_model(recipe: str):
    """A freshly initialised small transformer held as ``generate`` holds it (ternary: T_packed + E only)."""
    return build_inference_model(recipe, "transformer", SMALL, DEFAULT_GROUP_SIZE).eval()


def _record_last_logits(model, method: str) -> list:
    """Wrap ``model.<method>``: each call's input length and last-position logits are appended to the list."""
    calls, inner = [], getattr(model, method)

    def recorded(idx, *rest):
        out = inner(idx, *rest)
        calls.append((idx.shape[1], out[0, -1].clone()))
        return out

    setattr(model, method, recorded)  # an instance attribute: nn.Module.__call__ finds it as self.forward too
    return calls


@pytest.mark.parametrize("recipe", ["TrueTernary", "TrueTernary_Hybrid", "Adam_FP32"])
def test_forward_cached_equals_forward(recipe):
    """From an empty cache: forward itself, bit for bit. Then one-byte steps and a chunk continue it: the logits
    of forward over the whole sequence, up to float rounding. More positions than ctx: ValueError."""
    model = _random_model(recipe)
    x = torch.randint(0, 256, (2, SMALL["ctx"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache()
        assert torch.equal(model.forward_cached(x[:, :5], cache), model(x[:, :5]))
        steps = [model.forward_cached(x[:, i:i + 1], cache) for i in range(5, 9)]
        chunk = model.forward_cached(x[:, 9:], cache)
        assert cache.length == SMALL["ctx"]
        torch.testing.assert_close(torch.cat(steps + [chunk], 1), model(x)[:, 5:], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="exceed the model's context 16"):
            model.forward_cached(x[:, :1], cache)


@pytest.mark.parametrize("recipe", ["TrueTernary", "Adam_FP32"])
@pytest.mark.parametrize("prompt", [b"the ", bytes(range(40, 80))], ids=["short-prompt", "prompt-over-ctx"])
def test_cached_generation_equals_rerunning_the_window(recipe, prompt):
    """Greedy, over 4 x ctx bytes (the window restarts several times): the cached path predicts every byte from
    the logits the cache-less path computes (same window), so both give the same bytes."""
    n = 4 * SMALL["ctx"]
    reference, cached = _random_model(recipe), _random_model(recipe)
    ref_calls = _record_last_logits(reference, "forward")
    step_calls = _record_last_logits(cached, "forward_cached")
    slow = sample(reference, prompt, n, temperature=0, cache=False)
    fast = sample(cached, prompt, n, temperature=0)
    assert fast == slow and len(fast) == n and len(set(fast)) > 1  # (greedy random models fall into loops)
    assert len(ref_calls) == len(step_calls) == n
    torch.testing.assert_close(torch.stack([c[1] for c in step_calls]), torch.stack([c[1] for c in ref_calls]),
                               rtol=1e-5, atol=1e-5)
    # the cache was used: a few window encodings, one-byte steps otherwise
    encodings = [length for length, _ in step_calls if length > 1]
    assert encodings[0] == min(len(prompt), SMALL["ctx"]) and len(encodings) >= 6
    assert set(encodings[1:]) == {window_keep(SMALL["ctx"])}
    assert sum(length == 1 for length, _ in step_calls) == n - len(encodings)
    # every window the reference saw is at most ctx and at least ctx // 2 bytes once the first one filled
    windows = [length for length, _ in ref_calls]
    assert max(windows) == SMALL["ctx"] and min(windows[SMALL["ctx"]:]) == window_keep(SMALL["ctx"])


def test_sampled_generation_is_the_same_with_and_without_cache():
    model = _random_model("TrueTernary")
    out = sample(model, b"ab", 50, temperature=1.0, top_k=20, seed=5)
    assert out == sample(model, b"ab", 50, temperature=1.0, top_k=20, seed=5, cache=False) and len(set(out)) > 10


def test_morph_generates_without_a_cache():
    """MORPH (no key/value cache: its LSTM and graph state are not kept) reruns the window for every byte."""
    model = build_model("morph", 0, ctx=16, d_model=16, n_layers=1, n_heads=2, n_codes=8, code_dim=8,
                        graph_window=3, graph_heads=2, n_experts=3, top_k=2).eval()
    calls = _record_last_logits(model, "forward")
    out = sample(model, b"x", 40, temperature=0)
    assert len(out) == 40 and len(calls) == 40 and sample(model, b"x", 40, temperature=0, cache=False) == out


# ------------------------------------------------------------------------------------------------ streaming


def test_byte_stream_yields_each_byte_before_computing_the_next():
    model = _random_model("TrueTernary")
    calls = _record_last_logits(model, "forward_cached")
    stream = byte_stream(model, b"hello", 1000, temperature=0.8)
    first = [next(stream) for _ in range(3)]
    assert len(calls) == 3  # three bytes out after three model calls, 997 still to come
    assert bytes(first) == sample(_random_model("TrueTernary"), b"hello", 3, temperature=0.8)


def test_cli_writes_each_byte_as_it_is_sampled_and_ctrl_c_keeps_them(runs, monkeypatch, capsysbinary,
                                                                      sigint_interrupts):
    """While byte k is computed, the prompt and the k earlier bytes are already on stdout; a SIGINT then stops
    the run: those bytes stay, the line is ended, one line on stderr, exit 130."""
    from trueternary import generate

    path, seen = runs["TrueTernary"], []

    def load(*a, **kw):
        model, meta = load_for_inference(*a, **kw)
        inner = model.forward_cached

        def step(idx, cache):
            seen.append(capsysbinary.readouterr().out)
            if len(seen) == 6:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while byte 6 is computed
                time.sleep(1)  # the KeyboardInterrupt is raised here
            return inner(idx, cache)

        model.forward_cached = step
        return model, meta

    monkeypatch.setattr(generate, "load_for_inference", load)
    assert main(["generate", "--ckpt", str(path), "--prompt", "ab", "--max_new_tokens", "1000", "--seed", "2"]) == 130
    out, err = capsysbinary.readouterr()
    expected = b"ab" + sample(load_for_inference(path)[0], b"ab", 5, temperature=0.8, seed=2)
    assert seen[0] == b"" and seen[1] == expected[:3] and [len(s) for s in seen[2:]] == [1, 1, 1, 1]
    assert b"".join(seen) == expected and out == b"\n"
    assert err == b"trueternary: interrupted\n"


def test_a_closed_pipe_stops_generation_quietly(runs, monkeypatch, capsys):
    """`generate ... | head -c 10`: the reader goes away; generation stops, no traceback, exit 0."""
    class ClosingPipe(io.BytesIO):
        def write(self, data):
            if self.tell() >= 10:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(data)

    pipe = ClosingPipe()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(pipe))
    assert main(["generate", "--ckpt", str(runs["TrueTernary"]), "--max_new_tokens", "1000"]) == 0
    assert len(pipe.getvalue()) == 10 and "inference state held" in capsys.readouterr().err


def test_streamed_through_a_pipe_and_interrupted(runs):
    """The real command: its first bytes reach a pipe while it is still generating (flushed per byte), and
    SIGINT ends it with exit 130, one stderr line, and the bytes it printed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONUNBUFFERED", None)  # the command's own flushes are under test
    proc = subprocess.Popen([sys.executable, "-m", "trueternary.cli", "generate", "--ckpt", str(runs["TrueTernary"]),
                             "--prompt", "abc", "--max_new_tokens", "100000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (see sigint_interrupts)
    try:
        got, deadline = b"", time.monotonic() + 60
        while len(got) < 13:  # the prompt and 10 bytes (unflushed, they would sit in the process's buffer)
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no output within 60 s, got {got!r}"
            chunk = os.read(proc.stdout.fileno(), 64)
            assert chunk, proc.stderr.read().decode()[-2000:]
            got += chunk
        assert proc.poll() is None  # still generating
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = got + rest
    assert proc.returncode == 130 and err == b"trueternary: interrupted\n"
    # (unflushed, the first bytes would reach the pipe only once stdout's 4-8 KiB buffer filled)
    assert out.endswith(b"\n") and 14 <= len(out) < 1024
    model, _ = load_for_inference(runs["TrueTernary"])
    assert out[:-1] == b"abc" + sample(model, b"abc", len(out) - 4, temperature=0.8)


# ------------------------------------------------------------------------------------------------ benchmark


def test_bench_generate_times_both_paths(runs, tmp_path):
    r = run_as_main("benchmarks/bench_generate.py", [
        "--ckpt", str(runs["TrueTernary"]), "--model", "32,1,16,2", "--new_bytes", "20", "--warmup", "0",
        "--repeats", "2", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "generate.json").read_text())
    assert not res["errors"] and len(res["results"]) == 2
    for row in res["results"]:
        assert row["has_kv_cache"] and row["same_bytes"] and row["threads"] == 1
        assert len(row["cache"]["runs_s"]) == 2 and row["cache"]["bytes_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["no_cache"]["median_s"] / row["cache"]["median_s"])
    assert "TrueTernary d32 L1 ctx16" in r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "name at least one --ckpt or --model"),
    (["--model", "32,1"], "--model 32,1: expected D_MODEL,N_LAYERS,CTX"),
    (["--model", "32,1,16", "--device", "tpu"], "unknown device 'tpu'"),
    (["--model", "32,1,16", "--repeats", "0"], "--repeats must be >= 1"),
    (["--ckpt", "/no/such.safetensors"], "--ckpt /no/such.safetensors: no such file"),
], ids=["nothing", "bad-model", "bad-device", "no-repeats", "missing-ckpt"])
def test_bench_generate_bad_input(tmp_path, monkeypatch, capsys, args, message):
    """One-line usage errors, exit 2, before anything runs (in-process: the script's argument parsing)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate

    monkeypatch.setattr(sys, "argv", ["bench_generate.py", *args, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bench_generate.parse_args()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.strip().splitlines()[-1].count("error:") == 1, err
