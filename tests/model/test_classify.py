"""Cls-OA building blocks: a ResNet-18 trained on some real scenes recognises unseen ones, deterministically, and
its confusion matrix agrees with its accuracy and draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.classify import (
    ClassifierInputError,
    confusion_matrix,
    overall_accuracy,
    plot_confusion,
    predict,
    resnet18_classifier,
    train_classifier,
)
from model.metrics import WeightsFileError
from tests.conftest import SAMPLE

SIZE = 32  # ResNet-18's smallest comfortable input: the toy trains in seconds on one core
# three scene classes, each from its own captioned dataset in the sample (5 images each)
CLASSES = {
    "farmland": sorted((SAMPLE / "captioned" / "ucm" / "images").glob("*.tif")),
    "residential": sorted((SAMPLE / "captioned" / "sydney" / "images").glob("*.tif")),
    "sports field": sorted((SAMPLE / "captioned" / "rsicd" / "images").glob("*.jpg"))[:5],
}


def _crops(path: Path, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random half-side crops of one image, resized to SIZE."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    side = min(rgb.size)
    crop = side // 2
    corners = rng.integers(0, side - crop + 1, size=(count, 2))
    return [np.asarray(rgb.crop((x, y, x + crop, y + crop)).resize((SIZE, SIZE), Image.BILINEAR))
            for x, y in corners]


@pytest.fixture(scope="module")
def toy_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train on crops of four images per class; test on crops of each class's fifth, unseen image."""
    rng = np.random.default_rng(0)
    train_x: list[np.ndarray] = []
    train_y: list[int] = []
    test_x: list[np.ndarray] = []
    test_y: list[int] = []
    for label, paths in enumerate(CLASSES.values()):
        assert len(paths) == 5
        for path in paths[:-1]:
            crops = _crops(path, 8, rng)
            train_x += crops
            train_y += [label] * len(crops)
        crops = _crops(paths[-1], 12, rng)
        test_x += crops
        test_y += [label] * len(crops)
    return np.stack(train_x), np.array(train_y), np.stack(test_x), np.array(test_y)


def test_classifier_trained_on_some_scenes_recognises_unseen_ones(toy_split, tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = toy_split
    assert train_x.shape == (96, SIZE, SIZE, 3) and train_x.dtype == np.uint8
    model = train_classifier(train_x, train_y, 3, epochs=5, lr=1e-3, batch_size=32, image_size=SIZE, seed=0)
    assert not model.training
    predicted = predict(model, test_x, batch_size=16, image_size=SIZE)
    assert predicted.shape == test_y.shape and predicted.dtype == np.int64
    accuracy = overall_accuracy(test_y, predicted)
    assert accuracy >= 0.6, accuracy  # chance: 1/3

    matrix = confusion_matrix(test_y, predicted, 3)
    assert matrix.shape == (3, 3)
    assert matrix.sum() == len(test_y)
    assert matrix.sum(axis=1).tolist() == [12, 12, 12]  # rows: true classes
    assert matrix.sum(axis=0).tolist() == np.bincount(predicted, minlength=3).tolist()  # columns: predictions
    assert np.trace(matrix) / matrix.sum() == pytest.approx(accuracy)

    png = tmp_path / "plots" / "cls_confusion.png"
    plot_confusion(matrix, list(CLASSES), png, f"toy Cls-OA {100 * accuracy:.1f} %")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_training_is_deterministic_for_a_seed(toy_split) -> None:
    train_x, train_y, test_x, _ = toy_split
    rows = np.arange(0, 96, 4)  # 24 images, 8 per class

    def train(seed: int) -> torch.nn.Module:
        return train_classifier(train_x[rows], train_y[rows], 3, epochs=1, lr=1e-3, batch_size=8,
                                image_size=SIZE, seed=seed)

    first, second, other = train(3), train(3), train(4)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert not torch.equal(first_state["fc.weight"], other.state_dict()["fc.weight"])
    assert np.array_equal(predict(first, test_x, image_size=SIZE), predict(second, test_x, image_size=SIZE))


def test_backbone_loads_from_a_local_imagenet_state_dict_and_gets_a_new_head(tmp_path: Path) -> None:
    imagenet = resnet18_classifier(1000, seed=5)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = resnet18_classifier(30, weights=str(path), seed=0)
    assert model.fc.out_features == 30
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert torch.equal(model.fc.weight, resnet18_classifier(30, seed=0).fc.weight)  # head: seeded, not loaded

    with pytest.raises(WeightsFileError, match=r"missing\.pth do not exist"):
        resnet18_classifier(3, weights=str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(32, 3, 7, 7)}, tmp_path / "narrow.pth")
    with pytest.raises(WeightsFileError, match=r"narrow\.pth is not a torchvision resnet18 state dict"):
        resnet18_classifier(3, weights=str(tmp_path / "narrow.pth"))


def test_inputs_are_checked_with_messages_that_name_the_problem() -> None:
    images = np.zeros((4, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(ClassifierInputError, match="uint8 images N x H x W x 3"):
        train_classifier(images.astype(np.float32), np.zeros(4, dtype=int), 2)
    with pytest.raises(ClassifierInputError, match=r"labels must lie in 0\.\.1"):
        train_classifier(images, np.array([0, 1, 2, 1]), 2)
    with pytest.raises(ClassifierInputError, match="num_classes must be >= 2"):
        train_classifier(images, np.zeros(4, dtype=int), 1)
    with pytest.raises(ClassifierInputError, match="equal-length"):
        overall_accuracy(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ClassifierInputError, match="does not match 3 labels"):
        plot_confusion(np.zeros((2, 2)), ["a", "b", "c"], "unused.png", "x")
    assert confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3).tolist() == [[1, 1, 0], [0, 1, 0],
                                                                                            [1, 0, 0]]
