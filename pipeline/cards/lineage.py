"""Where a release came from: the git commit, every DVC stage's hashes and the params it ran with.

Auditors compare these against a checkout: same commit + same dvc.lock hashes = same data. Everything is
read from files (no clock, no host name), so the cards stay byte-identical for the same inputs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.cards.facts import CardsError

# The stage that writes the cards: its own hashes would make every card depend on the previous card.
SELF_STAGES = ("cards",)


def git_commit(repo_dir: Path) -> str | None:
    """`git rev-parse HEAD` in `repo_dir`; None outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def git_commit_date(repo_dir: Path) -> str | None:
    """Committer date (YYYY-MM-DD) of HEAD: the release date the Croissant file states, stable per commit."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    date = out.stdout.strip()
    return date if out.returncode == 0 and date else None


def package_version() -> str:
    """The installed text2earth version (the dataset's version follows the code that built it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("text2earth")
    except PackageNotFoundError:
        return "0.0.0"


def _entries(items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """dvc.lock deps/outs as sorted {path, md5, size, nfiles} records (keys absent in the lock are left out)."""
    keep = ("path", "md5", "size", "nfiles")
    return sorted(({k: item[k] for k in keep if k in item} for item in items or []), key=lambda e: e["path"])


def read_dvc_lock(dvc_lock: Path) -> dict[str, dict[str, Any]]:
    """Every stage of dvc.lock: its command, dependency and output hashes, and params; {} when absent."""
    if not dvc_lock.exists():
        return {}
    try:
        lock = yaml.safe_load(dvc_lock.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CardsError(f"{dvc_lock} is not valid YAML ({exc}); run `dvc repro` to rewrite it") from exc
    stages: dict[str, dict[str, Any]] = {}
    for name, stage in sorted((lock.get("stages") or {}).items()):
        if name in SELF_STAGES:
            continue
        stages[name] = {"cmd": stage.get("cmd"), "deps": _entries(stage.get("deps")),
                        "outs": _entries(stage.get("outs")), "params": stage.get("params") or {}}
    return stages


def read_params(params_path: Path) -> dict[str, Any]:
    """params.yaml as a dict (a missing file is an error: the cards quote its caption and filter sections)."""
    if not params_path.exists():
        raise CardsError(f"params file {params_path} not found; pass --params")
    params = yaml.safe_load(params_path.read_text()) or {}
    if not isinstance(params, dict):
        raise CardsError(f"{params_path} must be a mapping of sections, got {type(params).__name__}")
    return params


def gather_lineage(params_path: Path, dvc_lock: Path, repo_dir: Path | None = None) -> dict[str, Any]:
    """The lineage record the README, the Croissant file and the site print.

    Keys: `commit` (git HEAD, or None), `commit_date`, `version` (of text2earth), `dvc_lock`
    ({stage: {cmd, deps, outs, params}}, every stage but
    `cards`), `dvc_lock_path`, `params` (the whole params.yaml) and `params_file`.
    """
    repo = repo_dir or params_path.resolve().parent
    return {"commit": git_commit(repo), "commit_date": git_commit_date(repo), "version": package_version(),
            "dvc_lock": read_dvc_lock(dvc_lock), "dvc_lock_path": str(dvc_lock),
            "params": read_params(params_path), "params_file": str(params_path)}
