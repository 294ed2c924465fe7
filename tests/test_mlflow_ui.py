"""`bench.py ui` serves the MLflow UI on loopback; headless Chromium finds the cells' runs there.

The browser test drives Debian's Chromium (`bash scripts/install-chromium.sh`) through
Playwright's Python API (its own browser download is not used). It is skipped when either is
missing, and fails instead when CI=true. The screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import itertools
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

from harness.cli import app
from harness.config import RunConfig
from harness.tracking import (
    MlflowRunLogger,
    cell_tags,
    create_cell_run,
    finish_run,
    log_summary_metrics,
    mark_run,
    prepare_store,
    run_name,
    sqlite_uri,
    start_parent_run,
)
from harness.tracking.server import free_port, port_in_use

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
    run_names: list[str]
    parent_name: str
    proc: subprocess.Popen
    output: list[str]


def make_finished_grid(uri: str) -> tuple[list[str], str]:
    """A finished 2x2 grid (one seed): returns the cells' run names and the parent's name."""
    exp_id = prepare_store(uri, GRID)
    axes = [{"name": "model.target", "values": ["pixel", "clip"], "baseline": "pixel"},
            {"name": "model.decoder", "values": ["standard", "prompting"], "baseline": "standard"}]
    parent_name = f"{GRID} ablate"
    parent = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=axes, run_name=parent_name)
    names = []
    for target, decoder in itertools.product(["pixel", "clip"], ["standard", "prompting"]):
        values = {"model.target": target, "model.decoder": decoder}
        cfg = RunConfig().with_overrides(values)
        name = run_name(values, cfg.seed)
        run_id = create_cell_run(uri, exp_id, parent_run_id=parent, run_name=name, params=cfg.flat(),
                                 tags=cell_tags(cfg, grid=GRID, axis_values=values, executor="local"))
        logger = MlflowRunLogger(uri, run_id)
        for step in range(1, 11):
            logger.log_metrics({"train/loss": 1 / step}, step)
        logger.flush()
        log_summary_metrics(uri, run_id, {"linear_top1": 50.0 + len(names), "device_hours": 0.1}, step=10)
        mark_run(uri, run_id, "done")
        names.append(name)
    finish_run(uri, parent, "done")
    return names, parent_name


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`bench.py ui` in a subprocess over a store holding a finished grid; Ctrl-C at the end."""
    base = tmp_path_factory.mktemp("ui")
    uri = sqlite_uri(base / "mlflow.db")
    names, parent_name = make_finished_grid(uri)
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
        yield UI(url, port, link, names, parent_name, proc, output)
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
    assert ui.runs_link == f"{ui.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


@pytest.mark.browser
def test_browser_finds_the_cells_runs_on_the_experiment_page(ui, tmp_path):
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-ui-experiment-runs.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS[1:])
        context = browser.new_context(viewport={"width": 1600, "height": 900})
        page = context.new_page()
        try:
            page.goto(ui.runs_link, wait_until="domcontentloaded", timeout=60_000)
            # The runs table is rendered by JavaScript; cells are child runs, nested (collapsed)
            # under the ablate run: wait for the parent's row, then expand it as a person would.
            parent_row = page.locator("[role=row]").filter(has_text=ui.parent_name).first
            parent_row.wait_for(state="visible", timeout=90_000)
            if not page.get_by_text(ui.run_names[0], exact=True).first.is_visible():
                parent_row.locator("[col-id*='Run Name'] button").first.click()
            for name in ui.run_names:
                page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=30_000)
            page.get_by_text(f"{len(ui.run_names) + 1} matching runs").wait_for(timeout=30_000)
            close = page.get_by_role("button", name="Close")
            if close.count() and close.first.is_visible():  # the assistant's side panel
                close.first.click()
        finally:
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
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
