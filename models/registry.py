"""MLflow: the experiment, the registered model versions, their aliases, and the champion's description."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from typing import Any

import mlflow
import pandas as pd
import skops.io
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from sklearn.pipeline import Pipeline

from models.errors import InputError, first_line
from settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_CARD = "model_card.json"
MODEL_ARTIFACT = "model"
# Pinned here so log_model skips MLflow's slow environment inference.
MODEL_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "pandas", "scipy")


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    card: dict[str, Any]


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store; create the experiment with its artifacts in data_dir."""
    uri = settings.tracking_uri
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    try:
        if local:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(settings.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(
                settings.mlflow_experiment, artifact_location=settings.artifact_location if local else None
            )
        )
        mlflow.set_experiment(experiment_id=experiment_id)
    except (OSError, MlflowException) as exc:
        raise InputError(f"MLflow store at {uri} is not usable: {first_line(exc)}") from None
    return client


def current_champion(client: MlflowClient, name: str) -> Champion | None:
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None  # no such registered model, or no version holds the alias yet
    card = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{MODEL_CARD}")
    return Champion(version=str(version.version), run_id=str(version.run_id), card=card)


def load_version(name: str, version: str) -> Pipeline:
    """Load a registered version to re-score it. Our own registry's models are trusted, so MLflow's
    deserialization guard is lifted for this call only."""
    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    try:
        pipeline: Pipeline = mlflow.sklearn.load_model(f"models:/{name}/{version}")
    finally:
        if previous is None:
            del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
    return pipeline


def log_and_register(
    client: MlflowClient, pipeline: Pipeline, name: str, input_example: pd.DataFrame, output_example: object
) -> ModelVersion:
    """Log the pipeline to the active run (skops format) and register it as a new version of `name`."""
    info = mlflow.sklearn.log_model(
        pipeline,
        name=MODEL_ARTIFACT,
        signature=infer_signature(input_example, output_example),
        input_example=input_example,
        pip_requirements=[f"{package}=={installed_version(package)}" for package in MODEL_REQUIREMENTS],
        serialization_format="skops",
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)),
        registered_model_name=name,
    )
    return client.get_model_version(name, str(info.registered_model_version))


def discard_version(client: MlflowClient, name: str, version: str) -> None:
    """Undo a registration whose run failed afterwards, so the registry holds nothing half-made."""
    client.delete_model_version(name, version)
    if not client.search_model_versions(f"name = '{name}'"):
        client.delete_registered_model(name)
