"""Every number the data cards print, aggregated from the published dataset by DuckDB.

The cards never hold rows: each fact is a GROUP BY over the `samples`, `rejected` and `funnel` views
(10M+ rows stay in Parquet). Shard sizes and checksums come from the files the publish job wrote beside
them, and are checked against the data so a card cannot describe a dataset that is not there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import Text2EarthError
from pipeline.publish.query import connect
from pipeline.schema import PUBLISHED_SCHEMA

log = logging.getLogger("text2earth.cards")

# Suffixes of the files `checksums.sha256` must list: every tar and Parquet file of the release.
CHECKSUMMED_SUFFIXES = (".tar", ".parquet")


class CardsError(Text2EarthError, ValueError):
    """The published dataset is inconsistent (checksums, sizes) or a card fails validation."""


@dataclass(frozen=True)
class SourceFacts:
    """One source as it appears in the published samples (one row per license + attribution pair)."""

    name: str
    license: str
    attribution: str
    samples: int
    georeferenced: int
    caption_sources: tuple[str, ...]


@dataclass(frozen=True)
class LevelFacts:
    """Samples at one Text2Earth resolution level and the GSD range they really have."""

    level: int
    samples: int
    min_gsd_m: float | None
    max_gsd_m: float | None


@dataclass(frozen=True)
class FunnelStage:
    """Rows into and out of one pipeline stage, summed over sources, with drop reasons."""

    step: int
    stage: str
    rows_in: int
    kept: int
    added: int
    dropped: int
    reasons: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class SchemaColumn:
    """One published column: name, Arrow type, description and whether it lives in the Hive path."""

    name: str
    type: pa.DataType
    description: str
    from_partition: bool = False


@dataclass(frozen=True)
class DatasetFacts:
    """Everything the README and the Croissant file say about the data, computed once."""

    samples: int
    georeferenced: int
    countries: int
    gsd_known: int
    gsd_min_m: float | None
    gsd_median_m: float | None
    gsd_max_m: float | None
    mean_caption_words: float
    acquired_first: str | None
    acquired_last: str | None
    remote_samples: int  # source_uri fetched over the network (http, s3, gs...)
    sources: tuple[SourceFacts, ...]
    caption_sources: tuple[tuple[str, int], ...]
    clip_models: tuple[tuple[str, int], ...]
    continents: tuple[tuple[str | None, int], ...]
    levels: tuple[LevelFacts, ...]
    splits: tuple[tuple[str, int], ...]
    image_formats: tuple[tuple[str, int], ...]
    funnel: tuple[FunnelStage, ...]
    rejected: tuple[tuple[str, str, int], ...]
    shards: tuple[tuple[str, int], ...]
    checksums: tuple[tuple[str, str], ...]  # (relative path, sha256), sorted by path
    file_sizes: dict[str, int]
    schema: tuple[SchemaColumn, ...]

    @property
    def source_names(self) -> list[str]:
        """Distinct source names, sorted."""
        return sorted({s.name for s in self.sources})


def _rows(con: Any, sql: str) -> list[tuple[Any, ...]]:
    return list(con.execute(sql).fetchall())


def _funnel(con: Any) -> tuple[FunnelStage, ...]:
    """Per stage totals and drop reasons, in pipeline order (the `step` column)."""
    totals = _rows(con, 'SELECT step, stage, sum("in"), sum(kept), sum(added), sum(dropped) FROM funnel '
                        "GROUP BY step, stage ORDER BY step, stage")
    reasons = _rows(con, "SELECT step, stage, reason, sum(n) FROM (SELECT step, stage, "
                         "unnest(map_keys(dropped_by_reason)) AS reason, unnest(map_values(dropped_by_reason)) "
                         "AS n FROM funnel) GROUP BY ALL ORDER BY step, stage, sum(n) DESC, reason")
    by_stage: dict[tuple[int, str], list[tuple[str, int]]] = {}
    for step, stage, reason, n in reasons:
        by_stage.setdefault((step, stage), []).append((reason, int(n)))
    return tuple(FunnelStage(int(step), stage, int(i), int(k), int(a), int(d), tuple(by_stage.get((step, stage), [])))
                 for step, stage, i, k, a, d in totals)


def _sources(con: Any) -> tuple[SourceFacts, ...]:
    rows = _rows(con, "SELECT source, license, attribution, count(*), count(lon), "
                      "list_sort(list(DISTINCT coalesce(caption_source, 'none'))) FROM samples "
                      "GROUP BY source, license, attribution ORDER BY source, license, attribution")
    return tuple(SourceFacts(s, lic or "unknown", att or "", int(n), int(geo), tuple(cs))
                 for s, lic, att, n, geo, cs in rows)


def read_schema(git10m_dir: str, metadata_files: list[str]) -> tuple[SchemaColumn, ...]:
    """Columns of one metadata file with their descriptions, plus `level` from the Hive path.

    Descriptions come from the Arrow field metadata; files written without it (DuckDB) fall back to
    `pipeline.schema.PUBLISHED_SCHEMA`, so the table is never missing a sentence.
    """
    fallback = {f.name: (f.metadata or {}).get(b"description", b"").decode() for f in PUBLISHED_SCHEMA}
    fs, root = storage.filesystem(git10m_dir)
    schema = pq.read_schema(storage.join(root, metadata_files[0]), filesystem=fs)
    columns = []
    for field in schema:
        own = (field.metadata or {}).get(b"description", b"").decode()
        columns.append(SchemaColumn(field.name, field.type, own or fallback.get(field.name, "")))
    if "level" not in schema.names:
        level = PUBLISHED_SCHEMA.field("level")
        columns.append(SchemaColumn("level", level.type, fallback["level"], from_partition=True))
    return tuple(columns)


def read_checksums(git10m_dir: str) -> dict[str, str]:
    """`checksums.sha256` as {relative path: sha256}."""
    text = storage.read_bytes(storage.join(git10m_dir, "checksums.sha256")).decode()
    sums: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            sums[path.strip().lstrip("*")] = digest.lower()
    return sums


def _published_files(git10m_dir: str) -> dict[str, int]:
    """Every tar and Parquet file under the release with its size in bytes, by relative path."""
    fs, root = storage.filesystem(git10m_dir)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    return {path[len(root) + 1:]: int(info["size"]) for path, info in found.items()
            if path.endswith(CHECKSUMMED_SUFFIXES)}


def _sha256(url: str) -> str:
    digest = hashlib.sha256()
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(git10m_dir: str, sums: dict[str, str], sizes: dict[str, int], verify_sha256: bool) -> None:
    """Raise unless checksums.sha256 lists exactly the release's files (and, if asked, their true hashes)."""
    listed, present = set(sums), set(sizes)
    if listed != present:
        raise CardsError(f"{git10m_dir}/checksums.sha256 does not match the files: missing from it "
                         f"{sorted(present - listed)[:5]}, listed but absent {sorted(listed - present)[:5]}; "
                         "re-run `text2earth publish`")
    if not verify_sha256:
        return
    paths = sorted(sums)
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL: disks, not cores, bound it
        actual = dict(zip(paths, pool.map(lambda p: _sha256(storage.join(git10m_dir, p)), paths), strict=True))
    wrong = [p for p in paths if actual[p] != sums[p]]
    if wrong:
        raise CardsError(f"sha256 of {len(wrong)} file(s) in {git10m_dir} differs from checksums.sha256 "
                         f"(first: {wrong[0]}); the release was modified after publishing: re-run "
                         "`text2earth publish`")


def gather_facts(git10m_dir: str, verify_sha256: bool = True) -> DatasetFacts:
    """Aggregate the published dataset at `git10m_dir` (local path or fsspec URL) into `DatasetFacts`."""
    sums = read_checksums(git10m_dir)
    sizes = _published_files(git10m_dir)
    check_files(git10m_dir, sums, sizes, verify_sha256)  # before DuckDB reads a file that should not be there
    con = connect(git10m_dir)
    shard_sizes = json.loads(storage.read_bytes(storage.join(git10m_dir, "shards", "sizes.json")))
    shards = tuple(sorted((str(k), int(v)) for k, v in shard_sizes.items()))
    missing = [name for name, _ in shards if f"shards/{name}" not in sums]
    if missing:
        raise CardsError(f"shards/sizes.json names tars that are not published: {missing[:5]}")

    (samples, geo, countries, gsd_known, gsd_min, gsd_med, gsd_max, words, first, last, remote), = _rows(
        con, "SELECT count(*), count(lon), count(DISTINCT country_iso3), count(gsd_m), min(gsd_m), "
             "median(gsd_m), max(gsd_m), coalesce(avg(len(string_split(trim(caption), ' '))), 0), "
             "min(acquired), max(acquired), count(*) FILTER (WHERE source_uri SIMILAR TO '[a-z0-9+]+://.*') "
             "FROM samples")
    if sum(n for _, n in shards) != samples:
        raise CardsError(f"shards/sizes.json counts {sum(n for _, n in shards)} samples but the metadata has "
                         f"{samples}: re-run `text2earth publish`")

    def counts(column: str) -> tuple[tuple[Any, int], ...]:
        return tuple((v, int(n)) for v, n in _rows(
            con, f"SELECT {column}, count(*) AS n FROM samples GROUP BY 1 ORDER BY n DESC, 1 NULLS LAST"))

    levels = tuple(LevelFacts(int(lv), int(n), lo, hi) for lv, n, lo, hi in _rows(
        con, "SELECT level, count(*), min(gsd_m), max(gsd_m) FROM samples GROUP BY level ORDER BY level"))
    rejected = tuple((st, r, int(n)) for st, r, n in _rows(
        con, "SELECT stage, reason, count(*) AS n FROM rejected GROUP BY ALL ORDER BY n DESC, stage, reason"))
    metadata_files = sorted(p for p in sums if p.startswith("metadata/") and p.endswith(".parquet"))
    if not metadata_files:
        raise CardsError(f"{git10m_dir}/checksums.sha256 lists no metadata/**/*.parquet file")
    facts = DatasetFacts(
        samples=int(samples), georeferenced=int(geo), countries=int(countries), gsd_known=int(gsd_known),
        gsd_min_m=gsd_min, gsd_median_m=gsd_med, gsd_max_m=gsd_max, mean_caption_words=float(words),
        acquired_first=first, acquired_last=last, remote_samples=int(remote),
        sources=_sources(con), caption_sources=counts("coalesce(caption_source, 'none')"),
        clip_models=counts("coalesce(clip_model, 'none')"), continents=counts("continent"), levels=levels,
        splits=counts("split"), image_formats=counts("image_format"), funnel=_funnel(con), rejected=rejected,
        shards=shards, checksums=tuple(sorted(sums.items())), file_sizes=sizes,
        schema=read_schema(git10m_dir, metadata_files))
    con.close()
    log.info("cards: %d samples, %d sources, %d files checked", facts.samples, len(facts.source_names),
             len(sums))
    return facts
