"""SignGSD, the seed's latent-weight optimiser (``SignSGD_Old`` in ``bench``), and the base of stateless
per-parameter float optimisers: ``step()`` applies a pure per-parameter update to every parameter with a
gradient, after checking that the gradient is finite."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import NonFiniteGradientError


def check_lr(lr) -> None:
    if not isinstance(lr, (int, float)) or not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


class PerParameterOptimizer(torch.optim.Optimizer):
    """A stateless optimiser whose ``step()`` applies ``_update(p, grad, group)`` to every parameter that has a
    gradient (the math lives in a pure per-parameter function)."""

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not bool(torch.isfinite(p.grad).all()):
                    raise NonFiniteGradientError(f"{type(self).__name__} got a NaN/inf gradient")
                self._update(p, p.grad, group)
        return loss


class SignGSD(PerParameterOptimizer):
    """Stateless sign descent: ``p -= lr * (sign(g) + weight_decay * sign(p))``. Zero optimiser state."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        check_lr(lr)
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0 or weight_decay == float("inf"):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        signgsd_update_(p, grad, group["lr"], group["weight_decay"])


def signgsd_update_(p: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float) -> None:
    """The per-parameter SignGSD math (pure, in place; ``step()`` has checked that ``grad`` is finite)."""
    upd = torch.sign(grad)
    if weight_decay:
        upd = upd + weight_decay * torch.sign(p)
    p.add_(upd, alpha=-lr)
