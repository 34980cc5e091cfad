"""The Hugging Face dataset card (README.md): YAML header + the sections auditors look for.

Every number comes from `DatasetFacts`; the statements on biases, limitations and sensitive data are
computed here once and reused by the Croissant RAI fields, so the two files never disagree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jinja2
import yaml

from pipeline.cards.facts import DatasetFacts

TEMPLATES = Path(__file__).parent / "templates"
PRETTY_NAME = "Git-10M-style global remote-sensing image-text pairs (text2earth rebuild)"
GIT10M_LEVELS = range(10, 19)  # Git-10M spans levels 10..18 = 128 m .. 0.5 m per pixel
NATURAL_EARTH_CONTINENTS = ("Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania",
                            "South America", "Seven seas (open ocean)")
# SPDX ids whose lower-case form is also a Hugging Face license id; other licences make the header `other`.
HF_LICENSES = {"cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0",
               "cc-by-nd-4.0", "odbl", "pddl", "odc-by", "mit", "apache-2.0", "cdla-permissive-2.0"}
SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
TEXT2EARTH_BIBTEX = """\
@article{liu2025text2earth,
  author  = {Liu, Chenyang and Chen, Keyan and Zhao, Rui and Zou, Zhengxia and Shi, Zhenwei},
  title   = {Text2Earth: Unlocking Text-Driven Remote Sensing Image Generation with a Global-Scale Dataset
             and a Foundation Model},
  journal = {IEEE Geoscience and Remote Sensing Magazine},
  volume  = {13},
  number  = {3},
  pages   = {238--259},
  year    = {2025},
  doi     = {10.1109/MGRS.2025.3560455},
  eprint  = {2501.00895},
  archivePrefix = {arXiv}
}"""
USE_CASES = (
    "Training and evaluating text-to-image diffusion models for remote sensing (Text2Earth, DiffusionSat), "
    "with the `level` column as the resolution condition.",
    "Image-text retrieval and captioning research (CLIP-style models, captioners) on aerial and satellite "
    "imagery.",
    "Studying how resolution, geography and caption source affect generative and retrieval models "
    "(every sample carries its GSD, location, source and caption origin).",
)
OUT_OF_SCOPE = (
    "Identifying, tracking or surveilling people, vehicles or private property.",
    "Measurement or mapping that needs calibrated radiometry or survey-grade geolocation: pixels are 8-bit "
    "RGB after a contrast stretch and footprints come from source georeferencing.",
    "Passing generated images off as real observations (e.g. for disaster reporting or evidence).",
    "Any use the licence of a sample's source forbids: check the `license` column (research-only sources "
    "exist).",
)


def num(n: int | float) -> str:
    """Counts with thousands separators (10,482,133)."""
    return f"{int(n):,}"


def pct(n: int | float, total: int | float) -> str:
    """A share as `12.3 %` (0 % of an empty total)."""
    return f"{100.0 * n / total:.1f} %" if total else "0.0 %"


def metres(value: float | None) -> str:
    """GSD in metres with two decimals, or an en dash when unknown."""
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def size_category(n: int) -> str:
    """The Hugging Face `size_categories` bucket for n samples."""
    for bound, label in SIZE_BUCKETS:
        if n < bound:
            return label
    return "n>1B"


def annotations_creators(facts: DatasetFacts) -> list[str]:
    """`found` for the sources' own captions, `machine-generated` for templates and VLM captions."""
    kinds = {"found" if cs == "source" else "machine-generated" for cs, _ in facts.caption_sources if cs != "none"}
    return sorted(kinds)


def license_header(facts: DatasetFacts) -> dict[str, Any]:
    """HF license keys: one HF id, a list of HF ids, or `other` with a name and a link to the sources table."""
    licences = sorted({s.license for s in facts.sources})
    ids = [lic.lower() for lic in licences]
    if ids and all(i in HF_LICENSES for i in ids):
        return {"license": ids[0] if len(ids) == 1 else ids}
    return {"license": "other", "license_name": "mixed-source-licenses", "license_link": "README.md"}


def card_header(facts: DatasetFacts) -> dict[str, Any]:
    """The YAML front matter the Hub reads (insertion order is the printed order)."""
    header: dict[str, Any] = {"pretty_name": PRETTY_NAME, **license_header(facts), "language": ["en"],
                              "task_categories": ["text-to-image", "image-to-text"],
                              "size_categories": [size_category(facts.samples)],
                              "source_datasets": facts.source_names,
                              "annotations_creators": annotations_creators(facts),
                              "tags": ["remote-sensing", "satellite-imagery", "aerial-imagery", "geospatial",
                                       "earth-observation", "text-to-image", "webdataset", "geoparquet"],
                              "configs": [
                                  {"config_name": "shards", "default": True, "data_files": "shards/*.tar"},
                                  {"config_name": "metadata", "data_files": "metadata/**/*.parquet"}]}
    return header


def _georeferenced_continents(facts: DatasetFacts) -> list[tuple[str, int]]:
    return [(c, n) for c, n in facts.continents if c is not None]


def bias_statements(facts: DatasetFacts, params: dict[str, Any]) -> list[str]:
    """Measured imbalances: continents, sources, resolution levels, caption origin, filtering rule."""
    out: list[str] = []
    placed = _georeferenced_continents(facts)
    placed_total = sum(n for _, n in placed)
    if placed:
        shares = ", ".join(f"{c} {pct(n, placed_total)}" for c, n in placed)
        absent = [c for c in NATURAL_EARTH_CONTINENTS if c not in dict(placed)]
        out.append(f"Continent imbalance: of the {num(placed_total)} samples with a continent, {shares}"
                   + (f"; none in {', '.join(absent)}." if absent else ".")
                   + f" They span {num(facts.countries)} countries.")
    unplaced = facts.samples - placed_total
    if unplaced:
        out.append(f"{num(unplaced)} samples ({pct(unplaced, facts.samples)}) have no continent: not "
                   "georeferenced, or at sea beyond `geo.max_sea_km`.")
    by_source: dict[str, int] = {}
    for s in facts.sources:
        by_source[s.name] = by_source.get(s.name, 0) + s.samples
    if by_source:
        top, top_n = max(sorted(by_source.items()), key=lambda kv: kv[1])
        out.append(f"Source imbalance: `{top}` alone gives {pct(top_n, facts.samples)} of the samples "
                   f"({len(by_source)} sources in all).")
    in_git10m = sum(lv.samples for lv in facts.levels if lv.level in GIT10M_LEVELS)
    empty = [str(lv) for lv in GIT10M_LEVELS if lv not in {x.level for x in facts.levels}]
    out.append(f"Resolution coverage: {pct(in_git10m, facts.samples)} of the samples fall in Git-10M's levels "
               f"10-18 (128 m to 0.5 m per pixel)"
               + (f"; levels {', '.join(empty)} have no samples." if empty else "; every one of them has samples."))
    machine = sum(n for cs, n in facts.caption_sources if cs not in ("source", "none"))
    out.append(f"Caption origin: {pct(machine, facts.samples)} of the captions are machine-generated "
               "(templates or a VLM), the rest are the source datasets' own sentences; the two differ in length "
               "and vocabulary.")
    top_percent = (params.get("filter") or {}).get("top_percent")
    if top_percent is not None:
        out.append(f"The CLIP filter keeps the best {top_percent} % of each (source, level) group, so it keeps "
                   "the imbalances above rather than correcting them.")
    return out


def random_init_models(facts: DatasetFacts) -> list[tuple[str, int]]:
    """CLIP models with random weights (offline smoke runs) and the samples they scored."""
    return [(m, n) for m, n in facts.clip_models if "random-init" in m]


def limitation_statements(facts: DatasetFacts) -> list[str]:
    """What the data cannot support, with the counts that show it."""
    out: list[str] = []
    for model, n in random_init_models(facts):
        dropped = sum(st.dropped for st in facts.funnel if st.stage == "filter")
        out.append(f"`clip_score` of {num(n)} samples ({pct(n, facts.samples)}) comes from `{model}`, a "
                   f"CLIP model with random weights: the scores carry no meaning and the {num(dropped)} "
                   "samples the CLIP filter dropped were dropped at random. This is an offline sample run, "
                   "not a curated release.")
    unknown = facts.samples - facts.gsd_known
    if unknown:
        out.append(f"{num(unknown)} samples ({pct(unknown, facts.samples)}) have no known GSD (level 0, "
                   "Text2Earth's null resolution): their sources are not georeferenced and declare no GSD.")
    not_geo = facts.samples - facts.georeferenced
    if not_geo:
        out.append(f"{num(not_geo)} samples ({pct(not_geo, facts.samples)}) have no location (lon, lat, "
                   "footprint, country are null).")
    out.append("`level` is derived from the measured GSD (round(17 - log2(gsd_m))); Git-10M's nominal "
               "2^(17-L) m is exact only near 33 deg latitude, so levels here are not interchangeable with "
               "Git-10M's Google zoom levels.")
    out.append(f"Images are {', '.join(f for f, _ in facts.image_formats)} 8-bit RGB chips of 256 x 256 "
               "pixels; non-8-bit sources were contrast-stretched per scene, so pixel values are not "
               "radiometric measurements.")
    out.append(f"{num(facts.samples)} samples: Git-10M has 10.5 million; statistics of a small release "
               "describe its sources, not the globe.")
    return out


def sensitive_statements(facts: DatasetFacts) -> list[str]:
    """Personal and sensitive information: what location and resolution reveal."""
    fine = sum(lv.samples for lv in facts.levels if lv.level >= 17)
    return [
        f"Location: {num(facts.georeferenced)} samples carry their exact footprint, centre and country.",
        f"{num(fine)} samples ({pct(fine, facts.samples)}) are at level 17 or finer (about 1 m per pixel or "
        "better), where buildings, vehicles and private grounds are visible; no person is identifiable at "
        "these resolutions and no column names people.",
        "Captions describe land cover and objects; machine-generated captions can still hallucinate place "
        "names or objects.",
    ]


def captioners(facts: DatasetFacts) -> list[dict[str, Any]]:
    """One row per captioner with its share and what it is."""
    meaning = {"source": "the source dataset's own sentence (human-written)",
               "template": "built from the metadata (GSD, sensor, place, season, scene class) by "
                           "`pipeline/curation/template_caption.py`: deterministic",
               "none": "no caption"}
    return [{"name": cs, "samples": n, "share": pct(n, facts.samples),
             "meaning": meaning.get(cs, f"vision-language model `{cs.removeprefix('vlm:')}`")}
            for cs, n in facts.caption_sources]


def caption_params(params: dict[str, Any]) -> dict[str, Any]:
    """The caption section without anything secret-adjacent (the API key variable name stays out too)."""
    section = dict(params.get("caption") or {})
    vlm = section.get("vlm")
    if isinstance(vlm, dict):
        section["vlm"] = {k: vlm[k] for k in ("base_url", "model") if k in vlm}
    section.pop("vlm_cache_dir", None)
    return section


def yaml_scalar(value: Any) -> str:
    """A params value as params.yaml spells it (null, true, 0.95), not as Python prints it (None, True)."""
    return str(yaml.safe_dump(value, default_flow_style=True, width=1000)).removesuffix("\n...\n").strip()


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters.update(num=num, metres=metres, yaml=yaml_scalar,
                       cell=lambda s: str(s).replace("|", "\\|").replace("\n", " "))
    env.globals["pct"] = pct
    return env


def render_readme(facts: DatasetFacts, lineage: dict[str, Any]) -> str:
    """README.md text: YAML header, then the template filled from the facts, params and lineage."""
    params = lineage["params"]
    header = yaml.safe_dump(card_header(facts), sort_keys=False, allow_unicode=True, width=1000)
    filter_params = params.get("filter") or {}
    context = {
        "header": header.rstrip("\n"), "f": facts, "lineage": lineage, "params": params,
        "filter": filter_params, "captioners": captioners(facts), "caption_params": caption_params(params),
        "clip": params.get("clip") or {}, "biases": bias_statements(facts, params),
        "limitations": limitation_statements(facts), "sensitive": sensitive_statements(facts),
        "use_cases": USE_CASES, "out_of_scope": OUT_OF_SCOPE, "bibtex": TEXT2EARTH_BIBTEX,
        "total_bytes": sum(facts.file_sizes.values()),
        "shard_bytes": sum(v for k, v in facts.file_sizes.items() if k.startswith("shards/")),
        "dedup": params.get("dedup") or {}, "curate": params.get("curate") or {},
        "publish": params.get("publish") or {},
    }
    return _environment().get_template("README.md.j2").render(**context)
