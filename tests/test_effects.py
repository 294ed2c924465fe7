"""Tests for harness.report.effects: intervals that cover, verdicts that hold their error
rates, and Lenth and power numbers that match the textbook and statsmodels."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

from harness.benchmarks.calibration import (
    AXES,
    BASE,
    METRIC,
    SimulatedGrid,
    false_resolution_rate,
    interval_coverage,
    planted_means,
    power_to_resolve,
)
from harness.report.effects import (
    EFFECT_COLUMNS,
    NEGLIGIBLE,
    NOT_RESOLVED,
    ONE_SEED,
    RANDOM_INIT_EFFECT,
    RESOLVED_DOWN,
    RESOLVED_UP,
    VERDICTS,
    estimate_effects,
    format_effects_for_terminal,
    lenth_pse,
    power_of_t_test,
    seeds_needed,
)
from harness.report.figures import plot_effects


def by_effect(effects: pd.DataFrame) -> pd.DataFrame:
    return effects.set_index("effect")


# --- calibration by simulation (the grids and figures of `bench.py calibrate`) ---------


def test_intervals_cover_true_effects_95_percent() -> None:
    coverage = interval_coverage(1000, np.random.default_rng(1))
    assert 0.93 <= coverage <= 0.97, coverage


def test_null_grid_rarely_resolves_any_effect_with_three_seeds() -> None:
    rate = false_resolution_rate(1000, 3, np.random.default_rng(2))
    assert rate <= 0.05, rate


def test_three_sd_main_effect_is_resolved_with_three_seeds() -> None:
    # 3 noise sd is about 7 standard errors at 3 seeds: 500 grids tell 90% apart from
    # the nearly 100% expected
    power = power_to_resolve(500, np.random.default_rng(3), effect=3.0)
    assert power >= 0.9, power


def test_null_grid_rarely_resolves_any_effect_with_one_seed_through_lenth() -> None:
    # false_resolution_rate raises if the one-seed effects did not go through Lenth
    rate = false_resolution_rate(1000, 1, np.random.default_rng(4))
    assert rate <= 0.05, rate


# --- verdicts --------------------------------------------------------------------------


def test_precise_effect_within_margin_is_negligible_even_when_significant() -> None:
    grid = SimulatedGrid(AXES, 3)
    runs = grid.runs(planted_means({"target": 0.3}), np.random.default_rng(5), noise_sd=0.01)
    target = by_effect(estimate_effects(runs, METRIC, margin=0.5)).loc["target"]
    assert target["p_holm"] < 0.05
    assert target["verdict"] == NEGLIGIBLE


def test_clear_effects_are_resolved_by_sign() -> None:
    grid = SimulatedGrid(AXES, 3)
    runs = grid.runs(planted_means({"target": 3.0, "decoder": -3.0}), np.random.default_rng(6),
                     seed_sd=1.0, noise_sd=0.1)
    effects = by_effect(estimate_effects(runs, METRIC))
    assert effects.at["target", "verdict"] == RESOLVED_UP
    assert effects.at["decoder", "verdict"] == RESOLVED_DOWN
    assert effects.at[RANDOM_INIT_EFFECT, "verdict"] == RESOLVED_UP


def test_noisy_effect_is_not_resolved_and_needs_more_seeds() -> None:
    grid = SimulatedGrid(AXES, 2)
    runs = grid.runs(planted_means({"target": 1.0}), np.random.default_rng(7), noise_sd=2.0)
    effects = estimate_effects(runs, METRIC, margin=0.5)
    target = by_effect(effects).loc["target"]
    assert target["verdict"] == NOT_RESOLVED
    assert target["p_holm"] >= 0.05 and target["ci_high"] - target["ci_low"] > 2 * 0.5
    assert 2 < target["seeds_needed"] <= 100
    open_effects = effects[effects["verdict"] == NOT_RESOLVED]
    assert effects.attrs["seeds_to_resolve"] == open_effects["seeds_needed"].max()


def test_one_seed_without_a_two_level_factorial_gives_estimates_only() -> None:
    axes = {**AXES, "model.mask_ratio": [0.75, 0.5, 0.9]}  # three levels: no Lenth
    grid = SimulatedGrid(axes, 1)
    effects = estimate_effects(grid.runs(np.full(24, BASE), np.random.default_rng(8)), METRIC)
    assert (effects["verdict"] == ONE_SEED).all()
    assert (effects["method"] == "none").all()
    assert effects["estimate"].notna().all() and effects["se"].isna().all()
    assert effects.attrs["seeds_to_resolve"] is None


def test_one_seed_two_level_grid_uses_lenth_except_for_random_init() -> None:
    grid = SimulatedGrid(AXES, 1)
    effects = by_effect(estimate_effects(grid.runs(planted_means({"target": 30.0}),
                                                   np.random.default_rng(9)), METRIC))
    assert effects.at[RANDOM_INIT_EFFECT, "verdict"] == ONE_SEED
    assert np.isnan(effects.at[RANDOM_INIT_EFFECT, "se"])
    factorial = effects[effects["order"] >= 1]
    assert (factorial["method"] == "Lenth PSE").all()
    assert factorial["se"].nunique() == 1 and (factorial["df"] == 7 / 3).all()
    assert factorial.at["target", "verdict"] == RESOLVED_UP


# --- Lenth against the textbook --------------------------------------------------------

# Montgomery, Design and Analysis of Experiments, the 2^4 filtration-rate example
# (factors A-D): effects, and the unreplicated runs in standard order that give them.
MONTGOMERY_EFFECTS = {
    "A": 21.625, "B": 3.125, "C": 9.875, "D": 14.625, "AB": 0.125, "AC": -18.125,
    "AD": 16.625, "BC": 2.375, "BD": -0.375, "CD": -1.125, "ABC": 1.875, "ABD": 4.125,
    "ACD": -1.625, "BCD": -2.625, "ABCD": 1.375,
}
MONTGOMERY_RUNS = [45, 71, 48, 65, 68, 60, 80, 65, 43, 100, 45, 104, 75, 86, 70, 96]


def test_lenth_pse_and_margin_of_error_match_montgomery() -> None:
    pse = lenth_pse(np.array(list(MONTGOMERY_EFFECTS.values())))
    assert pse == pytest.approx(2.625)
    assert round(stats.t.ppf(0.975, 5) * pse, 2) == 6.75


def test_estimate_effects_reproduces_montgomery_through_lenth() -> None:
    axes = {factor: ["-", "+"] for factor in "DCBA"}  # product order: A varies fastest
    grid = SimulatedGrid(axes, 1, random_init=False)
    runs = grid.frame.assign(**{METRIC: np.array(MONTGOMERY_RUNS, dtype=float)})
    effects = estimate_effects(runs, METRIC)
    # Names list axes in grid order (D before A): sort the letters to the textbook's.
    names = ["".join(sorted(effect.replace(" × ", ""))) for effect in effects["effect"]]
    estimates = dict(zip(names, effects["estimate"]))
    assert estimates == pytest.approx(MONTGOMERY_EFFECTS)
    assert effects["se"].to_numpy() == pytest.approx(2.625)
    assert (effects["ci_high"] - effects["estimate"]).round(2).eq(6.75).all()
    assert effects.attrs["method"].startswith("Lenth's pseudo standard error (one seed, 15")


# --- power against statsmodels ---------------------------------------------------------


@pytest.mark.parametrize("effect", [0.3, 0.5, 0.8, 1.2, 2.0])
def test_seeds_needed_matches_statsmodels_paired_t_test(effect: float) -> None:
    sd, alpha = 1.5, 0.05
    expected = math.ceil(TTestPower().solve_power(effect_size=effect / sd, alpha=alpha,
                                                  power=0.8, alternative="two-sided"))
    needed = seeds_needed(effect, sd, lambda n: n - 1, alpha, 0.8, start=2, max_seeds=1000)
    assert needed == max(expected, 2)


def test_seeds_needed_caps_and_refuses() -> None:
    assert seeds_needed(0.01, 1.0, lambda n: n - 1, 0.05, 0.8, start=2, max_seeds=50) == 50
    assert seeds_needed(5.0, 1.0, lambda n: n - 1, 0.05, 0.8, start=10, max_seeds=50) == 10
    assert seeds_needed(1.0, np.nan, lambda n: n - 1, 0.05, 0.8, start=2, max_seeds=50) is None


@pytest.mark.parametrize(("effect_size", "nobs", "alpha"),
                         [(0.2, 10, 0.05), (0.5, 5, 0.01), (1.0, 3, 0.05), (2.0, 8, 0.001)])
def test_power_of_t_test_matches_statsmodels(effect_size: float, nobs: int, alpha: float) -> None:
    expected = TTestPower().power(effect_size=effect_size, nobs=nobs, alpha=alpha)
    power = power_of_t_test(effect_size * math.sqrt(nobs), nobs - 1, alpha)
    assert power == pytest.approx(expected)


# --- grids that are not a clean 2^k ----------------------------------------------------


def test_failed_run_leaves_an_unbalanced_grid_that_still_works() -> None:
    grid = SimulatedGrid(AXES, 3)
    runs = grid.runs(planted_means({"target": 3.0}), np.random.default_rng(10), noise_sd=0.1)
    runs.loc[0, "status"] = "failed"  # the baseline cell's first seed
    effects = by_effect(estimate_effects(runs, METRIC))
    assert effects["df"].eq(15).all()  # one run fewer than the balanced 16
    assert effects["se"].notna().all()
    assert effects.at["target", "estimate"] == pytest.approx(3.0, abs=0.3)
    assert effects.at["target", "verdict"] == RESOLVED_UP
    assert effects.attrs["method"] == "OLS with seed as block (runs paired by seed), residual df 15"


def test_three_level_axis_gives_each_level_against_its_baseline() -> None:
    axes = {"model.target": ["pixel", "clip"], "model.mask_ratio": [0.75, 0.5, 0.9]}
    planted_ratio = {0.75: 0.0, 0.5: -1.5, 0.9: 2.0}
    grid = SimulatedGrid(axes, 3, random_init=False)
    cells = pd.DataFrame(itertools.product(*axes.values()), columns=list(axes))
    means = (BASE + 4.0 * (cells["model.target"] == "clip")
             + cells["model.mask_ratio"].map(planted_ratio)).to_numpy(dtype=float)
    effects = estimate_effects(grid.runs(means, np.random.default_rng(11), noise_sd=0.01),
                               METRIC)
    main = effects[effects["order"] == 1].set_index("levels")["estimate"]
    assert main.to_dict() == pytest.approx({"clip − pixel": 4.0, "0.5 − 0.75": -1.5,
                                            "0.9 − 0.75": 2.0}, abs=0.05)
    interactions = effects[effects["order"] == 2]
    assert list(interactions["levels"]) == ["clip×0.5 vs pixel×0.75", "clip×0.9 vs pixel×0.75"]
    assert interactions["estimate"].to_numpy() == pytest.approx(0.0, abs=0.05)


def test_incomplete_grid_skips_interactions_that_are_not_estimable() -> None:
    grid = SimulatedGrid(AXES, 2)
    runs = grid.runs(planted_means({"target": 3.0}), np.random.default_rng(12), noise_sd=0.01)
    excluded = (runs["model.target"] == "clip") & (runs["model.decoder"] == "prompting") & (
        runs["model.masking"] == "semantic")
    effects = by_effect(estimate_effects(runs[~excluded], METRIC))
    assert "target × decoder × masking" not in effects.index
    # still estimable from the masking=random half of the grid
    assert effects.at["target × decoder", "estimate"] == pytest.approx(0.0, abs=0.05)
    assert effects.at["target", "estimate"] == pytest.approx(3.0, abs=0.05)
    assert effects.at[RANDOM_INIT_EFFECT, "levels"] == "mean of 7 cells − random init"


def test_random_init_runs_without_a_shared_seed_get_no_interval() -> None:
    grid = SimulatedGrid(AXES, 3)
    runs = grid.runs(planted_means({}), np.random.default_rng(13))
    runs.loc[runs["role"] == "random_init", "seed"] = 99  # seeds no cell ran with
    effects = by_effect(estimate_effects(runs, METRIC))
    assert effects.at[RANDOM_INIT_EFFECT, "method"] == "none"
    assert np.isnan(effects.at[RANDOM_INIT_EFFECT, "se"])
    assert effects.at["target", "method"] == "OLS, seed as block"


# --- output ----------------------------------------------------------------------------


def test_table_terminal_text_and_forest_plot(tmp_path: Path) -> None:
    grid = SimulatedGrid(AXES, 1)
    effects = estimate_effects(grid.runs(planted_means({"target": 30.0}),
                                         np.random.default_rng(14)), METRIC)
    assert list(effects.columns) == EFFECT_COLUMNS
    assert set(effects["verdict"]) <= set(VERDICTS)
    assert {"metric", "margin", "alpha", "power", "method", "residual_sd",
            "seeds_to_resolve"} <= set(effects.attrs)
    text = format_effects_for_terminal(effects)
    assert "clip − pixel" in text and "resolved +" in text and "[" in text
    path = plot_effects(effects, METRIC, tmp_path / "effects.png")  # NaN interval included
    assert path.stat().st_size > 0
