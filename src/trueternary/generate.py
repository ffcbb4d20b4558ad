"""``trueternary generate``: sample text from a checkpoint, holding only what inference needs.

The model is rebuilt from the checkpoint's model config; for ternary configs every weight's
training state is released (``TernaryScaleTensor.release_training_state``) and only ``T_packed``
and the scales ``E`` (the hybrid's float ``log2_scale``) are read from the file, so the process
never holds the int8 accumulators. Float configs load their float weights. The bytes held are
measured from the model's tensors and reported on stderr.

Sampling is over the 256 byte values only (special tokens never occur in byte corpora); the prompt
is cropped to the last ``ctx`` bytes the model was trained with. ``--temperature 0`` is greedy.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

from .checkpoint import MODEL_PREFIX, TERNARY_INFERENCE, inference_tensor_names, load_checkpoint, read_header
from .errors import CheckpointError, UsageError
from .flags import resolve_device
from .vocab import N_BYTES, decode, encode
from .weight import DEFAULT_GROUP_SIZE, ternary_weights


def build_inference_model(recipe: str, model_name: str, model_config: dict, group_size: int):
    """The model of ``recipe`` with its weight representation, ready for ``load_state_dict``.

    Mirrors the representations of ``recipes.build_recipe`` (without its optimisers).
    """
    from .convert import ternarize
    from .models import build_model
    from .qat import fake_ternarize
    from .recipes import CONFIG_NAMES, LATENT_CONFIGS, TERNARY_CONFIGS

    if recipe not in CONFIG_NAMES:
        raise CheckpointError(f"checkpoint holds unknown config {recipe!r}")
    model = build_model(model_name, seed=0, **model_config)
    if recipe in TERNARY_CONFIGS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strict mode names frozen parameters; the checkpoint restores them
            ternarize(model, group_size, scale_mode="float" if recipe == "TrueTernary_Hybrid" else "int")
        for w in ternary_weights(model):
            w.release_training_state()
    elif recipe in LATENT_CONFIGS:
        fake_ternarize(model)
    return model


def load_for_inference(path, device: torch.device | str = "cpu"):
    """(model in eval mode on ``device``, checkpoint meta) holding only the inference tensors. A ``.gguf`` file of
    ``trueternary export`` loads as the float model of its weights (``trueternary.export.load_gguf``)."""
    if str(path).endswith(".gguf"):
        from .export import load_gguf

        model, keys = load_gguf(path)
        return model.to(device), {"recipe": f"GGUF {keys.get('trueternary.type')}",
                                  "step": keys.get("trueternary.step")}
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


@torch.no_grad()
def sample(model, prompt: bytes, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0, device: torch.device | str = "cpu") -> bytes:
    """Autoregressively extend ``prompt`` by ``max_new_tokens`` bytes (CheckpointError if the model's logits are
    NaN/inf: a checkpoint whose scales overflow float32)."""
    ctx = model.cfg.ctx
    ids = encode(prompt if prompt else b"\n").tolist()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-ctx:]], dtype=torch.int64, device=device)
        logits = model(window)[0, -1].float().cpu()
        if not torch.isfinite(logits[:N_BYTES]).all():  # softmax would turn them into NaN probabilities
            raise CheckpointError(f"the model's logits are not finite (NaN/inf) at generated byte {len(out)}: "
                                  "its weights or scales overflow float32")
        logits[N_BYTES:] = -math.inf  # text out: bytes only
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, N_BYTES)).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        ids.append(nxt)
        out.append(nxt)
    return bytes(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="checkpoint file (runs/<run>/checkpoints/...) or a .gguf file of trueternary export")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 samples greedily")
    p.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="keep the k likeliest bytes (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def run(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0, got {args.top_k}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device)
    model, meta = load_for_inference(args.ckpt, device)
    try:
        text = sample(model, args.prompt.encode("utf-8"), args.max_new_tokens, args.temperature, args.top_k,
                      args.seed, device)
    except CheckpointError as e:
        raise CheckpointError(f"{args.ckpt}: {e}") from None
    sys.stdout.write(args.prompt + decode(list(text)) + "\n")
    sys.stdout.flush()
    held = held_bytes(model)
    if held["ternary_inference"]:
        sys.stderr.write(
            f"[{meta['recipe']} step {meta['step']}] inference state held: {held['ternary_inference']:,} bytes of "
            f"ternary weights (T_packed {held['T_packed']:,} + scales {held['scales']:,}); all model tensors "
            f"{held['total']:,} bytes (incl. rotary tables); training state held: {held['training_state']:,} bytes\n")
    else:
        sys.stderr.write(f"[{meta['recipe']} step {meta['step']}] inference state held: float weights, "
                         f"all model tensors {held['total']:,} bytes\n")
    return {"text": text, "held": held}
