"""Acceptance checks that need a CUDA device (marked ``gpu``; skipped without one): the gpu backend against the
plain-PyTorch path, CUDA-graphed steps against eager ones, a compiled and graphed transformers Llama against its
uncompiled graph, bit-identical GPU runs and resumes, generation from a GPU checkpoint, and data-parallel
``trueternary train`` over NCCL and gloo.

    python -m pytest -q -m gpu tests/test_gpu.py      # on a CUDA machine (about 2 minutes on one H100)

The kernels themselves are checked by the kernel tests (tests/test_kernels_*.py), which run compiled on a CUDA
machine; these tests check the training paths built from them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
# the seed setting of the performance benchmark (benchmarks/bench_e2e.py): 4 layers, d=512, ctx 33, batch 4
SEED_SETTING = dict(d_model=512, n_layers=4, ctx=33)


def _seed_setting_recipe(backend: str):
    from trueternary.models.transformer import ByteTransformer, TransformerConfig
    from trueternary.recipes import Hparams, build_recipe

    base = ByteTransformer(TransformerConfig(**SEED_SETTING), generator=torch.Generator().manual_seed(1234))
    return build_recipe("TrueTernary", base, Hparams(steps=1000), device="cuda", backend=backend, seed=0)


def _batch(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 256, (batch, SEED_SETTING["ctx"] + 1), generator=torch.Generator().manual_seed(99))
    seq = seq.cuda()
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _integer_state(model) -> dict[str, torch.Tensor]:
    """Every ternary weight's integer buffers (the embedding's too), keyed by module name."""
    from trueternary.weight import TernaryScaleTensor

    return {f"{name}.{b}": getattr(m, b).clone() for name, m in model.named_modules()
            if isinstance(m, TernaryScaleTensor) for b in ("T_packed", "T_accum", "E", "E_accum")}


def _accum_mismatch(a: dict, b: dict) -> float:
    keys = [k for k in a if k.endswith(".T_accum")]
    return sum(int((a[k] != b[k]).sum()) for k in keys) / sum(a[k].numel() for k in keys)


def test_gpu_backend_agrees_with_dense_fallback_after_one_step():
    """One step from the same state and batch, bf16 autocast: the kernels' fp32 weight gradient rounds differently
    from dense-fallback's bf16 ``gy.T @ x``, so the votes agree statistically (H200: 0.015% of T_accum differ) and
    the losses match."""
    x, y = _batch()
    out = {}
    for backend in ("dense-fallback", "gpu"):
        r = _seed_setting_recipe(backend)
        out[backend] = (float(r.train_step(x, y, True)), _integer_state(r.model))
    (loss_dense, dense), (loss_gpu, gpu) = out["dense-fallback"], out["gpu"]
    assert _accum_mismatch(dense, gpu) < 0.01
    assert abs(loss_dense - loss_gpu) < 1e-2 * abs(loss_dense)


def test_graphed_steps_match_eager_steps():
    """Three replays of the whole TrueTernary step captured in one CUDA graph (Recipe.use_cuda_graph, what
    ``trueternary train`` runs on a GPU) against three eager steps from the same state with the same device lr:
    the same kernels with the same keys, so the integer state and the moving averages' codes agree bit for bit
    (they may differ only where a float op between the kernels is not deterministic: see
    experiments/cuda_graph_exactness)."""
    x, y = _batch()
    graphed, eager = _seed_setting_recipe("gpu"), _seed_setting_recipe("gpu")
    for r in (graphed, eager):  # one eager step each first: the kernels compile, the step state exists
        r.flip.check_finite = False
        r.train_step(x, y, True)
    graphed.use_cuda_graph(x, y, True)
    eager.flip.use_device_lr(torch.device("cuda"))  # the graphed step's lr arithmetic
    for _ in range(3):
        graphed.train_step(x, y, True)
        eager.train_step(x, y, True)
    sg, se = _integer_state(graphed.model), _integer_state(eager.model)
    assert [k for k in sg if not torch.equal(sg[k], se[k])] == []
    codes_g, codes_e = graphed.flip.state_dict()["state"], eager.flip.state_dict()["state"]
    assert codes_g.keys() == codes_e.keys()
    assert all(torch.equal(codes_g[i][c], codes_e[i][c]) for i in codes_g for c in codes_g[i])


def test_compiled_graphed_hf_llama_trains_like_the_eager_graphed_one():
    """A ternarised transformers Llama under ``TrainStep(compile=True)`` in one CUDA graph (the ternary layers as
    the trueternary:: ops: one compiled graph, no break) against the same model graphed without compile, same
    batches, bf16 autocast: Inductor fuses the float ops between the layers in another order, so the votes agree
    statistically and the losses closely."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from trueternary import ternarize
    from trueternary.layers import set_linear_kernel
    from trueternary.optim import FlipOptimizer, TrainStep

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)

    def loss_fn(model, xy):
        logits = model(input_ids=xy[0], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), xy[1].flatten())

    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (8, 129), generator=g).cuda() for _ in range(3)]
    batches = [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs]
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = ternarize(copy.deepcopy(base), device="cuda").to("cuda")
        set_linear_kernel(model, "triton")
        opt = FlipOptimizer(model, backend="gpu", seed=0)
        if compiled:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                explained = torch._dynamo.explain(loss_fn)(model, batches[0])
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            torch._dynamo.reset()
        step = TrainStep(model, opt, loss_fn, batches[0], cuda_graph=True, compile=compiled, autocast=torch.bfloat16)
        assert step.graphed, step.eager_reason
        losses = [float(step(batches[0]))]
        after_one = _integer_state(model)  # (one step: later flips would compound the rounding differences)
        losses += [float(step(b)) for b in batches[1:]]
        runs[compiled] = (losses, after_one)
    (losses_e, state_e), (losses_c, state_c) = runs[False], runs[True]
    assert losses_c == pytest.approx(losses_e, rel=2e-2)
    assert _accum_mismatch(state_e, state_c) < 0.01
    assert any(int((v != 0).sum()) for k, v in state_c.items() if k.endswith(".T_accum"))


def _train(runs: Path, name: str, **overrides) -> dict:
    from trueternary.train import TrainConfig, train

    return train(TrainConfig(device="cuda", out_dir=str(runs), run_name=name, max_steps=60, eval_every=30,
                             save_every=30, **overrides))


def _checkpoint_sha(run_dir: Path) -> str:
    from trueternary.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir)).meta["tensor_sha256"]


def test_gpu_runs_and_resume_are_bit_identical_and_generate(tmp_path):
    """The README's default run on the GPU (its step in one CUDA graph): two uninterrupted runs end with the same
    checkpoint tensors, and so does one stopped halfway and resumed; the checkpoint then generates on the GPU."""
    from trueternary.checkpoint import latest_checkpoint
    from trueternary.generate import load_for_inference, sample

    straight = _train(tmp_path, "straight")
    again = _train(tmp_path, "again")
    first = _train(tmp_path, "split", stop_at=30)
    second = _train(tmp_path, "split", resume="auto")
    assert straight["losses"] == again["losses"] == first["losses"] + second["losses"]
    assert _checkpoint_sha(tmp_path / "straight") == _checkpoint_sha(tmp_path / "again") \
        == _checkpoint_sha(tmp_path / "split")
    model, _ = load_for_inference(latest_checkpoint(tmp_path / "straight"), "cuda")
    assert len(sample(model, b"def ", 50, temperature=0.8, seed=0, device="cuda")) == 50


def _torchrun_train(tmp_path: Path, name: str, nproc: int, config: str, env_extra: dict, steps: int = 20) -> Path:
    """``trueternary train`` under torchrun on the GPU(s); returns the run directory (the run must succeed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trueternary.cli", "train", "--config", config, "--device", "cuda", "--max_steps", str(steps),
           "--eval_every", str(steps // 2), "--save_every", str(steps // 2), "--out_dir", str(tmp_path),
           "--run_name", name]
    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name


DISTRIBUTED_RUNS = [  # (name, ranks, config, environment, GPUs needed)
    # NCCL with one rank: NCCL setup, CUDA step sync, DDP with device_ids, the replica check at every save
    ("nccl1-TrueTernary", 1, "TrueTernary", {}, 1),
    ("nccl1-Adam_FP32", 1, "Adam_FP32", {}, 1),
    # gloo with CUDA tensors, two ranks sharing GPU 0: the ranks' ternary state is compared at every save
    ("gloo2-TrueTernary", 2, "TrueTernary", {"TRUETERNARY_DIST_BACKEND": "gloo"}, 1),
    ("gloo2-TrueTernary_Hybrid", 2, "TrueTernary_Hybrid", {"TRUETERNARY_DIST_BACKEND": "gloo"}, 1),
    # NCCL, two GPUs; the hybrid's gradient exchange interleaves with DDP's buckets on one communicator
    ("nccl2-TrueTernary", 2, "TrueTernary", {}, 2),
    ("nccl2-Adam_FP32", 2, "Adam_FP32", {}, 2),
    ("nccl2-TrueTernary_Hybrid", 2, "TrueTernary_Hybrid", {}, 2),
]


@pytest.mark.parametrize("name,nproc,config,env,gpus", DISTRIBUTED_RUNS, ids=[r[0] for r in DISTRIBUTED_RUNS])
def test_data_parallel_train_on_gpu(tmp_path, name, nproc, config, env, gpus):
    """Data-parallel ``trueternary train`` on CUDA: the run succeeds (a run whose ranks' state differs stops with
    an error at the save), and the bytes counted at every collective equal the model in config.json."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    run = _torchrun_train(tmp_path, name, nproc, config, env)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    model = json.loads((run / "config.json").read_text())["distributed"]["comm_model"]
    assert sorted({r["comm_bytes"] for r in rows if "comm_bytes" in r}) == [model["sent"]]
    assert [r["val_bpb"] for r in rows if "val_bpb" in r]
