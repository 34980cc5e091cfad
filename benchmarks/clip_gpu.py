"""CLIP image embedding on a GPU: our fixed-batch `embed_images` against a bare open_clip batched loop.

    python benchmarks/clip_gpu.py --device cuda --out results/clip_gpu.json

Same images (the sample harvest's chips, repeated), same model (ViT-B-32, random weights: no pretrained
weights reach these machines, and weights do not change the speed), same batch size and precision. Both
decode JPEGs with Pillow and run open_clip's preprocessing on the CPU, as the Beam stage does; the third
column is the model alone on tensors already on the GPU (the ceiling the decoding leaves unused).
"""

from __future__ import annotations

import argparse
import json
import platform
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def sample_images(count: int) -> list[bytes]:
    """The harvest's chips, repeated to `count`."""
    found = []
    for tar in sorted((REPO / "data" / "harvest" / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith((".jpg", ".png")):
                    found.append(t.extractfile(m).read())  # type: ignore[union-attr]
    if not found:
        raise SystemExit("no chips under data/harvest/shards: run `dvc repro` (or the harvest stage) first")
    return [found[i % len(found)] for i in range(count)]


def bare_loop(images: list[bytes], device: str, precision: str, batch: int) -> float:
    """Images per second of a plain open_clip loop."""
    import io

    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, device=device,
                                                                 precision=precision)
    model.eval()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def run(imgs: list[bytes]) -> None:
        for i in range(0, len(imgs), batch):
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in imgs[i:i + batch]])
            with torch.no_grad():
                feats = model.encode_image(pixels.to(device, dtype))
                torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    run(images[:batch])  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(images)
    return len(images) / (time.perf_counter() - start)


def ours(images: list[bytes], device: str, precision: str, batch: int) -> tuple[float, float]:
    """Images per second of `pipeline.curation.clip_model.embed_images`, and of its model alone."""
    import torch

    from pipeline.curation.clip_model import embed_images, load_clip
    from pipeline.curation.params import ClipParams

    rt = load_clip(ClipParams.model_validate({"device": device, "precision": precision, "batch_size": batch}))
    embed_images(rt, images[:batch])
    start = time.perf_counter()
    embed_images(rt, images)
    rate = len(images) / (time.perf_counter() - start)
    pixels = torch.randn(batch, 3, 224, 224, device=device).to(rt.dtype)
    with torch.no_grad():
        rt.model.encode_image(pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            rt.model.encode_image(pixels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return rate, 20 * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    images = sample_images(args.images)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows: list[dict[str, Any]] = []
    for precision in args.precisions.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            bare = bare_loop(images, args.device, precision, batch)
            rate, model_only = ours(images, args.device, precision, batch)
            rows.append({"device": name, "precision": precision, "batch": batch, "bare_images_per_s": round(bare, 1),
                         "ours_images_per_s": round(rate, 1), "ratio": round(rate / bare, 3),
                         "model_only_images_per_s": round(model_only, 1)})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"torch": torch.__version__, "images": args.images, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
