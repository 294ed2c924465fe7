"""`bench.py ui` serves the MLflow UI on loopback; headless Chromium finds the cells' runs there.

The browser test drives Debian's Chromium (`bash scripts/install-chromium.sh`) through
Playwright's Python API (its own browser download is not used). It is skipped when either is
missing, and fails instead when CI=true. The screenshots are kept in test-artifacts/.

What MLflow 3.17's UI does with a grid's experiment (read from its bundle, checked here): a
fresh browser opens an experiment on the GenAI overview unless the link says
``workflowType=machine_learning`` (its GenAI / Model training switch; the experiment's
``mlflow.experimentKind`` tag is read only when that switch is compiled out); the runs table
folds child runs under their parent whenever it is sorted by start time (its default) and shows
no metric column until one is picked, unless a saved view is opened: ``viewStateShareKey=<key>``
applies the experiment tag ``mlflow.sharedViewState.<key>``, which ``prepare_store`` sets.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from harness.run.cell_state import CellState
from harness.cli import app
from harness.config import RunConfig
from harness.core.files import write_json_atomic
from harness.grid import cell_name
from harness.run.folder import METRICS_FILE, RESULTS_FILE, write_status
from harness.tracking.runs import create_cell_runs, set_state, start_parent_run
from harness.tracking.schema import cell_tags
from harness.tracking.server import free_port, port_in_use
from harness.tracking.store import client, prepare_store, sqlite_uri
from harness.tracking.sync import sync_run
from harness.train.metrics_log import JsonlLogger

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GRID = "ui-grid"
VIEW_KEY = "grid-cells"  # prepare_store's saved view of the cell runs
START_TIMEOUT_S = 300  # the server imports MLflow in its worker: slow on a busy 2-core machine


@dataclass
class UI:
    url: str
    port: int
    runs_link: str
    experiment_id: str
    cells: dict[str, str]  # run name -> its linear_top1 as the UI prints it
    proc: subprocess.Popen
    output: list[str]


def make_finished_grid(uri: str, runs_root: Path) -> tuple[str, dict[str, str]]:
    """A finished 2x2 grid (one seed) as ``ablate`` and its jobs leave it: cell runs nested under
    the ablate run, each mirrored from its run folder. Returns the experiment id and each cell
    run's name with its linear_top1."""
    exp_id = prepare_store(uri, GRID)
    axes = [{"name": "model.target", "values": ["pixel", "clip"], "baseline": "pixel"},
            {"name": "model.decoder", "values": ["standard", "prompting"], "baseline": "standard"}]
    parent = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=axes)
    cells, specs = {}, []
    for i, (target, decoder) in enumerate(itertools.product(["pixel", "clip"], ["standard", "prompting"])):
        values = {"model.target": target, "model.decoder": decoder}
        cfg = RunConfig().with_overrides(values)
        name = f"{cell_name(values)} seed={cfg.seed}"
        cells[name] = f"{61.25 + 5 * i:g}"
        specs.append({"run_name": name, "params": cfg.flat(), "tags": cell_tags(
            cfg, grid=GRID, cell=cell_name(values), axis_values=values, executor="local",
            run_dir=runs_root / cfg.run_id())})
    for spec, run_id in zip(specs, create_cell_runs(uri, exp_id, parent_run_id=parent, cells=specs)):
        run_dir = Path(spec["tags"]["run_dir"])
        run_dir.mkdir(parents=True)
        logger = JsonlLogger(run_dir / METRICS_FILE)
        for step in range(1, 11):
            logger.log_metrics({"train/loss": 1 / step}, step)
        write_json_atomic(run_dir / RESULTS_FILE, {"metrics": {"linear_top1": float(cells[spec["run_name"]]),
                                                               "cpu_core_hours": 0.1}, "steps": 10})
        # the four cells trained together, as one group job (harness.config.student_side)
        write_status(run_dir, CellState.DONE, stage="done", step=10, job="4711_0", group_size=4)
        sync_run(run_dir, uri, run_id)
    set_state(uri, parent, CellState.DONE)
    return exp_id, cells


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`bench.py ui` in a subprocess over a store holding a finished grid; Ctrl-C at the end."""
    base = tmp_path_factory.mktemp("ui")
    uri = sqlite_uri(base / "mlflow.db")
    experiment_id, cells = make_finished_grid(uri, base / "runs")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "bench.py", "ui", "--tracking-uri", uri, "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not any(line.startswith("MLflow UI:") for line in output):
            if proc.poll() is not None and lines.empty():
                pytest.fail(f"bench.py ui exited with {proc.returncode}: {output}")
            if time.monotonic() > deadline:
                pytest.fail(f"bench.py ui printed no address within {START_TIMEOUT_S} s: {output}")
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        time.sleep(0.5)  # the experiment links follow the address line
        while not lines.empty():
            output.append(lines.get())
        url = re.search(r"MLflow UI: (\S+)", "\n".join(output)).group(1)
        link = next(line.split(": ", 1)[1] for line in output if line.strip().startswith(f"{GRID}:"))
        yield UI(url, port, link, experiment_id, cells, proc, output)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("bench.py ui did not stop on SIGINT")
    assert proc.returncode == 0, output
    assert not port_in_use(port), "the MLflow server outlived bench.py ui"


def test_ui_prints_its_loopback_address_and_serves_the_store(ui):
    assert ui.url == f"http://127.0.0.1:{ui.port}"
    assert requests.get(f"{ui.url}/health", timeout=10).status_code == 200
    found = requests.get(f"{ui.url}/api/2.0/mlflow/experiments/get-by-name",
                         params={"experiment_name": GRID}, timeout=10)
    assert found.status_code == 200, found.text
    experiment_id = found.json()["experiment"]["experiment_id"]
    assert ui.runs_link == (f"{ui.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                            f"&viewStateShareKey={VIEW_KEY}")


def require_browser() -> None:
    reasons = []
    if not Path(CHROMIUM).exists():
        reasons.append("Debian's chromium is not installed (bash scripts/install-chromium.sh)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("the playwright package is missing (pip install -e '.[test]')")
    if not reasons:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no headless browser: {'; '.join(reasons)}", pytrace=False)
    pytest.skip("; ".join(reasons))


def test_prepare_store_marks_the_experiment_for_the_ui(tmp_path):
    """New experiments and ones made before (without the tags) get the UI's tags."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    old = client(uri).create_experiment("made-before")
    for experiment_id in (prepare_store(uri, "new-grid"), prepare_store(uri, "made-before")):
        tags = client(uri).get_experiment(experiment_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        view = json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
        assert view["searchFilter"] == "tags.role = 'cell'" and view["orderByKey"] != "attributes.start_time"
        assert "metrics.`linear_top1`" in view["selectedColumns"]
        assert {"tags.`slurm.job_id`", "tags.`group_size`"} <= set(view["selectedColumns"])  # which cells trained together
    assert prepare_store(uri, "made-before") == old


@pytest.fixture
def browser_page():
    """A page in a fresh headless Chromium profile (nothing remembered from another visit)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS[1:])
        try:
            yield browser.new_context(viewport={"width": 1900, "height": 900}).new_page()
        finally:
            browser.close()


@pytest.mark.browser
def test_printed_link_shows_every_cell_with_its_metric_unfolded(ui, browser_page):
    """The link `bench.py ui` prints opens the experiment on its runs table (not the GenAI overview)
    in its saved view: every cell run listed by name (its axis values) with its linear_top1 and its
    group job's size on the same row, the ablate run left out, and nothing clicked."""
    page = browser_page
    screenshot = ARTIFACTS / "mlflow-ui-grid-cells.png"
    try:
        page.goto(ui.runs_link, wait_until="domcontentloaded", timeout=60_000)
        page.get_by_text(f"{len(ui.cells)} matching runs").wait_for(timeout=90_000)
        assert f"/experiments/{ui.experiment_id}/runs" in page.url
        assert page.get_by_role("heading", name="Runs").is_visible()
        assert not page.get_by_role("heading", name="Overview").count()  # not the GenAI overview
        header = page.locator("[role=columnheader]").filter(has_text="linear_top1").first
        header.wait_for(state="visible", timeout=30_000)
        for name, top1 in ui.cells.items():
            cell = page.get_by_text(name, exact=True).first
            cell.wait_for(state="visible", timeout=30_000)
            # the grid draws the pinned run-name column and the other columns as two rows
            index = cell.locator("xpath=ancestor::*[@role='row'][1]").get_attribute("row-index")
            value = page.locator(f"[role=row][row-index='{index}'] [col-id='metrics.`linear_top1`']")
            assert value.first.inner_text().strip() == top1, name
            group = page.locator(f"[role=row][row-index='{index}'] [col-id='tags.`group_size`']")
            assert group.first.inner_text().strip() == "4", name  # which cells trained together
    finally:
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_ui_for_a_server_uri_points_at_the_server():
    # a stub that answers the one API call check_store makes, as an MLflow server would
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Experiments(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b'{"experiments": []}'
            self.send_response(200 if self.path.startswith("/api/2.0/mlflow/experiments/search") else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Experiments) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            result = CliRunner().invoke(app, ["ui", "--tracking-uri", url])
        finally:
            server.shutdown()
    assert result.exit_code == 0, result.output
    assert "is an MLflow server: its UI is at that address already" in result.output


def test_ui_port_in_use_is_one_line_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--tracking-uri", sqlite_uri(tmp_path / "mlflow.db"),
                                          "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use: pick another with --port"]
