"""Exact and near-duplicate detection inside one neighbourhood of images, as pure functions for the dedup job.

Near duplicates must agree in perceptual hash, CLIP embedding *and* place: uniform scenes (open water, desert,
forest) agree in the first two all over the globe, so only the location test keeps distinct ones apart.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import imagehash
import numpy as np
from PIL import Image

MAX_HAMMING_LIMIT = 15
"""Largest accepted `max_hamming`: 16 bands of 4 bits, where banding makes about every pair a candidate."""

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius; centre distances are great-circle distances on this sphere (within 0.5% of geodesic)."""

_DENSE_MAX_IMAGES = 1024  # up to this many distinct hashes, every pair is compared directly instead of banded
_PAIR_CHUNK = 1 << 20  # candidate pairs verified at once: ~60 MB of index and mask arrays at peak
_COSINE_CHUNK_BYTES = 16 << 20  # float32 rows gathered per side of a cosine batch
_PLACE_BATCH = 1 << 18  # pairs whose centres are compared at once (~6 MB per gathered array)
_ROW_CHUNK = 4096  # embedding rows converted to float32 at a time when computing norms
_UNIT_CACHE_BYTES = 64 << 20  # below this, all embeddings are normalised to float32 once (32k x 512)
_TILE = 2048  # rows and columns of one cosine matmul tile (16 MB of float32 cosines)
_TILE_DENSITY = 4  # use tiles when their cells number at most this many times the pairs asked for
_U64 = (1 << 64) - 1
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def perceptual_hash(image: bytes) -> int:
    """64-bit DCT perceptual hash (imagehash.phash, greyscale 32x32 → 8x8) as a signed int64-compatible int.

    The unsigned 64-bit value (first hash bit = most significant) is mapped to two's complement so it fits an
    Arrow int64 column; XOR and `phash_distance` work unchanged on it. Raises ValueError for undecodable bytes.
    """
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            decoded.load()
            bits = imagehash.phash(decoded).hash
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image for a perceptual hash ({len(image)} bytes): {exc}") from exc
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big", signed=True)


def phash_distance(a: int, b: int) -> int:
    """Hamming distance between two 64-bit hashes, signed or unsigned."""
    return ((a ^ b) & _U64).bit_count()


@dataclass(frozen=True)
class DedupImage:
    """One image of a neighbourhood, with what near-duplicate search compares.

    `lon`/`lat` are both given (georeferenced) or both None. `ground_width_m` is the chip's ground width; when a
    georeferenced image lacks it, it counts as 0 (only copies at the very same centre can match it). `rank` orders
    copies: the smallest (then the smallest key) is kept.
    """

    key: str
    phash: int
    embedding: np.ndarray = field(compare=False)
    lon: float | None
    lat: float | None
    ground_width_m: float | None
    rank: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not -(1 << 63) <= self.phash < (1 << 63):
            raise ValueError(f"{self.key}: phash {self.phash} is not a signed int64 (use perceptual_hash)")
        if getattr(self.embedding, "ndim", None) != 1 or self.embedding.size == 0:
            raise ValueError(f"{self.key}: embedding must be a non-empty 1-D array")
        if (self.lon is None) != (self.lat is None):
            raise ValueError(f"{self.key}: give both lon and lat, or neither")
        if self.lon is not None and self.lat is not None and not (math.isfinite(self.lon) and abs(self.lat) <= 90.0):
            raise ValueError(f"{self.key}: bad centre lon={self.lon} lat={self.lat}")
        if self.ground_width_m is not None and not (self.ground_width_m >= 0 and math.isfinite(self.ground_width_m)):
            raise ValueError(f"{self.key}: ground_width_m must be finite and >= 0, got {self.ground_width_m}")

    @property
    def georeferenced(self) -> bool:
        """Whether the image has a centre on the ground."""
        return self.lon is not None


def exact_duplicates(images: Sequence[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, str]]:
    """For (key, rank) pairs sharing one sha256: (dropped_key, kept_key) for all but the best rank, sorted."""
    _require_unique([key for key, _ in images])
    if len(images) < 2:
        return []
    kept = min(images, key=lambda item: (item[1], item[0]))[0]
    return sorted((key, kept) for key, _ in images if key != kept)


def near_duplicates(
    images: Sequence[DedupImage], max_hamming: int, min_cosine: float, max_offset_fraction: float
) -> list[tuple[str, str]]:
    """(dropped_key, kept_key) for every near duplicate in one neighbourhood (H3 cell or non-georeferenced bucket).

    Two images match when their phashes differ in at most `max_hamming` bits, their embeddings have cosine
    >= `min_cosine`, and either both are georeferenced with centres at most `max_offset_fraction` times the larger
    ground width apart, or neither is (a georeferenced image never matches one that is not). Matches are chained
    into connected components; each keeps its best-rank image. Sorted, and independent of input order.

    `max_hamming` (0..15) sets how much re-encoding, resizing or light editing still counts as a copy (a JPEG
    re-save or 250→256 px resize moves a textured chip's phash by 0-2 bits). It also sets the cost: candidates
    come from splitting the hash into max_hamming+1 bands (a pair within max_hamming bits agrees exactly on at
    least one), and narrower bands put more unrelated images in one bucket (at 15, 4-bit bands: ~n²/32 pairs).
    Images sharing one exact hash (flat chips all hash to 0x8000000000000000) are paired by a sweep over their
    positions instead. Memory stays bounded (chunks of ~1M candidate pairs) whatever the bucket sizes.
    Low-texture chips have unstable phashes: barely textured ones can move ~20 bits on a JPEG re-save.
    """
    _check_params(max_hamming, min_cosine, max_offset_fraction)
    _require_unique([image.key for image in images])
    if len(images) < 2:
        return []
    ordered = sorted(images, key=lambda image: image.key)
    group = _Group(ordered, min_cosine, max_offset_fraction)
    distinct, inverse, counts = np.unique(group.hashes, return_inverse=True, return_counts=True)
    for u, v in _same_hash_pairs(group, inverse, counts):
        group.link(u, v)
    by_hash = np.argsort(inverse, kind="stable")  # images grouped by distinct hash
    first = np.cumsum(counts) - counts
    for a, b in _close_hash_pairs(distinct, max_hamming):
        for u, v in _expand(a, b, by_hash, first, counts):
            group.link(u, v)
    return _resolve(ordered, group.labels)


def _check_params(max_hamming: int, min_cosine: float, max_offset_fraction: float) -> None:
    """Raise ValueError for thresholds outside their meaningful range."""
    if isinstance(max_hamming, bool) or not isinstance(max_hamming, int | np.integer):
        raise ValueError(f"max_hamming must be an int, got {max_hamming!r}")
    if not 0 <= max_hamming <= MAX_HAMMING_LIMIT:
        raise ValueError(f"max_hamming must be in 0..{MAX_HAMMING_LIMIT}, got {max_hamming}")
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    if not (0.0 <= max_offset_fraction and math.isfinite(max_offset_fraction)):
        raise ValueError(f"max_offset_fraction must be finite and >= 0, got {max_offset_fraction}")


def _require_unique(keys: list[str]) -> None:
    """Raise ValueError naming a key that occurs twice in one group."""
    if len(set(keys)) != len(keys):
        repeated = next(key for key, count in Counter(keys).items() if count > 1)
        raise ValueError(f"image key {repeated!r} occurs more than once in the group")


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element."""
    count = getattr(np, "bitwise_count", None)
    if count is not None:
        return np.asarray(count(x))
    return _BYTE_POPCOUNT[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


def _bands(max_hamming: int) -> list[tuple[np.uint64, np.uint64]]:
    """(shift, mask) of max_hamming+1 bands covering the 64 bits, widths differing by at most one."""
    count = max_hamming + 1
    bands, shift = [], 0
    for i in range(count):
        width = 64 // count + (1 if i < 64 % count else 0)
        bands.append((np.uint64(shift), np.uint64((1 << width) - 1)))
        shift += width
    return bands


def _pairs_within(order: np.ndarray, ends: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (order[p], order[q]) for every p and p < q < ends[p], ~_PAIR_CHUNK pairs at a time."""
    later = ends - np.arange(ends.size) - 1
    positions = np.flatnonzero(later > 0)
    counts = later[positions]
    cumulative = np.cumsum(counts)
    lo, done = 0, 0
    while lo < positions.size:
        hi = max(lo + 1, int(np.searchsorted(cumulative, done + _PAIR_CHUNK, side="right")))
        pos, cnt = positions[lo:hi], counts[lo:hi]
        first = np.repeat(pos, cnt)
        offsets = np.arange(first.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        yield order[first], order[first + 1 + offsets]
        done, lo = int(cumulative[hi - 1]), hi


def _close_hash_pairs(distinct: np.ndarray, max_hamming: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of index pairs a < b of distinct hashes within max_hamming bits, each pair once."""
    n = distinct.size
    if n <= _DENSE_MAX_IMAGES:  # direct comparison in row blocks: fewer passes than banding
        rows = max(1, _PAIR_CHUNK // n)
        columns = np.arange(n)
        for top in range(0, n - 1, rows):
            bottom = min(n - 1, top + rows)
            close = _popcount(distinct[top:bottom, None] ^ distinct[None, :]) <= max_hamming
            close &= columns[None, :] > np.arange(top, bottom)[:, None]
            i, j = np.nonzero(close)
            yield i + top, j
        return
    bands = _bands(max_hamming)
    for band, (shift, mask) in enumerate(bands):
        values = (distinct >> shift) & mask
        order = np.argsort(values, kind="stable")
        sorted_values = values[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
        ends = np.append(starts[1:], n)
        for a, b in _pairs_within(order, np.repeat(ends, ends - starts)):
            x = distinct[a] ^ distinct[b]
            keep = _popcount(x) <= max_hamming
            for earlier_shift, earlier_mask in bands[:band]:  # a pair sharing an earlier band was seen there
                keep &= ((x >> earlier_shift) & earlier_mask) != 0
            yield a[keep], b[keep]


def _expand(
    a: np.ndarray, b: np.ndarray, by_hash: np.ndarray, first: np.ndarray, counts: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Image pairs for pairs of distinct hashes (every image of hash a with every image of hash b), in chunks."""
    sizes = counts[a] * counts[b]
    if not sizes.size or sizes.max() == 1:
        yield by_hash[first[a]], by_hash[first[b]]
        return
    cumulative = np.cumsum(sizes)
    for start in range(0, int(cumulative[-1]), _PAIR_CHUNK):
        flat = np.arange(start, min(start + _PAIR_CHUNK, int(cumulative[-1])))
        pair = np.searchsorted(cumulative, flat, side="right")
        local = flat - (cumulative[pair] - sizes[pair])
        along_b = counts[b[pair]]
        yield by_hash[first[a[pair]] + local // along_b], by_hash[first[b[pair]] + local % along_b]


def _same_hash_pairs(group: _Group, inverse: np.ndarray, counts: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Candidate pairs of images with one exact hash: all unlocated pairs, and located pairs a sweep keeps.

    Located images are sorted by hash, then by their most spread-out unit-vector coordinate; two centres within
    the largest allowed chord differ by at most that chord in every coordinate, so later partners stop there.
    """
    shared = counts[inverse] > 1
    loose = np.flatnonzero(shared & ~group.georeferenced)
    if loose.size:
        loose = loose[np.argsort(inverse[loose], kind="stable")]
        run_ids = inverse[loose]
        starts = np.flatnonzero(np.concatenate(([True], run_ids[1:] != run_ids[:-1])))
        ends = np.append(starts[1:], loose.size)
        yield from _pairs_within(loose, np.repeat(ends, ends - starts))
    located = np.flatnonzero(shared & group.georeferenced)
    if located.size:
        unit = group.centres[located]
        axis = int(np.argmax(unit.max(axis=0) - unit.min(axis=0)))
        key = inverse[located] * 8.0 + (unit[:, axis] + 1.0)  # hash groups 8 apart; coordinate + 1 in [0, 2]
        order = np.argsort(key, kind="stable")
        key = key[order]
        reach = group.chord_limit(group.widths[located].max()) + 1e-6  # slack for rounding in key; pairs are verified
        yield from _pairs_within(located[order], np.searchsorted(key, key + reach, side="right"))


def _merge(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Union the components of each (u, v) edge in place; labels stay fully compressed (smallest member = root)."""
    while u.size:
        lu, lv = labels[u], labels[v]
        crossing = lu != lv
        if not crossing.any():
            return
        u, v, lu, lv = u[crossing], v[crossing], lu[crossing], lv[crossing]
        np.minimum.at(labels, np.maximum(lu, lv), np.minimum(lu, lv))  # hook the larger root under the smaller
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels[:] = jumped


class _Group:
    """Arrays of one group (sorted by key) and the component labels built from verified pairs."""

    def __init__(self, images: Sequence[DedupImage], min_cosine: float, max_offset: float) -> None:
        n = len(images)
        self.min_cosine = np.float32(min_cosine)
        self.max_offset = max_offset
        self.hashes = np.array([image.phash for image in images], dtype=np.int64).view(np.uint64)
        self.labels = np.arange(n, dtype=np.int64)
        self.embeddings = self._stack_embeddings(images)
        self.inverse_norms = self._inverse_norms(images)
        self.unit_embeddings: np.ndarray | None = None  # all rows converted once, when that is cheap in memory
        if self.embeddings.size * 4 <= _UNIT_CACHE_BYTES:
            self.unit_embeddings = self._normalised(np.arange(n))
        self.georeferenced = np.array([image.georeferenced for image in images], dtype=bool)
        lon = np.radians([image.lon if image.lon is not None else np.nan for image in images])
        lat = np.radians([image.lat if image.lat is not None else np.nan for image in images])
        self.centres = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
        self.widths = np.array([image.ground_width_m or 0.0 for image in images], dtype=np.float64)
        self.cosine_batch = max(256, _COSINE_CHUNK_BYTES // (4 * self.embeddings.shape[1]))
        self._mark = np.zeros(n, dtype=bool)
        self._position = np.zeros(n, dtype=np.int64)

    @staticmethod
    def _stack_embeddings(images: Sequence[DedupImage]) -> np.ndarray:
        """(N, D) embeddings, float16 kept as float16 (half the memory), anything else as float32."""
        sizes = {image.embedding.shape[0] for image in images}
        if len(sizes) != 1:
            raise ValueError(f"embeddings of one group must share a dimension, got sizes {sorted(sizes)}")
        stacked = np.stack([image.embedding for image in images])
        return stacked if stacked.dtype == np.float16 else stacked.astype(np.float32)

    def _inverse_norms(self, images: Sequence[DedupImage]) -> np.ndarray:
        """1/‖e‖ per row (cosines renormalise float16 rounding); rejects zero or non-finite embeddings."""
        norms = np.empty(len(images), dtype=np.float32)
        for a in range(0, len(images), _ROW_CHUNK):
            norms[a : a + _ROW_CHUNK] = np.linalg.norm(self.embeddings[a : a + _ROW_CHUNK].astype(np.float32), axis=1)
        bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
        if bad.size:
            raise ValueError(f"{images[int(bad[0])].key}: embedding is zero or not finite")
        return np.float32(1.0) / norms

    def chord_limit(self, width: np.ndarray | float) -> np.ndarray:
        """Largest unit-sphere chord between centres of images whose larger ground width is `width`."""
        return 2.0 * np.sin(np.minimum(self.max_offset * np.asarray(width) / EARTH_RADIUS_M, np.pi) / 2.0)

    def link(self, u: np.ndarray, v: np.ndarray) -> None:
        """Verify hash-close candidate pairs (not yet connected ones, cheapest test first) and merge matches."""
        keep = self.labels[u] != self.labels[v]
        u, v = u[keep], v[keep]
        keep = self._same_place(u, v)
        u, v = u[keep], v[keep]
        keep = self._similar(u, v)
        _merge(self.labels, u[keep], v[keep])

    def _same_place(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Both georeferenced and close enough, or neither georeferenced."""
        geo_u, geo_v = self.georeferenced[u], self.georeferenced[v]
        ok = ~geo_u & ~geo_v
        both = np.flatnonzero(geo_u & geo_v)
        for a in range(0, both.size, _PLACE_BATCH):
            rows = both[a : a + _PLACE_BATCH]
            bu, bv = u[rows], v[rows]
            chord2 = np.square(self.centres[bu] - self.centres[bv]).sum(axis=1)
            ok[rows] = chord2 <= np.square(self.chord_limit(np.maximum(self.widths[bu], self.widths[bv])))
        return ok

    def _similar(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Embedding cosine >= min_cosine for each pair: by matmul tiles where pairs are dense, else pair by pair.

        Dense candidate sets (a big bucket of near-identical hashes) would cost a float16 → float32 conversion
        and a 2 KB gather per pair; one tile converts each row once and lets BLAS do 2048 x 2048 cosines.
        """
        if u.size == 0:
            return np.zeros(0, dtype=bool)
        rows, cols = self._distinct(u), self._distinct(v)
        self._position[rows] = np.arange(rows.size)
        at_row = self._position[u]
        self._position[cols] = np.arange(cols.size)
        at_col = self._position[v]
        col_tiles = -(-cols.size // _TILE)
        tile = (at_row // _TILE) * col_tiles + at_col // _TILE
        order = np.argsort(tile, kind="stable")
        starts = np.flatnonzero(np.concatenate(([True], np.diff(tile[order]) != 0)))
        tiles = tile[order[starts]]
        heights = np.minimum(_TILE, rows.size - (tiles // col_tiles) * _TILE)
        widths = np.minimum(_TILE, cols.size - (tiles % col_tiles) * _TILE)
        if int((heights * widths).sum()) > _TILE_DENSITY * u.size:
            return self._similar_pairs(u, v)
        ok = np.empty(u.size, dtype=bool)
        for t, start, end in zip(tiles.tolist(), starts.tolist(), [*starts[1:].tolist(), u.size], strict=True):
            members = order[start:end]
            top, left = (t // col_tiles) * _TILE, (t % col_tiles) * _TILE
            block = self._normalised(rows[top : top + _TILE]) @ self._normalised(cols[left : left + _TILE]).T
            ok[members] = block[at_row[members] - top, at_col[members] - left] >= self.min_cosine
        return ok

    def _similar_pairs(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Embedding cosine >= min_cosine, computed in batches of row-wise dot products."""
        ok = np.empty(u.size, dtype=bool)
        for a in range(0, u.size, self.cosine_batch):
            bu, bv = u[a : a + self.cosine_batch], v[a : a + self.cosine_batch]
            cosine = np.einsum("ij,ij->i", self._normalised(bu), self._normalised(bv))
            ok[a : a + self.cosine_batch] = cosine >= self.min_cosine
        return ok

    def _normalised(self, rows: np.ndarray) -> np.ndarray:
        """Unit-length float32 embeddings of `rows`."""
        if self.unit_embeddings is not None:
            return self.unit_embeddings[rows]
        return self.embeddings[rows].astype(np.float32) * self.inverse_norms[rows, None]

    def _distinct(self, indices: np.ndarray) -> np.ndarray:
        """Sorted distinct image indices, in O(N) with a reusable mask instead of a sort."""
        self._mark[indices] = True
        found = np.flatnonzero(self._mark)
        self._mark[found] = False
        return found


def _resolve(images: Sequence[DedupImage], labels: np.ndarray) -> list[tuple[str, str]]:
    """(dropped, kept) for every member of a component of two or more, keeping the best (rank, key)."""
    sizes = np.bincount(labels, minlength=labels.size)
    members = np.flatnonzero(sizes[labels] > 1)
    members = members[np.argsort(labels[members], kind="stable")]
    groups = np.split(members, np.flatnonzero(np.diff(labels[members])) + 1) if members.size else []
    pairs = []
    for group in groups:
        component = [images[int(i)] for i in group]
        kept = min(component, key=lambda image: (image.rank, image.key)).key
        pairs += [(image.key, kept) for image in component if image.key != kept]
    return sorted(pairs)
