"""The benchmark's second model: a tree model on a table with categories and missing values, trained into
stores of the benchmark's own (never the user's).

    .venv/bin/python -m loadtests.tree_model STORES   # what `make bench` runs (~30 s); prints the model's tag

The table is examples/customers.csv, the README's example of your own data: 600 rows, 2 numbers, a boolean
and a category, each with missing values, 3 classes. It is trained as `python train.py --data
examples/customers.csv --target segment --drop customer_id --estimator hist_gradient_boosting` trains it:
HistGradientBoosting the only candidate, since the default model is linear (cross-validation picks logistic
regression on breast cancer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models.model import ModelStore

from models.data import Table, load_table
from models.store import StoredModel
from settings import PROJECT_ROOT, get_settings

DATA = PROJECT_ROOT / "examples" / "customers.csv"
TARGET = "segment"
DROP = ("customer_id",)
NAME = "customers"
ESTIMATOR = "hist_gradient_boosting"


def table() -> Table:
    return load_table(DATA, TARGET, list(DROP))


def stores_env(stores: Path) -> dict[str, str]:
    """The environment that points training and the service at `stores`. MLflow's URI is set as well: the
    benchmark's own process exported the user's (Settings.export_tool_environment), which its children
    inherit and which would win over TABSERVE_DATA_DIR."""
    data = stores / "data"
    return {
        "TABSERVE_DATA_DIR": str(data),
        "BENTOML_HOME": str(stores / "bentoml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{data.resolve() / 'mlflow.db'}",
    }


def train_into(stores: Path, output: Path) -> str:
    """Train in a child process, with `stores` as its stores; its output goes to `output`. Returns the
    BentoML tag of the model."""
    with output.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "loadtests.tree_model", str(stores)],
            cwd=PROJECT_ROOT,
            env={**os.environ, **stores_env(stores)},
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            check=False,
        )
    if done.returncode:
        raise RuntimeError(f"training the tree model failed ({done.returncode}); see {output}")
    return done.stdout.strip().splitlines()[-1]


def open_model(stores: Path, tag: str) -> StoredModel:
    """The model in `stores`, read in this process, whose BentoML store is the user's: BentoML fixes its
    store at first use, so the benchmark's own is passed in for this one read. Its files are read from the
    model's folder afterwards, wherever the process's store is."""
    with BentoMLContainer.model_store.patch(ModelStore(str(stores / "bentoml" / "models"))):
        return StoredModel.open(tag)


def main(stores: Annotated[Path, typer.Argument(help="folder of the MLflow and BentoML stores")]) -> None:
    """Train the tree model into STORES; print its BentoML tag last."""
    # Imported here: training imports MLflow's logging and plotting, which the benchmark's own process,
    # importing this module for the functions above, never needs.
    from models import training  # noqa: PLC0415

    settings = get_settings()
    if settings.bentoml_home.resolve() != (stores / "bentoml").resolve():
        raise typer.BadParameter(f"run with the environment of {stores} (tree_model.stores_env)")
    options = training.TrainingOptions(
        data=DATA, target=TARGET, name=NAME, drop=DROP, estimators=(ESTIMATOR,)
    )
    result = training.train(options, settings, progress=lambda line: print(line, file=sys.stderr))
    if result.bento_tag is None:  # empty stores: the first version is always champion
        raise SystemExit(f"the tree model was not saved to the BentoML store: {result.decision.reason}")
    print(result.bento_tag)


if __name__ == "__main__":
    typer.run(main)
