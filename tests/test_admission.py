"""The admission decision (serving/admission.py), on a clock the test moves."""

from __future__ import annotations

import pytest

from serving.admission import WINDOW_SECONDS, Admission, OverloadedError, Place


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admitted(admission: Admission, transport: str) -> Place:
    """A place whose request's body has arrived: the worker's work."""
    place = admission.admit(transport)
    place.start()
    return place


def test_until_measured_only_the_concurrency_limit_refuses_and_says_when_to_retry() -> None:
    admission = Admission(max_concurrency=3, max_queue_seconds=0.1, clock=Clock())
    places = [admitted(admission, "http") for _ in range(3)]
    with pytest.raises(OverloadedError) as refused:
        admission.admit("http")
    assert (refused.value.status, refused.value.reason) == (503, "max_concurrency")
    assert refused.value.headers == {"Retry-After": "1"}
    assert dict(refused.value.grpc_trailers) == {"retry-after": "1", "grpc-retry-pushback-ms": "1000"}
    with places[0]:
        pass
    with admitted(admission, "http"):  # a place is free again
        assert admission.in_progress == 3


def test_a_request_expected_to_take_longer_than_the_bound_is_refused() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=1000, max_queue_seconds=0.1, clock=clock)
    # Busy for a window with 10 requests in progress: about 12.5 ms per answered request.
    for _ in range(8):
        places = [admitted(admission, "grpc") for _ in range(10)]
        clock.now += WINDOW_SECONDS / 8
        for place in places:
            with place:
                pass
    measured = admission.seconds_per_request
    assert measured is not None
    assert WINDOW_SECONDS / 80 <= measured <= WINDOW_SECONDS / 70
    within_bound = int(admission.max_queue_seconds / measured)  # each expected within the bound
    for _ in range(within_bound):
        admitted(admission, "grpc")
    with pytest.raises(OverloadedError) as refused:
        admission.admit("grpc")
    assert refused.value.reason == "max_queue_time"
    assert "over the 100 ms bound" in refused.value.message


def test_a_worker_with_nothing_in_progress_admits_however_slow_it_measured_itself() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=10, max_queue_seconds=0.1, clock=clock)
    with admitted(admission, "http"):
        clock.now += 2 * WINDOW_SECONDS  # one very slow answer
    assert admission.seconds_per_request is not None
    assert admission.seconds_per_request > admission.max_queue_seconds
    with admitted(admission, "http"), pytest.raises(OverloadedError):
        admission.admit("http")


def test_quiet_time_is_not_counted_as_work() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=10, max_queue_seconds=1.0, clock=clock)
    for _ in range(64):
        with admitted(admission, "http"):
            clock.now += WINDOW_SECONDS / 64  # busy
        clock.now += 10.0  # idle between requests
    assert admission.seconds_per_request == WINDOW_SECONDS / 64


def test_a_moment_of_stall_does_not_count_once_the_worker_is_fast_again() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=1000, max_queue_seconds=0.1, clock=clock)
    with admitted(admission, "http"):
        clock.now += WINDOW_SECONDS  # stalled: one answer in a whole window
    for _ in range(64):
        with admitted(admission, "http"):
            clock.now += WINDOW_SECONDS / 64  # then 64 answers in the next
    assert admission.seconds_per_request == WINDOW_SECONDS / 64


def test_a_body_still_arriving_holds_a_place_but_is_not_work() -> None:
    clock = Clock()
    admission = Admission(max_concurrency=3, max_queue_seconds=0.1, clock=clock)
    for _ in range(4):  # measured: 1/64 of a window per answer
        for _ in range(16):
            with admitted(admission, "http"):
                clock.now += WINDOW_SECONDS / 64
    measured = admission.seconds_per_request
    with admission.admit("http") as trickling:
        clock.now += 30.0  # a client sends its body for 30 s, meanwhile others are answered as fast
        for _ in range(64):
            with admitted(admission, "http"):
                clock.now += WINDOW_SECONDS / 64
        assert admission.seconds_per_request == measured
        assert (admission.in_progress, admission.receiving) == (0, 1)
        # It still counts towards the places: with two more, the worker is full.
        with admission.admit("http"), admission.admit("http"), pytest.raises(OverloadedError) as refused:
            admission.admit("http")
        assert refused.value.reason == "max_concurrency"
        trickling.start()
        assert (admission.in_progress, admission.receiving) == (1, 0)
    assert (admission.in_progress, admission.receiving) == (0, 0)
