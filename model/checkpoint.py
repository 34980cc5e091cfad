"""Resumable training checkpoints: `checkpoint-{step}` folders written atomically, rotated, found again.

A checkpoint is first written to a hidden temporary folder and renamed only once complete (the rename is
atomic on one filesystem), so a run killed mid-save never leaves a folder that looks like a checkpoint.
`state.json` is written last inside it and names the optimizer step the checkpoint continues from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from pipeline.errors import ParamsError

__all__ = [
    "STATE_FILE",
    "checkpoint_step",
    "clear_checkpoints",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "params_fingerprint",
    "remove_stale_temporaries",
    "resolve_resume",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
LOGS_DIR = "dvclive"  # the DVCLive history up to the checkpoint's step
EMA_FILE = "ema.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMP_PREFIX = ".tmp-checkpoint-"


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder, None for anything else (temporary, partial, foreign)."""
    match = _NAME.match(path.name)
    if match is None or not (path / STATE_FILE).is_file():
        return None
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    step = state.get("step")
    return step if isinstance(step, int) and step == int(match.group(1)) else None


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, None when there is none."""
    checkpoints = complete_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


# Settings that do not change what a step computes: a checkpoint stays a valid start when only these differ.
_NOT_FINGERPRINTED = frozenset({
    "max_steps", "checkpoint_every", "keep_checkpoints", "output_dir", "checkpoint_dir", "validation_prompts",
    "validation_levels", "validation_steps", "guidance_scale", "num_workers", "threads", "compile",
    "gradient_checkpointing", "channels_last",
})


def params_fingerprint(params: BaseModel, shards: Sequence[str] = (), *, code: bool = False) -> str:
    """A digest of what a checkpoint depends on: train params (data, model, optimisation, seed), the shards'
    names and sizes and, with `code`, the model package's source.

    `max_steps` counts only where the learning-rate schedule decays towards it (cosine, linear): with a
    constant schedule, continuing a finished run to more steps equals training that long from the start.
    Re-published shards (other sizes) or changed model code make `--resume latest` start afresh, as
    `dvc repro` expects when it re-runs the stage for them. Remote shards count by name only.
    """
    values: dict[str, Any] = {k: v for k, v in params.model_dump(mode="json").items() if k not in _NOT_FINGERPRINTED}
    if values.get("lr_scheduler") in ("cosine", "linear"):
        values["max_steps"] = params.model_dump()["max_steps"]
    if shards:
        values["shards"] = [(url, os.path.getsize(url) if os.path.isfile(url) else None) for url in shards]
    if code:
        package = Path(__file__).resolve().parent
        values["code"] = hashlib.sha256(b"".join(
            str(p.relative_to(package)).encode() + p.read_bytes() for p in sorted(package.rglob("*.py")))).hexdigest()
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_of(path: Path) -> str | None:
    value = json.loads((path / STATE_FILE).read_text()).get("params_fingerprint")
    return value if isinstance(value, str) else None


def resolve_resume(resume: str | None, root: str | Path, fingerprint: str | None = None) -> Path | None:
    """The checkpoint folder `resume` names: None (start fresh), "latest" or a checkpoint path.

    "latest" is the newest complete checkpoint, or None (fresh start) when there is none or when it was made
    with other train params (`fingerprint`), so `--resume latest` is safe in a pipeline whose params change.
    An explicit path is used even then, with a warning.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(root)
        if found is None:
            log.info("no complete checkpoint in %s: starting from step 0", root)
        elif fingerprint is not None and _fingerprint_of(found) not in (None, fingerprint):
            log.info("%s was made with other train params: starting from step 0", found)
            return None
        return found
    path = Path(resume)
    if checkpoint_step(path) is None:
        raise ParamsError(f"--resume {resume}: not a complete checkpoint folder (checkpoint-N with {STATE_FILE}); "
                          f"use --resume latest or one of {[str(p) for _, p in complete_checkpoints(root)] or 'none'}")
    if fingerprint is not None and _fingerprint_of(path) not in (None, fingerprint):
        log.warning("%s was made with other train params: continuing from it anyway, as asked", path)
    return path


def clear_checkpoints(root: str | Path) -> int:
    """Delete every checkpoint (and half-written one) under `root` before a fresh run; returns how many.

    A fresh run's checkpoints must not mix with an earlier run's: rotation keeps the highest steps, and
    `--resume latest` would pick up the old run.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    old = [p for p in root.iterdir() if p.is_dir() and (_NAME.match(p.name) or p.name.startswith(_TEMP_PREFIX))]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return len(old)


def _state_dict_of(ema: Any) -> dict[str, Any]:
    state: dict[str, Any] = ema.state_dict()
    return state


def save_checkpoint(accelerator: Any, root: str | Path, step: int, *, ema: Any | None, keep: int,
                    extra: dict[str, Any] | None = None, logs: str | Path | None = None) -> Path:
    """Save model, optimizer, LR schedule, RNG states (accelerate) and EMA as `root/checkpoint-{step}`.

    Every process must call this (accelerate saves one RNG state per process); only the main process
    creates, renames and deletes folders. The oldest complete checkpoints beyond `keep` are removed.
    Multi-node runs need `root` on a filesystem all nodes share. `logs` (the DVCLive folder) is copied in, so
    a resumed run continues the history of the checkpoint's step even where the folder was deleted meanwhile
    (`dvc repro` removes a stage's outputs before running it).
    """
    root = Path(root)
    final = root / f"checkpoint-{step}"
    temp = root / f"{_TEMP_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(_state_dict_of(ema), temp / EMA_FILE)
        state = {"step": step, "num_processes": accelerator.num_processes, **(extra or {})}
        (temp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        if logs is not None and Path(logs).is_dir():
            shutil.copytree(logs, temp / LOGS_DIR)
        _fsync_tree(temp)
        if final.exists():  # a re-run over an older checkpoint of the same step
            shutil.rmtree(final)
        os.replace(temp, final)
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a power cut must not expose empty files)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def load_checkpoint(accelerator: Any, path: Path, *, ema: Any | None) -> dict[str, Any]:
    """Restore what `save_checkpoint` saved into the prepared objects; returns its `state.json`."""
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        log.warning("%s was saved by %s process(es), resuming with %s: the data order and per-process random "
                    "draws change from here on", path, state["num_processes"], accelerator.num_processes)
    accelerator.load_state(str(path))
    if ema is not None:
        if (path / EMA_FILE).is_file():
            ema.load_state_dict(torch.load(path / EMA_FILE, map_location="cpu", weights_only=False))
            ema.to(accelerator.device)
        else:
            log.warning("%s has no EMA weights: the EMA restarts from the current weights", path)
    return state


def restore_logs(checkpoint: Path, logs: str | Path) -> bool:
    """Put the checkpoint's copy of the DVCLive folder back in place of `logs`; False when it has none."""
    saved = checkpoint / LOGS_DIR
    if not saved.is_dir():
        return False
    shutil.rmtree(logs, ignore_errors=True)
    shutil.copytree(saved, logs)
    return True


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete half-written checkpoints a killed run left behind (main process, before training)."""
    root = Path(root)
    if root.is_dir():
        for path in root.glob(f"{_TEMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
