"""What the benchmarks share: how busy the rest of the machine is, and waiting for it to be quiet."""

from __future__ import annotations

import sys
import time

import psutil


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_quiet(max_cores: float, patience_s: float, *, sample_s: float = 3.0, pause_s: float = 10.0,
               warn: bool = False) -> float:
    """Wait (up to `patience_s`) until other processes keep fewer than `max_cores` cores busy; return that load.

    `warn`: say on stderr when the patience ran out and the measurement goes ahead on a busy machine.
    """
    deadline = time.monotonic() + patience_s
    while True:
        before = busy_cpu_s()
        time.sleep(sample_s)
        load = (busy_cpu_s() - before) / sample_s
        if load < max_cores or time.monotonic() > deadline:
            if warn and load >= max_cores:
                print(f"machine still busy ({load:.2f} cores) after {patience_s:.0f} s: measuring anyway",
                      file=sys.stderr)
            return load
        print(f"machine busy ({load:.2f} cores used by other processes): waiting", file=sys.stderr)
        time.sleep(pause_s)
