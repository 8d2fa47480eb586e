"""Explanations in an API worker (models/explain.py computes them): off the event loop, on a thread of the
worker's own, never the model thread, so that plain predictions never wait behind an explanation; with a
bound on the rows waiting for that thread, so that a flood of explanations is refused (503, Retry-After)
instead of queueing without end.

Each served version has its `VersionExplainer` (held by its data plane, swapped with it when the service
follows the champion): the answer's explanation and prediction always come from the same version. Its
explainer is built at the version's first explanation, on the explain thread: start-up and swaps never
wait for shap (two seconds to import) or for the pipeline (with TABSERVE_MODEL_SERVICE the API worker
loads it only then).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from models.explain import Explainer, ExplainerOptions, Explanations
from models.store import StoredModel
from serving.errors import ServingError, UnavailableError

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

LONGEST_RETRY_AFTER = 30
# Weight of the latest call in the measured seconds per explained row.
SMOOTHING = 0.2

Result = TypeVar("Result")


class ExplainerError(ServingError):
    """The served version cannot be explained (its explainer failed to build): 500, named."""


class ExplainThread:
    """One per API worker, shared by the versions it serves: the thread explanations run on, and the rows
    waiting for it. The bound is checked on the event loop; not thread-safe."""

    def __init__(self, max_queue_rows: int) -> None:
        self.max_queue_rows = max_queue_rows
        self.queued_rows = 0  # admitted, not finished: waiting for the thread or on it
        self.seconds_per_row: float | None = None  # measured on the thread, builds left out
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tabserve-explain")

    @contextmanager
    def place(self, rows: int) -> Iterator[None]:
        """Room for `rows` until the block ends, or UnavailableError (503) when the queue is full. A request
        finds room in an empty queue whatever its size (the records limit bounds it)."""
        if self.queued_rows and self.queued_rows + rows > self.max_queue_rows:
            wait = self.queued_rows * (self.seconds_per_row or 0.0)
            retry_after = min(LONGEST_RETRY_AFTER, max(1, math.ceil(wait)))
            raise UnavailableError(
                f"too many explanations waiting in this worker ({self.queued_rows} rows, at most "
                f"{self.max_queue_rows}); retry later",
                "explain_queue_full",
                retry_after,
            )
        self.queued_rows += rows
        try:
            yield
        finally:
            self.queued_rows -= rows

    async def run(self, function: Callable[[], Result]) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def measured(self, rows: int, seconds: float) -> None:
        """From the thread: the time `rows` took to explain (a float assignment: no lock needed)."""
        per_row = seconds / max(rows, 1)
        previous = self.seconds_per_row
        self.seconds_per_row = per_row if previous is None else previous + SMOOTHING * (per_row - previous)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class VersionExplainer:
    """A served version's explanations: its explainer, built on the explain thread at first use."""

    def __init__(
        self, model: StoredModel, thread: ExplainThread, options: ExplainerOptions, max_rows: int
    ) -> None:
        self.model = model
        self.thread = thread
        self.options = options
        self.max_rows = max_rows
        self._explainer: Explainer | None = None
        self._failure: str | None = None

    @property
    def explainer(self) -> Explainer | None:
        """The explainer once built (None before the first explanation)."""
        return self._explainer

    async def explain(self, rows: np.ndarray, class_indices: np.ndarray | None) -> Explanations:
        """Explain validated rows (schema column order) on the explain thread."""
        return await self.thread.run(lambda: self._explain(rows, class_indices))

    def _explain(self, rows: np.ndarray, class_indices: np.ndarray | None) -> Explanations:
        explainer = self._built()
        started = time.perf_counter()
        explanations = explainer.explain(self.model.schema.frame_of_rows(rows), class_indices)
        self.thread.measured(len(rows), time.perf_counter() - started)
        return explanations

    def _built(self) -> Explainer:
        """The explainer, built at the first call (on the explain thread, the only one that calls this)."""
        if self._explainer is None and self._failure is None:
            try:
                self._explainer = Explainer(
                    self.model.pipeline,
                    self.model.schema,
                    self.model.classes,
                    self.model.load_reference(),
                    self.options,
                )
            except Exception as exc:  # any failure is answered, and logged once
                self._failure = f"{type(exc).__name__}: {exc}"
                logger.exception("%s: no explainer could be built", self.model.tag)
            else:
                built = self._explainer
                logger.info(
                    "%s: %s explainer (%s) built in %.2f s%s",
                    self.model.tag,
                    built.method,
                    built.output,
                    built.build_seconds,
                    f"; fell back from {built.fallback}" if built.fallback else "",
                )
        if self._explainer is None:
            raise ExplainerError(
                f"model {self.model.tag} cannot be explained: {self._failure}", "explainer_failed"
            )
        return self._explainer
