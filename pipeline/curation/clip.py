"""CLIP scoring through Beam's RunInference: image and caption embeddings, their cosine, a cache.

One open_clip model per worker process scores batches of exactly `batch_size` (see `clip_model`: fixed
shapes make outputs byte-identical from run to run).
Embeddings are cached by image (or caption) sha256 + model, so a re-run or a later stage never computes
one twice; the stage also keeps float16 image embeddings and perceptual hashes for deduplication.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from pipeline import storage
from pipeline.curation import io
from pipeline.curation.clip_model import ClipRuntime, embed_images, embed_texts, load_clip
from pipeline.curation.job import ShardStep, StageContext
from pipeline.curation.params import ClipParams

log = logging.getLogger(__name__)

EMBEDDINGS_SCHEMA = pa.schema([
    pa.field("image_key", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.int64(), metadata={"description": "64-bit DCT perceptual hash (imagehash.phash)."}),
    pa.field("embedding", pa.binary(), metadata={"description": "L2-normalised CLIP image embedding, float16 "
                                                 "little-endian bytes (np.frombuffer(b, '<f2'))."}),
])


def model_label(params: ClipParams) -> str:
    """What `clip_model` says: name and weights (`random-init` marks meaningless offline scores)."""
    if params.pretrained is None and params.model.startswith(("hf-hub:", "local-dir:")):
        return params.model  # the hub repository (or folder) carries its own weights
    weights = params.pretrained if params.pretrained is not None else f"random-init-seed{params.seed}"
    return f"{params.model}/{weights}"


def model_id(params: ClipParams) -> str:
    """Cache namespace: everything that changes an embedding's bits (weights, config, numerics)."""
    config = storage.read_bytes(params.model_config_path) if params.model_config_path else b""
    weights = params.pretrained or ""
    if weights and storage.is_local(weights):
        import os

        if os.path.exists(weights):  # a local checkpoint: its size and mtime-free content hash prefix
            with open(weights, "rb") as fh:
                weights = f"{weights}:{os.path.getsize(weights)}:{hashlib.sha256(fh.read(1 << 20)).hexdigest()}"
    parts = [params.model, weights, params.seed if params.pretrained is None else None,
             hashlib.sha256(config).hexdigest(), params.precision, params.batch_size,
             "cuda" if params.device.startswith("cuda") else "cpu"]
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in params.model)[:40]
    return f"{slug}-{io.fingerprint(*parts)[:16]}"


# A work item: ("image", sha256, encoded bytes) or ("text", sha256 of the text, text).
WorkItem = tuple[str, str, Any]


class ClipModelHandler(ModelHandler[WorkItem, tuple[str, str, Any], ClipRuntime]):
    """RunInference handler: one model per worker process, batches of exactly `batch_size`.

    Images and captions run through separate RunInference transforms (`kind`), so every batch is one
    kind and full: padding costs at most one partial batch of each per bundle.
    """

    def __init__(self, params: dict[str, Any], kind: str) -> None:
        super().__init__()
        self.params = ClipParams.model_validate(params)
        self.kind = kind

    def load_model(self) -> ClipRuntime:
        """Called once per worker process by RunInference."""
        return load_clip(self.params)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        """Full batches (a bundle's last one is padded)."""
        return {"min_batch_size": self.params.batch_size, "max_batch_size": self.params.batch_size}

    def run_inference(self, batch: Sequence[WorkItem], model: ClipRuntime,
                      inference_args: dict[str, Any] | None = None) -> Iterable[tuple[str, str, Any]]:
        """Embed the batch's images and texts; images also get their perceptual hash."""
        from pipeline.curation.dedup import perceptual_hash

        images = [(sha, data) for kind, sha, data in batch if kind == "image"]
        texts = [(sha, text) for kind, sha, text in batch if kind == "text"]
        image_embs = embed_images(model, [d for _, d in images]) if images else []
        text_embs = embed_texts(model, [t for _, t in texts]) if texts else []
        found: dict[tuple[str, str], Any] = {}
        for (sha, data), emb in zip(images, image_embs, strict=True):
            found["image", sha] = None if emb is None else (emb, perceptual_hash(data))
        for (sha, _), emb in zip(texts, text_embs, strict=True):
            found["text", sha] = (emb, None)
        return [(kind, sha, found[kind, sha]) for kind, sha, _ in batch]

    def share_model_across_processes(self) -> bool:
        """One model per worker process (the issue's rule; large_model sharing is for GPUs)."""
        return False


class EmbeddingCache:
    """Embeddings by (model, image sha256) and (model, caption sha256), one small .npy per entry."""

    def __init__(self, cache_dir: str, model: str) -> None:
        self.base = storage.join(cache_dir, model)

    def _url(self, kind: str, sha: str) -> str:
        return storage.join(self.base, kind, sha[:2], f"{sha}.npy")

    def get_many(self, kind: str, shas: Sequence[str]) -> dict[str, tuple[np.ndarray, int | None]]:
        """Entries present in the cache (image entries carry the phash as a last float64 element)."""
        def one(sha: str) -> tuple[str, Any]:
            try:
                vec = np.load(_io.BytesIO(storage.read_bytes(self._url(kind, sha))))
            except (FileNotFoundError, OSError, ValueError):
                return sha, None
            if kind == "image":
                return sha, (vec[:-1].astype(np.float32), int(vec[-1].view(np.int64)))
            return sha, (vec.astype(np.float32), None)

        with ThreadPoolExecutor(16) as pool:
            return {sha: v for sha, v in pool.map(one, shas) if v is not None}

    def put_many(self, kind: str, entries: dict[str, tuple[np.ndarray, int | None]]) -> None:
        """Store entries (float64: embedding values exactly, then the phash bits for images)."""
        def one(item: tuple[str, tuple[np.ndarray, int | None]]) -> None:
            sha, (emb, phash) = item
            vec = emb.astype(np.float64)
            if kind == "image":
                vec = np.append(vec, np.array([phash], dtype=np.int64).view(np.float64))
            buf = _io.BytesIO()
            np.save(buf, vec)
            with storage.atomic_write(self._url(kind, sha)) as local, open(local, "wb") as fh:
                fh.write(buf.getvalue())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, entries.items()))


def text_sha(text: str) -> str:
    """Cache key of a caption."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _shard_rows(ctx: StageContext, shard: str) -> list[dict[str, Any]]:
    return io.read_table(ctx.input_dir, shard, ["key", "image_key", "shard", "source", "sha256", "caption",
                                                "lon", "lat"]).to_pylist()


class PrepareClip(beam.DoFn):
    """For a shard not yet committed: the images and captions whose embeddings are not cached."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def setup(self) -> None:
        """Params and cache once per worker."""
        self.common, self.params = self.ctx.load()
        self.cache = EmbeddingCache(self.params.cache_dir, model_id(self.params))

    def process(self, record: str) -> Iterator[Any]:
        """Main output: (shard, ("task", record)); tagged `image` / `text`: (shard, work item) per cache miss."""
        task = json.loads(record)
        shard = task["shard"]
        yield shard, ("task", record)
        if io.committed(self.ctx.output_dir, shard) != task["fingerprint"]:
            yield from self._misses(shard)

    def _misses(self, shard: str) -> Iterator[Any]:
        rows = _shard_rows(self.ctx, shard)
        images = {r["sha256"]: r["image_key"] for r in rows}
        texts = {text_sha(r["caption"]): r["caption"] for r in rows if r["caption"]}
        missing_images = sorted(set(images) - set(self.cache.get_many("image", sorted(images))))
        missing_texts = sorted(set(texts) - set(self.cache.get_many("text", sorted(texts))))
        data = io.read_images(self.common.harvest_dir, shard, {images[s] for s in missing_images})
        for sha in missing_images:
            if images[sha] in data:
                yield beam.pvalue.TaggedOutput("image", (shard, ("image", sha, data[images[sha]])))
        for sha in missing_texts:
            yield beam.pvalue.TaggedOutput("text", (shard, ("text", sha, texts[sha])))


class WriteClip(ShardStep):
    """Scores from fresh and cached embeddings; metadata, embeddings and rejected rows of one shard."""

    def on_setup(self) -> None:
        """The cache this model writes to."""
        self.cache = EmbeddingCache(self.params.cache_dir, model_id(self.params))
        self.label = model_label(self.params)

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Join embeddings to rows; store new ones in the cache first (a crash after that loses nothing)."""
        fresh: dict[str, dict[str, Any]] = {"image": {}, "text": {}}
        failed: set[str] = set()
        for kind, sha, value in extra.get("result", []):
            if value is None:
                failed.add(sha)
            else:
                fresh[kind][sha] = value
        self.cache.put_many("image", fresh["image"])
        self.cache.put_many("text", fresh["text"])
        table = io.read_table(self.ctx.input_dir, shard)
        rows = table.to_pylist()
        shas = sorted({r["sha256"] for r in rows} - set(fresh["image"]) - failed)
        images = {**self.cache.get_many("image", shas), **fresh["image"]}
        tshas = sorted({text_sha(r["caption"]) for r in rows if r["caption"]} - set(fresh["text"]))
        texts = {**self.cache.get_many("text", tshas), **fresh["text"]}
        keep, scores, rejected = [], [], []
        embeddings: dict[str, tuple[str, int, bytes]] = {}
        for i, row in enumerate(rows):
            image = images.get(row["sha256"])
            if image is None:
                reason = "decode_error" if row["sha256"] in failed else "image_missing"
                rejected.append(io.rejected_row(row, "clip", reason, f"{row['image_key']} in shard {shard}"))
                continue
            text = texts.get(text_sha(row["caption"])) if row["caption"] else None
            if text is None:  # the caption stage guarantees one; a missing one is a bug worth stopping on
                raise RuntimeError(f"clip: no caption embedding for {row['key']} in {shard}")
            keep.append(i)
            scores.append(float(np.dot(image[0].astype(np.float64), text[0].astype(np.float64))))
            embeddings.setdefault(row["image_key"], (row["sha256"], image[1], image[0].astype("<f2").tobytes()))
        kept = io.take(table, keep)
        kept = io.with_columns(kept, {"clip_score": scores, "clip_model": [self.label] * len(keep)})
        emb_table = pa.Table.from_pylist(
            [{"image_key": k, "sha256": s, "phash": p, "embedding": e}
             for k, (s, p, e) in sorted(embeddings.items())], schema=EMBEDDINGS_SCHEMA)
        return io.write_shard(self.ctx.output_dir, shard, kept, rejected, fp, {"embeddings": emb_table})


def _grouped(item: tuple[str, Iterable[tuple[str, Any]]]) -> tuple[str, dict[str, list[Any]]]:
    shard, values = item
    out: dict[str, list[Any]] = {"task": [], "result": []}
    for tag, value in values:
        out[tag].append(value)
    return shard, out


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """tasks -> cache misses -> RunInference -> grouped by shard -> WriteClip."""
    prepared = tasks | "clip:Prepare" >> beam.ParDo(PrepareClip(ctx)).with_outputs("image", "text", main="task")
    image_handler: Any = KeyedModelHandler(ClipModelHandler(ctx.params, "image"))
    images = (prepared.image
              | "clip:Embed-image" >> RunInference(image_handler)
              | "clip:Tag-image" >> beam.MapTuple(lambda shard, result: (shard, ("result", result))))
    # captions repeat across shards (templates, shared sentences): embed each distinct one once per run
    text_handler: Any = KeyedModelHandler(ClipModelHandler(ctx.params, "text"))
    texts = (prepared.text
             | "clip:TextBySha" >> beam.MapTuple(lambda shard, item: (item[1], (shard, item)))
             | "clip:TextShards" >> beam.GroupByKey()
             | "clip:DistinctText" >> beam.MapTuple(
                 lambda sha, uses: (tuple(sorted({shard for shard, _ in uses})), next(iter(uses))[1]))
             | "clip:Embed-text" >> RunInference(text_handler)
             | "clip:Tag-text" >> beam.FlatMapTuple(
                 lambda shards, result: [(shard, ("result", result)) for shard in shards]))
    results = [images, texts]
    return ((prepared.task, *results)
            | "clip:Merge" >> beam.Flatten()
            | "clip:ByShard" >> beam.GroupByKey()
            | "clip:Collect" >> beam.Map(_grouped)
            | "clip:Write" >> beam.ParDo(WriteClip(ctx)))
