"""The report job at scale: a generated prediction log of N rows, the job end to end against bare Evidently.

1. Write a log with the service's own writer (serving/arrowlog.py): N rows drawn from the model's reference
   set (the baseline scenario) with the model's real predictions, in requests of 50 rows time-stamped over
   the last hour, rotated every TABSERVE_PREDICTION_LOG_MAX_BYTES, plus rows of another version.
2. Time ``python -m drift report`` on it in its own process, as users run it: start-up, imports, reading,
   sampling, the Evidently report, HTML, JSON, latest.json and the workspace snapshot.
3. Time bare Evidently in its own process: ``Report([DataDriftPreset()]).run`` on the same N rows, already
   prepared in memory (only the run is timed; its imports and the generation are not).

Peak memory (RSS) of each process comes from the kernel's accounting of the child (``wait4``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drift.logs import find_log_files
from drift.simulate import Scenario, traffic
from drift.summary import read_latest
from models.schema import FeatureKind
from models.store import StoredModel
from serving.arrowlog import AnsweredRequest, ArrowLog, LogColumns
from settings import PROJECT_ROOT, get_settings

CHUNK_ROWS = 50_000
REQUEST_ROWS = 50
SEED = 0


@dataclass(frozen=True)
class Measured:
    seconds: float
    max_rss_mb: float
    exit_code: int


def chunks(model: StoredModel, rows: int, seed: int) -> Iterator[pd.DataFrame]:
    """The generated rows in client form, chunk by chunk; the same rows for the same arguments."""
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        size = min(CHUNK_ROWS, rows - start)
        yield traffic(model, Scenario.BASELINE, size, [], 0.0, 0.0, seed + index).frame


def write_log(model: StoredModel, directory: Path, rows: int, seed: int, max_bytes: int) -> int:
    """The service's log, written and rotated by the service's writer; returns the bytes written."""
    log = ArrowLog(directory, max_bytes, backups=1_000_000)
    served = LogColumns(model.schema.features, model.classes, model.lineage)
    older = LogColumns(model.schema.features, model.classes, {**model.lineage, "version": "older-version"})
    numeric_only = all(feature.kind is FeatureKind.NUMERIC for feature in model.schema.features)
    start_us = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1e6)
    step_us = 3_600e6 / rows
    row = 0
    for frame in chunks(model, rows, seed):
        predictions = model.predict(frame)
        # The rows as the data plane holds them: float64 when every feature is a number, else objects.
        values = frame[model.schema.names]
        if numeric_only:
            matrix = values.to_numpy(np.float64)
        else:
            matrix = values.astype(object).where(values.notna(), None).to_numpy()
        labels: list[Any] = predictions.labels.tolist()
        probabilities = predictions.probabilities
        for start in range(0, len(frame), REQUEST_ROWS):
            part = slice(start, start + REQUEST_ROWS)
            size = len(matrix[part])
            for columns in (served, older) if row % 100_000 == 0 else (served,):  # a version's rough edge
                log.write(
                    AnsweredRequest(
                        columns=columns,
                        answered_at_us=start_us + int(step_us * row),
                        request_id=uuid.uuid4().hex,
                        transport="http",
                        endpoint="/predict_batch",
                        rows=matrix[part],
                        labels=labels[part],
                        probabilities=None if probabilities is None else probabilities[part],
                        unknown_categories=[{}] * size,
                    )
                )
            row += size
    log.close()
    return sum(path.stat().st_size for path in find_log_files(directory))


def run(
    model_tag: str,
    rows: int,
    directory: Path | None,
    keep: bool,
    progress: Callable[[str], None],
    say: Callable[[str], None],
) -> int:
    settings = get_settings()
    model = StoredModel.open(model_tag)
    root = directory or Path(tempfile.mkdtemp(prefix="drift-bench-"))
    log_dir = root / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        progress(f"writing a {rows:,}-row prediction log of {model.tag} to {log_dir}")
        started = time.perf_counter()
        size = write_log(model, log_dir, rows, SEED, settings.prediction_log_max_bytes)
        progress(f"  {size / 2**20:,.0f} MiB in {time.perf_counter() - started:.0f} s")

        command = [sys.executable, "-m", "drift", "report", "--model", model.tag, "--log-dir", str(log_dir)]
        command += ["--since", "2h"]
        progress("timing: " + " ".join(command[1:]))
        env = {
            **os.environ,
            "TABSERVE_REPORTS_DIR": str(root / "reports"),
            "TABSERVE_WORKSPACE_DIR": str(root / "workspace"),
        }
        job = _measure(command, env)
        latest = read_latest(root / "reports", model.name)
        if job.exit_code not in (0, 1) or latest is None:
            progress(f"error: the report exited with code {job.exit_code}")
            return job.exit_code or 2

        result = root / "bare.json"
        progress("timing: bare Evidently (DataDriftPreset) on the same rows in memory")
        bare_process = _measure(
            [sys.executable, "-m", "drift", "bench-bare", model.tag, str(rows), str(SEED), str(result)], env
        )
        bare_seconds = json.loads(result.read_text())["seconds"]
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    ratio = job.seconds / bare_seconds
    verdict = "drift" if latest["drift_detected"] else "no drift"
    say(
        f"rows in the log: {rows:,} ({size / 2**20:,.0f} MiB); the report saw {latest['rows_seen']:,}, "
        f"compared {latest['rows_compared']:,}: {verdict}"
    )
    say(f"drift report, end to end:   {job.seconds:6.1f} s, peak RSS {job.max_rss_mb:6.0f} MiB")
    say(
        f"bare Evidently, run only:   {bare_seconds:6.1f} s, peak RSS {bare_process.max_rss_mb:6.0f} MiB "
        f"(process {bare_process.seconds:.1f} s)"
    )
    say(f"ratio: {ratio:.2f}x the time of bare Evidently")
    return 0


def bare(model_tag: str, rows: int, seed: int, result: Path) -> None:
    from evidently import DataDefinition, Dataset, Report  # noqa: PLC0415  (only this process needs it)
    from evidently.presets import DataDriftPreset  # noqa: PLC0415

    model = StoredModel.open(model_tag)
    schema = model.schema
    current = pd.concat([schema.prepare(frame) for frame in chunks(model, rows, seed)], ignore_index=True)
    reference = model.load_reference()[schema.names]
    definition = DataDefinition(
        numerical_columns=schema.names_of(FeatureKind.NUMERIC),
        categorical_columns=[
            *schema.names_of(FeatureKind.CATEGORICAL),
            *schema.names_of(FeatureKind.BOOLEAN),
        ],
    )
    started = time.perf_counter()
    Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    result.write_text(json.dumps({"seconds": time.perf_counter() - started, "rows": len(current)}))


def _measure(command: list[str], env: dict[str, str]) -> Measured:
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL)
    # wait4 gives this child's own peak RSS (kilobytes on Linux), not the maximum over all children.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Measured(time.perf_counter() - started, usage.ru_maxrss / 1024, process.returncode)
