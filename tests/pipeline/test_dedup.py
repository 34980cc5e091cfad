"""Exact and near-duplicate search on real sample chips, synthetic uniform scenes and a 20,000-image group."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

import imagehash
import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.windows import Window

from pipeline.curation import dedup
from pipeline.curation.dedup import DedupImage, exact_duplicates, near_duplicates, perceptual_hash, phash_distance
from tests.conftest import SAMPLE

MAX_HAMMING, MIN_COSINE, MAX_OFFSET = 6, 0.95, 0.25
DIM = 512
UCM_WIDTH_M = 256 * 0.3048  # UC Merced chips: 256 px at one foot
KOREA_CENTRE = (128.65814, 37.6686)  # manifest centre of the Korea aerial scene; our window is centred on it
KOREA_WIDTH_M = 256 * 0.597


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _ucm(i: int) -> Image.Image:
    with Image.open(SAMPLE / "captioned" / "ucm" / "images" / f"{i}.tif") as image:
        return image.convert("RGB")


def _korea_chip() -> Image.Image:
    with rasterio.open(SAMPLE / "geotiff" / "aerial_korea_webmercator_rgb_0p6m.tif") as ds:
        data = ds.read(window=Window(384, 384, 256, 256))
    return Image.fromarray(np.moveaxis(data, 0, -1))


def _unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(DIM)
    return (vector / np.linalg.norm(vector)).astype(np.float16)


def _perturbed(embedding: np.ndarray, rng: np.random.Generator, size: float = 0.1) -> np.ndarray:
    """A copy's embedding: the original plus noise of total norm `size`, re-normalised (cosine ≈ 1 - size²/2)."""
    noisy = embedding.astype(np.float32) + rng.standard_normal(embedding.size) * size / np.sqrt(embedding.size)
    return (noisy / np.linalg.norm(noisy)).astype(np.float16)


def _image(key: str, phash: int, embedding: np.ndarray, where: tuple[float, float] | None = None,
           width: float | None = UCM_WIDTH_M, rank: float = 0.0) -> DedupImage:
    lon, lat = where if where is not None else (None, None)
    return DedupImage(key, phash, embedding, lon, lat, width if where is not None else None, (rank, key))


def _near(images: list[DedupImage]) -> list[tuple[str, str]]:
    return near_duplicates(images, MAX_HAMMING, MIN_COSINE, MAX_OFFSET)


def _resized(image: Image.Image) -> bytes:
    return _encode(image.resize((250, 250), Image.Resampling.BICUBIC).resize((256, 256), Image.Resampling.BICUBIC),
                   "JPEG", quality=90)


COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg_q70": lambda image: _encode(Image.open(io.BytesIO(_encode(image, "JPEG", quality=95))), "JPEG", quality=70),
    "resized_250": _resized,
    "png": lambda image: _encode(image, "PNG"),
}


def _flat_chip(rgb: tuple[int, int, int], seed: int) -> bytes:
    """A near-constant 'open water' / 'sand' chip: faint noise that JPEG and the phash resize flatten away."""
    rng = np.random.default_rng(seed)
    pixels = np.array(rgb, dtype=float) + rng.normal(0.0, 0.5, (256, 256, 3))
    return _encode(Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)), "JPEG", quality=85)


# --- perceptual_hash -------------------------------------------------------------------------------------------


def test_perceptual_hash_is_imagehash_phash_as_signed_int64() -> None:
    chip = _encode(_ucm(1), "PNG")
    value = perceptual_hash(chip)
    assert value & ((1 << 64) - 1) == int(str(imagehash.phash(Image.open(io.BytesIO(chip)))), 16)
    flat = perceptual_hash(_flat_chip((30, 70, 120), 0))
    assert flat == -(1 << 63)  # only the DC bit set: 0x8000000000000000, the most negative int64
    assert phash_distance(flat, 0) == 1 and phash_distance(value, value) == 0
    assert -(1 << 63) <= value < (1 << 63)


@pytest.mark.parametrize("data", [b"", b"not an image", _encode(_ucm(2), "JPEG", quality=90)[:600]])
def test_perceptual_hash_rejects_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        perceptual_hash(data)


# --- near duplicates on real chips -------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_reencoded_copy_of_a_real_chip_is_a_duplicate(copy: str) -> None:
    rng = np.random.default_rng(1)
    where = (-120.5, 37.3)
    images, distances = [], []
    for i in range(1, 6):
        chip = _ucm(i)
        original, duplicate = _encode(chip, "JPEG", quality=95), COPIES[copy](chip)
        embedding = _unit(rng)
        place = (where[0] + i * 1e-3, where[1])  # chips ~90 m apart: neighbours, not copies
        images.append(_image(f"ucm{i}", perceptual_hash(original), embedding, place, rank=0))
        images.append(_image(f"ucm{i}_{copy}", perceptual_hash(duplicate), _perturbed(embedding, rng), place, rank=1))
        distances.append(phash_distance(images[-1].phash, images[-2].phash))
    assert max(distances) <= MAX_HAMMING, distances
    assert _near(images) == [(f"ucm{i}_{copy}", f"ucm{i}") for i in range(1, 6)]


def test_georeferenced_window_copies_are_one_component() -> None:
    rng = np.random.default_rng(2)
    chip = _korea_chip()
    embedding = _unit(rng)
    images = [_image("korea", perceptual_hash(_encode(chip, "JPEG", quality=95)), embedding, KOREA_CENTRE,
                     KOREA_WIDTH_M, rank=0)]
    for n, (name, make) in enumerate(sorted(COPIES.items()), start=1):
        shifted = (KOREA_CENTRE[0] + 2e-5, KOREA_CENTRE[1])  # ~2 m of georeferencing jitter
        images.append(_image(f"korea_{name}", perceptual_hash(make(chip)), _perturbed(embedding, rng), shifted,
                             KOREA_WIDTH_M, rank=n))
    assert _near(images) == sorted((f"korea_{name}", "korea") for name in COPIES)


def test_distinct_real_chips_are_not_merged_even_with_equal_embeddings() -> None:
    embedding = _unit(np.random.default_rng(3))
    images = [_image(f"ucm{i}", perceptual_hash(_encode(_ucm(i), "PNG")), embedding, (10.0, 50.0)) for i in range(1, 6)]
    assert _near(images) == []  # their hashes differ by 26-38 bits


# --- uniform scenes: the location test decides -------------------------------------------------------------------

WATER, SAND = (30, 70, 120), (214, 180, 128)


def _uniform_scenes(rng: np.random.Generator, places: list[tuple[float, float]]) -> list[DedupImage]:
    water_embedding, sand_embedding = _unit(rng), _unit(rng)
    images = []
    for n, place in enumerate(places):
        images.append(_image(f"water{n}", perceptual_hash(_flat_chip(WATER, n)),
                             _perturbed(water_embedding, rng, 0.05), place, 2560.0))
        images.append(_image(f"sand{n}", perceptual_hash(_flat_chip(SAND, 100 + n)),
                             _perturbed(sand_embedding, rng, 0.05), (place[0] + 0.5, place[1]), 2560.0))
    return images


def test_distinct_uniform_scenes_at_different_places_are_kept() -> None:
    images = _uniform_scenes(np.random.default_rng(4), [(-30.0, 40.0), (-29.9, 40.0), (-30.0, 40.1)])  # 8-11 km apart
    water = [image for image in images if image.key.startswith("water")]
    assert phash_distance(water[0].phash, water[1].phash) <= MAX_HAMMING  # the premise: hashes agree
    assert float(water[0].embedding.astype(np.float32) @ water[1].embedding.astype(np.float32)) > 0.99
    assert _near(images) == []


def test_same_uniform_scene_at_the_same_place_is_merged() -> None:
    images = _uniform_scenes(np.random.default_rng(5), [(-30.0, 40.0), (-30.0 + 3e-3, 40.0)])  # 256 m < 0.25 × 2560 m
    assert _near(images) == [("sand1", "sand0"), ("water1", "water0")]


def test_georeferenced_and_not_never_match_but_two_unlocated_copies_do() -> None:
    rng = np.random.default_rng(6)
    chip = _ucm(3)
    embedding = _unit(rng)
    original, png = perceptual_hash(_encode(chip, "JPEG", quality=95)), perceptual_hash(_encode(chip, "PNG"))
    located = _image("located", original, embedding, (5.0, 5.0), rank=0)
    loose_a = _image("loose_a", png, _perturbed(embedding, rng), None, rank=1)
    loose_b = _image("loose_b", original, _perturbed(embedding, rng), None, rank=2)
    assert _near([located, loose_a]) == []
    assert _near([located, loose_a, loose_b]) == [("loose_b", "loose_a")]


def test_cosine_threshold_separates_same_hash_different_content() -> None:
    rng = np.random.default_rng(7)
    images = [_image("a", 12345, _unit(rng)), _image("b", 12345, _unit(rng))]  # random 512-d: cosine ≈ 0
    assert _near(images) == []
    assert near_duplicates(images, MAX_HAMMING, -1.0, MAX_OFFSET) == [("b", "a")]


# --- components, ranks, order ----------------------------------------------------------------------------------


def test_kept_copy_is_the_best_rank_and_ties_go_to_the_smaller_key() -> None:
    rng = np.random.default_rng(8)
    embedding = _unit(rng)
    images = [_image(key, 99, _perturbed(embedding, rng), (1.0, 1.0), rank=rank)
              for key, rank in [("a", 0.5), ("b", -0.9), ("c", 0.1), ("d", -0.9)]]
    assert _near(images) == [("a", "b"), ("c", "b"), ("d", "b")]


def test_transitive_chain_is_one_component() -> None:
    rng = np.random.default_rng(9)
    embedding = _unit(rng)
    hashes = [0, 0b1111, 0b11111111, 0b111111111111]  # neighbours 4 bits apart, ends 12 bits apart
    images = [_image(f"k{i}", h, _perturbed(embedding, rng), (2.0 + i * 1e-4, 2.0), rank=-i)  # 11 m steps
              for i, h in enumerate(hashes)]
    assert phash_distance(hashes[0], hashes[3]) > MAX_HAMMING
    assert _near(images) == [("k0", "k3"), ("k1", "k3"), ("k2", "k3")]


def test_result_does_not_depend_on_input_order() -> None:
    rng = np.random.default_rng(10)
    images = _uniform_scenes(rng, [(0.0, 0.0), (1e-3, 0.0), (0.5, 0.0)])
    embedding = _unit(rng)
    images += [_image(f"c{i}", 7 << i, _perturbed(embedding, rng), (3.0, 3.0), rank=rng.random()) for i in range(6)]
    expected = _near(images)
    assert len(expected) == 7
    shuffler = random.Random(0)
    for _ in range(5):
        shuffler.shuffle(images)
        assert _near(images) == expected


def test_exact_duplicates_keep_the_best_rank() -> None:
    assert exact_duplicates([("x", (0.2, "x")), ("y", (-0.7, "y")), ("z", (0.0, "z"))]) == [("x", "y"), ("z", "y")]
    assert exact_duplicates([("b", (1,)), ("a", (1,))]) == [("b", "a")]
    assert exact_duplicates([("only", (0,))]) == [] and exact_duplicates([]) == []
    with pytest.raises(ValueError, match="more than once"):
        exact_duplicates([("x", (0,)), ("x", (1,))])


# --- scale and exactness of the banded search --------------------------------------------------------------------


def _flip(phash: int, bits: int) -> int:
    """`phash` with `bits` flipped, still a signed int64."""
    flipped = (phash ^ bits) & ((1 << 64) - 1)
    return flipped - (1 << 64) if flipped >= 1 << 63 else flipped


def _random_group(rng: np.random.Generator, n: int, planted: int, flat: int = 0) -> tuple[list[DedupImage], set]:
    """n random images in a ~10 km cell, `planted` copies of some of them, `flat` same-hash scenes 50+ m apart."""
    hashes = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64, endpoint=True)
    embeddings = rng.standard_normal((n + planted + flat, DIM), dtype=np.float32)
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float16)
    lon, lat = 20.0 + rng.random(n) * 0.1, -5.0 + rng.random(n) * 0.1
    images = [_image(f"r{i:06d}", int(hashes[i]), embeddings[i], (float(lon[i]), float(lat[i])), 76.8, rng.random())
              for i in range(n)]
    expected = set()
    for j, i in enumerate(rng.choice(n, planted, replace=False)):
        flips = sum(1 << int(b) for b in rng.choice(64, rng.integers(0, MAX_HAMMING + 1), replace=False))
        copy = _image(f"p{j:06d}", _flip(int(hashes[i]), flips), _perturbed(embeddings[i], rng),
                      (float(lon[i]) + 1e-4, float(lat[i])), 76.8, images[i].rank[0] + 1.0)  # ~11 m away, worse rank
        images.append(copy)
        expected.add((copy.key, images[i].key))
    flat_embedding = embeddings[-1]
    for k in range(flat):  # a huge bucket: uniform scenes sharing one hash, on a 50 m grid
        place = (21.0 + (k % 100) * 5e-4, -4.0 + (k // 100) * 5e-4)
        images.append(_image(f"f{k:06d}", -(1 << 63), _perturbed(flat_embedding, rng, 0.02), place, 76.8))
    return images, expected


def _haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * dedup.EARTH_RADIUS_M * math.asin(math.sqrt(h))


def _brute_force(images: list[DedupImage], max_hamming: int, min_cosine: float, offset: float) -> list[tuple[str, str]]:
    """Independent reference: every pair tested one by one (haversine distance), components by relabelling."""
    label = {image.key: image.key for image in images}
    for a_i, a in enumerate(images):
        for b in images[a_i + 1:]:
            if bin((a.phash ^ b.phash) & ((1 << 64) - 1)).count("1") > max_hamming:
                continue
            ea, eb = a.embedding.astype(np.float64), b.embedding.astype(np.float64)
            if ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb) < min_cosine:
                continue
            if a.georeferenced != b.georeferenced:
                continue
            if a.lon is not None and a.lat is not None and b.lon is not None and b.lat is not None:
                distance = _haversine_m(a.lon, a.lat, b.lon, b.lat)
                if distance > offset * max(a.ground_width_m or 0.0, b.ground_width_m or 0.0):
                    continue
            old, new = sorted([label[a.key], label[b.key]])[::-1]
            label = {key: new if value == old else value for key, value in label.items()}
    components: dict[str, list[DedupImage]] = {}
    for image in images:
        components.setdefault(label[image.key], []).append(image)
    pairs = []
    for members in components.values():
        kept = min(members, key=lambda image: (image.rank, image.key)).key
        pairs += [(image.key, kept) for image in members if image.key != kept]
    return sorted(pairs)


@pytest.mark.parametrize("dense_max", [0, 10**6], ids=["banded", "dense"])
def test_both_search_paths_match_brute_force(monkeypatch: pytest.MonkeyPatch, dense_max: int) -> None:
    rng = np.random.default_rng(11)
    images, _ = _random_group(rng, 300, 40, flat=60)
    base_hash = images[0].phash
    embedding, lon, lat = images[0].embedding, images[0].lon, images[0].lat
    assert lon is not None and lat is not None
    for i in range(30):  # a cloud of hashes and embeddings around one image: many borderline pairs
        flips = sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 10), replace=False))
        images.append(_image(f"cloud{i:02d}", _flip(base_hash, flips),
                             _perturbed(embedding, rng, rng.uniform(0.1, 0.5)),
                             (lon + rng.uniform(-3e-4, 3e-4), lat), 76.8, rng.random()))
    images += [_image(f"loose{i}", -(1 << 63) + i % 3, _perturbed(embedding, rng, 0.1), None) for i in range(6)]
    flat = _unit(rng)  # a line of flat scenes 5-15 m apart: same hash, or one bit off, mixed widths
    images += [_image(f"line{i:02d}", -(1 << 63) + (i % 4 == 0), _perturbed(flat, rng, 0.05),
                      (21.0 + i * rng.uniform(5e-5, 1.4e-4), -4.0), rng.choice([40.0, 76.8, 300.0])) for i in range(24)]
    blobs = [_unit(rng) for _ in range(3)]  # unlocated images sharing one hash: dense pairs, cosine by matmul tiles
    images += [_image(f"blob{i:02d}", 777, _perturbed(blobs[i % 3], rng, 0.25), None, rank=i) for i in range(80)]
    monkeypatch.setattr(dedup, "_DENSE_MAX_IMAGES", dense_max)
    monkeypatch.setattr(dedup, "_PAIR_CHUNK", 997)  # many chunks, buckets split across them
    monkeypatch.setattr(dedup, "_TILE", 16)  # many cosine tiles per chunk
    if dense_max == 0:
        monkeypatch.setattr(dedup, "_UNIT_CACHE_BYTES", 0)  # float16 rows converted per tile / batch
    for max_hamming in (0, 3, 6, 15):
        expected = _brute_force(images, max_hamming, 0.97, MAX_OFFSET)
        assert near_duplicates(images, max_hamming, 0.97, MAX_OFFSET) == expected
    assert len(expected) > 40


def test_twenty_thousand_images_with_planted_copies_and_a_huge_flat_bucket() -> None:
    rng = np.random.default_rng(12)
    images, expected = _random_group(rng, 20_000, 100, flat=1_500)
    assert len(expected) == 100
    assert set(_near(images)) == expected  # flat scenes share a hash and embedding but sit 50 m > 19.2 m apart


def test_popcount_lookup_table_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(14).integers(0, 1 << 63, (50, 7), dtype=np.int64).view(np.uint64) * np.uint64(3)
    expected = dedup._popcount(x)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert np.array_equal(dedup._popcount(x), expected)
    assert np.array_equal(expected, [[bin(int(value)).count("1") for value in row] for row in x])


# --- validation ------------------------------------------------------------------------------------------------


def test_bad_parameters_and_inputs_are_rejected() -> None:
    embedding = _unit(np.random.default_rng(13))
    pair = [_image("a", 1, embedding), _image("b", 1, embedding)]
    for bad in [(-1, 0.9, 0.2), (16, 0.9, 0.2), (6, 1.5, 0.2), (6, float("nan"), 0.2), (6, 0.9, -0.1)]:
        with pytest.raises(ValueError):
            near_duplicates(pair, *bad)
    with pytest.raises(ValueError, match="more than once"):
        _near([pair[0], pair[0]])
    with pytest.raises(ValueError, match="share a dimension"):
        _near([pair[0], _image("c", 1, embedding[:100])])
    with pytest.raises(ValueError, match="zero"):
        _near([pair[0], _image("c", 1, np.zeros(DIM, np.float16))])
    with pytest.raises(ValueError, match="both lon and lat"):
        DedupImage("x", 0, embedding, 1.0, None, None, ())
    with pytest.raises(ValueError, match="signed int64"):
        DedupImage("x", 1 << 63, embedding, None, None, None, ())
    assert _near(pair[:1]) == [] and _near([]) == []
