"""`status NAME`: the registered versions of a model with their aliases, metrics and promotion decisions, and
what a running service says it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from models.errors import InputError, first_line

# Model-version tags that training sets (models/training.py).
PROMOTION_TAG = "promotion"
REASON_TAG = "gate_reason"
DIGEST_TAG = "dataset_digest"
BENTO_TAG = "bento_tag"
TRIGGER_TAG = "trigger"  # what set a retrain off (lifecycle/retrain.py); "-" for a training by hand


@dataclass(frozen=True)
class VersionStatus:
    version: str
    aliases: list[str]
    created_ms: int
    run_id: str
    promotion: str  # promoted, rejected or forced
    reason: str
    metric: str | None
    score: float | None  # the run's held-out score on `metric`
    data_digest: str
    bento_tag: str
    trigger: str


@dataclass(frozen=True)
class Served:
    url: str
    answer: dict[str, Any] | None  # GET /model, or None when the service did not answer
    problem: str | None = None


def versions(client: MlflowClient, name: str) -> list[VersionStatus]:
    """Every registered version of `name`, newest first."""
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise InputError(f"MLflow registry cannot be read: {first_line(exc)}") from None
    if not found:
        raise InputError(f"no registered model '{name}': train one with `python train.py`")
    # Versions found by a search do not carry their aliases; the registered model does.
    aliases: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    statuses = []
    for version in found:
        run = client.get_run(str(version.run_id))
        metric = run.data.params.get("metric")
        tags = version.tags
        statuses.append(
            VersionStatus(
                version=str(version.version),
                aliases=sorted(aliases.get(str(version.version), [])),
                created_ms=int(version.creation_timestamp),
                run_id=str(version.run_id),
                promotion=tags.get(PROMOTION_TAG, "-"),
                reason=tags.get(REASON_TAG, "-"),
                metric=metric,
                score=run.data.metrics.get(f"test_{metric}") if metric else None,
                data_digest=tags.get(DIGEST_TAG, "-"),
                bento_tag=tags.get(BENTO_TAG, "-"),
                trigger=tags.get(TRIGGER_TAG, "-"),
            )
        )
    return sorted(statuses, key=lambda status: int(status.version), reverse=True)


def served(url: str) -> Served:
    """What the service at `url` says it serves (`GET /model`)."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/model", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return Served(url, None, f"no answer from {url}/model: {first_line(exc)}")
    return Served(url, response.json())


def serving_verdict(statuses: list[VersionStatus], service: Served) -> tuple[bool, str]:
    """Whether the service serves the champion, and a line that says so."""
    if service.answer is None:
        return False, str(service.problem)
    serving = str(service.answer.get("registered_version"))
    champion = next((status.version for status in statuses if "champion" in status.aliases), None)
    if champion is None:
        return False, f"{service.url} serves v{serving}; no version holds the champion alias"
    if serving == champion:
        return True, f"{service.url} serves v{serving}, the champion ({service.answer.get('tag')})"
    return False, f"{service.url} serves v{serving}, but the champion is v{champion}"
