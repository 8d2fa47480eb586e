"""Run a job at a fixed interval in one long-lived process, for hosts without cron.

APScheduler's blocking scheduler runs the job at once, then every interval. A run that is still going when
the next is due is not doubled: the due run is skipped (one instance at most), and runs missed while the
process was busy are merged into one. SIGTERM or SIGINT stops the schedule; a run in progress finishes
first, so its report folder and latest.json are complete.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from drift.logs import parse_duration
from models.errors import InputError

MIN_INTERVAL = timedelta(seconds=10)


def parse_interval(every: str) -> timedelta:
    """`--every` of a schedule: a duration (30m, 6h, 1d) of at least MIN_INTERVAL."""
    interval = parse_duration(every, "--every")
    if interval < MIN_INTERVAL:
        raise InputError(f"--every {every} is too short: at least {MIN_INTERVAL.total_seconds():g}s")
    return interval


def run_every(interval: timedelta, job: Callable[[], None], say: Callable[[str], None]) -> None:
    scheduler = BlockingScheduler(timezone=UTC)
    scheduler.add_job(
        job,
        IntervalTrigger(seconds=interval.total_seconds(), timezone=UTC),
        next_run_time=datetime.now(UTC),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=int(interval.total_seconds()),
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        if scheduler.running:
            say(f"{signal.Signals(signum).name}: stopping after the report in progress, if any")
            scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(f"reporting every {interval}; SIGTERM or Ctrl-C stops")
    scheduler.start()
