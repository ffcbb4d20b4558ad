"""MORPH's Triton kernels (gather-add, graph aggregation, MoE combine) against their naive references.

On CPU the kernels run under the Triton interpreter. ``TRITON_INTERPRET`` is read when a kernel is
*decorated* (module import) and again when it is *launched*, so it is set below before Triton is
imported (the suite's convention, as in test_kernels_flip.py; it stays set for the process). These
kernels use only Triton builtins (no ``tl.sum``/``tl.zeros``, which are decorated when Triton is first
imported), so they also work when another module imported Triton first: the fixture then only has
to re-import (reload) a kernel module that was decorated before the flag was set. On a CUDA machine
the same tests run the compiled kernels on the GPU.

Tolerance: float32 outputs and gradients within atol=rtol=1e-5 of the reference (only the order of
additions differs); every kernel is checked bit-identical across two runs (deterministic, no atomics).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `import triton`: see the module docstring

pytest.importorskip("triton")

from trueternary.ops.gather_add import gather_add, select_backend  # noqa: E402
from trueternary.ops.graph_aggregate import CSRGraph, graph_aggregate  # noqa: E402
from trueternary.ops.moe_combine import moe_combine  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
KERNEL_MODULES = ("trueternary.ops.gather_add.triton", "trueternary.ops.graph_aggregate.triton",
                  "trueternary.ops.moe_combine.triton")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """Make sure this module's kernels are decorated for the mode in force (interpreter on CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")  # also at launch time; normally already set above
        from triton.runtime.interpreter import InterpretedFunction

        for name in KERNEL_MODULES:
            mod = importlib.import_module(name)
            jitted = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
            if any(isinstance(k, InterpretedFunction) == CUDA for k in jitted):
                importlib.reload(mod)
        yield


def _run(fn, inputs, grad_idx, backend, g=None):
    xs = [t.detach().clone().requires_grad_(i in grad_idx) if t.is_floating_point() else t
          for i, t in enumerate(inputs)]
    out = fn(*xs, backend=backend)
    g = torch.randn_like(out) if g is None else g
    out.backward(g)
    return out.detach(), [xs[i].grad for i in grad_idx], g


def _compare(fn, inputs, grad_idx):
    ref, ref_grads, g = _run(fn, inputs, grad_idx, "naive")
    out, grads, _ = _run(fn, inputs, grad_idx, "triton", g)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)
    out2, grads2, _ = _run(fn, inputs, grad_idx, "triton", g)  # deterministic: bit-identical rerun
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


# ---------------------------------------------------------------------- gather-add
@pytest.mark.parametrize("N,R,D", [(1, 1, 1), (13, 5, 37), (64, 7, 300)], ids=["one", "ragged", "wide-two-blocks"])
def test_gather_add_matches_reference(N, R, D):
    gen = torch.Generator().manual_seed(N * 1000 + D)
    a = torch.randn(N, D, generator=gen).to(DEVICE)
    table = torch.randn(R, D, generator=gen).to(DEVICE)
    idx = torch.randint(0, R, (N,), generator=gen).to(DEVICE)
    _compare(gather_add, (a, table, idx), [0, 1])


def test_gather_add_unused_rows_get_zero_gradient():
    a = torch.randn(6, 8, device=DEVICE)
    table = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    idx = torch.tensor([0, 0, 2, 2, 2, 4], device=DEVICE)
    gather_add(a, table, idx, backend="triton").sum().backward()
    assert torch.equal(table.grad[[1, 3]].cpu(), torch.zeros(2, 8))
    torch.testing.assert_close(table.grad[2].cpu(), torch.full((8,), 3.0))


def test_gather_add_mixed_dtypes_promote():
    a = torch.randn(9, 16, device=DEVICE).to(torch.bfloat16)
    table = torch.randn(3, 16, device=DEVICE)
    idx = torch.randint(0, 3, (9,), device=DEVICE)
    out = gather_add(a, table, idx, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.float() + table[idx], **TOL)


@pytest.mark.parametrize("bad", ["a-1d", "dim-mismatch", "float-index", "index-shape"])
def test_gather_add_rejects_bad_shapes(bad):
    a, table, idx = torch.randn(4, 3), torch.randn(2, 3), torch.zeros(4, dtype=torch.long)
    if bad == "a-1d":
        a = a[:, 0]
    elif bad == "dim-mismatch":
        table = torch.randn(2, 5)
    elif bad == "float-index":
        idx = idx.float()
    else:
        idx = idx[:2]
    with pytest.raises(ValueError):
        gather_add(a, table, idx)


def test_select_backend():
    x = torch.zeros(1)
    assert select_backend("auto", x) == "naive"  # CPU tensors never pick the GPU kernels by themselves
    assert select_backend("naive", x) == "naive"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select_backend("cuda-magic", x)


# ---------------------------------------------------------------------- graph aggregation
def _random_graph(N, E, gen):
    src = torch.randint(0, N, (E,), generator=gen)
    dst = torch.randint(0, N, (E,), generator=gen)
    g, _ = CSRGraph.from_edges(src.to(DEVICE), dst.to(DEVICE), N)
    return g


@pytest.mark.parametrize("N,E,H,Dh", [(1, 1, 1, 1), (11, 40, 3, 5), (17, 3, 2, 130), (9, 0, 2, 4)],
                         ids=["one-edge", "ragged-heads", "sparse-wide-head", "no-edges"])
def test_graph_aggregate_matches_reference(N, E, H, Dh):
    gen = torch.Generator().manual_seed(N + 7 * E)
    graph = _random_graph(N, E, gen)
    x = torch.randn(N, H * Dh, generator=gen).to(DEVICE)
    w = torch.randn(E, H, generator=gen).to(DEVICE)
    _compare(lambda x, w, backend: graph_aggregate(x, w, graph, backend), (x, w), [0, 1])


def test_graph_aggregate_hand_example():
    # 3 nodes, edges 0->1 (w 2), 1->1 (w -1), 0->2 (w 0.5); one head
    graph = CSRGraph.from_sorted_edges(torch.tensor([0, 1, 0]), torch.tensor([1, 1, 2]), 3)
    x = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    w = torch.tensor([[2.0], [-1.0], [0.5]])
    want = torch.tensor([[0.0, 0.0], [2 - 10.0, 4 - 20.0], [0.5, 1.0]])
    for backend in ("naive", "triton"):
        out = graph_aggregate(x.to(DEVICE), w.to(DEVICE), graph if DEVICE == "cpu" else _to(graph), backend)
        torch.testing.assert_close(out.cpu(), want)


def _to(graph):
    return CSRGraph.from_sorted_edges(graph.src.to(DEVICE), graph.dst.to(DEVICE), graph.num_nodes)


def test_csr_graph_validation():
    with pytest.raises(ValueError, match="sorted by dst"):
        CSRGraph.from_sorted_edges(torch.tensor([0, 1]), torch.tensor([1, 0]), 2)
    with pytest.raises(ValueError, match="out of range"):
        CSRGraph.from_sorted_edges(torch.tensor([0, 5]), torch.tensor([0, 1]), 2)
    g, perm = CSRGraph.from_edges(torch.tensor([2, 0, 1]), torch.tensor([1, 0, 1]), 3)
    assert g.dst.tolist() == [0, 1, 1] and g.src.tolist() == [0, 2, 1] and perm.tolist() == [1, 0, 2]
    assert g.indptr.tolist() == [0, 1, 3, 3]
    with pytest.raises(ValueError, match="divisible"):
        graph_aggregate(torch.randn(3, 5), torch.randn(3, 2), g)
    with pytest.raises(ValueError, match="edge weights"):
        graph_aggregate(torch.randn(3, 4), torch.randn(2, 2), g)


# ---------------------------------------------------------------------- MoE combine
@pytest.mark.parametrize("N,K,D,extra", [(1, 1, 1, 0), (9, 2, 19, 0), (5, 3, 260, 4)],
                         ids=["one", "ragged-top2", "top3-wide-unused-rows"])
def test_moe_combine_matches_reference(N, K, D, extra):
    gen = torch.Generator().manual_seed(N * K + D)
    M = N * K + extra  # rows no (token, choice) points at must get zero gradient
    pos = torch.randperm(M, generator=gen)[: N * K].view(N, K).to(DEVICE)
    Y = torch.randn(M, D, generator=gen).to(DEVICE)
    w = torch.rand(N, K, generator=gen).to(DEVICE)
    _compare(moe_combine, (Y, w, pos), [0, 1])


def test_moe_combine_rejects_bad_shapes():
    with pytest.raises(ValueError):
        moe_combine(torch.randn(4, 3), torch.rand(2, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        moe_combine(torch.randn(4, 3), torch.rand(2, 2), torch.zeros(2, 2))


# ---------------------------------------------------------------------- the kernels inside MORPH
def test_morph_triton_backend_matches_naive():
    """The whole model (ternarised) gives the same logits and the same votes with either kernel backend."""
    import copy

    from trueternary import FlipOptimizer, ternarize
    from trueternary.models import build_model

    base = build_model("morph", 3, ctx=12, d_model=16, n_layers=1, n_heads=2, n_codes=8, code_dim=8,
                       graph_window=3, graph_heads=2, n_experts=3, top_k=2)
    ternarize(base, 8)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("naive", "triton"):
        m = copy.deepcopy(base).to(DEVICE)
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = backend
        m.cfg = copy.copy(m.cfg)
        m.cfg.kernel_backend = backend
        opt = FlipOptimizer(m, seed=1)
        logits = m(idx.to(DEVICE))
        logits.float().square().mean().backward()
        results.append((logits.detach().cpu(), [w.T_accum.cpu().clone() for w in opt.modules_trained()
                                                if hasattr(w, "T_accum")]))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    # votes are integers from stochastic rounding: a last-bit gradient difference may move a vote by 1
    diffs = [(a.int() - b.int()).abs().max().item() for a, b in zip(results[0][1], results[1][1])]
    assert max(diffs) <= 1
    assert sum((a != b).sum().item() for a, b in zip(results[0][1], results[1][1])) <= 8


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_kernels_bf16_inputs_on_gpu():
    a = torch.randn(300, 96, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(40, 96, device="cuda")
    idx = torch.randint(0, 40, (300,), device="cuda")
    torch.testing.assert_close(gather_add(a, table, idx, "triton"), gather_add(a, table, idx, "naive"))
    Y = torch.randn(600, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(300, 2, device="cuda")
    pos = torch.randperm(600, device="cuda").view(300, 2)
    torch.testing.assert_close(moe_combine(Y, w, pos, "triton"), moe_combine(Y, w, pos, "naive"), atol=1e-2, rtol=1e-2)


def test_kernels_run_in_the_intended_mode():
    from triton.runtime.interpreter import InterpretedFunction

    from trueternary.ops.moe_combine import triton as moe_triton

    assert isinstance(moe_triton._combine_fwd_kernel, InterpretedFunction) == (not CUDA)
