"""The logs alone: the prediction log (Arrow batches) and the feedback and shadow logs (JSON lines) rotate,
and failing disks never fail a prediction. Each case runs on both kinds of log, through `Log`."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest

from drift.logs import LogTarget, Window, find_log_files, log_records, read_log
from models.schema import Feature, FeatureKind, FeatureSchema
from serving.arrowlog import AnsweredRequest, ArrowLog, LogColumns
from serving.predlog import JsonLinesLog

FEATURES = [Feature(name="x", kind=FeatureKind.NUMERIC, dtype="float64", nullable=False)]
LINEAGE = {"model": "m", "version": "v1", "registered_version": "1", "mlflow_run_id": "r", "data_digest": "d"}
COLUMNS = LogColumns(FEATURES, ["no", "yes"], LINEAGE)
SCHEMA = FeatureSchema(features=FEATURES)


def answered(first: int, rows: int, columns: LogColumns = COLUMNS) -> AnsweredRequest:
    """A request whose rows carry x = their number, from `first`."""
    return AnsweredRequest(
        columns=columns,
        answered_at_us=time.time_ns() // 1000,
        request_id=f"req-{first}",
        transport="http",
        endpoint="/predict",
        rows=np.arange(first, first + rows, dtype=np.float64).reshape(-1, 1),
        labels=["yes"] * rows,
        probabilities=np.tile([0.25, 0.75], (rows, 1)),
        unknown_categories=[{}] * rows,
    )


@dataclass(frozen=True)
class Log:
    """One kind of log, as the tests drive it: rows numbered x, written a request at a time."""

    make: Callable[..., Any]
    write: Callable[[Any, int, int], None]  # log, first row, rows
    stem: str

    def files(self, directory: Path) -> list[Path]:
        return sorted(path for path in directory.glob(f"{self.stem}-*") if path.is_file())

    def logged(self, directory: Path) -> list[float]:
        """The x of every row on disk, oldest file first."""
        if self.stem == "predictions":
            return [row["features"]["x"] for row in log_records(find_log_files(directory))]
        files = sorted(
            self.files(directory), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0
        )
        return [json.loads(line)["x"] for path in files for line in path.read_text().splitlines()]


def _write_lines(log: JsonLinesLog, first: int, rows: int) -> None:
    log.write([orjson.dumps({"x": float(i), "padding": "x" * 20}) for i in range(first, first + rows)])


LOGS = {
    "arrow-predictions": Log(
        ArrowLog, lambda log, first, rows: log.write(answered(first, rows)), "predictions"
    ),
    "json-lines-feedback": Log(JsonLinesLog, _write_lines, "feedback"),
}
each_log = pytest.mark.parametrize("kind", list(LOGS.values()), ids=list(LOGS))


@each_log
def test_records_rotate_and_keep_every_later_row(kind: Log, tmp_path: Path) -> None:
    log = kind.make(tmp_path, max_bytes=3_000, backups=3)
    for request in range(100):  # five rows a request; files rotate between requests
        kind.write(log, request * 5, 5)
        time.sleep(0.001)  # a burst per request or a few: several rotations
    log.close()
    assert len(kind.files(tmp_path)) == 4  # the live file and three backups
    rows = sorted(kind.logged(tmp_path))
    assert rows[-1] == 499
    assert rows[0] > 0  # the oldest rows were rotated away
    assert rows == list(range(int(rows[0]), 500))  # and nothing in between was lost
    assert log.dropped == 0


@each_log
def test_unwritable_directory_drops_and_counts_without_raising(kind: Log, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    counted: list[int] = []
    log = kind.make(blocker / "logs", max_bytes=10_000, backups=1, on_drop=counted.append)
    assert not log.enabled
    kind.write(log, 1, 2)
    assert log.dropped == 2
    assert sum(counted) == 2


@each_log
def test_a_write_that_fails_later_is_counted_not_raised(kind: Log, tmp_path: Path) -> None:
    log = kind.make(tmp_path, max_bytes=500, backups=2)
    # Rotation renames the live file to .1; a non-empty directory there makes every rotation fail.
    backup = tmp_path / f"{log.path.name}.1"
    backup.mkdir()
    (backup / "keep").write_text("x")
    for i in range(20):
        kind.write(log, i * 10, 10)
        time.sleep(0.005)
    log.close()
    assert log.dropped > 0
    assert log.dropped < 200  # the rows before the first rotation were written
    assert len(kind.logged(tmp_path)) + log.dropped == 200  # every row is on disk or counted


@each_log
def test_a_log_directory_removed_while_serving_is_made_again_and_loses_no_later_row(
    kind: Log, tmp_path: Path
) -> None:
    directory = tmp_path / "predictions"
    log = kind.make(directory, max_bytes=1_000_000, backups=2)
    kind.write(log, 0, 1)
    deadline = time.monotonic() + 10
    while kind.logged(directory) != [0] and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer thread has opened the file and written row 0
    shutil.rmtree(directory)
    for row in range(1, 301):
        kind.write(log, row, 1)
    log.close()
    assert kind.logged(directory) == list(range(1, 301))
    assert log.dropped == 0


def test_a_restarted_worker_starts_a_new_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    """An Arrow stream is never continued: a worker with the same name (a restarted container's, whose pids
    repeat) rotates the earlier file away rather than appending a second stream to it."""
    for first in (0, 10):
        log = ArrowLog(tmp_path, max_bytes=1_000_000, backups=2)
        log.write(answered(first, 10))
        log.close()
    assert [path.name.split(".", 1)[1] for path in find_log_files(tmp_path)] == ["arrows.1", "arrows"]
    assert sorted(row["features"]["x"] for row in log_records(find_log_files(tmp_path))) == list(range(20))


def test_a_version_with_other_classes_starts_a_new_file(tmp_path: Path) -> None:
    log = ArrowLog(tmp_path, max_bytes=1_000_000, backups=3)
    log.write(answered(0, 2))
    other = LogColumns(FEATURES, ["no", "yes"], {**LINEAGE, "version": "v2"})  # same schema: same file
    log.write(answered(2, 2, other))
    three = LogColumns(FEATURES, ["no", "yes", "maybe"], {**LINEAGE, "version": "v3"})
    request = answered(4, 2, three)
    log.write(AnsweredRequest(**{**request.__dict__, "probabilities": np.tile([0.2, 0.7, 0.1], (2, 1))}))
    log.close()
    files = find_log_files(tmp_path)
    assert len(files) == 2
    versions = [sorted({row["version"] for row in log_records([path])}) for path in files]
    assert versions == [["v1", "v2"], ["v3"]]


def test_a_batch_is_the_documented_columns(tmp_path: Path) -> None:
    log = ArrowLog(tmp_path, max_bytes=1_000_000, backups=1)
    request = answered(0, 2)
    log.write(AnsweredRequest(**{**request.__dict__, "unknown_categories": [{}, {"city": "rome"}]}))
    log.close()
    with log.path.open("rb") as handle:
        table = pa.ipc.open_stream(handle).read_all()
    assert table.schema.names == [
        "ts", "request_id", "row", "transport", "endpoint", "caller", "features", "prediction",
        "probabilities", "unknown_categories", "model", "version", "registered_version", "mlflow_run_id",
        "data_digest",
    ]  # fmt: skip
    second = table.slice(1).to_pylist()[0]
    assert second["row"] == 1
    assert second["request_id"] == "req-0"
    assert second["caller"] is None  # auth off
    assert second["features"] == {"x": 1.0}
    assert second["prediction"] == "yes"
    assert second["probabilities"] == {"no": 0.25, "yes": 0.75}
    assert second["unknown_categories"] == [("city", "rome")]
    assert {key: second[key] for key in LINEAGE} == LINEAGE


def test_each_row_names_its_callers_key_and_files_from_before_the_column_are_still_read(
    tmp_path: Path,
) -> None:
    requests = [
        AnsweredRequest(**{**answered(0, 2).__dict__, "caller": "ci"}),
        answered(2, 1),  # auth off (or an open call): null
        AnsweredRequest(**{**answered(3, 1).__dict__, "caller": "ops"}),
    ]
    batch = COLUMNS.batch(requests)
    assert batch.column("caller").to_pylist() == ["ci", "ci", None, "ops"]
    # A file as versions before the column wrote it.
    older = batch.drop_columns(["caller"])
    path = tmp_path / "predictions-host-1.arrows"
    with pa.ipc.new_stream(path, older.schema) as writer:
        writer.write_batch(older)
    target = LogTarget(model="m", version="v1", schema=SCHEMA, classes=["no", "yes"])
    sample = read_log([path], target, Window(), 100)
    assert (sample.stats.seen, sample.stats.corrupt, sample.stats.partial) == (4, 0, 0)
    assert sample.frame["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert [record.get("caller") for record in log_records([path])] == [None] * 4


def test_a_full_disk_keeps_whole_batches_and_counts_the_rest(full_disk: Path) -> None:
    log = ArrowLog(full_disk, max_bytes=1_000_000, backups=2)
    for first in range(0, 20_000, 100):  # about 2 MB of rows for 64 KiB
        log.write(answered(first, 100))
        time.sleep(0.001)
    log.close()
    assert log.dropped > 0
    files = find_log_files(full_disk)
    sample = read_log(
        files, LogTarget(model="m", version="v1", schema=SCHEMA, classes=["no", "yes"]), Window(), 10**6
    )
    # Every row is on disk, whole, or counted as dropped; no batch was left half written.
    assert (sample.stats.partial, sample.stats.corrupt) == (0, 0)
    assert sample.stats.seen + log.dropped == 20_000
    assert sample.stats.seen > 0
