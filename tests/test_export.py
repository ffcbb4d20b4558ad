"""``trueternary export``: GGUF files whose TQ1_0 / TQ2_0 blocks hold the trained trits and scales exactly,
read back by gguf-py's reader and run by llama.cpp (llama-cpp-python) with the project's logits."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import trueternary as tt
from _scripts import run_as_main
from _train_helpers import tiny_config
from trueternary import checkpoint as ckpt_io
from trueternary.cli import main
from trueternary.models import build_model
from trueternary.train import train

gguf = pytest.importorskip("gguf", reason="export needs the gguf package (pip install 'trueternary[export]')")

from trueternary.export import ExportError, export_checkpoint, export_model  # noqa: E402
from trueternary.export.gguf_file import byte_stand_ins, pair_rows  # noqa: E402
from trueternary.export.tq import QK, block_scales, pack_blocks, unpack_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType


def ternary_llama(d_model=256, n_layers=1, n_heads=4, group_size=256, qk_norm=True, seed=0, ctx=64, d_ff=None):
    m = build_model("llama", seed=seed, d_model=d_model, n_layers=n_layers, n_heads=n_heads, ctx=ctx, d_ff=d_ff,
                    qk_norm=qk_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt.ternarize(m, group_size)
    return m.eval()


# ------------------------------------------------------------------------------------ the block layouts
@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_blocks_equal_gguf_reference_quantizer(qtype):
    """Our packing of trits + power-of-two scales is byte-identical to gguf-py's quantizer of the same weights
    (llama.cpp's reference layout) and unpacks to the same trits and scales."""
    rng = np.random.default_rng(1)
    trits = rng.integers(-1, 2, size=(5, 768)).astype(np.int8)
    d = (2.0 ** rng.integers(-24, 16, size=(5, 3))).astype(np.float16)
    w = trits.astype(np.float32) * np.repeat(d.astype(np.float32), 256, axis=1)
    packed = pack_blocks(trits, d, qtype)
    assert np.array_equal(packed, gguf.quants.quantize(w, getattr(Q, qtype.upper())))
    assert np.array_equal(gguf.quants.dequantize(packed, getattr(Q, qtype.upper())), w)
    t2, d2 = unpack_blocks(packed, qtype)
    assert np.array_equal(t2, trits) and np.array_equal(d2, d)


def test_block_scales_exact_only_where_one_scale_per_block():
    T = torch.tensor([[1, -1, 0, 1] * 128], dtype=torch.int8)  # one row, two blocks
    S = torch.full((1, 512), 0.25)
    d, exact = block_scales(T, S)
    assert exact.all() and torch.equal(d, torch.full((1, 2), 0.25))
    S[0, 300] = 0.5  # a nonzero trit with another scale in block 1
    d, exact = block_scales(T, S)
    assert exact.tolist() == [[True, False]]
    S[0, 300] = 0.25
    S[0, 2] = 0.5  # a zero trit's scale does not matter
    assert block_scales(T, S)[1].all()
    S[0, :256] = 2.0**-30  # below fp16: not representable
    assert block_scales(T, S)[1].tolist() == [[False, True]]


def test_byte_stand_ins_are_gpt2s_byte_map():
    chars = byte_stand_ins()
    assert len(set(chars)) == 256 and chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[10] == "Ċ"


# ------------------------------------------------------------------------------------ GGUF contents
def read_gguf(path):
    """{name: (dense float weights as torch (rows, cols), ggml type)}, {key: value} through gguf-py's reader."""
    r = gguf.GGUFReader(str(path))
    tensors = {}
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (torch.from_numpy(np.array(data, dtype=np.float32)), t.tensor_type)
    kv = {}
    for f in r.fields.values():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            kv[f.name] = len(f.data)
        elif f.types and f.types[0] == gguf.GGUFValueType.STRING:
            kv[f.name] = bytes(f.parts[f.data[0]]).decode()
        elif f.types:
            kv[f.name] = f.parts[f.data[0]].tolist()[0]
    return tensors, kv


def expected_matrices(model):
    """GGUF name -> the model's dense weight, in llama.cpp's row order (q/k rows paired for 'llama')."""
    cfg = model.cfg
    out = {"token_embd.weight": model.embed.weight.dense(), "output.weight": model.head.weight.dense()}
    perm = None if cfg.qk_norm else pair_rows(cfg.n_heads, cfg.head_dim)
    for i, b in enumerate(model.blocks):
        for name, lin in (("attn_q", b.q), ("attn_k", b.k), ("attn_v", b.v), ("attn_output", b.o),
                          ("ffn_gate", b.gate), ("ffn_up", b.up), ("ffn_down", b.down)):
            w = lin.weight.dense()
            out[f"blk.{i}.{name}.weight"] = w[perm] if perm is not None and name in ("attn_q", "attn_k") else w
    return out


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_export_is_lossless_with_group_256(tmp_path, qtype, qk_norm):
    model = ternary_llama(qk_norm=qk_norm)
    rep = export_model(model, tmp_path / "m.gguf", qtype)
    assert rep.blocks.lossless and rep.blocks.changed_weights == 0
    tensors, kv = read_gguf(tmp_path / "m.gguf")
    assert kv["general.architecture"] == ("qwen3" if qk_norm else "llama")
    arch = kv["general.architecture"]
    assert kv[f"{arch}.embedding_length"] == 256 and kv[f"{arch}.block_count"] == 1
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.tokens"] == 288
    assert kv["trueternary.lossless"] is True and kv["trueternary.group_size"] == 256
    for name, w in expected_matrices(model).items():
        got, gtype = tensors[name]
        assert gtype == getattr(Q, qtype.upper()), name
        assert torch.equal(got, w), name  # every trit and every scale
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        assert torch.equal(tensors[name][0], torch.ones(256)) and tensors[name][1] == Q.F32
    assert ("blk.0.attn_q_norm.weight" in tensors) == qk_norm
    assert rep.weights == sum(w.numel() for w in expected_matrices(model).values())
    assert rep.file_bytes == (tmp_path / "m.gguf").stat().st_size


def test_narrow_model_is_padded_exactly(tmp_path):
    """d_model 128 (the README job's) is widened with zero weights to rows of 256; the real weights are exact
    and the norms' gain / epsilon keep RMSNorm over the real channels."""
    model = ternary_llama(d_model=128, n_heads=4)
    rep = export_model(model, tmp_path / "m.gguf", "tq2_0")
    assert rep.blocks.lossless and rep.padded
    tensors, kv = read_gguf(tmp_path / "m.gguf")
    assert kv["qwen3.embedding_length"] == 256 and kv["qwen3.attention.head_count"] == 8
    assert kv["qwen3.feed_forward_length"] == 512
    assert math.isclose(kv["qwen3.attention.layer_norm_rms_epsilon"], 1e-6 * 128 / 256, rel_tol=1e-6)
    for name, w in expected_matrices(model).items():
        got = tensors[name][0]
        r, c = w.shape
        assert torch.equal(got[:r, :c], w), name
        assert not got[r:].any() and not got[:, c:].any(), name
    norm = tensors["blk.0.attn_norm.weight"][0]
    assert torch.allclose(norm[:128], torch.full((128,), math.sqrt(0.5))) and not norm[128:].any()


def test_group_64_is_refused_then_lossy_reports_the_change(tmp_path):
    model = ternary_llama(group_size=64)
    with pytest.raises(ExportError, match="--group_size 256.*--lossy"):
        export_model(model, tmp_path / "m.gguf", "tq2_0")
    assert not (tmp_path / "m.gguf").exists()
    rep = export_model(model, tmp_path / "m.gguf", "tq2_0", lossy=True)
    b = rep.blocks
    assert not b.lossless and 0 < b.changed_weights < b.weights and 0 < b.relative_error < 1
    tensors, kv = read_gguf(tmp_path / "m.gguf")
    assert kv["trueternary.lossless"] is False
    changed = sum(int((tensors[n][0] != w).sum()) for n, w in expected_matrices(model).items())
    assert changed == b.changed_weights
    # the re-fit never does worse than the exact weights rounded to the block's largest scale would
    assert b.relative_error < 0.5


def test_float_types_hold_the_same_weights(tmp_path):
    model = ternary_llama(group_size=64)  # dense f16 needs no shared block scale
    rep = export_model(model, tmp_path / "m.gguf", "f16")
    assert rep.blocks.lossless
    tensors, _ = read_gguf(tmp_path / "m.gguf")
    for name, w in expected_matrices(model).items():
        assert tensors[name][1] == Q.F16 and torch.equal(tensors[name][0], w), name


def test_transformer_model_is_refused():
    from trueternary.export import graph_of_model

    with pytest.raises(ExportError, match="no llama.cpp architecture"):
        graph_of_model(build_model("transformer", d_model=32, n_layers=1, n_heads=2, ctx=16))


# ------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints: llama with its default group size (256) and with groups of 16, a transformer, a float
    llama."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for name, kw in {"g256": {}, "g16": dict(group_size=16), "tf": dict(model="transformer"),
                     "adam": dict(config="Adam_FP32")}.items():
        kw.setdefault("model", "llama")
        train(tiny_config(tmp, run_name=name, max_steps=2, **kw))
        out[name] = ckpt_io.latest_checkpoint(tmp / "runs" / name)
    return out


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_export_command_writes_a_lossless_file(ckpts, tmp_path, capsys, qtype):
    """A llama trained with default flags exports exactly: its default group is llama.cpp's block of 256, and
    the file holds every trit and scale of the checkpoint (the real part of each padded matrix)."""
    from trueternary.generate import load_for_inference

    out = tmp_path / "m.gguf"
    assert main(["export", "--ckpt", str(ckpts["g256"]), "--out", str(out), "--type", qtype]) == 0
    line = capsys.readouterr().out
    assert "lossless" in line and qtype in line and out.exists()
    tensors, kv = read_gguf(out)
    assert kv["trueternary.recipe"] == "TrueTernary" and kv["trueternary.step"] == 2
    assert kv["trueternary.lossless"] is True and kv["trueternary.group_size"] == QK
    model, _ = load_for_inference(ckpts["g256"])
    for name, w in expected_matrices(model).items():
        r, c = w.shape
        assert torch.equal(tensors[name][0][:r, :c], w), name


def test_export_command_float_checkpoint(ckpts, tmp_path, capsys):
    """A float config's weights: exact as f32; as f16 only with --lossy (fp16 rounds them), which says so."""
    assert main(["export", "--ckpt", str(ckpts["adam"]), "--out", str(tmp_path / "f.gguf"), "--type", "f32"]) == 0
    assert "lossless" in capsys.readouterr().out
    assert main(["export", "--ckpt", str(ckpts["adam"]), "--out", str(tmp_path / "h.gguf"), "--type", "f16"]) == 2
    assert "are not fp16 numbers" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(ckpts["adam"]), "--out", str(tmp_path / "h.gguf"), "--type", "f16",
                 "--lossy"]) == 0
    assert "LOSSY" in capsys.readouterr().out


def test_float_model_is_not_written_as_ternary(tmp_path):
    model = build_model("llama", d_model=256, n_layers=1, n_heads=4, ctx=16)
    with pytest.raises(ExportError, match="holds float weights"):
        export_model(model, tmp_path / "m.gguf", "tq2_0")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("case, msg", [
    ("missing", "checkpoint not found"),
    ("corrupt", "not a"),
    ("bad_type", "unknown --type 'q4_0'"),
    ("bad_format", "unknown --format"),
    ("lossy", "--lossy"),
    ("transformer", "no llama.cpp architecture"),
    ("float_as_tq", "--type f16 or f32"),
    ("exists", "exists; pass --force"),
    ("unwritable", "cannot write"),
    ("directory", "is a directory"),
])
def test_export_command_bad_input_is_one_line_exit_2(ckpts, tmp_path, capsys, case, msg):
    out = tmp_path / "m.gguf"
    ckpt, flags = str(ckpts["g256"]), []
    if case == "missing":
        ckpt = str(tmp_path / "nope.safetensors")
    elif case == "corrupt":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"garbage" * 10)
        ckpt = str(bad)
    elif case == "bad_type":
        flags = ["--type", "q4_0"]
    elif case == "bad_format":
        flags = ["--format", "onnx"]
    elif case == "lossy":
        ckpt = str(ckpts["g16"])
    elif case == "transformer":
        ckpt = str(ckpts["tf"])
    elif case == "float_as_tq":
        ckpt = str(ckpts["adam"])
    elif case == "exists":
        out.write_bytes(b"a good file")
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "m.gguf"  # a path under a regular file cannot be created, as root too
    elif case == "directory":
        out = tmp_path
    assert main(["export", "--ckpt", ckpt, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trueternary: error: ") and msg in err and err.count("\n") == 1, err
    if case == "exists":
        assert out.read_bytes() == b"a good file"
    elif case != "directory":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_force_replaces_and_lossy_flag_exports(ckpts, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    assert main(["export", "--ckpt", str(ckpts["g16"]), "--out", str(out), "--lossy", "--force"]) == 0
    assert "LOSSY" in capsys.readouterr().out and out.read_bytes()[:4] == b"GGUF"


def test_export_checkpoint_equals_export_model(ckpts, tmp_path):
    """The command reads T_packed and E from the checkpoint: the same file as exporting the loaded model."""
    from trueternary.generate import load_for_inference

    export_checkpoint(ckpts["g256"], tmp_path / "a.gguf")
    model, _ = load_for_inference(ckpts["g256"])
    export_model(model, tmp_path / "b.gguf")
    ta, _ = read_gguf(tmp_path / "a.gguf")
    tb, _ = read_gguf(tmp_path / "b.gguf")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k][0], tb[k][0]) for k in ta)


# ------------------------------------------------------------------------------------ llama.cpp runs it
# max |llama.cpp logit - project logit| as a fraction of the std of the project's logits. TQ dot products quantise
# the activations to 8 bits (Q8_K, one scale per 256), F16 ones to fp16: the weights are exact either way.
LOGIT_TOL = {"tq2_0": 0.1, "tq1_0": 0.1, "f16": 0.01}


def llama_cpp_logits(path, windows):
    """llama.cpp's logits (n, L, vocab) for each window of token ids, each from an empty context."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                    "'trueternary[test]' builds it)")
    L = len(windows[0])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=L, n_batch=L, logits_all=True, verbose=False, n_threads=1)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(np.array(llm.scores[:L], dtype=np.float32)))
    return llm, torch.stack(out)


def assert_logits_close(got, want, qtype):
    spread = float(want.std())
    assert float((got - want).abs().max()) <= LOGIT_TOL[qtype] * spread, (float((got - want).abs().max()), spread)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A llama trained 80 steps with groups of 256 on the tiny corpus, and its held-out bytes."""
    from trueternary.data import load_corpus

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, model="llama", group_size=256, d_model=64, n_layers=1, n_heads=2, ctx=64, batch_size=8,
                      max_steps=80, run_name="r")
    train(cfg)
    return ckpt_io.latest_checkpoint(tmp / "runs" / "r"), load_corpus(cfg.data).val


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0", "f16"])
def test_llama_cpp_runs_a_trained_checkpoint(trained, tmp_path, qtype):
    """llama.cpp's next-token logits on held-out text equal the project's forward up to its activation rounding
    (LOGIT_TOL: max |diff| <= 0.1 x the logits' std for TQ types, 0.01 for f16), top-1 agreement >= 99%; and it
    generates the project's greedy continuation byte for byte."""
    from trueternary.generate import load_for_inference, sample

    ckpt, val = trained
    export_checkpoint(ckpt, tmp_path / "m.gguf", qtype)
    model, _ = load_for_inference(ckpt)
    windows = [val[i: i + 64].tolist() for i in range(0, 4 * 64, 64)]
    llm, got = llama_cpp_logits(tmp_path / "m.gguf", windows)
    with torch.no_grad():
        want = model(torch.tensor(windows))
    assert_logits_close(got, want, qtype)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.99
    prompt = bytes(windows[0][:32])
    ours = sample(model, prompt, 12, temperature=0.0)
    llm.reset()
    theirs = llm.create_completion(prompt.decode("utf-8", "replace"), max_tokens=12, temperature=0.0,
                                   repeat_penalty=1.0)  # plain greedy (its default penalises repeats)
    assert theirs["choices"][0]["text"].encode() == ours


@pytest.mark.parametrize("qk_norm, qtype, d_model", [(False, "tq1_0", 256), (True, "tq2_0", 128)])
def test_llama_cpp_logits_match_llama_arch_and_padded_models(tmp_path, qk_norm, qtype, d_model):
    """The q/k row pairing of the 'llama' architecture and the zero padding of a d_model 128 model: llama.cpp's
    logits equal the project's (a random model: its top-1 has near ties, so the logits alone are compared)."""
    model = ternary_llama(d_model=d_model, n_layers=2, qk_norm=qk_norm, ctx=64)
    export_model(model, tmp_path / "m.gguf", qtype)
    windows = [list(b"def sample(model, prompt, max_new_tokens, temperature=1.0):\n    ids = list(prompt)\n")[:64]]
    _, got = llama_cpp_logits(tmp_path / "m.gguf", windows)
    with torch.no_grad():
        assert_logits_close(got, model(torch.tensor(windows)), qtype)


@pytest.mark.parametrize("qk_norm, d_model", [(False, 128), (True, 256)])
def test_load_gguf_gives_back_the_model(tmp_path, qk_norm, d_model):
    """Reading the file back (dequantised, padding cut, q/k rows unpaired) gives the exported weights, so the
    same logits as the ternary model."""
    from trueternary.export import load_gguf

    model = ternary_llama(d_model=d_model, qk_norm=qk_norm)
    export_model(model, tmp_path / "m.gguf", "tq1_0")
    back, keys = load_gguf(tmp_path / "m.gguf")
    assert keys["trueternary.lossless"] is True and back.cfg == model.cfg
    ids = torch.tensor([list(b"def f(x):\n    return x * 2\n")])
    with torch.no_grad():
        assert torch.allclose(back(ids), model(ids), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ a Hugging Face Llama
class _RMSNorm(torch.nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(1 + 0.1 * torch.randn(n)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _HFLlama(torch.nn.Module):
    """transformers' LlamaForCausalLM / Qwen3ForCausalLM in miniature: its module names, config fields and forward
    (rotate-half rotary, grouped-query attention, weighted RMSNorms, SwiGLU; q/k norms per head for Qwen3)."""

    def __init__(self, d=256, layers=2, heads=4, kv_heads=2, vocab=300, d_ff=512, qk_norm=False):
        super().__init__()
        from types import SimpleNamespace

        from torch import nn

        hd = d // heads
        self.config = SimpleNamespace(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, head_dim=hd, rms_norm_eps=1e-5,
                                      rope_theta=50000.0, max_position_embeddings=128, vocab_size=vocab,
                                      intermediate_size=d_ff, rope_scaling=None)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.input_layernorm, layer.post_attention_layernorm = _RMSNorm(d, 1e-5), _RMSNorm(d, 1e-5)
            a = layer.self_attn = nn.Module()
            a.q_proj, a.o_proj = nn.Linear(d, heads * hd, bias=False), nn.Linear(heads * hd, d, bias=False)
            a.k_proj, a.v_proj = (nn.Linear(d, kv_heads * hd, bias=False) for _ in range(2))
            if qk_norm:
                a.q_norm, a.k_norm = _RMSNorm(hd, 1e-5), _RMSNorm(hd, 1e-5)
            m = layer.mlp = nn.Module()
            m.gate_proj, m.up_proj = (nn.Linear(d, d_ff, bias=False) for _ in range(2))
            m.down_proj = nn.Linear(d_ff, d, bias=False)
            self.model.layers.append(layer)
        self.model.norm = _RMSNorm(d, 1e-5)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        from trueternary.models.transformer import apply_rotary  # rotate-half, as transformers' rotary

        c = self.config
        B, L = ids.shape
        hd, rep = c.head_dim, c.num_attention_heads // c.num_key_value_heads
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(L).float(), inv)
        cos, sin = freqs.cos(), freqs.sin()
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            a, x = layer.self_attn, layer.input_layernorm(h)
            q = a.q_proj(x).view(B, L, -1, hd).transpose(1, 2)
            k = a.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
            v = a.v_proj(x).view(B, L, -1, hd).transpose(1, 2)
            if hasattr(a, "q_norm"):
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + a.o_proj(o.transpose(1, 2).reshape(B, L, -1))
            x = layer.post_attention_layernorm(h)
            h = h + layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
        return self.lm_head(self.model.norm(h))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_export_ternarised_hugging_face_llama(tmp_path, qk_norm):
    """``export_hf``: a ternarised HF-style Llama (grouped-query attention, weighted norms) is written exactly, and
    llama.cpp computes its logits (when llama-cpp-python is installed)."""
    from trueternary.export import export_hf

    torch.manual_seed(0)
    hf = _HFLlama(qk_norm=qk_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt.ternarize(hf, 256)
    hf.eval()
    rep = export_hf(hf, tmp_path / "hf.gguf", "tq2_0")
    assert rep.blocks.lossless and not rep.padded
    tensors, kv = read_gguf(tmp_path / "hf.gguf")
    arch = "qwen3" if qk_norm else "llama"
    assert kv["general.architecture"] == arch and kv[f"{arch}.attention.head_count_kv"] == 2
    assert kv["tokenizer.ggml.model"] == "none"
    v = hf.model.layers[1].self_attn.v_proj.weight.dense()
    assert torch.equal(tensors["blk.1.attn_v.weight"][0], v)
    assert torch.equal(tensors["blk.0.ffn_norm.weight"][0], hf.model.layers[0].post_attention_layernorm.weight)
    ids = [list(range(3, 67))]
    _, got = llama_cpp_logits(tmp_path / "hf.gguf", ids)
    with torch.no_grad():
        assert_logits_close(got, hf(torch.tensor(ids)), "tq2_0")


def test_generate_from_a_gguf_file(ckpts, tmp_path, capsysbinary):
    """``trueternary generate --ckpt model.gguf`` samples from the file's weights: greedy text equal to the
    checkpoint's; a file that is not an export is a one-line error."""
    export_checkpoint(ckpts["g256"], tmp_path / "m.gguf")
    flags = ["--prompt", "the quick", "--max_new_tokens", "10", "--temperature", "0"]
    assert main(["generate", "--ckpt", str(ckpts["g256"]), *flags]) == 0
    from_ckpt = capsysbinary.readouterr().out  # generate writes raw bytes
    assert main(["generate", "--ckpt", str(tmp_path / "m.gguf"), *flags]) == 0
    assert capsysbinary.readouterr().out == from_ckpt
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 40)
    assert main(["generate", "--ckpt", str(tmp_path / "bad.gguf")]) == 2
    err = capsysbinary.readouterr().err.decode()
    assert err.startswith("trueternary: error: ") and "not a GGUF file written by trueternary export" in err


def test_export_measure_script_bad_input(tmp_path):
    r = run_as_main("benchmarks/export_measure.py", ["--ckpt", "/no/such.safetensors", "--out", str(tmp_path / "m")])
    assert r.returncode == 2 and "--ckpt /no/such.safetensors: no such file" in r.stderr and "Traceback" not in r.stderr
