"""Download a URL-list shard with img2dataset (its downloader, resizer and writer, used as a library).

img2dataset's `download()` entry point starts a logger process and a process pool per call, which a
Beam or Dask worker (often daemonic) cannot do; its `Downloader` runs one shard in-process with a
thread pool and keeps img2dataset's per-sample `status` and `error_message`, which become our
rejected rows.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.chips import check_quality, encode_image, key_scene_id, sha256_hex
from pipeline.errors import SampleRejected
from pipeline.geometry import level_for_gsd
from pipeline.params import HarvestParams
from pipeline.process import base_row, reject_candidate
from pipeline.shard_writer import ShardWriter

_TOO_LARGE = "image_too_large"


class _PixelLimitResizer:
    """Wraps img2dataset's Resizer: refuses images above the pixel limit from their header alone."""

    def __init__(self, resizer: Any, max_pixels: int) -> None:
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple[Any, ...]:
        try:
            img_stream.seek(0)
            width, height = Image.open(img_stream).size  # reads the header only
        except Exception:
            width = height = 0
        if width * height > self.max_pixels:
            return None, None, None, None, None, f"{_TOO_LARGE}: {width}x{height} > {self.max_pixels} pixels"
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


def _reason(status: str, message: str | None) -> str:
    if message and message.startswith(_TOO_LARGE):
        return _TOO_LARGE
    return "download_failed" if status == "failed_to_download" else "decode_error"


def download_rows(rows: list[dict[str, Any]], params: HarvestParams) -> list[dict[str, Any]]:
    """img2dataset's result for each row (status, error_message, image bytes, sizes), in input order."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(params.max_image_pixels)
    from img2dataset.downloader import Downloader  # heavy (opencv, albumentations): import on use
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    fmt = params.image_format
    resizer = Resizer(image_size=params.chip_size, resize_mode="center_crop", resize_only_if_bigger=False,
                      upscale_interpolation="bicubic", downscale_interpolation="area",
                      encode_quality=params.jpeg_quality if fmt == "jpg" else 6, encode_format=fmt)
    with tempfile.TemporaryDirectory(prefix="text2earth-urls-") as tmp:
        shard_file = os.path.join(tmp, "input.arrow")
        table = pa.table({"url": [r["url"] for r in rows],
                          "caption": [r.get("caption") for r in rows],
                          "t2e_index": list(range(len(rows)))})
        with pa.ipc.new_file(shard_file, table.schema) as sink:
            sink.write_table(table)
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter, resizer=_PixelLimitResizer(resizer, params.max_image_pixels),
            thread_count=params.url_threads, save_caption=False, extract_exif=False, output_folder=tmp,
            column_list=["url", "caption", "t2e_index"], timeout=params.http_timeout_s,
            number_sample_per_shard=max(len(rows), 1), oom_shard_count=5, compute_hash="sha256",
            verify_hash_type=None, encode_format=fmt, retries=params.http_retries,
            user_agent_token="text2earth", disallowed_header_directives=["noai", "noimageai"],
        )
        downloader.download_shard((0, shard_file))
        result = pq.read_table(os.path.join(tmp, "00000.parquet")).to_pylist()
    return sorted(result, key=lambda r: r["t2e_index"])


def harvest_urls(task: dict[str, Any], params: HarvestParams, writer: ShardWriter) -> None:
    """Download a URL task's rows and write kept images and img2dataset's failures."""
    rows = task["rows"]
    results = download_rows(rows, params)
    if len(results) != len(rows):  # img2dataset writes one status row per input row
        raise RuntimeError(f"img2dataset returned {len(results)} rows for {len(rows)} URLs")
    declared = task["meta"].get("declared_gsd_m")
    for row, res in zip(rows, results, strict=True):
        if res["status"] != "success":
            message = res.get("error_message") or res["status"]
            reject_candidate(writer, task, row["key"], row["url"], SampleRejected(_reason(res["status"], message),
                                                                        message))
            continue
        image = res[params.image_format]
        scale = min(res["original_width"], res["original_height"]) / params.chip_size
        gsd = declared * scale if declared else None
        caption = row.get("caption") or None
        try:
            with Image.open(io.BytesIO(image)) as decoded:
                was_rgb = decoded.mode == "RGB"
                pixels = np.asarray(decoded.convert("RGB"))
            if not was_rgb:  # grey or palette output of the resizer: store the RGB the metadata promises
                image = encode_image(pixels, params.image_format, params.jpeg_quality)
            check_quality(np.transpose(pixels, (2, 0, 1)), 0.0, params.max_nodata_fraction,
                          params.min_value_range)
        except SampleRejected as exc:
            reject_candidate(writer, task, row["key"], row["url"], exc)
            continue
        out = base_row(
            task["source"], task["meta"], key=row["key"], source_uri=row["url"],
            scene_id=key_scene_id(row["key"], task["source"]), gsd_m=gsd, gsd_x_m=gsd, gsd_y_m=gsd,
            native_gsd_m=declared, level=level_for_gsd(gsd), pyramid_level=0,
            width=res["width"], height=res["height"], nodata_fraction=0.0, bands=[1, 2, 3],
            image_format=params.image_format, sha256=sha256_hex(image),
            captions=[caption] if caption else [], caption=caption,
            caption_source="source" if caption else None,
        )
        writer.add(out, image, None)
