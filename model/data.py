"""The training stream: published WebDataset shards in, augmented and tokenised batches out.

Shards are resampled with replacement (open_clip's `--dataset-resampled`), split by node and worker, shuffled
through a buffer, filtered on the sample's json and cropped/flipped to the training resolution; a resize (only
when a chip is smaller than the resolution) rescales `gsd_m` and recomputes the level.

Determinism, so that a resumed run sees exactly the batches an uninterrupted run would: the stream is cut into
*segments* of `segment` batches (default: one checkpoint interval, `checkpoint_every *
gradient_accumulation_steps`). Each segment is an independent pipeline whose shard-draw, shuffle and
augmentation RNGs are seeded from (seed, rank, segment index, stream), so batch n depends only on the params,
seed, rank and world size. Starting at batch k rebuilds segment k // segment and drops its first k % segment
batches *before* decoding (only json is parsed), so a resume costs at most one segment of tar reading. With
DataLoader workers, batch n comes from stream n % num_workers (torch hands batches out round-robin), each stream
drawing from its own slice of the rank's shards; the stream is therefore also a function of `num_workers`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.config import NULL_LEVEL, TrainParams, gsd_level, level_gsd_m
from pipeline.errors import ParamsError

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2000  # samples (undecoded bytes, ~40 kB each); filled completely at every segment start
MAX_TOKENS = 77  # CLIP's context length
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MONTH = re.compile(r"^\s*\d{4}-(\d{1,2})")
_DRAWS = 4  # augmentation draws per sample: crop y, crop x, flip h, flip v (fixed, so skipping needs no decode)


class Tokenizer(Protocol):
    """What the stream needs of a (transformers) tokenizer: batch call returning `input_ids`."""

    def __call__(self, text: list[str], *, padding: str, truncation: bool, max_length: int,
                 return_tensors: str) -> Any:
        """Tokenise a batch of captions."""
        ...


class ShardSample(NamedTuple):
    """One sample as read from a shard: metadata parsed, image still encoded."""

    key: str
    url: str
    image: bytes
    caption: str
    meta: dict[str, Any]


class Chip(NamedTuple):
    """An augmented chip and the resolution it now has."""

    image: np.ndarray  # H x W x 3 uint8
    gsd_m: float  # nan when unknown
    level: int  # NULL_LEVEL when unknown


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from `train.shards`: a brace pattern (`a-{000000..000003}.tar`, `::`-joined lists), a glob,
    or a text file listing one URL per line."""
    path = Path(spec)
    if spec.endswith((".txt", ".list")) and path.is_file():
        urls = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        urls = []
        for url in wds.shardlists.expand_urls(spec):
            urls += sorted(glob(url)) if any(c in url for c in "*?[") else [url]
    if not urls:
        raise ParamsError(f"train.shards: {spec!r} names no shard; give a brace pattern such as "
                          "'data/git10m/shards/git10m-{000000..000003}.tar', a glob or a list file")
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if local_missing:
        raise ParamsError(f"train.shards: {len(local_missing)} shard(s) not found, e.g. {local_missing[0]!r}; "
                          "run `dvc repro publish` or point train.shards at existing shards")
    return urls


def sample_filter(meta: dict[str, Any], params: TrainParams) -> bool:
    """Whether a sample's metadata passes the params' filters (split, minimum CLIP score).

    Rows without a `split` (harvest shards, before publishing) count as `train`; with `min_clip_score` set,
    rows without a score are dropped, since the quality subset cannot vouch for them.
    """
    if (meta.get("split") or "train") not in params.splits:
        return False
    if params.min_clip_score is not None:
        score = meta.get("clip_score")
        if score is None or not score >= params.min_clip_score:
            return False
    return True


def _finite(value: Any) -> float:
    """A metadata number as float, nan when missing."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def sample_level(meta: dict[str, Any]) -> int:
    """The published `level` (0 = unknown); harvest rows without one derive it from `gsd_m`."""
    level = meta.get("level")
    if level is not None:
        return int(level)
    gsd = _finite(meta.get("gsd_m"))
    return gsd_level(gsd) if gsd > 0 else NULL_LEVEL


def sample_month(meta: dict[str, Any]) -> float:
    """Month 1..12 of the `acquired` ISO date, nan when unknown."""
    match = _MONTH.match(str(meta.get("acquired") or ""))
    month = int(match.group(1)) if match else 0
    return float(month) if 1 <= month <= 12 else math.nan


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes to an H x W x 3 uint8 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def augment(image: np.ndarray, *, resolution: int, gsd_m: float, level: int, draws: np.ndarray) -> Chip:
    """Random crop to `resolution` and random horizontal/vertical flips, which keep the GSD.

    Only a chip smaller than `resolution` is resized (up, shorter side to `resolution`); its GSD shrinks by the
    same factor and the level is recomputed from it (a level 0 chip stays 0; a chip with a level but no GSD is
    rescaled from the level's nominal GSD). `draws` holds four uniforms in [0, 1): crop y, crop x, flip h, flip v.
    """
    height, width = image.shape[:2]
    short = min(height, width)
    if short < resolution:
        scale = resolution / short
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        height, width = image.shape[:2]
        if level != NULL_LEVEL:
            level = gsd_level((gsd_m if gsd_m > 0 else level_gsd_m(level)) / scale)
        gsd_m = gsd_m / scale  # nan stays nan
    top = int(draws[0] * (height - resolution + 1))
    left = int(draws[1] * (width - resolution + 1))
    image = image[top:top + resolution, left:left + resolution]
    if draws[2] < 0.5:
        image = image[:, ::-1]
    if draws[3] < 0.5:
        image = image[::-1]
    return Chip(np.ascontiguousarray(image), gsd_m, level)


def _shard_subset(urls: list[str], index: int, count: int) -> list[str]:
    """Every `count`-th shard from `index`: disjoint slices while there are enough shards, else all of them
    (then only the seeds differ, as with open_clip's resampling)."""
    return urls[index::count] if len(urls) >= count else urls


def _seed_entropy(*values: int) -> list[int]:
    """Non-negative entropy words for numpy's SeedSequence (a negative seed is allowed in params)."""
    return [v % 2**64 for v in values]


class _Segment:
    """One segment of one stream: resampled shards -> filtered samples -> shuffled -> batches of raw samples."""

    def __init__(self, urls: list[str], params: TrainParams, entropy: list[int], shuffle_buffer: int) -> None:
        shard_seq, shuffle_seq, augment_seq = np.random.SeedSequence(entropy).spawn(3)
        self.urls = urls
        self.params = params
        self.shard_rng = np.random.default_rng(shard_seq)
        self.shuffle_rng = np.random.default_rng(shuffle_seq)
        self.augment_rng = np.random.default_rng(augment_seq)
        self.shuffle_buffer = shuffle_buffer
        self.kept_any = False  # set by the first sample that passes the filters
        self.batches = self._batches()

    def _shard_urls(self) -> Iterator[dict[str, str]]:
        """Shards drawn with replacement; gives up once every shard was read and none had a usable sample."""
        drawn: set[str] = set()
        while True:
            if not self.kept_any and len(drawn) == len(self.urls):
                raise ParamsError(
                    f"train: no sample in {len(self.urls)} shard(s) (e.g. {self.urls[0]}) passes the filters "
                    f"splits={list(self.params.splits)}, min_clip_score={self.params.min_clip_score}; "
                    "widen train.splits or lower train.min_clip_score")
            url = self.urls[int(self.shard_rng.integers(len(self.urls)))]
            drawn.add(url)
            yield {"url": url}

    def _samples(self) -> Iterator[ShardSample]:
        """Samples that pass the filters, in shard order; the image stays encoded.

        Each drawn shard is grouped on its own: webdataset groups files by key across the whole stream, so a
        one-sample shard drawn twice in a row would otherwise look like one sample with duplicate files.
        """
        for raw in (raw for shard in self._shard_urls() for raw in wds.tarfile_samples([shard])):
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if image_ext is None or "json" not in raw:
                log.warning("skipping %s in %s: no image or json", raw.get("__key__"), raw.get("__url__"))
                continue
            meta = json.loads(raw["json"])
            if not sample_filter(meta, self.params):
                continue
            self.kept_any = True
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else str(meta.get("caption") or "")
            yield ShardSample(raw["__key__"], raw["__url__"], raw[image_ext], caption, meta)

    def _shuffled(self) -> Iterator[ShardSample]:
        """Fill the buffer, then let each new sample take the place of a random buffered one, which is yielded."""
        buffer: list[ShardSample] = []
        for sample in self._samples():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = int(self.shuffle_rng.integers(len(buffer)))
            buffer[index], sample = sample, buffer[index]
            yield sample
        # the shard source is infinite: the stream only ends by an error above

    def _batches(self) -> Iterator[tuple[list[ShardSample], np.ndarray]]:
        """Raw batches with their augmentation draws, taken before decoding so a skipped batch costs no decode."""
        samples = self._shuffled()
        size = self.params.batch_size
        while True:
            batch = [next(samples) for _ in range(size)]
            yield batch, self.augment_rng.random((size, _DRAWS))


def collate(batch: list[ShardSample], draws: np.ndarray, params: TrainParams, tokenizer: Tokenizer) -> dict[str, Any]:
    """Decode, augment and tokenise one batch into the tensors the trainer consumes."""
    chips = []
    for sample, sample_draws in zip(batch, draws, strict=True):
        try:
            image = decode_rgb(sample.image)
        except OSError as exc:
            raise ValueError(f"{sample.url}: {sample.key}: image does not decode ({exc}); "
                             "re-run `dvc repro publish` or check the shard's checksum") from exc
        chips.append(augment(image, resolution=params.resolution, gsd_m=_finite(sample.meta.get("gsd_m")),
                             level=sample_level(sample.meta), draws=sample_draws))
    # channels first while still uint8, then in-place numpy maths (torch's thread pool only adds overhead here)
    pixels = np.stack([chip.image for chip in chips]).transpose(0, 3, 1, 2).astype(np.float32)
    pixels /= 127.5
    pixels -= 1.0
    tokens = tokenizer([s.caption for s in batch], padding="max_length", truncation=True, max_length=MAX_TOKENS,
                       return_tensors="pt")
    return {
        "pixel_values": torch.from_numpy(pixels),
        "input_ids": torch.as_tensor(tokens["input_ids"], dtype=torch.long),
        "level": torch.tensor([chip.level for chip in chips], dtype=torch.long),
        "gsd_m": torch.tensor([chip.gsd_m for chip in chips], dtype=torch.float32),
        "lon": torch.tensor([_finite(s.meta.get("lon")) for s in batch], dtype=torch.float32),
        "lat": torch.tensor([_finite(s.meta.get("lat")) for s in batch], dtype=torch.float32),
        "month": torch.tensor([sample_month(s.meta) for s in batch], dtype=torch.float32),
        "key": [s.key for s in batch],
    }


class _BatchStream(IterableDataset[dict[str, Any]]):
    """Batches `start_step, start_step + 1, ...` of one rank; with W DataLoader workers, worker w yields every
    W-th of them (torch's round-robin order), each from the logical stream `batch % W`."""

    def __init__(self, params: TrainParams, tokenizer: Tokenizer, *, seed: int, start_step: int, rank: int,
                 world_size: int, segment: int, shuffle_buffer: int) -> None:
        self.params = params
        self.tokenizer = tokenizer
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.segment = segment
        self.streams = max(1, params.num_workers)
        urls = expand_shards(params.shards)
        if len(urls) < world_size * self.streams:
            log.warning("%d shard(s) for %d rank(s) x %d worker(s): streams resample shared shards (different "
                        "seeds), so their samples may repeat across ranks", len(urls), world_size, self.streams)
        self.rank_urls = _shard_subset(urls, rank, world_size)
        # a segment never draws more than this many samples per stream: a larger buffer would only cost reads
        per_stream = -(-segment // self.streams) * params.batch_size
        self.shuffle_buffer = min(shuffle_buffer, per_stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        streams, segment = self.streams, self.segment
        stream = (self.start_step + worker) % streams
        urls = _shard_subset(self.rank_urls, stream, streams)
        step, current = self.start_step + worker, -1
        batches: Iterator[tuple[list[ShardSample], np.ndarray]] = iter(())
        while True:
            index = step // segment
            if index != current:
                entropy = _seed_entropy(self.seed, self.rank, index, stream)
                batches = _Segment(urls, self.params, entropy, self.shuffle_buffer).batches
                first = index * segment + (stream - index * segment) % streams  # this stream's first batch in it
                for _ in range((step - first) // streams):
                    next(batches)
                current = index
            yield collate(*next(batches), self.params, self.tokenizer)
            step += streams


def training_stream(params: TrainParams, tokenizer: Tokenizer, *, seed: int, start_step: int = 0, rank: int = 0,
                    world_size: int = 1, segment: int | None = None,
                    shuffle_buffer: int = SHUFFLE_BUFFER) -> Iterator[dict[str, Any]]:
    """The endless batch stream of one rank, from batch `start_step` on (batches, not optimizer steps: a run
    resumed after s optimizer steps passes s * gradient_accumulation_steps).

    A pure function of (params, seed, start_step, rank, world_size, segment, shuffle_buffer): batch n is the
    same whether the stream started at 0 or anywhere before n. Batches hold `pixel_values` (float32 in [-1, 1],
    B x 3 x resolution x resolution), `input_ids` (long B x 77), `level` (long, 0 = unknown), `gsd_m`, `lon`,
    `lat`, `month` (float32, nan = unknown) and `key` (list of str).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    segment = segment if segment is not None else params.checkpoint_every * params.gradient_accumulation_steps
    if segment < 1:
        raise ValueError(f"segment must be >= 1 batch, got {segment}")
    dataset = _BatchStream(params, tokenizer, seed=seed, start_step=start_step, rank=rank, world_size=world_size,
                           segment=segment, shuffle_buffer=max(1, shuffle_buffer))
    if params.num_workers == 0:
        yield from dataset
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=params.num_workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=2)
    yield from loader

