"""The README is part of the product: its DuckDB queries run as written and print what it shows.

Each ```sql block in the README is followed by a ```text block with its result. Set UPDATE_README=1
to rewrite those result blocks after a deliberate change to the sample or the harvest.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from pipeline.curation.params import STAGE_MODELS, CurationParams
from pipeline.params import SOURCE_MODELS, HarvestParams
from pipeline.schema import (
    CURATION_ADDED_COLUMNS,
    CURATION_REASONS,
    CURATION_REJECTED_COLUMNS,
    HARVEST_COLUMNS,
    REJECT_REASONS,
    REJECTED_COLUMNS,
    markdown_table,
    reasons_table,
)
from tests.conftest import REPO, curate, publish, publish_params

README = REPO / "README.md"
QUERY = re.compile(r"```sql\n(?P<sql>.*?)```\n+```text\n(?P<out>.*?)```", re.S)
VIEWS_SNIPPET = re.compile(r"```python\n(?P<code>import duckdb\n.*?CREATE VIEW.*?)```", re.S)


def render(relation: duckdb.DuckDBPyRelation) -> str:
    """Rows as `a | b | c` lines under a header: stable, readable, diffable."""
    lines = [" | ".join(relation.columns)]
    lines += [" | ".join("NULL" if v is None else str(v) for v in row) for row in relation.fetchall()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def readme_curation(sample_harvest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Curation of the sample with the repo's own params (ViT-B-32, random weights), as `dvc repro` runs it."""
    tmp = tmp_path_factory.mktemp("readme")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["curation"].update({"harvest_dir": str(sample_harvest), "dir": str(tmp / "curation"),
                             "output_dir": str(tmp / "curated"), "work_dir": str(tmp / "work")})
    base["clip"]["cache_dir"] = str(tmp / "cache")
    (tmp / "params.yaml").write_text(yaml.safe_dump(base))
    curate(tmp / "params.yaml")
    return tmp


@pytest.fixture(scope="module")
def readme_published(readme_curation: Path) -> Path:
    """The README's curation published with the repo's publish params."""
    params = publish_params(readme_curation / "params.yaml", readme_curation / "publish")
    publish(params)
    return readme_curation / "publish" / "git10m"


def test_readme_duckdb_queries_return_what_it_shows(sample_harvest: Path, readme_curation: Path,
                                                    readme_published: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from stages.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "harvest").symlink_to(sample_harvest)
    (tmp_path / "data" / "curation").symlink_to(readme_curation / "curation")
    (tmp_path / "data" / "curated").symlink_to(readme_curation / "curated")
    (tmp_path / "data" / "git10m").symlink_to(readme_published)
    text = README.read_text()
    matches = list(QUERY.finditer(text))
    assert len(matches) >= 8
    snippet = VIEWS_SNIPPET.search(text)
    assert snippet, "the README shows how to open the views in plain DuckDB"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the queries use relative paths (data/harvest/, data/git10m/), as a user types them
    try:
        scope: dict = {}
        exec(snippet["code"], scope)  # the README's plain-DuckDB views, as written
        capsys.readouterr()
        con = scope["con"]
        results = [render(con.sql(m["sql"])) for m in matches]
        via_cli = {}
        for m in matches:
            if re.search(r"\bFROM (samples|rejected|funnel)\b", m["sql"]):
                assert main(["query", m["sql"], "--format", "csv", "--dir", "data/git10m"]) == 0
                via_cli[m["sql"]] = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    assert len(via_cli) >= 5
    for m in matches:
        if m["sql"] in via_cli:  # `text2earth query` gives the same rows as plain DuckDB
            cli = pd.read_csv(io.StringIO(via_cli[m["sql"]]))
            os.chdir(tmp_path)
            try:
                direct = con.sql(m["sql"]).df()
            finally:
                os.chdir(cwd)
            cli, direct = (frame.astype(object).where(frame.notna(), None) for frame in (cli, direct))  # NULL: None
            pd.testing.assert_frame_equal(cli, direct, check_dtype=False)
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


def test_readme_documents_every_curation_column_param_and_reason() -> None:
    text = README.read_text()
    assert markdown_table(CURATION_ADDED_COLUMNS) in text
    assert markdown_table(CURATION_REJECTED_COLUMNS) in text
    assert reasons_table(CURATION_REASONS) in text
    for name in CurationParams.model_fields:
        assert f"`curation.{name}`" in text or f"`curation.{name}`," in text or f"`curation.{name}" in text, name
    for section, model in STAGE_MODELS.items():
        for name in model.model_fields:
            assert f"`{section}.{name}`" in text, f"{section}.{name}"
