"""How the shadow challenger compares with the champion on live rows (serving/shadow.py writes the log).

Each shadow line holds one answered row's request id and row, the champion's version and answer (copied
from the answer it gave, so the prediction log need not be joined) and the challenger's version and
answer. Over a window (`since <= ts < until`, as drift/logs.py reads the prediction log):

- agreement: the share of rows with the same predicted class (classification), or the mean absolute
  difference of the two predicted values (regression);
- where POST /feedback gave labels (drift/performance.py `read_feedback`, the latest label per row), each
  version's accuracy (classification) or mean absolute error (regression) on those rows.

Only the rows of one challenger version are compared: the given one, else the newest one in the window.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from drift.logs import LogStats, Window, log_lines, open_in_window
from drift.performance import find_feedback_files, read_feedback

SHADOW_FILE = re.compile(r"^shadow-.+\.jsonl(\.\d+)?$")


@dataclass(frozen=True)
class ShadowComparison:
    champion_versions: list[str]  # registered versions that answered the compared rows (more after a swap)
    challenger_version: str | None  # registered version of the challenger compared
    rows: int
    agreement: float | None  # share of rows with the same class (classification)
    mean_abs_difference: float | None  # mean |champion - challenger| (regression)
    labelled_rows: int
    metric: str  # accuracy (classification) or mae (regression)
    champion_metric: float | None
    challenger_metric: float | None


def find_shadow_files(directory: Path) -> list[Path]:
    """Every worker's shadow log and its rotated copies, oldest copy first (as drift/logs.py's)."""
    if not directory.is_dir():
        return []

    def order(path: Path) -> tuple[str, int]:
        stem, _, rotation = path.name.partition(".jsonl")
        return stem, -int(rotation[1:] or 0)

    return sorted((path for path in directory.iterdir() if SHADOW_FILE.match(path.name)), key=order)


def compare_shadow(
    log_dir: Path, feedback_dir: Path, window: Window | None = None, challenger_version: str | None = None
) -> ShadowComparison:
    window = window or Window()
    stats = LogStats()
    records = _shadow_records(find_shadow_files(log_dir), window, stats)
    if challenger_version is None and records:
        challenger_version = max(records, key=lambda record: record["ts"])["challenger"]["registered_version"]
    records = [r for r in records if r["challenger"]["registered_version"] == challenger_version]
    # The shadow log gives a classifier's challenger answer with its class probabilities.
    classification = not records or "probabilities" in records[0]["challenger"]
    champion = [r["champion"]["prediction"] for r in records]
    challenger = [r["challenger"]["prediction"] for r in records]
    labels = read_feedback(find_feedback_files(feedback_dir), window, classification, stats)
    labelled = [
        (index, labels[(r["request_id"], r["row"])])
        for index, r in enumerate(records)
        if (r["request_id"], r["row"]) in labels
    ]

    def score(predictions: list[Any]) -> float | None:
        if not labelled:
            return None
        if classification:
            return float(np.mean([str(predictions[index]) == truth for index, truth in labelled]))
        return float(np.mean([abs(float(predictions[index]) - truth) for index, truth in labelled]))

    agreement = difference = None
    if records and classification:
        agreement = float(np.mean([str(a) == str(b) for a, b in zip(champion, challenger, strict=True)]))
    elif records:
        difference = float(np.mean(np.abs(np.subtract(champion, challenger, dtype=np.float64))))
    return ShadowComparison(
        champion_versions=sorted({r["champion"]["registered_version"] for r in records}, key=int),
        challenger_version=challenger_version,
        rows=len(records),
        agreement=agreement,
        mean_abs_difference=difference,
        labelled_rows=len(labelled),
        metric="accuracy" if classification else "mae",
        champion_metric=score(champion),
        challenger_metric=score(challenger),
    )


def _shadow_records(files: list[Path], window: Window, stats: LogStats) -> list[dict[str, Any]]:
    """The window's shadow lines (a line that does not parse is counted as corrupt and skipped)."""
    records = []
    with ExitStack() as stack:
        handles = [stack.enter_context(h) for h in open_in_window(files, window, stats)]
        for line in log_lines(handles, stats):
            try:
                record = orjson.loads(line)
                moment = datetime.fromisoformat(record["ts"])
                valid = {"prediction", "registered_version"} <= record["champion"].keys()
                valid &= {"prediction", "registered_version"} <= record["challenger"].keys()
            except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
                valid = False
            if not valid:
                stats.corrupt += 1
                continue
            if window.contains(moment if moment.tzinfo else moment.replace(tzinfo=UTC)):
                records.append(record)
    return records
