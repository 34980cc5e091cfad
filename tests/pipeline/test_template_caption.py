"""Template captions: deterministic across processes, varied across keys, clean and grammatical English."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from pipeline.curation.template_caption import (
    _TEMPLATES,
    TEMPLATE_VERSION,
    _template_index,
    gsd_words,
    template_caption,
)
from tests.conftest import REPO

FULL: dict[str, Any] = {
    "key": "naip-m_4007_ne-3-0001-0002",
    "gsd_m": 0.5,
    "sensor": "NAIP",
    "platform": "aircraft",
    "country": "France",
    "continent": "Europe",
    "acquired": "2019-07-14T10:00:00Z",
    "lat": 46.2,
    "scene_class": "denseresidential",
    "source": "naip",
}

RSICD = ["airport", "bareland", "baseballfield", "beach", "bridge", "center", "church", "commercial",
         "denseresidential", "desert", "farmland", "forest", "industrial", "meadow", "mediumresidential", "mountain",
         "park", "parking", "playground", "pond", "port", "railwaystation", "resort", "river", "school",
         "sparseresidential", "square", "stadium", "storagetanks", "viaduct"]
UCM = ["agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential", "forest",
       "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark", "overpass",
       "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt"]
SYDNEY = ["residential", "airport", "meadow", "river", "ocean", "industrial", "runway"]

# Multi-word classes and the words that must appear once split.
SPLIT = {
    "baseballfield": "baseball field", "denseresidential": "dense residential area",
    "mediumresidential": "medium residential area", "railwaystation": "railway station",
    "sparseresidential": "sparse residential area", "storagetanks": "storage tanks",
    "baseballdiamond": "baseball diamond",
    "golfcourse": "golf course", "mobilehomepark": "mobile home park", "parkinglot": "parking lot",
    "tenniscourt": "tennis court", "bareland": "bare land",
}


def _key_for(template: int, prefix: str = "k") -> str:
    """A key whose hash picks the given template."""
    i = 0
    while _template_index(f"{prefix}{i}") != template:
        i += 1
    return f"{prefix}{i}"


def _all_phrasings(row: dict[str, Any]) -> list[str]:
    """The caption of `row` under every template."""
    return [template_caption({**row, "key": _key_for(t)}) for t in range(len(_TEMPLATES))]


def _assert_clean(text: str) -> None:
    assert text == text.strip()
    assert text[0].isupper(), text
    assert text.endswith("."), text
    assert "None" not in text and "nan" not in text.lower().split(), text
    assert "  " not in text, text
    for bad in (" ,", " .", ",,", ",.", ".,", ", .", "..", "()", "( )", " :", ":.", ": ."):
        assert bad not in text, (bad, text)
    sentences = re.findall(r"[.!?](?:\s|$)", text)
    assert 1 <= len(sentences) <= 2, text
    assert not re.search(r"\b(in|of|by|at|the|a|an|showing),?\.", text), text


def _assert_articles(text: str) -> None:
    for article, word in re.findall(r"\b([Aa]n?) ([\w.]+)", text):
        number = re.match(r"\d+", word)
        if number:
            whole = number.group()
            lead = whole[: len(whole) % 3 or 3]
            expected = "an" if lead.startswith("8") or lead in {"11", "18"} else "a"
        else:
            expected = "an" if word[0].lower() in "aeiou" and not word.lower().startswith(("uni", "use", "eu")) else "a"
        assert article.lower() == expected, (article, word, text)


def test_version_is_a_string() -> None:
    assert isinstance(TEMPLATE_VERSION, str) and TEMPLATE_VERSION


def test_same_row_same_caption() -> None:
    assert template_caption(dict(FULL)) == template_caption(dict(FULL))
    assert template_caption(FULL) == template_caption(dict(reversed(list(FULL.items()))))


def test_same_caption_in_fresh_processes_with_different_hash_seeds() -> None:
    rows = [{**FULL, "key": f"chip-{i}"} for i in range(40)]
    expected = [template_caption(r) for r in rows]
    script = (
        "import json, sys\n"
        "from pipeline.curation.template_caption import template_caption\n"
        "print(json.dumps([template_caption(r) for r in json.load(sys.stdin)]))\n"
    )
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps(rows), capture_output=True, text=True,
                              cwd=REPO, env=env, check=True, timeout=120)
        assert json.loads(done.stdout) == expected


def test_keys_spread_over_phrasings() -> None:
    n = 1200
    captions = [template_caption({**FULL, "key": f"source-scene-0-{i:04d}-0000"}) for i in range(n)]
    assert len(_TEMPLATES) >= 4
    counts = Counter(captions)
    assert len(counts) == len(_TEMPLATES)
    assert min(counts.values()) > n / len(_TEMPLATES) / 2
    assert len(set(_all_phrasings(FULL))) == len(_TEMPLATES)


@pytest.mark.parametrize(("gsd", "number", "kind", "noun"), [
    (0.15, "a 0.15 m", "very high", "aerial"),
    (0.5, "a 0.5 m", "very high", "aerial"),
    (1, "a 1 m", "high", "satellite"),
    (1.0, "a 1 m", "high", "satellite"),
    (2.5, "a 2.5 m", "high", "satellite"),
    (8, "an 8 m", "medium", "satellite"),
    (10, "a 10 m", "medium", "satellite"),
    (18, "an 18 m", "medium", "satellite"),
    (30, "a 30 m", "medium", "satellite"),
    (80, "an 80 m", "low", "satellite"),
    (100, "a 100 m", "low", "satellite"),
    (128, "a 128 m", "low", "satellite"),
    (0.123456, "a 0.12 m", "very high", "aerial"),
    (9.96, "a 10 m", "medium", "satellite"),
])
def test_gsd_words(gsd: float, number: str, kind: str, noun: str) -> None:
    words = gsd_words(gsd)
    assert words == f"{number} {noun} image at {kind} resolution"
    assert ".0 " not in words
    caption = template_caption({"key": "k", "gsd_m": gsd})
    assert f"{number} {noun} image" in caption.replace("A ", "a ", 1).replace("An ", "an ", 1)


@pytest.mark.parametrize("gsd", [None, float("nan"), float("inf"), 0, -3, "abc"])
def test_unknown_gsd_omits_number(gsd: Any) -> None:
    assert gsd_words(gsd) == "a remote sensing image"
    for caption in _all_phrasings({"key": "k", "gsd_m": gsd, "scene_class": "forest"}):
        _assert_clean(caption)
        assert not re.search(r"\d", caption), caption
        assert "resolution" not in caption


def test_sensor_decides_aerial_or_satellite() -> None:
    assert "a 0.5 m aerial image" in template_caption({"key": "k", "gsd_m": 0.5}).lower()
    assert "a 0.3 m satellite image" in template_caption({"key": "k", "gsd_m": 0.3, "sensor": "WorldView-3"}).lower()
    assert "a 30 m satellite image" in template_caption({"key": "k", "gsd_m": 30, "sensor": "Landsat 8 OLI"}).lower()
    assert "a 1 m aerial image" in template_caption({"key": "k", "gsd_m": 1, "sensor": "NAIP"}).lower()
    for caption in _all_phrasings({"sensor": "aerial camera"}):
        assert "an aerial image" in caption.lower() and "an aerial camera" in caption.lower(), caption
        _assert_articles(caption)


def test_sensor_named() -> None:
    for caption in _all_phrasings({**FULL, "sensor": "Landsat 8 OLI", "gsd_m": 30}):
        assert "Landsat 8 OLI captured" in caption or "by Landsat 8 OLI" in caption, caption
    for caption in _all_phrasings({"platform": "sentinel-2a", "gsd_m": 10}):
        assert "Sentinel-2A" in caption, caption
    for caption in _all_phrasings({"platform": "aircraft", "gsd_m": 0.3}):
        assert "captured by" not in caption and "aircraft" not in caption.lower(), caption


@pytest.mark.parametrize(("month", "lat", "season"), [
    ("2019-07-14", 45.0, "summer"),
    ("2019-07", -35.0, "winter"),
    ("2019-01-02T10:00:00Z", 52.0, "winter"),
    ("2019-01", -33.9, "summer"),
    ("2019-04", 40.0, "spring"),
    ("2019-04", -40.0, "autumn"),
    ("2019-10-01", 60.0, "autumn"),
    ("2019-10-01", -60.0, "spring"),
    ("2019-12-31", 23.6, "winter"),
    (dt.date(2019, 7, 1), -40.0, "winter"),
    (dt.datetime(2019, 7, 1, 12, tzinfo=dt.UTC), 40.0, "summer"),
])
def test_season_by_hemisphere(month: Any, lat: float, season: str) -> None:
    for caption in _all_phrasings({**FULL, "acquired": month, "lat": lat}):
        assert f"the {season} of 2019" in caption, caption
        others = {"winter", "spring", "summer", "autumn"} - {season}
        assert not any(o in caption for o in others), caption


@pytest.mark.parametrize(("acquired", "lat"), [
    ("2019-07-14", 10.0), ("2019-07-14", -23.0), ("2019-01", 0.0),  # tropics
    ("2019", 45.0), ("2019", -45.0),  # no month
    ("2019-07-14", None), ("2019-13", 45.0),  # hemisphere or month unknown
])
def test_no_season_word(acquired: str, lat: float | None) -> None:
    for caption in _all_phrasings({**FULL, "acquired": acquired, "lat": lat}):
        assert not re.search(r"winter|spring|summer|autumn|fall", caption), caption
        assert "2019" in caption and "in 2019" in caption, caption
        _assert_clean(caption)


@pytest.mark.parametrize("acquired", [None, "", "unknown", "sometime", float("nan")])
def test_no_date(acquired: Any) -> None:
    for caption in _all_phrasings({**FULL, "acquired": acquired}):
        assert not re.search(r"winter|spring|summer|autumn|\b20\d\d\b", caption), caption
        _assert_clean(caption)


@pytest.mark.parametrize(("country", "continent", "place"), [
    ("France", "Europe", "in France, Europe"),
    (None, "Europe", "in Europe"),
    ("", "Africa", "in Africa"),
    ("Kenya", None, "in Kenya"),
    (None, "Seven seas (open ocean)", "over the open ocean"),
    ("Maldives", "Seven seas (open ocean)", "in the Maldives, in the open ocean"),
    ("United States of America", "North America", "in the United States of America, North America"),
    ("Antarctica", "Antarctica", "in Antarctica"),
])
def test_place(country: str | None, continent: str | None, place: str) -> None:
    for caption in _all_phrasings({**FULL, "country": country, "continent": continent}):
        assert place in caption, caption
        assert "(" not in caption and "Seven seas" not in caption, caption
        assert "Antarctica, Antarctica" not in caption
        _assert_clean(caption)


def test_no_place() -> None:
    for caption in _all_phrasings({**FULL, "country": None, "continent": "None"}):
        assert "Europe" not in caption and "France" not in caption and " in ," not in caption
        _assert_clean(caption)


@pytest.mark.parametrize("label", sorted(set(RSICD + UCM + SYDNEY)))
def test_scene_classes(label: str) -> None:
    expected = SPLIT.get(label, label)
    for caption in _all_phrasings({**FULL, "scene_class": label}):
        assert expected in caption.lower() or (label == "center" and "city center" in caption), caption
        _assert_clean(caption)
        _assert_articles(caption)


@pytest.mark.parametrize(("label", "phrase"), [
    ("storage_tanks", "storage tanks"),
    ("Airport", "an airport"),
    ("DenseResidential", "a dense residential area"),
    ("dense-residential", "a dense residential area"),
    ("Baseball Diamond", "a baseball diamond"),
    ("industrial_area", "an industrial area"),
    ("storage_tank", "storage tanks"),
    ("ground_track_field", "a ground track field scene"),
    ("GroundTrackField", "a ground track field scene"),
    ("groundtrackfield", "a ground track field scene"),
    ("sea_ice", "a sea ice scene"),
    ("snowberg", "a snowberg scene"),
    ("island", "an island scene"),
    ("ships", "ships"),
    ("Solar-Panels", "solar panels"),
])
def test_scene_label_spelling(label: str, phrase: str) -> None:
    for caption in _all_phrasings({**FULL, "scene_class": label}):
        assert phrase in caption or phrase[0].upper() + phrase[1:] in caption, caption
        _assert_clean(caption)


def test_articles() -> None:
    for caption in _all_phrasings({"gsd_m": 8, "scene_class": "overpass"}):
        assert re.search(r"\b[Aa]n 8 m ", caption), caption
        assert re.search(r"\b[Aa]n overpass\b", caption), caption
        _assert_articles(caption)
    for caption in _all_phrasings({"gsd_m": 0.5, "scene_class": "beach"}):
        assert re.search(r"\b[Aa] 0.5 m ", caption) and re.search(r"\b[Aa] beach\b", caption), caption
    for caption in _all_phrasings({"sensor": "NAIP"}):
        assert re.search(r"\b[Aa]n aerial image\b", caption), caption


def test_grid_of_rows_with_missing_fields_is_clean() -> None:
    rng = random.Random(7)
    choices: dict[str, list[Any]] = {
        "gsd_m": [0.15, 0.3, 0.5, 0.6, 1.0, 2.5, 8.0, 10.0, 11.0, 30.0, 60.0, 100.0, 128.0, 250.0],
        "sensor": ["Landsat 8 OLI", "NAIP", "aerial camera", "WorldView-2", "Sentinel-2 MSI", "MODIS"],
        "platform": ["landsat-8", "aircraft", "sentinel-2a", "satellite", "Gaofen-2"],
        "country": ["France", "United States of America", "Brazil", "Netherlands", "Japan", "Maldives", "Antarctica"],
        "continent": ["Europe", "North America", "South America", "Africa", "Asia", "Oceania", "Antarctica",
                      "Seven seas (open ocean)"],
        "acquired": ["2019", "2019-07", "2019-07-14", "2019-07-14T10:00:00Z", "2021-01-31", dt.date(2020, 4, 2)],
        "lat": [-70.0, -45.0, -23.6, -10.0, 0.0, 12.0, 23.6, 48.0, 80.0],
        "scene_class": RSICD + UCM + SYDNEY + ["storage_tanks", "Airport", "ground_track_field", "ships"],
        "source": ["rsicd", "ucm", "naip"],
    }
    missing: list[Any] = [None, "", "None", "nan", float("nan")]
    seen = set()
    for i in range(3000):
        row: dict[str, Any] = {"key": f"grid-{i}"}
        for field, values in choices.items():
            if rng.random() < 0.4:
                if rng.random() < 0.5:
                    row[field] = rng.choice(missing)
            else:
                row[field] = rng.choice(values)
        caption = template_caption(row)
        _assert_clean(caption)
        _assert_articles(caption)
        if isinstance(row.get("gsd_m"), float) and row["gsd_m"] == row["gsd_m"]:
            assert re.search(r"\d m (aerial|satellite) image", caption), caption
        assert caption == template_caption(dict(row))
        seen.add(caption)
    assert len(seen) > 2500
