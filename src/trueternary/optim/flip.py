"""FlipOptimizer: trains ternary weights by integer votes and flips.

It follows ``torch.optim.Optimizer``: ``param_groups`` carry the flip-rule hyper-parameters, ``step()`` applies
flips, ``state_dict()`` round-trips. Its "params" are the ``T_accum`` buffers of the ternary weights it trains
(and the ``q`` buffers of integer biases); there are no float weights and no per-weight float state (but the
summed gradients of ``grad_accumulation``, between backward and ``step()``). Its only named state is lazy: the
integer codes of the normaliser's moving averages of each weight matrix voted whole (``norm_beta > 0``), created
by its first vote.

lr schedulers. ``lr`` is the vote scale, the expected votes per call of a weight whose gradient is typical of its
row and column: a ``torch.optim.lr_scheduler`` (Hugging Face's schedules are ``LambdaLR`` schedules) scales it,
and with it the scale votes (``lr * scale_lr``); ``decay``, the thresholds and the clip are not scaled. Keys
that are not FlipRule fields (``initial_lr``, which every scheduler adds; ``max_lr`` ...) are the scheduler's
bookkeeping: kept in the groups and in ``state_dict()``, and loaded back.

Votes are cast during backward, when an op's autograd function hands the weight gradient (or, for a linear
map, ``gy`` and ``x``) to the weight's voter, this optimiser (:meth:`FlipOptimizer.cast_votes`,
:meth:`~FlipOptimizer.cast_matmul_votes`, :meth:`~FlipOptimizer.cast_bias_votes`), which passes it with the
weight's param group to its vote backend (backend.py: dense, kernel or data-parallel). With
``grad_accumulation=True`` backward sums the gradients instead (accumulate.py) and ``step()`` votes once on the
sum: gradient accumulation over micro-batches.

Construct it after the model is on its device (like any optimiser). Moving the model later (Trainer and
accelerate's ``prepare`` do) replaces its buffers, the tensors this optimiser's groups list: ``step()``,
``state_dict()`` and ``load_state_dict()`` first take the modules' current ones (:meth:`FlipOptimizer._sync_params`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import record_function

from ..backends import DEFAULT_UPDATE_BACKEND, UpdateBackend, resolve_backend
from ..errors import NonFiniteGradientError
from ..layers import IntegerBias
from ..rule import (
    STATE_BOUNDS,
    FlipRule,
    check_norm_codes,
    check_state_range,
    empty_norm_codes,
    uses_norm_memory,
    vote_width_scale,
)
from ..weight import TernaryScaleTensor, ternary_weights
from .accumulate import GradAccumulator
from .backend import VoteBackend
from .context import BIAS_Q_MAX, VoteContext
from .data_parallel import ExchangedKernelVotes, ExchangedVotes
from .dense import DenseVotes
from .kernel import KernelVotes

NORM_CODE_KEYS = ("norm_tile", "norm_row", "norm_col")  # a weight's named state (rule.empty_norm_codes)
STATE_FORMAT = 1  # state_dict()["trueternary"]["format"]


def vote_backend(backend: UpdateBackend, ctx: VoteContext, comm=None) -> VoteBackend:
    """The vote backend of ``backend`` (a concrete one, not ``auto``), data-parallel when ``comm`` spans
    several ranks."""
    parallel = comm is not None and comm.world_size > 1
    if backend is UpdateBackend.NONE:
        return VoteBackend(ctx)
    if backend.runs_kernels:
        if parallel:
            return ExchangedKernelVotes(ctx, comm)
        return KernelVotes(ctx, signcache=backend is UpdateBackend.GPU_SIGNCACHE)
    if backend is UpdateBackend.DENSE:
        return ExchangedVotes(ctx, comm) if parallel else DenseVotes(ctx)
    raise ValueError(f"{backend.value!r} is not a concrete update backend (resolve_backend)")


def _trainable_modules(obj) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        mods = ternary_weights(obj)
        mods += [m for m in obj.modules() if isinstance(m, IntegerBias)]
        return mods
    out: list[nn.Module] = []
    for m in obj:
        if not isinstance(m, (TernaryScaleTensor, IntegerBias, nn.Module)):
            raise TypeError(f"FlipOptimizer trains TernaryScaleTensor/IntegerBias modules, got {type(m).__name__}")
        out += _trainable_modules(m) if not isinstance(m, (TernaryScaleTensor, IntegerBias)) else [m]
    return out


def _state_tensor(m: nn.Module) -> torch.Tensor:
    return m.T_accum if isinstance(m, TernaryScaleTensor) else m.q


RULE_FIELDS = frozenset(FlipRule().to_dict())


def group_rule(group: dict) -> FlipRule:
    """The FlipRule of a param group (ValueError for a bad field): its FlipRule fields; the other keys (but
    ``params``) are an lr scheduler's bookkeeping (``initial_lr`` ...), which the rule leaves alone."""
    return FlipRule.from_dict({k: v for k, v in group.items() if k in RULE_FIELDS})


class FlipOptimizer(torch.optim.Optimizer):
    """Trains ternary weights by integer votes and flips.

    Args:
        params: a model (every TernaryScaleTensor / IntegerBias inside it), an iterable of such
            modules, or a list of param-group dicts ``{"params": modules, **rule_overrides}``.
        lr: vote scale (expected votes per unit of RMS-normalised gradient); defaults to ``rule.lr``.
        rule: a :class:`FlipRule` (default: ``FlipRule()``); keyword overrides of its fields
            (``accum_threshold=...``, ``scale_update_interval=...``) are applied on top.
        backend: an :class:`~trueternary.backends.UpdateBackend` or its name: ``dense-fallback`` (plain
            PyTorch), ``none`` (forward/backward only, no update), ``gpu`` / ``gpu-signcache`` (Triton
            kernels), or ``auto``. (The linear layers' kernels are a separate choice: ``layers.set_linear_kernel``.)
        seed: key of the counter-based RNG behind stochastic votes.
        check_finite: drop a layer's votes when its gradient has NaN/inf and raise
            :class:`NonFiniteGradientError` from the next ``step()`` (one device sync per step).
        grad_accumulation: sum the gradients of every backward since the last ``step()`` (a float32 buffer per
            trained weight, like torch's ``.grad``) and vote once on the sum in ``step()``: N micro-batches with
            losses scaled by 1/N make the step of one batch N times as large (accumulate.py). Off: every backward
            call votes on its own gradient, and no float gradient is kept.
    """

    def __init__(
        self,
        params,
        lr: float | None = None,
        *,
        rule: FlipRule | None = None,
        backend: UpdateBackend | str = DEFAULT_UPDATE_BACKEND,
        seed: int = 0,
        check_finite: bool = True,
        grad_accumulation: bool = False,
        **rule_overrides,
    ) -> None:
        rule = FlipRule() if rule is None else FlipRule.from_dict(rule.to_dict())
        if lr is not None:
            rule_overrides["lr"] = lr
        rule = FlipRule.from_dict({**rule.to_dict(), **rule_overrides})
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        backend = resolve_backend(backend)

        if isinstance(params, (nn.Module, TernaryScaleTensor)):
            groups = [{"params": _trainable_modules(params)}]
        else:
            params = list(params)
            if params and isinstance(params[0], dict):
                groups = [dict(g, params=_trainable_modules(g["params"])) for g in params]
            else:
                groups = [{"params": _trainable_modules(params)}]
        for g in groups:
            FlipRule.from_dict({**rule.to_dict(), **{k: v for k, v in g.items() if k != "params"}})  # the group's rule
            for m in g["params"]:
                if getattr(m, "inference_only", False):
                    raise ValueError("cannot train a weight whose training state was released (inference only)")
        if not any(g["params"] for g in groups):
            raise ValueError("FlipOptimizer got no ternary weights to train (did you call ternarize()?)")

        self._group_modules: list[list[nn.Module]] = [list(g["params"]) for g in groups]
        super().__init__([dict({k: v for k, v in g.items() if k != "params"},
                               params=[_state_tensor(m) for m in g["params"]]) for g in groups], rule.to_dict())
        self._ctx = VoteContext(seed, check_finite, self._norm_codes)
        self._grads: GradAccumulator | None = GradAccumulator() if grad_accumulation else None
        self._comm = None
        # use_device_lr: each param group's lr as a device tensor (CUDA-graphed steps)
        self._lr_dev: list[torch.Tensor] | None = None
        self.last_flips: torch.Tensor = torch.zeros((), dtype=torch.int64)
        self.last_scale_flips: torch.Tensor = torch.zeros((), dtype=torch.int64)
        stream = 0
        for gi, mods in enumerate(self._group_modules):
            for m in mods:
                m._group_index = gi
                m.stream = stream  # distinct RNG streams
                stream += 1
        self._backend = backend
        self._install_votes()

    # ------------------------------------------------------------------ settings
    @property
    def backend(self) -> UpdateBackend:
        return self._backend

    @backend.setter
    def backend(self, name: UpdateBackend | str) -> None:
        """Switch the update backend. Unlike the constructor (``auto`` aside) this does not check the device:
        on a CPU a kernel backend runs the kernels in Triton's interpreter (TRITON_INTERPRET=1), as the tests do.
        Votes held back by the previous backend are applied first."""
        backend = UpdateBackend.parse(name)
        self._votes.flush_votes()
        self._backend = resolve_backend(backend) if backend is UpdateBackend.AUTO else backend
        self._install_votes()

    @property
    def comm(self):
        """Data parallelism (trueternary.distributed.attach): the ranks' collectives (a
        ``distributed.VoteExchange``; optim/data_parallel.py says what it needs); None: one process."""
        return self._comm

    @comm.setter
    def comm(self, comm) -> None:
        self._votes.flush_votes()
        self._comm = comm
        self._install_votes()

    def _install_votes(self) -> None:
        """The vote backend for the current backend and comm; this optimiser becomes its weights' voter (a newer
        FlipOptimizer over the same model takes them over), none for the ``none`` backend."""
        self._votes = vote_backend(self._backend, self._ctx, self._comm)
        for m in self.modules_trained():
            m._voter = None if self._backend is UpdateBackend.NONE else self

    @property
    def seed(self) -> int:
        return self._ctx.seed

    @property
    def grad_accumulation(self) -> bool:
        """Whether backward sums gradients for one vote per step (constructor argument)."""
        return self._grads is not None

    @property
    def check_finite(self) -> bool:
        return self._ctx.finite.enabled

    @check_finite.setter
    def check_finite(self, on: bool) -> None:
        self._ctx.finite.enabled = bool(on)

    @property
    def world_size(self) -> int:
        """Data-parallel ranks that vote as one with this optimiser (1: one process)."""
        return self._comm.world_size if self._comm is not None else 1

    # ------------------------------------------------------------------ votes (called in backward)
    def _rule_of(self, m: nn.Module) -> tuple[dict, float | torch.Tensor]:
        """The param group of ``m`` and the lr its votes use: the group's number, or its device tensor after
        :meth:`use_device_lr`; times ``rule.vote_width_scale`` for a weight wider than the group's ``width_ref``."""
        group = self.param_groups[m._group_index]
        lr = group["lr"] if self._lr_dev is None else self._lr_dev[m._group_index]
        scale = vote_width_scale(group.get("width_ref", 0), getattr(m, "vote_fan_in", None),
                                 group.get("batch_tokens", 0), group.get("tokens_ref", 0))
        return group, lr if scale == 1.0 else lr * scale

    @torch.no_grad()
    def cast_votes(self, weight: TernaryScaleTensor, g: torch.Tensor, T: torch.Tensor | None, rows=None,
                   n_rows: torch.Tensor | None = None) -> None:
        """Turn the weight gradient ``g`` (of ``rows``, default all) into votes in ``T_accum`` / ``E_accum``.

        ``T`` is the int8 trit matrix (or its rows ``rows``; None: decoded from ``T_packed`` when needed). Row
        calls (an embedding's backward): only the first ``n_rows`` rows (a 0-dim device tensor; default all) vote,
        and nothing is read on the host, so a CUDA graph can capture them (dense.DenseVotes.cast_votes).
        """
        if self._grads is not None:
            self._grads.add(weight, g, rows, n_rows)
            return
        group, lr = self._rule_of(weight)
        self._votes.cast_votes(weight, g, T, group, lr, rows, n_rows)

    @torch.no_grad()
    def cast_matmul_votes(self, weight: TernaryScaleTensor, gy: torch.Tensor, x: torch.Tensor,
                          T: torch.Tensor | None) -> None:
        """Votes for a linear map's weight, whose gradient is ``gy.T @ x`` (gy: (M, rows), x: (M, cols)).

        A kernel backend turns it into votes in the vote kernel's epilogue when it can
        (:meth:`VoteBackend.fuses_matmul_votes <trueternary.optim.backend.VoteBackend.fuses_matmul_votes>`);
        otherwise the gradient is formed here and voted by :meth:`cast_votes`. ``T`` may be None (decoded from
        ``T_packed`` when needed).
        """
        if self._grads is not None:  # (formed as the dense path forms it: one backward votes the same)
            self._grads.add(weight, (gy.t() @ x).float())
            return
        group, lr = self._rule_of(weight)
        if self._votes.fuses_matmul_votes(gy, x, group):
            self._votes.cast_fused_matmul_votes(weight, gy, x, group, lr)
            return
        self.cast_votes(weight, (gy.t() @ x).float(), T)

    @torch.no_grad()
    def cast_bias_votes(self, bias: IntegerBias, g: torch.Tensor) -> None:
        """Votes for an integer bias go straight into its int32 ``q`` (it is its own accumulator)."""
        if self._grads is not None:
            self._grads.add(bias, g)
            return
        group, lr = self._rule_of(bias)
        self._votes.cast_bias_votes(bias, g, group, lr)

    def _cast_accumulated_votes(self) -> None:
        """``grad_accumulation``: every trained module's one vote call on its summed gradient, in the order of the
        param groups (the same on every rank). Row-only sums vote as a row call (accumulate.py)."""
        from ..ops.embedding import row_trits

        grads, self._grads = self._grads, None  # (the vote calls below must not be summed again)
        try:
            for m in self.modules_trained():
                p = grads.take(m)
                if p is None:
                    continue
                if isinstance(m, IntegerBias):
                    self.cast_bias_votes(m, p.grad)
                elif p.dense:
                    self.cast_votes(m, p.grad, m.trits())
                else:  # touched rows first (each part ascending), as an embedding's backward orders them
                    touched = p.touched.bool()
                    order = torch.argsort((~touched).to(torch.int8), stable=True)
                    self.cast_votes(m, p.grad[order], row_trits(m, order), rows=order, n_rows=touched.sum())
                del p
        finally:
            grads.clear()
            self._grads = grads

    # ------------------------------------------------------------------ flips (once per step)
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_params()
        counters = self._ctx.counters
        counters.new_step()
        if self._grads is not None:
            self._cast_accumulated_votes()
        self._votes.exchange_votes()
        bad = self._ctx.finite.take()
        if bad:
            self._votes.skip_flips()  # as on the dense path, the votes stay accumulated; no flips
            counters.advance()
            raise NonFiniteGradientError(
                f"{bad} layer gradient(s) had NaN/inf at step {counters.step - 1}; their votes were dropped"
            )
        with record_function("trueternary.flips"):
            flips, scale_flips = self._votes.apply_flips(zip(self.param_groups, self._group_modules))
        self._votes.end_step()
        if flips is not None:
            self.last_flips = flips
        if scale_flips is not None:
            self.last_scale_flips = scale_flips
        counters.advance()
        return loss

    def _sync_params(self) -> None:
        """Point the groups' params at the modules' current state tensors. ``model.to(device)`` replaces a module's
        buffers with new tensors, so the ones listed at construction go stale (torch keeps nn.Parameter objects
        across moves, not buffers); the normaliser's codes, which the state keys by them, move with them."""
        for group, mods in zip(self.param_groups, self._group_modules):
            params = group["params"]
            for i, m in enumerate(mods):
                live = _state_tensor(m)
                if params[i] is not live:
                    st = self.state.pop(params[i], None)
                    if st:
                        self.state[live] = {k: v.to(live.device) for k, v in st.items()}
                    params[i] = live

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Votes live in the integer accumulators: nothing to clear, but under ``grad_accumulation`` the gradients
        summed since the last ``step()`` (which ``step()`` consumes, so a loop that zeroes only the model's
        float gradients, as Hugging Face Trainer does, needs no call)."""
        if self._grads is not None:
            self._grads.clear()
        self._ctx.counters.new_step()

    @property
    def step_count(self) -> int:
        return self._ctx.counters.step

    def modules_trained(self) -> list[nn.Module]:
        return [m for mods in self._group_modules for m in mods]

    def state_bytes(self) -> int:
        """Bytes this optimiser holds beyond the modules' own buffers: the integer codes of ``norm_beta``."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values())

    def _norm_codes(self, weight: TernaryScaleTensor, group: dict) -> dict[str, torch.Tensor]:
        """The weight's moving-average codes in this optimiser's state (rule.empty_norm_codes on first use)."""
        st = self.state.get(weight.T_accum)
        if st is None:  # the model moved since the last step (or never voted): codes under the old tensor move
            self._sync_params()
        st = self.state[weight.T_accum]
        if "norm_tile" not in st:
            st.update(empty_norm_codes((weight.rows, weight.cols), group["norm_block"], weight.T_accum.device))
        return {k: st[k] for k in NORM_CODE_KEYS}

    # ------------------------------------------------------------------ CUDA-graphed steps
    def use_device_lr(self, device: torch.device | str) -> None:
        """Read each param group's lr from a 0-dim float32 tensor on ``device`` in every vote (kernels and dense
        path alike) instead of the group's number, which a captured CUDA graph would keep as a constant. Call
        before capturing a step; then :meth:`write_device_lr` before each replay, after the schedule has set the
        groups' ``lr``. ``lr * scale_lr`` (scale votes) is then a float32 product on the device."""
        self._lr_dev = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in self.param_groups]

    def write_device_lr(self) -> None:
        """Copy the param groups' lr into the device tensors of :meth:`use_device_lr` (not capturable: run it
        between replays)."""
        for t, g in zip(self._lr_dev or [], self.param_groups):
            t.fill_(float(g["lr"]))

    def defer_finite_check(self, device: torch.device | str) -> None:
        """Keep the NaN/inf gradient check without its host read, for a step captured in a CUDA graph.

        Layer gradients with NaN/inf still have their votes dropped and are still counted on the device, but
        :meth:`step` moves the count into ``last_step_nonfinite`` (a 0-dim int32 device tensor) and zeroes it
        instead of reading it and raising: the caller reads it after the step (``Recipe.use_cuda_graph`` turns
        a non-zero count into a NaN loss). Unlike the raising check, that step's flips are applied."""
        self._ctx.finite.defer(torch.device(device))

    @property
    def last_step_nonfinite(self) -> torch.Tensor | None:
        """After :meth:`defer_finite_check`: the count of non-finite layer gradients of the last step (device)."""
        return self._ctx.finite.deferred

    def create_step_state(self, device: torch.device | str, row_voted: set[int] = frozenset()) -> None:
        """Create now the state a kernel step creates on first use: the device step counter and, under a
        ``norm_beta`` rule, the moving averages' codes of every weight voted whole (not those whose ids are in
        ``row_voted``: embeddings vote per row and keep none). A CUDA graph captured before they exist would
        allocate them inside the graph, and each replay would start them afresh."""
        self._ctx.counters.device_step(torch.device(device))
        for group, mods in zip(self.param_groups, self._group_modules):
            if uses_norm_memory(group):
                for m in mods:
                    if isinstance(m, TernaryScaleTensor) and id(m) not in row_voted:
                        self._norm_codes(m, group)

    def after_graph_capture(self) -> None:
        """Call after capturing a training step (its backward and :meth:`step`) in a CUDA graph: the capture ran
        the step's host side (the host step counter moved on) but executed nothing, so it is put back."""
        self._ctx.counters.step -= 1
        self._ctx.counters.new_step()

    def after_graph_replay(self) -> None:
        """Call after each replay of a captured step: the host side of :meth:`step` (its step counter), which a
        replay does not run. (The device step counter, which the votes read, moved with the replay.)"""
        self._ctx.counters.step += 1
        self._ctx.counters.new_step()

    # ------------------------------------------------------------------ persistence
    def state_dict(self):
        # votes held in vote caches go into T_accum now, so the modules' state is complete; the device step
        # counter is authoritative (replayed CUDA graphs advance only it)
        self._votes.flush_votes()
        self._ctx.counters.sync_from_device()
        self._sync_params()
        sd = super().state_dict()
        sd["trueternary"] = {"format": STATE_FORMAT, "step": self.step_count, "seed": self.seed,
                             "backend": self._backend.value}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load ``state_dict`` after checking all of it (ValueError, nothing changed): the rule of every group, step
        and seed, the moving-average codes, and the integer state of the trained modules it resumes (``T_accum``,
        ``E``, ``E_accum`` in rule.STATE_BOUNDS, bias ``q``), loaded into them beforehand."""
        extra = state_dict.get("trueternary") if isinstance(state_dict, dict) else None
        if not isinstance(extra, dict) or extra.get("format") != STATE_FORMAT:
            raise ValueError("not a FlipOptimizer state_dict (missing or unknown 'trueternary' section)")
        for key in ("step", "seed"):
            v = extra.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ValueError(f"FlipOptimizer {key} must be an integer in [0, 2**63), got {v!r}")
        sd = {k: v for k, v in state_dict.items() if k != "trueternary"}
        groups = sd.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"expected {len(self.param_groups)} param groups, got {groups!r:.60}")
        if not all(isinstance(g, dict) for g in groups):
            raise ValueError("every param group must be a dict")
        # a state saved before width (or batch) scaling existed resumes without it (0: off), so it continues exactly
        groups = [{"width_ref": 0, "tokens_ref": 0, "batch_tokens": 0, **g} for g in groups]
        sd["param_groups"] = groups
        rules = [group_rule(g) for g in groups]
        self._check_resumed_state(sd, rules)
        self._sync_params()  # (loaded state goes to the modules' current tensors)
        super().load_state_dict(sd)
        self._ctx.seed = int(extra["seed"])
        self._ctx.counters.set(int(extra["step"]))
        self._votes.drop_votes()  # votes cast on the replaced state do not apply to the loaded one
        if self._grads is not None:
            self._grads.clear()  # (gradients of the replaced state, likewise)

    def _check_resumed_state(self, sd: dict, rules: list[FlipRule]) -> None:
        """ValueError unless the modules' integer state is in range and ``sd["state"]`` holds, per module, only the
        moving-average codes its group's rule keeps, of the right dtypes, shapes and ranges."""
        state = sd.get("state", {})
        if not isinstance(state, dict):
            raise ValueError(f"optimizer state must be a dict, got {type(state).__name__}")
        ids = {}
        for g, mods, rule in zip(sd["param_groups"], self._group_modules, rules):
            pids = g.get("params")
            if not isinstance(pids, list) or len(pids) != len(mods):
                raise ValueError(f"a param group lists {pids!r:.60} for its {len(mods)} modules")
            ids.update({pid: (m, rule) for pid, m in zip(pids, mods)})
        for pid, st in state.items():
            if pid not in ids or not isinstance(st, dict):
                raise ValueError(f"optimizer state for unknown parameter {pid!r:.40}")
            m, rule = ids[pid]
            if st and not (isinstance(m, TernaryScaleTensor) and uses_norm_memory(rule.to_dict())):
                raise ValueError(f"unexpected optimizer state {sorted(st)} for parameter {pid}")
            if st:
                check_norm_codes(f"parameter {pid}", st, (m.rows, m.cols), rule.norm_block)
        for pid, (m, _) in ids.items():
            if isinstance(m, TernaryScaleTensor):
                for name, (lo, hi) in STATE_BOUNDS.items():
                    check_state_range(f"parameter {pid}: {name}", getattr(m, name), lo, hi)
            else:
                check_state_range(f"parameter {pid}: bias q", m.q, -BIAS_Q_MAX, BIAS_Q_MAX)


def norm_codes_of(model: nn.Module, norm_block: int) -> list[dict[str, torch.Tensor]]:
    """The shapes (as meta tensors) of the normaliser codes a FlipOptimizer with ``norm_beta > 0`` keeps for
    ``model``: one set per ternary weight voted whole (an embedding's row votes keep none)."""
    from ..layers import TernaryEmbedding

    row_voted = {id(m.weight) for m in model.modules() if isinstance(m, TernaryEmbedding)}
    return [empty_norm_codes((w.rows, w.cols), norm_block, "meta") for w in ternary_weights(model)
            if id(w) not in row_voted]
