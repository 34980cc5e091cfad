"""CLIP scoring throughput and memory: the Beam `clip` stage against a bare open_clip batched loop.

    python benchmarks/clip_score.py                  # 8x the sample harvest (1,008 images), 3 repeats
    python benchmarks/clip_score.py --write          # ... and update the CLIP section of RESULTS.md
    python benchmarks/clip_score.py --rerender --write   # the table again from results/clip_score.json

Input: the sample harvest (data/harvest, 126 chips in 11 shards; run `dvc repro harvest` first) copied N times
under new keys and shard names. Each copy's JPEGs get a comment segment naming the copy, so every image has
its own sha256 (the job embeds each distinct image once) while the decoded pixels stay the same. `geo` and
`caption` run once to prepare; then, per repeat and interleaved:

* **bare loop** (in this process): for the distinct images and distinct captions of the caption stage's
  output, PIL decode + open_clip preprocess, `encode_image` in batches of 32, tokenize + `encode_text` in
  batches of 32, L2-normalise, one cosine per sample. No Beam, no cache, no files, no perceptual hash.
* **Beam job, cold**: `text2earth clip` in a subprocess with a fresh output folder and a fresh, empty
  embedding cache, so it computes everything (and also perceptual hashes, the cache and Parquet files).
* **Beam job, warm**: the same again with a fresh output folder but the cache the cold run filled: it must
  embed nothing (no cache file is created or rewritten).

Same model and numerics on both sides: ViT-B-32 with random weights (`pretrained: null`, seed 0: no weights
can be downloaded on this machine, and throughput does not depend on the weights' values), fp32, cpu, batch
size 32, 2 torch threads (`clip.threads: 2`; `torch.set_num_threads(2)` here), one Beam worker. "job s" is the
time the stage reports (planning + model load + Beam + pruning + summary); "wall s" adds interpreter start-up
and imports. Peak memory is the largest summed RSS of the stage process and its children (sampled every
50 ms). Before every timed run the script waits until the machine is quiet (other processes below
--quiet-cores busy cores), and records how much CPU other processes used during each run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import _measure  # benchmarks/_measure.py: this folder is on sys.path when a script runs
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from _measure import PeakRss, busy_cpu_s, update_results

REPO = Path(__file__).resolve().parents[1]
SAMPLE_HARVEST = REPO / "data" / "harvest"
CLIP: dict[str, Any] = {"model": "ViT-B-32", "pretrained": None, "seed": 0, "device": "cpu", "precision": "fp32",
        "batch_size": 32, "threads": 2, "model_config_path": None}


# ---- input ------------------------------------------------------------------------------------------------

def _with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes (and sha256), identical pixels."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def make_harvest(tmp: Path, copies: int, source: Path = SAMPLE_HARVEST) -> Path:
    """A harvest folder holding `copies` renamed copies of every shard of `source` (distinct image bytes)."""
    out = tmp / f"harvest-x{copies}"
    for sub in ("metadata", "rejected", "shards"):
        (out / sub).mkdir(parents=True)
    for meta_path in sorted((source / "metadata").glob("*.parquet")):
        shard = meta_path.stem
        table = pq.read_table(meta_path)
        tar_path = source / "shards" / f"{shard}.tar"
        for i in range(copies):
            tag = f"x{i:03d}"
            new_shard = f"{shard}-{tag}"
            members: list[tuple[tarfile.TarInfo, bytes]] = []
            shas: dict[str, str] = {}
            if tar_path.exists():
                with tarfile.open(tar_path) as tar:
                    for member in tar:
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        key, _, ext = member.name.partition(".")
                        if ext == "jpg":
                            data = _with_comment(data, f"text2earth benchmark copy {tag}")
                            shas[key] = hashlib.sha256(data).hexdigest()
                        info = tarfile.TarInfo(f"{key}-{tag}.{ext}")
                        info.size, info.mtime, info.mode = len(data), member.mtime, member.mode
                        info.uname, info.gname = member.uname, member.gname
                        members.append((info, data))
                with tarfile.open(out / "shards" / f"{new_shard}.tar", "w") as tar:
                    for info, data in members:
                        tar.addfile(info, io.BytesIO(data))
            keys = table.column("key").to_pylist()
            new = table.set_column(table.schema.get_field_index("key"), table.schema.field("key"),
                                   pa.array([f"{k}-{tag}" for k in keys], pa.string()))
            new = new.set_column(new.schema.get_field_index("shard"), new.schema.field("shard"),
                                 pa.array([new_shard] * len(keys), pa.string()))
            new = new.set_column(new.schema.get_field_index("sha256"), new.schema.field("sha256"),
                                 pa.array([shas[k] for k in keys], pa.string()))
            meta = dict(table.schema.metadata or {})
            meta[b"text2earth:fingerprint"] = (meta.get(b"text2earth:fingerprint", b"") + tag.encode())
            pq.write_table(new.replace_schema_metadata(meta), out / "metadata" / f"{new_shard}.parquet")
            rejected = source / "rejected" / f"{shard}.parquet"
            if rejected.exists():
                shutil.copy(rejected, out / "rejected" / f"{new_shard}.parquet")
    return out


def write_params(tmp: Path, harvest: Path, tag: str, curation_dir: Path, cache: Path) -> Path:
    """params.yaml: repo defaults, curation under `curation_dir`, the benchmark's CLIP settings."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["curation"].update({"harvest_dir": str(harvest), "dir": str(curation_dir),
                             "output_dir": str(tmp / f"curated-{tag}"), "work_dir": str(tmp / f"work-{tag}"),
                             "workers": 1, "runner": "FnApiRunner"})
    base["clip"].update({**CLIP, "cache_dir": str(cache)})
    base["caption"]["vlm_cache_dir"] = str(tmp / "cache-vlm")
    path = tmp / f"params-{tag}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def samples(curation_dir: Path, harvest: Path) -> list[dict[str, Any]]:
    """Every caption-stage row (key, shard, sha256, caption) with its image bytes from the harvest tar."""
    rows: list[dict[str, Any]] = []
    for path in sorted((curation_dir / "caption" / "metadata").glob("*.parquet")):
        rows += pq.read_table(path, columns=["key", "image_key", "shard", "sha256", "caption"]).to_pylist()
    data: dict[str, bytes] = {}
    for shard in sorted({r["shard"] for r in rows}):
        with tarfile.open(harvest / "shards" / f"{shard}.tar") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    data[key] = tar.extractfile(member).read()  # type: ignore[union-attr]
    for r in rows:
        r["image"] = data[r["image_key"]]
    return rows


def job_work(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Samples, distinct images and distinct captions (one encode each), and (shard, caption) pairs."""
    return {"samples": len(rows), "images": len({r["sha256"] for r in rows}),
            "captions": len({r["caption"] for r in rows}),
            "shard_captions": len({(r["shard"], r["caption"]) for r in rows})}


# ---- the bare loop ----------------------------------------------------------------------------------------

def load_model() -> tuple[Any, Any, Any, float]:
    import open_clip
    import torch

    torch.set_num_threads(CLIP["threads"])
    start = time.perf_counter()
    torch.manual_seed(CLIP["seed"])
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP["model"], pretrained=None,
                                                                 precision="fp32", device="cpu")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(CLIP["model"]), time.perf_counter() - start


def bare_loop(model: Any, preprocess: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode + preprocess + encode the distinct images and captions in batches of 32; cosine per sample."""
    import torch
    from PIL import Image

    batch = CLIP["batch_size"]
    start = time.perf_counter()
    images = {r["sha256"]: r["image"] for r in rows}
    texts = sorted({r["caption"] for r in rows})
    image_emb: dict[str, np.ndarray] = {}
    shas = list(images)
    with torch.no_grad():
        for a in range(0, len(shas), batch):
            chunk = shas[a:a + batch]
            tensors = []
            for sha in chunk:
                with Image.open(io.BytesIO(images[sha])) as im:
                    tensors.append(preprocess(im.convert("RGB")))
            feats = torch.nn.functional.normalize(model.encode_image(torch.stack(tensors)), dim=-1).numpy()
            image_emb.update(zip(chunk, feats, strict=True))
        image_s = time.perf_counter() - start
        text_emb: dict[str, np.ndarray] = {}
        for a in range(0, len(texts), batch):
            chunk = texts[a:a + batch]
            feats = torch.nn.functional.normalize(model.encode_text(tokenizer(chunk)), dim=-1).numpy()
            text_emb.update(zip(chunk, feats, strict=True))
    scores = [float(np.dot(image_emb[r["sha256"]], text_emb[r["caption"]])) for r in rows]
    seconds = time.perf_counter() - start
    assert len(scores) == len(rows) and all(np.isfinite(scores))
    return {"seconds": seconds, "image_s": image_s, "text_s": seconds - image_s, "images": len(shas),
            "captions": len(texts)}


def phash_seconds(rows: list[dict[str, Any]]) -> float:
    """Time of the perceptual hashes the job also computes (one per distinct image), for context."""
    from pipeline.curation.dedup import perceptual_hash

    start = time.perf_counter()
    for data in {r["sha256"]: r["image"] for r in rows}.values():
        perceptual_hash(data)
    return time.perf_counter() - start


# ---- measuring --------------------------------------------------------------------------------------------

def wait_quiet(max_cores: float, patience_s: float) -> float:
    """Wait for a quiet machine (benchmarks/_measure.py) with this benchmark's sampling."""
    return _measure.wait_quiet(max_cores, patience_s, warn=True)


def clip_job(params: Path) -> dict[str, Any]:
    """`text2earth clip` in a subprocess: job and wall seconds, peak RSS, CPU other processes used meanwhile."""
    metrics = params.with_suffix(".metrics.json")
    cmd = [sys.executable, "-m", "stages.cli", "clip", "--params", str(params), "--no-progress",
           "--metrics", str(metrics)]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = busy_cpu_s()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monitor = PeakRss(proc.pid)
    monitor.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    monitor.done.set()
    monitor.join()
    if proc.returncode:
        raise RuntimeError(f"clip failed:\n{err[-3000:]}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
    other = max(0.0, busy_cpu_s() - busy_before - ours)
    m = re.search(r"clip: (\d+) rows in, (\d+) written .* in ([\d.]+) s", out)
    assert m, out + err[-2000:]
    assert "already done" not in out, "a benchmark run must not resume an earlier one"
    return {"rows": int(m[1]), "kept": int(m[2]), "job_s": float(m[3]), "wall_s": wall,
            "peak_rss_gib": monitor.peak / 2**30, "cpu_s": ours, "other_cores": other / wall,
            "metrics": json.loads(metrics.read_text())}


def cache_state(cache: Path) -> dict[str, Any]:
    """Entries per kind and the newest modification time in the embedding cache."""
    files = [p for p in cache.rglob("*.npy")]
    kinds = {"image": 0, "text": 0}
    for p in files:
        kinds[p.parent.parent.name] += 1
    return {**kinds, "newest": max((p.stat().st_mtime for p in files), default=0.0)}


def run_stage(params: Path, stage: str) -> None:
    cmd = [sys.executable, "-m", "stages.cli", stage, "--params", str(params), "--no-progress",
           "--metrics", str(params.with_suffix(f".{stage}.json"))]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)


def _median(values: list[float]) -> float:
    return float(np.median(values))


def timed_bare(model: Any, preprocess: Any, tokenizer: Any, rows: list[dict[str, Any]], quiet_cores: float,
               patience: float) -> dict[str, Any]:
    """The bare loop in this process: its time, this process's peak RSS, and other processes' CPU meanwhile."""
    quiet = wait_quiet(quiet_cores, patience)
    busy_before, own_before = busy_cpu_s(), sum(psutil.Process().cpu_times()[:2])
    rss = PeakRss(os.getpid())
    rss.start()
    r = bare_loop(model, preprocess, tokenizer, rows)
    rss.done.set()
    rss.join()
    own = sum(psutil.Process().cpu_times()[:2]) - own_before
    r.update({"peak_rss_gib": rss.peak / 2**30, "quiet_before_cores": quiet,
              "other_cores": max(0.0, busy_cpu_s() - busy_before - own) / r["seconds"]})
    return r


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the input, then interleave bare loops and cold / warm Beam runs."""
    code = code_state()
    with tempfile.TemporaryDirectory(prefix="t2e-bench-clip-") as tmpdir:
        tmp = Path(tmpdir)
        harvest = make_harvest(tmp, args.copies)
        prepared = tmp / "prepared"
        prep_params = write_params(tmp, harvest, "prep", prepared, tmp / "cache-prep")
        for stage in ("geo", "caption"):
            run_stage(prep_params, stage)
        rows = samples(prepared, harvest)
        work = job_work(rows)
        print(f"input: {work}", file=sys.stderr)
        model, preprocess, tokenizer, load_s = load_model()
        bare_loop(model, preprocess, tokenizer, rows[:64])  # warm-up: allocator, one-time torch init
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "cold": [], "warm": []}
        phash: list[float] = []
        for rep in range(args.repeats):  # interleaved, so machine noise hits every variant alike
            runs["bare"].append(timed_bare(model, preprocess, tokenizer, rows, args.quiet_cores, args.patience))
            print(f"run {rep} bare: {runs['bare'][-1]}", file=sys.stderr)
            for variant in ("cold", "warm"):
                out_dir = tmp / f"cur-{variant}-{rep}"
                shutil.copytree(prepared / "caption", out_dir / "caption")
                cache = tmp / f"cache-{rep}"  # warm reuses the cache its cold run filled
                params = write_params(tmp, harvest, f"{variant}-{rep}", out_dir, cache)
                state = cache_state(cache) if cache.exists() else {"image": 0, "text": 0, "newest": 0.0}
                quiet = wait_quiet(args.quiet_cores, args.patience)
                started = time.time()
                r = clip_job(params)
                after = cache_state(cache)
                r.update({"quiet_before_cores": quiet, "cache_images": after["image"], "cache_texts": after["text"],
                          "cache_entries_written": (after["image"] + after["text"]) - (state["image"] + state["text"]),
                          "cache_rewritten": after["newest"] >= started, "code": code_state()})
                assert r["rows"] == r["kept"] == len(rows), r
                if variant == "warm":
                    assert r["cache_entries_written"] == 0 and not r["cache_rewritten"], "warm run embedded"
                else:
                    assert (after["image"], after["text"]) == (work["images"], work["captions"]), (after, work)
                runs[variant].append(r)
                shutil.rmtree(out_dir)
                print(f"run {rep} {variant}: { {k: v for k, v in r.items() if k != 'metrics'} }", file=sys.stderr)
            shutil.rmtree(tmp / f"cache-{rep}")
            phash.append(phash_seconds(rows))
    if code_state() != code:
        print(f"warning: the code changed during the benchmark ({code} -> {code_state()})", file=sys.stderr)
    n = work["samples"]
    result: dict[str, Any] = {
        "copies": args.copies, "work": work, "clip": CLIP, "bare_model_load_s": load_s,
        "phash_s": _median(phash), "phash_runs_s": phash, "runs": runs, "machine": machine_line(code),
    }
    result["bare"] = {k: _median([r[k] for r in runs["bare"]]) for k in ("seconds", "image_s", "text_s")}
    result["bare"]["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs["bare"])
    for variant in ("cold", "warm"):
        result[variant] = {k: _median([r[k] for r in runs[variant]]) for k in ("job_s", "wall_s", "cpu_s")}
        result[variant]["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs[variant])
    # the target's ratio, per interleaved repetition (the cold run right after its bare loop)
    result["ratio_runs"] = [(n / c["job_s"]) / (n / b["seconds"]) for b, c in zip(runs["bare"], runs["cold"],
                                                                                  strict=True)]
    result["ratio"] = _median(result["ratio_runs"])
    result["other_cores_max"] = max(r["other_cores"] for v in runs.values() for r in v)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the sample harvest (126 chips each)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="wait before each timed run until other processes use fewer cores than this")
    parser.add_argument("--patience", type=float, default=900, help="longest wait for a quiet machine, s")
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: rebuild the table from benchmarks/results/clip_score.json")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    saved = REPO / "benchmarks" / "results" / "clip_score.json"
    if args.rerender:
        result = json.loads(saved.read_text())
    else:
        if not (SAMPLE_HARVEST / "metadata").is_dir():
            sys.exit(f"no sample harvest in {SAMPLE_HARVEST}: run `dvc repro harvest` first")
        result = measure(args)
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if args.write:
        update_results(table, "clip")


def code_state() -> str:
    """The last commit that changed pipeline/ or stages/, and whether they have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "pipeline", "stages")
    last = git("log", "-1", "--format=%h", "--", "pipeline", "stages")  # later commits change no measured code
    return f"pipeline code of {last}" + (" + uncommitted changes" if dirty else "")


def machine_line(code: str) -> str:
    cpu = platform.processor() or platform.machine()
    return (f"Machine: {os.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}, {code}; CPU only")


def render(r: dict[str, Any]) -> str:
    w = r["work"]
    n = w["samples"]
    bare_rate = n / r["bare"]["seconds"]
    cold, warm = r["cold"], r["warm"]
    runs = ", ".join(f"{x:.2f}" for x in r["ratio_runs"])
    entries = [x["cache_entries_written"] for x in r["runs"]["cold"]]
    lines = [
        f"{r['machine']}; medians of {len(r['runs']['bare'])} interleaved runs; other processes used at most "
        f"{r['other_cores_max']:.2f} cores during a timed run.", "",
        f"Input: {n:,} samples ({r['copies']}x the sample harvest): {w['images']:,} distinct images, "
        f"{w['captions']} distinct captions (in {w['shard_captions']} distinct (shard, caption) pairs).", "",
        "| variant | embedded (images + captions) | images/s (job time) | images/s (wall) | vs bare loop "
        "| peak RSS GiB | CPU s |",
        "|---|---|---|---|---|---|---|",
        f"| bare open_clip loop | {w['images']:,} + {w['captions']} | {bare_rate:.2f} | – | 1.00 | "
        f"{r['bare']['peak_rss_gib']:.2f} (benchmark process) | – |",
        f"| Beam `clip`, cold cache | {max(entries):,} cache entries | {n / cold['job_s']:.2f} | "
        f"{n / cold['wall_s']:.2f} | **{r['ratio']:.2f}** (runs: {runs}) | {cold['peak_rss_gib']:.2f} | "
        f"{cold['cpu_s']:.0f} |",
        f"| Beam `clip`, warm cache | 0 (no cache entry written) | {n / warm['job_s']:.1f} | "
        f"{n / warm['wall_s']:.1f} | {r['bare']['seconds'] / warm['job_s']:.1f} | {warm['peak_rss_gib']:.2f} | "
        f"{warm['cpu_s']:.0f} |",
        "",
        f"Bare loop {r['bare']['seconds']:.1f} s (images {r['bare']['image_s']:.1f} s, captions "
        f"{r['bare']['text_s']:.1f} s; model load {r['bare_model_load_s']:.1f} s not counted). Perceptual hashes, "
        f"which the job also computes: {r['phash_s']:.1f} s. Cold job {cold['job_s']:.1f} s (wall "
        f"{cold['wall_s']:.1f} s), warm job {warm['job_s']:.1f} s (wall {warm['wall_s']:.1f} s).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
