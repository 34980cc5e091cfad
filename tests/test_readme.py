"""The README is part of the product: its DuckDB queries run as written and print what it shows.

Each ```sql block in the README is followed by a ```text block with its result. Set UPDATE_README=1
to rewrite those result blocks after a deliberate change to the sample or the harvest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from pipeline.params import SOURCE_MODELS, HarvestParams
from pipeline.schema import HARVEST_COLUMNS, REJECT_REASONS, REJECTED_COLUMNS, markdown_table, reasons_table
from tests.conftest import REPO

README = REPO / "README.md"
QUERY = re.compile(r"```sql\n(?P<sql>.*?)```\n+```text\n(?P<out>.*?)```", re.S)


def render(relation: duckdb.DuckDBPyRelation) -> str:
    """Rows as `a | b | c` lines under a header: stable, readable, diffable."""
    lines = [" | ".join(relation.columns)]
    lines += [" | ".join("NULL" if v is None else str(v) for v in row) for row in relation.fetchall()]
    return "\n".join(lines) + "\n"


def test_readme_duckdb_queries_return_what_it_shows(sample_harvest: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "harvest").symlink_to(sample_harvest)
    text = README.read_text()
    matches = list(QUERY.finditer(text))
    assert len(matches) >= 3
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the queries use the relative path data/harvest/, as a user types them
    try:
        results = [render(duckdb.sql(m["sql"])) for m in matches]
    finally:
        os.chdir(cwd)
    if os.environ.get("UPDATE_README"):
        for m, result in reversed(list(zip(matches, results, strict=True))):
            text = text[: m.start("out")] + result + text[m.end("out"):]
        README.write_text(text)
    for m, result in zip(matches, results, strict=True):
        assert result == m["out"], f"README query gives a different result:\n{m['sql']}\n{result}"


def test_readme_documents_every_column_param_reason_and_source_kind() -> None:
    text = README.read_text()
    # the tables are generated from pipeline.schema: the README must carry them verbatim
    assert markdown_table(HARVEST_COLUMNS) in text
    assert markdown_table(REJECTED_COLUMNS) in text
    assert reasons_table() in text
    for col in HARVEST_COLUMNS + REJECTED_COLUMNS:
        assert f"`{col.name}`" in text, col.name
    for name in HarvestParams.model_fields:
        assert f"`{name}`" in text, name
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in text, reason
    for kind in SOURCE_MODELS:
        assert f"`{kind}`" in text, kind
