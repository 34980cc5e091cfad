"""Training: DCA drop rates, the loss, checkpoints, exact resume after a kill, 2-process DDP on CPU, the
exported model and `text2earth generate`, and a training run that leaves git untouched."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from model.config import NULL_LEVEL, TrainParams, gsd_level

REPO = Path(__file__).resolve().parents[2]
CHIP_PX = 64  # test chips are downsized so a step takes a fraction of a second on two cores


# --- helpers and fixtures ---------------------------------------------------------------------------------------


def write_chips(published: str, out: Path, count: int = 8, size: int = CHIP_PX) -> str:
    """A shard of the first `count` published training chips, downsized to `size` px (GSD scaled, level redone)."""
    from PIL import Image

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((Path(published) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                samples.setdefault(key, {})[ext] = data
    chosen = [k for k, s in samples.items() if json.loads(s["json"]).get("split", "train") == "train"][:count]
    assert len(chosen) == count, "the published sample has too few training chips"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        for key in chosen:
            meta = json.loads(samples[key]["json"])
            image_ext = next(e for e in ("jpg", "png", "webp") if e in samples[key])
            with Image.open(io.BytesIO(samples[key][image_ext])) as image:
                scale = image.size[0] / size
                small = image.convert("RGB").resize((size, size), Image.Resampling.BOX)
            if meta.get("gsd_m"):
                meta["gsd_m"] *= scale
                meta["level"] = gsd_level(meta["gsd_m"])
            png = io.BytesIO()
            small.save(png, format="PNG")
            members = (("png", png.getvalue()), ("txt", samples[key]["txt"]), ("json", json.dumps(meta).encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(out)


def tiny_params(tmp: Path, shards: str, **overrides: Any) -> TrainParams:
    """The tiny model on 64-px chips, writing everything under `tmp`."""
    values: dict[str, Any] = {
        "shards": shards, "output_dir": str(tmp / "model"), "checkpoint_dir": str(tmp / "checkpoints"),
        "size": "tiny", "resolution": CHIP_PX, "batch_size": 4, "max_steps": 6, "learning_rate": 1e-3,
        "lr_warmup_steps": 2, "checkpoint_every": 3, "keep_checkpoints": 10, "validation_prompts": ["a river"],
        "validation_levels": [15], "validation_steps": 2, "seed": 7,
        "threads": 2,  # CPU sums split by thread: runs compared bit for bit must use the same count
    }
    values.update(overrides)
    return TrainParams.model_validate(values)


def write_params_file(path: Path, params: TrainParams) -> Path:
    path.write_text(yaml.safe_dump({"train": params.model_dump(mode="json")}))
    return path


def reset_accelerate() -> None:
    """Each in-process run gets fresh accelerate singletons (they outlive an Accelerator otherwise)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Any:
    reset_accelerate()
    yield


@pytest.fixture(scope="module")
def chips8(published: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_chips(published, tmp_path_factory.mktemp("chips") / "chips-000000.tar")


def load_checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def ema_weights(folder: Path) -> dict[str, torch.Tensor]:
    shadow = torch.load(folder / "ema.pt", weights_only=True)["shadow_params"]
    return {str(i): t for i, t in enumerate(shadow)}


def unet_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((model_dir / "unet").glob("*.safetensors"))))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def git_state(repo: Path) -> dict[str, str]:
    """HEAD, every ref (experiments live under refs/exps), the index and the tracked files' status."""
    return {"head": git(repo, "rev-parse", "HEAD"), "refs": git(repo, "for-each-ref"),
            "index": git(repo, "ls-files", "--stage"), "tracked": git(repo, "status", "--porcelain",
                                                                       "--untracked-files=no")}


def make_git_repo(path: Path, with_dvc: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "test")
    (path / "README.md").write_text("test\n")
    if with_dvc:
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return path


# --- DCA, draws and loss (fast) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("p_text", "p_res"), [(0.1, 0.1), (0.05, 0.3)])
def test_dca_drop_rates_match_p_text_and_p_res(p_text: float, p_res: float) -> None:
    from model.objective import step_draws, step_seed

    batches, batch = 4000, 8
    drops = [step_draws(step_seed(0, i, 0), (batch, 1, 1, 1), num_train_timesteps=1000, p_text=p_text, p_res=p_res)
             for i in range(batches)]
    text = torch.cat([d.drop_text for d in drops]).float()
    res = torch.cat([d.drop_res for d in drops]).float()
    n = batches * batch
    for measured, p in ((text.mean().item(), p_text), (res.mean().item(), p_res)):
        assert abs(measured - p) < 4 * math.sqrt(p * (1 - p) / n), (measured, p)
    both = (text * res).mean().item()  # independent: the joint rate is the product
    assert abs(both - p_text * p_res) < 4 * math.sqrt(p_text * p_res / n) + 1e-3


def test_draws_depend_only_on_seed_batch_and_rank() -> None:
    from model.objective import step_draws, step_seed

    def draw(seed: int, index: int, rank: int) -> torch.Tensor:
        return step_draws(step_seed(seed, index, rank), (2, 4, 8, 8), num_train_timesteps=1000, p_text=0.5,
                          p_res=0.5).noise

    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


def test_apply_dca_nulls_exactly_the_dropped_samples() -> None:
    from model.objective import apply_dca

    text = torch.randn(4, 77, 16)
    null = torch.randn(1, 77, 16)
    levels = torch.tensor([12, 15, 17, 0])
    gsd = torch.tensor([32.0, 4.0, 1.0, math.nan])
    drop_text = torch.tensor([True, False, False, True])
    drop_res = torch.tensor([False, True, False, False])
    out_text, out_levels, out_gsd, out_meta = apply_dca(text, null, levels, drop_text, drop_res, gsd_m=gsd,
                                                        metadata={"lon": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    assert torch.equal(out_text[0], null[0]) and torch.equal(out_text[3], null[0])
    assert torch.equal(out_text[1], text[1]) and torch.equal(out_text[2], text[2])
    assert out_levels.tolist() == [12, NULL_LEVEL, 17, 0]
    assert math.isnan(out_gsd[1]) and out_gsd[0] == 32.0  # type: ignore[index]
    assert out_meta is not None and math.isnan(out_meta["lon"][1]) and out_meta["lon"][2] == 3.0


def test_training_loss_sees_the_dropped_conditions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring: with p = 1 every sample reaches the UNet with the empty prompt and level 0, with p = 0 none."""
    from accelerate import Accelerator

    from model import train as train_module
    from model.components import training_scheduler
    from model.frozen import Frozen

    seen: dict[str, torch.Tensor] = {}

    def fake_predict_noise(unet: Any, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                           levels: torch.Tensor, **_: Any) -> torch.Tensor:
        seen.update(text=text, levels=levels)
        return torch.zeros_like(latents)

    monkeypatch.setattr("model.unet.predict_noise", fake_predict_noise)
    null = torch.full((1, 77, 8), -1.0)
    batch = {"latents": torch.randn(6, 4, 8, 8), "text_embeds": torch.ones(6, 77, 8),
             "level": torch.full((6,), 15), "gsd_m": torch.full((6,), 4.0)}
    for p, text_value, level in ((1.0, -1.0, NULL_LEVEL), (0.0, 1.0, 15)):
        params = TrainParams.model_validate({"p_text_drop": p, "p_res_drop": p, "snr_gamma": None})
        run = train_module.TrainingRun(params, Accelerator(cpu=True), {"scheduler": training_scheduler()},
                                       unet=None, bare_unet=None, optimizer=None, lr_scheduler=None, ema=None,
                                       frozen=Frozen(None, None, null, None), metadata_fields=[])
        loss = run.batch_loss(batch, seed=3)
        assert torch.isfinite(loss)
        assert (seen["text"] == text_value).all()
        assert (seen["levels"] == level).all()


def test_min_snr_weighting_matches_the_formula() -> None:
    from model.components import training_scheduler
    from model.objective import diffusion_loss

    scheduler = training_scheduler()
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(diffusion_loss(pred, target, timesteps, scheduler, 5.0), expected, rtol=1e-5)
    assert torch.allclose(diffusion_loss(pred, target, timesteps, scheduler, None), per_sample.mean())


def test_eight_bit_adam_without_bitsandbytes_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from model.train import make_optimizer
    from pipeline.errors import ParamsError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails even where it is installed
    params = TrainParams.model_validate({"adam_8bit": True})
    with pytest.raises(ParamsError, match="pip install bitsandbytes"):
        make_optimizer(params, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))


# --- checkpoints (fast, with a stand-in accelerator) ------------------------------------------------------------


class FakeAccelerator:
    """The part of accelerate's API checkpointing uses; `fail_save` simulates a kill in the middle of a save."""

    is_main_process = True
    num_processes = 1
    device = torch.device("cpu")

    def __init__(self, fail_save: bool = False) -> None:
        self.fail_save = fail_save
        self.loaded: list[str] = []

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.fail_save:
            raise KeyboardInterrupt("killed mid-save")

    def load_state(self, path: str) -> None:
        self.loaded.append(path)


def test_checkpoints_rotate_and_latest_skips_incomplete_ones(tmp_path: Path) -> None:
    from model.checkpoint import complete_checkpoints, latest_checkpoint, resolve_resume, save_checkpoint

    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        save_checkpoint(FakeAccelerator(), root, step, ema=None, keep=2)
    assert [s for s, _ in complete_checkpoints(root)] == [4, 6]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(fail_save=True), root, 8, ema=None, keep=2)
    (root / "checkpoint-10").mkdir()  # a folder without state.json (copied by hand, or a foreign tool)
    assert latest_checkpoint(root) == root / "checkpoint-6"
    assert resolve_resume("latest", root) == root / "checkpoint-6"
    assert resolve_resume(None, root) is None
    assert resolve_resume("latest", tmp_path / "none") is None


def test_latest_ignores_a_checkpoint_made_with_other_params(tmp_path: Path) -> None:
    """`--resume latest` in `dvc repro` must not continue a run whose params have since changed."""
    from model.checkpoint import clear_checkpoints, complete_checkpoints, resolve_resume, save_checkpoint

    save_checkpoint(FakeAccelerator(), tmp_path, 4, ema=None, keep=2, extra={"params_fingerprint": "aaa"})
    assert resolve_resume("latest", tmp_path, "aaa") == tmp_path / "checkpoint-4"
    assert resolve_resume("latest", tmp_path, "bbb") is None
    assert resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path, "bbb") == tmp_path / "checkpoint-4"
    assert clear_checkpoints(tmp_path) == 1 and complete_checkpoints(tmp_path) == []


def test_params_fingerprint_changes_with_what_a_step_computes_only() -> None:
    from model.checkpoint import params_fingerprint

    params = TrainParams.model_validate({})
    same = params.model_copy(update={"max_steps": 9999, "threads": 1, "validation_levels": [12]})
    assert params_fingerprint(same) == params_fingerprint(params)
    for change in ({"learning_rate": 2e-4}, {"seed": 1}, {"shards": "other-{000000..000001}.tar"}):
        assert params_fingerprint(params.model_copy(update=change)) != params_fingerprint(params)
    cosine = params.model_copy(update={"lr_scheduler": "cosine"})  # decays towards max_steps: a longer run differs
    assert params_fingerprint(cosine.model_copy(update={"max_steps": 9999})) != params_fingerprint(cosine)


def test_republished_shards_or_new_model_code_start_a_fresh_run(tmp_path: Path) -> None:
    from model.checkpoint import params_fingerprint

    params = TrainParams.model_validate({})
    shard = tmp_path / "git10m-000000.tar"
    shard.write_bytes(b"x" * 10)
    before = params_fingerprint(params, [str(shard)])
    assert params_fingerprint(params, [str(shard)]) == before
    shard.write_bytes(b"x" * 11)  # publish re-ran with other settings
    assert params_fingerprint(params, [str(shard)]) != before
    assert params_fingerprint(params, code=True) != params_fingerprint(params)


def test_resume_from_a_bad_path_names_the_choices(tmp_path: Path) -> None:
    from model.checkpoint import resolve_resume, save_checkpoint
    from pipeline.errors import ParamsError

    save_checkpoint(FakeAccelerator(), tmp_path, 3, ema=None, keep=2)
    with pytest.raises(ParamsError, match="checkpoint-3"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)


def test_checkpoint_round_trips_the_ema(tmp_path: Path) -> None:
    from diffusers.training_utils import EMAModel

    from model.checkpoint import load_checkpoint, save_checkpoint

    weights = [torch.nn.Parameter(torch.randn(3))]
    ema = EMAModel(weights, decay=0.9)
    weights[0].data += 1
    ema.step(weights)
    path = save_checkpoint(FakeAccelerator(), tmp_path, 5, ema=ema, keep=2, extra={"seed": 1})
    other = EMAModel([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    state = load_checkpoint(FakeAccelerator(), path, ema=other)
    assert state["step"] == 5 and state["seed"] == 1
    assert torch.equal(other.shadow_params[0], ema.shadow_params[0])
    assert other.optimization_step == ema.optimization_step


# --- DVCLive (fast) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_dvc", [False, True], ids=["git-only", "git+dvc"])
def test_dvclive_logging_never_changes_git(tmp_path: Path, with_dvc: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain DVCLive would `dvc init` the git-only repository and save experiment refs in both."""
    from model.train_log import files_only_live

    repo = make_git_repo(tmp_path / "repo", with_dvc)
    before = git_state(repo)
    monkeypatch.chdir(repo)
    live = files_only_live("dvclive", 0)
    for step in range(1, 4):
        live.step = step
        live.log_metric("train/loss", 1.0 / step)
        live.next_step()
    live.end()
    assert git_state(repo) == before
    assert (repo / ".dvc").exists() == with_dvc
    rows = (repo / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["step", "1", "2", "3"]


def test_resumed_logging_drops_the_steps_trained_again(tmp_path: Path) -> None:
    from model.train_log import files_only_live

    live = files_only_live(str(tmp_path / "live"), 0)
    for step in range(1, 6):
        live.step = step
        live.log_metric("train/loss", float(step))
        live.next_step()
    live = files_only_live(str(tmp_path / "live"), 3)  # the checkpoint held step 3; steps 4, 5 are trained again
    live.step = 4
    live.log_metric("train/loss", 40.0)
    live.next_step()
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["step", "1", "2", "3", "4"]
    assert rows[-1].endswith("40.0")


# --- training runs (slow) ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(chips8: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """12 uninterrupted steps (checkpoints every 3), run inside a git repository with DVC, from its root."""
    from model.train import train

    repo = make_git_repo(tmp_path_factory.mktemp("reference") / "repo", with_dvc=True)
    before = git_state(repo)
    params = tiny_params(repo, chips8, max_steps=12, output_dir="models/text2earth", checkpoint_dir="checkpoints")
    cwd = os.getcwd()
    os.chdir(repo)
    reset_accelerate()
    try:
        summary = train(params, progress=False, live_dir="dvclive", samples_path="metrics/train_samples.png")
    finally:
        os.chdir(cwd)
    return {"repo": repo, "params": params, "summary": summary, "git_before": before, "git_after": git_state(repo)}


@pytest.mark.slow
def test_a_training_run_never_changes_git_state(reference_run: dict[str, Any]) -> None:
    repo = reference_run["repo"]
    assert reference_run["git_after"] == reference_run["git_before"]
    untracked = set(git(repo, "status", "--porcelain").split("\n")) - {""}
    assert untracked <= {"?? checkpoints/", "?? dvclive/", "?? metrics/", "?? models/"}, untracked
    loss_rows = (repo / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(loss_rows) == 1 + 12
    for name in ("lr", "grad_norm", "samples_per_s"):
        assert (repo / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv").is_file()


@pytest.mark.slow
def test_stop_after_a_checkpoint_then_resume_gives_the_same_weights(reference_run: dict[str, Any],
                                                                     chips8: str, tmp_path: Path) -> None:
    from model.train import train

    ref_dir = reference_run["repo"]
    params = tiny_params(tmp_path, chips8, max_steps=6)  # stops right after checkpoint-6
    train(params, progress=False, live_dir=str(tmp_path / "live"), samples_path=None)
    reset_accelerate()
    shutil.rmtree(tmp_path / "live")  # `dvc repro` deletes the stage's outputs before it runs: the checkpoint has them
    summary = train(params.model_copy(update={"max_steps": 12}), resume="latest", progress=False,
                    live_dir=str(tmp_path / "live"), samples_path=None)
    assert summary["start_step"] == 6 and summary["steps_run"] == 6
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(1, 13)), rows  # the whole history, once
    ours, reference = tmp_path / "checkpoints" / "checkpoint-12", ref_dir / "checkpoints" / "checkpoint-12"
    assert_same_tensors(load_checkpoint_weights(ours), load_checkpoint_weights(reference))
    assert_same_tensors(ema_weights(ours), ema_weights(reference))
    assert_same_tensors(unet_weights(tmp_path / "model"), unet_weights(ref_dir / "models" / "text2earth"))


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_latest_gives_the_same_weights(reference_run: dict[str, Any],
                                                                        chips8: str, tmp_path: Path) -> None:
    ref_dir = reference_run["repo"]
    params = tiny_params(tmp_path, chips8, max_steps=12)
    params_file = write_params_file(tmp_path / "params.yaml", params)
    command = [sys.executable, "-m", "stages.cli", "train", "--params", str(params_file), "--no-progress",
               "--metrics", str(tmp_path / "train.json"), "--samples", str(tmp_path / "grid.png"),
               "--live-dir", str(tmp_path / "live")]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoints" / "checkpoint-3").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    time.sleep(0.3)  # into step 4 or 5 (or the next save): anywhere is fine
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model").exists(), "the run finished before the kill; make the test's run longer"
    from model.checkpoint import complete_checkpoints

    resumed_from = complete_checkpoints(tmp_path / "checkpoints")[-1][0]
    assert 3 <= resumed_from < 12
    subprocess.run([*command, "--resume", "latest"], cwd=REPO, check=True, capture_output=True)
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["start_step"] == resumed_from
    assert_same_tensors(load_checkpoint_weights(tmp_path / "checkpoints" / "checkpoint-12"),
                        load_checkpoint_weights(ref_dir / "checkpoints" / "checkpoint-12"))
    assert_same_tensors(unet_weights(tmp_path / "model"), unet_weights(ref_dir / "models" / "text2earth"))
    loss_rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in loss_rows[1:]] == list(range(1, 13))


@pytest.mark.slow
def test_the_exported_model_loads_and_generate_writes_pngs(reference_run: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    from model import Text2EarthPipeline
    from stages.cli import main

    model_dir = reference_run["repo"] / "models" / "text2earth"
    pipeline = Text2EarthPipeline.from_pretrained(model_dir)
    assert pipeline.unet.config.class_embed_type == "timestep"
    grid = Image.open(reference_run["repo"] / "metrics" / "train_samples.png")
    assert grid.size[0] > 256 and grid.size[1] > 256
    out = tmp_path / "out"
    assert main(["generate", "a river through farmland", "--level", "15", "-n", "4", "--out", str(out),
                 "--model", str(model_dir), "--steps", "2", "--seed", "5"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    for i, path in enumerate(files):
        with Image.open(path) as image:
            assert image.size == (256, 256)
            text = getattr(image, "text", {})  # PNG text chunks
            assert text["prompt"] == "a river through farmland"
            assert text["level"] == "15"
            assert text["seed"] == str(5 + i)
            assert text["model"] == str(model_dir)
            assert text["scheduler"]


@pytest.mark.slow
def test_the_tiny_model_overfits_eight_chips(chips8: str, tmp_path: Path) -> None:
    """Loss on the 8 chips (fixed noise and timesteps) falls by at least half: the whole loop learns."""
    from safetensors.torch import load_file

    from model.data import training_stream
    from model.train import prepare_training, train

    params = tiny_params(tmp_path, chips8, max_steps=200, checkpoint_every=200, p_text_drop=0.0, p_res_drop=0.0,
                         lr_warmup_steps=5)

    def fixed_draw_loss(run: Any) -> float:
        """Mean loss over 16 of the chips' augmented samples with fixed noise, timesteps (the same each call)."""
        stream = training_stream(params, run.components["tokenizer"], seed=99)
        batches = [next(stream) for _ in range(4)]
        with torch.no_grad():
            return float(np.mean([run.batch_loss(b, seed=1000 + i).item() for i, b in enumerate(batches)]))

    before = fixed_draw_loss(prepare_training(params))
    reset_accelerate()
    summary = train(params, progress=False, live_dir=str(tmp_path / "live"), samples_path=None)
    reset_accelerate()
    run = prepare_training(params)
    run.bare_unet.load_state_dict(load_file(str(next((tmp_path / "model" / "unet").glob("*.safetensors")))))
    after = fixed_draw_loss(run)
    assert after <= 0.5 * before, (before, after, summary)
    assert summary["final_loss"] < summary["first_loss"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_and_exports(chips8: str, tmp_path: Path) -> None:
    params = tiny_params(tmp_path, chips8, max_steps=2, checkpoint_every=2)
    params_file = write_params_file(tmp_path / "params.yaml", params)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "stages.cli", "train", "--params", str(params_file),
         "--no-progress", "--metrics", str(tmp_path / "train.json"), "--samples", str(tmp_path / "grid.png"),
         "--live-dir", str(tmp_path / "live")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["num_processes"] == 2 and summary["effective_batch_size"] == 2 * params.batch_size
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (tmp_path / "model" / "model_index.json").is_file()


@pytest.mark.slow
def test_channels_last_trains_like_the_default_layout_and_exports_plain_weights(chips8: str, tmp_path: Path) -> None:
    """NHWC is a speed setting: same weights up to rounding, checkpoints resume, the export loads anywhere."""
    from model import Text2EarthPipeline
    from model.train import train

    weights = {}
    for channels_last in (False, True):
        reset_accelerate()
        params = tiny_params(tmp_path / str(channels_last), chips8, max_steps=4, checkpoint_every=2,
                             channels_last=channels_last)
        train(params, progress=False, live_dir=str(tmp_path / str(channels_last) / "live"), samples_path=None)
        weights[channels_last] = unet_weights(tmp_path / str(channels_last) / "model")
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[True].items():
        assert tensor.is_contiguous(), name
        torch.testing.assert_close(tensor, weights[False][name], rtol=1e-4, atol=1e-4)
    reset_accelerate()
    params = tiny_params(tmp_path / "True", chips8, max_steps=6, checkpoint_every=2, channels_last=True)
    summary = train(params, resume="latest", progress=False, live_dir=str(tmp_path / "True" / "live"),
                    samples_path=None)
    assert summary["start_step"] == 4 and summary["steps_run"] == 2
    pipeline = Text2EarthPipeline.from_pretrained(tmp_path / "True" / "model")
    assert pipeline.unet.conv_in.weight.is_contiguous()


def test_a_run_resumed_at_its_last_step_keeps_the_recorded_figures(tmp_path: Path) -> None:
    from stages.train import with_earlier_figures

    metrics = tmp_path / "train.json"
    base = {"steps": 300, "size": "tiny", "output_dir": "models/text2earth", "task": "text2image"}
    metrics.write_text(json.dumps({**base, "steps_run": 300, "final_loss": 0.33, "samples_per_s": 4.1,
                                   "seconds": 300.0}))
    resumed = {**base, "steps_run": 0, "start_step": 300, "final_loss": None, "samples_per_s": 0.0, "seconds": 20.0}
    kept = with_earlier_figures(resumed, metrics)
    assert (kept["final_loss"], kept["samples_per_s"], kept["seconds"], kept["start_step"]) == (0.33, 4.1, 300.0, 300)
    assert with_earlier_figures({**resumed, "steps": 400}, metrics)["final_loss"] is None  # other steps: not the same
    assert with_earlier_figures({**resumed, "steps_run": 5, "final_loss": 0.2}, metrics)["final_loss"] == 0.2
