"""The data stage: reading tables, deciding the task, refusing tables that cannot be trained on fairly."""

from pathlib import Path

import pandas as pd
import pytest

from models.data import Table, Task, load_default, load_table, read_table, resolve_task, split, validate
from models.errors import InputError
from tests.tables import mixed_table


def test_default_data_is_bundled_breast_cancer_with_named_classes() -> None:
    table = load_default()
    assert table.features.shape == (569, 30)
    assert set(table.target) == {"benign", "malignant"}


def test_csv_and_parquet_read_the_same(tmp_path: Path) -> None:
    frame = mixed_table(rows=50)
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    from_csv = load_table(tmp_path / "t.csv", "segment", ["customer_id"])
    from_parquet = load_table(tmp_path / "t.parquet", "segment", ["customer_id"])
    assert list(from_csv.features.columns) == ["age", "income", "city", "member"]
    assert list(from_parquet.features.columns) == list(from_csv.features.columns)
    assert from_csv.target.tolist() == from_parquet.target.tolist()


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (None, ".csv", "not found"),
        ("", ".csv", "empty"),
        ("a,b\n", ".csv", "no rows"),
        ("a,b\n1,2\n", ".xlsx", "unsupported file type"),
        ("\x00\x01garbage", ".parquet", "cannot read"),
    ],
)
def test_unreadable_files_are_named_in_one_line(
    tmp_path: Path, content: str | None, suffix: str, message: str
) -> None:
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as caught:
        read_table(path)
    assert "\n" not in str(caught.value)


def test_unknown_target_and_drop_columns_are_listed(tmp_path: Path) -> None:
    mixed_table(rows=50).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"target column 'nope' not in t.csv; columns are: age, income"):
        load_table(tmp_path / "t.csv", "nope", [])
    with pytest.raises(InputError, match=r"--drop names columns not in t.csv: ghost"):
        load_table(tmp_path / "t.csv", "segment", ["ghost"])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["a", "b", "a"], Task.CLASSIFICATION),
        ([True, False, True], Task.CLASSIFICATION),
        ([0, 1, 2, 1], Task.CLASSIFICATION),
        ([0.5, 1.25, 3.0, 2.2], Task.REGRESSION),
        (list(range(100)), Task.REGRESSION),
    ],
)
def test_auto_task_follows_the_target(values: list[object], expected: Task) -> None:
    assert resolve_task(pd.Series(values, name="y"), Task.AUTO) is expected


def test_regression_needs_a_numeric_target() -> None:
    with pytest.raises(InputError, match="needs a numeric target"):
        resolve_task(pd.Series(["a", "b"], name="y"), Task.REGRESSION)


def test_tables_that_cannot_be_split_fairly_are_refused() -> None:
    frame = mixed_table(rows=200)
    features = frame.drop(columns=["segment"])
    one_class = Table(features=features, target=pd.Series(["x"] * 200, name="y"), source="t")
    with pytest.raises(InputError, match="only one class"):
        validate(one_class, Task.CLASSIFICATION, 0.2, 5)
    tiny = Table(features=features.head(10), target=frame["segment"].head(10), source="t")
    with pytest.raises(InputError, match="too few rows"):
        validate(tiny, Task.CLASSIFICATION, 0.2, 5)
    rare = frame["segment"].copy()
    rare.iloc[:3] = "rare"
    with pytest.raises(InputError, match="'rare': 3"):
        validate(Table(features=features, target=rare, source="t"), Task.CLASSIFICATION, 0.2, 5)


def test_split_is_seeded_and_stratified() -> None:
    table = load_default()
    first, again = split(table, Task.CLASSIFICATION, 0.2, 7), split(table, Task.CLASSIFICATION, 0.2, 7)
    assert first.X_test.index.tolist() == again.X_test.index.tolist()
    share = (table.target == "malignant").mean()
    assert abs((first.y_test == "malignant").mean() - share) < 0.01
