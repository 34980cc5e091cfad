"""Write one harvest shard: a WebDataset tar, its GeoParquet metadata and its rejected-sample Parquet.

The metadata Parquet is written last and carries the shard's fingerprint, so it is the commit marker:
a shard whose metadata exists with the expected fingerprint is complete and is skipped on a re-run.
Tars use mtime 0 and fixed owners, and Parquet files carry no timestamps, so re-runs are byte-identical.

The tar members follow the WebDataset layout (`{key}.{ext}`, one sample's files next to each other) and
are read back with `webdataset.WebDataset` in the tests. They are written with the standard library's
`tarfile` rather than `webdataset.TarWriter` because importing webdataset imports torch: 500 MB and 2-3 s
in every Beam worker process (measured; see benchmarks/RESULTS.md), for a writer that is a loop over
`tarfile.addfile`.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from pipeline import storage
from pipeline.schema import HARVEST_SCHEMA, REJECTED_SCHEMA

FINGERPRINT_KEY = b"text2earth:fingerprint"
_CRS84 = CRS.from_user_input("OGC:CRS84").to_json_dict()


def shard_paths(output_dir: str, shard: str) -> dict[str, str]:
    """Where each file of a shard lives."""
    return {
        "tar": storage.join(output_dir, "shards", f"{shard}.tar"),
        "metadata": storage.join(output_dir, "metadata", f"{shard}.parquet"),
        "rejected": storage.join(output_dir, "rejected", f"{shard}.parquet"),
    }


def committed_fingerprint(output_dir: str, shard: str) -> str | None:
    """Fingerprint stored in a shard's metadata footer, or None if the shard is not committed."""
    url = shard_paths(output_dir, shard)["metadata"]
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as fh:
            meta = pq.read_metadata(fh).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None  # a truncated file from a killed writer: redo the shard
    value = meta.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def row_json(row: dict[str, Any], geometry: Any) -> bytes:
    """The `{key}.json` member: the metadata row (sorted keys) with the footprint as GeoJSON, last."""
    doc = {k: v for k, v in row.items() if k != "geometry"}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)
    footprint = shapely.to_geojson(geometry) if geometry is not None else "null"  # GEOS writes it fast
    return f'{text[:-1]},"geometry":{footprint}}}'.encode()


def geo_metadata(geometries: list[Any]) -> bytes:
    """GeoParquet 1.1 `geo` metadata for a WKB geometry column (WGS84 lon/lat, planar edges)."""
    present = [g for g in geometries if g is not None]
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted({g.geom_type for g in present}),
        "crs": _CRS84,
        "edges": "planar",
        "orientation": "counterclockwise",
    }
    if present:
        bounds = shapely.bounds(present)
        column["bbox"] = [float(bounds[:, 0].min()), float(bounds[:, 1].min()),
                          float(bounds[:, 2].max()), float(bounds[:, 3].max())]
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    return json.dumps(geo, sort_keys=True, separators=(",", ":")).encode("utf-8")


class WebDatasetTar:
    """Append WebDataset samples to a tar: members `{key}.{ext}`, mtime 0, read-only, fixed owner."""

    def __init__(self, path: str) -> None:
        # PAX headers keep member names of any length (USTAR stops at 100 characters)
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample's files; `members` maps extension -> bytes."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "text2earth"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        """Finish the archive (end-of-archive blocks)."""
        self.tar.close()


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


class ShardWriter:
    """Streams samples into a shard's tar; `commit` writes the Parquet files (rejected, then metadata)."""

    def __init__(self, output_dir: str, shard: str, fingerprint: str) -> None:
        self.paths = shard_paths(output_dir, shard)
        self.shard = shard
        self.fingerprint = fingerprint
        self.rows: list[dict[str, Any]] = []
        self.geometries: list[Any] = []
        self.rejected: list[dict[str, Any]] = []
        self._tar_ctx: Any = None
        self._tar: WebDatasetTar | None = None

    def add(self, row: dict[str, Any], image: bytes, geometry: Any) -> None:
        """Append one kept sample (its row must already hold key, sha256, caption...)."""
        if self._tar is None:
            self._tar_ctx = storage.atomic_write(self.paths["tar"])
            local = self._tar_ctx.__enter__()
            self._tar = WebDatasetTar(local)
        row = {**row, "shard": self.shard,
               "geometry": shapely.to_wkb(geometry, output_dimension=2) if geometry is not None else None}
        members = {row["image_format"]: image}
        if row.get("caption"):
            members["txt"] = row["caption"].encode("utf-8")
        members["json"] = row_json(row, geometry)
        self._tar.write(row["key"], members)
        self.rows.append(row)
        self.geometries.append(geometry)

    def reject(self, row: dict[str, Any]) -> None:
        """Record a dropped candidate."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rejected.append({**clean, "shard": self.shard, "stage": "harvest"})

    def abort(self) -> None:
        """Drop a half-written tar (the shard will be redone)."""
        if self._tar is not None:
            self._tar.close()
            self._tar_ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._tar = None

    def commit(self) -> dict[str, Any]:
        """Finish the tar, then write rejected and (last, as commit marker) metadata Parquet."""
        if self._tar is not None:
            self._tar.close()
            self._tar_ctx.__exit__(None, None, None)
            self._tar = None
        else:
            storage.remove(self.paths["tar"])  # a stale tar from an earlier run with other params
        with storage.atomic_write(self.paths["rejected"]) as local:
            pq.write_table(_table(self.rejected, REJECTED_SCHEMA), local, compression="zstd")
        table = _table(self.rows, HARVEST_SCHEMA)
        meta = dict(table.schema.metadata or {})
        meta[b"geo"] = geo_metadata(self.geometries)
        meta[FINGERPRINT_KEY] = self.fingerprint.encode()
        table = table.replace_schema_metadata(meta)
        with storage.atomic_write(self.paths["metadata"]) as local:
            pq.write_table(table, local, compression="zstd", row_group_size=max(len(self.rows), 1))
        return {"shard": self.shard, "written": len(self.rows), "rejected": len(self.rejected),
                "reasons": _count(r["reason"] for r in self.rejected)}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))
