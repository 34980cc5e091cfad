"""Test-set decontamination: a test image that the model saw in training (the same bytes, or a near copy)
would flatter every metric, so it is removed before evaluating, and the report says how many were.

The training shards are streamed once; each shard's (sha256, perceptual hash) pairs of the samples training
uses are cached beside its name and size, so a re-evaluation reads no shard twice. Only the test set's
hashes are held against each shard's, so memory does not grow with the training set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from model.evalsets import EvalSample, iter_shard
from pipeline.curation.dedup import perceptual_hash

log = logging.getLogger(__name__)


def _cache_path(cache_dir: str, url: str) -> Path:
    size = os.path.getsize(url) if os.path.isfile(url) else None
    digest = hashlib.sha256(json.dumps([url, size]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(url).stem}-{digest}.parquet"


def shard_hashes(url: str, cache_dir: str) -> pa.Table:
    """key, split, clip_score, sha256, phash (int64) of every sample of a shard (cached per shard name + size)."""
    path = _cache_path(cache_dir, url)
    if path.is_file():
        return pq.read_table(path)
    rows: dict[str, list[Any]] = {"key": [], "split": [], "clip_score": [], "sha256": [], "phash": []}
    for key, data, meta_bytes in iter_shard(url):
        meta = json.loads(meta_bytes) if meta_bytes else {}
        rows["key"].append(key)
        rows["split"].append(meta.get("split"))
        rows["clip_score"].append(meta.get("clip_score"))
        rows["sha256"].append(hashlib.sha256(data).hexdigest())
        try:
            rows["phash"].append(perceptual_hash(data))
        except ValueError:
            rows["phash"].append(None)  # undecodable: exact match only
    table = pa.table(rows, schema=pa.schema([("key", pa.string()), ("split", pa.string()),
                                             ("clip_score", pa.float64()), ("sha256", pa.string()),
                                             ("phash", pa.int64())]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a killed run leaves no half-written cache entry
    return table


def image_phash(image: np.ndarray) -> int:
    """The curation dedup's perceptual hash of a decoded image (losslessly re-encoded, so both sides agree)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return perceptual_hash(buffer.getvalue())


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def contaminated(test_sha: Sequence[str], test_phash: np.ndarray, table: pa.Table, max_hamming: int
                 ) -> tuple[set[int], set[int]]:
    """Indices of test images with an exact (sha256) and with a near (phash within max_hamming) training copy."""
    train_sha = set(table.column("sha256").to_pylist())
    exact = {i for i, h in enumerate(test_sha) if h in train_sha}
    hashes = table.column("phash").drop_null().to_numpy().astype(np.int64).view(np.uint64)
    near: set[int] = set()
    if len(hashes):
        for i, h in enumerate(test_phash.view(np.uint64)):
            if i not in exact and int(_popcount(np.bitwise_xor(hashes, h)).min()) <= max_hamming:
                near.add(i)
    return exact, near


def _shard_job(args: tuple[str, str]) -> pa.Table:
    return shard_hashes(*args)


def decontaminate(test: Sequence[EvalSample], shards: Sequence[str], used: Callable[[dict[str, Any]], bool],
                  *, max_hamming: int, cache_dir: str, workers: int = 1,
                  progress: Callable[[int], None] | None = None) -> tuple[list[EvalSample], dict[str, Any]]:
    """The test samples without a copy among the training samples (`used(row)` says which rows train on),
    and a report: how many were checked and removed, exactly and as near duplicates, and their keys."""
    test_sha = [s.sha256 for s in test]
    test_phash = np.array([image_phash(s.image) for s in test if s.image is not None], dtype=np.int64)
    if len(test_phash) != len(test):
        raise ValueError("decontaminate needs the test images (model.evalsets.read_images)")
    exact: set[int] = set()
    near: set[int] = set()
    jobs = [(url, cache_dir) for url in shards]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    tables = pool.map(_shard_job, jobs) if pool else map(_shard_job, jobs)
    try:
        for done, table in enumerate(tables, 1):
            mask = [used(row) for row in table.select(["split", "clip_score"]).to_pylist()]
            e, n = contaminated(test_sha, test_phash, table.filter(pa.array(mask, pa.bool_())), max_hamming)
            exact |= e
            near |= n
            if progress:
                progress(done)
    finally:
        if pool:
            pool.shutdown()
    near -= exact
    removed = exact | near
    report = {"checked": len(test), "training_shards": len(shards), "removed": len(removed),
              "removed_exact": len(exact), "removed_near": len(near), "max_hamming": max_hamming,
              "removed_keys": sorted(test[i].key for i in removed)}
    return [s for i, s in enumerate(test) if i not in removed], report
