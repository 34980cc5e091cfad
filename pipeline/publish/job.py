"""The `publish` job: curated metadata + harvest images -> data/git10m (shards, metadata, rejected, cards' inputs).

Plan in the driver (footers only), write the shards in a Beam job (one task per published shard, resumable
by fingerprint), then lay out the metadata and the shared files. Nothing holds the dataset in memory: a
task holds one shard's samples, and the metadata layout is a DuckDB sort that spills to disk.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from pipeline import storage
from pipeline.curation import io
from pipeline.publish import finalize
from pipeline.publish.params import PublishParams
from pipeline.publish.plan import OutputShard, plan_shards
from pipeline.publish.shards import Paths, WriteShard
from pipeline.runner import ProgressMonitor, new_pipeline, run_pipeline

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Samples per published shard: the progress bar's totals."""

    candidates: dict[str, int]
    total: int
    complete: bool = True


SHARD_SETTINGS = ("shard_prefix", "samples_per_shard", "split", "split_h3_resolution", "seed")


def plan(params: PublishParams) -> tuple[list[OutputShard], dict[str, str], str]:
    """Published shards, each shard's fingerprint, and the fingerprint of the whole run."""
    shards = io.list_shards(params.curated_dir)
    if not shards:
        raise FileNotFoundError(f"publish: no curated metadata under {params.curated_dir}/metadata: run the "
                                "curation stages first (`dvc repro` runs them in order)")
    found = io.footers(params.curated_dir, shards)
    outputs = plan_shards({s: n for s, (n, _) in found.items()}, params.samples_per_shard, params.shard_prefix,
                          params.seed)
    settings = params.model_dump(mode="json", include=set(SHARD_SETTINGS))
    code = io.code_fingerprint(include=("publish",))
    fps = {o.name: io.fingerprint("publish", settings, code, o.ranges, [found[s][1] for s, _, _ in o.ranges])
           for o in outputs}
    everything = io.fingerprint(sorted(fps.items()), params.row_group_size)
    return outputs, fps, everything


def prune(params: PublishParams, names: set[str]) -> int:
    """Remove shards (and staging files) of an earlier run that this plan no longer has."""
    removed = 0
    for folder, suffix, keep in ((storage.join(params.dir, "shards"), ".tar", {"sizes.json"}),
                                 (storage.join(params.work_dir, "staging", "metadata"), ".parquet", set()),
                                 (storage.join(params.work_dir, "staging", "rejected"), ".parquet", set())):
        for name in storage.list_files(folder):
            stem = name[: -len(suffix)] if name.endswith(suffix) else None
            if name not in keep and (stem not in names or name.startswith(".")):
                storage.remove(storage.join(folder, name))
                removed += 1
    return removed


def run_publish(params: PublishParams, beam_args: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Publish the curated dataset and return the summary `metrics/publish.json` holds."""
    from pipeline.publish.layout import write_metadata

    started = time.monotonic()
    outputs, fps, everything = plan(params)
    total = sum(o.rows for o in outputs)
    log.info("publish: %d curated row(s) -> %d shard(s) of up to %d", total, len(outputs), params.samples_per_shard)
    progress_dir = storage.join(params.work_dir, "progress")
    storage.remove_tree(progress_dir)
    records = [json.dumps({"name": o.name, "ranges": [list(r) for r in o.ranges], "fingerprint": fps[o.name]},
                          sort_keys=True) for o in outputs]
    pipeline = new_pipeline(params.runner, params.workers, beam_args)
    _ = (pipeline | "publish:Tasks" >> beam.Create(records) | "publish:Spread" >> beam.Reshuffle()
         | "publish:Write" >> beam.ParDo(WriteShard(params.model_dump(mode="json"), progress_dir)))
    counts = Counts(candidates={o.name: o.rows for o in outputs}, total=total)
    with ProgressMonitor(progress_dir, counts, progress, desc="publish", unit="sample"):
        run_pipeline(pipeline)
    markers = storage.list_files(progress_dir)
    missing = sorted({o.name for o in outputs} - {m.rsplit(".", 1)[0] for m in markers})
    if missing:
        raise RuntimeError(f"publish: {len(missing)} shard(s) were not written (first: {missing[0]}); re-run")
    names = [o.name for o in outputs]
    prune(params, set(names))
    staging = {n: Paths.of(params, n).staging for n in names}
    sizes = finalize.write_sizes(params, names, staging)
    layout = write_metadata([staging[n] for n in names], storage.join(params.dir, "metadata"),
                            row_group_size=params.row_group_size, fingerprint=everything,
                            temp_dir=storage.join(params.work_dir, "duckdb") if storage.is_local(params.work_dir)
                            else None)
    rejected = finalize.write_rejected(params)
    funnel = finalize.write_funnel(params)
    sums = finalize.write_checksums(params.dir)
    summary = summarize(params, sizes, funnel, rejected, len(sums), layout)
    summary["seconds"] = round(time.monotonic() - started, 2)
    summary["shards_resumed"] = sum(1 for m in markers if m.endswith(".skipped"))
    return summary


def summarize(params: PublishParams, sizes: dict[str, int], funnel: list[dict[str, Any]], rejected: int,
              files: int, layout: dict[str, Any]) -> dict[str, Any]:
    """Samples, shards, splits, per source, and what publishing itself dropped."""
    from pipeline.publish.query import connect

    con = connect(params.dir)
    splits = dict(con.execute("SELECT split, count(*) FROM samples GROUP BY 1 ORDER BY 1").fetchall())
    levels = {str(k): v for k, v in con.execute("SELECT level, count(*) FROM samples GROUP BY 1 ORDER BY 1")
              .fetchall()}
    publish_rows = [r for r in funnel if r["stage"] == "publish"]
    return {
        "stage": "publish", "in": sum(r["in"] for r in publish_rows), "samples": sum(sizes.values()),
        "shards": len(sizes), "dropped": sum(r["dropped"] for r in publish_rows),
        "by_reason": {k: v for r in publish_rows for k, v in r["dropped_by_reason"]},
        "splits": splits, "levels": levels,
        "by_source": {r["source"]: r["kept"] for r in publish_rows},
        "rejected_all_stages": rejected, "checksummed_files": files,
        "metadata_files": layout.get("files"),
    }


def summary_line(summary: dict[str, Any], out_dir: str) -> str:
    """One human line: samples and shards written, splits, drops, time."""
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    reasons = ", ".join(f"{k} {v}" for k, v in summary["by_reason"].items()) or "none"
    resumed = summary.get("shards_resumed", 0)
    tail = f"; {resumed} shard(s) already done (kept)" if resumed else ""
    return (f"publish: {summary['samples']} samples in {summary['shards']} shard(s) written to {out_dir} "
            f"({splits}); dropped {summary['dropped']} ({reasons}); "
            f"{summary['rejected_all_stages']} rejected candidates of all stages in rejected/; "
            f"{summary['seconds']:.1f} s{tail}")
