"""Tests of the drop-in layers: TernaryLinear / TernaryEmbedding forward equal the dense reference
``x @ (T * 2**E).T + b`` / ``dense()[idx]``, gradients equal the reference, the weight gradient reaches the
voter (and only the voter), IntegerBias, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trueternary import FlipOptimizer, IntegerBias, TernaryEmbedding, TernaryLinear, TernaryScaleTensor


class RecordingVoter:
    """Stands in for FlipOptimizer in backward: records what the layer hands over instead of voting."""

    def __init__(self):
        self.calls = []
        self.bias_calls = []

    def cast_votes(self, weight, g, T, rows=None, n_rows=None):
        clone = (lambda t: None if t is None else t.clone())
        self.calls.append((weight, g.clone(), T.clone(), clone(rows), clone(n_rows)))

    def cast_matmul_votes(self, weight, gy, x, T):
        self.cast_votes(weight, (gy.t() @ x).float(), T)

    def cast_bias_votes(self, bias, g):
        self.bias_calls.append((bias, g.clone()))


def randomize_bias(lin: TernaryLinear) -> None:
    if lin.bias is not None:
        lin.bias.q.copy_(torch.randint(-3000, 3000, (lin.out_features,), dtype=torch.int32))


# (in_features, out_features, group_size, batch_shape, bias)
LINEAR_CASES = [
    (70, 4, 64, (2, 3), True),
    (70, 4, 64, (5,), False),
    (9, 7, 4, (), True),
    (64, 3, 64, (1, 2, 2), False),
    (1, 1, 1, (3,), True),
    (130, 17, 64, (6,), True),
]
LINEAR_IDS = [
    f"{i}to{o}-g{g}-b{'x'.join(map(str, b)) or 'none'}{'-bias' if bias else ''}" for i, o, g, b, bias in LINEAR_CASES
]


def make_linear(fin, fout, gs, bias):
    lin = TernaryLinear(fin, fout, bias=bias, group_size=gs)
    randomize_bias(lin)
    return lin


def linear_reference(lin, x, dense_reference):
    W = dense_reference(lin.weight)
    y = x.double() @ W.t()
    if lin.bias is not None:
        y = y + lin.bias.q.double() * 2.0 ** int(lin.bias.exp)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fin,fout,gs,batch,bias", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_forward_equals_dense_reference(fin, fout, gs, batch, bias, dtype, dense_reference):
    lin = make_linear(fin, fout, gs, bias)
    x = torch.randn(*batch, fin, dtype=dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (*batch, fout)
    ref = linear_reference(lin, x, dense_reference)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    else:  # float32 accumulation of fin products: stated tolerance 1e-5 relative to the output's size
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * (ref.abs().max().item() + 1))
    with torch.no_grad():
        y_ng = lin(x)
    assert not y_ng.requires_grad
    assert torch.equal(y_ng, y.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fin,fout,gs,batch,bias", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_gradients_equal_reference(fin, fout, gs, batch, bias, dtype, dense_reference):
    lin = make_linear(fin, fout, gs, bias)
    voter = RecordingVoter()
    lin.weight._voter = voter
    if lin.bias is not None:
        lin.bias._voter = voter
    x = torch.randn(*batch, fin, dtype=dtype, requires_grad=True)
    gy = torch.randn(*batch, fout, dtype=dtype)
    lin(x).backward(gy)
    W = dense_reference(lin.weight)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), gy.double() @ W, **tol)
    # The voter receives the weight gradient gy^T x (float32), the trits, and nothing else keeps it.
    assert len(voter.calls) == 1
    weight, g, T, rows, n_rows = voter.calls[0]
    assert weight is lin.weight and rows is None and n_rows is None
    assert g.dtype == torch.float32 and g.shape == (fout, fin)
    gW_ref = gy.double().reshape(-1, fout).t() @ x.detach().double().reshape(-1, fin)
    torch.testing.assert_close(g.double(), gW_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(T, lin.weight.trits())
    if bias:
        assert len(voter.bias_calls) == 1 and voter.bias_calls[0][0] is lin.bias
        torch.testing.assert_close(voter.bias_calls[0][1].double(), gy.double().reshape(-1, fout).sum(0),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert voter.bias_calls == []


def test_linear_first_layer_still_votes_when_input_needs_no_grad():
    # The anchor makes autograd run our backward even though x does not require grad.
    lin = TernaryLinear(6, 3, group_size=4)
    voter = RecordingVoter()
    lin.weight._voter = voter
    lin(torch.randn(2, 6)).sum().backward()
    assert len(voter.calls) == 1
    assert not any(p.grad is not None for p in lin.parameters())


def test_linear_without_voter_backward_runs_and_changes_nothing():
    lin = TernaryLinear(6, 3, bias=True, group_size=4)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(2, 6, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_linear_autocast_bf16_cpu(dense_reference):
    lin = TernaryLinear(32, 8, group_size=16)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ dense_reference(lin.weight).t()
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_linear_empty_batch_casts_no_votes():
    lin = TernaryLinear(6, 3, bias=True, group_size=4)
    opt = FlipOptimizer(lin)
    y = lin(torch.randn(0, 6))
    assert y.shape == (0, 3)
    y.sum().backward()
    # no gradient information: no votes land
    assert (lin.weight.T_accum == 0).all() and (lin.bias.q == 0).all()
    opt.step()


@pytest.mark.parametrize(
    "x,err",
    [
        (torch.randn(3, 5), ValueError),
        (torch.randn(6, 3), ValueError),
        (torch.tensor(1.0), ValueError),
        (torch.ones(2, 6, dtype=torch.int64), TypeError),
        (torch.ones(2, 6, dtype=torch.bool), TypeError),
        ([[0.0] * 6], TypeError),
    ],
    ids=["5-features", "transposed", "0-dim", "int64", "bool", "list"],
)
def test_linear_bad_input(x, err):
    lin = TernaryLinear(6, 3)
    with pytest.raises(err):
        lin(x)


def test_linear_bad_constructor_arguments():
    for kwargs in (dict(group_size=0), dict(group_size=-1), dict(group_size=2.5), dict(scale_mode="half")):
        with pytest.raises(ValueError):
            TernaryLinear(4, 3, **kwargs)
    for fin, fout in ((0, 3), (4, 0), (-1, 3)):
        with pytest.raises(ValueError):
            TernaryLinear(fin, fout)


def test_from_linear_matches_from_float_and_rounds_bias():
    ref = nn.Linear(70, 5)
    lin = TernaryLinear.from_linear(ref, group_size=64)
    t = TernaryScaleTensor.from_float(ref.weight.detach(), 64)
    assert torch.equal(lin.weight.T_packed, t.T_packed) and torch.equal(lin.weight.E, t.E)
    assert lin.bias.q.dtype == torch.int32
    assert torch.equal(lin.bias.q, torch.round(ref.bias.detach() * 1024).to(torch.int32))
    assert (lin.bias.value() - ref.bias.detach()).abs().max().item() <= 2**-11
    assert list(lin.parameters()) == []
    assert TernaryLinear.from_linear(nn.Linear(4, 2, bias=False)).bias is None


def test_integer_bias():
    b = IntegerBias(3, exp=-4)
    b.q.copy_(torch.tensor([5, -3, 0], dtype=torch.int32))
    assert torch.equal(b.value(), torch.tensor([5 / 16, -3 / 16, 0.0]))
    b.load_float_(torch.tensor([1.0, -0.03125, 0.5]))
    assert b.q.tolist() == [16, 0, 8]  # -0.5 rounds half to even -> 0
    with pytest.raises(ValueError, match="shape"):
        b.load_float_(torch.zeros(4))
    with pytest.raises(ValueError, match="exponent"):
        IntegerBias(3, exp=200)
    assert b.inference_bytes() == 3 * 4 + 1
    assert b.training_state_bytes() == 3 * 4 + 1  # q (int32) + exp (int8): integers only


# ------------------------------------------------------------------------------------ embedding
EMB_CASES = [(10, 70, 64, (2, 3)), (7, 9, 4, (5,)), (3, 1, 1, ()), (50, 16, 64, (4, 6))]
EMB_IDS = [f"{n}x{d}-g{g}-idx{'x'.join(map(str, s)) or 'scalar'}" for n, d, g, s in EMB_CASES]


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("n,d,gs,idx_shape", EMB_CASES, ids=EMB_IDS)
def test_embedding_lookup_equals_dense_rows(n, d, gs, idx_shape, idx_dtype, dense_reference):
    emb = TernaryEmbedding(n, d, group_size=gs)
    idx = torch.randint(0, n, idx_shape, dtype=idx_dtype)
    out = emb(idx)
    assert out.shape == (*idx_shape, d) and out.dtype == torch.float32
    ref = dense_reference(emb.weight)[idx.long()]
    assert torch.equal(out.double(), ref)
    assert torch.equal(out, emb.weight.dense()[idx.long()])


def test_embedding_backward_sparse_row_votes():
    emb = TernaryEmbedding(10, 12, padding_idx=2, group_size=8)
    voter = RecordingVoter()
    emb.weight._voter = voter
    idx = torch.tensor([[1, 2, 7], [7, 2, 1], [4, 7, 2]])
    gy = torch.randn(3, 3, 12)
    emb(idx).backward(gy)
    assert len(voter.calls) == 1
    weight, g, T, rows, n_rows = voter.calls[0]
    assert weight is emb.weight
    # all rows in a static shape: the n = 3 touched rows first (padding row 2 left out), then the others
    assert n_rows.dim() == 0 and int(n_rows) == 3
    assert rows.tolist() == [1, 4, 7, 0, 2, 3, 5, 6, 8, 9]
    assert g.shape == (10, 12) and T.shape == (10, 12)
    for i, r in enumerate(rows.tolist()):
        want = gy[idx == r].sum(0) if i < 3 else torch.zeros(12)  # gradient summed over repeats; others 0
        torch.testing.assert_close(g[i], want)
        assert torch.equal(T[i], emb.weight.trits()[r])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_embedding_row_gradient_is_deterministic(device):
    """The rows' summed gradient is the same bits on every run (many tokens per row: float atomics would add
    them in a varying order on CUDA, and a resumed run would drift from an uninterrupted one)."""
    emb = TernaryEmbedding(16, 64, group_size=8).to(device)
    voter = RecordingVoter()
    emb.weight._voter = voter
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 16, (64, 128), generator=gen).to(device)
    gy = torch.randn(64, 128, 64, generator=gen).to(device)
    for _ in range(3):
        emb(idx).backward(gy)
    first, rows = voter.calls[0][1], voter.calls[0][3]
    assert all(torch.equal(c[1], first) for c in voter.calls[1:])
    want = torch.zeros(16, 64, dtype=torch.float64).index_add_(0, idx.cpu().flatten(),
                                                               gy.cpu().reshape(-1, 64).double())
    torch.testing.assert_close(first.cpu().double(), want[rows.cpu()], rtol=1e-5, atol=1e-4)


def test_embedding_padding_and_untouched_rows_get_no_votes():
    emb = TernaryEmbedding(10, 12, padding_idx=2, group_size=8)
    assert (emb.weight.trits()[2] == 0).all()  # the padding row starts at zero
    opt = FlipOptimizer(emb)
    idx = torch.tensor([1, 2, 2, 7, 2])
    for _ in range(3):
        (emb(idx) * torch.randn(5, 12)).sum().backward()
        opt.step()
    A = emb.weight.T_accum
    assert (A[2] == 0).all() and (emb.weight.trits()[2] == 0).all()
    untouched = [r for r in range(10) if r not in (1, 2, 7)]
    assert (A[untouched] == 0).all() and (emb.weight.E_accum[untouched] == 0).all()
    assert (A[[1, 7]] != 0).any()


def test_embedding_only_padding_or_empty_batch_casts_no_votes():
    emb = TernaryEmbedding(10, 12, padding_idx=0, group_size=8)
    FlipOptimizer(emb)
    emb(torch.zeros(4, dtype=torch.int64)).sum().backward()
    out = emb(torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 12)
    out.sum().backward()
    assert (emb.weight.T_accum == 0).all()


def _reference_embedding_votes(opt, weight, idx, gy, padding_idx, call=0):
    """The embedding's votes as cast before backward had static shapes (a copy of that algorithm, one process):
    ``torch.unique`` compaction, the padding row dropped by boolean indexing, no call for an empty row set, the
    host RNG counter ``step * CALLS_PER_STEP + call`` and the host scale-interval test."""
    from trueternary import rng
    from trueternary.optim import CALLS_PER_STEP
    from trueternary.rule import accumulate, scale_gradient, sign_votes, stochastic_votes, vote_scale

    group = opt.param_groups[weight._group_index]
    rows, inverse = torch.unique(idx.reshape(-1), return_inverse=True)
    g = torch.zeros(rows.numel(), weight.cols).index_add_(0, inverse, gy.reshape(-1, weight.cols).float())
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, g = rows[keep], g[keep]
    if rows.numel() == 0:
        return
    T = weight.trits()[rows]
    counter = opt.step_count * CALLS_PER_STEP + call

    def votes(group, g, lr, stream, T=None, decay=0.0, index=None):
        if group["vote"] == "sign":
            return sign_votes(g)
        s = vote_scale(g, lr, group["normalize"], group["norm_block"])
        if group["vote_power"] != 1:
            s1 = vote_scale(g, 1.0, group["normalize"], group["norm_block"])
            g = torch.sign(g) * (g * s1).abs().pow(group["vote_power"])
            s = torch.tensor(-float(lr))
        return stochastic_votes(g, s, rng.stream_key(opt.seed, stream, counter), group["vote_clip"], T, decay, index)

    index = (rows[:, None] * weight.cols + torch.arange(weight.cols)).reshape(-1)
    v = votes(group, g, group["lr"], 2 * weight.stream, T, group["decay"], index)
    weight.T_accum[rows] = accumulate(weight.T_accum[rows], v)
    interval = group["scale_update_interval"]
    if weight.scale_mode != "int" or interval == 0 or opt.step_count % interval:
        return
    gE = scale_gradient(g, T, weight.group_size)
    eidx = (rows[:, None] * weight.n_groups + torch.arange(weight.n_groups)).reshape(-1)
    vE = votes(dict(group, vote=group["scale_vote"]), gE, group["lr"] * group["scale_lr"], 2 * weight.stream + 1,
               index=eidx)
    weight.E_accum[rows] = accumulate(weight.E_accum[rows], vE)


# id: (rows V, norm_block, padding_idx, index range of the batch (lo, hi), batch shape, rule overrides);
# batches repeat indices; the padding case's batches are a third padding
EMB_VOTE_CASES = {
    "block_factored-n_below_block": (40, 16, None, (5, 11), (3, 4), {}),
    "block_factored-n_above_block-V_ragged": (43, 8, None, (0, 43), (6, 8), dict(scale_update_interval=2)),
    "block_factored-all_rows_touched": (6, 4, None, (0, 6), (5, 6), {}),
    "tensor": (43, 8, None, (0, 43), (6, 8), dict(normalize="tensor", scale_update_interval=3)),
    "sign": (43, 8, None, (0, 43), (6, 8), dict(vote="sign", scale_vote="sign", normalize="tensor")),
    "decay": (43, 8, None, (0, 43), (6, 8), dict(decay=0.5, scale_update_interval=2)),
    "vote_power": (43, 8, None, (0, 43), (6, 8), dict(vote_power=0.5)),
    "padding": (30, 8, 3, (0, 30), (4, 9), {}),
    "only_padding": (30, 8, 7, (7, 8), (4, 5), {}),
}


@pytest.mark.parametrize("case", list(EMB_VOTE_CASES))
def test_embedding_row_votes_equal_unique_compaction_reference(case):
    """Backward's static-shape row votes (all rows, touched first, statistics over the n touched rows, device
    RNG counter and scale interval) equal the former ``torch.unique`` compaction's bit for bit: integer-valued
    gradients make every float sum exact, so only the order of the rows differs."""
    import copy

    V, block, pad, (lo, hi), shape, rule = EMB_VOTE_CASES[case]
    emb = TernaryEmbedding(V, 12, padding_idx=pad, group_size=4, generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(emb)
    kw = dict(backend="dense-fallback", seed=5, norm_block=block, accum_threshold=5, scale_threshold=3, **rule)
    opt, opt_ref = FlipOptimizer(emb, **kw), FlipOptimizer(ref, **kw)
    ref.weight._voter = None  # the reference casts its votes by hand
    gen = torch.Generator().manual_seed(1)
    w, w_ref = emb.weight, ref.weight
    before = {n: getattr(w, n).clone() for n in ("T_accum", "E_accum", "T_packed", "E")}
    for _ in range(5):
        idx = torch.randint(lo, hi, shape, generator=gen)
        if pad is not None and case == "padding":
            idx[torch.rand(shape, generator=gen) < 1 / 3] = pad
        gy = torch.randint(-3, 4, (*shape, 12), generator=gen).float()
        emb(idx).backward(gy)
        _reference_embedding_votes(opt_ref, w_ref, idx, gy, pad)
        opt.step()
        opt_ref.step()
        for name in ("T_accum", "E_accum", "T_packed", "E"):
            assert torch.equal(getattr(w, name), getattr(w_ref, name)), name
    changed = [n for n in before if not torch.equal(getattr(w, n), before[n])]
    if case == "only_padding":
        assert changed == []  # no votes at all (decay and the random offset included)
    else:
        assert {"T_accum", "T_packed"} <= set(changed)  # votes and flips happened: the comparison means something
        if rule.get("vote") != "sign":
            assert "E_accum" in changed


@pytest.mark.parametrize("normalize", ["block_factored", "tensor"])
def test_embedding_backward_and_step_have_no_host_sync(no_host_reads, normalize):
    """The embedding's backward, its row votes and ``step()`` never read a tensor on the host (the CUDA-graph
    requirement): every way Python can do so raises here. (The forward's index range check reads the indices'
    extremes except while a CUDA graph is being captured: the autograd function is called directly.)"""
    from trueternary.ops.embedding import TernaryEmbeddingFunction
    from trueternary.ops.linear import _ANCHOR

    emb = TernaryEmbedding(21, 12, padding_idx=0, group_size=4, generator=torch.Generator().manual_seed(0))
    opt = FlipOptimizer(emb, backend="dense-fallback", check_finite=False, normalize=normalize, norm_block=8,
                        decay=0.25, scale_update_interval=2, accum_threshold=5, scale_threshold=3)
    idx = torch.tensor([[0, 3, 3, 9], [20, 0, 5, 3]])
    gy = torch.randint(-3, 4, (2, 4, 12), generator=torch.Generator().manual_seed(1)).float()
    emb(idx).backward(gy)  # warm-up: creates the device step counter
    opt.step()
    w = emb.weight
    before = {n: getattr(w, n).clone() for n in ("T_accum", "E_accum")}
    with no_host_reads("in the embedding's backward or step()"):
        for _ in range(2):  # a scale-vote step and one without
            TernaryEmbeddingFunction.apply(idx, _ANCHOR, w.log2_scale, w, torch.float32, 0).backward(gy)
            opt.step()
    assert int(opt._ctx.counters.device_steps[torch.device("cpu")]) == 3
    untouched = [r for r in range(21) if r not in (3, 5, 9, 20)]
    assert not torch.equal(w.T_accum, before["T_accum"]) and not torch.equal(w.E_accum, before["E_accum"])
    assert torch.equal(w.T_accum[untouched], before["T_accum"][untouched])
    assert torch.equal(w.E_accum[untouched], before["E_accum"][untouched])


def test_embedding_negative_padding_idx_and_from_embedding():
    emb = TernaryEmbedding(10, 4, padding_idx=-1)
    assert emb.padding_idx == 9
    ref = nn.Embedding(12, 20, padding_idx=3)
    t = TernaryEmbedding.from_embedding(ref, group_size=8)
    assert t.padding_idx == 3 and (t.weight.trits()[3] == 0).all()
    f = TernaryScaleTensor.from_float(ref.weight.detach(), 8)
    assert torch.equal(t.weight.T_packed, f.T_packed) and torch.equal(t.weight.E, f.E)
    assert list(t.parameters()) == []
    with pytest.raises(ValueError, match="max_norm"):
        TernaryEmbedding.from_embedding(nn.Embedding(5, 4, max_norm=1.0))
    for bad in (10, -11):
        with pytest.raises(ValueError, match="padding_idx"):
            TernaryEmbedding(10, 4, padding_idx=bad)


@pytest.mark.parametrize(
    "idx,err",
    [
        (torch.tensor([0, 10]), IndexError),
        (torch.tensor([-1, 3]), IndexError),
        (torch.tensor([1.0, 2.0]), TypeError),
        (torch.tensor([True, False]), TypeError),
        ([1, 2], TypeError),
    ],
    ids=["index-10-of-10", "negative", "float", "bool", "list"],
)
def test_embedding_bad_input(idx, err):
    emb = TernaryEmbedding(10, 4)
    with pytest.raises(err):
        emb(idx)


# ------------------------------------------------------------------------------------ hybrid float scale
def _expanded(ls: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    return ls.repeat_interleave(group_size, dim=1)[:, :cols]


def test_hybrid_linear_log2_scale_gradient_equals_autograd_reference():
    lin = TernaryLinear(10, 5, group_size=4, scale_mode="float")
    with torch.no_grad():
        lin.weight.log2_scale.add_(torch.rand(5, 3))  # non-integer float scales
    x, gy = torch.randn(2, 3, 10), torch.randn(2, 3, 5)
    lin(x).backward(gy)
    ls = lin.weight.log2_scale.detach().double().requires_grad_()
    W = lin.weight.trits().double() * torch.exp2(_expanded(ls, 4, 10))
    ((x.double() @ W.t()) * gy.double()).sum().backward()
    torch.testing.assert_close(lin.weight.log2_scale.grad.double(), ls.grad, rtol=1e-5, atol=1e-5)


def test_hybrid_embedding_log2_scale_gradient_equals_autograd_reference():
    emb = TernaryEmbedding(8, 10, padding_idx=3, group_size=4, scale_mode="float")
    with torch.no_grad():
        emb.weight.log2_scale.add_(torch.rand(8, 3))
    idx = torch.tensor([[1, 3, 5], [5, 0, 3]])
    gy = torch.randn(2, 3, 10)
    emb(idx).backward(gy)
    ls = emb.weight.log2_scale.detach().double().requires_grad_()
    W = emb.weight.trits().double() * torch.exp2(_expanded(ls, 4, 10))
    (F.embedding(idx, W, padding_idx=3) * gy.double()).sum().backward()
    torch.testing.assert_close(emb.weight.log2_scale.grad.double(), ls.grad, rtol=1e-5, atol=1e-5)
    assert (emb.weight.log2_scale.grad[[2, 3, 4, 6, 7]] == 0).all()  # padding and untouched rows


# ------------------------------------------------------------------------------------ compiled (torch.library ops)


class Tower(nn.Module):
    """Embedding (padding row) -> linear with bias -> float norm -> linear: both ternary ops and both scale modes."""

    def __init__(self, scale_mode: str):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.emb = TernaryEmbedding(40, 24, padding_idx=0, group_size=8, scale_mode=scale_mode, generator=g)
        self.fc1 = TernaryLinear(24, 36, bias=True, group_size=8, scale_mode=scale_mode, generator=g)
        self.norm = nn.LayerNorm(36)
        self.fc2 = TernaryLinear(36, 40, group_size=8, scale_mode=scale_mode, generator=g)

    def forward(self, idx):
        return self.fc2(self.norm(torch.relu(self.fc1(self.emb(idx)))))


@pytest.mark.parametrize("scale_mode", ["int", "float"])
def test_compiled_layers_vote_and_differentiate_as_the_eager_ones(scale_mode):
    """torch.compile (AOTAutograd, one graph, no break) runs the layers as trueternary:: ops: the recorded votes,
    the hybrid scales' gradients and the float parameters' gradients equal the eager autograd functions' bit for
    bit. The first layer's input (the embedding's output) needs a gradient only through the ops' anchor."""
    torch._dynamo.reset()
    idx = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    idx[0, :2] = 0  # the padding row
    got = []
    for compiled in (False, True):
        model = Tower(scale_mode)
        voter = RecordingVoter()
        for m in (model.emb.weight, model.fc1.weight, model.fc1.bias, model.fc2.weight):
            m._voter = voter

        def loss_fn(idx, model=model):
            return model(idx).square().mean()

        fn = torch.compile(loss_fn, backend="aot_eager", fullgraph=True) if compiled else loss_fn
        fn(idx).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        got.append((voter, grads))
    (eager, eager_grads), (comp, comp_grads) = got
    assert len(eager.calls) == len(comp.calls) == 3 and len(eager.bias_calls) == len(comp.bias_calls) == 1
    for a, b in zip(eager.calls, comp.calls):
        for ta, tb in zip(a[1:], b[1:]):
            assert (ta is None and tb is None) or torch.equal(ta, tb)
    assert torch.equal(eager.bias_calls[0][1], comp.bias_calls[0][1])
    assert len(eager_grads) == len(comp_grads) == (5 if scale_mode == "float" else 2)
    for a, b in zip(eager_grads, comp_grads):
        assert torch.equal(a, b)


def test_compiled_copy_of_a_layer_votes_into_its_own_state():
    """The ops reach a layer by its op handle; a deep copy gets a handle of its own, so compiled code run on the
    copy votes into the copy and leaves the original alone."""
    import copy

    torch._dynamo.reset()
    original = TernaryLinear(16, 8, group_size=8)
    clone = copy.deepcopy(original)
    assert clone.weight.op_handle != original.weight.op_handle
    voters = RecordingVoter(), RecordingVoter()
    original.weight._voter, clone.weight._voter = voters
    fn = torch.compile(lambda m, x: m(x).sum(), backend="aot_eager", fullgraph=True)
    fn(clone, torch.randn(4, 16)).backward()
    assert len(voters[0].calls) == 0 and len(voters[1].calls) == 1 and voters[1].calls[0][0] is clone.weight
