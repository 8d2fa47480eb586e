"""The API-side coalescer alone: concurrent requests share model calls, each gets its own rows back."""

from __future__ import annotations

import asyncio

import numpy as np

from serving.coalesce import Coalescer, WaitTimeoutError


class FakeModel:
    """Probabilities that identify their row (first feature), and a record of each call's size."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail = fail

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(len(rows))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if self.fail:
            raise RuntimeError("model service unavailable")
        return np.column_stack([rows[:, 0], -rows[:, 0]])


def requests(count: int, rows_each: int = 1) -> list[np.ndarray]:
    return [np.full((rows_each, 3), float(i)) for i in range(count)]


def test_concurrent_requests_share_calls_and_get_their_own_rows() -> None:
    model = FakeModel()
    coalescer = Coalescer(model, max_rows=64, max_in_flight=2)

    async def run() -> list[np.ndarray]:
        return await asyncio.gather(*(coalescer(rows) for rows in requests(100)))

    answers = asyncio.run(run())
    assert [answer[0, 0] for answer in answers] == [float(i) for i in range(100)]
    assert all(answer.shape == (1, 2) for answer in answers)
    assert sum(model.calls) == 100
    assert len(model.calls) < 10, model.calls
    assert max(model.calls) <= 64
    assert model.most_in_flight <= 2


def test_a_lone_request_is_sent_at_once_and_multi_row_requests_stay_whole() -> None:
    model = FakeModel()
    coalescer = Coalescer(model, max_rows=10)

    async def run() -> list[np.ndarray]:
        first = await coalescer(requests(1, rows_each=3)[0])
        rest = await asyncio.gather(*(coalescer(rows) for rows in requests(5, rows_each=4)))
        return [first, *rest]

    answers = asyncio.run(run())
    assert model.calls[0] == 3
    assert [len(answer) for answer in answers] == [3, 4, 4, 4, 4, 4]
    assert all(size <= 10 for size in model.calls)


def test_a_shared_error_fails_each_request_of_the_call_without_retries_and_the_next_calls_go_on() -> None:
    model = FakeModel(fail=True)
    coalescer = Coalescer(model, max_rows=64, shared_errors=(RuntimeError,))

    async def run() -> tuple[list[object], np.ndarray]:
        failed = await asyncio.gather(*(coalescer(rows) for rows in requests(20)), return_exceptions=True)
        calls = len(model.calls)
        model.fail = False
        return [*failed, calls], await coalescer(requests(1)[0])

    [*failed, calls], answer = asyncio.run(run())
    assert all(isinstance(outcome, RuntimeError) for outcome in failed)
    assert calls < 20, model.calls  # merged calls, none retried alone: retries would add to an overload
    assert answer.shape == (1, 2)


class PoisonedModel(FakeModel):
    """Fails every call that holds a row whose first feature is POISON, as scikit-learn fails a whole call
    on one row it cannot take."""

    POISON = 13.0

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        outputs = await super().__call__(rows)
        if (rows[:, 0] == self.POISON).any():
            raise ValueError("Input X contains infinity or a value too large for dtype('float64')")
        return outputs


def test_one_requests_bad_rows_fail_only_that_request_in_a_shared_call() -> None:
    model = PoisonedModel()
    coalescer = Coalescer(model, max_rows=64, max_in_flight=1)

    async def run() -> list[object]:
        return await asyncio.gather(*(coalescer(rows) for rows in requests(40)), return_exceptions=True)

    outcomes = asyncio.run(run())
    assert isinstance(outcomes[13], ValueError)
    answered = [outcome for i, outcome in enumerate(outcomes) if i != 13]
    assert all(isinstance(outcome, np.ndarray) for outcome in answered), outcomes
    assert [answer[0, 0] for answer in answered] == [float(i) for i in range(40) if i != 13]  # type: ignore[index]
    assert max(model.calls) > 1  # the poisoned request did share a call with others


def test_requests_that_wait_past_the_deadline_are_shed_and_the_rest_are_answered() -> None:
    model = FakeModel()  # each call takes 10 ms
    coalescer = Coalescer(model, max_rows=4, max_in_flight=1, max_wait_seconds=0.025)

    async def run() -> list[object]:
        return await asyncio.gather(*(coalescer(rows) for rows in requests(40)), return_exceptions=True)

    outcomes = asyncio.run(run())
    answered = [outcome for outcome in outcomes if isinstance(outcome, np.ndarray)]
    shed = [outcome for outcome in outcomes if isinstance(outcome, WaitTimeoutError)]
    assert len(answered) + len(shed) == 40
    # The first calls (4 rows each, 10 ms) start within the deadline; the requests still queued after it
    # are refused at once instead of waiting for a model that is too far behind.
    assert 4 <= len(answered) < 40, model.calls
    assert shed
    assert "0.025 s" in str(shed[0])
    assert [answer[0, 0] for answer in answered] == [float(i) for i in range(len(answered))]
    assert sum(model.calls) == len(answered)
