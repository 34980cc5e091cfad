"""Count what a harvest wrote and dropped, per source and reason, straight from its Parquet files."""

from __future__ import annotations

from typing import Any

import duckdb

from pipeline import storage


def _connect(output_dir: str) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A DuckDB connection that can read `output_dir` (fsspec-backed when it is remote)."""
    con = duckdb.connect()
    if storage.is_local(output_dir):
        return con, output_dir
    fs, _ = storage.filesystem(output_dir)
    con.register_filesystem(fs)
    return con, output_dir


def _grouped(con: duckdb.DuckDBPyConnection, pattern: str, select: str, group: str) -> list[tuple[Any, ...]]:
    return con.execute(f"SELECT {select}, count(*) FROM read_parquet(?) GROUP BY {group} ORDER BY {group}",
                       [pattern]).fetchall()


def summarize(output_dir: str, candidates: int) -> dict[str, Any]:
    """Totals, per-source written/rejected and per-reason counts (deterministic: no timings)."""
    con, base = _connect(output_dir)
    has_meta = bool(storage.list_files(storage.join(output_dir, "metadata"), ".parquet"))
    has_rej = bool(storage.list_files(storage.join(output_dir, "rejected"), ".parquet"))
    written = _grouped(con, storage.join(base, "metadata", "*.parquet"), "source", "source") if has_meta else []
    rejected = (_grouped(con, storage.join(base, "rejected", "*.parquet"), "source, reason", "source, reason")
                if has_rej else [])
    shards = len(storage.list_files(storage.join(output_dir, "shards"), ".tar"))
    by_source: dict[str, dict[str, Any]] = {}
    for source, n in written:
        by_source.setdefault(source, {"written": 0, "rejected": 0, "reasons": {}})["written"] = n
    by_reason: dict[str, int] = {}
    for source, reason, n in rejected:
        entry = by_source.setdefault(source, {"written": 0, "rejected": 0, "reasons": {}})
        entry["rejected"] += n
        entry["reasons"][reason] = n
        by_reason[reason] = by_reason.get(reason, 0) + n
    total_written = sum(v["written"] for v in by_source.values())
    total_rejected = sum(by_reason.values())
    return {"candidates": candidates, "written": total_written, "rejected": total_rejected,
            "shards": shards, "by_reason": dict(sorted(by_reason.items())),
            "by_source": dict(sorted(by_source.items()))}


def summary_line(summary: dict[str, Any], output_dir: str) -> str:
    """One human line: what was written where, what was dropped and why, how fast."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_reason"].items(), key=lambda kv: -kv[1]))
    rate = summary["candidates"] / summary["seconds"] if summary.get("seconds") else 0.0
    resumed = summary.get("shards_resumed", 0)
    kept = f"; {resumed} of {summary.get('shard_tasks', '?')} shard tasks were already done (kept)" if resumed else ""
    return (f"harvest: {summary['written']} chips in {summary['shards']} shards in {output_dir}; "
            f"rejected {summary['rejected']} ({reasons or 'none'}); {summary['candidates']} candidates in "
            f"{summary.get('seconds', 0):.1f} s ({rate:.1f}/s){kept}")
