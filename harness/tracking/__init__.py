"""MLflow tracking for grids: ``schema`` (what is written), ``store`` (where, checks, clients),
``server`` (the detached ``mlflow server`` and the UI), ``runs`` (parent and cell runs), ``sync``
(mirroring a run folder into its run). Import the submodules directly; this imports nothing heavy.
"""

import os

# MLflow's usage telemetry phones home from every client and server process; benchmark jobs on
# cluster nodes (and this project's machines) have no route out, so it could only time out.
# Set MLFLOW_DISABLE_TELEMETRY=false to opt back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
