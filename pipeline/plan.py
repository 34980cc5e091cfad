"""Plan the harvest: expand every source into shard tasks (small JSON records), without reading pixels.

Raster scenes are planned from their headers only (size, transform, CRS): the chip grid at each
pyramid level is known before any pixel is read. Tasks are deterministic functions of the inputs and
params, so a re-run plans the same shards and can skip the ones already committed.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow.parquet as pq
from rasterio.errors import RasterioError

from pipeline import storage
from pipeline.chips import scene_id, short_hash, slug
from pipeline.errors import SampleRejected
from pipeline.geometry import crs_label, first_valid_gsd
from pipeline.params import CaptionedSource, GeoTiffSource, HarvestParams, StacSource, UrlsSource
from pipeline.raster import (
    axis_offsets,
    classify_error,
    default_bands,
    error_text,
    gdal_env,
    local_open_problem,
    probe_remote,
    pyramid_factors,
    read_header,
    tiff_datetime_to_iso,
)

T = TypeVar("T")
R = TypeVar("R")
_GLOB_CHARS = re.compile(r"[*?\[]")
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)

# Params that do not change what a shard contains: changing them must not invalidate finished shards.
_NOT_IN_FINGERPRINT = {"sources", "output_dir", "work_dir", "runner", "workers", "planning_threads",
                       "http_timeout_s", "http_retries", "url_threads", "gdal_config", "samples_per_shard"}


def code_fingerprint() -> str:
    """Hash of the pipeline package's source: new code means shards are rebuilt, not reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def settings_fingerprint(params: HarvestParams, code: str) -> str:
    """Hash of the output-affecting params and the code."""
    kept = {k: v for k, v in params.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
    return hashlib.sha256((json.dumps(kept, sort_keys=True) + code).encode()).hexdigest()


def task_fingerprint(task: dict[str, Any], settings: str) -> str:
    """Identity of a shard's content: its task record plus the settings.

    Paths under the working directory count relative to it (tasks carry absolute paths for the workers),
    so a clone in another folder writes the same bytes: the fingerprint is stored in the metadata Parquet.
    """
    body = json.dumps({k: v for k, v in task.items() if k != "fingerprint"}, sort_keys=True)
    base = json.dumps(os.getcwd() + os.sep)[:-1]  # '"/abs/cwd/' as it appears at the start of a JSON string
    body = body.replace(base, '"')
    return hashlib.sha256((body + settings).encode()).hexdigest()[:32]


def is_remote(uri: str) -> bool:
    """True for URLs (http, s3, gs, ...), False for local paths."""
    return bool(_REMOTE.match(uri))


def local_abspath(uri: str) -> str:
    """Absolute path for local files (workers may run elsewhere); URLs unchanged."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def expand_uri(uri: str) -> list[str]:
    """A path, glob or URL as a sorted list of files, keeping relative paths relative."""
    if not _GLOB_CHARS.search(uri) or uri.startswith(("http://", "https://")):
        return [uri]
    if not is_remote(uri):
        if os.path.isfile(uri):  # a file whose name holds [ ] ? or *: the name, not a pattern
            return [uri]
        return sorted(p for p in glob.glob(uri, recursive=True) if os.path.isfile(p))
    fs, _ = storage.filesystem(uri)
    protocol = uri.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.glob(uri))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """map() over a thread pool that keeps input order and holds at most 4x`threads` items in flight."""
    if threads <= 1:
        yield from map(fn, items)
        return
    window: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _meta(source: Any, **extra: Any) -> dict[str, Any]:
    meta = {"license": source.license, "attribution": source.attribution, "sensor": source.sensor,
            "platform": source.platform, "acquired": source.acquired, "cloud_cover": None,
            "declared_gsd_m": getattr(source, "gsd_m", None)}
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def _problem(uri: str, scene_id: str, reason: str, detail: str) -> dict[str, Any]:
    """A planning-time rejection: what `_error_tasks` turns into rejected rows."""
    return {"error": reason, "detail": detail, "uri": uri, "scene_id": scene_id}


def _error(ref: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return _problem(ref["uri"], ref["scene_id"], reason, detail)


def plan_raster_scene(ref: dict[str, Any], source: GeoTiffSource | StacSource, params: HarvestParams
                      ) -> dict[str, Any]:
    """Read one scene's header and list its chips; returns a scene plan or an `error` entry."""
    try:
        with gdal_env(params.http_timeout_s, params.http_retries, params.gdal_config):
            header = read_header(ref["open_uri"])
    except RasterioError as exc:
        if is_remote(ref["open_uri"]):
            return _error(ref, *probe_remote(ref["open_uri"], params.http_timeout_s))
        return _error(ref, *(local_open_problem(ref["open_uri"]) or (classify_error(exc), error_text(exc))))
    if header.width * header.height > params.max_scene_pixels:
        return _error(ref, "image_too_large", f"{header.width}x{header.height} pixels > max_scene_pixels "
                      f"{params.max_scene_pixels}")
    if header.count == 0 or header.width == 0 or header.height == 0:
        return _error(ref, "empty_raster", "the raster has no bands or no pixels")
    if header.crs is None:
        if header.has_gcps:
            return _error(ref, "no_georeference", "only ground control points: warp it first "
                          "(gdalwarp -t_srs EPSG:4326 in.tif out.tif)")
        if header.has_rpcs:
            return _error(ref, "no_georeference", "only RPCs (a sensor model, not a map grid): orthorectify it "
                          "first (gdalwarp -rpc -t_srs EPSG:4326 in.tif out.tif)")
        return _error(ref, "no_crs", "the raster has no CRS; assign one (gdal_edit.py -a_srs) or drop it")
    if header.transform.is_identity:
        return _error(ref, "no_georeference", "the raster has a CRS but an identity geotransform")
    channels = ref["channels"] or [[ref["open_uri"], b] for b in (source.bands or default_bands(header))]
    for uri, band in channels:
        if uri == ref["open_uri"] and band > header.count:
            return _error(ref, "bad_bands", f"band {band} requested but the file has {header.count}; set "
                          "`bands` in the sources file")
        if uri == ref["open_uri"] and header.colorinterp[band - 1].lower() == "palette":
            return _error(ref, "bad_bands", f"band {band} holds palette indices, not brightness (averaging "
                          "them is meaningless): expand the colour table first "
                          "(gdal_translate -expand rgb in.tif out.tif)")
    crs_text = crs_label(header.crs)
    try:
        native = first_valid_gsd(header.transform, crs_text, header.width, header.height)
    except SampleRejected as exc:
        return _error(ref, exc.reason, exc.detail)
    factors = pyramid_factors(native, header.width, header.height, params.chip_size, params.max_gsd_m,
                              params.max_pyramid_levels, params.max_nodata_fraction)
    chips: list[list[int]] = []  # [pyramid level, row, col, col_off, row_off] in source pixels
    for k, f in enumerate(factors):
        side = params.chip_size * f
        col_offs, row_offs = axis_offsets(header.width, side), axis_offsets(header.height, side)
        if k == 0:  # native level: even a scene under half a window gets its one padded window (and a reason)
            col_offs, row_offs = col_offs or [0], row_offs or [0]
        chips += [[k, r, c, co, ro] for r, ro in enumerate(row_offs) for c, co in enumerate(col_offs)]
    meta = dict(ref["meta"])
    meta["acquired"] = meta.get("acquired") or tiff_datetime_to_iso(header.datetime_tag)
    scene = {
        "uri": ref["uri"], "scene_id": ref["scene_id"], "channels": channels, "nodata": source.nodata,
        "stretch": source.stretch, "width": header.width, "height": header.height,
        "transform": list(header.transform)[:6], "crs": crs_text, "dtype": header.dtype,
    }
    return {"scene": scene, "meta": meta, "chips": chips}


def _raster_refs(source: GeoTiffSource | StacSource) -> Iterator[dict[str, Any]]:
    if isinstance(source, StacSource):
        from pipeline.stac import stac_scenes

        for ref in stac_scenes(source):
            if "meta" in ref:
                ref["meta"] = _meta(source, **ref["meta"])
            yield ref
        return
    for uri in expand_uri(source.uri):
        yield {"uri": uri, "scene_id": scene_id(uri), "open_uri": local_abspath(uri), "channels": None,
               "meta": _meta(source)}


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _error_tasks(source: Any, errors: list[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    for n, chunk in enumerate(_chunks(errors, size)):
        yield {"kind": "errors", "shard": f"{source.name}-rejected-{n:04d}", "source": source.name,
               "meta": _meta(source), "errors": chunk}


def plan_raster_source(source: GeoTiffSource | StacSource, params: HarvestParams) -> Iterator[dict[str, Any]]:
    """Shard tasks for a geotiff/stac source: consecutive scenes' chips packed `samples_per_shard` at a
    time, so many small scenes share a shard and a large scene spans several."""
    errors: list[dict[str, Any]] = []
    try:
        refs = list(_raster_refs(source))
    except Exception as exc:  # missing or broken catalog, server down, not STAC: one row says why
        refs, errors = [], [_problem(source.uri, "catalog", *listing_problem(source.uri, exc))]
    if not refs and not errors:
        errors.append(_problem(source.uri, "nofiles", "not_found", f"{source.uri!r} matched no file"))

    def plan_one(ref: dict[str, Any]) -> dict[str, Any]:
        return ref if "error" in ref else plan_raster_scene(ref, source, params)

    # header reads of local files are fast and GDAL serialises them: threads only pay off remotely
    remote = isinstance(source, StacSource) or is_remote(source.uri)
    parts: list[dict[str, Any]] = []  # the shard being filled: [{scene, meta, chips}, ...]
    filled, shard_no = 0, 0
    for planned in ordered_map(plan_one, refs, params.planning_threads if remote else 1):
        if "error" in planned:
            errors.append(planned)
            continue
        chips = planned["chips"]
        while chips:
            take = min(params.samples_per_shard - filled, len(chips))
            parts.append({"scene": planned["scene"], "meta": planned["meta"], "chips": chips[:take]})
            chips, filled = chips[take:], filled + take
            if filled == params.samples_per_shard:
                yield _raster_task(source.name, shard_no, parts)
                parts, filled, shard_no = [], 0, shard_no + 1
    if parts:
        yield _raster_task(source.name, shard_no, parts)
    yield from _error_tasks(source, errors, params.samples_per_shard)


def listing_problem(uri: str, exc: BaseException) -> tuple[str, str]:
    """(reason, detail) for a source listing (catalog, caption JSON, URL list) that could not be read."""
    if isinstance(exc, SampleRejected):
        return exc.reason, exc.detail or str(exc)
    text = str(exc) if uri in str(exc) and isinstance(exc, ValueError) else f"{uri}: {type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError) and not is_remote(uri):
        return "not_found", text
    if is_remote(uri) and not isinstance(exc, (ValueError, KeyError, TypeError)):
        reason, why = probe_remote(uri, 10.0)  # down, missing, or there (then the content is the problem)
        if reason != "not_a_raster":
            return reason, f"{why} ({type(exc).__name__}: {exc})"
    return "unreadable", text


def _raster_task(source: str, number: int, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "raster", "shard": f"{source}-{number:05d}", "source": source, "scenes": parts}


def _karpathy_images(source: CaptionedSource) -> Iterator[dict[str, Any]]:
    with fsspec.open(source.uri, "rt", encoding="utf-8") as fh:
        doc = json.load(fh)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise SampleRejected("unreadable", f"{source.uri} is not a Karpathy caption JSON (no `images` list)")
    base = source.uri.rsplit("/", 1)[0] if "/" in source.uri else "."
    image_dir = source.image_dir or storage.join(base, "images")
    seen: dict[str, dict[str, Any]] = {}  # an image listed twice is one sample with the captions of both
    for n, rec in enumerate(images):
        where = f"{source.uri}: images[{n}]"
        if not isinstance(rec, dict):
            yield _problem(source.uri, f"record-{n}", "unreadable", f"{where} is a {type(rec).__name__}, not an object")
            continue
        name = str(rec.get("filename") or "").strip()
        sentences_in = rec.get("sentences") or []
        if not name or not isinstance(sentences_in, list):
            problem = "has no filename" if not name else "has `sentences` that are not a list"
            yield _problem(source.uri, f"record-{n}", "unreadable", f"{where} {problem}")
            continue
        rel = storage.join(image_dir, str(rec["filepath"]), name) if rec.get("filepath") else storage.join(
            image_dir, name)
        sentences = [str(s.get("raw") or " ".join(str(t) for t in s.get("tokens") or [])).strip()
                     for s in sentences_in if isinstance(s, dict)]
        sentences += [s.strip() for s in sentences_in if isinstance(s, str)]
        label = rec.get("class", rec.get("label", rec.get("category")))
        split = rec.get("split")
        if rel in seen:
            seen[rel]["captions"] += [s for s in sentences if s and s not in seen[rel]["captions"]]
            continue
        stem = name.rsplit(".", 1)[0]
        seen[rel] = {"key": f"{source.name}-{slug(stem)}-{short_hash(rel)}", "uri": rel,
                     "open_uri": local_abspath(rel), "captions": [s for s in sentences if s],
                     "split": None if split is None else str(split), "class": None if label is None else str(label)}
    yield from seen.values()


def plan_captioned_source(source: CaptionedSource, params: HarvestParams) -> Iterator[dict[str, Any]]:
    """Shard tasks for a Karpathy-layout captioned dataset, `samples_per_shard` images each."""
    try:
        listed = list(_karpathy_images(source))
    except Exception as exc:  # missing, unreachable or not a caption JSON: one row says why
        yield from _error_tasks(source, [_problem(source.uri, "captions", *listing_problem(source.uri, exc))],
                                params.samples_per_shard)
        return
    images = [rec for rec in listed if "error" not in rec]
    errors = [rec for rec in listed if "error" in rec]
    if not listed:
        errors.append(_problem(source.uri, "captions", "not_found", f"{source.uri} lists no images"))
    yield from _error_tasks(source, errors, params.samples_per_shard)
    for n, chunk in enumerate(_chunks(images, params.samples_per_shard)):
        yield {"kind": "images", "shard": f"{source.name}-{n:05d}", "source": source.name,
               "meta": _meta(source), "images": chunk}


def _url_rows(source: UrlsSource) -> Iterator[dict[str, Any]]:
    cols = [source.url_col] + ([source.caption_col] if source.caption_col else [])
    index = 0
    bad_lines: list[int] = []  # CSV lines that are not UTF-8 (Parquet has none)
    with fsspec.open(source.uri, "rb") as fh:
        if source.uri.lower().endswith(".parquet"):
            pf = pq.ParquetFile(fh)
            missing = [c for c in cols if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{source.uri} has no column(s) {missing}; it has {pf.schema_arrow.names} "
                                 "(set url_col / caption_col)")
            batches: Iterator[dict[str, list[Any]]] = (b.to_pydict() for b in pf.iter_batches(columns=cols))
        else:
            reader = csv.DictReader(_decoded_lines(fh, bad_lines))
            names = reader.fieldnames or []
            missing = [c for c in cols if c not in names]
            if missing:
                raise ValueError(f"{source.uri} has no column(s) {missing}; its header is {names} "
                                 "(set url_col / caption_col)")
            batches = ({c: [r.get(c)] for c in cols} for r in reader)
        for batch in batches:
            for i in range(len(batch[source.url_col])):
                caption = batch[source.caption_col][i] if source.caption_col in batch else None
                yield {"key": f"{source.name}-{index:09d}", "url": batch[source.url_col][i], "caption": caption}
                index += 1
    for line in bad_lines:
        yield _problem(source.uri, f"line-{line}", "unreadable", f"{source.uri}: line {line} is not UTF-8 text "
                       "(re-save the list as UTF-8); its row was skipped")


def _decoded_lines(fh: Any, bad_lines: list[int]) -> Iterator[str]:
    """Text lines of a CSV file (a UTF-8 byte-order mark dropped); a line that is not UTF-8 is noted in
    `bad_lines` (1-based) and skipped instead of ending the list there."""
    for number, raw in enumerate(fh, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            bad_lines.append(number)


def plan_urls_source(source: UrlsSource, params: HarvestParams) -> Iterator[dict[str, Any]]:
    """Shard tasks for a URL list: `samples_per_shard` rows each, downloaded later by img2dataset."""
    errors: list[dict[str, Any]] = []
    count = 0
    try:
        def rows() -> Iterator[dict[str, Any]]:
            for row in _url_rows(source):
                if "error" in row:
                    errors.append(row)
                else:
                    yield row

        for n, chunk in enumerate(_chunks(rows(), params.samples_per_shard)):
            count += len(chunk)
            yield {"kind": "urls", "shard": f"{source.name}-{n:05d}", "source": source.name,
                   "meta": _meta(source), "rows": chunk}
    except Exception as exc:  # missing, unreachable or unreadable list: one row says why
        errors.append(_problem(source.uri, "urls", *listing_problem(source.uri, exc)))
    if count == 0 and not errors:
        errors.append(_problem(source.uri, "urls", "not_found", f"{source.uri} lists no URLs"))
    yield from _error_tasks(source, errors, params.samples_per_shard)


def plan_sources(params: HarvestParams, settings: str) -> Iterator[dict[str, Any]]:
    """Every shard task of every source, each stamped with its fingerprint."""
    for source in params.source_list:
        if isinstance(source, CaptionedSource):
            tasks = plan_captioned_source(source, params)
        elif isinstance(source, UrlsSource):
            tasks = plan_urls_source(source, params)
        else:
            tasks = plan_raster_source(source, params)
        for task in tasks:
            task["fingerprint"] = task_fingerprint(task, settings)
            yield task


def candidate_count(task: dict[str, Any]) -> int:
    """How many candidates a task examines (progress and accounting)."""
    if task["kind"] == "raster":
        return sum(len(part["chips"]) for part in task["scenes"])
    return len(task.get("images") or task.get("rows") or task.get("errors") or [])
