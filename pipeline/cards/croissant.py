"""The MLCommons Croissant 1.1 JSON-LD of a release, with its responsible-AI (RAI) fields.

Files are described one by one (FileObject + sha256 from checksums.sha256) and as FileSets a loader can
read; the `samples` RecordSet maps every Parquet column to a Croissant field, `level` included (it lives
in the Hive path). mlcroissant validates the document before it is written.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa

from pipeline.cards.facts import CardsError, DatasetFacts
from pipeline.cards.hf_card import (
    OUT_OF_SCOPE,
    TEXT2EARTH_BIBTEX,
    USE_CASES,
    annotations_creators,
    bias_statements,
    captioners,
    limitation_statements,
    num,
    pct,
    sensitive_statements,
    yaml_scalar,
)

log = logging.getLogger("text2earth.cards")

CONFORMS_TO = "http://mlcommons.org/croissant/1.1"
# The standard Croissant 1.1 @context (as mlcroissant writes it) plus the RAI vocabulary.
CONTEXT: dict[str, Any] = {
    "@language": "en", "@vocab": "https://schema.org/", "arrayShape": "cr:arrayShape", "citeAs": "cr:citeAs",
    "column": "cr:column", "conformsTo": "dct:conformsTo", "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/", "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"}, "dct": "http://purl.org/dc/terms/",
    "description": {"@container": "@language"}, "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileObject": "cr:fileObject", "fileProperty": "cr:fileProperty", "fileSet": "cr:fileSet",
    "format": "cr:format", "includes": "cr:includes", "isArray": "cr:isArray", "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath", "key": "cr:key", "md5": "cr:md5", "name": {"@container": "@language"},
    "parentField": "cr:parentField", "path": "cr:path", "rai": "http://mlcommons.org/croissant/RAI/",
    "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated",
    "replace": "cr:replace", "samplingRate": "cr:samplingRate", "sc": "https://schema.org/",
    "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField", "transform": "cr:transform",
}
ENCODINGS = {".tar": "application/x-tar", ".parquet": "application/x-parquet"}
IMAGE_ENCODINGS = {"jpg": "image/jpeg", "png": "image/png"}
METADATA_FILESET = "metadata-parquet"
IMAGES_FILESET = "shard-images"


def croissant_type(arrow_type: pa.DataType) -> tuple[str | None, bool]:
    """(Croissant dataType, is_array) of an Arrow type; None for types Croissant cannot express (WKB)."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner, _ = croissant_type(arrow_type.value_type)
        return inner, True
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "sc:Text", False
    if pa.types.is_floating(arrow_type):
        return "sc:Float", False
    if pa.types.is_integer(arrow_type):
        return "sc:Integer", False
    if pa.types.is_boolean(arrow_type):
        return "sc:Boolean", False
    if pa.types.is_date(arrow_type):
        return "sc:Date", False
    if pa.types.is_timestamp(arrow_type):
        return "sc:DateTime", False
    return None, False


def _file_objects(facts: DatasetFacts) -> list[dict[str, Any]]:
    """One FileObject per checksummed file; @id and contentUrl are the path relative to the release root."""
    objects = []
    for path, sha256 in facts.checksums:
        suffix = path[path.rfind("."):]
        objects.append({"@type": "cr:FileObject", "@id": path, "name": path, "contentUrl": path,
                        "contentSize": f"{facts.file_sizes[path]} B", "encodingFormat": ENCODINGS[suffix],
                        "sha256": sha256, "description": _describe_file(path)})
    return objects


def _describe_file(path: str) -> str:
    if path.startswith("shards/"):
        return "WebDataset shard: {key}.jpg|png image, {key}.txt caption, {key}.json metadata row."
    if path.startswith("metadata/"):
        return "GeoParquet metadata of the samples at one resolution level (Hive partition level=L)."
    if path.startswith("rejected/"):
        return "Candidates dropped by a pipeline stage, with stage and reason."
    return "Rows in, kept and dropped per pipeline stage and source."


def _file_sets(facts: DatasetFacts) -> list[dict[str, Any]]:
    """The metadata Parquet files (read together, level from the path) and the images inside the shards."""
    formats = [fmt for fmt, _ in facts.image_formats if fmt in IMAGE_ENCODINGS]
    tars = [path for path, _ in facts.checksums if path.startswith("shards/") and path.endswith(".tar")]
    return [
        {"@type": "cr:FileSet", "@id": METADATA_FILESET, "name": METADATA_FILESET,
         "description": "Every metadata Parquet file; paths are relative to the release root (where this "
                        "file is published).",
         "encodingFormat": "application/x-parquet", "includes": "metadata/**/*.parquet"},
        {"@type": "cr:FileSet", "@id": IMAGES_FILESET, "name": IMAGES_FILESET,
         "description": "The images inside the WebDataset shards; the file name without extension is `key`.",
         "containedIn": [{"@id": t} for t in tars], "encodingFormat": [IMAGE_ENCODINGS[f] for f in formats],
         "includes": [f"*.{f}" for f in formats]},
    ]


def _samples_record_set(facts: DatasetFacts) -> dict[str, Any]:
    """A field per metadata column (type from Arrow); `level` extracted from the Hive path."""
    fields, skipped = [], []
    for column in facts.schema:
        data_type, is_array = croissant_type(column.type)
        if data_type is None:
            skipped.append(f"`{column.name}` ({column.type})")
            continue
        field: dict[str, Any] = {"@type": "cr:Field", "@id": f"samples/{column.name}", "name": column.name,
                                 "description": column.description, "dataType": data_type}
        if column.from_partition:
            field["source"] = {"fileSet": {"@id": METADATA_FILESET}, "extract": {"fileProperty": "fullpath"},
                               "transform": {"regex": rf"^metadata/{column.name}=(-?\d+)/.*$"}}
        else:
            field["source"] = {"fileSet": {"@id": METADATA_FILESET}, "extract": {"column": column.name}}
        if is_array:
            field.update(isArray=True, arrayShape="-1")
        fields.append(field)
    note = (f" Not exposed as fields (no Croissant type): {', '.join(skipped)}; read them from the "
            "GeoParquet files (the footprint is WKB; `lon`/`lat` give the centre)." if skipped else "")
    return {"@type": "cr:RecordSet", "@id": "samples", "name": "samples", "key": {"@id": "samples/key"},
            "description": f"One record per published sample ({num(facts.samples)}), from the metadata Parquet "
                           "files." + note,
            "field": fields}


def _images_record_set(facts: DatasetFacts) -> dict[str, Any]:
    """Images from the shards, keyed like `samples` so the two join on `key`."""
    formats = "|".join(fmt for fmt, _ in facts.image_formats if fmt in IMAGE_ENCODINGS)
    source = {"fileSet": {"@id": IMAGES_FILESET}}
    return {"@type": "cr:RecordSet", "@id": "images", "name": "images", "key": {"@id": "images/key"},
            "description": "The 256 x 256 RGB images stored in the WebDataset shards.",
            "field": [
                {"@type": "cr:Field", "@id": "images/key", "name": "key", "dataType": "sc:Text",
                 "description": "Sample key (joins samples/key).",
                 "source": {**source, "extract": {"fileProperty": "filename"},
                            "transform": {"regex": rf"^(.+)\.(?:{formats})$"}}},
                {"@type": "cr:Field", "@id": "images/image", "name": "image", "dataType": "sc:ImageObject",
                 "description": "The image.", "source": {**source, "extract": {"fileProperty": "content"}}},
            ]}


def rai_fields(facts: DatasetFacts, lineage: dict[str, Any]) -> dict[str, Any]:
    """The Croissant RAI properties, from the same statements as the README."""
    params = lineage["params"]
    filt, dedup, curate = (params.get(k) or {} for k in ("filter", "dedup", "curate"))
    machine = [c for c in captioners(facts) if c["name"] not in ("source", "none")]
    collection_types = ["Secondary Data Analysis", "Software Collection"]
    if facts.remote_samples:
        collection_types.append("Web API")
    funnel = "; ".join(f"{st.stage}: {num(st.rows_in)} in, {num(st.kept + st.added)} out" for st in facts.funnel)
    return {
        "rai:dataCollection": (
            f"{num(facts.samples)} chips cut from the scenes and images of {len(facts.source_names)} public "
            f"sources ({', '.join(facts.source_names)}), each listed with licence and attribution in "
            "sources.yaml; rasters are read by windows and resampled into a GSD pyramid, captioned datasets "
            "are centre-cropped to 256 x 256."),
        "rai:dataCollectionType": collection_types,
        "rai:dataCollectionMissingData": (
            f"{num(facts.samples - facts.gsd_known)} samples have no GSD (level 0) and "
            f"{num(facts.samples - facts.georeferenced)} no location; such columns are null, never imputed."),
        "rai:dataPreprocessingProtocol": [
            "Chips of 256 x 256 pixels with geodesic GSD measured at the chip centre; non-8-bit rasters "
            "stretched per scene to 8-bit RGB.",
            "Country, continent and H3 cell from Natural Earth 1:50m boundaries.",
            f"CLIP filter: min_score = {yaml_scalar(filt.get('min_score'))}, top_percent = "
            f"{yaml_scalar(filt.get('top_percent'))} per "
            "(source, level) group.",
            f"Deduplication: exact sha256, and near copies within H3 resolution {dedup.get('h3_resolution')} "
            f"cells (perceptual hash <= {dedup.get('max_hamming')} bits, CLIP cosine >= "
            f"{dedup.get('min_cosine')}).",
            f"Balancing: at most {curate.get('max_per_cell')} samples per (H3 cell at resolution "
            f"{curate.get('h3_resolution')}, level).",
            f"Funnel: {funnel}.",
        ],
        "rai:dataAnnotationProtocol": [
            "One caption per sample; caption sources: "
            + "; ".join(f"{c['name']} {num(c['samples'])} ({c['share']}): {c['meaning']}" for c in captioners(facts))
            + ".",
            "Each image-caption pair is scored by CLIP (clip_score, clip_model).",
        ],
        "rai:annotationsPerItem": "1 caption (`caption`); `captions` lists every sentence the source has.",
        "rai:machineAnnotationTools": sorted({f"captioner {c['name']}: {c['meaning']}" for c in machine}
                                             | {f"open_clip {m} (clip_score)" for m, _ in facts.clip_models}),
        "rai:dataBiases": bias_statements(facts, params),
        "rai:dataLimitations": limitation_statements(facts),
        "rai:personalSensitiveInformation": sensitive_statements(facts),
        "rai:dataUseCases": [*USE_CASES, *(f"Out of scope: {u}" for u in OUT_OF_SCOPE)],
        "rai:dataSocialImpact": (
            "Opens global, resolution-aware text-to-image research on remote sensing with per-sample "
            "provenance and licences; generated imagery could be mistaken for real observations, so outputs "
            "of models trained on it should be labelled as synthetic."),
        "rai:hasSyntheticData": bool(machine),
        "rai:dataReleaseMaintenancePlan": (
            "Rebuilt from sources.yaml and params.yaml with `dvc repro`; this release was built at git commit "
            f"{lineage.get('commit') or 'unknown'}, the dvc.lock hashes in README.md identify its inputs and "
            "checksums.sha256 its files."),
    }


def build_croissant(facts: DatasetFacts, lineage: dict[str, Any]) -> dict[str, Any]:
    """The whole JSON-LD document (a dict; `dumps` serialises it deterministically)."""
    machine_share = pct(sum(n for cs, n in facts.caption_sources if cs not in ("source", "none")), facts.samples)
    doc: dict[str, Any] = {
        "@context": CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO, "name": "git10m-text2earth",
        "description": (
            f"{num(facts.samples)} remote-sensing image-text pairs (256 x 256 RGB, English captions, "
            f"{machine_share} machine-generated) from {len(facts.source_names)} sources, in the layout of "
            "Git-10M (Text2Earth, Liu et al. 2025): WebDataset shards plus GeoParquet metadata with measured "
            "GSD, Text2Earth resolution level, footprint, country, caption origin and CLIP score."),
        "citeAs": TEXT2EARTH_BIBTEX,
        "license": sorted({s.license for s in facts.sources}),
        "keywords": ["remote sensing", "satellite imagery", "aerial imagery", "geospatial", "text-to-image",
                     "image captioning", *annotations_creators(facts)],
        "inLanguage": "en",
        "distribution": _file_objects(facts) + _file_sets(facts),
        "recordSet": [_samples_record_set(facts), _images_record_set(facts)],
        **rai_fields(facts, lineage),
    }
    if lineage.get("version"):
        doc["version"] = lineage["version"]
    if lineage.get("commit_date"):
        doc["datePublished"] = lineage["commit_date"]
    return doc


def validate_croissant(doc: dict[str, Any]) -> list[str]:
    """Validate with mlcroissant; raise CardsError listing its errors, return its warnings."""
    import mlcroissant as mlc

    try:
        dataset = mlc.Dataset(jsonld=doc)
    except mlc.ValidationError as exc:
        raise CardsError(f"the Croissant JSON-LD does not validate with mlcroissant:\n{exc}") from exc
    return sorted(dataset.metadata.ctx.issues.warnings)


def dumps(doc: dict[str, Any]) -> str:
    """JSON with sorted keys and a final newline: the same document always gives the same bytes."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
