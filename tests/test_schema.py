"""The feature schema: inferred kinds, the prepared frame, and the request model generated from it."""

import json
import math

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from models.errors import InputError
from models.schema import Feature, FeatureKind, FeatureSchema, field_names
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
    # Rows prepared already (the stored reference set read back) come out the same: booleans stayed 0/1,
    # where they once all became missing.
    pd.testing.assert_frame_equal(schema.prepare(prepared), prepared)


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


# ---- the fast records parser against the request model -----------------------------------------------------

RANGE = {"minimum": 0.0, "maximum": 1.0}
# A table with every kind, nullable and not: the parser must agree with the request model on each.
PARSER_SCHEMA = FeatureSchema(
    features=[
        Feature(name="mean radius", kind=FeatureKind.NUMERIC, dtype="float64", nullable=False, **RANGE),
        Feature(name="income", kind=FeatureKind.NUMERIC, dtype="float64", nullable=True, **RANGE),
        Feature(name="member", kind=FeatureKind.BOOLEAN, dtype="bool", nullable=False),
        Feature(name="city", kind=FeatureKind.CATEGORICAL, dtype="object", nullable=True),
    ]
)
NUMERIC_SCHEMA = FeatureSchema(
    features=[
        Feature(name=f"x {i}", kind=FeatureKind.NUMERIC, dtype="float64", nullable=i == 2, **RANGE)
        for i in range(3)
    ]
)
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=1),
)


def records_of(schema: FeatureSchema) -> st.SearchStrategy[bytes]:
    """Lists of records, a third of them valid, the others with every way to be wrong: wrong types, nulls,
    missing and unknown keys, records that are not objects, bodies that are not lists or not JSON."""
    by_kind = {
        FeatureKind.NUMERIC: st.one_of(st.integers(-(10**6), 10**6), st.floats(-1e6, 1e6)),
        FeatureKind.BOOLEAN: st.booleans(),
        FeatureKind.CATEGORICAL: st.text(max_size=4),
    }
    valid = st.fixed_dictionaries(
        {f.name: by_kind[f.kind] for f in schema.features if not f.nullable},
        optional={f.name: st.one_of(st.none(), by_kind[f.kind]) for f in schema.features if f.nullable},
    )
    noisy = st.fixed_dictionaries(
        {},
        optional={f.name: st.one_of(by_kind[f.kind], JSON_VALUES) for f in schema.features}
        | {"unknown": JSON_VALUES},
    )
    bodies = st.one_of(
        st.lists(valid, min_size=1, max_size=4),
        st.lists(st.one_of(valid, noisy, JSON_VALUES), max_size=5),
        JSON_VALUES,
    )
    # The standard library's encoder: orjson's refuses integers beyond 64 bits, which clients may send.
    encoded = bodies.map(lambda value: json.dumps(value).encode())
    return st.one_of(encoded, encoded, st.binary(max_size=8), st.just(b"[1e400]"), st.just(b'{"a": 1}'))


def pydantic_values(schema: FeatureSchema, body: bytes) -> list[tuple[object, ...]] | None:
    adapter = TypeAdapter(list[schema.request_model()])  # type: ignore[misc]
    try:
        records = adapter.validate_json(body)
    except ValidationError:
        return None
    names = field_names(schema.names)
    return [tuple(getattr(record, name) for name in names) for record in records]


@pytest.mark.parametrize("table", [PARSER_SCHEMA, NUMERIC_SCHEMA], ids=["every kind", "numbers"])
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fast_parser_accepts_only_what_the_request_model_accepts(
    table: FeatureSchema, data: st.DataObject
) -> None:
    body = data.draw(records_of(table))
    parsed = table.records_parser(max_records=3)(body)
    if parsed is None:
        return  # the request model decides
    expected = pydantic_values(table, body)
    assert expected is not None, f"the parser took a body the request model refuses: {body!r}"
    assert len(parsed.rows) <= 3
    assert [
        [None if v is None else (float(v) if type(v) is int else v) for v in row] for row in parsed.rows
    ] == [list(row) for row in expected]


@pytest.mark.parametrize("table", [PARSER_SCHEMA, NUMERIC_SCHEMA], ids=["every kind", "numbers"])
def test_the_fast_parser_takes_valid_bodies_itself(table: FeatureSchema) -> None:
    """It must be the fast path for real requests, not a parser that always defers."""
    values = {"mean radius": 14.1, "income": None, "member": True, "city": "paris"}
    record = values if table is PARSER_SCHEMA else {"x 0": 1, "x 1": 2.5, "x 2": None}
    parsed = table.records_parser(max_records=1000)(orjson.dumps([record] * 1000))
    assert parsed is not None
    assert parsed.names == table.names
    assert parsed.rows[0] == tuple(record.get(name) for name in table.names)
    partial = {
        key: value for key, value in record.items() if value is not None
    }  # nullable keys may be missing
    assert table.records_parser(max_records=1)(orjson.dumps([partial])) is not None
    assert table.records_parser(max_records=999)(orjson.dumps([record] * 1000)) is None  # too many
