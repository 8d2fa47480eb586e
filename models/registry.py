"""MLflow: the experiment, the registered model versions, their aliases, and the champion's description."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from sklearn.pipeline import Pipeline

from models import store
from models.errors import InputError, first_line
from models.store import StoredModel
from settings import Settings

logger = logging.getLogger(__name__)
# BentoML's server passes only warnings of other loggers than its own; which version serves is worth a line.
logger.setLevel(logging.INFO)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_CARD = "model_card.json"
# A run's held-out rows: an artifact (the rows) and a dataset input of this context (their digest).
HOLDOUT_ARTIFACT = "holdout.parquet"
HOLDOUT_CONTEXT = "testing"
MODEL_ARTIFACT = "model"
# Every version's BentoML store folder (models/store.py write_folder), kept with its run.
STORE_ARTIFACT = "bentoml_model"
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


def log_holdout(holdout: pd.DataFrame, name: str, source: str, target: str) -> str:
    """Keep the active run's held-out rows with it, as the rows themselves and a dataset input (digest,
    schema); returns the digest. The digest is taken from the rows as read back from the file, since a
    round trip can change the types it hashes (numpy strings come back as Python ones)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / HOLDOUT_ARTIFACT
        holdout.to_parquet(path, index=False)
        mlflow.log_artifact(str(path))
        stored = pd.read_parquet(path)
    with warnings.catch_warnings():
        # MLflow warns that a local path "can be interpreted in multiple ways"; both ways are the same source.
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(stored, source=source, targets=target, name=f"{name}-holdout")
    mlflow.log_input(dataset, context=HOLDOUT_CONTEXT)
    return dataset.digest


def load_holdout(client: MlflowClient, run_id: str) -> pd.DataFrame | str:
    """A run's held-out rows, checked against the digest recorded with the run, or why they are not there."""
    inputs = client.get_run(run_id).inputs
    recorded = [
        item.dataset.digest
        for item in (inputs.dataset_inputs if inputs else [])
        if any(tag.key == "mlflow.data.context" and tag.value == HOLDOUT_CONTEXT for tag in item.tags)
    ]
    if not recorded:
        return "its run has no held-out rows recorded (it was trained before the gate kept them)"
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=HOLDOUT_ARTIFACT, dst_path=folder
            )
        except (OSError, MlflowException) as exc:
            return f"its held-out rows cannot be read: {first_line(exc)}"
        holdout = pd.read_parquet(path)
    if from_pandas(holdout).digest != recorded[0]:
        return f"its held-out rows do not match the digest recorded with its run ({recorded[0]})"
    return holdout


def log_and_register(
    client: MlflowClient, pipeline: Pipeline, name: str, input_example: pd.DataFrame, output_example: object
) -> ModelVersion:
    """Log the pipeline to the active run (skops format) and register it as a new version of `name`."""
    # Imported here: skops builds its list of trusted types from every scikit-learn estimator on import
    # (over a second here), and the service, which imports this module, never logs a model.
    import skops.io  # noqa: PLC0415

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


def fetch_version(client: MlflowClient, name: str, version: str) -> StoredModel:
    """Registered version `version` of `name` from the BentoML store; put there first, from the folder kept
    with its MLflow run, if the store has no copy (a version that was not champion when trained, or a
    store that is not the one it was trained into, such as an image's)."""
    found = store.find_version(name, version)
    if found is not None:
        return found
    try:
        run_id = str(client.get_model_version(name, version).run_id)
    except MlflowException as exc:
        raise InputError(
            f"no version {version} of '{name}' in the MLflow registry: {first_line(exc)}"
        ) from None
    # Processes sharing a store (the workers of one service) make one copy, not one each.
    with FileLock(Path(tempfile.gettempdir()) / f"tabserve-fetch-{name}.lock", timeout=300):
        found = store.find_version(name, version)
        if found is not None:
            return found
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=STORE_ARTIFACT, dst_path=folder
                )
            except (OSError, MlflowException) as exc:
                raise InputError(
                    f"version {version} of '{name}' cannot be put into the BentoML store: its run keeps no "
                    f"store folder ({first_line(exc)}); it was trained before versions kept one"
                ) from None
            return StoredModel.open(store.save_folder(name, Path(path)))


# The versions that held the champion alias, oldest first, as a registered-model tag ("1,3,4"): every move
# of the alias (training, promote) pushes, and `rollback` pops back to the one before.
HISTORY_TAG = "champion_history"


def champion_history(client: MlflowClient, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return [version for version in tags.get(HISTORY_TAG, "").split(",") if version]


def set_champion(client: MlflowClient, name: str, version: str, history: list[str]) -> None:
    """Move the champion alias to `version` and record `history` (which ends with it) beside it."""
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))


class RegistryUnreachableError(Exception):
    """The registry did not answer (as opposed to answering that no version holds the alias)."""


def registry_client(settings: Settings) -> MlflowClient | None:
    """A client of the configured registry, or None where there is none to ask: a local SQLite store that
    was never created (MLflow would create an empty one)."""
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return MlflowClient(uri)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The registered version holding `alias`, or None if none does."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise RegistryUnreachableError(first_line(exc)) from None
    except Exception as exc:  # a store that cannot be read raises database and OS errors of every kind
        raise RegistryUnreachableError(first_line(exc)) from None


def served_model(settings: Settings) -> tuple[StoredModel, bool]:
    """The version to serve at start-up, and whether to follow the champion alias afterwards."""
    if settings.model_tag:
        logger.info("serving %s (TABSERVE_MODEL_TAG): not following the registry", settings.model_tag)
        return StoredModel.open(settings.model_tag), False
    name = settings.model_name
    client = registry_client(settings)
    if client is not None:
        try:
            version = alias_version(client, name, CHAMPION)
            if version is not None:
                model = fetch_version(client, name, version)
                logger.info("serving %s: version %s holds '%s'", model.tag, version, CHAMPION)
                return model, True
            logger.warning("no version of '%s' holds '%s' in the registry", name, CHAMPION)
        except (RegistryUnreachableError, InputError) as exc:
            logger.warning("the registry cannot give the champion of '%s': %s", name, exc)
    model = StoredModel.open(f"{name}:latest")
    logger.warning(
        "serving %s, the newest version in the BentoML store (registered version %s)",
        model.tag,
        model.labels.get("registered_version"),
    )
    return model, client is not None
