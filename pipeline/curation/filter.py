"""The `filter` stage: keep image-text pairs whose CLIP score passes an absolute threshold and/or lies in
the top `top_percent` of its (source, level) group.

Web CLIP thresholds (LAION's 0.28) are calibrated on web photos and captions; remote-sensing captions
score lower across the board, so a per-group top share is the default (as SkyScript and RS5M do).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from pipeline.curation import io
from pipeline.curation.job import ShardStep, StageContext

COLUMNS = ["key", "source", "level", "clip_score"]


def group_of(source: str, level: int | None) -> str:
    """The (source, level) group a score is ranked in."""
    return f"{source}|{'none' if level is None else level}"


def top_cutoff(scores: np.ndarray, top_percent: float) -> float:
    """The lowest score still inside the top `top_percent` (ties at the cut-off are all kept)."""
    if scores.size == 0:
        return math.inf
    keep = max(1, math.ceil(scores.size * top_percent / 100.0 - 1e-9))
    return float(np.sort(scores)[::-1][keep - 1])


class CutoffFn(beam.CombineFn):
    """Exact per-group cut-off: scores are gathered as float32 arrays (4 bytes per sample)."""

    def __init__(self, top_percent: float) -> None:
        self.top_percent = top_percent

    def create_accumulator(self) -> list[np.ndarray]:
        """No scores yet."""
        return []

    def add_input(self, acc: list[np.ndarray], score: float) -> list[np.ndarray]:
        """One more score."""
        acc.append(np.array([score], dtype=np.float32))
        if len(acc) > 4096:
            acc[:] = [np.concatenate(acc)]
        return acc

    def merge_accumulators(self, accs: Any) -> list[np.ndarray]:
        """Concatenate partial arrays."""
        parts = [a for acc in accs for a in acc]
        return [np.concatenate(parts)] if parts else []

    def extract_output(self, acc: list[np.ndarray]) -> float:
        """The cut-off score."""
        scores = np.concatenate(acc) if acc else np.empty(0, np.float32)
        return top_cutoff(scores, self.top_percent)


def _scores(record: str, ctx: StageContext) -> Iterator[tuple[str, float]]:
    import json

    shard = json.loads(record)["shard"]
    for row in io.read_table(ctx.input_dir, shard, COLUMNS).to_pylist():
        yield group_of(row["source"], row["level"]), float(np.float32(row["clip_score"]))


class FilterShard(ShardStep):
    """Apply the rules to one shard with the global cut-offs."""

    def process(self, element: Any, cutoffs: dict[str, float] | None = None) -> Iterator[dict[str, Any]]:
        """Receive the cut-offs side input, then write as every ShardStep does."""
        self.cutoffs = cutoffs or {}
        yield from super().process(element)

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Keep rows passing both rules; the rest are rejected with the score and the bar they missed."""
        table = io.read_table(self.ctx.input_dir, shard)
        keep, rejected = [], []
        for i, row in enumerate(table.to_pylist()):
            score = float(np.float32(row["clip_score"]))  # compare what the Parquet file holds
            cutoff = self.cutoffs.get(group_of(row["source"], row["level"]), -math.inf)
            if self.params.min_score is not None and score < self.params.min_score:
                rejected.append(io.rejected_row(row, "filter", "below_min_score",
                                                f"{score:.4f} < min_score {self.params.min_score}"))
            elif self.params.top_percent is not None and score < cutoff:
                rejected.append(io.rejected_row(row, "filter", "below_top_percent",
                                                f"{score:.4f} < {cutoff:.4f}, the top {self.params.top_percent:g}% "
                                                f"cut-off of {group_of(row['source'], row['level'])}"))
            else:
                keep.append(i)
        return io.write_shard(self.ctx.output_dir, shard, io.take(table, keep), rejected, fp)


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """Scores -> per-group cut-offs (side input) -> filter each shard."""
    top = ctx.params.get("top_percent")
    cutoffs = (tasks
               | "filter:Scores" >> beam.FlatMap(_scores, ctx)
               | "filter:Cutoffs" >> beam.CombinePerKey(CutoffFn(top if top is not None else 100.0)))
    return tasks | "filter:Write" >> beam.ParDo(FilterShard(ctx), cutoffs=beam.pvalue.AsDict(cutoffs))
