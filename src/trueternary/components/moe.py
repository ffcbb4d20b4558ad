"""Mixture of ternary experts: ternary router, top-k MLP experts, Triton dense combine, load balancing.

    logits = rms(router(x))                       router: Linear(d, n_experts) (ternary once ternarised);
                                                  the parameter-free RMS norm fixes the logit scale,
                                                  which a ternary weight's 2**E would otherwise set
    probs  = softmax(logits)
    choice = top_k(logits + balance_q * 2**BALANCE_EXP)      (the balance bias only steers selection)
    w      = probs[choice] / sum(probs[choice])              (routing weights, differentiable)
    Y      = expert_e(x[tokens routed to e])  for each e, concatenated in expert order
    out[t] = sum_j w[t, j] * Y[pos[t, j]]                    (ops.moe_combine: Triton / naive)

Experts are ``down(rms(relu(up(x))**2))`` MLPs (the transformer's FFN with SubLN), each called once per
forward on only its tokens, so each expert's ternary weights cast votes once per step, from its
own tokens. Routing is per token with no capacity limit (dropless): no token depends on another.

Load balancing (both on by default, both documented in docs/morph.md):

* **integer balance bias** (auxiliary-loss-free, as in DeepSeek-V3): an int32 buffer ``balance_q``;
  after every training forward, ``balance_q[e] += sign(mean_load - load_e)`` (saturating at
  ``BALANCE_Q_MAX``). Over-used experts become less likely to be picked. Integer state, no gradient,
  needs nothing from the training loop.
* **Switch aux loss** ``aux = n_experts * sum_e f_e * P_e`` (``f_e`` share of the k*N assignments,
  ``P_e`` mean router probability). Its gradient ``aux_coef * d aux`` is injected in backward by
  :class:`AuxLossScaler` (Megatron's MoEAuxLossAutoScaler pattern), so the unchanged recipes train the
  router on it without adding a loss term; ``last_aux_loss`` keeps the value for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TernaryLinear
from ..ops.moe_combine import moe_combine
from ..weight import DEFAULT_GROUP_SIZE

BALANCE_EXP = -6  # balance bias unit: 2**-6 of a unit-RMS router logit per step of imbalance
BALANCE_Q_MAX = 2**12  # |bias| <= 64 logit units


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


def _linear(n_in: int, n_out: int, ternary: bool, std: float, group_size: int, generator) -> nn.Module:
    if ternary:
        return TernaryLinear(n_in, n_out, group_size=group_size, init_std=std, generator=generator)
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0.0, std, generator=generator)
    return lin


class AuxLossScaler(torch.autograd.Function):
    """Identity on ``out``; in backward also sends ``coef`` as the gradient of the scalar ``aux``."""

    @staticmethod
    def forward(ctx, out, aux, coef):
        ctx.coef = coef
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.aux_meta
        return g, torch.full(shape, ctx.coef, dtype=dtype, device=device), None


class Expert(nn.Module):
    """``down(rms(relu(up(x))**2))``."""

    def __init__(self, d_model: int, hidden: int, *, ternary: bool, init_std: float, out_std: float,
                 group_size: int, generator) -> None:
        super().__init__()
        self.up = _linear(d_model, hidden, ternary, init_std, group_size, generator)
        self.down = _linear(hidden, d_model, ternary, out_std, group_size, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_rms(F.relu(self.up(x)).square()))


def switch_aux_loss(probs: torch.Tensor, choice: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``n_experts * sum_e f_e * P_e`` (Switch Transformer; 1.0 when perfectly balanced)."""
    counts = torch.bincount(choice.reshape(-1), minlength=n_experts).to(probs.dtype)
    f = counts / max(1, choice.numel())
    return n_experts * (f * probs.mean(0)).sum()


class TernaryMoE(nn.Module):
    """Top-``top_k`` mixture of ``n_experts`` MLP experts over token vectors ``x`` (..., d_model)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int = 4,
        top_k: int = 2,
        hidden: int | None = None,
        *,
        ternary: bool = True,
        aux_coef: float = 0.01,
        balance_bias: bool = True,
        backend: str = "auto",
        init_std: float = 0.02,
        out_std: float | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be an integer in [1, n_experts={n_experts}], got {top_k!r}")
        if not aux_coef >= 0:
            raise ValueError(f"aux_coef must be >= 0, got {aux_coef!r}")
        hidden = hidden if hidden is not None else 4 * d_model // top_k
        self.d_model, self.n_experts, self.top_k, self.hidden = d_model, n_experts, top_k, hidden
        self.aux_coef, self.balance_bias, self.backend = float(aux_coef), balance_bias, backend
        out_std = init_std if out_std is None else out_std
        self.router = _linear(d_model, n_experts, ternary, init_std, group_size, generator)
        self.experts = nn.ModuleList(
            Expert(d_model, hidden, ternary=ternary, init_std=init_std, out_std=out_std, group_size=group_size,
                   generator=generator)
            for _ in range(n_experts)
        )
        self.register_buffer("balance_q", torch.zeros(n_experts, dtype=torch.int32))
        self.register_buffer("tokens_routed", torch.zeros(n_experts, dtype=torch.int64))
        self.last_aux_loss = torch.zeros(())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs (N, E) float32, choice (N, k) int64, weights (N, k) float32) for x (N, d)."""
        logits = _rms(self.router(x).float())
        probs = torch.softmax(logits, dim=-1)
        with torch.no_grad():
            steer = logits + self.balance_q.float() * 2.0**BALANCE_EXP
            choice = steer.topk(self.top_k, dim=-1).indices
        w = probs.gather(1, choice)
        return probs, choice, w / w.sum(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, self.d_model)
        N, k = xf.shape[0], self.top_k
        probs, choice, w = self.route(xf)
        flat = choice.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments in expert order
        counts = torch.bincount(flat, minlength=self.n_experts)
        xs = xf[order // k]
        ys = [self.experts[e](part) for e, part in enumerate(torch.split(xs, counts.tolist())) if part.shape[0]]
        Y = torch.cat(ys) if ys else xf.new_zeros(0, self.d_model)
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=order.device)
        out = moe_combine(Y, w, pos.view(N, k), self.backend)
        aux = switch_aux_loss(probs, choice, self.n_experts)
        self.last_aux_loss = aux.detach()
        if self.training and torch.is_grad_enabled():
            if self.aux_coef:
                out = AuxLossScaler.apply(out, aux, self.aux_coef)
            self._update_balance(counts)
        return out.view(*shape[:-1], out.shape[-1])

    @torch.no_grad()
    def _update_balance(self, counts: torch.Tensor) -> None:
        self.tokens_routed += counts
        if not self.balance_bias:
            return
        mean = counts.float().mean()
        step = torch.sign(mean - counts.float()).to(torch.int64)  # +1 for under-used experts
        self.balance_q.copy_((self.balance_q.to(torch.int64) + step).clamp(-BALANCE_Q_MAX, BALANCE_Q_MAX).int())

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, hidden={self.hidden}, "
                f"aux_coef={self.aux_coef}, balance_bias={self.balance_bias}")
