"""One optimiser for a whole model: its ternary weights by a FlipOptimizer, its float parameters by AdamW.

:func:`for_model` is the way to train a ternarised model whose other parameters stay float (norm gains, an
embedding kept float, a hybrid model's ``log2_scale``) with one optimiser object, the kind Hugging Face Trainer
(``Trainer(optimizers=(opt, None))``), accelerate (``accelerator.prepare(model, opt, ...)``) and torch's lr
schedulers take. :class:`MixedOptimizer` is that object:

    param_groups    the FlipOptimizer's groups, then AdamW's (the parts' own dicts, so a scheduler's writes
                    reach them); one lr scheduler scales every group's ``lr`` by the same factor: the vote scale
                    and AdamW's learning rate warm up and decay together
    step()          the FlipOptimizer's step (votes cast, flips), then AdamW's
    zero_grad()     both
    state_dict()    ``{"flip": FlipOptimizer's, "float": AdamW's or None}``; load_state_dict checks both parts
                    before it changes either
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ..weight import ternary_weights
from .flip import FlipOptimizer
from .hybrid import ADAMW_BETAS

FLOAT_LR = 1e-3  # for_model's default AdamW learning rate for the float parameters


class MixedOptimizer(torch.optim.Optimizer):
    """A :class:`FlipOptimizer` and a float optimiser (None: the model has no float parameters) as one optimiser
    (module docstring). Build it with :func:`for_model`."""

    def __init__(self, flip: FlipOptimizer, float_optimizer: torch.optim.Optimizer | None = None) -> None:
        # (no Optimizer.__init__: the param groups and state are the parts'; the hooks torch's step wrapper
        # and lr schedulers use are set up as it would)
        if not isinstance(flip, FlipOptimizer):
            raise TypeError(f"MixedOptimizer's first part must be a FlipOptimizer, got {type(flip).__name__}")
        if float_optimizer is not None and not isinstance(float_optimizer, torch.optim.Optimizer):
            raise TypeError(f"the float part must be a torch.optim.Optimizer, got {type(float_optimizer).__name__}")
        self.flip = flip
        self.float_optimizer = float_optimizer
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    def _parts(self) -> list[torch.optim.Optimizer]:
        return [self.flip] + ([self.float_optimizer] if self.float_optimizer is not None else [])

    # ------------------------------------------------------------------ what torch and schedulers read
    @property
    def param_groups(self) -> list[dict]:
        """The FlipOptimizer's param groups, then the float optimiser's: the parts' own dicts (a fresh list each
        time, since loading a state dict replaces a part's groups)."""
        return [g for o in self._parts() for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        groups = list(groups)
        n = len(self.flip.param_groups)
        if len(groups) != len(self.param_groups):
            raise ValueError(f"expected {len(self.param_groups)} param groups, got {len(groups)}")
        self.flip.param_groups = groups[:n]
        if self.float_optimizer is not None:
            self.float_optimizer.param_groups = groups[n:]

    @property
    def state(self) -> dict:
        """Both parts' per-parameter state, in one (read-only) dict."""
        return {k: v for o in self._parts() for k, v in o.state.items()}

    @property
    def defaults(self) -> dict:
        return self.flip.defaults

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("MixedOptimizer's groups are its parts': add the group to .flip or .float_optimizer")

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"MixedOptimizer(\n  flip={self.flip!r},\n  float={self.float_optimizer!r})"

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], float] | None = None):
        """Run ``closure`` (if given: forward and backward), then the FlipOptimizer's step, then the float one's.
        A FlipOptimizer step that raises (NonFiniteGradientError) leaves the float parameters unchanged too."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.flip.step()
        if self.float_optimizer is not None:
            self.float_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts():
            o.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"flip": self.flip.state_dict(),
                "float": self.float_optimizer.state_dict() if self.float_optimizer is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load both parts after checking both (ValueError, nothing changed): the FlipOptimizer part as
        FlipOptimizer.load_state_dict checks it, the float part's groups against this optimiser's."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"flip", "float"}:
            raise ValueError("not a MixedOptimizer state_dict (expected the keys 'flip' and 'float')")
        fsd = state_dict["float"]
        if (fsd is None) != (self.float_optimizer is None):
            raise ValueError("the state_dict's float part does not match this optimiser's "
                             f"({'no' if fsd is None else 'a'} float optimiser state, "
                             f"{'no' if self.float_optimizer is None else 'a'} float optimiser)")
        if fsd is not None:
            groups = fsd.get("param_groups") if isinstance(fsd, dict) else None
            mine = self.float_optimizer.param_groups
            if (not isinstance(groups, list) or len(groups) != len(mine) or not all(
                    isinstance(g, dict) and isinstance(g.get("params"), list)
                    and len(g["params"]) == len(m["params"]) for g, m in zip(groups, mine))
                    or not isinstance(fsd.get("state"), dict)):
                raise ValueError("the state_dict's float part does not match this optimiser's float parameters")
        self.flip.load_state_dict(state_dict["flip"])  # (checks all of its part before changing anything)
        if fsd is not None:
            self.float_optimizer.load_state_dict(fsd)


def float_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's trainable float parameters as (decayed, not decayed): weight decay goes to matrices, not to
    vectors (norm gains, biases) nor to a hybrid weight's ``log2_scale`` (decay would pull its scale to 1)."""
    scales = {id(w.log2_scale) for w in ternary_weights(model) if w.log2_scale is not None}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in scales else no_decay).append(p)
    return decay, no_decay


def for_model(model: nn.Module, lr: float | None = None, *, float_lr: float = FLOAT_LR, weight_decay: float = 0.0,
              betas: tuple[float, float] = ADAMW_BETAS, **flip_kwargs) -> MixedOptimizer:
    """One optimiser for a ternarised ``model``: every ternary weight and integer bias by a FlipOptimizer (``lr``:
    its vote scale; ``flip_kwargs``: its other arguments, e.g. ``rule=``, ``backend=``, ``seed=``,
    ``grad_accumulation=True``), every trainable float parameter by ``torch.optim.AdamW(lr=float_lr, betas=betas)``
    with ``weight_decay`` on its matrices (:func:`float_parameters`). See :class:`MixedOptimizer`."""
    flip = FlipOptimizer(model, lr, **flip_kwargs)
    decay, no_decay = float_parameters(model)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    adamw = torch.optim.AdamW(groups, lr=float_lr, betas=betas) if groups else None
    return MixedOptimizer(flip, adamw)
