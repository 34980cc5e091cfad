"""DuckDB over the published dataset: the `samples`, `rejected` and `funnel` views.

`text2earth query`, the README examples, the data cards and the benchmark all open the dataset through
`connect`, so the views are defined once. Paths go through fsspec, so `gs://` and `s3://` work as well.
"""

from __future__ import annotations

import duckdb

from pipeline import storage

VIEWS = ("samples", "rejected", "funnel")


def view_sql(git10m_dir: str) -> dict[str, str]:
    """The SELECT behind each view."""
    meta = storage.join(git10m_dir, "metadata", "**", "*.parquet")
    return {
        "samples": f"SELECT * FROM read_parquet('{meta}', hive_partitioning = true, "
                   "hive_types = {'level': SMALLINT})",
        "rejected": f"SELECT * FROM read_parquet('{storage.join(git10m_dir, 'rejected', '*.parquet')}')",
        "funnel": f"SELECT * FROM read_parquet('{storage.join(git10m_dir, 'funnel.parquet')}')",
    }


def connect(git10m_dir: str, threads: int | None = None, memory_limit: str | None = None
            ) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views over `git10m_dir` (local path or fsspec URL)."""
    if not storage.exists(storage.join(git10m_dir, "funnel.parquet")):
        raise FileNotFoundError(f"no published dataset in {git10m_dir} (funnel.parquet is missing): run "
                                "`text2earth publish` (or `dvc repro publish`) first, or pass --dir")
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if not storage.is_local(git10m_dir):
        con.register_filesystem(storage.filesystem(git10m_dir)[0])
    for name, sql in view_sql(git10m_dir).items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
    return con
