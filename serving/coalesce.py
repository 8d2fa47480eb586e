"""Request coalescing in the API process: the rows of concurrent requests travel to the model service in
one call.

Each call from the API service to the model service costs a few milliseconds of CPU (an HTTP round trip
and its serialization), about as much as the model itself on a small batch. BentoML's adaptive batching
merges rows only after that cost is paid, inside the model service. Here requests that arrive while calls
are in flight wait for the next call and share it: no timer, so a lone request goes at once, and under load
the batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]


class Coalescer:
    def __init__(self, call: ModelCall, max_rows: int, max_in_flight: int = 2) -> None:
        self._call = call
        self._max_rows = max_rows
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._waiting: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, future))
        self._start_calls()
        return await future

    def _start_calls(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = [self._waiting.popleft()]
            size = len(batch[0][0])
            while self._waiting and size + len(self._waiting[0][0]) <= self._max_rows:
                batch.append(self._waiting.popleft())
                size += len(batch[-1][0])
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)  # a task nobody references may be garbage-collected mid-flight
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            outputs = np.asarray(await self._call(np.concatenate([rows for rows, _ in batch])))
        except Exception as error:  # every request of the call gets the call's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        else:
            offsets = np.cumsum([len(rows) for rows, _ in batch])[:-1]
            for (_, future), part in zip(batch, np.split(outputs, offsets), strict=True):
                if not future.done():  # the request may have been cancelled meanwhile
                    future.set_result(part)
        finally:
            self._in_flight -= 1
            self._start_calls()
