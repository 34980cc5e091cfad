"""The frame every curation stage runs in: shard tasks, a Beam pipeline, resume, progress, summary.

The driver lists the input shards and gives each a fingerprint (its input's fingerprint, or all inputs'
for stages that decide globally, plus params and code). A stage adds its transforms; its last step is a
`ShardStep` that skips shards already committed with that fingerprint and leaves a progress marker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import duckdb
import fsspec

from pipeline import storage
from pipeline.curation import io
from pipeline.curation.params import STAGE_MODELS, CurationParams
from pipeline.runner import ProgressMonitor, new_pipeline, run_pipeline

log = logging.getLogger(__name__)
NOT_IN_FINGERPRINT = ("cache_dir", "vlm_cache_dir")  # where caches live changes no output byte


@dataclass
class StageContext:
    """What workers need to know about a stage run (plain data: it is pickled to them)."""

    stage: str
    common: dict[str, Any]
    params: dict[str, Any]
    input_dir: str
    output_dir: str
    progress_dir: str
    rows_in: int = 0  # rows of the input (known after planning; sizes partitions)

    def load(self) -> tuple[CurationParams, Any]:
        """The validated params objects (on a worker)."""
        return CurationParams.model_validate(self.common), STAGE_MODELS[self.stage].model_validate(self.params)


@dataclass
class Tasks:
    """Every shard task of a run: fingerprints and input row counts (the progress bar's totals)."""

    fingerprints: dict[str, str]
    candidates: dict[str, int]
    total: int = 0
    complete: bool = True
    records: list[str] = field(default_factory=list)  # one JSON task per shard, sorted


def plan_tasks(ctx: StageContext, global_inputs: bool) -> Tasks:
    """One task per input shard. `global_inputs`: every shard's output depends on all inputs."""
    shards = io.list_shards(ctx.input_dir)
    found = io.footers(ctx.input_dir, shards)
    code = io.code_fingerprint()
    everything = io.fingerprint(sorted((s, fp) for s, (_, fp) in found.items())) if global_inputs else None
    settings = {k: v for k, v in ctx.params.items() if k not in NOT_IN_FINGERPRINT}
    fps = {s: io.fingerprint(ctx.stage, settings, code, everything or fp) for s, (_, fp) in found.items()}
    counts = {s: n for s, (n, _) in found.items()}
    records = [json.dumps({"shard": s, "fingerprint": fps[s]}, sort_keys=True) for s in shards]
    return Tasks(fps, counts, sum(counts.values()), True, records)


class ShardStep(beam.DoFn):
    """Last step of a stage: write one shard unless it is already committed; leave a progress marker."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def setup(self) -> None:
        """Validate params once per worker, then the stage's own set-up."""
        self.common, self.params = self.ctx.load()
        self.on_setup()

    def on_setup(self) -> None:
        """Per-worker set-up of a stage (load a model, an index)."""

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Compute and commit the shard's output; return kept/rejected counts."""
        raise NotImplementedError

    def process(self, element: Any) -> Iterator[dict[str, Any]]:
        """`element` is a task record, or (shard, {"task": [record], ...}) after a join."""
        if isinstance(element, tuple):
            records = list(element[1]["task"])  # none: decisions for a shard that no longer exists
            task, extra = (json.loads(records[0]) if records else None), element[1]
        else:
            task, extra = json.loads(element), None
        if task is not None:
            yield self._run(task["shard"], task["fingerprint"], extra)

    def _run(self, shard: str, fp: str, extra: Any) -> dict[str, Any]:
        started = time.time()
        if io.committed(self.ctx.output_dir, shard) == fp:
            result: dict[str, Any] = {"shard": shard, "skipped": True}
        else:
            result = {"shard": shard, **self.write(shard, fp, extra)}
        result["seconds"] = round(time.time() - started, 4)
        state = "skipped" if result.get("skipped") else "done"
        with fsspec.open(storage.join(self.ctx.progress_dir, f"{shard}.{state}"), "w") as fh:
            json.dump(result, fh)
        return result


Build = Callable[[beam.PCollection, StageContext], Any]


def run_stage(stage: str, common: CurationParams, params: Any, build: Build, beam_args: Sequence[str] = (),
              progress: bool = True, global_inputs: bool = False,
              subs: Sequence[str] = ("metadata", "rejected")) -> dict[str, Any]:
    """Run one curation stage end to end and return its summary (what `metrics/{stage}.json` holds)."""
    started = time.monotonic()
    progress_dir = storage.join(common.work_dir, "progress", stage)
    storage.remove_tree(progress_dir)
    ctx = StageContext(stage, common.model_dump(mode="json"), params.model_dump(mode="json"),
                       common.input_dir(stage), common.stage_dir(stage), progress_dir)
    if not io.list_shards(ctx.input_dir):
        raise FileNotFoundError(f"{stage}: no metadata under {ctx.input_dir}/metadata: run the previous stage "
                                "first (`dvc repro` runs them in order)")
    tasks = plan_tasks(ctx, global_inputs)
    ctx.rows_in = tasks.total
    log.info("%s: %d shard(s), %d row(s) in", stage, len(tasks.records), tasks.total)
    pipeline = new_pipeline(common.runner, common.workers, beam_args)
    task_pcoll = pipeline | f"{stage}:Tasks" >> beam.Create(tasks.records) | f"{stage}:Spread" >> beam.Reshuffle()
    build(task_pcoll, ctx)
    with ProgressMonitor(progress_dir, tasks, progress, desc=stage, unit="row"):
        run_pipeline(pipeline)
    markers = storage.list_files(progress_dir)
    finished = {m.rsplit(".", 1)[0] for m in markers}
    missing = sorted(set(tasks.fingerprints) - finished)
    if missing:
        raise RuntimeError(f"{stage}: {len(missing)} shard(s) were not written (first: {missing[0]}); re-run")
    io.prune(ctx.output_dir, set(tasks.fingerprints), subs)
    summary = summarize(stage, ctx.input_dir, ctx.output_dir, tasks.total)
    summary["seconds"] = round(time.monotonic() - started, 2)
    summary["shards_resumed"] = sum(1 for m in markers if m.endswith(".skipped"))
    return summary


def summarize(stage: str, input_dir: str, output_dir: str, rows_in: int) -> dict[str, Any]:
    """Rows in, kept (and added by caption expansion) and dropped by reason, per source."""
    con = duckdb.connect()
    if not storage.is_local(output_dir):
        con.register_filesystem(storage.filesystem(output_dir)[0])
    meta, rej = storage.join(output_dir, "metadata", "*.parquet"), storage.join(output_dir, "rejected", "*.parquet")
    by_source: dict[str, dict[str, Any]] = {}
    for source, kept, added in con.execute(
            "SELECT source, count(*) FILTER (key = image_key), count(*) FILTER (key <> image_key) "
            "FROM read_parquet(?) GROUP BY 1 ORDER BY 1", [meta]).fetchall():
        by_source[source] = {"kept": kept, "added": added, "rejected": 0, "reasons": {}}
    by_reason: dict[str, int] = {}
    for source, reason, n in con.execute(
            "SELECT source, reason, count(*) FROM read_parquet(?) WHERE stage = ? GROUP BY 1, 2 ORDER BY 1, 2",
            [rej, stage]).fetchall():
        entry = by_source.setdefault(source, {"kept": 0, "added": 0, "rejected": 0, "reasons": {}})
        entry["rejected"] += n
        entry["reasons"][reason] = n
        by_reason[reason] = by_reason.get(reason, 0) + n
    kept = sum(v["kept"] + v["added"] for v in by_source.values())
    return {"stage": stage, "in": rows_in, "kept": kept, "rejected": sum(by_reason.values()),
            "by_reason": dict(sorted(by_reason.items())), "by_source": dict(sorted(by_source.items()))}


def summary_line(summary: dict[str, Any], output_dir: str) -> str:
    """One human line: rows in, kept, dropped and why, time."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_reason"].items(), key=lambda kv: -kv[1]))
    resumed = summary.get("shards_resumed", 0)
    tail = f"; {resumed} shard(s) already done (kept)" if resumed else ""
    return (f"{summary['stage']}: {summary['in']} rows in, {summary['kept']} written to {output_dir}; "
            f"dropped {summary['rejected']} ({reasons or 'none'}) in {summary.get('seconds', 0):.1f} s{tail}")
