"""The feature schema: inferred kinds, the prepared frame, and the request model generated from it."""

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from models.errors import InputError
from models.schema import FeatureKind, FeatureSchema, field_names
from tests.tables import mixed_table


@pytest.fixture
def schema() -> FeatureSchema:
    return FeatureSchema.infer(mixed_table(rows=300).drop(columns=["segment", "customer_id"]))


def test_kinds_ranges_categories_and_missing_are_learnt(schema: FeatureSchema) -> None:
    by_name = {feature.name: feature for feature in schema.features}
    assert by_name["age"].kind is FeatureKind.NUMERIC
    assert by_name["member"].kind is FeatureKind.BOOLEAN
    assert by_name["city"].kind is FeatureKind.CATEGORICAL
    assert set(by_name["city"].categories) == {"paris", "lyon", "nice", "lille"}
    assert all(feature.nullable for feature in schema.features)
    assert by_name["age"].minimum is not None
    assert by_name["age"].maximum is not None
    assert by_name["age"].minimum < by_name["age"].maximum


def test_prepare_gives_floats_and_strings_with_nan_for_missing(schema: FeatureSchema) -> None:
    raw = pd.DataFrame(
        {"city": ["paris", None], "member": [True, None], "income": [1.0, None], "age": [30, None]}
    )
    prepared = schema.prepare(raw)
    assert list(prepared.columns) == schema.names
    assert prepared["member"].tolist()[0] == 1.0
    assert math.isnan(prepared["member"].tolist()[1])
    assert prepared["city"].tolist()[0] == "paris"
    assert prepared["city"].isna().tolist() == [False, True]
    assert prepared["age"].dtype == np.float64


def test_request_model_validates_by_column_name() -> None:
    schema = FeatureSchema.infer(pd.DataFrame({"mean radius": [1.0, 2.0], "colour": ["red", "blue"]}))
    model = schema.request_model()
    record = model.model_validate({"mean radius": 3, "colour": "green"})
    assert record.model_dump(by_alias=True) == {"mean radius": 3.0, "colour": "green"}
    cases = {
        "missing": {"colour": "red"},
        "extra_forbidden": {"mean radius": 1.0, "colour": "red", "size": 2},
        "finite_number": {"mean radius": float("nan"), "colour": "red"},
        "float_type": {"mean radius": "12", "colour": "red"},
        "string_type": {"mean radius": 1.0, "colour": 7},
    }
    for error_type, body in cases.items():
        with pytest.raises(ValidationError) as caught:
            model.model_validate(body)
        assert caught.value.errors()[0]["type"] == error_type, body


def test_nullable_features_may_be_omitted(schema: FeatureSchema) -> None:
    record = schema.request_model().model_validate({"age": 40.0})
    assert record.model_dump(by_alias=True)["city"] is None


def test_field_names_are_safe_and_unique() -> None:
    assert field_names(["mean radius", "mean-radius", "class", "1st", "model_x", "json"]) == [
        "mean_radius",
        "mean_radius_2",
        "f_class",
        "f_1st",
        "f_model_x",
        "f_json",
    ]


def test_incompatibility_says_what_changed(schema: FeatureSchema) -> None:
    assert schema.incompatibility(schema) is None
    fewer = FeatureSchema(features=schema.features[1:])
    assert "missing ['age']" in str(schema.incompatibility(fewer))
    retyped = FeatureSchema.infer(
        pd.DataFrame({"age": ["old"], "income": [1.0], "city": ["x"], "member": [True]})
    )
    assert schema.incompatibility(retyped) == "feature 'age' was numeric, is now categorical"


def test_columns_that_cannot_be_features_are_refused() -> None:
    with pytest.raises(InputError, match="no values at all"):
        FeatureSchema.infer(pd.DataFrame({"empty": [None, None]}))
    with pytest.raises(InputError, match="dates or durations"):
        FeatureSchema.infer(pd.DataFrame({"when": pd.to_datetime(["2026-01-01"])}))
