"""Build every data card of a release: README.md (Hugging Face), croissant.json and the static site.

The one entry point behind `text2earth cards`: facts are aggregated once, the Croissant document is
validated before anything is written, and each file appears whole (written to a temp name, then renamed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.cards.croissant import build_croissant, dumps, validate_croissant
from pipeline.cards.facts import gather_facts
from pipeline.cards.hf_card import render_readme
from pipeline.cards.lineage import gather_lineage

log = logging.getLogger("text2earth.cards")


def _write(path: Path, text: str) -> Path:
    """Write `text` atomically (no half-written card if the build is interrupted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def build_cards(git10m_dir: str, out_dir: Path, params_path: Path, dvc_lock: Path, site: bool = True,
                verify_sha256: bool = True) -> dict[str, Any]:
    """Write `out_dir/README.md`, `out_dir/croissant.json` and (if `site`) `out_dir/site/`.

    `git10m_dir` is the published release (local path or fsspec URL); `verify_sha256` re-hashes every tar
    and Parquet file against checksums.sha256 (off only to save time on a release you just published).
    Returns {"samples", "files" (paths written), "croissant_warnings"}.
    """
    facts = gather_facts(git10m_dir, verify_sha256=verify_sha256)
    lineage = gather_lineage(params_path, dvc_lock)
    readme = render_readme(facts, lineage)
    doc = build_croissant(facts, lineage)
    warnings = validate_croissant(doc)
    for warning in warnings:
        log.warning("croissant: %s", warning)
    files = [_write(out_dir / "README.md", readme), _write(out_dir / "croissant.json", dumps(doc))]
    if site:
        from pipeline.cards.site import build_site

        files += build_site(git10m_dir, out_dir / "site", lineage, lineage["params"].get("filter") or {})
    return {"samples": facts.samples, "files": [str(f) for f in files], "croissant_warnings": warnings}
