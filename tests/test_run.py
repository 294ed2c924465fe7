"""One cell end to end (`bench.py run`): pretrain -> evaluate, resume after SIGKILL, failures, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import micro_config
from harness.config import load_config, parse_assignments
from harness.core.errors import ConfigError
from harness.run.runner import run
from harness.train.metrics_log import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def bench(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "bench.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


# --- config --------------------------------------------------------------------------------------

def test_config_yaml_round_trip_overrides_and_ids(tmp_path):
    cfg = load_config(None, parse_assignments(["model.mask_ratio=0.9", "eval.protocols=[knn]"]))
    again = load_config(write_config(tmp_path / "c.yaml", cfg.to_dict()))
    assert again == cfg and again.run_id() == cfg.run_id()
    assert cfg.model.mask_ratio == 0.9 and cfg.eval.protocols == ("knn",)
    # the seed changes the run but not the cell; runtime settings change neither
    seeded = cfg.with_overrides({"seed": 1})
    assert seeded.run_id() != cfg.run_id() and seeded.cell_id() == cfg.cell_id()
    assert cfg.with_overrides({"runtime.num_workers": 0}).run_id() == cfg.run_id()


@pytest.mark.parametrize("pairs, words", [
    (["model.decodr=prompting"], "unknown config key 'model.decodr': did you mean model.decoder"),
    (["model.mask_ratio=abc"], "model.mask_ratio: Input should be a valid number"),
    (["model.target=clap"], "model.target: Input should be 'pixel' or 'clip'"),
    (["pretrain.batch_size"], "is not key=value"),
])
def test_bad_overrides_name_the_field(pairs, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, parse_assignments(pairs))


# --- a real run ----------------------------------------------------------------------------------

def test_micro_cell_pretrains_evaluates_and_evaluate_reads_its_checkpoint(demo_assets, tmp_path):
    data, teacher = demo_assets
    cfg = load_config(write_config(tmp_path / "cell.yaml", micro_config(data, teacher)))
    result = run(cfg, tmp_path / "run")
    assert result.state == "done"
    for key in ("linear_top1", "linear_top5", "knn_top1", "final_loss", "images_per_s", "peak_memory_mb"):
        assert key in result.metrics and result.metrics[key] == result.metrics[key]  # present, not NaN
    # cost on CPU: core-hours over pretraining and evaluation, at least the pretraining time's
    assert result.metrics["cpu_core_hours"] >= result.metrics["train_seconds"] / 3600 > 0
    assert "gpu_hours" not in result.metrics and "device_hours" not in result.metrics
    steps = 300 // 32  # 10 classes x 30 images, batch 32, one epoch
    assert logged_steps(tmp_path / "run") == list(range(1, steps + 1))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == steps and status["attempts"] == 1
    # running it again returns the stored results without training
    assert run(cfg, tmp_path / "run").metrics == json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    # the checkpoint is a regular pretraining checkpoint: `bench.py evaluate` reads it
    proc = bench("evaluate", str(tmp_path / "run" / "checkpoints" / "latest.pt"),
                 "--config", str(tmp_path / "cell.yaml"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "encoder vit_micro_patch4 at 32px" in out and "linear_top1" in out


def test_zero_epochs_evaluates_the_untrained_encoder(demo_assets, tmp_path):
    """``pretrain.epochs: 0`` (a grid's random-init reference): no training step, the untrained
    encoder is evaluated by every protocol, and the run reports its cost in CPU core-hours."""
    data, teacher = demo_assets
    config = micro_config(data, teacher, pretrain={"epochs": 0, "warmup_epochs": 0},
                          model={"target": "pixel", "masking": "random"})
    cfg = load_config(write_config(tmp_path / "cell.yaml", config))
    result = run(cfg, tmp_path / "run")
    assert result.state == "done", result.failure_reason
    for key in ("linear_top1", "linear_top5", "knn_top1"):
        assert key in result.metrics and 0.0 <= result.metrics[key] <= 100.0, key
    assert logged_steps(tmp_path / "run") == []  # no training step
    assert result.metrics["cpu_core_hours"] > 0 and "gpu_hours" not in result.metrics
    assert "device_hours" not in result.metrics
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "done" and status.get("step", 0) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["step"] == checkpoint["total_steps"] == 0
    assert result.metrics["train_seconds"] == 0 and math.isnan(result.metrics["final_loss"])  # no loss to report
    # the saved (and evaluated) encoder is the initialisation: the seed's fresh student, unchanged
    from harness.train.pretrain import build_model

    for key, value in build_model(cfg).student.state_dict().items():  # the seed's initial student
        torch.testing.assert_close(checkpoint["model"][key], value, rtol=0, atol=0, msg=key)


def test_finetune_protocol_runs_after_pretraining_and_from_evaluate(demo_assets, tmp_path):
    """The paper's headline protocol through both user paths: `run` (pretrain, then fine-tune) and
    `bench.py evaluate` on the checkpoint (it crashed on its transform's missing mean/std)."""
    data, teacher = demo_assets
    config = micro_config(data, teacher, model={"target": "pixel", "masking": "random"},
                          eval={"protocols": ["finetune"], "finetune": {"epochs": 1, "batch_size": 64,
                                                                       "warmup_epochs": 0}})
    cfg = load_config(write_config(tmp_path / "cell.yaml", config))
    result = run(cfg, tmp_path / "run")
    assert result.state == "done", result.failure_reason
    assert 0.0 <= result.metrics["finetune_top1"] <= 100.0
    proc = bench("evaluate", str(tmp_path / "run" / "checkpoints" / "latest.pt"), "--config", str(tmp_path / "cell.yaml"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "finetune_top1" in out


def test_evaluate_runs_every_protocol_on_a_checkpoint_in_the_authors_layout(demo_assets, tmp_path):
    """`bench.py evaluate` on a checkpoint laid out as the authors' training code saves it (MAE's
    checkpoint-<epoch>.pth: weights under `model`, plus optimizer, epoch, scaler and the argparse
    Namespace of arguments), made here at micro size: linear, k-NN and fine-tune all report."""
    import argparse

    from harness.milan.model import build_student

    data, teacher = demo_assets
    torch.manual_seed(0)
    student = build_student("vit_micro_patch4", img_size=32, decoder="prompting", pred_dim=48, mask_ratio=0.75)
    checkpoint = tmp_path / "checkpoint-399.pth"
    torch.save({"model": student.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_micro", epochs=400)},
               checkpoint)
    config = micro_config(data, teacher, eval={"protocols": ["linear", "knn", "finetune"],
                                               "finetune": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0}})
    proc = bench("evaluate", str(checkpoint), "--config", str(write_config(tmp_path / "cell.yaml", config)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "encoder vit_micro_patch4 at 32px" in out
    for metric in ("linear_top1", "knn_top1", "finetune_top1"):
        assert metric in out


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, delay_s: float) -> int:
    """SIGKILL ``proc`` ``delay_s`` after its checkpoint reaches ``step`` (a few steps later: a step
    that is not a checkpoint step); the step it will resume from."""
    ckpt = run_dir / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= step:
            break
        time.sleep(0.05)
    time.sleep(delay_s)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return torch.load(ckpt, weights_only=True)["step"]


def train_log(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["train/loss"], r["train/lr"]) for r in read_jsonl(run_dir / "metrics.jsonl")
            if "train/loss" in r]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_at_any_step_then_resume_computes_what_an_uninterrupted_run_computes(demo_assets, tmp_path, workers):
    """`bench.py run` killed with SIGKILL twice, mid-epoch and between checkpoints, then run again:
    the same weights, losses, log and evaluation as an uninterrupted run, to the last bit, whether
    the images are augmented in the main process or in DataLoader workers."""
    data, teacher = demo_assets
    config = micro_config(data, teacher, pretrain={"epochs": 3}, eval={"protocols": ["knn"]},
                          runtime={"num_workers": workers, "log_every": 2, "checkpoint_every": 5})
    path = write_config(tmp_path / "cell.yaml", config)
    total = 3 * (300 // 32)  # 9 steps an epoch
    killed = tmp_path / "killed"
    stops = []
    for step, delay_s in ((5, 0.3), (15, 0.5)):
        stops.append(kill_after_checkpoint(bench("run", str(path), "--out", str(killed)), killed, step, delay_s))
    assert 5 <= stops[0] < stops[1] < total, stops
    resumed = bench("run", str(path), "--out", str(killed))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming killed from step {stops[1]} of {total}" in err
    status = json.loads((killed / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 3

    clean = run(load_config(path), tmp_path / "clean")
    assert clean.state == "done"
    assert logged_steps(killed) == list(range(1, total + 1))  # each step once
    assert train_log(killed) == train_log(tmp_path / "clean")  # with the values of the attempt that counts
    final_killed = torch.load(killed / "checkpoints" / "latest.pt", weights_only=True)
    final_clean = torch.load(tmp_path / "clean" / "checkpoints" / "latest.pt", weights_only=True)
    assert final_killed["step"] == final_clean["step"] == total
    for key, value in final_clean["model"].items():
        torch.testing.assert_close(final_killed["model"][key], value, rtol=0, atol=0, msg=key)
    results = json.loads((killed / "results.json").read_text())["metrics"]
    for metric in ("final_loss", "knn_top1"):
        assert results[metric] == clean.metrics[metric], metric


def test_non_finite_loss_fails_with_a_reason(demo_assets, tmp_path):
    data, teacher = demo_assets
    cfg = load_config(write_config(tmp_path / "c.yaml", micro_config(data, teacher, pretrain={"lr": 1e12})))
    result = run(cfg, tmp_path / "run")
    assert result.state == "failed"
    assert result.failure_reason.startswith("loss became nan at step") or "inf" in result.failure_reason
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == result.failure_reason
    assert not (tmp_path / "run" / "results.json").exists()


# --- bad input: one line, exit 2, nothing trained ------------------------------------------------

def _broken_trees(tmp_path: Path, data: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    unlabeled = tmp_path / "unlabeled"  # train/ only: pretraining works, evaluation cannot
    unlabeled.mkdir()
    (unlabeled / "train").symlink_to(data / "train")
    return {"missing": tmp_path / "nope", "empty": empty, "unlabeled": unlabeled}


@pytest.mark.parametrize("case, extra, words", [
    ("key", ["--set", "model.decodr=standard"], "unknown config key 'model.decodr'"),
    ("type", ["--set", "pretrain.batch_size=many"], "pretrain.batch_size: Input should be a valid integer"),
    ("missing", [], "does not exist"),
    ("empty", [], "no class folders"),
    ("unlabeled", [], "needs a labelled validation split"),
])
def test_bad_input_is_one_line_and_exit_2_before_training(demo_assets, tmp_path, case, extra, words):
    data, teacher = demo_assets
    roots = _broken_trees(tmp_path, data)
    config = micro_config(data, teacher, data={"root": str(roots.get(case, data))})
    proc = bench("run", str(write_config(tmp_path / "c.yaml", config)), "--out", str(tmp_path / "run"), *extra)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert words in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_corrupt_checkpoint_is_named_with_the_fix(tmp_path):
    from harness.train.checkpoint import CorruptCheckpoint, load_latest

    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpoint) as err:
        load_latest(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "latest.pt") in message and "--force --cell" in message and "\n" not in message


def _wait_for_a_slow_peer(rank: int, port: int, outcome) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from harness.core.distributed import barrier, init_distributed, shutdown

    env = init_distributed(torch.device("cpu"), timeout_min=0.05)  # 3 s
    start = time.monotonic()
    try:
        if rank == 0:
            time.sleep(8)  # rank 0 "evaluates" far longer than the limit
        barrier(env)
        outcome.put((rank, "passed", time.monotonic() - start))
    except RuntimeError:
        outcome.put((rank, "timed out", time.monotonic() - start))
    finally:
        if rank == 1:
            shutdown(env)


def test_process_group_timeout_is_explicit_and_configurable():
    """runtime.dist_timeout_min bounds collectives: a rank waiting on a slow peer fails after it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    outcome = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_wait_for_a_slow_peer, args=(rank, port, outcome)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    waiting = outcome.get(timeout=120)
    assert waiting[:2] == (1, "timed out") and waiting[2] < 7
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert load_config(None, parse_assignments(["runtime.dist_timeout_min=5"])).runtime.dist_timeout_min == 5
