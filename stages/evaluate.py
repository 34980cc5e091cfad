"""`text2earth evaluate` (DVC stage `evaluate`): the paper's metrics and resolution control for a trained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.errors import Text2EarthError

DESCRIPTION = """\
Evaluate a trained Text2Earth model (settings: `evaluate:` in params.yaml) with the RSICD protocol of the
paper and a resolution-control test, and write:

  metrics/eval.json                  fid, kid, cls_oa, clip_score, cmmd, level_accuracy, fid_per_level, each
                                     with the extractor that produced it (`dvc metrics show`)
  metrics/eval_levels.png            per-level accuracy and FID
  metrics/eval_level_confusion.png   level generated at (rows) vs level the classifier sees (columns)
  metrics/eval_samples.png           real test images beside images generated from their captions

what is measured:
  FID / KID     generated vs real test images, Inception-v3 pool features (evaluate.inception_weights: an
                ImageNet or RSICD-fine-tuned state dict; null = random weights, an offline placeholder)
  Cls-OA        ResNet-18 trained only on generated images (labelled with their caption's scene class),
                tested on the real test images (evaluate.classifier, evaluate.class_keywords)
  CLIP score    100 x cosine(generated image, caption), open_clip (evaluate.clip_model, clip_pretrained)
  CMMD          MMD between CLIP embeddings of real and generated images (Jayasumana et al. 2024)
  level accuracy  a ResNet-18 trained on real chips per level predicts the level of images generated at
                each level (evaluate.levels); with the confusion matrix and FID per level
Numbers made with different extractors are not comparable: the report names each one.
Test images with a copy in the training shards (same sha256, or perceptual hash within evaluate.max_hamming
bits) are removed first; `decontamination` in the report says how many.

  text2earth evaluate                          as params.yaml says
  text2earth evaluate --steps 20 --images-per-caption 2   a quick look
"""


def add_parser(subparsers: Any) -> None:
    """Register `evaluate`."""
    p = subparsers.add_parser("evaluate", help="FID, KID, Cls-OA, CLIP score, CMMD, level accuracy (DVC `evaluate`)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.add_argument("--model", dest="model_dir", help="trained model folder (default: evaluate.model_dir)")
    p.add_argument("--steps", type=int, help="denoising steps (default: evaluate.steps)")
    p.add_argument("--images-per-caption", type=int, help="default: evaluate.images_per_caption")
    p.add_argument("--max-captions", type=int, help="default: evaluate.max_captions")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: evaluate.device)")
    p.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"),
                   help="report for `dvc metrics show` (default: %(default)s); plots go beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_evaluate)


class _Bars:
    """One tqdm bar per phase (decontaminate, generate, ...), replaced when the phase changes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.what = ""

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if what != self.what:
            self.close()
            self.bar = tqdm(total=total, desc=what, unit="img" if what.startswith("generate") else "it",
                            dynamic_ncols=True)
            self.what = what
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the evaluation and write its report."""
    if extra:
        raise Text2EarthError(f"evaluate: unknown argument(s) {' '.join(extra)}; see `text2earth evaluate --help`")
    from model.eval_params import load_evaluate_params
    from model.evaluate import evaluate, summary_line
    from stages.generate import check_model_dir, check_out_dir, resolve_device

    params, train_params = load_evaluate_params(args.params, {
        "model_dir": args.model_dir, "steps": args.steps, "images_per_caption": args.images_per_caption,
        "max_captions": args.max_captions, "device": args.device})
    check_model_dir(params.model_dir)
    resolve_device(params.device)  # a typo or a missing GPU fails now, not after the real images are read
    check_out_dir(args.metrics.parent, "--metrics")
    bars = _Bars(not args.no_progress)
    try:
        report = evaluate(params, train_params, plot_dir=str(args.metrics.parent), progress=bars)
    finally:
        bars.close()
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(summary_line(report))
    return 0
