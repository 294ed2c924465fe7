"""Bad input on the command line: exit code 2, one line naming the problem and the fix, no
traceback, nothing written. Nothing here trains; every case stops before any work starts.

Tests run as root, where permission bits do not stop a write: an unwritable path is one whose
parent is a regular file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def a_file(cwd: Path) -> Path:
    path = cwd / "a-file"
    path.write_text("not a folder\n")
    return path


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def assert_one_line_exit_2(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


def test_ablate_with_a_runs_dir_under_a_file(cwd: Path, a_file: Path) -> None:
    assert_one_line_exit_2(["ablate", "--runs-dir", str(a_file / "runs"), "--dry-run"],
                           f"--runs-dir {a_file / 'runs'} is not a writable folder",
                           f"{a_file} is a file", "pick a folder you can write to")
    assert files_under(cwd) == {Path("a-file")}


def test_ablate_with_a_runs_dir_that_is_a_file(cwd: Path, a_file: Path) -> None:
    assert_one_line_exit_2(["ablate", "--runs-dir", str(a_file), "--dry-run"],
                           f"--runs-dir {a_file} is not a writable folder", f"{a_file} is a file")
    assert files_under(cwd) == {Path("a-file")}


def test_ablate_with_an_unwritable_reports_folder(cwd: Path) -> None:
    (cwd / "reports").write_text("")
    assert_one_line_exit_2(["ablate", "--executor", "local"],
                           "reports folder reports is not a writable folder", "reports is a file")
    assert not (cwd / "mlflow.db").exists() and not list(cwd.glob("runs/*"))


def test_run_with_an_unwritable_out(cwd: Path, a_file: Path) -> None:
    # a config that passes every check (pixel target, random masks: no teacher), on a tiny tree
    for split, label, index in itertools.product(("train", "val"), ("a", "b"), range(2)):
        (cwd / "data" / split / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(cwd / "data" / split / label / f"{index}.png")
    before = files_under(cwd)
    out = a_file / "run"
    assert_one_line_exit_2(["run", "--set", "data.root=data", "--set", "model.size=vit_micro_patch4",
                            "--set", "model.img_size=32", "--set", "model.target=pixel",
                            "--set", "model.masking=random", "--set", "pretrain.batch_size=2",
                            "--set", "eval.knn.k=2", "--out", str(out)],
                           f"--out {out} is not a writable folder", f"{a_file} is a file")
    assert files_under(cwd) == before


def test_report_with_an_unwritable_out(cwd: Path, a_file: Path) -> None:
    out = a_file / "report"
    assert_one_line_exit_2(["report", "smoke", "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}",
                            "--out", str(out)],
                           f"--out {out} is not a writable folder", f"{a_file} is a file")
    assert files_under(cwd) == {Path("a-file")}


def test_report_with_an_unwritable_reports_folder(cwd: Path) -> None:
    (cwd / "reports").write_text("")
    assert_one_line_exit_2(["report", "smoke", "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}"],
                           "reports folder reports is not a writable folder", "reports is a file")
    assert files_under(cwd) == {Path("reports")}


def test_data_demo_into_an_existing_file(cwd: Path, a_file: Path) -> None:
    assert_one_line_exit_2(["data", "demo", str(a_file)],
                           f"demo dataset folder {a_file} is not a writable folder", f"{a_file} is a file")
    assert a_file.read_text() == "not a folder\n" and files_under(cwd) == {Path("a-file")}


def test_data_demo_into_a_folder_of_other_files(cwd: Path) -> None:
    (cwd / "mine").mkdir()
    (cwd / "mine" / "notes.txt").write_text("keep me")
    assert_one_line_exit_2(["data", "demo", "mine"], "mine is not empty and is not a demo dataset",
                           "pick a new or empty directory")
    assert files_under(cwd) == {Path("mine"), Path("mine/notes.txt")}


@pytest.mark.parametrize(("option", "value", "least"), [
    ("--batch", "0", 1), ("--batch", "-3", 1), ("--steps", "0", 1), ("--img-size", "0", 1),
    ("--warmup", "-1", 0), ("--threads", "0", 1),
])
def test_speed_with_non_positive_sizes(cwd: Path, option: str, value: str, least: int) -> None:
    assert_one_line_exit_2(["speed", option, value], f"{option} {value} is too small",
                           f"give an integer >= {least}")
    assert files_under(cwd) == set()


@pytest.mark.parametrize(("args", "words"), [
    (["--ranks", "3"], "--ranks 3: the batch of 64 must split over the ranks"),
    (["--ranks", "0"], "--ranks 0: the batch of 64 must split over the ranks"),
    (["--size", "vit_nope"], "unknown preset 'vit_nope'"),
])
def test_finetune_bench_bad_input(cwd: Path, args: list[str], words: str) -> None:
    assert_one_line_exit_2(["finetune-bench", *args], words)
    assert files_under(cwd) == set()


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_ui_port_out_of_range(cwd: Path, port: str) -> None:
    assert_one_line_exit_2(["ui", "--port", port], f"--port {port} is not a TCP port", "1..65535")
    assert files_under(cwd) == set()


def test_ui_for_a_server_that_does_not_answer(cwd: Path) -> None:
    assert_one_line_exit_2(["ui", "--tracking-uri", "http://127.0.0.1:9"],
                           "MLflow server http://127.0.0.1:9 is not reachable", "--tracking-uri")
    assert files_under(cwd) == set()


@pytest.mark.parametrize("command", ["report", "ablate"])
@pytest.mark.parametrize("margin", ["-1", "0", "nan", "inf"])
def test_a_non_positive_margin(cwd: Path, command: str, margin: str) -> None:
    """--margin is the verdicts' equivalence margin: a positive number of points, checked before
    any store is opened or any cell is planned."""
    assert_one_line_exit_2([command, "smoke", "--margin", margin, "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}"],
                           f"--margin {margin}", "is not a margin", "give a positive number of points")
    assert files_under(cwd) == set()
