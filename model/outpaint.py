"""Unbounded scenes: outpaint a W x H canvas with overlapping windows at one level, streamed band by band.

Each window is drawn by the text-to-image pipeline while what is already painted is held fixed, RePaint-style:
after every denoising step the painted latents, noised to the next timestep, replace the window's latents
under a soft mask (as diffusers' inpainting pipeline does for 4-channel UNets), so any trained
`Text2EarthPipeline` outpaints without an inpainting UNet. Decoded windows are blended with feathered weights
where they overlap, which also hides the decoder's border effects. Only one band of window rows is held in
memory; finished pixel rows go to the sinks (a streamed PNG, a GeoTIFF) as soon as no later window touches them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from scipy.ndimage import distance_transform_edt

from model.autoencoder import decode, latent_channels
from model.config import MAX_LEVEL, NULL_LEVEL
from model.pipeline import GenerationInputError

__all__ = ["OutpaintResult", "OutpaintSpec", "Region", "RowSink", "Window", "outpaint", "plan_windows",
           "seam_ratio", "window_starts"]


@dataclass(frozen=True)
class Region:
    """A prompt for part of the canvas: pixels x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int
    prompt: str

    @classmethod
    def parse(cls, text: str) -> Region:
        """`"x0,y0,x1,y1:prompt"` (pixels, x1 and y1 exclusive), as `--region` takes it."""
        box, sep, prompt = text.partition(":")
        try:
            x0, y0, x1, y1 = (int(v) for v in box.split(","))
        except ValueError:
            x0 = y0 = x1 = y1 = -1
        if not sep or not prompt.strip() or x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
            raise GenerationInputError(f"region {text!r}: expected \"x0,y0,x1,y1:prompt\" with 0 <= x0 < x1 and "
                                       "0 <= y0 < y1 in pixels, e.g. \"0,0,512,512:a lake in a forest\"")
        return cls(x0, y0, x1, y1, prompt.strip())

    def covers(self, x: float, y: float) -> bool:
        """Whether the point (x, y) in pixels lies inside the region."""
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1


@dataclass(frozen=True)
class Window:
    """One window of the plan: its grid cell, its top-left pixel, its prompt and its noise seed."""

    row: int
    col: int
    x: int
    y: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class OutpaintSpec:
    """What to paint. `blend`: width in latent pixels of the soft edge of the held (painted) region; None is
    the whole overlap, which left the smallest seams in our checks (a hard edge, 0, leaves visible ones).
    `seed` fixes every window's noise (each window draws from a seed derived from (seed, row, col)), so a scene
    is reproducible and no window's noise depends on how many windows came before it."""

    prompt: str
    width: int
    height: int
    level: int
    regions: tuple[Region, ...] = ()
    window: int = 256
    overlap: int = 64
    blend: int | None = None
    steps: int = 30
    guidance_scale: float = 4.0
    negative_prompt: str | None = None
    seed: int = 0
    batch_guidance: bool = True

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise GenerationInputError(f"width and height must be at least 1 pixel, got {self.width}x{self.height}")
        if not NULL_LEVEL <= self.level <= MAX_LEVEL:
            raise GenerationInputError(f"level must lie in {NULL_LEVEL}..{MAX_LEVEL}, got {self.level}")
        if not 0 <= self.overlap < self.window:
            raise GenerationInputError(f"overlap must lie in 0..window-1 ({self.window - 1}), got {self.overlap}")
        if self.steps < 1:
            raise GenerationInputError(f"steps must be at least 1, got {self.steps}")
        if self.blend is not None and self.blend < 0:
            raise GenerationInputError(f"blend must be >= 0 latent pixels, got {self.blend}")


@dataclass
class OutpaintResult:
    """What was painted: canvas size, the window grid, time, and the largest band buffers held at once."""

    width: int
    height: int
    rows: int
    cols: int
    windows: list[Window] = field(repr=False)
    seconds: float
    band_bytes: int


class RowSink(Protocol):
    """Receives finished pixel rows, top to bottom: uint8 arrays of shape (rows, width, 3)."""

    def write_rows(self, rows: np.ndarray) -> None:
        """Append these rows to the output."""


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, plus a last window flush with the end (never past it)."""
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def window_seed(seed: int, row: int, col: int) -> int:
    """A window's own noise seed, derived from (seed, row, col) so windows are independent of each other."""
    return int(np.random.SeedSequence([seed, row, col]).generate_state(1, dtype=np.uint64)[0] >> 1)


def plan_windows(spec: OutpaintSpec, stride: int, align: int = 1) -> list[list[Window]]:
    """The windows, row by row in raster order. The canvas is padded up to a multiple of `align` (the
    autoencoder's factor) and to at least one window; each window takes the prompt of the last region covering
    the centre of its part of the canvas (later `--region`s paint over earlier ones), else the main prompt."""
    padded_w = max(spec.window, math.ceil(spec.width / align) * align)
    padded_h = max(spec.window, math.ceil(spec.height / align) * align)
    rows = []
    for row, y in enumerate(window_starts(padded_h, spec.window, stride)):
        cells = []
        for col, x in enumerate(window_starts(padded_w, spec.window, stride)):
            centre = ((x + min(x + spec.window, spec.width)) / 2, (y + min(y + spec.window, spec.height)) / 2)
            prompt = next((r.prompt for r in reversed(spec.regions) if r.covers(*centre)), spec.prompt)
            cells.append(Window(row, col, x, y, prompt, window_seed(spec.seed, row, col)))
        rows.append(cells)
    return rows


def held_mask(known: np.ndarray, blend: int) -> np.ndarray:
    """Soft mask (1 = keep the painted latent) over a window's latents: 1 deep inside the painted part, falling
    to 0 over `blend` latent pixels towards the unpainted part (cosine), 0 where nothing is painted."""
    if not known.any() or known.all() or blend == 0:
        return known.astype(np.float32)
    distance = distance_transform_edt(known)  # latent pixels to the nearest unpainted one
    ramp = np.clip(distance / (blend + 1), 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


def feather(length: int, ramp: int, *, start: bool, end: bool) -> np.ndarray:
    """Blending weights along one window axis: a cosine rise over `ramp` pixels at a side with a neighbour
    (never exactly 0, so every pixel keeps some weight), 1 elsewhere."""
    weights = np.ones(length, dtype=np.float32)
    ramp = min(ramp, length)
    if ramp > 0:
        rise = (0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)).astype(np.float32)
        if start:
            weights[:ramp] = np.minimum(weights[:ramp], rise)
        if end:
            weights[length - ramp:] = np.minimum(weights[length - ramp:], rise[::-1])
    return weights


def seam_ratio(image: np.ndarray, xs: Sequence[int], ys: Sequence[int], window: int, phase: int = 1) -> float:
    """How much larger the pixel step across window borders is than the steps just inside the windows.

    Borders are each window's first and one-past-last column (row) inside the canvas. For each, the mean absolute
    difference between the two pixel columns (rows) that meet there is compared with the same statistic `phase`
    pixels before and after it (inside the windows; `phase` = the autoencoder's factor, so a decoder's periodic
    texture compares like with like). Comparing locally keeps the statistic steady on smooth scenes whose few large
    edges would dominate a canvas-wide average. About 1: no visible seam; a hard seam is several times larger.
    """
    pixels = image.astype(np.float32)
    step_x = np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2))  # step_x[b - 1]: between columns b - 1 and b
    step_y = np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2))
    at, beside = 0.0, 0.0
    for steps, starts in ((step_x, xs), (step_y, ys)):
        length = len(steps) + 1
        for b in sorted({b for s in starts for b in (s, s + window) if phase < b < length - phase}):
            at += float(steps[b - 1])
            beside += float(steps[b - 1 - phase] + steps[b - 1 + phase]) / 2
    if beside == 0.0:
        raise ValueError("seam_ratio: no window border with texture on both sides (a canvas of one window?)")
    return at / beside


class _Band:
    """The window rows' worth of canvas one row of windows works on: pixel sums and weights for feathering,
    painted latents and which latent pixels are painted. Width is the padded canvas, height one window."""

    def __init__(self, y: int, window: int, width: int, channels: int, factor: int) -> None:
        self.y = y
        self.pixels = np.zeros((window, width, 3), dtype=np.float32)
        self.weights = np.zeros((window, width), dtype=np.float32)
        self.latents = torch.zeros(channels, window // factor, width // factor)
        self.known = np.zeros((window // factor, width // factor), dtype=bool)
        self.factor = factor

    @property
    def nbytes(self) -> int:
        """Bytes held by the band's buffers."""
        latent_bytes = self.latents.element_size() * self.latents.nelement()
        return self.pixels.nbytes + self.weights.nbytes + latent_bytes + self.known.nbytes

    def advance(self, y: int) -> tuple[np.ndarray, _Band]:
        """Rows above `y` are final: return them as uint8, and a band at `y` that keeps the overlap below."""
        done = y - self.y
        window, width = self.weights.shape
        band = _Band(y, window, width, self.latents.shape[0], self.factor)
        band.pixels[: window - done] = self.pixels[done:]
        band.weights[: window - done] = self.weights[done:]
        band.latents[:, : (window - done) // self.factor] = self.latents[:, done // self.factor:]
        band.known[: (window - done) // self.factor] = self.known[done // self.factor:]
        return self.finished(done), band

    def finished(self, rows: int) -> np.ndarray:
        """The first `rows` pixel rows, blended, as uint8 (the rounding diffusers' image processor uses)."""
        blended = self.pixels[:rows] / np.maximum(self.weights[:rows, :, None], 1e-12)
        return np.asarray((np.clip(blended, 0.0, 1.0) * 255).round(), dtype=np.uint8)


def _denoise_window(pipeline: Any, spec: OutpaintSpec, held: torch.Tensor, mask: torch.Tensor | None,
                    text: torch.Tensor, null_text: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """One window's latents: the pipeline's denoising loop with the painted part (`held` under `mask`) forced
    back after every step, noised to the next timestep (exact after the last step)."""
    device, dtype = pipeline._execution_device, text.dtype
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(spec.steps, device=device)  # also resets multistep solvers' history
    timesteps = scheduler.timesteps
    noise = randn_tensor(tuple(held.shape), generator=generator, device=device, dtype=dtype)
    latents = noise * scheduler.init_noise_sigma
    if mask is not None:
        latents = mask * scheduler.add_noise(held, noise, timesteps[:1]) + (1 - mask) * latents
    levels = torch.tensor([spec.level], device=device)
    step_kwargs = pipeline._step_kwargs(generator)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        eps = pipeline.guided_noise(model_input, t, text, levels, null_text, spec.guidance_scale,
                                    batch_guidance=spec.batch_guidance)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if mask is not None:
            target = scheduler.add_noise(held, noise, timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else held
            latents = mask * target + (1 - mask) * latents
    return latents


@torch.no_grad()
def outpaint(pipeline: Any, spec: OutpaintSpec, sinks: Sequence[RowSink] = (), *, progress: bool = False
             ) -> OutpaintResult:
    """Paint `spec`'s canvas window by window in raster order, writing finished rows to every sink.

    Memory is one band (a window's height across the canvas width) of pixels and latents, never the canvas.
    """
    start = time.perf_counter()
    factor = pipeline.vae_scale_factor
    pipeline._check_size(spec.window, spec.window)
    stride = spec.window - spec.overlap
    if stride % factor:
        raise GenerationInputError(f"window - overlap ({stride}) must be a multiple of the autoencoder's factor "
                                   f"{factor}; e.g. overlap {spec.overlap - spec.overlap % factor}")
    channels = pipeline.unet.config.in_channels
    if channels != latent_channels(pipeline.vae):
        raise GenerationInputError(f"outpaint needs the text-to-image model; this UNet takes {channels} input "
                                   f"channels for {latent_channels(pipeline.vae)}-channel latents (an inpainting "
                                   "model?): pass --model with the text-to-image model folder")
    plan = plan_windows(spec, stride, factor)
    width = max(spec.window, math.ceil(spec.width / factor) * factor)
    lat_window = spec.window // factor
    blend = spec.blend if spec.blend is not None else spec.overlap // factor
    device = pipeline._execution_device
    embeddings: dict[str, torch.Tensor] = {}

    def embed(prompt: str) -> torch.Tensor:
        if prompt not in embeddings:
            embeddings[prompt] = pipeline.encode_prompt(prompt, 1, device)
        return embeddings[prompt]

    null_text = embed(spec.negative_prompt or "") if spec.guidance_scale != 1 else None
    band = _Band(0, spec.window, width, channels, factor)
    band_bytes, emitted, last_col = band.nbytes, 0, len(plan[0]) - 1

    def emit(rows: np.ndarray) -> None:
        nonlocal emitted
        rows = rows[: max(spec.height - emitted, 0), : spec.width]
        emitted += rows.shape[0]
        if rows.shape[0]:
            for sink in sinks:
                sink.write_rows(rows)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(r) for r in plan), desc="outpaint windows", unit="window", disable=not progress)
    for row_windows in plan:
        if row_windows[0].y != band.y:
            finished, band = band.advance(row_windows[0].y)
            emit(finished)
            band_bytes = max(band_bytes, band.nbytes + finished.nbytes)
        for w in row_windows:
            lx = w.x // factor
            known = band.known[:, lx:lx + lat_window]
            mask = None
            if known.any():
                mask = torch.from_numpy(held_mask(known, blend))[None, None].to(device, pipeline.unet.dtype)
            held = band.latents[None, :, :, lx:lx + lat_window].to(device, pipeline.unet.dtype)
            generator = torch.Generator().manual_seed(w.seed)
            latents = _denoise_window(pipeline, spec, held, mask, embed(w.prompt), null_text, generator)
            band.latents[:, :, lx:lx + lat_window] = latents[0].float().cpu()
            band.known[:, lx:lx + lat_window] = True
            decoded = decode(pipeline.vae, latents.to(pipeline.vae.dtype))[0].float().cpu()
            image = ((decoded + 1) / 2).permute(1, 2, 0).numpy()
            weights = np.outer(feather(spec.window, spec.overlap, start=w.row > 0, end=w.row < len(plan) - 1),
                               feather(spec.window, spec.overlap, start=w.col > 0, end=w.col < last_col))
            band.pixels[:, w.x:w.x + spec.window] += image * weights[:, :, None]
            band.weights[:, w.x:w.x + spec.window] += weights
            bar.update()
    bar.close()
    emit(band.finished(spec.window))
    windows = [w for r in plan for w in r]
    return OutpaintResult(spec.width, spec.height, len(plan), len(plan[0]), windows, time.perf_counter() - start,
                          band_bytes)
