"""`bench.py ui` serves the MLflow UI on loopback; headless Chromium finds the cells' runs there.

The browser test drives Debian's Chromium (`bash scripts/install-chromium.sh`) through
Playwright's Python API (its own browser download is not used). It is skipped when either is
missing, and fails instead when CI=true. The screenshots are kept in test-artifacts/.

What MLflow 3.17's UI does with a grid's experiment, using only what MLflow documents (checked
here): the links are the ones MLflow itself prints for an experiment and a run
(``<ui>/#/experiments/<id>``, ``.../runs/<run id>``); a fresh browser opens an experiment on its
GenAI overview, and its "Model training" switch shows the runs table, where the cells are the child
runs of their ``ablate`` run; a run's page shows its metrics and tags. The experiment's
description is MLflow's documented ``mlflow.note.content`` tag. No documented setting arranges the
runs table (unfolded cells, metric columns): that view is the user's to pick.
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
from harness.tracking.schema import cell_tags, experiment_description
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
START_TIMEOUT_S = 300  # the server imports MLflow in its worker: slow on a busy 2-core machine


@dataclass
class UI:
    url: str
    port: int
    runs_link: str
    experiment_id: str
    cells: dict[str, str]  # run name -> its linear_top1 as the UI prints it
    run_ids: dict[str, str]  # run name -> its run id
    proc: subprocess.Popen
    output: list[str]


def make_finished_grid(uri: str, runs_root: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """A finished 2x2 grid (one seed) as ``ablate`` and its jobs leave it: cell runs nested under
    the ablate run, each mirrored from its run folder. Returns the experiment id, each cell run's
    name with its linear_top1, and each one's run id."""
    exp_id = prepare_store(uri, GRID, description=experiment_description(GRID))
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
    run_ids = dict(zip(cells, create_cell_runs(uri, exp_id, parent_run_id=parent, cells=specs)))
    for spec, run_id in zip(specs, run_ids.values()):
        run_dir = Path(spec["tags"]["run_dir"])
        run_dir.mkdir(parents=True)
        logger = JsonlLogger(run_dir / METRICS_FILE)
        for step in range(1, 11):
            logger.log_metrics({"train/loss": 1 / step}, step)
        logger.flush()  # as the run's last checkpoint does
        write_json_atomic(run_dir / RESULTS_FILE, {"metrics": {"linear_top1": float(cells[spec["run_name"]]),
                                                               "cpu_core_hours": 0.1}, "steps": 10})
        # the four cells trained together, as one group job (harness.config.student_side)
        write_status(run_dir, CellState.DONE, stage="done", step=10, job="4711_0", group_size=4)
        sync_run(run_dir, uri, run_id)
    set_state(uri, parent, CellState.DONE)
    return exp_id, cells, run_ids


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`bench.py ui` in a subprocess over a store holding a finished grid; Ctrl-C at the end."""
    base = tmp_path_factory.mktemp("ui")
    uri = sqlite_uri(base / "mlflow.db")
    experiment_id, cells, run_ids = make_finished_grid(uri, base / "runs")
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
        yield UI(url, port, link, experiment_id, cells, run_ids, proc, output)
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
    assert ui.runs_link == f"{ui.url}/#/experiments/{experiment_id}"  # the link MLflow prints for it


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


def test_prepare_store_describes_the_experiment_with_documented_tags_only(tmp_path):
    """New experiments and ones made before get the grid's description (MLflow's documented
    ``mlflow.note.content``) and no tag of the UI's internals."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    old = client(uri).create_experiment("made-before")
    for name in ("new-grid", "made-before"):
        tags = client(uri).get_experiment(prepare_store(uri, name, description=experiment_description(name))).tags
        assert f"milan-bench grid `{name}`" in tags["mlflow.note.content"]
        assert not [key for key in tags if key.startswith(("mlflow.sharedViewState", "mlflow.experimentKind"))]
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


def click_past_the_tour(page, target, timeout_s: float = 90) -> None:
    """Click ``target``; the GenAI overview's first-visit tour ("Detect Issues ... Got it") may pop
    up over the page at any moment of its loading and take every click: dismiss it, as a user does."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            target.click(timeout=5_000)
            return
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            tour = page.get_by_role("button", name="Got it")
            if tour.count():
                tour.first.click(timeout=5_000)


@pytest.mark.browser
def test_printed_link_leads_to_every_cell_and_its_metric(ui, browser_page):
    """The experiment link `bench.py ui` prints opens the grid's experiment; its "Model training"
    switch shows the runs, the ablate run holds the four cells; each cell's run page (the link
    MLflow prints for a run) shows its linear_top1 and the size of the group job it trained in."""
    page = browser_page
    try:
        page.goto(ui.runs_link, wait_until="domcontentloaded", timeout=60_000)
        click_past_the_tour(page, page.get_by_text("Model training", exact=True).first)
        page.get_by_text(f"{len(ui.cells) + 1} matching runs").wait_for(timeout=90_000)
        assert f"/experiments/{ui.experiment_id}" in page.url
        parent = page.locator("[role=row]").filter(has_text=GRID).first
        parent.locator("button").first.click()  # unfold the ablate run: its children are the cells
        for name in ui.cells:
            page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-grid-cells.png"), full_page=True)
        for name, top1 in ui.cells.items():
            page.goto(f"{ui.runs_link}/runs/{ui.run_ids[name]}", wait_until="domcontentloaded", timeout=60_000)
            metric = page.locator("tr, [role=row]").filter(has_text="linear_top1").first
            metric.wait_for(state="visible", timeout=60_000)
            assert top1 in metric.inner_text(), name
            assert page.get_by_text("group_size").first.is_visible(), name  # which cells trained together
    finally:
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-cell.png"), full_page=True)
    assert (ARTIFACTS / "mlflow-ui-grid-cells.png").stat().st_size > 10_000


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
