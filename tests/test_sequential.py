"""The sequential verdicts of ``ablate --until-resolved`` (harness.report.sequential): boundaries
against published values, Holm's alpha recycling, the record's idempotent looks, and the error
rates by simulation (a few hundred chains here; ``bench.py calibrate-sequential`` runs thousands)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.benchmarks.calibration import AXES, SimulatedGrid, planted_means
from harness.benchmarks.sequential_calibration import calibrate_sequential, fixed_seeds_for_power
from harness.report import sequential
from harness.report.effects import NEGLIGIBLE, RESOLVED_UP


def test_obrien_fleming_boundaries_match_the_published_ones() -> None:
    """Lan-DeMets O'Brien-Fleming spending, 5 equally spaced looks, one-sided alpha 0.025: gsDesign's
    sfLDOF bounds (Jennison & Turnbull's Table 2.3 design) are 4.877, 3.357, 2.680, 2.290, 2.031."""
    bounds = sequential.boundaries((0.2, 0.4, 0.6, 0.8, 1.0), 0.025, False)
    assert bounds == pytest.approx((4.877, 3.357, 2.680, 2.290, 2.031), abs=2e-3)
    # one look spends all of alpha: the fixed test
    assert sequential.boundaries((1.0,), 0.05, True)[0] == pytest.approx(stats.norm.isf(0.025))
    # the spending function: nothing at 0, alpha at 1, the two-sided total preserved
    assert sequential.spent(0.0, 0.05) == 0 and sequential.spent(1.0, 0.05) == pytest.approx(0.05)


@pytest.mark.parametrize("spending", [sequential.OBRIEN_FLEMING, sequential.POCOCK])
def test_boundaries_spend_exactly_alpha_by_simulation(spending: str) -> None:
    """The crossing probability of the two-sided boundaries over Brownian motion is alpha."""
    fractions = (0.25, 0.5, 1.0)
    bounds = np.array(sequential.boundaries(fractions, 0.05, True, spending))
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(200_000, 3)) * np.sqrt(np.diff((0.0, *fractions)))
    z = np.cumsum(steps, axis=1) / np.sqrt(fractions)
    assert np.mean((np.abs(z) >= bounds).any(axis=1)) == pytest.approx(0.05, abs=0.0025)


def test_look_schedule_is_evenly_spaced_from_the_first_round_to_the_cap() -> None:
    assert sequential.look_schedule(3, 12) == [3, 5, 8, 10, 12]
    assert sequential.look_schedule(2, 3) == [2, 3]
    assert sequential.look_schedule(3, 3) == [3]


def _effects(p_values: list[float], estimates: list[float], se: float = 0.1) -> pd.DataFrame:
    keys = [f"e{i}" for i in range(len(p_values))]
    return pd.DataFrame({"estimate": estimates, "se": se, "df": 1e6, "p_value": p_values}, index=keys)


def test_holm_recycles_alpha_within_a_look() -> None:
    """At the final look of a one-look design the boundaries are the fixed ones: three effects with
    p 0.01, 0.02, 0.04 are all resolved by Holm (0.05/3, 0.05/2, 0.05), and with 0.01, 0.03, 0.04
    only the first (0.03 > 0.025)."""
    all_three = sequential.sequential_verdicts(_effects([0.01, 0.02, 0.04], [1, 1, 1]), (1.0,), None, 0.01, 0.05)
    assert list(all_three.verdicts.values()) == [RESOLVED_UP] * 3
    first_only = sequential.sequential_verdicts(_effects([0.01, 0.03, 0.04], [1, 1, 1]), (1.0,), None, 0.01, 0.05)
    assert list(first_only.verdicts.values()) == [RESOLVED_UP, None, None]


def test_an_early_look_spends_little_and_a_verdict_stays() -> None:
    """p = 0.001 resolves at the final look but not at an early one (t = 0.25: O'Brien-Fleming's
    nominal level there is about 1e-5); a verdict reached once is kept at later looks."""
    effects = _effects([0.001], [1.0])
    early = sequential.sequential_verdicts(effects, (0.25,), None, 0.01, 0.05)
    assert early.verdicts == {"e0": None}
    final = sequential.sequential_verdicts(effects, (0.25, 1.0), early, 0.01, 0.05)
    assert final.verdicts == {"e0": RESOLVED_UP}
    later = sequential.sequential_verdicts(_effects([0.9], [0.0]), (0.25, 1.0), final, 0.01, 0.05)
    assert later.verdicts == {"e0": RESOLVED_UP}


def test_negligible_needs_the_spent_interval_inside_the_margin() -> None:
    """Estimate 0 with se 0.1 and margin 0.3: 3 se from each margin, which clears the final look's
    one-sided boundary (1.645 for one look, a little more after an earlier one) but not the first
    look's at t = 0.2 (about 3.7)."""
    effects = _effects([0.9], [0.0], se=0.1)
    assert sequential.sequential_verdicts(effects, (0.2,), None, 0.3, 0.05).verdicts == {"e0": None}
    assert sequential.sequential_verdicts(effects, (0.2, 1.0), None, 0.3, 0.05).verdicts == {"e0": NEGLIGIBLE}


def _runs(seeds: int, effect: float) -> pd.DataFrame:
    grid = SimulatedGrid(AXES, seeds)
    return grid.runs(planted_means({"target": effect}), np.random.default_rng(seeds), noise_sd=0.5)


def test_a_look_is_taken_once_and_a_round_without_new_seeds_stops_the_chain(tmp_path) -> None:
    design = {"metric": "linear_top1", "margin": 0.5, "max_seeds": 6, "schedule": [2, 4, 6],
              "scope": ["target", "decoder"]}
    sequential.start(tmp_path, design)
    first = sequential.decide(tmp_path, _runs(2, 0.4), look=1)
    assert first.look == 1 and first.seeds == 2 and first.next_seeds == 4
    again = sequential.decide(tmp_path, _runs(4, 0.4), look=1)  # a decision job started twice
    assert again == first and len(sequential.read_state(tmp_path).looks) == 1
    stalled = sequential.decide(tmp_path, _runs(2, 0.4), look=2)  # round 2 finished no new seed
    assert stalled.next_seeds is None and "added no finished seed" in stalled.reason
    assert len(sequential.read_state(tmp_path).looks) == 1


def test_the_seed_budget_stops_the_chain_with_the_open_effects(tmp_path) -> None:
    design = {"metric": "linear_top1", "margin": 0.01, "max_seeds": 3, "schedule": [2, 3], "scope": ["target"]}
    sequential.start(tmp_path, design)
    assert sequential.decide(tmp_path, _runs(2, 0.0), look=1).next_seeds == 3
    last = sequential.decide(tmp_path, _runs(3, 0.0), look=2)
    assert last.next_seeds is None and last.reason.startswith("budget: 3 seeds is the cap")
    assert "target" in last.reason


def test_simulated_error_rates_hold() -> None:
    """150 chains per scenario (looks at 2, 4, 5, 6, 8 seeds; the CLI runs 2,000 at the demo's
    settings): the family-wise false-resolution rate under the null and the false-negligible rate
    at twice the margin stay at alpha (plus 3 Monte Carlo standard errors); the margin-sized
    effect is resolved more often than not by the cap."""
    n = 150
    result = calibrate_sequential(n, seed=3, first_seeds=2, max_seeds=8)
    allowance = 3 * np.sqrt(0.05 * 0.95 / n)
    assert result.false_resolved <= 0.05 + allowance
    assert result.false_negligible <= 0.05 + allowance
    assert result.power > 0.5
    assert result.schedule == [2, 4, 5, 6, 8]
    assert 2 <= result.seeds_used <= 8 and result.fixed_seeds is not None


def test_fixed_design_seeds_grow_with_the_power_asked() -> None:
    low = fixed_seeds_for_power(0.5, 0.5, 0.59, 0.0125)
    high = fixed_seeds_for_power(0.95, 0.5, 0.59, 0.0125)
    assert low is not None and high is not None and low < high


def test_the_hours_budget_stops_before_a_round_it_cannot_pay_for(tmp_path) -> None:
    """2 seeds cost 1.8 device-hours (0.1 a run, 9 runs a seed): the round to 4 seeds would cost
    1.8 more, and --max-hours 3 leaves 1.2: the chain stops and says what is left."""
    design = {"metric": "linear_top1", "margin": 0.01, "max_seeds": 6, "max_hours": 3.0, "schedule": [2, 4, 6],
              "scope": ["target"]}
    sequential.start(tmp_path, design)
    decision = sequential.decide(tmp_path, _runs(2, 0.0).assign(gpu_hours=0.1), look=1)
    assert decision.next_seeds is None and decision.device_hours == pytest.approx(1.8)
    assert decision.reason.startswith("budget: the round to 4 seeds would cost about 1.8 device-hours, 1.2 of "
                                      "--max-hours 3 are left (enough for 1 more seed(s))")
