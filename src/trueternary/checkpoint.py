"""Checkpoints: one safetensors file per save, written atomically, verified on load, never pickled.

File layout (format ``trueternary.checkpoint``, version ``FORMAT_VERSION``):

    tensors
        model/<state_dict key>          every entry of ``model.state_dict()``: for ternary weights
                                        ``...weight.T_packed`` (uint8), ``.E`` / ``.E_accum`` (int8 per group),
                                        ``.T_accum`` (int8 per weight); integer biases
                                        ``.q`` / ``.exp``; float parameters of float configs
        optim/<i>/<param>/<key>         tensor entries of optimiser ``i``'s ``state_dict()["state"][param]``
                                        (AdamW ``exp_avg``, ``exp_avg_sq``, ``step``); FlipOptimizer has none
    header metadata (safetensors ``__metadata__``, all strings)
        format           "trueternary.checkpoint"
        format_version   "1"
        trueternary      JSON: see ``Checkpoint.meta`` keys below

``meta`` keys: ``format_version``, ``trueternary_version``, ``torch_version``, ``created_unix``,
``recipe`` (config name), ``step`` (optimiser steps completed), ``model`` ({name, config}),
``train_config``, ``hparams``, ``optimizers`` (per optimiser: class and the non-tensor part of its
``state_dict``: param groups, FlipOptimizer step/seed), ``rng`` (base64 torch CPU state, CUDA states or
null), ``data`` (corpus name, sha256 fingerprint, data position: generator state + batches drawn),
``tensor_sha256`` (sha256 over every tensor's name, dtype, shape and bytes in sorted-name order).

Writes go to a hidden temporary file in the same directory (``.<name>.tmp-<pid>``), are fsynced and
then ``os.replace``d over the target, and the directory is fsynced: a process killed mid-save leaves
the previous file intact, and its partial temporary never matches a checkpoint name. A write that fails
(disk full, read-only file system, no permission) removes its temporary and raises a one-line
:class:`WriteError` (:class:`CheckpointError` for a checkpoint) naming the path. Loads check the
header, the format and version, every tensor entry and metadata field with its bounds (``_check_meta``), every
tensor against ``tensor_sha256``, then the tensors' values (``_bad_tensor_value``): a corrupt, truncated,
foreign, newer or hand-edited file raises :class:`CheckpointError` with a one-line message before anything
is built from it; ``restore_recipe`` then checks that the state fits the model and its optimisers.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import CheckpointError, WriteError
from .trainconfig import TrainConfig
from .weight import DEFAULT_GROUP_SIZE

FORMAT = "trueternary.checkpoint"
FORMAT_VERSION = 1
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"step_(\d+)\.safetensors")
_TMP_RE = re.compile(r"\..+\.tmp-\d+")
_SERIALIZER_TMP_RE = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors' own temporary (Rust's tempfile crate)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


# ------------------------------------------------------------------------------------ JSON helpers
def _to_json(obj):
    """JSON-ready copy; tuples are tagged so optimiser hyper-parameters (AdamW betas) round-trip exactly."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        raise TypeError("tensors go into the safetensors body, not the JSON metadata")
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def encode_bytes(t: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text for the JSON metadata."""
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def decode_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _hash_update(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    h.update(_tensor_bytes(t))


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_update(h, name, tensors[name])
    return h.hexdigest()


# ------------------------------------------------------------------------------------ writing
def write_error(path: str | os.PathLike, e: OSError, verb: str = "write") -> WriteError:
    reason = e.strerror or _one_line(e)
    return WriteError(f"cannot {verb} {path}: {reason}", reason)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:  # already gone, or the file system refuses: nothing more to do here
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then fsync and rename over ``path``. On any failure (an exception, or an
    interrupt) ``path`` is untouched and the temporary is removed; an OSError becomes a :class:`WriteError`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            _remove_quietly(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def _as_os_error(e: Exception) -> OSError | None:
    """safetensors reports an I/O failure as its own exception type (``... I/O error: <text> (os error N)``):
    the OSError it stands for, or None for any other failure."""
    m = _OS_ERROR_RE.search(str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-able) to ``path`` atomically; returns the path. A failed write
    (disk full, permissions, ...) raises :class:`CheckpointError` and leaves the previous file untouched."""
    from safetensors.torch import save_file

    from . import __version__

    body: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        body[name] = t
    meta = {
        "format_version": FORMAT_VERSION,
        "trueternary_version": __version__,
        "torch_version": torch.__version__,
        "created_unix": time.time(),
        **meta,
        "tensor_sha256": tensors_sha256(body),
    }
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "trueternary": json.dumps(_to_json(meta))}

    def serialize(tmp: str) -> None:
        try:
            save_file(body, tmp, metadata=header)
        except OSError:
            raise
        except Exception as e:
            os_error = _as_os_error(e)
            if os_error is None:
                raise CheckpointError(f"cannot write checkpoint {path}: {_one_line(e)}") from None
            raise os_error from None

    try:
        atomic_write(path, serialize)
    except WriteError as e:  # disk full, permissions, ...: the previous checkpoint is untouched
        raise CheckpointError(f"cannot write checkpoint {path}: {e.reason}") from None
    return Path(path)


# ------------------------------------------------------------------------------------ reading
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensor index, trueternary meta) from the safetensors header, validating format and version."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a checkpoint (file of {size} bytes is too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    md = header.pop("__metadata__", None) or {}
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file but not a trueternary checkpoint (no '{FORMAT}' metadata)")
    try:
        version = int(md.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{path}: bad checkpoint format version {md.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this trueternary reads "
            f"(<= {FORMAT_VERSION}); upgrade trueternary"
        )
    if version < 1:
        raise CheckpointError(f"{path}: bad checkpoint format version {version}")
    try:
        meta = _from_json(json.loads(md["trueternary"]))
        if not isinstance(meta, dict):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path}: checkpoint metadata is missing or not valid JSON") from None
    _check_index(path, header)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded checkpoint ({size} bytes, header says {8 + n + end})")
    return header, meta


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]
    index: dict  # name -> {"dtype", "shape", "data_offsets"} from the header, for every tensor in the file

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def recipe(self) -> str:
        return str(self.meta["recipe"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        n = len(MODEL_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(MODEL_PREFIX)}

    def optimizer_state_dict(self, i: int) -> dict:
        """Optimiser ``i``'s ``state_dict()`` rebuilt from its JSON part and its tensors."""
        try:
            sd = dict(self.meta["optimizers"][i]["state_dict"])
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"{self.path}: no state for optimiser {i}") from None
        state = {int(pid): dict(st) for pid, st in sd.get("state", {}).items()}
        prefix = f"{OPTIM_PREFIX}{i}/"
        for name, t in self.tensors.items():
            if name.startswith(prefix):
                pid, key = name[len(prefix):].split("/", 1)
                state.setdefault(int(pid), {})[key] = t
        sd["state"] = state
        return sd


def load_checkpoint(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Checkpoint:
    """Read and verify a checkpoint. ``keep(name)`` selects which tensors stay in memory (default all);
    every tensor is still read once to check ``tensor_sha256``."""
    from safetensors import safe_open

    path = Path(path)
    index, meta = read_header(path)
    _check_meta(path, meta, index)
    h = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    bad_value = None  # the first tensor value out of bounds, reported once the checksum holds (else: corrupt)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                _hash_update(h, name, t)
                bad_value = bad_value or _bad_tensor_value(name, t, index)
                if keep is None or keep(name):
                    tensors[name] = t
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: unreadable checkpoint ({_one_line(e)})") from None
    if h.hexdigest() != meta.get("tensor_sha256"):
        raise CheckpointError(f"{path}: checksum mismatch: the checkpoint is corrupt")
    if bad_value:
        raise CheckpointError(f"{path}: {bad_value}")
    return Checkpoint(path=path, meta=meta, tensors=tensors, index=index)


# ------------------------------------------------------------------------------------ validation (reading)
# Every field is checked when a checkpoint is read (load_checkpoint), each with its bounds, so a damaged or
# hand-edited file fails in one line before a model is built from it or anything is written next to it. Whether
# the tensors fit the model and the optimisers is checked when they are restored (restore_recipe: load_state_dict,
# FlipOptimizer.load_state_dict, _check_torch_optimizer).
MAX_COUNT = 2**53 - 1  # steps, seeds, batches drawn, config integers: what every JSON reader keeps exact
MAX_WORLD = 1 << 16  # data-parallel ranks
MAX_CTX = 1 << 24  # model context: float32 counts positions exactly up to 2**24 (rotary tables)
MAX_OPTIMIZERS = 16
MAX_CUDA_STATE = 64  # bytes of one CUDA generator state (16 in torch 2.x: seed and offset)


def _fail(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(path, name: str, v, lo: int, hi: int) -> int:
    if not (_is_int(v) and lo <= v <= hi):
        raise _fail(path, f"{name} must be an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _check_dict(path, name: str, v) -> dict:
    if not isinstance(v, dict):
        raise _fail(path, f"{name} must be an object, got {_show(v)}")
    return v


def _check_str(path, name: str, v, max_len: int = 4096) -> str:
    if not (isinstance(v, str) and len(v) <= max_len):
        raise _fail(path, f"{name} must be a string of at most {max_len} characters, got {_show(v)}")
    return v


def _check_index(path, index: dict) -> None:
    """Every tensor entry of the header: a name under model/ or optim/, a known dtype, a shape of at most 8
    non-negative integers, and data offsets that hold exactly shape x dtype bytes (read_header then checks that
    they end where the file does)."""
    for name, info in index.items():
        if not name.startswith((MODEL_PREFIX, OPTIM_PREFIX)):
            raise _fail(path, f"unexpected tensor {_show(name)} (not under {MODEL_PREFIX} or {OPTIM_PREFIX})")
        ok = isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
        ok = ok and 0 <= offsets[0] <= offsets[1]
        if not (ok and offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_BYTES[info["dtype"]]):
            raise _fail(path, f"bad header entry for tensor {_show(name)}: {_show(info)}")


def _has_type(v, allowed: set[str]) -> bool:
    """Whether a JSON value ``v`` is one of the annotated types ``allowed`` (ints in [0, MAX_COUNT], finite floats)."""
    if v is None:
        return "None" in allowed
    if isinstance(v, bool):
        return "bool" in allowed
    if isinstance(v, int):
        return ("int" in allowed and 0 <= v <= MAX_COUNT) or ("float" in allowed and abs(v) <= MAX_COUNT)
    if isinstance(v, float):
        return "float" in allowed and math.isfinite(v)
    if isinstance(v, str):
        return "str" in allowed and len(v) <= 4096
    if isinstance(v, dict):
        return bool(allowed & {"dict", "FlipRule"})  # a FlipRule is stored as its dict
    if isinstance(v, (list, tuple)):
        return bool(allowed & {"list", "tuple"})
    return False


def _check_fields(path, where: str, d: dict, cls) -> None:
    """Each field of the dataclass ``cls`` present in ``d`` has its annotated type (``_has_type``); keys ``cls``
    does not know are left alone (its readers ignore them)."""
    annotations = {f.name: {t.strip() for t in str(f.type).split("|")} for f in fields(cls)}
    for key, v in d.items():
        allowed = annotations.get(key)
        if allowed is not None and not _has_type(v, allowed):
            kinds = " or ".join(sorted(allowed)).replace("int", f"int in [0, {MAX_COUNT}]")
            raise _fail(path, f"{where} field {key!r} must be {kinds}, got {_show(v)}")


def _check_generator_state(path, name: str, b64) -> None:
    """Base64 of a CPU torch.Generator state that a generator accepts."""
    _check_str(path, name, b64, 1 << 16)
    try:
        raw = base64.b64decode(b64, validate=True)
        torch.Generator().set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except (ValueError, RuntimeError) as e:
        raise _fail(path, f"bad {name} ({_one_line(e)[:120]})") from None


def _check_meta(path, meta: dict, index: dict) -> None:
    """Every metadata field of the module docstring's list, with its bounds and its agreement with the tensors."""
    from .recipes import CONFIG_NAMES

    for key in ("step", "recipe", "model"):
        if key not in meta:
            raise _fail(path, f"checkpoint metadata lacks {key!r}")
    _check_int(path, "format_version", meta.get("format_version", FORMAT_VERSION), 1, FORMAT_VERSION)
    for key in ("trueternary_version", "torch_version"):
        if key in meta:
            _check_str(path, key, meta[key], 100)
    created = meta.get("created_unix", 0)
    if not (isinstance(created, (int, float)) and not isinstance(created, bool) and 0 <= created < 1e11):
        raise _fail(path, f"created_unix must be a time in seconds, got {_show(created)}")
    _check_int(path, "step", meta["step"], 0, MAX_COUNT)
    if meta["recipe"] not in CONFIG_NAMES:
        raise _fail(path, f"unknown config {_show(meta['recipe'])} (known: {', '.join(CONFIG_NAMES)})")
    _check_model(path, meta["model"], index)
    hparams = _check_dict(path, "hparams", meta.get("hparams", {}))
    _check_hparams(path, hparams)
    if "train_config" in meta:
        _check_train_config(path, _check_dict(path, "train_config", meta["train_config"]), meta)
    _check_ternary_shapes(path, index, hparams.get("group_size", DEFAULT_GROUP_SIZE))
    _check_optimizers(path, meta.get("optimizers", []), index)
    if "rng" in meta:
        _check_rng(path, meta["rng"])
    if "data" in meta:
        _check_data(path, meta["data"])


def _check_model(path, model, index: dict) -> None:
    from .models import _MODELS, model_names

    model = _check_dict(path, "model", model)
    name = model.get("name")
    if name not in model_names():
        raise _fail(path, f"unknown model {_show(name)} (known: {', '.join(model_names())})")
    config = _check_dict(path, "model config", model.get("config"))
    cfg_cls = _MODELS[name][1]
    _check_fields(path, "model config", config, cfg_cls)
    try:
        cfg = cfg_cls.from_dict(config).to_dict()
    except (ValueError, TypeError, OverflowError) as e:
        raise _fail(path, f"bad model config ({_one_line(e)[:200]})") from None
    _check_model_size(path, cfg, index)


def _stored_weights(index: dict) -> int:
    """Weights the model tensors hold: their elements, packed trits counted 5 per byte."""
    return sum(math.prod(info["shape"]) * (5 if name.endswith(".T_packed") else 1)
               for name, info in index.items() if name.startswith(MODEL_PREFIX))


def _check_model_size(path, cfg: dict, index: dict) -> None:
    """The model the config describes is the one the file holds, so that a hand-edited config cannot make
    ``generate`` or ``train`` build a model beyond the file's size: the token embedding's shape and the layer
    count where the file shows them (the built-in families' ``embed.weight`` and ``blocks.<i>``), ``ctx`` at most
    MAX_CTX, and every width, count and product of them that sizes a stored matrix at most the weights stored."""
    stored = _stored_weights(index)
    if cfg.get("ctx", 1) > MAX_CTX:
        raise _fail(path, f"model config ctx {cfg['ctx']} exceeds {MAX_CTX}")
    d, V, L = cfg.get("d_model", 1), cfg.get("vocab_size", 1), cfg.get("n_layers", 1)
    sizes = {k: v for k, v in cfg.items() if _is_int(v) and k != "ctx"}
    sizes.update({"vocab_size * d_model (the token embedding)": V * d, "n_layers * d_model**2": L * d * d,
                  "mlp_ratio * d_model**2 (an MLP matrix)": cfg.get("mlp_ratio", 1) * d * d,  # (float: may be inf)
                  "n_experts * d_model": cfg.get("n_experts", 1) * d,
                  "n_codes * code_dim": cfg.get("n_codes", 1) * cfg.get("code_dim", 1)})
    for what, n in sizes.items():
        if n > stored:
            raise _fail(path, f"model config {what} = {n} exceeds the {stored} weights the file holds")
    emb = [index[k]["shape"] for k in (MODEL_PREFIX + "embed.weight", MODEL_PREFIX + "embed.weight.T_accum")
           if k in index]
    if emb and emb[0] != [V, d]:
        raise _fail(path, f"model config vocab_size x d_model {V} x {d} does not match the embedding {emb[0]}")
    blocks = {int(m.group(1)) for n in index if (m := _BLOCK_RE.match(n))}
    if blocks and blocks != set(range(L)):
        raise _fail(path, f"model config n_layers {L} does not match the file's {len(blocks)} layers")


_BLOCK_RE = re.compile(re.escape(MODEL_PREFIX) + r"blocks\.(\d{1,9})\.")


def _check_hparams(path, hparams: dict) -> None:
    from .recipes import Hparams
    from .rule import FlipRule

    _check_fields(path, "hparams", hparams, Hparams)
    if "group_size" in hparams:
        _check_int(path, "hparams group_size", hparams["group_size"], 1, MAX_COUNT)
    for name, lr in _check_dict(path, "hparams lr", hparams.get("lr", {})).items():
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < math.inf):
            raise _fail(path, f"hparams lr of {_show(name)} must be a finite number > 0, got {_show(lr)}")
    if hparams.get("rule") is not None:
        try:
            FlipRule.from_dict(hparams["rule"])
        except (ValueError, TypeError) as e:
            raise _fail(path, f"bad hparams rule ({_one_line(e)[:200]})") from None


def _check_train_config(path, tc: dict, meta: dict) -> None:
    """Types and bounds of every TrainConfig field (their finer ranges are the flags' own, checked by
    ``train.validate`` when the run resumes), and agreement with the checkpoint's config, model and scales."""
    _check_fields(path, "train_config", tc, TrainConfig)
    mcfg = meta["model"]["config"]
    agree = {"config": meta["recipe"], "model": meta["model"]["name"],
             **{k: mcfg[k] for k in ("d_model", "n_layers", "n_heads") if k in mcfg}}
    if "group_size" in meta.get("hparams", {}):
        agree["group_size"] = meta["hparams"]["group_size"]
    for key, want in agree.items():
        if key in tc and tc[key] != want:
            raise _fail(path, f"train_config {key} {_show(tc[key])} differs from the checkpoint's {_show(want)}")
    if _is_int(tc.get("ctx")) and _is_int(mcfg.get("ctx")) and tc["ctx"] > mcfg["ctx"]:
        raise _fail(path, f"train_config ctx {tc['ctx']} exceeds the model's context {mcfg['ctx']}")
    if "rule" in tc:
        for k in tc["rule"]:
            if not isinstance(k, str):
                raise _fail(path, f"train_config rule keys must be strings, got {_show(k)}")


def _check_ternary_shapes(path, index: dict, group_size) -> None:
    """Each ternary weight (``<w>.T_packed``) is one consistent (rows, cols) matrix in groups of ``group_size``:
    ``E`` (rows, n_groups) and ``E_accum`` / ``log2_scale`` alike, ``T_accum`` (rows, cols) with n_groups =
    ceil(cols / group_size), ``T_packed`` ceil(rows * cols / 5) bytes (without ``T_accum``: some cols in the
    groups' range gives that many bytes)."""
    gs = _check_int(path, "group_size", group_size, 1, MAX_COUNT)
    for name in index:
        if not (name.startswith(MODEL_PREFIX) and name.endswith(".T_packed")):
            continue
        w = name[: -len(".T_packed")]
        shape = {leaf: index[f"{w}.{leaf}"]["shape"] if f"{w}.{leaf}" in index else None
                 for leaf in ("E", "E_accum", "log2_scale", "T_accum")}.get
        packed, E = index[name]["shape"], shape("E")
        if len(packed) != 1 or E is None or len(E) != 2 or min(E) < 1:
            raise _fail(path, f"ternary weight {w[len(MODEL_PREFIX):]}: needs a 1-D T_packed and a 2-D E, "
                              f"got {packed} and {E}")
        rows, n_groups = E
        for leaf in ("E_accum", "log2_scale"):
            if shape(leaf) not in (None, E):
                raise _fail(path, f"{w[len(MODEL_PREFIX):]}.{leaf} has shape {shape(leaf)}, E has {E}")
        T = shape("T_accum")
        if T is not None:
            ok = len(T) == 2 and T[0] == rows and -(-T[1] // gs) == n_groups and packed[0] == -(-rows * T[1] // 5)
        else:  # inference-only: the columns lie in the last group and pack into T_packed's bytes
            lo = max((n_groups - 1) * gs + 1, -(-(5 * (packed[0] - 1) + 1) // rows))
            ok = lo <= min(n_groups * gs, 5 * packed[0] // rows)
        if not ok:
            raise _fail(path, f"ternary weight {w[len(MODEL_PREFIX):]}: T_packed {packed}, E {E} and T_accum {T} "
                              f"are not one matrix in groups of {gs}")


def _check_optimizers(path, optimizers, index: dict) -> None:
    """The optimisers' list: class names, state dicts with integer parameter ids and param groups; their tensors
    named ``optim/<i>/<id>/<key>`` for a listed optimiser. Each optimiser's own state is checked when restored."""
    if not (isinstance(optimizers, list) and len(optimizers) <= MAX_OPTIMIZERS):
        raise _fail(path, f"optimizers must be a list of at most {MAX_OPTIMIZERS}, got {_show(optimizers)}")
    for i, o in enumerate(optimizers):
        o = _check_dict(path, f"optimizer {i}", o)
        _check_str(path, f"optimizer {i} class", o.get("class"), 100)
        sd = _check_dict(path, f"optimizer {i} state_dict", o.get("state_dict"))
        for pid, st in _check_dict(path, f"optimizer {i} state", sd.get("state", {})).items():
            if not (_is_id(pid) and isinstance(st, dict)):
                raise _fail(path, f"optimizer {i} state: bad entry {_show(pid)}: {_show(st)}")
        groups = sd.get("param_groups", [])
        if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
            raise _fail(path, f"optimizer {i} param_groups must be a list of objects, got {_show(groups)}")
        for g in groups:
            ids = g.get("params", [])
            if not (isinstance(ids, list) and all(_is_int(p) and 0 <= p <= MAX_COUNT for p in ids)):
                raise _fail(path, f"optimizer {i} param group params must be parameter ids, got {_show(ids)}")
    for name in index:
        if name.startswith(OPTIM_PREFIX):
            parts = name[len(OPTIM_PREFIX):].split("/", 2)
            if not (len(parts) == 3 and _is_id(parts[0]) and int(parts[0]) < len(optimizers) and _is_id(parts[1])):
                raise _fail(path, f"tensor {_show(name)} is not optim/<listed optimiser>/<parameter id>/<key>")


def _is_id(key) -> bool:
    """A JSON object key that is a parameter (or optimiser) id: decimal digits."""
    return isinstance(key, str) and 0 < len(key) <= 15 and key.isascii() and key.isdigit()


def _check_rng(path, rng) -> None:
    rng = _check_dict(path, "rng", rng)
    _check_generator_state(path, "rng torch_cpu", rng.get("torch_cpu"))
    cuda = rng.get("cuda")
    if cuda is None:
        return
    if not (isinstance(cuda, list) and len(cuda) <= MAX_WORLD):
        raise _fail(path, f"rng cuda must be null or a list of generator states, got {_show(cuda)}")
    for s in cuda:
        try:
            n = len(base64.b64decode(_check_str(path, "rng cuda state", s, 256), validate=True))
        except CheckpointError:
            raise
        except ValueError:  # (binascii.Error)
            n = -1
        if not 1 <= n <= MAX_CUDA_STATE:
            raise _fail(path, f"rng cuda states must be base64 of 1 to {MAX_CUDA_STATE} bytes, got {_show(s)}")


def _check_data(path, data) -> None:
    """The corpus name and fingerprint, and the data position(s): a generator state and the batches drawn (per
    data-parallel rank, ``positions``, one per rank of ``world_size``)."""
    data = _check_dict(path, "data", data)
    if data.get("name") is not None:
        _check_str(path, "data name", data["name"])
    _check_str(path, "data fingerprint", data.get("fingerprint", ""), 128)
    world = _check_int(path, "data world_size", data.get("world_size", 1), 1, MAX_WORLD)
    positions = data.get("positions")
    if positions is not None and not (isinstance(positions, list) and len(positions) == world):
        raise _fail(path, f"data positions must list one position per rank ({world}), got {_show(positions)}")
    for i, pos in enumerate([data.get("position")] + (positions or [])):
        where = "data position" if i == 0 else f"data position of rank {i - 1}"
        pos = _check_dict(path, where, pos)
        _check_generator_state(path, f"{where} generator", pos.get("generator"))
        _check_int(path, f"{where} batches_drawn", pos.get("batches_drawn"), 0, MAX_COUNT)


def _bad_tensor_value(name: str, t: torch.Tensor, index: dict) -> str | None:
    """What is wrong with one tensor's values, or None: float tensors finite; a ternary weight's ``T_packed`` a
    trit packing (bytes <= 242), its accumulators and scales int8 in rule.STATE_BOUNDS; an integer bias's ``q``
    (int32, saturating at +-(2**31 - 1)) and ``exp`` (int8 in [-127, 127]). Optimiser integer state is checked by
    the optimiser (FlipOptimizer.load_state_dict)."""
    from . import packing
    from .rule import INT8_MAX, STATE_BOUNDS, check_state_range

    short = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name
    if t.is_floating_point():
        return None if bool(torch.isfinite(t).all()) else f"{short} holds NaN/inf"
    prefix, _, leaf = name.rpartition(".")
    if not name.startswith(MODEL_PREFIX):
        return None
    try:
        if prefix + ".T_packed" in index and leaf == "T_packed":
            packing.check_packed(t)
        elif prefix + ".T_packed" in index and leaf in STATE_BOUNDS:
            if t.dtype != torch.int8 or t.dim() != 2:
                raise ValueError(f"must be a 2-D int8 tensor, got {t.dtype} {list(t.shape)}")
            check_state_range(leaf, t, *STATE_BOUNDS[leaf])
        elif {prefix + ".q", prefix + ".exp"} <= index.keys() and leaf in ("q", "exp"):
            want = (torch.int32, 1, 2**31 - 1) if leaf == "q" else (torch.int8, 0, INT8_MAX)
            if t.dtype != want[0] or t.dim() != want[1]:
                raise ValueError(f"must be a {want[1]}-D {want[0]} tensor, got {t.dtype} {list(t.shape)}")
            check_state_range(leaf, t, -want[2], want[2])
    except (ValueError, TypeError) as e:
        return f"{short}: {_one_line(e)}"
    return None


# ------------------------------------------------------------------------------------ training state
def recipe_state(recipe) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON part of a Recipe's model and optimisers (see the module docstring)."""
    tensors = {MODEL_PREFIX + k: v for k, v in recipe.model.state_dict().items()}
    optimizers = []
    for i, opt in enumerate(recipe.optimizers):
        sd = opt.state_dict()
        state_json = {}
        for pid, st in sd["state"].items():
            plain = {}
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{OPTIM_PREFIX}{i}/{pid}/{key}"] = v
                else:
                    plain[key] = v
            state_json[str(pid)] = plain
        rest = {k: v for k, v in sd.items() if k != "state"}
        optimizers.append({"class": type(opt).__name__, "state_dict": {"state": state_json, **rest}})
    return tensors, {"recipe": recipe.name, "step": recipe.step_count, "optimizers": optimizers}


def restore_recipe(recipe, ckpt: Checkpoint) -> None:
    """Load model and optimiser state into a freshly built recipe of the same config."""
    if ckpt.recipe != recipe.name:
        raise CheckpointError(f"{ckpt.path}: holds config {ckpt.recipe}, not {recipe.name}")
    saved = ckpt.meta.get("optimizers", [])
    if [o.get("class") for o in saved] != [type(o).__name__ for o in recipe.optimizers]:
        raise CheckpointError(f"{ckpt.path}: optimisers {[o.get('class') for o in saved]} do not match the config")
    try:
        recipe.model.load_state_dict(ckpt.model_state_dict(), strict=True)
        for i, opt in enumerate(recipe.optimizers):
            sd = ckpt.optimizer_state_dict(i)
            _check_torch_optimizer(i, opt, sd)
            opt.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{ckpt.path}: does not fit the model ({_one_line(e)[:300]})") from None
    recipe.step_count = ckpt.step


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "sequence" if isinstance(v, (list, tuple)) else type(v).__name__


_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # torch's Adam/AdamW state, shaped like the parameter


def _check_torch_optimizer(i: int, opt, sd: dict) -> None:
    """ValueError unless a float optimiser's saved state fits ``opt`` (FlipOptimizer checks its own): as many
    groups and parameters, hyper-parameters its constructor accepts (lr, betas, eps, weight_decay, ... of the
    saved groups passed to a fresh one), switches of the same type, and state tensors floating point, ``step``
    0-dim, moment estimates shaped like their parameter."""
    from .optim import FlipOptimizer

    if isinstance(opt, FlipOptimizer):
        return
    groups = sd.get("param_groups", [])
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"optimizer {i}: {len(groups)} param groups, the config has {len(opt.param_groups)}")
    accepted = inspect.signature(type(opt).__init__).parameters
    params = {}
    for g, live in zip(groups, opt.param_groups):
        if len(g.get("params", [])) != len(live["params"]):
            raise ValueError(f"optimizer {i}: a param group of {len(g.get('params', []))} parameters, the config's "
                             f"has {len(live['params'])}")
        params.update(zip(g["params"], live["params"]))
        numbers = {}
        for k, v in g.items():
            if k == "params" or k not in live or live[k] is None or v is None:  # (None: a default left to torch)
                continue
            if _kind(v) != _kind(live[k]):
                raise ValueError(f"optimizer {i}: {k} must be like {live[k]!r}, got {_show(v)}")
            if k in accepted and _kind(v) in ("number", "sequence"):
                numbers[k] = tuple(v) if isinstance(v, list) else v
        type(opt)([torch.zeros(1, requires_grad=True)], **numbers)  # its own range checks (ValueError)
    for pid, st in sd.get("state", {}).items():
        if pid not in params:
            raise ValueError(f"optimizer {i}: state for unknown parameter {pid}")
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                continue
            want = () if k == "step" else tuple(params[pid].shape) if k in _PARAM_SHAPED else tuple(v.shape)
            if not v.is_floating_point() or tuple(v.shape) != want:
                raise ValueError(f"optimizer {i}: parameter {pid} {k} is {v.dtype} {list(v.shape)}, expected a "
                                 f"floating tensor of shape {list(want)}")


def rng_state(device: torch.device) -> dict:
    cuda = None
    if device.type == "cuda":
        cuda = [encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return {"torch_cpu": encode_bytes(torch.get_rng_state()), "cuda": cuda}


def restore_rng(state: dict, device: torch.device) -> None:
    try:
        torch.set_rng_state(decode_bytes(state["torch_cpu"]))
        if device.type == "cuda" and state.get("cuda"):
            states = [decode_bytes(s) for s in state["cuda"]]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"bad RNG state in checkpoint ({_one_line(e)})") from None


# ------------------------------------------------------------------------------------ run directories
def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.safetensors"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first. Temporary files of interrupted saves never match."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME_RE.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint's file name (``step_0000100.safetensors`` -> 100)."""
    m = _NAME_RE.fullmatch(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint file name (step_<N>.safetensors)")
    return int(m.group(1))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporaries left by writes that were killed: ours (``.<name>.tmp-<pid>``, in the run directory
    and in its checkpoints/) and the one safetensors writes in checkpoints/ before renaming it to ours
    (``.tmpXXXXXX``). Only the process that holds the run directory's lock writes into it
    (trueternary.train.RunDirectory), so every temporary found by that process is a dead process's."""
    removed = []
    for d, patterns in ((Path(run_dir), (_TMP_RE,)), (Path(run_dir) / CHECKPOINT_DIR, (_TMP_RE, _SERIALIZER_TMP_RE))):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if any(r.fullmatch(p.name) for r in patterns) and p.is_file():
                try:
                    p.unlink()
                except OSError as e:
                    raise write_error(p, e, "remove") from None
                removed.append(p)
    return removed


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all)."""
    if keep > 0:
        for p in list_checkpoints(run_dir)[:-keep]:
            try:
                p.unlink()
            except OSError as e:
                raise write_error(p, e, "remove") from None


# ------------------------------------------------------------------------------------ info
def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


_DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}
# What inference needs of a ternary weight (its other buffers: the accumulators, ... are
# training state) and of an integer bias. Everything else in a model (float configs' weights) is needed.
TERNARY_INFERENCE = ("T_packed", "E")
HYBRID_SCALE = "log2_scale"  # replaces E in the hybrid configuration
BIAS_INFERENCE = ("q", "exp")


def classify_tensors(names) -> dict[str, str]:
    """Map each tensor name to ``inference``, ``training`` (state only training needs) or ``optimizer``.

    A ternary weight is recognised by its ``<prefix>.T_packed`` tensor, an integer bias by ``<prefix>.q``;
    any other buffer under those prefixes is training state, so new training buffers need no change here.
    """
    names = list(names)
    have = set(names)
    ternary = {n[: -len(".T_packed")] for n in names if n.endswith(".T_packed")}
    biases = {n[: -len(".q")] for n in names if n.endswith(".q") and n[: -len(".q")] + ".exp" in have}
    out = {}
    for n in names:
        if n.startswith(OPTIM_PREFIX):
            out[n] = "optimizer"
            continue
        prefix, _, leaf = n.rpartition(".")
        if prefix in ternary:
            keep = ("T_packed", HYBRID_SCALE) if prefix + "." + HYBRID_SCALE in have else TERNARY_INFERENCE
            out[n] = "inference" if leaf in keep else "training"
        elif prefix in biases:
            out[n] = "inference" if leaf in BIAS_INFERENCE else "training"
        else:
            out[n] = "inference"
    return out


def inference_tensor_names(names) -> set[str]:
    """The model tensors inference needs: every ternary weight's ``T_packed`` and its scale (``E``, or the
    hybrid's float ``log2_scale``), integer biases, float tensors; never accumulators."""
    kinds = classify_tensors(n for n in names if n.startswith(MODEL_PREFIX))
    return {n for n, k in kinds.items() if k == "inference"}


def describe(path: str | os.PathLike) -> str:
    """A human-readable summary of a checkpoint (``trueternary info``)."""
    ckpt = load_checkpoint(path, keep=lambda name: False)  # verify every byte, keep nothing in memory
    meta, index = ckpt.meta, ckpt.index
    lines = [
        f"checkpoint        {ckpt.path}",
        f"format            {FORMAT} version {meta.get('format_version')} "
        f"(written by trueternary {meta.get('trueternary_version')}, torch {meta.get('torch_version')})",
        f"recipe            {meta['recipe']}",
        f"step              {meta['step']}",
        f"model             {meta['model'].get('name')} {json.dumps(meta['model'].get('config'))}",
    ]
    data = meta.get("data") or {}
    if data:
        pos = (data.get("position") or {}).get("batches_drawn", "?")
        lines.append(f"data              {data.get('name')} (sha256 {str(data.get('fingerprint'))[:16]}..., "
                     f"{pos} batches drawn)")
    lines += ["", f"{'tensor':<48}{'dtype':>6}  {'shape':<16}{'bytes':>13}"]
    kinds = classify_tensors(index)
    n_tern = n_float = train_b = infer_b = opt_b = 0
    for name in sorted(index):
        info = index[name]
        numel = 1
        for s in info["shape"]:
            numel *= int(s)
        nbytes = numel * _DTYPE_BYTES.get(info["dtype"], 0)
        lines.append(f"{name:<48}{info['dtype']:>6}  {str(list(info['shape'])):<16}{nbytes:>13,}")
        train_b += nbytes
        opt_b += nbytes if kinds[name] == "optimizer" else 0
        infer_b += nbytes if kinds[name] == "inference" else 0
        n_tern += numel if name.endswith(".T_accum") else 0
        is_float = info["dtype"] in ("F32", "BF16", "F16", "F64")
        n_float += numel if kinds[name] == "inference" and is_float else 0
    lines += [
        "",
        f"ternary weights   {n_tern:,}",
        f"float values      {n_float:,} (float tensors inference needs: weights of float configs, hybrid scales)",
        f"training state    {_fmt_bytes(train_b)} (every tensor in the file; optimiser state {_fmt_bytes(opt_b)})",
        f"inference bytes   {_fmt_bytes(infer_b)} (what `generate` loads: T_packed + scales, biases, float tensors)",
    ]
    return "\n".join(lines)
