"""The admission decision (serving/admission.py), on a clock the test moves."""

from __future__ import annotations

import pytest

from serving.admission import WINDOW_SECONDS, Admission, OverloadedError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_until_measured_only_the_concurrency_limit_refuses_and_says_when_to_retry() -> None:
    admission = Admission(max_concurrency=3, max_queue_seconds=0.1, clock=Clock())
    places = [admission.admit("http") for _ in range(3)]
    with pytest.raises(OverloadedError) as refused:
        admission.admit("http")
    assert (refused.value.status, refused.value.reason) == (503, "max_concurrency")
    assert refused.value.headers == {"Retry-After": "1"}
    assert dict(refused.value.grpc_trailers) == {"retry-after": "1", "grpc-retry-pushback-ms": "1000"}
    with places[0]:
        pass
    with admission.admit("http"):  # a place is free again
        assert admission.in_progress == 3


def test_a_request_expected_to_take_longer_than_the_bound_is_refused() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=1000, max_queue_seconds=0.1, clock=clock)
    # Busy for a window with 10 requests in progress: about 12.5 ms per answered request.
    for _ in range(8):
        places = [admission.admit("grpc") for _ in range(10)]
        clock.now += WINDOW_SECONDS / 8
        for place in places:
            with place:
                pass
    measured = admission.seconds_per_request
    assert measured is not None
    assert WINDOW_SECONDS / 80 <= measured <= WINDOW_SECONDS / 70
    admitted = int(admission.max_queue_seconds / measured)  # each expected within the bound
    for _ in range(admitted):
        admission.admit("grpc")
    with pytest.raises(OverloadedError) as refused:
        admission.admit("grpc")
    assert refused.value.reason == "max_queue_time"
    assert "over the 100 ms bound" in refused.value.message


def test_a_worker_with_nothing_in_progress_admits_however_slow_it_measured_itself() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=10, max_queue_seconds=0.1, clock=clock)
    with admission.admit("http"):
        clock.now += 2 * WINDOW_SECONDS  # one very slow answer
    assert admission.seconds_per_request is not None
    assert admission.seconds_per_request > admission.max_queue_seconds
    with admission.admit("http"), pytest.raises(OverloadedError):
        admission.admit("http")


def test_quiet_time_is_not_counted_as_work() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=10, max_queue_seconds=1.0, clock=clock)
    for _ in range(64):
        with admission.admit("http"):
            clock.now += WINDOW_SECONDS / 64  # busy
        clock.now += 10.0  # idle between requests
    assert admission.seconds_per_request == WINDOW_SECONDS / 64


def test_a_moment_of_stall_does_not_count_once_the_worker_is_fast_again() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=1000, max_queue_seconds=0.1, clock=clock)
    with admission.admit("http"):
        clock.now += WINDOW_SECONDS  # stalled: one answer in a whole window
    for _ in range(64):
        with admission.admit("http"):
            clock.now += WINDOW_SECONDS / 64  # then 64 answers in the next
    assert admission.seconds_per_request == WINDOW_SECONDS / 64
