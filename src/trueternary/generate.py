"""``trueternary generate``: sample text from a checkpoint, holding only what inference needs, streamed.

The model is rebuilt from the checkpoint's model config; for ternary configs every weight's
training state is released (``TernaryScaleTensor.release_training_state``) and only ``T_packed``
and the scales ``E`` (the hybrid's float ``log2_scale``) are read from the file, so the process
never holds the int8 accumulators. Float configs load their float weights. The bytes held are
measured from the model's tensors and reported on stderr.

Sampling is over the 256 byte values only (special tokens never occur in byte corpora); ``--temperature 0``
is greedy. The model sees a window of at most ``ctx`` bytes (the prompt's last ``ctx`` bytes first); when a new
byte would overflow it, the window restarts from its last ``ctx // 2`` bytes (:func:`window_keep`). Models with a
key/value cache (the transformer: ``forward_cached``) encode a window once and then one byte per step; the others
(MORPH) rerun the window for every byte. Both give the same bytes up to float rounding (``tests/test_generate.py``).
:func:`byte_stream` yields each byte as it is sampled; ``run`` writes it to stdout at once.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import torch

from .checkpoint import (
    MODEL_PREFIX,
    TERNARY_INFERENCE,
    CheckpointError,
    inference_tensor_names,
    load_checkpoint,
    read_header,
)
from .vocab import N_BYTES
from .weight import DEFAULT_GROUP_SIZE, ternary_weights

FLOAT_QAT = ("BitNet_QAT", "SignSGD_Old")


def build_inference_model(recipe: str, model_name: str, model_config: dict, group_size: int):
    """The model of ``recipe`` with its weight representation, ready for ``load_state_dict``.

    Mirrors the representations of ``recipes.build_recipe`` (without its optimisers).
    """
    from .convert import ternarize
    from .models import build_model
    from .qat import fake_ternarize
    from .recipes import CONFIG_NAMES, TERNARY_CONFIGS

    if recipe not in CONFIG_NAMES:
        raise CheckpointError(f"checkpoint holds unknown config {recipe!r}")
    model = build_model(model_name, seed=0, **model_config)
    if recipe in TERNARY_CONFIGS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strict mode names frozen parameters; the checkpoint restores them
            ternarize(model, group_size, scale_mode="float" if recipe == "TrueTernary_Hybrid" else "int")
        for w in ternary_weights(model):
            w.release_training_state()
    elif recipe in FLOAT_QAT:
        fake_ternarize(model)
    return model


def load_for_inference(path, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, checkpoint meta) holding only the inference tensors."""
    index, _ = read_header(path)
    wanted = inference_tensor_names(index)
    ckpt = load_checkpoint(path, keep=lambda name: name in wanted)
    meta = ckpt.meta
    try:
        group_size = int((meta.get("hparams") or {}).get("group_size", DEFAULT_GROUP_SIZE))
        model = build_inference_model(ckpt.recipe, meta["model"]["name"], meta["model"]["config"], group_size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: cannot rebuild the model ({e})") from None
    sd = ckpt.model_state_dict()
    del ckpt
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit its model config ({' '.join(str(e).split())[:300]})") from None
    needed = inference_tensor_names(MODEL_PREFIX + k for k in model.state_dict())
    missing = [k for k in missing if MODEL_PREFIX + k in needed]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model.to(device).eval(), meta


def held_bytes(model) -> dict[str, int]:
    """Bytes of every tensor the model holds, split into ternary inference state and the rest."""
    tw = ternary_weights(model)
    ternary = sum(w.inference_bytes() for w in tw)
    everything = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    training = sum(b.numel() * b.element_size() for w in tw for name, b in w.named_buffers(recurse=False)
                   if name not in TERNARY_INFERENCE)
    return {"ternary_inference": ternary, "T_packed": sum(w.T_packed.numel() for w in tw),
            "scales": ternary - sum(w.T_packed.numel() for w in tw), "total": everything,
            "training_state": training}


def window_keep(ctx: int) -> int:
    """Bytes a full window keeps when it slides: half of it. The cached path then re-encodes ``ctx // 2`` bytes
    once per ``ctx - ctx // 2`` new ones, instead of the whole window for every byte, which is what an exact
    sliding window (always the last ``ctx`` bytes, whose keys and values all change when the first byte drops
    out) would cost; every byte is still predicted from at least ``ctx // 2`` bytes of context."""
    return max(1, ctx // 2)


def has_kv_cache(model) -> bool:
    """Whether ``model`` decodes incrementally (``new_cache`` / ``forward_cached``, the transformer)."""
    return hasattr(model, "forward_cached")


def _next_byte(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator, i: int) -> int:
    logits = logits.float().cpu()
    if not torch.isfinite(logits[:N_BYTES]).all():  # softmax would turn them into NaN probabilities
        raise CheckpointError(f"the model's logits are not finite (NaN/inf) at generated byte {i}: "
                              "its weights or scales overflow float32")
    logits[N_BYTES:] = -math.inf  # text out: bytes only
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, N_BYTES)).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


def byte_stream(model, prompt: bytes, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                seed: int = 0, device: torch.device | str = "cpu", cache: bool = True) -> Iterator[int]:
    """Extend ``prompt`` (default: a newline) by ``max_new_tokens`` bytes, yielding each as soon as it is sampled.

    ``cache``: use the model's key/value cache when it has one (``has_kv_cache``); ``False`` reruns the whole
    window for every byte (the reference the cache is tested against). CheckpointError if the model's logits
    are NaN/inf (a checkpoint whose scales overflow float32)."""
    ctx, keep = model.cfg.ctx, window_keep(model.cfg.ctx)
    ids = list(prompt if prompt else b"\n")
    start = max(0, len(ids) - ctx)  # the window: ids[start:]
    cached = cache and has_kv_cache(model)
    kv = None
    gen = torch.Generator().manual_seed(seed)
    for i in range(max_new_tokens):
        if len(ids) - start > ctx:  # full: restart the window from its last `keep` bytes
            start, kv = len(ids) - keep, None
        with torch.no_grad():
            if not cached:
                logits = model(torch.tensor([ids[start:]], dtype=torch.int64, device=device))
            elif kv is None:  # encode the window (a prefill), then one byte per step
                kv = model.new_cache()
                logits = model.forward_cached(torch.tensor([ids[start:]], dtype=torch.int64, device=device), kv)
            else:
                logits = model.forward_cached(torch.tensor([ids[-1:]], dtype=torch.int64, device=device), kv)
        nxt = _next_byte(logits[0, -1], temperature, top_k, gen, i)
        ids.append(nxt)
        yield nxt


def sample(model, prompt: bytes, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0, device: torch.device | str = "cpu", cache: bool = True) -> bytes:
    """The bytes of :func:`byte_stream`, all at once."""
    return bytes(byte_stream(model, prompt, max_new_tokens, temperature, top_k, seed, device, cache))


def stdout_bytes_writer() -> Callable[[bytes], None]:
    """``write(data)``: ``data`` to stdout now, unmangled: raw to its binary buffer (a UTF-8 sequence split across
    two writes arrives whole), or, for a text-only stdout (e.g. a ``StringIO``), decoded incrementally."""
    sys.stdout.flush()  # whatever was written as text goes first
    raw = getattr(sys.stdout, "buffer", None)
    if raw is not None:
        def write(data: bytes) -> None:
            raw.write(data)
            raw.flush()
    else:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def write(data: bytes) -> None:
            sys.stdout.write(decoder.decode(data))
            sys.stdout.flush()
    return write


def generation_threads(requested: int, d_model: int) -> int:
    """CPU intra-op threads: ``requested``, or by default what ``train`` uses for the model size (one thread up
    to d_model 256: on a busy machine a second OpenMP thread waiting for a descheduled peer made generation
    ~5x slower, docs/training.md)."""
    from .train import SMALL_MODEL_D

    return requested or (1 if d_model <= SMALL_MODEL_D else torch.get_num_threads())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint file (runs/<run>/checkpoints/...)")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 samples greedily")
    p.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="keep the k likeliest bytes (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads; 0: 1 for d_model <= 256, else torch's default (as train)")
    p.add_argument("--no_cache", "--no-cache", dest="no_cache", action="store_true",
                   help="rerun the whole window for every byte instead of using the key/value cache")


def run(args: argparse.Namespace) -> dict:
    from .cli import UsageError, resolve_device

    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0, got {args.top_k}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not 0 <= args.threads <= 1024:
        raise UsageError(f"--threads must be between 0 and 1024, got {args.threads}")
    device = resolve_device(args.device)
    model, meta = load_for_inference(args.ckpt, device)
    if device.type == "cpu":
        torch.set_num_threads(generation_threads(args.threads, model.cfg.d_model))
    prompt = os.fsencode(args.prompt)  # the bytes given on the command line, even if they are not UTF-8
    text = bytearray()
    write = stdout_bytes_writer()
    try:
        for b in byte_stream(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, device,
                             cache=not args.no_cache):
            # the prompt goes out with the first byte: a model that cannot produce one prints nothing
            write(bytes([b]) if text else prompt + bytes([b]))
            text.append(b)
        write(b"\n" if text else prompt + b"\n")
    except CheckpointError as e:
        if text:
            write(b"\n")
        raise CheckpointError(f"{args.ckpt}: {e}") from None
    except KeyboardInterrupt:  # what was printed stays, the line ended; cli prints one line and exits 130
        if text:
            write(b"\n")
        raise
    except BrokenPipeError:  # the reader went away (`| head -c 100`): it has what it wanted
        _silence_stdout()
    held = held_bytes(model)
    if held["ternary_inference"]:
        sys.stderr.write(
            f"[{meta['recipe']} step {meta['step']}] inference state held: {held['ternary_inference']:,} bytes of "
            f"ternary weights (T_packed {held['T_packed']:,} + scales {held['scales']:,}); all model tensors "
            f"{held['total']:,} bytes (incl. rotary tables); training state held: {held['training_state']:,} bytes\n")
    else:
        sys.stderr.write(f"[{meta['recipe']} step {meta['step']}] inference state held: float weights, "
                         f"all model tensors {held['total']:,} bytes\n")
    return {"text": bytes(text), "held": held}


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind stdout
        pass
