"""Editing: the zero-initialised inpainting UNet, its pipeline (unmasked pixels kept, soft masks blend), training
with `--task inpaint`, and `text2earth edit`."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from PIL import Image

from model.autoencoder import decode, encode, load_taef2
from model.config import TrainParams, resolve_task
from model.inpaint import (
    InpaintModelError,
    Text2EarthInpaintPipeline,
    inpaint_model_input,
    inpaint_unet_from,
    is_inpaint_unet,
    prepare_inpaint_inputs,
)
from model.masks import MaskError
from model.pipeline import GenerationInputError, Text2EarthPipeline
from model.unet import Text2EarthUNet
from model.validation import HEADER, MARGIN
from pipeline.errors import ParamsError
from tests.model.test_pipeline import UNET, _components

REPO = Path(__file__).resolve().parents[2]
SIZE = 32  # test_pipeline's tiny KL autoencoder: 2x down, 4 latent channels -> 9-channel inpainting UNet
TAEF2_UNET: dict[str, Any] = {**UNET, "sample_size": 8, "in_channels": 32, "out_channels": 32}


def _inpaint_pipe(components: dict[str, Any] | None = None) -> Text2EarthInpaintPipeline:
    components = dict(components or _components())
    components["unet"] = inpaint_unet_from(components["unet"])
    pipe = Text2EarthInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> Text2EarthInpaintPipeline:
    return _inpaint_pipe()


@pytest.fixture(scope="module")
def taef2_pipe() -> Text2EarthInpaintPipeline:
    """Real TAEF2 latents, so "up to the VAE round-trip error" means the real autoencoder's error."""
    components = _components()
    torch.manual_seed(1)
    components["vae"] = load_taef2()
    components["unet"] = UNet2DConditionModel(**TAEF2_UNET).eval()
    return _inpaint_pipe(components)


def _chip(size: int, index: int = 0) -> np.ndarray:
    """A real RSICD image of the embedded sample, resized to `size` px (H x W x 3 uint8)."""
    path = sorted((REPO / "data" / "sample" / "captioned" / "rsicd" / "images").glob("*.jpg"))[index]
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX))


def _corner_mask(size: int, part: int) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[:part, :part] = 1.0
    return mask


def _edit(pipe: Text2EarthInpaintPipeline, image: Any, mask: Any, seed: int = 0, **kwargs: Any) -> Any:
    kwargs = {"resolution_level": 15, "num_inference_steps": 3, "output_type": "np", **kwargs}
    return pipe(kwargs.pop("prompt", "a river through farmland"), image=image, mask_image=mask,
                generator=torch.Generator().manual_seed(seed), **kwargs)


# --- the UNet -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extras", [{}, {"resolution_mode": "log_gsd", "metadata_fields": ["lat"]}],
                         ids=["plain", "extras"])
def test_zero_initialised_unet_predicts_what_the_text_to_image_unet_does(extras: dict[str, Any]) -> None:
    torch.manual_seed(0)
    unet = (Text2EarthUNet(**UNET, **extras) if extras else UNet2DConditionModel(**UNET)).eval()
    widened = inpaint_unet_from(unet)
    assert type(widened) is type(unet) and widened.config["in_channels"] == 9 and is_inpaint_unet(widened)
    assert unet.config["in_channels"] == 4  # the original is untouched
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([15.0, 2.0]) if extras else torch.tensor([15, 0])
    extra = {"added_cond_kwargs": {"lat": torch.tensor([40.0, -3.0])}} if extras else {}
    with torch.no_grad():
        expected = unet(latents, 500, encoder_hidden_states=text, class_labels=labels, **extra).sample
        for mask_value in (0.0, 1.0, 0.3):  # whatever the mask and masked image hold
            mask = torch.full((2, 1, 16, 16), mask_value)
            masked = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
            model_input = torch.cat([latents, mask, masked], dim=1)
            out = widened(model_input, 500, encoder_hidden_states=text, class_labels=labels, **extra).sample
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(InpaintModelError, match="already an inpainting UNet"):
        inpaint_unet_from(widened)


def test_inpaint_inputs_mask_the_image_and_pool_the_mask(pipe: Text2EarthInpaintPipeline) -> None:
    pixels = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 3:9, 0:4] = 0.4  # soft, and not aligned with the 2x latent grid
    inputs = prepare_inpaint_inputs(pipe.vae, pixels, mask)
    assert inputs.latent_mask.shape == (1, 1, SIZE // 2, SIZE // 2)
    expected = torch.zeros(1, 1, SIZE // 2, SIZE // 2)
    expected[..., 1:5, 0:2] = 0.4  # every latent cell the mask touches, at its strongest value
    torch.testing.assert_close(inputs.latent_mask, expected)
    torch.testing.assert_close(inputs.masked_image_latents, encode(pipe.vae, pixels * (1 - mask), sample=False))
    noisy = torch.randn(1, 4, SIZE // 2, SIZE // 2)
    stacked = inpaint_model_input(noisy, inputs)
    assert stacked.shape[1] == 9 and torch.equal(stacked[:, :4], noisy) and torch.equal(stacked[:, 4:5], expected)


# --- the pipeline -------------------------------------------------------------------------------------------------


def test_unmasked_pixels_stay_the_input_up_to_the_vae_round_trip(taef2_pipe: Text2EarthInpaintPipeline) -> None:
    image, mask = _chip(64), _corner_mask(64, 16)
    keep = mask == 0
    edited = _edit(taef2_pipe, image, mask).images[0]
    np.testing.assert_array_equal(np.round(edited * 255)[keep], image[keep])  # the pixel composite: exact
    assert np.abs(edited * 255 - image)[~keep].mean() > 5  # the masked corner was repainted

    raw = _edit(taef2_pipe, image, mask, composite=False).images[0]  # the decoder's output everywhere
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        round_trip = (decode(taef2_pipe.vae, encode(taef2_pipe.vae, pixels))[0].permute(1, 2, 0).numpy() + 1) / 2
    far = np.zeros_like(keep)
    far[32:, 32:] = True  # 16+ px from the mask: outside the decoder's reach of the repainted latents
    round_trip_error = np.abs(round_trip - image / 255).mean()
    assert np.abs(raw - round_trip)[far].mean() < 0.25 * round_trip_error
    assert np.abs(raw - image / 255)[keep].mean() < 1.5 * round_trip_error
    assert np.abs(raw - round_trip)[~keep].mean() > 2 * round_trip_error  # repainted, not the input

    latents = _edit(taef2_pipe, image, mask, output_type="latent").images
    with torch.no_grad():
        image_latents = encode(taef2_pipe.vae, pixels, sample=False)
    known = torch.ones(8, 8, dtype=torch.bool)
    known[:2, :2] = False  # the 16-px corner is 2 x 2 latent cells
    assert torch.equal(latents[0][:, known], image_latents[0][:, known])  # the known latents, exactly


def test_a_soft_mask_blends_input_and_generated_image(pipe: Text2EarthInpaintPipeline) -> None:
    image = _chip(SIZE, 1)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[8:24, 8:24] = 0.25  # a thin cloud
    mask[12:20, 12:20] = 1.0  # over a thick core
    blended = _edit(pipe, image, mask).images[0]
    raw = _edit(pipe, image, mask, composite=False).images[0]
    expected = image / 255 * (1 - mask[..., None]) + raw * mask[..., None]
    np.testing.assert_allclose(blended, expected, atol=1e-5)
    assert np.abs(blended - image / 255)[mask == 0.25].mean() > 0  # the thin cloud changed a little ...
    assert np.abs(blended - image / 255)[mask == 0.25].mean() < np.abs(raw - image / 255)[mask == 0.25].mean()


def test_prompts_levels_images_per_prompt_and_seeds(pipe: Text2EarthInpaintPipeline) -> None:
    image, mask = _chip(SIZE), _corner_mask(SIZE, 16)
    out = _edit(pipe, image, mask, prompt=["a river", "a city"], resolution_level=[10, 17], num_images_per_prompt=2)
    assert out.images.shape == (4, SIZE, SIZE, 3) and out.levels == [10, 10, 17, 17]
    assert not np.allclose(out.images[0], out.images[1])  # each image its own noise
    np.testing.assert_array_equal(_edit(pipe, image, mask, seed=4).images, _edit(pipe, image, mask, seed=4).images)
    assert not np.allclose(_edit(pipe, image, mask, resolution_level=10).images,
                           _edit(pipe, image, mask, resolution_level=17).images)
    prefixed = _edit(pipe, image, mask, prompt="12_GOOGLE_LEVEL_a river", resolution_level=None)
    assert prefixed.levels == [12]
    np.testing.assert_array_equal(prefixed.images,
                                  _edit(pipe, image, mask, prompt="a river", resolution_level=12).images)
    assert _edit(pipe, image, mask, resolution_level=None, gsd_m=2.0).levels == [16]
    assert not np.allclose(_edit(pipe, image, mask).images, _edit(pipe, image, mask, negative_prompt="haze").images)
    pil = _edit(pipe, Image.fromarray(image), Image.fromarray((mask * 255).astype(np.uint8)), output_type="pil")
    np.testing.assert_array_equal(np.asarray(pil.images[0]), np.round(_edit(pipe, image, mask).images[0] * 255))


@pytest.mark.parametrize(("scheduler_class", "options"), [(DDIMScheduler, {}), (DPMSolverMultistepScheduler, {}),
                                                         (PNDMScheduler, {"skip_prk_steps": True})])
def test_any_scheduler_and_strength(pipe: Text2EarthInpaintPipeline, scheduler_class: Any,
                                    options: dict[str, Any]) -> None:
    swapped = Text2EarthInpaintPipeline(**{**pipe.components,
                                           "scheduler": scheduler_class.from_config(pipe.scheduler.config, **options)})
    swapped.set_progress_bar_config(disable=True)
    image, mask = _chip(SIZE), _corner_mask(SIZE, 16)
    calls: list[int] = []
    hook = swapped.unet.register_forward_pre_hook(lambda _module, _args: calls.append(1))
    try:
        full = _edit(swapped, image, mask, num_inference_steps=4).images
        steps_full = len(calls)
        calls.clear()
        half = _edit(swapped, image, mask, num_inference_steps=4, strength=0.5).images
    finally:
        hook.remove()
    assert len(calls) < steps_full  # strength 0.5 runs the last half of the schedule only
    for images in (full, half):
        assert np.isfinite(images).all()
        np.testing.assert_array_equal(np.round(images[0] * 255)[mask == 0], image[mask == 0])


def test_save_and_load_round_trip(pipe: Text2EarthInpaintPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "inpaint")
    index = json.loads((tmp_path / "inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == "Text2EarthInpaintPipeline"
    loaded = Text2EarthInpaintPipeline.from_pretrained(tmp_path / "inpaint")
    loaded.set_progress_bar_config(disable=True)
    image, mask = _chip(SIZE), _corner_mask(SIZE, 16)
    np.testing.assert_array_equal(_edit(pipe, image, mask).images, _edit(loaded, image, mask).images)
    Text2EarthPipeline(**_components()).save_pretrained(tmp_path / "text2image")
    with pytest.raises(InpaintModelError, match="--task inpaint"):
        Text2EarthInpaintPipeline.from_pretrained(tmp_path / "text2image")


def test_bad_inputs_name_the_problem(pipe: Text2EarthInpaintPipeline) -> None:
    image = _chip(SIZE)
    with pytest.raises(MaskError, match="32x32"):
        _edit(pipe, image, np.zeros((SIZE, 2 * SIZE), np.float32))  # another aspect ratio
    with pytest.raises(GenerationInputError, match="mask_image"):
        pipe("a river", image=image, mask_image=None)
    with pytest.raises(GenerationInputError, match="strength"):
        _edit(pipe, image, _corner_mask(SIZE, 8), strength=0.0)
    with pytest.raises(GenerationInputError, match="multiples of 4"):
        _edit(pipe, image[:30, :30], _corner_mask(30, 8))
    with pytest.raises(GenerationInputError, match="one per prompt"):
        _edit(pipe, [image, image, image], _corner_mask(SIZE, 8), prompt=["a", "b"])


# --- training and `text2earth edit` ---------------------------------------------------------------------------


def _write_chips(out: Path, count: int = 8, size: int = 64) -> str:
    """A shard of real RSICD and UCM images of the embedded sample, downsized, captioned, at level 15."""
    captioned = REPO / "data" / "sample" / "captioned"
    with tarfile.open(out, "w") as tar:
        for index, path in enumerate(sorted(captioned.glob("*/images/*"))[:count]):
            with Image.open(path) as image:
                png = io.BytesIO()
                image.convert("RGB").resize((size, size), Image.Resampling.BOX).save(png, format="PNG")
            meta = {"split": "train", "level": 15, "gsd_m": 4.0}
            for ext, data in (("png", png.getvalue()), ("txt", b"farmland beside a river"),
                              ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"chip{index:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(out)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny text-to-image model (random UNet, real TAEF2), then 2 steps of `text2earth train --task inpaint`,
    then the same run stopped after step 1 and resumed (`--resume latest`)."""
    from model.components import build_components
    from stages.cli import main

    root = tmp_path_factory.mktemp("inpaint-train")
    torch.manual_seed(0)
    init = Text2EarthPipeline(**build_components(TrainParams.model_validate({"size": "tiny"})))
    init.save_pretrained(root / "models" / "text2earth")
    params = {"shards": _write_chips(root / "chips-000000.tar"), "output_dir": "models/text2earth",
              "checkpoint_dir": "checkpoints", "size": "tiny", "resolution": 64, "batch_size": 2, "max_steps": 2,
              "checkpoint_every": 1, "validation_prompts": ["a river"], "validation_levels": [13, 15],
              "validation_steps": 2, "seed": 3, "threads": 1}
    (root / "params.yaml").write_text(yaml.safe_dump({"train": params}))
    init_unet = root / "models" / "text2earth" / "unet" / "diffusion_pytorch_model.safetensors"
    before = init_unet.read_bytes()
    checkpoint_2 = root / "checkpoints-inpaint" / "checkpoint-2" / "model.safetensors"
    cwd = Path.cwd()
    try:
        os.chdir(root)
        _reset_accelerate()
        assert main(["train", "--task", "inpaint", "--no-progress"]) == 0
        checkpoints = sorted(p.name for p in (root / "checkpoints-inpaint").iterdir())
        uninterrupted = _weights(checkpoint_2)
        _reset_accelerate()
        assert main(["train", "--task", "inpaint", "--no-progress", "--max-steps", "1"]) == 0  # a fresh start
        _reset_accelerate()
        assert main(["train", "--task", "inpaint", "--no-progress", "--resume", "latest"]) == 0
        summary = json.loads((root / "metrics" / "train_inpaint.json").read_text())
    finally:
        os.chdir(cwd)
    assert init_unet.read_bytes() == before, "the text-to-image model was overwritten"
    return {"root": root, "model": root / "models" / "text2earth-inpaint", "checkpoints": checkpoints,
            "summary": summary, "uninterrupted": uninterrupted, "resumed": _weights(checkpoint_2)}


def test_task_inpaint_gets_its_own_folders_and_fingerprint(tmp_path: Path) -> None:
    from model.train import run_fingerprint

    params = TrainParams.model_validate({"output_dir": str(tmp_path / "t2e"), "checkpoint_dir": "ckpt"})
    inpaint = resolve_task(params.model_copy(update={"task": "inpaint"}))
    assert (inpaint.output_dir, inpaint.checkpoint_dir) == (str(tmp_path / "t2e-inpaint"), "ckpt-inpaint")
    assert inpaint.inpaint.init_from == str(tmp_path / "t2e") and resolve_task(inpaint) == inpaint
    assert resolve_task(params) == params
    assert run_fingerprint(inpaint, []) != run_fingerprint(params, [])
    other_masks = params.model_copy(update={"inpaint": params.inpaint.model_copy(update={"max_shapes": 1})})
    assert run_fingerprint(other_masks, []) == run_fingerprint(params, [])  # text2image ignores inpaint settings
    assert run_fingerprint(resolve_task(other_masks.model_copy(update={"task": "inpaint"})), []) != \
        run_fingerprint(inpaint, [])
    (tmp_path / "t2e" / "unet").mkdir(parents=True)
    (tmp_path / "t2e" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    first = run_fingerprint(inpaint, [])
    (tmp_path / "t2e" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained")
    assert run_fingerprint(inpaint, []) != first  # a retrained text-to-image model restarts the inpainting run
    shorter = resolve_task(params.model_copy(update={"task": "inpaint", "inpaint": params.inpaint.model_copy(
        update={"max_steps": 50})}))
    assert shorter.max_steps == 50 and run_fingerprint(shorter, []) == run_fingerprint(inpaint, [])  # may grow
    with pytest.raises(ParamsError, match="init_from"):
        resolve_task(params.model_copy(update={"task": "inpaint", "inpaint": inpaint.inpaint.model_copy(
            update={"output_dir": str(tmp_path / "t2e")})}))


def test_params_file_steps_and_the_command_line(tmp_path: Path) -> None:
    from model.config import load_train_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 300, "inpaint": {"max_steps": 50}}}))
    assert load_train_params(path).max_steps == 300  # the text-to-image run
    assert load_train_params(path, {"task": "inpaint"}).max_steps == 50
    assert load_train_params(path, {"task": "inpaint", "max_steps": 7}).max_steps == 7  # --max-steps wins
    assert load_train_params(path, {"task": "inpaint"}).output_dir == "models/text2earth-inpaint"


def test_inpaint_training_exports_a_model_that_edits(trained: dict[str, Any]) -> None:
    root, model_dir, summary = trained["root"], trained["model"], trained["summary"]
    assert summary["task"] == "inpaint" and summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert trained["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    assert not (root / "checkpoints").exists()
    assert (root / "dvclive-inpaint" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    with Image.open(root / "metrics" / "train_inpaint_samples.png") as grid:
        assert grid.size == (MARGIN + 2 * 64, HEADER + 2 * 64)  # two levels; the input row and one prompt row
    pipe = Text2EarthInpaintPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config["in_channels"] == 65 and pipe.unet.config["class_embed_type"] == "timestep"
    image, mask = _chip(64), _corner_mask(64, 32)
    edited = _edit(pipe, image, mask, num_inference_steps=2).images[0]
    np.testing.assert_array_equal(np.round(edited * 255)[mask == 0], image[mask == 0])


def test_a_resumed_inpaint_run_ends_with_the_uninterrupted_weights(trained: dict[str, Any]) -> None:
    assert trained["summary"]["start_step"] == 1  # the last run continued from checkpoint-1
    uninterrupted, resumed = trained["uninterrupted"], trained["resumed"]
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)  # the same masks were drawn


def test_inpaint_masks_come_from_the_step_seed() -> None:
    from model.objective import inpaint_masks

    settings = TrainParams.model_validate({}).inpaint
    first = inpaint_masks(11, 4, 32, 32, settings)
    assert first.shape == (4, 1, 32, 32)
    assert torch.equal(first, inpaint_masks(11, 4, 32, 32, settings))
    assert not torch.equal(first, inpaint_masks(12, 4, 32, 32, settings))


def test_edit_writes_a_png_with_its_settings(trained: dict[str, Any], tmp_path: Path) -> None:
    from stages.cli import main

    Image.fromarray(_chip(64)).save(tmp_path / "scene.png")
    Image.fromarray((_corner_mask(64, 24) * 255).astype(np.uint8)).save(tmp_path / "clouds.png")
    out = tmp_path / "edited.png"
    assert main(["edit", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "clouds.png"), "farmland",
                 "--level", "15", "--out", str(out), "--model", str(trained["model"]), "--steps", "2",
                 "--seed", "9", "--strength", "0.9"]) == 0
    with Image.open(out) as edited:
        assert edited.size == (64, 64)
        text = dict(getattr(edited, "text", {}))
        kept = np.asarray(edited.convert("RGB"))[_corner_mask(64, 24) == 0]
    assert text["prompt"] == "farmland" and text["level"] == "15" and text["seed"] == "9"
    assert text["steps"] == "2" and text["strength"] == "0.9" and text["guidance_scale"] == "4.0"
    assert text["model"] == str(trained["model"]) and text["scheduler"] and text["mask"] == str(tmp_path / "clouds.png")
    np.testing.assert_array_equal(kept, _chip(64)[_corner_mask(64, 24) == 0])


def test_edit_errors_are_one_clear_line(trained: dict[str, Any], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from stages.cli import main

    Image.fromarray(_chip(64)).save(tmp_path / "scene.png")
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(tmp_path / "wide.png")
    args = ["edit", str(tmp_path / "scene.png"), "farmland", "--out", str(tmp_path / "out.png")]
    assert main([*args, "--mask", str(tmp_path / "wide.png"), "--model", str(tmp_path / "none")]) == 2
    assert "no inpainting model" in capsys.readouterr().err
    assert main([*args, "--mask", str(tmp_path / "wide.png"), "--model", str(trained["model"])]) == 2
    assert "128x64 but the image is 64x64" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_edit_help_explains_the_uses(capsys: pytest.CaptureFixture[str]) -> None:
    from stages.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for use in ("remove an object", "replace an object", "cloud removal", "grey = blend", "--strength"):
        assert use in text
