"""The five parts of a Text2Earth model, built from a size preset or loaded from a pretrained checkpoint.

Training and the tests both start here: `build_components(params)` returns the autoencoder, text encoder,
tokenizer, UNet and the training noise schedule (1000-step scaled-linear, epsilon prediction, as SD2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from model.autoencoder import build_sd2_vae, load_taef2
from model.config import TAEF2_DIR, TEXT_PRESETS, TrainParams
from model.pipeline import Text2EarthPipeline
from model.tokenizer import clip_tokenizer
from model.unet import add_resolution_embedding, build_unet
from pipeline.errors import ParamsError

__all__ = ["build_components", "load_vae", "training_scheduler"]


def training_scheduler() -> DDPMScheduler:
    """Stable Diffusion 2's training schedule: 1000 steps, scaled-linear betas 0.00085..0.012, epsilon."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon", clip_sample=False)


def load_vae(params: TrainParams) -> Any:
    """The size's autoencoder: TAEF2 (pretrained, in the repo) for `tiny`, SD2's KL autoencoder for `base`.

    `vae_path` overrides: TAEF2 weights for `tiny`; a diffusers AutoencoderKL directory (or a pipeline
    directory with a `vae/` subfolder) for `base` and for any `pretrained` start. Without it `base` gets random
    weights, a meaningless latent space fit only for benchmarks.
    """
    if params.size == "tiny":
        return load_taef2(Path(params.vae_path) if params.vae_path else TAEF2_DIR)
    if params.vae_path is None:
        return build_sd2_vae()
    return _load_kl_vae(Path(params.vae_path))


def _load_kl_vae(path: Path) -> AutoencoderKL:
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path)
    if (path / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, subfolder="vae")
    raise ParamsError(f"train.vae_path: {path} holds no AutoencoderKL (no config.json there nor in vae/); "
                      "point it at a diffusers autoencoder directory or set it to null")


def build_components(params: TrainParams) -> dict[str, Any]:
    """vae, text_encoder, tokenizer, unet and scheduler for training: from scratch, or from `params.pretrained`.

    From scratch the UNet and text encoder are random at the size's preset; the tokenizer is always CLIP's
    BPE (built offline). A pretrained directory (SD2-base layout, the released Text2Earth, or one of ours)
    keeps its architecture; its UNet gains the resolution embedding starting at zero if it lacks one.
    """
    if params.pretrained is not None:
        return _pretrained_components(params)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS[params.size]))
    return {
        "vae": load_vae(params),
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
        "unet": build_unet(params.size, params.conditioning),
        "scheduler": training_scheduler(),
    }


def _pretrained_components(params: TrainParams) -> dict[str, Any]:
    path = Path(str(params.pretrained))
    if not (path / "model_index.json").is_file():
        raise ParamsError(f"train.pretrained: {path} is not a diffusers pipeline directory (no model_index.json);"
                          " give an SD2-base layout directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    pipeline = Text2EarthPipeline.from_pretrained(path)
    # The checkpoint's sampling scheduler (PNDM, DDIM...) carries the training schedule in its config.
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    vae = _load_kl_vae(Path(params.vae_path)) if params.vae_path else pipeline.vae
    return {
        "vae": vae,
        "text_encoder": pipeline.text_encoder,
        "tokenizer": pipeline.tokenizer,
        "unet": add_resolution_embedding(pipeline.unet, params.conditioning),
        "scheduler": scheduler,
    }
