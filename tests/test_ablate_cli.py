"""`bench.py ablate` / `bench.py status` front end: dry run, option errors, preflight stops,
the GPU-hours estimate, and the in-process debug executor."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import micro_config
from typer.testing import CliRunner

from harness.cli import app
from harness.grid import build_grid

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def write_grid(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"name": "g", **fields}, sort_keys=False))
    return path


def test_dry_run_shows_the_plan_and_submits_nothing(cwd: Path, demo_assets: tuple[Path, Path]) -> None:
    grid = write_grid(cwd / "g.yaml", base=micro_config(*demo_assets),
                      axes={"model.target": ["pixel", "clip"], "model.mask_ratio": [0.5, 0.75]})
    code, out = invoke("ablate", str(grid), "--dry-run", "--executor", "local", "--seeds", "2",
                       "--axis", "model.decoder=standard,prompting")
    assert code == 0, out
    assert "nothing is submitted (dry run)" in out and "preflight: ok" in out
    # 8 cells x 2 seeds, and per seed the random-init and the teacher reference (one student size, one teacher)
    assert "20 cells; CPU cells: no GPU-hours" in out
    rows = [line for line in out.splitlines() if "target=" in line]
    assert len(rows) == 16
    references = [line for line in out.splitlines() if "random init" in line]
    # a group job per seed (its 8 cells differ only on the student side); the two references of a seed
    # (neither pretrains) share one
    assert [line.split()[-3:] for line in references] == [["missing", "submit", "3"], ["missing", "submit", "4"]]
    teachers = [line for line in out.splitlines() if line.split()[1:2] == ["teacher"]]
    assert [line.split()[-3:] for line in teachers] == [["missing", "submit", "3"], ["missing", "submit", "4"]]
    assert "target=pixel mask_ratio=0.5 decoder=standard" in rows[0] and rows[0].split()[-3:] == ["missing", "submit", "1"]
    assert {row.split()[-1] for row in rows} == {"1", "2"}
    assert "4 jobs: 4 group(s) of 8, 8, 2, 2 cells train on one data stream with one teacher forward per batch" in out
    assert re.search(r"sharing saves \d+% of the pretraining FLOPs .* decodes each training image 2x instead of 16x", out)
    assert not (cwd / "runs" / "g").exists() and not (cwd / "mlflow.db").exists()
    code, alone = invoke("ablate", str(grid), "--dry-run", "--executor", "local", "--seeds", "2",
                         "--axis", "model.decoder=standard,prompting", "--no-share")
    assert code == 0 and "20 jobs, one per cell (--no-share)" in alone, alone


def test_dry_run_of_the_paper_grid_estimates_gpu_hours(cwd: Path) -> None:
    """Paper grid without ImageNet here: the table with GPU-hours (from estimate.train_images),
    then the preflight error (exit 2)."""
    code, out = invoke("ablate", str(REPO / "ablations" / "milan_vitb_in1k.yaml"), "--dry-run", "--executor", "slurm")
    assert code == 2
    milan = next(line for line in out.splitlines() if "target=clip decoder=prompting masking=semantic" in line)
    hours = float(milan.split()[-4].replace(",", ""))
    # about the paper's 39 h x 8 A100 = 312 GPU-hours for 400 epochs
    assert 290 < hours < 330, milan
    assert "1x8 GPU, 10 cpu/task, 480 GB, 1440 min" in milan
    assert "assuming 40 TFLOP/s sustained per GPU" in out
    # the 8 cells are one group job: the teacher runs once per image instead of 6 times
    assert "sharing saves 27% of the pretraining FLOPs (649.4 -> 473.8 GFLOPs per training image" in out
    # ... and runs for its 1,686 GPU-hours over 8 GPUs: 9 days of the 24-h time limit
    assert ("longest job: 8 cell(s), about 210.8 h of pretraining on 8 GPUs, so 9 period(s) of the 1440-min "
            "time limit") in out and "submitit may requeue each job 24 times" in out
    assert out.strip().splitlines()[-1].startswith("error: the grid asks for 8 GPUs per node but this machine has 0") \
        or "dataset root /datasets/imagenet does not exist" in out.strip().splitlines()[-1]


def test_gpu_hours_scale_with_epochs_and_skip_cpu_cells() -> None:
    from harness.launch.estimate import gpu_hours

    base = {"model": {"size": "vit_base_patch16", "target": "pixel", "masking": "random"},
            "pretrain": {"epochs": 100, "warmup_epochs": 1}, "data": {"root": "/nowhere"}}
    gpu = build_grid({"name": "g", "base": base, "axes": {"pretrain.epochs": [100, 200]},
                      "resources": {"gpus_per_node": 8}, "estimate": {"train_images": 1000}})
    hours = gpu_hours(gpu)
    [reference] = [cell for cell in gpu.cells if cell.is_random_init]
    assert hours[reference.run_id] == 0  # the random-init reference does not pretrain
    low, high = (hours[cell.run_id] for cell in gpu.cells if not cell.is_random_init)
    assert high == pytest.approx(2 * low) and low > 0
    assert set(gpu_hours(build_grid({"name": "c", "base": base})).values()) == {"cpu"}


def test_a_job_may_requeue_at_least_twice_as_often_as_its_estimated_length_needs() -> None:
    """3 time-limit requeues per cell a job trains, or twice the periods of the time limit that
    its estimated pretraining spans, whichever is more; CPU jobs have no estimate."""
    from harness.launch.plan import job_groups, job_time_limit
    from harness.launch.estimate import gpu_hours

    base = {"model": {"size": "vit_base_patch16", "target": "clip", "masking": "semantic"},
            "pretrain": {"epochs": 400, "warmup_epochs": 40}, "data": {"root": "/nowhere"}}
    axes = {"model.decoder": ["standard", "prompting"]}
    for minutes, rule in [(14400, "per cell"), (120, "periods")]:
        grid = build_grid({"name": "g", "base": base, "axes": axes, "random_init": False,
                           "teacher_reference": False, "resources": {"gpus_per_node": 8, "time_min": minutes},
                           "estimate": {"train_images": 1281167}})
        groups = job_groups(grid.cells, share=True)
        assert groups == [[0, 1]]
        hours = gpu_hours(grid)
        max_timeouts, line = job_time_limit(grid, grid.cells, groups, hours)
        # the two students share one teacher forward: less than the two cells' hours alone
        wall = float(line.split("about ")[1].split(" h")[0])
        assert wall < sum(hours.values()) / 8
        periods = math.ceil(wall * 60 / minutes)
        assert f"so {periods} period(s) of the {minutes}-min time limit" in line
        assert periods * 2 != 6  # the two rules give different allowances
        assert max_timeouts == (6 if rule == "per cell" else 2 * periods), line
    cpu = build_grid({"name": "c", "base": base, "axes": axes})
    assert job_time_limit(cpu, cpu.cells, [[0, 1], [2]], gpu_hours(cpu)) == (6, None)


@pytest.mark.parametrize(("args", "message"), [
    (["--axis", "model.mask_ratio"], "error: --axis 'model.mask_ratio' is not field=v1,v2"),
    (["--axis", "model.mask_rati=0.5"], "unknown config field 'model.mask_rati': did you mean model.mask_ratio?"),
    (["--set", "model.target"], "error: override 'model.target' is not key=value"),
    (["--executor", "kube"], "error: unknown executor 'kube': use one of auto, local, slurm, debug"),
    (["--seeds", "0"], "seeds: give a number of seeds >= 1"),
])
def test_option_errors_are_one_line(cwd: Path, args: list[str], message: str) -> None:
    grid = write_grid(cwd / "g.yaml", base={"data": {"root": "x"}})
    code, out = invoke("ablate", str(grid), *args)
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out


def test_unknown_grid_name(cwd: Path) -> None:
    code, out = invoke("ablate", "nonesuch", "--executor", "local")
    assert code == 2 and out.startswith("error: grid 'nonesuch' not found: give the path of a grid YAML")


def test_preflight_failure_submits_nothing(cwd: Path) -> None:
    grid = write_grid(cwd / "g.yaml", base={"model": {"size": "vit_micro_patch4", "img_size": 32,
                                                      "target": "pixel", "masking": "random"},
                                            "data": {"root": str(cwd / "missing")}},
                      axes={"model.mask_ratio": [0.5, 0.75]})
    code, out = invoke("ablate", str(grid), "--executor", "local")
    assert code == 2
    assert out.strip().splitlines()[-1].startswith(
        f"error: cell mask_ratio=0.5: dataset root {cwd / 'missing'} does not exist")
    assert not list((cwd / "runs" / "g").glob("*/launch.json")) and not (cwd / "mlflow.db").exists()


def test_unreachable_tracking_store_submits_nothing(cwd: Path, demo_assets: tuple[Path, Path]) -> None:
    grid = write_grid(cwd / "g.yaml", base=micro_config(*demo_assets))
    code, out = invoke("ablate", str(grid), "--executor", "local", "--tracking-uri", "http://127.0.0.1:9")
    assert code == 2 and "MLflow server http://127.0.0.1:9 is not reachable" in out, out
    assert not list((cwd / "runs" / "g").glob("*/launch.json"))


def test_status_of_a_grid_never_submitted_and_of_nothing(cwd: Path) -> None:
    write_grid(cwd / "g.yaml", base={"data": {"root": "x"}}, axes={"model.target": ["pixel", "clip"]})
    code, out = invoke("status", str(cwd / "g.yaml"))
    assert code == 0 and "grid g: 4 missing" in out  # 2 cells, the random-init and the teacher reference
    assert "random_init_s0_" in out and "teacher_s0_" in out
    code, out = invoke("status")
    assert code == 2 and "no grid has been submitted under runs" in out


def test_debug_executor_runs_in_process(cwd: Path, demo_assets: tuple[Path, Path]) -> None:
    base = micro_config(*demo_assets)
    base["model"] |= {"target": "pixel", "masking": "random"}
    base["eval"] = {"protocols": ["knn"], "feature_batch_size": 100}
    grid = write_grid(cwd / "g.yaml", base=base, margin=0.75)
    code, out = invoke("ablate", str(grid), "--executor", "debug")
    assert code == 0, out
    [cell] = list((cwd / "runs" / "g").glob("baseline_*"))
    assert "knn_top1" in json.loads((cell / "results.json").read_text())["metrics"]
    [reference] = list((cwd / "runs" / "g").glob("random_init_*"))
    assert "knn_top1" in json.loads((reference / "results.json").read_text())["metrics"]
    assert "pretrained vs random init" in out  # the verdict table at the end of ablate
    launch = json.loads((cell / "launch.json").read_text())
    assert launch["submissions"][-1]["executor"] == "debug"
    assert (cwd / "reports" / "g" / "report.md").is_file()

    # --force: a fresh folder and a new MLflow run for the same cell
    (cell / "marker").touch()
    # (a --set that keeps the config: same cells; the parent run records it)
    code, out = invoke("ablate", str(grid), "--executor", "debug", "--force", "--set", "runtime.log_every=2")
    assert code == 0 and "2 cells (2 done); 2 to restart" in out, out  # the cell and its reference
    assert not (cell / "marker").exists() and (cell / "results.json").is_file()
    again = json.loads((cell / "launch.json").read_text())
    assert again["tracking_run_id"] != launch["tracking_run_id"] and len(again["submissions"]) == 1
    # the newest parent run's grid.margin / grid_file / grid.options tags, as the report reads them
    from harness.tracking.read import load_runs
    from harness.tracking.store import sqlite_uri

    runs, _ = load_runs(sqlite_uri(cwd / "mlflow.db"), "g")
    assert runs.attrs["margin"] == 0.75 and runs.attrs["grid_file"] == str(grid)
    assert runs.attrs["grid_options"] == "--set runtime.log_every=2"
    assert sorted(runs["role"]) == ["cell", "random_init"]
    assert "--set runtime.log_every=2 --seeds 2" in out  # the verdicts' --seeds command repeats it


def test_an_unknown_cell_selector_submits_nothing(cwd: Path) -> None:
    grid = write_grid(cwd / "g.yaml", axes={"model.target": ["pixel", "clip"]})
    code, out = invoke("ablate", str(grid), "--cell", "target-rgb", "--force", "--executor", "local")
    assert code == 2 and "--cell 'target-rgb' matches no cell of grid g" in out, out
    assert not (cwd / "runs" / "g").exists()


def test_a_teacher_checkpoint_of_another_model_fails_preflight(cwd: Path, demo_assets: tuple[Path, Path]) -> None:
    """The weights are loaded into the teacher's architecture before anything is submitted, in
    the dry run as in ablate (it passed as "preflight: ok" and every cell failed)."""
    import torch

    data, teacher = demo_assets
    wrong = cwd / "other-model.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 2, 2)}, wrong)
    base = micro_config(data, teacher, teacher={"pretrained": str(wrong)}, model={"target": "clip"})
    grid = write_grid(cwd / "g.yaml", base=base, axes={"model.decoder": ["standard", "prompting"]})
    for extra in (["--dry-run"], []):
        code, out = invoke("ablate", str(grid), "--executor", "local", *extra)
        assert code == 2, out
        assert f"teacher checkpoint {wrong} does not fit model" in out and "Traceback" not in out
        assert not (cwd / "runs" / "g").exists() or not list((cwd / "runs" / "g").glob("*/launch.json"))


def test_evaluation_batches_must_split_over_the_cells_tasks(cwd: Path, demo_assets: tuple[Path, Path]) -> None:
    base = micro_config(*demo_assets, eval={"protocols": ["linear", "finetune"], "finetune": {"batch_size": 33}})
    grid = write_grid(cwd / "g.yaml", base=base, axes={"model.decoder": ["standard", "prompting"]},
                      resources={"tasks_per_node": 2})
    code, out = invoke("ablate", str(grid), "--executor", "local", "--dry-run")
    assert code == 2, out
    assert "eval.finetune.batch_size=33 does not split over the cell's 2 tasks" in out
    assert "make it a multiple of 2" in out
