"""Checkpoint files: round trip, atomic writes under a kill, and one-line errors for bad files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _train_helpers import tiny_config
from trueternary import checkpoint as ckpt_io
from trueternary.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trueternary.cli import main
from trueternary.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny TrueTernary run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("ckpt")
    train(tiny_config(tmp, max_steps=4, save_every=2))
    return tmp / "runs" / "run"


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    tensors = {"model/a.T_packed": torch.tensor([0, 121, 242], dtype=torch.uint8),
               "model/a.E": torch.tensor([[-3, 4]], dtype=torch.int8),
               "optim/0/1/exp_avg": torch.randn(3, 2, dtype=torch.bfloat16)}
    meta = {"recipe": "TrueTernary", "step": 7, "model": {"name": "transformer", "config": {}},
            "optimizers": [{"class": "AdamW", "state_dict": {"param_groups": [{"betas": (0.9, 0.95)}]}}]}
    path = save_checkpoint(tmp_path / "x.safetensors", tensors, meta)
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.recipe == "TrueTernary"
    assert ck.meta["optimizers"][0]["state_dict"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples survive
    for k, v in tensors.items():
        assert torch.equal(ck.tensors[k], v) and ck.tensors[k].dtype == v.dtype
    assert ck.meta["format_version"] == ckpt_io.FORMAT_VERSION
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_checkpoint_holds_ternary_state_and_metadata(trained):
    ck = load_checkpoint(ckpt_io.latest_checkpoint(trained))
    names = set(ck.tensors)
    for suffix in ("T_packed", "E", "E_accum", "T_accum"):
        assert f"model/blocks.0.qkv.weight.{suffix}" in names
    assert ck.tensors["model/blocks.0.qkv.weight.T_packed"].dtype == torch.uint8
    assert ck.tensors["model/blocks.0.qkv.weight.T_accum"].dtype == torch.int8
    kinds = ckpt_io.classify_tensors(names)
    # strict ternary: no float tensor anywhere in the model state
    assert not any(t.is_floating_point() for n, t in ck.tensors.items() if n.startswith("model/"))
    assert kinds
    assert {n for n, k in kinds.items() if k == "inference"} == {n for n in names if n.endswith((".T_packed", ".E"))}
    m = ck.meta
    assert m["step"] == 4 and m["recipe"] == "TrueTernary" and m["model"]["config"]["ctx"] == 16
    assert m["optimizers"][0]["class"] == "FlipOptimizer"
    assert m["optimizers"][0]["state_dict"]["trueternary"]["step"] == 4
    assert set(m["rng"]) == {"torch_cpu", "cuda"} and m["data"]["position"]["batches_drawn"] == 4
    assert m["train_config"]["batch_size"] == 4 and "rule" in m["hparams"]


@pytest.mark.parametrize("damage", ["flip_data_byte", "truncate", "truncate_header", "pad", "empty"])
def test_damaged_file_is_a_checkpoint_error(trained, tmp_path, damage):
    bad = _copy(ckpt_io.latest_checkpoint(trained), tmp_path / "bad.safetensors")
    raw = bytearray(bad.read_bytes())
    if damage == "flip_data_byte":
        raw[-10] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "truncate_header":
        raw = raw[:40]
    elif damage == "pad":
        raw += b"\0" * 16
    else:
        raw = bytearray()
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a trueternary checkpoint"):
        load_checkpoint(path)


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state": torch.zeros(2)}, path)  # a zip of pickles: must never reach pickle.load
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(trained, tmp_path):
    src = ckpt_io.latest_checkpoint(trained).read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    header = json.loads(src[8 : 8 + n])
    header["__metadata__"]["format_version"] = str(ckpt_io.FORMAT_VERSION + 1)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "future.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + src[8 + n :])
    with pytest.raises(CheckpointError, match="newer than this trueternary reads"):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_invalid_packed_bytes_are_refused_on_restore(trained, tmp_path):
    """A well-formed file whose T_packed holds a byte > 242 (not a trit packing) never reaches training."""
    ck = load_checkpoint(ckpt_io.latest_checkpoint(trained))
    tensors = dict(ck.tensors)
    tensors["model/head.weight.T_packed"] = tensors["model/head.weight.T_packed"].clone()
    tensors["model/head.weight.T_packed"][0] = 250
    meta = {k: v for k, v in ck.meta.items() if k != "tensor_sha256"}
    save_checkpoint(tmp_path / "runs" / "evil" / "checkpoints" / "step_0000004.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="242"):
        train(tiny_config(tmp_path, max_steps=6, resume=str(tmp_path / "runs" / "evil"), run_name="evil2",
                          data=ck.meta["train_config"]["data"]))


def test_exception_during_save_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"model/x": torch.ones(4)}, {"recipe": "TrueTernary", "step": 1, "model": {}})
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", half_then_fail)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*disk full"):
        save_checkpoint(path, {"model/x": torch.zeros(4)}, {"recipe": "TrueTernary", "step": 2, "model": {}})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch as st
    from safetensors.torch import save as serialize
    from trueternary import checkpoint as ckpt_io

    def killed_mid_write(tensors, filename, metadata=None):
        data = serialize(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: like a power cut or OOM kill

    st.save_file = killed_mid_write
    src = ckpt_io.load_checkpoint(sys.argv[1])
    meta = {k: v for k, v in src.meta.items() if k != "tensor_sha256"}
    meta["step"] = 6
    ckpt_io.save_checkpoint(sys.argv[2], src.tensors, meta)
""")


def test_kill_during_save_leaves_previous_checkpoint_loadable(trained, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    prev = _copy(ckpt_io.latest_checkpoint(trained), ckpt_io.checkpoint_path(run, 4))
    target = ckpt_io.checkpoint_path(run, 6)
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(prev), str(target)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    junk = [p for p in (run / "checkpoints").iterdir() if p != prev]
    assert len(junk) == 1 and junk[0].name.startswith(".step_0000006.safetensors.tmp-")  # the partial write
    assert not target.exists()
    # the partial file is never taken for a checkpoint, and the previous one still loads
    assert ckpt_io.list_checkpoints(run) == [prev] and ckpt_io.latest_checkpoint(run) == prev
    assert load_checkpoint(prev).step == 4
    with pytest.raises(CheckpointError):
        load_checkpoint(junk[0])
    # the next save cleans the leftover up
    assert ckpt_io.remove_stale_temporaries(run) == junk and not junk[0].exists()


def test_info_lists_contents(trained, capsys):
    path = ckpt_io.latest_checkpoint(trained)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    ck = load_checkpoint(path)
    assert "recipe            TrueTernary" in out and "step              4" in out
    assert "model/blocks.0.qkv.weight.T_accum" in out and "I8" in out
    n_tern = sum(t.numel() for n, t in ck.tensors.items() if n.endswith(".T_accum"))
    assert f"ternary weights   {n_tern:,}" in out
    infer = sum(t.numel() * t.element_size() for n, t in ck.tensors.items() if n.endswith((".T_packed", ".E")))
    assert f"inference bytes   {ckpt_io._fmt_bytes(infer)}" in out


def test_info_on_bad_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(64))
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:") and err.count("\n") == 1
