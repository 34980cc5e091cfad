"""What one training step computes, as pure functions: its seeded random draws, DCA and the loss.

Every random draw of a step (noise, timesteps, DCA drops, inpainting masks) comes from a generator seeded by
(seed, batch index, rank), so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.config import NULL_LEVEL, InpaintParams

__all__ = ["StepDraws", "apply_dca", "dca_masks", "diffusion_loss", "inpaint_masks", "step_draws", "step_seed"]

MASK_STREAM = 1  # the inpainting masks' entropy word next to the step seed


def step_seed(seed: int, batch_index: int, rank: int) -> int:
    """A 63-bit seed for one batch of one process, independent of how the run was split into resumptions."""
    words = np.random.SeedSequence([seed % 2**64, batch_index, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def dca_masks(batch_size: int, p_text: float, p_res: float, generator: torch.Generator,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic condition adaptation: per sample, independently, drop the text with p_text, the level with p_res."""
    drop_text = torch.rand(batch_size, generator=generator) < p_text
    drop_res = torch.rand(batch_size, generator=generator) < p_res
    return drop_text, drop_res


@dataclass(frozen=True)
class StepDraws:
    """Everything random in one batch's loss, drawn on the CPU so every device sees the same numbers."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    drop_text: torch.Tensor
    drop_res: torch.Tensor


def step_draws(seed: int, latent_shape: tuple[int, ...], *, num_train_timesteps: int, p_text: float,
               p_res: float, noise_offset: float = 0.0) -> StepDraws:
    """Noise (with the optional per-channel offset), timesteps and DCA drops from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    batch = latent_shape[0]
    noise = torch.randn(latent_shape, generator=generator)
    if noise_offset:
        # a constant shift per image and channel teaches the model to change overall brightness (Guttenberg)
        noise += noise_offset * torch.randn((*latent_shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    drop_text, drop_res = dca_masks(batch, p_text, p_res, generator)
    return StepDraws(noise, timesteps, drop_text, drop_res)


def inpaint_masks(seed: int, batch: int, height: int, width: int, settings: InpaintParams) -> torch.Tensor:
    """The batch's random inpainting masks (B x 1 x H x W, 1 = repaint), from the step's seed.

    numpy draws them from its own stream of the seed, so adding masks changes no other draw of the step.
    """
    from model.masks import random_masks

    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, MASK_STREAM]))
    return torch.from_numpy(random_masks(rng, batch, height, width, kinds=settings.mask_kinds,
                                         max_shapes=settings.max_shapes, p_full=settings.p_full_mask))


def apply_dca(text_embeds: torch.Tensor, null_text_embeds: torch.Tensor, levels: torch.Tensor,
              drop_text: torch.Tensor, drop_res: torch.Tensor, *, gsd_m: torch.Tensor | None = None,
              metadata: Mapping[str, torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Replace dropped texts by the empty prompt's embedding and dropped levels by 0 (unknown).

    The GSD and any metadata drop with the level: the sampler's unconditional branch nulls all of them
    together, so that is the combination the model must learn.
    """
    device = text_embeds.device
    drop_text, drop_res = drop_text.to(device), drop_res.to(device)
    text = torch.where(drop_text[:, None, None], null_text_embeds.to(text_embeds.dtype).expand_as(text_embeds),
                       text_embeds)
    levels = torch.where(drop_res, torch.full_like(levels, NULL_LEVEL), levels)
    nan = torch.tensor(math.nan, device=device)
    gsd = None if gsd_m is None else torch.where(drop_res, nan, gsd_m)
    meta = None if metadata is None else {k: torch.where(drop_res, nan, v) for k, v in metadata.items()}
    return text, levels, gsd, meta


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                   snr_gamma: float | None) -> torch.Tensor:
    """MSE to the target, each sample weighted by min(SNR, gamma) / SNR (Hang et al. 2023) unless gamma is None.

    The weighting stops the many easy low-noise timesteps from dominating the gradient; for v-prediction the
    denominator is SNR + 1.
    """
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps.to(model_pred.device))
    weight = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = weight / (snr + 1)
    else:
        weight = weight / snr
    return (per_sample * weight).mean()
