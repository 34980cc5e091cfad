"""The `caption` stage: every chip gets a caption from the captioner its source is assigned in params.

`source` keeps the dataset's own sentences (one per sample, chosen reproducibly from the key, or one
sample per sentence), `template` describes the metadata, `vlm` asks an OpenAI-compatible endpoint.
VLM failures are rejected rows, and their shard is redone on the next run (successes are cached).
"""

from __future__ import annotations

import hashlib
from typing import Any

import apache_beam as beam

from pipeline.curation import io
from pipeline.curation.job import ShardStep, StageContext
from pipeline.curation.template_caption import template_caption


def _pick(key: str, n: int) -> int:
    """A reproducible index in range(n) from the key (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def _sentences(row: dict[str, Any]) -> list[str]:
    found = [s.strip() for s in (row.get("captions") or []) if s and s.strip()]
    if not found and row.get("caption") and str(row["caption"]).strip():
        found = [str(row["caption"]).strip()]
    return found


def _gsd_hint(gsd: float | None) -> str | None:
    if gsd is None:
        return None
    return f"{gsd:.2g} m" if gsd < 10 else f"{gsd:.0f} m"


def vlm_hints(row: dict[str, Any]) -> dict[str, str | None]:
    """What the VLM prompt may mention: resolution, place, sensor, date, the source's class label."""
    place = ", ".join(p for p in (row.get("country"), row.get("continent")) if p) or None
    return {"gsd": _gsd_hint(row.get("gsd_m")), "location": place, "sensor": row.get("sensor"),
            "acquired": row.get("acquired"), "scene_class": row.get("scene_class")}


class CaptionShard(ShardStep):
    """Caption one shard's rows."""

    def on_setup(self) -> None:
        """The VLM client, when any source uses it."""
        self.vlm: Any = None
        if self.params.vlm is not None and (self.params.default == "vlm" or "vlm" in self.params.per_source.values()):
            from pipeline.curation.vlm import VlmCaptioner

            self.vlm = VlmCaptioner(self.params.vlm, self.params.vlm_cache_dir)

    def teardown(self) -> None:
        """Close the HTTP client."""
        if getattr(self, "vlm", None) is not None:
            self.vlm.close()

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Source sentences and templates inline; VLM requests for the shard in one concurrent call."""
        table = io.read_table(self.ctx.input_dir, shard)
        rows = table.to_pylist()
        out: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        vlm_rows: list[dict[str, Any]] = []
        for row in rows:
            captioner = self.params.per_source.get(row["source"], self.params.default)
            if captioner == "vlm":
                vlm_rows.append(row)
            elif captioner == "source" and (sentences := _sentences(row)):
                if self.params.sentences == "one":
                    out.append({**row, "caption": sentences[_pick(row["key"], len(sentences))],
                                "caption_source": "source"})
                else:
                    out += [{**row, "key": row["key"] if i == 0 else f"{row['key']}-c{i}", "caption": text,
                             "caption_source": "source"} for i, text in enumerate(sentences)]
            elif captioner == "template" or self.params.fallback == "template":
                out.append({**row, "caption": template_caption(row), "caption_source": "template"})
            else:
                rejected.append(io.rejected_row(row, "caption", "no_caption",
                                                "the source has no caption for this image"))
        transient = False
        if vlm_rows:
            from pipeline.curation.vlm import VlmRequest

            images = io.read_images(self.common.harvest_dir, shard, {r["image_key"] for r in vlm_rows})
            asked = [r for r in vlm_rows if r["image_key"] in images]
            for row in vlm_rows:
                if row["image_key"] not in images:
                    rejected.append(io.rejected_row(row, "caption", "image_missing", f"not in shard {shard}"))
            results = self.vlm.caption([VlmRequest(images[r["image_key"]], r["image_format"], r["sha256"],
                                                   vlm_hints(r)) for r in asked])
            label = f"vlm:{self.params.vlm.model}"
            for row, result in zip(asked, results, strict=True):
                if result.caption is not None:
                    out.append({**row, "caption": result.caption, "caption_source": label})
                else:
                    transient = transient or result.reason == "vlm_failed"
                    rejected.append(io.rejected_row(row, "caption", result.reason or "vlm_failed", result.detail))
        out.sort(key=lambda r: r["key"])
        kept = io.conform(table.from_pylist(out, schema=table.schema) if out else table.slice(0, 0))
        return io.write_shard(self.ctx.output_dir, shard, kept, rejected, fp + (io.INCOMPLETE if transient else ""))


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """One step: caption each shard."""
    return tasks | "caption:Write" >> beam.ParDo(CaptionShard(ctx))
