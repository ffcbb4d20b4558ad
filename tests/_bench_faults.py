"""Broken ``bench --jobs`` children for tests/test_bench.py: ``job_main`` stands in for ``bench._job_main``
and breaks the job whose config label ``FAULTS`` names. Spawned children import this module by name, and
it imports torch (through trueternary) only for the jobs that run the real child, so a child that dies or
stalls starts in a fraction of a second."""

from __future__ import annotations

import os
import signal
import time

FAULTS = {
    "Adam_FP32[lr=0.00123]": "raise",  # an exception inside the real child's run
    "SignSGD_Old[lr=0.000123]": "die",  # SIGKILL, what the kernel's OOM killer sends
    "TrueTernary[lr=3.5]": "stall",  # progress for 2 s, then none
    "TrueTernary[lr=4.5]": "stall",
}
STALL_TICKS = 8  # progress reports (0.25 s apart) before a stalling job stops


def job_main(child_args, conn, progress, threads):
    fault = FAULTS.get(child_args["configs"])
    if fault == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "stall":
        for _ in range(STALL_TICKS):
            progress.value += 1
            time.sleep(0.25)
        time.sleep(600)
    from trueternary import bench

    if fault == "raise":
        def broken_run_config(*args, **kwargs):
            raise RuntimeError("injected fault\nsecond line")

        bench.run_config = broken_run_config  # in this child process only
    bench._job_main(child_args, conn, progress, threads)
