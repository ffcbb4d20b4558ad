"""transformers integration: a ternarised ``PreTrainedModel`` stays a working transformers model.

Importing this module imports transformers and registers quantization method ``"trueternary"``
(:class:`TrueTernaryConfig`, :class:`TrueTernaryHfQuantizer`). ``trueternary.ternarize`` imports it by itself when it
converts a transformers model (transformers is loaded then anyway); ``import trueternary`` never imports it.

What it owns:

* :func:`adopt_ternarized` (called by ``ternarize``): gives the model a subclass of its own class (same name) whose
  ``.device`` / ``.dtype`` also look at buffers (a strict ternary model has zero parameters, where transformers'
  own properties raise StopIteration), whose ``save_pretrained`` takes ``with_training_state``, whose
  ``load_state_dict`` reads the saved format and whose tied-weight handling knows ternary layers; sets
  ``config.quantization_config`` and ``model.hf_quantizer``.
* the saved format (``save_pretrained``): ``config.json`` carries ``quantization_config`` (quant_method
  ``"trueternary"``: group size, scale mode, strict, the converted layers, the ties, whether training state is
  saved); ``model.safetensors`` holds every ternary layer's packed trits under the float weight's own name
  (``<layer>.weight``, uint8, 1-D), its scales (``<layer>.weight.E``, int8), integer biases (``<layer>.bias.q``,
  ``.exp``), every float tensor as usual, and the vote accumulators (``.T_accum``, ``.E_accum``) only with the
  training state: by default while a FlipOptimizer trains the model (so Trainer's checkpoints resume), else with
  ``save_pretrained(..., with_training_state=True)``. A tied layer's weight is saved once (under its source).
* loading (``<ModelClass>.from_pretrained(folder)`` with this module imported): the quantizer rebuilds the listed
  layers as ternary ones before transformers loads the tensors, refuses a folder that lacks a ternary tensor,
  checks every loaded ternary tensor, re-ties, and freezes float parameters again for a strict model. A folder
  loaded without this module fails loudly: each packed ``<layer>.weight`` has another shape than the float weight
  transformers expects there (transformers first warns that it does not know quantization method "trueternary").
* ``model.load_state_dict`` of a saved folder's tensors (how Trainer's ``resume_from_checkpoint`` reloads a model):
  :func:`read_saved_format` renames and checks them whole first; a missing ternary tensor is an error whatever
  ``strict`` is.
"""

from __future__ import annotations

import re

import torch
import transformers
from packaging.version import Version
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import packing
from .layermap import freeze_parameters, layer_kind, shaped_ternary
from .layers import IntegerBias, TernaryEmbedding, TernaryLinear
from .weight import SCALE_MODES, TernaryScaleTensor, check_group_size, ternary_weights

MIN_TRANSFORMERS = "5.25"  # the oldest transformers this integration is tested with (its quantizer hooks are v5's)
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(f"trueternary.hf needs transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}")

QUANT_METHOD = "trueternary"
FORMAT_VERSION = 1
ACCUMULATORS = ("T_accum", "E_accum")
_TERNARY_LAYERS = (TernaryLinear, TernaryEmbedding)


class TrueTernaryConfig(QuantizationConfigMixin):
    """``config.quantization_config`` of a ternarised transformers model (written by ``save_pretrained``).

    ``modules``: qualified names of the ternary layers (relative to the model); ``ties``: {layer: layer whose
    ternary weight it shares}; ``strict``: the model's float tensors are buffers (zero parameters);
    ``training_state``: the saved files hold the vote accumulators.
    """

    def __init__(self, group_size: int = 64, scale_mode: str = "int", strict: bool = True,
                 modules: list[str] | None = None, ties: dict[str, str] | None = None, training_state: bool = False,
                 format_version: int = FORMAT_VERSION, **kwargs) -> None:  # kwargs: "quant_method" of from_dict
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.group_size = group_size
        self.scale_mode = scale_mode
        self.strict = strict
        self.modules = list(modules or [])
        self.ties = dict(ties or {})
        self.training_state = training_state
        self.post_init()

    def post_init(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"trueternary: this folder's format is version {self.format_version!r}; this trueternary "
                             f"reads version {FORMAT_VERSION}")
        check_group_size(self.group_size)
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"trueternary: scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if not all(isinstance(m, str) for m in self.modules):
            raise ValueError("trueternary: quantization_config.modules must list qualified layer names")
        bad = {t: s for t, s in self.ties.items() if t not in self.modules or s not in self.modules}
        if bad:
            raise ValueError(f"trueternary: quantization_config.ties names layers that are not ternary: {bad}")


class TrueTernaryHfQuantizer(HfQuantizer):
    """Loads a folder saved from a ternarised model; saves one (``get_state_dict_and_metadata``).

    Converting a float checkpoint while loading is not offered: load the float model and call ``ternarize``.
    """

    requires_calibration = True  # only pre-ternarised folders load through it (message below)
    quantization_config: TrueTernaryConfig

    def __init__(self, quantization_config: TrueTernaryConfig, **kwargs) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError("trueternary: from_pretrained(quantization_config=TrueTernaryConfig(...)) cannot "
                             "ternarise a float checkpoint; load it, then call trueternary.ternarize(model)")
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []

    # ------------------------------------------------------------------ loading
    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and (len(set(device_map.values())) > 1 or "disk" in device_map.values()):
            raise ValueError("trueternary: a ternary model loads onto one device (device_map spreads it over "
                             f"{sorted(map(str, set(device_map.values())))})")

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs):
        """Swap the saved model's ternary layers in (on the meta device, as transformers builds the model), refuse
        a folder missing one of their tensors, and keep transformers' own initialisation away from them."""
        cfg = self.quantization_config
        files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
        if not files:
            raise ValueError("trueternary: a ternary model loads from its save_pretrained folder (model.safetensors)")
        self.checkpoint_files = files
        for fqn in cfg.modules:  # a tie target's own weight is a placeholder until it is tied, after loading
            _set_module(model, fqn, _shaped(model, fqn, cfg))
        adopt_class(model)
        expected = serialized_names(model, cfg)
        stored = _stored_names(files)
        missing = sorted(set(expected) - stored)
        if missing:
            raise ValueError(f"trueternary: {len(missing)} ternary tensor(s) missing from {files[0]}: "
                             + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
        # What transformers would report as not loaded is expected: the packed trits (it finds them under the float
        # weight's name; _load_packed reads them), the tie targets' placeholders, an inference folder's accumulators.
        packed = packed_names(cfg)
        missing_ok = {rf"^{re.escape(k)}$" for k in packed.values()} | {rf"^{re.escape(t)}\.weight\." for t in cfg.ties}
        if not cfg.training_state:
            missing_ok.add(rf"\.weight\.({'|'.join(ACCUMULATORS)})$")
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | missing_ok
        model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                    | {rf"^{re.escape(k)}$" for k in packed})
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        cfg = self.quantization_config
        _load_packed(model, cfg, self.checkpoint_files)
        tie_ternary(model, cfg.ties)
        for fqn in cfg.modules:
            _check_loaded(model.get_submodule(fqn), fqn)
        if cfg.strict:
            freeze_parameters(model, cfg.scale_mode)
        return model

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        cfg = describe(model, self.quantization_config.training_state)
        self.quantization_config = cfg
        model.config.quantization_config = cfg
        return saved_state_dict(model, cfg), {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # by FlipOptimizer's votes (or the hybrid's float scales)

    @property
    def is_qat_trainable(self) -> bool:
        return True  # the ternary weights themselves train (transformers' Trainer asks this before it trains)


# ---------------------------------------------------------------------------- the model's class


class TernaryModelMixin:
    """Put in front of a transformers model class by :func:`adopt_class`; see the module docstring."""

    _trueternary = True

    @property
    def device(self) -> torch.device:
        t = next(iter(self.parameters()), None)
        if t is None:
            t = next(iter(self.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the model computes in: its first float parameter's, else its first float buffer's (a
        strict model keeps its norm gains as buffers)."""
        for tensors in (self.parameters(), self.buffers()):
            for t in tensors:
                if t.is_floating_point():
                    return t.dtype
        return torch.get_default_dtype()

    def save_pretrained(self, save_directory, *args, with_training_state: bool | None = None, **kwargs):
        """transformers' ``save_pretrained``. ``with_training_state``: also save the vote accumulators (``T_accum``,
        ``E_accum``: about 1 byte per weight) to continue training from the folder. By default (None) they are
        saved while a FlipOptimizer trains the model, so the checkpoints a training loop or Trainer writes resume
        bit for bit, and a model no optimiser trains saves a small inference folder; ``False`` writes an inference
        folder of a model under training."""
        if getattr(self, "hf_quantizer", None) is None:
            raise ValueError("trueternary: save the model ternarize() was called on (it carries the ternary config)")
        if with_training_state is None:
            with_training_state = trained_by_an_optimizer(self)
        if with_training_state and any(w.inference_only for w in ternary_weights(self)):
            raise ValueError("trueternary: this model has no training state to save (it was loaded from a folder "
                             "saved without it); save it without with_training_state")
        self.hf_quantizer.quantization_config.training_state = bool(with_training_state)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """torch's ``load_state_dict`` (what Trainer's ``resume_from_checkpoint`` calls, with ``strict=False``) also
        reads the saved format: see :func:`read_saved_format`. Runs before any tensor of the model loads (torch
        loads a module's own tensors before its children's and lets this hook edit its copy of the state dict)."""
        read_saved_format(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """transformers' tied parameters, less those inside ternary layers (tied here by module: tie_ternary)."""
        keys = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        return {t: s for t, s in keys.items() if not (_in_ternary(self, t) or _in_ternary(self, s))}

    def tie_weights(self, *args, **kwargs):
        super().tie_weights(*args, **kwargs)
        quantizer = getattr(self, "hf_quantizer", None)
        if quantizer is not None:
            tie_ternary(self, quantizer.quantization_config.ties)


_CLASSES: dict[type, type] = {}


def adopt_class(model: PreTrainedModel) -> None:
    """Give ``model`` and every transformers model inside it the ternary subclass of its class (cached per class;
    same name and module, so ``save_pretrained`` writes the original class into ``architectures``)."""
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and not getattr(type(m), "_trueternary", False):
            cls = type(m)
            if cls not in _CLASSES:
                _CLASSES[cls] = type(cls.__name__, (TernaryModelMixin, cls),
                                     {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
            m.__class__ = _CLASSES[cls]
    if hasattr(model, "all_tied_weights_keys"):  # transformers' precomputed ties: drop those now inside ternary layers
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def adopt_ternarized(module: nn.Module) -> None:
    """Keep every transformers model in ``module`` (just ternarised by ``ternarize``) a working one: the outermost
    ones get the quantizer and ``config.quantization_config`` (an inner one shares its outer model's config), each
    described by what the model holds now (``describe``), so ternarising it again in parts is fine."""
    adopted: list[str] = []
    for prefix, m in module.named_modules():
        if not isinstance(m, PreTrainedModel) or any(prefix.startswith(p + ".") or not p for p in adopted):
            continue
        if any(isinstance(x, _TERNARY_LAYERS) for x in m.modules()):
            cfg = describe(m, training_state=False)
            m.hf_quantizer = TrueTernaryHfQuantizer(cfg, pre_quantized=True)
            m.quantization_method = QUANT_METHOD
            m.config.quantization_config = cfg
            adopt_class(m)
            adopted.append(prefix)


# ---------------------------------------------------------------------------- format


def describe(model: nn.Module, training_state: bool) -> TrueTernaryConfig:
    """The :class:`TrueTernaryConfig` of ``model`` as it is now."""
    modules, ties, first = [], {}, {}
    sizes, modes = set(), set()
    for fqn, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, _TERNARY_LAYERS):
            modules.append(fqn)
            w = m.weight
            sizes.add(w.group_size)
            modes.add(w.scale_mode)
            if id(w) in first:
                ties[fqn] = first[id(w)]
            else:
                first[id(w)] = fqn
    if len(sizes) > 1 or len(modes) > 1:
        raise ValueError(f"trueternary: the model mixes group sizes {sorted(sizes)} / scale modes {sorted(modes)}; "
                         "a saved folder has one of each")
    strict = not any(True for n, _ in model.named_parameters() if not n.endswith(".log2_scale"))
    return TrueTernaryConfig(group_size=sizes.pop() if sizes else 64, scale_mode=modes.pop() if modes else "int",
                             strict=strict, modules=modules, ties=ties, training_state=training_state)


def saved_state_dict(model: nn.Module, cfg: TrueTernaryConfig) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` writes: the model's state dict, each ternary layer's packed trits renamed to the
    float weight's name, tie targets' weights left out (saved once, under the source), accumulators only with
    ``cfg.training_state``."""
    tied = tuple(t + ".weight." for t in cfg.ties)
    renamed = {v: k for k, v in packed_names(cfg).items()}
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(tied):
            continue
        if not cfg.training_state and k.rpartition(".")[2] in ACCUMULATORS and _in_ternary(model, k.rpartition(".")[0]):
            continue
        out[renamed.get(k, k)] = v
    return out


def serialized_names(model: nn.Module, cfg: TrueTernaryConfig) -> list[str]:
    """The tensors a folder of ``cfg`` must hold for its ternary layers (tie targets have none of their own but a
    bias); ``model`` has the layers."""
    names = []
    for fqn in cfg.modules:
        layer = model.get_submodule(fqn)
        if fqn not in cfg.ties:
            w = layer.weight
            names.append(f"{fqn}.weight")
            names.append(f"{fqn}.weight.{'log2_scale' if w.scale_mode == 'float' else 'E'}")
            if cfg.training_state:
                names += [f"{fqn}.weight.{a}" for a in ACCUMULATORS]
        if isinstance(getattr(layer, "bias", None), IntegerBias):
            names += [f"{fqn}.bias.q", f"{fqn}.bias.exp"]
    return names


def packed_names(cfg: TrueTernaryConfig) -> dict[str, str]:
    """{saved name: state-dict name} of each ternary weight's packed trits: saved under the float weight's name (so
    transformers without this integration refuses the folder: the shapes differ), held as ``.weight.T_packed``."""
    return {f"{fqn}.weight": f"{fqn}.weight.T_packed" for fqn in cfg.modules if fqn not in cfg.ties}


def _stored_names(files: list[str]) -> set[str]:
    names: set[str] = set()
    for f in files:
        with safe_open(f, framework="pt") as fh:
            names.update(fh.keys())
    return names


@torch.no_grad()
def _load_packed(model: nn.Module, cfg: TrueTernaryConfig, files: list[str]) -> None:
    """Read each ternary layer's packed trits (saved under ``<layer>.weight``) into its ``T_packed``, checked."""
    want = packed_names(cfg)
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in want.keys() & set(fh.keys()):
                w = model.get_submodule(key)  # the ternary weight module "<layer>.weight"
                t = fh.get_tensor(key)
                if t.dtype != torch.uint8 or tuple(t.shape) != (packing.packed_numel(w.numel()),):
                    raise ValueError(f"trueternary: {key} in {f} is {t.dtype} {tuple(t.shape)}, the layer needs "
                                     f"uint8 ({packing.packed_numel(w.numel())},)")
                packing.check_packed(t, w.numel())
                w.T_packed = t.to(w.E.device)


def _check_loaded(layer: nn.Module, fqn: str) -> None:
    """Every ternary tensor transformers loaded has the dtype and shape the layer needs (transformers converts
    float tensors only, so a wrong integer dtype would otherwise pass unnoticed)."""
    w = layer.weight
    want = {"E": (torch.int8, (w.rows, w.n_groups))}
    if not w.inference_only:
        want.update(E_accum=(torch.int8, (w.rows, w.n_groups)), T_accum=(torch.int8, (w.rows, w.cols)))
    for name, (dtype, shape) in want.items():
        t = getattr(w, name)
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"trueternary: {fqn}.weight.{name} loaded as {t.dtype} {tuple(t.shape)}, expected "
                             f"{dtype} {shape}")
    b = getattr(layer, "bias", None)
    if isinstance(b, IntegerBias) and (b.q.dtype != torch.int32 or b.exp.dtype != torch.int8):
        raise ValueError(f"trueternary: {fqn}.bias loaded as {b.q.dtype}/{b.exp.dtype}, expected int32/int8")


def trained_by_an_optimizer(model: nn.Module) -> bool:
    """Whether a FlipOptimizer trains ``model``'s ternary weights: it installs itself as each weight's voter (its
    backward hook) when it is built, so this holds from then on, whatever loop or Trainer runs the steps."""
    weights = ternary_weights(model)
    return any(w._voter is not None for w in weights) and not any(w.inference_only for w in weights)


@torch.no_grad()
def read_saved_format(model: nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Turn ``state_dict``, in place, from what ``save_pretrained`` writes into ``model``'s own state dict, checked
    whole before anything loads; a state dict in the model's own format (no packed ``<layer>.weight``) is left as
    it is.

    Each packed ``<layer>.weight`` becomes ``<layer>.weight.T_packed``; a tie target gets its source's tensors
    (one module: the strict key check then passes); an inference-only weight drops accumulators it does not keep.
    A missing ternary tensor (packed trits, scales, integer bias, and the accumulators of a weight that trains)
    or one of another dtype, shape or packing is a ValueError, whatever ``strict`` is: loading past it would leave
    the layer's old values in place silently (Trainer loads with ``strict=False`` and only logs missing keys)."""
    cfg = describe(model, training_state=not any(w.inference_only for w in ternary_weights(model)))
    packed = {prefix + k: prefix + v for k, v in packed_names(cfg).items()}
    if not packed.keys() & state_dict.keys():
        return
    missing = [prefix + n for n in serialized_names(model, cfg) if prefix + n not in state_dict]
    if missing:
        hint = ("; a checkpoint saved without training state (no vote accumulators) cannot resume training"
                if all(k.endswith(ACCUMULATORS) for k in missing) else "")
        raise ValueError(f"trueternary: {len(missing)} ternary tensor(s) missing from the state dict: "
                         + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "") + hint)
    for saved, name in packed.items():
        state_dict[name] = state_dict.pop(saved)
    renamed = {name: saved for saved, name in packed.items()}
    for fqn in cfg.modules:
        layer = model.get_submodule(fqn)
        own = layer.state_dict(prefix=f"{prefix}{fqn}.", keep_vars=True)
        if layer.weight.inference_only:
            for a in ACCUMULATORS:
                state_dict[f"{prefix}{fqn}.weight.{a}"] = own[f"{prefix}{fqn}.weight.{a}"]
        for key in own.keys() & state_dict.keys():
            got, want = state_dict[key], own[key]
            shown = renamed.get(key, key)  # the name the caller's state dict has
            if not isinstance(got, torch.Tensor):
                raise ValueError(f"trueternary: {shown} in the state dict is a {type(got).__name__}, not a tensor")
            same_kind = got.dtype == want.dtype or (got.is_floating_point() and want.is_floating_point())
            if got.shape != want.shape or not same_kind:
                raise ValueError(f"trueternary: {shown} in the state dict is {got.dtype} {tuple(got.shape)}, the "
                                 f"model needs {want.dtype} {tuple(want.shape)}")
            if key.endswith(".weight.T_packed"):
                try:
                    packing.check_packed(got, layer.weight.numel())
                except ValueError as e:
                    raise ValueError(f"trueternary: {shown} in the state dict: {e}") from None
    for target, source in cfg.ties.items():
        for key in [k for k in state_dict if k.startswith(f"{prefix}{source}.weight.")]:
            state_dict[f"{prefix}{target}.weight.{key[len(f'{prefix}{source}.weight.'):]}"] = state_dict[key]


def tie_ternary(model: nn.Module, ties: dict[str, str]) -> None:
    """Make each tie target layer share its source layer's ternary weight (one module, one set of tensors)."""
    for target, source in ties.items():
        src = model.get_submodule(source)
        tgt = model.get_submodule(target)
        if isinstance(src, _TERNARY_LAYERS) and isinstance(tgt, _TERNARY_LAYERS) and tgt.weight is not src.weight:
            tgt.weight = src.weight


# ---------------------------------------------------------------------------- helpers


def _shaped(model: nn.Module, fqn: str, cfg: TrueTernaryConfig) -> nn.Module:
    try:
        layer = model.get_submodule(fqn)
    except AttributeError:
        raise ValueError(f"trueternary: the saved model has a ternary layer {fqn!r}, which "
                         f"{type(model).__name__} does not have") from None
    kind = layer_kind(layer)
    if kind is None:
        raise ValueError(f"trueternary: the saved model's ternary layer {fqn!r} is a {type(layer).__name__} in "
                         f"{type(model).__name__}, not a linear or embedding layer")
    ternary = shaped_ternary(layer, kind, cfg.group_size, cfg.scale_mode, None)  # (the meta device, as the model)
    if not cfg.training_state or fqn in cfg.ties:  # a tie target's weight is a placeholder: never more than needed
        ternary.weight.release_training_state()
    for m in ternary.modules():  # transformers' _init_weights must not touch them (they are loaded)
        m._is_hf_initialized = True
    return ternary


def _set_module(model: nn.Module, fqn: str, layer: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, layer)


def _in_ternary(model: nn.Module, name: str) -> bool:
    """Whether ``name`` (a parameter, buffer or module name) lies inside a ternary weight of ``model``."""
    parts = name.split(".")
    m = model
    for part in parts:
        m = getattr(m, part, None)
        if m is None:
            return False
        if isinstance(m, TernaryScaleTensor):
            return True
    return False


def _register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TrueTernaryConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TrueTernaryHfQuantizer)


_register()

__all__ = ["TrueTernaryConfig", "TrueTernaryHfQuantizer", "TernaryModelMixin", "adopt_ternarized", "describe"]
