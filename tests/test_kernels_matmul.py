"""Packed ternary matmul kernels (ops/ternary_matmul) vs the dense reference, and the kernel autograd Function.

Tolerances (relative L2 error ``|out - ref| / |ref|``): fp32 operands 1e-5 (summation order only); bf16
operands against the same bf16-rounded inputs 8e-3 (the bf16 output rounding, 2**-9, dominates); fp8
against its exact float32 model (naive.ternary_matmul_fp8_naive) 1e-5 for fp32 outputs. Outputs are
poisoned with NaN before the launch so unwritten elements fail. Runs on CUDA when present, else in the
Triton CPU interpreter (TRITON_INTERPRET=1 set before Triton is imported; subprocess fallback otherwise).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before `import triton`

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parent))

from _kernel_env import interpreter_fallback  # noqa: E402
from trueternary import packing  # noqa: E402
from trueternary.backends import LinearKernel  # noqa: E402
from trueternary.layers import IntegerBias, TernaryLinear, set_linear_kernel  # noqa: E402
from trueternary.ops.linear import ternary_linear, ternary_linear_kernel  # noqa: E402
from trueternary.ops.ternary_matmul import (  # noqa: E402
    resolve_impl,
    ternary_matmul,
    ternary_matmul_fp8_naive,
    ternary_matmul_naive,
)
from trueternary.ops.triton_utils import interpreter_ready  # noqa: E402
from trueternary.optim import FlipOptimizer  # noqa: E402
from trueternary.weight import TernaryScaleTensor  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or interpreter_ready()
SMALL = {"BLOCK_O": 16, "BLOCK_M": 16, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2}


_kernels_runnable, test_in_subprocess = interpreter_fallback(__file__, IN_PROCESS)


def kernels():
    from trueternary.ops.ternary_matmul import triton as kt

    return kt


def random_weight(rows, cols, group_size, e_low=-4, e_high=3, seed=0):
    w = TernaryScaleTensor(rows, cols, group_size, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    w.set_trits(torch.randint(-1, 2, (rows, cols), generator=g))
    w.E.copy_(torch.randint(e_low, e_high + 1, w.E.shape, generator=g, dtype=torch.int8))
    return w


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def test_trit_decode_every_byte_and_digit():
    """The in-register base-3 decode (multiply-shift) on all 243 bytes x 5 digits, via the dequant kernel."""
    w = TernaryScaleTensor(3, 405, 405, device=DEVICE)  # 1215 trits = bytes 0..242 once each
    w.T_packed.copy_(torch.arange(243, dtype=torch.uint8))
    w.E.zero_()
    W, _ = kernels().dequant_triton(w, torch.float32, out=nan_like((3, 405), torch.float32))
    assert torch.equal(W, packing.unpack_trits(w.T_packed, 1215).view(3, 405).float())


SHAPES = [(20, 37, 8), (33, 48, 16), (5, 7, 3), (16, 64, 64), (40, 50, 100)]  # cols % 5, % group, short group
SHAPE_IDS = [f"{r}x{c}-g{g}" for r, c, g in SHAPES]


@pytest.mark.parametrize("rows,cols,gs", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transpose_out", [False, True], ids=["W", "WT"])
def test_dequant_exact(rows, cols, gs, dtype, transpose_out):
    w = random_weight(rows, cols, gs, e_low=-127, e_high=127)  # full int8 range: 2**-127 is subnormal
    shape = (cols, rows) if transpose_out else (rows, cols)
    W, e_ref = kernels().dequant_triton(w, dtype, transpose_out=transpose_out, out=nan_like(shape, dtype))
    ref = w.dense(dtype)
    assert e_ref is None
    assert torch.equal(W, ref.t() if transpose_out else ref)


@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "bwd-input"])
def test_dequant_fp8_weight(transposed):
    from trueternary.ops.ternary_matmul.naive import fp8_weight_naive

    w = random_weight(20, 37, 8, e_low=-14, e_high=2)  # spreads beyond 2**-9: some groups underflow to 0
    Wq, e_ref = kernels().dequant_triton(w, torch.float8_e4m3fn, fp8_transposed=transposed)
    ref_Wq, ref_e = fp8_weight_naive(w, transposed)
    assert torch.equal(e_ref, ref_e)
    assert torch.equal(Wq.float(), ref_Wq)
    assert (ref_Wq == 0).sum() > (w.trits() == 0).sum()  # the underflow case is exercised


CASES = [  # (rows, cols, group_size, M, config)
    (20, 37, 8, 9, SMALL),
    (33, 48, 16, 17, dict(SMALL, BLOCK_O=32, BLOCK_R=32)),
    (40, 50, 100, 3, SMALL),
    (16, 64, 32, 16, dict(SMALL, BLOCK_R=32)),  # SCALE_1D forward (32 % BLOCK_R == 0) and backward
    (5, 7, 3, 1, SMALL),
]
CASE_IDS = [f"{r}x{c}-g{g}-M{m}-o{cfg['BLOCK_O']}r{cfg['BLOCK_R']}" for r, c, g, m, cfg in CASES]


@pytest.mark.parametrize("rows,cols,gs,M,cfg", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "bwd-input"])
def test_fused_matmul_fp32(rows, cols, gs, M, cfg, transposed):
    w = random_weight(rows, cols, gs)
    x = torch.randn(M, rows if transposed else cols, device=DEVICE)
    out = kernels().ternary_matmul_triton(x, w, transposed, config=cfg,
                                          out=nan_like((M, cols if transposed else rows), torch.float32))
    assert rel_err(out, ternary_matmul_naive(x, w, transposed)) < 1e-5


@pytest.mark.parametrize("rows,cols,gs,M,cfg", CASES[:3], ids=CASE_IDS[:3])
@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "bwd-input"])
def test_fused_matmul_bf16(rows, cols, gs, M, cfg, transposed):
    w = random_weight(rows, cols, gs)
    x = torch.randn(M, rows if transposed else cols, device=DEVICE).bfloat16()
    out = kernels().ternary_matmul_triton(x, w, transposed, config=cfg,
                                          out=nan_like((M, cols if transposed else rows), torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ternary_matmul_naive(x.float(), w, transposed)) < 8e-3


def test_fused_matmul_strided_input_and_output():
    w = random_weight(24, 40, 8)
    x = torch.randn(40, 11, device=DEVICE).t()  # (11, 40), strides (1, 11)
    out = nan_like((24, 11), torch.float32).t()  # (11, 24), strides (1, 11)
    kernels().ternary_matmul_triton(x, w, config=SMALL, out=out)
    assert rel_err(out, ternary_matmul_naive(x, w)) < 1e-5


@pytest.mark.parametrize("rows,cols,gs,M,cfg", CASES[:4], ids=CASE_IDS[:4])
@pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "bwd-input"])
def test_fused_matmul_fp8_matches_its_model(rows, cols, gs, M, cfg, transposed):
    w = random_weight(rows, cols, gs, e_low=-13, e_high=1)  # some groups 2**-10 below their E_ref: dropped
    x = torch.randn(M, rows if transposed else cols, device=DEVICE) * 3
    x[0] = 0.0  # an all-zero token (scale 1)
    cfg = dict(cfg, BLOCK_R=max(32, cfg["BLOCK_R"]))  # fp8 dots reduce over >= 32 (Hopper)
    out = kernels().ternary_matmul_triton(x, w, transposed, fp8=True, config=cfg,
                                          out=nan_like((M, cols if transposed else rows), torch.float32))
    model = ternary_matmul_fp8_naive(x, w, transposed)
    assert torch.isfinite(out).all()
    assert rel_err(out, model) < 1e-5
    assert (out[0] == 0).all()


def test_fp8_accuracy_vs_bf16_is_bounded():
    """fp8 activations (3 mantissa bits, per-token scale) cost a few percent relative error at most."""
    w = random_weight(64, 96, 32, e_low=-2, e_high=0)
    x = torch.randn(32, 96, device=DEVICE)
    exact = ternary_matmul_naive(x, w)
    err8 = rel_err(kernels().ternary_matmul_triton(x, w, fp8=True, config=dict(SMALL, BLOCK_R=32)), exact)
    err16 = rel_err(kernels().ternary_matmul_triton(x.bfloat16(), w, config=SMALL), exact)
    assert err16 < 8e-3 and 5e-3 < err8 < 0.05


def test_empty_batch_and_shape_checks():
    w = random_weight(8, 12, 4)
    assert kernels().ternary_matmul_triton(torch.zeros(0, 12, device=DEVICE), w).shape == (0, 8)
    with pytest.raises(AssertionError, match="expected x of shape"):
        kernels().ternary_matmul_triton(torch.zeros(3, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match="unknown matmul impl"):
        ternary_matmul(torch.zeros(3, 12, device=DEVICE), w, impl="cublas")
    # auto: the kernels wherever they can run (CUDA, or the interpreter in these tests), else the dense path
    assert resolve_impl("auto", torch.zeros(3, 12, device=DEVICE)) == "fused"
    assert resolve_impl("auto", torch.zeros(4096, 12, device=DEVICE)) == "dequant"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        assert resolve_impl("auto", torch.zeros(3, 12)) == "naive"  # plain CPU tensors


def test_int32_offset_guard():
    from trueternary.ops.triton_utils import check_kernel_offsets

    check_kernel_offsets(torch.empty_strided((3, 4), (2**29, 1), device="meta"))  # spans 2**30 + 4: fine
    with pytest.raises(ValueError, match="int32"):
        check_kernel_offsets(torch.empty_strided((3, 4), (2**30, 1), device="meta"))


@pytest.mark.parametrize("impl", ["fused", "dequant"])
def test_dispatcher_impls_agree(impl):
    w = random_weight(20, 37, 8)
    x = torch.randn(9, 37, device=DEVICE)
    assert rel_err(ternary_matmul(x, w, impl=impl), ternary_matmul_naive(x, w)) < 1e-5
    gy = torch.randn(9, 20, device=DEVICE)
    assert rel_err(ternary_matmul(gy, w, transposed=True, impl=impl), ternary_matmul_naive(gy, w, True)) < 1e-5


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_kernel_linear_function_matches_reference_function(bias):
    """The linear op on the fused kernels (ternary_linear_kernel) vs its dense reference, both voting through
    a dense-fallback FlipOptimizer: same outputs, input gradients and integer state (integer inputs: exact)."""
    w_ref = random_weight(12, 20, 8, e_low=-1, e_high=1)
    w_ker = copy.deepcopy(w_ref)
    b_ref = IntegerBias(12, device=DEVICE) if bias else None
    b_ker = copy.deepcopy(b_ref) if bias else None
    mods_ref = [w_ref] + ([b_ref] if bias else [])
    mods_ker = [w_ker] + ([b_ker] if bias else [])
    opt_ref = FlipOptimizer(mods_ref, backend="dense-fallback", seed=3)
    opt_ker = FlipOptimizer(mods_ker, backend="dense-fallback", seed=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randint(-2, 3, (2, 3, 20), generator=g).float().to(DEVICE)
        c = torch.randint(-2, 3, (2, 3, 12), generator=g).float().to(DEVICE)
        xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr = ternary_linear(xr, w_ref, b_ref)
        yk = ternary_linear_kernel(xk, w_ker, b_ker, impl="fused")
        assert yk.shape == yr.shape and yk.grad_fn.impl == "fused" and yr.grad_fn.impl is None
        assert torch.equal(yk, yr)
        (yr * c).sum().backward()
        (yk * c).sum().backward()
        assert torch.equal(xk.grad, xr.grad)
        opt_ref.step()
        opt_ker.step()
        for name in ("T_packed", "T_accum", "E", "E_accum"):
            assert torch.equal(getattr(w_ker, name), getattr(w_ref, name)), name
        if bias:
            assert torch.equal(b_ker.q, b_ref.q)


def test_kernel_linear_function_input_checks():
    w = random_weight(4, 6, 2)
    with pytest.raises(ValueError, match="does not end in the layer's 6 input features"):
        ternary_linear_kernel(torch.zeros(3, 5, device=DEVICE), w)
    with pytest.raises(TypeError, match="floating-point"):
        ternary_linear_kernel(torch.zeros(3, 6, dtype=torch.int64, device=DEVICE), w)
    hybrid = TernaryScaleTensor(4, 6, 2, scale_mode="float", device=DEVICE)
    with pytest.raises(ValueError, match="integer scales"):
        ternary_linear_kernel(torch.zeros(3, 6, device=DEVICE), hybrid)


@pytest.mark.parametrize("kernel,scale_mode,voter_backend,runs_kernels", [
    ("triton", "int", "dense-fallback", True), ("triton", "int", "gpu", True), ("dense", "int", "gpu", False),
    ("triton", "float", "gpu", False)],
    ids=["triton", "triton-gpu-voter", "dense-gpu-voter", "triton-hybrid-float-scale"])
def test_ternary_linear_runs_the_kernels_it_is_given(kernel, scale_mode, voter_backend, runs_kernels):
    """ops.linear.ternary_linear runs the Triton kernels when its caller asks for them and they apply (integer
    scales), whatever the backend of the weight's voter (switched after construction on CPU-only machines, where
    the constructor needs CUDA for 'gpu'); otherwise the dense reference. Both give the same output."""
    w = TernaryScaleTensor(12, 20, 8, scale_mode=scale_mode, device=DEVICE)
    opt = FlipOptimizer(w, backend="dense-fallback")
    opt.backend = voter_backend
    x = torch.randint(-2, 3, (3, 20), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    y_dense = ternary_linear(x, w)
    y = ternary_linear(x.requires_grad_(), w, kernel=kernel)
    assert (y.grad_fn.impl is not None) == runs_kernels
    assert torch.equal(y.detach(), y_dense)


def test_linear_layers_run_the_kernel_set_on_them():
    """TernaryLinear(kernel=...) and set_linear_kernel(model, ...) choose the layer's kernels."""
    model = torch.nn.Sequential(TernaryLinear(20, 12, group_size=8, device=DEVICE),
                                TernaryLinear(12, 4, group_size=4, device=DEVICE, kernel="triton"))
    x = torch.randint(-2, 3, (3, 20), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    assert [m.kernel for m in model] == [LinearKernel.DENSE, LinearKernel.TRITON]
    assert model[0](x).grad_fn.impl is None and model[1](model[0](x)).grad_fn.impl is not None
    dense = model(x)
    assert set_linear_kernel(model, LinearKernel.TRITON) is model
    assert all(m.kernel is LinearKernel.TRITON for m in model) and model[0](x).grad_fn.impl is not None
    assert torch.equal(model(x), dense)
    with pytest.raises(ValueError, match="unknown linear kernel 'cuda'"):
        set_linear_kernel(model, "cuda")


def test_a_ternarised_transformers_llama_runs_forward_and_backward_through_the_kernels():
    """The model of docs/integrations.md's TrainStep loop (a transformers Llama, ``set_linear_kernel(model,
    "triton")``) with the kernels running: every linear layer takes the kernel path, and the logits and the
    loss's gradient of the float parameters match the dense layers'. (The page's example itself runs as on a
    user's CPU, without the interpreter: tests/test_hf.py.)"""
    transformers = pytest.importorskip("transformers")
    import warnings

    import torch.nn.functional as F

    from trueternary import ternarize

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = ternarize(transformers.LlamaForCausalLM(cfg), group_size=16, strict=False).to(DEVICE)
    model = set_linear_kernel(copy.deepcopy(dense), "triton")
    seq = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x, y = seq[:, :-1], seq[:, 1:]

    def loss_fn(m, batch):
        return F.cross_entropy(m(input_ids=batch[0], use_cache=False).logits.float().flatten(0, 1),
                               batch[1].flatten())

    impls = []
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.register_forward_hook(lambda mod, args, out: impls.append(out.grad_fn.impl is not None))
    losses = [loss_fn(m, (x, y)) for m in (dense, model)]
    assert impls and all(impls)  # every linear layer ran the kernels
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(dense.named_parameters(), model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
