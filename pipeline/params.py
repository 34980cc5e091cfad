"""Validated configuration: the `harvest` section of params.yaml and the sources file.

Every model forbids unknown keys. `load_harvest_params` turns pydantic's errors into one message per
problem that names the file, the key path and what is allowed, so a typo stops the stage up front.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from pipeline.errors import ParamsError

ModelT = TypeVar("ModelT", bound=BaseModel)
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SourceBase(_Strict):
    name: str = Field(description="Unique lower-case slug; prefixes every key and names the shards.")
    uri: str = Field(description="Path, glob, or http(s)/s3/gs URL (for stac: catalog or API URL).")
    license: str = Field(min_length=1, description="SPDX id or licence text, copied to every sample.")
    attribution: str = Field(min_length=1, description="Credit line copied to every sample.")
    sensor: str | None = None
    platform: str | None = None
    acquired: str | None = Field(None, description="ISO 8601 date/time, may be partial (2014-04).")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SOURCE_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid source name: use lower-case letters, digits, '-' and '_' "
                "(it becomes part of every sample key, which must not contain dots)"
            )
        return value

    @field_validator("acquired")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^\d{4}(-\d{2}(-\d{2}([T ][0-9:.]+(Z|[+-]\d{2}:?\d{2})?)?)?)?$", value):
            raise ValueError(f"{value!r} is not ISO 8601; write e.g. 2019-09-04, 2019-09 or 2019")
        return value


def _grey_or_rgb(value: list[Any] | None, what: str, single: str) -> list[Any] | None:
    """Bands and assets map to grey or one multi-band asset (one entry) or to R, G, B (three)."""
    if value is not None and len(value) not in (1, 3):
        raise ValueError(f"give 1 {what} ({single}) or 3 {what}s (R, G, B), not {len(value)}")
    return value


class _RasterOptions(_Strict):
    bands: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="1-based bands for R,G,B (3 values) or grey (1 value); default: the bands "
        "tagged red/green/blue, else 1,2,3, else band 1 as grey."
    )
    nodata: float | None = Field(None, description="Treat this value as nodata when the file has no tag.")
    stretch: Literal["auto", "percentile", "none"] = Field(
        "auto", description="auto: 8-bit data as is, other dtypes percentile-stretched; none: clip to 0..255."
    )

    @field_validator("bands")
    @classmethod
    def _band_count(cls, value: list[int] | None) -> list[int] | None:
        return _grey_or_rgb(value, "band", "grey")


class GeoTiffSource(_SourceBase, _RasterOptions):
    """GeoTIFF/COG files, local or remote (read by windows through GDAL, never downloaded whole)."""

    kind: Literal["geotiff"]


class StacSource(_SourceBase, _RasterOptions):
    """A static STAC catalog/collection, or a STAC API search when any search field is given."""

    kind: Literal["stac"]
    assets: list[str] | None = Field(
        None, description="One multi-band asset key, or three single-band asset keys for R,G,B; "
        "default: `visual`, else the first GeoTIFF asset."
    )
    collections: list[str] | None = None
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    max_items: int | None = Field(None, ge=1)
    query: dict[str, Any] | None = None

    @field_validator("assets")
    @classmethod
    def _asset_count(cls, value: list[str] | None) -> list[str] | None:
        return _grey_or_rgb(value, "asset", "multi-band or grey")

    @property
    def is_api_search(self) -> bool:
        """A search field means a STAC API; otherwise the URI is read as a static catalog (`max_items`
        alone limits either)."""
        return any(v is not None for v in (self.collections, self.bbox, self.datetime, self.query))


class CaptionedSource(_SourceBase):
    """A Karpathy-layout caption JSON (RSICD, UCM-Captions, Sydney-Captions)."""

    kind: Literal["captioned"]
    image_dir: str | None = Field(None, description="Folder with the images; default `images/` beside uri.")
    gsd_m: float | None = Field(None, gt=0, description="GSD of the original images, metres (UCM: 0.3).")


class UrlsSource(_SourceBase):
    """A parquet/csv URL list downloaded with img2dataset."""

    kind: Literal["urls"]
    url_col: str = "url"
    caption_col: str | None = "caption"
    gsd_m: float | None = Field(None, gt=0, description="GSD of the original images, metres, if known.")


Source = Annotated[GeoTiffSource | StacSource | CaptionedSource | UrlsSource, Field(discriminator="kind")]
SOURCE_MODELS: dict[str, type[_SourceBase]] = {
    "geotiff": GeoTiffSource, "stac": StacSource, "captioned": CaptionedSource, "urls": UrlsSource,
}


class HarvestParams(_Strict):
    """Knobs of the harvest stage (`harvest:` in params.yaml)."""

    # A sources-file path, or the entries inline; `load_harvest_params` replaces it by validated models.
    sources: str | list[Any] = Field("sources.yaml", description="Sources file, or the list inline.")
    output_dir: str = "data/harvest"
    work_dir: str = Field(".text2earth/work/harvest", description="Plan files; not part of the output.")
    chip_size: int = Field(256, ge=16, le=4096)
    max_gsd_m: float = Field(128.0, gt=0, description="Coarsest pyramid GSD; native chips are always cut.")
    max_pyramid_levels: int = Field(8, ge=0, le=16)
    max_nodata_fraction: float = Field(0.5, ge=0, le=1)
    min_value_range: int = Field(1, ge=0, le=255, description="Chips whose 8-bit max-min is below are "
                                 "`constant`.")
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    stretch_percentiles: tuple[float, float] = (2.0, 98.0)
    stretch_per_band: bool = Field(False, description="False keeps colour balance (one range for all bands).")
    stretch_sample_size: int = Field(512, ge=64, description="Longest side of the decimated stats read.")
    samples_per_shard: int = Field(128, ge=1, description="Candidates per shard task: small enough "
                                   "to balance workers, large enough that per-shard costs vanish.")
    max_image_pixels: int = Field(100_000_000, ge=1, description="Limit for images decoded whole.")
    max_scene_pixels: int = Field(10_000_000_000, ge=1, description="Limit for rasters read by windows.")
    max_read_factor: int = Field(8, ge=1, description="Above this pyramid factor GDAL pre-averages reads "
                                 "(bounds a worker's memory: a window is at most (chip_size * this)^2 pixels).")
    runner: str = Field("FnApiRunner", description="Beam runner; extra runner options go on the CLI.")
    workers: int = Field(1, ge=1, description="Worker processes for FnApiRunner.")
    planning_threads: int = Field(16, ge=1, description="Threads reading scene headers while planning.")
    http_timeout_s: int = Field(30, ge=1)
    http_retries: int = Field(3, ge=0)
    url_threads: int = Field(16, ge=1, description="img2dataset download threads per worker.")
    gdal_config: dict[str, str] = Field(default_factory=dict, description="Extra GDAL config options.")

    @field_validator("stretch_percentiles")
    @classmethod
    def _pct(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError(f"need 0 <= low < high <= 100, got {list(value)}")
        return value

    @field_validator("chip_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"chip_size must be even, got {value}")
        return value

    @property
    def source_list(self) -> list[Any]:
        """The validated source entries (after `load_harvest_params`)."""
        if isinstance(self.sources, str):
            raise TypeError("sources are not resolved yet; use load_harvest_params()")
        return list(self.sources)


def check_unique_names(sources: list[Any]) -> None:
    """Source names prefix keys and shards, so two entries may not share one."""
    seen: set[str] = set()
    for src in sources:
        if src.name in seen:
            raise ValueError(f"source name {src.name!r} is used twice; names must be unique")
        seen.add(src.name)


def _render_path(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if not (isinstance(p, str) and p in SOURCE_MODELS)]  # drop union tags
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return (prefix + text).lstrip(".") or "(top level)"


def _format_errors(err: ValidationError, where: str, prefix: str, data: Any,
                   root: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        path = _render_path(prefix, e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1], data, root or HarvestParams)
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{where}: {path}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(f"{where}: {path}: `kind` must be one of {', '.join(SOURCE_MODELS)}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{where}: {path}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _nested_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model class a field holds (directly, optionally, or as dict/list values), if any."""
    field = model.model_fields.get(name)
    if field is None:
        return None
    stack: list[Any] = [field.annotation]
    while stack:
        tp = stack.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
        stack.extend(getattr(tp, "__args__", ()))
    return None


def _allowed_keys(loc: tuple[Any, ...], data: Any, root: type[BaseModel]) -> list[str]:
    """Field names of the model at `loc`, following nested models and `kind` into the source models."""
    model: type[BaseModel] = root
    node = data
    for part in loc:
        if isinstance(part, str) and part in SOURCE_MODELS and isinstance(node, dict):
            model = SOURCE_MODELS[part]  # pydantic puts the union tag in the location
            continue
        if isinstance(part, str):
            model = _nested_model(model, part) or model
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
        if isinstance(node, dict) and node.get("kind") in SOURCE_MODELS:
            model = SOURCE_MODELS[node["kind"]]
    return sorted(model.model_fields)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: file not found; run from the project root or pass --params") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc


_SOURCES = TypeAdapter(list[Source])


def validate_sources(data: Any, where: str, prefix: str) -> list[Any]:
    """Validate a list of source entries; errors name `where` (the file) and the entry's key path."""
    if not isinstance(data, list) or not data:
        raise ParamsError(f"{where}: {prefix}: expected a non-empty list of sources, each with name, kind, "
                          "uri, license and attribution")
    try:
        sources = _SOURCES.validate_python(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, where, prefix, data)) from None
    try:
        check_unique_names(sources)
    except ValueError as err:
        raise ParamsError(f"{where}: {prefix}: {err}") from None
    return sources


def load_sources(path: Path) -> list[Any]:
    """Read and validate a sources file: a YAML list of entries (or a mapping with a `sources:` list)."""
    data = _read_yaml(path)
    if isinstance(data, dict) and "sources" in data:
        data = data["sources"]
    return validate_sources(data, str(path), "sources")


def read_params_file(params_path: Path) -> dict[str, Any]:
    """The whole params.yaml as a mapping of stage sections."""
    data = _read_yaml(params_path) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{params_path}: expected a mapping of stage sections")
    return data


def validate_section(model: type[ModelT], section: dict[str, Any], where: str, prefix: str) -> ModelT:
    """Validate one params section; errors name the file, the key path and what is allowed."""
    try:
        return model.model_validate(section)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, where, prefix, section, model)) from None


def load_harvest_params(params_path: Path, overrides: dict[str, Any] | None = None) -> HarvestParams:
    """Load `harvest:` from params.yaml (plus CLI overrides), validated, with sources resolved."""
    data = _read_yaml(params_path) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{params_path}: expected a mapping of stage sections")
    section = dict(data.get("harvest") or {})
    section.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        params = HarvestParams.model_validate(section)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, str(params_path), "harvest", section)) from None
    if isinstance(params.sources, str):
        sources_path = Path(params.sources)
        if not sources_path.is_absolute() and not sources_path.exists():
            sources_path = params_path.parent / sources_path
        sources = load_sources(sources_path)
    else:
        sources = validate_sources(params.sources, str(params_path), "harvest.sources")
    return params.model_copy(update={"sources": sources})
