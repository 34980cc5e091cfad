"""The validation grid: fixed prompts (rows) at several resolution levels (columns), from one seed.

Rows and columns are labelled so the picture explains itself in `dvc plots` or a pull request: the same
prompt across a row should change scale with the level, which is what resolution guidance is for.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from model.config import NULL_LEVEL, level_gsd_m

__all__ = ["level_label", "validation_grid"]

HEADER = 34  # pixels above the first row for the level labels
MARGIN = 180  # pixels left of the first column for the prompt


def level_label(level: int) -> str:
    """'level 15 (4 m/px)' or 'level 0 (unknown)'."""
    if level == NULL_LEVEL:
        return "level 0 (unknown)"
    gsd = level_gsd_m(level)
    return f"level {level} ({gsd:g} m/px)"


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def generate_cells(pipeline: Any, prompts: Sequence[str], levels: Sequence[int], *, steps: int,
                   guidance_scale: float, seed: int, size: int = 256) -> list[list[Image.Image]]:
    """One image per (prompt, level), every cell from the same starting noise so only the condition differs."""
    device = pipeline._execution_device
    shape = (1, pipeline.unet.config.in_channels, size // pipeline.vae_scale_factor, size // pipeline.vae_scale_factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    rows: list[list[Image.Image]] = []
    for prompt in prompts:
        latents = noise.repeat(len(levels), 1, 1, 1).to(device)
        out = pipeline([prompt] * len(levels), resolution_level=list(levels), height=size, width=size,
                       num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                       generator=torch.Generator().manual_seed(seed), output_type="pil")
        rows.append(list(out.images))
    return rows


def compose_grid(rows: Sequence[Sequence[Image.Image]], prompts: Sequence[str], levels: Sequence[int],
                 title: str = "") -> Image.Image:
    """Paste the cells into one labelled image (white background, black text)."""
    cell_w, cell_h = rows[0][0].size
    grid = Image.new("RGB", (MARGIN + cell_w * len(levels), HEADER + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font, small = _font(14), _font(12)
    if title:
        draw.text((6, 8), title, fill="black", font=small)
    for col, level in enumerate(levels):
        draw.text((MARGIN + col * cell_w + 6, 10), level_label(level), fill="black", font=font)
    for row, (prompt, images) in enumerate(zip(prompts, rows, strict=True)):
        top = HEADER + row * cell_h
        draw.multiline_text((6, top + 6), "\n".join(textwrap.wrap(prompt, 24)[:12]), fill="black", font=small)
        for col, image in enumerate(images):
            grid.paste(image, (MARGIN + col * cell_w, top))
    return grid


def validation_grid(pipeline: Any, prompts: Sequence[str], levels: Sequence[int], *, steps: int,
                    guidance_scale: float, seed: int, title: str = "") -> Image.Image:
    """Generate and label the prompts x levels grid."""
    rows = generate_cells(pipeline, prompts, levels, steps=steps, guidance_scale=guidance_scale, seed=seed)
    return compose_grid(rows, prompts, levels, title)
