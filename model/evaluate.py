"""`text2earth evaluate`: the paper's text-to-image metrics and resolution-control accuracy for a trained model.

The protocol is RSICD's (from Txt2Img-MHN): N images per test caption; FID and KID against the real test
images; zero-shot Cls-OA (a ResNet-18 trained only on the generated images, labelled with their caption's
class, tested on the real images); CLIP score; CMMD. Resolution control, which the paper only shows: a
level classifier trained on real chips predicts the level of images generated at each level. Every number
is stored next to the extractor that produced it, so numbers from different extractors are never compared.
Generated images go to a disk-backed array, so memory holds features, not the images of the whole run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import level_gsd_m
from model.eval_params import EvaluateParams
from model.evalsets import EvalSample, evaluation_samples, level_chips, read_images

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]  # (what, done, total)


def _device(choice: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def seed_of(seed: int, index: int, copy: int) -> int:
    """The seed of generated image `copy` of prompt `index`: one generator per image, so any image regenerates."""
    return int(np.random.SeedSequence([seed, index, copy]).generate_state(1)[0])


def generate_into(pipeline: Any, prompts: Sequence[str], levels: Sequence[int], copies: int, out: np.ndarray, *,
                  params: EvaluateParams, size: int, on_batch: Callable[[np.ndarray, list[int]], None] | None = None,
                  progress: Progress | None = None, what: str = "generate") -> None:
    """Fill `out[i * copies + c]` with copy c of prompt i at its level, batch by batch (`on_batch` sees each)."""
    jobs = [(i, c) for i in range(len(prompts)) for c in range(copies)]
    for start in range(0, len(jobs), params.batch_size):
        batch = jobs[start:start + params.batch_size]
        generators = [torch.Generator().manual_seed(seed_of(params.seed, i, c)) for i, c in batch]
        result = pipeline([prompts[i] for i, _ in batch], resolution_level=[int(levels[i]) for i, _ in batch],
                          height=size, width=size, num_inference_steps=params.steps,
                          guidance_scale=params.guidance_scale, generator=generators, output_type="np")
        images = np.clip(np.rint(np.asarray(result.images) * 255), 0, 255).astype(np.uint8)
        rows = [i * copies + c for i, c in batch]
        out[rows] = images
        if on_batch:
            on_batch(images, rows)
        if progress:
            progress(what, start + len(batch), len(jobs))


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _batches(images: np.ndarray, size: int = 32) -> list[torch.Tensor]:
    return [_nchw(images[i:i + size]) for i in range(0, len(images), size)]


def _labelled(value: float | None, extractor: str, **extra: Any) -> dict[str, Any]:
    return {"value": None if value is None or not math.isfinite(value) else round(float(value), 6),
            "extractor": extractor, **extra}


def classification_oa(real: Sequence[EvalSample], generated: np.ndarray, copies: int, params: EvaluateParams,
                      device: str, progress: Progress | None) -> tuple[dict[str, Any], list[str]]:
    """Zero-shot Cls-OA: train on generated images of each class's captions, test on the real test images."""
    from model.classify import overall_accuracy, predict, train_classifier

    classes = sorted({s.label for s in real if s.label})
    extractor = (f"resnet18 ({'weights: ' + params.classifier.weights if params.classifier.weights else 'random init'}"
                 f", {params.classifier.epochs} epochs, {params.classifier.image_size} px)")
    if len(classes) < 2:
        return _labelled(None, extractor, skipped=f"{len(classes)} class(es) among the test captions; Cls-OA needs "
                         "2 or more (scene_class or evaluate.class_keywords)"), classes
    index = {name: k for k, name in enumerate(classes)}
    rows = [(i, index[s.label]) for i, s in enumerate(real) if s.label]
    gen_rows = [i * copies + c for i, _ in rows for c in range(copies)]
    gen_labels = np.array([label for _, label in rows for _ in range(copies)])
    if progress:
        progress("Cls-OA classifier", 0, 1)
    model = train_classifier(generated[gen_rows], gen_labels, len(classes), epochs=params.classifier.epochs,
                             lr=params.classifier.learning_rate, batch_size=params.classifier.batch_size,
                             image_size=params.classifier.image_size, weights=params.classifier.weights,
                             seed=params.seed, device=device)
    real_images = np.stack([real[i].image for i, _ in rows])  # type: ignore[misc]
    predicted = predict(model, real_images, image_size=params.classifier.image_size, device=device)
    truth = np.array([label for _, label in rows])
    if progress:
        progress("Cls-OA classifier", 1, 1)
    return _labelled(100.0 * overall_accuracy(truth, predicted), extractor, unit="%", classes=classes,
                     test_images=len(rows), train_images=len(gen_rows)), classes


def level_control(pipeline: Any, params: EvaluateParams, size: int, device: str, inception: Any,
                  plot_dir: Path, progress: Progress | None) -> dict[str, Any]:
    """Resolution-control accuracy: a level classifier trained on real chips judges images generated per level."""
    from model.classify import confusion_matrix, overall_accuracy, plot_confusion, predict, train_classifier
    from model.metrics import extract, fid

    chips = level_chips(params.published_dir, params.levels, params.max_chips_per_level, params.seed, params.split)
    counts = {lv: sum(1 for c in chips if c.level == lv) for lv in params.levels}
    levels = [lv for lv in params.levels if counts[lv] >= params.min_chips_per_level]
    extractor = (f"resnet18 level classifier ({'weights: ' + params.level_classifier.weights if params.level_classifier.weights else 'random init'}, "  # noqa: E501
                 f"{params.level_classifier.epochs} epochs, {params.level_classifier.image_size} px)")
    if len(levels) < 2:
        return {"level_accuracy": _labelled(None, extractor, skipped=f"levels with >= {params.min_chips_per_level} "
                                            f"real chips: {levels}; need 2 or more"), "real_chips": counts}
    if progress:
        progress("level classifier", 0, 1)
    chips = read_images(params.published_dir, [c for c in chips if c.level in levels], size)
    index = {lv: k for k, lv in enumerate(levels)}
    held = np.array([k % 5 == 4 for k in range(len(chips))])  # every 5th chip checks the classifier on real data
    images = np.stack([c.image for c in chips])  # type: ignore[misc]
    labels = np.array([index[c.level] for c in chips])
    cp = params.level_classifier
    model = train_classifier(images[~held], labels[~held], len(levels), epochs=cp.epochs, lr=cp.learning_rate,
                             batch_size=cp.batch_size, image_size=cp.image_size, weights=cp.weights,
                             seed=params.seed, device=device)
    real_accuracy = (overall_accuracy(labels[held], predict(model, images[held], image_size=cp.image_size,
                                                            device=device)) if held.any() else float("nan"))
    if progress:
        progress("level classifier", 1, 1)
    # prompts: captions of real chips at each level, cycled (text says what, the level says how fine)
    prompts, prompt_levels = [], []
    for lv in levels:
        captions = [c.caption for c in chips if c.level == lv and c.caption] or [""]
        for k in range(params.images_per_level):
            prompts.append(captions[k % len(captions)])
            prompt_levels.append(lv)
    generated = np.zeros((len(prompts), size, size, 3), np.uint8)
    generate_into(pipeline, prompts, prompt_levels, 1, generated, params=params, size=size, progress=progress,
                  what="generate per level")
    predicted = predict(model, generated, image_size=cp.image_size, device=device)
    truth = np.array([index[lv] for lv in prompt_levels])
    matrix = confusion_matrix(truth, predicted, len(levels))
    names = [f"L{lv}" for lv in levels]
    plot_confusion(matrix, names, plot_dir / "eval_level_confusion.png",
                   f"Level generated (rows) vs predicted; accuracy "
                   f"{100 * overall_accuracy(truth, predicted):.1f} %")
    per_level_fid: dict[str, float | None] = {}
    for done, lv in enumerate(levels):
        if progress:
            progress("FID per level", done, len(levels))
        real_f = extract(inception, _batches(images[labels == index[lv]]))
        fake_f = extract(inception, _batches(generated[truth == index[lv]]))
        value = fid(real_f, fake_f) if min(len(real_f), len(fake_f)) >= 2 else float("nan")
        per_level_fid[str(lv)] = None if not math.isfinite(value) else round(value, 4)
    _plot_per_level(levels, matrix, per_level_fid, plot_dir / "eval_levels.png")
    return {
        "level_accuracy": _labelled(100.0 * overall_accuracy(truth, predicted), extractor, unit="%", levels=levels,
                                    classifier_real_accuracy=None if not math.isfinite(real_accuracy)
                                    else round(100 * real_accuracy, 2),
                                    confusion=matrix.tolist(), images_per_level=params.images_per_level),
        "fid_per_level": {"value": per_level_fid, "extractor": getattr(inception, "name", "inception")},
        "real_chips": counts,
    }


def _plot_per_level(levels: Sequence[int], matrix: np.ndarray, fids: dict[str, float | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = [100 * matrix[k, k] / max(1, matrix[k].sum()) for k in range(len(levels))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(len(levels))
    names = [f"{lv}\n{level_gsd_m(lv):g} m" for lv in levels]
    a.bar(x, accuracy, color="#4c72b0")
    a.set(xlabel="level generated at", ylabel="classified as that level (%)", ylim=(0, 100),
          title="Resolution control", xticks=x, xticklabels=names)
    b.bar(x, [fids[str(lv)] or 0.0 for lv in levels], color="#dd8452")
    b.set(xlabel="level", ylabel="FID vs real chips of the level", title="FID per level", xticks=x,
          xticklabels=names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(params: EvaluateParams, train_params: Any, *, work_dir: str = ".text2earth/work/eval",
             plot_dir: str = "metrics", progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole evaluation; returns the report written to metrics/eval.json."""
    from model.data import expand_shards, sample_filter
    from model.decontaminate import decontaminate
    from model.metrics import clip_extractor, clip_score, cmmd, extract, fid, inception_extractor, kid
    from model.pipeline import Text2EarthPipeline

    started = time.perf_counter()
    device = _device(params.device)
    size = train_params.resolution
    plots = Path(plot_dir)
    plots.mkdir(parents=True, exist_ok=True)
    pipeline: Any = Text2EarthPipeline.from_pretrained(params.model_dir).to(device)
    pipeline.set_progress_bar_config(disable=True)

    test = read_images(params.published_dir, evaluation_samples(params.published_dir, params.split, params.max_captions,
                                                          params.seed, params.class_keywords), size)
    shards = expand_shards(params.decontamination_shards or train_params.shards)
    test, decon = decontaminate(test, shards, lambda row: sample_filter(row, train_params),
                                max_hamming=params.max_hamming, cache_dir=params.cache_dir,
                                progress=(lambda n: progress("decontaminate", n, len(shards))) if progress else None)
    if not test:
        raise ValueError(f"all {decon['checked']} test images have copies in the training shards: nothing to "
                         "evaluate (check the publish split or evaluate.max_hamming)")

    if progress:
        progress("load feature extractors", 0, 2)
    inception = inception_extractor(params.inception_weights, seed=params.seed, device=device)
    if progress:
        progress("load feature extractors", 1, 2)
    clip = clip_extractor(params.clip_model, params.clip_pretrained, model_config_path=params.clip_model_config_path,
                          device=device)
    if progress:
        progress("load feature extractors", 2, 2)
    copies = params.images_per_caption
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    generated = np.lib.format.open_memmap(work / "generated.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(test) * copies, size, size, 3))
    fake_inception: list[np.ndarray] = []
    fake_clip: list[np.ndarray] = []

    def features(images: np.ndarray, rows: list[int]) -> None:
        fake_inception.append(extract(inception, [_nchw(images)]))
        fake_clip.append(extract(clip, [_nchw(images)]))

    generate_into(pipeline, [s.caption for s in test], [s.level for s in test], copies, generated, params=params,
                  size=size, on_batch=features, progress=progress, what="generate for test captions")
    real_images = np.stack([s.image for s in test])  # type: ignore[misc]
    real_inc = extract(inception, _batches(real_images))
    real_clip = extract(clip, _batches(real_images))
    fake_inc, fake_cl = np.concatenate(fake_inception), np.concatenate(fake_clip)
    text_emb = clip.encode_texts([s.caption for s in test for _ in range(copies)])
    kid_mean, kid_std = kid(real_inc, fake_inc, subset_size=params.kid_subset_size, subsets=params.kid_subsets,
                            seed=params.seed)
    cls_oa, classes = classification_oa(test, generated, copies, params, device, progress)
    levels = level_control(pipeline, params, size, device, inception, plots, progress)
    _sample_grid(test, generated, copies, plots / "eval_samples.png")
    report: dict[str, Any] = {
        "fid": _labelled(fid(real_inc, fake_inc), inception.name),
        "kid": _labelled(kid_mean, inception.name, std=round(float(kid_std), 6), subset_size=min(
            params.kid_subset_size, len(real_inc), len(fake_inc))),
        "cls_oa": cls_oa,
        "clip_score": _labelled(clip_score(fake_cl, np.asarray(text_emb)), clip.name),
        "cmmd": _labelled(cmmd(real_clip, fake_cl), clip.name),
        **levels,
        "test_set": {"split": params.split, "captions": len(test), "images_per_caption": copies,
                     "generated_images": len(generated), "classes": classes},
        "decontamination": decon,
        "model": params.model_dir, "steps": params.steps, "guidance_scale": params.guidance_scale,
        "device": device, "seconds": round(time.perf_counter() - started, 1),
    }
    del generated
    (work / "generated.npy").unlink(missing_ok=True)
    return report


def _sample_grid(test: Sequence[EvalSample], generated: np.ndarray, copies: int, path: Path, rows: int = 4) -> None:
    """Real test image beside its generated images for the first few captions: what the numbers summarise."""
    import textwrap

    from PIL import Image, ImageDraw

    shown = min(copies, 4)
    cell, margin, header = 160, 200, 24
    grid = Image.new("RGB", (margin + cell * (1 + shown), header + cell * min(rows, len(test))), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(["real"] + [f"generated {c + 1}" for c in range(shown)]):
        draw.text((margin + col * cell + 6, 6), label, fill="black")
    for row, sample in enumerate(test[:rows]):
        top = header + row * cell
        draw.multiline_text((6, top + 6), "\n".join(textwrap.wrap(sample.caption, 30)[:9]), fill="black")
        images = [sample.image] + [generated[row * copies + c] for c in range(shown)]
        for col, image in enumerate(images):
            grid.paste(Image.fromarray(image).resize((cell, cell)), (margin + col * cell, top))
    grid.save(path)


def summary_line(report: dict[str, Any]) -> str:
    """One line: the headline numbers and what was removed."""
    def v(name: str) -> str:
        value = report.get(name, {}).get("value")
        return "n/a" if value is None else f"{value:.4g}"

    d = report["decontamination"]
    return (f"evaluate: {report['test_set']['captions']} captions x {report['test_set']['images_per_caption']} images:"
            f" FID {v('fid')}, KID {v('kid')}, Cls-OA {v('cls_oa')} %, CLIP {v('clip_score')}, CMMD {v('cmmd')}, "
            f"level accuracy {v('level_accuracy')} %; decontamination removed {d['removed']} of {d['checked']} "
            f"({report['seconds']:.0f} s)")
