"""`text2earth generate` and `text2earth outpaint`: images, resolution sweeps and unbounded scenes from a trained
model, saved as PNGs (and GeoTIFFs) that record how they were made."""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import Text2EarthError

GENERATE_DESCRIPTION = """\
Generate remote-sensing images from a text prompt at a resolution level with a trained model.

  text2earth generate "a river through farmland" --level 15 -n 4 --out samples/

The level is Git-10M's Google zoom level: level L means 2^(17-L) m/px (10 = 128 m ... 18 = 0.5 m);
--gsd-m takes metres per pixel instead, 0 / no level means unknown resolution. Image i uses seed
--seed + i, so `--seed S -n 1` regenerates any single image (to within rounding in a few pixels).
Each PNG records prompt, level, seed, steps, guidance, model and scheduler in its text chunks
(`python -c "from PIL import Image; print(Image.open(F).text)"`).

Resolution sweep: one prompt at every level of --levels from the same starting noise, in one labelled grid
(what resolution guidance should do: the same scene, zooming out from left to right):

  text2earth generate "a river through farmland" --sweep --levels 10-18 --out sweep.png
"""

OUTPAINT_DESCRIPTION = """\
Paint a scene of any size (e.g. 3500 x 1100 pixels) at one resolution level with a trained model:
overlapping windows (--window, 256 px) are generated left to right, top to bottom, each one holding
fixed what is already painted (the painted latents replace the window's own at every denoising step,
with a soft edge of --blend latent pixels) and blended into the canvas with feathered weights over the
--overlap. Rows are written to the output as soon as they are finished, so memory stays that of one row
of windows however tall the scene is.

  text2earth outpaint "farmland with scattered villages" --width 1024 --height 512 --level 15 --out scene.png

Parts of the scene can have their own prompt: --region "x0,y0,x1,y1:prompt" (pixels, x1/y1 exclusive;
repeatable, a later region wins where regions overlap). A window takes the prompt of the region under its
centre, else the main prompt:

  text2earth outpaint "farmland" --width 2048 --height 768 --level 14 \\
      --region "1024,0,2048,768:a lake surrounded by forest" --out lake.png

A georeferenced copy: --geotiff scene.tif --center LON,LAT puts the canvas centre on that point in its
UTM zone, with pixels of the level's GSD (2^(17-level) m) in ground metres there (write a western or
southern centre as --center=-3.70,40.42). The seed fixes every window (each has its own seed derived
from --seed, row and column). The PNG's text chunks (and the GeoTIFF's tags) record prompt, regions,
level, seed, steps, guidance, window, overlap, model and scheduler.

Time goes with the number of windows, about ceil((W - overlap) / (window - overlap)) per row times as many
rows (3500 x 1100 at the defaults: 18 x 6 = 108); with the tiny model on one CPU core a window takes
about 0.9 s at 2 steps and 5 s at 30 (--steps).
"""


def add_parser(subparsers: Any) -> None:
    """Register `generate` and `outpaint` (the cli calls this once for both)."""
    g = subparsers.add_parser("generate", help="generate images from a prompt at a resolution level",
                              description=GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="what to draw, e.g. \"a river through farmland\"")
    level = g.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, help="resolution level 1..23 (0 = unknown; default: unknown, or the "
                                                 "prompt's \"{L}_GOOGLE_LEVEL_\" prefix)")
    level.add_argument("--gsd-m", type=float, help="ground sampling distance in metres per pixel instead of --level")
    g.add_argument("-n", "--num-images", type=int, default=4, help="images to write (default: %(default)s)")
    g.add_argument("--out", type=Path, default=Path("generated"),
                   help="output folder, or the grid's .png file with --sweep (default: %(default)s)")
    g.add_argument("--size", type=int, default=256, help="image width and height in pixels (default: %(default)s, "
                                                         "the training size)")
    g.add_argument("--sweep", action="store_true", help="one image per level of --levels, in one labelled grid")
    g.add_argument("--levels", default="10-18", help="levels of --sweep: a range and/or a list, e.g. 10-18 or "
                                                     "10,12,15-17 (default: %(default)s)")
    g.add_argument("--model", default="models/text2earth", help="trained model folder (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=4.0,
                   help="joint guidance scale s = 1 + omega (default: %(default)s, the paper's omega = 3)")
    g.add_argument("--negative-prompt", help="replaces the empty prompt of the unconditional branch")
    g.add_argument("--batch-size", type=int, default=8,
                   help="images generated together (memory grows with it; default: %(default)s)")
    g.add_argument("--device", help="cuda, cpu, mps... (default: cuda when available, else cpu)")
    g.set_defaults(run=run_generate)
    add_outpaint_parser(subparsers)


def add_outpaint_parser(subparsers: Any) -> None:
    """Register `outpaint` (called by `add_parser`)."""
    o = subparsers.add_parser("outpaint", help="paint a scene of any size at one level, window by window",
                              description=OUTPAINT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("prompt", help="what the scene shows, e.g. \"farmland with scattered villages\"")
    o.add_argument("--width", type=int, required=True, help="scene width in pixels (any size)")
    o.add_argument("--height", type=int, required=True, help="scene height in pixels (any size)")
    o.add_argument("--level", type=int, required=True, help="resolution level of the whole scene, 1..23 (15 = 4 m/px)")
    o.add_argument("--out", type=Path, default=Path("scene.png"), help="the PNG to write (default: %(default)s)")
    o.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1:PROMPT",
                   help="a prompt for part of the scene (repeatable)")
    o.add_argument("--geotiff", type=Path, help="also write a GeoTIFF (needs --center)")
    o.add_argument("--center", metavar="LON,LAT", help="where the GeoTIFF's centre lies, in degrees")
    o.add_argument("--model", default="models/text2earth", help="trained model folder (default: %(default)s)")
    o.add_argument("--window", type=int, default=256, help="window size in pixels (default: %(default)s, the "
                                                           "training size)")
    o.add_argument("--overlap", type=int, default=64, help="pixels shared by neighbouring windows (default: "
                                                           "%(default)s)")
    o.add_argument("--blend", type=int, help="soft edge of the held part in latent pixels (default: the overlap)")
    o.add_argument("--seed", type=int, default=0, help="seed of the scene (default: %(default)s)")
    o.add_argument("--steps", type=int, default=30, help="denoising steps per window (default: %(default)s)")
    o.add_argument("--guidance", type=float, default=4.0, help="joint guidance scale s = 1 + omega (default: "
                                                               "%(default)s)")
    o.add_argument("--negative-prompt", help="replaces the empty prompt of the unconditional branch")
    o.add_argument("--no-batch-guidance", action="store_true",
                   help="run the two guidance branches as two UNet passes instead of one doubled batch (less memory)")
    o.add_argument("--max-windows", type=int, default=10_000,
                   help="refuse scenes that need more windows than this, before any work (default: %(default)s)")
    o.add_argument("--device", help="cuda, cpu, mps... (default: cuda when available, else cpu)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.set_defaults(run=run_outpaint)


def save_png(image: Any, path: Path, chunks: Mapping[str, Any]) -> None:
    """Save a PIL image as PNG with `chunks` (prompt, level, seed, model, scheduler...) as text chunks;
    None values are left out. Read them back with `PIL.Image.open(path).text`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        if value is not None:
            info.add_text(key, str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def check_model_dir(model: str | Path) -> Path:
    """The trained model folder, or a clear error that says how to make one."""
    model_dir = Path(model)
    if not (model_dir / "model_index.json").is_file():
        raise Text2EarthError(f"no trained model in {model_dir} (no model_index.json): run `dvc repro train` or "
                              "`text2earth train`, or pass --model DIR")
    return model_dir


def resolve_device(choice: str | None) -> str:
    """--device as torch understands it (None/"auto": CUDA when available), or a clear error before any work."""
    import torch

    if choice in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    assert choice is not None
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise Text2EarthError(f"--device {choice!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Text2EarthError(f"--device {choice}: no CUDA GPU is visible here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise Text2EarthError(f"--device {choice}: only {torch.cuda.device_count()} GPU(s) here (cuda:0..)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise Text2EarthError(f"--device {choice}: Apple's MPS is not available here; use --device cpu")
    return choice


def check_run_args(steps: int, level: int | None) -> None:
    """Arguments every generating command shares, checked before the model loads (seconds)."""
    from model.config import MAX_LEVEL, NULL_LEVEL

    if steps < 1:
        raise Text2EarthError(f"--steps must be at least 1, got {steps}")
    if level is not None and not NULL_LEVEL <= level <= MAX_LEVEL:
        raise Text2EarthError(f"--level must lie in {NULL_LEVEL}..{MAX_LEVEL} ({NULL_LEVEL} = unknown), got {level}")


def check_png_out(path: Path, flag: str = "--out") -> None:
    """An output PNG path that can be written (checked before the model loads, not after the work)."""
    if path.suffix.lower() != ".png":
        raise Text2EarthError(f"{flag} {path}: the output is a PNG (its settings go in PNG text chunks); "
                              "name it *.png")
    if path.is_dir():
        raise Text2EarthError(f"{flag} {path} is a folder; give a file name ending in .png")
    check_out_dir(path.parent, flag)


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """An output folder that exists or can be made (no file on the way)."""
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise Text2EarthError(f"{flag} {path}: {folder} is a file, not a folder")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt; prompts with other than ASCII letters and digits keep a short
    hash of their full text, so two prompts in another script never share a file name."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-")
    if text.isascii() and base:
        return base
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{base or 'prompt'}-{digest}"


def parse_levels(text: str) -> list[int]:
    """`"10-18"`, `"10,12,15-17"` -> the levels, in the order given; each must lie in 1..23."""
    from model.config import MAX_LEVEL

    levels: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise Text2EarthError(f"--levels {text!r}: expected levels and ranges like 10-18 or 10,12,15-17") from None
        if not 1 <= first <= last <= MAX_LEVEL:
            raise Text2EarthError(f"--levels {text!r}: levels must lie in 1..{MAX_LEVEL}, ranges low-high")
        levels += range(first, last + 1)
    return levels


def _load_pipeline(model: str, device: str | None) -> tuple[Any, Path]:
    model_dir = check_model_dir(model)
    device = resolve_device(device)  # a bad --device fails before the weights load

    from model.pipeline import Text2EarthPipeline

    return Text2EarthPipeline.from_pretrained(model_dir).to(device), model_dir


def run_sweep(args: argparse.Namespace, pipeline: Any, model_dir: Path) -> int:
    """One prompt at every level of --levels from the same noise, as one labelled grid PNG."""
    from model.validation import compose_grid, generate_cells

    levels = parse_levels(args.levels)
    out = args.out if args.out.suffix else args.out / f"{slug(args.prompt)}-sweep-seed{args.seed}.png"
    rows = generate_cells(pipeline, [args.prompt], levels, steps=args.steps, guidance_scale=args.guidance,
                          seed=args.seed, size=args.size)
    scheduler = type(pipeline.scheduler).__name__
    # A short title: it must fit left of the first column; the rest of the settings are in the text chunks.
    grid = compose_grid(rows, [args.prompt], levels, title=f"seed {args.seed}, {args.steps} steps, s {args.guidance:g}")
    chunks = {"prompt": args.prompt, "levels": levels, "seed": args.seed, "steps": args.steps,
              "guidance_scale": args.guidance, "model": str(model_dir), "scheduler": scheduler,
              "software": "text2earth generate --sweep"}
    save_png(grid, out, chunks)
    print(f"generate: wrote a {len(levels)}-level sweep (levels {args.levels}, seed {args.seed}) to {out}")
    return 0


def run_generate(args: argparse.Namespace, extra: list[str]) -> int:
    """Generate `-n` images (or a --sweep grid) and save them as PNGs with their settings in text chunks."""
    if extra:
        raise Text2EarthError(f"generate: unknown argument(s) {' '.join(extra)}; see `text2earth generate --help`")
    if args.num_images < 1:
        raise Text2EarthError(f"-n must be at least 1, got {args.num_images}")
    check_run_args(args.steps, args.level)
    if args.batch_size < 1:
        raise Text2EarthError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.size < 1:
        raise Text2EarthError(f"--size must be a positive number of pixels, got {args.size}")
    if args.sweep:
        parse_levels(args.levels)  # bad levels fail before the model loads
        if args.level is not None or args.gsd_m is not None:
            raise Text2EarthError("--sweep draws every level of --levels: drop --level / --gsd-m")
        if args.out.suffix:
            check_png_out(args.out)
        else:
            check_out_dir(args.out)
    else:
        check_out_dir(args.out)
    pipeline, model_dir = _load_pipeline(args.model, resolve_device(args.device))
    if args.sweep:
        return run_sweep(args, pipeline, model_dir)
    import torch

    seeds = [args.seed + i for i in range(args.num_images)]
    args.out.mkdir(parents=True, exist_ok=True)
    scheduler = type(pipeline.scheduler).__name__
    level, size = None, (args.size, args.size)
    for start in range(0, len(seeds), args.batch_size):  # batches bound the memory; seeds make each image
        batch = seeds[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed(s) for s in batch]  # per image: reproducible on its own
        output = pipeline(args.prompt, resolution_level=args.level, gsd_m=args.gsd_m,
                          num_images_per_prompt=len(batch), num_inference_steps=args.steps,
                          guidance_scale=args.guidance, height=args.size, width=args.size,
                          negative_prompt=args.negative_prompt, generator=generators)
        for image, seed, level in zip(output.images, batch, output.levels, strict=True):
            chunks = {"prompt": args.prompt, "level": level, "gsd_m": args.gsd_m, "seed": seed, "steps": args.steps,
                      "guidance_scale": args.guidance, "negative_prompt": args.negative_prompt,
                      "model": str(model_dir), "scheduler": scheduler, "software": "text2earth generate"}
            save_png(image, args.out / f"{slug(args.prompt)}-L{level}-seed{seed}.png", chunks)
            size = image.size
    print(f"generate: wrote {len(seeds)} image(s) of {size[0]}x{size[1]} (level {level}, seeds "
          f"{seeds[0]}..{seeds[-1]}) to {args.out}")
    return 0


def parse_center(text: str) -> tuple[float, float]:
    """`"LON,LAT"` in degrees."""
    try:
        lon, lat = (float(v) for v in text.split(","))
    except ValueError:
        raise Text2EarthError(f"--center {text!r}: expected LON,LAT in degrees, e.g. --center=2.35,48.85") from None
    return lon, lat


def run_outpaint(args: argparse.Namespace, extra: list[str]) -> int:
    """Paint the scene window by window into a streamed PNG (and a GeoTIFF), then print a one-line summary."""
    from contextlib import ExitStack

    from model.config import level_gsd_m
    from model.outpaint import OutpaintSpec, Region, outpaint
    from model.scene_writers import GeoTiffRowWriter, PngRowWriter, scene_georeference

    if extra:
        raise Text2EarthError(f"outpaint: unknown argument(s) {' '.join(extra)}; see `text2earth outpaint --help`")
    if (args.geotiff is None) != (args.center is None):
        raise Text2EarthError("--geotiff and --center go together: the GeoTIFF needs the centre's LON,LAT")
    if args.out.suffix.lower() != ".png":
        raise Text2EarthError(f"--out {args.out}: the scene is written as PNG; name it .png (GeoTIFF: --geotiff)")
    spec = OutpaintSpec(args.prompt, args.width, args.height, args.level,
                        regions=tuple(Region.parse(r) for r in args.region), window=args.window, overlap=args.overlap,
                        blend=args.blend, steps=args.steps, guidance_scale=args.guidance,
                        negative_prompt=args.negative_prompt, seed=args.seed,
                        batch_guidance=not args.no_batch_guidance)
    from model.outpaint import window_starts

    stride = max(args.window - args.overlap, 1)
    windows = len(window_starts(args.height, args.window, stride)) * len(window_starts(args.width, args.window, stride))
    if windows > args.max_windows:
        raise Text2EarthError(f"a {args.width}x{args.height} scene needs {windows:,} windows of {args.window} px, more "
                              f"than --max-windows {args.max_windows:,} (each window is one full generation of "
                              f"{args.steps} steps): paint a smaller scene or raise --max-windows")
    georeference = None
    if args.center is not None:
        georeference = scene_georeference(*parse_center(args.center), args.width, args.height, args.level)
    pipeline, model_dir = _load_pipeline(args.model, args.device)
    chunks = {"prompt": args.prompt, "regions": list(args.region) or None, "level": args.level,
              "gsd_m": level_gsd_m(args.level) if args.level else None, "seed": args.seed, "steps": args.steps,
              "guidance_scale": args.guidance, "negative_prompt": args.negative_prompt, "window": args.window,
              "overlap": args.overlap, "blend": args.blend, "center": args.center, "model": str(model_dir),
              "scheduler": type(pipeline.scheduler).__name__, "software": "text2earth outpaint"}
    with ExitStack() as stack:
        sinks: list[Any] = [stack.enter_context(PngRowWriter(args.out, args.width, args.height, chunks))]
        if georeference is not None:
            sinks.append(stack.enter_context(GeoTiffRowWriter(args.geotiff, args.width, args.height,
                                                              *georeference, tags=chunks)))
        result = outpaint(pipeline, spec, sinks, progress=not args.no_progress)
    written = str(args.out) + (f" and {args.geotiff} ({georeference[0].to_string()})" if georeference else "")
    print(f"outpaint: wrote a {result.width}x{result.height} scene at level {args.level} ({result.rows}x{result.cols} "
          f"= {len(result.windows)} windows of {args.window} px, seed {args.seed}) to {written} in "
          f"{result.seconds:.0f} s")
    return 0
