"""The open_clip model behind CLIP scoring, without Beam: load by name / tag / checkpoint, embed in fixed batches.

Batches are always exactly `batch_size` (the last one padded with zeros): CPU matrix kernels round
differently for different batch shapes, so fixed shapes make every embedding independent of its batch
neighbours and outputs byte-identical from run to run. `pipeline.curation.clip` wraps this for RunInference;
benchmarks and GPU checks call it directly.
"""

from __future__ import annotations

import difflib
import io as _io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.curation.params import ClipParams
from pipeline.errors import ParamsError

log = logging.getLogger(__name__)


@dataclass
class ClipRuntime:
    """A loaded model with its preprocessing and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    batch_size: int
    dtype: Any


def check_model(params: ClipParams, prefix: str = "clip.") -> None:
    """Fail fast, in the driver, on a model name or checkpoint path that cannot work.

    `prefix` names the params keys in messages ("clip." for curation, "evaluate.clip_" for evaluation).
    """
    import os

    import open_clip

    if params.model_config_path:
        if not os.path.exists(params.model_config_path):
            raise ParamsError(f"{prefix}model_config_path: {params.model_config_path} does not exist")
        open_clip.add_model_config(params.model_config_path)
    known = open_clip.list_models()
    if params.model not in known and not params.model.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(params.model, known, n=3)
        raise ParamsError(f"{prefix}model: {params.model!r} is not an open_clip model"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; see open_clip.list_models(), or register a config with {prefix}model_config_path")
    weights = params.pretrained
    looks_like_path = weights is not None and (os.sep in weights or weights.endswith((".pt", ".pth", ".bin",
                                                                                       ".safetensors")))
    if weights and looks_like_path and storage.is_local(weights) and not os.path.exists(weights):
        raise ParamsError(f"{prefix}pretrained: checkpoint {weights} does not exist (give an open_clip tag such as "
                          "laion2b_s34b_b79k, an existing checkpoint path, or null)")


def load_clip(params: ClipParams, prefix: str = "clip.") -> ClipRuntime:
    """Build the open_clip model the params name: a pretrained tag, an hf-hub id, a checkpoint or random."""
    import open_clip
    import torch

    check_model(params, prefix)
    if params.threads:
        torch.set_num_threads(params.threads)
    if params.pretrained is None:  # hf-hub / local-dir models load their weights; others get random ones
        torch.manual_seed(params.seed)  # random weights, the same in every worker and every run
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            params.model, pretrained=params.pretrained, precision=params.precision, device=params.device)
    except Exception as exc:  # offline hub, bad tag, missing file: say what to change
        raise ParamsError(
            f"{prefix}model {params.model!r} with {prefix}pretrained {params.pretrained!r} could not be loaded: "
            f"{exc}. Give a pretrained tag from open_clip.list_pretrained(), a local checkpoint path (offline), "
            "or null (random weights, for smoke runs only)") from exc
    model.eval()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[params.precision]
    return ClipRuntime(model, preprocess, open_clip.get_tokenizer(params.model), params.device,
                       params.batch_size, dtype)


def _padded(rows: Any, batch_size: int) -> Any:
    """Pad a batch tensor with zero rows to exactly `batch_size` (fixed shapes, fixed rounding)."""
    import torch

    if rows.shape[0] >= batch_size:
        return rows
    pad = torch.zeros((batch_size - rows.shape[0], *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, pad])


def embed_images(rt: ClipRuntime, images: Sequence[bytes]) -> list[np.ndarray | None]:
    """Normalised float32 embeddings; None for bytes that do not decode."""
    import torch
    from PIL import Image

    tensors, index = [], []
    out: list[np.ndarray | None] = [None] * len(images)
    for i, data in enumerate(images):
        try:
            with Image.open(_io.BytesIO(data)) as im:
                tensors.append(rt.preprocess(im.convert("RGB")))
            index.append(i)
        except Exception as exc:
            log.debug("undecodable image: %s", exc)
    for start in range(0, len(tensors), rt.batch_size):
        chunk = torch.stack(tensors[start:start + rt.batch_size])
        n = chunk.shape[0]
        with torch.no_grad():
            feats = rt.model.encode_image(_padded(chunk, rt.batch_size).to(rt.device, rt.dtype))[:n]
            feats = torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
        for j in range(n):
            out[index[start + j]] = feats[j]
    return out


def embed_texts(rt: ClipRuntime, texts: Sequence[str]) -> list[np.ndarray]:
    """Normalised float32 caption embeddings."""
    import torch

    out: list[np.ndarray] = []
    for start in range(0, len(texts), rt.batch_size):
        tokens = rt.tokenizer(list(texts[start:start + rt.batch_size]))
        n = tokens.shape[0]
        with torch.no_grad():
            feats = rt.model.encode_text(_padded(tokens, rt.batch_size).to(rt.device))[:n]
            out += list(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
    return out
