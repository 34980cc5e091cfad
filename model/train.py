"""Train Text2Earth: DCA condition dropping, epsilon loss with min-SNR weighting, EMA, resumable checkpoints.

`task: inpaint` trains the editing model the same way, from the text-to-image model (`model.inpaint`), with a
random mask per sample (`model.masks`) whose masked image and mask join the UNet's input.

accelerate picks the device and the processes, so one command trains on a CPU, one GPU, several GPUs (DDP)
or several machines. Every random draw of a step (noise, timesteps, DCA drops) comes from a generator seeded
by (seed, batch index, rank) and the data stream restarts at the batch index, so a run resumed from a
checkpoint ends with exactly the weights of a run that was never interrupted (masks included).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import InpaintParams, TrainParams, resolve_task
from model.frozen import Frozen, encode_text, prepare_frozen
from model.objective import apply_dca, diffusion_loss, inpaint_masks, step_draws, step_seed
from model.train_log import files_only_live
from pipeline.errors import ParamsError

__all__ = ["TrainingRun", "make_optimizer", "prepare_training", "run_fingerprint", "train"]

log = logging.getLogger(__name__)

LOSS_WINDOW = 10  # optimizer steps averaged for the reported final loss


# --- optimisation ----------------------------------------------------------------------------------------------


def make_optimizer(params: TrainParams, parameters: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (a quarter of the optimizer memory) when `adam_8bit` is set."""
    if params.adam_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ParamsError("train.adam_8bit is true but bitsandbytes is not installed: "
                              "`pip install bitsandbytes` (needs a CUDA GPU) or set train.adam_8bit: false") from exc
        optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(parameters, lr=params.learning_rate,
                                                                weight_decay=params.weight_decay)
        return optimizer
    fused = device.type == "cuda"  # one kernel for all parameters on a GPU; the CPU keeps the reference loop
    return torch.optim.AdamW(parameters, lr=params.learning_rate, weight_decay=params.weight_decay, fused=fused)


# --- the run ---------------------------------------------------------------------------------------------------


def _conditioning_fields(unet: Any) -> list[str]:
    from model.unet import unet_conditioning

    conditioning = unet_conditioning(unet)
    return list(conditioning.metadata) if conditioning else []


def _lr_scheduler(params: TrainParams, optimizer: torch.optim.Optimizer, num_processes: int) -> Any:
    from diffusers.optimization import get_scheduler

    # the prepared scheduler steps once per process per optimizer step, hence the factor (as in diffusers' scripts)
    return get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.lr_warmup_steps * num_processes,
                         num_training_steps=params.max_steps * num_processes)


@dataclass
class TrainingRun:
    """Everything one process trains with; `step` is one optimizer step (the benchmark drives it too)."""

    params: TrainParams
    accelerator: Any
    components: dict[str, Any]
    unet: Any  # as prepared by accelerate (DDP / compile wrappers)
    bare_unet: Any  # the UNet itself: EMA, saving, export
    optimizer: Any
    lr_scheduler: Any
    ema: Any | None
    frozen: Frozen
    metadata_fields: list[str]

    @property
    def noise_scheduler(self) -> Any:
        """The training noise schedule."""
        return self.components["scheduler"]

    def batch_loss(self, batch: Mapping[str, Any], seed: int) -> torch.Tensor:
        """The loss of one batch: encode, noise, drop conditions, predict, weight.

        A batch may carry `latents` and `text_embeds` computed ahead (a latent-cached data set); otherwise the
        frozen autoencoder and text encoder encode `pixel_values` and `input_ids` here.
        """
        from model.autoencoder import encode
        from model.unet import predict_noise

        accelerator, params, scheduler = self.accelerator, self.params, self.noise_scheduler
        device = accelerator.device
        torch.manual_seed(seed)  # anything that still draws from the global generator (a KL autoencoder's sample)
        with torch.no_grad(), accelerator.autocast():
            if "latents" in batch:  # precomputed by the data pipeline (already scaled)
                latents = batch["latents"].to(device, non_blocking=True)
            elif self.frozen.latent_cache is not None:
                latents = self.frozen.latent_cache.encode(batch["pixel_values"].to(device, non_blocking=True))
            else:
                latents = encode(self.frozen.vae, batch["pixel_values"].to(device, non_blocking=True))
            if "text_embeds" in batch:
                text_embeds = batch["text_embeds"].to(device, non_blocking=True)
            else:
                text_embeds = encode_text(self.frozen.text_encoder, batch["input_ids"])
        latents = latents.float()
        draws = step_draws(seed, tuple(latents.shape), num_train_timesteps=scheduler.config.num_train_timesteps,
                           p_text=params.p_text_drop, p_res=params.p_res_drop, noise_offset=params.noise_offset)
        noise, timesteps = draws.noise.to(device), draws.timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if params.task == "inpaint":
            noisy = self._with_inpaint_inputs(noisy, batch, seed)
        metadata = {f: batch[f].to(device) for f in self.metadata_fields} or None
        text, levels, gsd_m, metadata = apply_dca(text_embeds, self.frozen.null_text, batch["level"].to(device),
                                                  draws.drop_text, draws.drop_res, gsd_m=batch["gsd_m"].to(device),
                                                  metadata=metadata)
        model_pred = predict_noise(self.unet, noisy, timesteps, text, levels, gsd_m=gsd_m, metadata=metadata)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return diffusion_loss(model_pred, target, timesteps, scheduler, params.snr_gamma)

    def _with_inpaint_inputs(self, noisy: torch.Tensor, batch: Mapping[str, Any], seed: int) -> torch.Tensor:
        """The inpainting UNet's input: the noisy latents, then the batch's random masks and masked images."""
        from model.inpaint import inpaint_model_input, prepare_inpaint_inputs

        if "pixel_values" not in batch:
            raise ParamsError("train.task inpaint masks the images, so batches need `pixel_values`; a data set of "
                              "precomputed latents only trains text2image")
        pixels = batch["pixel_values"].to(self.accelerator.device, non_blocking=True)
        masks = inpaint_masks(seed, pixels.shape[0], pixels.shape[-2], pixels.shape[-1], self.params.inpaint)
        with torch.no_grad(), self.accelerator.autocast():
            inputs = prepare_inpaint_inputs(self.frozen.vae, pixels, masks, sample=True)
        return inpaint_model_input(noisy, inputs)

    def step(self, batches: Sequence[Mapping[str, Any]], step: int) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` batches; (loss averaged over processes, grad norm).

        Batch i of step s draws its noise, timesteps and DCA drops from `step_seed(seed, s * accum + i, rank)`.
        """
        accelerator, unet = self.accelerator, self.unet
        accum = len(batches)
        loss_sum = torch.zeros((), device=accelerator.device)
        grad_norm = torch.zeros(())
        for micro, batch in enumerate(batches):
            seed = step_seed(self.params.seed, step * accum + micro, accelerator.process_index)
            with accelerator.accumulate(unet):
                loss = self.batch_loss(batch, seed)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), self.params.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        if self.ema is not None:
            self.ema.step(unet.parameters())
        mean_loss = accelerator.reduce(loss_sum / accum, reduction="mean")
        return float(mean_loss), float(grad_norm)


def prepare_training(params: TrainParams, *, cache_latents: bool | None = None) -> TrainingRun:
    """Build the components, the accelerator, optimizer, LR schedule and EMA for `params`.

    `cache_latents` None: cache on CPUs only, where the autoencoder costs more than a tiny UNet step (and only
    for deterministic autoencoders); a GPU encodes whole batches faster than the cache's one-by-one misses.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    from model.components import build_components
    from model.inpaint import inpaint_components

    params = resolve_task(params)
    if params.threads:
        torch.set_num_threads(params.threads)
    accelerator = Accelerator(mixed_precision=params.mixed_precision,
                              gradient_accumulation_steps=params.gradient_accumulation_steps,
                              dynamo_backend="inductor" if params.compile else None)
    set_seed(params.seed)  # the same initial weights on every process and in every resumption
    components = inpaint_components(params) if params.task == "inpaint" else build_components(params)
    if cache_latents is None:
        configured = getattr(params, "cache_latents", None)  # a `train.cache_latents` key, where params have one
        cache_latents = accelerator.device.type == "cpu" if configured is None else bool(configured)
    frozen = prepare_frozen(components, accelerator.device, cache_latents)
    unet = components["unet"]
    unet.train()
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if params.channels_last:
        unet.to(memory_format=torch.channels_last)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: time the conv algorithms once, keep the fastest
    optimizer = make_optimizer(params, unet.parameters(), accelerator.device)
    lr_scheduler = _lr_scheduler(params, optimizer, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    bare_unet = accelerator.unwrap_model(unet, keep_torch_compile=False)
    ema = None
    if params.ema:
        ema = EMAModel(bare_unet.parameters(), decay=params.ema_decay, model_cls=type(bare_unet),
                       model_config=bare_unet.config,
                       foreach=accelerator.device.type == "cuda")  # a few fused kernels, not ~700 per step
        ema.to(accelerator.device)
    return TrainingRun(params, accelerator, components, unet, bare_unet, optimizer, lr_scheduler, ema, frozen,
                       _conditioning_fields(bare_unet))


def _progress_bar(params: TrainParams, start_step: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=params.max_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, disable=not enabled)


def train(params: TrainParams, *, resume: str | None = None, progress: bool = True, live_dir: str = "dvclive",
          samples_path: str | None = "metrics/train_samples.png") -> dict[str, Any]:
    """Train (or continue training) the model of `params`, export it with its EMA weights, return a summary.

    `resume`: None starts at step 0 and deletes the checkpoints of any earlier run in `params.checkpoint_dir`;
    "latest" continues from the newest complete checkpoint there when it was made with the same train params,
    shards and model code (`model.checkpoint.params_fingerprint`; max_steps may differ), else starts fresh;
    a path continues from that checkpoint. The exported pipeline lands in `params.output_dir` and a labelled
    grid of the validation prompts x levels in `samples_path`. Only the main process writes files.
    """
    from diffusers import DPMSolverMultistepScheduler

    from model.checkpoint import (
        clear_checkpoints,
        load_checkpoint,
        remove_stale_temporaries,
        resolve_resume,
        restore_logs,
        save_checkpoint,
    )
    from model.data import training_stream

    started = time.perf_counter()
    from model.data import expand_shards

    params = resolve_task(params)
    fingerprint = run_fingerprint(params, expand_shards(params.shards))
    checkpoint = resolve_resume(resume, params.checkpoint_dir, fingerprint)  # a bad path fails before any work
    run = prepare_training(params)
    accelerator = run.accelerator
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()  # every process has resolved `resume` before the main one deletes anything
    if main:
        remove_stale_temporaries(params.checkpoint_dir)
        if checkpoint is None and (removed := clear_checkpoints(params.checkpoint_dir)):
            log.info("fresh start: removed %d checkpoint(s) of an earlier run from %s", removed,
                     params.checkpoint_dir)
    accelerator.wait_for_everyone()
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, ema=run.ema)
        start_step = int(state["step"])
        log.info("resuming from %s (step %d)", checkpoint, start_step)
        if state.get("torch_threads", torch.get_num_threads()) != torch.get_num_threads():
            log.warning("%s was trained with %s CPU threads, resuming with %d: CPU sums then split differently, so "
                        "the weights will not match an uninterrupted run bit for bit (set train.threads)",
                        checkpoint, state["torch_threads"], torch.get_num_threads())
    accum = params.gradient_accumulation_steps
    world = accelerator.num_processes
    stream = training_stream(params, run.components["tokenizer"], seed=params.seed, start_step=start_step * accum,
                             rank=accelerator.process_index, world_size=world)
    if main and checkpoint is not None and not restore_logs(checkpoint, live_dir):
        log.info("%s holds no DVCLive history: continuing the one in %s", checkpoint, live_dir)
    live = files_only_live(live_dir, start_step) if main else None  # params are in params.yaml already
    bar = _progress_bar(params, start_step, progress and main)
    samples_per_step = params.batch_size * accum * world
    losses: list[float] = []
    loop_seconds = 0.0
    try:
        for step in range(start_step, params.max_steps):
            step_started = time.perf_counter()
            loss, grad_norm = run.step([next(stream) for _ in range(accum)], step)
            seconds = time.perf_counter() - step_started
            loop_seconds += seconds
            losses.append(loss)
            done = step + 1
            lr = float(run.lr_scheduler.get_last_lr()[0])
            if live is not None:
                live.step = done
                live.log_metric("train/loss", loss)
                live.log_metric("train/lr", lr)
                live.log_metric("train/grad_norm", grad_norm)
                live.log_metric("train/samples_per_s", samples_per_step / seconds)
                live.next_step()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if done % params.checkpoint_every == 0 or done == params.max_steps:
                save_checkpoint(accelerator, params.checkpoint_dir, done, ema=run.ema, keep=params.keep_checkpoints,
                                extra={"seed": params.seed, "size": params.size, "task": params.task,
                                       "params_fingerprint": fingerprint,
                                       "torch_threads": torch.get_num_threads()},
                                logs=live_dir if live is not None else None)
    finally:
        bar.close()
    accelerator.wait_for_everyone()
    if main:
        if run.ema is not None:
            run.ema.copy_to(run.bare_unet.parameters())
        run.bare_unet.eval()
        scheduler = DPMSolverMultistepScheduler.from_config(run.noise_scheduler.config)
        pipeline = _export(run.components, run.bare_unet, scheduler, params.output_dir, params.task)
        if samples_path:
            _save_grid(pipeline, params, samples_path, done_steps=params.max_steps)
    steps_run = params.max_steps - start_step
    cache = run.frozen.latent_cache
    summary = {
        "steps": params.max_steps,
        "start_step": start_step,
        "steps_run": steps_run,
        "size": params.size,
        "task": params.task,
        "num_processes": world,
        "batch_size": params.batch_size,
        "effective_batch_size": samples_per_step,
        "final_loss": float(np.mean(losses[-LOSS_WINDOW:])) if losses else math.nan,
        "first_loss": float(np.mean(losses[:LOSS_WINDOW])) if losses else math.nan,
        "samples_per_s": samples_per_step * steps_run / loop_seconds if loop_seconds else 0.0,
        "seconds": time.perf_counter() - started,
        "unet_parameters": sum(p.numel() for p in run.bare_unet.parameters()),
        "latent_cache_hits": cache.hits if cache else 0,
        "latent_cache_misses": cache.misses if cache else 0,
        "output_dir": params.output_dir,
    }
    if live is not None:
        for key in ("final_loss", "samples_per_s", "seconds"):
            live.summary[key] = summary[key]
        live.end()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def run_fingerprint(params: TrainParams, shards: Sequence[str]) -> str:
    """What a checkpoint of this run depends on (`model.checkpoint.params_fingerprint`, with the code), per task.

    A text-to-image run ignores the `inpaint` settings. An inpainting run also depends on the UNet weights it
    starts from (read once per start: seconds for SD2-base), so a retrained text-to-image model restarts it;
    its folders and step count count no more than the text-to-image ones do.
    """
    from model.checkpoint import params_fingerprint

    if params.task != "inpaint":
        return params_fingerprint(params.model_copy(update={"inpaint": InpaintParams.model_validate({})}), shards,
                                  code=True)
    view = params.model_copy(update={"inpaint": params.inpaint.model_copy(  # as their top-level twins
        update={"output_dir": None, "checkpoint_dir": None, "max_steps": None})})
    digest = hashlib.sha256(params_fingerprint(view, shards, code=True).encode())
    unet_dir = Path(str(params.inpaint.init_from)) / "unet"
    for path in sorted(unet_dir.glob("*")) if unet_dir.is_dir() else []:
        if path.is_file():
            with path.open("rb") as handle:
                digest.update(path.name.encode() + hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def _export(components: Mapping[str, Any], unet: Any, scheduler: Any, output_dir: str, task: str = "text2image",
            ) -> Any:
    """save_pretrained into a sibling temporary folder, then swap it in: a killed export leaves the old model."""
    from model.inpaint import Text2EarthInpaintPipeline
    from model.pipeline import Text2EarthPipeline

    pipeline_class = Text2EarthInpaintPipeline if task == "inpaint" else Text2EarthPipeline
    pipeline: Any = pipeline_class(vae=components["vae"], text_encoder=components["text_encoder"],
                                   tokenizer=components["tokenizer"], unet=unet, scheduler=scheduler)
    target = Path(output_dir)
    temp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(temp, ignore_errors=True)
    pipeline.save_pretrained(temp)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(temp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
    return pipeline


def _save_grid(pipeline: Any, params: TrainParams, samples_path: str, done_steps: int) -> None:
    from model.validation import validation_grid

    pipeline.set_progress_bar_config(disable=True)
    title = f"{params.size}, {done_steps} steps, EMA, s={params.guidance_scale:g}"
    if params.task == "inpaint":
        grid = _inpaint_grid(pipeline, params, title)
    else:
        grid = validation_grid(pipeline, params.validation_prompts, params.validation_levels,
                               steps=params.validation_steps, guidance_scale=params.guidance_scale, seed=params.seed,
                               title=title)
    path = Path(samples_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)



def _inpaint_grid(pipeline: Any, params: TrainParams, title: str) -> Any:
    """The validation prompts x levels repainting the centre of the first training chip."""
    from model.data import training_stream
    from model.inpaint import centre_box_mask, inpaint_validation_grid

    image = next(training_stream(params, pipeline.tokenizer, seed=params.seed))["pixel_values"][:1]
    return inpaint_validation_grid(pipeline, image, centre_box_mask(*image.shape[-2:]), params.validation_prompts,
                                   params.validation_levels, steps=params.validation_steps,
                                   guidance_scale=params.guidance_scale, seed=params.seed, title=title)
