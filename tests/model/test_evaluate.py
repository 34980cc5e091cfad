"""Evaluation: the test set and level chips from the published sample, decontamination by sha256 and
perceptual hash, and a whole (tiny, injected-extractor) evaluation whose report labels every number."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.eval_params import EvaluateParams
from model.evalsets import EvalSample, class_of, evaluation_samples, iter_shard, level_chips, read_images


class PoolFeatures(torch.nn.Module):
    """A small injected feature extractor: 4x4 average-pooled colour (48 features), as tests may use offline."""

    name = "test-pool4x4"
    num_features = 48

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1).double()


class PoolClip(PoolFeatures):
    name = "test-pool-clip"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(super().forward(images), dim=1)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rng = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(48) for t in texts]
        return np.stack([v / np.linalg.norm(v) for v in rng])


def test_class_comes_from_the_scene_class_else_the_first_keyword() -> None:
    keywords = {"playground": ["football field", "playground"], "farmland": ["field"]}
    assert class_of("airport", "a football field", keywords) == "airport"
    assert class_of(None, "A Football Field near houses", keywords) == "playground"
    assert class_of(None, "a green field", keywords) == "farmland"
    assert class_of(None, "open water", keywords) is None


def test_test_samples_and_level_chips_come_from_the_published_release(published: str) -> None:
    keywords = {"playground": ["football field", "playground"], "bridge": ["bridge"]}
    test = evaluation_samples(published, "test", 100, seed=0, keywords=keywords)
    assert test and all(s.caption for s in test)
    assert test == evaluation_samples(published, "test", 100, seed=0, keywords=keywords)  # seeded order
    assert {s.key for s in evaluation_samples(published, "test", 2, seed=0, keywords=keywords)} <= {s.key for s in test}
    assert {s.label for s in test} <= {"playground", "bridge", None}
    chips = level_chips(published, [10, 15, 17], per_level=3, seed=0, exclude_split="test")
    counts = {lv: sum(c.level == lv for c in chips) for lv in (10, 15, 17)}
    assert all(0 < n <= 3 for n in counts.values()), counts
    with_images = read_images(published, chips[:4], size=64)
    assert all(s.image is not None and s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
               for s in with_images)
    with pytest.raises(Exception, match="no captioned samples in split 'nonesuch'"):
        evaluation_samples(published, "nonesuch", 10, seed=0, keywords={})


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _textured(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((64, 64), Image.Resampling.BICUBIC))


def _shard(path: Path, samples: list[tuple[str, bytes, dict[str, Any]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, data, meta in samples:
            for ext, payload in (("jpg", data), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_decontamination_removes_exact_and_near_copies_in_training_splits(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import model.decontaminate as deco
    from model.config import TrainParams
    from model.data import sample_filter

    images = [_textured(s) for s in range(4)]
    encoded = [_jpeg(im) for im in images]
    test = [EvalSample(key=f"t{i}", shard="x", caption="c", level=15, sha256=hashlib.sha256(encoded[i]).hexdigest(),
                       image=np.asarray(Image.open(io.BytesIO(encoded[i])).convert("RGB"))) for i in range(4)]
    shard = _shard(tmp_path / "train-000000.tar", [
        ("a", encoded[0], {"split": "train"}),                       # the same bytes: exact
        ("b", _jpeg(np.clip(images[1].astype(int) + 3, 0, 255).astype(np.uint8), 90), {"split": "train"}),  # near
        ("c", encoded[2], {"split": "test"}),                        # a copy, but not trained on
        ("d", _jpeg(_textured(99)), {"split": "train"}),             # unrelated
    ])
    params = TrainParams.model_validate({"shards": shard})
    kept, report = deco.decontaminate(test, [shard], lambda row: sample_filter(row, params), max_hamming=4,
                                      cache_dir=str(tmp_path / "cache"))
    assert [s.key for s in kept] == ["t2", "t3"]
    assert (report["removed"], report["removed_exact"], report["removed_near"]) == (2, 1, 1)
    assert report["removed_keys"] == ["t0", "t1"] and report["checked"] == 4

    def no_reading(url: str) -> Any:
        raise AssertionError(f"{url} read again despite the cache")

    monkeypatch.setattr(deco, "iter_shard", no_reading)
    again, report_again = deco.decontaminate(test, [shard], lambda row: sample_filter(row, params), max_hamming=4,
                                             cache_dir=str(tmp_path / "cache"))
    assert [s.key for s in again] == ["t2", "t3"] and report_again == report


def test_iter_shard_groups_files_by_key(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s.tar", [("k1", b"\xff\xd8a", {"n": 1}), ("k2", b"\xff\xd8b", {"n": 2})])
    assert [(k, d, json.loads(m or b"{}")["n"]) for k, d, m in iter_shard(shard)] == [
        ("k1", b"\xff\xd8a", 1), ("k2", b"\xff\xd8b", 2)]


@pytest.mark.slow
def test_a_tiny_evaluation_labels_every_metric_with_its_extractor(published: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import model.metrics as metrics
    from model.config import TrainParams
    from model.evaluate import evaluate, summary_line
    from tests.model.test_pipeline import _components, _pipeline

    model_dir = tmp_path / "model"
    _pipeline(**_components()).save_pretrained(model_dir)
    monkeypatch.setattr(metrics, "inception_extractor", lambda *a, **k: PoolFeatures())
    monkeypatch.setattr(metrics, "clip_extractor", lambda *a, **k: PoolClip())
    params = EvaluateParams.model_validate({
        "model_dir": str(model_dir), "published_dir": published, "images_per_caption": 2, "steps": 2,
        "batch_size": 4, "kid_subset_size": 4, "kid_subsets": 5, "levels": [10, 15, 17, 18],
        "min_chips_per_level": 3, "max_chips_per_level": 6, "images_per_level": 2,
        "class_keywords": {"playground": ["football field", "playground"], "other": [" "]},
        "classifier": {"epochs": 1, "image_size": 32, "batch_size": 8},
        "level_classifier": {"epochs": 1, "image_size": 32, "batch_size": 8},
        "cache_dir": str(tmp_path / "cache"), "device": "cpu"})
    train = TrainParams.model_validate({"shards": f"{published}/shards/*.tar", "resolution": 64})
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        report = evaluate(params, train, work_dir=str(tmp_path / "work"), plot_dir=str(tmp_path / "metrics"))
    for name in ("fid", "kid", "cls_oa", "clip_score", "cmmd", "level_accuracy"):
        assert isinstance(report[name]["value"], float), (name, report[name])
        assert report[name]["extractor"], name
    assert report["fid"]["extractor"] == "test-pool4x4" and report["cmmd"]["extractor"] == "test-pool-clip"
    assert 0 <= report["cls_oa"]["value"] <= 100 and 0 <= report["level_accuracy"]["value"] <= 100
    assert report["level_accuracy"]["levels"] == [10, 15, 17, 18]
    assert np.asarray(report["level_accuracy"]["confusion"]).sum() == 4 * 2
    assert report["decontamination"]["checked"] == report["test_set"]["captions"] + report["decontamination"]["removed"]
    for plot in ("eval_levels.png", "eval_level_confusion.png", "eval_samples.png"):
        assert (tmp_path / "metrics" / plot).stat().st_size > 1000
    json.dumps(report)  # the report is JSON as written
    assert "FID" in summary_line(report) and not (tmp_path / "work" / "generated.npy").exists()
