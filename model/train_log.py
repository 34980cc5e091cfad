"""The training run's record: DVCLive files only (never git state), history cut at a resume, the summary line."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["files_only_live", "summary_line", "truncate_history"]


def files_only_live(live_dir: str, resume_step: int) -> Any:
    """A DVCLive logger that only writes files under `live_dir` (metrics.json, plots/metrics/*.tsv).

    Inside a git repository DVCLive's own setup runs `dvc init` when there is no `.dvc`, and may save
    experiments (git refs) or `git add` its files; a training run must never change git state, so that setup
    is skipped. `dvc plots show` and `dvc exp show` read the files through the `train` stage's plots and
    metrics entries in dvc.yaml. On resume the history after the checkpoint's step is dropped, since those
    steps are trained again.
    """
    from dvclive import Live

    class FilesOnlyLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_repo = None

    live = FilesOnlyLive(dir=live_dir, resume=resume_step > 0, save_dvc_exp=False, dvcyaml=None)
    if resume_step > 0:
        truncate_history(Path(live_dir), resume_step)
    return live


def truncate_history(live_dir: Path, last_step: int) -> None:
    """Drop DVCLive rows logged after `last_step` (a killed run logged steps its checkpoint does not hold)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        column = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > column and int(r[column]) <= last_step]
        with tsv.open("w", newline="") as handle:
            csv.writer(handle, delimiter="\t", lineterminator="\n").writerows(kept)


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line for the console at the end of a run."""
    minutes, seconds = divmod(round(float(summary["seconds"])), 60)
    resumed = f", resumed at step {summary['start_step']}" if summary["start_step"] else ""
    loss = summary.get("final_loss")
    loss_text = f"final loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "no step run"
    task = ", inpainting" if summary.get("task") == "inpaint" else ""
    return (f"train: {summary['steps']} steps ({summary['size']}{task}, {summary['num_processes']} process(es)"
            f"{resumed}) in {minutes}m{seconds:02d}s, {summary['samples_per_s']:.2f} samples/s, {loss_text} "
            f"-> {summary['output_dir']}")
