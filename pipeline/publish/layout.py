"""Lay out the published metadata: `level=L/part-K.parquet` GeoParquet files, rows in Hilbert-curve order.

The README's queries filter on `level` and on lon/lat boxes. Hive partitioning on `level` lets DuckDB skip
whole folders; inside a level, rows follow a Hilbert curve over lon/lat, so each row group covers a compact
area and the min/max statistics of `lon`/`lat` let a bounding-box query skip most row groups. DuckDB sorts
out of core; pyarrow writes the files so every field keeps its description and the footer the GeoParquet
`geo` metadata.
"""

from __future__ import annotations

import base64
import functools
import itertools
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline import storage
from pipeline.schema import PUBLISHED_SCHEMA
from pipeline.shard_writer import FINGERPRINT_KEY, geo_metadata

log = logging.getLogger(__name__)

# What the files hold: the published columns except `level`, which readers take from the folder name.
FILE_SCHEMA = pa.schema([f for f in PUBLISHED_SCHEMA if f.name != "level"])
HILBERT_BITS = 16  # 65,536 cells per axis: 0.0055 deg of longitude (~600 m), far finer than a row group
_BATCH_ROWS = 32_768  # rows per record batch fetched from DuckDB (memory held outside the sort)
# Encodings, measured with DuckDB on 10M rows (benchmarks/metadata_query.py): a dictionary of near-unique
# doubles decodes 2-3x slower than BYTE_STREAM_SPLIT (whose byte planes zstd packs as well), so the floats
# that differ per chip use it; strings unique per row skip the dictionary pyarrow would try first. Every
# other column keeps dictionary encoding (pyarrow falls back to plain when a dictionary passes 1 MB).
BYTE_STREAM_SPLIT = ("lon", "lat", "gsd_m", "gsd_x_m", "gsd_y_m", "native_gsd_m", "clip_score")
NO_DICTIONARY = ("key", "image_key", "sha256", "geometry", *BYTE_STREAM_SPLIT)


def hilbert_sql(lon: str = "lon", lat: str = "lat") -> tuple[list[str], str]:
    """Projections that compute the Hilbert index of (lon, lat), and the final expression.

    Each projection adds columns (`_h*`) computed from the previous one, so the SQL stays linear in size
    (nesting the expressions would repeat them exponentially). The algorithm is the branch-free 16-bit
    Hilbert xy -> index of rawrunprotected.net ("2D Hilbert curves in O(1)"), checked in the tests against
    the textbook loop. lon/lat map linearly onto the 65,536 x 65,536 grid; a missing or non-finite
    coordinate gives NULL.
    """
    m, n = "65535", str(1 << HILBERT_BITS)
    grid = (f"CASE WHEN isfinite({lon}) AND isfinite({lat}) THEN greatest(0, least({m}, "
            f"floor(({{v}} + {{half}}) * {n} / {{span}})))::BIGINT END")
    layers = [f"{grid.format(v=lon, half=180, span=360)} AS _hx, {grid.format(v=lat, half=90, span=180)} AS _hy"]
    a, b = "xor(_hx, _hy)", f"xor({m}, xor(_hx, _hy))"
    c, d = f"xor({m}, _hx | _hy)", f"_hx & xor(_hy, {m})"
    layers.append(f"({a}) | (({b}) >> 1) AS _ha1, xor(({a}) >> 1, {a}) AS _hb1, "
                  f"xor(xor(({c}) >> 1, ({b}) & (({d}) >> 1)), {c}) AS _hc1, "
                  f"xor(xor(({a}) & (({c}) >> 1), ({d}) >> 1), {d}) AS _hd1")
    for step, shift in ((2, 2), (3, 4)):
        pa_, pb, pc, pd = (f"_h{x}{step - 1}" for x in "abcd")
        layers.append(f"xor({pa_} & ({pa_} >> {shift}), {pb} & ({pb} >> {shift})) AS _ha{step}, "
                      f"xor({pa_} & ({pb} >> {shift}), {pb} & (xor({pa_}, {pb}) >> {shift})) AS _hb{step}, "
                      f"xor({pc}, xor({pa_} & ({pc} >> {shift}), {pb} & ({pd} >> {shift}))) AS _hc{step}, "
                      f"xor({pd}, xor({pb} & ({pc} >> {shift}), xor({pa_}, {pb}) & ({pd} >> {shift}))) AS _hd{step}")
    layers.append("xor(_hc3, xor(_ha3 & (_hc3 >> 8), _hb3 & (_hd3 >> 8))) AS _hc4, "
                  "xor(_hd3, xor(_hb3 & (_hc3 >> 8), xor(_ha3, _hb3) & (_hd3 >> 8))) AS _hd4")
    # undo the prefix scan, then interleave the two 16-bit halves of the index
    layers.append(f"xor(_hx, _hy) AS _hi0_0, xor(_hd4, _hd4 >> 1) | xor({m}, xor(_hx, _hy) | xor(_hc4, _hc4 >> 1)) "
                  "AS _hi1_0")
    for k, (shift, mask) in enumerate(((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)), 1):
        layers.append(f"(_hi0_{k - 1} | (_hi0_{k - 1} << {shift})) & {mask} AS _hi0_{k}, "
                      f"(_hi1_{k - 1} | (_hi1_{k - 1} << {shift})) & {mask} AS _hi1_{k}")
    return layers, "(_hi1_4 << 1) | _hi0_4"


def sorted_sql(source: str) -> str:
    """Every published column of `source`, ordered by level, Hilbert index (no location last), key."""
    layers, index = hilbert_sql()
    query = f"SELECT * FROM {source}"
    for layer in layers:
        query = f"SELECT *, {layer} FROM ({query})"
    columns = ", ".join(f'"{f.name}"' for f in FILE_SCHEMA)
    return (f"SELECT coalesce(level, 0)::SMALLINT AS level, {columns} FROM ({query}) "
            f"ORDER BY 1, {index} NULLS LAST, key")


class _GeoSummary:
    """The few geometries that decide a file's GeoParquet bbox and types, gathered batch by batch.

    Per geometry type it keeps the ones reaching furthest west, south, east and north, so
    `geo_metadata(exemplars)` gives what `geo_metadata(all geometries)` would, with the file never held.
    """

    def __init__(self) -> None:
        self.exemplars = np.empty(0, dtype=object)

    def add(self, wkb: pa.ChunkedArray | pa.Array) -> None:
        geoms = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
        geoms = np.concatenate([self.exemplars, geoms[~shapely.is_missing(geoms)]])
        if geoms.size == 0:
            return
        types, bounds = shapely.get_type_id(geoms), shapely.bounds(geoms)
        keep: set[int] = set()
        for t in np.unique(types):
            rows = np.flatnonzero(types == t)
            box = bounds[rows]
            if np.isnan(box).all():  # only empty geometries of this type: one keeps the type listed
                keep.add(int(rows[0]))
                continue
            picks = (np.nanargmin(box[:, 0]), np.nanargmin(box[:, 1]), np.nanargmax(box[:, 2]),
                     np.nanargmax(box[:, 3]))
            keep.update(int(rows[p]) for p in picks)
        self.exemplars = geoms[sorted(keep)]

    def metadata(self) -> bytes:
        return geo_metadata(list(self.exemplars))


class _PartFile:
    """One output file: row groups of exactly `row_group_size` rows (the last may be shorter)."""

    def __init__(self, url: str, row_group_size: int, fingerprint: str) -> None:
        self.url = url
        self.row_group_size = row_group_size
        self.fingerprint = fingerprint
        self.rows = 0
        self.row_groups = 0
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.geo = _GeoSummary()
        self._target: AbstractContextManager[str] = storage.atomic_write(url)
        self._writer = pq.ParquetWriter(self._target.__enter__(), FILE_SCHEMA, compression="zstd",
                                        use_dictionary=_dictionary_columns(),
                                        column_encoding=dict.fromkeys(BYTE_STREAM_SPLIT, "BYTE_STREAM_SPLIT"))

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.rows += batch.num_rows
        self.geo.add(batch.column("geometry"))
        while self.pending_rows >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self.pending, schema=FILE_SCHEMA)
        # one contiguous chunk per column: page boundaries then depend on the rows, not on DuckDB's batches
        self._writer.write_table(table.slice(0, rows).combine_chunks(), row_group_size=rows)
        self.row_groups += 1
        rest = table.slice(rows)
        self.pending, self.pending_rows = rest.to_batches(), rest.num_rows

    def close(self) -> None:
        try:
            if self.pending_rows:
                self._flush(self.pending_rows)
            meta = {b"geo": self.geo.metadata(), FINGERPRINT_KEY: self.fingerprint.encode()}
            # pyarrow serialises the Arrow schema (where readers find schema metadata) when the file is
            # opened, before any geometry is seen; the footer is written only now, so store the schema again,
            # with `geo` and the fingerprint, next to the same keys as plain Parquet key-value metadata.
            schema = base64.b64encode(FILE_SCHEMA.with_metadata(meta).serialize().to_pybytes())
            self._writer.add_key_value_metadata({**meta, b"ARROW:schema": schema})
            self._writer.close()
        except BaseException as exc:
            self._writer.close()
            self._target.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._target.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        self._writer.close()
        self._target.__exit__(type(exc), exc, exc.__traceback__)


@functools.cache
def _dictionary_columns() -> list[str]:
    """Parquet paths of the leaf columns that keep dictionary encoding (`captions.list.element`...)."""
    sink = pa.BufferOutputStream()
    pq.write_table(FILE_SCHEMA.empty_table(), sink)
    meta = pq.read_metadata(pa.BufferReader(sink.getvalue()))
    paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
    return [p for p in paths if p.split(".")[0] not in NO_DICTIONARY]


def _connect(staging: Sequence[str], threads: int | None, memory_limit: str | None, temp_dir: str) -> Any:
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{temp_dir}'")
    protocols: set[str] = set()
    for url in staging:
        fs = storage.filesystem(url)[0]
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if not storage.is_local(url) and protocol not in protocols:
            con.register_filesystem(fs)
            protocols.add(protocol)
    return con


def _batches(con: Any, staging: Sequence[str]) -> Iterator[pa.RecordBatch]:
    files = ", ".join("'" + url.replace("'", "''") + "'" for url in staging)
    source = f"read_parquet([{files}])"
    have = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    missing = [f.name for f in PUBLISHED_SCHEMA if f.name not in have]
    if missing:
        raise ValueError(f"staging files lack the published columns {missing} (first file: {staging[0]}); "
                         "write them with pipeline.schema.PUBLISHED_SCHEMA")
    reader = con.sql(sorted_sql(source)).to_arrow_reader(_BATCH_ROWS)
    target = pa.schema([pa.field("level", pa.int16()), *FILE_SCHEMA])
    for batch in reader:
        yield batch.cast(target)


def _level_runs(levels: np.ndarray) -> list[tuple[int, int, int]]:
    """(level, start, stop) of each run of equal levels in a sorted batch."""
    cuts = [0, *(np.flatnonzero(np.diff(levels)) + 1).tolist(), len(levels)]
    return [(int(levels[s]), s, e) for s, e in itertools.pairwise(cuts)]


class _Files:
    """Routes sorted rows to `level=L/part-K.parquet`, opening the next file at a new level or a full one."""

    def __init__(self, out_dir: str, row_group_size: int, max_rows_per_file: int | None, fingerprint: str) -> None:
        self.out_dir = out_dir
        self.row_group_size = row_group_size
        self.max_rows_per_file = max_rows_per_file
        self.fingerprint = fingerprint
        self.levels: dict[int, dict[str, Any]] = {}
        self.current: _PartFile | None = None
        self.current_level = -1

    def add(self, level: int, rows: pa.RecordBatch) -> None:
        while rows.num_rows:
            full = self.max_rows_per_file is not None and self.current is not None and (
                self.current.rows >= self.max_rows_per_file)
            if self.current is None or level != self.current_level or full:
                self.finish()
                summary = self.levels.setdefault(level, {"rows": 0, "files": [], "row_groups": 0})
                name = f"part-{len(summary['files'])}.parquet"
                summary["files"].append(name)
                url = storage.join(self.out_dir, f"level={level}", name)
                self.current, self.current_level = _PartFile(url, self.row_group_size, self.fingerprint), level
            assert self.current is not None
            room = rows.num_rows if self.max_rows_per_file is None else self.max_rows_per_file - self.current.rows
            self.current.add(rows.slice(0, room))
            rows = rows.slice(min(room, rows.num_rows))

    def finish(self) -> None:
        """Close the open file (it appears under its final name)."""
        if self.current is not None:
            part, self.current = self.current, None
            part.close()
            summary = self.levels[self.current_level]
            summary["rows"] += part.rows
            summary["row_groups"] += part.row_groups

    def abort(self, exc: BaseException) -> None:
        """Drop the open file's temporary copy."""
        if self.current is not None:
            self.current.abort(exc)
            self.current = None


def write_metadata(staging: Sequence[str], out_dir: str, *, row_group_size: int = 122_880, fingerprint: str,
                   max_rows_per_file: int | None = None, threads: int | None = None,
                   memory_limit: str | None = None, temp_dir: str | None = None) -> dict[str, Any]:
    """Compact per-shard staging Parquet files into `out_dir/level=L/part-K.parquet`.

    `staging` files hold PUBLISHED_SCHEMA rows (with `level`, 0 for unknown; a NULL level is written as 0,
    and `key` must be unique so the order is total and re-runs are byte-identical). Within a level, rows
    are sorted by the Hilbert index of (lon, lat), rows without location last, then by key, and cut into
    row groups of `row_group_size` rows and files of at most `max_rows_per_file` rows (None: one file per
    level). DuckDB sorts out of core under `memory_limit` (spilling to `temp_dir`, a fresh temporary
    folder by default) with `threads`; files are written through a temporary name, and files or level
    folders of an earlier run that this run did not write are removed afterwards. Paths may be local or
    fsspec URLs. Returns rows, files and row groups per level.
    """
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be a positive number of rows, not {row_group_size}")
    if max_rows_per_file is not None and max_rows_per_file < 1:
        raise ValueError(f"max_rows_per_file must be a positive number of rows or None, not {max_rows_per_file}")
    spill = tempfile.mkdtemp(prefix="text2earth-layout-") if temp_dir is None else temp_dir
    files = _Files(out_dir, row_group_size, max_rows_per_file, fingerprint)
    try:
        if staging:
            con = _connect(staging, threads, memory_limit, spill)
            try:
                for batch in _batches(con, staging):
                    for level, start, stop in _level_runs(batch.column("level").to_numpy()):
                        files.add(level, batch.slice(start, stop - start).drop_columns(["level"]))
            finally:
                con.close()
        files.finish()
    except BaseException as exc:
        files.abort(exc)
        raise
    finally:
        if temp_dir is None:
            shutil.rmtree(spill, ignore_errors=True)
    levels = dict(sorted(files.levels.items()))
    removed = _remove_stale(out_dir, {f"level={level}": set(s["files"]) for level, s in levels.items()})
    summary = {"rows": sum(s["rows"] for s in levels.values()),
               "files": sum(len(s["files"]) for s in levels.values()),
               "row_groups": sum(s["row_groups"] for s in levels.values()),
               "row_group_size": row_group_size, "levels": levels, "removed": removed}
    log.info("metadata: %s rows in %d files, %d row groups, levels %s", f"{summary['rows']:,}",
             summary["files"], summary["row_groups"], list(levels))
    return summary


def _remove_stale(out_dir: str, written: dict[str, set[str]]) -> list[str]:
    """Delete level folders and files in `out_dir` that this run did not write; return what went."""
    removed: list[str] = []
    for folder in storage.list_files(out_dir):
        if not folder.startswith("level="):
            continue
        url = storage.join(out_dir, folder)
        if folder not in written:
            storage.remove_tree(url)
            removed.append(folder)
            continue
        for name in storage.list_files(url):
            if name not in written[folder]:
                storage.remove(storage.join(url, name))
                removed.append(f"{folder}/{name}")
    return removed

