"""Shared fixtures: the sample harvest (run once per session) and small raster builders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.transform import Affine

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def harvest_params(tmp: Path, sources: list[dict[str, Any]] | str, **overrides: Any) -> Any:
    """Validated HarvestParams writing under `tmp`, with the repo's defaults for everything else."""
    from pipeline.params import load_harvest_params

    tmp.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    section = base["harvest"]
    section.update({"sources": sources, "output_dir": str(tmp / "harvest"), "work_dir": str(tmp / "work")})
    section.update(overrides)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"harvest": section}))
    return load_harvest_params(path)


def run(params: Any, beam_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a harvest in-process (FnApiRunner), no progress bar."""
    from pipeline.harvest import run_harvest

    return run_harvest(params, beam_args, progress=False)


def read_rows(harvest_dir: Path, table: str = "metadata") -> list[dict[str, Any]]:
    """Every row of a harvest's `metadata` (or `rejected`) Parquet files, shard by shard."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in sorted((harvest_dir / table).glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def write_raster(path: Path, data: np.ndarray, crs: Any, transform: Affine, nodata: float | None = None,
                 **profile: Any) -> Path:
    """Write a GeoTIFF from a (bands, rows, cols) array."""
    count, height, width = data.shape
    meta = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": data.dtype.name,
            "crs": CRS.from_user_input(crs) if crs is not None else None, "transform": transform,
            "nodata": nodata}
    meta.update(profile)
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(data)
    return path


def textured(bands: int, height: int, width: int, dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """Deterministic non-constant test pixels."""
    rng = np.random.default_rng(seed)
    scale = 255 if dtype == "uint8" else 4000
    return (rng.random((bands, height, width)) * scale).astype(dtype)


@pytest.fixture(scope="session")
def sample_harvest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The repo's sources.yaml harvested once, exactly as `dvc repro` does (relative paths, repo cwd)."""
    tmp = tmp_path_factory.mktemp("sample")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        params = harvest_params(tmp, str(REPO / "sources.yaml"))
        summary = run(params)
    finally:
        os.chdir(cwd)
    (tmp / "summary.yaml").write_text(yaml.safe_dump(summary))
    yield tmp / "harvest"


@pytest.fixture()
def in_repo() -> Iterator[Path]:
    """Run a test from the repository root (sources use repo-relative paths)."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield REPO
    finally:
        os.chdir(cwd)


@pytest.fixture()
def sample_copy(tmp_path: Path) -> Path:
    """A private copy of the sample GeoTIFFs (tests that damage or reproject files)."""
    dst = tmp_path / "geotiff"
    shutil.copytree(SAMPLE / "geotiff", dst)
    return dst


CLIP_TINY = REPO / "tests" / "data" / "clip-tiny-test.json"


def curation_params(tmp: Path, harvest_dir: Path, **sections: dict[str, Any]) -> Path:
    """A params.yaml for curating `harvest_dir` under `tmp`: repo defaults, the tiny test CLIP model,
    and `sections` merged over each stage's section."""
    tmp.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["curation"].update({"harvest_dir": str(harvest_dir), "dir": str(tmp / "curation"),
                             "output_dir": str(tmp / "curated"), "work_dir": str(tmp / "work")})
    base["clip"].update({"model": "clip-tiny-test", "model_config_path": str(CLIP_TINY),
                         "cache_dir": str(tmp / "cache" / "clip"), "batch_size": 8, "threads": 1})
    base["caption"]["vlm_cache_dir"] = str(tmp / "cache" / "vlm")
    for name, values in sections.items():
        base[name] = {**(base.get(name) or {}), **values}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


CURATION_STAGES = ("geo", "caption", "clip", "filter", "dedup", "curate")


def curate(params: Path, stages: tuple[str, ...] = CURATION_STAGES) -> dict[str, dict[str, Any]]:
    """Run curation stages through the CLI (in-process FnApiRunner); return each stage's metrics."""
    import json

    from stages.cli import main

    out = {}
    for stage in stages:
        metrics = params.parent / f"{stage}.json"
        extra = ["--preview", str(params.parent / "curate_preview.png")] if stage == "curate" else []
        assert main([stage, "--params", str(params), "--no-progress", "--metrics", str(metrics), *extra]) == 0
        out[stage] = json.loads(metrics.read_text())
    return out


@pytest.fixture(scope="session")
def sample_curation(sample_harvest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample harvest curated once by every stage (tiny random CLIP); returns the params file."""
    params = curation_params(tmp_path_factory.mktemp("curation"), sample_harvest)
    curate(params)
    return params


def publish_params(curation_params_path: Path, tmp: Path, **publish: Any) -> Path:
    """A params.yaml that publishes the curation of `curation_params_path` into `tmp/git10m`."""
    base = yaml.safe_load(curation_params_path.read_text())
    tmp.mkdir(parents=True, exist_ok=True)
    base["publish"] = {**base["publish"], "curated_dir": base["curation"]["output_dir"],
                       "harvest_dir": base["curation"]["harvest_dir"], "dir": str(tmp / "git10m"),
                       "work_dir": str(tmp / "work"), **publish}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def publish(params: Path, *args: str) -> dict[str, Any]:
    """Run `text2earth publish` in-process; return its metrics."""
    import json

    from stages.cli import main

    metrics = params.parent / "publish.json"
    assert main(["publish", "--params", str(params), "--no-progress", "--metrics", str(metrics), *args]) == 0
    return json.loads(metrics.read_text())


@pytest.fixture(scope="session")
def sample_publish(sample_curation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample curation published once (shards of 32); returns its params file."""
    params = publish_params(sample_curation, tmp_path_factory.mktemp("publish"))
    publish(params)
    return params


@pytest.fixture(scope="session")
def published(sample_publish: Path) -> str:
    """The published sample dataset folder (read-only: tests that change it make a copy)."""
    return str(sample_publish.parent / "git10m")
