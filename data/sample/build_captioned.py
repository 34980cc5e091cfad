"""Rebuild data/sample/captioned/ (Karpathy layout) from the collected records.

Kept as the record of how the sample was made; it needs the research collection (`samples.json` with the
images and their five captions each), which is not part of the repository. Run:
    python data/sample/build_captioned.py PATH/TO/captions/samples.json
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def build(samples_json: Path, out: Path) -> None:
    """Write one `<dataset>/dataset.json` + `images/` per dataset found in the records."""
    records = json.loads(samples_json.read_text())
    by_dataset: dict[str, list[dict]] = {}
    for rec in records:
        by_dataset.setdefault(rec["dataset"], []).append(rec)
    for dataset, recs in by_dataset.items():
        folder = out / dataset
        (folder / "images").mkdir(parents=True, exist_ok=True)
        images = []
        for i, rec in enumerate(recs):
            name = Path(rec["image"]).name
            shutil.copy(samples_json.parent / rec["image"], folder / "images" / name)
            sentences = [{"raw": c, "tokens": c.replace(" .", "").split(), "imgid": i, "sentid": i * 5 + j}
                         for j, c in enumerate(rec["captions"])]
            image = {"filename": name, "imgid": i, "split": rec["split"], "sentences": sentences,
                     "sentids": [s["sentid"] for s in sentences]}
            if "uc_merced_class" in rec:
                image["class"] = rec["uc_merced_class"]
            images.append(image)
        (folder / "dataset.json").write_text(json.dumps({"dataset": dataset, "images": images}, indent=1))


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(__file__).parent / "captioned")
