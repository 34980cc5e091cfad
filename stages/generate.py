"""`text2earth generate`: images from a trained model, saved as PNGs that record how they were made."""

from __future__ import annotations

import argparse
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
"""


def add_parser(subparsers: Any) -> None:
    """Register `generate`."""
    g = subparsers.add_parser("generate", help="generate images from a prompt at a resolution level",
                              description=GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="what to draw, e.g. \"a river through farmland\"")
    level = g.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, help="resolution level 1..23 (0 = unknown; default: unknown, or the "
                                                 "prompt's \"{L}_GOOGLE_LEVEL_\" prefix)")
    level.add_argument("--gsd-m", type=float, help="ground sampling distance in metres per pixel instead of --level")
    g.add_argument("-n", "--num-images", type=int, default=4, help="images to write (default: %(default)s)")
    g.add_argument("--out", type=Path, default=Path("generated"), help="output folder (default: %(default)s)")
    g.add_argument("--model", default="models/text2earth", help="trained model folder (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=4.0,
                   help="joint guidance scale s = 1 + omega (default: %(default)s, the paper's omega = 3)")
    g.add_argument("--negative-prompt", help="replaces the empty prompt of the unconditional branch")
    g.add_argument("--device", help="cuda, cpu, mps... (default: cuda when available, else cpu)")
    g.set_defaults(run=run_generate)


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


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def run_generate(args: argparse.Namespace, extra: list[str]) -> int:
    """Generate `-n` images and save them as PNGs with their settings in text chunks."""
    if extra:
        raise Text2EarthError(f"generate: unknown argument(s) {' '.join(extra)}; see `text2earth generate --help`")
    if args.num_images < 1:
        raise Text2EarthError(f"-n must be at least 1, got {args.num_images}")
    model_dir = check_model_dir(args.model)
    import torch

    from model.pipeline import Text2EarthPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline: Any = Text2EarthPipeline.from_pretrained(model_dir).to(device)
    seeds = [args.seed + i for i in range(args.num_images)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # per image: each is reproducible on its own
    output = pipeline(args.prompt, resolution_level=args.level, gsd_m=args.gsd_m, num_images_per_prompt=len(seeds),
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      negative_prompt=args.negative_prompt, generator=generators)
    args.out.mkdir(parents=True, exist_ok=True)
    scheduler = type(pipeline.scheduler).__name__
    for image, seed, level in zip(output.images, seeds, output.levels, strict=True):
        chunks = {"prompt": args.prompt, "level": level, "gsd_m": args.gsd_m, "seed": seed, "steps": args.steps,
                  "guidance_scale": args.guidance, "negative_prompt": args.negative_prompt,
                  "model": str(model_dir), "scheduler": scheduler, "software": "text2earth generate"}
        save_png(image, args.out / f"{slug(args.prompt)}-L{level}-seed{seed}.png", chunks)
    print(f"generate: wrote {len(seeds)} image(s) of {output.images[0].size[0]}x{output.images[0].size[1]} "
          f"(level {output.levels[0]}, seeds {seeds[0]}..{seeds[-1]}) to {args.out}")
    return 0
