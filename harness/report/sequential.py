"""Verdicts that may be read after every round of seeds: a group-sequential design with
alpha spending, for both the "resolved ±" and the "negligible" verdicts, with Holm across
the effects in scope (``bench.py ablate --until-resolved``).

The fixed-design verdicts of :mod:`harness.report.effects` hold their error rates for one
look at the data. Looking after every round and stopping as soon as they say "resolved"
would raise the false-resolution rate well above alpha. Here each look k, at n_k seeds of
at most ``max_seeds``, has the information fraction t_k = n_k / max_seeds, and:

- **resolved ±** (H0: effect = 0, two-sided): a Lan-DeMets (1983) spending function gives
  the share of alpha that may be spent by t: of O'Brien-Fleming type (the default),
  alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)), which spends almost nothing early, or of
  Pocock type, alpha ln(1 + (e - 1) t) (Lan & DeMets 1983; Kim & DeMets 1987), which spends
  more early and stops clear effects sooner at the price of a stricter last look. The boundary c_k solves P(|Z_1| < c_1, ..., |Z_{k-1}| <
  c_{k-1}, |Z_k| >= c_k) = alpha(t_k) - alpha(t_{k-1}) for the canonical joint distribution
  of the look statistics (Brownian motion in t; Jennison & Turnbull 2000, *Group Sequential
  Methods with Applications to Clinical Trials*, ch. 3 and 7), computed by the recursive
  numerical integration of Armitage, McPherson & Rowe (1969) (J&T ch. 19): no well-kept
  Python package has it (statsmodels and scipy have no group-sequential boundaries; the
  multivariate normal CDF of scipy is a Monte Carlo integral, too noisy for the 1e-6 that
  O'Brien-Fleming spends at an early look).
- **negligible** (H0: |effect| >= margin): two one-sided tests (Schuirmann 1987) at level
  alpha each, each with one-sided spending boundaries of the same family: negligible when
  both reject, i.e. the look's (1 - 2 alpha_k) interval lies inside ±margin (J&T ch. 6,
  "equivalence tests").
- **t statistics**: the runs give OLS t statistics with few residual df, so each z boundary
  is used through its nominal significance level (J&T section 3.8): reject when the t test's
  p-value is below that of the z boundary.
- **Holm across effects**: the group-sequential Holm procedure of Ye, Li, Jiang & Wang
  (2013, *Statistics in Medicine* 32:1112) and Maurer & Bretz (2013, *Statistics in
  Biopharmaceutical Research* 5:311): each of the m hypotheses of a family not yet rejected
  is tested with boundaries at level alpha / (m - r), r the rejections so far, recomputed for
  every look, and rejections recycle their alpha within the look until none is added. Each
  family (resolved, negligible) runs its own Holm over the effects in scope.

A verdict, once reached, stays (the effect's question is answered; negligible wins when both
are reached at one look, as in effects.py). The fixed-design verdict rule, contrasts and OLS
are effects.py's (:func:`~harness.report.effects.estimate_effects`), not repeated here.

The stopping rule (:func:`decide`): stop when every effect in scope has a verdict, when the
next look would pass ``max_seeds``, when the next round's device-hours (the finished runs' cost
per seed times the round's seeds) would pass ``max_hours``, or when a round added no
finished seed. Looks are planned in advance (:func:`look_schedule`): at most ``MAX_LOOKS``
evenly spaced seed counts from the first round's to ``max_seeds``, so that the timing of a
look never depends on the data (Lan-DeMets needs that; Proschan, Follmann & Waclawiw 1992).
``bench.py calibrate-sequential`` measures the error rates by simulation through
:func:`sequential_verdicts`.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import optimize, stats

from harness.core.files import write_atomic
from harness.report.effects import (
    NEGLIGIBLE,
    RANDOM_INIT_EFFECT,
    TEACHER_EFFECT,
    RESOLVED_DOWN,
    RESOLVED_UP,
    estimate_effects,
)
from harness.report.tables import device_hours, finished_values

STATE_FILE = "sequential.json"  # in the grid's run folder, beside grid.json
MAX_LOOKS = 5
OBRIEN_FLEMING, POCOCK = "obrien-fleming", "pocock"
SPENDING_NAMES = {OBRIEN_FLEMING: "Lan-DeMets O'Brien-Fleming-type", POCOCK: "Lan-DeMets Pocock-type"}
# The grid of the recursive integration, in the B-value scale B(t) = Z(t) sqrt(t): points per
# look and how many sd of B(t) it spans where a boundary does not cut it (1e-15 of the mass).
INTEGRATION_POINTS = 2001
INTEGRATION_SD = 8.0


# --- spending and boundaries -------------------------------------------------------------


def spent(fraction: float, alpha: float, spending: str = OBRIEN_FLEMING) -> float:
    """Alpha spent by information fraction `fraction` (alpha at 1), by Lan & DeMets' spending
    function of O'Brien-Fleming type, 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)), or of Pocock type,
    alpha ln(1 + (e - 1) t)."""
    if fraction <= 0:
        return 0.0
    fraction = min(fraction, 1.0)
    if spending == POCOCK:
        return float(alpha * np.log1p((np.e - 1) * fraction))
    return float(2 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(fraction)))


@functools.lru_cache(maxsize=4096)  # a simulation asks for the same few designs thousands of times
def boundaries(fractions: tuple[float, ...], alpha: float, two_sided: bool,
               spending: str = OBRIEN_FLEMING) -> tuple[float, ...]:
    """z boundaries c_1..c_k of the looks at `fractions` (increasing, in (0, 1]) spending
    `alpha` by :func:`spent`: two-sided (reject at |Z_k| >= c_k) or one-sided (Z_k >= c_k)."""
    crossing = np.diff([0.0, *(spent(t, alpha, spending) for t in fractions)])
    bounds: list[float] = []
    points = weights = density = None  # B(t_{k-1}) on the continuation region, as a density
    previous = 0.0
    for t, target in zip(fractions, crossing):
        step_sd = np.sqrt(t - previous)
        if points is None:
            def exit_probability(c: float) -> float:
                return (2 if two_sided else 1) * stats.norm.sf(c)
        else:
            def exit_probability(c: float) -> float:
                upper = stats.norm.sf((c * np.sqrt(t) - points) / step_sd)
                lower = stats.norm.cdf((-c * np.sqrt(t) - points) / step_sd) if two_sided else 0.0
                return float(np.sum(weights * density * (upper + lower)))
        # beyond INTEGRATION_SD the look rejects nothing that matters (target below 1e-15)
        if target <= 0 or exit_probability(INTEGRATION_SD) >= target:
            bound = INTEGRATION_SD
        else:
            bound = optimize.brentq(lambda c: exit_probability(c) - target, 0.0, INTEGRATION_SD, xtol=1e-7)
        bounds.append(float(bound))
        upper_b = bound * np.sqrt(t)
        lower_b = -upper_b if two_sided else -INTEGRATION_SD * np.sqrt(t)
        new_points = np.linspace(lower_b, upper_b, INTEGRATION_POINTS)
        if points is None:
            new_density = stats.norm.pdf(new_points, scale=np.sqrt(t))
        else:
            kernel = stats.norm.pdf((new_points[None, :] - points[:, None]) / step_sd) / step_sd
            new_density = (weights * density) @ kernel
        points, density, previous = new_points, new_density, t
        weights = np.full(INTEGRATION_POINTS, new_points[1] - new_points[0])  # trapezoid rule
        weights[[0, -1]] /= 2
    return tuple(bounds)


def look_schedule(first: int, max_seeds: int, max_looks: int = MAX_LOOKS) -> list[int]:
    """Seed counts of the planned looks: `first`, then evenly spaced up to `max_seeds`."""
    looks = min(max_looks, max_seeds - first + 1)
    return sorted({int(round(n)) for n in np.linspace(first, max_seeds, max(looks, 1))})


# --- one look ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LookVerdicts:
    """Per effect key: its verdict (None: open), and the hypotheses rejected so far."""

    verdicts: dict[str, str | None]
    rejected_zero: frozenset[str]  # H0: effect = 0 rejected (resolved family)
    rejected_margin: frozenset[str]  # H0: |effect| >= margin rejected (negligible family)


def _holm(keys: Sequence[str], rejected: frozenset[str], alpha: float,
          rejects: Callable[[str, float], bool]) -> frozenset[str]:
    """Group-sequential Holm at one look: every hypothesis not yet rejected at level
    alpha / (still open), repeated while rejections free alpha."""
    rejected = set(rejected)
    while open_keys := [k for k in keys if k not in rejected]:
        newly = [k for k in open_keys if rejects(k, alpha / len(open_keys))]
        if not newly:
            break
        rejected.update(newly)
    return frozenset(rejected)


def sequential_verdicts(effects: pd.DataFrame, fractions: tuple[float, ...], earlier: LookVerdicts | None,
                        margin: float, alpha: float, spending: str = OBRIEN_FLEMING) -> LookVerdicts:
    """The verdicts after the look at `fractions[-1]` of the effects (rows of
    estimate_effects' frame, indexed by effect key), given the looks before (`earlier`)."""
    keys = list(effects.index)
    earlier = earlier or LookVerdicts({k: None for k in keys}, frozenset(), frozenset())
    estimate, se, df, p_value = (effects[c].to_numpy(dtype=float) for c in ("estimate", "se", "df", "p_value"))
    row = {k: i for i, k in enumerate(keys)}

    def differs_from_zero(key: str, level: float) -> bool:
        nominal = 2 * stats.norm.sf(boundaries(fractions, level, True, spending)[-1])
        return bool(p_value[row[key]] < nominal)

    def within_margin(key: str, level: float) -> bool:
        i = row[key]
        if not np.isfinite(se[i]) or se[i] <= 0:
            return False
        nominal = stats.norm.sf(boundaries(fractions, level, False, spending)[-1])
        critical = stats.t.isf(nominal, df[i])
        return bool(min(margin + estimate[i], margin - estimate[i]) / se[i] >= critical)

    rejected_zero = _holm(keys, earlier.rejected_zero, alpha, differs_from_zero)
    rejected_margin = _holm(keys, earlier.rejected_margin, alpha, within_margin)
    verdicts = {}
    for k in keys:
        if earlier.verdicts.get(k) is not None:
            verdicts[k] = earlier.verdicts[k]
        elif k in rejected_margin:
            verdicts[k] = NEGLIGIBLE
        elif k in rejected_zero:
            verdicts[k] = RESOLVED_UP if estimate[row[k]] > 0 else RESOLVED_DOWN
        else:
            verdicts[k] = None
    return LookVerdicts(verdicts, rejected_zero, rejected_margin)


def effect_keys(effects: pd.DataFrame) -> pd.Index:
    """A key per effect row: its name, with its levels where an axis has several non-baseline
    levels (e.g. ``mask_ratio (0.9 − 0.75)``)."""
    repeated = effects["effect"].duplicated(keep=False)
    return pd.Index(np.where(repeated, effects["effect"] + " (" + effects["levels"] + ")", effects["effect"]))


def in_scope(effects: pd.DataFrame, scope: Sequence[str]) -> pd.DataFrame:
    """The rows of the effects named in `scope`, indexed by :func:`effect_keys`."""
    keyed = effects.set_axis(effect_keys(effects))
    return keyed[keyed["effect"].isin(scope)]


def default_scope(axes: Sequence[str], random_init: bool) -> list[str]:
    """The main effects (short axis names) and, with random-init runs, pretrained vs random init."""
    return [*([RANDOM_INIT_EFFECT] if random_init else []), *(axis.split(".")[-1] for axis in axes)]


# --effects spellings of pretrained vs random init
RANDOM_INIT_ALIASES = ("random-init", "random_init", RANDOM_INIT_EFFECT)
# and of student vs teacher
TEACHER_ALIASES = ("teacher", TEACHER_EFFECT)


def scope_for(axes: Sequence[str], random_init: bool, requested: Sequence[str] | None,
              teacher: bool = False) -> list[str]:
    """The effect names of ``--effects`` (main effects by short axis name, interactions as
    ``target:decoder`` or ``target × decoder``, ``random-init``, and ``teacher`` for student vs
    teacher when the grid has teacher runs), or the default scope; a ValueError names the first
    unknown one."""
    if not requested:
        return default_scope(axes, random_init)
    short = [axis.split(".")[-1] for axis in axes]
    known = {" × ".join(combo) for order in range(1, len(short) + 1)
             for combo in itertools.combinations(short, order)}
    scope = []
    for name in requested:
        words = [w.strip() for w in name.replace("×", ":").split(":")]
        words.sort(key=lambda w: short.index(w) if w in short else len(short))  # the grid's axis order
        effect = RANDOM_INIT_EFFECT if name.strip() in RANDOM_INIT_ALIASES and random_init else " × ".join(words)
        if name.strip() in TEACHER_ALIASES and teacher:
            effect = TEACHER_EFFECT
        if effect not in (RANDOM_INIT_EFFECT, TEACHER_EFFECT) and effect not in known:
            choices = [*(["random-init"] if random_init else []), *(["teacher"] if teacher else []), *short]
            raise ValueError(f"--effects: no effect {name.strip()!r} in this grid: give some of "
                             f"{', '.join(choices)} (interactions as {short[0]}:{short[-1]})")
        scope.append(effect)
    return list(dict.fromkeys(scope))


# --- the record and the decision ---------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SequentialDesign(_Record):
    """What ``ablate --until-resolved`` fixed when the chain started."""

    metric: str
    margin: float = Field(gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)
    max_seeds: int = Field(ge=2)
    max_hours: float | None = None
    spending: Literal["obrien-fleming", "pocock"] = OBRIEN_FLEMING
    schedule: list[int]  # seed counts of the planned looks (look_schedule)
    scope: list[str]  # effect names


class EffectAtLook(_Record):
    key: str
    estimate: float | None
    ci_low: float | None  # the fixed-design 95% interval, for reading only
    ci_high: float | None
    verdict: str | None  # None: open


class Look(_Record):
    seeds: int
    fraction: float
    alpha_spent: float  # of the resolved family's alpha (the negligible family spends the same share)
    effects: list[EffectAtLook]
    rejected_zero: list[str]
    rejected_margin: list[str]
    device_hours: float | None  # of the finished runs so far
    decided_at: float


class SequentialState(_Record):
    design: SequentialDesign
    looks: list[Look] = []
    stop_reason: str | None = None
    next_seeds: int | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None


@dataclass(frozen=True)
class Decision:
    """A look's outcome: the next round's seed count, or None and why the chain stops."""

    look: int
    seeds: int
    next_seeds: int | None
    reason: str
    summary: str
    device_hours: float | None


def read_state(grid_dir: Path) -> SequentialState | None:
    """The grid's sequential record, or None when there is none (or it cannot be read)."""
    try:
        return SequentialState.model_validate_json((Path(grid_dir) / STATE_FILE).read_text())
    except (OSError, ValidationError, ValueError):
        return None


def write_state(grid_dir: Path, state: SequentialState) -> None:
    write_atomic(Path(grid_dir) / STATE_FILE, state.model_dump_json(indent=2))


def start(grid_dir: Path, design: Mapping) -> SequentialState:
    """The grid's record, created with `design` (a SequentialDesign's fields) when it has none;
    an existing record keeps its own design (the chain resumes)."""
    if (state := read_state(grid_dir)) is None:
        state = SequentialState(design=SequentialDesign.model_validate(dict(design)))
        write_state(grid_dir, state)
    return state


def decide(grid_dir: Path, runs: pd.DataFrame, look: int) -> Decision:
    """Look number `look` (1 for the first round's) at the grid's finished runs: record it and
    say what comes next. A look already recorded is not taken again: its decision is repeated
    (a decision job that runs twice decides once)."""
    state = read_state(grid_dir)
    if state is None:
        raise FileNotFoundError(f"no {STATE_FILE} in {grid_dir}: the chain was never started")
    if look <= len(state.looks) or state.stopped:
        return _decision(state, min(look, len(state.looks)))
    design = state.design
    values = finished_values(runs, design.metric)
    seeds = int(runs.loc[values.notna(), "seed"].nunique())
    if state.looks and seeds <= state.looks[-1].seeds:
        state = state.model_copy(update={"stop_reason": f"the round to {state.next_seeds} seeds added no finished "
                                                        "seed (see `bench.py status`)", "next_seeds": None})
        write_state(grid_dir, state)
        return _decision(state, len(state.looks))
    if seeds < 2:  # the first round left no replicates (its runs failed)
        state = state.model_copy(update={"stop_reason": f"{seeds} seed(s) finished in the first round: no "
                                                        "replicates to look at (see `bench.py status`)"})
        write_state(grid_dir, state)
        return _decision(state, 0)
    fractions = tuple(round(min(1.0, n / design.max_seeds), 6) for n in [*(e.seeds for e in state.looks), seeds])
    effects = in_scope(estimate_effects(runs, design.metric, margin=design.margin, alpha=design.alpha),
                       design.scope)
    earlier = _last_verdicts(state)
    now = sequential_verdicts(effects, fractions, earlier, design.margin, design.alpha, design.spending)
    cost = device_hours(runs)
    spent_hours = float(cost.sum()) if cost is not None else None
    taken = Look(seeds=seeds, fraction=fractions[-1], alpha_spent=spent(fractions[-1], design.alpha, design.spending),
                effects=[EffectAtLook(key=k, estimate=_number(effects.at[k, "estimate"]),
                                      ci_low=_number(effects.at[k, "ci_low"]), ci_high=_number(effects.at[k, "ci_high"]),
                                      verdict=now.verdicts[k]) for k in effects.index]
                + [EffectAtLook(key=name, estimate=None, ci_low=None, ci_high=None, verdict=None)  # no estimate yet
                   for name in design.scope if name not in set(effects["effect"])],
                rejected_zero=sorted(now.rejected_zero), rejected_margin=sorted(now.rejected_margin),
                device_hours=spent_hours, decided_at=time.time())
    state = state.model_copy(update={"looks": [*state.looks, taken]})
    next_seeds, reason = _next_round(state, spent_hours)
    state = state.model_copy(update={"next_seeds": next_seeds, "stop_reason": reason if next_seeds is None else None})
    write_state(grid_dir, state)
    return _decision(state, len(state.looks))


def _last_verdicts(state: SequentialState) -> LookVerdicts | None:
    if not state.looks:
        return None
    last = state.looks[-1]
    return LookVerdicts({e.key: e.verdict for e in last.effects}, frozenset(last.rejected_zero),
                        frozenset(last.rejected_margin))


def _next_round(state: SequentialState, spent_hours: float | None) -> tuple[int | None, str]:
    """The next look's seed count, or None and the reason to stop."""
    design, last = state.design, state.looks[-1]
    open_keys = [e.key for e in last.effects if e.verdict is None]
    if not open_keys:
        return None, f"every effect in scope has a verdict after {len(state.looks)} look(s)"
    later = [n for n in design.schedule if n > last.seeds]
    if not later:
        return None, (f"budget: {last.seeds} seeds is the cap (--max-seeds {design.max_seeds}); "
                      f"{len(open_keys)} effect(s) still open: {', '.join(open_keys)}")
    next_seeds = later[0]
    if design.max_hours is not None and spent_hours is not None and last.seeds:
        per_seed = spent_hours / last.seeds
        need = per_seed * (next_seeds - last.seeds)
        if spent_hours + need > design.max_hours:
            left = design.max_hours - spent_hours
            return None, (f"budget: the round to {next_seeds} seeds would cost about {need:.3g} device-hours, "
                          f"{left:.3g} of --max-hours {design.max_hours:g} are left (enough for "
                          f"{int(max(left, 0) // per_seed) if per_seed > 0 else 0} more seed(s)); "
                          f"{len(open_keys)} effect(s) still open: {', '.join(open_keys)}")
    return next_seeds, f"{len(open_keys)} effect(s) open: next look at {next_seeds} seeds"


def _decision(state: SequentialState, look: int) -> Decision:
    """The decision recorded after look `look`: the next round, or the stop after the last look
    (look 0: the chain stopped before its first look)."""
    if look == 0:
        return Decision(0, 0, None, state.stop_reason or "no look yet", "no look taken", None)
    last = state.looks[look - 1]
    if look < len(state.looks):  # a later look exists: this one's round went out
        later = state.looks[look]
        return Decision(look, last.seeds, later.seeds, f"next look at {later.seeds} seeds", look_summary(state),
                        last.device_hours)
    reason = state.stop_reason or f"next look at {state.next_seeds} seeds"
    return Decision(look=look, seeds=last.seeds, next_seeds=None if state.stopped else state.next_seeds,
                    reason=reason, summary=look_summary(state), device_hours=last.device_hours)


def _number(value: object) -> float | None:
    return float(value) if pd.notna(value) else None


def look_summary(state: SequentialState) -> str:
    """One line: the look, its seeds, alpha spent, each effect's verdict so far."""
    last = state.looks[-1]
    verdicts = "; ".join(f"{e.key}: {e.verdict or 'open'}" for e in last.effects)
    return (f"look {len(state.looks)} at {last.seeds} seeds (t = {last.fraction:.2f}, alpha spent "
            f"{last.alpha_spent:.3g} of {state.design.alpha:g}): {verdicts}")


def report_lines(state: SequentialState) -> str:
    """report.md's account of the design: which, how many looks, alpha spent, why it stopped,
    and a table of the verdicts look by look."""
    design = state.design
    lines = [
        f"Design: group-sequential, {SPENDING_NAMES[design.spending]} alpha spending, Holm across effects "
        f"(alpha {design.alpha:g} for each of the resolved and negligible families, "
        f"margin ±{design.margin:g}); looks planned at {', '.join(map(str, design.schedule))} seeds "
        f"(at most {design.max_seeds} seeds"
        + (f", {design.max_hours:g} device-hours" if design.max_hours is not None else "") + ").",
        f"Looks taken: {len(state.looks)}; alpha spent: "
        f"{state.looks[-1].alpha_spent:.3g} of {design.alpha:g} per family." if state.looks else "No look yet.",
        f"Stopped: {state.stop_reason}." if state.stop_reason else
        (f"Not stopped: next look at {state.next_seeds} seeds." if state.looks else ""),
        "The effects table above is the fixed-design analysis of all the runs: its p-values do not "
        "allow for the repeated looks; these verdicts do.",
    ]
    if state.looks:
        keys = list(dict.fromkeys(e.key for look in state.looks for e in look.effects))
        header = "| look | seeds | alpha spent | " + " | ".join(keys) + " |"
        rule = "|" + "---|" * (3 + len(keys))
        rows = []
        for i, look in enumerate(state.looks, 1):
            by_key = {e.key: e for e in look.effects}
            cells = [f"{e.verdict or 'open'} ({e.estimate:+.2f})" if (e := by_key.get(k)) and e.estimate is not None
                     else "–" for k in keys]
            rows.append(f"| {i} | {look.seeds} | {look.alpha_spent:.3g} | " + " | ".join(cells) + " |")
        lines.append("\n".join([header, rule, *rows]))
    return "\n\n".join(line for line in lines if line)
