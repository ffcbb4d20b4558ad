"""TrainStep: any model's training step with a FlipOptimizer, run as fast as its device allows.

``TrainStep(model, optimizer, loss_fn, example)`` is a callable: ``step(batch)`` runs ``loss_fn(model, batch)``,
backward (which casts the votes), the optimiser step, and returns the loss. It is the one fast path for a
model the project did not build (a ternarised Hugging Face model, any ``nn.Module``); ``Recipe.use_cuda_graph``
does the same for the project's own recipes.

    CUDA graph   (``cuda_graph=None``: wherever it can; ``True``: required) the whole step (forward, backward with
                 every vote, ``FlipOptimizer.step()``) captured once in one CUDA graph, each call replaying it:
                 no launch or Python cost per kernel. Needs the ``gpu`` update backend, a CUDA batch, one process,
                 every vote on the fused kernels (no integer biases, a rule the kernels implement), no
                 ``grad_accumulation``, and a ``loss_fn`` without host syncs for batches of the example's shapes.
                 The lr moves through device tensors (``FlipOptimizer.use_device_lr``), so lr schedulers work as
                 on eager steps; NaN/inf layer gradients give a NaN loss instead of raising
                 (``FlipOptimizer.defer_finite_check``). A MixedOptimizer's float part steps eagerly after each
                 replay, on the gradients the graph wrote (its parameters are few: norms, scales).
    compile      (``compile=True`` or torch.compile's keyword arguments) ``loss_fn`` through ``torch.compile``:
                 the ternary layers run as ``torch.library`` ops (``trueternary::linear``, ``::embedding``), which
                 compile traces through, so the float ops around them (norms, rotary embeddings, activations,
                 attention, the loss, the input-gradient sums between layers) compile as one graph. Combines
                 with the CUDA graph.
    eager        otherwise (and on a CPU): forward, backward, ``optimizer.step()``, ``optimizer.zero_grad()``.

``TrainStep.graphed`` says which ran, ``TrainStep.eager_reason`` why not a graph (auto mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from ..backends import UpdateBackend
from ..layers import IntegerBias, TernaryEmbedding
from .flip import FlipOptimizer
from .mixed import MixedOptimizer

WARM_UP_STEPS = 3  # eager steps on a side stream before a capture: kernels compile, the allocator settles


def _tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for k in batch for t in _tensors(batch[k])]
    if isinstance(batch, (list, tuple)):
        return [t for b in batch for t in _tensors(b)]
    raise TypeError(f"a batch is a tensor, or a tuple, list or dict of them; got {type(batch).__name__}")


def _clone(batch):
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    return type(batch)(_clone(b) for b in batch)


def capture_cuda_graph(fn, warm_up) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn()``, captured after ``warm_up()`` ran on a side stream (the torch.cuda.graphs
    recipe: kernels compile and the allocator settles outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph



def _to_host(obj):
    """A deep copy of a (nested) state dict with every tensor copied to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def warm_up_and_restore(model: nn.Module, flip: FlipOptimizer, whole_step: Callable[[], None], n: int,
                        device: torch.device) -> None:
    """Run ``whole_step`` ``n`` times before a capture (kernels compile, the allocator settles) and put the model
    and the optimiser back to where they were. The optimiser's lazily created state (codes, device step) is created
    first (``FlipOptimizer.create_step_state``), so it exists, with its values, before the capture.

    The copies that restore them are kept in host memory: on the device they would add the whole training state
    (1.25 B/weight) to the peak of the capture, which is what bounds the largest model."""
    row_voted = {id(m.weight) for m in model.modules() if isinstance(m, TernaryEmbedding)}
    flip.create_step_state(device, row_voted)
    saved_model = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    saved_flip = _to_host(flip.state_dict())
    for _ in range(n):
        whole_step()
    model.load_state_dict(saved_model)  # the warm-up steps trained: back to where the run is
    flip.load_state_dict(saved_flip)

class TrainStep:
    """One training step of ``model`` (module docstring).

    Args:
        model: the module ``loss_fn`` runs (ternarised: its ternary weights trained by ``optimizer``).
        optimizer: a :class:`FlipOptimizer`, or a :class:`MixedOptimizer` (``trueternary.optim.for_model``).
        loss_fn: ``loss_fn(model, batch) -> 0-dim loss``.
        example: a batch (a tensor, or a tuple, list or dict of tensors) with the shapes every later batch has
            (a graphed step copies each batch into its own copies of these tensors). Not trained on.
        cuda_graph: None: capture one CUDA graph where it can (else eager, ``eager_reason`` says why); True:
            capture or raise ValueError; False: eager.
        compile: False, True, or a dict of ``torch.compile`` keyword arguments (``{"mode": ...}``).
        autocast: a dtype (e.g. ``torch.bfloat16``): ``loss_fn`` runs under ``torch.autocast`` on the batch's
            device; None: as it is.
    """

    def __init__(self, model: nn.Module, optimizer: FlipOptimizer | MixedOptimizer,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor], example, *, cuda_graph: bool | None = None,
                 compile: bool | dict = False, autocast: torch.dtype | None = None) -> None:
        if isinstance(optimizer, MixedOptimizer):
            flip, float_opt = optimizer.flip, optimizer.float_optimizer
        elif isinstance(optimizer, FlipOptimizer):
            flip, float_opt = optimizer, None
        else:
            raise TypeError(f"TrainStep takes a FlipOptimizer or a MixedOptimizer, got {type(optimizer).__name__}")
        tensors = _tensors(example)
        if not tensors:
            raise ValueError("the example batch holds no tensor")
        self.model, self.optimizer, self.flip, self.float_optimizer = model, optimizer, flip, float_opt
        self.device = tensors[0].device
        self.autocast = autocast
        if compile:
            loss_fn = torch.compile(loss_fn, **(compile if isinstance(compile, dict) else {}))
        self.loss_fn = loss_fn
        self.eager_reason = self._graph_refusal(tensors) if cuda_graph is not False else "cuda_graph=False"
        if cuda_graph and self.eager_reason:
            raise ValueError(f"cannot capture this step in a CUDA graph: {self.eager_reason}")
        self.graphed = self.eager_reason is None
        self._graph: torch.cuda.CUDAGraph | None = None
        if self.graphed:
            self._capture(example)

    # ------------------------------------------------------------------ the step
    def __call__(self, batch) -> torch.Tensor:
        """Train on ``batch``; returns its loss (a detached 0-dim tensor; NaN after a graphed step whose layer
        gradients had NaN/inf, whose flips of the other layers were applied)."""
        if self._graph is None:
            loss = self._loss(batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        got = _tensors(batch)
        if len(got) != len(self._static) or any(a.shape != b.shape for a, b in zip(got, self._static)):
            raise ValueError(f"a CUDA-graphed step takes batches shaped like its example "
                             f"({[tuple(t.shape) for t in self._static]}), got {[tuple(t.shape) for t in got]}")
        self.flip.write_device_lr()  # the lr a scheduler set since the last call
        for dst, src in zip(self._static, got):
            dst.copy_(src)
        self._graph.replay()
        self.flip.after_graph_replay()
        if self.float_optimizer is not None:  # on the gradients the replay wrote into the float parameters' .grad
            self.float_optimizer.step()
        # (an lr scheduler warns when it steps an optimiser whose step() it never saw called; a replay is one)
        self.optimizer._opt_called = True
        return self._loss_out.clone()

    def nonfinite_layers_last_step(self) -> int:
        """Layer gradients with NaN/inf in the last graphed step (a host read; 0 for eager steps, which raise
        ``NonFiniteGradientError`` instead)."""
        count = self.flip.last_step_nonfinite if self._graph is not None else None
        return 0 if count is None else int(count)

    def _loss(self, batch) -> torch.Tensor:
        # (the autocast weight-cast cache must be off inside CUDA graphs: torch.cuda.graphs' docs)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False)
               if self.autocast is not None else nullcontext())
        with ctx:
            return self.loss_fn(self.model, batch)

    # ------------------------------------------------------------------ capture
    def _graph_refusal(self, tensors: list[torch.Tensor]) -> str | None:
        """Why this step cannot be one CUDA graph (None: it can)."""
        from ..ops.votes import fused_votes_supported

        flip = self.flip
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return f"the batch is on {self.device}, not a CUDA device"
        if any(t.device != self.device for t in tensors):
            return "the batch's tensors are on several devices"
        if flip.backend is not UpdateBackend.GPU:
            return f"the FlipOptimizer's backend is {flip.backend.value!r}, not 'gpu'"
        if flip.world_size > 1:
            return "data parallelism (votes are exchanged from the host)"
        if flip.grad_accumulation:
            return "grad_accumulation (its votes are keyed from the host step)"
        if not all(fused_votes_supported(g) for g in flip.param_groups):
            return "the rule's votes take the dense path, whose random keys come from the host step"
        if any(isinstance(m, IntegerBias) for m in flip.modules_trained()):
            return "integer biases vote on the dense path, whose random keys come from the host step"
        return None

    def _capture(self, example) -> None:
        """Warm up on a side stream (then put the model and optimiser back), capture the whole step."""

        flip, dev = self.flip, self.device
        flip.defer_finite_check(dev)
        flip.use_device_lr(dev)
        static = _clone(example)
        self._static = _tensors(static)
        out: list[torch.Tensor] = []

        def whole_step() -> None:
            loss = self._loss(static)
            loss.backward()
            flip.step()
            out[:] = [loss.detach().masked_fill(flip.last_step_nonfinite > 0, float("nan"))]

        def warm_up() -> None:
            warm_up_and_restore(self.model, flip, whole_step, WARM_UP_STEPS, dev)

        if self.float_optimizer is not None:
            # backward then writes each float gradient into a .grad the graph allocates: every replay's fresh
            # gradient, which the float optimiser reads (never set to None again while the graph lives)
            def warm_then_release() -> None:
                warm_up()
                self.float_optimizer.zero_grad(set_to_none=True)
            self._graph = capture_cuda_graph(whole_step, warm_up=warm_then_release)
        else:
            self._graph = capture_cuda_graph(whole_step, warm_up=warm_up)
        flip.after_graph_capture()
        self._loss_out = out[0]
