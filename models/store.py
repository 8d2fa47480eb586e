"""Export to and load from the BentoML model store.

A stored model is a folder in the store holding the fitted pipeline, the feature schema, the reference set
(training rows with the model's predictions, for drift reports) and the held-out rows it was scored on (for
the promotion gate; MLflow keeps the same rows with the run); its labels and metadata carry the
MLflow lineage, so `bentoml models get NAME:latest` shows where it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import joblib
import numpy as np
import pandas as pd
from bentoml.exceptions import BentoMLException, NotFound

if TYPE_CHECKING:  # imported by joblib with the model; see split() in models/data.py
    from sklearn.pipeline import Pipeline

from models.data import Task
from models.errors import InputError, first_line
from models.limits import finite_limits
from models.predict import Predictions, predict
from models.schema import FeatureKind, FeatureSchema

PIPELINE_FILE = "pipeline.joblib"
SCHEMA_FILE = "feature_schema.json"
REFERENCE_FILE = "reference.parquet"
HOLDOUT_FILE = "holdout.parquet"
# The pipeline as ONNX, for Triton or KServe (models/onnx_export.py): kept only where it was proven equal to
# scikit-learn at training; the store metadata's `onnx` says whether and why.
ONNX_FILE = "model.onnx"
# A model folder's labels and metadata, for a folder outside the store (write_folder, save_folder).
INFO_FILE = "bentoml_model.json"
# What a model needs to be served (models saved before their held-out rows were kept have no HOLDOUT_FILE).
SERVED_FILES = (PIPELINE_FILE, SCHEMA_FILE, REFERENCE_FILE)
# Reserved column names in the reference set, beside the feature columns.
TARGET_COLUMN = "_target"
PREDICTION_COLUMN = "_prediction"
PROBABILITY_PREFIX = "_proba_"
# Metadata key of the files' SHA-256 digests: a damaged or missing file is found when the model is opened,
# in `bentoml serve`'s main process, instead of crash-looping every worker that unpickles it.
FILE_DIGESTS = "file_digests"


def check_writable(bentoml_home: Path) -> None:
    """Fail before training, not after, when the store cannot take a model."""
    models_dir = bentoml_home / "models"
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=models_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InputError(f"BentoML store at {bentoml_home} is not writable: {exc.strerror or exc}") from None


def reference_set(
    pipeline: Pipeline, schema: FeatureSchema, X: pd.DataFrame, y: pd.Series, task: Task, rows: int, seed: int
) -> pd.DataFrame:
    """A seeded sample of training rows in prepared form, with the true target and the model's predictions."""
    sample = X.sample(n=min(rows, len(X)), random_state=seed)
    prepared = schema.prepare(sample).reset_index(drop=True)
    result = predict(pipeline, prepared, task)
    extra = {TARGET_COLUMN: y.loc[sample.index].to_numpy(), PREDICTION_COLUMN: result.labels}
    if result.probabilities is not None and result.classes is not None:
        for index, label in enumerate(result.classes):
            extra[f"{PROBABILITY_PREFIX}{label}"] = result.probabilities[:, index]
    return pd.concat([prepared, pd.DataFrame(extra)], axis=1)


def holdout_set(X: pd.DataFrame, y: pd.Series) -> pd.DataFrame:
    """The held-out test rows as they were in the table, with their true target: what the model was scored
    on, kept with it so that the promotion gate can score later versions on them. Raw, not prepared: each
    version prepares them with its own schema (prepared booleans are 0/1 and would not read back)."""
    return X.reset_index(drop=True).assign(**{TARGET_COLUMN: y.to_numpy()})


def write_files(
    folder: Path,
    pipeline: Pipeline,
    schema: FeatureSchema,
    reference: pd.DataFrame,
    holdout: pd.DataFrame,
    onnx_model: bytes | None = None,
) -> dict[str, str]:
    """Write a model's files into `folder` (the schema with the model's input limits, and the ONNX model
    where there is one); returns their SHA-256 digests, which `open` checks."""
    schema = schema.with_limits(finite_limits(pipeline, schema, reference.head(1)))
    joblib.dump(pipeline, folder / PIPELINE_FILE)
    (folder / SCHEMA_FILE).write_text(schema.model_dump_json(indent=2))
    reference.to_parquet(folder / REFERENCE_FILE, index=False)
    holdout.to_parquet(folder / HOLDOUT_FILE, index=False)
    files = [*SERVED_FILES, HOLDOUT_FILE]
    if onnx_model is not None:
        (folder / ONNX_FILE).write_bytes(onnx_model)
        files.append(ONNX_FILE)
    return {file: _sha256(folder / file) for file in files}


def write_folder(
    folder: Path,
    pipeline: Pipeline,
    schema: FeatureSchema,
    reference: pd.DataFrame,
    holdout: pd.DataFrame,
    labels: dict[str, str],
    metadata: dict[str, Any],
    onnx_model: bytes | None = None,
) -> None:
    """A model's files and its description (`INFO_FILE`): everything `save_folder` needs to put it into a
    BentoML store, on this machine or on another one (MLflow keeps the folder with the run)."""
    digests = write_files(folder, pipeline, schema, reference, holdout, onnx_model)
    info = {"labels": labels, "metadata": {**metadata, FILE_DIGESTS: digests}}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))


def save_folder(name: str, folder: Path) -> str:
    """Put a folder made by `write_folder` into the BentoML store as a new version of `name`."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder} is not a stored model's folder: {first_line(exc)}") from None
    with bentoml.models.create(name, labels=info["labels"], metadata=info["metadata"]) as model:
        for file in info["metadata"][FILE_DIGESTS]:
            shutil.copyfile(folder / file, model.path_of(file))
    tag = str(model.tag)
    StoredModel.open(tag)  # the copies are checked against the digests before anyone serves them
    return tag


def find_version(name: str, registered_version: str) -> StoredModel | None:
    """The newest copy of a registered version in the BentoML store, found by its labels."""
    try:
        stored = bentoml.models.list(name)
    except NotFound:  # the store holds no version of this name yet
        return None
    copies = [
        model for model in stored if model.info.labels.get("registered_version") == str(registered_version)
    ]
    if not copies:
        return None
    return StoredModel.open(str(max(copies, key=lambda model: model.creation_time).tag))


def reproduction_problem(model: StoredModel) -> str | None:
    """Why `model` does not give again the predictions stored with its reference rows when it was saved, or
    None if it does: a version whose files load but whose libraries score differently must not be served."""
    reference = model.load_reference()
    result = predict(model.pipeline, reference[model.schema.names], model.task)
    if result.probabilities is not None and result.classes is not None:
        stored = reference[[f"{PROBABILITY_PREFIX}{label}" for label in result.classes]].to_numpy()
        if not np.allclose(result.probabilities, stored, rtol=0, atol=1e-9):
            return "its reference rows' class probabilities differ from those stored with it"
        return None
    if not np.allclose(result.labels.astype(float), reference[PREDICTION_COLUMN].to_numpy(dtype=float)):
        return "its reference rows' predicted values differ from those stored with it"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredModel:
    tag: str
    name: str
    version: str
    path: Path
    labels: dict[str, str]
    metadata: dict[str, Any]
    schema: FeatureSchema

    @property
    def task(self) -> Task:
        return Task(self.metadata["task"])

    @property
    def classes(self) -> list[Any] | None:
        return self.metadata.get("classes")

    @property
    def lineage(self) -> dict[str, str]:
        """What every prediction, report and registry move names: the version, its MLflow run and its data."""
        return {
            "model": self.name,
            "version": self.version,
            "registered_version": self.labels["registered_version"],
            "mlflow_run_id": self.labels["mlflow_run_id"],
            "data_digest": str(self.metadata["dataset_digest"]),
        }

    @classmethod
    def open(cls, tag: str) -> StoredModel:
        """Read a stored model's description and check its files (cheap: no pipeline is unpickled, except
        once for a model saved before its input limits were measured)."""
        try:
            model = bentoml.models.get(tag)
        except NotFound:
            home = os.environ.get("BENTOML_HOME", "~/bentoml")
            raise InputError(
                f"no model '{tag}' in the BentoML store at {home}: train one with `python train.py`"
            ) from None
        except (BentoMLException, OSError, ValueError) as exc:
            raise InputError(
                f"model '{tag}' in the BentoML store cannot be read: {first_line(exc)}"
            ) from None
        path = Path(model.path)
        metadata = dict(model.info.metadata)
        digests: dict[str, str] | None = metadata.get(FILE_DIGESTS)  # type: ignore[assignment]
        _check_files(str(model.tag), path, digests)
        try:
            schema = FeatureSchema.model_validate(json.loads((path / SCHEMA_FILE).read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"model '{model.tag}': {SCHEMA_FILE} cannot be read: {first_line(exc)}"
            ) from None
        stored = cls(
            tag=str(model.tag),
            name=model.tag.name,
            version=str(model.tag.version),
            path=path,
            labels=dict(model.info.labels),
            metadata=metadata,
            schema=schema,
        )
        if any(f.limit is None for f in schema.features if f.kind is FeatureKind.NUMERIC):
            limits = finite_limits(stored.pipeline, schema, stored.load_reference().head(1))
            stored = dataclasses.replace(stored, schema=schema.with_limits(limits))
        return stored

    @cached_property
    def pipeline(self) -> Pipeline:
        """The fitted pipeline, unpickled on first use."""
        try:
            pipeline: Pipeline = joblib.load(self.path / PIPELINE_FILE)
        except Exception as exc:  # unpickling a damaged file raises almost anything
            raise InputError(
                f"model '{self.tag}': {PIPELINE_FILE} cannot be loaded: {first_line(exc)}"
            ) from None
        return pipeline

    def load_reference(self) -> pd.DataFrame:
        """The reference rows as `reference_set` made them. Parquet gives a missing category back as None,
        where the model was given NaN: its imputer takes only NaN for missing, so None would be scored as
        one more category (and a version of a model with categories never reproduced its predictions)."""
        reference = pd.read_parquet(self.path / REFERENCE_FILE)
        for name in self.schema.names_of(FeatureKind.CATEGORICAL):
            reference[name] = reference[name].astype(object).where(reference[name].notna(), np.nan)
        return reference

    def load_holdout(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / HOLDOUT_FILE)

    def predict(self, frame: pd.DataFrame) -> Predictions:
        return predict(self.pipeline, self.schema.prepare(frame), self.task)


def _check_files(tag: str, path: Path, digests: dict[str, str] | None) -> None:
    """Every file the model needs is there and, where the store recorded digests, unchanged."""
    expected: dict[str, str | None] = dict(digests) if digests else dict.fromkeys(SERVED_FILES)
    for file, digest in expected.items():
        if not (path / file).is_file():
            raise InputError(f"model '{tag}' is incomplete: {file} is missing from {path}")
        if digest is not None and _sha256(path / file) != digest:
            raise InputError(
                f"model '{tag}' is damaged: {file} differs from the file that was saved (SHA-256 mismatch)"
            )
