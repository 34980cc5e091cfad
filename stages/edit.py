"""`text2earth edit`: repaint the masked part of an image with the inpainting model; the PNG records how."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.errors import Text2EarthError

EDIT_DESCRIPTION = """\
Repaint part of a remote-sensing image from a text prompt at a resolution level; the rest stays as it is.

  text2earth edit scene.png --mask mask.png "a bridge across the river" --level 15 --out edited.png

The mask is a greyscale image of the scene's size (or the same aspect ratio, which is resized):
white = repaint, black = keep, grey = blend (soft masks: feathered edges, thin haze).
Uses:
  remove an object    mask it, describe what should be there instead ("bare soil", "open water")
  replace an object   mask it, describe the new one ("a solar farm", "a roundabout")
  cloud removal       mask the clouds (a cloud mask thresholded, or its soft probabilities) and describe
                      the ground under them; a soft mask keeps that much of a thin cloud's view
--strength below 1 starts from the noised input instead of pure noise, so the repainted region keeps the
input's layout (1 = ignore what was there). Unmasked pixels are copied from the input, and the repainted
region is generated to fit them. The level is Git-10M's Google zoom level (2^(17-L) m/px); give the
scene's own level or --gsd-m. Results are best at the training size (256 px): crop larger scenes around
the region. Needs the inpainting model: `text2earth train --task inpaint`.
The PNG records prompt, level, seed, steps, guidance, strength, model, scheduler, image and mask in its text chunks
(`python -c "from PIL import Image; print(Image.open(F).text)"`).
"""


def add_parser(subparsers: Any) -> None:
    """Register `edit`."""
    e = subparsers.add_parser("edit", help="repaint the masked part of an image (inpainting: remove/replace "
                                           "objects, cloud removal)", description=EDIT_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("image", type=Path, help="the image to edit (PNG, JPEG, ...; sides a multiple of 16 for the tiny "
                                           "model, 64 for base)")
    e.add_argument("prompt", help="what the masked region should show, e.g. \"dense forest\"")
    e.add_argument("--mask", type=Path, required=True,
                   help="greyscale mask image: white = repaint, black = keep, grey = blend")
    level = e.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, help="resolution level 1..23 (0 = unknown; default: unknown, or the "
                                                 "prompt's \"{L}_GOOGLE_LEVEL_\" prefix)")
    level.add_argument("--gsd-m", type=float, help="ground sampling distance in metres per pixel instead of --level")
    e.add_argument("--out", type=Path, help="output PNG (default: IMAGE's name + '-edited.png' in the current folder)")
    e.add_argument("--model", default="models/text2earth-inpaint",
                   help="trained inpainting model folder (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    e.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    e.add_argument("--guidance", type=float, default=4.0,
                   help="joint guidance scale s = 1 + omega (default: %(default)s, the paper's omega = 3)")
    e.add_argument("--strength", type=float, default=1.0,
                   help="0..1: how much of the noise schedule to run; below 1 keeps the input's layout in the "
                        "masked region (default: %(default)s)")
    e.add_argument("--negative-prompt", help="replaces the empty prompt of the unconditional branch")
    e.add_argument("--device", help="cuda, cpu, mps... (default: cuda when available, else cpu)")
    e.set_defaults(run=run_edit)


def _read_image(path: Path) -> Any:
    from PIL import Image

    if not path.is_file():
        raise Text2EarthError(f"image {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise Text2EarthError(f"{path}: not a readable image ({exc})") from exc


def run_edit(args: argparse.Namespace, extra: list[str]) -> int:
    """Edit one image and save it as PNG with its settings in text chunks."""
    if extra:
        raise Text2EarthError(f"edit: unknown argument(s) {' '.join(extra)}; see `text2earth edit --help`")
    from model.inpaint import check_inpaint_model_dir
    from model.masks import load_mask
    from stages.generate import check_png_out, check_run_args, resolve_device

    if args.out is not None:
        check_png_out(args.out)
    check_run_args(args.steps, args.level)
    device = resolve_device(args.device)
    model_dir = check_inpaint_model_dir(args.model)
    image = _read_image(args.image)
    mask = load_mask(args.mask, image.size)  # bad masks fail before the model loads
    if not mask.any():
        raise Text2EarthError(f"--mask {args.mask} selects no pixel (all black): white marks what to repaint")
    out = args.out or Path(f"{args.image.stem}-edited.png")
    import torch

    from model.inpaint import Text2EarthInpaintPipeline
    from stages.generate import save_png

    pipeline: Any = Text2EarthInpaintPipeline.from_pretrained(model_dir).to(device)
    output = pipeline(args.prompt, image=image, mask_image=mask, resolution_level=args.level, gsd_m=args.gsd_m,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, strength=args.strength,
                      negative_prompt=args.negative_prompt, generator=torch.Generator().manual_seed(args.seed))
    level = output.levels[0]
    chunks = {"prompt": args.prompt, "level": level, "gsd_m": args.gsd_m, "seed": args.seed, "steps": args.steps,
              "guidance_scale": args.guidance, "strength": args.strength, "negative_prompt": args.negative_prompt,
              "model": str(model_dir), "scheduler": type(pipeline.scheduler).__name__, "image": str(args.image),
              "mask": str(args.mask), "software": "text2earth edit"}
    save_png(output.images[0], out, chunks)
    print(f"edit: repainted {mask.mean():.0%} of {args.image} ({image.size[0]}x{image.size[1]}, level {level}, "
          f"seed {args.seed}) -> {out}")
    return 0
