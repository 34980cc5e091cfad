"""Reading and committing one curation stage's shard: metadata (GeoParquet), rejected rows, extra tables.

A stage keeps the harvest's shard names, so `shard` always says which harvest tar holds the image.
Metadata is written last and carries the fingerprint (inputs + params + code), which makes it the
commit marker: a shard whose metadata has the expected fingerprint is done and skipped on a re-run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline import storage
from pipeline.schema import CURATED_SCHEMA, CURATION_REJECTED_SCHEMA
from pipeline.shard_writer import FINGERPRINT_KEY, geo_metadata

INCOMPLETE = ":incomplete"  # suffix of a fingerprint whose shard must be redone next run (transient failures)


LATER_PACKAGES = ("publish", "cards")  # stages after curation: their code never invalidates curation outputs


def code_fingerprint(include: Sequence[str] = ()) -> str:
    """Hash of the pipeline modules a stage runs: new code means its outputs are rebuilt, not reused.

    Curation stages hash every module but those of later stages (`LATER_PACKAGES`); a later stage
    names its own package in `include`.
    """
    root = Path(__file__).resolve().parents[1]
    skip = set(LATER_PACKAGES) - set(include)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip:
            continue
        digest.update(str(relative).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def metadata_url(stage_dir: str, shard: str) -> str:
    """Where a stage keeps a shard's metadata."""
    return storage.join(stage_dir, "metadata", f"{shard}.parquet")


def list_shards(stage_dir: str) -> list[str]:
    """Shard names with committed metadata in a stage folder, sorted."""
    names = storage.list_files(storage.join(stage_dir, "metadata"), ".parquet")
    return [n[: -len(".parquet")] for n in names if not n.startswith(".")]


def footer(url: str) -> tuple[int, str | None]:
    """Row count and stored fingerprint of a Parquet file (footer only)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        meta = pq.read_metadata(fh)
    value = (meta.metadata or {}).get(FINGERPRINT_KEY)
    return meta.num_rows, value.decode() if value else None


def committed_fingerprint(url: str) -> str | None:
    """The fingerprint a Parquet file was committed with, or None (missing or truncated)."""
    try:
        return footer(url)[1]
    except (OSError, pa.ArrowInvalid, FileNotFoundError):
        return None


def committed(stage_dir: str, shard: str) -> str | None:
    """The fingerprint a shard was committed with, or None (missing or truncated)."""
    return committed_fingerprint(metadata_url(stage_dir, shard))


def footers(stage_dir: str, shards: Sequence[str], threads: int = 16) -> dict[str, tuple[int, str | None]]:
    """Row counts and fingerprints of many shards, read concurrently (cheap on object stores too)."""
    with ThreadPoolExecutor(threads) as pool:
        found = pool.map(lambda s: footer(metadata_url(stage_dir, s)), shards)
        return dict(zip(shards, found, strict=True))


def read_table(stage_dir: str, shard: str, columns: Sequence[str] | None = None, sub: str = "metadata"
               ) -> pa.Table:
    """One shard's table from a stage folder (metadata by default)."""
    url = storage.join(stage_dir, sub, f"{shard}.parquet")
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=list(columns) if columns is not None else None)


def conform(table: pa.Table) -> pa.Table:
    """Give a table exactly the curated columns, in order (missing ones null) — harvest rows included."""
    n = table.num_rows
    arrays = []
    for field in CURATED_SCHEMA:
        if field.name in table.column_names:
            arrays.append(table.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=CURATED_SCHEMA)


def with_columns(table: pa.Table, values: dict[str, Sequence[Any] | pa.Array]) -> pa.Table:
    """Replace (or add) curated columns by name, typed from the schema."""
    for name, data in values.items():
        field = CURATED_SCHEMA.field(name)
        array = data if isinstance(data, pa.Array | pa.ChunkedArray) else pa.array(list(data), field.type)
        index = table.column_names.index(name)
        table = table.set_column(index, field, array)
    return table


def rejected_row(row: dict[str, Any], stage: str, reason: str, detail: str = "",
                 duplicate_of: str | None = None) -> dict[str, Any]:
    """A rejected-table row for a dropped metadata row."""
    score = row.get("clip_score")
    return {"key": row["key"], "image_key": row.get("image_key") or row["key"], "shard": row["shard"],
            "source": row["source"], "stage": stage, "reason": reason, "detail": detail,
            "duplicate_of": duplicate_of,
            "clip_score": score if score is not None and math.isfinite(score) else None,
            "lon": row.get("lon"), "lat": row.get("lat")}


def write_parquet(url: str, table: pa.Table) -> None:
    """Write a table whole or not at all (zstd, one row group per shard file)."""
    with storage.atomic_write(url) as local:
        pq.write_table(table, local, compression="zstd", row_group_size=max(table.num_rows, 1))


def write_shard(stage_dir: str, shard: str, table: pa.Table, rejected: Iterable[dict[str, Any]], fp: str,
                extras: dict[str, pa.Table] | None = None) -> dict[str, int]:
    """Commit one shard: extra tables, rejected, then the metadata (with fingerprint and geo metadata)."""
    for sub, extra in (extras or {}).items():
        write_parquet(storage.join(stage_dir, sub, f"{shard}.parquet"), extra)
    dropped = sorted(rejected, key=lambda r: (r["key"], r["stage"]))
    rej = pa.Table.from_pylist(dropped, schema=CURATION_REJECTED_SCHEMA)
    write_parquet(storage.join(stage_dir, "rejected", f"{shard}.parquet"), rej)
    table = conform(table)
    wkb = table.column("geometry").to_pylist()
    meta = dict(table.schema.metadata or {})
    meta[b"geo"] = geo_metadata(list(shapely.from_wkb(wkb))) if wkb else geo_metadata([])
    meta[FINGERPRINT_KEY] = fp.encode()
    write_parquet(metadata_url(stage_dir, shard), table.replace_schema_metadata(meta))
    return {"kept": table.num_rows, "rejected": rej.num_rows}


def prune(stage_dir: str, shards: set[str], subs: Sequence[str] = ("metadata", "rejected")) -> int:
    """Delete shard files of a stage that no input shard owns any more (and temp leftovers)."""
    removed = 0
    for sub in subs:
        folder = storage.join(stage_dir, sub)
        for name in storage.list_files(folder):
            stem = name[: -len(".parquet")] if name.endswith(".parquet") else None
            if name.startswith(".") or stem not in shards:
                storage.remove(storage.join(folder, name))
                removed += 1
    return removed


def read_images(harvest_dir: str, shard: str, wanted: set[str]) -> dict[str, bytes]:
    """Image bytes of the wanted harvest keys, streamed from the shard's tar (`{key}.jpg|png` members)."""
    import tarfile

    found: dict[str, bytes] = {}
    if not wanted:
        return found
    url = storage.join(harvest_dir, "shards", f"{shard}.tar")
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return found
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext in ("jpg", "png") and key in wanted:
                data = tar.extractfile(member)
                if data is not None:
                    found[key] = data.read()
    return found


def take(table: pa.Table, indices: Sequence[int]) -> pa.Table:
    """The rows at `indices` (an empty selection keeps the schema)."""
    return table.take(pa.array(indices, pa.int64()))
