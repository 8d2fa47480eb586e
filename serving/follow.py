"""Which version to serve, and following the registry's alias while serving.

At start-up (models/registry.py `served_model`, which the drift reports and benchmarks use too):
TABSERVE_MODEL_TAG if set (then that version is served and never replaced); else the version holding the
`champion` alias in the MLflow registry, when the registry answers; else the store's NAME:latest (an image
built by `bentoml build` holds only the champion).

While serving (`Follower`), each worker asks the registry every `reload_seconds` which version holds the
alias. When it moves, the worker fetches that version (models/registry.py fetch_version), checks it (it must
take exactly the requests the service's request model accepts, and give again the predictions stored with
its reference rows), prepares it on a thread and hands it to the service, which swaps it in between calls.
A version that fails the checks is not swapped in: the service keeps serving and says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from mlflow import MlflowClient

from models import registry
from models.errors import InputError, first_line
from models.registry import RegistryUnreachableError, alias_version, registry_client
from models.store import StoredModel, reproduction_problem
from serving.metrics import ServingMetrics
from settings import Settings

logger = logging.getLogger(__name__)
# BentoML's server passes only warnings of other loggers than its own; which version serves is worth a line.
logger.setLevel(logging.INFO)

Prepared = TypeVar("Prepared")


def request_incompatibility(served: StoredModel, candidate: StoredModel) -> str | None:
    """Why `candidate` cannot answer the requests the service's request model (built at start-up from
    `served`) accepts, or None if it can: same features (names, kinds, nullability), task and classes.
    Ranges and limits may differ: the candidate's data plane applies its own."""
    problem = served.schema.incompatibility(candidate.schema)
    if problem is not None:
        return problem
    nullable = {feature.name: feature.nullable for feature in candidate.schema.features}
    for feature in served.schema.features:
        if nullable[feature.name] != feature.nullable:
            allowed = "allows" if nullable[feature.name] else "does not allow"
            return f"feature '{feature.name}': the new version {allowed} missing values"
    if candidate.task != served.task:
        return f"the task was {served.task}, is now {candidate.task}"
    if candidate.classes != served.classes:
        return f"the classes were {served.classes}, are now {candidate.classes}"
    return None


@dataclass
class FollowState:
    """What /model says about following (its `following` block)."""

    alias: str
    every_seconds: float
    alias_version: str | None = None  # the registered version holding the alias at the last answer
    last_check: str | None = None
    last_problem: str | None = None
    restart_needed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "every_seconds": self.every_seconds,
            "alias_version": self.alias_version,
            "last_check": self.last_check,
            "last_problem": self.last_problem,
            "restart_needed": self.restart_needed,
        }


class Follower(Generic[Prepared]):
    """Follows one alias for one worker. `prepare` (on a thread) makes what serving a version needs, for
    example its model call and data plane; `install` (on the event loop) swaps it in."""

    def __init__(
        self,
        settings: Settings,
        alias: str,
        served: StoredModel | None,
        startup: StoredModel,
        prepare: Callable[[StoredModel], Prepared],
        install: Callable[[StoredModel, Prepared], None],
        metrics: ServingMetrics,
    ) -> None:
        self._settings = settings
        self._name = startup.name
        self._startup = startup  # the model whose schema the request model was built from
        self.served = served
        self._prepare = prepare
        self._install = install
        self._swaps = metrics.model_swaps
        self._restart_needed = metrics.restart_needed.labels(model=self._name, alias=alias)
        self._refused: str | None = None  # a registered version already found unusable: not tried again
        self._outage = False
        self.state = FollowState(alias, settings.reload_seconds)
        self._client: MlflowClient | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reload_seconds)
            await self.check()

    async def check(self) -> None:
        """One poll. Everything that blocks (the registry, the store, loading the model) runs on a thread."""
        try:
            found = await asyncio.to_thread(self._candidate)
        except RegistryUnreachableError as exc:
            self._note_outage(str(exc))
            return
        self.state.last_check = datetime.now(UTC).isoformat()
        if self._outage:
            self._outage = False
            logger.info("the registry answers again; following '%s'", self.state.alias)
            if not self.state.restart_needed:
                self.state.last_problem = None
        if found is None:
            return
        model, prepared = found
        self._install(model, prepared)
        self.served = model
        self._swaps.labels(model=self._name, alias=self.state.alias, result="swapped").inc()
        self._restart_needed.set(0)
        self.state.last_problem, self.state.restart_needed = None, False
        logger.info(
            "swapped in %s (registered version %s, holds '%s')",
            model.tag,
            model.labels["registered_version"],
            self.state.alias,
        )

    def _candidate(self) -> tuple[StoredModel, Prepared] | None:
        """The version that now holds the alias, checked and prepared, if it is new and usable."""
        if self._client is None:
            self._client = registry_client(self._settings)
            if self._client is None:
                raise RegistryUnreachableError(f"no MLflow store at {self._settings.tracking_uri}")
        version = alias_version(self._client, self._name, self.state.alias)
        self.state.alias_version = version
        if version in (None, self._served_version, self._refused):
            return None
        try:
            model = registry.fetch_version(self._client, self._name, version)
        except InputError as exc:
            self._refuse(version, "unusable", str(exc), restart=False)
            return None
        incompatible = request_incompatibility(self._startup, model)
        if incompatible is not None:
            self._refuse(version, "incompatible", incompatible, restart=True)
            return None
        try:
            problem = reproduction_problem(model)
            prepared = None if problem else self._prepare(model)
        except Exception as exc:  # a model that cannot be loaded or run fails in many ways
            problem = first_line(exc)
        if problem is not None or prepared is None:
            self._refuse(version, "unusable", problem or "it could not be prepared", restart=False)
            return None
        return model, prepared

    @property
    def _served_version(self) -> str | None:
        return self.served.labels["registered_version"] if self.served is not None else None

    def _refuse(self, version: str, result: str, problem: str, *, restart: bool) -> None:
        self._refused = version
        message = f"version {version} holds '{self.state.alias}' but is not served: {problem}"
        if restart:
            message += f"; a restart is needed to serve it (still serving version {self._served_version})"
            self._restart_needed.set(1)
        self.state.last_problem, self.state.restart_needed = message, restart
        self._swaps.labels(model=self._name, alias=self.state.alias, result=result).inc()
        logger.warning(message)

    def _note_outage(self, reason: str) -> None:
        """Once per outage, not once per poll: a log line and a count."""
        self.state.last_problem = (
            f"the registry is unreachable ({reason}); still serving version {self._served_version}"
        )
        if not self._outage:
            self._outage = True
            self._swaps.labels(model=self._name, alias=self.state.alias, result="registry_unreachable").inc()
            logger.warning(self.state.last_problem)
