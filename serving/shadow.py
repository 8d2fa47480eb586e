"""The shadow challenger (TABSERVE_SHADOW=true): every answered batch scored again by the version holding
the `challenger` alias, off the hot path, and logged beside the champion's answer.

The data plane hands each answered batch to `ShadowScorer.offer` after the answer is made; a share of them
(TABSERVE_SHADOW_SHARE, drawn at random) goes on to a bounded queue, which takes it, or drops and counts it
when full: the champion's answer never waits for the challenger. A task drains the queue onto a model
thread of its own, every batch waiting there in one model call (up to max_batch_rows rows): scored one
request at a time, the challenger's fixed cost per call took half of the 2 cores' throughput at 32
connections. The lines go to `<prediction log dir>/shadow-*.jsonl`, which the drift and performance readers
(drift/logs.py: `predictions-*.jsonl`) do not read as the champion's; drift/shadow.py compares the two. The
challenger follows its alias as the champion follows its own (serving/follow.py), with the same checks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from models.registry import CHALLENGER
from models.store import StoredModel
from serving.dataplane import DataPlane, PredictionBatch
from serving.follow import Follower
from serving.metrics import ServingMetrics
from serving.model import RowPredictor
from serving.predlog import JsonLinesLog
from settings import Settings

SHADOW_STEM = "shadow"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Challenger:
    model: StoredModel
    predictor: RowPredictor

    def score(self, rows: np.ndarray, columns: list[str]) -> np.ndarray:
        """`rows` in the order of `columns` (the champion's schema), reordered into the challenger's."""
        order = [columns.index(name) for name in self.model.schema.names]
        return self.predictor(rows[:, order])


class ShadowScorer:
    def __init__(
        self,
        startup: StoredModel,
        log: JsonLinesLog,
        max_batches: int,
        max_rows: int,
        share: float,
        metrics: ServingMetrics,
    ):
        self._startup = startup
        self._max_rows = max_rows
        self._share = share
        self._draw = random.Random()
        self._log = log
        self._metrics = metrics
        self._dropped = metrics.shadow_dropped
        self._queue: asyncio.Queue[tuple[np.ndarray, PredictionBatch, DataPlane]] = asyncio.Queue(max_batches)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tabserve-shadow")
        self.challenger: Challenger | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def offer(self, rows: np.ndarray, batch: PredictionBatch, plane: DataPlane) -> None:
        """Called on the event loop right after an answer is made: never waits."""
        if self.challenger is None or (self._share < 1 and self._draw.random() >= self._share):
            return
        try:
            self._queue.put_nowait((rows, batch, plane))
        except asyncio.QueueFull:
            self._dropped.inc()

    def start(self, settings: Settings) -> None:
        follower: Follower[Challenger] = Follower(
            settings,
            CHALLENGER,
            None,
            self._startup,
            lambda model: Challenger(model, RowPredictor(model, settings.compiled_scorer)),
            self._install,
            self._metrics,
        )
        self._tasks = [
            asyncio.create_task(self._follow(follower)),
            asyncio.create_task(self._drain()),
        ]

    async def _follow(self, follower: Follower[Challenger]) -> None:
        await follower.check()  # at once: there is no challenger until the first check
        await follower.run()

    def _install(self, _model: StoredModel, challenger: Challenger) -> None:
        self.challenger = challenger

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self._queue.get()]
            rows = len(waiting[0][0])
            while rows < self._max_rows and not self._queue.empty():
                waiting.append(self._queue.get_nowait())
                rows += len(waiting[-1][0])
            challenger = self.challenger
            if challenger is None:
                continue
            # Batches answered by one plane share its column order; a swap in between starts a new group.
            for plane, group in itertools.groupby(waiting, key=lambda item: item[2]):
                items = list(group)
                try:
                    outputs = await loop.run_in_executor(
                        self._thread,
                        challenger.score,
                        np.concatenate([item[0] for item in items]),
                        plane.feature_names,
                    )
                except Exception:  # the challenger failing must never reach the champion's answers
                    logger.exception("the shadow challenger %s failed on a batch", challenger.model.tag)
                    self._dropped.inc(len(items))
                    continue
                ends = np.cumsum([len(item[0]) for item in items])
                for (_rows, batch, _plane), part in zip(items, np.split(outputs, ends[:-1]), strict=True):
                    self._log.write(_lines(batch, plane, challenger.model, part))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._thread.shutdown(wait=True)
        self._log.close()


def _lines(
    batch: PredictionBatch, plane: DataPlane, challenger: StoredModel, outputs: np.ndarray
) -> list[bytes]:
    """One line per row: the request id and row (what feedback names), both versions and both answers."""
    ts = datetime.now(UTC).isoformat()
    champion = {key: plane.lineage[key] for key in ("model", "version", "registered_version")}
    shadow = {
        "model": challenger.name,
        "version": challenger.version,
        "registered_version": challenger.labels["registered_version"],
    }
    classes = challenger.classes
    lines = []
    for row, answer in enumerate(batch.answers):
        challenger_answer: dict[str, Any] = {**shadow}
        if classes is not None:
            probabilities = outputs[row]
            challenger_answer["prediction"] = classes[int(np.argmax(probabilities))]
            challenger_answer["probabilities"] = dict(
                zip(map(str, classes), probabilities.tolist(), strict=True)
            )
        else:
            challenger_answer["prediction"] = float(outputs[row])
        line = {
            "ts": ts,
            "request_id": batch.request_id,
            "row": row,
            "champion": {**champion, "prediction": answer["prediction"]},
            "challenger": challenger_answer,
        }
        lines.append(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY))
    return lines
