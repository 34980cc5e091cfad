"""`text2earth train` (DVC stage `train`)."""

from __future__ import annotations

import argparse
import json
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

the editing (inpainting) model, once the text-to-image model is trained:
  text2earth train --task inpaint      copies the text-to-image UNet (train.inpaint.init_from, default
                                       train.output_dir) into one that also takes a mask and the masked image
                                       (new input weights start at zero), trains it on random boxes, brush strokes
                                       and soft cloud-like blobs, and exports it to train.inpaint.output_dir
                                       (default {train.output_dir}-inpaint) for `text2earth edit`. Its checkpoints
                                       ({train.checkpoint_dir}-inpaint), metrics/train_inpaint.json,
                                       metrics/train_inpaint_samples.png and dvclive-inpaint/ never mix with the
                                       text-to-image run's; a retrained text-to-image model restarts it.
"""

TASK_OUTPUTS = {  # --metrics, --samples, --live-dir defaults per task, so the two runs never share files
    "text2image": ("metrics/train.json", "metrics/train_samples.png", "dvclive"),
    "inpaint": ("metrics/train_inpaint.json", "metrics/train_inpaint_samples.png", "dvclive-inpaint"),
}

def add_parser(subparsers: Any) -> None:
    """Register `train`."""
    t = subparsers.add_parser("train", help="train the Text2Earth model (DVC `train`)", description=TRAIN_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    t.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest complete checkpoint (`latest`, fresh start when there is none) "
                        "or from a checkpoint-N folder")
    t.add_argument("--task", choices=sorted(TASK_OUTPUTS),
                   help="text2image (the Text2Earth model) or inpaint (the editing model; default: train.task)")
    t.add_argument("--max-steps", type=int, help="optimizer steps in total (default: train.max_steps)")
    t.add_argument("--metrics", type=Path,
                   help="summary for `dvc metrics show` (default: metrics/train.json, inpaint: "
                        "metrics/train_inpaint.json)")
    t.add_argument("--samples", type=Path,
                   help="validation grid (default: metrics/train_samples.png, inpaint: "
                        "metrics/train_inpaint_samples.png)")
    t.add_argument("--live-dir", help="DVCLive folder (default: dvclive, inpaint: dvclive-inpaint)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)


def run_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the train stage and write its metrics."""
    if extra:
        raise Text2EarthError(f"train: unknown argument(s) {' '.join(extra)}; see `text2earth train --help`")
    from model.config import load_train_params
    from model.train import train
    from model.train_log import summary_line

    params = load_train_params(args.params, {"max_steps": args.max_steps, "task": args.task})
    metrics_default, samples_default, live_default = TASK_OUTPUTS[params.task]
    metrics = args.metrics or Path(metrics_default)
    summary = train(params, resume=args.resume, progress=not args.no_progress, live_dir=args.live_dir or live_default,
                    samples_path=str(args.samples or samples_default))
    from accelerate import PartialState

    if PartialState().is_main_process:
        summary = with_earlier_figures(summary, metrics)
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(summary_line(summary))
    return 0


TRAINING_FIGURES = ("first_loss", "final_loss", "samples_per_s", "seconds", "latent_cache_hits",
                    "latent_cache_misses")


def with_earlier_figures(summary: dict[str, Any], metrics: Path) -> dict[str, Any]:
    """A run resumed at its last step trains nothing (e.g. `dvc repro` after a params edit that changes no
    step): keep the loss and speed the earlier run of the same steps recorded, instead of writing blanks."""
    if summary.get("steps_run") or not metrics.is_file():
        return summary
    try:
        earlier = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return summary
    same = all(earlier.get(k) == summary.get(k) for k in ("steps", "size", "output_dir", "task"))
    return {**summary, **{k: earlier[k] for k in TRAINING_FIGURES if k in earlier}} if same else summary
