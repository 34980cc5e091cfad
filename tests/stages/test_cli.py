"""The `text2earth` command: help for newcomers, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_stage() -> None:
    out = _cli("--help")
    assert out.returncode == 0 and "harvest" in out.stdout and "dvc repro" in out.stdout


def test_harvest_help_explains_runners() -> None:
    out = _cli("harvest", "--help")
    assert out.returncode == 0
    for text in ("--workers", "DaskRunner", "DataflowRunner", "--dry-run", "resumes"):
        assert text in out.stdout


def test_bad_params_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"harvest": {"sources": str(REPO / "sources.yaml"), "chip_size": 7}}))
    out = _cli("harvest", "--params", str(params))
    assert out.returncode == 2
    assert "harvest.chip_size" in out.stderr and "Traceback" not in out.stderr


def test_dry_run_plans_the_sample(tmp_path: Path) -> None:
    out = _cli("harvest", "--dry-run", "--work-dir", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    assert "shards" in out.stdout and "candidates" in out.stdout
