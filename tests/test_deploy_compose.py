"""The compose stack (deploy/compose/) without a registry to pull its images from: the file as compose
reads it, the wiring between services, Prometheus's config (promtool) and Grafana's provisioning. The
services built from our image are run by the container smoke test; Prometheus scraping a real server and
every dashboard query are in test_deploy_dashboard.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.auth import RIGHTS, parse_keys
from tests.conftest import PROJECT_ROOT, help_of, require_tool

COMPOSE_DIR = PROJECT_ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
PODMAN_COMPOSE = str(Path(sys.executable).parent / "podman-compose")
STATE = "/var/lib/tabserve"
OUR_IMAGE = {"tabserve", "drift", "retrain", "mlflow", "evidently-ui"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as podman-compose reads it: anchors merged, variables substituted, references checked."""
    # --dry-run: parse only, no podman needed.
    result = subprocess.run(
        [PODMAN_COMPOSE, "--dry-run", "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Mount point -> source (named volume or host path relative to the compose file)."""
    targets = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        targets[target] = source
    return targets


def test_the_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*OUR_IMAGE, "prometheus", "grafana"}
    images = {name: compose["services"][name]["image"] for name in OUR_IMAGE}
    # The service image serves; the jobs image (the service image plus the jobs' packages) runs the rest.
    assert images == {
        "tabserve": "tabserve:latest",
        **{name: "tabserve-jobs:latest" for name in OUR_IMAGE if name != "tabserve"},
    }
    assert all(compose["services"][name]["pull_policy"] == "never" for name in OUR_IMAGE)


def test_the_service_publishes_http_and_grpc_and_has_time_to_drain(compose: dict[str, Any]) -> None:
    service = compose["services"]["tabserve"]
    assert {"3000:3000", "3001:3001"} <= set(service["ports"])
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert int(service["stop_grace_period"].removesuffix("s")) > 30  # the service drains for up to 30 s


def test_service_drift_job_and_ui_share_one_state_volume(compose: dict[str, Any]) -> None:
    sharing = ("tabserve", "drift", "evidently-ui")
    for name in sharing:
        service = compose["services"][name]
        assert volume_targets(service)[STATE] == "tabserve-data", name
    environments = [compose["services"][name]["environment"] for name in sharing]
    for key in ("TABSERVE_PREDICTION_LOG_DIR", "TABSERVE_REPORTS_DIR", "TABSERVE_WORKSPACE_DIR"):
        values = {environment[key] for environment in environments}
        assert len(values) == 1, key
        assert values.pop().startswith(STATE + "/")
    ui = compose["services"]["evidently-ui"]
    assert ui["command"][ui["command"].index("--workspace") + 1] == environments[0]["TABSERVE_WORKSPACE_DIR"]


def test_the_drift_job_runs_the_schedule_from_the_bento(compose: dict[str, Any]) -> None:
    drift = compose["services"]["drift"]
    assert drift["command"] == ["python", "-m", "drift", "schedule", "--every", "1h"]
    # Outside `bentoml serve`, the bento's code and its packed model are found only from here.
    assert drift["working_dir"] == "/home/bentoml/bento/src"
    assert drift["environment"]["BENTOML_HOME"] == "/home/bentoml/bento"
    assert drift["depends_on"]["tabserve"]["condition"] == "service_healthy"


def test_the_drift_command_exists() -> None:
    """The same code is in the image: the command line the compose file calls is there."""
    assert "--every" in help_of("drift", "schedule")


def test_mlflow_keeps_its_store_on_its_volume_and_accepts_its_service_name(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    mount = next(target for target, source in volume_targets(mlflow).items() if source == "mlflow-data")
    options = dict(argument.removeprefix("--").split("=", 1) for argument in mlflow["command"][2:])
    assert options["backend-store-uri"] == f"sqlite:///{mount}/mlflow.db"
    assert options["artifacts-destination"].startswith(mount + "/")
    assert "mlflow:5000" in options["allowed-hosts"].split(",")
    assert "5000:5000" in mlflow["ports"]


def test_host_files_mounted_into_the_stack_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in volume_targets(service).items():
            if source.startswith(("./", "/")):
                path = (COMPOSE_DIR / source).resolve()
                assert path.exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(COMPOSE_DIR / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_service_by_its_compose_name(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "tabserve"]
    assert job["metrics_path"] == "/metrics"
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == ["tabserve:3000"]
    prometheus = compose["services"]["prometheus"]
    assert volume_targets(prometheus)["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"


def test_grafana_provisions_the_datasource_and_dashboard_the_dashboard_uses(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = volume_targets(grafana)
    provisioning = COMPOSE_DIR / mounts["/etc/grafana/provisioning"]
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "tabserve.yaml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == "./grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dashboard_file = COMPOSE_DIR / "grafana" / "dashboards" / Path(home).relative_to(dashboards_dir)
    dashboard = json.loads(dashboard_file.read_text())
    used = {
        target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    }
    assert used == {datasource["uid"]}


def test_the_retrain_loop_runs_on_a_schedule_against_the_registry(compose: dict[str, Any]) -> None:
    retrain = compose["services"]["retrain"]
    assert retrain["command"] == ["python", "-m", "lifecycle", "schedule", "--every", "6h"]
    assert retrain["working_dir"] == "/home/bentoml/bento/src"
    assert retrain["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # It reads the log, the feedback and the reports the others write, and stores new versions beside them.
    assert volume_targets(retrain)[STATE] == volume_targets(compose["services"]["tabserve"])[STATE]
    assert retrain["environment"]["BENTOML_HOME"].startswith(f"{STATE}/")


def test_the_lifecycle_schedule_command_exists() -> None:
    assert "--every" in help_of("lifecycle", "schedule")


def test_the_service_reads_its_api_keys_from_a_compose_secret(compose: dict[str, Any]) -> None:
    service = compose["services"]["tabserve"]
    [name] = service["secrets"]
    assert service["environment"]["TABSERVE_AUTH_KEYS_FILE"] == f"/run/secrets/{name}"
    key_file = COMPOSE_DIR / compose["secrets"][name]["file"]
    keys = parse_keys(key_file.read_text(), str(key_file))  # as the service reads it
    assert keys
    assert all(key.rights <= set(RIGHTS) for key in keys)
