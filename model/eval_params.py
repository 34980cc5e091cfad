"""The `evaluate:` section of params.yaml, validated: what is evaluated, with which extractors, how much.

Every feature extractor is named by a local path (or open_clip name + pretrained tag), so the same settings
run offline (random-weight placeholders, labelled as such in the report) and online (real weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import ParamsError
from pipeline.params import read_params_file, validate_section


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassifierParams(_Strict):
    """A ResNet-18 trained for one of the two classification metrics (protocol: 5 epochs, Adam 1e-4, batch 64)."""

    epochs: int = Field(5, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    image_size: int = Field(224, ge=32, description="Input side in pixels (the protocol: 224).")
    weights: str | None = Field(None, description="Local torchvision resnet18 state dict (ImageNet); null: random "
                                "initialisation (offline placeholder, lower accuracy).")


class EvaluateParams(_Strict):
    """`evaluate:` in params.yaml."""

    model_dir: str = Field("models/text2earth", description="The trained pipeline to evaluate.")
    published_dir: str = Field("data/git10m", description="Published dataset: test captions and real images.")
    split: str = Field("test", description="Published split whose captions and images are the test set.")
    max_captions: int = Field(1000, ge=1, description="Test captions used (seeded choice); the paper: 1,000 real "
                              "test images, 10 generated per caption.")
    images_per_caption: int = Field(10, ge=1)
    steps: int = Field(50, ge=1, description="Denoising steps per generated image.")
    guidance_scale: float = Field(4.0, ge=1.0, description="Joint guidance s = 1 + omega (paper: omega = 3).")
    batch_size: int = Field(8, ge=1, description="Images generated per pipeline call.")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda | cuda:N")
    inception_weights: str | None = Field(None, description="Inception-v3 state dict for FID/KID (ImageNet, or "
                                          "RSICD-fine-tuned as in the paper's protocol); null: random placeholder.")
    clip_model: str = Field("ViT-B-32", description="open_clip model for CLIP score and CMMD.")
    clip_pretrained: str | None = Field(None, description="open_clip pretrained tag or checkpoint path; null: "
                                        "random weights (offline placeholder).")
    clip_model_config_path: str | None = None
    kid_subset_size: int = Field(1000, ge=2)
    kid_subsets: int = Field(100, ge=1)
    class_keywords: dict[str, list[str]] = Field(default_factory=dict, description="Cls-OA classes for test images "
                                                 "without a `scene_class`: the first class with a keyword in the "
                                                 "caption.")
    classifier: ClassifierParams = Field(default_factory=lambda: ClassifierParams.model_validate({}))
    levels: list[int] = Field(default_factory=lambda: list(range(10, 19)), description="Levels of the resolution-"
                              "control test (those with at least min_chips_per_level real chips are used).")
    min_chips_per_level: int = Field(5, ge=2)
    max_chips_per_level: int = Field(500, ge=2, description="Real chips per level for the level classifier and the "
                                     "per-level FID.")
    images_per_level: int = Field(20, ge=1, description="Images generated at each level for level accuracy.")
    level_classifier: ClassifierParams = Field(default_factory=lambda: ClassifierParams.model_validate({}))
    decontamination_shards: str | None = Field(None, description="Training shards checked for the test images "
                                               "(brace pattern, glob or list); null: train.shards.")
    max_hamming: int = Field(4, ge=0, le=16, description="Perceptual-hash bits (of 64) within which a training "
                             "image counts as a near duplicate of a test image.")
    cache_dir: str = Field(".text2earth/cache/eval", description="Per-shard image hashes (decontamination).")

    @model_validator(mode="after")
    def _levels(self) -> EvaluateParams:
        bad = [v for v in self.levels if not 1 <= v <= 23]
        if bad:
            raise ValueError(f"levels must lie in 1..23, got {bad}")
        return self


def load_evaluate_params(params_path: Path, overrides: dict[str, Any] | None = None) -> tuple[EvaluateParams, Any]:
    """The `evaluate:` section (with overrides) and the `train:` section it decontaminates against."""
    from model.config import load_train_params

    data = read_params_file(params_path)
    section = data.get("evaluate") or {}
    if not isinstance(section, dict):
        raise ParamsError(f"{params_path}: evaluate: expected a mapping of settings")
    section = {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return validate_section(EvaluateParams, section, str(params_path), "evaluate"), load_train_params(params_path)
