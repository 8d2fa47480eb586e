"""The bento `make build` makes from bentofile.yaml: what it packs, which versions it installs, which image
it describes. Built for real (`bentoml build`) into the session's throwaway store; the image itself is
built and run by the container smoke test (python -m deploy.container.smoke), which needs an engine."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.build import bento_path, build_bento
from models.store import StoredModel
from tests.conftest import PROJECT_ROOT, Stores

# The image environment bentofile.yaml promises (docs/deployment.md lists it).
IMAGE_ENV = {
    "OMP_NUM_THREADS": "1",
    "TABSERVE_GRPC_PORT": "3001",
    "TABSERVE_DATA_DIR": "/var/lib/tabserve",
    "TABSERVE_PREDICTION_LOG_DIR": "/var/lib/tabserve/predictions",
    "TABSERVE_REPORTS_DIR": "/var/lib/tabserve/reports",
    "TABSERVE_WORKSPACE_DIR": "/var/lib/tabserve/workspace",
    "BENTOML_DO_NOT_TRACK": "true",
}
SOURCE_PACKAGES = ("models", "serving", "drift")
DEV_ONLY = ("pytest", "ruff", "mypy", "locust", "tritonclient", "podman-compose", "kubernetes-validate")


def path_without_uv() -> str:
    """PATH less every directory that holds a uv, as on a fresh machine: `bentoml build` runs uv, and must
    find the project's own (pyproject.toml's dev group), not one a developer installed by hand."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(folder for folder in folders if not (Path(folder) / "uv").exists())


@pytest.fixture(scope="module")
def bento(stores: Stores, default_model: subprocess.CompletedProcess[str]) -> Path:
    env = stores.env(PATH=path_without_uv())
    return bento_path(env, build_bento(env))


@pytest.fixture(scope="module")
def bento_info(bento: Path) -> dict[str, Any]:
    info: dict[str, Any] = yaml.safe_load((bento / "bento.yaml").read_text())
    return info


def test_the_bento_carries_the_model_the_service_serves(stores: Stores, bento_info: dict[str, Any]) -> None:
    served = StoredModel.open("breast_cancer:latest").tag
    packed = [model["tag"] for service in bento_info["services"] for model in service["models"]]
    assert packed == [served]
    assert bento_info["service"] == "service:Tabserve"


def test_the_bento_source_is_the_service_code_and_nothing_else(bento: Path) -> None:
    packed = {
        path.relative_to(bento / "src").as_posix() for path in (bento / "src").rglob("*") if path.is_file()
    }
    expected = {"service.py", "settings.py", "bentofile.yaml"}  # BentoML adds the bentofile it built from
    for package in SOURCE_PACKAGES:
        expected |= {
            path.relative_to(PROJECT_ROOT).as_posix()
            for path in (PROJECT_ROOT / package).rglob("*.py")
            if "__pycache__" not in path.parts
        }
    assert packed == expected
    assert "serving/oip/grpc_server.py" in packed
    assert "drift/__init__.py" in packed


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"] if "version" in package}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_bento_installs_the_exact_locked_versions(bento: Path) -> None:
    locked = {normalized(name): version for name, version in locked_versions().items()}
    pins: dict[str, str] = {}
    for line in (bento / "env" / "python" / "requirements.txt").read_text().splitlines():
        requirement = line.split(";")[0].strip()
        if not requirement or requirement.startswith("#"):
            continue
        name, separator, version = requirement.partition("==")
        assert separator, f"not an exact pin: {line!r}"
        pins[normalized(name)] = version.strip()
    mismatched = {
        name: (version, locked.get(name)) for name, version in pins.items() if locked.get(name) != version
    }
    assert not mismatched, f"pins that differ from uv.lock (pin, lock): {mismatched}"
    for runtime in ("bentoml", "scikit-learn", "mlflow", "evidently", "grpcio", "pandas"):
        assert runtime in pins
    assert not [name for name in DEV_ONLY if name in pins], "dev tools in the image"


def test_the_image_is_python_slim_with_the_service_environment(bento_info: dict[str, Any]) -> None:
    image = bento_info["image"]
    assert image["base_image"] == "python:3.11-slim"
    assert image["python_version"] == "3.11"
    assert {env["name"]: env["value"] for env in bento_info["envs"]} == IMAGE_ENV


def test_the_dockerfile_exposes_both_ports_and_runs_as_bentoml(bento: Path) -> None:
    """The Dockerfile `bentoml containerize` builds (BentoML renders the same one into the bento)."""
    lines = [line.strip() for line in (bento / "env" / "docker" / "Dockerfile").read_text().splitlines()]
    assert "FROM python:3.11-slim AS base-container" in lines
    assert "EXPOSE 3000" in lines
    assert "EXPOSE 3001" in lines
    users = [line for line in lines if line.startswith("USER ")]
    assert users[-1] == "USER bentoml"
    # deploy/bento/setup.sh runs as root, before the switch to the runtime user.
    setup = next(
        index for index, line in enumerate(lines) if line.startswith("RUN chmod +x ./env/docker/script__")
    )
    assert setup < lines.index("USER bentoml")
    for name, value in IMAGE_ENV.items():
        assert f"ARG {name}={value}" in lines


def test_the_setup_script_makes_the_state_directory_for_the_runtime_user(bento: Path) -> None:
    [script] = (bento / "env" / "docker").glob("script__*")
    assert script.read_text() == (PROJECT_ROOT / "deploy" / "bento" / "setup.sh").read_text()
    assert os.access(PROJECT_ROOT / "deploy" / "bento" / "setup.sh", os.X_OK)
    text = script.read_text()
    for folder in ("predictions", "reports", "workspace", "mlflow"):
        assert f'"$STATE/{folder}"' in text
    assert 'chown -R bentoml:bentoml "$STATE"' in text
