"""Group jobs: cells that differ only on the student side pretrain on one data stream and one
teacher forward, and every student computes exactly what it computes alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import micro_config
from harness.config import parse_config
from harness.grid import build_grid
from harness.run.runner import run, run_group
from harness.config.student_side import check_shareable, group_by_share_key, is_student_side, share_key
from harness.train.metrics_log import read_jsonl

REPO = Path(__file__).resolve().parents[1]
# (target, masking, mask ratio): both targets, both samplers, and a second ratio of random masks
STUDENTS = [("pixel", "random", 0.75), ("clip", "random", 0.75), ("pixel", "semantic", 0.75),
            ("clip", "semantic", 0.75), ("pixel", "random", 0.5)]


def configs(data: Path, teacher: Path, students=STUDENTS, **sections: dict) -> list:
    out = []
    for target, masking, ratio in students:
        config = micro_config(data, teacher, **sections)
        config["model"] |= {"target": target, "masking": masking, "mask_ratio": ratio}
        out.append(parse_config(config))
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=f"{a.name} vs {b.name}: {key}")


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


# --- what shares ---------------------------------------------------------------------------------

def test_the_student_side_groups_and_the_shared_side_separates() -> None:
    base = parse_config({"model": {"size": "vit_micro_patch4", "img_size": 32}})
    student_changes = {"model.target": "pixel", "model.mask_ratio": 0.5, "model.decoder": "standard",
                       "pretrain.base_lr": 1e-3, "pretrain.clip_grad": 1.0, "eval.protocols": ["knn"],
                       "model.decoder_depth": 2}
    shared_changes = {"seed": 1, "pretrain.batch_size": 8, "pretrain.epochs": 300, "data.root": "elsewhere",
                      "teacher.model": "ViT-L-14", "model.img_size": 64, "pretrain.precision": "bf16",
                      "runtime.num_workers": 0}
    for key, value in student_changes.items():
        assert is_student_side(key), key
        assert share_key(base.with_overrides({key: value})) == share_key(base), key
    for key, value in shared_changes.items():
        assert not is_student_side(key), key
        other = base.with_overrides({key: value})
        assert share_key(other) != share_key(base), key
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            check_shareable([base, other])


def test_a_grid_groups_per_seed_and_keeps_its_reference_apart() -> None:
    grid = build_grid({"name": "g", "base_config": str(REPO / "configs" / "smoke.yaml"), "seeds": 2,
                       "axes": {"model.target": ["pixel", "clip"], "model.masking": ["random", "semantic"],
                                "pretrain.batch_size": [32, 64]}})
    groups = group_by_share_key(list(grid.cells), [c.config for c in grid.cells])
    references = [g for g in groups if g[0].is_random_init or g[0].is_teacher_reference]
    trained = [g for g in groups if g not in references]
    # per seed and batch size: the 4 target x masking cells; the batch size changes the data stream
    assert sorted(len(g) for g in trained) == [4, 4, 4, 4]
    for group in trained:
        assert len({(c.seed, c.config.pretrain.batch_size) for c in group}) == 1
    # 0 epochs: a stream of their own per seed, shared by the two references (neither trains)
    assert sorted([c.name for c in g] for g in references) == [["random init", "teacher"]] * 2
    assert all(len({c.seed for c in g}) == 1 for g in references)


def test_groups_are_split_at_max_cells_per_job_and_not_made_without_sharing() -> None:
    from harness.launch.plan import job_groups

    grid = build_grid({"name": "g", "base_config": str(REPO / "configs" / "smoke.yaml"), "random_init": False, "teacher_reference": False,
                       "axes": {"model.target": ["pixel", "clip"], "model.decoder": ["standard", "prompting"],
                                "model.masking": ["random", "semantic"]},
                       "resources": {"max_cells_per_job": 3}})
    jobs = job_groups(grid.cells, share=True, max_cells=grid.resources.max_cells_per_job)
    assert sorted(map(len, jobs)) == [2, 3, 3] and sorted(i for job in jobs for i in job) == list(range(8))
    assert [len(job) for job in job_groups(grid.cells, share=True)] == [8]
    assert job_groups(grid.cells, share=False) == [[i] for i in range(8)]


def test_every_cell_of_a_seed_starts_from_the_same_encoder(demo_assets) -> None:
    """Paired from the first weight: the target (with its teacher), decoder kind and decoder shape
    change the student's decoder and head, never its initial encoder; another seed does."""
    from harness.milan.weights import encoder_state_dict
    from harness.train.pretrain import build_model

    base = parse_config(micro_config(*demo_assets))
    variants = [{"model.target": "pixel", "model.decoder": "standard", "model.masking": "random"},
                {"model.target": "clip", "model.decoder": "prompting", "model.masking": "semantic"},
                {"model.target": "pixel", "model.decoder": "prompting", "model.decoder_width": 32,
                 "model.decoder_heads": 2, "model.masking": "random", "model.mask_ratio": 0.5}]
    encoders = [encoder_state_dict(build_model(base.with_overrides(v)).student.state_dict()) for v in variants]
    other_seed = encoder_state_dict(build_model(base.with_overrides({**variants[0], "seed": 1})).student.state_dict())
    for encoder in encoders[1:]:
        for key, value in encoders[0].items():
            assert torch.equal(value, encoder[key]), key
    assert not torch.equal(encoders[0]["blocks.0.attn.qkv.weight"], other_seed["blocks.0.attn.qkv.weight"])


# --- a student computes the same in a group as alone ------------------------------------------

def test_group_students_match_their_solo_runs_and_share_loads_and_teacher(demo_assets, tmp_path) -> None:
    data, teacher = demo_assets
    cfgs = configs(data, teacher)
    grouped = run_group(cfgs, [tmp_path / f"group{i}" for i in range(len(cfgs))])
    solo = [run(cfg, tmp_path / f"solo{i}") for i, cfg in enumerate(cfgs)]
    for i, (g, s) in enumerate(zip(grouped, solo)):
        assert g.state == s.state == "done", (g.failure_reason, s.failure_reason)
        assert_same_weights(tmp_path / f"group{i}", tmp_path / f"solo{i}")
        assert losses(tmp_path / f"group{i}") == losses(tmp_path / f"solo{i}")
        for key in ("final_loss", "linear_top1", "knn_top1"):
            assert g.metrics[key] == s.metrics[key], key
    # one pass over the data for the group, shared equally; one teacher forward per image, shared
    # by the three students that need it; alone, each run loads every image and runs its own teacher
    steps_images = 300 // 32 * 32
    assert sum(r.metrics["images_loaded"] for r in grouped) == pytest.approx(steps_images)
    assert [r.metrics["images_loaded"] for r in solo] == [steps_images] * len(cfgs)
    needs = [t == "clip" or m == "semantic" for t, m, _ in STUDENTS]
    assert sum(r.metrics["teacher_images"] for r in grouped) == pytest.approx(steps_images)
    assert [r.metrics["teacher_images"] > 0 for r in grouped] == needs
    assert sum(r.metrics["teacher_images"] for r in solo) == steps_images * sum(needs)
    # the group's cost is its cells' shares: each smaller than the cell alone, the sum its real time
    status = json.loads((tmp_path / "group0" / "status.json").read_text())
    assert status["group_size"] == len(cfgs) and len(status["group"]) == len(cfgs)
    assert json.loads((tmp_path / "group0" / "results.json").read_text())["cost"].startswith("its share")


def test_one_student_going_non_finite_fails_alone(demo_assets, tmp_path) -> None:
    data, teacher = demo_assets
    good = configs(data, teacher, STUDENTS[:2])
    bad = configs(data, teacher, STUDENTS[3:4], pretrain={"lr": 1e12})
    results = run_group([good[0], bad[0], good[1]], [tmp_path / n for n in ("a", "bad", "b")])
    assert [r.state for r in results] == ["done", "failed", "done"]
    assert "loss became" in results[1].failure_reason
    assert json.loads((tmp_path / "bad" / "status.json").read_text())["state"] == "failed"
    assert not (tmp_path / "bad" / "results.json").exists()
    alone = run(good[1], tmp_path / "b-alone")  # the failure changed nothing for the others
    assert_same_weights(tmp_path / "b", tmp_path / "b-alone")
    assert alone.metrics["linear_top1"] == results[2].metrics["linear_top1"]


def test_a_corrupt_checkpoint_fails_its_cell_alone(demo_assets, tmp_path) -> None:
    data, teacher = demo_assets
    a, b = configs(data, teacher, STUDENTS[:2], eval={"protocols": ["knn"]})
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    results = run_group([a, b], [tmp_path / "a", tmp_path / "b"])
    assert [r.state for r in results] == ["done", "failed"]
    assert "cannot be read" in results[1].failure_reason and "--force --cell" in results[1].failure_reason
    assert json.loads((tmp_path / "b" / "status.json").read_text())["state"] == "failed"
    run(a, tmp_path / "a-alone")
    assert_same_weights(tmp_path / "a", tmp_path / "a-alone")


def test_a_group_resumes_each_student_from_its_own_step(demo_assets, tmp_path) -> None:
    """A student with a checkpoint joins the group at its step, a fresh one starts at 0; the group
    stream serves each the batches it would have drawn alone."""
    data, teacher = demo_assets
    a, b = configs(data, teacher, [STUDENTS[1], STUDENTS[2]], pretrain={"epochs": 8}, eval={"protocols": []})
    # student a alone, killed part-way through its 72 steps (a shorter run would have another schedule)
    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys; from harness.config import parse_config; from harness.run.runner import run; import json; "
        f"run(parse_config(json.loads({json.dumps(json.dumps(a.to_dict()))})), sys.argv[1])"),
        str(tmp_path / "a")], cwd=REPO, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "a" / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= 6:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert 6 <= stopped_at < 72
    results = run_group([a, b], [tmp_path / "a", tmp_path / "b"])
    assert [r.state for r in results] == ["done", "done"]
    run(a, tmp_path / "a-alone")
    run(b, tmp_path / "b-alone")
    assert_same_weights(tmp_path / "a", tmp_path / "a-alone")
    assert_same_weights(tmp_path / "b", tmp_path / "b-alone")
    logged = [r["step"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "train/loss" in r]
    assert logged == list(range(1, 73))  # no gap, no repeat across the two jobs


def test_a_group_killed_at_any_step_resumes_to_what_each_student_computes_alone(demo_assets, tmp_path) -> None:
    """A group job of three students (both targets, both samplers), its images augmented in two
    DataLoader workers, SIGKILLed twice between checkpoints and run again: every student's weights,
    losses (each step once) and evaluation equal those of the student run alone, uninterrupted."""
    data, teacher = demo_assets
    cfgs = configs(data, teacher, [STUDENTS[0], STUDENTS[1], STUDENTS[2]], pretrain={"epochs": 3},
                   eval={"protocols": ["knn"]}, runtime={"num_workers": 2, "log_every": 2, "checkpoint_every": 5})
    dirs = [tmp_path / f"s{i}" for i in range(len(cfgs))]
    script = ("import json, sys; from harness.config import parse_config; from harness.run.runner import run_group; "
              "run_group([parse_config(c) for c in json.loads(sys.argv[1])], sys.argv[2:])")
    args = [json.dumps([c.to_dict() for c in cfgs]), *map(str, dirs)]
    ckpt = dirs[0] / "checkpoints" / "latest.pt"
    for step, delay_s in ((5, 0.4), (15, 0.6)):
        proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= step:
                break
            time.sleep(0.05)
        time.sleep(delay_s)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [r.state for r in run_group(cfgs, dirs)] == ["done"] * 3
    total = 3 * (300 // 32)
    for cfg, run_dir in zip(cfgs, dirs):
        alone = run(cfg, tmp_path / f"{run_dir.name}-alone")
        assert_same_weights(run_dir, tmp_path / f"{run_dir.name}-alone")
        logged = [(r["step"], r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
        assert [step for step, _ in logged] == list(range(1, total + 1))
        assert [loss for _, loss in logged] == losses(tmp_path / f"{run_dir.name}-alone")
        results = json.loads((run_dir / "results.json").read_text())["metrics"]
        assert (results["final_loss"], results["knn_top1"]) == (alone.metrics["final_loss"], alone.metrics["knn_top1"])


def test_a_cell_finished_after_its_group_pretrained_keeps_the_groups_bookkeeping(demo_assets, tmp_path) -> None:
    """Requeued between two cells' evaluations, the job still records its group's size; a cell whose
    pretraining was shared says its cost is a share, also when a later job evaluates it alone."""
    data, teacher = demo_assets
    a, b = configs(data, teacher, STUDENTS[:2], eval={"protocols": ["knn"]})
    dirs = [tmp_path / "a", tmp_path / "b"]
    run_group([a, b], dirs)

    def bookkeeping(run_dir: Path) -> tuple[int, str]:
        status = json.loads((run_dir / "status.json").read_text())
        return status["group_size"], json.loads((run_dir / "results.json").read_text())["cost"]

    (dirs[1] / "results.json").unlink()  # the job stopped after a's results, before b's
    assert [r.state for r in run_group([a, b], dirs)] == ["done", "done"]  # the requeued job
    group_size, cost = bookkeeping(dirs[1])
    assert group_size == 2 and cost.startswith("its share of a group job"), (group_size, cost)
    (dirs[1] / "results.json").unlink()
    assert run(b, dirs[1]).state == "done"  # a later ablate resubmits b alone
    group_size, cost = bookkeeping(dirs[1])
    assert group_size == 1 and cost.startswith("its share of a group job"), (group_size, cost)
    assert bookkeeping(dirs[0]) == (2, cost)
    run(a, tmp_path / "alone")
    assert bookkeeping(tmp_path / "alone") == (1, "its own job's time")


def test_a_windows_time_and_loads_are_apportioned_and_add_up() -> None:
    """Each student: its own compute, the teacher's time among the students that need it, the rest
    equally; the shares add up to the window's wall time, so a grid's total is its real cost."""
    from types import SimpleNamespace

    from harness.train.pretrain import _new_clock, apportion

    def student(own: float, teacher: bool) -> SimpleNamespace:
        return SimpleNamespace(watch=SimpleNamespace(take=lambda: own), needs_teacher=teacher, clock=_new_clock(),
                               window=[None] * 5)

    students = [student(1.0, False), student(2.0, True), student(3.0, True)]
    apportion(students, wall=10.0, teacher_seconds=2.0, loaded=96, through_teacher=96, images_per_step=32,
              timed=True)
    seconds = [s.clock["loop_seconds"] for s in students]
    assert seconds == pytest.approx([1 + 2 / 3, 2 + 1 + 2 / 3, 3 + 1 + 2 / 3])
    assert sum(seconds) == pytest.approx(10.0)
    assert [s.clock["images_loaded"] for s in students] == pytest.approx([32, 32, 32])
    assert [s.clock["teacher_images"] for s in students] == pytest.approx([0, 48, 48])
    assert [s.clock["timed_images"] for s in students] == [160] * 3
