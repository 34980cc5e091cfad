"""The Hugging Face card and the Croissant file: complete, generated from the data, valid and reproducible."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cards.build import build_cards
from pipeline.cards.facts import CardsError, read_checksums
from pipeline.cards.hf_card import size_category
from pipeline.publish.query import connect

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("## Dataset description", "## Dataset structure", "### Columns", "## Sources, licenses and attribution",
            "## Collection and curation process", "### Filtering funnel", "## Captioning method",
            "## Known biases and limitations", "## Personal and sensitive information", "## Intended uses",
            "## Out-of-scope uses", "## Provenance", "## Citation")


@pytest.fixture
def published(published: str, tmp_path: Path) -> str:
    """A private copy of the published sample (some tests change or add files in it)."""
    target = tmp_path / "git10m"
    shutil.copytree(published, target)
    return str(target)


def build(published: str, out: Path) -> dict[str, Any]:
    """Cards for `published` into `out`, with the repository's params and dvc.lock, without the site."""
    return build_cards(published, out, REPO / "params.yaml", REPO / "dvc.lock", site=False)


def front_matter(readme: str) -> dict[str, Any]:
    """The YAML header between the first two `---` lines."""
    assert readme.startswith("---\n")
    header, _ = readme[4:].split("\n---\n", 1)
    return dict(yaml.safe_load(header))


def scalar(con: Any, sql: str) -> Any:
    return con.execute(sql).fetchone()[0]


def test_header_parses_as_yaml_with_the_hub_keys(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "cards")
    header = front_matter((tmp_path / "cards" / "README.md").read_text())
    con = connect(published)
    sources = [r[0] for r in con.execute("SELECT DISTINCT source FROM samples ORDER BY 1").fetchall()]
    assert header["license"] == "other" and header["license_name"] and header["license_link"]  # mixed terms
    assert header["language"] == ["en"]
    assert header["task_categories"] == ["text-to-image", "image-to-text"]
    assert header["size_categories"] == [size_category(scalar(con, "SELECT count(*) FROM samples"))]
    assert header["source_datasets"] == sources
    assert header["annotations_creators"] == ["found", "machine-generated"]  # source + template captions
    assert {"remote-sensing", "satellite-imagery", "geospatial"} <= set(header["tags"])
    assert header["pretty_name"]
    configs = {c["config_name"]: c["data_files"] for c in header["configs"]}
    assert configs == {"shards": "shards/*.tar", "metadata": "metadata/**/*.parquet"}


def test_size_categories_follow_the_hub_buckets() -> None:
    assert [size_category(n) for n in (0, 999, 1_000, 99_999, 999_999, 10_482_133, 100_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "10M<n<100M", "100M<n<1B"]


def test_readme_numbers_equal_duckdb_counts(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "cards")
    readme = (tmp_path / "cards" / "README.md").read_text()
    for section in SECTIONS:
        assert f"\n{section}\n" in readme, section
    con = connect(published)
    total = scalar(con, "SELECT count(*) FROM samples")
    assert f"{total:,} remote-sensing image-text pairs" in readme
    for source, lic, n in con.execute("SELECT source, license, count(*) FROM samples GROUP BY ALL").fetchall():
        assert f"| `{source}` | {lic} |" in readme and f"| {n:,} | {100 * n / total:.1f} % |" in readme
    for step, stage, n_in, kept, added, dropped in con.execute(
            'SELECT step, stage, sum("in"), sum(kept), sum(added), sum(dropped) FROM funnel GROUP BY ALL').fetchall():
        assert f"| {step} | `{stage}` | {n_in:,} | {kept:,} | {added:,} | {dropped:,} |" in readme
    for column, fmt in (("caption_source", "| `{}` | {:,} |"), ("split", "| `{}` | {:,} |"),
                        ("level", "| {} | "), ("continent", "| {} | {:,} |")):
        for value, n in con.execute(f"SELECT {column}, count(*) FROM samples WHERE {column} IS NOT NULL "
                                    "GROUP BY 1").fetchall():
            assert fmt.format(value, n) in readme, (column, value)
    for stage, reason, n in con.execute("SELECT stage, reason, count(*) FROM rejected GROUP BY ALL").fetchall():
        assert f"| `{stage}` | `{reason}` | {n:,} |" in readme
    # The prototype was scored by a random-weight CLIP: the card must say the scores mean nothing.
    model = scalar(con, "SELECT any_value(clip_model) FROM samples")
    assert "random-init" in model and f"comes from `{model}`, a CLIP model with random weights" in readme
    assert "@article{liu2025text2earth" in readme
    for attribution in (r[0] for r in con.execute("SELECT DISTINCT attribution FROM samples").fetchall()):
        assert attribution in readme


def test_schema_table_covers_every_column_and_level(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "cards")
    readme = (tmp_path / "cards" / "README.md").read_text()
    columns = [r[0] for r in connect(published).execute("DESCRIBE samples").fetchall()]
    assert "level" in columns
    for column in columns:
        assert f"| `{column}` | `" in readme, column


def test_croissant_lists_every_checksummed_file_with_its_sha256(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "cards")
    doc = json.loads((tmp_path / "cards" / "croissant.json").read_text())
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    assert doc["@context"]["rai"] == "http://mlcommons.org/croissant/RAI/"
    objects = {d["@id"]: d for d in doc["distribution"] if d["@type"] == "cr:FileObject"}
    sums = read_checksums(published)
    assert {k: v["sha256"] for k, v in objects.items()} == sums
    for path, obj in objects.items():
        assert obj["contentUrl"] == path and not path.startswith("/")
        assert obj["encodingFormat"] == ("application/x-tar" if path.endswith(".tar") else "application/x-parquet")
        assert obj["contentSize"] == f"{(Path(published) / path).stat().st_size} B"
    for key in ("rai:dataCollection", "rai:dataCollectionType", "rai:dataPreprocessingProtocol",
                "rai:dataAnnotationProtocol", "rai:dataBiases", "rai:dataLimitations",
                "rai:personalSensitiveInformation", "rai:dataUseCases", "rai:dataSocialImpact", "rai:hasSyntheticData"):
        assert doc[key], key
    fields = {f["name"]: f for f in doc["recordSet"][0]["field"]}
    assert fields["gsd_m"]["dataType"] == "sc:Float" and fields["width"]["dataType"] == "sc:Integer"
    assert fields["captions"]["isArray"] is True and "geometry" not in fields


def test_mlcroissant_validate_cli_passes(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "cards")
    cli = Path(sys.executable).parent / "mlcroissant"
    result = subprocess.run([str(cli), "validate", "--jsonld", str(tmp_path / "cards" / "croissant.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _plain(value: Any) -> Any:
    """mlcroissant yields text as bytes; DuckDB as str."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_mlcroissant_records_equal_duckdb_rows(published: str, tmp_path: Path) -> None:
    import mlcroissant as mlc

    build(published, tmp_path / "cards")
    # contentUrl and includes are relative to the release root, where croissant.json is published.
    jsonld = Path(published) / "croissant.json"
    shutil.copy(tmp_path / "cards" / "croissant.json", jsonld)
    records = {_plain(r["samples/key"]): {k.removeprefix("samples/"): _plain(v) for k, v in r.items()}
               for r in mlc.Dataset(jsonld=str(jsonld)).records(record_set="samples")}
    con = connect(published)
    columns = sorted(next(iter(records.values())))
    rows = con.execute(f"SELECT {', '.join(columns)} FROM samples").fetchall()
    expected = {row[columns.index("key")]: dict(zip(columns, row, strict=True)) for row in rows}
    assert len(records) == len(expected) == scalar(con, "SELECT count(*) FROM samples")
    assert records == expected


def test_mlcroissant_reads_the_images_from_the_shards(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "cards")
    jsonld = Path(published) / "croissant.json"
    shutil.copy(tmp_path / "cards" / "croissant.json", jsonld)
    script = ("import sys, mlcroissant as mlc\n"
              "rows = mlc.Dataset(jsonld=sys.argv[1]).records(record_set='images')\n"
              "print('\\n'.join(sorted(r['images/key'].decode() + ' ' + str(r['images/image'].size) for r in rows)))")
    env = {**os.environ, "CROISSANT_CACHE": str(tmp_path / "croissant-cache")}  # tars are extracted here
    result = subprocess.run([sys.executable, "-c", script, str(jsonld)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    keys = [r[0] for r in connect(published).execute("SELECT key FROM samples ORDER BY key").fetchall()]
    assert result.stdout.split("\n")[:-1] == [f"{k} (256, 256)" for k in keys]


def test_same_inputs_give_byte_identical_cards(published: str, tmp_path: Path) -> None:
    build(published, tmp_path / "a")
    build(published, tmp_path / "b")
    for name in ("README.md", "croissant.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_modified_release_is_refused(published: str, tmp_path: Path) -> None:
    tar = sorted((Path(published) / "shards").glob("*.tar"))[0]
    whole = tar.read_bytes()
    with tar.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CardsError, match=r"differs from checksums\.sha256"):
        build(published, tmp_path / "cards")
    tar.write_bytes(whole)  # the tar is whole again, but a file is unlisted
    shutil.copy(Path(published) / "funnel.parquet", Path(published) / "rejected" / "extra.parquet")
    with pytest.raises(CardsError, match=r"checksums\.sha256 does not match the files"):
        build(published, tmp_path / "cards")
    assert not (tmp_path / "cards").exists()


def test_an_invalid_croissant_document_is_refused() -> None:
    from pipeline.cards.croissant import CONFORMS_TO, CONTEXT, validate_croissant

    broken = {"@context": CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO, "name": "x",
              "distribution": [], "recordSet": [{"@type": "cr:RecordSet", "@id": "r", "name": "r", "field": [
                  {"@type": "cr:Field", "@id": "r/a", "name": "a", "dataType": "sc:Text",
                   "source": {"fileSet": {"@id": "missing"}, "extract": {"column": "a"}}}]}]}
    with pytest.raises(CardsError, match="does not validate with mlcroissant"):
        validate_croissant(broken)


def cards_parser() -> argparse.ArgumentParser:
    from stages import cards

    parser = argparse.ArgumentParser(prog="text2earth")
    cards.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cards_help_explains_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cards_parser().parse_args(["cards", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("README.md", "croissant.json", "--dir", "--out", "--params", "--no-site", "data_cards"):
        assert words in text


def test_cards_command_writes_and_summarises(published: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cards"
    args = cards_parser().parse_args(["cards", "--dir", published, "--out", str(out), "--no-site",
                                      "--params", str(REPO / "params.yaml"), "--dvc-lock", str(REPO / "dvc.lock")])
    assert args.run(args, []) == 0
    line = capsys.readouterr().out.strip()
    total = scalar(connect(published), "SELECT count(*) FROM samples")
    assert line.startswith(f"cards: {total:,} samples from {published} -> {out}/README.md, {out}/croissant.json")
    assert (out / "README.md").exists() and (out / "croissant.json").exists()
