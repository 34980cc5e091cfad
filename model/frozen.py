"""The frozen parts of training: autoencoder and text encoder, the empty prompt's embedding, a latent cache."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Frozen", "LatentCache", "encode_text", "is_deterministic_autoencoder", "null_text_ids",
           "prepare_frozen"]

LATENT_CACHE_BYTES = 2 * 1024**3  # latents kept per process; a sample run's few hundred chips need ~40 MB


class LatentCache:
    """Latents of chips already encoded, keyed by a digest of the augmented pixels.

    A small data set repeats its chips every few steps, and on a CPU the autoencoder costs more than the tiny
    UNet's step, so each distinct chip (per crop and flip) is encoded once. Misses are encoded one image at a
    time: a latent then never depends on which other chips shared its batch, which keeps resumed runs exact.
    Only deterministic autoencoders (TAEF2, no sampling) may be cached.
    """

    def __init__(self, vae: Any, max_bytes: int = LATENT_CACHE_BYTES) -> None:
        self.vae = vae
        self.max_bytes = max_bytes
        self.latents: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Latents of a batch, from the cache where possible."""
        from model.autoencoder import encode

        out = []
        for image in pixel_values:
            digest = hashlib.blake2b(image.detach().cpu().numpy().tobytes(), digest_size=16).digest()
            latent = self.latents.get(digest)
            if latent is None:
                self.misses += 1
                latent = encode(self.vae, image[None])[0]
                if self.bytes + latent.numel() * latent.element_size() <= self.max_bytes:
                    self.latents[digest] = latent
                    self.bytes += latent.numel() * latent.element_size()
            else:
                self.hits += 1
            out.append(latent)
        return torch.stack(out)


def is_deterministic_autoencoder(vae: Any) -> bool:
    """Whether encoding is a plain function of the pixels (tiny autoencoders) rather than a sample (KL)."""
    from diffusers import AutoencoderTiny

    return isinstance(vae, AutoencoderTiny)


@torch.no_grad()
def encode_text(text_encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's last hidden state, as the pipeline's `encode_prompt` computes it."""
    embeds: torch.Tensor = text_encoder(input_ids.to(text_encoder.device))[0]
    return embeds


def null_text_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids of the empty prompt (the null text of DCA and of the sampler's unconditional branch)."""
    ids: torch.Tensor = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    return ids


@dataclass
class Frozen:
    """The parts that do not train and what the loss needs from them."""

    vae: Any
    text_encoder: Any
    null_text: torch.Tensor  # 1 x 77 x D
    latent_cache: LatentCache | None


def prepare_frozen(components: Mapping[str, Any], device: torch.device, cache_latents: bool) -> Frozen:
    """Freeze the autoencoder and text encoder on the device, embed the empty prompt, set up the latent cache."""
    vae, text_encoder = components["vae"], components["text_encoder"]
    for module in (vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device)  # kept in float32 (mixed precision runs them under autocast) so the export is exact
    null_text = encode_text(text_encoder, null_text_ids(components["tokenizer"]))
    cache = LatentCache(vae) if cache_latents and is_deterministic_autoencoder(vae) else None
    return Frozen(vae, text_encoder, null_text, cache)
