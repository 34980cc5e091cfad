"""`text2earth geo|caption|clip|filter|dedup|curate`: the DVC curation stages (parse params, run the job)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("text2earth.curation")


@dataclass(frozen=True)
class StageSpec:
    """How a stage is presented and run."""

    name: str
    module: str  # pipeline.curation.<module> with a `build(tasks, ctx)` function
    help: str
    description: str
    global_inputs: bool = False  # every output shard depends on every input shard
    subs: tuple[str, ...] = ("metadata", "rejected")


_COMMON = """
Reads the previous stage's metadata (images stay in the harvest shards) and writes metadata/ and
rejected/ Parquet files per harvest shard. Re-running resumes: shards already written with the same
inputs, params and code are kept. Options this command does not know go to Apache Beam (--runner ...).
"""

SPECS = (
    StageSpec("geo", "annotate", "country, continent and H3 cell of every chip (DVC stage `geo`)",
              "Annotate every chip centre with its country (ISO3 + name), continent and H3 cell from the\n"
              "Natural Earth 1:50m boundaries in data/boundaries (offline; points at sea get the nearest\n"
              "country within geo.max_sea_km)." + _COMMON),
    StageSpec("caption", "caption", "caption every chip: source sentences, templates or a VLM (DVC `caption`)",
              "Give every chip a caption with the captioner its source is assigned in params.yaml\n"
              "(caption.default / caption.per_source): `source` keeps the dataset's sentences, `template`\n"
              "describes the metadata, `vlm` asks an OpenAI-compatible endpoint (caption.vlm; the API key\n"
              "comes from the environment variable caption.vlm.api_key_env and is never written anywhere)."
              + _COMMON),
    StageSpec("clip", "clip", "CLIP-score every image-caption pair with open_clip (DVC stage `clip`)",
              "Embed images and captions with the open_clip model in params.yaml (clip.model, clip.pretrained:\n"
              "a tag, an hf-hub id or a local checkpoint) through Beam RunInference, and write clip_score,\n"
              "clip_model and float16 image embeddings + perceptual hashes (embeddings/). Embeddings are\n"
              "cached by sha256 + model in clip.cache_dir, so re-runs compute nothing twice." + _COMMON,
              subs=("metadata", "rejected", "embeddings")),
    StageSpec("filter", "filter", "keep pairs whose CLIP score passes the params' rules (DVC stage `filter`)",
              "Drop pairs below filter.min_score and/or outside the top filter.top_percent of their\n"
              "(source, level) group." + _COMMON, global_inputs=True),
    StageSpec("dedup", "dedup_job", "remove exact and near-duplicate images (DVC stage `dedup`)",
              "Remove exact copies (same sha256) and near copies (perceptual hash + CLIP cosine, same H3\n"
              "cell and place); each dropped row names the kept copy in `duplicate_of`." + _COMMON,
              global_inputs=True),
    StageSpec("curate", "curate", "balance over the globe and assemble data/curated (DVC stage `curate`)",
              "Cap samples per (H3 cell, level) at curate.max_per_cell, then write data/curated/: metadata/,\n"
              "rejected/ (every row any curation stage dropped, with its stage and reason) and the funnel\n"
              "(funnel.parquet, funnel.json: per stage and source, rows in, kept and dropped by reason)."
              + _COMMON, global_inputs=True),
)


def add_parsers(subparsers: Any) -> None:
    """Register one subcommand per curation stage."""
    for spec in SPECS:
        p = subparsers.add_parser(spec.name, help=spec.help, description=spec.description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--params", type=Path, default=Path("params.yaml"),
                       help="params file (default: %(default)s)")
        p.add_argument("--workers", type=int, help="local worker processes for FnApiRunner "
                       "(default: curation.workers)")
        p.add_argument("--metrics", type=Path, default=Path(f"metrics/{spec.name}.json"),
                       help="where to write the counts for `dvc metrics show` (default: %(default)s)")
        if spec.name == "curate":
            p.add_argument("--preview", type=Path, default=Path("metrics/curate_preview.png"),
                           help="world map of curated samples + funnel chart, for `dvc plots show` "
                           "(default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(run=run, spec=spec)


def preflight(stage: str, params: Any) -> None:
    """Check in the driver what would otherwise fail inside every Beam worker (with a traceback)."""
    if stage == "clip":
        from pipeline.curation.clip_model import check_model

        check_model(params)
    if stage == "caption" and params.vlm is not None and (
            params.default == "vlm" or "vlm" in params.per_source.values()):
        from pipeline.curation.vlm import VlmCaptioner

        VlmCaptioner(params.vlm, None).close()  # raises when the API key variable is missing


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    """Run one curation stage."""
    from pipeline.curation.job import run_stage, summary_line
    from pipeline.curation.params import load_curation_params

    spec: StageSpec = args.spec
    common, params = load_curation_params(args.params, spec.name, {"workers": args.workers})
    preflight(spec.name, params)
    build = importlib.import_module(f"pipeline.curation.{spec.module}").build
    summary = run_stage(spec.name, common, params, build, beam_args, progress=not args.no_progress,
                        global_inputs=spec.global_inputs, subs=spec.subs)
    extra = ""
    if spec.name == "curate":
        from pipeline.curation.curate import funnel, write_funnel
        from pipeline.curation.params import STAGES
        from pipeline.curation.preview import write_curation_preview

        rows = funnel(common.harvest_dir, {s: common.stage_dir(s) for s in STAGES}, common.output_dir)
        write_funnel(rows, common.output_dir)
        write_curation_preview(common.output_dir, rows, args.preview)
        harvested = sum(r["kept"] for r in rows if r["stage"] == "harvest")
        final = sum(r["kept"] + r["added"] for r in rows if r["stage"] == "curate")
        extra = (f"; {final} of {harvested} harvested chips curated; funnel: {common.output_dir}/funnel.json; "
                 f"preview: {args.preview}")
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in summary.items() if k not in ("seconds", "shards_resumed")}
    args.metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(summary_line(summary, common.stage_dir(spec.name)) + extra)
    return 0
