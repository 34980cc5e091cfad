"""The resolution-conditioned UNet: presets, the zero-initialised resolution MLP, the optional extras."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from model.config import ConditioningParams
from model.unet import (
    DEFAULT_CONDITIONING,
    Text2EarthUNet,
    add_resolution_embedding,
    build_unet,
    conditioning_labels,
    predict_noise,
    unet_conditioning,
)
from pipeline.errors import ParamsError

TINY: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}
EXTRAS = ConditioningParams(mode="log_gsd", metadata=["lon", "lat", "month"], learnable_null=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run several times faster on one thread than on two contended ones (the 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 7, 32, generator=generator))


def _pretrained_sd2_unet() -> UNet2DConditionModel:
    """A stand-in for SD2-base: no class embedding, and every layer non-zero."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY).eval()
    with torch.no_grad():
        for parameter in unet.parameters():  # diffusers zero-initialises conv_out; a trained model's is not
            parameter.add_(0.02 * torch.randn_like(parameter))
    return unet


class _Wrapped(nn.Module):
    """Like DDP: the UNet sits under `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)


def test_tiny_preset_is_a_plain_diffusers_unet_with_timestep_class_embedding() -> None:
    unet = build_unet("tiny")
    assert type(unet) is UNet2DConditionModel
    assert unet.config["class_embed_type"] == "timestep"
    assert unet.config["in_channels"] == 32  # TAEF2 latents
    assert unet_conditioning(unet) == DEFAULT_CONDITIONING


def test_unknown_size_names_the_key() -> None:
    with pytest.raises(ParamsError, match=r"train\.size"):
        build_unet("huge")


def test_extras_build_the_subclass_with_their_config() -> None:
    unet = build_unet("tiny", EXTRAS)
    assert isinstance(unet, Text2EarthUNet)
    assert unet.config["resolution_mode"] == "log_gsd"
    assert unet.config["metadata_fields"] == ["lon", "lat", "month"]
    assert unet_conditioning(unet) == EXTRAS


def test_zero_init_resolution_embedding_leaves_a_pretrained_unet_unchanged() -> None:
    unet = _pretrained_sd2_unet()
    latents, text = _inputs()
    with torch.no_grad():
        before = unet(latents, 500, encoder_hidden_states=text).sample
    patched = add_resolution_embedding(unet)
    assert patched.config["class_embed_type"] == "timestep"
    with torch.no_grad():
        for level in (0, 10, 18):
            after = predict_noise(patched, latents, 500, text, torch.full((2,), level))
            assert torch.equal(before, after)
    # The new MLP is not dead: the loss reaches its zeroed output layer, so training can move it.
    predict_noise(patched, latents, 500, text, torch.tensor([12, 17])).square().mean().backward()
    embedding: Any = patched.class_embedding
    assert embedding.linear_2.weight.grad.abs().sum() > 0
    assert add_resolution_embedding(patched) is patched  # already conditioned: unchanged


def test_patched_unet_saves_in_the_released_layout(tmp_path: Path) -> None:
    unet = add_resolution_embedding(_pretrained_sd2_unet())
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert type(loaded) is UNet2DConditionModel and loaded.config["class_embed_type"] == "timestep"
    latents, text = _inputs()
    levels = torch.tensor([11, 16])
    with torch.no_grad():
        expected = predict_noise(unet, latents, 10, text, levels)
        assert torch.equal(expected, predict_noise(loaded, latents, 10, text, levels))


def test_adding_extras_to_a_pretrained_unet_leaves_its_output_unchanged() -> None:
    unet = _pretrained_sd2_unet()
    latents, text = _inputs()
    with torch.no_grad():
        before = unet(latents, 300, encoder_hidden_states=text).sample
        patched = add_resolution_embedding(unet, EXTRAS)
        assert isinstance(patched, Text2EarthUNet)
        metadata = {"lon": torch.tensor([10.0, math.nan]), "lat": torch.tensor([45.0, -3.0])}
        after = predict_noise(patched, latents, 300, text, torch.tensor([15, 0]), metadata=metadata)
    assert torch.equal(before, after)


def test_text2earth_unet_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = Text2EarthUNet(**TINY, resolution_mode="log_gsd", metadata_fields=["lat", "month"], learnable_null=True)
    with torch.no_grad():
        for parameter in unet.null_embedding.values():
            parameter.normal_()
    unet.save_pretrained(tmp_path)
    loaded = Text2EarthUNet.from_pretrained(tmp_path)
    assert loaded.config["metadata_fields"] == ["lat", "month"] and loaded.config["block_out_channels"] == [32, 64]
    latents, text = _inputs()
    kwargs: dict[str, Any] = {"gsd_m": torch.tensor([0.6, math.nan]), "metadata": {"lat": torch.tensor([50.0, 1.0])}}
    with torch.no_grad():
        expected = predict_noise(unet.eval(), latents, 10, text, torch.tensor([17, 0]), **kwargs)
        assert torch.equal(expected, predict_noise(loaded, latents, 10, text, torch.tensor([17, 0]), **kwargs))


def test_log_gsd_mode_nulls_unknown_gsd_and_level_zero() -> None:
    torch.manual_seed(0)
    unet = Text2EarthUNet(**TINY, resolution_mode="log_gsd").eval()
    labels = conditioning_labels(unet, torch.tensor([15, 15, 0]), torch.tensor([math.nan, 3.0, 3.0]))
    assert labels is not None
    assert labels[0].item() == 4.0 and labels[1].item() == 3.0 and math.isnan(labels[2].item())
    latents, text = _inputs(1)
    with torch.no_grad():
        def run(level: int, gsd: float) -> torch.Tensor:
            return predict_noise(unet, latents, 10, text, torch.tensor([level]), gsd_m=torch.tensor([gsd]))
        assert torch.equal(run(0, 2.0), run(0, math.nan))  # level 0 drops the GSD (DCA)
        assert not torch.allclose(run(15, 2.0), run(15, 4.0))


def test_learnable_null_level_replaces_only_level_zero() -> None:
    torch.manual_seed(0)
    unet = Text2EarthUNet(**TINY, learnable_null=True).eval()
    latents, text = _inputs(2)
    levels = torch.tensor([0, 15])
    with torch.no_grad():
        before = predict_noise(unet, latents, 10, text, levels)
        unet.null_embedding["resolution"].normal_()
        after = predict_noise(unet, latents, 10, text, levels)
    assert not torch.allclose(before[0], after[0])
    assert torch.equal(before[1], after[1])


def test_metadata_changes_the_output_and_nan_means_missing() -> None:
    torch.manual_seed(0)
    unet = Text2EarthUNet(**TINY, metadata_fields=["lon"]).eval()
    latents, text = _inputs(1)
    levels = torch.tensor([14])
    with torch.no_grad():
        def run(metadata: dict[str, torch.Tensor] | None) -> torch.Tensor:
            return predict_noise(unet, latents, 10, text, levels, metadata=metadata)
        assert torch.equal(run(None), run({"lon": torch.tensor([math.nan])}))
        assert not torch.allclose(run({"lon": torch.tensor([-120.0])}), run({"lon": torch.tensor([30.0])}))


def test_predict_noise_sees_through_a_ddp_style_wrapper() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY, class_embed_type="timestep").eval()
    latents, text = _inputs()
    levels = torch.tensor([10, 18])
    with torch.no_grad():
        assert torch.equal(predict_noise(_Wrapped(unet), latents, 5, text, levels),
                           unet(latents, 5, encoder_hidden_states=text, class_labels=levels).sample)


def test_plain_sd2_unet_takes_no_level() -> None:
    unet = UNet2DConditionModel(**TINY)
    assert unet_conditioning(unet) is None
    assert conditioning_labels(unet, torch.tensor([15])) is None
