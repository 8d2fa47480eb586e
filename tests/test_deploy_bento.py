"""The bento `bentoml build` makes from bentofile.yaml: what it packs, which versions it installs, which
image it describes. Built for real, as a BentoML user builds it: a plain `bentoml build` at the root of a
fresh clone (no `make`, no uv on PATH), into the session's throwaway store. The image itself is built and
run by the container smoke test (python -m deploy.container.smoke), which needs an engine."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import guide
from deploy.build import bento_path, build_bento
from deploy.container.smoke import store_env
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
    "UV_NO_CACHE": "1",
}
SOURCE_PACKAGES = ("models", "serving", "drift", "lifecycle")
DEV_ONLY = ("pytest", "ruff", "mypy", "locust", "tritonclient", "podman-compose", "kubernetes-validate", "uv")
# What only the jobs image installs (pyproject.toml's `jobs` group and what it alone pulls in).
JOBS_ONLY = ("mlflow", "evidently", "matplotlib", "apscheduler", "skl2onnx", "onnx", "onnxruntime", "plotly")
# The image's requirements: (file, its `uv export` options), as the Makefile writes them.
REQUIREMENTS = {
    "requirements.txt": ["--no-default-groups"],
    "deploy/jobs/requirements.txt": ["--no-default-groups", "--group", "jobs"],
}


def path_without_uv() -> str:
    """PATH less every directory that holds a uv, as on a fresh machine: `bentoml build` runs uv, and must
    find the project's own (pyproject.toml's dev group), not one a developer installed by hand."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(folder for folder in folders if not (Path(folder) / "uv").exists())


def git(*args: str, cwd: Path = PROJECT_ROOT, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of this repository: its commit, plus the uncommitted changes of tracked files (so that
    a change is checked before it is committed). Ignored files (.venv, data/...) are not in it."""
    clone = tmp_path_factory.mktemp("clone") / "tabserve"
    git("clone", "--quiet", str(PROJECT_ROOT), str(clone))
    changes = git("diff", "HEAD", "--binary")
    if changes:
        git("apply", "--whitespace=nowarn", cwd=clone, stdin=changes)
    return clone


@pytest.fixture(scope="module")
def bento(stores: Stores, default_model: subprocess.CompletedProcess[str], clone: Path) -> Path:
    env = stores.env(PATH=path_without_uv())
    return bento_path(env, build_bento(env, project=clone))


@pytest.fixture(scope="module")
def bento_info(bento: Path) -> dict[str, Any]:
    info: dict[str, Any] = yaml.safe_load((bento / "bento.yaml").read_text())
    return info


def test_the_guides_fresh_clone_commands_build_a_bento(clone: Path, tmp_path: Path) -> None:
    """docs/deployment.md's "seen in a fresh clone" block, run as written in a clone whose .venv is this
    one's (as after `make setup`), into a store of its own: it trains, and `bentoml build` says what the
    guide shows."""
    block = guide.block("tests/test_deploy_bento.py", "fresh-clone")
    (clone / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    env = {**store_env(tmp_path), "PATH": path_without_uv()}
    outputs = [
        subprocess.run(
            ["bash", "-e", "-c", command],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
        for command in block.commands
    ]
    [shown] = block.output
    # The guide shows one build's tag; this build has its own.
    pattern = re.escape(shown).replace(re.escape("eyrrvdxnyoyomax4"), "[a-z0-9]+")
    assert re.search(pattern, outputs[-1]), outputs[-1][-2000:]


def test_the_bento_carries_the_model_the_service_serves(stores: Stores, bento_info: dict[str, Any]) -> None:
    served = StoredModel.open("breast_cancer:latest").tag
    packed = [model["tag"] for service in bento_info["services"] for model in service["models"]]
    assert packed == [served]
    assert bento_info["service"] == "service:Tabserve"


def test_the_bento_source_is_the_service_code_and_nothing_else(bento: Path, clone: Path) -> None:
    packed = {
        path.relative_to(bento / "src").as_posix() for path in (bento / "src").rglob("*") if path.is_file()
    }
    expected = {"service.py", "settings.py", "bentofile.yaml"}  # BentoML adds the bentofile it built from
    for package in SOURCE_PACKAGES:
        expected |= {
            path.relative_to(clone).as_posix()
            for path in (clone / package).rglob("*.py")
            if "__pycache__" not in path.parts
        }
    # And the web page's files (serving/pages.py).
    expected |= {path.relative_to(clone).as_posix() for path in (clone / "serving" / "ui").rglob("*")}
    assert packed == expected
    assert "serving/oip/grpc_server.py" in packed
    assert "serving/ui/app.js" in packed
    assert "drift/__init__.py" in packed


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"] if "version" in package}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def without_header(requirements: str) -> list[str]:
    lines = requirements.splitlines()
    assert lines[0] == "# This file was autogenerated by uv via the following command:", lines[0]
    return lines[2:]


@pytest.mark.parametrize("name", REQUIREMENTS)
def test_the_committed_requirements_are_the_export_of_uv_lock(name: str) -> None:
    """bentofile.yaml installs requirements.txt, the jobs image deploy/jobs/requirements.txt: the command in
    each one's header, run now, gives the same file."""
    committed = (PROJECT_ROOT / name).read_text()
    command = shlex.split(committed.splitlines()[1].removeprefix("#"))
    assert command[:2] == ["uv", "export"], command
    assert command[-2:] == ["-o", name], command
    for option in REQUIREMENTS[name]:
        assert option in command, f"{name} is not made by `make {name}`: {command}"
    uv = Path(sys.executable).parent / "uv"  # the project's own (pyproject.toml's dev group)
    result = subprocess.run(
        [str(uv), *command[1:-2]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert without_header(result.stdout) == without_header(committed), (
        f"{name} is not uv.lock's export: run `make {name}` and commit it"
    )


def pins_of(requirements: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in requirements.splitlines():
        requirement = line.split(";")[0].strip()
        if not requirement or requirement.startswith(("#", "--")):
            continue
        name, separator, version = requirement.partition("==")
        assert separator, f"not an exact pin: {line!r}"
        pins[normalized(name)] = version.strip()
    return pins


def test_the_bento_installs_the_exact_locked_versions_of_the_service_alone(bento: Path) -> None:
    locked = {normalized(name): version for name, version in locked_versions().items()}
    pins = pins_of((bento / "env" / "python" / "requirements.txt").read_text())
    mismatched = {
        name: (version, locked.get(name)) for name, version in pins.items() if locked.get(name) != version
    }
    assert not mismatched, f"pins that differ from uv.lock (pin, lock): {mismatched}"
    for runtime in ("bentoml", "scikit-learn", "mlflow-skinny", "shap", "grpcio", "pandas", "pyarrow"):
        assert runtime in pins
    assert not [name for name in DEV_ONLY if name in pins], "dev tools in the image"
    assert not [name for name in JOBS_ONLY if name in pins], "the jobs' packages in the service image"


def test_the_jobs_image_adds_the_jobs_packages_at_the_same_versions(bento: Path) -> None:
    service = pins_of((bento / "env" / "python" / "requirements.txt").read_text())
    jobs = pins_of((PROJECT_ROOT / "deploy" / "jobs" / "requirements.txt").read_text())
    assert service.items() <= jobs.items(), "the jobs image would change a package of the service image"
    assert set(JOBS_ONLY) <= set(jobs)
    assert not [name for name in DEV_ONLY if name in jobs], "dev tools in the jobs image"


def test_the_image_installs_wheels_only(bento: Path) -> None:
    """Nothing is compiled in the image: uv refuses a package without a wheel (service.py's SERVICE_IMAGE)."""
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert "--only-binary :all:" in lines
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile


def test_the_image_is_python_slim_with_the_service_environment(bento_info: dict[str, Any]) -> None:
    image = bento_info["image"]
    assert image["base_image"] == "python:3.11-slim"
    assert {env["name"]: env["value"] for env in bento_info["envs"]} == IMAGE_ENV


def test_the_dockerfile_has_no_system_packages_exposes_both_ports_runs_as_bentoml(bento: Path) -> None:
    """The Dockerfile `bentoml containerize` builds (BentoML renders the same one into the bento)."""
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert "FROM python:3.11-slim AS base-container" in lines
    # BentoML's Debian template installs build-essential, curl and gnupg; its base-image template nothing.
    assert "apt-get" not in dockerfile
    assert "build-essential" not in dockerfile
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
