"""What the benchmarks share: how busy the rest of the machine is, waiting for it to be quiet, peak memory,
and writing a result table into RESULTS.md."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


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


class PeakRss(threading.Thread):
    """Largest summed RSS of a process and its descendants (sampled every `interval` s), and a coarse timeline."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.interval = interval
        self.timeline: list[tuple[float, float]] = []  # (seconds, GiB) every 2 s
        self.done = threading.Event()

    def run(self) -> None:
        """Sample until `done` is set or the process is gone."""
        start, last = time.monotonic(), -1.0
        while not self.done.wait(self.interval):
            try:
                total = 0
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                now = time.monotonic() - start
                if now - last >= 2.0:
                    self.timeline.append((round(now, 1), round(total / 2**30, 3)))
                    last = now
            except psutil.Error:
                return


def update_results(text: str, name: str) -> None:
    """Put `text` between the `<!-- {name}:start/end -->` markers of RESULTS.md (appended when they are missing)."""
    doc = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}\n{end}"
    if start in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS_MD.write_text(doc)
