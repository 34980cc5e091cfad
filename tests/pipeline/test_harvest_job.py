"""The harvest job end to end on the embedded sample: outputs, accounting, determinism, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import geopandas
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from pipeline.chips import sha256_hex
from pipeline.schema import HARVEST_SCHEMA, REJECTED_SCHEMA
from tests.conftest import REPO, harvest_params, read_rows, run


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_identical(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    different = [name for name in fa if fa[name] != fb[name]]
    assert not different, f"{len(different)} file(s) differ, e.g. {different[:3]}"


def _metadata(harvest: Path) -> list[dict]:
    return read_rows(harvest)


def test_outputs_have_the_documented_layout_and_schema(sample_harvest: Path) -> None:
    tars = sorted(p.stem for p in (sample_harvest / "shards").glob("*.tar"))
    metas = sorted(p.stem for p in (sample_harvest / "metadata").glob("*.parquet"))
    assert tars and set(tars) <= set(metas)
    for f in (sample_harvest / "metadata").glob("*.parquet"):
        schema = pq.read_schema(f)
        assert schema.names == HARVEST_SCHEMA.names
        assert b"geo" in schema.metadata
    for f in (sample_harvest / "rejected").glob("*.parquet"):
        assert pq.read_schema(f).names == REJECTED_SCHEMA.names
    rows = _metadata(sample_harvest)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    assert all("." not in k for k in keys)
    assert {r["source"] for r in rows} >= {"aerial-korea", "naip-north-dakota", "rsicd", "ucm-captions"}
    for r in rows:
        assert (r["width"], r["height"]) == (256, 256)
        assert r["shard"] in tars


def test_geoparquet_reads_with_geopandas_and_duckdb(sample_harvest: Path) -> None:
    gdf = geopandas.read_parquet(sample_harvest / "metadata")
    assert gdf.crs is not None and gdf.crs.to_string() == "OGC:CRS84"  # lon/lat WGS84
    geo = gdf[gdf.geometry.notna()]
    assert len(geo) > 50
    assert geo.geometry.is_valid.all()
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{sample_harvest}/metadata/*.parquet') "
                   "WHERE lon BETWEEN -110 AND -90 AND gsd_m < 10").fetchall()[0][0]
    assert n == len(gdf[(gdf.lon.between(-110, -90)) & (gdf.gsd_m < 10)])


def test_every_candidate_is_kept_or_rejected_once(sample_harvest: Path) -> None:
    summary = yaml.safe_load((sample_harvest.parent / "summary.yaml").read_text())
    kept = [r["key"] for r in _metadata(sample_harvest)]
    rejected = read_rows(sample_harvest, "rejected")
    assert len(kept) + len(rejected) == summary["candidates"]
    assert not set(kept) & {r["key"] for r in rejected}
    assert all(r["reason"] and r["stage"] == "harvest" for r in rejected)
    assert summary["by_reason"]["off_earth"] > 0 and summary["by_reason"]["nodata"] > 0


def test_webdataset_round_trip(sample_harvest: Path) -> None:
    """webdataset reads the shards as written: keys, images, captions and JSON rows agree with Parquet."""
    rows = {r["key"]: r for r in _metadata(sample_harvest)}
    urls = [str(p) for p in sorted((sample_harvest / "shards").glob("*.tar"))]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):  # the pinned webdataset (<0.2.96) has no empty_check
        row = rows[sample["__key__"]]
        image = sample[row["image_format"]]
        assert sha256_hex(image) == row["sha256"]
        assert Image.open(io.BytesIO(image)).size == (256, 256)
        doc = json.loads(sample["json"])
        assert doc["key"] == row["key"] and doc["gsd_m"] == row["gsd_m"] and doc["shard"] == row["shard"]
        assert (doc["geometry"] is None) == (row["geometry"] is None)
        if row["caption"]:
            assert sample["txt"].decode() == row["caption"]
        seen += 1
    assert seen == len(rows)


def test_tars_are_reproducible(sample_harvest: Path) -> None:
    for path in (sample_harvest / "shards").glob("*.tar"):
        with tarfile.open(path) as tf:
            assert {m.mtime for m in tf.getmembers()} == {0}


def test_captioned_samples_keep_all_sentences(sample_harvest: Path) -> None:
    ucm = [r for r in _metadata(sample_harvest) if r["source"] == "ucm-captions"]
    assert len(ucm) == 5
    for r in ucm:
        assert len(r["captions"]) == 5 and r["caption"] == r["captions"][0]
        assert r["caption_source"] == "source"
        assert r["gsd_m"] == pytest.approx(0.3048)  # UCM is 256 px: no resize
        assert r["lon"] is None and r["geometry"] is None and r["scene_class"] == "agricultural"
    rsicd = [r for r in _metadata(sample_harvest) if r["source"] == "rsicd"]
    assert rsicd and all(r["gsd_m"] is None and r["level"] is None for r in rsicd)


def test_uint16_scene_is_stretched_and_recorded(sample_harvest: Path) -> None:
    rows = [r for r in _metadata(sample_harvest) if r["source"] == "landsat8-greenland"]
    assert rows
    lows = {tuple(r["stretch_low"]) for r in rows}
    assert len(lows) == 1  # one stretch per scene, shared by all its chips
    assert rows[0]["stretch_percentiles"] == [2.0, 98.0]
    assert rows[0]["stretch_high"][0] > rows[0]["stretch_low"][0] > 1  # the collar value 1 is nodata
    assert rows[0]["bands"] == [1]
    korea = [r for r in _metadata(sample_harvest) if r["source"] == "aerial-korea"]
    assert korea[0]["stretch_low"] is None  # 8-bit data is stored as is


def test_rerun_is_byte_identical(sample_harvest: Path, tmp_path: Path, in_repo: Path) -> None:
    params = harvest_params(tmp_path, str(REPO / "sources.yaml"))
    run(params)
    assert_identical(sample_harvest, tmp_path / "harvest")


def test_resume_skips_committed_shards_and_prunes_stale_ones(tmp_path: Path, in_repo: Path) -> None:
    sources = yaml.safe_load((REPO / "sources.yaml").read_text())[:3]
    params = harvest_params(tmp_path, sources)
    run(params)
    out = tmp_path / "harvest"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    time.sleep(0.05)
    run(params)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before  # nothing rewritten
    fewer = harvest_params(tmp_path, sources[:1], jpeg_quality=80)
    summary = run(fewer)
    assert {r["source"] for r in _metadata(out)} == {sources[0]["name"]}
    assert summary["by_source"].keys() == {sources[0]["name"]}


@pytest.mark.slow
def test_two_workers_give_identical_output(sample_harvest: Path, tmp_path: Path, in_repo: Path) -> None:
    params = harvest_params(tmp_path, str(REPO / "sources.yaml"), workers=2)
    run(params)
    assert_identical(sample_harvest, tmp_path / "harvest")
    # both worker processes pulled tasks, and every shard was claimed by exactly one lane
    markers = [json.loads(p.read_text()) for p in (tmp_path / "work" / "progress").iterdir()]
    assert len({m["worker"] for m in markers}) == 2
    claims = {p.name: p.read_text().strip() for p in (tmp_path / "work" / "claims").iterdir()}
    assert sorted(claims) == sorted(m["shard"] for m in markers)
    assert set(claims.values()) == {"0", "1"}


def test_lanes_claim_every_task_once_while_the_plan_grows(tmp_path: Path) -> None:
    """Lanes racing over a plan that is still being written take each task exactly once between them."""
    import threading

    from pipeline.harvest import PLAN_DONE, stream_lane

    plan_dir, claims_dir = tmp_path / "plan", tmp_path / "claims"
    plan_dir.mkdir()
    shards = [f"src-{i:05d}" for i in range(60)]
    taken: dict[int, list[str]] = {0: [], 1: [], 2: []}

    def lane(number: int) -> None:
        for line in stream_lane(number, str(plan_dir), str(claims_dir)):
            taken[number].append(json.loads(line)["shard"])
            time.sleep(0.002 * (number + 1))  # lanes of different speeds

    threads = [threading.Thread(target=lane, args=(n,)) for n in taken]
    for thread in threads:
        thread.start()
    for i in range(0, len(shards), 20):  # the plan appears a file at a time
        lines = [json.dumps({"shard": s}) for s in shards[i:i + 20]]
        (plan_dir / ".partial").write_text("\n".join(lines) + "\n")  # whole files appear, as the driver's
        os.replace(plan_dir / ".partial", plan_dir / f"plan-{i:06d}.jsonl")
        time.sleep(0.05)
    (plan_dir / PLAN_DONE).write_text("3\n")
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(s for got in taken.values() for s in got) == shards
    assert all(taken.values()), "every lane should have taken some tasks"
    assert len(taken[0]) > len(taken[2])  # the fastest lane took the most


@pytest.mark.slow
def test_dask_cluster_gives_identical_output(sample_harvest: Path, tmp_path: Path, in_repo: Path) -> None:
    """A real distributed engine: Beam's DaskRunner on a 2-process dask.distributed cluster."""
    from distributed import LocalCluster

    params = harvest_params(tmp_path, str(REPO / "sources.yaml"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        run(params, ("--runner", "apache_beam.runners.dask.dask_runner.DaskRunner",
                     "--dask_client_address", cluster.scheduler_address))
    assert_identical(sample_harvest, tmp_path / "harvest")


def _start(params_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.cli", "harvest", "--params", str(params_path),
                             "--no-progress", "--metrics", str(params_path.parent / "m.json"),
                             "--preview", str(params_path.parent / "preview.png")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready: callable, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the harvest finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_harvest_resumes_to_exactly_the_uninterrupted_output(tmp_path: Path, in_repo: Path) -> None:
    """kill -9 during planning, mid-run and late; the re-run has every sample once, byte-identical."""
    reference = harvest_params(tmp_path / "ref", str(REPO / "sources.yaml"), samples_per_shard=8)
    run(reference)
    work = tmp_path / "killed"
    params = harvest_params(work, str(REPO / "sources.yaml"), samples_per_shard=8, workers=2)
    progress = work / "work" / "progress"
    metadata = work / "harvest" / "metadata"

    def committed() -> int:
        return len(list(metadata.glob("*.parquet"))) if metadata.exists() else 0

    proc = _start(work / "params.yaml")
    _kill_when(proc, lambda: (work / "work" / "plan").exists())        # while planning / starting
    proc = _start(work / "params.yaml")
    _kill_when(proc, lambda: committed() >= 3)                          # a few shards in
    total = len(list((tmp_path / "ref" / "harvest" / "metadata").glob("*.parquet")))
    assert 3 <= committed() < total
    proc = _start(work / "params.yaml")
    _kill_when(proc, lambda: progress.exists() and len(list(progress.iterdir())) >= 12)  # later
    run(params)
    assert_identical(tmp_path / "ref" / "harvest", work / "harvest")
    assert not [p for p in (work / "harvest").rglob(".*")]  # no temp leftovers


def test_output_does_not_depend_on_the_checkout_folder(tmp_path: Path) -> None:
    """Two clones in different folders (relative source paths) write byte-identical shards and Parquet."""
    import shutil

    outs = []
    for name in ("clone-a", "somewhere/else/clone-b"):
        root = tmp_path / name
        shutil.copytree(REPO / "data/sample/geotiff", root / "data/sample/geotiff")
        entry = {"name": "naip", "kind": "geotiff", "uri": "data/sample/geotiff/naip_*.tif", "license": "x",
                 "attribution": "y", "bands": [1, 2, 3]}
        cwd = os.getcwd()
        os.chdir(root)
        try:
            run(harvest_params(root / "run", [entry]))
        finally:
            os.chdir(cwd)
        outs.append(root / "run" / "harvest")
    assert_identical(*outs)
