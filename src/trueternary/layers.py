"""Drop-in ternary layers: TernaryLinear (for nn.Linear) and TernaryEmbedding (for nn.Embedding).

The modules only hold state and call the autograd functions in ``trueternary.ops``. Neither has an
``nn.Parameter`` unless the hybrid float scale is asked for (``scale_mode="float"``).

Which kernels run a TernaryLinear is its ``kernel`` (``LinearKernel.DENSE`` by default, or ``TRITON``), set by
whoever builds the model: :func:`set_linear_kernel` sets every layer of a model (``recipes.build_recipe`` sets
the one that goes with its update backend).

Bias: ``IntegerBias`` keeps the bias as an int32 buffer ``q`` with a fixed power-of-two unit,
``b = q * 2**exp`` (default unit 2**-10). It is trained by the same stochastic votes as the trits,
added straight into ``q`` (an int32 has room to be its own accumulator).
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import LinearKernel
from .ops.embedding import ternary_embedding
from .ops.handles import HasOpHandle
from .ops.linear import ternary_linear
from .weight import DEFAULT_GROUP_SIZE, TernaryScaleTensor

DEFAULT_BIAS_EXP = -10


class IntegerBias(HasOpHandle, nn.Module):
    """A bias vector ``q * 2**exp`` with int32 ``q``; trained by votes, no float state."""

    def __init__(self, n: int, exp: int = DEFAULT_BIAS_EXP, device=None) -> None:
        super().__init__()
        if not -127 <= exp <= 127:
            raise ValueError(f"bias exponent must be in [-127, 127], got {exp}")
        self.n = n
        self._new_op_handle()
        self.stream = 0
        self._voter = None
        self._group_index = 0
        self.register_buffer("q", torch.zeros(n, dtype=torch.int32, device=device))
        self.register_buffer("exp", torch.tensor(exp, dtype=torch.int8, device=device))

    def value(self) -> torch.Tensor:
        return self.q.float() * torch.exp2(self.exp.float())

    @torch.no_grad()
    def load_float_(self, b: torch.Tensor) -> None:
        if b.shape != (self.n,):
            raise ValueError(f"expected bias of shape ({self.n},), got {tuple(b.shape)}")
        q = torch.round(b.float() * torch.exp2(-self.exp.float()))
        self.q.copy_(q.clamp(-(2**31) + 1, 2**31 - 1).to(torch.int32))

    def training_state_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def inference_bytes(self) -> int:
        return self.q.numel() * 4 + 1


class TernaryLinear(nn.Module):
    """``y = x @ (T * 2**E).T (+ b)``: a drop-in replacement for ``nn.Linear``, run by ``kernel``'s kernels
    (``ops.linear.ternary_linear``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        init_std: float | None = None,
        scale_mode: str = "int",
        device=None,
        generator: torch.Generator | None = None,
        init: bool = True,
        kernel: LinearKernel | str = LinearKernel.DENSE,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = LinearKernel.parse(kernel)
        self.weight = TernaryScaleTensor(
            out_features, in_features, group_size, init_std=init_std, scale_mode=scale_mode,
            device=device, generator=generator, init=init,
        )
        self.bias = IntegerBias(out_features, device=device) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, scale_mode: str = "int",
                    accum_threshold: int | None = None, device=None):
        """Ternarise an existing ``nn.Linear`` (absmean per group; bias rounded to the int grid;
        ``accum_threshold``: see ``TernaryScaleTensor.load_float_``) on ``device`` (default: the weight's;
        the float weight is moved there first and ternarised there)."""
        m = cls.shaped_like(lin, group_size, scale_mode, lin.weight.device if device is None else device)
        m.weight.load_float_(lin.weight, accum_threshold)
        if lin.bias is not None:
            m.bias.load_float_(lin.bias.detach().to(m.bias.q.device))
        return m

    @classmethod
    def shaped_like(cls, lin: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, scale_mode: str = "int",
                    device=None):
        """A ternary layer of ``lin``'s shape and bias with all trits 0, on ``device`` (to be filled by
        ``weight.load_float_``; ``lin``'s weight is not read, so it may be on the meta device)."""
        return cls(lin.in_features, lin.out_features, bias=lin.bias is not None, group_size=group_size,
                   scale_mode=scale_mode, device=device, init=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(x, self.weight, self.bias, self.kernel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def set_linear_kernel(model: nn.Module, kernel: LinearKernel | str) -> nn.Module:
    """Run every :class:`TernaryLinear` in ``model`` on ``kernel``'s kernels; returns ``model``."""
    kernel = LinearKernel.parse(kernel)
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.kernel = kernel
    return model


class TernaryEmbedding(nn.Module):
    """``out = T[idx] * 2**E[idx]``: a drop-in replacement for ``nn.Embedding`` (packed row lookup)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        init_std: float = 1.0,
        scale_mode: str = "int",
        device=None,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} out of range for {num_embeddings} embeddings")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.weight = TernaryScaleTensor(
            num_embeddings, embedding_dim, group_size, init_std=init_std, scale_mode=scale_mode,
            device=device, generator=generator, init=init,
        )
        self.weight.vote_fan_in = None  # rows are looked up, not summed: no width scaling of its votes
        if init and padding_idx is not None:
            T = self.weight.trits().clone()
            T[padding_idx] = 0
            self.weight.set_trits(T)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int = DEFAULT_GROUP_SIZE, scale_mode: str = "int",
                       accum_threshold: int | None = None, device=None):
        """Ternarise an existing ``nn.Embedding`` (``TernaryLinear.from_linear``'s arguments)."""
        m = cls.shaped_like(emb, group_size, scale_mode, emb.weight.device if device is None else device)
        m.weight.load_float_(emb.weight, accum_threshold)
        return m

    @classmethod
    def shaped_like(cls, emb: nn.Embedding, group_size: int = DEFAULT_GROUP_SIZE, scale_mode: str = "int",
                    device=None):
        """A ternary embedding of ``emb``'s shape with all trits 0 (``TernaryLinear.shaped_like``); fill it with
        ``weight.load_float_``."""
        if emb.max_norm is not None:
            raise ValueError("TernaryEmbedding does not support max_norm (weights are fixed trits)")
        return cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group_size, scale_mode=scale_mode,
                   device=device, init=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return ternary_embedding(idx, self.weight, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
