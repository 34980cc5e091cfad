"""Inpainting masks: random training masks (shapes, ranges, variety, determinism) and user mask images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.masks import (
    MASK_KINDS,
    MaskError,
    blob_mask,
    box_mask,
    load_mask,
    mask_array,
    random_mask,
    random_masks,
    stroke_mask,
)


def _coverages(draw: object, count: int = 200, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.array([draw(rng, size, size).mean() for _ in range(count)])  # type: ignore[operator]


@pytest.mark.parametrize("draw", [box_mask, stroke_mask, blob_mask])
def test_each_kind_is_a_float_mask_in_zero_one_with_varied_coverage(draw: object) -> None:
    rng = np.random.default_rng(0)
    mask = draw(rng, 48, 80)  # type: ignore[operator]
    assert mask.shape == (48, 80) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    coverage = _coverages(draw)
    assert coverage.min() > 0.0  # never empty
    assert coverage.max() < 0.8  # never the whole chip
    assert coverage.std() > 0.02  # sizes vary


def test_boxes_and_strokes_are_hard_blobs_are_soft() -> None:
    rng = np.random.default_rng(2)
    for draw in (box_mask, stroke_mask):
        assert set(np.unique(draw(rng, 64, 64))) <= {0.0, 1.0}
    soft = np.mean([((m > 0) & (m < 1)).mean() for m in (blob_mask(rng, 64, 64) for _ in range(50))])
    assert soft > 0.05  # cloud edges (and semi-transparent clouds) are partial
    peaks = [blob_mask(rng, 64, 64).max() for _ in range(60)]
    assert min(peaks) < 0.99 and max(peaks) == 1.0  # some clouds are thin all over


def test_random_masks_mix_kinds_are_seeded_and_sometimes_full() -> None:
    masks = random_masks(np.random.default_rng(3), 64, 32, 32)
    assert masks.shape == (64, 1, 32, 32) and masks.dtype == np.float32
    coverage = masks.mean(axis=(1, 2, 3))
    assert (coverage > 0).all() and 0.0 <= masks.min() and masks.max() <= 1.0
    assert (coverage == 1.0).any()  # p_full: plain generation
    assert coverage.min() < 0.1 and np.median(coverage) < 0.6  # small and large holes
    np.testing.assert_array_equal(masks, random_masks(np.random.default_rng(3), 64, 32, 32))
    assert not np.array_equal(masks, random_masks(np.random.default_rng(4), 64, 32, 32))
    assert not random_masks(np.random.default_rng(3), 32, 32, 32, p_full=0.0).mean(axis=(1, 2, 3)).max() == 1.0


def test_random_mask_kinds_are_checked() -> None:
    boxes = random_mask(np.random.default_rng(5), 32, 32, kinds=["box"], max_shapes=1, p_full=0.0)
    assert set(np.unique(boxes)) == {0.0, 1.0}
    assert set(MASK_KINDS) == {"box", "stroke", "blob"}
    with pytest.raises(ValueError, match="subset"):
        random_mask(np.random.default_rng(0), 32, 32, kinds=["cloud"])  # type: ignore[list-item]


def test_load_mask_reads_greyscale_pngs_as_soft_masks(tmp_path: Path) -> None:
    values = np.array([[0, 64, 128, 255]] * 4, np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_allclose(load_mask(tmp_path / "grey.png"), values / 255.0, atol=1e-6)
    Image.fromarray(values > 100).save(tmp_path / "bits.png")  # 1-bit PNG
    np.testing.assert_array_equal(load_mask(tmp_path / "bits.png"), (values > 100).astype(np.float32))
    Image.fromarray((values.astype(np.uint16) * 257), mode="I;16").save(tmp_path / "deep.png")
    np.testing.assert_allclose(load_mask(tmp_path / "deep.png"), values / 255.0, atol=1e-4)
    Image.fromarray(np.repeat(values[..., None], 3, axis=2)).save(tmp_path / "grey-rgb.png")  # grey saved as RGB
    np.testing.assert_allclose(load_mask(tmp_path / "grey-rgb.png"), values / 255.0, atol=1e-6)


def test_load_mask_resizes_the_same_aspect_ratio_only(tmp_path: Path) -> None:
    big = np.zeros((128, 256), np.uint8)
    big[:, 128:] = 255
    Image.fromarray(big).save(tmp_path / "big.png")
    small = load_mask(tmp_path / "big.png", (64, 32))  # (width, height)
    assert small.shape == (32, 64)
    assert small[:, :30].max() == 0.0 and small[:, 34:].min() == 1.0
    with pytest.raises(MaskError, match=r"256x128 but the image is 64x64"):
        load_mask(tmp_path / "big.png", (64, 64))


def test_bad_masks_name_the_problem(tmp_path: Path) -> None:
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(tmp_path / "red.png")
    with pytest.raises(MaskError, match="greyscale"):
        load_mask(tmp_path / "red.png")
    with pytest.raises(MaskError, match="not found"):
        load_mask(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match="not a readable image"):
        load_mask(tmp_path / "junk.png")
    with pytest.raises(MaskError, match=r"0\.\.1"):
        mask_array(np.full((4, 4), 2.0))
    with pytest.raises(MaskError, match="H x W"):
        mask_array(np.zeros((2, 4, 4)))


def test_mask_arrays_of_common_shapes_and_types() -> None:
    hard = np.zeros((8, 8), bool)
    hard[2:5] = True
    np.testing.assert_array_equal(mask_array(hard), hard.astype(np.float32))
    np.testing.assert_array_equal(mask_array(hard[None, None].astype(np.uint8) * 255), hard.astype(np.float32))
    np.testing.assert_array_equal(mask_array(hard[..., None].astype(np.float32) * 0.5), hard * 0.5)
