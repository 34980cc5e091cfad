"""`text2earth generate` / `outpaint` (issue 6): guidance batching, the resolution sweep, the outpaint command and
the settings every output carries in its text chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from model import Text2EarthPipeline
from stages.cli import main
from stages.generate import parse_levels
from tests.model.test_pipeline import SIZE, _components, _pipeline


def png_text(image: Any) -> dict[str, str]:
    """A PNG's text chunks (Pillow's PngImageFile.text; `Image.open` is typed as the base class)."""
    return dict(image.text)


@pytest.fixture(scope="module")
def pipe() -> Text2EarthPipeline:
    return _pipeline(**_components())


@pytest.fixture(scope="module")
def model_dir(pipe: Text2EarthPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random pipeline saved like `dvc repro train` saves models/text2earth."""
    path = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(path)
    return path


def test_guidance_batching_is_one_doubled_batch_or_two_passes_with_the_same_images(
        pipe: Text2EarthPipeline) -> None:
    batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    try:
        images: dict[bool, np.ndarray] = {}
        for batched in (True, False):
            out: Any = pipe(["a harbour", "dunes"], resolution_level=[12, 16], height=SIZE, width=SIZE,
                            num_inference_steps=3, output_type="np", batch_guidance=batched,
                            generator=torch.Generator().manual_seed(0))
            images[batched] = out.images
    finally:
        hook.remove()
    assert batches == [4] * 3 + [2, 2] * 3  # doubled batch per step, then unconditional and conditional passes
    np.testing.assert_allclose(images[True], images[False], atol=1e-5)


def test_levels_parse_ranges_and_lists() -> None:
    from pipeline.errors import Text2EarthError

    assert parse_levels("10-18") == list(range(10, 19))
    assert parse_levels("10,12,15-17") == [10, 12, 15, 16, 17]
    for bad in ("18-10", "0-3", "ten"):
        with pytest.raises(Text2EarthError, match="--levels"):
            parse_levels(bad)


def test_outpaint_help_explains_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["outpaint", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--width", "--height", "--level", "--region", "x0,y0,x1,y1:prompt", "--geotiff", "--center",
                  "--overlap", "2^(17-level)"):
        assert words in text, words


def test_outpaint_writes_the_canvas_png_and_geotiff(model_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, tif = tmp_path / "scene.png", tmp_path / "scene.tif"
    code = main(["outpaint", "a river through farmland", "--width", "90", "--height", "44", "--level", "15",
                 "--out", str(out), "--model", str(model_dir), "--window", "32", "--overlap", "8", "--steps", "2",
                 "--region", "45,0,90,44:a lake", "--geotiff", str(tif), "--center=-3.7,40.4", "--no-progress",
                 "--device", "cpu"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "90x44 scene at level 15" in summary and "windows" in summary
    with Image.open(out) as image:
        assert image.size == (90, 44)
        pixels, text = np.asarray(image.convert("RGB")), png_text(image)
    assert text["prompt"] == "a river through farmland" and text["level"] == "15" and text["seed"] == "0"
    assert text["model"] == str(model_dir) and text["scheduler"] == "DDPMScheduler"
    assert json.loads(text["regions"]) == ["45,0,90,44:a lake"]
    with rasterio.open(tif) as dataset:
        assert dataset.crs.to_epsg() == 32630 and dataset.res == pytest.approx((4.0, 4.0), rel=0.002)
        np.testing.assert_array_equal(dataset.read().transpose(1, 2, 0), pixels)


def test_outpaint_errors_are_one_line(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["outpaint", "x", "--width", "64", "--height", "64", "--level", "15", "--model", str(model_dir)]
    assert main([*base, "--geotiff", str(tmp_path / "a.tif")]) == 2
    assert "--center" in capsys.readouterr().err
    assert main([*base, "--region", "a lake"]) == 2
    assert "x0,y0,x1,y1:prompt" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.jpg")]) == 2
    assert main([*base[:2], "--width", "100000", "--height", "100000", *base[6:], "--out",
                 str(tmp_path / "huge.png")]) == 2
    err = capsys.readouterr().err
    assert "windows" in err and "--max-windows" in err and not (tmp_path / "huge.png").exists()


def test_generate_sweep_writes_a_labelled_grid(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.png"
    code = main(["generate", "a river through farmland", "--sweep", "--levels", "10-12,17", "--size", str(SIZE),
                 "--steps", "2", "--out", str(out), "--model", str(model_dir), "--device", "cpu"])
    assert code == 0
    with Image.open(out) as grid:
        text = png_text(grid)
        width, height = grid.size
    from model.validation import HEADER, MARGIN

    assert (width, height) == (MARGIN + 4 * SIZE, HEADER + SIZE)
    assert json.loads(text["levels"]) == [10, 11, 12, 17] and text["prompt"] == "a river through farmland"
    assert {"seed", "steps", "model", "scheduler"} <= set(text)


def test_generate_images_carry_their_settings(model_dir: Path, tmp_path: Path) -> None:
    code = main(["generate", "dunes", "--level", "14", "-n", "2", "--size", str(SIZE), "--steps", "2", "--seed", "5",
                 "--out", str(tmp_path), "--model", str(model_dir), "--device", "cpu"])
    assert code == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["dunes-L14-seed5.png", "dunes-L14-seed6.png"]
    with Image.open(files[0]) as image:
        assert image.size == (SIZE, SIZE)
        assert {k: png_text(image)[k] for k in ("prompt", "level", "seed")} == {"prompt": "dunes", "level": "14",
                                                                          "seed": "5"}


def test_generate_batches_reproduce_the_same_images(model_dir: Path, tmp_path: Path) -> None:
    """--batch-size bounds memory; per-image seeds make the images independent of how they are batched."""
    common = ["generate", "dunes", "--level", "14", "-n", "3", "--size", str(SIZE), "--steps", "2",
              "--model", str(model_dir), "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--batch-size", "2"]) == 0
    for name in ("dunes-L14-seed0.png", "dunes-L14-seed1.png", "dunes-L14-seed2.png"):
        with Image.open(tmp_path / "one" / name) as a, Image.open(tmp_path / "two" / name) as b:
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() <= 1, name  # a batch of 2 vs 3: float sums may round one level apart


def test_generating_commands_refuse_bad_arguments_before_the_model_loads(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["generate", "x", "--model", str(model_dir), "--size", str(SIZE), "--steps", "1"]
    cases = [
        ([*base, "--out", str(afile)], "is a file"),
        ([*base, "--sweep", "--out", str(tmp_path / "sweep.jpg")], "*.png"),
        ([*base, "--steps", "0", "--out", str(tmp_path)], "--steps"),
        ([*base, "--level", "25", "--out", str(tmp_path)], "--level"),
        ([*base, "--size", "0", "--out", str(tmp_path)], "--size"),
        ([*base, "--device", "foo", "--out", str(tmp_path)], "--device 'foo'"),
        (["edit", str(afile), "--mask", str(afile), "x", "--model", str(model_dir), "--out",
          str(tmp_path / "e.jpg")], "*.png"),
        (["evaluate", "--metrics", str(afile / "eval.json"), "--model", str(model_dir)], "is a file"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "sweep.jpg").exists()


def test_file_names_of_prompts_in_other_scripts_do_not_collide() -> None:
    from stages.generate import slug

    assert slug("A river, through farmland!") == "a-river-through-farmland"  # ASCII: readable, unchanged
    first, second = slug("渋谷の川"), slug("東京の港")
    assert first != second and first.startswith("prompt-")
    assert slug("über Äcker").startswith("ber-cker-") and slug("über Äcker") != slug("aber Äcker")


def test_edit_refuses_a_mask_that_selects_nothing(model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (SIZE, SIZE), (90, 120, 60)).save(tmp_path / "scene.png")
    Image.new("L", (SIZE, SIZE), 0).save(tmp_path / "mask.png")
    assert main(["edit", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "mask.png"), "a lake",
                 "--model", str(model_dir)]) == 2
    assert "selects no pixel" in capsys.readouterr().err
