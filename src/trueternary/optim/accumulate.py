"""Gradient accumulation for FlipOptimizer (``grad_accumulation=True``): one vote per step on the summed gradient.

By default a FlipOptimizer votes in backward, on each call's gradient, normalised per call: N micro-batches
cast N times the votes of one batch N times as large. With ``grad_accumulation=True`` backward only adds each
weight's gradient into a float32 buffer here (what torch keeps in ``.grad``), and ``step()`` casts one vote per
weight on the sum, then flips. Micro-batches whose losses are scaled by 1/N (as Hugging Face Trainer and
accelerate scale them) sum to the gradient of their mean loss, so N of them make the step one batch N times
as large makes, up to the order of the float sums.

Per weight this keeps, between the first backward of a step and ``step()``:

    grad     float32 (rows, cols)   the summed gradient (bias: (n,))
    touched  bool (rows,)           row calls only (an embedding's backward): the rows any call touched
    dense    bool                   a whole-matrix call contributed (a tied lm_head on an embedding's weight)

At ``step()`` a weight that only had row calls votes like one row call on its touched rows (untouched rows cast
no votes and keep their accumulators, the normalisation averages over the touched rows); any other votes like
one whole-matrix call. With one backward per step the votes are the per-call votes bit for bit (the same
gradient, RNG counter and normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Pending:
    module: nn.Module
    grad: torch.Tensor
    touched: torch.Tensor | None = None
    dense: bool = False


class GradAccumulator:
    """The summed gradients of one step, by module (module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def bytes(self) -> int:
        """Bytes held now (float gradients and row masks)."""
        return sum(p.grad.numel() * p.grad.element_size() + (p.touched.numel() if p.touched is not None else 0)
                   for p in self._pending.values())

    @torch.no_grad()
    def add(self, module: nn.Module, g: torch.Tensor, rows: torch.Tensor | None = None,
            n_rows: torch.Tensor | None = None) -> None:
        """Add a weight's (or a bias's) gradient ``g``: the whole matrix, or (``rows``) the rows ``rows`` of which
        the first ``n_rows`` are real (the rest padding of a static shape, whose gradient is ignored)."""
        p = self._pending.get(id(module))
        if rows is None:
            gf = g.detach().float()
            if p is None:
                # the sum starts as a tensor of its own: a copy, unless .float() already made one
                own = gf.clone() if gf.data_ptr() == g.data_ptr() else gf
                self._pending[id(module)] = _Pending(module, own, dense=True)
            else:
                p.grad.add_(gf.view_as(p.grad))
                p.dense = True
            return
        if p is None:
            shape = (module.rows, module.cols)
            p = self._pending[id(module)] = _Pending(
                module, torch.zeros(shape, dtype=torch.float32, device=g.device),
                torch.zeros(module.rows, dtype=torch.uint8, device=g.device))
        elif p.touched is None:
            p.touched = torch.zeros(module.rows, dtype=torch.uint8, device=g.device)
        rows = rows.reshape(-1).to(torch.int64)
        real = torch.ones(rows.numel(), dtype=torch.bool, device=g.device) if n_rows is None else (
            torch.arange(rows.numel(), device=g.device) < n_rows.to(g.device))
        g = torch.where(real[:, None], g.detach().float().reshape(rows.numel(), -1), 0.0)
        # index_put_ with accumulate adds repeated rows in a fixed order (index_add_'s CUDA atomics do not)
        p.grad.index_put_((rows,), g, accumulate=True)
        p.touched.scatter_reduce_(0, rows, real.to(torch.uint8), reduce="amax")

    def take(self, module: nn.Module) -> _Pending | None:
        """The module's summed gradient of this step (None: no backward reached it), removed from here."""
        return self._pending.pop(id(module), None)

    def clear(self) -> None:
        self._pending.clear()
