"""The harvest job: plan shard tasks, run them on a Beam runner, prune stale shards, summarise.

    plan (driver, headers only) -> plan/*.jsonl -> Beam: read plan | Reshuffle | HarvestShard

The Beam graph is linear on purpose (Beam's DaskRunner computes only the last transform's lineage).
Each HarvestShard call writes one shard whole and commits it with a fingerprint, so an interrupted
run resumes by skipping committed shards and outputs never hold half a shard or a sample twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline import storage
from pipeline.params import HarvestParams
from pipeline.plan import candidate_count, code_fingerprint, plan_sources, settings_fingerprint
from pipeline.shard_writer import ShardWriter, committed_fingerprint

log = logging.getLogger(__name__)
TASKS_PER_PLAN_FILE = 100


@dataclass
class Plan:
    """What the driver knows after planning: plan files and each shard's candidate count."""

    files: list[str]
    candidates: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Candidates over all shards."""
        return sum(self.candidates.values())


def write_plan(params: HarvestParams, settings: str) -> Plan:
    """Stream every task into `work_dir/plan/*.jsonl` (never all in memory) and return the index."""
    plan_dir = storage.join(params.work_dir, "plan")
    storage.remove_tree(plan_dir)
    plan = Plan(files=[])
    buffer: list[str] = []

    def flush() -> None:
        url = storage.join(plan_dir, f"plan-{len(plan.files):05d}.jsonl")
        with storage.atomic_write(url) as local, open(local, "w", encoding="utf-8") as fh:
            fh.write("\n".join(buffer) + "\n")
        plan.files.append(url)
        buffer.clear()

    for task in plan_sources(params, settings):
        if task["shard"] in plan.candidates:
            raise RuntimeError(f"two tasks share the shard name {task['shard']!r}")
        plan.candidates[task["shard"]] = candidate_count(task)
        buffer.append(json.dumps(task, sort_keys=True, separators=(",", ":")))
        if len(buffer) >= TASKS_PER_PLAN_FILE:
            flush()
    if buffer:
        flush()
    return plan


def read_plan_file(url: str) -> Iterator[str]:
    """Tasks of one plan file, one JSON line each."""
    text = storage.read_bytes(url).decode("utf-8")
    yield from (line for line in text.splitlines() if line.strip())


class HarvestShard(beam.DoFn):
    """Process one shard task; skip it when its committed fingerprint already matches."""

    def __init__(self, params: dict[str, Any], progress_dir: str) -> None:
        self.params_dict = params
        self.progress_dir = progress_dir
        self.written = Metrics.counter("harvest", "chips_written")
        self.rejected = Metrics.counter("harvest", "candidates_rejected")
        self.skipped = Metrics.counter("harvest", "shards_skipped")

    def setup(self) -> None:
        """Build the params once per worker."""
        self.params = HarvestParams.model_validate(self.params_dict)

    def process(self, line: str) -> Iterator[dict[str, Any]]:
        """Write the shard (or skip it) and leave a progress marker for the driver's bar."""
        from pipeline.process import harvest_task  # imported on the worker

        started = time.time()
        cpu_started = time.process_time()
        task = json.loads(line)
        output_dir = self.params.output_dir
        if committed_fingerprint(output_dir, task["shard"]) == task["fingerprint"]:
            self.skipped.inc()
            result = {"shard": task["shard"], "skipped": True}
        else:
            writer = ShardWriter(output_dir, task["shard"], task["fingerprint"])
            try:
                harvest_task(task, self.params, writer)
            except BaseException:
                writer.abort()
                raise
            result = writer.commit()
            self.written.inc(result["written"])
            self.rejected.inc(result["rejected"])
        # a progress marker for the driver's bar and its final check (a half-written one is harmless:
        # the progress folder is cleared at the start of every run); timings show worker utilisation
        result.update(worker=f"{socket.gethostname()}:{os.getpid()}", started=round(started, 3),
                      seconds=round(time.time() - started, 4),
                      cpu_seconds=round(time.process_time() - cpu_started, 4))
        state = "skipped" if result.get("skipped") else "done"
        with fsspec.open(storage.join(self.progress_dir, f"{task['shard']}.{state}"), "w") as fh:
            json.dump(result, fh)
        yield {k: result[k] for k in ("shard", "written", "rejected") if k in result}


def _arg_value(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def pipeline_options(params: HarvestParams, beam_args: Sequence[str], n_tasks: int) -> PipelineOptions:
    """Runner options: params give the runner and worker count; anything on the CLI passes through."""
    args = list(beam_args)
    runner = _arg_value(args, "--runner")
    if runner is None:
        runner = params.runner
        args += ["--runner", runner]
    if runner in ("FnApiRunner", "DirectRunner") and _arg_value(args, "--direct_num_workers") is None:
        args += ["--direct_num_workers", str(params.workers)]
    if "DaskRunner" in runner and _arg_value(args, "--dask_npartitions") is None:
        args += ["--dask_npartitions", str(max(1, min(n_tasks, 256)))]
    if _arg_value(args, "--default_sdk_harness_log_level") is None:
        args += ["--default_sdk_harness_log_level", "WARNING"]
    return PipelineOptions(args)


class ProgressMonitor(threading.Thread):
    """Counts progress markers and shows chips done, rate and ETA (a bar on a terminal)."""

    def __init__(self, progress_dir: str, plan: Plan, enabled: bool) -> None:
        super().__init__(daemon=True)
        self.progress_dir, self.plan, self.enabled = progress_dir, plan, enabled
        self.stop_event = threading.Event()
        self.interval = 0.5 if storage.is_local(progress_dir) else 5.0

    def run(self) -> None:
        """Poll until stopped."""
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = tqdm(total=self.plan.total, unit="chip", desc="harvest", file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0, disable=None if sys.stderr.isatty() else False)
        done_shards: set[str] = set()
        while True:
            stopping = self.stop_event.wait(self.interval)
            for marker in storage.list_files(self.progress_dir):
                name = marker.rsplit(".", 1)[0]
                if name in self.plan.candidates and name not in done_shards:
                    done_shards.add(name)
                    bar.update(self.plan.candidates[name])
            bar.set_postfix(shards=f"{len(done_shards)}/{len(self.plan.candidates)}")
            if stopping:
                break
        bar.close()


def prune_stale(output_dir: str, shards: set[str]) -> int:
    """Delete shard files no task of this run owns (old params, removed scenes) and temp leftovers."""
    removed = 0
    for sub, suffix in (("shards", ".tar"), ("metadata", ".parquet"), ("rejected", ".parquet")):
        folder = storage.join(output_dir, sub)
        for name in storage.list_files(folder):
            stem = name[: -len(suffix)] if name.endswith(suffix) else None
            if name.startswith(".") or stem not in shards:
                storage.remove(storage.join(folder, name))
                removed += 1
    return removed


def _local_runner(options: PipelineOptions) -> Any:
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


def _run_beam(params: HarvestParams, plan: Plan, beam_args: Sequence[str], progress_dir: str) -> None:
    options = pipeline_options(params, beam_args, len(plan.candidates))
    pipeline = beam.Pipeline(runner=_local_runner(options), options=options)
    _ = (
        pipeline
        | "PlanFiles" >> beam.Create(plan.files)
        | "ReadTasks" >> beam.FlatMap(read_plan_file)
        | "SpreadTasks" >> beam.Reshuffle()
        | "HarvestShards" >> beam.ParDo(HarvestShard(params.model_dump(mode="json"), progress_dir))
    )
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)  # DaskRunner leaves its client open
        if client is not None:
            client.close()


def run_harvest(params: HarvestParams, beam_args: Sequence[str] = (), progress: bool = True
                ) -> dict[str, Any]:
    """Run the whole harvest and return its summary (also what `metrics/harvest.json` holds)."""
    from pipeline.summary import summarize  # DuckDB is only needed at the end

    started = time.monotonic()
    settings = settings_fingerprint(params, code_fingerprint())
    log.info("planning %d source(s)", len(params.source_list))
    plan = write_plan(params, settings)
    log.info("planned %d shard(s), %d candidate(s) in %.1f s", len(plan.candidates), plan.total,
             time.monotonic() - started)
    progress_dir = storage.join(params.work_dir, "progress")
    storage.remove_tree(progress_dir)
    prune_stale(params.output_dir, set(plan.candidates))
    monitor = ProgressMonitor(progress_dir, plan, progress)
    monitor.start()
    try:
        if plan.files:
            _run_beam(params, plan, beam_args, progress_dir)
    finally:
        monitor.stop_event.set()
        monitor.join()
    markers = storage.list_files(progress_dir)
    finished = {m.rsplit(".", 1)[0] for m in markers}
    missing = sorted(s for s in plan.candidates if s not in finished)
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) were not written (first: {missing[0]}); re-run to resume")
    prune_stale(params.output_dir, set(plan.candidates))
    summary = summarize(params.output_dir, plan.total)
    summary["seconds"] = round(time.monotonic() - started, 2)
    summary["shards_resumed"] = sum(1 for m in markers if m.endswith(".skipped"))
    return summary


__all__ = ["HarvestShard", "Plan", "prune_stale", "run_harvest", "write_plan"]
