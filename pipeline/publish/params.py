"""Validated knobs of the `publish` stage (`publish:` in params.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import ParamsError
from pipeline.params import read_params_file, validate_section

SPLITS = ("train", "val", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(_Strict):
    """Shares of the geographic blocks that go to each split (they must add up to 1)."""

    train: float = Field(0.9, ge=0, le=1)
    val: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train + val + test must add up to 1, not {total:g}")
        return self


class PublishParams(_Strict):
    """Where publishing reads and writes, shard size, splits, and how the Beam job runs."""

    curated_dir: str = Field("data/curated", description="The `curate` stage's output (metadata, rejected, funnel).")
    harvest_dir: str = Field("data/harvest", description="The harvest output: its shards hold the images.")
    dir: str = Field("data/git10m", description="The published dataset.")
    work_dir: str = Field(".text2earth/work/publish", description="Per-shard staging metadata and progress "
                          "markers (lets an interrupted run resume); not part of the outputs.")
    shard_prefix: str = Field("git10m", pattern=r"^[A-Za-z0-9_-]+$", description="Shard names: {prefix}-000000.tar.")
    samples_per_shard: int = Field(10_000, ge=1, description="Samples per tar (the last one holds the rest).")
    split: SplitParams = Field(default_factory=lambda: SplitParams(train=0.9, val=0.05, test=0.05))
    split_h3_resolution: int = Field(3, ge=0, le=15, description="Geographic blocks of the split: H3 parent "
                                     "cells at this resolution (3: about 12,000 km^2).")
    seed: int = Field(0, description="Changes which blocks go to which split and how shards mix sources.")
    row_group_size: int = Field(122_880, ge=1_000, description="Rows per Parquet row group of the metadata.")
    runner: str = "FnApiRunner"
    workers: int = Field(1, ge=1)

    @field_validator("dir", "curated_dir", "harvest_dir", "work_dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a path or URL")
        return value


def load_publish_params(params_path: Path, overrides: dict[str, Any] | None = None) -> PublishParams:
    """The `publish:` section with CLI overrides, validated (errors name the key and what is allowed)."""
    data = read_params_file(params_path)
    section = data.get("publish") or {}
    if not isinstance(section, dict):
        raise ParamsError(f"{params_path}: publish: expected a mapping of settings")
    section = {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return validate_section(PublishParams, section, str(params_path), "publish")
