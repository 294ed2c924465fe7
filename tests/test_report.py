"""Tests for harness.report: planted effects must come back out of the tables."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.report import (
    REFERENCE_SOURCES,
    ReportError,
    build_report,
    cell_table,
    estimate_effects,
    reference_table,
    write_tables,
)

MILAN_AXES = {
    "model.target": ["pixel", "clip"],
    "model.decoder": ["standard", "prompting"],
    "model.masking": ["random", "semantic"],
}
# Planted linear effects on linear_top1 (percentage points) of each non-baseline value.
EFFECTS = {
    ("model.target", "clip"): 5.0,
    ("model.decoder", "prompting"): 2.0,
    ("model.masking", "semantic"): 1.0,
    ("model.mask_ratio", 0.5): -1.5,
    ("model.mask_ratio", 0.9): -0.5,
}
BASE = 50.0
SEEDS = (0, 1, 2)
# Per-seed offsets shared by every cell (a "good seed" lifts all cells alike) plus small
# per-run noise: effects paired by seed must cancel the offsets.
SEED_OFFSET = {0: -0.3, 1: 0.0, 2: 0.3}
NOISE = 0.02


def make_runs(axes: dict[str, list[object]], *, paper_setting: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    cells = pd.DataFrame(itertools.product(*axes.values()), columns=list(axes))
    cells["cell"] = cells.astype(str).apply(
        lambda row: " ".join(f"{a.split('.')[-1]}={v}" for a, v in row.items()), axis=1
    )
    cells["cell_id"] = [f"cell{i}" for i in range(len(cells))]
    runs = cells.merge(pd.DataFrame({"seed": SEEDS}), how="cross")
    planted = sum(
        (runs[axis] == value) * effect
        for (axis, value), effect in EFFECTS.items()
        if axis in axes
    )
    runs["linear_top1"] = (
        BASE + planted + runs["seed"].map(SEED_OFFSET) + rng.normal(0, NOISE, len(runs))
    )
    runs["finetune_top1"] = 80 + 0.5 * runs["linear_top1"] / 10
    runs["knn_top1"] = np.nan  # a metric column that never got a value
    runs["gpu_hours"] = 2.0
    runs["images_per_s"] = 400.0 + 50 * (runs.get("model.decoder") == "prompting")
    runs["status"] = "done"
    runs["failure_reason"] = pd.Series(np.nan, index=runs.index, dtype="str")
    runs.attrs = {
        "axes": list(axes),
        "axis_baselines": {axis: values[0] for axis, values in axes.items()},
        "grid": "test-grid",
        "paper_setting": paper_setting,
        "metrics": ["linear_top1", "finetune_top1", "knn_top1", "gpu_hours", "images_per_s"],
    }
    return runs


def make_curves(runs: pd.DataFrame, n_steps: int = 20) -> pd.DataFrame:
    steps = pd.DataFrame({"step": np.arange(n_steps) * 100})
    curves = runs[["cell_id", "cell", "seed", "model.target"]].rename(
        columns={"model.target": "target"}
    ).merge(steps, how="cross")
    scale = np.where(curves["target"] == "clip", 1.5, 0.5)
    floor = curves["cell_id"].str.removeprefix("cell").astype(int) / 50  # cells differ
    curves["loss"] = scale * np.exp(-curves["step"] / 800) + floor + curves["seed"] / 100
    return curves


def fail(runs: pd.DataFrame, cell_id: str, seed: int, reason: str) -> pd.DataFrame:
    """Mark one run failed: no metrics, a reason."""
    runs = runs.copy()
    row = (runs["cell_id"] == cell_id) & (runs["seed"] == seed)
    runs.loc[row, ["status", "failure_reason"]] = ["failed", reason]
    runs.loc[row, ["linear_top1", "finetune_top1"]] = np.nan
    return runs


@pytest.fixture
def runs() -> pd.DataFrame:
    return make_runs(MILAN_AXES)


def main_effects_of(runs: pd.DataFrame) -> pd.DataFrame:
    """The main effects of estimate_effects, indexed by (axis short name, levels)."""
    effects = estimate_effects(runs, "linear_top1")
    return effects[effects["order"] == 1].set_index(["effect", "levels"])


def test_main_effects_recover_planted_effects(runs: pd.DataFrame) -> None:
    effects = main_effects_of(runs)
    for (axis, value), levels in [(("model.target", "clip"), "clip − pixel"),
                                  (("model.decoder", "prompting"), "prompting − standard"),
                                  (("model.masking", "semantic"), "semantic − random")]:
        row = effects.loc[(axis.split(".")[-1], levels)]
        assert row["estimate"] == pytest.approx(EFFECTS[axis, value], abs=0.05)
        # the seed offsets (0.3) are blocked out: the interval is as narrow as the run noise
        assert row["ci_high"] - row["ci_low"] < 0.1
        assert row["n_seeds"] == len(SEEDS) and row["verdict"] == "resolved +"


def test_main_effects_with_a_failed_run(runs: pd.DataFrame) -> None:
    runs = fail(runs, "cell7", 0, "NaN loss")  # clip/prompting/semantic, seed 0
    row = main_effects_of(runs).loc[("target", "clip − pixel")]
    assert row["estimate"] == pytest.approx(5.0, abs=0.05) and row["verdict"] == "resolved +"


def test_random_init_reference_row_and_effect(runs: pd.DataFrame, tmp_path: Path) -> None:
    references = pd.DataFrame({"cell_id": "ref", "cell": "random init", "seed": list(SEEDS), "status": "done",
                               "role": "random_init", "gpu_hours": 0.1,
                               "linear_top1": [30.0 + SEED_OFFSET[s] for s in SEEDS]})
    both = pd.concat([runs.assign(role="cell"), references], ignore_index=True)
    both.attrs = runs.attrs
    effects = estimate_effects(both, "linear_top1").set_index("effect")
    pretrained = runs.groupby("cell_id")["linear_top1"].mean().mean()
    row = effects.loc["pretrained vs random init"]
    assert row["estimate"] == pytest.approx(pretrained - 30.0, abs=0.05) and row["verdict"] == "resolved +"
    assert effects.loc["target", "estimate"] == pytest.approx(5.0, abs=0.05)  # the reference is no cell
    table = cell_table(both, "linear_top1")
    assert table["cell"].iloc[-1] == "random init"  # the reference row comes last
    assert table["cell"].iloc[0] == "target=pixel decoder=standard masking=random"
    report = build_report(both, None, tmp_path, formats=("csv",)).report.read_text()
    assert re.search(r"\| pretrained vs random init +\| mean of 8 cells − random init +\| +[0-9.]+ \|", report)
    assert re.search(r"\| random init +\| +3 \| 30.00 ± 0.30", report)


def test_cell_table_delta_n_and_std(runs: pd.DataFrame) -> None:
    table = cell_table(runs, "linear_top1").set_index("cell")
    milan = table.loc["target=clip decoder=prompting masking=semantic"]
    assert milan["delta_vs_baseline"] == pytest.approx(8.0, abs=0.05)
    assert milan["n"] == 3
    expected_std = runs.loc[runs["cell"] == milan.name, "linear_top1"].std()
    assert milan["std"] == pytest.approx(expected_std)
    assert milan["std"] == pytest.approx(0.3, abs=0.05)  # the planted seed offsets
    assert milan["mean ± std"] == f"{milan['mean']:.2f} ± {milan['std']:.2f}"
    baseline = table.loc["target=pixel decoder=standard masking=random"]
    assert baseline["delta_vs_baseline"] == 0
    assert table.index[0] == baseline.name  # the baseline cell is listed first
    assert milan["gpu_hours"] == pytest.approx(6.0)
    assert milan["images_per_s"] == pytest.approx(450.0)


def test_failed_cell_appears_with_reason(runs: pd.DataFrame) -> None:
    runs = fail(runs, "cell3", 1, "CUDA out of memory")
    for seed in (0, 2):
        runs = fail(runs, "cell5", seed, "node failure")
    runs.loc[(runs["cell_id"] == "cell5") & (runs["seed"] == 1), "status"] = "running"
    runs.loc[(runs["cell_id"] == "cell5") & (runs["seed"] == 1), "linear_top1"] = np.nan
    table = cell_table(runs, "linear_top1").set_index("cell_id")
    assert table.loc["cell3", "n"] == 2
    assert table.loc["cell3", "status"] == "2/3 done, 1 failed: CUDA out of memory"
    assert len(table) == 8  # the fully unfinished cell is still listed
    assert table.loc["cell5", "n"] == 0
    assert np.isnan(table.loc["cell5", "mean"])
    assert table.loc["cell5", "mean ± std"] == "–"
    assert table.loc["cell5", "status"] == "0/3 done, 2 failed: node failure, 1 running"


def test_grid_without_baseline_cell_gives_nan_deltas(runs: pd.DataFrame) -> None:
    partial = runs[runs["model.target"] == "clip"]  # every cell has a non-baseline value
    table = cell_table(partial, "linear_top1")
    assert len(table) == 4
    assert table["delta_vs_baseline"].isna().all()
    effects = main_effects_of(partial)
    assert "target" not in effects.index.get_level_values("effect")  # no pixel cell: not estimable
    assert effects.loc[("decoder", "prompting − standard"), "estimate"] == pytest.approx(2, abs=0.05)


def test_three_valued_axis() -> None:
    axes = {**MILAN_AXES, "model.mask_ratio": [0.75, 0.5, 0.9]}
    runs = make_runs(axes)
    effects = main_effects_of(runs)
    assert effects.loc[("mask_ratio", "0.5 − 0.75"), "estimate"] == pytest.approx(-1.5, abs=0.05)
    assert effects.loc[("mask_ratio", "0.9 − 0.75"), "estimate"] == pytest.approx(-0.5, abs=0.05)
    table = cell_table(runs, "linear_top1")
    assert len(table) == 24
    # Axis values in grid order with the baseline first: 0.75, 0.5, 0.9.
    assert list(table["model.mask_ratio"].iloc[:3]) == [0.75, 0.5, 0.9]


def test_reference_table_only_in_paper_setting(runs: pd.DataFrame) -> None:
    assert reference_table(runs) is None
    paper = make_runs(MILAN_AXES, paper_setting=True)
    table = reference_table(paper).set_index(["cell", "metric"])
    # the runs measure linear and fine-tune top-1: their rows only (no segmentation rows)
    assert list(table.index) == [("MILAN", "finetune_top1"), ("MILAN", "linear_top1")]
    assert table.loc[("MILAN", "finetune_top1"), "paper"] == 85.4
    assert table.loc[("MILAN", "linear_top1"), "OpenMMLab port"] == 78.9
    milan = paper.loc[paper["cell"] == "target=clip decoder=prompting masking=semantic"]
    assert table.loc[("MILAN", "linear_top1"), "measured_mean"] == pytest.approx(milan["linear_top1"].mean())
    assert table.loc[("MILAN", "linear_top1"), "n"] == 3
    assert list(REFERENCE_SOURCES) == list(table.columns[:3])


def test_reference_table_gives_the_paper_miou_for_milan_and_mae() -> None:
    """The ADE20K grid's report: 52.7 beside the MILAN cell, MAE's 48.1 beside the MAE cell."""
    paper = make_runs(MILAN_AXES, paper_setting=True)
    paper["seg_upernet_miou"] = paper["linear_top1"] - 20
    table = reference_table(paper.drop(columns=["linear_top1", "finetune_top1"], errors="ignore"))
    table = table.set_index(["cell", "metric"])
    assert list(table.index) == [("MILAN", "seg_upernet_miou"), ("MAE", "seg_upernet_miou")]
    assert table["paper"].tolist() == [52.7, 48.1]
    mae = paper.loc[paper["cell"] == "target=pixel decoder=standard masking=random", "seg_upernet_miou"]
    assert table.loc[("MAE", "seg_upernet_miou"), "measured_mean"] == pytest.approx(mae.mean())
    assert table.loc[("MAE", "seg_upernet_miou"), "delta_vs_paper"] == pytest.approx(mae.mean() - 48.1)


def test_unknown_metric_names_available_ones(runs: pd.DataFrame, tmp_path: Path) -> None:
    for bad in ("top5", "knn_top1"):  # missing column; column with no values
        with pytest.raises(ReportError) as info:
            build_report(runs, None, tmp_path, metric=bad)
        message = str(info.value)
        assert "\n" not in message
        assert repr(bad) in message
        assert "linear_top1, finetune_top1" in message
        assert "knn_top1," not in message  # not offered: it has no values
    assert isinstance(info.value, ValueError)


def test_write_tables_every_format(runs: pd.DataFrame, tmp_path: Path) -> None:
    table = cell_table(fail(runs, "cell2", 0, "OOM"), "linear_top1")
    paths = write_tables({"cells": table}, tmp_path)
    assert sorted(p.name for p in paths) == ["cells.csv", "cells.html", "cells.md", "cells.tex"]
    assert pd.read_csv(tmp_path / "cells.csv").shape == table.shape
    tex = (tmp_path / "cells.tex").read_text()
    assert r"\begin{tabular}" in tex and r"model.target" in tex and r"delta\_vs\_baseline" in tex
    md = (tmp_path / "cells.md").read_text()
    assert "nan" not in md and "1 failed: OOM" in md
    assert "<table" in (tmp_path / "cells.html").read_text()
    with pytest.raises(ReportError, match="unknown table formats"):
        write_tables({"cells": table}, tmp_path, formats=("xlsx",))


def test_build_report_writes_everything(tmp_path: Path) -> None:
    runs = fail(make_runs(MILAN_AXES, paper_setting=True), "cell1", 2, "preempted twice")
    result = build_report(runs, make_curves(runs), tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in result.files}
    tables = {f"tables/{t}.{fmt}" for t in ("cells", "effects", "reference")
              for fmt in ("md", "csv", "tex", "html")}
    figures = {f"figures/{f}.png" for f in ("metric_by_cell", "effects", "loss_curves",
                                            "cost")}
    assert names == {"report.md"} | tables | figures
    assert all(p.stat().st_size > 0 for p in result.files)
    report = result.report.read_text()
    assert report.startswith("# MILAN ablation report: test-grid")
    assert "24 runs: 23 done, 1 failed" in report
    assert "1 failed: preempted twice" in report
    for figure in figures:
        assert f"]({figure})" in report
    assert "## Reference numbers" in report and "85.40" in report
    # the verdicts in words come first, then the effects table with every column the issue names
    assert report.index("**Verdicts**") < report.index("## Effects and verdicts") < report.index("per cell")
    assert "Matters: **target** (clip − pixel) +5.00" in report
    effects = pd.read_csv(tmp_path / "tables" / "effects.csv")
    assert {"effect", "levels", "estimate", "ci_low", "ci_high", "p_value", "p_holm", "verdict", "n_seeds",
            "mde"} <= set(effects.columns)
    assert len(effects) == 7  # 3 main effects, 3 two-way interactions, the three-way one


def test_grid_without_axes_writes_an_empty_effects_table(tmp_path: Path) -> None:
    """One cell and no axes: no effect to estimate, and the report says so instead of failing."""
    runs = make_runs({})
    result = build_report(runs, None, tmp_path)
    assert (tmp_path / "tables" / "effects.md").is_file() and len(result.effects) == 0
    assert "No effects could be estimated" in result.report.read_text()


def test_build_report_without_curves(runs: pd.DataFrame, tmp_path: Path) -> None:
    result = build_report(runs, None, tmp_path, formats=("csv",))
    assert "loss_curves.png" not in {p.name for p in result.figures}
    assert sorted(p.name for p in result.tables) == ["cells.csv", "effects.csv"]
    report = result.report.read_text()
    assert "## Training loss" not in report and "## Reference numbers" not in report
