"""Generation speed with and without guidance batching, and outpainting memory against canvas size.

    python benchmarks/generate.py                       # CPU: tiny sampling + outpaint memory (1024² vs 4096²)
    python benchmarks/generate.py --write               # ... and update the Generation section of RESULTS.md
    python benchmarks/generate.py --device cuda --sizes base --precision bf16,fp16 --skip-outpaint --write

Sampling: `Text2EarthPipeline.__call__` at 256x256, 50 steps, joint guidance s = 4, `--images` images per call
(one prompt), DPM-Solver++ (the trained model's scheduler), random weights (`build_components`: speed does
not depend on the weights' values; tiny keeps the real TAEF2 autoencoder). Two variants in the same process,
interleaved call by call: `batch_guidance=True` (one UNet call on the doubled batch [unconditional,
conditional] per step) and `False` (two passes of the plain batch). Images/s = images per call / median call
time, after one untimed warm-up call per variant. Text encoding and decoding are inside the timed call.

Outpaint memory: `text2earth outpaint`'s loop (`model.outpaint.outpaint` into a streamed PNG) on a 1024x1024
and a 4096x4096 canvas, each in its own process so the peak RSS (ru_maxrss, model and imports included) is
that run's; 256-px windows, 64-px overlap, `--outpaint-steps` denoising steps per window (few: memory does not
depend on the step count, and a 4096² scene is 441 windows). The trained models/text2earth is used when it
exists (so the seam statistic of the 1024² scene means something), else random tiny weights.
Results merge into results/generate.json by (device, size, precision, variant) and by canvas.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _measure import (  # benchmarks/_measure.py: this folder is on sys.path when a script runs
    busy_cpu_s,
    update_results,
    wait_quiet,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "generate.json"
PROMPT = "a river through farmland"
TRAINED = REPO / "models" / "text2earth"


# --- children ---------------------------------------------------------------------------------------------------


def _pipeline(size: str, device: str, precision: str) -> Any:
    import torch
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    from model.components import build_components
    from model.config import TrainParams
    from model.pipeline import Text2EarthPipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(0)
    parts = build_components(TrainParams.model_validate({"size": size}))
    parts["scheduler"] = DPMSolverMultistepScheduler.from_config(parts["scheduler"].config)
    pipe = Text2EarthPipeline(**parts).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per call of each guidance variant, interleaved."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    pipe = _pipeline(cfg["size"], cfg["device"], cfg["precision"])
    cuda = cfg["device"].startswith("cuda")
    times: dict[str, list[float]] = {"batched": [], "two passes": []}
    others = 0.0  # cores other processes kept busy, the most over any timed call
    for repeat in range(cfg["repeats"] + 1):  # the first round is the warm-up
        for variant in times:
            if cuda:
                torch.cuda.synchronize()
            start, busy_start, own_start = time.perf_counter(), busy_cpu_s(), time.process_time()
            pipe(PROMPT, resolution_level=15, num_inference_steps=cfg["steps"], guidance_scale=4.0,
                 num_images_per_prompt=cfg["images"], batch_guidance=variant == "batched", output_type="np",
                 generator=torch.Generator().manual_seed(repeat))
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if repeat:
                times[variant].append(elapsed)
                own = time.process_time() - own_start
                others = max(others, (busy_cpu_s() - busy_start - own) / elapsed)
    out = {"times": times, "other_cores_max": others,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def outpaint_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Paint one canvas into a streamed PNG; peak RSS before and after."""
    import numpy as np
    import torch
    from PIL import Image

    from model.outpaint import OutpaintSpec, outpaint, seam_ratio, window_starts
    from model.pipeline import Text2EarthPipeline
    from model.scene_writers import PngRowWriter

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if TRAINED.joinpath("model_index.json").is_file():
        pipe, model = Text2EarthPipeline.from_pretrained(TRAINED), "models/text2earth (trained tiny)"
    else:
        pipe, model = _pipeline("tiny", "cpu", "fp32"), "tiny, random weights"
    pipe.set_progress_bar_config(disable=True)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    side = cfg["canvas"]
    busy_start, own_start = busy_cpu_s(), time.process_time()
    spec = OutpaintSpec(PROMPT, side, side, 15, window=256, overlap=64, steps=cfg["steps"], seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.png"
        with PngRowWriter(path, side, side, {"prompt": PROMPT}) as writer:
            result = outpaint(pipe, spec, [writer])
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        others = (busy_cpu_s() - busy_start - (time.process_time() - own_start)) / result.seconds
        seam = None
        if side <= 1024:  # reading the PNG back would itself take a full canvas of memory
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            xs = window_starts(side, 256, 192)
            seam = seam_ratio(pixels, xs, xs, 256, phase=pipe.vae_scale_factor)
        png_mib = path.stat().st_size / 1024**2
    return {"canvas": side, "model": model, "steps": cfg["steps"], "windows": len(result.windows),
            "seconds": result.seconds, "band_mib": result.band_bytes / 1024**2, "rss_loaded_gib": rss_loaded,
            "peak_rss_gib": rss_peak, "png_mib": png_mib, "seam_ratio": seam, "other_cores_mean": others}


# --- the parent -------------------------------------------------------------------------------------------------


def run_child(kind: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cfg.get("device", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child {cfg} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    return result


def machine(device: str) -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                            "ram_gib": round(psutil.virtual_memory().total / 1024**3),
                            "date": dt.date.today().isoformat()}
    if device.startswith("cuda"):
        info["card"] = torch.cuda.get_device_name()
    try:
        info["code"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                      text=True).stdout.strip()
    except OSError:
        pass
    return info


def merge(new: dict[str, Any]) -> dict[str, Any]:
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    sampling_key = ("device_kind", "size", "precision", "threads", "variant")
    new_keys = {tuple(r.get(k) for k in sampling_key) for r in new.get("sampling", [])}
    sampling = [r for r in old.get("sampling", []) if tuple(r.get(k) for k in sampling_key) not in new_keys]
    canvases = {r["canvas"] for r in new.get("outpaint", [])}
    outpaint = [r for r in old.get("outpaint", []) if r["canvas"] not in canvases]
    return {"machines": {**old.get("machines", {}), **new.get("machines", {})},
            "sampling": sampling + new.get("sampling", []), "outpaint": outpaint + new.get("outpaint", [])}


def table(data: dict[str, Any]) -> str:
    lines = []
    for kind, meta in sorted(data["machines"].items()):
        where = meta.get("card") or f"{meta['cpus']} CPU cores ({meta['machine']})"
        lines.append(f"Machine ({kind}): {where}, {meta['ram_gib']} GiB RAM, torch {meta['torch']}, "
                     f"{meta['date']}, code {meta.get('code', '?')}.")
    lines += ["", "Sampling at 256x256, 50 steps, guidance s = 4, DPM-Solver++ (median seconds per call after one "
              "warm-up call per variant, variants interleaved):", "",
              "| device | size | precision | images per call | guidance | images/s | vs two passes | median s "
              "per call | calls | peak memory GiB | other processes (cores, max) |", "|---" * 11 + "|"]
    rows = sorted(data["sampling"], key=lambda r: (r["device_kind"], r["size"] != "tiny", r["precision"],
                                                  r["threads"], r["variant"] != "batched"))
    passes = {(r["device_kind"], r["size"], r["precision"], r["threads"]): r for r in rows
              if r["variant"] == "two passes"}
    for r in rows:
        ref = passes[(r["device_kind"], r["size"], r["precision"], r["threads"])]
        device = r.get("gpu") or f"CPU, {r['threads'] or 'default'} thread(s)"
        memory = (f"{r['gpu_peak_gib']:.2f} (GPU)" if "gpu_peak_gib" in r else f"{r['peak_rss_gib']:.2f} (RSS, "
                  "both variants)")
        variant = "one doubled batch" if r["variant"] == "batched" else "two passes"
        lines.append(f"| {device} | {r['size']} | {r['precision']} | {r['images']} | {variant} "
                     f"| {r['images_per_s']:.3g} | {r['images_per_s'] / ref['images_per_s']:.2f} "
                     f"| {r['median_s']:.2f} | {len(r['times'])} | {memory} "
                     f"| {max(0.0, r['other_cores_max']):.2f} |")
    if data["outpaint"]:
        runs = sorted(data["outpaint"], key=lambda r: r["canvas"])
        lines += ["", f"Outpainting (`model.outpaint.outpaint` into a streamed PNG, level 15, 256-px windows, 64-px "
                  f"overlap, {runs[0]['steps']} steps per window, {runs[0]['model']}, one process per canvas):", "",
                  "| canvas | windows | seconds | s per window | band buffers MiB | RSS after loading GiB "
                  f"| peak RSS GiB | vs {runs[0]['canvas']}² | PNG MiB | seam ratio | other processes (cores, mean) |",
                  "|---" * 11 + "|"]
        first = runs[0]["peak_rss_gib"]
        for r in runs:
            seam = f"{r['seam_ratio']:.2f}" if r["seam_ratio"] is not None else "-"
            lines.append(f"| {r['canvas']}x{r['canvas']} | {r['windows']} | {r['seconds']:.0f} "
                         f"| {r['seconds'] / r['windows']:.2f} | {r['band_mib']:.1f} | {r['rss_loaded_gib']:.2f} "
                         f"| {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / first:.2f} | {r['png_mib']:.1f} "
                         f"| {seam} | {max(0.0, r['other_cores_mean']):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--sizes", default="tiny", help="comma-separated tiny,base (default: %(default)s)")
    parser.add_argument("--precision", help="comma-separated fp32,bf16,fp16 (default: fp32 on CPU, bf16,fp16 on GPU)")
    parser.add_argument("--images", type=int, help="images per call (default: CPU 2, GPU 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    parser.add_argument("--canvases", default="1024,4096", help="outpaint canvas sides (default: %(default)s)")
    parser.add_argument("--outpaint-steps", type=int, default=2, help="steps per window (default: %(default)s)")
    parser.add_argument("--skip-outpaint", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s: on this shared 2-core machine two threads "
                             "contend with other processes and the timings scatter; 0: torch's default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child (default: %(default)s)")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        kind, cfg = args.child
        print(json.dumps((sampling_child if kind == "sampling" else outpaint_child)(json.loads(cfg))))
        return

    gpu = args.device.startswith("cuda")
    kind = "cuda" if gpu else "cpu"
    if not gpu and args.precision not in (None, "fp32"):
        raise SystemExit("--precision bf16/fp16 is for a GPU: this CPU has no fast bf16 kernels (one TAEF2 decode "
                         "took 111 s in bf16 against 0.65 s in fp32)")
    new: dict[str, Any] = {"machines": {kind: machine(args.device)}, "sampling": [], "outpaint": []}
    if not args.skip_sampling:
        for size in args.sizes.split(","):
            for precision in (args.precision or ("bf16,fp16" if gpu else "fp32")).split(","):
                if not gpu:
                    wait_quiet(0.3, 120, warn=True)
                cfg = {"size": size, "device": args.device, "precision": precision, "steps": args.steps,
                       "images": args.images or (8 if gpu else 2), "repeats": args.repeats, "threads": args.threads}
                result = run_child("sampling", cfg, args.timeout)
                for variant, times in result.pop("times").items():
                    median = sorted(times)[len(times) // 2]
                    row = {**cfg, **result, "device_kind": kind, "variant": variant, "times": times,
                           "median_s": median, "images_per_s": cfg["images"] / median}
                    new["sampling"].append(row)
                    print(f"{size} {precision} {variant}: {row['images_per_s']:.3g} images/s "
                          f"({median:.2f} s per {cfg['images']} images)", flush=True)
    if not args.skip_outpaint:
        for side in (int(s) for s in args.canvases.split(",")):
            wait_quiet(0.3, 120, warn=True)
            result = run_child("outpaint", {"canvas": side, "steps": args.outpaint_steps, "threads": args.threads},
                               args.timeout)
            new["outpaint"].append(result)
            print(f"outpaint {side}x{side}: {result['windows']} windows in {result['seconds']:.0f} s, peak RSS "
                  f"{result['peak_rss_gib']:.2f} GiB", flush=True)
    data = merge(new)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))
    if args.write:
        update_results(table(data), "generate")


if __name__ == "__main__":
    main()
