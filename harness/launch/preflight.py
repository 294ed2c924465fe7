"""Checks before anything is submitted, each failing with one line (exit code 2): each evaluation
protocol's settings against each cell's tasks (the registry's checks), the Slurm partition or the
local GPUs, then :func:`harness.run.checks.preflight` (dataset trees and classes, teacher name, its
weights loaded into its architecture, model shapes); the caller checks the tracking store.

``harness.run.checks.preflight`` reads a few config sections only, so it runs once per distinct
combination of them, not once per cell. It needs torch, timm and open_clip (seconds to import), so
a combination that passed is remembered in the runs folder with the state of what it read (split
folders, teacher files, harness commit): submitting again, or another grid with the same settings,
skips the imports unless one of those changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from harness.config import RunConfig
from harness.core.errors import UserError
from harness.core.files import read_json, write_json_atomic
from harness.evaluate.protocols import PROTOCOLS
from harness.grid import Cell, Grid
from harness.launch import slurm
from harness.run.folder import finished_source
from harness.tracking.schema import git_commit_of

CACHE_FILE = ".preflight-passed.json"
CACHE_SIZE = 2000


def _stat(path: str | Path | None) -> list[int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size] if st else None


def _fingerprint(cfg: RunConfig, commit: str | None, world_size: int, here: bool) -> str:
    """The sections harness.run.checks.preflight reads, and the state of the files it reads."""
    data, d, t = cfg.to_dict(), cfg.data, cfg.teacher
    signature = {"model": data["model"], "teacher": data["teacher"], "data": data["data"], "eval": data["eval"],
                 "pretrain": data["pretrain"], "device": data["runtime"]["device"] if here else None,
                 "world_size": world_size}
    inputs = {"signature": signature, "commit": commit,
              "splits": [_stat(Path(d.root) / split) for split in (d.train_split, d.val_split)],
              "teacher": [_stat(t.pretrained), _stat(t.model if t.model.endswith(".json") else None)]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def check_configs(grid: Grid, cache_dir: Path | None = None, here: bool = True) -> None:
    """harness.run.checks.preflight once per fingerprint that has not passed (per ``cache_dir``'s record)."""
    cache_path = cache_dir / CACHE_FILE if cache_dir else None
    cached = read_json(cache_path) if cache_path else None
    passed = [k for k in cached if isinstance(k, str)] if isinstance(cached, list) else []
    commit = git_commit_of()
    todo: dict[str, tuple[str, RunConfig]] = {}
    for cell in grid.cells:
        key = _fingerprint(cell.config, commit, grid.resources.world_size, here)
        if key not in passed and key not in todo:
            todo[key] = (cell.name, cell.config)
    if not todo:
        return
    from harness.run.checks import preflight  # torch, timm, open_clip: only when a check must run

    for key, (name, cfg) in todo.items():
        try:
            preflight(cfg, world_size=grid.resources.world_size, here=here)
        except UserError as err:
            raise type(err)(f"cell {name}: {err}") from None
        passed.append(key)
    if cache_path is not None:
        write_json_atomic(cache_path, passed[-CACHE_SIZE:])


def check_settings(grid: Grid) -> None:
    """Each evaluation protocol's settings against the cell's tasks (e.g. the recipe's effective
    batch splits over them): what a rehearsal at micro batch sizes cannot show."""
    world = grid.resources.world_size
    for cell in grid.cells:
        for name in cell.config.eval.protocols:
            try:
                PROTOCOLS[name].check_settings(getattr(cell.config.eval, name), world)
            except UserError as err:
                raise type(err)(f"cell {cell.name}: {err}") from None


def check_resources(grid: Grid, executor: str) -> None:
    r = grid.resources
    if executor == "slurm":
        try:
            names, default = slurm.partitions()
        except slurm.SlurmError as err:
            raise UserError(f"cannot ask Slurm for its partitions ({err}): is the controller up?") from None
        if r.partition and r.partition not in names:
            raise UserError(f"partition {r.partition!r} does not exist (Slurm has {', '.join(names)}): "
                            f"fix resources.partition in the grid")
        if not r.partition and default is None:
            raise UserError(f"Slurm has no default partition: set resources.partition to one of {', '.join(names)}")
    elif r.gpus_per_node:
        import torch  # only for a local grid that asks for GPUs

        if torch.cuda.device_count() < r.gpus_per_node:
            raise UserError(f"the grid asks for {r.gpus_per_node} GPUs per node but this machine has "
                            f"{torch.cuda.device_count()}: use --executor slurm or set resources.gpus_per_node")


def check_weight_sources(cells: Sequence[Cell], runs_dir: Path) -> None:
    """The cells that evaluate a finished run's encoder (``pretrain.weights_from``): that run has
    finished, so no job is submitted only to fail."""
    for cell in cells:
        if cell.config.pretrain.weights_from is not None:
            try:
                finished_source(cell.config.pretrain.weights_from, runs_dir)
            except UserError as err:
                raise type(err)(f"cell {cell.run_name}: {err}") from None


def preflight_grid(grid: Grid, executor: str, cache_dir: Path | None = None) -> None:
    check_settings(grid)
    check_resources(grid, executor)
    check_configs(grid, cache_dir, here=executor != "slurm")
