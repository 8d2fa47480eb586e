"""Read one model version's rows of the prediction log in a time window: streamed, with a bounded sample.

The rules (docs/drift.md states them for users):

- Files: ``predictions-<host>-<pid>.arrows`` (Arrow IPC streams, serving/arrowlog.py) or, as versions before
  it wrote them, ``predictions-<host>-<pid>.jsonl`` (JSON lines), and their rotated copies ``.1``, ``.2``,
  ... in a directory, or files named explicitly. With a window start, a file last modified before it is
  skipped unread: every record in it was written, and so time-stamped, earlier.
- Records are read a line or a record batch at a time; no file is ever held in memory whole.
- A line that is not a JSON object with an ISO-8601 ``ts`` and a ``features`` object, or whose values do
  not fit the feature types, is corrupt: skipped and counted; so are the rows of a batch without the
  columns ``ts``, ``features``, ``model`` and ``version``.
- A last line without its newline, or a last batch cut short, is still being written (or was cut by a
  crash or a full disk): skipped and counted as partial (a line that already parses as a whole record is
  kept).
- Records of other models or versions are excluded, and counted per ``model:version``.
- A feature missing from a record (or a batch) is a missing value (NaN); a feature the model does not know
  is ignored.
- The window is ``since <= ts < until`` on each record's ``ts``; a timestamp without a zone is UTC.
- A window with more rows than ``max_rows`` is sampled: a uniform random sample of exactly ``max_rows``
  rows (reservoir sampling, Vitter's algorithm R, seeded). Every row of the window has the same chance of
  being compared, whatever the order of files and lines, so the sample is a simple random sample of the
  window and the drift tests stay valid; the same files and seed give the same sample.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from models.errors import InputError
from models.schema import FeatureKind, FeatureSchema
from models.store import PREDICTION_COLUMN, PROBABILITY_PREFIX, StoredModel
from serving.arrowlog import SUFFIX as ARROW_SUFFIX

LOG_FILE = re.compile(r"^(predictions-.+)\.(?:jsonl|arrows)(?:\.(\d+))?$")  # worker, rotation
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
# A row as kept: numbers and booleans, categories, the prediction, the class probabilities.
Row = tuple[np.ndarray, tuple[str | None, ...], Any, np.ndarray]
# A row with what names it for /feedback: its request id and its index in the request (None where a line
# written before rows were numbered has none).
LoggedRow = tuple[str | None, int | None, Row]
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class Window:
    since: datetime | None = None
    until: datetime | None = None

    def contains(self, moment: datetime) -> bool:
        return (self.since is None or moment >= self.since) and (self.until is None or moment < self.until)

    def describe(self) -> str:
        since = self.since.isoformat(timespec="seconds") if self.since else "the start of the log"
        until = self.until.isoformat(timespec="seconds") if self.until else "now"
        return f"{since} to {until}"


def parse_duration(text: str, option: str) -> timedelta:
    """``30s``, ``90m``, ``24h``, ``7d``, ``2w``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise InputError(f"{option} {text!r} is not a duration like 30s, 90m, 24h, 7d")
    amount, unit = match.groups()
    try:
        return timedelta(**{_UNITS[unit]: float(amount)})
    except OverflowError:
        raise InputError(f"{option} {text!r} is too long") from None


def parse_moment(text: str, now: datetime, option: str) -> datetime:
    """A duration before `now` (see `parse_duration`) or an ISO-8601 time (UTC if it has no zone)."""
    if _DURATION.match(text.strip()):
        try:
            return now - parse_duration(text, option)
        except OverflowError:
            raise InputError(f"{option} {text!r} reaches before year 1") from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"{option} {text!r} is neither a duration like 24h, 90m, 7d nor an ISO time like 2026-11-23T10:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_window(since: str | None, until: str | None, now: datetime) -> Window:
    """`since` "all" (or None) means from the start of the log; `until` None means up to now."""
    window = Window(
        since=None if since in (None, "all") else parse_moment(str(since), now, "--since"),
        until=None if until is None else parse_moment(until, now, "--until"),
    )
    if window.since and window.until and window.since >= window.until:
        raise InputError(f"the window is empty: --since is not before --until ({window.describe()})")
    return window


def find_log_files(directory: Path) -> list[Path]:
    """Every worker's log and its rotated copies, oldest copy first."""
    if not directory.is_dir():
        return []

    found: list[tuple[str, int, Path]] = []  # by worker, then its oldest copy first
    for path in directory.iterdir():
        match = LOG_FILE.match(path.name)
        if match and path.is_file():
            found.append((match[1], -int(match[2] or 0), path))
    return [path for _, _, path in sorted(found)]


@dataclass(frozen=True)
class LogTarget:
    """Which records to keep, and how to turn them into the reference set's columns."""

    model: str
    version: str
    schema: FeatureSchema
    classes: list[str] | None  # class labels as the log writes them; None for regression

    @classmethod
    def of(cls, model: StoredModel) -> LogTarget:
        classes = [str(label) for label in model.classes] if model.classes else None
        return cls(model=model.name, version=model.version, schema=model.schema, classes=classes)

    @property
    def numeric(self) -> list[str]:
        """Numbers and booleans: both are float columns in the reference set (booleans as 0/1)."""
        return [f.name for f in self.schema.features if f.kind is not FeatureKind.CATEGORICAL]

    @property
    def categorical(self) -> list[str]:
        return self.schema.names_of(FeatureKind.CATEGORICAL)


@dataclass
class LogStats:
    files: int = 0
    files_skipped: int = 0  # last modified before the window
    lines: int = 0
    corrupt: int = 0
    partial: int = 0
    outside_window: int = 0
    other_versions: Counter[str] = field(default_factory=Counter)  # "model:version" -> rows
    seen: int = 0  # rows of the target version in the window
    compared: int = 0  # rows kept: all that were seen, or the sample

    def describe(self) -> str:
        parts = [f"{self.lines:,} records in {self.files} file(s)"]
        if self.files_skipped:
            parts.append(f"{self.files_skipped} file(s) older than the window not opened")
        if self.other_versions:
            shown = ", ".join(f"{key} {count:,}" for key, count in self.other_versions.most_common(3))
            more = len(self.other_versions) - 3
            parts.append(f"other versions excluded: {shown}" + (f" and {more} more" if more > 0 else ""))
        if self.outside_window:
            parts.append(f"outside the window: {self.outside_window:,}")
        if self.corrupt:
            parts.append(f"corrupt lines skipped: {self.corrupt:,}")
        if self.partial:
            parts.append(f"partly written lines skipped: {self.partial:,}")
        return "; ".join(parts)


@dataclass(frozen=True)
class LogSample:
    frame: pd.DataFrame  # features (schema order), the prediction, one probability column per class
    stats: LogStats


class CorruptLineError(Exception):
    pass


def read_log(
    files: Iterable[Path], target: LogTarget, window: Window, max_rows: int, seed: int = 0
) -> LogSample:
    stats = LogStats()
    rng = random.Random(seed)
    kept: list[Row] = []
    for _request_id, _index, row in rows_of_version(files, target, window, stats):
        if stats.seen <= max_rows:
            kept.append(row)
        else:  # reservoir sampling: every row of the window has the same chance to be kept
            slot = rng.randrange(stats.seen)
            if slot < max_rows:
                kept[slot] = row
    stats.compared = len(kept)
    return LogSample(frame=rows_frame(kept, target), stats=stats)


def rows_of_version(
    files: Iterable[Path], target: LogTarget, window: Window, stats: LogStats
) -> Iterator[LoggedRow]:
    """Each row of the target version in the window; counts seen and corrupt records.

    Every file is opened before any is read: a rotation during the read renames files, and an open file
    keeps its content, so no rows are read twice or missed."""
    parse = LineParser(target, window, stats)
    with ExitStack() as stack:
        handles = [stack.enter_context(h) for h in open_in_window(files, window, stats)]
        for handle in handles:
            if ARROW_SUFFIX in Path(handle.name).name:
                for logged in batch_rows(handle, target, window, stats):
                    stats.seen += 1
                    yield logged
                continue
            for line in log_lines([handle], stats):
                try:
                    parsed = parse(line)
                except CorruptLineError:
                    stats.corrupt += 1
                    continue
                if parsed is not None:
                    stats.seen += 1
                    yield parsed


def log_records(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every record of the log files as the JSON lines have them (``ts`` as an ISO-8601 string, the features,
    probabilities and unknown categories as objects), whichever format wrote them; corrupt lines and cut
    batches are skipped. For people and tests: the reports read columns (`rows_of_version`)."""
    for path in files:
        with path.open("rb") as handle:
            if ARROW_SUFFIX in path.name:
                yield from _batch_records(handle)
                continue
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


def _batch_records(handle: IO[bytes]) -> Iterator[dict[str, Any]]:
    try:
        reader = pa.ipc.open_stream(handle)
        while True:
            for record in reader.read_next_batch().to_pylist():
                record["ts"] = record["ts"].isoformat()
                record["unknown_categories"] = dict(record["unknown_categories"] or [])
                yield record
    except (StopIteration, pa.ArrowInvalid, OSError):
        return


def open_in_window(files: Iterable[Path], window: Window, stats: LogStats) -> Iterator[IO[bytes]]:
    for path in files:
        try:
            if window.since and datetime.fromtimestamp(path.stat().st_mtime, UTC) < window.since:
                stats.files_skipped += 1
                continue
            handle = path.open("rb")
        except FileNotFoundError:
            continue  # the oldest rotated copy, deleted by a rotation since the directory was listed
        except OSError as exc:
            raise InputError(f"cannot read the prediction log {path}: {exc.strerror or exc}") from None
        stats.files += 1
        yield handle


def log_lines(handles: list[IO[bytes]], stats: LogStats) -> Iterator[bytes]:
    for handle in handles:
        for line in handle:
            stats.lines += 1
            if line.endswith(b"\n"):
                yield line
                continue
            try:  # the last line, still being written unless it is a whole record
                orjson.loads(line)
            except orjson.JSONDecodeError:
                stats.partial += 1
                continue
            yield line


def batch_rows(handle: IO[bytes], target: LogTarget, window: Window, stats: LogStats) -> Iterator[LoggedRow]:
    """The rows of one Arrow IPC stream file (serving/arrowlog.py) of the target version in the window, a
    record batch at a time; a batch cut short ends the file's rows (counted as partial)."""
    try:
        reader = pa.ipc.open_stream(handle)
    except (pa.ArrowInvalid, OSError):  # cut before its first batch, or not a stream at all
        if os.fstat(handle.fileno()).st_size:  # an empty file is one the disk had no room to start
            stats.partial += 1
        return
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError):
            stats.partial += 1
            return
        stats.lines += batch.num_rows
        yield from _rows_of_batch(batch, target, window, stats)


def _rows_of_batch(
    batch: pa.RecordBatch, target: LogTarget, window: Window, stats: LogStats
) -> Iterator[LoggedRow]:
    try:
        columns = _batch_columns(batch, target, window, stats)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # values of the wrong types
        stats.corrupt += batch.num_rows
        return
    if columns is None:
        return
    request_ids, indices, numbers, categories, predictions, probabilities = columns
    for i in range(len(numbers)):
        yield request_ids[i], indices[i], (numbers[i], categories[i], predictions[i], probabilities[i])


def _batch_columns(
    batch: pa.RecordBatch, target: LogTarget, window: Window, stats: LogStats
) -> tuple[list[Any], list[Any], np.ndarray, list[tuple[str | None, ...]], list[Any], np.ndarray] | None:
    """The batch's rows of the target version in the window, column by column; None when it has none."""
    names = set(batch.schema.names)
    if not {"ts", "features", "model", "version"} <= names or not pa.types.is_struct(
        batch.schema.field("features").type
    ):
        raise pa.ArrowInvalid("not a prediction log batch")
    models, versions = _strings(batch.column("model")), _strings(batch.column("version"))
    mine = (models == target.model) & (versions == target.version)
    for (model, version), count in Counter(zip(models[~mine], versions[~mine], strict=True)).items():
        stats.other_versions[f"{model}:{version}"] += count
    moments = batch.column("ts").cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
    inside = mine.copy()
    if window.since is not None:
        inside &= moments >= _utc64(window.since)
    if window.until is not None:
        inside &= moments < _utc64(window.until)
    stats.outside_window += int(mine.sum() - inside.sum())
    kept = np.flatnonzero(inside)
    if not len(kept):
        return None
    batch = batch.take(pa.array(kept))
    rows = len(kept)
    features = _fields(batch.column("features"))
    if target.numeric:
        numbers = np.column_stack([_floats(features.get(name), rows) for name in target.numeric])
    else:
        numbers = np.empty((rows, 0))
    texts = [_texts(features.get(name), rows) for name in target.categorical]
    categories: list[tuple[str | None, ...]] = list(zip(*texts, strict=True)) if texts else [()] * rows
    if target.classes is None:
        predictions: list[Any] = _floats(_column(batch, "prediction"), rows).tolist()
        probabilities = np.empty((rows, 0))
    else:
        predictions = _texts(_column(batch, "prediction"), rows)
        given = _fields(_column(batch, "probabilities"))
        probabilities = np.column_stack([_floats(given.get(label), rows) for label in target.classes])
    request_ids = _texts(_column(batch, "request_id"), rows)
    indices = _column(batch, "row")
    row_indices: list[Any] = indices.to_pylist() if indices is not None else [None] * rows
    return request_ids, row_indices, numbers, categories, predictions, probabilities


def _strings(column: pa.Array) -> np.ndarray:
    return np.asarray(column.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array | None:
    return batch.column(name) if name in batch.schema.names else None


def _fields(column: pa.Array | None) -> dict[str, pa.Array]:
    """A struct column's fields by name (features, probabilities); none for anything else."""
    if column is None or not pa.types.is_struct(column.type):
        return {}
    return {field.name: column.field(field.name) for field in column.type}


def _floats(column: pa.Array | None, rows: int) -> np.ndarray:
    """Numbers, booleans as 0/1; NaN where missing (null, or no such column)."""
    if column is None:
        return np.full(rows, np.nan)
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _texts(column: pa.Array | None, rows: int) -> list[Any]:
    """Categories and class labels as strings; None where missing."""
    return column.cast(pa.string()).to_pylist() if column is not None else [None] * rows


def _utc64(moment: datetime) -> np.datetime64:
    return np.datetime64(moment.astimezone(UTC).replace(tzinfo=None), "us")


class LineParser:
    """A line into a row in reference-set form; None for a row of another version or outside the window.

    Built once per read, since it runs for every line of the log.
    """

    def __init__(self, target: LogTarget, window: Window, stats: LogStats) -> None:
        self.model, self.version, self.classes = target.model, target.version, target.classes
        self.window, self.stats = window, stats
        self.numbers = _getter(target.numeric)
        self.categories = _getter(target.categorical)
        self.probabilities = _getter(target.classes or [])

    def __call__(self, line: bytes) -> LoggedRow | None:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise CorruptLineError from None
        if not isinstance(record, dict):
            raise CorruptLineError
        if record.get("model") != self.model or record.get("version") != self.version:
            self.stats.other_versions[f"{record.get('model')}:{record.get('version')}"] += 1
            return None
        stamp = record.get("ts")
        features = record.get("features")
        if not isinstance(stamp, str) or not isinstance(features, dict):
            raise CorruptLineError
        try:
            moment = datetime.fromisoformat(stamp)
        except ValueError:
            raise CorruptLineError from None
        if not self.window.contains(moment if moment.tzinfo else moment.replace(tzinfo=UTC)):
            self.stats.outside_window += 1
            return None
        request_id, index = record.get("request_id"), record.get("row")
        request_id = request_id if isinstance(request_id, str) else None
        index = index if type(index) is int else None
        try:
            # None becomes NaN; text or nested values in a number column raise.
            numbers = np.array(self.numbers(features), dtype=np.float64)
            categories = tuple(_category(value) for value in self.categories(features))
            prediction = record.get("prediction")
            if self.classes is None:
                value = np.nan if prediction is None else float(prediction)
                return request_id, index, (numbers, categories, value, _NO_PROBABILITIES)
            given = record.get("probabilities")
            probabilities = np.array(self.probabilities(given if isinstance(given, dict) else {}), np.float64)
            predicted = None if prediction is None else _category(prediction)
            return request_id, index, (numbers, categories, predicted, probabilities)
        except (TypeError, ValueError):
            raise CorruptLineError from None


_NO_PROBABILITIES = np.empty(0)


def _getter(names: list[str]) -> Callable[[dict[str, Any]], Sequence[Any]]:
    """The values of `names` in a record, None where missing; in C when the record has them all."""
    if not names:
        return lambda _record: ()
    take = itemgetter(*names)

    def values(record: dict[str, Any]) -> Sequence[Any]:
        try:
            found = take(record)
        except KeyError:  # a record written before a feature existed
            return [record.get(name) for name in names]
        return found if len(names) > 1 else (found,)

    return values


def _category(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise TypeError("not a category")


def rows_frame(kept: list[Row], target: LogTarget) -> pd.DataFrame:
    rows = len(kept)
    numbers = np.vstack([row[0] for row in kept]) if rows else np.empty((0, len(target.numeric)))
    columns: dict[str, Any] = dict(zip(target.numeric, numbers.T, strict=True))
    for index, name in enumerate(target.categorical):
        columns[name] = pd.Series([row[1][index] for row in kept], dtype=object)
    columns[PREDICTION_COLUMN] = pd.Series(
        [row[2] for row in kept], dtype=np.float64 if target.classes is None else object
    )
    if target.classes is not None:
        probabilities = np.vstack([row[3] for row in kept]) if rows else np.empty((0, len(target.classes)))
        for index, label in enumerate(target.classes):
            columns[f"{PROBABILITY_PREFIX}{label}"] = probabilities[:, index]
    ordered = [*target.schema.names, PREDICTION_COLUMN]
    ordered += [f"{PROBABILITY_PREFIX}{label}" for label in target.classes or []]
    return pd.DataFrame(columns)[ordered]
