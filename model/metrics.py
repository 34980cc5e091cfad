"""Image-generation metrics on features: FID and KID (torchmetrics), CMMD, CLIP score, and their extractors.

Extractors turn uint8 images into features once (`extract`); every metric then works on the feature arrays, so
one pass over the generated images serves all of them. Offline, extractors get seeded random weights and say so
in `name`: such numbers only compare runs made with the same placeholder, never published figures.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ParamsError, Text2EarthError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipExtractor",
    "FeatureInputError",
    "InceptionExtractor",
    "WeightsFileError",
    "clip_extractor",
    "clip_score",
    "cmmd",
    "extract",
    "fid",
    "inception_extractor",
    "kid",
    "load_backbone_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SIZE = 299  # Inception-v3's input side (torchmetrics / torch-fidelity resize every image to it)


class WeightsFileError(Text2EarthError, ValueError):
    """A local weights file for an extractor or classifier is missing or does not fit the architecture."""


class FeatureInputError(Text2EarthError, ValueError):
    """Images or feature arrays handed to a metric have the wrong shape, type or size."""


def load_backbone_weights(model: nn.Module, weights: str | Path, *, architecture: str,
                          skip: tuple[str, ...] = ("fc.",)) -> None:
    """Load a torchvision state dict into `model`, ignoring the `skip` heads (fine-tunes change `fc` anyway).

    Accepts a plain state dict, a `{"state_dict": ...}` checkpoint and DDP's `module.` prefixes; any other
    difference (missing layers, other shapes) is an error naming the file, so a wrong file never half-loads.
    """
    path = Path(weights)
    if not path.is_file():
        raise WeightsFileError(f"{architecture} weights {path} do not exist: give a local torchvision state dict "
                               "(.pth) or null for random weights")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-torch files
        raise WeightsFileError(f"{path}: not a torch state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    expected = {k for k in model.state_dict() if not k.startswith(skip)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise WeightsFileError(f"{path} is not a torchvision {architecture} state dict: missing {missing[:4]}"
                               f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                               f"{' ...' if len(unexpected) > 4 else ''}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes (e.g. a different width)
        raise WeightsFileError(f"{path} does not fit torchvision {architecture}: {exc}") from exc


def _unit_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float in [0, 1] on `device`; anything else is refused (a silent x255 mistake)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise FeatureInputError(f"extractors take uint8 images N x 3 x H x W, got {images.dtype} "
                                f"{tuple(images.shape)}")
    return images.to(device).float() / 255.0


class InceptionExtractor(nn.Module):
    """Inception-v3 pool3 features (2048-d) from uint8 images; a torchmetrics `feature=` module."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        net.fc = nn.Identity()  # the pool3 output is the feature; any classifier head is dropped
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.num_features = 2048
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> InceptionExtractor:
        """Stay in evaluation mode: batch-norm statistics must not follow the batch being measured."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to 299 px (bilinear, antialiased), ImageNet-normalise, return N x 2048 pool features."""
        x = _unit_images(images, self.mean.device)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        return self.net((x - self.mean) / self.std)


def inception_extractor(weights: str | None = None, *, seed: int = 0, device: str = "cpu",
                        transform_input: bool = True) -> InceptionExtractor:
    """torchvision Inception-v3 pool features, from a local state dict or seeded random weights (offline).

    `weights` may be torchvision's ImageNet inception_v3 or a fine-tune with another `fc` (RSICD's 30 classes):
    `fc` and `AuxLogits` are dropped. `transform_input=True` matches torchvision's ImageNet weights and their
    fine-tunes, which expect ImageNet-normalised input and re-map it internally.
    """
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=transform_input)
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same placeholder in every run; the global RNG is untouched
            for module in net.modules():
                # torchvision's init (std 0.1) assumes trained batch-norm statistics: with the identity ones of
                # a fresh net, pool features reach 1e10. He init keeps them O(1), so FID stays well conditioned.
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        name = f"inception-v3 pool3 (random init, seed {seed}: offline placeholder, not comparable)"
    else:
        load_backbone_weights(net, weights, architecture="inception_v3", skip=("fc.", "AuxLogits."))
        name = f"inception-v3 pool3 (weights: {weights})"
    return InceptionExtractor(net, name).to(device)


class ClipExtractor(nn.Module):
    """open_clip image embeddings (L2-normalised) from uint8 images, and text embeddings for CLIP score."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, *, text_batch_size: int = 256) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.text_batch_size = text_batch_size
        visual: Any = model.visual
        cfg: dict[str, Any] = getattr(visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", visual.image_size)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))  # OpenAI CLIP's, open_clip's default
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(visual.output_dim)

    def train(self, mode: bool = True) -> ClipExtractor:
        """Stay in evaluation mode (dropout off) whatever the caller does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's eval preprocessing on tensors (bicubic shortest-side resize, centre crop), then embed."""
        from torchvision.transforms.v2 import functional as TF

        x = _unit_images(images, self.mean.device)
        x = TF.resize(x, [min(self.image_size)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, list(self.image_size)).clamp(0.0, 1.0)  # bicubic overshoots; PIL clamps to 0..255
        model: Any = self.model
        return F.normalize(model.encode_image((x - self.mean) / self.std).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised caption embeddings, float64 N x D (rows in the order of `texts`)."""
        model: Any = self.model
        device = self.mean.device
        out = [np.zeros((0, self.num_features))]
        for start in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.text_batch_size])).to(device)
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
            out.append(emb.to("cpu", torch.float64).numpy())
        return np.concatenate(out)


def clip_extractor(model: str, pretrained: str | None, *, model_config_path: str | None = None,
                   device: str = "cpu", seed: int = 0) -> ClipExtractor:
    """An open_clip model by name (+ pretrained tag or local checkpoint), loaded like the curation CLIP.

    `pretrained=None` builds seeded random weights (offline placeholder); `model_config_path` registers a
    custom JSON config whose file stem is the model name.
    """
    from pydantic import ValidationError

    from pipeline.curation.clip_model import load_clip
    from pipeline.curation.params import ClipParams

    try:
        with torch.random.fork_rng(devices=[]):  # load_clip seeds random weights; leave the caller's RNG alone
            runtime = load_clip(ClipParams.model_validate({
                "model": model, "pretrained": pretrained, "model_config_path": model_config_path, "device": device,
                "seed": seed}), prefix="evaluate.clip_")
    except ValidationError as exc:
        raise ParamsError(f"evaluation CLIP (model {model!r}, pretrained {pretrained!r}): {exc}") from exc
    name = (f"open_clip {model} (pretrained: {pretrained})" if pretrained is not None
            else f"open_clip {model} (random init, seed {seed}: offline placeholder, not comparable)")
    return ClipExtractor(runtime.model, runtime.tokenizer, name).to(device)


def extract(extractor: nn.Module, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """Run `extractor` over image batches one at a time; N x D float64 features on the CPU."""
    chunks = [np.zeros((0, int(getattr(extractor, "num_features", 0))))]
    with torch.no_grad():
        for batch in batches:
            chunks.append(extractor(batch).detach().to("cpu", torch.float64).numpy())
    return np.concatenate(chunks)


class _GivenFeatures(nn.Module):
    """Identity "extractor": lets torchmetrics' FID/KID take features computed earlier by `extract`."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The features themselves."""
        return features


def _feature_pair(real: np.ndarray, fake: np.ndarray, metric: str, minimum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float64 tensors, checked: 2-D, same width, finite, at least `minimum` rows each."""
    arrays = []
    for which, values in (("real", real), ("fake", fake)):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] < minimum:
            raise FeatureInputError(f"{metric}: {which} features must be N x D with N >= {minimum}, got shape "
                                    f"{array.shape}")
        if not np.isfinite(array).all():
            raise FeatureInputError(f"{metric}: {which} features contain NaN or inf")
        arrays.append(torch.from_numpy(np.ascontiguousarray(array)))
    if arrays[0].shape[1] != arrays[1].shape[1]:
        raise FeatureInputError(f"{metric}: real features are {arrays[0].shape[1]}-d, fake {arrays[1].shape[1]}-d "
                                "(use the same extractor for both)")
    return arrays[0], arrays[1]


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (torchmetrics, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    r, f = _feature_pair(real, fake, "fid", minimum=2)
    metric = FrechetInceptionDistance(feature=_GivenFeatures(r.shape[1]))  # states are float64 already
    metric.update(r, real=True)
    metric.update(f, real=False)
    return float(metric.compute())


def kid(real: np.ndarray, fake: np.ndarray, *, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (torchmetrics): mean and std of the unbiased cubic-kernel MMD² over subsets.

    `subset_size` is clipped to the smaller set, so small evaluations still report a value; the subsets are
    drawn from a generator seeded with `seed` (the global RNG is left as it was).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = _feature_pair(real, fake, "kid", minimum=2)
    size = min(subset_size, r.shape[0], f.shape[0])
    if size < 2 or subsets < 1:
        raise FeatureInputError(f"kid: subset_size must be >= 2 and subsets >= 1, got {subset_size}, {subsets}")
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=_GivenFeatures(r.shape[1]), subsets=subsets, subset_size=size)
    metric.update(r, real=True)
    metric.update(f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # compute() draws its subsets with torch.randperm on the global generator
        mean, std = metric.compute()
    return float(mean), float(std)


def _rbf_kernel_sum(x: np.ndarray, y: np.ndarray, gamma: float, block_rows: int = 1024) -> float:
    """Sum of exp(-gamma |x_i - y_j|²) over all pairs, a block of rows at a time (no N x N matrix in memory)."""
    y_sq = (y * y).sum(axis=1)
    total = 0.0
    for start in range(0, x.shape[0], block_rows):
        xb = x[start:start + block_rows]
        sq_dist = (xb * xb).sum(axis=1)[:, None] + y_sq[None, :] - 2.0 * (xb @ y.T)
        total += float(np.exp(-gamma * np.maximum(sq_dist, 0.0)).sum())
    return total


def cmmd(real: np.ndarray, fake: np.ndarray, *, sigma: float = 10.0, scale: float = 1000.0,
         unbiased: bool = False) -> float:
    """CMMD (Jayasumana et al. 2024): MMD² of CLIP embeddings with a Gaussian RBF kernel, times `scale`.

    The default is google-research/cmmd's estimator (all pairs, diagonal included: their "minimum-variance"
    form), so values compare with published CMMD and identical sets give exactly 0. `unbiased=True` drops the
    diagonal terms (the paper's Eq. 3), which can dip below 0 for close sets.
    """
    r, f = _feature_pair(real, fake, "cmmd", minimum=2)
    x, y = r.numpy(), f.numpy()
    gamma = 1.0 / (2.0 * sigma**2)
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _rbf_kernel_sum(x, x, gamma), _rbf_kernel_sum(y, y, gamma), _rbf_kernel_sum(x, y, gamma)
    if unbiased:  # k(x, x) = 1 on the diagonal
        value = (k_xx - m) / (m * (m - 1)) + (k_yy - n) / (n * (n - 1)) - 2.0 * k_xy / (m * n)
    else:
        value = k_xx / m**2 + k_yy / n**2 - 2.0 * k_xy / (m * n)
    return float(scale * value)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIP score of paired rows: 100 x mean(max(cos, 0)), torchmetrics' CLIPScore definition."""
    image = np.asarray(image_emb, dtype=np.float64)
    text = np.asarray(text_emb, dtype=np.float64)
    if image.ndim != 2 or image.shape != text.shape or image.shape[0] == 0:
        raise FeatureInputError(f"clip_score: image and text embeddings must be paired N x D rows, got "
                                f"{image.shape} and {text.shape}")
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    return float(100.0 * np.maximum((image * text).sum(axis=1), 0.0).mean())
