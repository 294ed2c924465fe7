"""Ablation grids: a YAML file -> a list of frozen cells (one per axis combination x seed).

A grid names a base run config and the axes to vary. Each axis is either a config field with a
list of values (``model.mask_ratio: [0.5, 0.75, 0.9]``) or a label with named variants, each a
mapping of dotted overrides (``teacher: {b16: {teacher.model: ViT-B-16-quickgelu}, ...}``).
Expansion takes the product of the axes (first axis slowest), filters it with ``include`` /
``exclude`` rules, and repeats every combination for each seed. Cell ids come from the resolved
config (:meth:`RunConfig.run_id`), so they do not depend on YAML key order, on the order of the
axes, or on where the grid file lives.

Every problem is a one-line :class:`ConfigError` naming the file, the field and the fix.

Layout (every field but ``name`` optional)::

    name: smoke                      # runs/<name>/, MLflow experiment <name>
    description: one line
    base_config: ../configs/smoke.yaml   # a run config, relative to this file
    evaluates: other.yaml            # instead of base_config/axes/seeds: that grid's cells, with this grid's
                                     # `eval`, each evaluating its finished twin's encoder (no pretraining)
    base: {pretrain.epochs: 2}       # overrides: nested sections or dotted keys
    axes:
      model.mask_ratio: [0.5, 0.75]  # a config field and its values
      teacher:                       # a label and named variants (dotted overrides)
        b16: {teacher.model: ViT-B-16-quickgelu, teacher.pretrained: openai}
    seeds: 3                         # 0..2, or a list [0, 5]
    random_init: true                # per seed (and student size) a reference run of the untrained encoder
    teacher_reference: true          # per seed (and teacher) a reference run of the frozen teacher's image tower
    margin: 0.5                      # the report's equivalence margin, in points of the headline metric
    include: [{mask_ratio: 0.75}]    # keep only cells matching a rule (axis name or short name)
    exclude: [{teacher: b16, mask_ratio: [0.5]}]   # then drop cells matching a rule
    paper_setting: false             # the report adds the paper's reference numbers
    resources: {nodes: 1, gpus_per_node: 8, tasks_per_node: null, cpus_per_task: 10, mem_gb: 480,
                time_min: 1440, partition: null, account: null, qos: null, constraint: null,
                array_parallelism: 4, max_cells_per_job: null, setup: [], slurm_extra: {}}
    tracking: {uri: null, experiment: null}
    estimate: {sustained_tflops: 40, train_images: null}
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from harness.config import (
    FIELD_NAMES,
    format_value,
    RunConfig,
    describe_validation_error,
    flatten,
    load_yaml,
    parse_config,
    set_dotted,
)
from harness.core.errors import ConfigError, did_you_mean
from harness.core.frozen import FrozenModel
from harness.milan.switches import needs_teacher
from harness.run.results import headline_metric

# Baselines of MILAN's three switches (the MAE side of each); other axes use their first value.
MILAN_BASELINES: dict[str, Any] = {"model.target": "pixel", "model.decoder": "standard",
                                   "model.masking": "random"}
# A cell that pretrains for 0 epochs evaluates the untrained encoder: the grid's reference of
# what pretraining adds ("pretrained vs random init" in the report).
RANDOM_INIT_NAME = "random init"
# A cell that evaluates the frozen teacher's image tower (eval.encoder: teacher) with the cells' own
# protocols: the grid's reference of what the students distil ("student vs teacher" in the report).
TEACHER_NAME = "teacher"
# The report's default equivalence margin: effects whose whole interval lies within it are negligible.
DEFAULT_MARGIN = 0.5
# Shipped grids live here; `bench.py ablate NAME` also finds ablations/NAME.yaml.
ABLATIONS_DIR = Path("ablations")


class Resources(FrozenModel):
    """What one cell asks the scheduler for (one task per GPU; CPU cells may ask for tasks)."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(None, ge=1)  # None: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)  # per node; None: the partition's default
    # submitit asks Slurm for USR2 90 s before the limit; under ~3 min it can arrive before the
    # handler is installed and kill the job (see harness/launch/slurm.py).
    time_min: int = Field(60, ge=3)
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int | None = Field(None, ge=1)  # None: every cell may run at once
    # cells a group job trains at most (each holds its student, gradients and optimiser state on
    # every rank: about 1.8 GB for ViT-B); larger groups are split. None: no limit
    max_cells_per_job: int | None = Field(None, ge=1)
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load, env activation)
    slurm_extra: dict[str, Any] = {}  # further sbatch options, e.g. {"exclusive": true}

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU on GPU cells."""
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def summary(self) -> str:
        """``1x8 GPU, 10 cpu/task, 64 GB, 240 min`` style one-liner for tables."""
        what = f"{self.nodes}x{self.gpus_per_node} GPU" if self.gpus else f"{self.world_size} task"
        mem = f", {self.mem_gb:g} GB" if self.mem_gb else ""
        return f"{what}, {self.cpus_per_task} cpu/task{mem}, {self.time_min} min"


class Tracking(FrozenModel):
    uri: str | None = None  # None: local executor -> SQLite in the cwd, slurm -> a server
    experiment: str | None = None  # None: the grid name


class Estimate(FrozenModel):
    """Assumptions behind the dry-run GPU-hours column."""

    # Per-GPU sustained training throughput. 40 TFLOP/s reproduces the paper's 39 h on
    # 8 A100s for 400 ImageNet epochs of ViT-B/16 MILAN (about 87 GFLOPs per image).
    sustained_tflops: float = Field(40.0, gt=0)
    # Training images per epoch when the data tree is not visible from the submitting host.
    train_images: int | None = Field(None, gt=0)


AxisSpec = list[Any] | dict[str, dict[str, Any]]
Rule = dict[str, Any]


class GridFile(FrozenModel):
    """The YAML layout of a grid file."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    base_config: str | None = None  # a run config YAML, relative to the grid file
    # Another grid (a path relative to this file, or a shipped grid's name) whose cells this grid
    # evaluates with its own `eval` section: every cell evaluates its twin's final encoder
    # (pretrain.weights_from) instead of pretraining again. Its axes, seeds and base come from the twin.
    evaluates: str | None = None
    base: dict[str, Any] = {}  # run-config overrides: nested sections or dotted keys
    axes: dict[str, AxisSpec] = {}
    seeds: int | list[int] = 1
    # one run per seed (and student size) that evaluates the untrained encoder: cheap, no pretraining
    random_init: bool = True
    # one run per seed (and teacher) that evaluates the frozen teacher's image tower; grids whose
    # cells use no teacher (pixel targets with random masks) get none
    teacher_reference: bool = True
    margin: float = Field(DEFAULT_MARGIN, gt=0)  # equivalence margin of the report's verdicts
    include: list[Rule] = []
    exclude: list[Rule] = []
    paper_setting: bool = False  # the paper's recipe: the report adds its reference numbers
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    estimate: Estimate = Estimate()

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, seeds: int | list[int]) -> int | list[int]:
        if isinstance(seeds, int) and seeds < 1:
            raise ValueError("give a number of seeds >= 1 or a list of seeds")
        if isinstance(seeds, list) and (not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError("the list of seeds must be non-empty and without repeats")
        return seeds


def short_axis(name: str) -> str:
    """``model.target`` -> ``target`` (the last dotted part)."""
    return name.rsplit(".", 1)[-1]


def cell_name(axis_values: Mapping[str, Any]) -> str:
    """A cell's name from its axis values, ``"target=clip decoder=prompting"`` ("baseline" without axes)."""
    if not axis_values:
        return "baseline"
    return " ".join(f"{short_axis(k)}={format_value(v)}" for k, v in axis_values.items())


@dataclass(frozen=True)
class Axis:
    """One axis: ``name`` is a config field or a variant label; ``values`` in grid order.

    For a field axis ``overrides[i]`` is ``{name: values[i]}``; for a variant axis ``values``
    are the variant names and ``overrides[i]`` their dotted overrides.
    """

    name: str
    values: tuple[Any, ...]
    overrides: tuple[Mapping[str, Any], ...]
    baseline: Any
    variants: bool = False

    @property
    def short(self) -> str:
        return short_axis(self.name) if not self.variants else self.name


@dataclass(frozen=True)
class Cell:
    """One run of a grid: an axis combination and a seed, with its resolved config."""

    grid: str
    axes: tuple[tuple[str, Any], ...]  # (axis name, value), grid order
    seed: int
    config: RunConfig
    run_id: str  # config.run_id(): cell + seed
    cell_id: str  # config.cell_id(): shared by the seeds

    @property
    def axis_values(self) -> dict[str, Any]:
        return dict(self.axes)

    @property
    def is_random_init(self) -> bool:
        """The grid's reference run: the untrained encoder, evaluated without pretraining."""
        return self.config.pretrain.epochs == 0 and not self.is_teacher_reference

    @property
    def is_teacher_reference(self) -> bool:
        """The grid's other reference run: the frozen teacher's image tower, evaluated."""
        return self.config.eval.encoder == "teacher"

    @property
    def name(self) -> str:
        """``target=clip decoder=prompting masking=semantic`` (the tracking run's cell name)."""
        if self.is_teacher_reference:
            return TEACHER_NAME
        return RANDOM_INIT_NAME if self.is_random_init else cell_name(self.axis_values)

    @property
    def run_name(self) -> str:
        """The MLflow run's name: ``target=clip decoder=prompting seed=0``."""
        return f"{self.name} seed={self.seed}"

    @property
    def folder(self) -> str:
        """Folder name under the grid's run folder: readable, unique, stable."""
        slug = re.sub(r"[^A-Za-z0-9.=_-]+", "-", self.name.replace(" ", "_")).replace("=", "-")
        return f"{slug[:80]}_s{self.seed}_{self.run_id[:8]}"


@dataclass(frozen=True)
class Grid:
    """A validated grid: its file content, axes and expanded cells."""

    spec: GridFile
    path: Path | None
    axes: tuple[Axis, ...]
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resources(self) -> Resources:
        return self.spec.resources

    @property
    def baselines(self) -> dict[str, Any]:
        """Axis name -> baseline value (the report compares every value against it)."""
        return {axis.name: axis.baseline for axis in self.axes}

    @property
    def experiment(self) -> str:
        return self.spec.tracking.experiment or self.spec.name

    @property
    def headline_metric(self) -> str:
        return headline_metric(p for cell in self.cells for p in cell.config.eval.protocols)

    def axes_spec(self) -> list[dict[str, Any]]:
        """``[{"name", "values", "baseline"}, ...]``: the tracking layer's ``grid.axes`` tag."""
        return [{"name": a.name, "values": list(a.values), "baseline": a.baseline} for a in self.axes]


# --- loading -----------------------------------------------------------------------------------

def find_grid_file(grid: str | Path) -> Path:
    """A grid path, or the name of a shipped grid (``smoke`` -> ``ablations/smoke.yaml``)."""
    path = Path(grid)
    if path.is_file():
        return path
    for candidate in (ABLATIONS_DIR / f"{grid}.yaml", ABLATIONS_DIR / f"{grid}.yml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in ABLATIONS_DIR.glob("*.yaml")) if ABLATIONS_DIR.is_dir() else []
    hint = f" or one of the shipped grids: {', '.join(shipped)}" if shipped else ""
    raise ConfigError(f"grid {str(grid)!r} not found: give the path of a grid YAML{hint}")


def load_grid(path: str | Path, *, sets: Mapping[str, Any] | None = None,
              axes: Mapping[str, Sequence[Any]] | None = None, seeds: int | None = None) -> Grid:
    """Read, validate and expand a grid file, with command-line changes applied.

    ``sets`` override the base config (``--set``), ``axes`` add or replace axes (``--axis``;
    for a variant axis the values select variants by name), ``seeds`` replaces the seeds.
    """
    path = Path(path)
    data = load_yaml(path)
    if axes:
        data["axes"] = dict(data.get("axes") or {})
        for name, values in axes.items():
            current = data["axes"].get(name)
            if isinstance(current, dict):  # select named variants
                unknown = [v for v in values if str(v) not in current]
                if unknown:
                    raise ConfigError(f"--axis {name}: unknown variant(s) {', '.join(map(str, unknown))}: "
                                      f"{name} has {', '.join(current)}")
                data["axes"][name] = {str(v): current[str(v)] for v in values}
            else:
                data["axes"][name] = list(values)
    if seeds is not None:
        data["seeds"] = seeds
    return build_grid(data, path, sets=sets)


def build_grid(data: Mapping[str, Any], path: Path | None = None, *,
               sets: Mapping[str, Any] | None = None) -> Grid:
    """Validate a grid mapping (as read from YAML) and expand it into cells."""
    where = str(path) if path else "grid"
    try:
        spec = GridFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            field = ".".join(map(str, first["loc"]))
            known = [f for f in GridFile.model_fields] + [f"resources.{f}" for f in Resources.model_fields]
            hint = f": {did_you_mean(field, known) or 'grid fields are ' + ', '.join(GridFile.model_fields)}"
            raise ConfigError(f"{where}: unknown grid field {field!r}{hint}") from None
        raise ConfigError(f"{where}: {describe_validation_error(err)}") from None
    if spec.evaluates is not None:
        return _evaluating_grid(spec, path, where, sets or {})
    base = _base_config(spec, path, where, sets or {})
    grid_axes = tuple(_axis(name, values, where) for name, values in spec.axes.items())
    rules = {"include": [_rule(r, grid_axes, f"{where}: include[{i}]") for i, r in enumerate(spec.include)],
             "exclude": [_rule(r, grid_axes, f"{where}: exclude[{i}]") for i, r in enumerate(spec.exclude)]}
    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else spec.seeds
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for combo in itertools.product(*(range(len(a.values)) for a in grid_axes)):
        values = {a.name: a.values[i] for a, i in zip(grid_axes, combo)}
        if rules["include"] and not any(_matches(r, values) for r in rules["include"]):
            continue
        if any(_matches(r, values) for r in rules["exclude"]):
            continue
        overrides: dict[str, Any] = {}
        for axis, i in zip(grid_axes, combo):
            overrides.update(axis.overrides[i])
        for seed in seeds:
            cfg = _cell_config(base, {**overrides, "seed": seed}, where, cell_name(values))
            label = f"{cell_name(values)} seed={seed}"
            if (other := seen.get(cfg.run_id())) is not None:
                raise ConfigError(f"{where}: cells '{other}' and '{label}' have identical configs: "
                                  "remove the repeated axis value or variant")
            seen[cfg.run_id()] = label
            cells.append(Cell(spec.name, tuple(values.items()), seed, cfg, cfg.run_id(), cfg.cell_id()))
    if not cells:
        raise ConfigError(f"{where}: include/exclude leave no cells: loosen the rules")
    references = []
    if spec.random_init:
        references += _random_init_cells(spec.name, cells, seeds, seen, where)
    if spec.teacher_reference:
        references += _teacher_cells(spec.name, cells, seeds, seen, where)
    return Grid(spec, path, grid_axes, tuple(cells + references))


def _teacher_cells(grid: str, cells: Sequence[Cell], seeds: Sequence[int], seen: dict[str, str],
                   where: str) -> list[Cell]:
    """Per seed and teacher of the grid's cells that use one, a cell that evaluates the frozen
    teacher's image tower with that cell's protocols, on its data at its image size."""
    teachers: dict[tuple[Any, ...], RunConfig] = {}
    for cell in cells:
        c = cell.config
        if c.eval.protocols and needs_teacher(c.model.target, c.model.masking):
            teachers.setdefault((c.teacher, c.model.img_size, c.data, c.eval), c)
    references = []
    for config in teachers.values():
        for seed in seeds:
            data = config.to_dict()
            data["seed"] = seed
            data["pretrain"] |= {"epochs": 0, "warmup_epochs": 0, "weights_from": None}
            data["model"] |= {short_axis(name): value for name, value in MILAN_BASELINES.items()}
            data["eval"]["encoder"] = "teacher"
            cfg = parse_config(data, source=f"{where}: {TEACHER_NAME}")
            if cfg.run_id() in seen:
                continue
            seen[cfg.run_id()] = f"{TEACHER_NAME} seed={seed}"
            references.append(Cell(grid, (), seed, cfg, cfg.run_id(), cfg.cell_id()))
    return references


def _random_init_cells(grid: str, cells: Sequence[Cell], seeds: Sequence[int], seen: dict[str, str],
                       where: str) -> list[Cell]:
    """Per seed and student architecture of the grid, a cell that evaluates the untrained encoder:
    the cell's config with no pretraining and the MAE side of MILAN's switches (so no teacher)."""
    students: dict[tuple[Any, ...], RunConfig] = {}
    for cell in cells:
        m = cell.config.model
        if cell.config.eval.protocols:  # an encoder that is never evaluated is no reference
            students.setdefault((m.size, m.img_size), cell.config)
    references = []
    for config in students.values():
        for seed in seeds:
            data = config.to_dict()
            data["seed"] = seed
            data["pretrain"] |= {"epochs": 0, "warmup_epochs": 0}
            data["model"] |= {short_axis(name): value for name, value in MILAN_BASELINES.items()}
            cfg = parse_config(data, source=f"{where}: {RANDOM_INIT_NAME}")
            if cfg.run_id() in seen:  # an axis already has a 0-epoch cell with this config
                continue
            seen[cfg.run_id()] = f"{RANDOM_INIT_NAME} seed={seed}"
            references.append(Cell(grid, (), seed, cfg, cfg.run_id(), cfg.cell_id()))
    return references


# what a grid with `evaluates` takes from its twin, and may not give itself
_TWIN_FIELDS = ("base_config", "axes", "seeds", "random_init", "teacher_reference", "include", "exclude")


def _evaluating_grid(spec: GridFile, path: Path | None, where: str, sets: Mapping[str, Any]) -> Grid:
    """The cells of the grid ``spec.evaluates``, each with this grid's ``eval`` section and
    ``pretrain.weights_from`` naming its twin's run folder (``<twin grid>/<cell folder>``).
    ``--set`` changes of ``eval.*`` apply here, the others to the twin (so that its cells, and
    their folders, are those its own ``ablate`` made)."""
    given = [f for f in _TWIN_FIELDS if f in spec.model_fields_set]
    own = {k: v for k, v in flatten(spec.base).items() if not k.startswith("eval.")}
    if given or own:
        raise ConfigError(f"{where}: a grid that evaluates {spec.evaluates} takes its cells from it: remove "
                          f"{', '.join(given + [f'base.{k}' for k in own])} (give only `eval` under base)")
    relative = path.parent / spec.evaluates if path is not None else Path(spec.evaluates)
    twin_path = relative if relative.is_file() else find_grid_file(spec.evaluates)
    twin = load_grid(twin_path, sets={k: v for k, v in sets.items() if not k.startswith("eval.")})
    if twin.spec.evaluates is not None:
        raise ConfigError(f"{where}: {twin_path} itself evaluates {twin.spec.evaluates}: name the grid that "
                          "pretrains the cells")
    evaluation: dict[str, Any] = {}
    for source, overrides in (("base", flatten(spec.base)), ("--set", {k: v for k, v in sets.items()
                                                                        if k.startswith("eval.")})):
        for key, value in overrides.items():
            try:
                set_dotted(evaluation, key, value)
            except ConfigError as err:
                raise ConfigError(f"{where}: {source}: {err}") from None
    cells = []
    for twin_cell in twin.cells:
        data = twin_cell.config.to_dict()
        data["eval"] = evaluation.get("eval", {})
        if twin_cell.is_teacher_reference:  # the teacher is evaluated again, with this grid's protocols
            data["eval"] = {**data["eval"], "encoder": "teacher"}
        else:
            data["pretrain"]["weights_from"] = f"{twin.name}/{twin_cell.folder}"
        cfg = _cell_config(data, {}, where, twin_cell.name)
        cells.append(Cell(spec.name, twin_cell.axes, twin_cell.seed, cfg, cfg.run_id(), cfg.cell_id()))
    expanded = spec.model_copy(update={field: getattr(twin.spec, field) for field in _TWIN_FIELDS})
    return Grid(expanded, path, twin.axes, tuple(cells))


def _base_config(spec: GridFile, path: Path | None, where: str, sets: Mapping[str, Any]) -> dict[str, Any]:
    """The base run config as a nested dict: base_config file <- base <- --set (checked keys)."""
    data: dict[str, Any] = {}
    if spec.base_config:
        base_path = Path(spec.base_config)
        if not base_path.is_absolute() and path is not None:
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"{where}: base_config {spec.base_config} not found (looked for {base_path}): "
                              "give a run config path relative to the grid file")
        data = load_yaml(base_path)
    for source, overrides in (("base", flatten(spec.base)), ("--set", dict(sets))):
        for key, value in overrides.items():
            try:
                set_dotted(data, key, value)
            except ConfigError as err:
                raise ConfigError(f"{where}: {source}: {err}") from None
    parse_config(data, source=f"{where}: base")  # a bad base is reported once, not per cell
    return data


def _axis(name: str, spec: AxisSpec, where: str) -> Axis:
    if isinstance(spec, dict):
        if not spec:
            raise ConfigError(f"{where}: axis {name!r} has no variants: list at least one or remove the axis")
        overrides = []
        for variant, mapping in spec.items():
            if not isinstance(mapping, dict) or not mapping:
                raise ConfigError(f"{where}: axis {name}, variant {variant!r} must be a non-empty mapping "
                                  "of dotted config overrides, e.g. {teacher.model: ViT-B-16-quickgelu}")
            flat = flatten(mapping)
            for key in flat:
                _check_axis_field(key, f"{where}: axis {name}, variant {variant!r}")
            overrides.append(flat)
        return Axis(name, tuple(spec), tuple(overrides), next(iter(spec)), variants=True)
    _check_axis_field(name, f"{where}: axis")
    if not spec:
        raise ConfigError(f"{where}: axis {name!r} has no values: list at least one or remove the axis")
    baseline = MILAN_BASELINES.get(name, spec[0])
    if baseline not in spec:
        baseline = spec[0]
    return Axis(name, tuple(spec), tuple({name: v} for v in spec), baseline)


def _check_axis_field(key: str, where: str) -> None:
    if key == "seed":
        raise ConfigError(f"{where}: vary seeds with `seeds:` (or --seeds), not as an axis")
    if key not in FIELD_NAMES:
        hint = did_you_mean(key, FIELD_NAMES) or "use a dotted config field such as model.mask_ratio"
        raise ConfigError(f"{where}: unknown config field {key!r}: {hint}")


def _rule(rule: Rule, axes: Sequence[Axis], where: str) -> dict[str, tuple[Any, ...]]:
    """A partial axis assignment; an axis may be named in full or by its short name."""
    by_name = {a.name: a for a in axes} | {a.short: a for a in axes if sum(b.short == a.short for b in axes) == 1}
    resolved: dict[str, tuple[Any, ...]] = {}
    if not rule:
        raise ConfigError(f"{where}: empty rule: give axis: value pairs")
    for key, value in rule.items():
        axis = by_name.get(key)
        if axis is None:
            names = ", ".join(a.name for a in axes) or "none"
            raise ConfigError(f"{where}: unknown axis {key!r}: the grid's axes are {names}")
        values = tuple(value) if isinstance(value, list) else (value,)
        for v in values:
            if v not in axis.values:
                raise ConfigError(f"{where}: {axis.name} has no value {v!r}: its values are "
                                  f"{', '.join(format_value(x) for x in axis.values)}")
        resolved[axis.name] = values
    return resolved


def _matches(rule: Mapping[str, tuple[Any, ...]], values: Mapping[str, Any]) -> bool:
    return all(values[axis] in allowed for axis, allowed in rule.items())


def _cell_config(base: dict[str, Any], overrides: Mapping[str, Any], where: str, name: str) -> RunConfig:
    data = _deep_copy(base)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return parse_config(data, source=f"{where}: cell {name}")


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
