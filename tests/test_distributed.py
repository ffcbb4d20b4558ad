"""Data-parallel training (trueternary.distributed) on CPU with gloo: real 2- and 4-process runs.

Two launches run every multi-rank job once (process start-up and the rendezvous dominate the cost on a 2-core
machine); the tests then check what the ranks wrote:

    four_ranks  torchrun over two simulated nodes (two agents, --nnodes 2 --nproc_per_node 2, c10d rendezvous
                on localhost): 4 ranks
    two_ranks   torch.multiprocessing.spawn: 2 ranks

    (a) the ranks vote as one process: with gradients whose sum over the ranks is exact, N ranks end bit for bit
        in one process's integer state, step after step, for every kind of vote call (matrices cut into shares
        with short last tiles, embedding row calls, integer biases, a weight called twice a step) and rule;
    (b) after N steps every rank holds bit-identical state although each trained on its own share of the batch;
    (c) 1, 2 and 4 ranks learn alike on the same global batches (validation bits per byte);
    (d) checkpoints move between world sizes (4 -> 2, 4 -> 1, 2 -> 1, 1 -> 2) and continue on the same batches;
        the same world size resumes bit-identically;
    (e) the gradient exchange overlaps backward (buckets leave as layers finish) and the step reads nothing on
        the host; bad flag combinations give one-line errors; the bytes counted at every collective equal the
        communication model; the collectives that keep ranks in lock-step (error agreement, non-finite
        verdict, replica check).

Spawned processes run with OMP_NUM_THREADS=1: on a shared 2-core machine OpenMP spin-waiting otherwise makes a
step up to ~50x slower. ``python tests/test_distributed.py --measure`` re-measures (c) over several seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed

sys.path.insert(0, str(Path(__file__).parent))

from _train_helpers import tiny_config, write_corpus  # noqa: E402
from trueternary import checkpoint as ckpt_io  # noqa: E402
from trueternary.train import TrainConfig, read_metrics, train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no torch.distributed / gloo")
ROOT = Path(__file__).resolve().parents[1]
STATE_STEPS = 6
CONFIGS = ("TrueTernary", "TrueTernary_Naive", "TrueTernary_Hybrid", "Adam_FP32", "BitNet_QAT", "SignSGD_Old")
# (c): 100 steps of the tiny model (d 32, 1 layer, ctx 16), global batch 16, on the repeating-sentence corpus, the
# rule's main knobs pinned so that tuning FlipRule's defaults cannot move this comparison unnoticed.
LEARN = dict(max_steps=100, batch_size=16, eval_windows=32, lr=4.0, accum_threshold=32, rule={"vote_clip": 8})
# Measured with `python tests/test_distributed.py --measure 0-4` (this CPU): docs/distributed.md, "Learning". The
# ranks vote as one process on the same global batches, so they differ from it by float rounding only.
LEARN_TOLERANCE_BPB = 0.05
LEARNED_BITS = 2.5  # every run must end at least this far below the untrained model's bpb
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "peak_memory_bytes")  # measured, not computed: differ run to run
EXACT_RULES = {  # (a): every kind of share and rule the exchange handles
    "default": dict(lr=4.0, decay=0.25, norm_block=16, scale_update_interval=2, accum_threshold=6),
    "history-less": dict(lr=3.0, norm_beta=0.0, norm_block=16, accum_threshold=6),
    "tensor": dict(lr=3.0, normalize="tensor", norm_beta=0.0, accum_threshold=6),
    "naive": "naive",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save_state(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _tiny_kw(out: Path) -> dict:
    c = tiny_config(out, batch_size=8)
    return {k: getattr(c, k) for k in ("d_model", "n_layers", "n_heads", "ctx", "batch_size", "max_steps",
                                       "eval_every", "save_every", "eval_windows", "device", "data", "out_dir")}


def _train_args(out: Path, **kw) -> list[str]:
    """``trueternary train`` flags for the tiny runs of ``_tiny_kw`` with ``kw`` on top."""
    args = []
    for k, v in dict(_tiny_kw(out), **kw).items():
        args += [f"--{k}", ",".join(f"{f}={x}" for f, x in v.items()) if isinstance(v, dict) else str(v)]
    return args


# ------------------------------------------------------------------------------------ the jobs the ranks run
def _optimizer(model, rule):
    from trueternary import FlipOptimizer
    from trueternary.rule import FlipRule

    if rule == "naive":
        return FlipOptimizer(model, rule=FlipRule.naive(accum_threshold=3), seed=3)
    return FlipOptimizer(model, seed=3, **rule)


def _integer_state(model, opt) -> dict[str, torch.Tensor]:
    """Every integer tensor of the training state: the model's buffers and the optimiser's codes."""
    out = {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}
    for i, m in enumerate(opt.modules_trained()):
        for k, v in opt.state.get(getattr(m, "T_accum", None), {}).items():
            out[f"codes.{i}.{k}"] = v
    return out


def _job_exact(ctx, out: Path) -> None:
    """(a) One process and this rank are fed the same gradients, this rank each element's (and each touched
    row's) only when it is its own (a random owner per element), times N (the gradient of the mean loss over its
    share of a batch), so the ranks' mean is exact; after every step this rank's integer state must equal the one
    process's bit for bit."""
    import copy

    from torch import nn

    from trueternary import ternarize
    from trueternary.distributed import attach, mismatched_replicas

    results = {}
    for name, rule in EXACT_RULES.items():
        torch.manual_seed(0)
        base = ternarize(nn.Sequential(nn.Embedding(40, 24, padding_idx=0), nn.Linear(24, 37), nn.ReLU(),
                                       nn.Linear(37, 20)), group_size=8)
        models = {"one": base, "rank": copy.deepcopy(base)}
        opts = {k: _optimizer(m, rule) for k, m in models.items()}
        attach(opts["rank"], ctx, bucket_bytes=3000, first_bucket_bytes=1000)  # several buckets, shares cut
        gen = torch.Generator().manual_seed(11)  # the same on every rank
        identical, moved = [], False
        for _ in range(4):
            emb, lin1, lin2 = (models["one"][i] for i in (0, 1, 3))
            calls = [(lin2.weight, 3, None), (lin1.weight, 3, None), (lin1.weight, 1, None)]  # lin1: twice a step
            grads = [(i, torch.randn(w.rows, w.cols, generator=gen) * s) for i, (w, s, _) in enumerate(calls)]
            owner = [torch.randint(0, ctx.world_size, g.shape, generator=gen) for _, g in grads]
            touched = torch.rand(40, generator=gen) < 0.5
            g_emb = torch.randn(40, 24, generator=gen) * touched[:, None]
            row_owner = torch.randint(0, ctx.world_size, (40,), generator=gen)
            biases = [(m, torch.randn(m.bias.n, generator=gen)) for m in (lin1, lin2)]
            bias_owner = [torch.randint(0, ctx.world_size, (g.numel(),), generator=gen) for _, g in biases]
            for who in ("one", "rank"):
                mods, opt = models[who], opts[who]
                n = 1 if who == "one" else ctx.world_size
                mine = (lambda o: torch.ones_like(o, dtype=torch.bool)) if who == "one" else (lambda o: o == ctx.rank)
                for (i, g), o in zip(grads, owner):
                    w = (mods[3], mods[1], mods[1])[i].weight
                    opt.cast_votes(w, torch.where(mine(o), g * n, 0.0), None)
                rows_here = touched & mine(row_owner) & (torch.arange(40) != 0)
                order = torch.argsort((~rows_here).to(torch.int8), stable=True)
                w = mods[0].weight
                opt.cast_votes(w, torch.where(rows_here[:, None], g_emb * n, 0.0)[order], w.trits()[order],
                               rows=order, n_rows=rows_here.sum())
                for (m, g), o in zip(biases, bias_owner):
                    opt.cast_bias_votes(mods[(1, 3)[m is lin2]].bias, torch.where(mine(o), g * n, 0.0))
                opt.step()
            a, b = _integer_state(models["one"], opts["one"]), _integer_state(models["rank"], opts["rank"])
            identical.append(sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a))
            moved = moved or bool(opts["one"].last_flips)
        results[name] = {"identical": identical, "moved": moved,
                         "replicas_differ": mismatched_replicas(_integer_state(models["rank"], opts["rank"]), ctx),
                         "buckets": opts["rank"]._votes.last_step["buckets"]}
    (out / f"exact_w{ctx.world_size}_rank{ctx.rank}.json").write_text(json.dumps(results))


@contextlib.contextmanager
def _no_host_reads():
    """Every way Python reads a tensor's value on the host raises (conftest's guard, for the ranks)."""

    def no_sync(*args, **kwargs):
        raise AssertionError("host read of a tensor")

    saved = {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")}
    try:
        for n in saved:
            setattr(torch.Tensor, n, no_sync)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _job_overlap(ctx, out: Path) -> None:
    """(e) A 6-layer model with one layer per bucket: buckets leave during backward (before it reaches the first
    layer); a step with the finite check and lr on the device reads nothing on the host (so a CUDA graph could
    hold it, where the collectives can be captured)."""
    from torch import nn

    from trueternary import FlipOptimizer, ternarize
    from trueternary.distributed import attach

    torch.manual_seed(0)
    layers = [nn.Embedding(64, 32)] + [m for _ in range(5) for m in (nn.Linear(32, 32, bias=False), nn.ReLU())]
    layers.append(nn.Linear(32, 64, bias=False))
    model = ternarize(nn.Sequential(*layers), group_size=16)
    opt = FlipOptimizer(model, lr=4.0, seed=1)
    attach(opt, ctx, bucket_bytes=32 * 32 * 4, first_bucket_bytes=32 * 32 * 4)
    sent_before_first_layer: list[int] = []

    def watch(module, inputs, y) -> None:  # y's gradient arrives as backward reaches the first layer
        y.register_hook(lambda g: sent_before_first_layer.append(opt._votes._sent_in_backward))

    model[0].register_forward_hook(watch)
    gen = torch.Generator().manual_seed(0)
    host_reads = None
    for step in range(4):
        idx = torch.randint(0, 64, (8, 4), generator=gen)[ctx.rank::ctx.world_size]
        loss = torch.nn.functional.cross_entropy(model(idx).reshape(-1, 64), ((idx * 5 + 1) % 64).reshape(-1))
        if step < 3:
            loss.backward()
            opt.step()
            continue
        opt.defer_finite_check("cpu")  # what Recipe.use_cuda_graph sets up
        opt.use_device_lr("cpu")
        try:
            with _no_host_reads():
                loss.backward()
                opt.step()
        except AssertionError as e:
            host_reads = str(e)
    (out / f"overlap_w{ctx.world_size}_rank{ctx.rank}.json").write_text(json.dumps({
        "sent_before_first_layer": sent_before_first_layer, "last_step": opt._votes.last_step,
        "host_reads": host_reads}))


def _job_lockstep(ctx, out: Path) -> None:
    """The collectives that keep ranks together: error agreement, the non-finite verdict, replica check."""
    from trueternary.cli import UsageError
    from trueternary.distributed import mismatched_replicas

    res = {}
    try:
        ctx.agree(UsageError("bad thing on rank 1") if ctx.rank == 1 else None, (UsageError,))
        res["agree"] = None
    except UsageError as e:
        res["agree"] = str(e)
    loss = torch.tensor(2.0 + ctx.rank)
    res["sync"] = ctx.sync_step(loss, bad=ctx.rank == 1)
    res["sync_ok"] = ctx.sync_step(loss, bad=False)
    same = {"a": torch.arange(10, dtype=torch.int8), "b": torch.ones(3)}
    differ = dict(same, b=torch.ones(3) + (ctx.rank == 1) * 1e-7)
    res["replicas_same"] = mismatched_replicas(same, ctx)
    res["replicas_differ"] = mismatched_replicas(differ, ctx)
    (out / f"lockstep_rank{ctx.rank}.json").write_text(json.dumps(res))


def _job_library_states(ctx, out: Path) -> None:
    """(b) Each config through the library API: build, prepare_recipe, STATE_STEPS steps on this rank's share
    of the batches; dump the full training state and the bytes counted."""
    from trueternary import distributed
    from trueternary.checkpoint import recipe_state
    from trueternary.data import RandomWindows, load_corpus
    from trueternary.models import build_model
    from trueternary.recipes import Hparams, build_recipe

    corpus = load_corpus(str(out / "corpus.txt"))
    base = build_model("transformer", seed=0, ctx=16, d_model=32, n_layers=1, n_heads=2)
    for name in CONFIGS:
        recipe = build_recipe(name, base, Hparams(steps=STATE_STEPS), seed=0)
        meter = distributed.prepare_recipe(recipe, ctx)
        data = RandomWindows(corpus.train, 8, 16, seed=0, rank=ctx.rank, world_size=ctx.world_size)
        losses, steps = [], []
        for _ in range(STATE_STEPS):
            x, y = data.next()
            losses.append(float(recipe.train_step(x, y)))  # this rank's own loss: differs between ranks
            steps.append(meter.take_step())
        _save_state(out / f"state_{name}_rank{ctx.rank}.safetensors", recipe_state(recipe)[0])
        (out / f"comm_{name}_rank{ctx.rank}.json").write_text(json.dumps({
            "losses": losses, "steps": steps, "model": distributed.recipe_comm(recipe, ctx.world_size)}))


def _job_kernel_state(ctx, out: Path) -> None:
    """The gpu backend under data parallelism (Triton's CPU interpreter here): the linear layers' kernels, the
    exchange, the flip kernel; the ranks stay bit-identical."""
    from torch import nn

    from trueternary import FlipOptimizer, ternarize
    from trueternary.distributed import attach
    from trueternary.layers import set_linear_kernel
    from trueternary.ops import triton_available

    if not triton_available():
        return
    from trueternary.ops.triton_utils import interpreter_ready

    if not interpreter_ready():
        return
    torch.manual_seed(0)
    model = ternarize(nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)),
                      group_size=16)
    opt = FlipOptimizer(model, lr=4.0, seed=3, norm_block=16, accum_threshold=4)
    opt.backend = "gpu"  # the constructor wants CUDA for 'gpu'; on the CPU the kernels run interpreted
    set_linear_kernel(model, "triton")
    attach(opt, ctx)
    gen = torch.Generator().manual_seed(200)
    for _ in range(3):
        idx = torch.randint(0, 40, (16,), generator=gen)[ctx.rank::ctx.world_size]
        y = model(idx)
        assert y.grad_fn.impl is not None  # the kernel path ran
        torch.nn.functional.mse_loss(y, torch.sin(idx[:, None] * torch.arange(16) / 7)).backward()
        opt.step()
    tensors = {f"{n}.{b}": getattr(w, b) for n, w in ((str(i), model[i].weight) for i in (0, 1, 3))
               for b in ("T_packed", "E", "E_accum", "T_accum")}
    _save_state(out / f"state_kernels_rank{ctx.rank}.safetensors", tensors)
    (out / f"comm_kernels_rank{ctx.rank}.json").write_text(json.dumps({"flips": int(opt.last_flips),
                                                                       "backend": type(opt._votes).__name__}))


def _job_train_runs(out: Path, world: int) -> None:
    """``train()`` itself (through the command line): the learning run (c), checkpoint moves (d), measured bytes."""
    from trueternary.cli import main

    def run(**kw) -> None:
        assert main(["train", *_train_args(out, **kw)]) == 0

    run(run_name=f"learn{world}", **LEARN)
    if world == 4:  # 8 steps with a checkpoint at 4, which 2 ranks and 1 process continue
        run(run_name="four", max_steps=8, save_every=4, keep_checkpoints=4)
        return
    for name in ("TrueTernary", "Adam_FP32", "TrueTernary_Hybrid"):  # (and the profile of every rank's step)
        run(run_name=f"bytes_{name}", config=name, max_steps=4, ddp_grad_dtype="fp32", profile_steps=2)
    run(run_name="bytes_TrueTernary_bf16", config="TrueTernary", max_steps=4, ddp_grad_dtype="bf16")
    run(run_name="straight2", max_steps=8, eval_every=2)  # same world size: resume bit-identity
    run(run_name="split2", max_steps=8, eval_every=2, stop_at=4)
    run(run_name="split2", max_steps=8, eval_every=2, resume="auto")
    run(run_name="two_to_one", max_steps=8, stop_at=4)  # the parent resumes it in one process
    run(run_name="one_to_two", max_steps=8, resume="auto")  # the parent started it in one process
    four = ckpt_io.checkpoint_path(out / "runs" / "four", 4)
    run(run_name="four_to_two", max_steps=8, resume=str(four))


def _worker_jobs(out: Path, world: int) -> None:
    """This rank's jobs (the process group is torchrun's or the spawner's)."""
    from trueternary import distributed

    torch.set_num_threads(1)
    ctx = distributed.setup("cpu", timeout=timedelta(seconds=180))  # a hang fails the test instead of CI
    try:
        _job_exact(ctx, out)
        _job_overlap(ctx, out)
        if world == 2:
            _job_lockstep(ctx, out)
            _job_library_states(ctx, out)
            _job_kernel_state(ctx, out)
        _job_train_runs(out, world)
    finally:
        ctx.close()


def _spawned(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(_rank_env(rank, world, port))
    _worker_jobs(Path(out), world)


def _two_nodes(out: Path, nproc_per_node: int = 2, script_args: tuple[str, ...] = ()) -> None:
    """torchrun as on two nodes (here both on localhost): two agents meet at a c10d rendezvous; each starts
    ``nproc_per_node`` workers running this file's ``--worker``. Each agent's output goes to agent<i>.log."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc_per_node),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"tt-{port}",
           "--max_restarts", "0", __file__, "--worker", str(out), *script_args]
    logs = [open(out / f"agent{i}.log", "w") for i in range(2)]
    try:
        agents = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
        codes = [a.wait(timeout=600) for a in agents]
    finally:
        for log in logs:
            log.close()
    assert codes == [0, 0], "".join((out / f"agent{i}.log").read_text()[-3000:] for i in range(2))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """4 ranks over two simulated nodes; their output folder (the 2-rank jobs resume one of its checkpoints)."""
    out = tmp_path_factory.mktemp("dist4")
    write_corpus(out / "corpus.txt")
    _two_nodes(out)
    return out


@pytest.fixture(scope="module")
def two_ranks(four_ranks):
    """Every 2-rank job, run once in two spawned processes, in the 4-rank folder (the runs are named apart)."""
    import torch.multiprocessing as mp

    out = four_ranks
    # the one-process half of the 1 -> 2 checkpoint move
    first = train(TrainConfig(**dict(_tiny_kw(out), run_name="one_to_two", max_steps=8, stop_at=4)))
    assert first["end_step"] == 4
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TRITON_INTERPRET")}
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before torch starts
    # the ranks' Triton kernels run in the CPU interpreter (read when triton is first imported there); the
    # CPU backends ('auto' is dense-fallback without CUDA) never call the kernels, so the other jobs are unaffected
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mp.spawn(_spawned, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


# ------------------------------------------------------------------------------------ (a) one process's votes
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_vote_as_one_process(two_ranks, world):
    """Fed gradients whose sum over the ranks is exact, the ranks end every step in one process's integer state
    (trits, scales, accumulators, biases, moving-average codes), under every rule, and agree with each other."""
    for rank in range(world):
        res = json.loads((two_ranks / f"exact_w{world}_rank{rank}.json").read_text())
        assert set(res) == set(EXACT_RULES)
        for name, r in res.items():
            assert r["identical"] == [True] * 4, (world, rank, name)
            assert r["moved"] and r["replicas_differ"] == [] and r["buckets"] >= 3, (world, rank, name)


# ------------------------------------------------------------------------------------ (b) identical state
@pytest.mark.parametrize("name", CONFIGS)
def test_ranks_hold_bit_identical_state(two_ranks, name):
    """Every tensor of the training state (ternary buffers, integer biases, float weights, AdamW moments) is
    byte-identical on both ranks after STATE_STEPS steps on different shares of the batch, and training moved it."""
    a = _load(two_ranks / f"state_{name}_rank0.safetensors")
    b = _load(two_ranks / f"state_{name}_rank1.safetensors")
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    if name.startswith("TrueTernary"):
        kinds = {k.rsplit(".", 1)[-1] for k in a}
        assert {"T_packed", "T_accum", "E", "E_accum"} <= kinds
        assert any(a[k].count_nonzero() for k in a if k.endswith("T_accum")), "no votes were cast"
    c0 = json.loads((two_ranks / f"comm_{name}_rank0.json").read_text())
    c1 = json.loads((two_ranks / f"comm_{name}_rank1.json").read_text())
    assert c0["losses"] != c1["losses"], "the ranks must see different data for this test to mean anything"
    if name == "Adam_FP32":
        assert any(k.endswith("exp_avg_sq") for k in a)


def test_ranks_stay_identical_with_the_gpu_kernels(two_ranks):
    """The gpu backend under data parallelism (kernels interpreted on the CPU): both ranks hold the same trits,
    scales and accumulators."""
    if not (two_ranks / "state_kernels_rank0.safetensors").exists():
        pytest.skip("Triton (with its CPU interpreter) is not available")
    a = _load(two_ranks / "state_kernels_rank0.safetensors")
    b = _load(two_ranks / "state_kernels_rank1.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 12
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c0 = json.loads((two_ranks / "comm_kernels_rank0.json").read_text())
    assert c0["backend"] == "ExchangedKernelVotes"
    assert any(a[k].count_nonzero() for k in a if k.endswith("T_accum")) or c0["flips"] > 0


# ------------------------------------------------------------------------------------ (e) overlap, lock-step
@pytest.mark.parametrize("world", [2, 4])
def test_exchange_overlaps_backward_without_host_reads(two_ranks, world):
    """Each layer's bucket leaves as soon as backward has written it: by the time backward reaches the first
    layer, the 6 buckets of the later layers are on their way; and a step reads no tensor on the host."""
    for rank in range(world):
        r = json.loads((two_ranks / f"overlap_w{world}_rank{rank}.json").read_text())
        assert r["sent_before_first_layer"] == [0, 6, 6, 6], r  # step 0 plans the buckets in step()
        assert r["last_step"]["buckets"] == 7 and r["last_step"]["sent_in_backward"] == 7
        assert r["host_reads"] is None, r["host_reads"]


def test_ranks_stop_together(two_ranks):
    r0 = json.loads((two_ranks / "lockstep_rank0.json").read_text())
    r1 = json.loads((two_ranks / "lockstep_rank1.json").read_text())
    assert r0["agree"] == "rank 1: bad thing on rank 1" and r1["agree"] == "bad thing on rank 1"
    assert r0["sync"] == r1["sync"] == [2.5, True]  # mean loss over ranks, one verdict for all
    assert r0["sync_ok"] == [2.5, False]
    assert r0["replicas_same"] == r1["replicas_same"] == []
    assert r0["replicas_differ"] == r1["replicas_differ"] == ["b"]


# ------------------------------------------------------------------------------------ bytes: model vs counted
@pytest.mark.parametrize("name", CONFIGS)
def test_counted_bytes_equal_the_model(two_ranks, name):
    """Bytes counted at every collective (the ternary exchange, DDP buckets, the step sync) equal the model."""
    c = json.loads((two_ranks / f"comm_{name}_rank0.json").read_text())
    assert [s["comm_bytes"] for s in c["steps"]] == [c["model"]["sent"]] * STATE_STEPS
    assert [s["comm_ternary_bytes"] for s in c["steps"]] == [c["model"]["ternary_bytes"]] * STATE_STEPS
    assert (c["model"]["ternary_bytes"] > 0) == name.startswith("TrueTernary")


def test_train_logs_measured_bytes(two_ranks):
    """metrics.jsonl of a 2-rank `train` carries the bytes each rank sent per step; they equal the model in
    config.json. Per weight, each of 2 ranks sends half its fp32 gradients and half its votes: about 2.5 bytes,
    against fp32 DDP's 4; bf16 gradients: about 1.5."""
    per_weight = {}
    for run in ("bytes_TrueTernary", "bytes_Adam_FP32", "bytes_TrueTernary_Hybrid", "bytes_TrueTernary_bf16"):
        rows = [r for r in read_metrics(two_ranks / "runs" / run) if "loss" in r]
        cfg = json.loads((two_ranks / "runs" / run / "config.json").read_text())
        model = cfg["distributed"]["comm_model"]
        assert cfg["distributed"]["world_size"] == 2 and cfg["distributed"]["batch_per_rank"] == 4
        assert {r["comm_bytes"] for r in rows} == {model["sent"]}, run
        per_weight[run] = model["per_weight_mean"]
    assert per_weight["bytes_Adam_FP32"] == pytest.approx(4.0, abs=0.01)
    assert 2.5 < per_weight["bytes_TrueTernary"] < 3.0  # (+ padding of the tiny model's few shares)
    assert 1.5 < per_weight["bytes_TrueTernary_bf16"] < 2.0


@pytest.mark.parametrize("config", ["TrueTernary", "Adam_FP32"])
def test_profile_shows_where_each_ranks_step_goes(two_ranks, config):
    """--profile_steps 2 on 2 ranks: rank 0 writes every rank's phases (ms per step) and its own trace; the phases
    (the exchange's for a ternary config, DDP's for a float one) fit in the step's time."""
    run = two_ranks / "runs" / f"bytes_{config}"
    prof = json.loads((run / "profile.json").read_text())
    assert prof["world_size"] == 2 and len(prof["ranks"]) == 2 and (run / "profile_trace.json").stat().st_size
    want = {"forward", "backward", "optimizer step", "step sync", "other"}
    want |= ({"write gradients", "send gradients", "wait for gradients", "votes", "send votes", "add votes", "flips"}
             if config == "TrueTernary" else {"DDP all-reduce"})
    for r in prof["ranks"]:
        assert r["steps"] == [3, 4] and want <= set(r["phases"]), set(r["phases"])
        top = sum(r["phases"][k]["host_ms"] for k in ("forward", "backward", "optimizer step", "step sync"))
        assert 0 < top <= r["step_ms"] * 1.05


# ------------------------------------------------------------------------------------ (c) learning
def test_one_two_and_four_ranks_learn_alike(two_ranks, tmp_path):
    """Same global batches (16 windows a step), 100 steps: the validation bpb of 2 and 4 ranks within
    LEARN_TOLERANCE_BPB of one process's, all far below the untrained 8.17 bits/byte."""
    one = train(tiny_config(tmp_path, run_name="learn1", data=str(two_ranks / "corpus.txt"), **LEARN))
    for world in (2, 4):
        run = two_ranks / "runs" / f"learn{world}"
        evals = [r["val_bpb"] for r in read_metrics(run) if "val_bpb" in r]
        assert evals[0] == pytest.approx(one["initial_val_bpb"])  # same model, same held-out text
        assert one["val_bpb"] < one["initial_val_bpb"] - LEARNED_BITS and evals[-1] < evals[0] - LEARNED_BITS
        assert abs(evals[-1] - one["val_bpb"]) < LEARN_TOLERANCE_BPB, (world, one["val_bpb"], evals[-1])


# ------------------------------------------------------------------------------------ (d) checkpoints
def _tensors(run_dir: Path, step: int | None = None) -> dict:
    path = ckpt_io.checkpoint_path(run_dir, step) if step else ckpt_io.latest_checkpoint(run_dir)
    return ckpt_io.load_checkpoint(path).tensors


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir)]


def _agreement(a: dict, b: dict) -> float:
    """The fraction of integer state elements (accumulators, trits, scales) two checkpoints share."""
    keys = [k for k in a if not a[k].is_floating_point()]
    same = sum(int((a[k] == b[k]).sum()) for k in keys)
    return same / sum(a[k].numel() for k in keys)


def test_same_world_size_resume_is_bit_identical(two_ranks):
    """2 ranks: 8 steps straight == 4 steps, save, resume on 2 ranks, 4 more."""
    runs = two_ranks / "runs"
    a, b = _tensors(runs / "straight2"), _tensors(runs / "split2")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _rows(runs / "straight2") == _rows(runs / "split2")
    meta = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(runs / "split2")).meta
    assert meta["data"]["world_size"] == 2 and "positions" not in meta["data"]


def test_four_rank_checkpoint_continues_on_two_ranks_and_one(two_ranks):
    """A checkpoint written by 4 ranks at step 4 resumes on 2 ranks and in one process, on the same batches:
    at step 8 all three runs hold (up to the float rounding of the gradient sums) the same state."""
    runs = two_ranks / "runs"
    res = train(TrainConfig(**dict(_tiny_kw(two_ranks), run_name="four_to_one", max_steps=8,
                                   resume=str(ckpt_io.checkpoint_path(runs / "four", 4)))))
    assert res["start_step"] == 4 and len(res["losses"]) == 4
    four, two, one = (_tensors(runs / r, 8) for r in ("four", "four_to_two", "four_to_one"))
    assert sorted(four) == sorted(two) == sorted(one)
    assert _agreement(four, two) > 0.999 and _agreement(four, one) > 0.999
    losses = {r: [x["loss"] for x in read_metrics(runs / r) if "loss" in x][-4:] for r in ("four", "four_to_two")}
    assert losses["four_to_two"] == pytest.approx(losses["four"], rel=1e-3)
    assert res["losses"] == pytest.approx(losses["four"], rel=1e-3)


def test_two_rank_checkpoint_continues_in_one_process(two_ranks, capsys):
    runs = two_ranks / "runs"
    at4 = _tensors(runs / "two_to_one", 4)
    res = train(TrainConfig(**dict(_tiny_kw(two_ranks), run_name="two_to_one", max_steps=8, resume="auto")))
    assert res["start_step"] == 4 and res["end_step"] == 8 and len(res["losses"]) == 4
    assert "note:" not in capsys.readouterr().out  # the same batches: nothing to warn about
    at8 = _tensors(runs / "two_to_one", 8)
    assert any(not torch.equal(at4[k], at8[k]) for k in at4 if k.endswith("T_accum"))  # it kept training
    assert _agreement(at8, _tensors(runs / "straight2", 8)) > 0.999  # as if 2 ranks had gone on


def test_one_process_checkpoint_continues_on_two_ranks(two_ranks):
    run = two_ranks / "runs" / "one_to_two"
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert "comm_bytes" not in rows[3] and "comm_bytes" in rows[4]  # steps 5-8 ran on 2 ranks
    meta = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run)).meta
    assert meta["step"] == 8 and meta["data"]["world_size"] == 2


def test_ranks_share_the_global_batches():
    """Each step, the shares of N ranks, in rank order, are one process's batch (so are the data positions)."""
    from trueternary.data import RandomWindows

    data = torch.arange(1000, dtype=torch.uint8).repeat(3)
    one = RandomWindows(data, 8, 16, seed=3)
    ranks = [RandomWindows(data, 8, 16, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        x, y = one.next()
        shares = [w.next() for w in ranks]
        assert torch.equal(torch.cat([s[0] for s in shares]), x) and torch.equal(torch.cat([s[1] for s in shares]), y)
    assert all(w.state_dict() == one.state_dict() for w in ranks) and ranks[0].share == 2


# ------------------------------------------------------------------------------------ world size 1
def _with_rank_env(monkeypatch, world: int, rank: int = 0, port: int | None = None) -> None:
    for k, v in _rank_env(rank, world, port or _free_port()).items():
        if k != "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)


@pytest.mark.parametrize("config", ["TrueTernary", "Adam_FP32", "TrueTernary_Hybrid"])
def test_world_size_one_is_bit_identical_to_plain_training(tmp_path, monkeypatch, config):
    """gloo with one process: comm attached, DDP wrapping float parameters, the per-step sync; every
    checkpoint tensor, loss and metrics row (but the comm_* columns) equals plain training's."""
    plain = train(tiny_config(tmp_path, config=config, run_name="plain", max_steps=6, eval_every=3))
    _with_rank_env(monkeypatch, world=1)
    dist = train(tiny_config(tmp_path, config=config, run_name="dist", max_steps=6, eval_every=3))
    assert not torch.distributed.is_initialized()  # train() created the group and destroyed it
    assert dist["world_size"] == 1 and dist["comm_model"] is not None
    assert plain["losses"] == dist["losses"] and plain["val_bpb"] == dist["val_bpb"]
    a, b = _tensors(tmp_path / "runs" / "plain"), _tensors(tmp_path / "runs" / "dist")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("comm_")} for r in rows]  # noqa: E731
    dist_rows = _rows(tmp_path / "runs" / "dist")
    assert strip(_rows(tmp_path / "runs" / "plain")) == strip(dist_rows)
    model = json.loads((tmp_path / "runs" / "dist" / "config.json").read_text())["distributed"]["comm_model"]
    assert {r["comm_bytes"] for r in dist_rows if "loss" in r} == {model["sent"]} == {0}  # one rank sends nothing


# ------------------------------------------------------------------------------------ bad flags
def _cli(args: list[str]) -> int:
    from trueternary.cli import main

    return main(args)


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch, capsys):
    _with_rank_env(monkeypatch, world=3)
    corpus = write_corpus(tmp_path / "c.txt")
    args = ["train", "--data", str(corpus), "--batch_size", "4", "--out_dir", str(tmp_path / "runs"), "--d_model",
            "32", "--n_layers", "1", "--ctx", "16"]
    assert _cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--batch_size 4 is the global batch and must be divisible by the 3" in err
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("RANK", "1")  # another rank: the same verdict, also one line (before any rendezvous)
    assert _cli(args) == 2
    assert capsys.readouterr().err.strip().startswith("trueternary: error: --batch_size 4")


@pytest.mark.parametrize("env, flags, message", [
    ({"MASTER_ADDR": None}, [], "needs MASTER_ADDR in the environment; launch with torchrun"),
    ({"RANK": "5"}, [], "RANK=5 is outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, [], "WORLD_SIZE='two' is not an integer"),
    ({"RANK": "first"}, [], "RANK='first' is not an integer"),
    ({"TRUETERNARY_DIST_BACKEND": "mpi"}, [], "TRUETERNARY_DIST_BACKEND must be 'gloo' or 'nccl'"),
    ({"TRUETERNARY_DIST_BACKEND": "nccl"}, [], "the NCCL backend needs CUDA tensors"),
    ({}, ["--ddp_grad_dtype", "fp8"], "--ddp_grad_dtype must be one of fp32, bf16"),
    ({}, ["--comm_report", "0"], "--comm_report takes world sizes like 2,8,64"),
], ids=["no-master-addr", "rank-outside-world", "bad-world-size", "bad-rank", "unknown-backend", "nccl-on-cpu",
        "bad-grad-dtype", "bad-comm-report"])
def test_bad_distributed_setups_are_one_line_errors(tmp_path, monkeypatch, capsys, env, flags, message):
    _with_rank_env(monkeypatch, world=2)
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    corpus = write_corpus(tmp_path / "c.txt")
    assert _cli(["train", "--data", str(corpus), "--out_dir", str(tmp_path / "runs"), "--d_model", "32",
                 "--n_layers", "1", "--ctx", "16", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("trueternary: error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_comm_report_table(capsys):
    """`train --comm_report` prints the model for every config at each world size (no training, no group):
    ternary configs send their gradients and votes, below AdamW's fp32 all-reduce at every size."""
    assert _cli(["train", "--d_model", "128", "--n_layers", "1", "--n_heads", "2", "--comm_report", "2,16"]) == 0
    out = capsys.readouterr().out
    sections = out.split("world size ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == ["2", "16"]
    rows = [{ln[:33].strip(): ln[33:].split() for ln in s.splitlines()[2:] if ln.strip()} for s in sections]
    assert " ".join(rows[0]["TrueTernary"][:5]) == "fp32 gradients + int8 votes"
    assert " ".join(rows[0]["Adam_FP32 (bf16)"][:3]) == "bf16 grads (DDP)"
    for r in rows:
        vs_adam = {k: float(v[-1].rstrip("x")) for k, v in r.items()}
        assert vs_adam["Adam_FP32"] == 1.0 and vs_adam["TrueTernary"] < 0.75 and vs_adam["TrueTernary (bf16)"] < 0.45


# ------------------------------------------------------------------------------------ measurement helper
def _measure(seeds) -> None:  # pragma: no cover - run by hand, see the module docstring
    """Print val bpb of 1, 2 and 4 ranks (same global batches) per seed: the basis of LEARN_TOLERANCE_BPB."""
    import tempfile

    for seed in seeds:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            write_corpus(d / "corpus.txt")
            one = train(TrainConfig(**dict(_tiny_kw(d), run_name="learn1", seed=seed, **LEARN)))
            _two_nodes(d, 1, ("--learn-only", str(seed)))
            _two_nodes(d, 2, ("--learn-only", str(seed)))
            two, four = ([r["val_bpb"] for r in read_metrics(d / "runs" / f"learn{w}") if "val_bpb" in r][-1]
                         for w in (2, 4))
            sha = [ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(d / "runs" / f"learn{w}")).meta["tensor_sha256"]
                   for w in (1, 2, 4)]
            print(f"seed {seed}: 1 rank {one['val_bpb']:.4f}  2 ranks {two:.4f} ({two - one['val_bpb']:+.4f})  "
                  f"4 ranks {four:.4f} ({four - one['val_bpb']:+.4f}); final checkpoints "
                  f"{'bit-identical' if len(set(sha)) == 1 else 'differ'} ({', '.join(h[:8] for h in sha)})",
                  file=sys.stderr, flush=True)


def _learn_only(out: Path, seed: int) -> None:  # pragma: no cover - _measure's workers
    from trueternary.cli import main

    world = int(os.environ["WORLD_SIZE"])
    assert main(["train", *_train_args(out, run_name=f"learn{world}", seed=seed, **LEARN)]) == 0


if __name__ == "__main__":
    # python tests/test_distributed.py --measure [SEEDS e.g. 0-4]; --worker OUT [--learn-only SEED]: under torchrun
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        if len(sys.argv) >= 5 and sys.argv[3] == "--learn-only":
            _learn_only(Path(sys.argv[2]), int(sys.argv[4]))
        else:
            _worker_jobs(Path(sys.argv[2]), int(os.environ["WORLD_SIZE"]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--measure":
        lo, _, hi = (sys.argv[2] if len(sys.argv) > 2 else "0-4").partition("-")
        _measure(range(int(lo), int(hi or lo) + 1))
