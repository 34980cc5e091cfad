"""`text2earth cards` (DVC stage `cards`): the Hugging Face card, the Croissant file and the HTML site."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Write the data cards of the published dataset (data/git10m, from `text2earth publish`) into data_cards/:

  README.md       Hugging Face dataset card: YAML header (licence, tasks, size, configs) and the sections
                  auditors read: sources + licences, curation funnel, captioning, biases, limitations,
                  sensitive information, intended uses, column table, provenance, citation
  croissant.json  MLCommons Croissant 1.1 JSON-LD with a sha256 per file and the responsible-AI fields;
                  validated with mlcroissant before it is written
  site/           static HTML pages with charts and maps (skip with --no-site)

Every number is computed from the published data (DuckDB over the Parquet files); nothing is typed by
hand, and the same inputs give byte-identical files. Every tar and Parquet file is re-hashed against
checksums.sha256 first, so a card never describes a modified release.

examples:
  text2earth cards                              # data/git10m -> data_cards/
  text2earth cards --dir gs://bucket/git10m --out cards_gcs --no-site
  mlcroissant validate --jsonld data_cards/croissant.json
"""


def add_parser(subparsers: Any) -> None:
    """Register the subcommand."""
    p = subparsers.add_parser("cards", help="README.md (Hugging Face), croissant.json and site (DVC `cards`)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="published dataset folder or URL (default: publish.dir from --params, else "
                   "data/git10m)")
    p.add_argument("--out", type=Path, default=Path("data_cards"), help="folder the cards are written to "
                   "(default: %(default)s)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file; its caption, clip, "
                   "filter, dedup and curate sections are quoted in the cards (default: %(default)s)")
    p.add_argument("--dvc-lock", type=Path, default=Path("dvc.lock"), help="dvc.lock whose stage hashes go "
                   "into the provenance section (default: %(default)s; missing = no hashes)")
    p.add_argument("--no-site", action="store_true", help="write README.md and croissant.json only")
    p.add_argument("--no-verify", action="store_true", help="trust checksums.sha256 instead of re-hashing "
                   "every file (faster on a release you have just published)")
    p.set_defaults(run=run)


def published_dir(args: argparse.Namespace) -> str:
    """--dir, else `publish.dir` in the params file, else data/git10m."""
    if args.dir:
        return str(args.dir)
    if args.params.exists():
        from pipeline.cards.lineage import read_params

        section = read_params(args.params).get("publish") or {}
        if section.get("dir"):
            return str(section["dir"])
    return "data/git10m"


def run(args: argparse.Namespace, _beam_args: list[str]) -> int:
    """Build the cards and print one line saying what was written."""
    from pipeline.cards.build import build_cards
    from pipeline.errors import Text2EarthError

    git10m_dir = published_dir(args)
    try:
        summary = build_cards(git10m_dir, args.out, args.params, args.dvc_lock, site=not args.no_site,
                              verify_sha256=not args.no_verify)
    except FileNotFoundError as exc:
        raise Text2EarthError(str(exc)) from exc
    files = summary["files"]
    site = [f for f in files if Path(f).parent != args.out]
    print(f"cards: {summary['samples']:,} samples from {git10m_dir} -> {args.out}/README.md, "
          f"{args.out}/croissant.json" + (f", {len(site)} site file(s) in {args.out}/site" if site else "")
          + (f" ({len(summary['croissant_warnings'])} Croissant warning(s))" if summary["croissant_warnings"]
             else ""))
    return 0
