"""Harvest throughput and memory: the Beam job against a bare rasterio + Pillow loop on the same chips.

    python benchmarks/harvest.py                 # 1x, 10x and 100x the sample, 1 and 2 workers (~10 min)
    python benchmarks/harvest.py --write         # ... and update the harvest section of RESULTS.md

The input is the sample's GeoTIFF sources (sources.yaml), copied N times under new names. The bare loop
reads every planned chip window with `rasterio` (GDAL average resampling to 256 px, overviews off so it
reads the same source pixels) and encodes it with Pillow, in this process; the Beam job runs as
`text2earth harvest` in a subprocess. "job s" is the time the job itself reports (planning + Beam +
pruning + summary); "wall s" adds interpreter start-up and imports. Peak memory is the largest summed
RSS of the harvest process and all its children (sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
import yaml
from _measure import PeakRss, update_results  # benchmarks/_measure.py: this folder is on sys.path when a script runs
from PIL import Image
from rasterio.enums import Resampling
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]


def make_input(tmp: Path, copies: int) -> Path:
    """Sources file over `copies` renamed copies of every sample GeoTIFF (same per-source options)."""
    entries = [e for e in yaml.safe_load((REPO / "sources.yaml").read_text()) if e["kind"] == "geotiff"]
    folder = tmp / f"x{copies}"
    folder.mkdir()
    sources = []
    for entry in entries:
        for src in sorted(REPO.glob(entry["uri"])):
            for i in range(copies):
                shutil.copy(src, folder / f"{src.stem}__copy{i:03d}.tif")
        sources.append({**entry, "uri": str(folder / (Path(entry["uri"]).stem + "__copy*.tif"))})
    path = folder / "sources.yaml"
    path.write_text(yaml.safe_dump(sources, sort_keys=False))
    return path


def write_params(tmp: Path, sources: Path, workers: int, tag: str) -> Path:
    base = yaml.safe_load((REPO / "params.yaml").read_text())["harvest"]
    base.update({"sources": str(sources), "output_dir": str(tmp / f"out-{tag}"),
                 "work_dir": str(tmp / f"work-{tag}"), "workers": workers})
    path = tmp / f"params-{tag}.yaml"
    path.write_text(yaml.safe_dump({"harvest": base}))
    return path


def planned_chips(params_path: Path) -> list[tuple[dict[str, Any], list[int]]]:
    from pipeline.params import load_harvest_params
    from pipeline.plan import plan_sources

    params = load_harvest_params(params_path)
    chips = []
    for task in plan_sources(params, "bench"):
        if task["kind"] == "raster":
            chips += [(part["scene"], chip) for part in task["scenes"] for chip in part["chips"]]
    return chips


def bare_loop(chips: list[tuple[dict[str, Any], list[int]]], size: int) -> float:
    """rasterio window reads (GDAL average to `size`) + Pillow JPEG encodes of the same chips."""
    start = time.perf_counter()
    open_files: dict[str, Any] = {}
    for scene, (k, _, _, col_off, row_off) in chips:
        side = size * 2**k
        uri = scene["channels"][0][0]
        # no overviews: read the same source pixels as the harvest (overviews hold other resamplings)
        ds = open_files.get(uri) or open_files.setdefault(uri, rasterio.open(uri, OVERVIEW_LEVEL="NONE"))
        w, h = min(side, ds.width - col_off), min(side, ds.height - row_off)
        bands = [b for _, b in scene["channels"]]
        out = (len(bands), max(1, round(w * size / side)), max(1, round(h * size / side)))
        arr = ds.read(bands, window=Window(col_off, row_off, w, h), out_shape=(out[0], out[2], out[1]),
                      resampling=Resampling.average)
        if arr.dtype != np.uint8:
            arr = np.clip(arr / 64, 0, 255).astype(np.uint8)
        if arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0))).save(buf, "JPEG", quality=95, subsampling=0)
    for ds in open_files.values():
        ds.close()
    return time.perf_counter() - start


def _bare_part(args: tuple[list[tuple[dict[str, Any], list[int]]], int]) -> float:
    return bare_loop(*args)


def bare_two_processes(chips: list[tuple[dict[str, Any], list[int]]], size: int) -> float:
    """The bare loop split over two processes (what the machine allows for this work in parallel)."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        pool.map(_bare_part, [(chips[:10], size), (chips[10:20], size)])  # start-up and warm-up
        start = time.perf_counter()
        pool.map(_bare_part, [(chips[0::2], size), (chips[1::2], size)])
        return time.perf_counter() - start


def beam_run(params_path: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "stages.cli", "harvest", "--params", str(params_path), "--no-progress",
           "--metrics", str(params_path.with_suffix(".metrics.json")),
           "--preview", str(params_path.with_suffix(".preview.png"))]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monitor = PeakRss(proc.pid)
    monitor.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    monitor.done.set()
    monitor.join()
    if proc.returncode:
        raise RuntimeError(f"harvest failed:\n{err[-3000:]}")
    m = re.search(r"(\d+) candidates in ([\d.]+) s", out)
    assert "already done" not in out, "a benchmark run must not resume an earlier one"
    assert m, out
    return {"candidates": int(m[1]), "job_s": float(m[2]), "wall_s": wall, "peak_rss_gib": monitor.peak / 2**30}


def _median(values: list[float]) -> float:
    return float(np.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10, 100], help="input sizes (x the sample)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2e-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for copies in args.copies:
            sources = make_input(tmp, copies)
            chips = planned_chips(write_params(tmp, sources, 1, f"plan{copies}"))
            bare_loop(chips[:20], 256)  # warm the page cache and GDAL for a fair first run
            bare: list[float] = []
            bare2: list[float] = []
            runs: dict[int, list[dict[str, float]]] = {w: [] for w in args.workers}
            for rep in range(args.repeats):  # interleaved, so machine noise hits every variant alike
                bare.append(bare_loop(chips, 256))
                bare2.append(bare_two_processes(chips, 256))
                for workers in args.workers:
                    tag = f"{copies}x{workers}r{rep}"
                    r = beam_run(write_params(tmp, sources, workers, tag))
                    assert r["candidates"] == len(chips)
                    runs[workers].append(r)
                    shutil.rmtree(tmp / f"out-{tag}")
                    print(f"{copies}x sample, {workers} worker(s), run {rep}: {r}, bare {bare[-1]:.2f} s",
                          file=sys.stderr)
            row: dict[str, Any] = {"copies": copies, "chips": len(chips), "bare_s": _median(bare),
                                   "bare_runs_s": bare, "bare2_s": _median(bare2), "bare2_runs_s": bare2}
            for workers, results in runs.items():
                row[f"w{workers}"] = {key: _median([r[key] for r in results]) for key in results[0]}
                row[f"w{workers}"]["peak_rss_gib"] = max(r["peak_rss_gib"] for r in results)
                row[f"w{workers}_runs"] = results
            rows.append(row)
    table = render(rows, args.workers)
    print(table)
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "harvest.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.write:
        update_results(table, "harvest")


def render(rows: list[dict[str, Any]], workers: list[int]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [f"Machine: {os.cpu_count()} CPU cores ({cpu}), "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}; medians of interleaved runs.", "",
             "| input | chips | bare loop chips/s | " + " | ".join(
                 f"Beam {w}w chips/s (job) | Beam {w}w chips/s (wall) | Beam {w}w peak RSS GiB" for w in workers)
             + " | Beam 1w / bare | Beam 2w / 1w | bare 2 processes / 1 |",
             "|---|---|---|" + "---|---|---|" * len(workers) + "---|---|---|"]
    for row in rows:
        bare_rate = row["chips"] / row["bare_s"]
        cells = [f"{row['copies']}x sample", str(row["chips"]), f"{bare_rate:.1f}"]
        for w in workers:
            r = row[f"w{w}"]
            cells += [f"{r['candidates'] / r['job_s']:.1f}", f"{r['candidates'] / r['wall_s']:.1f}",
                      f"{r['peak_rss_gib']:.2f}"]
        one = row["chips"] / row["w1"]["job_s"] if "w1" in row else float("nan")
        two = row["chips"] / row["w2"]["job_s"] if "w2" in row else float("nan")
        cells += [f"{one / bare_rate:.2f}", f"{two / one:.2f}", f"{row['bare_s'] / row['bare2_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
