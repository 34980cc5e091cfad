"""The one definition of the metadata and rejected-sample columns.

The shard writer, the GeoParquet files, the README table and (later) the DuckDB views and data cards
all read these lists, so a column is named, typed and explained in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    """One metadata column: its name, Arrow type and the sentence a reader needs."""

    name: str
    type: pa.DataType
    description: str


_STR = pa.string()
_F64 = pa.float64()

HARVEST_COLUMNS: tuple[Column, ...] = (
    Column("key", _STR, "Unique sample id (`{source}-{scene}-{pyramid_level}-{row}-{col}` for rasters); no dots, "
           "so it is a valid WebDataset key."),
    Column("shard", _STR, "Harvest shard (tar file stem under `shards/`) that holds the image."),
    Column("source", _STR, "Source `name` from the sources file."),
    Column("source_uri", _STR, "The scene or image the chip was cut from (path, URL or STAC item + assets)."),
    Column("scene_id", _STR, "Stable id of that scene within the source (file stem + hash of its URI)."),
    Column("license", _STR, "License of the source (SPDX id or text), copied from the sources file."),
    Column("attribution", _STR, "Attribution required by the source, copied from the sources file."),
    Column("sensor", _STR, "Sensor or camera (sources file, or STAC `instruments`); null if unknown."),
    Column("platform", _STR, "Platform / satellite (sources file, or STAC `platform`); null if unknown."),
    Column("acquired", _STR, "Acquisition date or time, ISO 8601, possibly partial (`2014-04`); from STAC "
           "`datetime`, the sources file or the TIFF DATETIME tag; null if unknown."),
    Column("crs", _STR, "CRS of the source raster (`EPSG:32618`, or WKT for CRSs without a code); null for "
           "non-georeferenced images."),
    Column("native_gsd_m", _F64, "Ground sample distance of the source pixels at the chip centre, metres "
           "(geodesic, geometric mean of x and y)."),
    Column("gsd_m", _F64, "Ground sample distance of the chip pixels, metres: sqrt(gsd_x_m * gsd_y_m). Null "
           "when the source has no georeference and no declared `gsd_m`."),
    Column("gsd_x_m", _F64, "Geodesic length of one chip pixel along its rows (column step), metres."),
    Column("gsd_y_m", _F64, "Geodesic length of one chip pixel along its columns (row step), metres."),
    Column("level", pa.int16(), "Text2Earth resolution level round(17 - log2(gsd_m)) (Google zoom; 10..18 = "
           "128 m .. 0.5 m); null when the GSD is unknown."),
    Column("pyramid_level", pa.int16(), "Pyramid step k: the chip averages 2^k x 2^k source pixels per "
           "pixel (0 = native resolution)."),
    Column("lon", _F64, "Chip centre longitude, WGS84 degrees in [-180, 180)."),
    Column("lat", _F64, "Chip centre latitude, WGS84 degrees."),
    Column("geometry", pa.binary(), "Chip footprint on the ground (WKB polygon, WGS84 lon/lat, edges "
           "densified; split at the antimeridian). Null for non-georeferenced images."),
    Column("width", pa.int32(), "Chip width in pixels."),
    Column("height", pa.int32(), "Chip height in pixels."),
    Column("nodata_fraction", pa.float32(), "Fraction of the chip's area without valid source data "
           "(nodata, mask, or beyond the scene edge)."),
    Column("pixel_window", pa.list_(pa.int64()), "Source pixel window [col_off, row_off, width, height] the "
           "chip covers (before clipping to the scene); null for whole images."),
    Column("bands", pa.list_(pa.int16()), "1-based source bands mapped to R, G, B (one repeated = grey)."),
    Column("stretch_low", pa.list_(_F64), "Per output channel, the source value mapped to 0 by the scene's "
           "percentile stretch; null when the scene was already 8-bit and not stretched."),
    Column("stretch_high", pa.list_(_F64), "Per output channel, the source value mapped to 255."),
    Column("stretch_percentiles", pa.list_(_F64), "The [low, high] percentiles the stretch used."),
    Column("cloud_cover", _F64, "STAC `eo:cloud_cover` of the scene, percent; null if not given."),
    Column("declared_gsd_m", _F64, "GSD the source declares (STAC `gsd` or the sources file `gsd_m`), "
           "metres; compare with the measured `native_gsd_m`."),
    Column("scene_class", _STR, "Class label the source gives for the image (captioned datasets), if any."),
    Column("source_split", _STR, "Split the source assigns (e.g. Karpathy train/val/test), if any."),
    Column("image_format", _STR, "Stored image encoding: `jpg` or `png`."),
    Column("sha256", _STR, "SHA-256 of the stored image bytes."),
    Column("caption", _STR, "Caption text stored as `{key}.txt`; null when the source has none (curation "
           "adds one)."),
    Column("captions", pa.list_(_STR), "Every caption the source has for the image (e.g. the five RSICD "
           "sentences); empty when none."),
    Column("caption_source", _STR, "Who wrote `caption`: `source` (the dataset's own), or null."),
)

REJECTED_COLUMNS: tuple[Column, ...] = (
    Column("key", _STR, "Key the candidate would have had (or the scene id for scene-level failures)."),
    Column("shard", _STR, "Harvest shard whose job examined the candidate."),
    Column("source", _STR, "Source `name`."),
    Column("source_uri", _STR, "Scene, image or URL the candidate came from."),
    Column("stage", _STR, "Pipeline stage that dropped it (`harvest`)."),
    Column("reason", _STR, "Machine-readable reason (see the reasons table in the README)."),
    Column("detail", _STR, "Human-readable detail: the error message or the measured value."),
    Column("pyramid_level", pa.int16(), "Pyramid step of the candidate chip; null for scene-level drops."),
    Column("lon", _F64, "Candidate centre longitude where known."),
    Column("lat", _F64, "Candidate centre latitude where known."),
    Column("nodata_fraction", pa.float32(), "Measured nodata fraction where known."),
)

# Why a candidate can be dropped during harvest. Keys are what `rejected.reason` holds.
REJECT_REASONS: dict[str, str] = {
    "not_found": "The path, glob or URL matched no file (or a caption JSON or URL list lists nothing).",
    "unreachable": "A remote file or URL could not be fetched (connection refused, timeout, HTTP error).",
    "not_a_raster": "The file is not in a raster format GDAL recognises.",
    "unreadable": ("The file is corrupt, truncated or empty (0 bytes), or a STAC catalog, caption JSON or URL list "
                   "(or one of its records) cannot be parsed."),
    "no_crs": "The raster has no coordinate reference system, so GSD and location are unknown.",
    "no_georeference": "The raster has no geotransform, only GCPs or RPCs: warp (`gdalwarp`, `-rpc`) it first.",
    "bad_bands": ("The configured bands or assets do not exist, do not share one pixel grid, or hold palette "
                  "indices (expand them: `gdal_translate -expand rgb`)."),
    "image_too_large": "The image or scene exceeds the pixel limit in params (decompression-bomb guard).",
    "empty_raster": "The raster has no valid (non-nodata) pixels at all.",
    "off_earth": "Some chip pixels are off the Earth's disk or outside the CRS's valid area.",
    "nodata": "The chip's nodata fraction exceeds `max_nodata_fraction`.",
    "constant": "The chip has a single value (range below `min_value_range`).",
    "read_error": "Reading the chip's pixels failed (truncated or corrupt data blocks).",
    "decode_error": "The image bytes could not be decoded.",
    "download_failed": "img2dataset could not download or decode the URL (its error message is kept).",
}


def _curated_columns() -> tuple[Column, ...]:
    """The harvest columns (caption_source widened to every captioner) plus what curation adds."""
    base = tuple(
        Column(c.name, c.type, "Who wrote `caption`: `source` (the dataset's own sentence), `template` (built "
               "from the metadata) or `vlm:{model}` (a vision-language model).") if c.name == "caption_source"
        else c for c in HARVEST_COLUMNS)
    return base + CURATION_ADDED_COLUMNS


CURATION_ADDED_COLUMNS: tuple[Column, ...] = (
    Column("image_key", _STR, "Harvest key of the image this row uses (`{image_key}.jpg` in the harvest "
           "shard `shard`); equals `key` except for the extra rows of one-sample-per-sentence captions."),
    Column("country_iso3", _STR, "ISO 3166-1 alpha-3 code of the country containing the chip centre "
           "(Natural Earth 1:50m; its ADM0_A3 where ISO_A3 is -99); at sea the nearest country within "
           "`geo.max_sea_km`; null otherwise or when not georeferenced."),
    Column("country", _STR, "Country name (Natural Earth NAME)."),
    Column("continent", _STR, "Continent (Natural Earth CONTINENT, e.g. `Europe`, `Seven seas (open ocean)`)."),
    Column("h3_cell", _STR, "H3 cell (resolution `geo.h3_resolution`) of the chip centre; null when not "
           "georeferenced."),
    Column("clip_score", pa.float32(), "Cosine similarity of the L2-normalised CLIP image and caption "
           "embeddings (`clip_model`)."),
    Column("clip_model", _STR, "open_clip model and weights that computed `clip_score` "
           "(`name/pretrained`; `random-init` marks offline smoke runs whose scores mean nothing)."),
)



CURATED_COLUMNS: tuple[Column, ...] = _curated_columns()

CURATION_REJECTED_COLUMNS: tuple[Column, ...] = (
    Column("key", _STR, "Key of the dropped sample."),
    Column("image_key", _STR, "Harvest key of its image."),
    Column("shard", _STR, "Harvest shard that holds the image."),
    Column("source", _STR, "Source `name`."),
    Column("stage", _STR, "Curation stage that dropped it (`caption`, `clip`, `filter`, `dedup`, `curate`)."),
    Column("reason", _STR, "Machine-readable reason (see the curation reasons table)."),
    Column("detail", _STR, "Human-readable detail: the error, the score and the cut-off, the distance."),
    Column("duplicate_of", _STR, "For duplicates: `image_key` of the kept copy."),
    Column("clip_score", pa.float32(), "The sample's CLIP score where it was computed."),
    Column("lon", _F64, "Chip centre longitude where known."),
    Column("lat", _F64, "Chip centre latitude where known."),
)

CURATION_REASONS: dict[str, str] = {
    "no_caption": "`source` captioner: the source has no caption for the image and `caption.fallback` is "
                  "`reject`.",
    "vlm_failed": "The captioning endpoint kept failing (HTTP error, timeout, connection) after its retries; "
                  "the shard is redone on the next run.",
    "vlm_bad_reply": "The captioning endpoint kept answering without a usable caption after its retries.",
    "image_missing": "The image is not in its harvest shard (the harvest changed after this row was made).",
    "decode_error": "The image bytes could not be decoded for CLIP.",
    "below_min_score": "`clip_score` is below `filter.min_score`.",
    "below_top_percent": "`clip_score` is below the cut-off that keeps `filter.top_percent` of its (source, "
                         "level) group.",
    "duplicate_exact": "Another image has the same sha256; `duplicate_of` names the kept copy.",
    "duplicate_near": "A near copy (perceptual hash, CLIP cosine, same place) was kept; `duplicate_of` names it.",
    "over_cell_cap": "Its (H3 cell, level) already holds `curate.max_per_cell` samples.",
}


def _published_columns() -> tuple[Column, ...]:
    """The curated columns as published: `shard` names the published tar, `level` 0 means unknown, + split."""
    redescribed = {
        "shard": "Published shard (`shards/{shard}.tar`) that holds `{key}.jpg|png`, `{key}.txt` and `{key}.json`.",
        "level": "Text2Earth resolution level round(17 - log2(gsd_m)) (Google zoom level: 2^(17-level) m/px); "
                 "0 when the GSD is unknown (Text2Earth's null resolution). The metadata is Hive-partitioned "
                 "on it (`metadata/level=L/`).",
    }
    base = tuple(Column(c.name, pa.int16() if c.name == "level" else c.type, redescribed.get(c.name, c.description))
                 for c in CURATED_COLUMNS)
    return (
        *base,
        Column("split", _STR, "`train`, `val` or `test`, assigned per geographic block (the H3 parent cell at "
               "`publish.split_h3_resolution` of the chip centre), so neighbouring chips share a split; "
               "samples without a location keep their source's split, else one per scene."),
    )


PUBLISHED_COLUMNS: tuple[Column, ...] = _published_columns()

PUBLISHED_REJECTED_COLUMNS: tuple[Column, ...] = tuple(
    Column(c.name, c.type, "Stage that dropped it: `harvest`, a curation stage (`caption`, `clip`, `filter`, "
           "`dedup`, `curate`) or `publish`.") if c.name == "stage" else c
    for c in CURATION_REJECTED_COLUMNS)

PUBLISH_REASONS: dict[str, str] = {
    "image_missing": "The image is not in its harvest shard any more (the harvest changed after curation).",
}


def arrow_schema(columns: tuple[Column, ...]) -> pa.Schema:
    """Build the Arrow schema, with each description kept as field metadata for the cards."""
    return pa.schema(
        [pa.field(c.name, c.type, nullable=True, metadata={"description": c.description}) for c in columns]
    )


HARVEST_SCHEMA = arrow_schema(HARVEST_COLUMNS)
REJECTED_SCHEMA = arrow_schema(REJECTED_COLUMNS)
CURATED_SCHEMA = arrow_schema(CURATED_COLUMNS)
CURATION_REJECTED_SCHEMA = arrow_schema(CURATION_REJECTED_COLUMNS)
PUBLISHED_SCHEMA = arrow_schema(PUBLISHED_COLUMNS)
PUBLISHED_REJECTED_SCHEMA = arrow_schema(PUBLISHED_REJECTED_COLUMNS)


def markdown_table(columns: tuple[Column, ...]) -> str:
    """Render columns as a Markdown table (used by the README and the data cards)."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{c.name}` | {c.type} | {c.description} |" for c in columns]
    return "\n".join(lines)


def reasons_table(reasons: dict[str, str] | None = None) -> str:
    """Render rejection reasons (the harvest's by default) as a Markdown table."""
    lines = ["| reason | meaning |", "|---|---|"]
    lines += [f"| `{reason}` | {meaning} |" for reason, meaning in (reasons or REJECT_REASONS).items()]
    return "\n".join(lines)
