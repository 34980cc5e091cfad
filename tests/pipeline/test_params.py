"""params.yaml and sources validation: every mistake names the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import load_harvest_params, load_sources
from tests.conftest import REPO

GOOD = {"name": "a", "kind": "geotiff", "uri": "x.tif", "license": "CC0-1.0", "attribution": "me"}


def _load(tmp_path: Path, section: dict) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"harvest": section}))
    load_harvest_params(path)


def test_repo_params_and_sources_are_valid() -> None:
    params = load_harvest_params(REPO / "params.yaml")
    assert params.chip_size == 256 and len(params.source_list) >= 10


@pytest.mark.parametrize(("section", "expected"), [
    ({"chip_sise": 256, "sources": [GOOD]}, "harvest.chip_sise: unknown key (did you mean 'chip_size'?)"),
    ({"image_format": "webp", "sources": [GOOD]}, "harvest.image_format: Input should be 'jpg' or 'png'"),
    ({"max_nodata_fraction": 1.5, "sources": [GOOD]}, "harvest.max_nodata_fraction: Input should be less than"),
    ({"stretch_percentiles": [98, 2], "sources": [GOOD]}, "need 0 <= low < high <= 100"),
    ({"sources": [{**GOOD, "kind": "tiff"}]}, "harvest.sources[0]: `kind` must be one of geotiff, stac"),
    ({"sources": [{**GOOD, "image_dir": "x"}]}, "harvest.sources[0].image_dir: unknown key"),
    ({"sources": [{**GOOD, "name": "Bad.Name"}]}, "not a valid source name"),
    ({"sources": [GOOD, GOOD]}, "source name 'a' is used twice"),
    ({"sources": [{**GOOD, "bands": [1, 2]}]}, "give 1 band (grey) or 3 bands"),
    ({"sources": [{**GOOD, "acquired": "last May"}]}, "is not ISO 8601"),
    ({"sources": [{k: v for k, v in GOOD.items() if k != "license"}]}, "harvest.sources[0].license: Field required"),
])
def test_bad_params_name_the_key(tmp_path: Path, section: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as err:
        _load(tmp_path, section)
    assert expected in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_unknown_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as err:
        _load(tmp_path, {"sources": [{**GOOD, "colour": "red"}]})
    assert "allowed keys here: acquired, attribution, bands, kind, license, name, nodata" in str(err.value)


def test_sources_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump([{**GOOD, "kind": "captioned", "gsd_m": -1}]))
    with pytest.raises(ParamsError, match=r"sources.yaml: sources\[0\].gsd_m: Input should be greater than 0"):
        load_sources(path)
    path.write_text("- [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_sources(path)
    with pytest.raises(ParamsError, match="file not found"):
        load_sources(tmp_path / "nope.yaml")
