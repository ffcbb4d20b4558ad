"""``trueternary train``: one training run, from flags (or a checkpoint) to ``<out_dir>/<run_name>/``.

:func:`train` reads top to bottom like nanoGPT's ``train.py``: set-up (configuration, data, run directory,
model and optimisers or their restored state), the loop (step, log, evaluate, save, stop), and the finish
(plot and summary). The flags and their checks are in trueternary.trainconfig; what a run writes into its
directory, and who holds it, in trueternary.rundir.

``step`` always counts completed optimiser steps. Resuming (``--resume PATH|auto``) restores model,
optimiser, RNG and data position, so the continued run is bit-identical to one that never stopped
(on CPU; see docs/training.md for GPU). A directory that holds another run's files is never written
into without ``--resume`` or ``--overwrite``. SIGTERM (what job schedulers send before a kill) ends the
run after its current step with a checkpoint (:class:`StopSignal`). A file that cannot be written (disk
full, read-only, permissions) ends the run with a one-line error naming it; checkpoints already written
stay intact. docs/training.md, "Reliability", lists what is guaranteed and which tests check it.

Under ``torchrun --nproc_per_node N`` (see trueternary.distributed and docs/distributed.md) the same loop
trains data-parallel: ``--batch_size`` is the global batch, split evenly over the ranks, each rank
takes its share of every global batch; the ranks vote as one process on the summed ternary gradients and
float parameters go through DDP. Rank 0 alone prints and writes the run directory; a checkpoint's data
position is the same on every rank and for any number of ranks, so it resumes on any world size. The loop
asks what it needs of the other ranks through one ``distributed.Ranks`` (in a single process every answer
is trivial), so both kinds of run take one path.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch.profiler import record_function

from . import checkpoint as ckpt_io
from . import determinism, distributed, memory, stepprofile
from .data import Corpus, RandomWindows, eval_windows, load_corpus
from .distributed import Ranks, say
from .errors import CheckpointError, DataError, NonFiniteGradientError, TrainingError, UsageError, WriteError
from .evaluate import validation_bpb
from .flags import cpu_threads
from .models import build_model
from .recipes import Hparams, build_recipe, lr_factor
from .rundir import LOCK_FILE, RunDirectory, RunLog, plot_run, read_metrics, write_json
from .stepprofile import StepProfile
from .trainconfig import (
    FLAG_LIMITS,
    TrainConfig,
    add_arguments,
    config_from_args,
    explicit_fields,
    graph_capable,
    hparams_for,
    machine_memory,
    merge_resumed,
    model_config,
    validate,
)

# The names imported from here (by cli.py, checkpoint.py, tests and docs), trainconfig's and rundir's among them
__all__ = ["FLAG_LIMITS", "LOCK_FILE", "RunDirectory", "StopSignal", "TrainConfig", "TrainingError", "add_arguments",
           "config_from_args", "hparams_for", "machine_memory", "plot_run", "read_metrics", "run", "save", "train",
           "validate"]

LN2 = math.log(2.0)


def _declared_errors() -> tuple[type[BaseException], ...]:
    """The errors reported in one line (cli.main); past set-up, every rank raises them together."""

    return (UsageError, DataError, CheckpointError, WriteError, TrainingError)


class StopSignal:
    """SIGTERM, what job schedulers send before they kill a job: the run finishes its current step, saves a
    checkpoint and ends like a finished ``--stop_at`` (exit 0). Installed for the run's life, in the main
    thread only (where Python delivers signals). A second SIGTERM changes nothing (the save goes on); SIGINT
    still interrupts at once (checkpoint writes are atomic, so an interrupted save leaves the previous one)."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


# ------------------------------------------------------------------------------------ the run
def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Run (or continue) one training run and return its summary.

    ``explicit`` names the fields the user set (the CLI knows); by default, the fields that differ
    from their defaults (``explicit_fields``). On resume, the checkpoint's config is used with these fields on top.
    Under torchrun (``WORLD_SIZE`` in the environment) or inside an initialised process group, the run
    is data-parallel (trueternary.distributed); the process group is created here if needed and
    destroyed at the end if it was.
    """
    from tqdm.auto import tqdm

    # ---- set-up: the configuration (resuming: the checkpoint's, with the flags given on top)
    explicit = explicit_fields(cfg) if explicit is None else set(explicit)
    source = resume_source(cfg)
    ckpt = ckpt_io.load_checkpoint(source) if source is not None else None
    if ckpt is not None:
        cfg = merge_resumed(ckpt, cfg, explicit)
    hp = validate(cfg)
    # this process's ranks (one process unless torchrun launched it), the run directory (rank 0 holds it until
    # the run ends, and gives it up again if the run fails before writing into it) and SIGTERM
    with join_ranks(cfg) as ranks, contextlib.ExitStack() as held, StopSignal() as stop:
        device, main = ranks.device, ranks.is_main
        autocast = device.type == "cuda"  # bf16 autocast on GPU, as in bench
        prepare_device(cfg, ranks)

        # ---- data: one download per node (its local rank 0 first); every rank takes its share of each batch
        corpus, val_windows = ranks.node_first(partial(load_data, cfg))
        batches = ranks.windows(corpus.train, cfg.batch_size, cfg.ctx, cfg.seed)
        fingerprint = corpus.fingerprint()

        # ---- run directory: rank 0 claims it (nothing else writes into it until the run ends); every rank
        # learns of a failure
        claimed = ranks.run(partial(claim_run_directory, cfg, ckpt, held), here=main)
        if cfg.run_name is None:  # the <config>-<date>-<time> rank 0 chose
            cfg.run_name = ranks.broadcast(claimed.path.name if main else None)
        run_dir = Path(cfg.out_dir) / cfg.run_name

        # ---- model and optimisers from the seed; resuming, with the checkpoint's state, RNG and data position
        model_cfg = ckpt.meta["model"]["config"] if ckpt is not None else model_config(cfg)
        recipe = ranks.run(partial(build_training_recipe, cfg, hp, model_cfg, device))
        start_step = 0
        if ckpt is not None:
            restore_training_state(recipe, batches, ckpt, ranks, fingerprint)
            start_step, ckpt = ckpt.step, None  # (drops the checkpoint's tensors)
        ranks.prepare(recipe, cfg.ddp_grad_dtype)  # data parallel: votes summed over the ranks, floats under DDP
        end_step = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.max_steps
        log = ranks.run(partial(open_run_log, run_dir, cfg, hp, recipe, corpus, fingerprint, ranks, batches,
                                start_step), here=main)
        report = recipe.state_report()
        n_weights = report["ternary_weights"] or report["float_params"]
        announce_run(cfg, corpus, n_weights, ranks, batches, run_dir, start_step)
        title = f"{cfg.config}, {cfg.model} d={cfg.d_model} L={cfg.n_layers}, batch {cfg.batch_size} x ctx {cfg.ctx}"
        if ranks.world_size > 1:
            title += f", {ranks.world_size} ranks"

        # ---- the loop
        tokens_per_step = cfg.batch_size * cfg.ctx
        losses: list[float] = []
        comm_bytes: list[int] = []
        val_bpb = initial_val_bpb = None
        last_saved = stopped_at = None
        t_start = time.perf_counter()
        tok_s_ema = None
        memory.reset_peak(device)
        if start_step == 0 and main:
            initial_val_bpb = validation_bpb(recipe.model, val_windows, device, autocast)
            log.write({"step": 0, "val_bpb": initial_val_bpb})
        if start_step < end_step:
            capture_step_graph(cfg, recipe, ranks, autocast)
        profile = StepProfile(cfg.profile_steps, start_step, end_step, device) if cfg.profile_steps else None
        bar = tqdm(total=end_step, initial=start_step, desc=cfg.run_name, unit="step", dynamic_ncols=True,
                   disable=None if main else True, leave=True)
        try:
            for step in range(start_step, end_step):
                x, y = batches.next(device)
                if profile is not None:
                    profile.begin(step)
                t0 = time.perf_counter()
                done = step + 1
                loss, nonfinite = take_step(recipe, x, y, autocast, done, device)
                with record_function("trueternary.sync"):  # the global batch's loss, one verdict
                    lv, any_nonfinite = ranks.sync_step(loss, nonfinite is not None)
                dt = time.perf_counter() - t0
                if profile is not None:
                    profile.end(step, dt)
                check_diverged(recipe, done, lv, any_nonfinite, nonfinite)
                losses.append(lv)
                flips = recipe.flips_last_step()
                tok_s = tokens_per_step / dt if dt > 0 else float("nan")
                tok_s_ema = tok_s if tok_s_ema is None else 0.9 * tok_s_ema + 0.1 * tok_s
                comm = ranks.comm_step()  # bytes all-reduced in this step (no columns in one process)
                if comm:
                    comm_bytes.append(comm["comm_bytes"])
                final = done == end_step
                # SIGTERM: this step is the last; every rank stops at the same one (a collective at every step)
                stopping = ranks.any(stop.received) and not final
                if main and (done % cfg.log_every == 0 or final or stopping):
                    log.write({"step": done, "loss": lv, "train_bpb": lv / LN2,
                               "lr": hp.lr_for(cfg.config) * lr_factor(step, hp.steps, hp.warmup_frac, hp.min_lr_frac),
                               "flips": flips, "tokens_per_s": tok_s, "elapsed_s": time.perf_counter() - t_start,
                               **comm})
                bar.set_postfix_str(f"loss {lv:.3f} bpb {lv / LN2:.3f} {tok_s_ema:,.0f} tok/s flips/step {flips:,}",
                                    refresh=False)
                bar.update(1)
                if main and ((cfg.eval_every and done % cfg.eval_every == 0) or final):
                    val_bpb = validation_bpb(recipe.model, val_windows, device, autocast)
                    log.write({"step": done, "val_bpb": val_bpb, "peak_memory_bytes": memory.peak(device)})
                    el = time.perf_counter() - t_start
                    eta = el / (done - start_step) * (end_step - done)
                    bar.write(f"step {done:>6}/{cfg.max_steps} | loss {lv:.4f} | train {lv / LN2:.3f} bpb | "
                              f"val {val_bpb:.3f} bpb | {tok_s_ema:,.0f} tok/s | flips/step {flips:,} | "
                              f"{el:.0f}s elapsed, ETA {eta:.0f}s")
                if (cfg.save_every and done % cfg.save_every == 0) or final or stopping:
                    # (the plot is redrawn with every checkpoint but the last: the finish draws that one)
                    last_saved = save_checkpoint(ranks, run_dir, recipe, batches, cfg, hp, corpus, fingerprint, done,
                                                 plot_title=None if final or stopping else title)
                if stopping:
                    stopped_at = done
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
            if profile is not None:
                profile.stop()
        if profile is not None:
            report_profile(profile, ranks, run_dir)

        # ---- finish: the plot and the summary
        seconds = time.perf_counter() - t_start
        if last_saved is None and main:  # nothing left to train (resumed a finished run)
            last_saved = ckpt_io.latest_checkpoint(run_dir)
            print(f"nothing to do: the run is at step {start_step} of {end_step}")
        plot = plot_run(run_dir, title) if main else None
        summary = {
            "run_dir": str(run_dir), "start_step": start_step,
            "end_step": stopped_at if stopped_at is not None else max(start_step, end_step),
            "stopped_by_signal": "SIGTERM" if stopped_at is not None else None,
            "seconds": seconds, "losses": losses,
            "initial_val_bpb": initial_val_bpb, "val_bpb": val_bpb,
            "final_loss": losses[-1] if losses else None,
            "tokens_per_s": tokens_per_step * len(losses) / seconds if losses and seconds > 0 else None,
            "checkpoint": str(last_saved) if last_saved else None, "plot": str(plot) if plot else None,
            "world_size": ranks.world_size, "rank": ranks.rank, "peak_memory_bytes": memory.peak(device),
            "peak_memory_kind": memory.peak_kind(device),
        }
        if ranks.parallel:
            summary["comm_model"] = ranks.comm_model
            summary["comm_bytes_per_step"] = sum(comm_bytes) / len(comm_bytes) if comm_bytes else None
        if main:
            print_summary(summary, cfg, n_weights)
        return summary


# ------------------------------------------------------------------------------------ set-up
def resume_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint file ``--resume`` names, or None for a fresh run."""

    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        if cfg.run_name is None:
            raise UsageError("--resume auto needs --run_name (the run to continue)")
        found = ckpt_io.latest_checkpoint(Path(cfg.out_dir) / cfg.run_name)
        if found is None:
            say(f"resume auto: no checkpoint in {Path(cfg.out_dir) / cfg.run_name}, starting a fresh run")
        return found
    p = Path(cfg.resume)
    if p.is_dir():
        found = ckpt_io.latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"no checkpoint in {p / ckpt_io.CHECKPOINT_DIR}")
        return found
    return p  # load_checkpoint reports a missing or bad file


def join_ranks(cfg: TrainConfig) -> Ranks:
    """This process's place in the run: the one process, or one rank of a data-parallel run (under torchrun, or
    in an initialised process group), whose group is joined here and left at the end if it was created here."""
    from .flags import resolve_device

    device = resolve_device(cfg.device)  # ("auto" on CUDA: every rank then takes cuda:<LOCAL_RANK>)
    try:
        return distributed.join(device, _declared_errors())
    except ValueError as e:
        raise UsageError(str(e)) from None


def prepare_device(cfg: TrainConfig, ranks: Ranks) -> None:
    """CPU threads and the deterministic mode, before the first computation; --cuda_graph's conditions."""

    if cfg.cuda_graph is True and (ranks.device.type != "cuda" or ranks.parallel):
        raise UsageError("--cuda_graph needs a CUDA device and one process (no torchrun data parallelism)")
    if ranks.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, cfg.d_model))
    if cfg.deterministic:
        determinism.enable()  # before the first GEMM: cuBLAS reads its workspace setting when it starts


def load_data(cfg: TrainConfig) -> tuple[Corpus, torch.Tensor]:
    """The corpus and its held-out evaluation windows."""
    corpus = load_corpus(cfg.data, cache_dir=cfg.data_dir)
    return corpus, eval_windows(corpus.val, cfg.ctx, cfg.eval_windows)


def claim_run_directory(cfg: TrainConfig, ckpt: ckpt_io.Checkpoint | None, held: contextlib.ExitStack) -> RunDirectory:
    """Create (or name) and lock the run directory, held in ``held`` until the run ends, and check what it
    holds: a resumed checkpoint must be its newest; a fresh run needs a directory without another run's files."""
    run_directory = held.enter_context(RunDirectory.claim(cfg.out_dir, cfg.run_name, cfg.config))
    if ckpt is not None:
        run_directory.check_resumed(ckpt.step)
    elif cfg.resume is None:
        run_directory.check_fresh(cfg.overwrite)
    # (--resume auto without a checkpoint restarts the run at step 0, replacing the rows of a process
    # that stopped before its first save, as a resume replaces every row after its step)
    ckpt_io.remove_stale_temporaries(run_directory.path)
    return run_directory


def build_training_recipe(cfg: TrainConfig, hp: Hparams, model_cfg: dict, device: torch.device):
    """The model, initialised from the run's seed, and its optimisers (a trueternary.recipes.Recipe)."""

    try:
        base = build_model(cfg.model, seed=cfg.seed, compile_ops=cfg.compile, lazy=True,
                           activation_checkpointing=cfg.activation_checkpointing, **model_cfg)
        return build_recipe(cfg.config, base, hp, device=device, backend=cfg.update_backend, seed=cfg.seed)
    except ValueError as e:  # e.g. a GPU backend without CUDA
        raise UsageError(str(e)) from None
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise UsageError(f"not enough memory for --d_model {cfg.d_model} --n_layers {cfg.n_layers} on "
                         f"{device} ({' '.join(str(e).split())[:200]})") from None


def restore_training_state(recipe, batches: RandomWindows, ckpt: ckpt_io.Checkpoint, ranks: Ranks,
                           fingerprint: str) -> None:
    """Continue from ``ckpt``: model and optimiser state, the RNG and the data position (one for every rank and
    any number of ranks: ``Ranks.windows``)."""
    ckpt_io.restore_recipe(recipe, ckpt)
    try:
        data_meta = dict(ckpt.meta["data"])
        batches.load_state_dict(data_meta["position"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: bad data position ({e})") from None
    ckpt_io.restore_rng(ckpt.meta.get("rng", {}), ranks.device)
    if data_meta.get("positions") and int(data_meta.get("world_size", 1)) > 1:  # an older data-parallel checkpoint
        say(f"note: {ckpt.path.name} was written when each rank drew its own windows; the run continues rank 0's "
            "stream as the stream of global batches, so the data order differs from an uninterrupted run")
    if data_meta.get("fingerprint") != fingerprint:
        say(f"warning: the data differs from the data {ckpt.path.name} was trained on "
            f"({data_meta.get('name')}); the run will not match an uninterrupted one")


def open_run_log(run_dir: Path, cfg: TrainConfig, hp: Hparams, recipe, corpus: Corpus, fingerprint: str,
                 ranks: Ranks, batches: RandomWindows, start_step: int) -> RunLog:
    """Rank 0: write config.json (what this process runs) and open metrics.jsonl from ``start_step`` on."""
    info = {
        "train": asdict(cfg), "model": {"name": cfg.model, "config": recipe.model.cfg.to_dict()},
        "hparams": hp.to_dict(), "device": str(ranks.device), "torch": torch.__version__,
        "data": {"name": corpus.name, "fingerprint": fingerprint, "train_bytes": len(corpus.train),
                 "val_bytes": len(corpus.val)},
        "started_at_step": start_step,
    }
    if ranks.parallel:
        info["distributed"] = {"world_size": ranks.world_size, "backend": ranks.backend,
                               "batch_per_rank": batches.share,
                               "comm_model": {k: str(v) if isinstance(v, torch.dtype) else v
                                              for k, v in ranks.comm_model.items()}}
    write_json(run_dir / "config.json", info)
    return RunLog(run_dir, start_step)


def announce_run(cfg: TrainConfig, corpus: Corpus, n_weights: int, ranks: Ranks, batches: RandomWindows,
                 run_dir: Path, start_step: int) -> None:
    """The lines that open a run: what trains on what, where; the data parallelism; the step resumed from."""
    say(f"train: {cfg.config} on {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} held-out "
        f"bytes), {cfg.model} d={cfg.d_model} L={cfg.n_layers} ({n_weights:,} weights), "
        f"batch {cfg.batch_size} x ctx {cfg.ctx}, {_device_text(ranks.device)}, run dir {run_dir}")
    if ranks.parallel:
        comm = ranks.comm_model
        say(f"data parallel: {ranks.world_size} rank(s) ({ranks.backend}), {batches.share} sequences per rank; "
            f"{distributed.comm_sent_as(comm)}: {comm['sent']:,} bytes sent per rank per step "
            f"({comm['per_weight']:.4f} B/weight)")
    if start_step:
        say(f"resumed from step {start_step}")


def _device_text(device: torch.device) -> str:
    if device.type != "cpu":
        return str(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n > 1 else ''})"


def capture_step_graph(cfg: TrainConfig, recipe, ranks: Ranks, autocast: bool) -> None:
    """Run every step as one replayed CUDA graph (Recipe.use_cuda_graph) where --cuda_graph asks for it (data
    parallel too, over NCCL), or where it can be with --cuda_graph auto: a graph-capable config on a CUDA device,
    in one process."""

    device = ranks.device
    auto = cfg.cuda_graph == "auto" and graph_capable(cfg) and device.type == "cuda" and not ranks.parallel
    if cfg.cuda_graph is not True and not auto:
        return
    shape = (cfg.batch_size // ranks.world_size, cfg.ctx)
    try:
        recipe.use_cuda_graph(torch.zeros(shape, dtype=torch.long, device=device),
                              torch.zeros(shape, dtype=torch.long, device=device), autocast)
        say("step: one CUDA graph, replayed (--no-cuda_graph for eager steps)")
    except ValueError as e:
        if cfg.cuda_graph is True:
            raise UsageError(f"--cuda_graph: {e}") from None
        say(f"step: eager ({e})")


# ------------------------------------------------------------------------------------ the loop
def take_step(recipe, x: torch.Tensor, y: torch.Tensor, autocast: bool, step: int,
              device: torch.device) -> tuple[torch.Tensor, NonFiniteGradientError | None]:
    """One optimiser step: its loss, and the error of a step that met NaN/inf gradients (and dropped their votes),
    which every rank then learns of (Ranks.sync_step). Running out of memory is a one-line error."""

    try:
        return recipe.train_step(x, y, autocast), None
    except NonFiniteGradientError as e:
        return torch.full((), float("nan")), e
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise UsageError(f"out of memory at step {step} on {device} ({' '.join(str(e).split())[:200]}); "
                         "lower --batch_size, --ctx or the model size") from None


def check_diverged(recipe, step: int, loss: float, any_nonfinite: bool,
                   nonfinite: NonFiniteGradientError | None) -> None:
    """TrainingError (exit 1) after a step with NaN/inf gradients on any rank, or a loss that is not finite or
    far above a uniform guess's."""
    if any_nonfinite:
        why = str(nonfinite) if nonfinite is not None else "another rank's gradients had NaN/inf"
        raise TrainingError(f"training diverged at step {step}: {why}")
    if not math.isfinite(loss) or loss > 4 * math.log(recipe.model.cfg.vocab_size):
        bad = recipe.nonfinite_layers_last_step()  # a graphed step reports NaN/inf gradients this way
        why = f"{bad} layer gradient(s) had NaN/inf; their votes were dropped" if bad else f"loss {loss:.4g}"
        raise TrainingError(f"training diverged at step {step}: {why}")


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def save_checkpoint(ranks: Ranks, run_dir: Path, recipe, batches: RandomWindows, cfg: TrainConfig, hp: Hparams,
                    corpus: Corpus, fingerprint: str, step: int, plot_title: str | None) -> Path | None:
    """Every rank: a checkpoint of the state all ranks hold (never of one they disagree on), written by rank 0
    with every rank's data position, and plot.png redrawn when ``plot_title`` is given. The path, on rank 0."""
    differing = ranks.differing_tensors(lambda: ckpt_io.recipe_state(recipe)[0])
    if differing:
        shown = ", ".join(differing[:4]) + (" ..." if len(differing) > 4 else "")
        raise TrainingError(f"ranks hold different training state at step {step} ({shown}): "
                            "some update was not applied identically on every rank")

    def write() -> Path:
        path = save(run_dir, recipe, batches, cfg, hp, corpus, fingerprint, ranks.device, ranks.world_size)
        if plot_title is not None:
            plot_run(run_dir, plot_title)
        return path

    return ranks.run(write, here=ranks.is_main)


def save(run_dir: Path, recipe, batches: RandomWindows, cfg: TrainConfig, hp: Hparams, corpus: Corpus,
         fingerprint: str, device: torch.device, world_size: int = 1) -> Path:
    """Write a checkpoint. Its data position is every rank's (the stream of global batches); ``world_size`` (the
    ranks that wrote it) is for the record."""
    tensors, meta = ckpt_io.recipe_state(recipe)
    data = {"name": corpus.name, "fingerprint": fingerprint, "position": batches.state_dict(),
            "world_size": world_size}
    meta.update(
        model={"name": cfg.model, "config": recipe.model.cfg.to_dict()},
        train_config=asdict(cfg),
        hparams=hp.to_dict(),
        rng=ckpt_io.rng_state(device),
        data=data,
    )
    path = ckpt_io.save_checkpoint(ckpt_io.checkpoint_path(run_dir, recipe.step_count), tensors, meta)
    ckpt_io.prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return path


# ------------------------------------------------------------------------------------ finish
def report_profile(profile: StepProfile, ranks: Ranks, run_dir: Path) -> None:
    """--profile_steps: every rank's phases to rank 0, which prints the table and writes profile.json and its own
    trace into the run directory."""
    summaries = ranks.gather(profile.summary())

    def write() -> None:
        print(stepprofile.table(summaries, ranks.device.type), flush=True)
        write_json(run_dir / "profile.json", {"world_size": ranks.world_size, "device": str(ranks.device),
                                              "ranks": summaries})
        try:
            profile.write_trace(run_dir / "profile_trace.json")
        except OSError as e:
            raise ckpt_io.write_error(run_dir / "profile_trace.json", e) from None

    ranks.run(write, here=ranks.is_main)


def print_summary(summary: dict, cfg: TrainConfig, n_weights: int) -> None:
    """Rank 0's closing lines: steps, speed, loss and validation; the bytes all-reduced; how to continue a run
    that SIGTERM stopped."""
    losses = summary["losses"]
    if losses:
        initial_val_bpb, val_bpb = summary["initial_val_bpb"], summary["val_bpb"]
        first = f"val {initial_val_bpb:.3f} -> " if initial_val_bpb is not None else ""
        comm_line = ""
        per_step = summary.get("comm_bytes_per_step")
        if per_step is not None:
            comm_line = (f"comm: {per_step:,.0f} bytes sent per rank per step, counted at every collective "
                         f"({per_step / n_weights:.4f} B/weight)\n")
        val = f", {first}val {val_bpb:.3f} bits/byte" if val_bpb is not None else ""
        print(f"done: {len(losses)} steps in {summary['seconds']:.1f}s ({summary['tokens_per_s']:,.0f} tok/s), "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}{val}\n{comm_line}"
              f"checkpoint {summary['checkpoint']}\nplot {summary['plot']}", flush=True)
    if summary["stopped_by_signal"]:
        out_dir = f" --out_dir {cfg.out_dir}" if cfg.out_dir != TrainConfig.out_dir else ""
        print(f"stopped on SIGTERM after step {summary['end_step']} of {cfg.max_steps} (checkpoint saved); continue "
              f"with: trueternary train --resume auto --run_name {cfg.run_name}{out_dir}", flush=True)


# ------------------------------------------------------------------------------------ command line
def comm_report(cfg: TrainConfig, world_sizes: str) -> str:
    """The ``--comm_report`` table for the model ``cfg`` describes (trueternary.distributed.comm_table)."""

    try:
        sizes = [int(v) for v in str(world_sizes).split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--comm_report takes world sizes like 2,8,64, got {world_sizes!r}")
    saved_world = os.environ.pop("WORLD_SIZE", None)  # the report is for the sizes asked, not this launch
    try:
        hp = validate(cfg)
    finally:
        if saved_world is not None:
            os.environ["WORLD_SIZE"] = saved_world
    base = build_model(cfg.model, seed=cfg.seed, **model_config(cfg))
    title = (f"\n{cfg.model} d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}, group_size {cfg.group_size}, "
             f"vote_clip {hp.rule.vote_clip}, scale votes every {hp.rule.scale_update_interval or 'never'} step(s)")
    return distributed.comm_table(base, hp, sizes, title)


def run(args: argparse.Namespace) -> dict | None:
    cfg, explicit = config_from_args(args)
    if args.comm_report is not None:
        print(comm_report(cfg, args.comm_report))
        return None
    if distributed.is_main_process():
        return train(cfg, explicit)
    # Other ranks of a data-parallel run: an error every rank raised together is reported by rank 0, so
    # exit with the same status without printing it once per rank; anything else is printed here.
    try:
        return train(cfg, explicit)
    except _declared_errors() as e:
        if not getattr(e, "raised_on_all_ranks", False):
            raise
        raise SystemExit(1 if isinstance(e, TrainingError) else 2) from None
