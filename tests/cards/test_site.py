"""The data-card site: opens offline in Chromium, shows the dataset's own numbers, rebuilds byte for byte."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import duckdb
import pytest
import yaml

from pipeline.cards.site import PAGES, build_site

REPO = Path(__file__).resolve().parents[2]
BOUNDARIES = REPO / "data" / "boundaries" / "ne_110m_admin_0_countries.geojson"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
LINEAGE = {"commit": "0123456789abcdef0123456789abcdef01234567",
           "dvc_lock": yaml.safe_load((REPO / "dvc.lock").read_text()), "params": PARAMS}


@pytest.fixture(scope="module")
def site(published: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("cards") / "site"
    return out, build_site(published, out, LINEAGE, PARAMS["filter"], BOUNDARIES)


def metadata_sql(published: str) -> str:
    return f"read_parquet('{published}/metadata/**/*.parquet', hive_partitioning = true)"


def test_every_page_loads_offline_with_its_images_and_links(site: tuple[Path, list[Path]]) -> None:
    from playwright.sync_api import sync_playwright

    out, _ = site
    console_errors: list[str] = []
    page_errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            for name, title in PAGES:
                page.goto((out / name).as_uri(), wait_until="load")
                assert page.locator("h1").first.inner_text() == title
                images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), "
                                                          "e.complete && e.naturalWidth > 0])")
                assert [src for src, loaded in images if not loaded] == [], name
                hrefs = page.eval_on_selector_all("a[href], link[href], img[src]",
                                                  "els => els.map(e => e.getAttribute('href') || "
                                                  "e.getAttribute('src'))")
                ids = set(page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
                for href in hrefs:
                    if href.startswith("data:"):
                        continue
                    assert not urlparse(href).scheme and not href.startswith("//"), (name, href)
                    path, _, fragment = href.partition("#")
                    if path:
                        assert (out / name).parent.joinpath(unquote(path)).is_file(), (name, href)
                    elif fragment:
                        assert fragment in ids, (name, href)
        finally:
            browser.close()
    assert console_errors == []
    assert page_errors == []
    assert requests and [u for u in requests if not u.startswith(("file://", "data:"))] == []
    assert len([u for u in requests if u.endswith(".html")]) == len(PAGES)


def test_index_numbers_are_duckdb_counts_over_the_metadata(published: str, site: tuple[Path, list[Path]]) -> None:
    out, _ = site
    html = (out / "index.html").read_text()
    shown = {m[0]: (int(m[1]), m[2].strip()) for m in
             re.findall(r'data-metric="([^"]+)" data-value="(\d+)"[^>]*>([^<]*)<', html)}
    con = duckdb.connect()
    samples, sources, countries, shards = con.execute(
        "SELECT count(*), count(DISTINCT source), count(DISTINCT country_iso3), count(DISTINCT shard) "
        f"FROM {metadata_sql(published)}").fetchone()
    splits = dict(con.execute(f"SELECT split, count(*) FROM {metadata_sql(published)} GROUP BY split").fetchall())
    listed = [line.split(None, 1)[1] for line in Path(published, "checksums.sha256").read_text().splitlines()]
    expected = {"samples": samples, "sources": sources, "countries": countries, "shards": shards,
                "splits": len(splits), "bytes": sum(Path(published, p).stat().st_size for p in listed)}
    expected |= {f"split:{name}": n for name, n in splits.items()}
    assert {k: v for k, (v, _) in shown.items()} == expected
    assert shards == len(list(Path(published, "shards").glob("*.tar")))
    for key, (value, text) in shown.items():
        if key != "bytes":
            assert text == f"{value:,}", key


def test_clip_thresholds_are_the_lowest_published_score_per_source_and_level(
        published: str, site: tuple[Path, list[Path]]) -> None:
    out, _ = site
    assert PARAMS["filter"]["min_score"] is None  # else the page draws min_score, not per-group cut-offs
    html = (out / "quality.html").read_text()
    shown = {(s, int(lv)): t for s, lv, t in re.findall(
        r'<tr><td><code>([^<]+)</code></td><td class="n">(\d+)</td><td class="n">[\d,]+</td>'
        r'<td class="n">([^<]+)</td>', html)}
    groups = duckdb.connect().execute(f"SELECT source, level, min(clip_score) FROM {metadata_sql(published)} "
                                      "GROUP BY ALL").fetchall()
    assert shown == {(s, lv): f"{m:.4f}" for s, lv, m in groups}


def test_rejected_page_lists_every_stage_and_reason_with_its_count(published: str,
                                                                   site: tuple[Path, list[Path]]) -> None:
    out, _ = site
    html = (out / "rejected.html").read_text()
    counts = duckdb.connect().execute(f"SELECT stage, reason, count(*) FROM '{published}/rejected/*.parquet' "
                                      "GROUP BY ALL").fetchall()
    assert counts
    for stage, reason, n in counts:
        assert re.search(rf'<tr><td>{stage}</td><td><a href="#{stage}-{reason}"><code>{reason}</code></a></td>'
                         rf'<td class="n">{n:,}</td><td>(?!\(not documented)', html), (stage, reason)


def test_schema_page_has_every_published_column_and_the_level_partition(site: tuple[Path, list[Path]]) -> None:
    from pipeline.schema import PUBLISHED_SCHEMA

    out, _ = site
    html = (out / "schema.html").read_text()
    for name in PUBLISHED_SCHEMA.names:
        assert f"<tr><td><code>{name}</code></td>" in html, name
    assert "Hive partition (metadata/level=L/)" in html


def test_building_twice_gives_identical_files(published: str, site: tuple[Path, list[Path]],
                                              tmp_path: Path) -> None:
    out, written = site
    again = build_site(published, tmp_path / "site", LINEAGE, PARAMS["filter"], BOUNDARIES)
    assert [p.relative_to(tmp_path / "site") for p in again] == [p.relative_to(out) for p in written]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == written
    for first, second in zip(written, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
