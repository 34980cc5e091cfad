"""The `publish` stage on the sample: shards loaders can read, metadata, splits, checksums, re-runs."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import duckdb
import h3
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.conftest import publish, publish_params

pytestmark = pytest.mark.slow


def metadata(git10m: str) -> list[dict]:
    from pipeline.publish.query import connect

    return connect(git10m).sql("SELECT * FROM samples ORDER BY key").to_arrow_table().to_pylist()


def test_webdataset_round_trip(published: str) -> None:
    import webdataset as wds

    root = Path(published)
    sizes = json.loads((root / "shards" / "sizes.json").read_text())
    tars = sorted((root / "shards").glob("*.tar"))
    assert [t.name for t in tars] == sorted(sizes)
    assert all(n == 32 for n in list(sizes.values())[:-1])  # full shards but the last
    rows = {r["key"]: r for r in metadata(published)}
    seen = {}
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):
        key = sample["__key__"]
        doc = json.loads(sample["json"])
        row = rows[key]
        image = Image.open(io.BytesIO(sample.get("jpg") or sample["png"]))
        assert image.size == (row["width"], row["height"])
        assert sample["txt"].decode() == (row["caption"] or "")
        assert doc["shard"] == row["shard"] == Path(sample["__url__"]).stem
        assert doc["split"] == row["split"] and doc["level"] == row["level"] and doc["sha256"] == row["sha256"]
        assert hashlib.sha256(sample.get("jpg") or sample["png"]).hexdigest() == row["sha256"]
        seen[key] = doc["shard"]
    assert set(seen) == set(rows)
    assert {s: list(seen.values()).count(s[:-4]) for s in sizes} == sizes


def test_open_clip_training_loader_reads_a_batch(published: str) -> None:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    sizes = json.loads((Path(published) / "shards" / "sizes.json").read_text())
    last = len(sizes) - 1
    args = argparse.Namespace(
        train_data=f"{published}/shards/git10m-{{000000..{last:06d}}}.tar", val_data=None,
        dataset_resampled=False, train_num_samples=None, train_data_upsampling_factors=None, seed=0,
        workers=1, world_size=1, batch_size=8)
    preprocess = open_clip.image_transform(64, is_train=True)
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    assert info.dataloader.num_samples >= sum(sizes.values())  # epoch size from sizes.json
    images, texts = next(iter(info.dataloader))
    assert images.shape == (8, 3, 64, 64) and texts.shape == (8, 77)


def test_metadata_layout(published: str) -> None:
    import geopandas

    root = Path(published) / "metadata"
    parts = sorted(p.name for p in root.iterdir())
    assert parts and all(p.startswith("level=") for p in parts)
    rows = metadata(published)
    assert {f"level={r['level']}" for r in rows} == set(parts)
    assert all(r["level"] > 0 or r["gsd_m"] is None for r in rows)
    first = next(root.glob("*/*.parquet"))
    schema = pq.read_schema(first)
    assert "level" not in schema.names and "split" in schema.names
    assert all(schema.field(n).metadata[b"description"] for n in schema.names)
    assert json.loads(schema.metadata[b"geo"])["primary_column"] == "geometry"
    assert pq.read_metadata(first).row_group(0).column(0).compression == "ZSTD"
    frame = geopandas.read_parquet(first)
    assert frame.crs is not None and len(frame) > 0


def test_splits_follow_geographic_blocks(published: str, sample_publish: Path) -> None:
    res = yaml.safe_load(sample_publish.read_text())["publish"]["split_h3_resolution"]
    blocks: dict[str, set[str]] = {}
    for row in metadata(published):
        assert row["split"] in ("train", "val", "test")
        if row["h3_cell"]:
            blocks.setdefault(h3.cell_to_parent(row["h3_cell"], res), set()).add(row["split"])
        elif row["source_split"]:
            assert row["split"] == row["source_split"]
    assert blocks and all(len(s) == 1 for s in blocks.values())


def test_checksums_cover_every_file(published: str) -> None:
    root = Path(published)
    listed = [line.split("  ", 1)[1] for line in (root / "checksums.sha256").read_text().splitlines()]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".tar", ".parquet"))
    assert listed == files
    subprocess.run(["sha256sum", "--quiet", "-c", "checksums.sha256"], cwd=root, check=True)


def test_rejected_and_funnel_cover_every_stage(published: str) -> None:
    from pipeline.publish.query import connect

    con = connect(published)
    stages = {s for (s,) in con.sql("SELECT DISTINCT stage FROM rejected").fetchall()}
    assert "harvest" in stages and stages & {"filter", "dedup", "curate"}
    row = con.execute("SELECT sum(kept), sum(\"in\"), sum(dropped) FROM funnel WHERE stage = 'publish'").fetchone()
    assert row[0] == con.execute("SELECT count(*) FROM samples").fetchone()[0]
    assert row[1] == row[0] + row[2]


def test_rerun_resumes_and_is_byte_identical(sample_curation: Path, tmp_path: Path) -> None:
    params = publish_params(sample_curation, tmp_path / "a")
    first = publish(params)
    root = tmp_path / "a" / "git10m"
    before = (root / "checksums.sha256").read_text()
    victim = sorted((root / "shards").glob("*.tar"))[1]
    victim.unlink()  # an interrupted run: one shard lost
    again = publish(params)
    assert again == first
    assert (root / "checksums.sha256").read_text() == before
    other = publish_params(sample_curation, tmp_path / "b")
    publish(other)
    assert (tmp_path / "b" / "git10m" / "checksums.sha256").read_text() == before


def test_missing_image_is_recorded_not_lost(sample_curation: Path, tmp_path: Path) -> None:
    base = yaml.safe_load(sample_curation.read_text())
    curated = tmp_path / "curated"
    shutil.copytree(base["curation"]["output_dir"], curated)
    victim = sorted((curated / "metadata").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    keys = table.column("image_key").to_pylist()
    keys[0] = "no-such-image"
    table = table.set_column(table.column_names.index("image_key"), "image_key", [keys])
    table = table.cast(pq.read_schema(victim))
    pq.write_table(table, victim)
    base["curation"]["output_dir"] = str(curated)
    source = tmp_path / "source.yaml"
    source.write_text(yaml.safe_dump(base))
    params = publish_params(source, tmp_path / "out")
    summary = publish(params)
    assert summary["by_reason"] == {"image_missing": 1}
    con = duckdb.connect()
    got = con.sql(f"SELECT stage, reason FROM read_parquet('{tmp_path}/out/git10m/rejected/*.parquet') "
                  "WHERE stage = 'publish'").fetchall()
    assert got == [("publish", "image_missing")]
    assert summary["samples"] + 1 == summary["in"]


def test_bad_split_params_name_the_key(sample_curation: Path, tmp_path: Path) -> None:
    from stages.cli import main

    params = publish_params(sample_curation, tmp_path, split={"train": 0.9, "val": 0.2, "test": 0.1})
    assert main(["publish", "--params", str(params), "--no-progress"]) == 2


def test_query_formats(published: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stages.cli import main

    sql = "SELECT split, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1"
    assert main(["query", sql, "--dir", published]) == 0
    assert capsys.readouterr().out.startswith("| split")
    assert main(["query", sql, "--dir", published, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "split,n"
    assert main(["query", sql, "--dir", published, "--format", "json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sum(x["n"] for x in lines) == len(metadata(published))
    out = tmp_path / "q.parquet"
    assert main(["query", sql, "--dir", published, "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == len(lines)
    assert main(["query", "SELECT nope FROM samples", "--dir", published]) == 2
    assert "views: samples, rejected, funnel" in capsys.readouterr().err
