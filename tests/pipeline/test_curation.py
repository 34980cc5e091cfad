"""The curation stages on the embedded sample: funnel accounting, CLIP scores, places, captions, resume."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import CLIP_TINY, curate, curation_params, read_rows


def _dirs(params: Path) -> dict[str, Path]:
    common = yaml.safe_load(params.read_text())["curation"]
    out = {s: Path(common["dir"]) / s for s in ("geo", "caption", "clip", "filter", "dedup")}
    return {**out, "curate": Path(common["output_dir"]), "harvest": Path(common["harvest_dir"])}


def _images(harvest: Path) -> dict[str, bytes]:
    found = {}
    for tar in sorted((harvest / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "png"):
                    found[key] = t.extractfile(m).read()  # type: ignore[union-attr]
    return found


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def test_funnel_adds_up_for_every_stage_and_source(sample_curation: Path) -> None:
    dirs = _dirs(sample_curation)
    funnel = json.loads((dirs["curate"] / "funnel.json").read_text())
    assert pq.read_table(dirs["curate"] / "funnel.parquet").num_rows == len(funnel)
    stages = [r["stage"] for r in funnel]
    assert sorted(set(stages), key=stages.index) == ["harvest", "geo", "caption", "clip", "filter", "dedup",
                                                     "curate"]
    by = {(r["stage"], r["source"]): r for r in funnel}
    for row in funnel:
        assert row["in"] == row["kept"] + row["dropped"], row
        assert row["dropped"] == sum(row["dropped_by_reason"].values()), row
    order = ["harvest", "geo", "caption", "clip", "filter", "dedup", "curate"]
    for before, after in itertools.pairwise(order):
        for (stage, source), row in by.items():
            if stage == after:
                prev = by[before, source]
                assert row["in"] == prev["kept"] + prev["added"], (before, after, source)
    # the counts are those of the files: final rows, and every dropped row is in curated/rejected
    final = read_rows(dirs["curate"])
    assert len(final) == sum(r["kept"] + r["added"] for r in funnel if r["stage"] == "curate")
    rejected = read_rows(dirs["curate"], "rejected")
    for stage in order[1:]:
        assert sum(1 for r in rejected if r["stage"] == stage) == sum(r["dropped"] for r in funnel
                                                                      if r["stage"] == stage)
    assert any(r["reason"] == "below_top_percent" for r in rejected)  # the filter did drop something


def _direct_model() -> tuple[Any, Any, Any]:
    """The same tiny model built straight with open_clip (same config, same seed)."""
    import open_clip
    import torch

    open_clip.add_model_config(str(CLIP_TINY))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("clip-tiny-test", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("clip-tiny-test")


def test_scores_equal_a_direct_open_clip_computation(sample_curation: Path) -> None:
    import torch
    from PIL import Image

    from pipeline.curation.dedup import perceptual_hash

    dirs = _dirs(sample_curation)
    rows = read_rows(dirs["clip"])
    images = _images(dirs["harvest"])
    model, preprocess, tokenizer = _direct_model()
    embeddings = {r["image_key"]: r for r in read_rows(dirs["clip"], "embeddings")}
    assert len(rows) > 50
    for row in rows:
        with torch.no_grad():
            pixels = preprocess(Image.open(io.BytesIO(images[row["image_key"]])).convert("RGB"))[None]
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0]
            text = torch.nn.functional.normalize(model.encode_text(tokenizer([row["caption"]])), dim=-1)[0]
        assert abs(float(image @ text) - row["clip_score"]) < 1e-5, row["key"]
        stored = embeddings[row["image_key"]]
        assert np.allclose(np.frombuffer(stored["embedding"], "<f2"), image.numpy(), atol=2e-3)
        assert stored["phash"] == perceptual_hash(images[row["image_key"]])
        assert row["clip_model"] == "clip-tiny-test/random-init-seed0"


def test_places_on_the_sample(sample_curation: Path) -> None:
    import h3

    rows = {r["key"]: r for r in read_rows(_dirs(sample_curation)["geo"])}
    expected = {"aerial-korea": ("KOR", "Asia"), "naip-north-dakota": ("USA", "North America"),
                "landsat8-greenland": ("GRL", "North America"), "sentinel2-mauritania": ("MRT", "Africa"),
                "usgs-hro-colorado": ("USA", "North America")}
    for source, (iso3, continent) in expected.items():
        found = [r for r in rows.values() if r["source"] == source]
        places = {(r["country_iso3"], r["continent"]) for r in found}
        if source == "landsat8-greenland":  # the scene reaches into Baffin Bay, beyond geo.max_sea_km
            assert places == {(iso3, continent), (None, None)}
        else:
            assert places == {(iso3, continent)}, source
        assert all(h3.get_resolution(r["h3_cell"]) == 9 for r in found)
    for r in rows.values():
        if r["lon"] is None:
            assert r["country_iso3"] is None and r["h3_cell"] is None
        assert r["image_key"] == r["key"]


def test_captions_come_from_the_assigned_captioner(sample_curation: Path) -> None:
    rows = read_rows(_dirs(sample_curation)["caption"])
    for r in rows:
        assert r["caption"]
        if r["source"] in ("rsicd", "ucm-captions", "sydney-captions"):
            assert r["caption_source"] == "source" and r["caption"] in r["captions"]
        else:
            assert r["caption_source"] == "template" and " m " in r["caption"]
    korea = next(r for r in rows if r["source"] == "aerial-korea")
    assert "Korea" in korea["caption"]


def test_rerun_keeps_every_shard_and_changes_no_byte(sample_curation: Path) -> None:
    dirs = _dirs(sample_curation)
    before = {s: _digests(d) for s, d in dirs.items() if s != "harvest"}
    curate(sample_curation)
    assert {s: _digests(d) for s, d in dirs.items() if s != "harvest"} == before
    progress = Path(yaml.safe_load(sample_curation.read_text())["curation"]["work_dir"]) / "progress"
    assert not list(progress.rglob("*.done")) and list(progress.rglob("*.skipped"))


def test_fresh_run_with_warm_cache_embeds_nothing_and_writes_the_same_bytes(
        sample_curation: Path, sample_harvest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.curation.clip as clip

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("embedded although every embedding is cached")

    monkeypatch.setattr(clip, "embed_images", refuse)
    monkeypatch.setattr(clip, "embed_texts", refuse)
    cache = yaml.safe_load(sample_curation.read_text())["clip"]["cache_dir"]
    params = curation_params(tmp_path, sample_harvest, clip={"cache_dir": cache})
    curate(params)
    first, second = _dirs(sample_curation), _dirs(params)
    for stage in ("geo", "caption", "clip", "filter", "dedup", "curate"):
        assert _digests(first[stage]) == _digests(second[stage]), stage


def test_one_sample_per_sentence(sample_harvest: Path, tmp_path: Path) -> None:
    params = curation_params(tmp_path, sample_harvest, caption={"sentences": "all"})
    curate(params, ("geo", "caption", "clip", "filter", "dedup"))
    rows = read_rows(_dirs(params)["caption"])
    rsicd = [r for r in rows if r["source"] == "rsicd"]
    assert len(rsicd) == 5 * len({r["image_key"] for r in rsicd})
    assert {r["key"] for r in rsicd} >= {f"{r['image_key']}-c4" for r in rsicd}
    # siblings share an image, yet dedup never treats them as copies of each other
    dropped = read_rows(_dirs(params)["dedup"], "rejected")
    assert not [d for d in dropped if d["duplicate_of"] == d["image_key"]]


def test_filter_rules_and_cell_cap(sample_harvest: Path, tmp_path: Path) -> None:
    params = curation_params(tmp_path, sample_harvest, filter={"min_score": 0.99, "top_percent": None})
    metrics = curate(params, ("geo", "caption", "clip", "filter"))
    assert metrics["filter"]["kept"] == 0 and metrics["filter"]["by_reason"] == {
        "below_min_score": metrics["filter"]["in"]}
    params = curation_params(tmp_path / "b", sample_harvest, filter={"top_percent": 50},
                             curate={"max_per_cell": 2, "h3_resolution": 3})
    curate(params)
    rows = read_rows(_dirs(params)["curate"])
    cells: dict[tuple[Any, Any], int] = {}
    import h3

    for r in rows:
        if r["h3_cell"]:
            k = (h3.cell_to_parent(r["h3_cell"], 3), r["level"])
            cells[k] = cells.get(k, 0) + 1
    assert cells and max(cells.values()) <= 2
    rejected = read_rows(_dirs(params)["curate"], "rejected")
    assert any(r["reason"] == "over_cell_cap" for r in rejected)
    kept = [r for r in read_rows(_dirs(params)["filter"])]
    by_group: dict[tuple[str, Any], list[float]] = {}
    for r in read_rows(_dirs(params)["clip"]):
        by_group.setdefault((r["source"], r["level"]), []).append(r["clip_score"])
    for (source, level), scores in by_group.items():
        n_kept = sum(1 for r in kept if (r["source"], r["level"]) == (source, level))
        assert n_kept >= int(np.ceil(len(scores) / 2)), (source, level)


@pytest.mark.parametrize("stage", ["clip", "filter"])
def test_interrupted_stage_redoes_only_missing_shards(sample_curation: Path, stage: str) -> None:
    """A crash leaves some shards uncommitted (metadata is written last): the re-run redoes only those."""
    dirs = _dirs(sample_curation)
    before = _digests(dirs[stage])
    lost = sorted((dirs[stage] / "metadata").glob("*.parquet"))[:3]
    for path in lost:
        path.unlink()
    (dirs[stage] / "metadata" / f".{lost[0].name}.tmp-crashed").write_bytes(b"half a file")
    curate(sample_curation, (stage,))
    assert _digests(dirs[stage]) == before
    progress = Path(yaml.safe_load(sample_curation.read_text())["curation"]["work_dir"]) / "progress" / stage
    assert sorted(p.stem for p in progress.glob("*.done")) == sorted(p.stem for p in lost)
    assert not list((dirs[stage] / "metadata").glob(".*"))
