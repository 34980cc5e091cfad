"""Validated knobs of the curation stages: the shared `curation:` section and one section per stage.

Each stage reads only its own section plus `curation:`, so DVC re-runs a stage (and what follows it)
only when one of those changes. Unknown keys and bad values stop the stage with the key path named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.curation.vlm import VlmConfig
from pipeline.errors import ParamsError
from pipeline.params import read_params_file, validate_section

STAGES = ("geo", "caption", "clip", "filter", "dedup", "curate")
Captioner = Literal["source", "template", "vlm"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CurationParams(_Strict):
    """Where curation reads and writes, and how its Beam jobs run (`curation:` in params.yaml)."""

    harvest_dir: str = Field("data/harvest", description="The harvest output: shards hold the images.")
    dir: str = Field("data/curation", description="Intermediate stage outputs, one folder per stage.")
    output_dir: str = Field("data/curated", description="Final curated metadata, rejected and funnel.")
    work_dir: str = Field(".text2earth/work/curation", description="Progress markers; not part of outputs.")
    runner: str = "FnApiRunner"
    workers: int = Field(1, ge=1)

    def stage_dir(self, stage: str) -> str:
        """Output folder of a stage (`curate` writes the final `output_dir`)."""
        from pipeline import storage

        return self.output_dir if stage == "curate" else storage.join(self.dir, stage)

    def input_dir(self, stage: str) -> str:
        """The folder a stage reads: the previous stage's output (the harvest for `geo`)."""
        i = STAGES.index(stage)
        return self.harvest_dir if i == 0 else self.stage_dir(STAGES[i - 1])


class GeoParams(_Strict):
    """Country, continent and H3 cell of every georeferenced chip (`geo:`)."""

    boundaries: str = Field("data/boundaries/ne_50m_admin_0_countries.geojson",
                            description="Natural Earth admin-0 countries GeoJSON.")
    max_sea_km: float = Field(25.0, ge=0, description="Points at sea get the nearest country within this "
                              "geodesic distance, else null.")
    h3_resolution: int = Field(9, ge=0, le=15, description="Resolution of the `h3_cell` column.")


class CaptionParams(_Strict):
    """Which captioner writes each source's captions (`caption:`)."""

    default: Captioner = Field("template", description="Captioner for sources not in `per_source`.")
    per_source: dict[str, Captioner] = Field(default_factory=dict)
    sentences: Literal["one", "all"] = Field(
        "one", description="`source` captioner: one caption per sample (chosen reproducibly from the key) or "
        "one sample per sentence (keys `{key}-c{i}` for the 2nd..nth sentence; the image is shared).")
    fallback: Literal["template", "reject"] = Field(
        "template", description="When the `source` captioner finds no caption: write a template caption, "
        "or reject the sample (`no_caption`).")
    vlm: VlmConfig | None = Field(None, description="The OpenAI-compatible endpoint for `vlm` sources.")
    vlm_cache_dir: str = Field(".text2earth/cache/vlm", description="Captions cached by image + model + "
                               "prompt: a re-run pays for nothing twice.")

    @model_validator(mode="after")
    def _vlm_configured(self) -> CaptionParams:
        uses_vlm = self.default == "vlm" or "vlm" in self.per_source.values()
        if uses_vlm and self.vlm is None:
            raise ValueError("a source uses the `vlm` captioner but `caption.vlm` is not set: give base_url "
                             "and model (and api_key_env)")
        return self


class ClipParams(_Strict):
    """The open_clip model that scores image-text agreement (`clip:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field("ViT-B-32", description="open_clip model name, `hf-hub:org/repo`, or the name of "
                       "a config registered by `model_config`.")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (laion2b_s34b_b79k), a local "
                                   "checkpoint path (RemoteCLIP, Git-RSCLIP-style fine-tunes), or null for "
                                   "random weights (offline smoke runs only: scores mean nothing).")
    model_config_path: str | None = Field(None, description="open_clip model config JSON to register "
                                          "(its file stem becomes a model name).")
    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    batch_size: int = Field(32, ge=1, le=4096)
    threads: int = Field(0, ge=0, description="torch threads per worker process (0 = torch's default).")
    seed: int = Field(0, description="Seed of the random weights when `pretrained` is null.")
    cache_dir: str = Field(".text2earth/cache/clip", description="Embeddings cached by image / text sha256 "
                           "+ model: re-runs and later stages never compute them twice.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value


class FilterParams(_Strict):
    """Which image-text pairs pass (`filter:`): an absolute score and/or a top share per group."""

    min_score: float | None = Field(None, ge=-1, le=1, description="Absolute cosine threshold (web CLIP's "
                                    "0.28 is miscalibrated for remote sensing: prefer top_percent).")
    top_percent: float | None = Field(90.0, gt=0, le=100, description="Keep the best this many percent "
                                      "within each (source, level) group.")

    @model_validator(mode="after")
    def _some_rule(self) -> FilterParams:
        if self.min_score is None and self.top_percent is None:
            raise ValueError("set min_score, top_percent or both (top_percent: 100 keeps everything)")
        return self


class DedupParams(_Strict):
    """Exact (sha256) and near (perceptual hash + CLIP, same place) duplicates (`dedup:`)."""

    h3_resolution: int = Field(7, ge=0, le=15, description="Near duplicates are searched within one H3 "
                               "cell of this resolution (must not exceed geo.h3_resolution).")
    max_hamming: int = Field(6, ge=0, le=15, description="Perceptual-hash bits that may differ.")
    min_cosine: float = Field(0.95, ge=-1, le=1, description="CLIP image-embedding cosine of duplicates.")
    max_offset_fraction: float = Field(0.25, ge=0, description="Georeferenced duplicates' centres lie within "
                                       "this fraction of the chip's ground width of each other.")


class CurateParams(_Strict):
    """Geographic balancing (`curate:`): a cap per (H3 cell, GSD level)."""

    h3_resolution: int = Field(5, ge=0, le=15, description="Cell size of the cap (res 5: about 250 km^2).")
    max_per_cell: int = Field(64, ge=1, description="Samples kept per (cell, level); the rest are dropped "
                              "(`over_cell_cap`), chosen reproducibly.")
    seed: int = Field(0, description="Changes which samples a full cell keeps.")


STAGE_MODELS: dict[str, type[_Strict]] = {
    "geo": GeoParams, "caption": CaptionParams, "clip": ClipParams, "filter": FilterParams,
    "dedup": DedupParams, "curate": CurateParams,
}


def load_curation_params(params_path: Path, stage: str, overrides: dict[str, Any] | None = None
                         ) -> tuple[CurationParams, Any]:
    """The shared `curation:` section (with CLI overrides) and the stage's own section, validated."""
    data = read_params_file(params_path)
    common_section = dict(data.get("curation") or {})
    common_section.update({k: v for k, v in (overrides or {}).items() if v is not None})
    common = validate_section(CurationParams, common_section, str(params_path), "curation")
    stage_section = data.get(stage) or {}
    if not isinstance(stage_section, dict):
        raise ParamsError(f"{params_path}: {stage}: expected a mapping of settings")
    return common, validate_section(STAGE_MODELS[stage], dict(stage_section), str(params_path), stage)
