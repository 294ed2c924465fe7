"""``bench.py ablate GRID --rehearse``: the grid's exact structure at micro scale, run end to end in
minutes, so that a user knows the real grid will work before spending its GPU-hours.

Kept from the grid: its cells, axis values, seeds, evaluation protocols, the executor, the
tasks per cell (the DDP world size) and the checkpoint, requeue and report path. Shrunk: the
student (``vit_micro_patch4`` at 32 px), a few steps per stage, a few hundred images (sampled from
the grid's dataset when this machine sees it, else the demo data), and the teacher (a random-init
micro CLIP with the student's 8x8 patch grid: the rehearsal proves the pipeline, not the targets).
Its runs and MLflow experiment carry a ``-rehearsal`` suffix, so they never count as results.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from harness.config import RunConfig, parse_config
from harness.data.datasets import DatasetError, check_image_folder
from harness.evaluate.protocols import PROTOCOLS
from harness.grid.grid_file import Cell, Grid, Resources
from harness.milan.switches import needs_teacher

SUFFIX = "-rehearsal"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 24, 8
STUDENT = {"size": "vit_micro_patch4", "img_size": 32}
TEACHER = {"model": "milan-clip-micro", "pretrained": None}


@dataclass(frozen=True)
class Rehearsal:
    grid: Grid
    notes: tuple[str, ...]  # what was replaced, for the user


def rehearse(grid: Grid, *, runs_dir: Path, cpu_only: bool, cpus_per_node: int | None) -> Rehearsal:
    """The rehearsal of ``grid``. ``cpu_only``: the executor has no GPUs here, so each GPU task
    becomes a CPU task (gloo), at most ``cpus_per_node`` of them per node."""
    notes: list[str] = []
    data_root = _data(grid, (runs_dir / f"{grid.name}{SUFFIX}" / "data").absolute(), notes)
    resources = _resources(grid.resources, cpu_only, cpus_per_node, notes)
    world = resources.world_size
    if any(needs_teacher(c.config.model.target, c.config.model.masking) for c in grid.cells):
        teacher = grid.cells[0].config.teacher
        notes.append(f"teacher: a random-init {TEACHER['model']} (patch 4 at 32 px) instead of {teacher.model} "
                     f"({teacher.pretrained}); preflight of the real grid checks its weights where they are on disk")
    if grid.spec.evaluates is not None:
        notes.append(f"weights: each cell pretrains at micro scale instead of reading its finished twin's encoder "
                     f"from {grid.spec.evaluates}")
    name = f"{grid.name}{SUFFIX}"
    spec = grid.spec.model_copy(update={
        "name": name, "resources": resources,
        "tracking": grid.spec.tracking.model_copy(update={"experiment": f"{grid.experiment}{SUFFIX}"})})
    cells = []
    for cell in grid.cells:
        cfg = _micro(cell.config, data_root, world)
        cells.append(Cell(name, cell.axes, cell.seed, cfg, cfg.run_id(), cfg.cell_id()))
    first, micro = grid.cells[0].config.eval, cells[0].config.eval
    for protocol in first.protocols:  # a protocol's own data tree, replaced where it is not visible here
        before, after = getattr(getattr(first, protocol), "root", None), getattr(getattr(micro, protocol), "root", None)
        if before != after:
            notes.append(f"data: eval.{protocol}.root {before} is not visible from this machine: {after} instead")
    notes.append(f"{len(cells)} cells at micro scale ({STUDENT['size']} at {STUDENT['img_size']} px, one epoch of "
                 f"pretraining, two of each evaluation protocol), {world} task(s) each; runs under {name}/, "
                 f"MLflow experiment {spec.tracking.experiment}")
    return Rehearsal(Grid(spec, grid.path, grid.axes, tuple(cells)), tuple(notes))


def _micro(cfg: RunConfig, data_root: str, world: int) -> RunConfig:
    """The cell's config with its compute shrunk; everything else (target, decoder, masking, mask
    ratio, decoder shape, protocols, seed, recipe switches) as the grid has it."""
    data = cfg.to_dict()
    data["model"] |= STUDENT
    data["teacher"] |= TEACHER
    data["data"] |= {"root": data_root, "train_split": "train", "val_split": "val"}
    # one epoch; the random-init reference keeps its 0
    data["pretrain"] |= {"epochs": min(cfg.pretrain.epochs, 1), "warmup_epochs": 0, "batch_size": 16,
                         "accum_steps": 1, "weights_from": None}
    evaluation = data["eval"]
    evaluation["feature_batch_size"] = 64
    for name, protocol in PROTOCOLS.items():  # each protocol's own micro scale
        evaluation[name] |= protocol.micro(getattr(cfg.eval, name), world)
    data["runtime"] |= {"num_workers": min(data["runtime"]["num_workers"], 1), "log_every": 1, "checkpoint_every": 5}
    return parse_config(data, source="rehearsal")


def _data(grid: Grid, folder: Path, notes: list[str]) -> str:
    """A few hundred images sampled from the grid's dataset when it is visible here, else from the
    demo data (made on first use); linked, not copied."""
    from harness.data.assets import DEMO_DATA

    d = grid.cells[0].config.data
    root, splits = Path(d.root), (d.train_split, d.val_split)
    try:
        classes = check_image_folder(root, d.train_split)
        check_image_folder(root, d.val_split)
        source = f"{len(classes)} classes of {root}"
    except DatasetError:
        if not (DEMO_DATA / "meta.json").is_file():
            from harness.data.demo import make_demo_dataset

            make_demo_dataset(DEMO_DATA)
        root, splits = DEMO_DATA, ("train", "val")
        classes = check_image_folder(root, "train")
        source = f"the demo data ({DEMO_DATA}): the grid's {d.root} is not visible from this machine"
    chosen = sorted(random.Random(0).sample(classes, min(CLASSES, len(classes))))
    for split, name, per_class in ((splits[0], "train", TRAIN_PER_CLASS), (splits[1], "val", VAL_PER_CLASS)):
        for label in chosen:
            images = sorted(p for p in (root / split / label).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            target = folder / name / label
            target.mkdir(parents=True, exist_ok=True)
            for image in images[:per_class]:
                if not (target / image.name).exists():
                    os.symlink(image.absolute(), target / image.name)
    notes.append(f"data: {len(chosen)} classes x ({TRAIN_PER_CLASS} train + {VAL_PER_CLASS} val) images from "
                 f"{source}, linked under {folder}")
    return str(folder)


def _resources(r: Resources, cpu_only: bool, cpus_per_node: int | None, notes: list[str]) -> Resources:
    """The grid's resources for minutes of work: the same nodes and tasks per node, CPU tasks
    where there are no GPUs (capped at the CPUs a node has), a short time limit."""
    tasks = r.tasks
    update = {"time_min": min(r.time_min, 30), "mem_gb": min(r.mem_gb, 4 * tasks) if r.mem_gb else None}
    if cpu_only and r.gpus_per_node:
        tasks = min(tasks, cpus_per_node or tasks)
        update |= {"gpus_per_node": 0, "tasks_per_node": tasks, "cpus_per_task": 1,
                   "mem_gb": min(r.mem_gb, 4 * tasks) if r.mem_gb else None}
        notes.append(f"resources: {tasks} CPU task(s) per node with gloo instead of {r.gpus_per_node} GPUs "
                     f"(no GPUs here{'; a node has ' + str(cpus_per_node) + ' CPUs' if tasks < r.tasks else ''})")
    return r.model_copy(update=update)
