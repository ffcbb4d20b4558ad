"""Tests of FlipOptimizer (discovery, backends, state_dict round trip and exact continuation, lr schedulers,
validation, NaN handling, no stored float gradients), SignGSD (exact math, zero state) and the hybrid
optimisers (float log2 scales by AdamW while trits flip)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trueternary import (
    FlipOptimizer,
    FlipRule,
    IntegerBias,
    NonFiniteGradientError,
    SignGSD,
    TernaryEmbedding,
    TernaryLinear,
    TernaryScaleTensor,
    hybrid_optimizers,
    ternarize,
)

VOCAB, DIM, HIDDEN, CLASSES = 20, 12, 10, 3


class TinyNet(nn.Module):
    """Embedding -> mean over tokens -> Linear(bias) -> ReLU -> Linear: every kind of ternary state."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = TernaryEmbedding(VOCAB, DIM, padding_idx=0, group_size=8, generator=g)
        self.fc1 = TernaryLinear(DIM, HIDDEN, bias=True, group_size=8, generator=g)
        self.fc2 = TernaryLinear(HIDDEN, CLASSES, group_size=4, generator=g)

    def forward(self, idx):
        return self.fc2(torch.relu(self.fc1(self.emb(idx).mean(1))))


def train(model, opt, steps: int, data_seed: int) -> None:
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (16, 5), generator=g)
        y = torch.randint(0, CLASSES, (16,), generator=g)
        F.cross_entropy(model(idx), y).backward()
        opt.step()
        opt.zero_grad()


def integer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every integer buffer (trits, scales, accumulators, bias) by name."""
    return {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def states_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ discovery
def test_finds_every_ternary_weight_and_bias():
    model = TinyNet()
    opt = FlipOptimizer(model)
    mods = opt.modules_trained()
    assert mods == [model.emb.weight, model.fc1.weight, model.fc2.weight, model.fc1.bias]
    params = opt.param_groups[0]["params"]
    assert [p is q for p, q in zip(params, [model.emb.weight.T_accum, model.fc1.weight.T_accum,
                                            model.fc2.weight.T_accum, model.fc1.bias.q])] == [True] * 4
    assert sorted(m.stream for m in mods) == [0, 1, 2, 3]  # distinct RNG streams
    assert all(m._voter is opt for m in mods)
    assert list(model.parameters()) == []


def test_accepts_modules_and_param_groups():
    model = TinyNet()
    opt = FlipOptimizer([model.fc1, model.fc2.weight])
    assert opt.modules_trained() == [model.fc1.weight, model.fc1.bias, model.fc2.weight]
    opt = FlipOptimizer([{"params": [model.emb], "accum_threshold": 8}, {"params": [model.fc1, model.fc2]}],
                        accum_threshold=20)
    assert [g["accum_threshold"] for g in opt.param_groups] == [8, 20]
    assert model.emb.weight._group_index == 0 and model.fc2.weight._group_index == 1
    train(model, opt, 2, 0)


@pytest.mark.parametrize(
    "params,match",
    [
        (nn.Sequential(nn.ReLU()), "no ternary weights"),
        ([{"params": [TernaryLinear(4, 3)], "accum_threshold": 0}], "accum_threshold"),
        ([{"params": [TernaryLinear(4, 3)], "momentum": 0.9}], "unknown"),
    ],
    ids=["no-weights", "bad-group-threshold", "unknown-group-key"],
)
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        FlipOptimizer(params)


def test_rejects_non_ternary_modules_and_released_weights():
    with pytest.raises(TypeError):
        FlipOptimizer([torch.zeros(3)])
    lin = TernaryLinear(4, 3)
    lin.weight.release_training_state()
    with pytest.raises(ValueError, match="inference only"):
        FlipOptimizer(lin)


# ------------------------------------------------------------------------------------ backends
def test_backend_names():
    assert FlipOptimizer(TinyNet(), backend="dense-fallback").backend == "dense-fallback"
    assert FlipOptimizer(TinyNet(), backend="none").backend == "none"
    if not torch.cuda.is_available():
        assert FlipOptimizer(TinyNet(), backend="auto").backend == "dense-fallback"
    for bad in ("bogus", "cuda", "", "Dense-Fallback"):
        with pytest.raises(ValueError, match="unknown update backend"):
            FlipOptimizer(TinyNet(), backend=bad)


def test_backend_names_are_one_enum_and_the_state_dict_keeps_the_name():
    from trueternary.backends import LinearKernel, UpdateBackend
    from trueternary.optim import BACKENDS

    assert BACKENDS == ("auto", "dense-fallback", "none", "gpu", "gpu-signcache")
    assert [UpdateBackend(b).linear_kernel for b in BACKENDS] == [LinearKernel.DENSE] * 3 + [LinearKernel.TRITON] * 2
    opt = FlipOptimizer(TinyNet())
    assert opt.backend is UpdateBackend.DENSE and opt.backend == "dense-fallback"
    backend = opt.state_dict()["trueternary"]["backend"]
    assert type(backend) is str and backend == "dense-fallback"  # checkpoints hold the plain name


class TwoRanks:
    """A data-parallel comm of world size 2 (only its size matters here: no step is taken)."""

    world_size, rank = 2, 0


def test_vote_backend_follows_the_update_backend_and_data_parallelism():
    """FlipOptimizer hands votes and flips to one vote backend, chosen from its backend and comm (switching
    after construction skips the constructor's CUDA check: on the CPU the kernels run interpreted)."""
    from trueternary.optim.backend import VoteBackend
    from trueternary.optim.data_parallel import ExchangedKernelVotes, ExchangedVotes
    from trueternary.optim.dense import DenseVotes
    from trueternary.optim.kernel import KernelVotes

    model = TinyNet()
    opt = FlipOptimizer(model)
    assert type(opt._votes) is DenseVotes and opt.world_size == 1
    opt.comm = TwoRanks()
    assert type(opt._votes) is ExchangedVotes and opt.world_size == 2
    opt.backend = "gpu"
    assert type(opt._votes) is ExchangedKernelVotes
    opt.comm = None
    assert type(opt._votes) is KernelVotes and not opt._votes.signcache
    opt.backend = "gpu-signcache"
    assert type(opt._votes) is KernelVotes and opt._votes.signcache
    opt.backend = "none"
    assert type(opt._votes) is VoteBackend and all(m._voter is None for m in opt.modules_trained())
    opt.backend = "dense-fallback"
    assert type(opt._votes) is DenseVotes and all(m._voter is opt for m in opt.modules_trained())
    with pytest.raises(ValueError, match="unknown update backend"):
        opt.backend = "cuda"


def test_graph_step_methods_move_the_host_step_only():
    """after_graph_capture / after_graph_replay: the host side of step() that a capture ran without executing,
    and that a replay executes without running; the device step (which the votes read) is the graph's."""
    model = TinyNet()
    opt = FlipOptimizer(model)
    opt.create_step_state("cpu")
    train(model, opt, 2, 0)
    device_step = opt._ctx.counters.device_steps[torch.device("cpu")]
    assert opt.step_count == 2 and int(device_step) == 2
    opt.after_graph_capture()
    assert opt.step_count == 1 and int(device_step) == 2
    opt.after_graph_replay()
    opt.after_graph_replay()
    assert opt.step_count == 3 and int(device_step) == 2
    assert opt.state_dict()["trueternary"]["step"] == 2  # the device step is authoritative


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("backend", ["gpu", "gpu-signcache"])
def test_gpu_backend_without_cuda_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="CUDA"):
        FlipOptimizer(TinyNet(), backend=backend)


def test_backend_none_changes_nothing():
    model = TinyNet()
    before = full_state(model)
    opt = FlipOptimizer(model, backend="none", accum_threshold=1)
    train(model, opt, 5, 0)
    assert_states_equal(before, full_state(model))
    assert opt.step_count == 5


def test_dense_fallback_changes_state_and_counts_flips():
    model = TinyNet()
    before = integer_state(model)
    opt = FlipOptimizer(model, accum_threshold=2)
    train(model, opt, 3, 0)
    after = integer_state(model)
    for name in ("emb.weight.T_packed", "fc1.weight.T_packed", "fc2.weight.T_packed", "fc1.bias.q"):
        assert not torch.equal(before[name], after[name]), name
    assert int(opt.last_flips) > 0


def test_same_seed_same_state_different_seed_different_state():
    runs = []
    for seed in (3, 3, 4):
        model = TinyNet()
        train(model, FlipOptimizer(model, seed=seed), 3, 0)
        runs.append(integer_state(model))
    assert_states_equal(runs[0], runs[1])
    assert states_differ(runs[0], runs[2])


def test_sign_votes_accumulate_minus_sign_of_gradient():
    lin = TernaryLinear(6, 4, group_size=4)
    FlipOptimizer(lin, rule=FlipRule.naive(accum_threshold=100), scale_update_interval=0)
    x, gy = torch.randn(5, 6), torch.randn(5, 4)
    lin(x).backward(gy)
    assert torch.equal(lin.weight.T_accum, (-torch.sign(gy.t() @ x)).to(torch.int8))
    lin(x).backward(gy)
    assert torch.equal(lin.weight.T_accum, (-2 * torch.sign(gy.t() @ x)).to(torch.int8))


def test_scale_update_interval():
    model = TinyNet()
    E0 = model.fc1.weight.E.clone()
    opt = FlipOptimizer(model, scale_update_interval=0)
    train(model, opt, 4, 0)
    assert (model.fc1.weight.E_accum == 0).all() and torch.equal(model.fc1.weight.E, E0)
    model = TinyNet()
    E0 = [w.E.clone() for w in (model.emb.weight, model.fc1.weight, model.fc2.weight)]
    opt = FlipOptimizer(model, scale_update_interval=1, scale_threshold=1)
    train(model, opt, 4, 0)
    assert int(opt.last_scale_flips) > 0
    for w, E in zip((model.emb.weight, model.fc1.weight, model.fc2.weight), E0):
        assert not torch.equal(w.E, E)
        assert (w.E - E).abs().max() <= 4  # at most one step of E per optimiser step


def test_bias_votes_follow_descent():
    lin = TernaryLinear(5, 3, bias=True)
    opt = FlipOptimizer(lin, lr=1.0)
    q0 = lin.bias.q.clone()
    x = torch.randn(8, 5)
    for _ in range(5):
        lin(x).sum().backward()  # dL/db = 8 > 0 for every element: normalised vote floor(-1 + u) = -1
        opt.step()
    assert torch.equal(lin.bias.q, q0 - 5)


def test_bias_votes_do_not_wrap_at_large_lr():
    lin = TernaryLinear(5, 3, bias=True)
    opt = FlipOptimizer(lin, lr=1000.0)
    q0 = lin.bias.q.clone()
    lin(torch.randn(8, 5)).sum().backward()
    opt.step()
    assert (lin.bias.q < q0).all()


# ------------------------------------------------------------------------------------ persistence
def test_state_dict_round_trip_and_identical_continuation():
    model_a = TinyNet(seed=0)
    opt_a = FlipOptimizer(model_a, seed=5, accum_threshold=4)
    train(model_a, opt_a, 3, data_seed=1)
    model_sd = copy.deepcopy(model_a.state_dict())
    opt_sd = copy.deepcopy(opt_a.state_dict())
    assert opt_sd["trueternary"]["step"] == 3
    if opt_a.param_groups[0]["norm_beta"]:  # the integer codes of the normaliser's moving averages
        assert {k for st in opt_sd["state"].values() for k in st} == {"norm_tile", "norm_row", "norm_col"}
    train(model_a, opt_a, 4, data_seed=2)

    model_b = TinyNet(seed=1)
    model_b.load_state_dict(model_sd)
    opt_b = FlipOptimizer(model_b, seed=0)  # seed, step and rule all come from the state_dict
    opt_b.load_state_dict(opt_sd)
    assert opt_b.step_count == 3 and opt_b.seed == 5
    assert opt_b.param_groups[0]["accum_threshold"] == 4
    assert opt_b.state_dict()["param_groups"] == opt_sd["param_groups"]
    train(model_b, opt_b, 4, data_seed=2)
    assert_states_equal(full_state(model_a), full_state(model_b))

    # the check above has teeth: without the optimiser state the continuation differs
    model_c = TinyNet(seed=1)
    model_c.load_state_dict(model_sd)
    train(model_c, FlipOptimizer(model_c, seed=0), 4, data_seed=2)
    assert states_differ(integer_state(model_a), integer_state(model_c))


def test_load_state_dict_rejects_foreign_or_bad_state():
    model = TinyNet()
    opt = FlipOptimizer(model)
    with pytest.raises(ValueError, match="not a FlipOptimizer"):
        opt.load_state_dict(torch.optim.SGD([torch.zeros(1, requires_grad=True)]).state_dict())
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["accum_threshold"] = 500
    with pytest.raises(ValueError, match="accum_threshold"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["accum_threshold"] == FlipRule().accum_threshold


def _bad_T_accum(model, opt, sd):
    model.fc1.weight.T_accum[0, 0] = -128  # int8 holds it; the accumulator never goes below -127


def _bad_E(model, opt, sd):
    model.fc2.weight.E[0, 0] = -128


def _bad_tile_code(model, opt, sd):
    sd["state"][1]["norm_tile"][0, 0] = -32767  # neither empty (-32768) nor a code >= NORM_TILE_MIN


def _bad_code_shape(model, opt, sd):
    sd["state"][1]["norm_row"] = sd["state"][1]["norm_row"][:, :0]


def _codes_for_a_bias(model, opt, sd):
    sd["state"][3] = dict(sd["state"][1])


def _bad_step(model, opt, sd):
    sd["trueternary"]["step"] = -5


def _step_text(model, opt, sd):
    sd["trueternary"]["step"] = "abc"


def _bias_q(model, opt, sd):
    model.fc1.bias.q[0] = -(2**31)


@pytest.mark.parametrize("damage, match", [
    (_bad_T_accum, r"parameter 1: T_accum holds -128, outside \[-127, 127\]"), (_bad_E, r"E holds -128"),
    (_bad_tile_code, "norm_tile holds -32767"), (_bad_code_shape, "norm_row must be torch.int8"),
    (_codes_for_a_bias, "unexpected optimizer state"), (_bad_step, "step must be an integer"),
    (_step_text, "step must be an integer"), (_bias_q, "bias q holds"),
], ids=["T_accum-128", "E-128", "tile-code", "code-shape", "bias-codes", "step-negative", "step-text", "bias-q"])
def test_load_state_dict_rejects_state_out_of_range(damage, match):
    """What load_state_dict resumes is checked whole (ValueError) before anything changes: the modules' integer
    state (loaded into them beforehand), step and seed, and the moving-average codes."""
    model = TinyNet()
    opt = FlipOptimizer(model, seed=5, accum_threshold=4)
    train(model, opt, 2, data_seed=1)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][1]) == {"norm_tile", "norm_row", "norm_col"}  # fc1's codes: the damaged ones
    fresh = FlipOptimizer(copy.deepcopy(model), seed=0)
    fresh.load_state_dict(sd)  # undamaged: loads
    target = FlipOptimizer(model, seed=0)
    before = copy.deepcopy(target.state_dict())
    damage(model, target, sd)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert after["trueternary"] == before["trueternary"] and after["param_groups"] == before["param_groups"]
    assert after["state"] == before["state"] == {}  # no codes loaded


# ------------------------------------------------------------------------------------ lr schedulers
def test_lr_schedulers_drive_the_vote_scale():
    model = TinyNet()
    opt = FlipOptimizer(model, lr=2.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for _ in range(3):
        train(model, opt, 1, 0)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 0.5, 0.25]

    model = TinyNet()
    opt = FlipOptimizer(model, lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(4):
        train(model, opt, 1, 0)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_zero_lr_from_a_scheduler_casts_no_trit_votes():
    model = TinyNet()
    opt = FlipOptimizer(model, lr=1.0, scale_update_interval=0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    train(model, opt, 3, 0)
    for w in (model.emb.weight, model.fc1.weight, model.fc2.weight):
        assert (w.T_accum == 0).all()  # floor(0 * g + u) == 0: the scheduled lr really is the vote scale


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(accum_threshold=0), dict(accum_threshold=128), dict(accum_threshold=2.5), dict(scale_threshold=-1),
        dict(vote_clip=0), dict(vote="majority"), dict(lr=-1.0), dict(lr=float("nan")), dict(seed=-1),
        dict(seed=1.5), dict(norm_block=0), dict(scale_update_interval=-2), dict(no_such_option=1),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        FlipOptimizer(TinyNet(), **kwargs)


@pytest.mark.parametrize("group_size", [0, -4, 2.0, None], ids=lambda g: f"g{g}")
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        TernaryLinear(4, 3, group_size=group_size)
    with pytest.raises(ValueError, match="group_size"):
        ternarize(nn.Sequential(nn.Linear(4, 3)), group_size=group_size)


# ------------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_raises_and_integer_state_is_not_poisoned(bad):
    model = TinyNet()
    opt = FlipOptimizer(model, accum_threshold=2)
    train(model, opt, 2, 0)
    before = integer_state(model)
    codes = copy.deepcopy(opt.state_dict()["state"])  # the normaliser's codes (norm_beta)
    assert codes
    idx = torch.randint(1, VOCAB, (4, 5))
    out = model(idx)
    (out.sum() * bad).backward()
    assert_states_equal(before, integer_state(model))  # votes of the bad backward were dropped
    for k, st in opt.state_dict()["state"].items():  # and the codes did not move
        assert all(torch.equal(t, codes[k][n]) for n, t in st.items())
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_states_equal(before, integer_state(model))  # and nothing flipped
    train(model, opt, 2, 1)  # training goes on
    assert states_differ(before, integer_state(model))


def scaled_train(model, opt, steps: int, scale: float) -> None:
    """``train`` with the loss multiplied by ``scale`` (data seed 0)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (16, 5), generator=g)
        y = torch.randint(0, CLASSES, (16,), generator=g)
        (F.cross_entropy(model(idx), y) * scale).backward()
        opt.step()


@pytest.mark.parametrize("rule", [{}, {"norm_beta": 0.0}, {"normalize": "tensor"}],
                         ids=["default", "per-call", "tensor"])
def test_finite_gradients_near_float32_limit_train_like_scaled_down_ones(rule):
    """The NaN/inf check is by element: loss * 1e19 (gradients whose sum of squares overflows float32) trains on;
    votes are scale-invariant (loss * 2**60: the state of loss * 1, bit for bit), and gradients whose squares
    overflow (loss * 2**100) still cast valid votes, no NaN."""
    base = TinyNet()
    states = {}
    for scale in (1.0, 2.0**60, 1e19, 2.0**100):
        model = copy.deepcopy(base)
        opt = FlipOptimizer(model, accum_threshold=3, **rule)
        scaled_train(model, opt, 3, scale)  # raises NonFiniteGradientError if a layer were taken for NaN/inf
        assert opt.step_count == 3 and int(opt._ctx.finite.count) == 0
        states[scale] = integer_state(model)
        assert all(v.abs().max() <= 127 for k, v in states[scale].items() if k.endswith("accum"))
    assert_states_equal(states[1.0], states[2.0**60])
    assert states_differ(integer_state(base), states[1e19]) and states_differ(integer_state(base), states[2.0**100])


def test_deferred_finite_check_drops_the_votes_and_reports_on_the_device():
    """defer_finite_check: a backward with inf drops its votes as the raising check does; step() does not raise
    but leaves the count of non-finite layer gradients in last_step_nonfinite."""
    model = TinyNet()
    opt = FlipOptimizer(model, accum_threshold=2)
    opt.defer_finite_check("cpu")
    train(model, opt, 2, 0)
    assert int(opt.last_step_nonfinite) == 0
    before = integer_state(model)
    (model(torch.randint(1, VOCAB, (4, 5))).sum() * float("inf")).backward()
    assert_states_equal(before, integer_state(model))  # votes of the bad backward were dropped
    opt.step()
    assert int(opt.last_step_nonfinite) > 0 and int(opt._ctx.finite.count) == 0
    train(model, opt, 2, 1)
    assert int(opt.last_step_nonfinite) == 0 and states_differ(before, integer_state(model))


# ------------------------------------------------------------------------------------ no float weight gradient
def tensor_inventory(model: nn.Module):
    """(module, name, dtype, shape) of every tensor a module holds, as parameter, buffer or plain attribute."""
    inv = set()
    for mname, m in model.named_modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            inv.add((mname, name, t.dtype, tuple(t.shape)))
        for name, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                inv.add((mname, "attr:" + name, v.dtype, tuple(v.shape)))
    return inv


def test_float_weight_gradient_is_never_stored():
    model = TinyNet()
    inventory = tensor_inventory(model)
    opt = FlipOptimizer(model)
    train(model, opt, 3, 0)
    assert tensor_inventory(model) == inventory  # no tensor added, no dtype or shape changed
    assert list(model.parameters()) == []
    for t in list(model.buffers()):
        assert t.grad is None
    float_buffers = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert float_buffers == set()  # the training state is integers only
    # the optimiser's own state: only the normaliser's integer codes (norm_beta), none with norm_beta=0
    assert all(not t.is_floating_point() for st in opt.state.values() for t in st.values())
    from trueternary.weight import ternary_weights

    assert 0 < opt.state_bytes() <= 0.2 * sum(w.numel() for w in ternary_weights(model))
    model0 = TinyNet()
    opt0 = FlipOptimizer(model0, norm_beta=0.0)
    train(model0, opt0, 3, 0)
    assert opt0.state_bytes() == 0 and len(opt0.state) == 0


def test_at_most_one_layer_gradient_alive_during_backward():
    """Each layer's weight gradient is handed to the voter and dropped before the next layer's is formed."""
    model = TinyNet()
    opt = FlipOptimizer(model)
    alive, peak = [], [0]
    original = opt.cast_votes

    def tracking_cast_votes(weight, g, T, rows=None, n_rows=None):
        import weakref

        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(g))
        peak[0] = max(peak[0], len(alive))
        return original(weight, g, T, rows, n_rows)

    opt.cast_votes = tracking_cast_votes
    train(model, opt, 2, 0)
    assert peak[0] == 1


# ------------------------------------------------------------------------------------ SignGSD
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd0", "wd0.1"])
def test_signgsd_exact_math_and_zero_state(wd):
    p = nn.Parameter(torch.randn(40, dtype=torch.float64))
    with torch.no_grad():
        p[:5] = 0.0
    opt = SignGSD([p], lr=0.01, weight_decay=wd)
    for _ in range(3):
        g = torch.randn(40, dtype=torch.float64)
        g[5:10] = 0.0
        p.grad = g
        expected = p.detach() - 0.01 * (torch.sign(g) + wd * torch.sign(p.detach()))
        opt.step()
        if wd == 0:
            assert torch.equal(p.detach(), expected)
        else:
            torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=1e-17)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


def test_signgsd_skips_params_without_grad_and_rejects_nan():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = SignGSD([a, b], lr=0.5)
    a.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    assert a.tolist() == [0.5, 1.5, 1.0] and b.tolist() == [1.0, 1.0, 1.0]
    a.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert a.tolist() == [0.5, 1.5, 1.0]


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.0), dict(lr=-1e-3), dict(lr=float("nan")), dict(lr=float("inf")), dict(weight_decay=-0.1),
     dict(weight_decay=float("inf"))],
    ids=["lr0", "lr-neg", "lr-nan", "lr-inf", "wd-neg", "wd-inf"],
)
def test_signgsd_validation(kwargs):
    with pytest.raises(ValueError):
        SignGSD([nn.Parameter(torch.ones(2))], **kwargs)


def test_norm_beta_state_is_integer_codes_counted_and_changes_the_votes():
    from trueternary.ops.votes import fused_votes_supported

    model = TinyNet()
    opt = FlipOptimizer(model, norm_beta=0.9, norm_block=16, seed=1)
    train(model, opt, 2, 0)
    st = [opt.state[p] for p in opt.param_groups[0]["params"] if p in opt.state]
    assert st and all(s["norm_tile"].dtype == torch.int16 and s["norm_row"].dtype == torch.int8 for s in st)
    assert opt.state_bytes() == sum(t.numel() * t.element_size() for s in st for t in s.values())
    assert fused_votes_supported(opt.param_groups[0])  # the gpu backends keep the codes in the vote kernel
    other = TinyNet()
    train(other, FlipOptimizer(other, norm_beta=0.0, norm_block=16, seed=1), 2, 0)
    assert states_differ(integer_state(model), integer_state(other))
    none = TinyNet()
    opt0 = FlipOptimizer(none, norm_beta=0.0, seed=1)
    train(none, opt0, 1, 0)
    assert opt0.state_bytes() == 0 and opt0.state_dict()["state"] == {}


# ------------------------------------------------------------------------------------ hybrid
def test_hybrid_trains_float_scales_with_adamw_while_trits_flip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    ternarize(model, group_size=8, scale_mode="float")
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight.log2_scale", "2.weight.log2_scale"]
    flip, adam = hybrid_optimizers(model, scale_lr=1e-2, accum_threshold=4)
    assert isinstance(adam, torch.optim.AdamW)
    ws = [model[0].weight, model[2].weight]
    ls0 = [w.log2_scale.detach().clone() for w in ws]
    T0 = [w.trits().clone() for w in ws]
    E0 = [w.E.clone() for w in ws]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    y = (x[:, :3]).argmax(1)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        flip.step()
        adam.step()
        adam.zero_grad()
        losses.append(loss.item())
    for w, ls, T, E in zip(ws, ls0, T0, E0):
        assert not torch.equal(w.log2_scale.detach(), ls)  # AdamW moved the float scales
        assert not torch.equal(w.trits(), T)  # votes moved the trits
        assert torch.equal(w.E, E) and (w.E_accum == 0).all()  # integer E is unused in hybrid mode
    assert min(losses[-3:]) < losses[0]


def test_hybrid_needs_float_scales():
    model = ternarize(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="scale_mode='float'"):
        hybrid_optimizers(model)


def test_integer_bias_alone_and_ternary_scale_tensor_alone():
    bias = IntegerBias(3)
    opt = FlipOptimizer(bias)
    assert opt.modules_trained() == [bias]
    w = TernaryScaleTensor(3, 4, 2)
    assert FlipOptimizer(w).modules_trained() == [w]


def test_zero_gradient_casts_no_votes():
    lin = TernaryLinear(16, 8)
    FlipOptimizer(lin)
    x = torch.randn(4, 16)
    lin(x).backward(torch.zeros(4, 8))  # e.g. a branch that is dead on this batch
    assert (lin.weight.T_accum == 0).all() and (lin.weight.E_accum == 0).all()


# ------------------------------------------------------------------------------------ width scaling
def test_width_ref_scales_a_wide_layers_lr_and_nothing_else():
    """A weight summing more than width_ref inputs votes exactly as with width_ref 0 and lr * sqrt(ref / fan_in);
    the embedding (rows looked up) and the narrow layer vote at the group's lr."""
    def bias_free(seed: int) -> TinyNet:  # (an integer bias has no fan-in: it would vote at its group's lr)
        model = TinyNet(seed)
        g = torch.Generator().manual_seed(seed + 1)
        model.fc1 = TernaryLinear(DIM, HIDDEN, group_size=8, generator=g)
        return model

    model_a, model_b = bias_free(0), bias_free(0)
    # fc1 sums DIM=12 inputs, fc2 HIDDEN=10, the embedding none: width_ref 6 scales fc1 by sqrt(1/2), fc2 by
    # sqrt(6/10)
    opt_a = FlipOptimizer(model_a, lr=3.0, seed=1, accum_threshold=4, width_ref=6)
    opt_b = FlipOptimizer([{"params": [model_b.emb], "lr": 3.0},
                           {"params": [model_b.fc1], "lr": 3.0 * (6 / 12) ** 0.5},
                           {"params": [model_b.fc2], "lr": 3.0 * (6 / 10) ** 0.5}],
                          seed=1, accum_threshold=4, width_ref=0)
    train(model_a, opt_a, 3, data_seed=3)
    train(model_b, opt_b, 3, data_seed=3)
    assert_states_equal(integer_state(model_a), integer_state(model_b))
    # ... and the scaling has teeth: without it the state differs
    model_c = bias_free(0)
    train(model_c, FlipOptimizer(model_c, lr=3.0, seed=1, accum_threshold=4, width_ref=0), 3, data_seed=3)
    assert states_differ(integer_state(model_a), integer_state(model_c))


def test_a_state_saved_before_width_scaling_resumes_without_it():
    model = TinyNet(seed=0)
    opt = FlipOptimizer(model, seed=2, accum_threshold=4, width_ref=6)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["width_ref"] == 6
    old = copy.deepcopy(sd)
    for g in old["param_groups"]:
        del g["width_ref"]  # what a checkpoint written before the field existed holds
    opt.load_state_dict(old)
    assert opt.param_groups[0]["width_ref"] == 0
    assert "width_ref" not in old["param_groups"][0]  # the caller's dict is not edited


def test_batch_tokens_scale_a_wide_layers_lr_like_the_formula():
    """A run of batch_tokens < tokens_ref votes in a wide layer exactly as lr * vote_width_scale(...) says; a
    state saved before the fields existed resumes with them off (0)."""
    def bias_free(seed: int) -> TinyNet:
        model = TinyNet(seed)
        model.fc1 = TernaryLinear(DIM, HIDDEN, group_size=8, generator=torch.Generator().manual_seed(seed + 1))
        return model

    model_a, model_b = bias_free(0), bias_free(0)
    opt_a = FlipOptimizer(model_a, lr=3.0, seed=1, accum_threshold=4, width_ref=6, batch_tokens=8, tokens_ref=32)
    opt_b = FlipOptimizer([{"params": [model_b.emb], "lr": 3.0},
                           {"params": [model_b.fc1], "lr": 3.0 * (6 / 12) ** 0.5 * 0.5},
                           {"params": [model_b.fc2], "lr": 3.0 * (6 / 10) ** 0.5 * 0.5}],
                          seed=1, accum_threshold=4, width_ref=0)
    train(model_a, opt_a, 3, data_seed=3)
    train(model_b, opt_b, 3, data_seed=3)
    assert_states_equal(integer_state(model_a), integer_state(model_b))
    old = copy.deepcopy(opt_a.state_dict())
    for g in old["param_groups"]:
        del g["tokens_ref"], g["batch_tokens"]
    opt_a.load_state_dict(old)
    assert (opt_a.param_groups[0]["tokens_ref"], opt_a.param_groups[0]["batch_tokens"]) == (0, 0)
