"""Text2EarthPipeline on tiny random components: guidance, levels, prompts, schedulers, saving and loading."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

from model import Text2EarthPipeline
from model.components import build_components
from model.config import TrainParams
from model.pipeline import GenerationInputError, split_level_prefix
from model.tokenizer import clip_tokenizer
from model.unet import Text2EarthUNet

SIZE = 32  # pixels; latents are 16x16 with the tiny 2x autoencoder
UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32, "class_embed_type": "timestep",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run several times faster on one thread than on two contended ones (the 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=32))


def _kl_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32)


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon")


def _components(unet_class: Any = UNet2DConditionModel, **unet_extras: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    components: dict[str, Any] = {"vae": _kl_vae(), "text_encoder": _text_encoder(len(tokenizer)),
                                  "tokenizer": tokenizer, "unet": unet_class(**UNET, **unet_extras),
                                  "scheduler": _scheduler()}
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def _pipeline(**components: Any) -> Text2EarthPipeline:
    pipe = Text2EarthPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> Text2EarthPipeline:
    return _pipeline(**_components())


def _generate(pipe: Text2EarthPipeline, prompt: Any = "a river through farmland", seed: int = 0,
              **kwargs: Any) -> Any:
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_save_and_load_give_identical_images(pipe: Text2EarthPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    loaded = Text2EarthPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DConditionModel  # the default model stays a plain diffusers UNet
    np.testing.assert_array_equal(_generate(pipe, resolution_level=15).images,
                                  _generate(loaded, resolution_level=15).images)


def test_changing_only_the_level_changes_the_output(pipe: Text2EarthPipeline) -> None:
    images = {level: _generate(pipe, resolution_level=level).images for level in (0, 10, 17)}
    assert not np.allclose(images[10], images[17])
    assert not np.allclose(images[0], images[10])
    np.testing.assert_array_equal(images[10], _generate(pipe, resolution_level=10).images)


def test_guidance_equals_the_formula_from_two_unet_calls(pipe: Text2EarthPipeline) -> None:
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    text = pipe.encode_prompt(["a harbour", "dunes"])
    null_text = pipe.encode_prompt(["", ""])
    levels = torch.tensor([12, 16])
    null_levels = torch.zeros(2, dtype=torch.long)
    t = torch.tensor(700)
    with torch.no_grad():
        eps_c = pipe.unet(latents, t, encoder_hidden_states=text, class_labels=levels).sample
        eps_u = pipe.unet(latents, t, encoder_hidden_states=null_text, class_labels=null_levels).sample
        guided = pipe.guided_noise(latents, t, text, levels, null_text, guidance_scale=4.0)
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)

    # The full call uses that same formula: one deterministic DDIM step, redone by hand.
    pipe_ddim = _pipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    out = _generate(pipe_ddim, ["a harbour", "dunes"], resolution_level=[12, 16], num_inference_steps=1,
                    latents=latents, output_type="latent").images
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    step_t = scheduler.timesteps[0]
    with torch.no_grad():
        eps_c = pipe.unet(latents, step_t, encoder_hidden_states=text, class_labels=levels).sample
        eps_u = pipe.unet(latents, step_t, encoder_hidden_states=null_text, class_labels=null_levels).sample
    expected = scheduler.step(eps_u + 4.0 * (eps_c - eps_u), step_t, latents).prev_sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_scale_one_is_the_conditional_prediction_in_one_pass(pipe: Text2EarthPipeline) -> None:
    calls: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _module, args: calls.append(args[0].shape[0]))
    try:
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
        text = pipe.encode_prompt("a glacier")
        levels = torch.tensor([14])
        with torch.no_grad():
            guided = pipe.guided_noise(latents, 300, text, levels, pipe.encode_prompt(""), guidance_scale=1.0)
            assert calls == [1]  # one pass of batch 1: no unconditional branch
            conditional = pipe.unet(latents, 300, encoder_hidden_states=text, class_labels=levels).sample
        torch.testing.assert_close(guided, conditional)
        calls.clear()
        _generate(pipe, guidance_scale=1.0)
        assert calls == [1, 1]  # two steps, one image, no doubled batch
    finally:
        hook.remove()


def test_unconditional_branch_uses_the_negative_prompt_and_level_zero(pipe: Text2EarthPipeline) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(_module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((kwargs["encoder_hidden_states"], kwargs["class_labels"]))

    hook = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        plain = _generate(pipe, resolution_level=13).images
        negative = _generate(pipe, resolution_level=13, negative_prompt="clouds, haze").images
    finally:
        hook.remove()
    assert not np.allclose(plain, negative)
    text_embeds, labels = seen[-1]
    assert labels.tolist() == [0, 13]
    torch.testing.assert_close(text_embeds[0], pipe.encode_prompt("clouds, haze")[0])


def test_images_per_prompt_and_a_level_per_prompt(pipe: Text2EarthPipeline) -> None:
    out = _generate(pipe, ["a river", "a city"], resolution_level=[10, 17], num_images_per_prompt=3)
    assert out.images.shape == (6, SIZE, SIZE, 3)
    assert out.levels == [10, 10, 10, 17, 17, 17]
    assert not np.allclose(out.images[0], out.images[1])  # each image its own noise
    pil = _generate(pipe, ["a river", "a city"], num_images_per_prompt=2, output_type="pil").images
    assert len(pil) == 4 and pil[0].size == (SIZE, SIZE)
    tensors = _generate(pipe, "a river", num_images_per_prompt=2, output_type="pt").images
    assert tensors.shape == (2, 3, SIZE, SIZE) and 0 <= tensors.min() and tensors.max() <= 1
    latents = _generate(pipe, "a river", output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)


def test_released_level_prefix_sets_the_level_and_leaves_the_caption(pipe: Text2EarthPipeline) -> None:
    assert split_level_prefix("15_GOOGLE_LEVEL_a river through farmland") == (15, "a river through farmland")
    assert split_level_prefix("a river") == (None, "a river")
    prefixed = _generate(pipe, "15_GOOGLE_LEVEL_a river through farmland")
    assert prefixed.levels == [15]
    np.testing.assert_array_equal(prefixed.images,
                                  _generate(pipe, "a river through farmland", resolution_level=15).images)
    assert _generate(pipe, "15_GOOGLE_LEVEL_a river", resolution_level=11).levels == [11]  # explicit level wins
    assert _generate(pipe, ["12_GOOGLE_LEVEL_a", "b"]).levels == [12, 0]
    assert _generate(pipe, ["15_GOOGLE_LEVEL_a", "b"], resolution_level=[None, 12]).levels == [15, 12]  # None: prefix
    assert _generate(pipe, ["15_GOOGLE_LEVEL_a", "b"], gsd_m=[None, 2.0]).levels == [15, 16]
    assert _generate(pipe, ["a", "b"], resolution_level=np.array([15, 16])).levels == [15, 16]
    assert _generate(pipe, ["a", "b"], resolution_level=torch.tensor([15, 16])).levels == [15, 16]


def test_gsd_m_maps_to_the_nearest_level(pipe: Text2EarthPipeline) -> None:
    assert _generate(pipe, ["a", "b"], gsd_m=[2.0, 0.6]).levels == [16, 18]


def test_prompt_embeds_give_the_same_images(pipe: Text2EarthPipeline) -> None:
    embeds = pipe.encode_prompt("a river")
    np.testing.assert_array_equal(_generate(pipe, None, prompt_embeds=embeds, resolution_level=14).images,
                                  _generate(pipe, "a river", resolution_level=14).images)


def test_seeded_generator_reproduces_images(pipe: Text2EarthPipeline) -> None:
    first = _generate(pipe, seed=7, resolution_level=16).images
    np.testing.assert_array_equal(first, _generate(pipe, seed=7, resolution_level=16).images)
    assert not np.allclose(first, _generate(pipe, seed=8, resolution_level=16).images)


@pytest.mark.parametrize(("scheduler_class", "options"), [(DDIMScheduler, {}), (DPMSolverMultistepScheduler, {}),
                                                         (PNDMScheduler, {"skip_prk_steps": True})])
def test_any_diffusers_scheduler(pipe: Text2EarthPipeline, scheduler_class: Any, options: dict[str, Any]) -> None:
    scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    swapped = _pipeline(**{**pipe.components, "scheduler": scheduler})
    images = _generate(swapped, resolution_level=12, num_inference_steps=3).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, _generate(swapped, resolution_level=12, num_inference_steps=3).images)


def test_bad_inputs_name_the_argument(pipe: Text2EarthPipeline) -> None:
    with pytest.raises(GenerationInputError, match=r"0\.\.23"):
        _generate(pipe, resolution_level=30)
    with pytest.raises(GenerationInputError, match="not both"):
        _generate(pipe, resolution_level=15, gsd_m=2.0)
    with pytest.raises(GenerationInputError, match="resolution_level"):
        _generate(pipe, ["a", "b"], resolution_level=[15])
    with pytest.raises(GenerationInputError, match="multiples of 4"):
        _generate(pipe, height=30)
    with pytest.raises(GenerationInputError, match="metadata"):
        _generate(pipe, metadata={"lon": 3.0})
    with pytest.raises(GenerationInputError, match="whole levels"):
        _generate(pipe, resolution_level=15.7)
    with pytest.raises(GenerationInputError, match="positive multiples"):
        _generate(pipe, height=0)
    with pytest.raises(GenerationInputError, match="num_inference_steps"):
        _generate(pipe, num_inference_steps=0)
    with pytest.raises(GenerationInputError, match="guidance_scale"):
        _generate(pipe, guidance_scale=float("nan"))
    with pytest.raises(GenerationInputError, match="empty list"):
        _generate(pipe, [])
    with pytest.raises(GenerationInputError, match="one generator per image"):
        pipe(["a", "b"], num_images_per_prompt=2, height=SIZE, width=SIZE, num_inference_steps=1,
             generator=[torch.Generator().manual_seed(i) for i in range(2)])
    with pytest.raises(GenerationInputError, match="3-D"):
        pipe(prompt_embeds=torch.zeros(77, 32), height=SIZE, width=SIZE, num_inference_steps=1)


def test_tiny_autoencoder_latents() -> None:
    components = _components()
    components["vae"] = vae = AutoencoderTiny(encoder_block_out_channels=[32, 32], decoder_block_out_channels=[32, 32],
                                        num_encoder_blocks=[1, 1], num_decoder_blocks=[1, 1],
                                        latent_channels=4)
    vae.eval()
    pipe = _pipeline(**components)
    assert pipe.vae_scale_factor == 2
    assert _generate(pipe, resolution_level=15).images.shape == (1, SIZE, SIZE, 3)


def test_extras_model_round_trips_and_uses_metadata(tmp_path: Path) -> None:
    pipe = _pipeline(**_components(Text2EarthUNet, resolution_mode="log_gsd", metadata_fields=["lat"],
                                   learnable_null=True))
    images = _generate(pipe, gsd_m=1.7, metadata={"lat": 40.0}).images
    assert not np.allclose(images, _generate(pipe, gsd_m=1.7, metadata={"lat": -40.0}).images)
    assert not np.allclose(images, _generate(pipe, gsd_m=3.4, metadata={"lat": 40.0}).images)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["model.unet", "Text2EarthUNet"]
    loaded = Text2EarthPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images, _generate(loaded, gsd_m=1.7, metadata={"lat": 40.0}).images)


def _write_released_layout(root: Path, components: dict[str, Any] | None = None) -> None:
    """The layout of `lcybuaa/Text2Earth`: StableDiffusionPipeline's model_index and plain diffusers classes."""
    components = components or _components()
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        components[name].save_pretrained(root / name)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(root / "scheduler")
    CLIPImageProcessor(crop_size=224, size=224).save_pretrained(root / "feature_extractor")
    model_index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2))


def test_released_layout_loads_and_generates(tmp_path: Path) -> None:
    _write_released_layout(tmp_path)
    unet_config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DConditionModel" and unet_config["class_embed_type"] == "timestep"
    pipe = Text2EarthPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    out = _generate(pipe, "17_GOOGLE_LEVEL_a stadium beside a highway")
    assert out.images.shape == (1, SIZE, SIZE, 3) and out.levels == [17]
    assert np.isfinite(out.images).all() and not math.isnan(float(out.images.mean()))


def test_components_for_a_pretrained_sd2_start(tmp_path: Path) -> None:
    components = _components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**{**UNET, "class_embed_type": None})
    _write_released_layout(tmp_path, components)
    sd2_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")  # loaded weights, as build_components
    params = TrainParams.model_validate({"pretrained": str(tmp_path)})
    built = build_components(params)
    assert set(built) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    assert isinstance(built["scheduler"], DDPMScheduler)
    assert built["scheduler"].config["beta_schedule"] == "scaled_linear"
    unet = built["unet"]
    assert unet.config["class_embed_type"] == "timestep"
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = sd2_unet(latents, 400, encoder_hidden_states=text).sample
        after = unet(latents, 400, encoder_hidden_states=text, class_labels=torch.tensor([15])).sample
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # the resolution MLP starts at zero


def test_components_from_scratch_fit_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    built = build_components(TrainParams.model_validate({"size": "tiny"}))
    unet, text_encoder, vae = built["unet"], built["text_encoder"], built["vae"]
    assert unet.config["class_embed_type"] == "timestep"
    assert unet.config["cross_attention_dim"] == text_encoder.config.hidden_size
    assert unet.config["in_channels"] == vae.config["latent_channels"] == 32  # TAEF2's latent space
    assert built["tokenizer"].model_max_length == 77
    scheduler = built["scheduler"]
    assert (scheduler.config["num_train_timesteps"], scheduler.config["beta_start"], scheduler.config["beta_end"],
            scheduler.config["prediction_type"]) == (1000, 0.00085, 0.012, "epsilon")

    # The sample model's pipeline (TAEF2 is our own autoencoder class) saves and loads back exactly.
    for module in (unet, text_encoder, vae):
        module.eval()
    pipe = _pipeline(**built)
    images = _generate(pipe, resolution_level=15, height=64, width=64).images
    pipe.save_pretrained(tmp_path)
    loaded = Text2EarthPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is type(vae)
    np.testing.assert_array_equal(images, _generate(loaded, resolution_level=15, height=64, width=64).images)


def test_an_inpainting_unet_is_refused_with_the_pipeline_to_use() -> None:
    from model.inpaint import inpaint_unet_from

    components = _components()
    components["unet"] = inpaint_unet_from(components["unet"])
    with pytest.raises(GenerationInputError, match="Text2EarthInpaintPipeline"):
        _generate(_pipeline(**components), num_inference_steps=1)


def test_the_readme_import_works_from_any_folder(tmp_path: Path) -> None:
    """`from model import Text2EarthPipeline` must not depend on the repo root being the working directory."""
    import subprocess
    import sys

    code = "from model import Text2EarthPipeline, Text2EarthInpaintPipeline; print(Text2EarthPipeline.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.strip() == "Text2EarthPipeline", proc.stderr[-2000:]
