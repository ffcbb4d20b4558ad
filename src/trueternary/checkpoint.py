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
header, the format and version, then every tensor against ``tensor_sha256``: a corrupt, truncated,
foreign or newer file raises :class:`CheckpointError` with a one-line message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "trueternary.checkpoint"
FORMAT_VERSION = 1
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"step_(\d+)\.safetensors")
_TMP_RE = re.compile(r"\..+\.tmp-\d+")
_SERIALIZER_TMP_RE = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors' own temporary (Rust's tempfile crate)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, foreign or from a newer format (one line)."""


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
class WriteError(ValueError):
    """A file of a run could not be written (disk full, read-only file system, no permission): one line
    naming the path, exit code 2. ``reason``: the operating system's words for it."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


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
    end = max((int(v["data_offsets"][1]) for v in header.values() if isinstance(v, dict)), default=0)
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
    for key in ("step", "recipe", "model"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    h = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name)
                _hash_update(h, name, t)
                if keep is None or keep(name):
                    tensors[name] = t
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: unreadable checkpoint ({_one_line(e)})") from None
    if h.hexdigest() != meta.get("tensor_sha256"):
        raise CheckpointError(f"{path}: checksum mismatch: the checkpoint is corrupt")
    return Checkpoint(path=path, meta=meta, tensors=tensors, index=index)


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
            opt.load_state_dict(ckpt.optimizer_state_dict(i))
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{ckpt.path}: does not fit the model ({_one_line(e)[:300]})") from None
    recipe.step_count = ckpt.step


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
