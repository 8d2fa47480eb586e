"""Ground truth coming back: `POST /feedback` takes the true label (or value) of rows the service answered.

A label names its row by the answer's `request_id` and `row` (the row's index in its request, from 0; 0 for
a one-record request). Each item is checked on its own against the served model (its task, its classes) and
against the answered-request index (serving/answered.py): a bad item is refused with its reason, the others
are kept and counted. Kept labels are lines of the feedback log (serving/predlog.py), written like the
prediction log (rotated, on a thread of its own, never blocking serving, drops counted); a later label for
the same row replaces an earlier one where the log is read (`python -m drift performance`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from starlette.requests import Request
from starlette.responses import Response

from serving.answered import AnsweredIndex
from serving.dataplane import MAX_REQUEST_ID, DataPlane
from serving.metrics import ServingMetrics
from serving.predlog import JsonLinesLog
from serving.rest import JSON_REFUSALS, named_problems

ROUTE = "/feedback"
# Longer than the answered-request index takes to write a burst (about a millisecond here).
WRITE_DELAY_SECONDS = 0.2


class FeedbackItem(BaseModel):
    """The true outcome of one answered row."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, title="Feedback")

    request_id: StrictStr = Field(
        min_length=1, max_length=MAX_REQUEST_ID, description="the `request_id` of the answer"
    )
    row: StrictInt = Field(default=0, ge=0, description="the row's index in its request, from 0")
    label: StrictStr | StrictInt | StrictBool | None = Field(
        default=None, description="the true class (classification models)"
    )
    value: StrictFloat | StrictInt | None = Field(
        default=None, description="the true value (regression models)"
    )


class FeedbackDesk:
    """Checks labels against the served model and the answered requests, and writes the ones that pass."""

    def __init__(
        self,
        plane: DataPlane,
        answered: AnsweredIndex,
        log: JsonLinesLog,
        metrics: ServingMetrics,
    ) -> None:
        self._classes = plane.classes  # as strings; None for regression
        self._answered = answered
        self._log = log
        self._metrics = metrics

    async def take(self, items: list[Any]) -> tuple[int, list[dict[str, Any]]]:
        """The number of labels kept, and the refused ones: {"item": index in the body, "error": why}."""
        checked: list[FeedbackItem | RefusedLabelError] = []
        for item in items:
            try:
                checked.append(self._against_model(FeedbackItem.model_validate(item)))
            except ValidationError as error:
                checked.append(RefusedLabelError(named_problems(error), "invalid_item"))
            except RefusedLabelError as refusal:
                checked.append(refusal)
        wanted = {outcome.request_id for outcome in checked if isinstance(outcome, FeedbackItem)}
        rows_of = self._answered.rows_of(sorted(wanted))
        if len(rows_of) < len(wanted):
            # The index is written on a thread of its own: an id answered a moment ago, by another worker
            # too, may not be in it yet.
            await asyncio.sleep(WRITE_DELAY_SECONDS)
            rows_of |= self._answered.rows_of(sorted(wanted - rows_of.keys()))
        now = datetime.now(UTC).isoformat()
        lines: list[bytes] = []
        refused: list[dict[str, Any]] = []
        for index, outcome in enumerate(checked):
            if isinstance(outcome, FeedbackItem):
                problem = _unanswered(outcome, rows_of)
                if problem is None:
                    lines.append(self._line(now, outcome))
                    continue
            else:
                problem = outcome
            refused.append({"item": index, "error": problem.message})
            self._metrics.feedback.labels(outcome="rejected", reason=problem.reason).inc()
        if lines:
            self._log.write(lines)
            self._metrics.feedback.labels(outcome="accepted", reason="").inc(len(lines))
        return len(lines), refused

    def _against_model(self, item: FeedbackItem) -> FeedbackItem:
        if self._classes is not None:
            if item.value is not None:
                raise RefusedLabelError(
                    "'value' is for regression models; this model is a classifier: send 'label'"
                )
            if item.label is None:
                raise RefusedLabelError(f"'label' is required: one of {', '.join(self._classes)}")
            if str(item.label) not in self._classes:
                raise RefusedLabelError(
                    f"'label': unknown class {item.label!r}; classes: {', '.join(self._classes)}",
                    "unknown_class",
                )
        else:
            if item.label is not None:
                raise RefusedLabelError("'label' is for classifiers; this model is a regressor: send 'value'")
            if item.value is None:
                raise RefusedLabelError("'value' is required: the true value, a number")
        return item

    def _line(self, now: str, item: FeedbackItem) -> bytes:
        # `_against_model` lets through a label for a classifier, a value for a regressor, never both.
        outcome = {"label": str(item.label)} if item.value is None else {"value": float(item.value)}
        return orjson.dumps({"ts": now, "request_id": item.request_id, "row": item.row, **outcome})


class RefusedLabelError(Exception):
    """Why one label is not kept, and a short label of that for the metrics."""

    def __init__(self, message: str, reason: str = "invalid_item") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def _unanswered(item: FeedbackItem, rows_of: dict[str, int]) -> RefusedLabelError | None:
    rows = rows_of.get(item.request_id)
    if rows is None:
        return RefusedLabelError(
            f"request {item.request_id!r} was never answered here (or is older than the index keeps)",
            "unknown_request",
        )
    if item.row >= rows:
        return RefusedLabelError(
            f"'row': request {item.request_id!r} was answered with {rows} row(s); row {item.row} is not one",
            "unknown_row",
        )
    return None


def feedback_route(current_desk: Callable[[], FeedbackDesk], max_items: int) -> APIRoute:
    item_schema = FeedbackItem.model_json_schema()
    answer_schema = {
        "type": "object",
        "required": ["accepted", "rejected"],
        "properties": {
            "accepted": {"type": "integer", "description": "labels kept"},
            "rejected": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["item", "error"],
                    "properties": {"item": {"type": "integer"}, "error": {"type": "string"}},
                },
            },
            "error": {"type": "string", "description": "why nothing was kept (400 only)"},
        },
    }

    async def feedback(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _answer(415, 0, [], "the body must be JSON (Content-Type: application/json)")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            return _answer(400, 0, [], f"the body is not valid JSON: {error}")
        items = body if isinstance(body, list) else [body]
        if not items or len(items) > max_items:
            return _answer(400, 0, [], f"send 1 to {max_items} labels, got {len(items)}")
        accepted, refused = await current_desk().take(items)
        if not accepted:
            return _answer(
                400,
                0,
                refused,
                "no label was kept: "
                + "; ".join(f"item {refusal['item']}: {refusal['error']}" for refusal in refused[:5]),
            )
        return _answer(200, accepted, refused)

    json_answer = {"content": {"application/json": {"schema": answer_schema}}}
    return APIRoute(
        ROUTE,
        feedback,
        methods=["POST"],
        summary="True labels (or values) of answered rows, named by request_id and row",
        response_class=Response,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                item_schema,
                                {"type": "array", "items": item_schema, "minItems": 1, "maxItems": max_items},
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": {"description": "At least one label kept; the refused ones listed", **json_answer},
                "400": {"description": "No label kept, each refusal with its reason", **json_answer},
                "408": JSON_REFUSALS[408],  # HttpLimits too
                "413": {
                    "description": "The body is over TABSERVE_MAX_BODY_BYTES",
                    # serving/rest.py's HttpLimits answers it before this route runs, with its error body.
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}
                    },
                },
                "415": {"description": "The Content-Type is not application/json", **json_answer},
            },
        },
    )


def _answer(status: int, accepted: int, refused: list[dict[str, Any]], error: str | None = None) -> Response:
    body: dict[str, Any] = {"accepted": accepted, "rejected": refused}
    if error is not None:
        body["error"] = error
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
