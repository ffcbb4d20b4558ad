"""TernaryLSTMCell: an LSTM whose four gates come from ONE ternary projection over ``[x, h]``.

    z = W [x ; h]                    W: (4H, I+H) ternary (TernaryLinear), no bias
    i, f, g, o = rms(z_i), rms(z_f) + forget_bias, rms(z_g), rms(z_o)       (parameter-free norms)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(rms(c'))

The RMS norms (no gain) make the cell blind to the absolute scale ``2**E`` of its ternary weight, as
SubLN does for the transformer, and keep ``tanh`` out of saturation; ``forget_bias`` is a constant
(+1, the usual LSTM init), not a parameter.

Sequences: ``forward_sequence`` runs the recurrence with the *input half* of the projection done for
all steps in one matmul (``[x;h] W^T = x Wx^T + h Wh^T``). For a ternary weight the whole sequence is
one autograd function (:class:`TernaryLSTMFunction`): forward keeps no activations, backward
recomputes the sequence with autograd over a transient dense ``W`` and hands the summed weight
gradient to ``weight._voter.cast_votes`` **once per sequence** (calling a TernaryLinear per time step
would cast L sets of votes per step, L times the intended vote rate, and store L activations).

The cell also works when its projection is an ``nn.Linear`` (float configs) or a BitNet
``QATLinear``: then the same reference function runs on the effective float weight, so
``ternarize``/``fake_ternarize`` of a model built from these cells gives every benchmark config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TernaryLinear
from ..ops.linear import _ANCHOR, scale_param_grad
from ..qat import QATLinear
from ..quant import absmean_ternary_ste
from ..weight import DEFAULT_GROUP_SIZE

FORGET_BIAS = 1.0
_EPS = 1e-6


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=_EPS)


def lstm_step(z: torch.Tensor, c: torch.Tensor, forget_bias: float = FORGET_BIAS) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from the gate pre-activations ``z`` (..., 4H) and cell state ``c`` (..., H)."""
    H = c.shape[-1]
    zn = _rms(z.float().reshape(*z.shape[:-1], 4, H))
    i, f, g, o = zn.unbind(-2)
    c = torch.sigmoid(f + forget_bias) * c.float() + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(_rms(c))
    return h, c


def lstm_sequence_reference(
    x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, W: torch.Tensor, forget_bias: float = FORGET_BIAS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch LSTM over ``x`` (B, L, I) with float ``W`` (4H, I+H): returns (h_seq, h_L, c_L)."""
    n_in = x.shape[-1]
    zx = F.linear(x, W[:, :n_in])  # the input half of the one projection, all steps at once
    Wh = W[:, n_in:]
    h, c = h0, c0
    hs = []
    for t in range(x.shape[1]):
        h, c = lstm_step(zx[:, t] + F.linear(h.to(Wh.dtype), Wh), c, forget_bias)
        hs.append(h)
    h_seq = torch.stack(hs, 1) if hs else x.new_zeros(x.shape[0], 0, h0.shape[-1])
    return h_seq, h, c


class TernaryLSTMFunction(torch.autograd.Function):
    """The whole recurrence of a ternary LSTM as one op: one ``cast_votes`` per call (see module doc)."""

    @staticmethod
    def forward(ctx, x, h0, c0, anchor, log2_scale, weight, forget_bias):
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            W = weight.dense(torch.float32)
            hs, h, c = lstm_sequence_reference(x.float(), h0.float(), c0.float(), W, forget_bias)
        ctx.weight, ctx.forget_bias = weight, forget_bias
        ctx.has_log2 = log2_scale is not None
        ctx.save_for_backward(x, h0, c0, log2_scale if log2_scale is not None else torch.empty(0))
        return hs, h, c

    @staticmethod
    def backward(ctx, g_hs, g_h, g_c):
        x, h0, c0, log2_scale = ctx.saved_tensors
        weight = ctx.weight
        voter = weight._voter
        want_ls = ctx.has_log2 and ctx.needs_input_grad[4]
        T = weight.trits()
        need = ctx.needs_input_grad[:3]
        need_W = voter is not None or want_ls
        if not (any(need) or need_W):
            return None, None, None, None, None, None, None
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            # Recompute (checkpointing): W is a transient float leaf, dropped after the votes.
            W = (T.float() * weight.expand_groups(weight.scale(torch.float32))).requires_grad_(need_W)
            ins = [t.detach().float().requires_grad_(n) for t, n in zip((x, h0, c0), need)]
            hs, h, c = lstm_sequence_reference(ins[0], ins[1], ins[2], W, ctx.forget_bias)
            wrt = [t for t in (*ins, W) if t.requires_grad]
            grads = torch.autograd.grad((hs, h, c), wrt, (g_hs, g_h, g_c), allow_unused=True)
        grads = list(grads)
        out = [grads.pop(0).to(t.dtype) if n else None for t, n in zip((x, h0, c0), need)]
        g_ls = None
        if need_W:
            gW = grads.pop(0)
            if gW is None:
                gW = torch.zeros(weight.rows, weight.cols, device=T.device)
            if want_ls:
                g_ls = scale_param_grad(gW, T, log2_scale, weight.group_size)
            if voter is not None:
                voter.cast_votes(weight, gW, T)
            del gW
        return out[0], out[1], out[2], None, g_ls, None, None


def _effective_float_weight(proj: nn.Module) -> torch.Tensor | None:
    """The float weight a non-ternary projection applies (BitNet STE for QAT), or None if unknown."""
    if isinstance(proj, QATLinear):
        return absmean_ternary_ste(proj.weight)
    if type(proj) is nn.Linear and proj.bias is None:
        return proj.weight
    return None


class TernaryLSTMCell(nn.Module):
    """LSTM cell, gates from one projection ``Linear(input_size + hidden_size, 4 * hidden_size)``.

    ``ternary=True`` builds the projection as a :class:`TernaryLinear`; ``ternary=False`` as an
    ``nn.Linear`` for a float base model that ``ternarize`` converts later.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        ternary: bool = True,
        forget_bias: float = FORGET_BIAS,
        group_size: int = DEFAULT_GROUP_SIZE,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.input_size, self.hidden_size, self.forget_bias = input_size, hidden_size, float(forget_bias)
        n_in, n_out = input_size + hidden_size, 4 * hidden_size
        if ternary:
            self.gates = TernaryLinear(n_in, n_out, group_size=group_size, generator=generator)
        else:
            self.gates = nn.Linear(n_in, n_out, bias=False)
            with torch.no_grad():
                self.gates.weight.normal_(0.0, n_in**-0.5, generator=generator)

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(batch, self.hidden_size, device=device)
        return z, z.clone()

    def reference_weight(self) -> torch.Tensor:
        """The dense float weight the cell applies (``T * 2**E`` for a ternary projection), detached."""
        if isinstance(self.gates, TernaryLinear):
            return self.gates.weight.dense(torch.float32)
        w = _effective_float_weight(self.gates)
        if w is None:
            raise TypeError(f"no reference weight for a {type(self.gates).__name__} projection")
        return w.detach().float()

    def _check(self, x: torch.Tensor, dims: int) -> None:
        if x.dim() != dims or x.shape[-1] != self.input_size:
            raise ValueError(f"expected input of {dims} dims with {self.input_size} features, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One step: ``x`` (B, I) -> ``(h, c)``, each (B, H)."""
        self._check(x, 2)
        h, c = state if state is not None else self.initial_state(x.shape[0], x.device)
        z = self.gates(torch.cat([x, h.to(x.dtype)], dim=-1))
        return lstm_step(z, c, self.forget_bias)

    def forward_sequence(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """All steps of ``x`` (B, L, I) -> ``(h_seq (B, L, H), (h_L, c_L))``."""
        self._check(x, 3)
        h0, c0 = state if state is not None else self.initial_state(x.shape[0], x.device)
        if isinstance(self.gates, TernaryLinear):
            w = self.gates.weight
            if self.gates.bias is not None:
                raise ValueError("TernaryLSTMCell's projection has no bias")
            anchor = _ANCHOR if torch.is_grad_enabled() else None
            hs, h, c = TernaryLSTMFunction.apply(x, h0, c0, anchor, w.log2_scale, w, self.forget_bias)
            return hs, (h, c)
        W = _effective_float_weight(self.gates)
        if W is not None:
            hs, h, c = lstm_sequence_reference(x, h0, c0, W, self.forget_bias)
            return hs, (h, c)
        hs, state = [], (h0, c0)  # any other projection module: call it step by step
        for t in range(x.shape[1]):
            state = self.forward(x[:, t], state)
            hs.append(state[0])
        return torch.stack(hs, 1), state

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, forget_bias={self.forget_bias}"
