"""The real images of an evaluation: test captions with their images, and real chips per resolution level.

Rows come from the published GeoParquet metadata (a DuckDB query, so a 10M-row release is never loaded
whole), chosen in a seeded hash order so the same params pick the same samples; images are then read
from the shards that hold them, one pass per shard, keeping only the chosen keys.
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.errors import Text2EarthError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")


@dataclass(frozen=True)
class EvalSample:
    """One real image of the evaluation with what the metrics need to know about it."""

    key: str
    shard: str
    caption: str
    level: int
    sha256: str
    label: str | None = None  # scene class (Cls-OA), when known
    image: np.ndarray | None = None  # H x W x 3 uint8, filled by `read_images`


def _connect(published_dir: str) -> Any:
    from pipeline.publish.query import connect

    if not storage.exists(storage.join(published_dir, "metadata")):
        raise Text2EarthError(f"no published metadata in {published_dir}/metadata: run `dvc repro publish` or set "
                              "evaluate.published_dir")
    return connect(published_dir)


def class_of(scene_class: str | None, caption: str, keywords: Mapping[str, Sequence[str]]) -> str | None:
    """The Cls-OA class of a test image: its source's scene class, else the first class with a caption keyword."""
    if scene_class:
        return scene_class
    text = f" {caption.lower()} "
    for name, words in keywords.items():
        if any(word.lower() in text for word in words):
            return name
    return None


def evaluation_samples(published_dir: str, split: str, limit: int, seed: int,
                 keywords: Mapping[str, Sequence[str]]) -> list[EvalSample]:
    """Up to `limit` captioned samples of `split`, in a seeded order (images not read yet)."""
    con = _connect(published_dir)
    rows = con.execute(
        "SELECT key, shard, caption, coalesce(level, 0), sha256, scene_class FROM samples "
        "WHERE split = ? AND caption IS NOT NULL AND caption <> '' ORDER BY hash(key || ?), key LIMIT ?",
        [split, str(seed), limit]).fetchall()
    if not rows:
        raise Text2EarthError(f"no captioned samples in split {split!r} of {published_dir}: set evaluate.split to a "
                              "split the release has (`text2earth query \"SELECT split, count(*) FROM samples "
                              "GROUP BY split\"`)")
    return [EvalSample(key=k, shard=sh, caption=c, level=int(lv), sha256=h, label=class_of(sc, c, keywords))
            for k, sh, c, lv, h, sc in rows]


def level_chips(published_dir: str, levels: Sequence[int], per_level: int, seed: int,
                exclude_split: str) -> list[EvalSample]:
    """Up to `per_level` real chips of each level (any split but `exclude_split`), in a seeded order."""
    con = _connect(published_dir)
    rows = con.execute(
        "SELECT key, shard, coalesce(caption, ''), level, sha256 FROM ("
        "  SELECT *, row_number() OVER (PARTITION BY level ORDER BY hash(key || ?), key) AS rank FROM samples"
        "  WHERE level IN (SELECT unnest(?::SMALLINT[])) AND coalesce(split, '') <> ?"
        ") WHERE rank <= ? ORDER BY level, rank",
        [str(seed), list(levels), exclude_split, per_level]).fetchall()
    return [EvalSample(key=k, shard=sh, caption=c, level=int(lv), sha256=h) for k, sh, c, lv, h in rows]


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BOX)  # area average, as the harvest's pyramid
        return np.asarray(rgb)


def iter_shard(url: str) -> Iterable[tuple[str, bytes, bytes | None]]:
    """(key, image bytes, json bytes) of every sample of a WebDataset tar, streamed."""
    current: str | None = None
    image: bytes | None = None
    meta: bytes | None = None
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            if key != current:
                if current is not None and image is not None:
                    yield current, image, meta
                current, image, meta = key, None, None
            handle = tar.extractfile(member)
            if handle is None:
                continue
            if ext.lower() in IMAGE_EXTENSIONS:
                image = handle.read()
            elif ext == "json":
                meta = handle.read()
        if current is not None and image is not None:
            yield current, image, meta


def read_images(published_dir: str, samples: Sequence[EvalSample], size: int) -> list[EvalSample]:
    """The samples with their images (resized to `size` when needed), in the given order."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        by_shard[sample.shard].add(sample.key)
    images: dict[str, np.ndarray] = {}
    for shard in sorted(by_shard):
        url = storage.join(published_dir, "shards", f"{shard}.tar")
        wanted = by_shard[shard]
        for key, data, _ in iter_shard(url):
            if key in wanted:
                images[key] = _decode(data, size)
    missing = [s.key for s in samples if s.key not in images]
    if missing:
        raise Text2EarthError(f"{len(missing)} image(s) named in {published_dir}/metadata are not in its shards, "
                              f"e.g. {missing[0]!r}: re-run `dvc repro publish` (checksums.sha256 verifies a copy)")
    return [replace(s, image=images[s.key]) for s in samples]
