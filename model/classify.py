"""ResNet-18 scene classifiers for the evaluation: zero-shot Cls-OA and the resolution-level test.

Cls-OA (the Txt2Img-MHN protocol): a ResNet-18 trained only on generated images of each class caption, tested
on real images. The level classifier is trained on real chips and judges generated ones. Both take uint8
N x H x W x 3 arrays and convert one batch at a time, so memory stays at the given arrays plus one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.metrics import IMAGENET_MEAN, IMAGENET_STD, load_backbone_weights
from pipeline.errors import Text2EarthError

__all__ = ["ClassifierInputError", "confusion_matrix", "overall_accuracy", "plot_confusion", "predict",
           "resnet18_classifier", "train_classifier"]

log = logging.getLogger(__name__)


class ClassifierInputError(Text2EarthError, ValueError):
    """Images, labels or settings handed to a classifier do not fit (shape, type, label range)."""


def _check_images(images: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise ClassifierInputError(f"{what}: expected uint8 images N x H x W x 3, got {getattr(images, 'dtype', '?')} "
                                   f"{shape}")


def _check_labels(labels: np.ndarray, count: int, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ClassifierInputError(f"{what}: expected {count} integer labels, got {labels.dtype} {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ClassifierInputError(f"{what}: labels must lie in 0..{num_classes - 1}, got "
                                   f"{labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _batch(images: np.ndarray, rows: np.ndarray | slice, image_size: int, device: torch.device) -> torch.Tensor:
    """uint8 rows -> ImageNet-normalised float N x 3 x size x size on `device` (one batch in memory)."""
    x = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip + 90° rotation per image: overhead scenes keep their class and their GSD under both."""
    turns = torch.randint(0, 4, (x.shape[0],), generator=generator).tolist()
    flips = torch.randint(0, 2, (x.shape[0],), generator=generator).tolist()
    return torch.stack([torch.rot90(img.flip(-1) if flip else img, turn, dims=(-2, -1))
                        for img, turn, flip in zip(x, turns, flips, strict=True)])


def _recompute_bn_statistics(model: nn.Module, images: np.ndarray, rows: np.ndarray, batch_size: int,
                             image_size: int, device: torch.device) -> None:
    """PreciseBN: replace batch-norm running statistics by their average over `rows` under the final weights.

    The running averages lag the weights by a few hundred steps; a short run (few images, few epochs, as in
    small evaluations) then predicts one class for everything in eval mode. Recomputing them costs one
    forward pass and changes little after a long run.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = np.sort(rows[start:start + batch_size])
            if len(batch) >= 2:  # one image has no batch variance
                model(_batch(images, batch, image_size, device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def resnet18_classifier(num_classes: int, *, weights: str | None = None, seed: int = 0) -> nn.Module:
    """torchvision ResNet-18 with a `num_classes` head: backbone from a local state dict, or seeded random."""
    from torchvision.models import resnet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same network (and head) for a seed; the global RNG is untouched
        model = resnet18(weights=None, num_classes=num_classes)
    if weights is not None:
        load_backbone_weights(model, weights, architecture="resnet18", skip=("fc.",))
    return model


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int = 5,
                     lr: float = 1e-4, batch_size: int = 64, image_size: int = 224, weights: str | None = None,
                     seed: int = 0, device: str = "cpu", progress: bool = False,
                     precise_bn_images: int = 4096) -> nn.Module:
    """Train a ResNet-18 (Adam, cross-entropy, dihedral augmentation); returns it in eval mode.

    Defaults are the protocol's (5 epochs, Adam 1e-4, batch 64, 224 px). `weights` is a local torchvision
    resnet18 state dict (ImageNet; its `fc` is replaced), None a random start. Batch-norm statistics are then
    recomputed on up to `precise_bn_images` training images (0: keep the running averages, plain
    torchvision training). Same seed, same model on CPU.
    """
    _check_images(images, "train_classifier")
    if num_classes < 2:
        raise ClassifierInputError(f"train_classifier: num_classes must be >= 2, got {num_classes}")
    if images.shape[0] < 2:
        raise ClassifierInputError(f"train_classifier: need at least 2 images, got {images.shape[0]}")
    targets = _check_labels(labels, images.shape[0], num_classes, "train_classifier")
    if epochs < 1 or batch_size < 2 or lr <= 0 or image_size < 32:
        raise ClassifierInputError(f"train_classifier: need epochs >= 1, batch_size >= 2, lr > 0, image_size >= 32; "
                                   f"got {epochs}, {batch_size}, {lr}, {image_size}")
    torch_device = torch.device(device)
    model = resnet18_classifier(num_classes, weights=weights, seed=seed).to(torch_device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
    count = images.shape[0]
    steps_per_epoch = -(-count // batch_size)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", file=sys.stderr)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator).numpy()
        total, seen = 0.0, 0
        for start in range(0, count, batch_size):
            rows = np.sort(order[start:start + batch_size])  # sorted: contiguous reads from a memory map
            if bar is not None:
                bar.update()
            if len(rows) < 2:  # batch norm cannot train on one image; it is seen again next epoch
                continue
            x = _dihedral(_batch(images, rows, image_size, torch_device), generator)
            y = torch.from_numpy(targets[rows]).to(torch_device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(rows), seen + len(rows)
        log.info("classifier epoch %d/%d: loss %.4f on %d images", epoch + 1, epochs, total / max(seen, 1), seen)
    if bar is not None:
        bar.close()
    if precise_bn_images > 0:
        rows = torch.randperm(count, generator=generator)[:precise_bn_images].numpy()
        _recompute_bn_statistics(model, images, rows, batch_size, image_size, torch_device)
    return model.eval()


def predict(model: nn.Module, images: np.ndarray, *, batch_size: int = 64, image_size: int = 224,
            device: str = "cpu") -> np.ndarray:
    """Predicted class per image (int64), in order; the model runs in eval mode."""
    _check_images(images, "predict")
    torch_device = torch.device(device)
    model = model.to(torch_device).eval()
    out = [np.zeros(0, dtype=np.int64)]
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = model(_batch(images, slice(start, start + batch_size), image_size, torch_device))
            out.append(logits.argmax(dim=1).cpu().numpy().astype(np.int64))
    return np.concatenate(out)


def overall_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions (0..1)."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if truth.shape != pred.shape or truth.ndim != 1 or truth.size == 0:
        raise ClassifierInputError(f"overall_accuracy: expected two equal-length non-empty label vectors, got "
                                   f"{truth.shape} and {pred.shape}")
    return float((truth == pred).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class (num_classes x num_classes, int64)."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if truth.shape != pred.shape or truth.ndim != 1:
        raise ClassifierInputError(f"confusion_matrix: expected two equal-length label vectors, got {truth.shape} "
                                   f"and {pred.shape}")
    truth = _check_labels(truth, truth.size, num_classes, "confusion_matrix (true)")
    pred = _check_labels(pred, pred.size, num_classes, "confusion_matrix (predicted)")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, pred), 1)
    return matrix


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: str | Path, title: str) -> None:
    """PNG of a confusion matrix: counts in the cells, colour = share of the true class (rows sum to 1)."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    k = len(labels)
    if counts.shape != (k, k):
        raise ClassifierInputError(f"plot_confusion: matrix {counts.shape} does not match {k} labels")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = max(4.0, 0.42 * k + 2.5)  # RSICD's 30 classes stay readable
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")  # no pyplot: no global state, any backend
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    font = 9 if k <= 12 else 7 if k <= 24 else 6
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), labels=list(labels), rotation=45, ha="right", rotation_mode="anchor", fontsize=font + 1)
    ax.set_yticks(range(k), labels=list(labels), fontsize=font + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100, metadata={"Software": None})  # no version stamp: same bytes per run
