"""A cell's numbers are its config's and seed's, whatever happens to the run (exact resume lives in
test_run.py, test_sharing.py and test_slurm_ablate.py), and what milan-bench says is true when it is
read: no foreign results, no writes into stores that are not its own, true statuses, and every bad
input one line with exit 2 and nothing lost. Against the real parts: files on disk, SQLite stores,
processes, a full filesystem (a tmpfs mounted for the test)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import micro_config
from harness.config import load_config, parse_config
from harness.run.runner import run

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def tables(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return sorted(name for (name,) in connection.execute("select name from sqlite_master where type='table'"))


# --- a run folder belongs to one config -----------------------------------------------------------------

def test_a_folder_of_another_configs_run_is_refused_and_untouched(demo_assets, tmp_path) -> None:
    data, teacher = demo_assets
    other = parse_config(micro_config(data, teacher, pretrain={"epochs": 1}, eval={"protocols": ["knn"]}))
    assert run(other, tmp_path / "other").state == "done"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "other").rglob("*")}
    config = write_config(tmp_path / "c.yaml", {**micro_config(data, teacher, eval={"protocols": ["knn"]}), "seed": 1})
    result = bench("run", str(config), "--out", str(tmp_path / "other"))
    assert_one_line_exit_2(result, f"run folder {tmp_path / 'other'} holds run {other.run_id()} of another config")
    assert "done in" not in result.stdout and "knn_top1" not in result.stdout  # not the other run's results
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "other").rglob("*")} == before


# --- stores that are ours --------------------------------------------------------------------------------

def test_another_programs_database_is_never_written_and_a_missing_store_never_made(demo_assets, tmp_path) -> None:
    db = tmp_path / "inventory.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table items (id integer, name text)")
    uri = f"sqlite:///{db}"
    assert_one_line_exit_2(bench("ui", "--tracking-uri", uri, "--port", "5999"), "database of another program",
                           "tables items")
    assert_one_line_exit_2(bench("report", "smoke", "--tracking-uri", uri), "database of another program")
    data, teacher = demo_assets
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": micro_config(data, teacher), "random_init": False, "teacher_reference": False}))
    assert_one_line_exit_2(bench("ablate", str(grid), "--executor", "local", "--tracking-uri", uri, cwd=tmp_path),
                           "database of another program")
    assert tables(db) == ["items"]
    assert_one_line_exit_2(bench("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--port", "5998"),
                           "no MLflow store at")
    assert not (tmp_path / "none.db").exists()


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("pretrain.base_lr=inf", "pretrain.base_lr: Input should be a finite number"),
    ("pretrain.weight_decay=inf", "pretrain.weight_decay: Input should be a finite number"),
    ("pretrain.min_lr=inf", "pretrain.min_lr: Input should be a finite number"),
    ("pretrain.epochs=inf", "pretrain.epochs: Input should be a finite number"),
    ("pretrain.betas=[0.9,1.0]", "AdamW's betas lie in [0, 1)"),
    ("eval.knn.temperature=inf", "eval.knn.temperature: Input should be a finite number"),
    ("eval.knn.k=100000", "eval.knn.k=100000 is more than the 300 training images"),
    ("runtime.device=cuda", "runtime.device=cuda but no CUDA device is visible"),
])
def test_numbers_and_settings_that_cannot_run(demo_assets, tmp_path, override, expected) -> None:
    if override == "runtime.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data, teacher = demo_assets
    config = write_config(tmp_path / "c.yaml", micro_config(data, teacher))
    assert_one_line_exit_2(bench("run", str(config), "--set", override, "--out", str(tmp_path / "run")), expected)
    assert not (tmp_path / "run").exists()


def test_images_the_loader_cannot_train_on_are_found_before_training(demo_assets, tmp_path) -> None:
    data, teacher = demo_assets
    for name, spoil, expected in [
        ("corrupt", lambda f: f.write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG"), "cannot be decoded"),
        ("sixteen", lambda f: Image.new("I;16", (32, 32), 4000).save(f, format="PNG"), "is I;16 (16-bit or float)"),
    ]:
        tree = copy_tree(data, tmp_path / name)
        first = sorted((tree / "train").rglob("*.png"))[0]
        spoil(first)
        config = write_config(tmp_path / f"{name}.yaml", micro_config(tree, teacher))
        assert_one_line_exit_2(bench("run", str(config), "--out", str(tmp_path / f"run-{name}")), f"image {first}",
                               expected)
        assert not (tmp_path / f"run-{name}").exists()
    one = copy_tree(data, tmp_path / "one-class")
    for split in ("train", "val"):
        for folder in sorted((one / split).iterdir())[1:]:
            shutil.rmtree(folder)
    config = write_config(tmp_path / "one.yaml", micro_config(one, teacher, pretrain={"batch_size": 16}))
    assert_one_line_exit_2(bench("run", str(config), "--out", str(tmp_path / "run-one")), "has one class")


def test_an_image_broken_after_the_preflight_fails_the_run_in_one_line_naming_it(demo_assets, tmp_path) -> None:
    data, teacher = demo_assets
    tree = copy_tree(data, tmp_path / "tree")
    files = sorted((tree / "train").rglob("*.png"))
    victim = files[len(files) // 2 + 1]  # not among the preflight's sample of each split
    victim.write_bytes(b"\x89PNG torn")
    config = parse_config(micro_config(tree, teacher, pretrain={"epochs": 2}, runtime={"num_workers": 1}))
    from harness.data.datasets import DatasetError

    with pytest.raises(DatasetError, match=re.escape(f"image {victim} cannot be read")):
        run(config, tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"].startswith(f"image {victim} cannot be read")


def test_teacher_checkpoints_that_cannot_teach(demo_assets, tmp_path) -> None:
    import open_clip

    data, teacher = demo_assets
    empty = tmp_path / "empty.pt"
    empty.touch()
    broken = open_clip.create_model("milan-clip-micro").state_dict()
    broken["visual.proj"] = torch.full_like(broken["visual.proj"], float("nan"))
    nan = tmp_path / "nan.pt"
    torch.save(broken, nan)
    for path, expected in ((empty, "is empty (0 bytes)"), (nan, "holds non-finite weights")):
        config = write_config(tmp_path / f"{path.stem}.yaml", micro_config(data, path))
        assert_one_line_exit_2(bench("run", str(config), "--out", str(tmp_path / f"run-{path.stem}")),
                               f"teacher checkpoint {path}", expected)


def test_files_that_are_not_utf8_or_give_a_key_twice(tmp_path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert_one_line_exit_2(bench("ablate", str(latin), "--dry-run"), "is not UTF-8 text", "save it as UTF-8")
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: g\nseeds: 2\naxes:\n  model.target: [pixel, clip]\nseeds: 3\n")
    assert_one_line_exit_2(bench("ablate", str(twice), "--dry-run"), "key 'seeds' is given twice (lines 2 and 5)")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  target: pixel\n  target: clip\n")
    assert_one_line_exit_2(bench("run", str(config)), "key 'target' is given twice")


@pytest.mark.parametrize("args, expected", [
    (["status", "--lines", "0"], "--lines 0 is too small"),
    (["status", "--lines", "-3"], "--lines -3 is too small"),
    (["teacher", "demo", "--epochs", "0"], "--epochs 0 is too small"),
    (["teacher", "demo", "--epochs", "-2"], "--epochs -2 is too small"),
    (["report-bench", "--runs", "0"], "--runs 0 is too small"),
    (["report-bench", "--steps", "0"], "--steps 0 is too small"),
])
def test_counts_below_one(tmp_path, args, expected) -> None:
    assert_one_line_exit_2(bench(*args, cwd=tmp_path), expected)
    assert not list(tmp_path.iterdir())


def test_output_paths_are_checked_before_any_work(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, option in ((["teacher", "demo", "--out", str(blocker / "t.pt")], "--out's folder"),
                         (["share-bench", "--out", str(blocker / "sb")], "--out"),
                         (["report-bench", "--store", str(blocker / "s.db")], "--store's folder")):
        assert_one_line_exit_2(bench(*args, cwd=tmp_path), option, f"{blocker} is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


# --- a full disk --------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_disk(tmp_path: Path):
    """A 2 MB tmpfs (mounting needs root, which the tests and CI have)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no tmpfs could be mounted: {done.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_naming_the_path_and_the_space(demo_assets, tiny_disk, tmp_path) -> None:
    data, teacher = demo_assets
    # the mini ViT's checkpoint (weights and AdamW state) does not fit in 2 MB
    config = write_config(tmp_path / "c.yaml", micro_config(data, teacher, model={"size": "vit_mini_patch4"},
                                                            eval={"protocols": ["knn"]}))
    result = bench("run", str(config), "--out", str(tiny_disk / "run"))
    line = assert_one_line_exit_2(result, "no space left on the device of", f"{tiny_disk / 'run'}", "MB needed",
                                  "MB free")
    assert "unexpected pos" not in line
    status = json.loads((tiny_disk / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"].startswith("no space left")


# --- statuses true when read --------------------------------------------------------------------------------

def run_ablate(grid: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return bench("ablate", str(grid), "--executor", "local", "--tracking-uri", f"sqlite:///{cwd / 'store.db'}",
                 *extra, cwd=cwd, timeout=900)


def test_a_rerun_after_a_failure_ends_its_parent_run_done_after_its_cells(demo_assets, tmp_path) -> None:
    """Seed 1's cells fail (a corrupt checkpoint each), seed 0's are done; the corrupt files go and
    ablate runs again: the resubmitted cells are pending at once (never read as failed), and the new
    parent run ends FINISHED, after its last cell, not FAILED when the first job ends."""
    from harness.grid import load_grid
    from harness.tracking.store import client

    data, teacher = demo_assets
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "g", "base": micro_config(data, teacher, eval={"protocols": ["knn"]}),
                                         "axes": {"model.target": ["pixel", "clip"]}, "seeds": 2,
                                         "random_init": False, "teacher_reference": False, "resources": {"cpus_per_task": 1}}))
    cells = load_grid(grid_file).cells
    corrupt = [tmp_path / "runs" / "g" / c.folder / "checkpoints" / "latest.pt" for c in cells if c.seed == 1]
    for path in corrupt:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"torn")
    first = run_ablate(grid_file, tmp_path)
    assert first.returncode == 1 and "2 failed" in first.stdout, first.stdout + first.stderr
    for path in corrupt:
        path.unlink()
    second = run_ablate(grid_file, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "failed" not in second.stdout.split("to submit", 1)[1]  # no stale failed line for a resubmitted cell
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    record = json.loads((tmp_path / "runs" / "g" / "grid.json").read_text())
    parent = client(uri).get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "done", parent.data.tags
    ends = [client(uri).get_run(json.loads((tmp_path / "runs" / "g" / c.folder / "launch.json").read_text())
                                ["tracking_run_id"]).info.end_time for c in cells if c.seed == 1]
    assert parent.info.end_time >= max(ends)


def test_ctrl_c_during_a_local_ablate_is_one_line_and_every_cell_resumes(demo_assets, tmp_path) -> None:
    import signal

    data, teacher = demo_assets
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump({
        "name": "g", "base": micro_config(data, teacher, pretrain={"epochs": 40}, eval={"protocols": ["knn"]}),
        "axes": {"model.target": ["pixel", "clip"]}, "random_init": False, "teacher_reference": False, "resources": {"cpus_per_task": 1}}))
    proc = subprocess.Popen([sys.executable, str(REPO / "bench.py"), "ablate", str(grid_file), "--executor", "local",
                             "--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpts = list((tmp_path / "runs" / "g").glob("*/checkpoints/latest.pt"))
    deadline = time.monotonic() + 300
    while len(ckpts) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        ckpts = list((tmp_path / "runs" / "g").glob("*/checkpoints/latest.pt"))
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what a Ctrl-C in the terminal does
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert err.strip().splitlines()[-1].startswith("interrupted: the cells running here were stopped")
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "g").glob("*/status.json")]
    assert [s["state"] for s in statuses] == ["requeued", "requeued"], statuses
    again = run_ablate(grid_file, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in "".join(p.read_text() for p in (tmp_path / "runs" / "g").glob(".submitit/*/*_log.err"))
