"""What every vote of one FlipOptimizer shares, whichever backend casts it: :class:`VoteContext`.

    seed         key of the counter-based RNG behind stochastic votes (rng.py)
    counters     :class:`StepCounters`: the optimiser step and each weight's call index within it, the RNG
                 counter of a vote call being ``step * CALLS_PER_STEP + call``
    finite       :class:`FiniteCheck`: NaN/inf gradients drop their layer's votes and are counted on the device
    norm_codes   the weight's integer codes of the normaliser's moving averages (``norm_beta``), kept in the
                 optimiser's state (so ``state_dict`` saves them) and created there on first use

Host and device steps. Dense votes read the step on the host. Calls that must not read the host (the Triton
kernels, an embedding's row votes: a CUDA graph captures them) read a 0-dim int64 copy of the step on their
device, which ``FlipOptimizer.step`` advances with a device op, so a replayed graph draws fresh random numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import NonFiniteGradientError  # noqa: F401 (raised by FlipOptimizer.step; its former home)

CALLS_PER_STEP = 1024  # RNG counter slots per step: a weight may be called this often per step
BIAS_VOTE_CLIP = 2**20  # largest |vote| of an integer bias (its int32 q is its own accumulator)
BIAS_Q_MAX = 2**31 - 1  # a bias's int32 q saturates at +-(2**31 - 1)
NORM_SALT = 0x4E4F524D  # RNG key salt of the norm_beta codes' rounding (one stream for all ranks)


class StepCounters:
    """The optimiser step on the host and on each device, and each weight's vote calls in the current step."""

    def __init__(self) -> None:
        self.step = 0
        self.calls: dict[int, int] = {}  # id(module) -> vote calls this step
        self.device_steps: dict[torch.device, torch.Tensor] = {}

    def call_index(self, m) -> int:
        """This step's index of the vote call for ``m`` (counted on the host, modulo ``CALLS_PER_STEP``)."""
        c = self.calls.get(id(m), 0)
        self.calls[id(m)] = c + 1
        return c % CALLS_PER_STEP

    def host_counter(self, m) -> int:
        """The RNG counter of this call for ``m`` from the host step: ``step * CALLS_PER_STEP + call``."""
        return self.step * CALLS_PER_STEP + self.call_index(m)

    def device_step(self, device: torch.device) -> torch.Tensor:
        """The step as a 0-dim int64 tensor on ``device``, created from the host step on first use."""
        t = self.device_steps.get(device)
        if t is None:
            t = self.device_steps[device] = torch.full((), self.step, dtype=torch.int64, device=device)
        return t

    def new_step(self) -> None:
        """The calls of the step that ends now are counted; the next step's start at 0."""
        self.calls.clear()

    def advance(self) -> None:
        """A step done: the host step and (with a device op, which a CUDA graph captures) every device copy."""
        self.step += 1
        for t in self.device_steps.values():
            t.add_(1)

    def set(self, step: int) -> None:
        """Continue from ``step`` (a loaded state): every copy of the step, no calls yet."""
        self.step = step
        for t in self.device_steps.values():
            t.fill_(step)
        self.calls.clear()

    def sync_from_device(self) -> None:
        """Take the step from the device (authoritative: replayed CUDA graphs advance only it). A host read."""
        if self.device_steps:
            self.step = int(next(iter(self.device_steps.values())).item())


class FiniteCheck:
    """NaN/inf gradients: a layer whose gradient has NaN/inf casts no votes and is counted on the device
    (``count``, no host sync); :meth:`take` reads the count once per step. After :meth:`defer` the count is
    moved to ``deferred`` instead (a CUDA-graphed step reads it there)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.count: torch.Tensor | None = None
        self.deferred: torch.Tensor | None = None

    def counter(self, device: torch.device) -> torch.Tensor | None:
        """The int32 count of non-finite layer gradients this step, on ``device`` (None when disabled)."""
        if not self.enabled:
            return None
        if self.count is None or self.count.device != device:
            self.count = torch.zeros((), dtype=torch.int32, device=device)
        return self.count

    def flag(self, g: torch.Tensor) -> torch.Tensor | None:
        """Count (on the device, no sync) whether ``g`` has NaN/inf; returns the 0-dim 'bad' flag."""
        counter = self.counter(g.device)
        if counter is None:
            return None
        bad = ~torch.isfinite(g).all()  # by element: a sum of squares would overflow for finite g beyond 1.8e19
        counter += bad.to(torch.int32)
        return bad

    def defer(self, device: torch.device) -> None:
        """Check, and keep the count on ``device`` for the caller (:attr:`deferred`) instead of reading it."""
        self.enabled = True
        self.counter(device)  # created now: a graph must not allocate it
        self.deferred = torch.zeros((), dtype=torch.int32, device=device)

    def take(self) -> int:
        """The number of non-finite layer gradients since the last call, the counter zeroed: a host read, or 0
        after :meth:`defer` (then the count is in :attr:`deferred`)."""
        if self.count is None or not self.enabled:
            return 0
        if self.deferred is not None:
            self.deferred.copy_(self.count)
            self.count.zero_()
            return 0
        bad = int(self.count.item())
        self.count.zero_()
        return bad


class VoteContext:
    """The state every vote backend of one optimiser shares (module docstring)."""

    def __init__(self, seed: int, check_finite: bool,
                 norm_codes: Callable[[object, dict], dict[str, torch.Tensor]]) -> None:
        self.seed = seed
        self.counters = StepCounters()
        self.finite = FiniteCheck(check_finite)
        self.norm_codes = norm_codes
