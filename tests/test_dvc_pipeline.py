"""The DVC graph: `dvc repro` runs harvest, every curation stage, publish and cards; a changed CLIP threshold
re-runs only the filter and what follows it, and a publish setting only publish and cards."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLIP_TINY, REPO


def _repro(cwd: Path) -> list[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.findall(r"Running stage '(\w+)'", out.stdout)


@pytest.mark.slow
def test_repro_runs_every_stage_and_a_change_reruns_only_what_follows_it(tmp_path: Path) -> None:
    work = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (REPO / name).is_file() and not name.startswith(("data/curation/", "data/curated/", "data/git10m/", "data_cards/", "metrics/")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    (work / "dvc.lock").unlink()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["clip"].update({"model": "clip-tiny-test", "model_config_path": str(CLIP_TINY), "batch_size": 8,
                           "cache_dir": str(tmp_path / "cache")})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    everything = ["harvest", "geo", "caption", "clip", "filter", "dedup", "curate", "publish", "cards"]
    assert _repro(work) == everything
    assert (work / "data" / "git10m" / "checksums.sha256").exists()
    assert (work / "data_cards" / "croissant.json").exists() and (work / "data_cards" / "site" / "index.html").exists()
    assert _repro(work) == []
    params["filter"]["top_percent"] = 50
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _repro(work) == ["filter", "dedup", "curate", "publish", "cards"]
    params["publish"]["samples_per_shard"] = 16
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _repro(work) == ["publish", "cards"]
