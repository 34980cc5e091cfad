"""The harvest job: plan shard tasks, run them on a Beam runner, prune stale shards, summarise.

    plan (driver thread, headers only) -> plan/*.jsonl + _DONE
    distributed runners:          Beam: stream the plan | Reshuffle | HarvestShard
    local FnApiRunner (N workers): Beam: N lanes | each streams the plan, claiming tasks | HarvestShard

The driver plans while the runner starts its workers (seconds locally, minutes on a cluster): the first
Beam stage streams the plan files as they appear and ends when the driver marks the plan complete.
Distributed runners balance the shuffled tasks themselves (dynamic work rebalancing). FnApiRunner splits a
stage's input statically between its workers, and a shuffle waits for the whole plan, so a local run uses
one lane per worker instead: every lane reads the plan as it grows and takes the next task nobody has
claimed yet (an exclusive file create), so workers start before planning ends and none idles while tasks
remain.

The Beam graph is linear on purpose (Beam's DaskRunner computes only the last transform's lineage).
Each HarvestShard call writes one shard whole and commits it with a fingerprint, so an interrupted
run resumes by skipping committed shards and outputs never hold half a shard or a sample twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
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
from pipeline.runner import ProgressMonitor, new_pipeline, run_pipeline
from pipeline.shard_writer import ShardWriter, committed_fingerprint

log = logging.getLogger(__name__)
TASKS_PER_PLAN_FILE = 100
PLAN_FLUSH_S = 0.5  # a plan file at least this often, so workers start on the first tasks while planning goes on


PLAN_DONE, PLAN_FAILED = "_DONE", "_FAILED"


@dataclass
class Plan:
    """What the driver knows from planning: plan files and each shard's candidate count (grows while
    planning runs)."""

    files: list[str] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)
    total: int = 0  # candidates over all shards planned so far (read by the progress bar meanwhile)
    complete: bool = False


def write_plan(params: HarvestParams, settings: str, plan: Plan | None = None) -> Plan:
    """Stream every task into `work_dir/plan/*.jsonl` (never all in memory), then the `_DONE` marker."""
    plan_dir = storage.join(params.work_dir, "plan")
    plan = plan if plan is not None else Plan()
    buffer: list[str] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        url = storage.join(plan_dir, f"plan-{len(plan.files):06d}.jsonl")
        with storage.atomic_write(url) as local, open(local, "w", encoding="utf-8") as fh:
            fh.write("\n".join(buffer) + "\n")
        plan.files.append(url)
        buffer.clear()
        last_flush = time.monotonic()

    for task in plan_sources(params, settings):
        if task["shard"] in plan.candidates:
            raise RuntimeError(f"two tasks share the shard name {task['shard']!r}")
        plan.candidates[task["shard"]] = candidate_count(task)
        plan.total += plan.candidates[task["shard"]]
        buffer.append(json.dumps(task, sort_keys=True, separators=(",", ":")))
        if len(buffer) >= TASKS_PER_PLAN_FILE or time.monotonic() - last_flush >= PLAN_FLUSH_S:
            flush()
    if buffer:
        flush()
    with fsspec.open(storage.join(plan_dir, PLAN_DONE), "w") as fh:
        fh.write(f"{len(plan.files)}\n")
    plan.complete = True
    return plan


class Planner(threading.Thread):
    """Plans in the background; a failure is kept for the driver and announced to the workers."""

    def __init__(self, params: HarvestParams, settings: str) -> None:
        super().__init__(daemon=True, name="harvest-planner")
        self.params, self.settings = params, settings
        self.plan = Plan()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Write the plan, or the `_FAILED` marker with the reason."""
        try:
            write_plan(self.params, self.settings, self.plan)
        except BaseException as exc:  # re-raised by the driver after the join
            self.error = exc
            with fsspec.open(storage.join(self.params.work_dir, "plan", PLAN_FAILED), "w") as fh:
                fh.write(f"{type(exc).__name__}: {exc}\n")


def read_plan_file(url: str) -> Iterator[str]:
    """Tasks of one plan file, one JSON line each."""
    text = storage.read_bytes(url).decode("utf-8")
    yield from (line for line in text.splitlines() if line.strip())


def claim(claims_dir: str, shard: str, lane: int) -> bool:
    """Take a task for this lane: True for the one lane whose exclusive create of the claim file succeeds."""
    try:
        fd = os.open(os.path.join(claims_dir, shard), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{lane}\n")
    return True


def stream_lane(lane: int, plan_dir: str, claims_dir: str) -> Iterator[str]:
    """The tasks this lane claims first, in plan order; it claims the next only when the last one is done
    (the harvest DoFn is fused after this generator), so a lane that draws slow tasks takes fewer."""
    os.makedirs(claims_dir, exist_ok=True)
    for line in stream_plan(plan_dir):
        if claim(claims_dir, json.loads(line)["shard"], lane):
            yield line


def local_lanes(options: PipelineOptions, work_dir: str) -> int | None:
    """How many claiming lanes a local FnApiRunner run uses (its worker count); None: shuffle instead.

    Lanes need the claim files on this machine's disk, so a remote `work_dir` falls back to the shuffle.
    """
    if options.view_as(StandardOptions).runner not in ("FnApiRunner", "DirectRunner"):
        return None
    if not storage.is_local(work_dir):
        return None
    return max(1, options.view_as(DirectOptions).direct_num_workers or 1)


PLAN_STALL_S = 3600.0  # a plan that gains no file for an hour means the driver is gone


def stream_plan(plan_dir: str, poll_s: float = 0.2) -> Iterator[str]:
    """Every task of the plan, read as the driver writes it, until the `_DONE` marker appears."""
    seen: set[str] = set()
    last_new = time.monotonic()
    while True:
        names = storage.list_files(plan_dir)
        if PLAN_FAILED in names:
            reason = storage.read_bytes(storage.join(plan_dir, PLAN_FAILED)).decode().strip()
            raise RuntimeError(f"planning failed: {reason}")
        for name in names:  # sorted; _DONE is written after the last plan file, so none is missed
            if name.endswith(".jsonl") and name not in seen:
                seen.add(name)
                last_new = time.monotonic()
                yield from read_plan_file(storage.join(plan_dir, name))
        if PLAN_DONE in names:
            return
        if time.monotonic() - last_new > PLAN_STALL_S:
            raise RuntimeError(f"no new plan file in {plan_dir} for {PLAN_STALL_S:.0f} s: is the driver gone?")
        time.sleep(poll_s)


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


def _run_beam(params: HarvestParams, beam_args: Sequence[str], progress_dir: str) -> None:
    pipeline = new_pipeline(params.runner, params.workers, beam_args)
    plan_dir = storage.join(params.work_dir, "plan")
    harvest = HarvestShard(params.model_dump(mode="json"), progress_dir)
    lanes = local_lanes(pipeline.options, params.work_dir)  # the options the runner was built with
    if lanes is None:
        tasks = (pipeline
                 | "PlanFolder" >> beam.Create([plan_dir])
                 | "StreamTasks" >> beam.FlatMap(stream_plan)
                 | "SpreadTasks" >> beam.Reshuffle())
    else:  # Create spreads its elements over the workers, one lane each
        claims_dir = storage.filesystem(storage.join(params.work_dir, "claims"))[1]
        tasks = (pipeline
                 | "Lanes" >> beam.Create(list(range(lanes)))
                 | "ClaimTasks" >> beam.FlatMap(stream_lane, plan_dir, claims_dir))
    _ = tasks | "HarvestShards" >> beam.ParDo(harvest)
    run_pipeline(pipeline)


def run_harvest(params: HarvestParams, beam_args: Sequence[str] = (), progress: bool = True
                ) -> dict[str, Any]:
    """Run the whole harvest and return its summary (also what `metrics/harvest.json` holds)."""
    from pipeline.summary import summarize  # DuckDB is only needed at the end

    started = time.monotonic()
    settings = settings_fingerprint(params, code_fingerprint())
    storage.remove_tree(storage.join(params.work_dir, "plan"))
    progress_dir = storage.join(params.work_dir, "progress")
    storage.remove_tree(progress_dir)
    storage.remove_tree(storage.join(params.work_dir, "claims"))
    log.info("planning %d source(s) while the runner starts", len(params.source_list))
    planner = Planner(params, settings)
    planner.start()
    monitor = ProgressMonitor(progress_dir, planner.plan, progress)
    monitor.start()
    try:
        _run_beam(params, beam_args, progress_dir)
    except Exception:
        if planner.error is not None:
            raise planner.error from None  # the real cause, not the workers' "planning failed"
        raise
    finally:
        planner.join()
        monitor.stop_event.set()
        monitor.join()
    plan = planner.plan
    log.info("%d shard(s), %d candidate(s)", len(plan.candidates), plan.total)
    markers = storage.list_files(progress_dir)
    finished = {m.rsplit(".", 1)[0] for m in markers}
    missing = sorted(s for s in plan.candidates if s not in finished)
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) were not written (first: {missing[0]}); re-run to resume")
    prune_stale(params.output_dir, set(plan.candidates))
    summary = summarize(params.output_dir, plan.total)
    summary["seconds"] = round(time.monotonic() - started, 2)
    summary["shard_tasks"] = len(plan.candidates)
    summary["shards_resumed"] = sum(1 for m in markers if m.endswith(".skipped"))
    return summary


__all__ = ["HarvestShard", "Plan", "prune_stale", "run_harvest", "write_plan"]
