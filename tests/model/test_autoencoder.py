"""TAEF2 loads strictly into diffusers, reconstructs real chips, round-trips; encode/decode serve both VAE kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.autoencoder import (
    SD2_VAE_CONFIG,
    TAEF2_DECODER_FILE,
    TAEF2_ENCODER_FILE,
    TAEF2Autoencoder,
    WeightsNotFoundError,
    build_sd2_vae,
    decode,
    downsample_factor,
    encode,
    latent_channels,
    load_taef2,
    taef2_state_dict,
)
from model.config import TAEF2_DIR

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
CHIP = 128  # small crops keep the CPU test fast; TAEF2 is fully convolutional


def _center_crop(pixels: np.ndarray, size: int = CHIP) -> np.ndarray:
    h, w = pixels.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[top : top + size, left : left + size]


@pytest.fixture(scope="module")
def real_chips() -> torch.Tensor:
    """Four real remote-sensing chips from different sources, in [-1, 1]."""
    import rasterio

    paths = [SAMPLE / "captioned/ucm/images/1.tif", SAMPLE / "captioned/rsicd/images/00001.jpg",
             SAMPLE / "captioned/sydney/images/1.tif"]
    chips = [_center_crop(np.asarray(Image.open(p).convert("RGB"))) for p in paths]
    with rasterio.open(SAMPLE / "geotiff/aerial_korea_webmercator_rgb_0p6m.tif") as raster:
        chips.append(_center_crop(raster.read([1, 2, 3]).transpose(1, 2, 0)))
    batch = torch.from_numpy(np.stack(chips).copy()).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1


@pytest.fixture(scope="module")
def taef2() -> TAEF2Autoencoder:
    return load_taef2()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4 / mse)).mean())  # peak-to-peak 2 in [-1, 1]


def test_every_taef2_tensor_maps_onto_a_diffusers_parameter():
    encoder = torch.load(TAEF2_DIR / TAEF2_ENCODER_FILE, weights_only=True)
    decoder = torch.load(TAEF2_DIR / TAEF2_DECODER_FILE, weights_only=True)
    shapes = json.loads((TAEF2_DIR / "state_dict_shapes.json").read_text())
    assert set(encoder) == set(shapes[TAEF2_ENCODER_FILE]["tensors"])
    assert set(decoder) == set(shapes[TAEF2_DECODER_FILE]["tensors"])

    mapped = taef2_state_dict(encoder, decoder)
    target = TAEF2Autoencoder().state_dict()
    assert len(mapped) == len(encoder) + len(decoder)
    assert set(mapped) == set(target)  # no missing, no unexpected keys
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert sum(v.numel() for v in mapped.values()) == (
        shapes[TAEF2_ENCODER_FILE]["n_params"] + shapes[TAEF2_DECODER_FILE]["n_params"])


def test_taef2_loads_strictly_with_its_pooled_blocks(taef2):
    assert latent_channels(taef2) == 32 and downsample_factor(taef2) == 8
    pooled = [name for name, _ in taef2.named_modules() if name.endswith(".pool")]
    assert pooled == [f"encoder.layers.{i}.pool" for i in (11, 12, 13)] + [
        f"decoder.layers.{i}.pool" for i in (2, 3, 4)]
    assert not taef2.training


def test_taef2_reconstructs_real_chips_and_random_weights_do_not(taef2, real_chips):
    torch.manual_seed(0)
    random_init = TAEF2Autoencoder().eval()
    with torch.no_grad():
        latents = encode(taef2, real_chips)
        pretrained_psnr = _psnr(decode(taef2, latents), real_chips)
        random_psnr = _psnr(decode(random_init, encode(random_init, real_chips[:1])), real_chips[:1])
    assert latents.shape == (4, 32, CHIP // 8, CHIP // 8)
    assert pretrained_psnr > 22, pretrained_psnr
    assert random_psnr < 12, random_psnr
    # the configured scale and shift give the diffusion model roughly unit-variance, centred latents
    assert abs(float(latents.mean())) < 0.2
    assert 0.75 < float(latents.std()) < 1.3


def test_save_pretrained_round_trip_gives_identical_outputs(taef2, real_chips, tmp_path):
    taef2.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "TAEF2Autoencoder" and config["pool_blocks"] == 3
    reloaded = TAEF2Autoencoder.from_pretrained(tmp_path / "vae")
    via_loader = load_taef2(tmp_path / "vae")
    chip = real_chips[:1, :, :32, :32]
    with torch.no_grad():
        expected = decode(taef2, encode(taef2, chip))
        assert torch.equal(decode(reloaded, encode(reloaded, chip)), expected)
        assert torch.equal(decode(via_loader, encode(via_loader, chip)), expected)


def test_a_pipeline_saves_and_reloads_taef2_from_its_vae_subfolder(taef2, tmp_path):
    from diffusers import DiffusionPipeline

    class VaeOnlyPipeline(DiffusionPipeline):
        def __init__(self, vae: TAEF2Autoencoder) -> None:
            super().__init__()
            self.register_modules(vae=vae)

    VaeOnlyPipeline(taef2).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["model.autoencoder", "TAEF2Autoencoder"]
    reloaded = VaeOnlyPipeline.from_pretrained(tmp_path).vae
    assert isinstance(reloaded, TAEF2Autoencoder)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), taef2.state_dict().values(),
                                                 strict=True))


def test_load_taef2_names_the_missing_files(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"taef2_encoder\.pth"):
        load_taef2(tmp_path)


def test_taef2_in_bfloat16_keeps_the_callers_dtype(real_chips):
    vae = load_taef2(dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        latents = encode(vae, real_chips[:1, :, :32, :32])
        images = decode(vae, latents)
    assert latents.dtype == images.dtype == torch.float32
    assert images.shape == (1, 3, 32, 32)


def test_sd2_vae_config():
    with torch.device("meta"):  # the layout only: no 83.7M-parameter initialisation
        vae = build_sd2_vae()
    assert latent_channels(vae) == 4 and downsample_factor(vae) == 8
    assert vae.config.scaling_factor == 0.18215
    assert list(vae.config.block_out_channels) == SD2_VAE_CONFIG["block_out_channels"]
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 84e6  # SD2's 83.7M


def test_kl_vae_encode_decode_shapes():
    vae = build_sd2_vae(block_out_channels=[32, 32, 32, 32], layers_per_block=1)  # SD2's 8x layout, narrower
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        sampled = encode(vae, images, generator=torch.Generator().manual_seed(0))
        mode = encode(vae, images, sample=False)
        decoded = decode(vae, mode)
    assert sampled.shape == mode.shape == (2, 4, 4, 4)
    assert not torch.equal(sampled, mode)  # a posterior draw, not its mode
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


def test_encode_applies_scale_and_shift():
    vae = build_sd2_vae(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, scaling_factor=0.5,
                        shift_factor=0.1)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mode()
        assert torch.allclose(encode(vae, images, sample=False), (raw - 0.1) * 0.5)
        assert torch.allclose(decode(vae, (raw - 0.1) * 0.5), vae.decode(raw).sample.clamp(-1, 1), atol=1e-4)


def test_encode_rejects_other_models():
    with pytest.raises(TypeError, match="AutoencoderKL or AutoencoderTiny"):
        encode(torch.nn.Identity(), torch.zeros(1, 3, 8, 8))  # type: ignore[arg-type]
