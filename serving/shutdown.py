"""Graceful shutdown under `bentoml serve`.

On SIGTERM, BentoML's process manager (circus) signals every service process at once: the API service and
the model service it calls. Each runs uvicorn, which stops accepting and drains its own requests; but the
API's requests still in flight need the model service after it has begun to exit, and gRPC (our own server
beside uvicorn) has to stop taking calls at the signal too. So both services put a step in front of
uvicorn's own SIGTERM handler: the API stops gRPC intake at once; the model service keeps answering until
no call has come in for a moment.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

Resume = Callable[[], None]  # runs the SIGTERM handler that was installed before ours (uvicorn's)


def intercept_sigterm(on_sigterm: Callable[[Resume], None]) -> None:
    """From now on, SIGTERM calls `on_sigterm(resume)` on the running event loop."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        def resume() -> None:
            if callable(previous):
                previous(signum, frame)

        loop.call_soon_threadsafe(on_sigterm, resume)

    signal.signal(signal.SIGTERM, handler)


class CallTracker:
    """When a service last worked, so that it can wait for its callers to finish before it exits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_active = time.monotonic()

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_active = time.monotonic()

    def quiet_since(self) -> float | None:
        with self._lock:
            return None if self._in_flight else self._last_active

    async def resume_when_quiet(self, resume: Resume, quiet_seconds: float, max_seconds: float) -> None:
        """`resume()` once no call has run for `quiet_seconds`, counted from now at the earliest (a caller
        may be about to call), or after `max_seconds` whatever happens."""
        signalled = time.monotonic()
        while time.monotonic() < signalled + max_seconds:
            since = self.quiet_since()
            if since is not None and time.monotonic() - max(since, signalled) >= quiet_seconds:
                break
            await asyncio.sleep(0.1)
        resume()
