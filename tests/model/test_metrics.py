"""Evaluation metrics: FID/KID through torchmetrics agree with direct formulas, CMMD and CLIP score with numpy,
and the extractors load local weights (or say they are placeholders) and plug into torchmetrics."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.metrics import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureInputError,
    WeightsFileError,
    clip_extractor,
    clip_score,
    cmmd,
    extract,
    fid,
    inception_extractor,
    kid,
)
from pipeline.errors import ParamsError
from tests.conftest import CLIP_TINY, SAMPLE


def _features(seed: int, n: int, d: int, shift: float = 0.0, stretch: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * stretch
    return rng.normal(size=(n, d)) @ mixing + shift


def _sample_images(size: int = 48) -> np.ndarray:
    """The sample's captioned chips (farmland, residential, sports fields), N x 3 x size x size uint8."""
    paths = sorted((SAMPLE / "captioned").glob("*/images/*"))
    images = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return np.stack(images).transpose(0, 3, 1, 2).copy()


class TinyFeatures(nn.Module):
    """A fixed random conv layer, rectified and pooled: cheap features that notice image noise."""

    name = "tiny conv (test)"
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, self.num_features, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(images.float() / 255.0)).mean(dim=(2, 3))


# FID


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def test_fid_matches_scipy_sqrtm_on_fixed_features() -> None:
    real, fake = _features(1, 300, 12), _features(2, 250, 12, shift=0.7, stretch=1.3)
    expected = _scipy_fid(real, fake)
    assert expected > 1.0
    assert fid(real, fake) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_feature_set_with_itself_is_zero() -> None:
    real = _features(3, 200, 16, shift=5.0, stretch=4.0)
    scale = np.trace(np.cov(real, rowvar=False))
    assert abs(fid(real, real)) < 1e-6 * scale


def test_fid_grows_with_the_noise_added_to_the_images() -> None:
    images = _sample_images()
    rng = np.random.default_rng(0)
    extractor = TinyFeatures()
    real = extract(extractor, [torch.from_numpy(images[:8]), torch.from_numpy(images[8:])])
    assert real.shape == (len(images), 6) and real.dtype == np.float64
    scores = []
    for sigma in (0.0, 8.0, 24.0, 64.0):
        noisy = np.clip(images + rng.normal(0.0, sigma, images.shape), 0, 255).astype(np.uint8)
        scores.append(fid(real, extract(extractor, [torch.from_numpy(noisy)])))
    assert abs(scores[0]) < 1e-9
    assert all(a < b for a, b in pairwise(scores)), scores


def test_fid_refuses_mismatched_or_too_small_feature_sets() -> None:
    with pytest.raises(FeatureInputError, match="real features are 4-d, fake 5-d"):
        fid(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(FeatureInputError, match="N >= 2"):
        fid(np.zeros((1, 4)), np.zeros((10, 4)))
    with pytest.raises(FeatureInputError, match="NaN"):
        fid(np.full((3, 4), np.nan), np.zeros((10, 4)))


# KID


def _numpy_poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                 - 2.0 * k_xy.sum() / m**2)


def test_kid_on_whole_equal_sets_is_the_unbiased_cubic_kernel_mmd() -> None:
    real, fake = _features(4, 60, 5), _features(5, 60, 5, shift=0.5)
    mean, std = kid(real, fake, subsets=1)  # subset_size 1000 is clipped to the 60 rows: the whole sets
    assert mean == pytest.approx(_numpy_poly_mmd(real, fake), rel=1e-9)
    assert std == 0.0


def test_kid_subsets_are_seeded_and_match_numpy() -> None:
    real, fake = _features(6, 80, 5), _features(7, 70, 5, shift=0.3)
    before = torch.get_rng_state()
    mean, std = kid(real, fake, subset_size=20, subsets=4, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    generator = torch.Generator().manual_seed(7)  # torchmetrics draws real, then fake, per subset
    values = []
    for _ in range(4):
        rows_real = torch.randperm(80, generator=generator)[:20].numpy()
        rows_fake = torch.randperm(70, generator=generator)[:20].numpy()
        values.append(_numpy_poly_mmd(real[rows_real], fake[rows_fake]))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-9)
    assert kid(real, fake, subset_size=20, subsets=4, seed=7) == (mean, std)
    assert kid(real, fake, subset_size=20, subsets=4, seed=8) != (mean, std)


# CMMD and CLIP score


def _numpy_rbf_mmd(x: np.ndarray, y: np.ndarray, sigma: float, unbiased: bool) -> float:
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = len(x), len(y)
    if unbiased:
        return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                     - 2 * k_xy.mean())
    return float(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cmmd_matches_numpy_and_is_zero_for_identical_sets() -> None:
    real = _unit_rows(_features(8, 40, 16))
    fake = _unit_rows(_features(9, 30, 16, shift=0.8))
    assert cmmd(real, fake) == pytest.approx(1000.0 * _numpy_rbf_mmd(real, fake, 10.0, unbiased=False), rel=1e-9)
    assert cmmd(real, fake, unbiased=True) == pytest.approx(
        1000.0 * _numpy_rbf_mmd(real, fake, 10.0, unbiased=True), rel=1e-6)
    assert cmmd(real, fake, sigma=1.0, scale=1.0) == pytest.approx(_numpy_rbf_mmd(real, fake, 1.0, False), rel=1e-9)
    assert cmmd(real, fake) > 0.0
    assert abs(cmmd(real, real)) < 1e-9


def test_clip_score_is_100_times_the_mean_clipped_cosine() -> None:
    rng = np.random.default_rng(10)
    images, texts = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    cosine = (_unit_rows(images) * _unit_rows(texts)).sum(axis=1)
    assert (cosine < 0).any() and (cosine > 0).any()
    assert clip_score(images, texts) == pytest.approx(100.0 * np.maximum(cosine, 0.0).mean(), rel=1e-12)
    assert clip_score(images, images) == pytest.approx(100.0)
    with pytest.raises(FeatureInputError, match="paired"):
        clip_score(images, texts[:10])


# extractors


def test_inception_extractor_loads_a_finetuned_state_dict_and_returns_its_pool_features(tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(1)  # a "fine-tune": 30 classes (RSICD), aux head kept, batch-norm statistics not trivial
    net = inception_v3(weights=None, num_classes=30, aux_logits=True, init_weights=False, transform_input=True)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.8, 1.2)
    path = tmp_path / "inception-rsicd.pth"
    torch.save(net.state_dict(), path)

    extractor = inception_extractor(str(path))
    assert extractor.num_features == 2048 and str(path) in extractor.name
    images = torch.from_numpy(_sample_images(size=64)[[0, 9]])
    features = extractor(images)

    net.fc = nn.Identity()
    net.eval()
    x = F.interpolate(images.float() / 255.0, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(x)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(features[0], features[1])
    extractor.train()
    assert not extractor.training  # torchmetrics may call .train(): batch-norm must keep its statistics


def test_inception_extractor_without_weights_is_a_labelled_placeholder() -> None:
    extractor = inception_extractor(None, seed=3)
    assert "random init" in extractor.name and "not comparable" in extractor.name
    features = extractor(torch.from_numpy(_sample_images(size=32)[:2]))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert 1e-3 < float(features.abs().mean()) < 1e3  # He init keeps the placeholder's features well scaled


def test_inception_extractor_names_a_missing_or_wrong_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsFileError, match=f"{re.escape(str(missing))} do not exist"):
        inception_extractor(str(missing))
    wrong = tmp_path / "resnet-ish.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(30, 512)}, wrong)
    with pytest.raises(WeightsFileError, match=f"{re.escape(str(wrong))} is not a torchvision inception_v3 state dict"):
        inception_extractor(str(wrong))
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(WeightsFileError, match="not a torch state dict"):
        inception_extractor(str(garbage))


@pytest.fixture(scope="module")
def tiny_clip():
    return clip_extractor("clip-tiny-test", None, model_config_path=str(CLIP_TINY))


def test_clip_extractor_embeds_images_and_texts_on_the_unit_sphere(tiny_clip) -> None:
    assert tiny_clip.num_features == 64 and "random init" in tiny_clip.name
    images = torch.from_numpy(_sample_images(size=80)[:5])
    image_emb = extract(tiny_clip, [images[:2], images[2:]])
    assert image_emb.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(image_emb[:2], extract(tiny_clip, [images[:2]]), atol=1e-6)  # batch-independent
    texts = tiny_clip.encode_texts(["farmland", "red roofs in lines", "a football field", "a bridge", "fields"])
    assert texts.shape == (5, 64) and texts.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-6)
    score = clip_score(image_emb, texts)
    assert 0.0 <= score <= 100.0

    before = torch.get_rng_state()
    again = clip_extractor("clip-tiny-test", None, model_config_path=str(CLIP_TINY))
    assert torch.equal(torch.get_rng_state(), before)  # seeded placeholder, caller's generator untouched
    np.testing.assert_array_equal(extract(again, [images[:2], images[2:]]), image_emb)


def test_extractors_serve_as_torchmetrics_feature_modules(tiny_clip) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    images = torch.from_numpy(_sample_images(size=64))
    real, fake = images[:8], images[8:]
    metric = FrechetInceptionDistance(feature=tiny_clip)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = fid(extract(tiny_clip, [real]), extract(tiny_clip, [fake]))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5)

    with pytest.warns(UserWarning):
        kid_metric = KernelInceptionDistance(feature=TinyFeatures(), subsets=1, subset_size=8)
    kid_metric.update(real, real=True)
    kid_metric.update(fake[:8], real=False)
    torch_mean, _ = kid_metric.compute()
    tiny = TinyFeatures()
    ours, _ = kid(extract(tiny, [real]), extract(tiny, [fake[:8]]), subsets=1)
    assert float(torch_mean) == pytest.approx(ours, rel=1e-4)


def test_clip_extractor_rejects_an_unknown_model() -> None:
    with pytest.raises(ParamsError, match="no-such-clip") as caught:
        clip_extractor("no-such-clip", None)
    assert "evaluate.clip_model" in str(caught.value)  # the key to change, not the curation stage's `clip.model`
    assert "clip.model:" not in str(caught.value)


def test_extractors_refuse_float_images(tiny_clip) -> None:
    with pytest.raises(FeatureInputError, match="uint8"):
        tiny_clip(torch.rand(2, 3, 64, 64))
