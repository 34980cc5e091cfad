"""Text2EarthPipeline: text- and resolution-guided generation with joint classifier-free guidance.

One guidance term nulls both conditions (the paper's dynamic condition adaptation):
eps = eps(null text, null level) + s * (eps(text, level) - eps(null text, null level)), s = 1 + omega.
Text-only generation leaves the level null (0); resolution-only generation uses the empty prompt. The
released checkpoint's `"{level}_GOOGLE_LEVEL_{caption}"` prompts still work: the prefix becomes the level.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import PreTrainedModel

from model.autoencoder import decode, downsample_factor
from model.config import MAX_LEVEL, NULL_LEVEL, gsd_level
from model.unet import predict_noise, unet_conditioning
from pipeline.errors import Text2EarthError

__all__ = [
    "GenerationInputError",
    "PromptConditions",
    "Text2EarthPipeline",
    "Text2EarthPipelineOutput",
    "split_level_prefix",
]

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
LEVEL_PREFIX = re.compile(r"^\s*(\d+)_GOOGLE_LEVEL_(.*)$", re.DOTALL)


class GenerationInputError(Text2EarthError, ValueError):
    """An argument of a generation call is missing, inconsistent or out of range."""


@dataclass
class Text2EarthPipelineOutput(BaseOutput):
    """The images and the level each was generated at (0 = unknown), one per image."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    levels: list[int]


class PromptConditions(NamedTuple):
    """A call's conditions, one row per image: text (and null-branch text) embeddings, levels, GSD, metadata."""

    batch: int  # prompts; rows = batch * num_images_per_prompt
    text_embeds: torch.Tensor
    null_text_embeds: torch.Tensor | None  # None when guidance is off (s == 1)
    levels: torch.Tensor
    gsd_m: torch.Tensor
    metadata: dict[str, torch.Tensor] | None


def split_level_prefix(prompt: str) -> tuple[int | None, str]:
    """Split the released model's `"{level}_GOOGLE_LEVEL_{caption}"` prompt into (level, caption)."""
    match = LEVEL_PREFIX.match(prompt)
    if match is None:
        return None, prompt
    return int(match.group(1)), match.group(2)


def _whole(value: Any) -> bool:
    """An integer (Python, numpy or torch scalar), not a bool or a float that happens to be whole."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _per_prompt(value: Any, batch: int, name: str) -> list[Any]:
    """Broadcast a scalar to every prompt, or check that a list (or 1-D array/tensor) has one per prompt."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != batch:
            raise GenerationInputError(f"`{name}` has {len(value)} entries for {batch} prompts: give one per "
                                       "prompt or a single value")
        return list(value)
    return [value] * batch


def _load_component(directory: Path, library: str, class_name: str, dtype: torch.dtype | None) -> Any:
    """One saved component, by the library and class its model_index.json entry names."""
    component_class = getattr(importlib.import_module(library), class_name)
    options: dict[str, Any] = {}
    if dtype is not None and issubclass(component_class, PreTrainedModel):
        options["dtype"] = dtype
    elif dtype is not None and issubclass(component_class, nn.Module):
        options["torch_dtype"] = dtype
    return component_class.from_pretrained(directory, **options)


class Text2EarthPipeline(DiffusionPipeline):
    """Latent diffusion in the Stable Diffusion 2 layout whose UNet also takes the resolution level.

    Components: `vae` (AutoencoderKL, or the TAEF2 tiny autoencoder of the `tiny` size), `text_encoder`
    (CLIPTextModel), `tokenizer` (CLIPTokenizer), `unet` (level as `class_labels`, see `model.unet`) and any
    diffusers `scheduler`. Load the released `lcybuaa/Text2Earth` weights or our trained models with
    `Text2EarthPipeline.from_pretrained(dir)` (diffusers' own `DiffusionPipeline.from_pretrained` cannot find
    this class).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"  # type: ignore[assignment]  # None in the base class
    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler: Any

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, unet: UNet2DConditionModel,
                 scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
                        ) -> Text2EarthPipeline:
        """Load a pipeline directory: one we saved, the released Text2Earth, or any SD2-style checkpoint.

        Each of the five components is loaded with the class model_index.json names for it. We do this instead
        of diffusers because it finds a loader for a class outside diffusers (our TAEF2 autoencoder,
        `Text2EarthUNet`) only through base-class names imported into that class's module. Entries this pipeline
        does not take (the released `safety_checker`, `feature_extractor`) are ignored. Options: `torch_dtype`,
        and any component as a ready object (e.g. `scheduler=...`). A path that is no local directory (a hub id)
        goes to diffusers' own loader.
        """
        root = Path(pretrained_model_name_or_path)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            loaded: Text2EarthPipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            return loaded
        index = json.loads(index_path.read_text())
        dtype = kwargs.pop("torch_dtype", None)
        components = {name: kwargs.pop(name) for name in COMPONENTS if name in kwargs}
        if kwargs:
            raise TypeError(f"Text2EarthPipeline.from_pretrained({str(root)!r}): unsupported options "
                            f"{sorted(kwargs)}; it takes torch_dtype and the components {list(COMPONENTS)}")
        for name in COMPONENTS:
            if name in components:
                continue
            entry = index.get(name)
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
                raise Text2EarthError(f"{index_path}: no `{name}` component; a Text2Earth checkpoint needs "
                                      f"{list(COMPONENTS)}")
            components[name] = _load_component(root / name, entry[0], entry[1], dtype)
        return cls(**components)

    @property
    def vae_scale_factor(self) -> int:
        """How much smaller the latents are than the images (8 for SD2's KL autoencoder and TAEF2)."""
        return downsample_factor(self.vae)

    # --- conditions ------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                      device: torch.device | None = None) -> torch.Tensor:
        """CLIP text embeddings (last hidden state, 77 tokens, as SD2), each repeated `num_images_per_prompt`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = device or self._execution_device
        embeds: torch.Tensor = self.text_encoder(ids.to(device))[0]
        return embeds.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def resolve_levels(self, batch: int, resolution_level: int | Sequence[int | None] | None,
                       gsd_m: float | Sequence[float] | None, prefix_levels: Sequence[int | None] | None = None,
                       ) -> tuple[list[int], list[float]]:
        """Per-prompt (level, GSD in metres or nan): explicit level, else `gsd_m`, else the prompt prefix, else 0."""
        if resolution_level is not None and gsd_m is not None:
            raise GenerationInputError("give either `resolution_level` or `gsd_m`, not both")
        prefixes = list(prefix_levels or [None] * batch)
        fallback = [NULL_LEVEL if p is None else p for p in prefixes]  # a None entry keeps its prompt's prefix
        if resolution_level is not None:
            given = _per_prompt(resolution_level, batch, "resolution_level")
            wrong = [v for v in given if v is not None and not _whole(v)]
            if wrong:
                raise GenerationInputError(f"`resolution_level` takes whole levels ({NULL_LEVEL}..{MAX_LEVEL}) or "
                                           f"None, got {wrong}")
            levels = [fallback[i] if v is None else int(v) for i, v in enumerate(given)]
            gsds = [math.nan] * batch
        elif gsd_m is not None:
            given = _per_prompt(gsd_m, batch, "gsd_m")
            wrong = [g for g in given if g is not None and (isinstance(g, bool) or not isinstance(g, Real)
                                                            or not (math.isfinite(float(g)) and float(g) > 0))]
            if wrong:
                raise GenerationInputError(f"`gsd_m` must be positive metres per pixel (or None), got {wrong}")
            gsds = [math.nan if g is None else float(g) for g in given]
            levels = [fallback[i] if g is None else gsd_level(float(g)) for i, g in enumerate(given)]
        else:
            levels = fallback
            gsds = [math.nan] * batch
        bad_levels = [level for level in levels if not NULL_LEVEL <= level <= MAX_LEVEL]
        if bad_levels:
            raise GenerationInputError(f"resolution levels must lie in {NULL_LEVEL}..{MAX_LEVEL} "
                                       f"({NULL_LEVEL} = unknown), got {bad_levels}")
        return levels, gsds

    def prompt_conditions(self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None, *,
                          negative_prompt: str | list[str] | None, negative_prompt_embeds: torch.Tensor | None,
                          resolution_level: int | Sequence[int | None] | None,
                          gsd_m: float | Sequence[float] | None,
                          metadata: Mapping[str, float | Sequence[float]] | None, num_images_per_prompt: int,
                          guidance_scale: float, output_type: str, num_inference_steps: int | None = None,
                          generator: torch.Generator | list[torch.Generator] | None = None) -> PromptConditions:
        """Check the arguments every generation call shares and encode them, one row per image.

        The `"{L}_GOOGLE_LEVEL_"` prefix is split off each prompt (its level is used when neither
        `resolution_level` nor `gsd_m` is given); the null branch is the negative (else empty) prompt.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise GenerationInputError("give exactly one of `prompt` and `prompt_embeds`")
        if isinstance(prompt, list) and not prompt:
            raise GenerationInputError("`prompt` is an empty list: give at least one prompt")
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise GenerationInputError(f"`prompt_embeds` must be batch x tokens x width (3-D), got shape "
                                       f"{tuple(prompt_embeds.shape)}")
        if not math.isfinite(guidance_scale):
            raise GenerationInputError(f"`guidance_scale` must be a finite number (1 = no guidance, 4 = the "
                                       f"paper's), got {guidance_scale}")
        if num_inference_steps is not None and not (_whole(num_inference_steps) and num_inference_steps >= 1):
            raise GenerationInputError(f"`num_inference_steps` must be a whole number >= 1, got "
                                       f"{num_inference_steps!r}")
        if num_images_per_prompt < 1:
            raise GenerationInputError(f"`num_images_per_prompt` must be at least 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise GenerationInputError(f"`output_type` must be pil, np, pt or latent, got {output_type!r}")
        conditioning = unet_conditioning(self.unet)
        taken = conditioning.metadata if conditioning else []
        if unknown := sorted(set(metadata or {}) - set(taken)):
            raise GenerationInputError(f"`metadata` names {unknown}, which this UNet does not take; it takes {taken}")
        captions: list[str] = []
        prefix_levels: list[int | None] | None = None
        if prompt is not None:
            split = [split_level_prefix(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
            prefix_levels = [level for level, _ in split]
            captions = [caption for _, caption in split]
            batch = len(captions)
        else:
            assert prompt_embeds is not None
            batch = prompt_embeds.shape[0]
        levels, gsds = self.resolve_levels(batch, resolution_level, gsd_m, prefix_levels)
        device, n = self._execution_device, num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch * n:
            raise GenerationInputError(f"{len(generator)} generators for {batch * n} images ({batch} prompt(s) x "
                                       f"{n} per prompt): give one generator per image, or a single one")

        if prompt_embeds is None:
            text_embeds = self.encode_prompt(captions, n, device)
        else:
            text_embeds = prompt_embeds.to(device, self.unet.dtype).repeat_interleave(n, dim=0)
        null_text_embeds = None
        if guidance_scale != 1:
            if negative_prompt_embeds is not None:
                null_text_embeds = negative_prompt_embeds.to(device, self.unet.dtype).repeat_interleave(n, dim=0)
            else:
                negatives = _per_prompt(negative_prompt or "", batch, "negative_prompt")
                null_text_embeds = self.encode_prompt(negatives, n, device)
            if null_text_embeds.shape != text_embeds.shape:
                raise GenerationInputError(f"negative prompt embeddings {tuple(null_text_embeds.shape)} do not "
                                           f"match the prompt embeddings {tuple(text_embeds.shape)}")
        metadata_rows = None if metadata is None else {
            name: torch.tensor(_per_prompt(value, batch, f"metadata[{name!r}]"), dtype=torch.float32,
                               device=device).repeat_interleave(n) for name, value in metadata.items()}
        return PromptConditions(batch, text_embeds, null_text_embeds,
                                torch.tensor(levels, device=device).repeat_interleave(n),
                                torch.tensor(gsds, device=device).repeat_interleave(n), metadata_rows)

    # --- one denoising step ----------------------------------------------------------------------------------

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor | int, text_embeds: torch.Tensor,
                      levels: torch.Tensor, *, gsd_m: torch.Tensor | None = None,
                      metadata: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One UNet call: the noise predicted under these text embeddings and levels (0 = null)."""
        return predict_noise(self.unet, latents, t, text_embeds, levels, gsd_m=gsd_m, metadata=metadata)

    def guided_noise(self, latents: torch.Tensor, t: torch.Tensor | int, text_embeds: torch.Tensor,
                     levels: torch.Tensor, null_text_embeds: torch.Tensor | None, guidance_scale: float, *,
                     gsd_m: torch.Tensor | None = None, metadata: Mapping[str, torch.Tensor] | None = None,
                     batch_guidance: bool = True) -> torch.Tensor:
        """Joint guidance eps_u + s * (eps_c - eps_u), eps_u with null text and null level (and metadata).

        s == 1 (or no null text) is the conditional prediction alone, so the unconditional pass is skipped.
        `batch_guidance`: both branches as one batch of twice the size (fewer, larger kernels: faster where the
        device is not saturated) or as two passes (half the peak activation memory); equal up to float rounding.
        """
        if guidance_scale == 1 or null_text_embeds is None:
            return self.predict_noise(latents, t, text_embeds, levels, gsd_m=gsd_m, metadata=metadata)
        null_levels = torch.full_like(levels, NULL_LEVEL)
        null_gsd = None if gsd_m is None else torch.full_like(gsd_m, math.nan)
        null_metadata = None if metadata is None else {
            name: torch.full_like(value, math.nan) for name, value in metadata.items()}
        if batch_guidance:
            both_gsd = None if gsd_m is None or null_gsd is None else torch.cat([null_gsd, gsd_m])
            both_metadata = None if metadata is None or null_metadata is None else {
                name: torch.cat([null_metadata[name], value]) for name, value in metadata.items()}
            noise = self.predict_noise(torch.cat([latents, latents]), t, torch.cat([null_text_embeds, text_embeds]),
                                       torch.cat([null_levels, levels]), gsd_m=both_gsd, metadata=both_metadata)
            unconditional, conditional = noise.chunk(2)
        else:
            unconditional = self.predict_noise(latents, t, null_text_embeds, null_levels, gsd_m=null_gsd,
                                               metadata=null_metadata)
            conditional = self.predict_noise(latents, t, text_embeds, levels, gsd_m=gsd_m, metadata=metadata)
        return unconditional + guidance_scale * (conditional - unconditional)

    # --- generation ------------------------------------------------------------------------------------------

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        """Pass the generator to schedulers whose step draws noise (DDPM, DDIM with eta), nothing to others."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted else {}

    def _check_size(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height < multiple or width < multiple:
            raise GenerationInputError(f"height and width must be positive multiples of {multiple}, got "
                                       f"{height}x{width}")
        if height % multiple or width % multiple:
            raise GenerationInputError(f"height and width must be multiples of {multiple}, got {height}x{width}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        resolution_level: int | list[int | None] | None = None,
        gsd_m: float | list[float] | None = None,
        height: int = 256,
        width: int = 256,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        metadata: Mapping[str, float | Sequence[float]] | None = None,
        batch_guidance: bool = True,
    ) -> Text2EarthPipelineOutput | tuple[Any, list[int]]:
        """Generate images for prompts at resolution levels.

        `resolution_level` (int, or one per prompt; 0 = unknown) or `gsd_m` (metres per pixel, mapped to the
        nearest level, or used directly by a log-GSD model) set the resolution; without either, a
        `"{level}_GOOGLE_LEVEL_"` prefix on the prompt does. `guidance_scale` is s = 1 + omega (4 is the paper's
        best); 1 skips the unconditional pass. `negative_prompt` replaces the empty prompt of the unconditional
        branch, whose level stays 0. `metadata` ({"lon": ..., "lat": ..., "month": ...}) feeds a UNet built with
        metadata embeddings. `output_type`: "pil", "np", "pt" or "latent". `batch_guidance`: the two guidance
        branches as one doubled UNet batch (default) or two passes (see `guided_noise`).
        """
        # 1. check the inputs and encode the conditions (one row per image)
        self._check_size(height, width)
        if self.unet.config.in_channels != self.unet.config.out_channels:
            raise GenerationInputError(
                f"this UNet takes {self.unet.config.in_channels} input channels for {self.unet.config.out_channels} "
                "output channels: an inpainting model; load it with Text2EarthInpaintPipeline (`text2earth edit`)")
        cond = self.prompt_conditions(prompt, prompt_embeds, negative_prompt=negative_prompt,
                                      negative_prompt_embeds=negative_prompt_embeds,
                                      resolution_level=resolution_level, gsd_m=gsd_m, metadata=metadata,
                                      num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                                      output_type=output_type, num_inference_steps=num_inference_steps,
                                      generator=generator)
        device = self._execution_device
        text_embeds = cond.text_embeds

        # 2. prepare latents
        shape = (text_embeds.shape[0], self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=text_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise GenerationInputError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents.to(device, text_embeds.dtype) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator)

        # 3. denoise
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            noise = self.guided_noise(model_input, t, text_embeds, cond.levels, cond.null_text_embeds, guidance_scale,
                                      gsd_m=cond.gsd_m, metadata=cond.metadata, batch_guidance=batch_guidance)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

        # 4. decode
        images: Any = latents
        if output_type != "latent":
            decoded = decode(self.vae, latents.to(self.vae.dtype))
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        image_levels = cond.levels.tolist()
        if not return_dict:
            return images, image_levels
        return Text2EarthPipelineOutput(images=images, levels=image_levels)
