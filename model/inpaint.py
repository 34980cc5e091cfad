"""Editing by inpainting: a UNet that also sees a mask and the masked image, and the pipeline that runs it.

The inpainting UNet takes 2C + 1 channels, in Stable Diffusion's inpainting order [noisy latent (C), mask (1),
masked-image latent (C)] (9 for SD2's 4-channel latent, 65 for TAEF2's 32). It starts as a copy of the trained
text-to-image UNet, resolution embedding included, whose new input weights are zero: before training it predicts
exactly what the text-to-image model does. `prepare_inpaint_inputs` builds the extra channels the same way for
training and for sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from model.autoencoder import decode, downsample_factor, encode
from model.masks import mask_array
from model.pipeline import (
    GenerationInputError,
    Text2EarthPipeline,
    Text2EarthPipelineOutput,
)
from pipeline.errors import ParamsError, Text2EarthError

__all__ = [
    "InpaintInputs",
    "InpaintModelError",
    "Text2EarthInpaintPipeline",
    "image_tensor",
    "inpaint_model_input",
    "inpaint_unet_from",
    "is_inpaint_unet",
    "prepare_inpaint_inputs",
]


class InpaintModelError(Text2EarthError, ValueError):
    """A model is not (or cannot become) an inpainting model."""


# --- the UNet ---------------------------------------------------------------------------------------------------


def is_inpaint_unet(unet: Any) -> bool:
    """Whether a UNet takes [latent, mask, masked-image latent] (2C + 1 input channels for C output channels)."""
    return int(unet.config["in_channels"]) == 2 * int(unet.config["out_channels"]) + 1


def inpaint_unet_from(unet: Any) -> Any:
    """A copy of a text-to-image UNet that takes 2C + 1 input channels, the new ones weighted zero.

    Everything else (class, resolution embedding, metadata extras, weights) is copied, so at initialisation the
    output equals the text-to-image UNet's whatever the mask and masked image hold; training then learns to use
    them. The copy keeps the original's device, dtype and train/eval mode.
    """
    channels = int(unet.config["in_channels"])
    if channels != int(unet.config["out_channels"]):
        raise InpaintModelError(f"expected a text-to-image UNet (as many input as output channels), got "
                                f"{channels} in, {unet.config['out_channels']} out"
                                + (" (already an inpainting UNet)" if is_inpaint_unet(unet) else ""))
    widened = copy.deepcopy(unet)
    old = unet.conv_in
    conv = nn.Conv2d(2 * channels + 1, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                     padding=old.padding, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :channels] = old.weight
        if old.bias is not None and conv.bias is not None:
            conv.bias.copy_(old.bias)
    widened.conv_in = conv
    widened.register_to_config(in_channels=2 * channels + 1)
    return widened


# --- inputs shared by training and sampling ---------------------------------------------------------------------


class InpaintInputs(NamedTuple):
    """The extra UNet inputs: the mask on the latent grid (B x 1 x h x w) and the masked image's latents."""

    latent_mask: torch.Tensor
    masked_image_latents: torch.Tensor


def prepare_inpaint_inputs(vae: Any, pixels: torch.Tensor, mask: torch.Tensor, *, sample: bool = False,
                           generator: torch.Generator | None = None) -> InpaintInputs:
    """Mask (B x 1 x H x W in [0, 1], 1 = repaint) and images (B x 3 x H x W in [-1, 1]) to the UNet's extras.

    The masked image is `pixels * (1 - mask)` (repainted pixels become mid-grey, soft ones fade towards it),
    encoded like any image. The mask reaches the latent grid by max-pooling: a latent cell touched by the mask
    is repainted, so the generated region covers every masked pixel and the final pixel composite restores the
    unmasked ones. `sample`: a KL autoencoder samples its posterior (training) or takes its mode (sampling).
    """
    factor = downsample_factor(vae)
    height, width = pixels.shape[-2:]
    if tuple(mask.shape[-2:]) != (height, width) or height % factor or width % factor:
        raise GenerationInputError(f"mask {tuple(mask.shape[-2:])} and image {(height, width)} must have the same "
                                   f"size, a multiple of {factor}")
    mask = mask.to(pixels.device, pixels.dtype)
    masked_latents = encode(vae, pixels * (1 - mask), sample=sample, generator=generator)
    latent_mask = F.max_pool2d(mask, kernel_size=factor).to(masked_latents.dtype)
    return InpaintInputs(latent_mask, masked_latents)


def inpaint_model_input(latents: torch.Tensor, inputs: InpaintInputs) -> torch.Tensor:
    """The UNet input in Stable Diffusion's inpainting order: [noisy latent, mask, masked-image latent]."""
    return torch.cat([latents, inputs.latent_mask.to(latents.dtype), inputs.masked_image_latents.to(latents.dtype)],
                     dim=1)


def image_tensor(image: Any, *, source: str = "image") -> torch.Tensor:
    """An image as B x 3 x H x W float32 in [-1, 1]: a PIL image, an H x W x 3 array (uint8, or float in 0..1),
    a 3 x H x W / B x 3 x H x W tensor already in [-1, 1], or a list of these (one per prompt)."""
    if isinstance(image, list | tuple):
        return torch.cat([image_tensor(item, source=source) for item in image])
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise GenerationInputError(f"{source}: expected an H x W x 3 array, got shape {image.shape}")
        values = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # a copy: arrays may be read-only
        if image.dtype == np.uint8:
            return values.float() / 127.5 - 1
        values = values.float()
        if values.numel() and not (0 <= float(values.min()) and float(values.max()) <= 1):
            raise GenerationInputError(f"{source}: a float array must hold values in 0..1 (uint8: 0..255)")
        return values * 2 - 1
    if isinstance(image, torch.Tensor):
        values = image[None] if image.ndim == 3 else image
        if values.ndim != 4 or values.shape[1] != 3:
            raise GenerationInputError(f"{source}: expected a 3 x H x W or B x 3 x H x W tensor, got "
                                       f"{tuple(image.shape)}")
        values = values.float()
        if values.numel() and not (-1.001 <= float(values.min()) and float(values.max()) <= 1.001):
            raise GenerationInputError(f"{source}: a tensor must hold values in -1..1")
        return values.clamp(-1, 1)
    raise GenerationInputError(f"{source}: expected a PIL image, numpy array or torch tensor, got {type(image)}")


def _mask_tensor(mask_image: Any, size: tuple[int, int]) -> torch.Tensor:
    """User mask(s) as B x 1 x H x W float32, each resized to `size` (width, height) when only the scale differs."""
    items = list(mask_image) if isinstance(mask_image, list | tuple) else [mask_image]
    return torch.stack([torch.from_numpy(mask_array(item, size, source="mask_image"))[None] for item in items])


def _per_prompt_rows(values: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """One image or mask for every prompt, or one each: one row per prompt."""
    if values.shape[0] not in (1, batch):
        raise GenerationInputError(f"`{name}` holds {values.shape[0]} entries for {batch} prompts: give one, or "
                                   "one per prompt")
    return values.expand(batch, *values.shape[1:])


# --- the pipeline -----------------------------------------------------------------------------------------------


class Text2EarthInpaintPipeline(Text2EarthPipeline):
    """Repaint the masked part of an image from a prompt at a resolution level; the rest stays as it is.

    The same five components as `Text2EarthPipeline` (prompt encoding, levels, the `"{L}_GOOGLE_LEVEL_"`
    prefix, joint guidance and schedulers are shared), with an inpainting UNet (`inpaint_unet_from`, trained
    by `text2earth train --task inpaint`). Each step the known region is put back (noised to the step's
    level) in latent space, so the repainted part grows to fit it; the decoded image is finally blended with
    the input by the mask, so unmasked pixels are the input's and soft masks blend. Load with
    `Text2EarthInpaintPipeline.from_pretrained(dir)`.
    """

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, unet: Any, scheduler: Any) -> None:
        if unet is not None and not is_inpaint_unet(unet):
            raise InpaintModelError(
                f"this UNet takes {unet.config['in_channels']} input channels; an inpainting UNet takes "
                f"2 x {unet.config['out_channels']} + 1 (latent, mask, masked-image latent). This looks like a "
                "text-to-image model: train an inpainting one with `text2earth train --task inpaint`")
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    def _timesteps(self, num_inference_steps: int, strength: float, device: torch.device) -> torch.Tensor:
        """The schedule's last `strength` share of steps (diffusers' image-to-image convention)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        start = (num_inference_steps - kept) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        timesteps: torch.Tensor = self.scheduler.timesteps[start:]
        if len(timesteps) == 0:
            raise GenerationInputError(f"strength {strength} leaves no step of {num_inference_steps}: raise "
                                       "`strength` or `num_inference_steps`")
        return timesteps

    @torch.no_grad()
    def __call__(  # type: ignore[override]  # takes an image and a mask; no height/width
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        resolution_level: int | list[int | None] | None = None,
        gsd_m: float | list[float] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        metadata: Mapping[str, float | Sequence[float]] | None = None,
        composite: bool = True,
        batch_guidance: bool = True,
    ) -> Text2EarthPipelineOutput | tuple[Any, list[int]]:
        """Repaint `mask_image` (white = repaint, black = keep, grey = blend) of `image` following the prompt.

        `image`: PIL, H x W x 3 array or [-1, 1] tensor (or one per prompt); its size sets the output size.
        `mask_image`: greyscale PIL image or H x W array in 0..1 (or one per prompt), resized when only its
        scale differs. `strength` < 1 starts from the noised input instead of pure noise, keeping its layout
        in the masked region. `composite=False` returns the decoder's output everywhere (unmasked pixels then
        differ from the input by the autoencoder's round-trip error). `latents` is the starting noise. The rest
        is as `Text2EarthPipeline.__call__`: level or `gsd_m` (or the prompt prefix), joint guidance s,
        `batch_guidance`.
        """
        # 1. check the inputs and encode the conditions (one row per image)
        if image is None or mask_image is None:
            raise GenerationInputError("inpainting needs both `image` and `mask_image`")
        if not 0 < strength <= 1:
            raise GenerationInputError(f"`strength` must lie in (0, 1], got {strength}")
        pixels = image_tensor(image)
        height, width = pixels.shape[-2:]
        self._check_size(height, width)
        masks = _mask_tensor(mask_image, (width, height))
        cond = self.prompt_conditions(prompt, prompt_embeds, negative_prompt=negative_prompt,
                                      negative_prompt_embeds=negative_prompt_embeds,
                                      resolution_level=resolution_level, gsd_m=gsd_m, metadata=metadata,
                                      num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                                      output_type=output_type, num_inference_steps=num_inference_steps,
                                      generator=generator)
        device, n, dtype = self._execution_device, num_images_per_prompt, cond.text_embeds.dtype

        # 2. the known image: its pixels, mask and latents, one row per image
        pixels = _per_prompt_rows(pixels, cond.batch, "image").to(device)
        masks = _per_prompt_rows(masks, cond.batch, "mask_image").to(device)
        inputs = prepare_inpaint_inputs(self.vae, pixels, masks)  # once per prompt, then once per image
        inputs = InpaintInputs(*(x.to(dtype).repeat_interleave(n, dim=0) for x in inputs))
        image_latents = encode(self.vae, pixels, sample=False).to(dtype).repeat_interleave(n, dim=0)
        pixels, masks = pixels.repeat_interleave(n, dim=0), masks.repeat_interleave(n, dim=0)

        # 3. prepare the timesteps and the starting latents
        timesteps = self._timesteps(num_inference_steps, strength, device)
        shape = tuple(image_latents.shape)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise GenerationInputError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        else:
            noise = latents.to(device, dtype)
        if strength < 1:
            latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(shape[0]))
        else:
            latents = noise * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator)
        keep = 1 - inputs.latent_mask

        # 4. denoise, putting the known region back (noised to the next step's level) after every step
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = inpaint_model_input(self.scheduler.scale_model_input(latents, t), inputs)
            noise_pred = self.guided_noise(model_input, t, cond.text_embeds, cond.levels, cond.null_text_embeds,
                                           guidance_scale, gsd_m=cond.gsd_m, metadata=cond.metadata,
                                           batch_guidance=batch_guidance)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            known = image_latents
            if i < len(timesteps) - 1:
                known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
            latents = keep * known + inputs.latent_mask * latents

        # 5. decode and paste the input back outside the mask
        images: Any = latents
        if output_type != "latent":
            decoded = decode(self.vae, latents.to(self.vae.dtype)).float()
            if composite:
                decoded = pixels.float() * (1 - masks) + decoded * masks
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        image_levels = cond.levels.tolist()
        if not return_dict:
            return images, image_levels
        return Text2EarthPipelineOutput(images=images, levels=image_levels)


def masked_preview(image: torch.Tensor, mask: torch.Tensor) -> PIL.Image.Image:
    """The input with the masked region greyed out, as a PIL image (for grids and reports)."""
    grey = image[:1].float() * (1 - mask[:1].float())
    array = ((grey[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return PIL.Image.fromarray(array)


def check_inpaint_model_dir(model: str | Path) -> Path:
    """The folder of an inpainting model, or a clear error saying how to make one."""
    model_dir = Path(model)
    if not (model_dir / "model_index.json").is_file():
        raise InpaintModelError(f"no inpainting model in {model_dir} (no model_index.json): train one with "
                                "`text2earth train --task inpaint` (after the text-to-image model), or pass "
                                "--model DIR")
    return model_dir


# --- training -------------------------------------------------------------------------------------------------


def inpaint_components(params: Any) -> dict[str, Any]:
    """vae, text_encoder, tokenizer, unet and training scheduler of `train --task inpaint`.

    Everything comes from `train.inpaint.init_from` (default: the text-to-image model this params file trains):
    the frozen autoencoder and text encoder the UNet learned with, and the UNet itself, given the resolution
    embedding `train.conditioning` asks for (if it lacks one) and widened by `inpaint_unet_from`. A folder that
    already holds an inpainting pipeline continues from its UNet. `train.vae_path` overrides the autoencoder.
    """
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    from model.components import load_vae
    from model.config import resolve_task
    from model.unet import add_resolution_embedding

    params = resolve_task(params)
    source = Path(str(params.inpaint.init_from))
    if not (source / "model_index.json").is_file():
        raise ParamsError(f"train.inpaint.init_from: {source} holds no trained pipeline (no model_index.json); "
                          "train the text-to-image model first (`text2earth train`, or `dvc repro train`) or point "
                          "train.inpaint.init_from at one")
    pipeline: Any = Text2EarthPipeline.from_pretrained(source)
    unet = add_resolution_embedding(pipeline.unet, params.conditioning)
    return {
        "vae": load_vae(params) if params.vae_path else pipeline.vae,
        "text_encoder": pipeline.text_encoder,
        "tokenizer": pipeline.tokenizer,
        "unet": unet if is_inpaint_unet(unet) else inpaint_unet_from(unet),
        "scheduler": DDPMScheduler.from_config(pipeline.scheduler.config),
    }


def centre_box_mask(height: int, width: int) -> torch.Tensor:
    """1 x 1 x H x W: the middle half of each side masked (the validation grid's edit)."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4:height - height // 4, width // 4:width - width // 4] = 1
    return mask


def inpaint_validation_grid(pipeline: Any, image: torch.Tensor, mask: torch.Tensor, prompts: Sequence[str],
                            levels: Sequence[int], *, steps: int, guidance_scale: float, seed: int,
                            title: str = "") -> PIL.Image.Image:
    """The input and its masked version on the first row, then one row per prompt repainted at each level.

    Every cell starts from the same noise, so across a row only the level changes the repainted region.
    """
    from model.validation import compose_grid

    height, width = image.shape[-2:]
    noise = torch.randn((1, int(pipeline.unet.config["out_channels"]), height // pipeline.vae_scale_factor,
                         width // pipeline.vae_scale_factor), generator=torch.Generator().manual_seed(seed))
    original = masked_preview(image, torch.zeros_like(mask))
    blank = PIL.Image.new("RGB", original.size, "white")
    rows = [[original, masked_preview(image, mask), *[blank] * (len(levels) - 2)][:len(levels)]]
    for prompt in prompts:
        out: Any = pipeline([prompt] * len(levels), image=image[:1], mask_image=mask[0, 0],
                            resolution_level=list(levels), num_inference_steps=steps, guidance_scale=guidance_scale,
                            latents=noise.repeat(len(levels), 1, 1, 1), output_type="pil")
        rows.append(list(out.images))
    return compose_grid(rows, ["input, then masked (grey = repainted)", *prompts], levels, title)
