"""MLServer baseline: its own virtual environment, and the model exported in MLServer's layout.

MLServer's pins conflict with the project's, so it lives in `loadtests/.mlserver-venv` (git-ignored),
created from PyPI on first use. The pipeline is the same fitted object as the service's, loaded by the
same scikit-learn, NumPy, pandas and joblib versions (pinned to the project's), so it predicts the same.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import pandas as pd
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from models.store import StoredModel

VENV = Path(__file__).resolve().parent / ".mlserver-venv"
MLSERVER = VENV / "bin" / "mlserver"
# uvloop 0.21.0: newer releases kill MLServer 1.7.1's inference workers ("There is no current event loop").
MLSERVER_PINS = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"]
SAME_AS_PROJECT = ["scikit-learn", "numpy", "pandas", "joblib"]
# Adaptive batching as the benchmark's brief sets it: up to 64 requests, waiting at most 10 ms.
MAX_BATCH_SIZE = 64
MAX_BATCH_TIME = 0.01


def requirements() -> list[str]:
    return MLSERVER_PINS + [f"{name}=={importlib.metadata.version(name)}" for name in SAME_AS_PROJECT]


def installed() -> bool:
    marker = VENV / "requirements.txt"
    return MLSERVER.exists() and marker.exists() and marker.read_text() == _marker()


def ensure_venv(log: Path) -> Path:
    """The `mlserver` executable, installing it first if the venv is missing or has other pins."""
    if installed():
        return MLSERVER
    shutil.rmtree(VENV, ignore_errors=True)
    uv = shutil.which("uv")
    # The system CA store: PyPI may sit behind a TLS-intercepting proxy (as the Makefile assumes).
    env = {**os.environ, "UV_NATIVE_TLS": os.environ.get("UV_NATIVE_TLS", "1")}
    # Bytecode compiled at install, as `make setup` does for the project: where PYTHONDONTWRITEBYTECODE is
    # set, every start would otherwise compile MLServer's imports again (and count it as start-up time).
    if uv:
        python = str(VENV / "bin" / "python")
        steps = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(VENV)],
            [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", python, *requirements()],
        ]
    else:  # pip compiles bytecode by default
        steps = [
            [sys.executable, "-m", "venv", str(VENV)],
            [str(VENV / "bin" / "pip"), "install", "--quiet", *requirements()],
        ]
    with log.open("w") as sink:
        for step in steps:
            if subprocess.run(step, stdout=sink, stderr=subprocess.STDOUT, env=env, check=False).returncode:
                raise RuntimeError(f"installing MLServer failed ({' '.join(step[:3])} ...); see {log}")
    (VENV / "requirements.txt").write_text(_marker())
    return MLSERVER


def _marker() -> str:
    """What the venv was built from; any change (a pin, the install options) rebuilds it."""
    return "\n".join([*requirements(), "# installed with bytecode compiled"])


def export_model(model: StoredModel, folder: Path, http_port: int, grpc_port: int, metrics_port: int) -> None:
    """Write MLServer's settings and a model-settings folder holding the joblib-exported pipeline.

    The pipeline selects its columns by name, so it needs a DataFrame; an OIP tensor has no column names.
    A first step names the columns of the [rows, features] array (once per batch, after MLServer's
    adaptive batching), which lets MLServer take its fastest request: one FP64 tensor.
    """
    shutil.rmtree(folder, ignore_errors=True)
    model_dir = folder / model.name
    model_dir.mkdir(parents=True)
    name_columns = FunctionTransformer(pd.DataFrame, kw_args={"columns": model.schema.names})
    joblib.dump(
        Pipeline([("name_columns", name_columns), ("pipeline", model.pipeline)]),
        model_dir / "model.joblib",
    )
    model_settings = {
        "name": model.name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_TIME,
        # The answer the other systems compute: class probabilities (MLServer's default is `predict`).
        "parameters": {
            "uri": "./model.joblib",
            "version": model.version,
            "extra": {"predict_fn": "predict_proba"},
        },
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
