"""The prediction-log reader alone: rotation, rough edges of a live log, versions, windows and sampling."""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest

from drift.logs import LogTarget, Window, find_log_files, log_records, parse_window, read_log
from models.errors import InputError
from models.schema import Feature, FeatureKind, FeatureSchema
from serving.arrowlog import LINEAGE_KEYS, AnsweredRequest, LogColumns

SCHEMA = FeatureSchema(
    features=[
        Feature(name="x", kind=FeatureKind.NUMERIC, dtype="float64", nullable=False, minimum=0, maximum=10),
        Feature(name="flag", kind=FeatureKind.BOOLEAN, dtype="bool", nullable=False),
        Feature(name="city", kind=FeatureKind.CATEGORICAL, dtype="object", nullable=True, categories=["a"]),
        Feature(name="y", kind=FeatureKind.NUMERIC, dtype="float64", nullable=True, minimum=0, maximum=1),
    ]
)
TARGET = LogTarget(model="m", version="v1", schema=SCHEMA, classes=["no", "yes"])
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
EVERYTHING = Window()


def record(row: int, **changes: Any) -> dict[str, Any]:
    base = {
        "ts": (NOW - timedelta(minutes=row)).isoformat(),
        "model": "m",
        "version": "v1",
        "features": {"x": float(row), "flag": row % 2 == 0, "city": "a", "y": 0.5},
        "prediction": "yes",
        "probabilities": {"no": 0.25, "yes": 0.75},
    }
    return {**base, **changes}


def write(path: Path, records: list[dict[str, Any] | bytes], newline_at_end: bool = True) -> Path:
    lines = [r if isinstance(r, bytes) else orjson.dumps(r) for r in records]
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
    return path


def write_arrow(path: Path, records: list[dict[str, Any]], batch_rows: int = 3) -> Path:
    """The records as the service writes them (serving/arrowlog.py), a batch per `batch_rows` records."""
    lineage = dict.fromkeys(LINEAGE_KEYS, "-")
    answered = [
        AnsweredRequest(
            columns=LogColumns(SCHEMA.features, TARGET.classes, {**lineage, **r, "request_id": "-"}),
            answered_at_us=int(datetime.fromisoformat(r["ts"]).timestamp() * 1e6),
            request_id=f"req-{index}",
            transport="http",
            endpoint="/predict",
            rows=np.array([[r["features"][f.name] for f in SCHEMA.features]], dtype=object),
            labels=[r["prediction"]],
            probabilities=np.array([[r["probabilities"]["no"], r["probabilities"]["yes"]]]),
            unknown_categories=[{}],
        )
        for index, r in enumerate(records)
    ]
    with path.open("wb") as sink, pa.ipc.new_stream(sink, answered[0].columns.schema) as stream:
        for start in range(0, len(answered), batch_rows):
            for request in answered[start : start + batch_rows]:
                stream.write_batch(request.columns.batch([request]))
    return path


def read(files: list[Path], window: Window = EVERYTHING, max_rows: int = 1000, seed: int = 0) -> Any:
    return read_log(files, TARGET, window, max_rows, seed)


def test_rotated_files_are_found_oldest_first_and_all_read(tmp_path: Path) -> None:
    write(tmp_path / "predictions-7.jsonl", [record(0)])
    write(tmp_path / "predictions-7.jsonl.2", [record(2)])
    write(tmp_path / "predictions-7.jsonl.10", [record(10)])
    write(tmp_path / "predictions-7.jsonl.1", [record(1)])
    write(tmp_path / "predictions-8.jsonl", [record(3)])
    (tmp_path / "notes.txt").write_text("not a log")
    (tmp_path / "predictions-7.jsonl.tmp").write_text("not a log either")
    files = find_log_files(tmp_path)
    assert [f.name for f in files] == [
        "predictions-7.jsonl.10",
        "predictions-7.jsonl.2",
        "predictions-7.jsonl.1",
        "predictions-7.jsonl",
        "predictions-8.jsonl",
    ]
    sample = read(files)
    assert sample.stats.files == 5
    assert sorted(sample.frame["x"]) == [0.0, 1.0, 2.0, 3.0, 10.0]
    assert find_log_files(tmp_path / "missing") == []


def test_a_partly_written_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    live = tmp_path / "predictions-1.jsonl"
    whole = orjson.dumps(record(0))
    write(live, [record(1), whole[: len(whole) // 2]], newline_at_end=False)
    sample = read([live])
    assert (sample.stats.seen, sample.stats.partial, sample.stats.corrupt) == (1, 1, 0)
    # A last record that is whole but has no newline yet is a row like any other.
    write(live, [record(1), record(2)], newline_at_end=False)
    assert read([live]).stats.seen == 2


def test_corrupt_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    bad: list[dict[str, Any] | bytes] = [
        b"not json at all",
        b"[1, 2, 3]",
        record(1, ts="yesterday"),
        record(2, ts=None),
        record(3, features=[1.0, 2.0]),
        record(4, features={"x": "big", "flag": True}),
        record(5, features={"x": {"nested": 1}}),
        record(6, probabilities={"yes": "likely"}),
        b"",
    ]
    path = write(tmp_path / "predictions-1.jsonl", [record(0), *bad, record(7)])
    sample = read([path])
    assert sample.stats.corrupt == len(bad)
    assert sorted(sample.frame["x"]) == [0.0, 7.0]


def test_other_models_and_versions_are_excluded_and_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "predictions-1.jsonl",
        [record(0), record(1, version="v0"), record(2, version="v0"), record(3, model="other"), record(4)],
    )
    sample = read([path])
    assert sample.stats.seen == 2
    assert sample.stats.other_versions == Counter({"m:v0": 2, "other:v1": 1})
    assert "other versions excluded: m:v0 2, other:v1 1" in sample.stats.describe()


def test_missing_features_are_nan_and_unknown_ones_ignored(tmp_path: Path) -> None:
    older = record(0, features={"x": 1.0, "flag": True})  # written before "city" and "y" existed
    newer = record(1, features={"x": 2, "flag": False, "city": "b", "y": None, "added_later": "z"})
    no_answer = record(2, prediction=None, probabilities=None)
    sample = read([write(tmp_path / "predictions-1.jsonl", [older, newer, no_answer])])
    frame = sample.frame
    assert list(frame.columns) == ["x", "flag", "city", "y", "_prediction", "_proba_no", "_proba_yes"]
    assert frame["x"].tolist() == [1.0, 2.0, 2.0]
    assert frame["flag"].tolist() == [1.0, 0.0, 1.0]  # booleans as the reference set holds them
    assert frame["city"].tolist() == [None, "b", "a"]
    assert frame["y"].isna().tolist() == [True, True, False]
    assert frame["_prediction"].tolist() == ["yes", "yes", None]
    assert frame["_proba_yes"].fillna(-1).tolist() == [0.75, 0.75, -1]
    assert sample.stats.corrupt == 0


def test_the_window_is_taken_from_each_records_timestamp(tmp_path: Path) -> None:
    naive = record(30, ts=(NOW - timedelta(minutes=30)).replace(tzinfo=None).isoformat())
    rows = [record(90), record(60), naive, record(10), record(0)]
    path = write(tmp_path / "predictions-1.jsonl", rows)
    window = Window(since=NOW - timedelta(minutes=60), until=NOW - timedelta(minutes=5))
    sample = read([path], window)
    assert sorted(sample.frame["x"]) == [10.0, 30.0, 60.0]  # since inclusive, until exclusive, naive is UTC
    assert sample.stats.outside_window == 2


def test_files_last_written_before_the_window_are_not_opened(tmp_path: Path) -> None:
    old = write(tmp_path / "predictions-1.jsonl.1", [record(600)])
    stamp = (NOW - timedelta(hours=10)).timestamp()
    os.utime(old, (stamp, stamp))
    live = write(tmp_path / "predictions-1.jsonl", [record(0)])
    sample = read([old, live], Window(since=NOW - timedelta(hours=1)))
    assert (sample.stats.files, sample.stats.files_skipped, sample.stats.seen) == (1, 1, 1)


def test_a_large_window_is_a_seeded_uniform_sample(tmp_path: Path) -> None:
    rows = 200
    path = write(tmp_path / "predictions-1.jsonl", [record(i) for i in range(rows)])
    sample = read([path], max_rows=20, seed=3)
    assert (sample.stats.seen, sample.stats.compared, len(sample.frame)) == (rows, 20, 20)
    assert sample.frame["x"].is_unique
    assert read([path], max_rows=20, seed=3).frame.equals(sample.frame)
    assert not read([path], max_rows=20, seed=4).frame.equals(sample.frame)
    # Every row has the same chance (20/200) whatever its position: count picks over many seeds.
    picks: Counter[float] = Counter()
    for seed in range(300):
        picks.update(read([path], max_rows=20, seed=seed).frame["x"])
    expected = 300 * 20 / rows  # 30 picks per row
    assert min(picks[float(i)] for i in range(rows)) > expected / 3
    assert max(picks.values()) < expected * 2.5
    first_half = sum(picks[float(i)] for i in range(rows // 2))
    assert abs(first_half / picks.total() - 0.5) < 0.03


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        ("24h", None, Window(since=NOW - timedelta(hours=24))),
        ("90m", "30s", Window(since=NOW - timedelta(minutes=90), until=NOW - timedelta(seconds=30))),
        ("all", None, Window()),
        (None, "2026-11-23T11:00", Window(until=datetime(2026, 11, 23, 11, tzinfo=UTC))),
        ("2026-11-20T00:00:00+01:00", None, Window(since=datetime(2026, 11, 19, 23, tzinfo=UTC))),
    ],
)
def test_window_options(since: str | None, until: str | None, expected: Window) -> None:
    assert parse_window(since, until, NOW) == expected


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("yesterday", None),
        ("24", None),
        ("1h", "2h"),
        (None, "5 min"),
        ("999999w", None),
        ("9" * 20 + "d", None),
    ],
)
def test_bad_window_options_are_one_line_errors(since: str | None, until: str | None) -> None:
    with pytest.raises(InputError) as caught:
        parse_window(since, until, NOW)
    assert "\n" not in str(caught.value)


def varied_records() -> list[dict[str, Any]]:
    """Rows over two hours, two versions, missing values and both booleans."""
    rows = [record(minute) for minute in range(0, 120, 3)]
    for index, row in enumerate(rows):
        if index % 5 == 0:
            row["features"] = {**row["features"], "city": None, "y": None}
        if index % 7 == 0:
            row["version"] = "v0"
        if index % 2:
            row["prediction"], row["probabilities"] = "no", {"no": 0.6, "yes": 0.4}
    return rows


def test_an_arrow_log_reads_as_the_same_json_lines_do(tmp_path: Path) -> None:
    rows = varied_records()
    window = Window(since=NOW - timedelta(minutes=90), until=NOW - timedelta(minutes=10))
    json_lines = read([write(tmp_path / "predictions-1.jsonl", rows)], window)
    arrow = read([write_arrow(tmp_path / "predictions-1.arrows", rows)], window)
    assert arrow.frame.equals(json_lines.frame)
    assert len(arrow.frame) > 10
    assert arrow.frame["city"].isna().any()
    assert (arrow.stats.seen, arrow.stats.outside_window, arrow.stats.other_versions) == (
        json_lines.stats.seen,
        json_lines.stats.outside_window,
        json_lines.stats.other_versions,
    )
    assert arrow.stats.corrupt == arrow.stats.partial == 0
    # Both formats of one worker's log, before and after an upgrade, are read together.
    both = read(find_log_files(tmp_path), window)
    assert both.stats.seen == 2 * arrow.stats.seen


def test_log_records_are_the_same_in_both_formats(tmp_path: Path) -> None:
    rows = varied_records()[:6]
    from_lines = list(log_records([write(tmp_path / "predictions-1.jsonl", rows)]))
    from_batches = list(log_records([write_arrow(tmp_path / "predictions-1.arrows", rows)]))
    for line, batch in zip(from_lines, from_batches, strict=True):
        assert {key: batch[key] for key in line} == line


def test_a_batch_cut_short_is_skipped_and_counted_and_earlier_batches_kept(tmp_path: Path) -> None:
    path = write_arrow(tmp_path / "predictions-1.arrows", [record(i) for i in range(9)], batch_rows=3)
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])  # the last batch was being written (or the disk filled up)
    sample = read([path])
    assert (sample.stats.seen, sample.stats.partial, sample.stats.corrupt) == (8, 1, 0)
    path.write_bytes(whole[:20])  # not even the schema yet
    assert (read([path]).stats.seen, read([path]).stats.partial) == (0, 1)


def test_a_batch_without_the_log_columns_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "predictions-1.arrows"
    table = pa.table({"ts": [1, 2], "model": ["m", "m"], "features": ["x", "y"], "version": ["v1", "v1"]})
    with path.open("wb") as sink, pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    sample = read([path])
    assert (sample.stats.seen, sample.stats.corrupt) == (0, 2)


def test_arrow_files_and_their_rotated_copies_are_found_with_json_lines(tmp_path: Path) -> None:
    for name in ["predictions-a.b-7.arrows", "predictions-a.b-7.arrows.2", "predictions-a.b-7.arrows.1"]:
        write_arrow(tmp_path / name, [record(0)])
    write(tmp_path / "predictions-a.b-7.jsonl.1", [record(1)])
    (tmp_path / "predictions-a.b-7.arrows.3").mkdir()  # a directory is never a log
    assert [f.name for f in find_log_files(tmp_path)] == [
        "predictions-a.b-7.arrows.2",
        "predictions-a.b-7.arrows.1",
        "predictions-a.b-7.jsonl.1",
        "predictions-a.b-7.arrows",
    ]
