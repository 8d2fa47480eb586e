"""Baseline: the smallest reasonable FastAPI service of the same pipeline, for `make bench`.

    .venv/bin/uvicorn loadtests.baselines.fastapi_app:app --workers 2

Async endpoints; the pipeline loaded from the BentoML store (the tag the service serves); one
`predict_proba` per request, on the event loop: no batching, no prediction log, no metrics. Requests are
validated with the service's own request model (generated from the stored feature schema), so both
refuse the same bodies.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from fastapi import FastAPI

from models.registry import served_model
from settings import get_settings

model = served_model(get_settings())[0]
pipeline = model.pipeline  # unpickled at import, before the worker takes requests
classes = [str(label) for label in model.classes or []]
Record = model.schema.request_model(title="Record")

app = FastAPI(title="tabserve FastAPI baseline")


@app.get("/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


@app.post("/predict")
async def predict(record: Record) -> dict[str, Any]:  # type: ignore[valid-type]
    [answer] = answers([record])
    return answer


@app.post("/predict_batch")
async def predict_batch(records: list[Record]) -> list[dict[str, Any]]:  # type: ignore[valid-type]
    return answers(records)


def answers(records: list[Any]) -> list[dict[str, Any]]:
    frame = model.schema.prepare(pd.DataFrame([record.model_dump(by_alias=True) for record in records]))
    probabilities = pipeline.predict_proba(frame)
    return [
        {"prediction": classes[row.argmax()], "probabilities": dict(zip(classes, row.tolist(), strict=True))}
        for row in probabilities
    ]
