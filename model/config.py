"""Model sizes and the training knobs (`train:` in params.yaml), validated.

`tiny` trains on a laptop CPU in minutes (the sample run) in the latent space of the real, pretrained TAEF2
tiny autoencoder; `base` is the paper's Stable Diffusion 2 base layout (865M-parameter UNet, OpenCLIP ViT-H
text tower, 4-channel KL autoencoder). Both condition the UNet on the resolution level through
`class_embed_type="timestep"`. `task: inpaint` trains the editing model from a trained text-to-image one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import ParamsError
from pipeline.params import read_params_file, validate_section

NULL_LEVEL = 0  # Text2Earth's "unknown resolution"; real levels are 1..23 (10..18 in Git-10M)
MAX_LEVEL = 23
TAEF2_DIR = Path(__file__).resolve().parent / "weights" / "taef2"


def level_gsd_m(level: int) -> float:
    """Nominal GSD of a level: 2^(17 - level) m/px (Google zoom convention)."""
    return float(2.0 ** (17 - level))


def gsd_level(gsd_m: float) -> int:
    """The level whose nominal GSD is closest to `gsd_m` on a log scale, clipped to 1..MAX_LEVEL."""
    import math

    return int(min(MAX_LEVEL, max(1, round(17 - math.log2(gsd_m)))))


UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 32, "in_channels": 32, "out_channels": 32, "layers_per_block": 1,
        "block_out_channels": [64, 128], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 128,  # attention at 16x16 only
        "attention_head_dim": 8, "norm_num_groups": 32, "class_embed_type": "timestep",
    },
    "base": {  # Stable Diffusion 2 base (the released Text2Earth UNet)
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
        "class_embed_type": "timestep",
    },
}

TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 128, "hidden_act": "gelu"},
    "base": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
             "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1024, "hidden_act": "gelu"},
}

VAE_PRESETS: dict[str, str] = {"tiny": "taef2", "base": "sd2-kl"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditioningParams(_Strict):
    """How the resolution (and optional metadata) enter the UNet."""

    mode: Literal["level", "log_gsd"] = Field("level", description="`level`: the integer level through the "
                                              "timestep sinusoid (the paper); `log_gsd`: continuous log2 GSD.")
    metadata: list[Literal["lon", "lat", "month"]] = Field(default_factory=list, description="Extra values, each "
                                                            "with its own embedding MLP summed in (DiffusionSat).")
    learnable_null: bool = Field(False, description="Learn the null (unknown) embedding instead of level 0.")


Split = Literal["train", "val", "test"]
Task = Literal["text2image", "inpaint"]
MaskKind = Literal["box", "stroke", "blob"]


def _all_mask_kinds() -> list[MaskKind]:
    return ["box", "stroke", "blob"]


class InpaintParams(_Strict):
    """`train.inpaint:`: where the inpainting model (`--task inpaint`) starts and goes, and its training masks."""

    init_from: str | None = Field(None, description="Text-to-image pipeline whose UNet gains the mask and "
                                  "masked-image input channels (their weights start at zero) and whose autoencoder, "
                                  "text encoder and tokenizer are reused; an inpainting pipeline continues as it is. "
                                  "null: train.output_dir, the text-to-image model of this params file.")
    output_dir: str | None = Field(None, description="The inpainting pipeline; null: '{train.output_dir}-inpaint'.")
    checkpoint_dir: str | None = Field(None, description="null: '{train.checkpoint_dir}-inpaint'.")
    max_steps: int | None = Field(None, ge=1, description="null: train.max_steps. On a CPU a step costs about four "
                                  "text-to-image steps: every masked image is encoded afresh.")
    mask_kinds: list[MaskKind] = Field(default_factory=_all_mask_kinds, min_length=1,
                                       description="Random training mask shapes: boxes (objects), brush strokes, "
                                       "cloud-like soft blobs.")
    max_shapes: int = Field(3, ge=1, description="Each mask is the union of 1..max_shapes shapes.")
    p_full_mask: float = Field(0.1, ge=0, le=1, description="Share of samples masked entirely (plain generation).")


def _train_only() -> list[Split]:
    return ["train"]


class TrainParams(_Strict):
    """`train:` in params.yaml: what to train on, the model, the optimisation and the schedule."""

    task: Task = Field("text2image", description="`text2image`: the Text2Earth model; `inpaint`: the editing "
                       "model, started from the text-to-image one (see `inpaint`).")
    inpaint: InpaintParams = Field(default_factory=lambda: InpaintParams.model_validate({}))
    shards: str = Field("data/git10m/shards/git10m-{000000..000003}.tar", description="WebDataset shards "
                        "(brace pattern, list file or URL).")
    output_dir: str = Field("models/text2earth", description="The trained pipeline (save_pretrained layout).")
    checkpoint_dir: str = Field(".text2earth/work/train/checkpoints", description="Resumable checkpoints.")
    size: Literal["tiny", "base"] = "tiny"
    pretrained: str | None = Field(None, description="SD2-base layout directory to start from (the resolution "
                                   "MLP then starts at zero); null: from scratch with the size's config.")
    vae_path: str | None = Field(None, description="Autoencoder weights; null: TAEF2 in the repo for `tiny`.")
    conditioning: ConditioningParams = Field(default_factory=lambda: ConditioningParams(
        mode="level", metadata=[], learnable_null=False))
    splits: list[Split] = Field(default_factory=_train_only, description="Published splits to train on.")
    min_clip_score: float | None = None
    p_text_drop: float = Field(0.1, ge=0, le=1)
    p_res_drop: float = Field(0.1, ge=0, le=1)
    resolution: int = Field(256, ge=64)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(300, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(20, ge=0)
    adam_8bit: bool = False
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    channels_last: bool = Field(False, description="Keep the UNet's conv weights and activations in NHWC "
                                "(channels-last) order: cuDNN's tensor-core kernels run bf16/fp16 convolutions "
                                "in that layout without transposes. GPUs only; same results up to rounding.")
    ema: bool = True
    ema_decay: float = Field(0.999, gt=0, lt=1)
    snr_gamma: float | None = Field(5.0, description="min-SNR-gamma loss weighting; null: plain MSE.")
    noise_offset: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    validation_prompts: list[str] = Field(default_factory=lambda: ["a river through farmland"])
    validation_levels: list[int] = Field(default_factory=lambda: [10, 13, 15, 17])
    validation_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default).")

    @model_validator(mode="after")
    def _levels(self) -> TrainParams:
        bad = [v for v in self.validation_levels if not NULL_LEVEL <= v <= MAX_LEVEL]
        if bad:
            raise ValueError(f"validation_levels must lie in {NULL_LEVEL}..{MAX_LEVEL}, got {bad}")
        return self


def load_train_params(params_path: Path, overrides: dict[str, Any] | None = None) -> TrainParams:
    """The `train:` section with CLI overrides, validated (errors name the key and what is allowed)."""
    data = read_params_file(params_path)
    section = data.get("train") or {}
    if not isinstance(section, dict):
        raise ParamsError(f"{params_path}: train: expected a mapping of settings")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    params = validate_section(TrainParams, {**section, **overrides}, str(params_path), "train")
    if params.task == "inpaint" and "max_steps" in overrides:  # the command line wins over train.inpaint.max_steps
        params = params.model_copy(update={"inpaint": params.inpaint.model_copy(
            update={"max_steps": overrides["max_steps"]})})
    return resolve_task(params)


def resolve_task(params: TrainParams) -> TrainParams:
    """The params as the task runs them: for `inpaint`, its own output and checkpoint folders and its start.

    The inpainting model must never overwrite the text-to-image model it starts from, nor mix checkpoints with
    it, so `output_dir`/`checkpoint_dir` become `inpaint.output_dir`/`inpaint.checkpoint_dir` (default: the
    text-to-image folders + "-inpaint") and `inpaint.init_from` defaults to the text-to-image `output_dir`;
    `inpaint.max_steps`, where set, replaces `max_steps`. Applying it twice changes nothing.
    """
    if params.task != "inpaint":
        return params
    inpaint = params.inpaint.model_copy(update={
        "init_from": params.inpaint.init_from or params.output_dir,
        "output_dir": params.inpaint.output_dir or f"{params.output_dir}-inpaint",
        "checkpoint_dir": params.inpaint.checkpoint_dir or f"{params.checkpoint_dir}-inpaint",
        "max_steps": params.inpaint.max_steps or params.max_steps,
    })
    if Path(str(inpaint.output_dir)).resolve() == Path(str(inpaint.init_from)).resolve():
        raise ParamsError(f"train.inpaint.output_dir {inpaint.output_dir!r} is the model it starts from "
                          "(train.inpaint.init_from): give the inpainting model its own folder")
    return params.model_copy(update={"output_dir": inpaint.output_dir, "checkpoint_dir": inpaint.checkpoint_dir,
                                     "max_steps": inpaint.max_steps, "inpaint": inpaint})
