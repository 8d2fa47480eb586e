"""Load a training table, decide the task, validate the target and split off the held-out test rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pandas as pd

from models.errors import InputError, first_line

DEFAULT_SOURCE = "sklearn.datasets.load_breast_cancer"
DEFAULT_TARGET = "diagnosis"
MIN_ROWS = 30
# An integer target with at most this many distinct values is read as class labels under --task auto.
MAX_INTEGER_CLASSES = 20


class Task(StrEnum):
    AUTO = "auto"
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass(frozen=True)
class Table:
    features: pd.DataFrame
    target: pd.Series
    source: str


@dataclass(frozen=True)
class Split:
    X_train: pd.DataFrame
    X_test: pd.DataFrame
    y_train: pd.Series
    y_test: pd.Series

    def joined(self, other: Split) -> Split:
        """Both splits' training rows for training, both held-out parts held out."""
        return Split(
            X_train=pd.concat([self.X_train, other.X_train], ignore_index=True),
            X_test=pd.concat([self.X_test, other.X_test], ignore_index=True),
            y_train=pd.concat([self.y_train, other.y_train], ignore_index=True),
            y_test=pd.concat([self.y_test, other.y_test], ignore_index=True),
        )


def load_default() -> Table:
    """scikit-learn's bundled breast-cancer data (ships with the library, so it works offline)."""
    from sklearn.datasets import load_breast_cancer  # noqa: PLC0415  (see split())

    bunch = load_breast_cancer(as_frame=True)
    target = bunch.target.map(dict(enumerate(bunch.target_names))).rename(DEFAULT_TARGET)
    return Table(features=bunch.data, target=target, source=DEFAULT_SOURCE)


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"data file not found: {path}")
    if not path.is_file():
        raise InputError(f"data path is not a file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
        else:
            raise InputError(f"unsupported file type '{suffix}' for {path}: use .csv or .parquet")
    except InputError:
        raise
    except pd.errors.EmptyDataError:
        raise InputError(f"data file is empty: {path}") from None
    except Exception as exc:  # parser errors differ by format and engine; all mean the same to the user
        raise InputError(f"cannot read {path}: {first_line(exc)}") from None
    if frame.empty:
        raise InputError(f"data file has no rows: {path}")
    return frame


def load_table(path: Path, target: str, drop: list[str]) -> Table:
    frame = read_table(path)
    if target not in frame.columns:
        raise InputError(f"target column '{target}' not in {path.name}; columns are: {_names(frame.columns)}")
    unknown = [column for column in drop if column not in frame.columns]
    if unknown:
        raise InputError(f"--drop names columns not in {path.name}: {_names(unknown)}")
    features = frame.drop(columns=[target, *drop])
    if features.shape[1] == 0:
        raise InputError("no feature columns left after removing the target and --drop columns")
    return Table(features=features, target=frame[target], source=str(path.resolve()))


def resolve_task(target: pd.Series, requested: Task) -> Task:
    if requested is not Task.AUTO:
        if requested is Task.REGRESSION and not pd.api.types.is_numeric_dtype(target):
            raise InputError(f"--task regression needs a numeric target; '{target.name}' is {target.dtype}")
        return requested
    if pd.api.types.is_bool_dtype(target) or not pd.api.types.is_numeric_dtype(target):
        return Task.CLASSIFICATION
    values = target.dropna()
    is_integral = bool((values == values.round()).all())
    if is_integral and values.nunique() <= MAX_INTEGER_CLASSES:
        return Task.CLASSIFICATION
    return Task.REGRESSION


def validate(table: Table, task: Task, test_size: float, cv_folds: int) -> Table:
    """Drop rows without a target and refuse tables that cannot give a fair train/test split."""
    labelled = table.target.notna()
    features, target = table.features[labelled], table.target[labelled]
    if len(target) < MIN_ROWS:
        raise InputError(f"too few rows with a target: {len(target)} (need at least {MIN_ROWS})")
    if task is Task.CLASSIFICATION:
        counts = target.value_counts()
        if len(counts) < 2:
            raise InputError(
                f"target '{target.name}' has only one class ({counts.index[0]!r}): nothing to learn"
            )
        # Every class must reach the test split and every cross-validation fold.
        needed = max(cv_folds, 2) + max(1, round(1 / test_size))
        rare = counts[counts < needed]
        if not rare.empty:
            listed = ", ".join(f"{label!r}: {count}" for label, count in rare.items())
            raise InputError(
                f"classes with fewer than {needed} rows cannot be split and validated ({listed})"
            )
    elif target.nunique() < 2:
        raise InputError(f"target '{target.name}' is constant: nothing to learn")
    return Table(
        features=features.reset_index(drop=True), target=target.reset_index(drop=True), source=table.source
    )


def split(table: Table, task: Task, test_size: float, seed: int) -> Split:
    # Imported here, not at the top: the service imports this module for `Task` alone, and `bentoml serve`
    # reads the service before it starts the workers, so scikit-learn's import (a second) would delay it.
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    # Stratified where it can be (every class twice, and room for each in the held-out part): a validated
    # table always can; a retrain's few live rows may not.
    counts = table.target.value_counts()
    held_out = math.ceil(test_size * len(table.target))
    stratifiable = task is Task.CLASSIFICATION and counts.min() >= 2 and held_out >= len(counts)
    stratify = table.target if stratifiable else None
    X_train, X_test, y_train, y_test = train_test_split(
        table.features, table.target, test_size=test_size, random_state=seed, stratify=stratify
    )
    return Split(X_train=X_train, X_test=X_test, y_train=y_train, y_test=y_test)


def _names(columns: object) -> str:
    names = [str(column) for column in columns]  # type: ignore[attr-defined]
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
