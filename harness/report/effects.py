"""Effects of an ablation grid with uncertainty, a verdict each, and the seeds still needed.

Every effect is a linear contrast of treatment means with weights summing to zero. A
treatment is a grid cell, plus one "random init" treatment when the `runs` frame has
reference runs (``role == "random_init"``: the untrained encoder evaluated once per seed), and
one "teacher" treatment when it has the teacher's (``role == "teacher"``: the frozen teacher's
image tower evaluated with the cells' protocols, once per seed).
Only finished runs count (see `tables.finished_values`).

- Main effect of each non-baseline level v of an axis: mean(v, o) - mean(baseline, o),
  averaged over the other axes' combinations o where both cells exist.
- Interaction of a set S of two or more axes, one non-baseline level chosen per axis (Box,
  Hunter & Hunter convention): the contrast over the 2^|S| sub-cells (each axis of S at its
  baseline or its chosen level) with sign = product of +1 (chosen) and -1 (baseline),
  divided by 2^(|S|-1), averaged over the combinations of the other axes where all 2^|S|
  cells exist. With |S| = 1 this is the main effect, and in a 2^k design every effect then
  has the same standard error, which Lenth's method needs. An effect with no such
  combination is not estimable and has no row.
- "pretrained vs random init": mean of the cell means minus the random-init mean.
- "student vs teacher": mean of the means of the cells that distil the teacher (CLIP targets;
  every cell when the frame has no `model.target` column) minus the teacher's mean.

Uncertainty. With two or more seeds the runs are a randomized complete block design: a
seed fixes data order and initialisation for every cell, so it is a block. Ordinary least
squares of the metric on treatment indicators plus seed indicators gives each contrast's
estimate, standard error, t test and interval (unbalanced data, i.e. failed runs, is fine).
With one seed there is no replicate; if the grid is a complete factorial of two-level axes,
Lenth's pseudo standard error stands in for the error of the factorial effects, otherwise
effects are estimates only. Holm's correction runs over every effect that has a p-value.

Verdict of an effect (`VERDICTS`):
1. "negligible" when its whole confidence interval lies inside (-margin, +margin): a
   precisely measured effect smaller than the margin does not matter, even when it is
   significantly different from zero;
2. otherwise "resolved +" / "resolved -" (by the sign of the estimate) when its
   Holm-adjusted p-value is below alpha;
3. otherwise "not resolved" ("not resolved: one seed" when the grid has one seed and the
   effect has no interval; with more seeds, an effect without one is "not resolved").

Power. `mde` is the effect that would be resolved with probability `power` at the
Bonferroni level alpha/m (m effects with a p-value: Holm's first step, so Holm resolves an
effect of that size with at least that power). `seeds_needed` is the number of seeds,
counting the existing ones, at which an effect of size `margin` would be, assuming the
standard error shrinks as 1/sqrt(seeds); it is capped at max_seeds (read max_seeds as
"that many or more"). `n_seeds` counts the seeds in which a run of a treatment in the
effect's contrast finished.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import SingularMatrixWarning

from harness.tracking.schema import CELL_ROLE, RANDOM_INIT, TEACHER
from harness.report.tables import (
    axis_levels,
    check_metric,
    finished_values,
    grid_axes,
)

VERDICTS = ("resolved +", "resolved -", "negligible", "not resolved", "not resolved: one seed")
RESOLVED_UP, RESOLVED_DOWN, NEGLIGIBLE, NOT_RESOLVED, ONE_SEED = VERDICTS
EFFECT_COLUMNS = ["effect", "levels", "order", "estimate", "se", "ci_low", "ci_high", "df",
                  "p_value", "p_holm", "verdict", "n_seeds", "mde", "seeds_needed", "method"]

RANDOM_INIT_EFFECT = "pretrained vs random init"
TEACHER_EFFECT = "student vs teacher"
# Treatment keys of the reference runs (cells are keyed by cell_id, a hash).
RANDOM_INIT_TREATMENT = "random init"
TEACHER_TREATMENT = "teacher"

METHOD_OLS = "OLS, seed as block"
METHOD_LENTH = "Lenth PSE"
METHOD_NONE = "none"
# Lenth's pseudo standard error is a median of the effects: with fewer than three (a
# one-axis grid) it is the effect itself and the test is meaningless.
MIN_LENTH_EFFECTS = 3
# Relative tolerance of the estimability check (L in the row space of the design).
ESTIMABLE_TOL = 1e-8


@dataclass(frozen=True)
class Contrast:
    """One effect: its name, levels, order and weights over the treatments."""

    effect: str
    levels: str
    order: int
    weights: np.ndarray


@dataclass(frozen=True)
class Inference:
    """Intervals of all contrasts from one method; NaN where it gives none."""

    estimate: np.ndarray
    se: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    df: float
    method: np.ndarray  # per contrast: METHOD_OLS, METHOD_LENTH or METHOD_NONE
    description: str  # one sentence for attrs["method"]
    residual_sd: float
    df_at: Callable[[int], float]  # residual df at n seeds, for seeds_needed


# --- power -----------------------------------------------------------------------------


def power_of_t_test(effect_over_se: float | np.ndarray, df: float | np.ndarray,
                    alpha: float) -> float | np.ndarray:
    """Power of a two-sided t test at level `alpha` when the true effect is
    `effect_over_se` standard errors (exact noncentral t; vectorised over arrays)."""
    return _power_beyond(stats.t.ppf(1 - alpha / 2, df), effect_over_se, df)


def _power_beyond(critical: float | np.ndarray, effect_over_se: float | np.ndarray,
                  df: float | np.ndarray) -> float | np.ndarray:
    """P(|T| > critical) for T noncentral t with `df` and noncentrality `effect_over_se`."""
    # The lower tail P(T < -c | delta) is taken as P(T > c | -delta): scipy's nct.cdf
    # returns NaN far in that tail (e.g. df 2.3, delta 8), its sf does not.
    effect_over_se = np.asarray(effect_over_se)
    upper_tail, lower_tail = stats.nct.sf(critical, df,
                                          np.stack([effect_over_se, -effect_over_se]))
    return upper_tail + lower_tail


def detectable_effect_over_se(df: float, alpha: float, power: float) -> float:
    """The effect, in standard errors, that a two-sided t test at level `alpha` with `df`
    degrees of freedom detects with probability `power`."""
    critical = stats.t.ppf(1 - alpha / 2, df)
    # Bracket from the critical value, where the power is about one half: [c, 2c] usually
    # holds the root, and brentq needs fewer steps there than from 0.
    lower, upper = 0.0, critical
    while _power_beyond(critical, upper, df) < power:  # power rises to 1: this ends
        lower, upper = upper, 2 * upper
    return optimize.brentq(lambda delta: _power_beyond(critical, delta, df) - power, lower, upper,
                           xtol=1e-6)


def seeds_needed(effect: float, se_per_seed: float, df_at: Callable[[int], float], alpha: float,
                 power: float, start: int, max_seeds: int) -> int | None:
    """Smallest number of seeds n in [start, max_seeds] at which a two-sided t test at level
    `alpha` detects `effect` with probability `power`, when the standard error is
    se_per_seed / sqrt(n) and the test has df_at(n) degrees of freedom.

    Returns max_seeds when even that many are not enough (read it as "max_seeds or
    more"), None when it cannot be computed (no finite positive standard error).
    """
    if not (np.isfinite(se_per_seed) and se_per_seed > 0) or start > max_seeds:
        return None
    seeds = np.arange(start, max_seeds + 1)
    df = np.array([df_at(int(n)) for n in seeds], dtype=float)
    achieved = np.zeros(len(seeds))
    testable = df > 0
    # One vectorised call for every candidate n: power rises with n (larger effect in
    # standard errors, more df), so the first n that reaches it is the answer.
    achieved[testable] = power_of_t_test(
        abs(effect) * np.sqrt(seeds[testable]) / se_per_seed, df[testable], alpha
    )
    reached = np.flatnonzero(achieved >= power)
    return int(seeds[reached[0]]) if len(reached) else max_seeds


# --- Lenth -----------------------------------------------------------------------------


def lenth_pse(effects: np.ndarray) -> float:
    """Lenth's (1989) pseudo standard error of the effects of an unreplicated factorial:
    1.5 x the median |effect| among those below 2.5 x s0, where s0 = 1.5 x median |effect|
    (the trimming drops the effects that are probably active)."""
    magnitude = np.abs(np.asarray(effects, dtype=float))
    s0 = 1.5 * np.median(magnitude)
    return float(1.5 * np.median(magnitude[magnitude < 2.5 * s0]))


# --- contrasts -------------------------------------------------------------------------


def _short(axis: str) -> str:
    """`model.target` -> `target`."""
    return axis.split(".")[-1]


def _factorial_contrasts(cell_treatment: dict[tuple[Hashable, ...], int], axes: list[str],
                         levels: dict[str, list[Hashable]],
                         n_treatments: int) -> Iterator[Contrast]:
    """Main effects and interactions (BHH convention) of every estimable axis set and
    choice of non-baseline levels, lowest order first."""
    for order in range(1, len(axes) + 1):
        for subset in itertools.combinations(range(len(axes)), order):
            chosen_levels = [levels[axes[i]][1:] for i in subset]
            for chosen in itertools.product(*chosen_levels):
                weights = _interaction_weights(cell_treatment, axes, levels, subset, chosen,
                                               n_treatments)
                if weights is None:
                    continue
                baselines = [levels[axes[i]][0] for i in subset]
                if order == 1:
                    label = f"{chosen[0]} − {baselines[0]}"
                else:
                    label = f"{'×'.join(map(str, chosen))} vs {'×'.join(map(str, baselines))}"
                yield Contrast(" × ".join(_short(axes[i]) for i in subset), label, order, weights)


def _interaction_weights(cell_treatment: dict[tuple[Hashable, ...], int], axes: list[str],
                         levels: dict[str, list[Hashable]], subset: tuple[int, ...],
                         chosen: tuple[Hashable, ...], n_treatments: int) -> np.ndarray | None:
    """Weights of one BHH contrast over the treatments; None when no combination of the
    other axes has all 2^|S| cells."""
    others = [i for i in range(len(axes)) if i not in subset]
    baselines = [levels[axes[i]][0] for i in subset]
    corners = list(itertools.product((False, True), repeat=len(subset)))  # True: chosen level
    corner_values = [[value if at_chosen else baseline
                      for at_chosen, value, baseline in zip(corner, chosen, baselines)]
                     for corner in corners]
    signs = np.array([(-1) ** corner.count(False) for corner in corners])
    weights = np.zeros(n_treatments)
    complete = 0
    for rest in dict.fromkeys(tuple(key[i] for i in others) for key in cell_treatment):
        treatments = []
        for values in corner_values:
            by_axis = dict(zip(others, rest)) | dict(zip(subset, values))
            treatments.append(cell_treatment.get(tuple(by_axis[i] for i in range(len(axes)))))
        if None in treatments:
            continue
        weights[treatments] += signs / 2 ** (len(subset) - 1)
        complete += 1
    return weights / complete if complete else None


# --- inference -------------------------------------------------------------------------


def _blocked_ols(design: Design, contrasts: np.ndarray, unadjusted: np.ndarray,
                 alpha: float) -> Inference | None:
    """Randomized complete block design by OLS (cell-means coding plus seed blocks, the
    first seed dropped); None when no residual df is left. A contrast that is not
    estimable keeps its `unadjusted` estimate (contrast of the treatment means), no
    interval."""
    n_runs, n_treatments, n_seeds = len(design.values), design.n_treatments, design.n_seeds
    seed = design.seed
    # Cell-means coding: with weights summing to zero, the seed effects cancel.
    design_matrix = np.zeros((n_runs, n_treatments + n_seeds - 1))
    design_matrix[np.arange(n_runs), design.treatment] = 1
    blocked = seed > 0
    design_matrix[np.flatnonzero(blocked), n_treatments + seed[blocked] - 1] = 1
    with warnings.catch_warnings():
        # A rank-deficient design (e.g. random-init runs on seeds no cell ran with) is
        # expected: the estimability check below leaves its contrasts without interval.
        warnings.simplefilter("ignore", SingularMatrixWarning)
        results = sm.OLS(design.values, design_matrix).fit()
    if results.df_resid <= 0:
        return None
    full = np.hstack([contrasts, np.zeros((len(contrasts), n_seeds - 1))])
    # A contrast is estimable when it lies in the row space of the design; OLS would
    # otherwise report the minimum-norm solution's value as if it meant something (e.g.
    # random-init runs whose seeds no cell shares).
    projected = full @ np.linalg.pinv(design_matrix) @ design_matrix
    estimable = np.all(np.abs(projected - full) <= ESTIMABLE_TOL * np.abs(full).max(), axis=1)
    se, p_value, ci_low, ci_high = np.full((4, len(contrasts)), np.nan)
    estimate = unadjusted.copy()
    if estimable.any():
        test = results.t_test(full[estimable])
        interval = test.conf_int(alpha=alpha)
        estimate[estimable] = np.ravel(test.effect)
        se[estimable] = np.ravel(test.sd)
        p_value[estimable] = np.ravel(test.pvalue)
        ci_low[estimable], ci_high[estimable] = interval[:, 0], interval[:, 1]
    df_now = float(results.df_resid)
    return Inference(
        estimate=estimate, se=se, ci_low=ci_low, ci_high=ci_high, p_value=p_value, df=df_now,
        method=np.where(estimable, METHOD_OLS, METHOD_NONE),
        description=f"OLS with seed as block (runs paired by seed), residual df {df_now:g}",
        residual_sd=float(np.sqrt(results.scale)),
        # Each added complete seed adds T - 1 residual df; runs missing now stay missing.
        df_at=lambda n: df_now + (n_treatments - 1) * (n - n_seeds),
    )


def _lenth(estimates: np.ndarray, factorial: np.ndarray, n_treatments: int,
           alpha: float) -> Inference | None:
    """Lenth's method on the factorial effects of a one-seed complete 2^k grid (each effect
    is a ±1/2^(k-1) contrast of the cells, so all share one standard error, which Lenth's
    median estimates); None when the PSE is 0 (most effects exactly 0)."""
    m = int(factorial.sum())
    pse = lenth_pse(estimates[factorial])
    if pse == 0:
        return None
    df = m / 3
    critical = stats.t.ppf(1 - alpha / 2, df)
    se = np.where(factorial, pse, np.nan)
    return Inference(
        estimate=estimates, se=se, ci_low=estimates - critical * se,
        ci_high=estimates + critical * se,
        p_value=2 * stats.t.sf(np.abs(estimates) / se, df), df=df,
        method=np.where(factorial, METHOD_LENTH, METHOD_NONE),
        description=f"Lenth's pseudo standard error (one seed, {m} effects of two-level axes), "
                    f"df {df:.1f}",
        residual_sd=np.nan,
        # A second seed would allow the blocked OLS design and its residual df.
        df_at=lambda n: df if n == 1 else (n_treatments - 1) * (n - 1),
    )


def _estimates_only(estimates: np.ndarray, description: str) -> Inference:
    nan = np.full(len(estimates), np.nan)
    return Inference(
        estimate=estimates, se=nan, ci_low=nan, ci_high=nan, p_value=nan, df=np.nan,
        method=np.full(len(estimates), METHOD_NONE), description=description,
        residual_sd=np.nan, df_at=lambda n: np.nan,
    )


def _verdicts(inference: Inference, p_holm: np.ndarray, margin: float, alpha: float,
              n_seeds: int) -> np.ndarray:
    """The verdict rule of the module docstring, vectorised."""
    has_interval = np.isfinite(inference.se)
    negligible = (inference.ci_low > -margin) & (inference.ci_high < margin)
    resolved = p_holm < alpha
    no_interval = ONE_SEED if n_seeds == 1 else NOT_RESOLVED
    return np.select(
        [~has_interval, negligible, resolved & (inference.estimate > 0), resolved],
        [no_interval, NEGLIGIBLE, RESOLVED_UP, RESOLVED_DOWN],
        default=NOT_RESOLVED,
    )


# --- public ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """The finished runs that enter the estimates, as arrays: one entry per run."""

    values: np.ndarray  # the metric
    treatment: np.ndarray  # treatment index (cells by cell_id, plus random init)
    seed: np.ndarray  # seed index, 0 for the smallest seed
    n_treatments: int
    n_seeds: int
    levels: dict[str, list[Hashable]]  # per axis, baseline first (finished cells only)
    cell_treatment: dict[tuple[Hashable, ...], int]  # axis values of a cell -> its treatment
    cells: np.ndarray  # treatment indices of the cells
    random_init: int | None  # treatment index of the random-init runs
    teacher: int | None  # treatment index of the teacher runs
    students: np.ndarray  # treatment indices of the cells that distil the teacher (CLIP targets)


def _design(runs: pd.DataFrame, metric: str) -> Design:
    """Finished runs of the grid cells and of the random-init reference, as arrays."""
    role = runs["role"] if "role" in runs else pd.Series(CELL_ROLE, index=runs.index)
    is_cell = role.eq(CELL_ROLE).to_numpy()
    values = finished_values(runs, metric).to_numpy(dtype=float)
    used = ~np.isnan(values) & (is_cell | role.isin([RANDOM_INIT, TEACHER]).to_numpy())
    axes = grid_axes(runs)
    finished = runs.loc[used, ["cell_id", "seed", *axes]]
    is_cell, is_teacher = is_cell[used], role[used].eq(TEACHER).to_numpy()
    treatment, treatment_names = pd.factorize(np.select(
        [is_cell, is_teacher], [finished["cell_id"].to_numpy(dtype=object), TEACHER_TREATMENT],
        default=RANDOM_INIT_TREATMENT))
    distils = (runs.loc[used, "model.target"].eq("clip").to_numpy() if "model.target" in runs
               else np.ones(len(finished), dtype=bool))
    seed, seed_names = pd.factorize(finished["seed"], sort=True)
    finished_cells = finished[is_cell]
    cell_keys = zip(*(finished_cells[axis].to_numpy() for axis in axes))
    random_init = np.flatnonzero(treatment_names == RANDOM_INIT_TREATMENT)
    teacher = np.flatnonzero(treatment_names == TEACHER_TREATMENT)
    return Design(
        values=values[used], treatment=treatment, seed=seed,
        n_treatments=len(treatment_names), n_seeds=len(seed_names),
        # Reference rows are left out: their axis columns may hold anything.
        levels={axis: axis_levels(finished_cells, axis) for axis in axes},
        cell_treatment=dict(zip(cell_keys, treatment[is_cell])),
        cells=np.unique(treatment[is_cell]),
        random_init=int(random_init[0]) if len(random_init) else None,
        teacher=int(teacher[0]) if len(teacher) else None,
        students=np.unique(treatment[is_cell & distils]),
    )


def _contrasts(design: Design, axes: list[str]) -> list[Contrast]:
    """Every estimable effect: pretrained vs random init and student vs teacher first (when
    there are such reference runs and cells), then main effects and interactions by order."""
    contrasts = list(_factorial_contrasts(design.cell_treatment, axes, design.levels,
                                          design.n_treatments))
    if design.random_init is not None and len(design.cells):
        weights = np.zeros(design.n_treatments)
        weights[design.cells] = 1 / len(design.cells)
        weights[design.random_init] = -1
        contrasts.insert(0, Contrast(RANDOM_INIT_EFFECT,
                                     f"mean of {len(design.cells)} cells − random init", 0,
                                     weights))
    if design.teacher is not None and len(design.students):
        weights = np.zeros(design.n_treatments)
        weights[design.students] = 1 / len(design.students)
        weights[design.teacher] = -1
        position = 1 if design.random_init is not None and len(design.cells) else 0
        contrasts.insert(position, Contrast(TEACHER_EFFECT,
                                            f"mean of {len(design.students)} cells − teacher", 0, weights))
    return contrasts


def estimate_effects(runs: pd.DataFrame, metric: str, *, margin: float = 0.5, alpha: float = 0.05,
                     power: float = 0.8, max_seeds: int = 100) -> pd.DataFrame:
    """One row per effect of the grid on `metric` (columns `EFFECT_COLUMNS`).

    Effects, intervals, verdicts and power are defined in the module docstring. `attrs`
    holds metric, margin, alpha, power, method (one sentence), residual_sd (NaN without
    OLS) and seeds_to_resolve: the number of seeds at which every "not resolved" effect
    would have an MDE within the margin (None when no such effect has one; at most
    max_seeds).
    """
    check_metric(runs, metric)
    axes = grid_axes(runs)
    design = _design(runs, metric)
    contrasts = _contrasts(design, axes)
    attrs = {"metric": metric, "margin": margin, "alpha": alpha, "power": power, "max_seeds": max_seeds}
    if not contrasts:
        effects = pd.DataFrame(columns=EFFECT_COLUMNS)
        effects.attrs = {**attrs, "method": "no estimable effect", "residual_sd": np.nan,
                         "seeds_to_resolve": None}
        return effects

    weights = np.array([c.weights for c in contrasts])
    factorial = np.array([c.order >= 1 for c in contrasts])
    complete_two_level = (all(len(design.levels[axis]) == 2 for axis in axes)
                          and len(design.cell_treatment) == 2 ** len(axes))
    inference = _infer(design, weights, factorial, complete_two_level, alpha)

    has_p = np.isfinite(inference.p_value)
    p_holm = np.full(len(contrasts), np.nan)
    if has_p.any():
        p_holm[has_p] = multipletests(inference.p_value[has_p], alpha=alpha, method="holm")[1]
    verdicts = _verdicts(inference, p_holm, margin, alpha, design.n_seeds)
    alpha_per_comparison = alpha / max(int(has_p.sum()), 1)
    mde = inference.se * (detectable_effect_over_se(inference.df, alpha_per_comparison, power)
                          if np.isfinite(inference.se).any() else np.nan)
    # Effects of a balanced grid share a few standard errors (all of them in a 2^k grid):
    # each distinct one is searched once, which took a 2^3 grid's call from 25 to 16 ms.
    distinct_se, se_index = np.unique(np.round(inference.se, 12), return_inverse=True)
    needed_by_se = [
        seeds_needed(margin, se * np.sqrt(design.n_seeds), inference.df_at,
                     alpha_per_comparison, power, design.n_seeds, max_seeds)
        for se in distinct_se
    ]
    needed = [needed_by_se[i] for i in se_index]
    ran = np.zeros((design.n_treatments, design.n_seeds), dtype=bool)
    ran[design.treatment, design.seed] = True
    # A seed contributes to an effect when a treatment in the contrast finished in it.
    seeds_with_data = ((weights != 0).astype(int) @ ran > 0).sum(axis=1)
    still_open = [n for n, verdict in zip(needed, verdicts)
                  if verdict == NOT_RESOLVED and n is not None]

    effects = pd.DataFrame({
        "effect": [c.effect for c in contrasts],
        "levels": [c.levels for c in contrasts],
        "order": [c.order for c in contrasts],
        "estimate": inference.estimate,
        "se": inference.se,
        "ci_low": inference.ci_low,
        "ci_high": inference.ci_high,
        "df": np.where(np.isfinite(inference.se), inference.df, np.nan),
        "p_value": inference.p_value,
        "p_holm": p_holm,
        "verdict": verdicts,
        "n_seeds": seeds_with_data,
        "mde": mde,
        "seeds_needed": pd.array(needed, dtype="Int64"),
        "method": inference.method,
    })
    effects.attrs = {**attrs, "method": inference.description,
                     "residual_sd": inference.residual_sd,
                     "seeds_to_resolve": max(still_open) if still_open else None}
    return effects


def _infer(design: Design, weights: np.ndarray, factorial: np.ndarray,
           complete_two_level: bool, alpha: float) -> Inference:
    """Blocked OLS with replicates, Lenth for a one-seed complete 2^k grid, estimates
    only otherwise. `factorial` marks the main effects and interactions."""
    treatment = design.treatment
    means = np.bincount(treatment, weights=design.values) / np.bincount(treatment)
    estimates = weights @ means
    if design.n_seeds > 1:
        blocked = _blocked_ols(design, weights, estimates, alpha)
        if blocked is not None:
            return blocked
        return _estimates_only(estimates, "estimates only: no residual df left after the "
                                          "seed blocks")
    if complete_two_level and factorial.sum() >= MIN_LENTH_EFFECTS:
        lenth = _lenth(estimates, factorial, design.n_treatments, alpha)
        if lenth is not None:
            return lenth
    return _estimates_only(estimates, "estimates only: one seed, and not a complete factorial "
                                      "of two-level axes (Lenth's method needs one)")


def format_effects_for_terminal(effects: pd.DataFrame) -> str:
    """Compact aligned table: effect, levels, estimate [CI], p_holm, verdict, mde, seeds."""
    if effects.empty:
        return "no estimable effect"
    level = 100 * (1 - effects.attrs.get("alpha", 0.05))

    def number(value: float) -> str:
        return "–" if pd.isna(value) else f"{value:.2f}"

    interval = [
        number(estimate) if pd.isna(low) else f"{estimate:.2f} [{low:.2f}, {high:.2f}]"
        for estimate, low, high in zip(effects["estimate"], effects["ci_low"], effects["ci_high"])
    ]
    table = pd.DataFrame({
        "effect": effects["effect"],
        "levels": effects["levels"],
        f"estimate [{level:g}% CI]": interval,
        "p_holm": effects["p_holm"].map(lambda p: "–" if pd.isna(p) else f"{p:.3g}"),
        "verdict": effects["verdict"],
        "mde": effects["mde"].map(number),
        "seeds_needed": effects["seeds_needed"].astype(object).fillna("–"),
    })
    return table.to_string(index=False)
