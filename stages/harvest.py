"""`text2earth harvest`: the DVC `harvest` stage (parse params, run `pipeline.harvest`, write metrics)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.params import load_harvest_params

log = logging.getLogger("text2earth.harvest")

DESCRIPTION = """\
Cut every source in the sources file into 256x256 chips with exact GSD and location, and write
WebDataset shards + GeoParquet metadata + a `rejected` table to data/harvest/.

Re-running resumes: shards already written with the same inputs, params and code are kept.
Any option this command does not know is passed to Apache Beam, so the same job runs elsewhere:

  text2earth harvest                                   # params.yaml, FnApiRunner, `workers` processes
  text2earth harvest --workers 2                       # two local worker processes
  text2earth harvest --runner apache_beam.runners.dask.dask_runner.DaskRunner \\
      --dask_client_address 10.0.0.5:8786              # a Dask cluster
  text2earth harvest --runner DataflowRunner --project P --region R --temp_location gs://B/tmp \\
      --output-dir gs://B/harvest --work-dir gs://B/work   # Google Cloud Dataflow
"""


def add_parser(subparsers: Any) -> None:
    """Register the subcommand."""
    p = subparsers.add_parser("harvest", help="cut sources into chips with exact GSD (DVC stage `harvest`)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.add_argument("--sources", help="sources file to use instead of `harvest.sources`")
    p.add_argument("--output-dir", help="output folder or URL (default: harvest.output_dir)")
    p.add_argument("--work-dir", help="folder for plan files (default: harvest.work_dir)")
    p.add_argument("--workers", type=int, help="local worker processes for FnApiRunner")
    p.add_argument("--metrics", type=Path, default=Path("metrics/harvest.json"),
                   help="where to write the counts for `dvc metrics show` (default: %(default)s)")
    p.add_argument("--preview", type=Path, default=Path("metrics/harvest_preview.png"),
                   help="world map + chips per source, for `dvc plots show` (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="plan only: print shard and candidate counts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    """Run the stage."""
    from pipeline import storage
    from pipeline.harvest import run_harvest, write_plan
    from pipeline.plan import code_fingerprint, settings_fingerprint
    from pipeline.summary import summary_line

    overrides = {"sources": args.sources, "output_dir": args.output_dir, "work_dir": args.work_dir,
                 "workers": args.workers}
    params = load_harvest_params(args.params, overrides)
    if args.dry_run:
        storage.remove_tree(storage.join(params.work_dir, "plan"))
        plan = write_plan(params, settings_fingerprint(params, code_fingerprint()))
        print(f"harvest (dry run): {len(plan.candidates)} shards, {plan.total} candidates; plan in "
              f"{params.work_dir}/plan")
        return 0
    summary = run_harvest(params, beam_args, progress=not args.no_progress)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in summary.items() if k not in ("seconds", "shards_resumed")}
    args.metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    from pipeline.preview import write_preview

    write_preview(params.output_dir, args.preview)
    print(summary_line(summary, params.output_dir) + f"; preview: {args.preview}")
    return 0
