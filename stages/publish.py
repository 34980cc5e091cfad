"""`text2earth publish` (DVC stage `publish`) and `text2earth query` (DuckDB over the published metadata)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import Text2EarthError

PUBLISH_DESCRIPTION = """\
Publish the curated dataset to data/git10m/ (publish.dir):

  shards/git10m-000000.tar ...   WebDataset: {key}.jpg|png, {key}.txt (caption), {key}.json (metadata row)
  shards/sizes.json              samples per shard (open_clip and webdataset loaders read it)
  metadata/level=L/part-0.parquet  GeoParquet, one Hive partition per resolution level, sorted by place
  rejected/part-0.parquet        every candidate any stage dropped, with stage and reason
  funnel.parquet, funnel.json    rows in / kept / dropped per stage and source
  checksums.sha256               `sha256sum -c` over every tar and Parquet file

Each sample gets a train/val/test split by geographic block (publish.split, publish.split_h3_resolution).
Re-running resumes: shards already written with the same inputs, params and code are kept, and the
output is byte-identical. Options this command does not know go to Apache Beam (--runner ...).
"""

QUERY_DESCRIPTION = """\
Run SQL (DuckDB) over the published dataset. Views:

  samples   the published metadata (one row per sample; `level` from the Hive partition)
  rejected  every candidate a stage dropped: stage, reason, detail, duplicate_of
  funnel    rows in / kept / dropped per stage and source

examples:
  text2earth query "SELECT continent, count(*) AS n FROM samples GROUP BY 1 ORDER BY n DESC"
  text2earth query "SELECT stage, reason, count(*) FROM rejected GROUP BY ALL" --format csv
  text2earth query "SELECT * FROM samples WHERE level = 17" --format parquet --out level17.parquet
"""


def add_parsers(subparsers: Any) -> None:
    """Register `publish` and `query`."""
    p = subparsers.add_parser("publish", help="write the final shards, metadata and checksums (DVC `publish`)",
                              description=PUBLISH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    p.add_argument("--workers", type=int, help="local worker processes for FnApiRunner (default: publish.workers)")
    p.add_argument("--metrics", type=Path, default=Path("metrics/publish.json"),
                   help="where to write the counts for `dvc metrics show` (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_publish)

    q = subparsers.add_parser("query", help="SQL over the published metadata, rejected and funnel (DuckDB)",
                              description=QUERY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("sql", help="the query (views: samples, rejected, funnel)")
    q.add_argument("--dir", help="published dataset folder or URL (default: publish.dir from --params)")
    q.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    q.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="output format (default: %(default)s); parquet needs --out")
    q.add_argument("--out", type=Path, help="write to this file instead of standard output")
    q.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default: %(default)s)")
    q.set_defaults(run=run_query)


def run_publish(args: argparse.Namespace, beam_args: list[str]) -> int:
    """Run the publish stage."""
    from pipeline.publish.job import run_publish as publish
    from pipeline.publish.job import summary_line
    from pipeline.publish.params import load_publish_params

    params = load_publish_params(args.params, {"workers": args.workers})
    summary = publish(params, beam_args, progress=not args.no_progress)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in summary.items() if k not in ("seconds", "shards_resumed")}
    args.metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(summary_line(summary, params.dir))
    return 0


def _published_dir(args: argparse.Namespace) -> str:
    if args.dir:
        return str(args.dir)
    if args.params.exists():
        from pipeline.publish.params import load_publish_params

        return load_publish_params(args.params).dir
    return "data/git10m"


def run_query(args: argparse.Namespace, _beam_args: list[str]) -> int:
    """Run one SQL statement over the views and print or save the result."""
    import duckdb

    from pipeline.publish.query import connect

    if args.format == "parquet" and args.out is None:
        raise Text2EarthError("--format parquet writes a file: add --out FILE.parquet")
    try:
        con = connect(_published_dir(args))
    except FileNotFoundError as exc:
        raise Text2EarthError(str(exc)) from exc
    try:
        relation = con.sql(args.sql)
    except duckdb.Error as exc:
        raise Text2EarthError(f"the query failed: {exc}\nviews: samples, rejected, funnel "
                              "(`text2earth query \"DESCRIBE samples\"` lists the columns)") from exc
    if relation is None:
        return 0
    if args.format == "parquet":
        relation.write_parquet(str(args.out), compression="zstd")
        print(f"query: wrote {len(relation)} row(s) to {args.out}", file=sys.stderr)
        return 0
    if args.format == "table":
        text = _table(relation, args.max_rows)
    elif args.format == "csv":
        text = relation.df().to_csv(index=False)
    else:
        frame = relation.df()
        text = frame.to_json(orient="records", lines=True, date_format="iso", default_handler=str)
        text = text if text.endswith("\n") or not text else text + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"query: wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _table(relation: Any, max_rows: int) -> str:
    """A plain Markdown-style table (readable in a terminal and pasteable into docs)."""
    names = relation.columns
    rows = relation.limit(max_rows + 1).fetchall()
    shown = rows[:max_rows]
    cells = [[_cell(v) for v in row] for row in shown]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    lines = ["| " + " | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    if len(rows) > max_rows:
        lines.append(f"(first {max_rows} rows; --max-rows or --format csv for more)")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value).replace("\n", " ").replace("|", "\\|")
