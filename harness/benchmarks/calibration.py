"""Benchmark: are the report's intervals and verdicts calibrated? (``bench.py calibrate``).

The report states every effect of a grid with a 95% interval and a verdict
(:func:`harness.report.effects.estimate_effects`). Whether those keep their promises is a
property of the whole procedure (blocked OLS, Lenth's pseudo standard error, Holm's
correction, the verdict rules), so it is measured here by simulation, through
``estimate_effects`` itself: thousands of synthetic 2x2x2 grids (axes model.target,
model.decoder, model.masking, plus one random-init run per seed) whose true effects are
known. Each run is its cell mean + a seed offset shared by every run of that seed (a block
effect, sd 1) + Gaussian noise (sd 1). Four figures, each against its requirement:

- coverage: the share of 95% intervals, over every effect of every grid, that contain the
  true effect, with 3 seeds and random cell means (should be 93-97%);
- false resolution with 3 seeds: the share of grids with every effect zero where any
  factorial effect (order >= 1) is nevertheless "resolved +" or "resolved -", i.e. the
  family-wise error rate that Holm's correction should hold at alpha = 5%;
- false resolution with 1 seed: the same, where intervals come from Lenth's method;
- power: the share of grids, 3 seeds, where a main effect of 3 noise sd is "resolved +"
  (should be at least 90%; it is about 7 standard errors).

The tests (``tests/test_effects.py``) assert on these same functions, so the figures the
command prints and the ones the test suite holds are computed by one piece of code.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.report.effects import (
    METHOD_LENTH,
    RANDOM_INIT_EFFECT,
    RESOLVED_DOWN,
    RESOLVED_UP,
    estimate_effects,
)

AXES: dict[str, list[object]] = {
    "model.target": ["pixel", "clip"],
    "model.decoder": ["standard", "prompting"],
    "model.masking": ["random", "semantic"],
}
METRIC = "linear_top1"
# Cell means sit around BASE; the random-init reference far below it, as in real grids.
BASE = 50.0
RANDOM_INIT_MEAN = 20.0
NOISE_SD = 1.0
SEED_SD = 1.0
# Spread of the random cell means of the coverage simulation: effects of a few noise sd,
# so that intervals are checked on effects of every size, not only on zero.
CELL_MEAN_SD = 2.0
# The planted main effect of the power simulation, in noise sd.
POWER_EFFECT = 3.0
RESOLVED = (RESOLVED_UP, RESOLVED_DOWN)
N_CELLS = 2 ** len(AXES)
# The verdicts' settings in the simulation: estimate_effects' defaults, said explicitly
# because report_lines prints them.
MARGIN = 0.5
ALPHA = 0.05
# Effect name -> its axes, for every main effect and interaction of AXES (the names
# estimate_effects gives them: short axis names joined by " × ").
FACTORIAL_EFFECTS: dict[str, tuple[str, ...]] = {
    " × ".join(axis.split(".")[-1] for axis in subset): subset
    for order in range(1, len(AXES) + 1)
    for subset in itertools.combinations(AXES, order)
}
# Requirements the figures are held to (the tests assert the same bounds).
COVERAGE_RANGE = (0.93, 0.97)
MAX_FALSE_RESOLUTION = 0.05
MIN_POWER = 0.90


@contextmanager
def cheap_garbage_collection() -> Iterator[None]:
    """Freeze what is already allocated while the grids are simulated.

    statsmodels' Holm branch of multipletests calls gc.collect() on every call (statsmodels
    PR #8671), about 50 ms with pandas, scipy and statsmodels loaded, which would dominate
    thousands of simulated grids. Frozen objects are not scanned, so each collection only
    looks at the new ones. Unfrozen afterwards, unless the caller had frozen objects
    already (unfreezing would undo its freeze too).
    """
    already_frozen = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not already_frozen:
            gc.unfreeze()


# --- synthetic grids -------------------------------------------------------------------


class SimulatedGrid:
    """A full factorial grid's runs frame (one run per cell x seed, cells in
    itertools.product order of `axes`, plus one random-init run per seed), refilled with
    fresh values by `runs`: built once, so that simulating thousands of grids measures
    estimate_effects rather than frame construction."""

    def __init__(self, axes: Mapping[str, list[object]], seeds: int, *,
                 random_init: bool = True) -> None:
        cells = pd.DataFrame(itertools.product(*axes.values()), columns=list(axes))
        cells["cell"] = cells.astype(str).agg(" ".join, axis=1)
        cells["cell_id"] = [f"c{i}" for i in range(len(cells))]
        cells["role"] = "cell"
        if random_init:  # its axis columns hold junk: the contract says to ignore them
            cells = cells.astype(object)
            cells.loc[len(cells)] = {**{axis: "untrained" for axis in axes},
                                     "cell": "random init", "cell_id": "ri",
                                     "role": "random_init"}
        self.frame = cells.merge(pd.DataFrame({"seed": range(seeds)}), how="cross")
        self.frame["status"] = "done"
        self.frame.attrs = {"axes": list(axes),
                            "axis_baselines": {axis: v[0] for axis, v in axes.items()},
                            "metrics": [METRIC]}
        self.seeds = seeds
        self.random_init = random_init
        self.treatment = np.arange(len(self.frame)) // seeds  # cross join: seeds vary fastest
        self.seed = np.arange(len(self.frame)) % seeds

    def runs(self, cell_means: np.ndarray, rng: np.random.Generator, *, seed_sd: float = 0.0,
             noise_sd: float = NOISE_SD) -> pd.DataFrame:
        """Each run: its cell mean + its seed's offset (shared by every run of that seed,
        a block effect) + Gaussian noise."""
        means = np.r_[cell_means, RANDOM_INIT_MEAN] if self.random_init else cell_means
        offset = rng.normal(0, seed_sd, self.seeds)
        values = (means[self.treatment] + offset[self.seed]
                  + rng.normal(0, noise_sd, len(self.frame)))
        return self.frame.assign(**{METRIC: values})


def coding() -> pd.DataFrame:
    """±1 coding of every cell of AXES (product order), one column per axis."""
    return pd.DataFrame(itertools.product((-1, 1), repeat=len(AXES)), columns=list(AXES))


def true_effect_matrix() -> pd.DataFrame:
    """Effects of the 2^3 grid as rows of weights over its cell means, by the textbook
    formula (sum of ±cell means / 2^(k-1)), written independently of the report's
    contrast builder so that it checks it. The random-init effect is the mean of the cell
    means, less the random-init mean (subtracted by the caller)."""
    signs = coding()
    rows = {name: signs[list(axes)].prod(axis=1) / 4 for name, axes in FACTORIAL_EFFECTS.items()}
    rows[RANDOM_INIT_EFFECT] = pd.Series(1 / len(signs), signs.index)
    return pd.DataFrame(rows).T


def planted_means(effects: Mapping[str, float]) -> np.ndarray:
    """Cell means around BASE with the given effects (BHH convention), every other zero."""
    signs = coding()
    planted = sum((effect / 2 * signs[list(FACTORIAL_EFFECTS[name])].prod(axis=1)
                   for name, effect in effects.items()), start=pd.Series(0.0, signs.index))
    return BASE + planted.to_numpy(dtype=float)


def simulate(n_grids: int, seeds: int, cell_means: Callable[[np.random.Generator], np.ndarray],
             rng: np.random.Generator, *, seed_sd: float = SEED_SD,
             ) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """(true cell means, estimate_effects) of `n_grids` simulated grids of AXES."""
    grid = SimulatedGrid(AXES, seeds)
    for _ in range(n_grids):
        means = cell_means(rng)
        yield means, estimate_effects(grid.runs(means, rng, seed_sd=seed_sd), METRIC,
                                      margin=MARGIN, alpha=ALPHA)


# --- the four figures ------------------------------------------------------------------


def interval_coverage(n_grids: int, rng: np.random.Generator, *, seeds: int = 3) -> float:
    """Share of the 95% intervals, over every effect of `n_grids` grids with random cell
    means, that contain the true effect."""
    effect_weights = true_effect_matrix()
    random_init = effect_weights.index == RANDOM_INIT_EFFECT
    covered = []
    with cheap_garbage_collection():
        for means, effects in simulate(n_grids, seeds,
                                       lambda r: BASE + r.normal(0, CELL_MEAN_SD, N_CELLS), rng):
            truth = pd.Series(effect_weights.to_numpy() @ means - random_init * RANDOM_INIT_MEAN,
                              effect_weights.index)[effects["effect"]].to_numpy()
            covered.append((effects["ci_low"] <= truth) & (truth <= effects["ci_high"]))
    return float(np.mean(np.concatenate(covered)))


def false_resolution_rate(n_grids: int, seeds: int, rng: np.random.Generator) -> float:
    """Share of grids with every effect zero where any factorial effect (order >= 1) is
    resolved either way: the family-wise error rate of the verdicts. With one seed the
    factorial effects must go through Lenth's method (a ValueError otherwise: the figure
    would measure something else)."""
    false_resolutions = []
    with cheap_garbage_collection():
        for _, effects in simulate(n_grids, seeds, lambda r: np.full(N_CELLS, BASE), rng):
            factorial = effects[effects["order"] >= 1]
            if seeds == 1 and not (factorial["method"] == METHOD_LENTH).all():
                raise ValueError("one-seed factorial effects were not estimated through Lenth")
            false_resolutions.append(factorial["verdict"].isin(RESOLVED).any())
    return float(np.mean(false_resolutions))


def power_to_resolve(n_grids: int, rng: np.random.Generator, *, effect: float = POWER_EFFECT,
                     seeds: int = 3) -> float:
    """Share of grids where a planted main effect of the target axis (`effect` noise sd,
    every other effect zero) is "resolved +"."""
    means = planted_means({"target": effect})
    resolved = []
    with cheap_garbage_collection():
        for _, effects in simulate(n_grids, seeds, lambda r: means, rng):
            resolved.append(effects.set_index("effect").at["target", "verdict"] == RESOLVED_UP)
    return float(np.mean(resolved))


# --- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The four figures (shares in 0..1), how many grids each is over, and the wall time."""

    coverage: float
    false_resolution_3_seeds: float
    false_resolution_1_seed: float
    power: float
    n_grids: int
    seed: int
    seconds: float


def calibrate(n_grids: int = 3000, seed: int = 0) -> Calibration:
    """Simulate `n_grids` grids for each figure; `seed` fixes every draw."""
    if n_grids < 1:
        raise ValueError(f"n_grids={n_grids}: need at least one grid")
    # One independent stream per figure: changing how many draws one figure takes does
    # not change the others.
    coverage_rng, null3_rng, null1_rng, power_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    start = time.perf_counter()
    with cheap_garbage_collection():
        coverage = interval_coverage(n_grids, coverage_rng)
        null3 = false_resolution_rate(n_grids, 3, null3_rng)
        null1 = false_resolution_rate(n_grids, 1, null1_rng)
        power = power_to_resolve(n_grids, power_rng)
    return Calibration(coverage=coverage, false_resolution_3_seeds=null3,
                       false_resolution_1_seed=null1, power=power, n_grids=n_grids, seed=seed,
                       seconds=time.perf_counter() - start)


def report_lines(result: Calibration) -> str:
    """Each figure with its requirement and OK/FAIL, then the setting and the wall time."""
    low, high = COVERAGE_RANGE

    def verdict(ok: bool) -> str:
        return "OK" if ok else "FAIL"

    # A rate's binomial standard error over the grids, so the reader sees how far a figure
    # near its bound could move with another seed. Coverage gets none: it pools the
    # intervals of a grid, which share its residual sd and are not independent.
    def share(value: float, with_se: bool = True) -> str:
        se = np.sqrt(value * (1 - value) / result.n_grids)
        return f"{100 * value:.1f}%" + (f" (± {100 * se:.1f})" if with_se else "")

    rows = [
        (f"95% interval coverage, 3 seeds, random cell means ({len(FACTORIAL_EFFECTS) + 1} "
         "effects a grid)", share(result.coverage, with_se=False),
         f"{100 * low:.0f}-{100 * high:.0f}%", low <= result.coverage <= high),
        ("false resolution, all effects zero, 3 seeds (OLS)", share(result.false_resolution_3_seeds),
         f"<= {100 * MAX_FALSE_RESOLUTION:.0f}%",
         result.false_resolution_3_seeds <= MAX_FALSE_RESOLUTION),
        ("false resolution, all effects zero, 1 seed (Lenth)", share(result.false_resolution_1_seed),
         f"<= {100 * MAX_FALSE_RESOLUTION:.0f}%",
         result.false_resolution_1_seed <= MAX_FALSE_RESOLUTION),
        (f"power, {POWER_EFFECT:g}-sd main effect resolved +, 3 seeds", share(result.power),
         f">= {100 * MIN_POWER:.0f}%", result.power >= MIN_POWER),
    ]
    width = max(len(name) for name, *_ in rows)
    lines = [f"{name:<{width}}  {value:>15}  (requirement {requirement}: {verdict(ok)})"
             for name, value, requirement, ok in rows]
    n_simulated = 4 * result.n_grids
    lines.append(f"{result.n_grids} grids per figure (seed {result.seed}): 2x2x2 grid of "
                 f"{', '.join(AXES)} + random init, noise sd {NOISE_SD:g}, seed block sd "
                 f"{SEED_SD:g}, through estimate_effects (margin {MARGIN:g}, alpha {ALPHA:g})")
    lines.append(f"wall time {result.seconds:.1f} s ({1000 * result.seconds / n_simulated:.1f} ms "
                 f"per grid)")
    return "\n".join(lines)
