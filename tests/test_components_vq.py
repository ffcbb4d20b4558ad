"""TernaryVQCodebook (nearest code, straight-through, votes on used codes, integer counters, dead codes)
and TernaryEmbeddingTable (sparse row updates)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trueternary import FlipOptimizer, ternarize
from trueternary.components import TernaryEmbeddingTable, TernaryVQCodebook, nearest_code
from trueternary.layers import TernaryEmbedding
from trueternary.quant import group_absmean_log2

TOL = dict(atol=1e-6, rtol=1e-5)


class RecordingVoter:
    def __init__(self):
        self.calls = []

    def cast_votes(self, weight, g, T, rows=None, n_rows=None):
        clone = (lambda t: None if t is None else t.clone())
        self.calls.append((g.clone(), T.clone(), clone(rows), clone(n_rows)))

    def cast_matmul_votes(self, weight, gy, x, T):  # linear layers hand over the factors of gy.T @ x
        self.cast_votes(weight, (gy.t() @ x).float(), T)


# ---------------------------------------------------------------------- embedding table
def test_embedding_table_is_the_packed_ternary_embedding():
    assert TernaryEmbeddingTable is TernaryEmbedding
    t = TernaryEmbeddingTable(10, 6)
    assert {n for n, _ in t.named_buffers()} == {"weight.T_packed", "weight.E", "weight.E_accum", "weight.T_accum"}
    assert t.weight.T_accum.dtype == t.weight.E_accum.dtype == t.weight.E.dtype == torch.int8


def test_embedding_table_updates_only_touched_rows():
    table = TernaryEmbeddingTable(12, 8, group_size=4, generator=torch.Generator().manual_seed(0))
    w = table.weight
    gen = torch.Generator().manual_seed(1)
    # accumulators below threshold everywhere, so a step that flips nothing must leave them as they are
    w.T_accum.copy_(torch.randint(-20, 21, w.T_accum.shape, generator=gen, dtype=torch.int8))
    w.E_accum.copy_(torch.randint(-20, 21, w.E_accum.shape, generator=gen, dtype=torch.int8))
    opt = FlipOptimizer(table, seed=0, accum_threshold=32, scale_threshold=32)
    idx = torch.tensor([[1, 4, 4], [9, 1, 4]])
    untouched = torch.tensor([r for r in range(12) if r not in (1, 4, 9)])
    before = {n: getattr(w, n).clone() for n in ("T_packed", "T_accum", "E_accum", "E")}
    T_before = w.trits().clone()
    table(idx).mul(torch.randn(2, 3, 8, generator=gen)).sum().backward()
    opt.step()
    for name in ("T_accum", "E_accum", "E"):
        assert torch.equal(getattr(w, name)[untouched], before[name][untouched]), name
    assert torch.equal(w.trits()[untouched], T_before[untouched])
    touched = torch.tensor([1, 4, 9])
    assert not torch.equal(w.T_accum[touched], before["T_accum"][touched])  # the batch's rows did get votes


# ---------------------------------------------------------------------- VQ
def test_nearest_code_matches_brute_force():
    gen = torch.Generator().manual_seed(2)
    z, codes = torch.randn(50, 7, generator=gen), torch.randn(9, 7, generator=gen)
    brute = torch.cdist(z, codes).argmin(1)
    assert torch.equal(nearest_code(z, codes), brute)


def _vq(**kw):
    kw.setdefault("generator", torch.Generator().manual_seed(3))
    return TernaryVQCodebook(16, 8, group_size=8, **kw)


def test_forward_gives_code_values_and_indices():
    vq = _vq()
    z = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    out = vq(z)
    codes = vq.codebook.weight.dense()
    assert out.indices.shape == (2, 5) and out.q.shape == z.shape
    assert torch.equal(out.indices.reshape(-1), nearest_code(z.reshape(-1, 8), codes))
    torch.testing.assert_close(out.q.reshape(-1, 8), codes[out.indices.reshape(-1)])
    want = (z.reshape(-1, 8) - codes[out.indices.reshape(-1)]).square().sum(1).mean()
    torch.testing.assert_close(out.commitment, want)


def test_straight_through_commitment_and_codebook_votes():
    vq = _vq(beta=0.25)
    voter = RecordingVoter()
    vq.codebook.weight._voter = voter
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = vq(z)
    g = torch.randn(10, 8, generator=torch.Generator().manual_seed(6))
    (out.q * g).sum().backward()
    c = vq.codebook.weight.dense()[out.indices]
    N = 10
    torch.testing.assert_close(z.grad, g + 0.25 * 2 * (z.detach() - c) / N, **TOL)  # STE + commitment
    # the codebook gets the codebook-loss gradient, summed per used code, as a row update in which only the
    # used codes vote: all codes in a static shape, the n used ones first (ops.embedding)
    assert len(voter.calls) == 1
    gC, T, rows, n = voter.calls[0]
    used = torch.unique(out.indices)
    assert int(n) == used.numel() and torch.equal(rows[:used.numel()], used)
    assert torch.equal(rows.sort().values, torch.arange(16))
    want = torch.zeros(16, 8).index_add_(0, out.indices, 2 * (c - z.detach()) / N)[rows]
    torch.testing.assert_close(gC, want, **TOL)
    assert (gC[used.numel():] == 0).all()
    assert torch.equal(T, vq.codebook.weight.trits()[rows])


def test_usage_counters_are_int32_and_count_assignments():
    vq = _vq(dead_after=0)
    assert vq.usage.dtype == vq.idle.dtype == torch.int32
    z = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(7))
    out = vq(z)
    counts = torch.bincount(out.indices.reshape(-1), minlength=16)
    assert torch.equal(vq.usage, counts.int())
    assert torch.equal(vq.idle, (counts == 0).int())
    vq(z)
    assert torch.equal(vq.usage, 2 * counts.int()) and int(vq.steps) == 2
    vq.eval()
    vq(z)  # evaluation leaves the counters alone
    assert torch.equal(vq.usage, 2 * counts.int())
    with torch.no_grad():
        vq.train()
        vq(z)
    assert int(vq.steps) == 2


def test_dead_codes_are_reseeded_from_recent_encoder_outputs():
    vq = _vq(dead_after=3, seed=11)
    w = vq.codebook.weight
    # make codes 1.. far away so every vector picks code 0
    T = w.trits().clone()
    T[0] = 0
    w.set_trits(T)
    w.E[1:] = 10
    w.T_accum.fill_(5)
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(8)) * 0.1
    for _ in range(2):
        vq(z)
        assert vq.last_reseeded == 0
    vq(z)  # third step without use: codes 1..15 are dead and re-seeded at the end of this forward
    assert vq.last_reseeded == 15
    assert torch.equal(vq.idle[1:], torch.zeros(15, dtype=torch.int32))
    assert torch.equal(w.T_accum[1:], torch.zeros(15, 8, dtype=torch.int8)) and (w.T_accum[0] == 5).all()
    # each re-seeded code is the absmean ternarisation of one of the batch's vectors
    Tz, Ez = group_absmean_log2(z, 8)
    for r in range(1, 16):
        match = [(torch.equal(w.trits()[r], Tz[i]) and torch.equal(w.E[r], Ez[i])) for i in range(6)]
        assert any(match), r
    # and they are now in use
    out = vq(z)
    assert int(out.indices.max()) > 0


def test_float_codebook_before_and_after_ternarize():
    holder = nn.Module()
    holder.vq = TernaryVQCodebook(8, 4, ternary=False, dead_after=2, generator=torch.Generator().manual_seed(9))
    assert type(holder.vq.codebook) is nn.Embedding
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(10)).requires_grad_(True)
    out = holder.vq(z)
    out.q.sum().backward()
    idx = out.indices
    wgrad = holder.vq.codebook.weight.grad
    c = holder.vq.codebook.weight.detach()[idx]
    want = torch.zeros(8, 4).index_add_(0, idx, 2 * (c - z.detach()) / 5)
    torch.testing.assert_close(wgrad, want, **TOL)
    reseeded = 0
    for _ in range(2):
        holder.vq(z)  # the float path re-seeds by copying vectors
        reseeded += holder.vq.last_reseeded
    assert reseeded > 0
    W = holder.vq.codebook.weight.detach()
    copied = [r for r in range(8) if any(torch.equal(W[r], v) for v in z.detach())]
    assert len(copied) >= min(reseeded, 1)
    ternarize(holder, 4)
    assert isinstance(holder.vq.codebook, TernaryEmbedding)
    assert sum(p.numel() for p in holder.parameters()) == 0
    assert holder.vq(z.detach()).q.shape == (5, 4)


def test_vq_learns_clusters_by_votes():
    """Online ternary k-means: votes move the codes toward the data and the commitment error falls."""
    gen = torch.Generator().manual_seed(12)
    centers = torch.sign(torch.randn(4, 16, generator=gen))
    vq = TernaryVQCodebook(8, 16, group_size=16, dead_after=5, generator=gen)
    opt = FlipOptimizer(vq, seed=0)
    errs = []
    for _ in range(60):
        z = centers[torch.randint(0, 4, (64,), generator=gen)] + 0.3 * torch.randn(64, 16, generator=gen)
        z.requires_grad_(True)
        out = vq(z)
        out.q.sum().mul(0).backward()  # only the VQ's own losses train the codebook here
        opt.step()
        errs.append(float(out.commitment))
    assert sum(errs[-10:]) / 10 < 0.5 * sum(errs[:5]) / 5, errs


def test_bad_arguments():
    with pytest.raises(ValueError):
        TernaryVQCodebook(0, 4)
    with pytest.raises(ValueError):
        TernaryVQCodebook(4, 4, dead_after=-1)
    with pytest.raises(ValueError, match="dim"):
        _vq()(torch.randn(3, 5))
