"""Request coalescing in the API process: the rows of concurrent requests go to the model in one call.

A model call has a fixed cost (a scikit-learn pipeline on a DataFrame; with a separate model service also
an HTTP round trip) of a few milliseconds, as much as the model itself on a batch of dozens of rows. Here
requests that arrive while calls are in flight wait for the next call and share it: no timer, so a lone
request goes at once, and under load the batches grow by themselves. A request that has waited longer than
`max_wait_seconds` for its call is refused instead (load shedding): its client has likely given up.

One request's rows must never fail another request: when a shared call fails, each of its requests is tried
again alone, so that each gets its own answer or its own error. Errors that say nothing about the rows (an
overloaded or unreachable model, `shared_errors`) go to every request of the call without retries, which
would only add load.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import numpy as np

from serving import tracing

ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]


class Waiting(NamedTuple):
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrived: float  # time.monotonic()
    trace: tracing.WaitTrace | None  # its batch.wait span, when the request is traced


class WaitTimeoutError(Exception):
    """The request waited longer than the coalescer's `max_wait_seconds` for a model call."""


class Coalescer:
    def __init__(
        self,
        call: ModelCall,
        max_rows: int,
        max_in_flight: int = 2,
        max_wait_seconds: float | None = None,
        shared_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self._call = call
        self._shared_errors = shared_errors
        self._max_rows = max_rows
        self._max_in_flight = max_in_flight
        self._max_wait = max_wait_seconds
        self._in_flight = 0
        self._waiting: deque[Waiting] = deque()  # oldest first
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append(Waiting(rows, future, time.monotonic(), tracing.wait_started()))
        self._start_calls()
        return await future

    def _start_calls(self) -> None:
        self._shed_stale()
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = [self._waiting.popleft()]
            size = len(batch[0].rows)
            while self._waiting and size + len(self._waiting[0].rows) <= self._max_rows:
                batch.append(self._waiting.popleft())
                size += len(batch[-1].rows)
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch, tracing.batch_formed((w.trace for w in batch), size)))
            self._tasks.add(task)  # a task nobody references may be garbage-collected mid-flight
            task.add_done_callback(self._tasks.discard)

    def _shed_stale(self) -> None:
        if self._max_wait is None:
            return
        deadline = time.monotonic() - self._max_wait
        while self._waiting and self._waiting[0].arrived < deadline:
            stale = self._waiting.popleft()
            error = WaitTimeoutError(f"no model call within {self._max_wait:g} s")
            tracing.wait_ended(stale.trace, error)
            if not stale.future.done():
                stale.future.set_exception(error)

    async def _run(self, batch: list[Waiting], call_span: tracing.Span | None) -> None:
        try:
            with tracing.model_call(call_span):
                await self._answer(batch)
        finally:
            self._in_flight -= 1
            self._start_calls()

    async def _answer(self, batch: list[Waiting]) -> None:
        batch = [waiting for waiting in batch if not waiting.future.done()]  # cancelled meanwhile
        if not batch:
            return
        try:
            outputs = np.asarray(await self._call(np.concatenate([waiting.rows for waiting in batch])))
        except Exception as error:
            if len(batch) == 1 or isinstance(error, self._shared_errors):
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                return
            for waiting in batch:  # find the request whose rows failed the call
                await self._answer([waiting])
            return
        offsets = np.cumsum([len(waiting.rows) for waiting in batch])[:-1]
        for waiting, part in zip(batch, np.split(outputs, offsets), strict=True):
            if not waiting.future.done():  # the request may have been cancelled meanwhile
                waiting.future.set_result(part)
