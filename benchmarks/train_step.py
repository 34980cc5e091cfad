"""Training step speed and memory: our `TrainingRun.step` against a bare diffusers training step.

    python benchmarks/train_step.py                  # CPU: tiny (batch 8) and base (batch 1) at 256x256
    python benchmarks/train_step.py --write          # ... and update the train_step section of RESULTS.md
    python benchmarks/train_step.py --device cuda --precision bf16 --sizes base --batch-size 64 --write
    python benchmarks/train_step.py --device cuda --sizes base --modes latents --batch-size 256 --compile \
        --channels-last --write                      # the MFU configuration (train.compile, train.channels_last)

Both variants do the same work per step, on the same synthetic batch (random pixels in [-1, 1], the
tokenised validation prompt): encode the pixels with the frozen autoencoder and the ids with the frozen
text encoder, draw noise and timesteps, one UNet forward and backward with the level as `class_labels`,
min-SNR-5 weighted MSE, gradient clipping, AdamW, EMA update. The bare step is diffusers'
`train_text_to_image.py` loop (`--use_ema --snr_gamma 5`) written out; ours adds DCA and the per-batch
seeded generator. `--mode latents` skips both encoders (latents and text embeddings precomputed, as a
latent-cached data set gives them), which isolates the UNet.

Each (size, mode, variant) runs in its own process, so peak memory is per variant (RSS on the CPU,
torch's peak allocation on a GPU). FLOPs are counted with torch's FlopCounterMode on the meta device
(attention through the math kernel, which counts the same matmuls a fused kernel does): model FLOPs
utilisation (MFU) = UNet forward+backward FLOPs per sample x samples/s / the card's peak dense bf16 FLOP/s.
Results merge into results/train_step.json by (device, size, mode, batch, variant), so CPU and GPU runs
made at different times sit side by side.
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
import time
import warnings
from pathlib import Path
from typing import Any

from _measure import update_results  # benchmarks/_measure.py: this folder is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_step.json"
PROMPT = "a river through farmland"

# Peak dense (no sparsity) bf16 tensor throughput, FLOP/s, from the vendors' data sheets.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,  # "NVIDIA H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def peak_flops(name: str) -> tuple[str, float | None]:
    """(card, peak bf16 FLOP/s) for a CUDA device name; (name, None) when the card is not in the table."""
    if "H200" in name:
        return "H200", PEAK_BF16["H200"]
    if "H100" in name:
        for key in ("NVL", "PCIe"):
            if key in name:
                return f"H100 {key}", PEAK_BF16[f"H100 {key}"]
        return "H100 SXM", PEAK_BF16["H100 SXM"]
    for key in ("A100", "L40S"):
        if key in name:
            return key, PEAK_BF16[key]
    return name, None


# --- the child: one variant ------------------------------------------------------------------------------------


def _params(cfg: dict[str, Any]) -> Any:
    from model.config import TrainParams

    return TrainParams.model_validate({
        "size": cfg["size"], "resolution": 256, "batch_size": cfg["batch"], "max_steps": 1000,
        "mixed_precision": "bf16" if cfg["precision"] == "bf16" else "no", "compile": cfg["compile"],
        "gradient_checkpointing": cfg["gradient_checkpointing"], "ema": cfg.get("ema", True), "snr_gamma": 5.0,
        "channels_last": cfg.get("channels_last", False),
        "lr_warmup_steps": 0, "seed": 0, "validation_prompts": [PROMPT]})


def _synthetic_batch(cfg: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    batch = cfg["batch"]
    ids = tokenizer([PROMPT] * batch, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    nan = torch.full((batch,), float("nan"))
    return {"pixel_values": torch.rand(batch, 3, 256, 256, generator=g) * 2 - 1, "input_ids": ids,
            "level": torch.randint(10, 19, (batch,), generator=g), "gsd_m": nan, "lon": nan, "lat": nan,
            "month": nan, "key": [f"synthetic-{i}" for i in range(batch)]}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _precompute(batch: dict[str, Any], vae: Any, text_encoder: Any, device: str) -> dict[str, Any]:
    """Latents and text embeddings for --mode latents (outside the timed steps)."""
    import torch

    from model.autoencoder import encode

    with torch.no_grad():
        latents = encode(vae, batch["pixel_values"].to(device)).float()
        embeds = text_encoder(batch["input_ids"].to(device))[0]
    return {**batch, "latents": latents, "text_embeds": embeds}


def run_ours(cfg: dict[str, Any]) -> list[float]:
    """Step times of `model.train.TrainingRun.step`."""
    from model.train import prepare_training

    run = prepare_training(_params(cfg), cache_latents=False)
    batch = _synthetic_batch(cfg, run.components["tokenizer"])
    if cfg["mode"] == "latents":
        batch = _precompute(batch, run.frozen.vae, run.frozen.text_encoder, cfg["device"])
    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        _sync(cfg["device"])
        start = time.perf_counter()
        run.step([batch], step)  # returns floats: waits for the device
        _sync(cfg["device"])
        times.append(time.perf_counter() - start)
    return times[cfg["warmup"]:]


def run_bare(cfg: dict[str, Any]) -> list[float]:
    """Step times of a plain diffusers training loop doing the same work."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel, compute_snr

    from model.components import build_components

    device, params = cfg["device"], _params(cfg)
    torch.manual_seed(0)
    parts = build_components(params)
    vae, text_encoder, unet, scheduler = parts["vae"], parts["text_encoder"], parts["unet"], parts["scheduler"]
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval().to(device)
    unet.train().to(device)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if params.channels_last:
        unet.to(memory_format=torch.channels_last)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    model = torch.compile(unet) if params.compile else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay,
                                  fused=device.startswith("cuda"))
    ema = None
    if params.ema:
        ema = EMAModel(unet.parameters(), decay=params.ema_decay, model_cls=type(unet), model_config=unet.config,
                       foreach=device.startswith("cuda"))  # diffusers' --foreach_ema
        ema.to(device)
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=cfg["precision"] == "bf16")
    batch = _synthetic_batch(cfg, parts["tokenizer"])
    if cfg["mode"] == "latents":
        batch = _precompute(batch, vae, text_encoder, device)
    is_kl = isinstance(vae, AutoencoderKL)
    times = []
    for _ in range(cfg["warmup"] + cfg["steps"]):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            if cfg["mode"] == "latents":
                latents, embeds = batch["latents"], batch["text_embeds"]
            elif is_kl:
                latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample() * vae.config.scaling_factor
                embeds = text_encoder(batch["input_ids"].to(device))[0]
            else:  # AutoencoderTiny (TAEF2): deterministic latents, shifted and scaled to unit variance
                latents = vae.encode(batch["pixel_values"].to(device)).latents
                latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
                embeds = text_encoder(batch["input_ids"].to(device))[0]
        latents = latents.float()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            pred = model(noisy, timesteps, encoder_hidden_states=embeds,
                         class_labels=batch["level"].to(device)).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        loss = (loss * weights).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), params.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())
        float(loss), float(grad_norm)  # the same host syncs as ours (loss and grad norm are logged)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[cfg["warmup"]:]


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one variant and measure it (called in a fresh process)."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = (run_ours if cfg["variant"] == "ours" else run_bare)(cfg)
    median = sorted(times)[len(times) // 2]
    out = {**cfg, "step_s": times, "median_step_s": median, "samples_per_s": cfg["batch"] / median,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if cfg["device"].startswith("cuda"):
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        out["gpu"] = torch.cuda.get_device_name()
    return out


# --- FLOPs -----------------------------------------------------------------------------------------------------


def count_flops(size: str) -> dict[str, float]:
    """FLOPs per 256x256 sample: UNet forward+backward, and the frozen encoders' forward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model.autoencoder import encode
    from model.components import build_components

    params = _params({"size": size, "batch": 1, "precision": "fp32", "compile": False,
                      "gradient_checkpointing": False})
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading TAEF2's weights into meta tensors is the intended no-op
        parts = build_components(params)
    parts["vae"].to("meta")  # pretrained weights are loaded onto the CPU; the shapes are all that count
    unet, vae, text_encoder = parts["unet"].to("meta"), parts["vae"], parts["text_encoder"].to("meta")
    latent = torch.randn(1, unet.config.in_channels, 32, 32, device="meta")
    counted: dict[str, float] = {}
    with sdpa_kernel(SDPBackend.MATH):
        counter = FlopCounterMode(display=False)
        with counter:
            out = unet(latent, torch.tensor([500], device="meta"),
                       encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim, device="meta"),
                       class_labels=torch.tensor([15], device="meta")).sample
            counted["unet_forward"] = counter.get_total_flops()
            out.float().pow(2).mean().backward()
        counted["unet_train"] = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            encode(vae, torch.randn(1, 3, 256, 256, device="meta"))
        counted["autoencoder_encode"] = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            text_encoder(torch.zeros(1, 77, dtype=torch.long, device="meta"))
        counted["text_encoder"] = counter.get_total_flops()
    counted["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    return {k: float(v) for k, v in counted.items()}


# --- the parent ------------------------------------------------------------------------------------------------


def run_child(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if cfg["device"] == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"child {cfg['size']}/{cfg['mode']}/{cfg['variant']} failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    return result


def cpu_memory_plan(size: str, device: str) -> tuple[bool, bool]:
    """(run it, with EMA) for a CPU run: the base step holds ~16 GiB of fp32 weights, gradients and AdamW moments
    plus 3.5 GiB of EMA weights, so the EMA is left out (in both variants) when less than 24 GiB is free, and the
    size is skipped below 18 GiB."""
    if device != "cpu" or size != "base":
        return True, True
    import psutil

    available = psutil.virtual_memory().available / 1024**3
    return available >= 18, available >= 24


def machine() -> dict[str, Any]:
    import torch

    info = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "date": dt.date.today().isoformat()}
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 1024**3)
    except ImportError:
        pass
    return info


def merge(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    key = ("device_kind", "size", "mode", "batch", "precision", "compile", "channels_last", "variant")
    def identity(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple((r.get(k) or False) if k == "channels_last" else r.get(k) for k in key)  # older: no key

    new_keys = {identity(r) for r in rows}
    runs = [r for r in old.get("runs", []) if identity(r) not in new_keys] + rows
    return {"runs": runs, "machines": {**old.get("machines", {}), meta["device_kind"]: meta}}


def table(data: dict[str, Any]) -> str:
    lines = []
    for kind, meta in sorted(data["machines"].items()):
        where = meta.get("card") or f"{meta.get('cpus')} CPU cores ({meta.get('machine')})"
        steps = {r["size"]: r.get("steps") for r in data["runs"] if r["device_kind"] == kind}
        warmups = " or ".join(str(w) for w in sorted({r.get("warmup", 0) for r in data["runs"]
                                                       if r["device_kind"] == kind}))
        counts = " / ".join(f"{n} ({size})" for size, n in sorted(steps.items(), key=lambda i: i[0] != "tiny"))
        lines.append(f"Machine ({kind}): {where}, {meta.get('ram_gib', '?')} GiB RAM, torch {meta.get('torch')}, "
                     f"{meta.get('date')}; median of {counts or meta.get('steps')} timed steps after "
                     f"{warmups or meta.get('warmup')} warm-up step(s)"
                     + (" (the more with compile)." if " or " in warmups else "."))
    lines += ["", "| device | size | step | batch | precision | EMA | variant | samples/s | vs bare | "
              "peak memory GiB | UNet GFLOP/sample (fwd+bwd) | MFU |", "|---" * 12 + "|"]
    runs = sorted(data["runs"], key=lambda r: (r["device_kind"], r["size"] != "tiny", r["mode"], r["batch"],
                                              r["variant"] != "bare"))
    def setting(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["device_kind"], r["size"], r["mode"], r["batch"], r["precision"], r["compile"],
                r.get("channels_last", False))

    bare = {setting(r): r for r in runs if r["variant"] == "bare"}
    for r in runs:
        ref = bare.get(setting(r))
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}" if ref else "-"
        memory = r.get("gpu_peak_gib") or r.get("peak_rss_gib")
        memory_kind = "GPU" if "gpu_peak_gib" in r else "RSS"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        mode = "full (encoders + UNet)" if r["mode"] == "full" else "UNet (latents given)"
        precision = r["precision"] + (" + compile" if r["compile"] else "") + (
            " + channels-last" if r.get("channels_last") else "")
        ema = "yes" if r.get("ema", True) else "no"
        lines.append(f"| {r.get('gpu') or 'CPU'} | {r['size']} | {mode} | {r['batch']} | {precision} | {ema} "
                     f"| {r['variant']} | {r['samples_per_s']:.3g} | {ratio} | {memory:.2f} ({memory_kind}) "
                     f"| {r['unet_flops_per_sample'] / 1e9:.1f} | {mfu} |")
    flops = {r["size"]: r for r in runs}
    for size, r in sorted(flops.items(), key=lambda item: item[0] != "tiny"):
        unet, frozen = r["unet_flops_per_sample"] / 1e9, r["frozen_flops_per_sample"] / 1e9
        lines += ["", f"FLOPs per 256x256 sample, {size}: UNet forward+backward {unet:.1f} G, frozen autoencoder "
                  f"encode + text encoder {frozen:.1f} G."]
    skipped = list(data.get("skipped", []))
    if skipped:
        lines += ["", *[f"Skipped: {s}" for s in skipped]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--sizes", default="tiny,base", help="comma-separated (default: %(default)s)")
    parser.add_argument("--batch-size", help="per size, e.g. 8,1 (default: CPU tiny 8, base 1; GPU tiny 64, base 64)")
    parser.add_argument("--modes", default=None, help="full,latents (default: full on the CPU, both on a GPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default: CPU tiny 3, base 1; GPU 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: CPU 1, GPU 3; 5 with --compile)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in both variants")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC UNet weights and activations in both variants (train.channels_last)")
    parser.add_argument("--variants", default="bare,ours",
                        help="which steps to time, e.g. ours to try settings quickly (default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-ema", action="store_true", help="leave the EMA update out of both variants")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOP/s, if not in the table")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant (default: %(default)s)")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    unknown = set(args.variants.split(",")) - {"bare", "ours"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from bare, ours")
    gpu = args.device.startswith("cuda")
    precision = args.precision or ("bf16" if gpu else "fp32")
    sizes = args.sizes.split(",")
    batches = [int(b) for b in args.batch_size.split(",")] if args.batch_size else []
    modes = (args.modes or ("full,latents" if gpu else "full")).split(",")
    warmup = args.warmup if args.warmup is not None else (5 if args.compile else 3) if gpu else 1
    meta = {**machine(), "device_kind": "cuda" if gpu else "cpu", "steps": args.steps, "warmup": warmup}
    card, peak = None, None
    if gpu:
        import torch

        card, peak = peak_flops(torch.cuda.get_device_name())
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak
        meta.update({"card": card, "peak_bf16_flops": peak})
    rows, skipped = [], []
    for i, size in enumerate(sizes):
        batch = batches[i] if i < len(batches) else (64 if gpu else (8 if size == "tiny" else 1))
        steps = args.steps or (10 if gpu else (3 if size == "tiny" else 1))
        runnable, ema = cpu_memory_plan(size, args.device)
        if not runnable:
            skipped.append(f"{size} on the CPU: less than 18 GiB of memory available")
            continue
        flops = count_flops(size)
        for mode in modes:
            for variant in args.variants.split(","):  # interleaved, bare first: the same warm machine for both
                cfg = {"size": size, "mode": mode, "variant": variant, "batch": batch, "device": args.device,
                       "device_kind": meta["device_kind"], "precision": precision, "compile": args.compile,
                       "channels_last": args.channels_last,
                       "gradient_checkpointing": args.gradient_checkpointing, "steps": steps, "warmup": warmup,
                       "threads": args.threads, "ema": ema and not args.no_ema}
                result = run_child(cfg, args.timeout)
                result["unet_flops_per_sample"] = flops["unet_train"]
                result["frozen_flops_per_sample"] = flops["autoencoder_encode"] + flops["text_encoder"]
                result["unet_parameters"] = flops["unet_parameters"]
                achieved = flops["unet_train"] * result["samples_per_s"]
                result["achieved_unet_flops"] = achieved
                result["mfu"] = achieved / peak if peak else None
                rows.append(result)
                memory = f"GPU {result['gpu_peak_gib']:.2f}" if gpu else f"RSS {result['peak_rss_gib']:.2f}"
                mfu = f", MFU {100 * result['mfu']:.1f} %" if result["mfu"] is not None else ""
                print(f"{size:5s} {mode:8s} {variant:5s} batch {batch}: {result['samples_per_s']:.3g} samples/s, "
                      f"step {result['median_step_s']:.3f} s, {memory} GiB{mfu}", flush=True)
    meta["steps"] = args.steps or ("10" if gpu else "3 (tiny) / 1 (base)")
    data = merge(rows, meta)
    data["skipped"] = skipped
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))
    if args.write:
        update_results(table(data), "train_step")


if __name__ == "__main__":
    main()
