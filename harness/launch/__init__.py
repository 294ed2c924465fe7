"""Launching grids as jobs (Slurm, local processes, or in-process) and following them.

Data flows one way: :mod:`harness.grid` expands a grid into cells; :mod:`.preflight` checks them;
:mod:`.ablate` creates their MLflow runs and launch records (:mod:`.records`) and submits one
:class:`.job.GroupJob` per group of cells that share data and teacher (:mod:`harness.config.student_side`;
a cell alone is a group of one) through :mod:`.executors`; :mod:`.state` derives each cell's state
from its run folder and the scheduler (:mod:`.slurm`, no sacct); :mod:`.status` and :mod:`.views`
show it. :mod:`.estimate` prices a grid in GPU-hours, and what its group jobs save, for ``--dry-run``.
"""
