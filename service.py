"""The BentoML service: typed predictions from the champion model in the BentoML model store.

    bentoml serve            # http://localhost:3000, OpenAPI docs at /docs

The request schema of /predict is generated from the feature schema stored with the model, so the body is
the record itself, keyed by the training column names: {"mean radius": 14.1, ...}.
"""

from __future__ import annotations

from typing import Any

import bentoml
import pandas as pd
from pydantic import BaseModel, Field

from models.errors import InputError
from models.schema import field_names
from models.store import StoredModel
from settings import get_settings

settings = get_settings()
try:
    champion = StoredModel.open(settings.serving_tag)
except InputError as exc:
    raise SystemExit(f"error: {exc}") from None

Features = champion.schema.request_model(title=f"{champion.name} features")
COLUMN_OF_FIELD = dict(zip(field_names(champion.schema.names), champion.schema.names, strict=True))


class Prediction(BaseModel):
    prediction: str | int | float | bool = Field(description="predicted class label, or value for regression")
    probabilities: dict[str, float] | None = Field(
        None, description="probability of each class (classification)"
    )
    model: str = Field(description="model name")
    version: str = Field(description="BentoML model version")
    registered_version: str = Field(description="MLflow registered model version")
    mlflow_run_id: str
    data_digest: str = Field(description="digest of the training data (MLflow dataset digest)")


@bentoml.service(name="tabserve", traffic={"timeout": 30})
class TabularModel:
    # Declared so that `bentoml build` packs exactly this model version into the bento.
    bento_model = bentoml.models.BentoModel(champion.tag)

    def __init__(self) -> None:
        self.model = champion
        # Unpickle the pipeline and run it once now, so that the first request is not the slow one.
        self.model.predict(champion.load_reference().head(1))
        self.lineage = {
            "model": champion.name,
            "version": champion.version,
            "registered_version": champion.labels["registered_version"],
            "mlflow_run_id": champion.labels["mlflow_run_id"],
            "data_digest": champion.metadata["dataset_digest"],
        }

    @bentoml.api(route="/predict", input_spec=Features)
    def predict(self, **features: Any) -> Prediction:
        record = {COLUMN_OF_FIELD[field]: value for field, value in features.items()}
        result = self.model.predict(pd.DataFrame([record]))
        probabilities = None
        if result.probabilities is not None and result.classes is not None:
            probabilities = {
                str(label): float(p) for label, p in zip(result.classes, result.probabilities[0], strict=True)
            }
        return Prediction(
            prediction=result.labels.tolist()[0],  # tolist(): native Python types for JSON
            probabilities=probabilities,
            **self.lineage,
        )
