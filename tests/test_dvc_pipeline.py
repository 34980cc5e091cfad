"""The DVC graph: `dvc repro` runs harvest, every curation stage, publish, cards, train, train_inpaint and
evaluate; a changed CLIP threshold re-runs only the filter and what follows it (a real run: the change travels
through the outputs); a publish or train setting touches no stage before publish or train (`dvc repro --dry`,
which lists the stages whose own dependencies changed, without running them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLIP_TINY, REPO


def _repro(cwd: Path, *, dry: bool = False) -> list[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "dvc"), "repro"] + (["--dry"] if dry else [])
    out = subprocess.run(command, cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.findall(r"Running stage '(\w+)'", out.stdout)


def _after_publish(ran: list[str], cards: bool = True) -> bool:
    """cards, train, train_inpaint and evaluate, the last two after train (cards may run anywhere among them)."""
    expected = sorted(["evaluate", "train", "train_inpaint"] + (["cards"] if cards else []))
    return sorted(ran) == expected and ran.index("train") < min(ran.index("evaluate"), ran.index("train_inpaint"))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the whole pipeline, a no-op, everything from the filter on (~5 min on 2 free cores)
def test_repro_runs_every_stage_and_a_change_reruns_only_what_follows_it(tmp_path: Path) -> None:
    work = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (REPO / name).is_file() and not name.startswith(("data/curation/", "data/curated/", "data/git10m/",
                                                              "data_cards/", "metrics/", "dvclive/")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    (work / "dvc.lock").unlink()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["clip"].update({"model": "clip-tiny-test", "model_config_path": str(CLIP_TINY), "batch_size": 8,
                           "cache_dir": str(tmp_path / "cache")})
    params["train"].update({"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "validation_steps": 2,
                            "validation_prompts": ["a river"], "validation_levels": [15]})
    params["train"]["inpaint"]["max_steps"] = 2
    params["evaluate"].update({"steps": 2, "images_per_caption": 1, "images_per_level": 1, "max_chips_per_level": 5,
                               "clip_model": "clip-tiny-test", "clip_model_config_path": str(CLIP_TINY),
                               "classifier": {"epochs": 1, "image_size": 32}, "cache_dir": str(tmp_path / "eval"),
                               "level_classifier": {"epochs": 1, "image_size": 32}, "device": "cpu"})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    curation = ["harvest", "geo", "caption", "clip", "filter", "dedup", "curate", "publish"]
    ran = _repro(work)
    assert ran[:len(curation)] == curation and _after_publish(ran[len(curation):])
    assert (work / "data" / "git10m" / "checksums.sha256").exists()
    assert (work / "data_cards" / "croissant.json").exists() and (work / "data_cards" / "site" / "index.html").exists()
    assert (work / "models" / "text2earth" / "model_index.json").exists()
    assert (work / "models" / "text2earth-inpaint" / "model_index.json").exists()
    assert (work / "metrics" / "train_samples.png").exists() and (work / "dvclive" / "metrics.json").exists()
    report = json.loads((work / "metrics" / "eval.json").read_text())
    assert all(report[m]["extractor"] for m in ("fid", "kid", "cls_oa", "clip_score", "cmmd", "level_accuracy"))
    assert _repro(work) == []
    params["filter"]["top_percent"] = 50
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _repro(work)
    assert ran[:4] == ["filter", "dedup", "curate", "publish"] and _after_publish(ran[4:])
    baseline = yaml.safe_dump(params, sort_keys=False)

    def changed(section: str, key: str, value: object) -> list[str]:
        """Stages whose own dependencies one params change touches (the change is undone afterwards)."""
        edited = yaml.safe_load(baseline)
        edited[section][key] = value
        (work / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
        try:
            return _repro(work, dry=True)
        finally:
            (work / "params.yaml").write_text(baseline)

    # cards quote params.yaml, so they follow any change
    assert sorted(changed("publish", "samples_per_shard", 16)) == ["cards", "publish"]
    assert sorted(changed("train", "learning_rate", 0.001)) == ["cards", "train", "train_inpaint"]
    assert _repro(work, dry=True) == []
