"""The training stream on the published sample shards: batch layout, filters, node/worker split, augmentation that
keeps the GSD honest, and resume-exactness (a stream started at batch k equals an uninterrupted run from k on)."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.config import NULL_LEVEL, TrainParams, gsd_level
from model.data import augment, expand_shards, sample_filter, sample_month, training_stream
from pipeline.errors import ParamsError

BUFFER = 48  # small shuffle buffer: the sample has 115 chips


class OpenClipTokenizer:
    """Stand-in with the transformers call convention until `model.tokenizer.clip_tokenizer` exists."""

    def __init__(self) -> None:
        import open_clip

        self.tokenize = open_clip.get_tokenizer("ViT-B-32")

    def __call__(self, text: list[str], *, padding: str, truncation: bool, max_length: int,
                 return_tensors: str) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenize(text, context_length=max_length)}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    try:
        from model.tokenizer import clip_tokenizer
    except ImportError:
        return OpenClipTokenizer()
    return clip_tokenizer()


@pytest.fixture(scope="module")
def shards(published: str) -> list[str]:
    return sorted(glob(f"{published}/shards/git10m-*.tar"))


@pytest.fixture(scope="module")
def metadata(shards: list[str]) -> dict[str, dict[str, Any]]:
    """key -> the sample's json row, with the shard it sits in."""
    rows = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    file = tar.extractfile(member)
                    assert file is not None
                    rows[member.name[:-5]] = {**json.loads(file.read()), "_shard": shard}
    return rows


def make_params(published: str, **overrides: Any) -> TrainParams:
    values: dict[str, Any] = {"shards": f"{published}/shards/git10m-*.tar", "batch_size": 4, "num_workers": 0,
                              "splits": ["train", "val", "test"], "checkpoint_every": 3}
    return TrainParams(**{**values, **overrides})


def take(params: TrainParams, tokenizer: Any, count: int, **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("seed", 7)
    return list(itertools.islice(training_stream(params, tokenizer, shuffle_buffer=BUFFER, **kwargs), count))


def assert_same_batches(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a["key"] == b["key"]
        for name in ("pixel_values", "input_ids", "level", "gsd_m", "lon", "lat", "month"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


def test_batches_have_the_trainer_layout(published: str, tokenizer: Any, metadata: dict[str, Any]) -> None:
    batches = take(make_params(published), tokenizer, 6)
    for batch in batches:
        pixels = batch["pixel_values"]
        assert pixels.shape == (4, 3, 256, 256) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == torch.long
        for name in ("level", "gsd_m", "lon", "lat", "month"):
            assert batch[name].shape == (4,)
        assert batch["level"].dtype == torch.long
        for i, key in enumerate(batch["key"]):
            row = metadata[key]
            # 256-pixel chips at resolution 256: crop/flip only, the published level and GSD pass through
            assert batch["level"][i] == row["level"]
            gsd = batch["gsd_m"][i].item()
            assert math.isnan(gsd) if row["gsd_m"] is None else gsd == pytest.approx(row["gsd_m"], rel=1e-6)
            assert (row["level"] == NULL_LEVEL) == (row["gsd_m"] is None)
            lon = batch["lon"][i].item()
            assert math.isnan(lon) if row["lon"] is None else lon == pytest.approx(row["lon"], abs=1e-4)
            month = batch["month"][i].item()
            assert math.isnan(month) if not row.get("acquired") else month == int(row["acquired"][5:7])
    every = torch.cat([b["pixel_values"] for b in batches])
    assert every.min() < -0.5 and every.max() > 0.5  # really spans the range, not a constant
    assert torch.cat([b["level"] for b in batches]).unique().numel() > 1


def test_captions_are_tokenised_from_the_txt(published: str, tokenizer: Any, metadata: dict[str, Any]) -> None:
    batch = take(make_params(published), tokenizer, 1)[0]
    expected = tokenizer([metadata[k]["caption"] for k in batch["key"]], padding="max_length", truncation=True,
                         max_length=77, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["input_ids"], torch.as_tensor(expected))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(published: str, tokenizer: Any, num_workers: int) -> None:
    params = make_params(published, num_workers=num_workers)  # segments of 3 batches
    full = take(params, tokenizer, 10)
    for start in (4, 6, 7):  # mid-segment, on a boundary, and one whose stream offset differs with 2 workers
        assert_same_batches(take(params, tokenizer, 10 - start, start_step=start), full[start:])
    assert len({k for b in full for k in b["key"]}) > 20  # the segments really draw different samples


def test_segment_follows_checkpoints_and_accumulation(published: str, tokenizer: Any) -> None:
    params = make_params(published, checkpoint_every=2, gradient_accumulation_steps=2)  # 4 batches per segment
    full = take(params, tokenizer, 6)
    assert_same_batches(take(params, tokenizer, 2, start_step=4), full[4:])
    assert_same_batches(take(params, tokenizer, 3, start_step=3), full[3:])


def test_seed_changes_the_stream(published: str, tokenizer: Any) -> None:
    params = make_params(published)
    assert_same_batches(take(params, tokenizer, 3, seed=1), take(params, tokenizer, 3, seed=1))
    assert [b["key"] for b in take(params, tokenizer, 3, seed=1)] != [b["key"] for b in take(params, tokenizer, 3,
                                                                                             seed=2)]


def test_split_filter_keeps_only_the_listed_splits(published: str, tokenizer: Any,
                                                   metadata: dict[str, Any]) -> None:
    for splits in (["val"], ["train", "test"]):
        batches = take(make_params(published, splits=splits), tokenizer, 8)
        seen = {metadata[k]["split"] for b in batches for k in b["key"]}
        assert seen <= set(splits)
    assert {metadata[k]["split"] for b in take(make_params(published, splits=["val"]), tokenizer, 8)
            for k in b["key"]} == {"val"}


def test_min_clip_score_filter(published: str, tokenizer: Any, metadata: dict[str, Any]) -> None:
    threshold = float(np.median([row["clip_score"] for row in metadata.values()]))
    batches = take(make_params(published, min_clip_score=threshold), tokenizer, 8)
    scores = [metadata[k]["clip_score"] for b in batches for k in b["key"]]
    assert min(scores) >= threshold


def test_a_filter_that_keeps_nothing_names_the_params(published: str, tokenizer: Any) -> None:
    with pytest.raises(ParamsError, match="min_clip_score"):
        take(make_params(published, min_clip_score=1e9), tokenizer, 1)


def test_sample_filter_rules() -> None:
    params = TrainParams(splits=["train"], min_clip_score=0.2)
    assert sample_filter({"split": "train", "clip_score": 0.3}, params)
    assert not sample_filter({"split": "val", "clip_score": 0.3}, params)
    assert not sample_filter({"split": "train", "clip_score": 0.1}, params)
    assert not sample_filter({"split": "train", "clip_score": None}, params)  # unscored: not in a quality subset
    assert sample_filter({"clip_score": 0.3}, params)  # harvest rows have no split yet: train
    assert sample_filter({"split": "train"}, TrainParams(splits=["train"]))


def test_ranks_read_disjoint_shards(published: str, tokenizer: Any, metadata: dict[str, Any],
                                   shards: list[str]) -> None:
    params = make_params(published)
    rank_keys = [{k for b in take(params, tokenizer, 8, rank=r, world_size=2) for k in b["key"]} for r in (0, 1)]
    assert rank_keys[0] and rank_keys[1] and not rank_keys[0] & rank_keys[1]
    for rank, keys in enumerate(rank_keys):
        assert {metadata[k]["_shard"] for k in keys} <= set(shards[rank::2])


def test_workers_split_the_rank_shards(published: str, tokenizer: Any, metadata: dict[str, Any],
                                       shards: list[str]) -> None:
    batches = take(make_params(published, num_workers=2), tokenizer, 6)
    for n, batch in enumerate(batches):  # batch n comes from worker stream n % 2, which owns shards[n % 2::2]
        assert {metadata[k]["_shard"] for k in batch["key"]} <= set(shards[n % 2::2])


def test_resize_updates_gsd_and_level_in_the_batch(published: str, tokenizer: Any,
                                                   metadata: dict[str, Any]) -> None:
    batch = take(make_params(published, resolution=512), tokenizer, 3)
    for b in batch:
        assert b["pixel_values"].shape == (4, 3, 512, 512)
        for i, key in enumerate(b["key"]):
            row = metadata[key]
            if row["gsd_m"] is None:
                assert b["level"][i] == NULL_LEVEL and math.isnan(b["gsd_m"][i].item())
            else:  # upsampled 2x: half the GSD, one level finer
                assert b["gsd_m"][i].item() == pytest.approx(row["gsd_m"] / 2, rel=1e-6)
                assert b["level"][i] == gsd_level(row["gsd_m"] / 2)


def chip(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_crop_and_flip_keep_the_gsd() -> None:
    image = chip(300, 280)
    out = augment(image, resolution=256, gsd_m=10.0, level=14, draws=np.array([0.999, 0.0, 0.9, 0.9]))
    assert out.gsd_m == 10.0 and out.level == 14
    np.testing.assert_array_equal(out.image, image[44:300, 0:256])  # bottom-left crop, no flip
    flipped = augment(image, resolution=256, gsd_m=10.0, level=14, draws=np.array([0.0, 0.5, 0.1, 0.1]))
    np.testing.assert_array_equal(flipped.image, image[0:256, 12:268][::-1, ::-1])
    assert flipped.gsd_m == 10.0 and flipped.level == 14
    same = augment(chip(256, 256), resolution=256, gsd_m=0.5, level=18, draws=np.array([0.7, 0.3, 0.9, 0.9]))
    np.testing.assert_array_equal(same.image, chip(256, 256))


def test_resize_scales_gsd_and_recomputes_level() -> None:
    out = augment(chip(128, 128), resolution=256, gsd_m=8.0, level=14, draws=np.full(4, 0.9))
    assert out.image.shape == (256, 256, 3) and out.image.dtype == np.uint8
    assert out.gsd_m == 4.0 and out.level == 15
    unknown = augment(chip(128, 160), resolution=256, gsd_m=math.nan, level=NULL_LEVEL, draws=np.full(4, 0.3))
    assert unknown.image.shape == (256, 256, 3) and unknown.level == NULL_LEVEL and math.isnan(unknown.gsd_m)
    nominal = augment(chip(64, 64), resolution=256, gsd_m=math.nan, level=12, draws=np.full(4, 0.3))
    assert nominal.level == 14 and math.isnan(nominal.gsd_m)  # 4x finer from the level's nominal GSD


def test_month_from_acquired() -> None:
    assert sample_month({"acquired": "2019-09-04"}) == 9
    assert sample_month({"acquired": "2021-12-31T10:00:00Z"}) == 12
    assert math.isnan(sample_month({"acquired": None}))
    assert math.isnan(sample_month({"acquired": "2019"}))


def test_missing_shards_name_the_param(tmp_path: Any) -> None:
    with pytest.raises(ParamsError, match=r"train\.shards"):
        expand_shards(str(tmp_path / "none-{000000..000001}.tar"))
    with pytest.raises(ParamsError, match=r"train\.shards"):
        expand_shards(str(tmp_path / "*.tar"))
    listing = tmp_path / "shards.txt"
    (tmp_path / "a.tar").write_bytes(b"")
    listing.write_text(f"{tmp_path / 'a.tar'}\n\n")
    assert expand_shards(str(listing)) == [str(tmp_path / "a.tar")]


def test_a_one_sample_shard_drawn_again_and_again_streams(published: str, tokenizer: Any, tmp_path: Any) -> None:
    """Resampling draws the same shard twice in a row; its sample must not merge with itself (duplicate files)."""
    source = sorted(Path(published, "shards").glob("git10m-*.tar"))[0]
    with tarfile.open(source) as tar:
        members = tar.getmembers()
        key = members[0].name.split(".", 1)[0]
        files = [(m, tar.extractfile(m).read()) for m in members if m.name.split(".", 1)[0] == key]  # type: ignore[union-attr]
    single = tmp_path / "one-000000.tar"
    with tarfile.open(single, "w") as out:
        for member, data in files:
            out.addfile(member, io.BytesIO(data))
    batches = take(make_params(str(tmp_path), shards=str(single)), tokenizer, 3)
    assert [k for b in batches for k in b["key"]] == [key] * 12
