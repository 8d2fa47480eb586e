"""`promote NAME VERSION` and `rollback NAME`: the two hand moves of the champion alias, each through a gate.

promote: VERSION is scored against the current champion by the gate training uses (models/training.py
`gate`): on VERSION's own held-out rows and on the champion's, beside a dummy baseline fitted on VERSION's
reference rows (a sample of its training rows: its training split itself is not kept). Refused unless it
passes, or `--force` with a reason. A version whose files or held-out rows fail their digests is refused
even with `--force`: there is nothing sound to serve or to score.

rollback: the alias goes back to the version that held it before the current one (the registered model's
`champion_history` tag). It is not asked to beat the current champion (that is why one rolls back), but it
must still be sound: its store folder intact (every file's SHA-256), its held-out rows matching the digest
recorded with its run, its features and classes compatible with the current champion's (clients send the
current schema), and better than the dummy baseline on its own held-out rows.

Every move is recorded twice: one MLflow run per move (run name `promote-NAME-vN` / `rollback-NAME-vN`, tags
`lifecycle.move`, `lifecycle.model`, `from_version`, `to_version`, `by`, `reason`, `forced`, `gate_reason`,
the gate's figures as metrics), and version tags on the new champion (`moved_by`, `moved_at`,
`move_reason`). Every move puts the new champion into the local BentoML store (registry.fetch_version).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from models import registry, store
from models.errors import InputError, first_line
from models.evaluation import METRICS, Metric, dummy_baseline
from models.gate import Decision
from models.store import StoredModel
from models.training import TrainingOptions, gate, score_champion

MOVE_TAG = "lifecycle.move"
MODEL_TAG = "lifecycle.model"


@dataclass(frozen=True)
class Move:
    kind: str  # promote or rollback
    model: str
    from_version: str | None
    to_version: str
    by: str
    reason: str
    forced: bool
    gate_reason: str
    at: str
    run_id: str


@dataclass(frozen=True)
class Refusal:
    reason: str


def who(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container's numeric user)
        return f"uid {os.getuid()}"


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    reason: str,
    by: str,
    force: bool,
    margin: float,
    tolerance: float,
    progress: Callable[[str], None],
) -> Move | Refusal:
    if force and not reason.strip():
        raise InputError("--force needs --reason: say why the gate is overruled")
    champion = registry.current_champion(client, name)
    if champion is not None and champion.version == version:
        raise InputError(f"v{version} of '{name}' is already the champion")
    target, card, metric = _sound_version(client, name, version)
    holdout = _holdout(client, target)
    reference = target.load_reference()
    prepared = target.schema.prepare(reference)
    baseline = dummy_baseline(target.task, prepared, reference[store.TARGET_COLUMN])
    options = TrainingOptions(margin=margin, tolerance=tolerance, force=force)
    decision, figures = gate(
        client,
        champion,
        name,
        target.schema,
        card,
        metric,
        target.pipeline,
        baseline,
        holdout,
        options,
        progress,
    )
    if not decision.promote:
        return Refusal(decision.reason)
    history = registry.champion_history(client, name) if champion else []
    return _move(
        client, "promote", name, champion, version, [*history, version], by, reason, decision, figures
    )


def rollback(
    client: MlflowClient, name: str, reason: str, by: str, progress: Callable[[str], None]
) -> Move | Refusal:
    champion = registry.current_champion(client, name)
    if champion is None:
        raise InputError(f"'{name}' has no champion to roll back")
    history = registry.champion_history(client, name)
    if len(history) < 2 or history[-1] != champion.version:
        raise InputError(
            f"no previous champion of '{name}' recorded (champion history: {','.join(history) or 'none'})"
        )
    version = history[-2]
    progress(f"Checking v{version}, the champion before v{champion.version}")
    try:
        target, card, metric = _sound_version(client, name, version)
        holdout = _holdout(client, target)
    except InputError as exc:
        return Refusal(f"v{version} cannot be rolled back to: {exc}")
    reference = target.load_reference()
    baseline = dummy_baseline(target.task, target.schema.prepare(reference), reference[store.TARGET_COLUMN])
    scores = score_champion(
        client, champion, name, target.schema, card, metric, target.pipeline, baseline, holdout
    )
    if scores.incomparable is not None or scores.new_rows is None:
        return Refusal(
            f"v{version} is not compatible with champion v{champion.version}: {scores.incomparable}"
        )
    own = scores.new_rows
    figures = f"{metric.name} {own.new:.4f} vs dummy {own.baseline:.4f} on its own held-out rows"
    progress(f"  {figures}; current champion v{champion.version} {own.champion:.4f} there")
    if metric.improvement(own.new, own.baseline) <= 0:
        return Refusal(f"v{version} is no better than the dummy baseline: {figures}")
    decision = Decision(promote=True, forced=False, reason=f"rollback checks passed: {figures}")
    return _move(
        client, "rollback", name, champion, version, history[:-1], by, reason, decision, scores.figures()
    )


def history(name: str) -> list[Move]:
    """Every recorded move of `name`'s champion alias (promote, rollback), oldest first."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{MODEL_TAG}` = '{name}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return [
        Move(
            kind=run.data.tags[MOVE_TAG],
            model=name,
            from_version=run.data.tags.get("from_version") or None,
            to_version=run.data.tags["to_version"],
            by=run.data.tags.get("by", "-"),
            reason=run.data.tags.get("reason", "-"),
            forced=run.data.tags.get("forced") == "True",
            gate_reason=run.data.tags.get("gate_reason", "-"),
            at=datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(timespec="seconds"),
            run_id=run.info.run_id,
        )
        for run in runs
    ]


def _sound_version(
    client: MlflowClient, name: str, version: str
) -> tuple[StoredModel, dict[str, object], Metric]:
    """The version in the local store with its files checked, its model card and its metric."""
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise InputError(
            f"no version {version} of '{name}' in the MLflow registry: {first_line(exc)}"
        ) from None
    target = registry.fetch_version(client, name, version)  # opening checks every file's digest
    target.pipeline  # noqa: B018  (unpickled now: a damaged pipeline refuses here, not after the move)
    run_id = target.labels["mlflow_run_id"]
    try:
        card = mlflow.artifacts.load_dict(f"runs:/{run_id}/{registry.MODEL_CARD}")
    except (OSError, MlflowException) as exc:
        raise InputError(f"v{version}'s model card cannot be read: {first_line(exc)}") from None
    return target, card, METRICS[target.metadata["metric"]]


def _holdout(client: MlflowClient, target: StoredModel) -> pd.DataFrame:
    """The version's held-out rows as recorded with its run (digest-checked): labels changed since refuse."""
    holdout = registry.load_holdout(client, target.labels["mlflow_run_id"])
    if isinstance(holdout, str):
        raise InputError(holdout)
    return holdout


def _move(
    client: MlflowClient,
    kind: str,
    name: str,
    champion: registry.Champion | None,
    version: str,
    new_history: list[str],
    by: str,
    reason: str,
    decision: Decision,
    figures: dict[str, float],
) -> Move:
    """Move the alias and record who, when and why; a failure puts the alias and history back."""
    before = champion.version if champion else None
    old_history = registry.champion_history(client, name) if champion else []
    at = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {
        MOVE_TAG: kind,
        MODEL_TAG: name,
        "from_version": before or "",
        "to_version": version,
        "by": by,
        "reason": reason or "-",
        "forced": str(decision.forced),
        "gate_reason": decision.reason,
    }
    with mlflow.start_run(run_name=f"{kind}-{name}-v{version}", tags=tags) as run:
        mlflow.log_metrics({f"gate_{key}": value for key, value in figures.items()})
        try:
            registry.set_champion(client, name, version, new_history)
            for key, value in {
                "moved_by": by,
                "moved_at": at,
                "move_reason": f"{kind}: {reason or '-'}",
            }.items():
                client.set_model_version_tag(name, version, key, value)
            registry.fetch_version(client, name, version)
        except BaseException:
            if before is not None:
                registry.set_champion(client, name, before, old_history)
            raise
    return Move(
        kind, name, before, version, by, reason, decision.forced, decision.reason, at, run.info.run_id
    )
