"""Checkpoint files: round trip, atomic writes under a kill, and one-line errors for bad files."""

from __future__ import annotations

import copy
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


# A minimal consistent checkpoint: one ternary weight of 3 x 5 trits (3 packed bytes, one group per row) as the
# only weights of a transformer small enough to be held by them.
TINY_MODEL = {"name": "transformer", "config": {"vocab_size": 3, "ctx": 2, "d_model": 2, "n_layers": 1,
                                                "n_heads": 1, "mlp_ratio": 1.0}}


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    tensors = {"model/a.T_packed": torch.tensor([0, 121, 242], dtype=torch.uint8),
               "model/a.E": torch.tensor([[-3], [4], [0]], dtype=torch.int8),
               "optim/0/1/exp_avg": torch.randn(3, 2, dtype=torch.bfloat16)}
    meta = {"recipe": "TrueTernary", "step": 7, "model": TINY_MODEL,
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


# ------------------------------------------------------------------------------------ every field validated
def _rewrite(src: Path, dst: Path, edit) -> Path:
    """``src`` re-saved (atomically, fresh checksum) after ``edit(meta, tensors)`` changed its copy."""
    ck = load_checkpoint(src)
    meta = copy.deepcopy({k: v for k, v in ck.meta.items() if k != "tensor_sha256"})
    tensors = {k: v.clone() for k, v in ck.tensors.items()}
    edit(meta, tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(dst, tensors, meta)


def _set(*keys_and_value):
    """An edit setting meta[k1][k2]... = value."""
    *keys, value = keys_and_value

    def edit(meta, tensors):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _tensor(name, index, value):
    def edit(meta, tensors):
        tensors[name].view(-1)[index] = value
    return edit


def _drop_rng(meta, tensors):
    meta["rng"]["torch_cpu"] = meta["rng"]["torch_cpu"][:-8]


def _two_positions(meta, tensors):
    meta["data"]["world_size"] = 2
    meta["data"]["positions"] = [meta["data"]["position"]]


def _state_key(meta, tensors):
    meta["optimizers"][0]["state_dict"]["state"]["abc"] = {}


def _group_size_8(meta, tensors):  # hparams and flags agree, the scales' shapes do not
    meta["hparams"]["group_size"] = meta["train_config"]["group_size"] = 8


def _foreign_optim_tensor(meta, tensors):
    tensors["optim/3/1/exp_avg"] = torch.zeros(2)


QKV = "model/blocks.0.qkv.weight"
BAD_META = {
    "step-text": (_set("step", "abc"), "step must be an integer in [0, "),
    "step-negative": (_set("step", -5), "step must be an integer"),
    "step-huge": (_set("step", 2**60), "step must be an integer"),
    "step-bool": (_set("step", True), "step must be an integer"),
    "recipe": (_set("recipe", "GPT"), "unknown config 'GPT'"),
    "format-version": (_set("format_version", "1"), "format_version must be an integer"),
    "created": (_set("created_unix", "yesterday"), "created_unix"),
    "model-name": (_set("model", "name", "gpt"), "unknown model 'gpt'"),
    "model-config": (_set("model", "config", [1]), "model config must be an object"),
    "d_model-text": (_set("model", "config", "d_model", "abc"), "model config field 'd_model' must be int"),
    "d_model-huge": (_set("model", "config", "d_model", 10**6), "exceeds the"),
    "d_model-other": (_set("model", "config", "d_model", 64), "does not match the embedding"),
    "n_layers-other": (_set("model", "config", "n_layers", 2), "n_layers 2 does not match the file's 1 layers"),
    "n_heads-odd": (_set("model", "config", "n_heads", 3), "bad model config"),
    "ctx-huge": (_set("model", "config", "ctx", 2**25), "ctx 33554432 exceeds"),
    "mlp-ratio-huge": (_set("model", "config", "mlp_ratio", 1e30), "mlp_ratio"),
    "mlp-ratio-inf": (_set("model", "config", "mlp_ratio", float("inf")), "model config field 'mlp_ratio'"),
    "train-batch-text": (_set("train_config", "batch_size", "abc"), "train_config field 'batch_size'"),
    "train-lr-text": (_set("train_config", "lr", "fast"), "train_config field 'lr'"),
    "train-stop-negative": (_set("train_config", "stop_at", -1), "train_config field 'stop_at'"),
    "train-d_model": (_set("train_config", "d_model", 64), "train_config d_model 64 differs"),
    "train-config": (_set("train_config", "config", "Adam_FP32"), "train_config config 'Adam_FP32' differs"),
    "train-ctx": (_set("train_config", "ctx", 17), "train_config ctx 17 exceeds the model's context 16"),
    "train-rule": (_set("train_config", "rule", [1]), "train_config field 'rule'"),
    "hparams-group-size": (_set("hparams", "group_size", 0), "hparams group_size must be an integer in [1, "),
    "hparams-group-size-other": (_group_size_8, "not one matrix in groups of 8"),
    "hparams-rule": (_set("hparams", "rule", "accum_threshold", 500), "bad hparams rule"),
    "hparams-lr": (_set("hparams", "lr", {"TrueTernary": -1.0}), "hparams lr of 'TrueTernary'"),
    "optimizers": (_set("optimizers", "x"), "optimizers must be a list"),
    "optimizer-class": (_set("optimizers", 0, "class", 3), "optimizer 0 class"),
    "optimizer-state-key": (_state_key, "optimizer 0 state: bad entry 'abc'"),
    "optimizer-params": (_set("optimizers", 0, "state_dict", "param_groups", 0, "params", ["a"]), "parameter ids"),
    "optimizer-tensor": (_foreign_optim_tensor, "optim/3/1/exp_avg"),
    "rng-truncated": (_drop_rng, "bad rng torch_cpu"),
    "rng-not-base64": (_set("rng", "torch_cpu", "!!"), "bad rng torch_cpu"),
    "rng-cuda": (_set("rng", "cuda", ["!!"]), "rng cuda states"),
    "data-batches-text": (_set("data", "position", "batches_drawn", "abc"), "batches_drawn must be an integer"),
    "data-batches-negative": (_set("data", "position", "batches_drawn", -5), "batches_drawn must be an integer"),
    "data-generator": (_set("data", "position", "generator", "AAAA"), "bad data position generator"),
    "data-world": (_set("data", "world_size", 0), "data world_size must be an integer in [1, "),
    "data-positions": (_two_positions, "one position per rank (2)"),
    "T_accum-128": (_tensor(QKV + ".T_accum", 0, -128), "T_accum holds -128, outside [-127, 127]"),
    "E-128": (_tensor(QKV + ".E", 3, -128), "blocks.0.qkv.weight.E: E holds -128"),
    "E_accum-128": (_tensor(QKV + ".E_accum", 0, -128), "E_accum holds -128"),
    "T_packed-243": (_tensor(QKV + ".T_packed", 5, 243), "packed byte 243 > 242"),
}


@pytest.fixture(scope="module")
def good_checkpoint(trained):
    return ckpt_io.latest_checkpoint(trained)


@pytest.mark.parametrize("case", list(BAD_META))
def test_every_field_is_validated_when_read(good_checkpoint, tmp_path, case):
    """Each field of a well-formed file (fresh checksum) out of its type, range, shape or agreement: a one-line
    CheckpointError from load_checkpoint, before anything is built from it."""
    edit, match = BAD_META[case]
    bad = _rewrite(good_checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert match in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(str(bad))


@pytest.mark.parametrize("case", ["step-text", "step-negative", "T_accum-128", "data-batches-negative"])
def test_resume_from_a_bad_field_is_one_line_exit_2_and_writes_nothing(good_checkpoint, tmp_path, capsys, case):
    """`train --resume` of such a file (step -5 used to resume and write step_-000001.safetensors): exit 2, one
    line, and neither the resumed run directory nor a new one gains a file."""
    run = tmp_path / "runs" / "run"
    bad = _rewrite(good_checkpoint, ckpt_io.checkpoint_path(run, 4), BAD_META[case][0])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    data = load_checkpoint(good_checkpoint).meta["train_config"]["data"]
    for target in (["--resume", "auto", "--run_name", "run"], ["--resume", str(bad), "--run_name", "branch"]):
        argv = ["train", *target, "--out_dir", str(tmp_path / "runs"), "--data", data, "--device", "cpu"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("trueternary: error:") and err.count("\n") == 1 and BAD_META[case][1] in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    for cmd in (["info", str(bad)], ["generate", "--ckpt", str(bad), "--max_new_tokens", "2"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.startswith("trueternary: error:") and err.count("\n") == 1


def _header_edit(src: Path, dst: Path, edit) -> Path:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda h: h[QKV + ".E"].pop("data_offsets"), "bad header entry"),
    (lambda h: h[QKV + ".E"].update(dtype="X9"), "bad header entry"),
    (lambda h: h[QKV + ".E"].update(shape=[-1, 2]), "bad header entry"),
    (lambda h: h[QKV + ".E"].update(shape=[1, 2]), "bad header entry"),  # shape x dtype != the bytes it spans
    (lambda h: h.update(weird=h.pop(QKV + ".E")), "unexpected tensor 'weird'"),
], ids=["no-offsets", "dtype", "negative-dim", "shape-vs-bytes", "name"])
def test_bad_tensor_index_is_a_checkpoint_error(good_checkpoint, tmp_path, edit, match):
    bad = _header_edit(good_checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)


def test_a_corrupt_value_reads_as_corruption_not_as_a_range_error(good_checkpoint, tmp_path):
    """A byte > 242 from a damaged file (checksum no longer holds) is reported as corruption."""
    bad = _copy(good_checkpoint, tmp_path / "bad.safetensors")
    index, _ = ckpt_io.read_header(bad)
    (n,) = struct.unpack("<Q", bad.read_bytes()[:8])
    raw = bytearray(bad.read_bytes())
    raw[8 + n + index[QKV + ".T_packed"]["data_offsets"][0]] = 250
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(bad)


def test_float_state_must_be_finite(tmp_path):
    tensors = {"model/a.T_packed": torch.tensor([0, 121, 242], dtype=torch.uint8),
               "model/a.E": torch.tensor([[-3], [4], [0]], dtype=torch.int8),
               "optim/0/1/exp_avg": torch.tensor([1.0, float("nan")])}
    meta = {"recipe": "TrueTernary", "step": 7, "model": TINY_MODEL, "optimizers": [{"class": "AdamW",
                                                                                      "state_dict": {}}]}
    with pytest.raises(CheckpointError, match="optim/0/1/exp_avg holds NaN/inf"):
        load_checkpoint(save_checkpoint(tmp_path / "x.safetensors", tensors, meta))


@pytest.fixture(scope="module")
def adam_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adam")
    train(tiny_config(tmp, config="Adam_FP32", max_steps=2))
    return ckpt_io.latest_checkpoint(tmp / "runs" / "run")


def _replace_tensor(name, value):
    def edit(meta, tensors):
        tensors[name] = value
    return edit


ADAM_GROUP = ("optimizers", 0, "state_dict", "param_groups", 0)


@pytest.mark.parametrize("edit, match", [
    (_set(*ADAM_GROUP, "lr", "fast"), "lr must be like"),
    (_set(*ADAM_GROUP, "lr", -1.0), "Invalid learning rate"),
    (_set(*ADAM_GROUP, "betas", [0.9, 1.5]), "Invalid beta parameter"),
    (_set(*ADAM_GROUP, "amsgrad", 1), "amsgrad must be like False"),
    (_set(*ADAM_GROUP, "params", [0]), "a param group of 1 parameters"),
    (_replace_tensor("optim/0/0/exp_avg", torch.zeros(3)), "exp_avg is torch.float32 [3], expected"),
    (_replace_tensor("optim/0/0/step", torch.zeros(2)), "step is torch.float32 [2], expected"),
], ids=["lr-text", "lr-negative", "beta", "amsgrad-int", "params", "exp_avg-shape", "step-shape"])
def test_float_optimizer_state_is_validated_on_restore(adam_checkpoint, tmp_path, capsys, edit, match):
    """AdamW's hyper-parameters (by its own constructor's checks), switches and state shapes: resuming is one
    line, exit 2, and the run directory gains nothing."""
    _assert_resume_refused(adam_checkpoint, 2, edit, match, tmp_path, capsys)


@pytest.mark.parametrize("edit, match", [
    (_set("optimizers", 0, "state_dict", "trueternary", "step", "abc"), "FlipOptimizer step must be an integer"),
    (_set("optimizers", 0, "state_dict", "trueternary", "seed", -1), "FlipOptimizer seed must be an integer"),
    (_tensor("optim/0/1/norm_tile", 0, -32767), "norm_tile holds -32767"),
    (_replace_tensor("optim/0/1/norm_row", torch.zeros(3, dtype=torch.int8)), "norm_row must be torch.int8"),
], ids=["step-text", "seed-negative", "tile-code", "code-shape"])
def test_flip_optimizer_state_is_validated_on_restore(good_checkpoint, tmp_path, capsys, edit, match):
    _assert_resume_refused(good_checkpoint, 4, edit, match, tmp_path, capsys)


def _assert_resume_refused(checkpoint, step, edit, match, tmp_path, capsys):
    """``checkpoint`` edited by ``edit`` as run ``run``'s step ``step``: ``train --resume auto`` is one line naming
    ``match``, exit 2, and nothing under ``tmp_path`` changes."""
    run = tmp_path / "runs" / "run"
    _rewrite(checkpoint, ckpt_io.checkpoint_path(run, step), edit)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    data = load_checkpoint(checkpoint).meta["train_config"]["data"]
    assert main(["train", "--resume", "auto", "--run_name", "run", "--out_dir", str(tmp_path / "runs"), "--data", data,
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error:") and err.count("\n") == 1 and match in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
