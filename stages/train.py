"""`text2earth train` (DVC stage `train`) and `text2earth generate` (images from a trained model)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pipeline.errors import Text2EarthError

TRAIN_DESCRIPTION = """\
Train the Text2Earth model on the published shards (settings: `train:` in params.yaml) and export it
with its EMA weights to train.output_dir (default models/text2earth), loadable with
`Text2EarthPipeline.from_pretrained`. Also writes:

  metrics/train.json             final loss, steps, samples/s, seconds (`dvc metrics show`)
  metrics/train_samples.png      validation prompts x levels, labelled (train.validation_*)
  dvclive/                       loss, lr, grad-norm, samples/s per step (`dvc plots show`)
  train.checkpoint_dir/checkpoint-N  resumable state every train.checkpoint_every steps

where it runs (the same command everywhere; accelerate picks the device and processes):
  one GPU or the CPU    text2earth train
  several GPUs (DDP)    accelerate launch --multi_gpu --num_processes 4 -m stages.cli train
  several machines      accelerate launch --multi_gpu --num_machines 2 --machine_rank R \\
                          --main_process_ip HOST --main_process_port 29500 --num_processes 16 -m stages.cli train
  2 CPU processes       ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m stages.cli train
                        (`accelerate launch --cpu` starts only one process)
train.batch_size is per process; the effective batch is batch_size x gradient_accumulation_steps x processes.
Checkpoints of multi-machine runs need a checkpoint_dir every machine can reach.

after an interruption (even kill -9):
  text2earth train --resume latest     continues from the newest complete checkpoint with the same step,
                                       optimizer, LR schedule, EMA and data position; with the same seed the
                                       weights end exactly as in an uninterrupted run (CPU: same train.threads)
  A checkpoint made with other train params is ignored by `latest` (max_steps may grow when the LR schedule
  is constant), and a run that starts from step 0 first clears train.checkpoint_dir.
"""

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
    """Register `train` and `generate`."""
    t = subparsers.add_parser("train", help="train the Text2Earth model (DVC `train`)", description=TRAIN_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    t.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest complete checkpoint (`latest`, fresh start when there is none) "
                        "or from a checkpoint-N folder")
    t.add_argument("--max-steps", type=int, help="optimizer steps in total (default: train.max_steps)")
    t.add_argument("--metrics", type=Path, default=Path("metrics/train.json"),
                   help="summary for `dvc metrics show` (default: %(default)s)")
    t.add_argument("--samples", type=Path, default=Path("metrics/train_samples.png"),
                   help="validation grid (default: %(default)s)")
    t.add_argument("--live-dir", default="dvclive", help="DVCLive folder (default: %(default)s)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)

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


def run_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the train stage and write its metrics."""
    if extra:
        raise Text2EarthError(f"train: unknown argument(s) {' '.join(extra)}; see `text2earth train --help`")
    from model.config import load_train_params
    from model.train import summary_line, train

    params = load_train_params(args.params, {"max_steps": args.max_steps})
    summary = train(params, resume=args.resume, progress=not args.no_progress, live_dir=args.live_dir,
                    samples_path=str(args.samples))
    from accelerate import PartialState

    if PartialState().is_main_process:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(summary_line(summary))
    return 0


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def run_generate(args: argparse.Namespace, extra: list[str]) -> int:
    """Generate `-n` images and save them as PNGs with their settings in text chunks."""
    if extra:
        raise Text2EarthError(f"generate: unknown argument(s) {' '.join(extra)}; see `text2earth generate --help`")
    if args.num_images < 1:
        raise Text2EarthError(f"-n must be at least 1, got {args.num_images}")
    model_dir = Path(args.model)
    if not (model_dir / "model_index.json").is_file():
        raise Text2EarthError(f"no trained model in {model_dir} (no model_index.json): run `dvc repro train` or "
                              "`text2earth train`, or pass --model DIR")
    import torch
    from PIL.PngImagePlugin import PngInfo

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
        info = PngInfo()
        chunks = {"prompt": args.prompt, "level": level, "gsd_m": args.gsd_m, "seed": seed, "steps": args.steps,
                  "guidance_scale": args.guidance, "negative_prompt": args.negative_prompt,
                  "model": str(model_dir), "scheduler": scheduler, "software": "text2earth generate"}
        for key, value in chunks.items():
            if value is not None:
                info.add_text(key, str(value))
        path = args.out / f"{_slug(args.prompt)}-L{level}-seed{seed}.png"
        image.save(path, pnginfo=info)
    print(f"generate: wrote {len(seeds)} image(s) of {output.images[0].size[0]}x{output.images[0].size[1]} "
          f"(level {output.levels[0]}, seeds {seeds[0]}..{seeds[-1]}) to {args.out}")
    return 0
