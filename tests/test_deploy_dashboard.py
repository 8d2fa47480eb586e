"""The Grafana dashboard: the committed JSON is the generator's output, and every panel's query returns data
from a real Prometheus (Debian's) scraping a real `bentoml serve` that has seen traffic on every transport,
so no panel names a metric the service does not export."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deploy import dashboard
from deploy.container import probes
from drift.summary import Summary, write_latest
from models.store import StoredModel
from tests.conftest import PROJECT_ROOT, Stores, free_port, require_tool, start_server, wait_ready

PROMETHEUS_CONFIG = PROJECT_ROOT / "deploy" / "compose" / "prometheus" / "prometheus.yml"
SCRAPE_SECONDS = 1
# Grafana fills $__rate_interval in; here a window of many scrapes, all within the traffic sent.
RATE_WINDOW = "30s"
DRIFT_SHARE = 0.25


def panels() -> list[dict[str, Any]]:
    built = dashboard.build()["panels"]
    return [panel for panel in built if panel["type"] != "row"]


def panel_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel["targets"]]


def test_the_committed_dashboard_is_the_generators_output() -> None:
    assert dashboard.OUTPUT.read_text() == dashboard.render(), "run: python -m deploy.dashboard"


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    titles = {panel["title"] for panel in panels()}
    assert {
        "Request rate by transport",
        "p99 latency by transport",
        "Rows per model call (adaptive batching)",
        "Predictions by class",
        "Validation errors by reason",
        "Latest drift share",
    } <= titles
    assert all(panel["targets"] for panel in panels())


@dataclass(frozen=True)
class Scraped:
    """A Prometheus that has scraped a served model through traffic on every transport."""

    prometheus: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        if response.status_code == 503:  # Prometheus refuses queries until its storage is ready
            return []
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def write_drift_summary(reports_dir: Path, model: StoredModel) -> None:
    """A latest.json as `python -m drift report` writes it, for the drift gauges."""
    write_latest(
        reports_dir,
        Summary(
            model=model.name,
            version=model.version,
            registered_version=model.labels["registered_version"],
            mlflow_run_id=model.labels["mlflow_run_id"],
            data_digest=model.metadata["dataset_digest"],
            drift_detected=True,
            drift_share=DRIFT_SHARE,
            drifted_features=model.schema.names[: int(DRIFT_SHARE * len(model.schema.names))],
            rows_compared=500,
            rows_seen=500,
            prediction_drift=False,
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
            report_dir=str(reports_dir / model.name / "test"),
        ),
    )


def prometheus_config(target: str) -> dict[str, Any]:
    """deploy/compose's config, scraping `target` every second instead of the compose service."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "tabserve"]
    for group in job["static_configs"]:
        group["targets"] = [target]
    return config


def wait_for(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def send_traffic(url: str, grpc_target: str, seconds: float) -> None:
    """Every transport, both classes, and a refused request, spread over several scrapes."""
    info = probes.model_info(url)
    records = probes.records_from_schema(info, 20)  # from small to large tumours: both classes
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for record in records[::5]:
            prediction = probes.check_predict(url, info, record)
            probes.check_oip_rest(url, info, record, prediction)
            probes.check_grpc(grpc_target, info, record, prediction)
        probes.check_predict_batch(url, records)
        probes.check_bad_request(url, records[0])
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scraped(
    stores: Stores, default_model: subprocess.CompletedProcess[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scraped]:
    prometheus_binary = require_tool("prometheus")
    root = tmp_path_factory.mktemp("dashboard")
    write_drift_summary(root / "reports", StoredModel.open("breast_cancer:latest"))
    port, grpc_port, prometheus_port = free_port(), free_port(), free_port()
    env = stores.env(
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_PREDICTION_LOG_DIR=str(root / "predictions"),
        TABSERVE_REPORTS_DIR=str(root / "reports"),
    )
    server = start_server(env, port, root / "server-output.txt")
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{port}")))
    prometheus = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(server, url, root / "server-output.txt")
        with (root / "prometheus-output.txt").open("w") as sink:
            prometheus = subprocess.Popen(
                [
                    prometheus_binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        scraped = Scraped(f"http://127.0.0.1:{prometheus_port}")
        wait_for("Prometheus to scrape the service", lambda: scraped.query('up{job="tabserve"} == 1'))
        send_traffic(url, f"127.0.0.1:{grpc_port}", seconds=4)
        time.sleep(3 * SCRAPE_SECONDS)  # the last of the traffic scraped too
        yield scraped
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize(("title", "expr"), panel_queries(), ids=[title for title, _ in panel_queries()])
def test_every_panel_query_returns_data(scraped: Scraped, title: str, expr: str) -> None:
    result = scraped.query(expr.replace("$__rate_interval", RATE_WINDOW))
    assert result, f"{title}: no data for {expr}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(value) for value in values), f"{title}: {values}"


def test_request_rate_shows_every_transport(scraped: Scraped) -> None:
    result = scraped.query(f"sum by (transport) (rate(tabserve_request_seconds_count[{RATE_WINDOW}]))")
    assert {series["metric"]["transport"] for series in result} >= {"http", "oip_rest", "grpc"}


def test_predictions_by_class_shows_both_classes(scraped: Scraped) -> None:
    result = scraped.query(f"sum by (predicted) (rate(tabserve_predictions_total[{RATE_WINDOW}]))")
    assert {series["metric"]["predicted"] for series in result} == {"benign", "malignant"}


def test_latest_drift_share_is_the_latest_reports(scraped: Scraped) -> None:
    [series] = scraped.query("max by (model, version) (tabserve_drift_share)")
    assert series["metric"]["model"] == "breast_cancer"
    assert float(series["value"][1]) == pytest.approx(DRIFT_SHARE)
