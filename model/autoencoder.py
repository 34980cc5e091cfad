"""The autoencoders between images and diffusion latents: SD2's KL VAE and the real pretrained TAEF2.

`encode` and `decode` hide each kind's conventions (KL posterior vs deterministic latents, scale and shift),
so training and the pipeline never branch on the VAE type. TAEF2 (madebyollin/taesd, MIT) is the tiny
autoencoder of the FLUX.2 latent space: 32 channels at 1/8 resolution, 1.3M parameters per half. It gives the
`tiny` model a real latent space on a CPU, because no Stable Diffusion VAE weights reach these machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # the modules, not `diffusers`: its
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny  # type stubs are dummies
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from model.config import TAEF2_DIR
from pipeline.errors import Text2EarthError

__all__ = [
    "SD2_VAE_CONFIG", "TAEF2_SCALING_FACTOR", "TAEF2_SHIFT_FACTOR", "ModelMixin", "PooledTinyBlock",
    "TAEF2Autoencoder", "WeightsNotFoundError", "build_sd2_vae", "decode", "downsample_factor", "encode",
    "latent_channels", "load_taef2", "taef2_state_dict",
]
# `ModelMixin` is exported on purpose: a pipeline's model_index.json names this module as the VAE's library,
# and DiffusionPipeline.from_pretrained looks up the loadable base classes (ModelMixin) by name in it.

TAEF2_ENCODER_FILE = "taef2_encoder.pth"
TAEF2_DECODER_FILE = "taef2_decoder.pth"

# TAEF2 emits the FLUX.2 VAE's raw 32-channel latent (before FLUX.2's 2x2 patchify and batch norm, whose
# statistics we do not have). Measured here on 126 real 256x256 chips from 10 sources (Landsat 7/8,
# Sentinel-2, NAIP, USGS and Korean aerial, RSICD, UCM, Sydney): mean 0.054 and std 0.80, within 0.03 and 0.05
# of that for every source. (z - 0.05) * 1.25 therefore gives the diffusion model ~unit-variance latents.
TAEF2_SHIFT_FACTOR = 0.05
TAEF2_SCALING_FACTOR = 1.25

# stabilityai/stable-diffusion-2-base vae/config.json (83.7M parameters); the weights are random here.
SD2_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


class WeightsNotFoundError(Text2EarthError, FileNotFoundError):
    """Autoencoder weights are missing where a path points."""


class PooledTinyBlock(AutoencoderTinyBlock):
    """TAEF2's residual block: a 1x1 "pool" branch (GroupNorm over 4x wider features) added before the convs.

    The branch gives the deepest blocks a per-group normalisation the plain TAESD block lacks; TAEF2 uses it
    on the last three encoder and the first three decoder blocks (taesd's `use_midblock_gn`).
    """

    def __init__(self, channels: int, act_fn: str, expansion: int = 4, groups: int = 4) -> None:
        super().__init__(channels, channels, act_fn)
        wide = channels * expansion
        self.pool = nn.Sequential(
            nn.Conv2d(channels, wide, kernel_size=1, bias=False),
            nn.GroupNorm(groups, wide),
            nn.ReLU(),
            nn.Conv2d(wide, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual pool, then the plain TAESD block."""
        return super().forward(x + self.pool(x))


class TAEF2Autoencoder(AutoencoderTiny):
    """diffusers' `AutoencoderTiny` with TAEF2's pooled blocks, saved and loaded like any diffusers model.

    `pool_blocks` is a config entry, so `save_pretrained`/`from_pretrained` (and a pipeline's `vae/`
    subfolder) rebuild the same architecture; `scaling_factor`/`shift_factor` default to the values measured
    on real imagery (see `TAEF2_SCALING_FACTOR`).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 32,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: int = 3,  # TAESD's uint8 quantisation range, not the diffusion scaling
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = TAEF2_SCALING_FACTOR,
        shift_factor: float = TAEF2_SHIFT_FACTOR,
        pool_blocks: int = 3,  # pooled blocks at the deep end of each half
        pool_expansion: int = 4,
        pool_groups: int = 4,
        block_out_channels: tuple[int, ...] | None = None,  # derived; accepted so saved configs load quietly
    ) -> None:
        super().__init__(
            in_channels=in_channels, out_channels=out_channels,
            encoder_block_out_channels=encoder_block_out_channels,
            decoder_block_out_channels=decoder_block_out_channels, act_fn=act_fn, upsample_fn=upsample_fn,
            latent_channels=latent_channels, upsampling_scaling_factor=upsampling_scaling_factor,
            num_encoder_blocks=num_encoder_blocks, num_decoder_blocks=num_decoder_blocks,
            latent_magnitude=latent_magnitude, latent_shift=latent_shift, force_upcast=force_upcast,
            scaling_factor=scaling_factor, shift_factor=shift_factor,
        )
        encoder_blocks = _block_indices(self.encoder.layers)
        decoder_blocks = _block_indices(self.decoder.layers)
        if not 0 <= pool_blocks <= min(len(encoder_blocks), len(decoder_blocks)):
            raise ValueError(f"pool_blocks must lie in 0..{min(len(encoder_blocks), len(decoder_blocks))}, "
                             f"got {pool_blocks}")
        # The deep end: the encoder's last blocks and the decoder's first ones (both at 1/8 resolution).
        for layers, indices in ((self.encoder.layers, encoder_blocks[len(encoder_blocks) - pool_blocks:]),
                                (self.decoder.layers, decoder_blocks[:pool_blocks])):
            for i in indices:
                first_conv = cast(nn.Conv2d, cast(nn.Sequential, layers[i].conv)[0])
                layers[i] = PooledTinyBlock(first_conv.out_channels, act_fn, pool_expansion, pool_groups)


def _block_indices(layers: nn.Sequential) -> list[int]:
    return [i for i, layer in enumerate(layers) if isinstance(layer, AutoencoderTinyBlock)]


def taef2_state_dict(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAESD-layout encoder/decoder state dicts renamed to `TAEF2Autoencoder` keys.

    The encoder's `nn.Sequential` indices match `encoder.layers` one to one. The TAESD decoder starts with a
    parameter-free Clamp module that diffusers' `DecoderTiny` applies in `forward` instead, so every decoder
    index moves down by one.
    """
    state = {f"encoder.layers.{key}": value for key, value in encoder.items()}
    for key, value in decoder.items():
        index, rest = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return state


def load_taef2(path: str | Path = TAEF2_DIR, dtype: torch.dtype = torch.float32) -> TAEF2Autoencoder:
    """The pretrained TAEF2, from the repo's `.pth` pair or a `save_pretrained` directory, in eval mode.

    Loading is strict: a missing or unexpected tensor raises instead of leaving random weights behind.
    """
    directory = Path(path)
    if (directory / "config.json").is_file():
        model = TAEF2Autoencoder.from_pretrained(directory)
        return (model.type(dtype) if dtype != torch.float32 else model).eval()
    files = [directory / TAEF2_ENCODER_FILE, directory / TAEF2_DECODER_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"TAEF2 weights not found: {', '.join(missing)}; point `vae_path` (train: in params.yaml) at a "
            f"directory holding {TAEF2_ENCODER_FILE} and {TAEF2_DECODER_FILE}, or at a save_pretrained directory"
        )
    encoder, decoder = (torch.load(f, map_location="cpu", weights_only=True) for f in files)
    model = TAEF2Autoencoder()
    model.load_state_dict(taef2_state_dict(encoder, decoder), strict=True)
    # .type, not ModelMixin.to(dtype): that logs a spurious warning about float32 modules TAEF2 lacks
    return (model.type(dtype) if dtype != torch.float32 else model).eval()


def build_sd2_vae(**overrides: Any) -> AutoencoderKL:
    """Stable Diffusion 2's `AutoencoderKL` with random weights (real runs load the pretrained ones).

    `overrides` replace config entries, e.g. narrower `block_out_channels` for fast tests.
    """
    return AutoencoderKL(**{**SD2_VAE_CONFIG, **overrides})


def latent_channels(vae: AutoencoderKL | AutoencoderTiny) -> int:
    """Channels of the latents the diffusion model sees (4 for SD2's VAE, 32 for TAEF2)."""
    return int(vae.config["latent_channels"])


def downsample_factor(vae: AutoencoderKL | AutoencoderTiny) -> int:
    """Image pixels per latent pixel along each axis (8 for both SD2's VAE and TAEF2)."""
    return int(2 ** (len(vae.config["block_out_channels"]) - 1))


def _scale_shift(vae: AutoencoderKL | AutoencoderTiny) -> tuple[float, float]:
    shift = vae.config.get("shift_factor")  # SD2's config has none; FLUX-style configs do
    return float(vae.config["scaling_factor"]), float(shift or 0.0)


def encode(
    vae: AutoencoderKL | AutoencoderTiny,
    images: torch.Tensor,
    *,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] (B3HW) to diffusion latents: `(z - shift_factor) * scaling_factor`.

    A KL VAE draws from its posterior (`sample=True`, the Stable Diffusion training recipe) or takes its
    mode; TAESD-family encoders are deterministic. Latents come back in the images' dtype.
    """
    if not isinstance(vae, AutoencoderKL | AutoencoderTiny):
        raise TypeError(f"encode: expected an AutoencoderKL or AutoencoderTiny, got {type(vae).__name__}")
    x = images.to(device=vae.device, dtype=vae.dtype)
    if isinstance(vae, AutoencoderKL):
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
    else:  # deterministic TAESD-family encoder
        z = vae.encode(x).latents
    scale, shift = _scale_shift(vae)
    return ((z - shift) * scale).to(images.dtype)


def decode(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents back to images in [-1, 1] (B3HW), in the latents' dtype; the inverse of `encode`."""
    if not isinstance(vae, AutoencoderKL | AutoencoderTiny):
        raise TypeError(f"decode: expected an AutoencoderKL or AutoencoderTiny, got {type(vae).__name__}")
    scale, shift = _scale_shift(vae)
    z = (latents / scale + shift).to(device=vae.device, dtype=vae.dtype)
    images = vae.decode(z).sample
    return images.clamp(-1, 1).to(latents.dtype)
