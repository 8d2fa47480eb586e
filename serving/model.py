"""The model call: validated rows (schema column order) in, class probabilities or predicted values out.

Where it runs is a setting (`model_service`). By default in each API worker (`InProcessModel`): no hop
between processes, which on a small tabular model costs more than the model itself. Otherwise in BentoML's
batchable model service (service.py: `ModelRunner`), one copy of the model behind all API workers. Both
run `RowPredictor`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from mlflow import MlflowClient

from models.errors import InputError
from models.registry import fetch_version
from models.store import StoredModel
from serving.coalesce import Coalescer
from serving.metrics import serving_metrics

SWITCH_INTERVAL_SECONDS = 0.001
# The scorers, as the store metadata and /model name them (models/compiled.py Outcome).
COMPILED, SCIKIT_LEARN = "compiled", "scikit-learn"
# Versions the model service keeps loaded: during a swap, the API workers' calls name the old one and the
# new one.
KEPT_VERSIONS = 2
logger = logging.getLogger(__name__)


class RowPredictor:
    """The model call: the compiled scorer (models/compiled.py) where `planned_scorer` chooses it, else the
    scikit-learn pipeline. The compiled scorer is checked again here, in every process that loads the model,
    on the model's stored reference rows and their edge rows: a machine whose libraries compute otherwise
    than the training machine's serves with scikit-learn and says so (`scorer`, a warning)."""

    def __init__(self, model: StoredModel, compiled: bool) -> None:
        self._pipeline = model.pipeline
        self._schema = model.schema
        self._classification = model.classes is not None
        self._batch_rows = serving_metrics().batch_rows.labels(model=model.name)
        self._compiled: Callable[[np.ndarray], np.ndarray] | None = None
        self.scorer = planned_scorer(model, compiled)
        reference = model.schema.prepare(model.load_reference())
        if self.scorer["scorer"] == COMPILED:
            # Imported here: models/compiled.py imports scikit-learn, which the arbiter (it imports this
            # module with service.py) never needs; a worker has it already, with the unpickled pipeline.
            from models.compiled import prove  # noqa: PLC0415

            self._compiled, outcome = prove(self._pipeline, self._schema, reference, self._classification)
            if self._compiled is None:
                logger.warning(
                    "%s: serving with scikit-learn: the compiled scorer %s here", model.tag, outcome.reason
                )
                self.scorer = {**outcome.as_metadata(), "at_training": self.scorer}
        # Unpickle and run the model once, before the first request.
        self._predict(reference.head(1).to_numpy(dtype=object))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self._batch_rows.observe(len(rows))
        return self._predict(rows)

    def _predict(self, rows: np.ndarray) -> np.ndarray:
        if self._compiled is not None:
            return self._compiled(rows)
        frame = self._schema.frame_of_rows(rows)
        if self._classification:
            return np.asarray(self._pipeline.predict_proba(frame))
        return np.asarray(self._pipeline.predict(frame))


def planned_scorer(model: StoredModel, compiled: bool) -> dict[str, Any]:
    """What scores `model`, as /model shows it: the compiled scorer where training proved it equal to
    scikit-learn (the store metadata's `scorer`) and `compiled` (TABSERVE_COMPILED_SCORER) allows it."""
    recorded: dict[str, Any] | None = model.metadata.get("scorer")
    if recorded is None:
        return {"scorer": SCIKIT_LEARN, "reason": "no compiled scorer was proven at training"}
    if not compiled and recorded["scorer"] == COMPILED:
        return {
            "scorer": SCIKIT_LEARN,
            "reason": "turned off (TABSERVE_COMPILED_SCORER=false)",
            "at_training": recorded,
        }
    return dict(recorded)


def with_version(rows: np.ndarray, registered_version: str) -> np.ndarray:
    """Rows for the model service: the registered version to score them with, in a leading column (a
    number, so that all-numeric rows stay float64)."""
    return np.column_stack((np.full(len(rows), float(registered_version)), rows))


class VersionedPredictors:
    """The model service's models. Each row (see `with_version`) is scored with the version that the API
    worker which sent it serves: the API workers decide when to swap, and rows of two versions may share
    one batch meanwhile. A version not loaded yet is fetched (models/registry.py) on first use."""

    def __init__(self, first: StoredModel, client: MlflowClient | None, compiled: bool) -> None:
        self._name = first.name
        self._client = client
        self._compiled = compiled
        self._loaded = OrderedDict({first.labels["registered_version"]: RowPredictor(first, compiled)})
        self._loading = threading.Lock()  # BentoML runs a sync API's calls on several threads

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        versions, features = rows[:, 0], rows[:, 1:]
        distinct = np.unique(versions.astype(np.float64))
        if len(distinct) == 1:
            return self._predictor(distinct[0])(features)
        parts = {version: self._predictor(version)(features[versions == version]) for version in distinct}
        first = next(iter(parts.values()))
        outputs = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for version, part in parts.items():
            outputs[versions == version] = part
        return outputs

    def _predictor(self, version_number: float) -> RowPredictor:
        version = str(int(version_number))
        with self._loading:
            if version not in self._loaded:
                if self._client is None:
                    raise InputError(
                        f"version {version} of '{self._name}' is not loaded and no registry is set"
                    )
                self._loaded[version] = RowPredictor(
                    fetch_version(self._client, self._name, version), self._compiled
                )
                while len(self._loaded) > KEPT_VERSIONS:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(version)
            return self._loaded[version]


class InProcessModel:
    """The model in the API worker, on a thread of its own so that the event loop goes on decoding requests
    meanwhile. The requests that arrive during a call share the next one: adaptive batching without a
    timer (serving/coalesce.py). A request that cannot start within `max_wait_seconds` is refused."""

    def __init__(self, predictor: RowPredictor, max_rows: int, max_wait_seconds: float) -> None:
        # The model thread and the event loop share the GIL. At Python's default switch interval (5 ms) the
        # loop waits up to a whole model call to read the next request; at 1 ms, throughput rose ~25% here.
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        self._predictor = predictor
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tabserve-model")
        self._coalesced = Coalescer(self._run, max_rows, max_in_flight=1, max_wait_seconds=max_wait_seconds)

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        return await self._coalesced(rows)

    async def _run(self, rows: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._predictor, rows)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
