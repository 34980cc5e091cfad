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


def test_every_curation_stage_has_help() -> None:
    out = _cli("--help")
    for stage in ("geo", "caption", "clip", "filter", "dedup", "curate"):
        assert stage in out.stdout
        sub = _cli(stage, "--help")
        assert sub.returncode == 0 and "--params" in sub.stdout and "resumes" in sub.stdout, stage


def _params_with(tmp_path: Path, section: str, values: dict) -> Path:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base[section] = {**base[section], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_curation_params_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    out = _cli("filter", "--params", str(_params_with(tmp_path, "filter", {"top_percnt": 50})))
    assert out.returncode == 2 and "filter.top_percnt: unknown key (did you mean 'top_percent'?)" in out.stderr
    out = _cli("caption", "--params", str(_params_with(tmp_path, "caption", {"vlm": {"base_url": "http://x/v1",
                                                                                    "model": "m", "modle": 1}})))
    assert out.returncode == 2 and "caption.vlm.modle: unknown key" in out.stderr and "allowed keys" in out.stderr
    out = _cli("caption", "--params", str(_params_with(tmp_path, "caption", {"default": "vlm"})))
    assert out.returncode == 2 and "caption.vlm" in out.stderr and "base_url" in out.stderr
    out = _cli("clip", "--params", str(_params_with(tmp_path, "clip", {"device": "tpu"})))
    assert out.returncode == 2 and "clip.device" in out.stderr and "Traceback" not in out.stderr


def test_unknown_clip_model_names_close_matches(tmp_path: Path) -> None:
    from pipeline.curation.clip_model import load_clip
    from pipeline.curation.params import ClipParams
    from pipeline.errors import ParamsError

    try:
        load_clip(ClipParams(model="ViT-B-23"))
    except ParamsError as exc:
        assert "ViT-B-32" in str(exc) and "clip.model" in str(exc)
    else:
        raise AssertionError("an unknown model name must stop the stage")


def test_missing_vlm_key_and_checkpoint_stop_before_the_job(tmp_path: Path) -> None:
    vlm = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "T2E_SURELY_UNSET_KEY"}
    out = _cli("caption", "--params", str(_params_with(tmp_path, "caption", {"default": "vlm", "vlm": vlm})))
    assert out.returncode == 2 and "export T2E_SURELY_UNSET_KEY" in out.stderr and "Traceback" not in out.stderr
    out = _cli("clip", "--params", str(_params_with(tmp_path, "clip", {"pretrained": "/no/such/remoteclip.pt"})))
    assert out.returncode == 2 and "clip.pretrained" in out.stderr and "Traceback" not in out.stderr
