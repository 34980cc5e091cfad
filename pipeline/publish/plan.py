"""Which curated rows go into which published shard, and which split each sample belongs to.

Shards are contiguous runs of the curated rows, with the curated shards taken in a seeded hash order:
each published shard reads one to a few curated shards (no shuffle of image bytes through Beam), every
shard but the last is full, and the sources are interleaved across shards, so loaders that draw shards at
random (open_clip's `--dataset-resampled`, webdataset's shard shuffle) mix sources. Within a shard the
samples are in a seeded hash order of their keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h3

from pipeline.publish.params import SPLITS, SplitParams

_SOURCE_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}


def unit_hash(*parts: Any) -> float:
    """A stable number in [0, 1) from the parts (same on every machine and Python version)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sort_key(seed: int, key: str) -> str:
    """Order of samples within a published shard: a seeded hash of the key (ties impossible: key appended)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16] + key


@dataclass(frozen=True)
class OutputShard:
    """One published shard: its name and the (curated shard, first row, end row) ranges it packs."""

    name: str
    ranges: tuple[tuple[str, int, int], ...]

    @property
    def rows(self) -> int:
        """Curated rows it packs (samples, unless images turn out missing)."""
        return sum(stop - start for _, start, stop in self.ranges)


def input_order(shards: Sequence[str], seed: int) -> list[str]:
    """Curated shards in the seeded order their rows are packed (interleaves sources and regions)."""
    return sorted(shards, key=lambda s: (unit_hash("publish-order", seed, s), s))


def plan_shards(counts: Mapping[str, int], samples_per_shard: int, prefix: str, seed: int) -> list[OutputShard]:
    """Pack the curated rows, in `input_order`, into shards of `samples_per_shard` (the last holds the rest)."""
    shards: list[OutputShard] = []
    ranges: list[tuple[str, int, int]] = []
    room = samples_per_shard
    for shard in input_order(list(counts), seed):
        start, total = 0, counts[shard]
        while start < total:
            take = min(room, total - start)
            ranges.append((shard, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(OutputShard(f"{prefix}-{len(shards):06d}", tuple(ranges)))
                ranges, room = [], samples_per_shard
    if ranges:
        shards.append(OutputShard(f"{prefix}-{len(shards):06d}", tuple(ranges)))
    return shards


def split_block(row: Mapping[str, Any], resolution: int) -> str | None:
    """The geographic block of a located sample (its H3 parent cell), None without a location."""
    cell = row.get("h3_cell")
    if cell:
        res = h3.get_resolution(cell)
        return str(h3.cell_to_parent(cell, resolution)) if res > resolution else str(cell)
    lon, lat = row.get("lon"), row.get("lat")
    if lon is not None and lat is not None:
        return str(h3.latlng_to_cell(lat, lon, resolution))
    return None


def choose_split(unit: float, shares: SplitParams) -> str:
    """Map a uniform number to a split by the cumulative shares."""
    edge = 0.0
    for name in SPLITS:
        edge += getattr(shares, name)
        if unit < edge:
            return name
    return next(n for n in reversed(SPLITS) if getattr(shares, n) > 0)


def assign_split(row: Mapping[str, Any], shares: SplitParams, resolution: int, seed: int) -> str:
    """Split of one sample: by geographic block; else the source's own split; else one per scene.

    All chips whose centres share a block (and every pyramid level of them) land in one split, so
    neighbouring chips meet across splits only at block borders.
    """
    block = split_block(row, resolution)
    if block is not None:
        return choose_split(unit_hash("split", seed, "h3", block), shares)
    own = _SOURCE_SPLITS.get(str(row.get("source_split") or "").strip().lower())
    if own is not None:
        return own
    return choose_split(unit_hash("split", seed, "scene", row.get("source"), row.get("scene_id")), shares)
