"""Admission control at the front of each API worker: a request the worker cannot answer in time is refused
at once (503 / UNAVAILABLE, retry after a second), before any of its work is done.

Why here and not later: under overload the queue forms in front of the model (in the event loop, decoding
requests, and in the coalescer), so a deadline checked at the model call (the coalescer's
`max_wait_seconds`) refuses a request only after the worker has spent most of its cost on it, and the
requests it accepts wait longer and longer. Refusing at admission costs a few hundred microseconds.

The decision, for every transport (the HTTP middleware in serving/rest.py and the gRPC interceptor in
serving/oip/grpc_server.py only translate it):
- at most `max_concurrency` requests in the worker, those still receiving their bodies included: a bound on
  the memory they hold whatever the load, and the only bound until the worker has measured itself;
- the expected time to answer a new request, by Little's law the requests in progress times the measured
  time per request while busy, at most `max_queue_seconds`. The time per request is measured as busy time
  (time with at least one request in progress) per answered request, so a quiet worker is not mistaken
  for a slow one (its answers per second measure its callers, not itself), and under load it includes what
  refusing costs: the bound adapts to what the worker really achieves.

A request is admitted when its head arrives (a refusal costs least then), but it is work only once its
body has arrived: a client that sends its body slowly holds a place, not the worker's time. Counted as
work from its head, one client trickling a body made the worker measure itself slower and slower (busy,
answering nothing) until it refused everyone else.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from serving.errors import UnavailableError
from serving.metrics import serving_metrics

# Busy seconds over which the time per request is measured, and how many such measures count: the best of
# them. A worker stalled for a moment (a slow call to a model service that was restarting, a machine busy
# with something else) then does not refuse for long after; a worker that is slower for good is known as
# such after MEASURES windows.
WINDOW_SECONDS = 0.5
MEASURES = 4
LONGEST_RETRY_AFTER = 30


class OverloadedError(UnavailableError):
    """Refused at admission: the worker has as much work as it can answer in time."""


class Admission:
    """One per worker process, on its event loop (HTTP and gRPC share it): not thread-safe."""

    def __init__(
        self,
        max_concurrency: int,
        max_queue_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue_seconds = max_queue_seconds
        self._clock = clock
        self.in_progress = 0  # requests whose bodies have arrived: the worker's work
        self.receiving = 0  # admitted requests whose bodies are still arriving
        self.seconds_per_request: float | None = None  # None until measured
        self._changed_at = clock()  # when `in_progress` last changed
        self._busy_seconds = 0.0  # of the current window
        self._answered = 0  # in the current window
        self._measures: deque[float] = deque(maxlen=MEASURES)  # busy seconds per answer, latest windows

    def expected_seconds(self) -> float:
        """How long a request admitted now is expected to take: zero until the worker has measured itself."""
        return (self.in_progress + 1) * (self.seconds_per_request or 0.0)

    def admit(self, transport: str) -> Place:
        """A place for one request, held until its answer is sent (`with place: ...`), whose work starts
        when its body has arrived (`place.start()`); or OverloadedError, counted, if the worker has none."""
        self._refuse_if_full(transport)
        self.receiving += 1
        return Place(self)

    def _start(self) -> None:
        self.receiving -= 1
        self._count_busy_time()
        self.in_progress += 1

    def _leave(self, started: bool) -> None:
        if not started:  # refused or abandoned before its body arrived: no work done
            self.receiving -= 1
            return
        self._count_busy_time()
        self.in_progress -= 1
        self._answered += 1
        self._measure()

    def _refuse_if_full(self, transport: str) -> None:
        if self.in_progress + self.receiving >= self.max_concurrency:
            reason = "max_concurrency"
            problem = (
                f"{self.in_progress + self.receiving} requests are in progress in this worker "
                "(the most it takes)"
            )
        elif not self.in_progress:
            # Nothing ahead of it: the request is as fast as the worker can be. (Also how a worker that
            # measured itself slow under a burst measures itself again.)
            return
        elif (expected := self.expected_seconds()) > self.max_queue_seconds:
            reason = "max_queue_time"
            problem = (
                f"a request would take about {1000 * expected:.0f} ms here, over the "
                f"{1000 * self.max_queue_seconds:.0f} ms bound"
            )
        else:
            return
        serving_metrics().shed.labels(transport=transport, reason=reason).inc()
        # The requests in progress will be answered by then: a retry is then likely to be admitted.
        retry_after = min(LONGEST_RETRY_AFTER, max(1, math.ceil(self.expected_seconds())))
        raise OverloadedError(f"the service is overloaded: {problem}; retry later", reason, retry_after)

    def _count_busy_time(self) -> None:
        now = self._clock()
        if self.in_progress:
            self._busy_seconds += now - self._changed_at
        self._changed_at = now

    def _measure(self) -> None:
        if self._busy_seconds < WINDOW_SECONDS:
            return
        self._measures.append(self._busy_seconds / self._answered)
        self.seconds_per_request = min(self._measures)
        self._busy_seconds, self._answered = 0.0, 0


class Place:
    """A request's place in a worker: its work starts once (`start`, when its body has arrived), and the
    place is left once (when the `with` block ends)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._admission._start()

    def __enter__(self) -> Place:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _error: BaseException | None, _trace: TracebackType | None
    ) -> None:
        self._admission._leave(self._started)
