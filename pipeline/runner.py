"""Running a Beam job the same way in every stage: runner options, local worker processes, progress bar.

Params name the runner and the local worker count; options given on the command line pass through to
Beam untouched, so every stage runs on FnApiRunner, Dask, Dataflow, Flink or Spark alike.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline import storage


class TaskCounts(Protocol):
    """What the progress bar reads: items per task (a shard), their total, whether more may come."""

    candidates: dict[str, int]
    total: int
    complete: bool


def _arg_value(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def pipeline_options(runner: str, workers: int, beam_args: Sequence[str]) -> PipelineOptions:
    """Runner options: params give the runner and worker count; anything on the CLI passes through."""
    args = list(beam_args)
    chosen = _arg_value(args, "--runner")
    if chosen is None:
        chosen = runner
        args += ["--runner", chosen]
    if chosen in ("FnApiRunner", "DirectRunner") and _arg_value(args, "--direct_num_workers") is None:
        args += ["--direct_num_workers", str(workers)]
    if "DaskRunner" in chosen and _arg_value(args, "--dask_npartitions") is None:
        args += ["--dask_npartitions", "64"]  # tasks spread over this many partitions after the shuffle
    if _arg_value(args, "--default_sdk_harness_log_level") is None:
        args += ["--default_sdk_harness_log_level", "WARNING"]
    return PipelineOptions(args)


def local_runner(options: PipelineOptions) -> Any:
    """FnApiRunner with our quiet worker processes when several local workers are asked for."""
    direct = options.view_as(DirectOptions)
    runner = options.view_as(StandardOptions).runner
    if runner not in ("FnApiRunner", "DirectRunner") or (direct.direct_num_workers or 1) <= 1 or (
            direct.direct_running_mode not in (None, "in_memory")):
        return None  # anything the user configured explicitly is left to Beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    from pipeline.beam_worker import quiet_local_runner_logs

    quiet_local_runner_logs()
    direct.direct_running_mode = "in_memory"  # the environment below supplies the processes
    command = f"{sys.executable} -m pipeline.beam_worker"
    return FnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))


def new_pipeline(runner: str, workers: int, beam_args: Sequence[str]) -> beam.Pipeline:
    """A Beam pipeline for these params and pass-through options."""
    options = pipeline_options(runner, workers, beam_args)
    return beam.Pipeline(runner=local_runner(options), options=options)


def run_pipeline(pipeline: beam.Pipeline) -> None:
    """Run to completion and release what the runner leaves open (DaskRunner's client)."""
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()


class ProgressMonitor(threading.Thread):
    """Counts the per-task progress markers workers leave and shows items done, rate and ETA."""

    def __init__(self, progress_dir: str, counts: TaskCounts, enabled: bool, desc: str = "harvest",
                 unit: str = "chip") -> None:
        super().__init__(daemon=True)
        self.progress_dir, self.counts, self.enabled = progress_dir, counts, enabled
        self.desc, self.unit = desc, unit
        self.stop_event = threading.Event()
        self.interval = 0.5 if storage.is_local(progress_dir) else 5.0

    def run(self) -> None:
        """Poll until stopped."""
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = tqdm(total=self.counts.total, unit=self.unit, desc=self.desc, file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0, disable=None if sys.stderr.isatty() else False)
        done: set[str] = set()
        while True:
            stopping = self.stop_event.wait(self.interval)
            if bar.total != self.counts.total:  # planning is still adding tasks
                bar.total = self.counts.total
                bar.refresh()
            for marker in storage.list_files(self.progress_dir):
                name = marker.rsplit(".", 1)[0]
                if name in self.counts.candidates and name not in done:
                    done.add(name)
                    bar.update(self.counts.candidates[name])
            planned = f"{len(self.counts.candidates)}" + ("" if self.counts.complete else "+")
            bar.set_postfix(shards=f"{len(done)}/{planned}")
            if stopping:
                break
        bar.close()

    def __enter__(self) -> ProgressMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join()
