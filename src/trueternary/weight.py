"""TernaryScaleTensor: the one container that owns a ternary weight matrix and its training state.

Buffers (all integer, all saved in ``state_dict``):

    T_packed  uint8  [ceil(rows*cols/5)]   trits, base-3 packed (see trueternary.packing)
    E         int8   [rows, n_groups]      log2 scale per group: W[r, c] = T[r, c] * 2**E[r, c // group_size]
    E_accum   int8   [rows, n_groups]      scale-vote accumulator
    T_accum   int8   [rows, cols]          vote accumulator per weight

Groups are ``group_size`` consecutive weights along the input (column) dimension; the last group of a
row is shorter when ``cols % group_size != 0``. Training state is therefore exactly
``ceil(rows*cols/5) + rows*cols + 2*rows*n_groups`` bytes (about ``1/5 + 1 + 2/group_size`` per weight);
inference needs ``1/5 + 1/group_size`` bytes per weight.

In the non-strict *hybrid* mode (``scale_mode="float"``) the integer ``E`` is replaced by a float
parameter ``log2_scale`` trained by a float optimiser (e.g. AdamW) while the trits still move by votes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import packing
from .ops.handles import HasOpHandle
from .quant import check_accum_threshold, expand_groups, group_absmean_log2, residual_accum
from .rule import group_sum, pow2_int
from .settings import DEFAULT_GROUP_SIZE

LOAD_CHUNK = 1 << 20  # weights load_float_ ternarises at a time: bounds its float temporaries
SCALE_MODES = ("int", "float")


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return group_size


class TernaryScaleTensor(HasOpHandle, nn.Module):
    """A (rows, cols) ternary weight ``T * 2**E`` with packed trits and integer accumulators."""

    def __init__(
        self,
        rows: int,
        cols: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        init_std: float | None = None,
        scale_mode: str = "int",
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        for name, v in (("rows", rows), ("cols", cols)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_group_size(group_size)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.rows, self.cols, self.group_size = rows, cols, group_size
        self._new_op_handle()  # (ops.handles: how the compiled linear op reaches this weight)
        self.n_groups = (cols + group_size - 1) // group_size
        self.scale_mode = scale_mode
        self.stream = 0  # RNG stream id, assigned by the optimiser that trains this weight
        self._voter = None  # set by FlipOptimizer: receives the weight gradient in backward
        self._group_index = 0
        self.inference_only = False
        # inputs one output sums (rule.vote_width_scale); None where rows are looked up instead (embeddings)
        self.vote_fan_in: int | None = cols
        n = rows * cols
        packed = torch.full((packing.packed_numel(n),), packing.ZERO_BYTE, dtype=torch.uint8, device=device)
        self.register_buffer("T_packed", packed)
        self.register_buffer("E", torch.zeros(rows, self.n_groups, dtype=torch.int8, device=device))
        self.register_buffer("E_accum", torch.zeros(rows, self.n_groups, dtype=torch.int8, device=device))
        self.register_buffer("T_accum", torch.zeros(rows, cols, dtype=torch.int8, device=device))
        if scale_mode == "float":
            self.log2_scale = nn.Parameter(torch.zeros(rows, self.n_groups, device=device))
        else:
            self.log2_scale = None
        if init:  # random ternary: the absmean ternarisation of a N(0, init_std**2) draw
            std = init_std if init_std is not None else 1.0 / math.sqrt(cols)
            w = torch.randn(rows, cols, generator=generator, device="cpu") * std
            self.load_float_(w.to(self.T_packed.device))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_float(
        cls, w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, scale_mode: str = "int",
        accum_threshold: int | None = None,
    ) -> TernaryScaleTensor:
        """Absmean-ternarise a float (rows, cols) weight: ``E = round(log2(mean|w| per group))``
        (``accum_threshold``: see ``load_float_``)."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"from_float expects a 2-D float tensor, got {getattr(w, 'shape', type(w))}")
        t = cls(w.shape[0], w.shape[1], group_size, scale_mode=scale_mode, device=w.device, init=False)
        t.load_float_(w, accum_threshold)
        return t

    @torch.no_grad()
    def load_float_(self, w: torch.Tensor, accum_threshold: int | None = None) -> None:
        """Overwrite T and E with the absmean ternarisation of ``w`` (``quant.group_absmean_log2``).

        ``E_accum`` is reset. ``T_accum`` is reset too, or, given the flip rule's ``accum_threshold``,
        starts at each weight's rounding residual (``quant.residual_accum``), so trits that were close to
        rounding the other way are close to flipping.

        Rows are ternarised :data:`LOAD_CHUNK` weights at a time, so the float temporaries are a chunk's, not
        the matrix's: the result is the whole matrix's ternarisation exactly (every step is row-local except
        the scale of an all-zero group, the smallest scale in the matrix, set at the end).
        """
        if tuple(w.shape) != (self.rows, self.cols):
            raise ValueError(f"expected weight of shape {(self.rows, self.cols)}, got {tuple(w.shape)}")
        if accum_threshold is not None:
            check_accum_threshold(accum_threshold)
        w = w.detach().to(self.T_packed.device)
        if not bool(torch.isfinite(torch.stack(torch.aminmax(w))).all()):  # (aminmax propagates NaN)
            raise ValueError("cannot ternarise a weight with NaN or inf entries")
        cols, g = self.cols, self.group_size
        step = max(5, LOAD_CHUNK // cols // 5 * 5)  # rows per chunk: a multiple of 5, so chunks pack whole bytes
        zero_groups = torch.zeros(self.rows, self.n_groups, dtype=torch.bool, device=w.device)
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            wc = w[r0:r1]
            T, E = group_absmean_log2(wc, g)
            self.T_packed[r0 * cols // 5: packing.packed_numel(r1 * cols)] = packing.pack_trits_unchecked(T)
            self.E[r0:r1] = E
            # an all-zero group is the only one without a nonzero trit (the largest |w| of a group is >= its mean)
            zero_groups[r0:r1] = group_sum(T.abs(), g) == 0
            if accum_threshold is not None:
                self.T_accum[r0:r1] = residual_accum(wc, T, g, accum_threshold)
            del wc, T, E
        if bool(zero_groups.any()):
            # An all-zero group gets the matrix's smallest scale (quant.group_absmean_log2; 2**0 in an all-zero
            # matrix): round(log2(.)) is monotone, so that is the smallest E of the nonzero groups.
            nonzero = self.E[~zero_groups]
            self.E[zero_groups] = nonzero.min() if nonzero.numel() else 0
        self.E_accum.zero_()
        if accum_threshold is None:
            self.T_accum.zero_()
        if self.log2_scale is not None:
            self.log2_scale.copy_(self.E.float())

    # ---------------------------------------------------------------- views of the weight
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.cols))

    def numel(self) -> int:
        return self.rows * self.cols

    def trits(self) -> torch.Tensor:
        """The trits as an int8 (rows, cols) tensor (decoded from ``T_packed``)."""
        return packing.unpack_trits_unchecked(self.T_packed, self.numel()).view(self.rows, self.cols)

    @torch.no_grad()
    def set_trits(self, T: torch.Tensor) -> None:
        if tuple(T.shape) != (self.rows, self.cols):
            raise ValueError(f"expected trits of shape {(self.rows, self.cols)}, got {tuple(T.shape)}")
        self.T_packed.copy_(packing.pack_trits(T.to(self.T_packed.device)))

    @torch.no_grad()
    def _store_trits(self, T: torch.Tensor) -> None:
        """Repack trits the flip rule produced (known valid): no validation, no device sync."""
        self.T_packed.copy_(packing.pack_trits_unchecked(T))

    def log2_scales(self) -> torch.Tensor:
        """Per-group log2 scale (rows, n_groups): the int8 ``E`` or, in hybrid mode, the float parameter."""
        return self.log2_scale if self.log2_scale is not None else self.E

    def expand_groups(self, per_group: torch.Tensor) -> torch.Tensor:
        """Broadcast a (rows, n_groups) tensor to (rows, cols)."""
        return expand_groups(per_group, self.group_size, self.cols)

    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """2**E per group as ``dtype`` (exact for powers of two in every float format we use)."""
        if self.log2_scale is not None:  # hybrid: a float log2 scale
            return torch.exp2(self.log2_scale.float()).to(dtype)
        return pow2_int(self.E).to(dtype)  # exact, as the kernels build it

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight ``T * 2**E`` as a dense (rows, cols) tensor."""
        return self.trits().to(dtype) * self.expand_groups(self.scale(dtype))

    @torch.no_grad()
    def release_training_state(self) -> None:
        """Drop the accumulators (inference only): afterwards the module holds just T_packed and E."""
        for name in ("E_accum", "T_accum"):
            setattr(self, name, torch.empty(0, dtype=getattr(self, name).dtype, device=self.E.device))
        self.inference_only = True

    # ---------------------------------------------------------------- bookkeeping
    def training_state_bytes(self) -> int:
        """Bytes of every piece of state training keeps for this weight (integer buffers + normaliser)."""
        n = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        if self.log2_scale is not None:
            # hybrid: the float scale replaces E in use; its float optimiser state is counted by that optimiser
            n += self.log2_scale.numel() * self.log2_scale.element_size()
        return n

    def inference_bytes(self) -> int:
        """Bytes needed to run the weight: packed trits + one scale per group."""
        scale = self.log2_scales()
        return self.T_packed.numel() + scale.numel() * scale.element_size()

    def extra_repr(self) -> str:
        return (
            f"rows={self.rows}, cols={self.cols}, group_size={self.group_size}, "
            f"scale_mode={self.scale_mode!r}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        # Validate integer state before it can poison training (packed bytes > 242, wrong shapes).
        key = prefix + "T_packed"
        if key in state_dict:
            packing.check_packed(state_dict[key], self.numel())
        for name in ("E", "E_accum", "T_accum"):
            k = prefix + name
            if k not in state_dict:
                continue
            v = state_dict[k]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{k} must be a tensor, got {type(v).__name__}")
            if v.dtype != torch.int8:
                raise ValueError(f"{k} must be int8, got {v.dtype}")
            # Checked here rather than left to torch, so a bad entry fails before *any* buffer of this
            # weight is overwritten (torch copies the well-shaped buffers and raises afterwards).
            want = tuple(getattr(self, name).shape)
            if tuple(v.shape) != want:
                raise ValueError(f"{k} has shape {tuple(v.shape)}, this weight expects {want}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def ternary_weights(module: nn.Module) -> list[TernaryScaleTensor]:
    """Every TernaryScaleTensor inside ``module`` in registration order (stable across runs)."""
    if isinstance(module, TernaryScaleTensor):
        return [module]
    return [m for m in module.modules() if isinstance(m, TernaryScaleTensor)]
