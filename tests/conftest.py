"""Shared fixtures: one pair of real, throwaway stores (MLflow SQLite + BentoML home) for the whole session.

Training runs go through the real CLI (`python train.py ...`) in a subprocess, as a user runs it; checks
read the same stores in-process. Each test that trains uses its own model name, so tests do not interfere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stores:
    data_dir: Path
    bentoml_home: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("TABSERVE_")}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update(
            TABSERVE_DATA_DIR=str(self.data_dir),
            BENTOML_HOME=str(self.bentoml_home),
            OMP_NUM_THREADS="1",
            BENTOML_DO_NOT_TRACK="true",
        )
        env.update(overrides)
        return env

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    root = tmp_path_factory.mktemp("stores")
    stores = Stores(data_dir=root / "data", bentoml_home=root / "bentoml")
    # In-process reads (bentoml.models.get, MLflow) must see the same stores as the CLI subprocesses.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in stores.env().items():
            if key not in os.environ or os.environ[key] != value:
                patch.setenv(key, value)
        for key in [key for key in os.environ if key.startswith("TABSERVE_") and key != "TABSERVE_DATA_DIR"]:
            patch.delenv(key)
        # As Settings.export_tool_environment does for the CLI and the service.
        patch.setenv("MLFLOW_TRACKING_URI", stores.tracking_uri)
        yield stores


def run_train(
    stores: Stores, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=PROJECT_ROOT,
        env=env or stores.env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}"


@pytest.fixture(scope="session")
def default_model(stores: Stores) -> subprocess.CompletedProcess[str]:
    """`python train.py` with no arguments, once per session."""
    result = run_train(stores)
    assert_ok(result)
    return result
