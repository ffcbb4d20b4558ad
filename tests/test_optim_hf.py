"""FlipOptimizer in the Hugging Face / torch training ecosystem: lr schedulers (what they scale, state-dict round
trips, identical resumes), gradient accumulation (N micro-batches make one big batch's step), the mixed optimiser
(``optim.for_model``: ternary weights by votes, float parameters by AdamW), ``optim.TrainStep``, and a tiny
transformers Llama trained by Trainer (save, resume from checkpoint) and by an accelerate loop."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trueternary import FlipOptimizer, TernaryEmbedding, TernaryLinear, ternarize
from trueternary.optim import MixedOptimizer, TrainStep, for_model

VOCAB, DIM, HIDDEN, CLASSES = 24, 16, 12, 5


class Net(nn.Module):
    """Embedding (row votes) -> mean -> Linear with an integer bias -> float LayerNorm -> Linear: every kind of
    ternary state, and float parameters (the norm) for the mixed optimiser."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = TernaryEmbedding(VOCAB, DIM, padding_idx=0, group_size=8, generator=g)
        self.fc1 = TernaryLinear(DIM, HIDDEN, bias=True, group_size=4, generator=g)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc2 = TernaryLinear(HIDDEN, CLASSES, group_size=4, generator=g)

    def forward(self, idx):
        return self.fc2(self.norm(torch.relu(self.fc1(self.emb(idx).mean(1)))))


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, 6), generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def loss_of(model, xy) -> torch.Tensor:
    return F.cross_entropy(model(xy[0]), xy[1])


def train(model, opt, steps: int, first_seed: int, sched=None) -> list[float]:
    lrs = []
    for i in range(steps):
        loss_of(model, batch(first_seed + i)).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def int_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def saved(obj):
    """``obj`` through torch.save / torch.load(weights_only=True), as Trainer and accelerate checkpoint it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------ lr schedulers


def _hf_linear(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "hf-linear-warmup": _hf_linear,
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_state_round_trip_and_identical_resume(name):
    """A scheduler adds ``initial_lr`` to the groups; the optimiser's state dict still loads (it used to fail with
    "unknown FlipRule fields"), and a run saved and resumed mid-schedule continues bit for bit."""
    model = Net()
    opt = FlipOptimizer(model, lr=4.0, seed=3, accum_threshold=6)
    sched = SCHEDULERS[name](opt)
    assert "initial_lr" in opt.param_groups[0]
    opt.load_state_dict(opt.state_dict())  # the round trip accelerate's prepare() does
    train(model, opt, 3, first_seed=0, sched=sched)
    ckpt = saved({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    lrs_a = train(model, opt, 4, first_seed=10, sched=sched)

    model_b = Net(seed=1)
    model_b.load_state_dict(ckpt["model"])
    opt_b = FlipOptimizer(model_b, lr=1.0)
    sched_b = SCHEDULERS[name](opt_b)
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert opt_b.param_groups[0]["initial_lr"] == 4.0 and opt_b.param_groups[0]["accum_threshold"] == 6
    lrs_b = train(model_b, opt_b, 4, first_seed=10, sched=sched_b)
    assert lrs_a == lrs_b and len(set(lrs_a)) > 1  # the schedule moved, and moved the same way
    assert_same(int_state(model), int_state(model_b))
    assert opt.state_dict()["trueternary"] == opt_b.state_dict()["trueternary"]


def test_scheduler_scales_the_votes_and_not_decay():
    """``lr`` is the vote scale: a scheduler's factor scales the votes a step casts (E|floor(s g + u)| = |s g|
    below the clip); ``decay`` (votes toward 0, the weight-decay analogue) is not scaled."""
    def votes(factor: float, decay: float = 0.0) -> float:
        model = Net()
        for w in (model.fc1.weight, model.fc2.weight, model.emb.weight):
            w.T_accum.zero_()
        opt = FlipOptimizer(model, lr=2.0, decay=decay, scale_update_interval=0)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor)
        train(model, opt, 1, first_seed=0)
        return sum(float(w.T_accum.abs().float().sum()) for w in (model.fc1.weight, model.fc2.weight))

    full, quarter = votes(1.0), votes(0.25)
    assert 0.15 < quarter / full < 0.35, (full, quarter)
    assert votes(0.0) == 0.0
    assert votes(0.0, decay=0.5) > 0  # decay votes are cast at a scheduled lr of 0


def test_unknown_keys_in_constructor_groups_still_raise():
    model = Net()
    with pytest.raises(ValueError, match="unknown FlipRule fields"):
        FlipOptimizer([{"params": model, "acum_threshold": 4}])


def test_moving_the_model_after_building_the_optimizer_keeps_its_state():
    """Trainer and accelerate move the model to its device after the optimiser is built, which replaces every
    buffer (the tensors the groups list). The optimiser follows the modules: the same training and the same
    state dict as a model that never moved. (``_apply(clone)`` is what ``.to(device)`` does to buffers.)"""
    base = Net()
    moved, still = copy.deepcopy(base), copy.deepcopy(base)
    opt_m, opt_s = FlipOptimizer(moved, seed=1), FlipOptimizer(still, seed=1)
    train(moved, opt_m, 2, first_seed=0)
    train(still, opt_s, 2, first_seed=0)
    moved._apply(lambda t: t.clone())
    assert opt_m.param_groups[0]["params"][0] is not moved.emb.weight.T_accum
    train(moved, opt_m, 2, first_seed=2)
    train(still, opt_s, 2, first_seed=2)
    assert_same(int_state(moved), int_state(still))
    sd_m, sd_s = opt_m.state_dict(), opt_s.state_dict()
    assert sd_m["state"].keys() == sd_s["state"].keys() and len(sd_m["state"]) == 2  # fc1's and fc2's codes
    assert all(torch.equal(sd_m["state"][i][k], sd_s["state"][i][k]) for i in sd_s["state"] for k in sd_s["state"][i])
    moved._apply(lambda t: t.clone())
    opt_m.load_state_dict(saved(sd_s))
    train(moved, opt_m, 1, first_seed=4)
    train(still, opt_s, 1, first_seed=4)
    assert_same(int_state(moved), int_state(still))


# ------------------------------------------------------------------------------------ gradient accumulation


def micro_batch_step(model, opt, n: int, seed: int = 0) -> None:
    x, y = batch(seed, 16)
    for xs, ys in zip(x.chunk(n), y.chunk(n)):
        (loss_of(model, (xs, ys)) / n).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("n", [2, 4])
def test_accumulated_micro_batches_make_the_big_batch_step(n):
    """With grad_accumulation, N micro-batches (losses scaled by 1/N) vote once on the summed gradient: the
    step of one batch N times as large, up to the float sums' order (a vote can differ only where s*g + u lies
    within rounding of an integer; 0.1% of the state may). Without it, every micro-batch votes: more votes."""
    base = Net()
    states = {}
    for label, n_micro, acc in (("big", 1, True), ("micro", n, True), ("micro-per-call", n, False)):
        model = copy.deepcopy(base)
        opt = FlipOptimizer(model, seed=1, grad_accumulation=acc)
        micro_batch_step(model, opt, n_micro, seed=0)
        micro_batch_step(model, opt, n_micro, seed=1)
        states[label] = int_state(model)
    big, micro = states["big"], states["micro"]
    differ = sum(int((big[k] != micro[k]).sum()) for k in big)
    total = sum(v.numel() for v in big.values())
    assert differ <= total // 1000, (differ, total)
    votes = {k: sum(float(s[k].abs().float().sum()) for k in s if k.endswith("T_accum")) for k, s in states.items()}
    assert votes["micro-per-call"] > 1.3 * votes["big"], votes


def test_one_backward_votes_the_same_with_and_without_accumulation():
    """One backward per step: the summed gradient is the call's, voted with the same RNG counter and
    normalisation (an embedding's sum votes as its row call), so the states are equal bit for bit."""
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train(a, FlipOptimizer(a, seed=2), 3, first_seed=0)
    train(b, FlipOptimizer(b, seed=2, grad_accumulation=True), 3, first_seed=0)
    assert_same(int_state(a), int_state(b))


def test_accumulation_sums_a_tied_weight_over_its_row_and_matrix_calls():
    """An output layer sharing the embedding's weight: its matrix call and the embedding's row calls sum into
    one gradient, voted once per step as a whole matrix."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = TernaryEmbedding(VOCAB, DIM, group_size=8, generator=torch.Generator().manual_seed(0))
            self.head = TernaryLinear(DIM, VOCAB, group_size=8, init=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    def run(n: int) -> dict:
        model = Tied()
        opt = FlipOptimizer(model, seed=0, grad_accumulation=True)
        assert len(opt.modules_trained()) == 1
        x = batch(0)[0]
        for xs in x.chunk(n):
            (F.cross_entropy(model(xs), xs[:, 0]) / n).backward()
        opt.step()
        return int_state(model)

    one, two = run(1), run(2)
    assert sum(int((one[k] != two[k]).sum()) for k in one) <= 2
    assert one["emb.weight.T_accum"].ne(0).float().mean() > 0.5  # every row votes (the matrix call touches all)


def test_step_consumes_the_summed_gradient_and_zero_grad_drops_it():
    model = Net()
    opt = FlipOptimizer(model, grad_accumulation=True, scale_update_interval=0)
    loss_of(model, batch(0)).backward()
    opt.step()
    after = int_state(model)
    opt.step()  # no backward since: nothing to vote on (Trainer zeroes only the model's float gradients)
    assert_same(after, int_state(model))
    loss_of(model, batch(1)).backward()
    opt.zero_grad()
    opt.step()
    assert_same(after, int_state(model))


# ------------------------------------------------------------------------------------ the mixed optimiser


def test_for_model_trains_ternary_and_float_parameters_as_one_optimizer():
    model = Net()
    opt = for_model(model, lr=4.0, float_lr=1e-2, weight_decay=0.1, seed=4)
    assert isinstance(opt, MixedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    flip_groups = len(opt.flip.param_groups)
    assert [g["lr"] for g in opt.param_groups] == [4.0] * flip_groups + [1e-2]
    assert opt.param_groups[flip_groups]["weight_decay"] == 0.0  # the norm's gain and bias: vectors, not decayed
    norm_before, tern_before = copy.deepcopy(model.norm.state_dict()), int_state(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [2.0] * flip_groups + [5e-3]  # one factor for every group
    train(model, opt, 2, first_seed=0, sched=sched)
    assert not torch.equal(model.norm.weight, norm_before["weight"])
    assert any(not torch.equal(v, tern_before[k]) for k, v in int_state(model).items())
    assert model.norm.weight.grad is None  # zero_grad reached the float part

    ckpt = saved({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    train(model, opt, 3, first_seed=5, sched=sched)
    model_b = Net(seed=9)
    model_b.load_state_dict(ckpt["model"])
    opt_b = for_model(model_b, lr=1.0, float_lr=1.0)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 0.5)
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    train(model_b, opt_b, 3, first_seed=5, sched=sched_b)
    assert_same(model.state_dict(), model_b.state_dict())  # float parameters included


def test_mixed_state_dict_is_checked_whole_before_loading():
    model = Net()
    opt = for_model(model)
    train(model, opt, 1, first_seed=0)
    before = saved(opt.state_dict())
    with pytest.raises(ValueError, match="not a MixedOptimizer state_dict"):
        opt.load_state_dict(before["flip"])
    bad = saved(opt.state_dict())
    bad["float"]["param_groups"][0]["params"] = [0]
    bad["flip"]["trueternary"]["step"] = 99
    with pytest.raises(ValueError, match="float part does not match"):
        opt.load_state_dict(bad)
    assert opt.flip.step_count == 1  # the flip part was not loaded either
    strict = Net()
    for p in strict.norm.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no float optimiser"):
        for_model(strict).load_state_dict(before)


# ------------------------------------------------------------------------------------ TrainStep (eager on CPU)


def test_train_step_is_the_plain_loop_on_cpu_and_refuses_a_graph_there():
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, opt_b = for_model(a, seed=1), for_model(b, seed=1)
    step = TrainStep(a, opt_a, loss_of, batch(0))
    assert not step.graphed and "not a CUDA device" in step.eager_reason
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (1 + s))
    losses = []
    for i in range(3):
        losses.append(float(step(batch(i))))
        sched.step()
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    losses_b = []
    for i in range(3):
        loss = loss_of(b, batch(i))
        loss.backward()
        opt_b.step()
        opt_b.zero_grad()
        sched_b.step()
        losses_b.append(float(loss.detach()))
    assert losses == losses_b
    assert_same(a.state_dict(), b.state_dict())
    with pytest.raises(ValueError, match="cannot capture this step in a CUDA graph"):
        TrainStep(a, opt_a, loss_of, batch(0), cuda_graph=True)


def test_compiled_train_step_traces_through_the_ternary_layers_and_trains_the_same():
    """``compile``: the ternary layers are torch.library ops, so the whole loss (embedding with row votes, linear
    with an integer bias, float norm) is one graph without a break, and AOTAutograd (which keeps the float ops
    as they are) gives the same steps bit for bit as the plain loop."""
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, opt_b = for_model(a, seed=1), for_model(b, seed=1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_of)(copy.deepcopy(a), batch(0))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    step = TrainStep(a, opt_a, loss_of, batch(0), compile={"backend": "aot_eager"})
    for i in range(2):
        step(batch(i))
    train(b, opt_b, 2, first_seed=0)
    assert_same(a.state_dict(), b.state_dict())
    before = int_state(base)
    assert any(not torch.equal(v, before[k]) for k, v in int_state(a).items())  # (it trained)


# ------------------------------------------------------------------------------------ Hugging Face


def tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # strict=False: the RMSNorm gains stay float parameters, so the mixed optimiser's AdamW part is exercised
        return ternarize(transformers.LlamaForCausalLM(cfg), strict=False)


def test_ternarised_llama_forward_and_backward_read_nothing_on_the_host_while_capturing(no_host_reads,
                                                                                       monkeypatch):
    """What TrainStep captures in a CUDA graph of a transformers model must not read a tensor on the host.
    transformers skips its host-side look at the positions while a CUDA stream captures; faked here on the CPU,
    the forward after the embedding (whose range check is skipped while capturing) and the backward with its
    votes read nothing."""
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    model = tiny_llama()
    opt = FlipOptimizer(model)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    guard = no_host_reads("in a ternarised Llama's forward and backward")
    model.model.embed_tokens.register_forward_hook(lambda *args: guard.__enter__())
    try:
        logits = model(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    finally:
        guard.__exit__(None, None, None)
    opt.step()
    assert int(model.model.embed_tokens.weight.T_accum.abs().sum()) > 0  # the votes were cast


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 12):
        self.x = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.fixture
def fresh_accelerate_state():
    """Trainer and Accelerator share accelerate's process-wide state: each test starts and ends without it."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    yield
    state.AcceleratorState._reset_state(True)


def test_hf_trainer_trains_saves_and_resumes_bit_identically(tmp_path, fresh_accelerate_state):
    """Trainer with the mixed optimiser (grad_accumulation, Trainer's gradient_accumulation_steps=2 and its linear
    schedule, voting from the first step): 4 steps straight, against 2 steps, a checkpoint, and
    resume_from_checkpoint into a model that starts elsewhere (another seed): the same losses and the same model,
    every trit, scale and accumulator. The checkpoint is a save_pretrained folder with the training state."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    def trainer(model, opt, out):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            save_steps=2, lr_scheduler_type="linear", warmup_steps=0, report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True, logging_steps=1, save_only_model=False)
        return transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))

    def losses(t) -> dict[int, float]:
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    straight = tiny_llama()
    start = int_state(straight)
    opt = for_model(straight, lr=4.0, float_lr=1e-2, grad_accumulation=True)
    run = trainer(straight, opt, tmp_path)
    run.train()
    assert opt.flip.step_count == 4
    assert any(not torch.equal(v, start[k]) for k, v in int_state(straight).items())
    with safe_open(tmp_path / "checkpoint-2" / "model.safetensors", "pt") as f:
        assert any(k.endswith(".T_accum") for k in f.keys())

    resumed = tiny_llama(seed=1)
    assert any(not torch.equal(v, start[k]) for k, v in int_state(resumed).items())
    opt_r = for_model(resumed, lr=1.0, grad_accumulation=True)
    run_r = trainer(resumed, opt_r, tmp_path / "resumed")
    run_r.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert opt_r.flip.step_count == 4 and opt_r.param_groups[0]["initial_lr"] == 4.0
    assert losses(run_r) == losses(run) and len(losses(run)) == 4
    assert_same(straight.state_dict(), resumed.state_dict())


def test_accelerate_accumulation_makes_the_big_batch_step(fresh_accelerate_state):
    """An accelerate loop with gradient_accumulation_steps=2 (it scales each micro-batch's loss by 1/2 and
    steps every second batch) makes the steps of a plain loop over batches twice as large."""
    accelerate = pytest.importorskip("accelerate")
    base = tiny_llama()
    data = TokenData(n=8)
    model, ref = copy.deepcopy(base), copy.deepcopy(base)

    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = for_model(model, lr=4.0, float_lr=1e-2, seed=5, grad_accumulation=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    for b in loader:
        with acc.accumulate(model):
            acc.backward(model(**b).loss)
            opt.step()
            sched.step()
            opt.zero_grad()

    opt_ref = for_model(ref, lr=4.0, float_lr=1e-2, seed=5, grad_accumulation=True)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda s: 1.0 / (1 + s))
    for b in torch.utils.data.DataLoader(data, batch_size=4):
        ref(**b).loss.backward()
        opt_ref.step()
        sched_ref.step()
        opt_ref.zero_grad()
    assert opt_ref.flip.step_count == 2 and acc.unwrap_model(model) is not None
    got, want = int_state(acc.unwrap_model(model)), int_state(ref)
    differ = sum(int((got[k] != want[k]).sum()) for k in want)
    assert differ <= sum(v.numel() for v in want.values()) // 1000, differ
    assert any(not torch.equal(v, int_state(base)[k]) for k, v in want.items())
