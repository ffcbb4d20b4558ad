"""The vote-backend interface: how a FlipOptimizer's votes are cast and its flips applied.

``FlipOptimizer`` owns the param groups, the step and the state dict; for everything that touches votes it
calls one :class:`VoteBackend`, chosen from its update backend and its data-parallel ``comm``:

    backend                 one process                     data parallel (comm.world_size > 1)
    dense-fallback          dense.DenseVotes                data_parallel.ExchangedVotes
    gpu, gpu-signcache      kernel.KernelVotes              data_parallel.ExchangedKernelVotes
    none                    VoteBackend (this base: no votes, no flips)

Calls, in the order of a training step (``group``: the weight's param group; ``lr``: the vote scale its
votes use, the group's number or, after ``FlipOptimizer.use_device_lr``, a device tensor):

    backward   cast_votes(weight, g, T, group, lr, rows, n_rows)   a formed weight gradient (any op)
               fuses_matmul_votes(gy, x, group)                    can gW = gy.T @ x be voted without forming it?
               cast_fused_matmul_votes(weight, gy, x, group, lr)   ... then vote it so
               cast_bias_votes(bias, g, group, lr)
    step()     exchange_votes()                                    collective, before anything can raise (data
                                                                   parallel: the ranks' gradients -> votes)
               skip_flips()                                        a step that raises: votes kept, no flips
               apply_flips(groups) -> (flips, scale_flips)
               end_step()
    state      flush_votes() / drop_votes()                        votes held back (vote caches) into T_accum /
                                                                   discarded (state_dict / load_state_dict)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .context import VoteContext


class FlipCounts:
    """The flips of one step: int64 counts from the reference flips, int32 ``(flips, scale flips)`` per device
    from the flip kernel (one buffer per device, so the step reads its totals with one sync)."""

    def __init__(self) -> None:
        self.flips: torch.Tensor | None = None
        self.scale_flips: torch.Tensor | None = None
        self.kernel: dict[torch.device, torch.Tensor] = {}
        self.kernel_scale = False  # a kernel flip considered E

    def add(self, n: torch.Tensor, ne: torch.Tensor | None) -> None:
        self.flips = n if self.flips is None else self.flips + n
        if ne is not None:
            self.scale_flips = ne if self.scale_flips is None else self.scale_flips + ne

    def kernel_counts(self, device: torch.device) -> torch.Tensor:
        """The flip kernel's int32 (2,) counts buffer on ``device``."""
        if device not in self.kernel:
            self.kernel[device] = torch.zeros(2, dtype=torch.int32, device=device)
        return self.kernel[device]

    def totals(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        flips, scale_flips = self.flips, self.scale_flips
        for counts in self.kernel.values():
            n = counts[0].to(torch.int64)
            flips = n if flips is None else flips + n.to(flips.device)
            if self.kernel_scale:
                ne = counts[1].to(torch.int64)
                scale_flips = ne if scale_flips is None else scale_flips + ne.to(scale_flips.device)
        return flips, scale_flips


class VoteBackend:
    """The interface (module docstring). This base casts no votes and applies no flips: the ``none`` backend,
    whose weights have no voter."""

    def __init__(self, ctx: VoteContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------------ backward
    def cast_votes(self, weight, g: torch.Tensor, T: torch.Tensor, group: dict, lr,
                   rows: torch.Tensor | None = None, n_rows: torch.Tensor | None = None) -> None:
        """Turn the weight gradient ``g`` (of ``rows``, default all) into votes in ``T_accum`` / ``E_accum``."""

    def fuses_matmul_votes(self, gy: torch.Tensor, x: torch.Tensor, group: dict) -> bool:
        """Whether :meth:`cast_fused_matmul_votes` votes ``gy.T @ x`` without the caller forming it."""
        return False

    def cast_fused_matmul_votes(self, weight, gy: torch.Tensor, x: torch.Tensor, group: dict, lr) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not fuse matmul votes")

    def cast_bias_votes(self, bias, g: torch.Tensor, group: dict, lr) -> None:
        """Votes for an integer bias (its own accumulator) from its gradient ``g``."""

    # ------------------------------------------------------------------ step
    def exchange_votes(self) -> None:
        """Start of ``step()``: exchange the votes held back for it (collective under data parallelism)."""

    def skip_flips(self) -> None:
        """A step that raises: the votes it exchanged go into the accumulators, nothing flips."""

    def apply_flips(self, groups: Iterable[tuple[dict, list]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Flip every weight of ``(param group, modules)`` pairs; returns the step's (flips, scale flips), None
        where nothing was counted."""
        return None, None

    def end_step(self) -> None:
        """After the flips of a step that did not raise."""

    # ------------------------------------------------------------------ state
    def flush_votes(self) -> None:
        """Votes held back (vote caches) go into ``T_accum`` now (so the modules' state is complete)."""

    def drop_votes(self) -> None:
        """Votes held back are discarded (they were cast on a state that is being replaced)."""
