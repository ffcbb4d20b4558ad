"""``TrainConfig``: the flags of one ``trueternary train`` run, as a dataclass.

Its own module because two others read it: ``train`` runs it, and ``checkpoint`` checks the ``train_config`` a
checkpoint stores against its fields (so checkpoint needs no import of train, which imports checkpoint).
Hyper-parameter defaults are not repeated here: ``None`` or the defining module's value (FlipRule, weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .backends import UpdateBackend
from .rule import FlipRule
from .weight import DEFAULT_GROUP_SIZE


@dataclass
class TrainConfig:
    """Everything ``trueternary train`` is told (its flags, one field each), stored in every checkpoint."""

    # data
    data: str | None = None  # None: the embedded default corpus (Python stdlib sources)
    data_dir: str | None = None  # data cache: the enwik8 download, decompressed .gz files and directories
    # model
    model: str = "transformer"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    # training configuration (trueternary.recipes)
    config: str = "TrueTernary"
    lr: float | None = None  # peak lr (vote scale for TrueTernary); None: the recipe's default
    accum_threshold: int | None = None  # None: FlipRule's default
    scale_update_interval: int = FlipRule.scale_update_interval
    rule: dict = field(default_factory=dict)  # further FlipRule field overrides
    # On purpose not the library's DEFAULT_UPDATE_BACKEND (dense-fallback, which bench and build_recipe use): a
    # training run takes the fastest backend this machine has (auto: gpu where CUDA and Triton are, else dense).
    update_backend: str = UpdateBackend.AUTO.value
    compile: bool = False  # torch.compile the model's shared ops (norms, attention, activations; transformer)
    # TrueTernary, gpu backend: the whole step as one CUDA graph (Recipe.use_cuda_graph); "auto": where it can be
    cuda_graph: bool | str = "auto"
    # bit-for-bit repeatable steps on a GPU too (trueternary.determinism: deterministic algorithms, math attention)
    deterministic: bool = False
    ddp_grad_dtype: str = "fp32"  # data parallelism: dtype of the float gradients DDP all-reduces (fp32, bf16)
    # run
    max_steps: int = 300
    batch_size: int = 16  # the global batch: split evenly over data-parallel ranks
    ctx: int = 64
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0: auto (1 for models up to d_model 256, else torch's default)
    eval_every: int = 100
    eval_windows: int = 128
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    stop_at: int | None = None  # stop (and save) after this step, keeping the --max_steps schedule
    run_name: str | None = None
    out_dir: str = "runs"
    resume: str | None = None  # checkpoint file, run directory, or "auto"
    overwrite: bool = False  # a fresh run in a directory holding another run: move its files aside first
