"""Tests of ``ternarize`` on transformers models and of the transformers integration (``trueternary.hf``).

Real GPT-2 and Llama models built from tiny configs (2 layers, d 64, vocab 96) with random weights; no network.
Also runs every ```python block of docs/integrations.md.
"""

from __future__ import annotations

import ast
import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from trueternary import FlipOptimizer, TernaryLinear, TernaryScaleTensor, ternarize, ternary_weights  # noqa: E402
from trueternary.quant import group_absmean_log2  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
VOCAB, GROUP = 96, 32


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0))


MODELS = {"gpt2": gpt2, "llama": llama}


def quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ternarize(model, GROUP, **kwargs)


def ternarize_warning(model, **kwargs) -> str:
    """ternarize ``model`` and return the one warning it gives."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ternarize(model, GROUP, **kwargs)
    msgs = [str(w.message) for w in rec if str(w.message).startswith("ternarize")]
    assert len(msgs) == 1, msgs
    return msgs[0]


def unique_params(model: nn.Module) -> dict[int, torch.Tensor]:
    return {id(p): p for p in model.parameters()}


TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


# ---------------------------------------------------------------------------- ternarize on transformers models


def test_gpt2_every_weight_matrix_becomes_ternary_and_the_warning_says_what_stays_float():
    model = gpt2()
    layers = [m for m in model.modules() if isinstance(m, (Conv1D, nn.Linear, nn.Embedding))]
    matrices = {id(m.weight): m.weight.numel() for m in layers}  # lm_head and wte share one
    total = sum(p.numel() for p in unique_params(model).values())
    c_attn = copy.deepcopy(model.transformer.h[0].attn.c_attn)
    msg = ternarize_warning(model)
    assert not any(isinstance(m, (Conv1D, nn.Linear, nn.Embedding)) for m in model.modules())
    assert sum(w.numel() for w in ternary_weights(model)) == sum(matrices.values())
    assert list(model.parameters()) == []
    assert msg.startswith("ternarize(strict=True) froze 10 non-ternary parameter(s)")
    assert f"{sum(matrices.values()):,} of {total:,} weights ternary" in msg
    assert "LayerNorm vectors (no ternary form): transformer.h.0.ln_1.weight" in msg and "\n" not in msg
    # Conv1D keeps its weight as [in, out]: the ternary layer holds the ternarisation of its transpose
    t = model.transformer.h[0].attn.c_attn
    T, E = group_absmean_log2(c_attn.weight.detach().t(), GROUP)
    assert isinstance(t, TernaryLinear) and (t.in_features, t.out_features) == (64, 192)
    assert torch.equal(t.weight.trits(), T) and torch.equal(t.weight.E, E)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(t(x), x @ t.weight.dense().t() + t.bias.value(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tied_embeddings_become_one_ternary_weight_that_stays_tied_in_training(name):
    model = quietly(MODELS[name]())
    shared = model.get_input_embeddings().weight
    assert isinstance(shared, TernaryScaleTensor) and shared is model.get_output_embeddings().weight
    assert len(ternary_weights(model)) == len({id(w) for w in ternary_weights(model)})
    model.train()
    opt = FlipOptimizer(model, accum_threshold=2)
    model(TOKENS, labels=TOKENS).loss.backward()
    opt.step()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert shared.T_accum.any()  # the shared weight got votes


def test_filter_fn_and_skip_keep_layers_float_and_the_warning_names_them():
    model = llama(tie=False)
    asked = []

    def not_mlp(layer, fqn):
        asked.append((type(layer).__name__, fqn))
        return ".mlp." not in fqn

    msg = ternarize_warning(model, filter_fn=not_mlp, skip=("model.layers.1.self_attn",))
    assert ("Linear", "lm_head") in asked and ("Embedding", "model.embed_tokens") in asked
    assert not any(fqn.startswith("model.layers.1.self_attn") for _, fqn in asked)  # skipped containers: not asked
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, TernaryLinear)
    assert isinstance(model.lm_head, TernaryLinear)
    assert list(model.parameters()) == []  # strict: the kept layers are frozen too
    assert "kept by filter_fn: model.layers.0.mlp.gate_proj.weight" in msg
    assert "kept by skip: model.layers.1.self_attn.q_proj.weight" in msg


def test_keeping_one_layer_of_a_tied_pair_float_is_refused_before_anything_changes():
    model = gpt2()
    with pytest.raises(ValueError, match="tied") as e:
        ternarize(model, GROUP, filter_fn=lambda layer, fqn: fqn != "lm_head")
    assert "\n" not in str(e.value)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D) and len(list(model.parameters())) > 0


@pytest.mark.parametrize("model,kwargs,match", [
    (nn.Sequential(nn.LayerNorm(8), nn.ReLU()), {}, "Sequential has no nn.Linear, nn.Embedding or Conv1D layer"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), {}, r"0\.weight \(Conv2d weight matrices"),
    (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), {"skip": ("1", "2")}, "skip names no layer of Sequential: 2"),
], ids=["nothing-to-convert", "conv2d", "unknown-skip"])
def test_ternarize_refuses_in_one_line_and_leaves_the_model_as_it_was(model, kwargs, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        ternarize(model, **kwargs)
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, TernaryLinear) for m in model.modules())


# ---------------------------------------------------------------------------- a working transformers model


def test_strict_ternary_model_has_device_dtype_and_generates_greedily():
    model = quietly(gpt2())
    assert list(model.parameters()) == []
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    model.eval()
    prompt = TOKENS[:1, :4]
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():  # greedy decoding by hand, over the whole sequence each time
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name,strict,scale_mode", [("gpt2", True, "int"), ("llama", True, "int"),
                                                     ("gpt2", False, "int"), ("llama", True, "float")],
                         ids=["gpt2", "llama-tied", "gpt2-non-strict", "llama-hybrid"])
def test_from_pretrained_gives_the_same_model_bit_for_bit(tmp_path, name, strict, scale_mode):
    model = quietly(MODELS[name](), strict=strict, scale_mode=scale_mode)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(model).__name__
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(n.endswith(".log2_scale") for n, _ in loaded.named_parameters()) is strict  # (the hybrid's scales)
    for a, b in zip(ternary_weights(model), ternary_weights(loaded), strict=True):
        assert torch.equal(a.T_packed, b.T_packed) and torch.equal(a.E, b.E)
    assert loaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()


def test_saved_files_hold_no_accumulators_unless_asked(tmp_path):
    model = quietly(gpt2(), accum_threshold=8)  # nonzero accumulators, to see them come back
    model.save_pretrained(tmp_path / "inference")
    with safe_open(tmp_path / "inference" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    assert not any(k.endswith(("T_accum", "E_accum")) for k in keys)
    assert not any(k.startswith("lm_head.") for k in keys)  # tied: saved once, as transformer.wte
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "inference")
    assert all(w.inference_only for w in ternary_weights(loaded))
    with pytest.raises(ValueError, match="inference only"):
        FlipOptimizer(loaded)
    with pytest.raises(ValueError, match="no training state"):
        loaded.save_pretrained(tmp_path / "again", with_training_state=True)
    assert not (tmp_path / "again").exists()

    model.save_pretrained(tmp_path / "training", with_training_state=True)
    resumed = GPT2LMHeadModel.from_pretrained(tmp_path / "training")
    for a, b in zip(ternary_weights(model), ternary_weights(resumed), strict=True):
        assert torch.equal(a.T_accum, b.T_accum) and torch.equal(a.E_accum, b.E_accum)
    assert any(w.T_accum.any() for w in ternary_weights(resumed))
    resumed.train()
    opt = FlipOptimizer(resumed, accum_threshold=8)
    resumed(TOKENS, labels=TOKENS).loss.backward()
    opt.step()


@pytest.mark.parametrize("key", ["transformer.h.1.mlp.c_fc.weight", "transformer.wte.weight.E",
                                 "transformer.h.0.attn.c_proj.bias.q"])
def test_a_missing_ternary_tensor_is_a_loud_error(tmp_path, key):
    quietly(gpt2()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(key)) as e:
        GPT2LMHeadModel.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def under_training(name: str, seed: int = 0):
    """A ternarised model (nonzero accumulators: accum_threshold) that a FlipOptimizer trains; ``seed`` != 0 moves
    every float weight first, so its trits, scales, biases and accumulators differ from seed 0's."""
    model = MODELS[name]()
    if seed:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.std().nan_to_num(1.0))
    model = quietly(model, accum_threshold=8)
    FlipOptimizer(model, accum_threshold=8)
    return model


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_model_under_training_saves_its_accumulators_and_load_state_dict_reads_the_folder(tmp_path, name):
    """Trainer saves with save_pretrained (no arguments) and resumes with load_state_dict(strict=False) of the
    folder's tensors: while a FlipOptimizer trains the model the folder holds the accumulators, and the load
    restores every tensor (packed trits under <layer>.weight, a tied layer's weight saved once)."""
    model = under_training(name)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert any(k.endswith("T_accum") for k in tensors) and not any(k.endswith("T_packed") for k in tensors)
    assert model.config.quantization_config.training_state
    other = under_training(name, seed=1)
    differ = [k for k, v in other.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert any(k.endswith(".T_packed") for k in differ) and any(k.endswith(".T_accum") for k in differ)
    result = other.load_state_dict(tensors, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_state(other, full_state(model))
    other.load_state_dict(full_state(model))  # the model's own format loads as before (strict)
    model.save_pretrained(tmp_path / "inference", with_training_state=False)
    assert not any(k.endswith("T_accum") for k in load_file(tmp_path / "inference" / "model.safetensors"))


def test_an_inference_model_loads_a_training_folder_by_load_state_dict(tmp_path):
    model = under_training("gpt2")
    model.save_pretrained(tmp_path / "training")
    model.save_pretrained(tmp_path / "inference", with_training_state=False)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "inference")
    assert all(w.inference_only for w in ternary_weights(loaded))
    loaded.save_pretrained(tmp_path / "again")  # inference only: nothing to train, nothing more to save
    assert not any(k.endswith("T_accum") for k in load_file(tmp_path / "again" / "model.safetensors"))
    loaded.load_state_dict(load_file(tmp_path / "training" / "model.safetensors"))  # its accumulators: not kept
    assert all(w.inference_only for w in ternary_weights(loaded))
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("key,match", [
    ("transformer.h.1.mlp.c_fc.weight", "missing"),
    ("transformer.wte.weight.T_accum", "saved without training state"),
    ("transformer.h.0.attn.c_proj.bias.q", "missing"),
    ("transformer.h.0.mlp.c_proj.weight", r"uint8 \(\d+,\)"),  # the packed trits as a float weight
    ("transformer.h.0.attn.c_attn.weight.E", "int8"),
    ("transformer.h.1.attn.c_attn.weight", "packed"),  # a byte past the last packing
], ids=["packed-trits", "accumulator", "integer-bias", "float-weight", "scale-dtype", "bad-packing"])
def test_load_state_dict_refuses_a_folder_missing_or_bad_ternary_tensor_and_loads_nothing(tmp_path, key, match):
    model = under_training("gpt2")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if match in ("missing", "saved without training state"):
        del tensors[key]
    elif key.endswith(".E"):
        tensors[key] = tensors[key].to(torch.int16)
    elif match == "packed":
        tensors[key][3] = 255
    else:
        tensors[key] = torch.zeros(64, 64)
    other = under_training("gpt2", seed=1)
    before = full_state(other)
    with pytest.raises(ValueError, match=match) as e:
        other.load_state_dict(tensors, strict=False)
    assert key in str(e.value) and "\n" not in str(e.value)
    assert_state(other, before)


def test_a_trueternary_folder_does_not_load_without_the_integration(tmp_path, monkeypatch):
    from transformers.quantizers import auto

    quietly(gpt2()).save_pretrained(tmp_path)
    # what a process that never imported trueternary sees: quantization method "trueternary" is unknown
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "trueternary")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "trueternary")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        GPT2LMHeadModel.from_pretrained(tmp_path)


def test_from_pretrained_does_not_ternarise_a_float_checkpoint_on_the_fly(tmp_path):
    from trueternary.hf import TrueTernaryConfig

    gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"call trueternary\.ternarize"):
        GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=TrueTernaryConfig())


def import_time_modules(package_dir: Path) -> dict[str, set[str]]:
    """{module: the modules it imports when it is imported} for every module of the package: imports anywhere but in
    a function body (those run when the function does), relative ones resolved to the package's modules."""
    pkg = package_dir.name
    files = {".".join((pkg, *p.relative_to(package_dir).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in package_dir.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found, stack = set(), list(ast.parse(path.read_text()).body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    parts = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names}
            else:
                stack.extend(ast.iter_child_nodes(node))
        graph[module] = found
    return graph


def test_import_trueternary_does_not_import_transformers():
    """What ``import trueternary`` runs (module-level imports, followed through the package) never names
    transformers; trueternary.hf, which does, is imported only by ternarize on a transformers model."""
    graph = import_time_modules(Path(__file__).resolve().parents[1] / "src" / "trueternary")
    assert "transformers" in graph["trueternary.hf"]  # the walk sees module-level imports
    seen, todo = set(), ["trueternary"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in graph.get(module, ()):
            assert name.split(".")[0] != "transformers", f"{module} imports {name} when trueternary is imported"
            todo += [m for m in graph if name == m or name.startswith(m + ".")]  # (and the packages around it)
    assert "trueternary.convert" in seen and "trueternary.hf" not in seen


# ---------------------------------------------------------------------------- the docs' examples


def doc_python_blocks(text: str) -> list[tuple[str, str]]:
    """(id, code) of every ```python block of a markdown text; the id is the heading above it and the block's
    number. Blocks of any section run; each must be self-contained."""
    blocks, heading, n = [], "top", {}
    for match in re.finditer(r"^(#{1,6}) ([^\n]+)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            heading = re.sub(r"[^a-z0-9]+", "-", match.group(2).lower()).strip("-")
        else:
            n[heading] = n.get(heading, 0) + 1
            blocks.append((f"{heading}-{n[heading]}", match.group(3)))
    return blocks


def test_doc_block_extractor():
    text = ("# A\n```python\nx = 1\n```\ntext\n## B c\n```bash\nls\n```\n```python\ny = 2\n\nz = 3\n```\n"
            "## D\n```python\n# ```python inside a comment\nw = 4\n```\n")
    assert doc_python_blocks(text) == [("a-1", "x = 1\n"), ("b-c-1", "y = 2\n\nz = 3\n"),
                                       ("d-1", "# ```python inside a comment\nw = 4\n")]


DOC_TEXT = DOC.read_text()
DOC_BLOCKS = doc_python_blocks(DOC_TEXT)


@pytest.mark.filterwarnings("ignore:ternarize")  # (the examples show ternarize's warning where it matters)
@pytest.mark.parametrize("code", [c for _, c in DOC_BLOCKS], ids=[i for i, _ in DOC_BLOCKS])
def test_integrations_doc_examples(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # as on a user's CPU: without Triton's interpreter (which the kernel test modules turn on for the whole process)
    # the Triton layers take the dense reference; interpreted, the TrainStep example's steps took ~10 s. The model
    # with the kernels running: test_kernels_matmul.py's Llama test
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # the block at its own lines of the page, so a traceback points into the page
    first_line = DOC_TEXT[:DOC_TEXT.index("```python\n" + code)].count("\n") + 1
    from accelerate.state import AcceleratorState  # (a test dependency: the page's accelerate example needs it)

    AcceleratorState._reset_state(True)  # Trainer and Accelerator share accelerate's process-wide state
    try:
        exec(compile("\n" * first_line + code, str(DOC), "exec"), {"__name__": "__doc_example__"})
    finally:
        AcceleratorState._reset_state(True)
