"""Where a training step's time goes, on every rank: ``trueternary train --profile_steps N``.

The step marks its phases with ``torch.profiler.record_function`` (the names in :data:`PHASES`). With
``--profile_steps N`` the N steps after the first two (which build the data-parallel buckets, compile kernels and
fill caches) run under ``torch.profiler`` on every rank; each rank sums each phase's time, rank 0 prints one table
with a column per rank (milliseconds per step) and writes it to ``<run dir>/profile.json`` with its own trace
(``profile_trace.json``: chrome://tracing or https://ui.perfetto.dev).

Host time is the time the phase's Python and launches took on the rank's CPU (on a CPU, all of it). Device time
(CUDA) is the time of the kernels the phase launched, collectives included (an all-to-all's kernel runs until every
peer has sent: waiting for a slower rank shows there). Nested phases are part of their parent's time; "other" is
the step's time outside the listed phases (the data, the loop).
"""

from __future__ import annotations

import torch

# (label, the record_function name, depth in the table)
PHASES = (
    ("forward", "trueternary.forward", 1),
    ("backward", "trueternary.backward", 1),
    ("write gradients", "trueternary.dp.write_gradient", 2),
    ("send gradients", "trueternary.dp.send_gradients", 2),
    ("DDP all-reduce", "trueternary.ddp.allreduce", 2),
    ("optimizer step", "trueternary.optimizer_step", 1),
    ("wait for gradients", "trueternary.dp.wait_gradients", 2),
    ("sum gradients", "trueternary.dp.sum_gradients", 2),
    ("votes", "trueternary.dp.votes", 2),
    ("send votes", "trueternary.dp.send_votes", 2),
    ("wait for votes", "trueternary.dp.wait_votes", 2),
    ("add votes", "trueternary.dp.add_votes", 2),
    ("flips", "trueternary.flips", 2),
    ("step sync", "trueternary.sync", 1),
)
WARM_UP_STEPS = 2


class StepProfile:
    """Profiles ``steps`` training steps of a run that goes from ``start`` to ``end`` (after up to WARM_UP_STEPS
    warm-up steps; fewer when the run is short); :meth:`summary` is this rank's result."""

    def __init__(self, steps: int, start: int, end: int, device: torch.device) -> None:
        self.first = start + min(WARM_UP_STEPS, max(0, end - start - steps))
        self.last = min(end, self.first + steps)  # (exclusive)
        self.device = device
        self.step_seconds: list[float] = []
        self._prof = None
        self._stopped = False

    def begin(self, step: int) -> None:
        """Before step ``step`` (0-based): start profiling at the first profiled step."""
        if step == self.first and self.first < self.last:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()

    def end(self, step: int, seconds: float) -> None:
        """After step ``step`` took ``seconds`` (the loop's clock): stop after the last profiled one."""
        if self._prof is None or not self.first <= step < self.last:
            return
        self.step_seconds.append(seconds)
        if step == self.last - 1:
            self.stop()

    def stop(self) -> None:
        if self._prof is not None and not self._stopped:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._prof.__exit__(None, None, None)
            self._stopped = True

    def summary(self) -> dict | None:
        """This rank's milliseconds per step by phase (host, device), and the steps profiled; None if none was."""
        if self._prof is None or not self.step_seconds:
            return None
        self.stop()
        n = len(self.step_seconds)
        events = {e.key: e for e in self._prof.key_averages()}
        phases = {}
        for label, name, _ in PHASES:
            e = events.get(name)
            if e is None:
                continue
            device_us = getattr(e, "device_time_total", 0) or 0
            phases[label] = {"host_ms": e.cpu_time_total / 1000 / n, "device_ms": device_us / 1000 / n,
                             "calls": e.count / n}
        step_ms = 1000 * sum(self.step_seconds) / n
        top = sum(v["host_ms"] for (label, _, depth) in PHASES if depth == 1 for v in [phases.get(label)] if v)
        phases["other"] = {"host_ms": max(0.0, step_ms - top), "device_ms": 0.0, "calls": 1.0}
        return {"steps": [self.first + 1, self.last], "step_ms": step_ms, "phases": phases}

    def write_trace(self, path) -> None:
        """This rank's chrome trace (after :meth:`summary`)."""
        if self._prof is not None:
            self._prof.export_chrome_trace(str(path))


def table(summaries: list[dict | None], device_type: str) -> str:
    """The ranks' summaries as one table, a column per rank: host milliseconds per step (and, on a GPU, a second
    table of device milliseconds)."""
    ranks = [(r, s) for r, s in enumerate(summaries) if s is not None]
    if not ranks:
        return "profile: no step was profiled (the run was too short)"
    first, last = ranks[0][1]["steps"]
    head = f"{'phase':<24}" + "".join(f"{f'rank {r}':>10}" for r, _ in ranks)
    lines = [f"where a step's time goes: ms per step, mean of steps {first}-{last} (torch.profiler, every rank)"]
    blocks = [("host", "host_ms")] + ([("device (CUDA kernels)", "device_ms")] if device_type == "cuda" else [])
    for title, key in blocks:
        lines += ["", title, head]
        if key == "host_ms":
            lines.append(f"{'step':<24}" + "".join(f"{s['step_ms']:>10.2f}" for _, s in ranks))
        for label, _, depth in PHASES + (("other", "", 1),):
            if not any(label in s["phases"] for _, s in ranks) or (label == "other" and key != "host_ms"):
                continue
            cells = "".join(f"{s['phases'][label][key]:>10.2f}" if label in s["phases"] else f"{'-':>10}"
                            for _, s in ranks)
            lines.append(f"{'  ' * depth + label:<24}{cells}")
    return "\n".join(lines)

