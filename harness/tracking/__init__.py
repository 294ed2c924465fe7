"""MLflow tracking for grids: the store and its server, parent and cell runs, the run-folder mirror.

* :mod:`~harness.tracking.schema`: what is written (tags, params, value encoding); no MLflow import.
* :mod:`~harness.tracking.store`: a grid's :class:`~harness.tracking.store.Store` (the backend, and
  the server that serves it to Slurm jobs), checks, clients, preparing the experiment.
* :mod:`~harness.tracking.server`: the detached ``mlflow server`` and the UI.
* :mod:`~harness.tracking.runs`: creating the parent (``ablate``) and cell runs, ending them.
* :mod:`~harness.tracking.sync`: mirroring a run folder into its MLflow run (metrics exactly once,
  state, results, artifacts), from the job while it trains and from ``ablate`` afterwards.

Import the submodules directly; this package imports nothing heavy.
"""

import os

# MLflow's usage telemetry phones home from every client and server process; benchmark jobs on
# cluster nodes (and this project's machines) have no route out, so it could only time out.
# Set MLFLOW_DISABLE_TELEMETRY=false to opt back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
